//! The multi-node harness itself (no agent): pods on different nodes reach
//! each other over the fabric with their own addresses, and the external
//! client reaches the nodes, in both families of the dual-stack topology.
//! The north-south tests build on it; the IPv6 runs prove the harness on
//! its own, with no Service and no program in the way.

use std::{net::SocketAddr, time::Duration};

use service_tests::{
    cluster::{Cluster, external_addr, node_addr, pod_addr, pod_ip},
    fixture,
    netns::{Family, http_url},
    north_south::parse_answer,
    traffic::{tcp_who, udp_ask},
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn pods_on_two_nodes_and_an_external_client_reach_each_other(family: Family) {
    let mut cluster = Cluster::new(2).expect("cluster");
    cluster.node_mut(1).add_pod("a", pod_ip(1, 11)).expect("pod a");
    cluster.node_mut(1).add_pod("a2", pod_ip(1, 12)).expect("pod a2");
    cluster.node_mut(2).add_pod("b", pod_ip(2, 11)).expect("pod b");
    let _servers = [
        fixture::start_echo(&cluster.node(2).pod("b").ns, "b", &[]).expect("echo b"),
        fixture::start_echo(&cluster.node(1).pod("a2").ns, "a2", &[]).expect("echo a2"),
    ];
    let (a, b) = (pod_addr(family, 1, 11), pod_addr(family, 2, 11));

    // Pod to pod across nodes: routed over the fabric, no translation; the
    // server sees the client pod's own address, in the family dialled.
    let body = fixture::curl(&cluster.node(1).pod("a").ns, &http_url(b, 8080)).expect("cross-node");
    let (name, peer) = parse_answer(&body);
    assert_eq!((name.as_str(), peer.ip()), ("b", a), "{body}");
    // UDP across nodes, and TCP between two pods of one node.
    let answer = cluster.node(1).pod("a").ns.run_in(|| udp_ask(SocketAddr::new(b, 5353), b"hi", TIMEOUT));
    let (name, peer) = parse_answer(&String::from_utf8_lossy(&answer.expect("udp across nodes")));
    assert_eq!((name.as_str(), peer.ip()), ("b", a));
    let a2 = pod_addr(family, 1, 12);
    let line = cluster.node(1).pod("a").ns.run_in(|| tcp_who(SocketAddr::new(a2, 8080), TIMEOUT)).expect("same node");
    let (name, peer) = parse_answer(&line);
    assert_eq!((name.as_str(), peer.ip()), ("a2", a));

    // The external client reaches node 2's address and a node reaches the
    // external client (neighbour resolution across the fabric bridge).
    for (from, to) in [(&cluster.external, node_addr(family, 2)), (&cluster.node(1).node, external_addr(family))] {
        let out = from.exec("ping", &["-c", "1", "-W", "2", &to.to_string()]).expect("ping");
        assert!(out.status.success(), "ping {to}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // A node reaches a pod of the other node (the pod CIDR routes).
    let out = cluster.node(2).node.exec("ping", &["-c", "1", "-W", "2", &a.to_string()]).expect("ping");
    assert!(out.status.success(), "ping {a}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn pods_on_two_nodes_and_an_external_client_reach_each_other_over_ipv4() {
    pods_on_two_nodes_and_an_external_client_reach_each_other(Family::V4);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn pods_on_two_nodes_and_an_external_client_reach_each_other_over_ipv6() {
    pods_on_two_nodes_and_an_external_client_reach_each_other(Family::V6);
}
