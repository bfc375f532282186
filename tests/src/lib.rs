//! Shared pieces of the privileged test tiers, the demo and the benchmarks.
pub mod bench;
pub mod cgroup;
pub mod cluster;
pub mod fixture;
pub mod fuzz;
pub mod kube_proxy_rules;
pub mod netns;
pub mod north_south;
pub mod overlay;
pub mod packet;
pub mod packet6;
pub mod traffic;
