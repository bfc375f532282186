//! Sources only produce Kubernetes objects (k8s-openapi types); they know
//! nothing of maps. `manifest` reads a directory of YAML/JSON the way a user
//! would `kubectl apply` it. `addresses` reads the node's own addresses
//! (where NodePorts answer, what SNAT writes).
pub mod addresses;
pub mod kube;
pub mod manifest;

use std::collections::BTreeMap;

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

/// `namespace/name` of an object. An object without a namespace is in
/// `default`, as `kubectl apply` would put it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Everything a source currently knows: the store the model reads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    pub services: BTreeMap<ObjectRef, Service>,
    pub endpoint_slices: BTreeMap<ObjectRef, EndpointSlice>,
    /// This node's Node object, when the source knows it (its zone label
    /// drives topology-aware routing).
    pub node: Option<Node>,
}
