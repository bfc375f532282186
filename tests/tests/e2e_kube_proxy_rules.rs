//! The benchmark's baselines are real: kube-proxy's iptables and nftables
//! rulesets, as `tests/src/kube_proxy_rules.rs` writes them, loaded with
//! `iptables-restore` / `nft -f` into a node namespace, carry real TCP
//! connections from a client pod through the ClusterIP to all three
//! backend pods (root). The same check runs at the start of every
//! `cargo xtask bench`.

use service_tests::bench::traffic::{Variant, check_flows};

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn kube_proxys_iptables_ruleset_carries_clusterip_traffic() {
    check_flows(Variant::Iptables, 50).expect("iptables ruleset");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn kube_proxys_nftables_ruleset_carries_clusterip_traffic() {
    check_flows(Variant::Nftables, 50).expect("nftables ruleset");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn our_dataplane_carries_the_same_benchmark_traffic() {
    check_flows(Variant::Ours, 50).expect("the agent");
}
