//! Shared pieces of the privileged test tiers, the demo and the benchmarks.
pub mod bench;
pub mod cluster;
pub mod fixture;
pub mod kube_proxy_rules;
pub mod netns;
pub mod north_south;
pub mod packet;
pub mod traffic;
