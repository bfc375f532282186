//! Tier 3: `--localhost-nodeports` with real sockets. Node 1's agent
//! attaches its cgroup hooks to a cgroup this test creates under its own
//! (`--cgroup-root`); clients run in that cgroup, in node 1's network
//! namespace as host processes do, or in a pod's. With the flag the node's
//! own sockets reach a NodePort on 127.0.0.1 (kube-proxy's
//! `--iptables-localhost-nodeports`), a pod's 127.0.0.1 stays its own even
//! under `--socket-lb all`; without it 127.0.0.1 is left alone (nothing
//! listens there: the kernel refuses, no program counts a call).

use std::{collections::BTreeSet, time::Duration};

use service_tests::{
    cgroup::TestCgroup,
    cluster::node_ip,
    netns::Agent,
    north_south::{A1, B2, CLIENT_POD, NorthSouth, WEB},
};

/// The backend name in an `answer NAME PEER` line.
fn backend(lines: &[String]) -> String {
    lines
        .iter()
        .find_map(|l| l.strip_prefix("answer "))
        .and_then(|a| a.split_whitespace().next())
        .unwrap_or_else(|| panic!("no answer in {lines:?}"))
        .to_owned()
}

/// The socket path's counters that move when a call is translated or
/// refused by a program.
fn socket_counters(ns: &NorthSouth) -> (u64, u64) {
    (ns.counter(1, "sock_connect"), ns.counter(1, "sock_refused"))
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn host_sockets_reach_a_nodeport_on_localhost_only_with_the_flag() {
    let cgroup = TestCgroup::new().expect("test cgroup");
    let root = cgroup.path().display().to_string();
    let flags = |socket_lb: &'static str, localhost: bool| {
        let mut f = vec!["--external-interfaces", "eth0", "--socket-lb", socket_lb, "--cgroup-root", root.as_str()];
        if localhost {
            f.push("--localhost-nodeports");
        }
        f
    };
    let node1_flags = flags("all", true);
    let mut ns = NorthSouth::start_with(&[WEB], |_| {}, &[&node1_flags, &["--external-interfaces", "eth0"]]);
    let node = &ns.cluster.node(1).node;
    let both: BTreeSet<String> = [A1.0, B2.0].iter().map(|s| (*s).to_owned()).collect();

    // The node's own sockets: 127.0.0.1:NodePort reaches both backends,
    // and getpeername() shows the address dialled.
    let mut seen = BTreeSet::new();
    for _ in 0..16 {
        let lines = cgroup.sock_client(node, "tcp", "127.0.0.1:30080").expect("sock-client");
        assert_eq!(lines.first().map(String::as_str), Some("peer 127.0.0.1:30080"), "{lines:?}");
        seen.insert(backend(&lines));
    }
    assert_eq!(seen, both, "TCP to 127.0.0.1:30080 from the node");
    let lines = cgroup.sock_client(node, "udp", "127.0.0.1:30053").expect("sock-client");
    assert_eq!(lines.first().map(String::as_str), Some("from 127.0.0.1:30053"), "{lines:?}");
    // The node's address keeps answering as before.
    let node_port = format!("{}:30080", node_ip(1));
    backend(&cgroup.sock_client(node, "tcp", &node_port).expect("sock-client"));

    // A pod's 127.0.0.1 is its own, under `--socket-lb all` too: no program
    // touches the call, and nothing listens there.
    let pod = &ns.cluster.node(1).pod("client").ns;
    let before = socket_counters(&ns);
    let lines = cgroup.sock_client(pod, "tcp", "127.0.0.1:30080").expect("sock-client");
    assert!(lines.iter().any(|l| l.contains("os error 111")), "{lines:?}");
    assert_eq!(socket_counters(&ns), before, "a pod's 127.0.0.1 was translated or refused by a program");
    // The same pod's socket to the ClusterIP is translated (`all`).
    let lines = cgroup.sock_client(pod, "tcp", "10.96.0.10:80").expect("sock-client");
    assert!(both.contains(&backend(&lines)), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains(&CLIENT_POD.to_string())), "the backend sees the pod: {lines:?}");

    // Without the flag (kube-proxy's nftables mode): 127.0.0.1 is left
    // alone, the node's address still answers.
    drop(ns.agents.remove(0));
    let node = &ns.cluster.node(1).node;
    let node1_flags = flags("host", false);
    let mut agent = Agent::start(node, ns.manifests.path(), "node1", &ns.root(1), &node1_flags).expect("agent");
    agent.wait_for_log("synced", 1, Duration::from_secs(20)).expect("first sync");
    backend(&cgroup.sock_client(node, "tcp", &node_port).expect("sock-client"));
    let before = socket_counters(&ns);
    let lines = cgroup.sock_client(node, "tcp", "127.0.0.1:30080").expect("sock-client");
    assert!(lines.iter().any(|l| l.contains("os error 111")), "{lines:?}");
    assert_eq!(socket_counters(&ns), before, "127.0.0.1 was translated or refused by a program without the flag");
    drop(agent);
}
