//! The benchmark's baselines are real: kube-proxy's iptables and nftables
//! rulesets, as `tests/src/kube_proxy_rules.rs` writes them, loaded with
//! `iptables-restore` / `nft -f` (IPv4) and `ip6tables-restore` / an
//! `ip6 kube-proxy` table (IPv6) into a node namespace, carry real TCP
//! connections from a client pod through the ClusterIP to all three
//! backend pods, each backend seeing the client's own address (root). Our
//! dataplane carries the same traffic from the same Services as YAML. The
//! same checks run at the start of every `cargo xtask bench`.

use service_tests::{
    bench::traffic::{Variant, check_flows},
    in_both_families,
    netns::Family,
};

fn kube_proxys_iptables_ruleset_carries_clusterip_traffic(family: Family) {
    check_flows(Variant::Iptables, 50, family).expect("iptables ruleset");
}

fn kube_proxys_nftables_ruleset_carries_clusterip_traffic(family: Family) {
    check_flows(Variant::Nftables, 50, family).expect("nftables ruleset");
}

fn our_dataplane_carries_the_same_benchmark_traffic(family: Family) {
    check_flows(Variant::Ours, 50, family).expect("the agent");
}

in_both_families!(
    kube_proxys_iptables_ruleset_carries_clusterip_traffic,
    kube_proxys_nftables_ruleset_carries_clusterip_traffic,
    our_dataplane_carries_the_same_benchmark_traffic,
);
