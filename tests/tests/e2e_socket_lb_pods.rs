//! Tier 3: socket-level load balancing for pods (`--socket-lb all`). Node
//! 1's agent attaches its cgroup hooks to a cgroup this test creates under
//! its own (`--cgroup-root`); the clients run in that cgroup but in the
//! client pod's network namespace, as a pod's processes do (their cgroup is
//! under the node's, their network namespace is the pod's). With `all` the
//! hooks send the pod's sockets straight to a backend and the packet path
//! never translates them; with `host` the same sockets are left to the
//! packet path.

use std::collections::BTreeSet;

use service_tests::{
    cgroup::TestCgroup,
    netns::Netns,
    north_south::{A1, B2, CLIENT_POD, NorthSouth, WEB},
};

/// The packet path's translations: a new flow, an established one, a
/// reply.
const PACKET_PATH: [&str; 3] = ["dnat_new_flow", "dnat_established", "rev_nat_reply"];
/// The socket path's translations: connect(), sendmsg().
const SOCKET_PATH: [&str; 2] = ["sock_connect", "sock_sendmsg"];

/// Both nodes' values of `names`, in order.
fn counters(ns: &NorthSouth, names: &[&str]) -> Vec<u64> {
    [1, 2].iter().flat_map(|n| names.iter().map(move |name| ns.counter(*n, name))).collect()
}

/// The two nodes with `web` (a1 on node 1, b2 on node 2), node 1's agent
/// with `--socket-lb MODE` on `cgroup`.
fn start(mode: &str, cgroup: &TestCgroup) -> NorthSouth {
    let root = cgroup.path().display().to_string();
    let node1 = ["--external-interfaces", "eth0", "--socket-lb", mode, "--cgroup-root", root.as_str()];
    NorthSouth::start_with(&[WEB], |_| {}, &[&node1, &["--external-interfaces", "eth0"]])
}

fn client_pod(ns: &NorthSouth) -> &Netns {
    &ns.cluster.node(1).pod("client").ns
}

/// The backend name and the client address it saw, from `answer NAME PEER`.
fn answer(lines: &[String]) -> (String, String) {
    let answer = lines.iter().find_map(|l| l.strip_prefix("answer ")).unwrap_or_else(|| panic!("{lines:?}"));
    let mut words = answer.split_whitespace();
    let (name, peer) = (words.next(), words.next());
    (name.unwrap_or_default().to_owned(), peer.unwrap_or_default().to_owned())
}

/// 16 TCP connections and 16 unconnected UDP exchanges from the client pod
/// to `web`'s ClusterIP: every peer and reply source is the ClusterIP, the
/// backends see the pod's own address, both backends answer.
fn sixteen_of_each(ns: &NorthSouth, cgroup: &TestCgroup) {
    let both: BTreeSet<String> = [A1.0, B2.0].iter().map(|s| (*s).to_owned()).collect();
    for (mode, addr, first) in [("tcp", "10.96.0.10:80", "peer"), ("udp", "10.96.0.10:53", "from")] {
        let mut seen = BTreeSet::new();
        for _ in 0..16 {
            let lines = cgroup.sock_client(client_pod(ns), mode, addr).expect("sock-client");
            assert_eq!(lines.first(), Some(&format!("{first} {addr}")), "{mode}: {lines:?}");
            let (name, peer) = answer(&lines);
            assert!(peer.starts_with(&format!("{CLIENT_POD}:")), "{mode}: the backend saw {peer}");
            seen.insert(name);
        }
        assert_eq!(seen, both, "{mode} to {addr}");
    }
}

/// `backends a1=N,b2=M` (`tcp-many`, `udp-many`): both backends, `count`
/// in all, neither with less than a third (a random slot of a 2-backend
/// table: far beyond chance at these counts).
fn assert_spread(lines: &[String], count: usize) {
    let line = lines.iter().find_map(|l| l.strip_prefix("backends ")).unwrap_or_else(|| panic!("{lines:?}"));
    let tally: Vec<(&str, usize)> = line
        .split(',')
        .map(|pair| {
            pair.split_once('=').and_then(|(n, c)| Some((n, c.parse().ok()?))).unwrap_or_else(|| panic!("{line}"))
        })
        .collect();
    assert_eq!(tally.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [A1.0, B2.0], "{line}");
    assert_eq!(tally.iter().map(|(_, c)| c).sum::<usize>(), count, "{line}");
    assert!(tally.iter().all(|(_, c)| c * 3 > count), "{line}");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn pod_sockets_connect_straight_to_a_backend_with_socket_lb_all() {
    let cgroup = TestCgroup::new().expect("test cgroup");
    let ns = start("all", &cgroup);
    let packet_before = counters(&ns, &PACKET_PATH);
    let socket_before = counters(&ns, &SOCKET_PATH);
    let passed_before = ns.counter(1, "pass_no_service");

    sixteen_of_each(&ns, &cgroup);
    // Connected UDP: getpeername() shows the ClusterIP too.
    let lines = cgroup.sock_client(client_pod(&ns), "udp-connected", "10.96.0.10:53").expect("sock-client");
    assert_eq!(lines.first().map(String::as_str), Some("peer 10.96.0.10:53"), "{lines:?}");
    answer(&lines);

    // The hooks translated every socket (17 connect()s, 16 sendmsg()s on
    // node 1); no packet of these flows was translated on either node: the
    // pod interface's program saw them and passed them as no Service's.
    assert_eq!(counters(&ns, &PACKET_PATH), packet_before, "the packet path translated pod flows ({PACKET_PATH:?})");
    let socket = counters(&ns, &SOCKET_PATH);
    assert!(socket[0] >= socket_before[0] + 17, "sock_connect {socket_before:?} -> {socket:?}");
    assert!(socket[1] >= socket_before[1] + 16, "sock_sendmsg {socket_before:?} -> {socket:?}");
    assert!(ns.counter(1, "pass_no_service") > passed_before, "the pod program never saw the flows");

    // Volume: hundreds of new sockets from the pod, each checked to show
    // the ClusterIP as its peer or reply source, still no packet
    // translated.
    let many =
        |mode: &str, addr: &str| cgroup.sock_client_with(client_pod(&ns), &[mode, addr, "500"]).expect("sock-client");
    assert_spread(&many("tcp-many", "10.96.0.10:80"), 500);
    assert_spread(&many("udp-many", "10.96.0.10:53"), 500);
    assert_eq!(counters(&ns, &PACKET_PATH), packet_before, "the packet path translated pod flows ({PACKET_PATH:?})");
    let after = counters(&ns, &SOCKET_PATH);
    assert!(after[0] >= socket[0] + 500 && after[1] >= socket[1] + 500, "{socket:?} -> {after:?}");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn pod_sockets_are_left_to_the_packet_path_with_socket_lb_host() {
    let cgroup = TestCgroup::new().expect("test cgroup");
    let ns = start("host", &cgroup);
    let new_flows_before = ns.counter(1, "dnat_new_flow");
    let replies_before = ns.counter(1, "rev_nat_reply");
    let socket_before = counters(&ns, &SOCKET_PATH);

    // The same clients, in the same cgroup: served all the same, by the
    // packet path (a new flow and reverse-NATed replies per exchange), the
    // hooks leaving the pod's sockets alone.
    sixteen_of_each(&ns, &cgroup);
    assert!(ns.counter(1, "dnat_new_flow") >= new_flows_before + 32, "dnat_new_flow");
    assert!(ns.counter(1, "rev_nat_reply") >= replies_before + 32, "rev_nat_reply");
    assert_eq!(counters(&ns, &SOCKET_PATH), socket_before, "the hooks translated pod sockets in host mode");

    // The hooks are attached to that cgroup all the same: a socket of the
    // node's own network namespace in it is translated.
    let lines = cgroup.sock_client(&ns.cluster.node(1).node, "tcp", "10.96.0.10:80").expect("sock-client");
    assert_eq!(lines.first().map(String::as_str), Some("peer 10.96.0.10:80"), "{lines:?}");
    assert_eq!(ns.counter(1, "sock_connect"), socket_before[0] + 1, "a host socket in the cgroup");
}
