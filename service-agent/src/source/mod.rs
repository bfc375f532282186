//! Sources only produce Kubernetes objects (k8s-openapi types); they know
//! nothing of maps. `manifest` reads a directory of YAML/JSON the way a user
//! would `kubectl apply` it. `addresses` reads the node's own addresses
//! (where NodePorts answer, what SNAT writes). What they produce is
//! [`Objects`](crate::vocabulary::Objects).
pub mod addresses;
pub mod kube;
pub mod manifest;
