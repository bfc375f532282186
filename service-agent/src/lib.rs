//! The service dataplane agent. Data flows one way (docs/architecture.md):
//!
//! sources (Kubernetes objects) → model (desired frontends, pure) →
//! reconciler (ordered map writes) → maps (pinned, read by the eBPF
//! programs); the attach manager keeps the programs on the pod and external
//! interfaces; `healthcheck` serves kube-proxy's health check node ports;
//! `gc` frees the conntrack and affinity entries that expired.
pub mod attach;
pub mod gc;
pub mod healthcheck;
pub mod inspect;
pub mod maps;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod reconciler;
pub mod rows;
pub mod run;
pub mod source;
pub mod vocabulary;
