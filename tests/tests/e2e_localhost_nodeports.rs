//! Tier 3: `--localhost-nodeports` with real sockets. Node 1's agent
//! attaches its cgroup hooks to a cgroup this test creates under its own
//! (`--cgroup-root`); clients run in that cgroup, in node 1's network
//! namespace as host processes do, or in a pod's. With the flag the node's
//! own sockets reach a NodePort on 127.0.0.1 (kube-proxy's
//! `--iptables-localhost-nodeports`), a pod's 127.0.0.1 stays its own even
//! under `--socket-lb all`; without it 127.0.0.1 is left alone (nothing
//! listens there: the kernel refuses, no program counts a call).

use std::time::Duration;

use service_tests::{
    cgroup::TestCgroup,
    cluster::node_ip,
    netns::Agent,
    north_south::{A1, B2, CLIENT_POD, NorthSouth, WEB},
};

/// Whether `lines` hold an answer of a backend (`answer NAME PEER`),
/// the peer containing `peer` when given.
fn answered(lines: &[String], peer: &str) -> bool {
    lines.iter().any(|l| l.strip_prefix("answer ").is_some_and(|a| a.contains(peer)))
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

    // The node's own sockets: 127.0.0.1:NodePort reaches both backends,
    // getpeername() showing the address dialled every time (`tcp-many`
    // checks it). Missing one of the two in 64 sockets: below 1e-17.
    let lines = cgroup.sock_client_with(node, &["tcp-many", "127.0.0.1:30080", "64"]).expect("sock-client");
    let tally = lines.iter().find_map(|l| l.strip_prefix("backends ")).unwrap_or_else(|| panic!("{lines:?}"));
    let seen: Vec<&str> = tally.split(',').filter_map(|pair| pair.split_once('=').map(|(name, _)| name)).collect();
    assert_eq!(seen, [A1.0, B2.0], "TCP to 127.0.0.1:30080 from the node: {lines:?}");
    let lines = cgroup.sock_client(node, "udp", "127.0.0.1:30053").expect("sock-client");
    assert_eq!(lines.first().map(String::as_str), Some("from 127.0.0.1:30053"), "{lines:?}");
    // The node's address keeps answering as before.
    let node_port = format!("{}:30080", node_ip(1));
    let lines = cgroup.sock_client(node, "tcp", &node_port).expect("sock-client");
    assert!(answered(&lines, ""), "{lines:?}");

    // A pod's 127.0.0.1 is its own, under `--socket-lb all` too: no program
    // touches the call, and nothing listens there.
    let pod = &ns.cluster.node(1).pod("client").ns;
    let before = socket_counters(&ns);
    let lines = cgroup.sock_client(pod, "tcp", "127.0.0.1:30080").expect("sock-client");
    assert!(lines.iter().any(|l| l.contains("os error 111")), "{lines:?}");
    assert_eq!(socket_counters(&ns), before, "a pod's 127.0.0.1 was translated or refused by a program");
    // The same pod's socket to the ClusterIP is translated by connect4
    // (`all`), not left to the packet path.
    let connects = ns.counter(1, "sock_connect");
    let lines = cgroup.sock_client(pod, "tcp", "10.96.0.10:80").expect("sock-client");
    assert!(answered(&lines, &CLIENT_POD.to_string()), "the backend answers the pod: {lines:?}");
    assert!(ns.counter(1, "sock_connect") > connects, "the pod's connect() was not translated");

    // Without the flag (kube-proxy's nftables mode): 127.0.0.1 is left
    // alone, the node's address still answers.
    drop(ns.agents.remove(0));
    let node = &ns.cluster.node(1).node;
    let node1_flags = flags("host", false);
    let mut agent = Agent::start(node, ns.manifests.path(), "node1", &ns.root(1), &node1_flags).expect("agent");
    agent.wait_for_log("synced", 1, Duration::from_secs(20)).expect("first sync");
    let lines = cgroup.sock_client(node, "tcp", &node_port).expect("sock-client");
    assert!(answered(&lines, ""), "{lines:?}");
    let before = socket_counters(&ns);
    let lines = cgroup.sock_client(node, "tcp", "127.0.0.1:30080").expect("sock-client");
    assert!(lines.iter().any(|l| l.contains("os error 111")), "{lines:?}");
    assert_eq!(socket_counters(&ns), before, "127.0.0.1 was translated or refused by a program without the flag");
    drop(agent);
}
