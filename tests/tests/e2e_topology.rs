//! The multi-node harness itself (no agent): pods on different nodes reach
//! each other over the fabric with their own addresses, and the external
//! client reaches the nodes. The north-south tests build on it.

use service_tests::{
    cluster::{Cluster, EXTERNAL_IP, node_ip, pod_ip},
    fixture,
};

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn pods_on_two_nodes_and_an_external_client_reach_each_other() {
    let mut cluster = Cluster::new(2).expect("cluster");
    cluster.node_mut(1).add_pod("a", pod_ip(1, 11)).expect("pod a");
    cluster.node_mut(2).add_pod("b", pod_ip(2, 11)).expect("pod b");
    let _server = fixture::start_echo(&cluster.node(2).pod("b").ns, "b", &[]).expect("echo");

    // Pod to pod across nodes: routed over the fabric, no translation.
    let body =
        fixture::curl(&cluster.node(1).pod("a").ns, &format!("http://{}:8080/", pod_ip(2, 11))).expect("cross-node");
    assert!(body.starts_with(&format!("b {}:", pod_ip(1, 11))), "{body}");

    // The external client reaches node 2's address.
    let out = cluster.external.exec("ping", &["-c", "1", "-W", "2", &node_ip(2).to_string()]).expect("ping");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cluster.node(1).node.exec("ping", &["-c", "1", "-W", "2", &EXTERNAL_IP.to_string()]).expect("ping");
    assert!(out.status.success());
}
