//! Tier 3: socket-level load balancing (`--socket-lb host`) with real
//! sockets. Node 1's agent attaches its cgroup hooks to a cgroup this test
//! creates under its own (`--cgroup-root`); clients run in that cgroup, in
//! node 1's network namespace, as host processes do. Without the hooks the
//! node cannot reach a ClusterIP at all (no route: the packet path only
//! sees pod and external interfaces).

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use service_tests::{
    cgroup::{TestCgroup, line_starting},
    cluster::node_ip,
    fixture,
    netns::{Agent, Family, Netns, binary},
    north_south::{A1, B2, NorthSouth, Svc, WEB, agent_cli},
};

/// The ClusterIPs of `web`, `empty` and `sticky`, and an address of the
/// service CIDR no Service has (IPv4 forms).
const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const STICKY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const UNALLOCATED_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 99);

const EMPTY: Svc = Svc {
    name: "empty",
    cluster_ip: "10.96.0.30",
    type_: "ClusterIP",
    ports: &[("http", 80, 8080, "TCP", None)],
    spec_extra: "",
    status: "",
    endpoints: &[],
};

/// The same backends as `web`, with ClientIP affinity and a NodePort.
const STICKY: Svc = Svc {
    name: "sticky",
    cluster_ip: "10.96.0.40",
    type_: "NodePort",
    ports: &[("http", 80, 8080, "TCP", Some(30040))],
    spec_extra: "  sessionAffinity: ClientIP\n",
    status: "",
    endpoints: &[A1, B2],
};

/// The backend names in `answer NAME PEER` lines.
fn backend(lines: &[String]) -> String {
    lines
        .iter()
        .find_map(|l| l.strip_prefix("answer "))
        .and_then(|a| a.split_whitespace().next())
        .unwrap_or_else(|| panic!("no answer in {lines:?}"))
        .to_owned()
}

/// 16 sockets of `mode` (`tcp`, or unconnected `udp`) of the test's cgroup
/// on node 1 to `addr`: each is shown the address it dialled
/// (getpeername() for TCP, the reply's source for UDP), and the backends on
/// both nodes answer.
fn both_backends_answer(ns: &NorthSouth, cgroup: &TestCgroup, mode: &str, addr: &str) {
    let shown = if mode == "tcp" { format!("peer {addr}") } else { format!("from {addr}") };
    let mut seen = BTreeSet::new();
    for _ in 0..16 {
        let lines = cgroup.sock_client(&ns.cluster.node(1).node, mode, addr).expect("sock-client");
        assert_eq!(lines.first(), Some(&shown), "{lines:?}");
        seen.insert(backend(&lines));
    }
    assert_eq!(seen, BTreeSet::from([A1.0.to_owned(), B2.0.to_owned()]), "{mode} to {addr}");
}

/// The cluster of `web`, `empty` and `sticky` in `family`, node 1's agent
/// with `--socket-lb host` on `cgroup` and `service_cidrs`
/// (comma-separated) as its `--service-cluster-ip-range`.
fn start_with_host_sockets(family: Family, cgroup: &TestCgroup, service_cidrs: &str) -> NorthSouth {
    let root = cgroup.path().display().to_string();
    let node1_flags = [
        "--external-interfaces",
        "eth0",
        "--socket-lb",
        "host",
        "--cgroup-root",
        root.as_str(),
        "--service-cluster-ip-range",
        service_cidrs,
    ];
    NorthSouth::start_with_in(
        family,
        &[WEB, EMPTY, STICKY],
        |_| {},
        &[&node1_flags, &["--external-interfaces", "eth0"]],
    )
}

/// `inspect sockets` and `explain --from host` on node 1 after traffic in
/// the cluster's family (at least 16 TCP connects to `web`'s ClusterIP, UDP
/// sendmsg() calls to its port 53, and a connect to `sticky`): the hooks
/// on the test's cgroup, the calls translated per frontend, the translated
/// sockets, and what a host socket's connect() gets, asked about the
/// frontends of the cluster's family.
fn inspect_and_explain_show_the_socket_path(ns: &NorthSouth, cgroup: &TestCgroup) {
    let node = &ns.cluster.node(1).node;
    let root1 = ns.root(1);
    let at = |v4: Ipv4Addr, port: u16| SocketAddr::new(ns.addr(v4), port);
    let sockets: serde_json::Value =
        serde_json::from_str(&agent_cli(node, &root1, "inspect", &["sockets", "-o", "json"])).expect("json");
    assert_eq!(sockets["mode"], "host", "{sockets}");
    let hooks: BTreeSet<&str> =
        sockets["hooks"].as_array().expect("hooks").iter().filter_map(|h| h["attach"].as_str()).collect();
    let want = ["connect4", "getpeername4", "recvmsg4", "sendmsg4", "connect6", "getpeername6", "recvmsg6"];
    assert_eq!(hooks, want.into_iter().chain(["sendmsg6", "sock_release"]).collect(), "{sockets}");
    let cgroup_inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(cgroup.path()).expect("cgroup"));
    assert!(sockets["hooks"].as_array().expect("hooks").iter().all(|h| h["cgroup_inode"] == cgroup_inode), "{sockets}");
    let frontend = sockets["frontends"]
        .as_array()
        .expect("frontends")
        .iter()
        .find(|f| f["frontend"] == format!("{}/TCP internal", at(WEB_IP, 80)))
        .unwrap_or_else(|| panic!("{sockets}"));
    assert!(frontend["connects"].as_u64() >= Some(16), "{sockets}");
    let translated = sockets["sockets"].as_array().expect("sockets");
    // Every TCP client has closed its socket: sock_release took their rows
    // (only the unconnected UDP sockets' rows wait for LRU eviction).
    assert!(translated.iter().all(|s| s["protocol"] == "UDP"), "rows of closed TCP sockets left: {sockets}");
    let dns = at(WEB_IP, 53).to_string();
    assert!(translated.iter().any(|s| s["service"] == dns && s["protocol"] == "UDP"), "{sockets}");
    let text = agent_cli(node, &root1, "inspect", &["sockets"]);
    assert!(text.contains("socket-level load balancing: host") && text.contains("connect4"), "{text}");
    let node_addr = ns.node_addr(1).to_string();
    let explain = |v4: Ipv4Addr, from: &[&str]| {
        let dst = format!("{}/TCP", at(v4, 80));
        agent_cli(node, &root1, "explain", &[&[node_addr.as_str(), &dst], from].concat())
    };
    let why = explain(WEB_IP, &[]);
    assert!(why.contains("a socket of the node itself") && why.contains("random slot"), "{why}");
    for ep in [A1, B2] {
        assert!(why.contains(&format!("{}/TCP", SocketAddr::new(ep.addr(ns.family), 8080))), "{why}");
    }
    let why = explain(EMPTY_IP, &["--from", "host"]);
    assert!(why.contains("ECONNREFUSED"), "{why}");
    let why = explain(UNALLOCATED_IP, &["--from", "host"]);
    assert!(why.contains("ENETUNREACH"), "{why}");
    let why = explain(STICKY_IP, &["--from", "host"]);
    assert!(why.contains("affinity: the node's sockets → backend"), "{why}");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn host_sockets_reach_every_service_address_through_the_socket_hooks() {
    let cgroup = TestCgroup::new().expect("test cgroup");
    let mut ns = start_with_host_sockets(Family::V4, &cgroup, "10.96.0.0/16");
    let run = |ns: &NorthSouth, mode: &str, addr: &str| {
        cgroup.sock_client(&ns.cluster.node(1).node, mode, addr).expect("sock-client")
    };

    // TCP to the ClusterIP, a NodePort on the node's own address, the
    // LoadBalancer IP and the external IP: backends on this node and on
    // the other one; getpeername() shows the address the client dialled.
    let node_port = format!("{}:30080", node_ip(1));
    for addr in ["10.96.0.10:80", node_port.as_str(), "198.51.100.10:80", "198.51.100.20:80"] {
        both_backends_answer(&ns, &cgroup, "tcp", addr);
    }
    // UDP, unconnected (as DNS clients send): the reply comes from the
    // Service address; connected: getpeername() shows it.
    both_backends_answer(&ns, &cgroup, "udp", "10.96.0.10:53");
    let lines = run(&ns, "udp-connected", "10.96.0.10:53");
    assert_eq!(lines.first().map(String::as_str), Some("peer 10.96.0.10:53"), "{lines:?}");
    backend(&lines);
    // An IPv6 socket dialling the ClusterIP v4-mapped, as dual-stack
    // applications (Java) do: connect6/sendmsg6 translate it with the IPv4
    // frontend, and getpeername6/recvmsg6 show it v4-mapped again.
    both_backends_answer(&ns, &cgroup, "tcp", "[::ffff:10.96.0.10]:80");
    let lines = run(&ns, "udp", "[::ffff:10.96.0.10]:53");
    assert_eq!(lines.first().map(String::as_str), Some("from [::ffff:10.96.0.10]:53"), "{lines:?}");
    let lines = run(&ns, "tcp", "[::ffff:10.96.0.30]:80");
    assert!(lines.iter().any(|l| l.contains("os error 111")), "{lines:?}");
    // No endpoints: connect() fails with ECONNREFUSED at once.
    let lines = run(&ns, "tcp", "10.96.0.30:80");
    assert!(lines.iter().any(|l| l.contains("os error 111")), "{lines:?}");
    // ClientIP affinity: every socket of the node (one client, its
    // network namespace) keeps the endpoint its first one got, through the
    // ClusterIP and the Service port's NodePort alike.
    let sticky_node_port = format!("{}:30040", node_ip(1));
    let first = backend(&run(&ns, "tcp", "10.96.0.40:80"));
    for addr in ["10.96.0.40:80", sticky_node_port.as_str()].repeat(8) {
        assert_eq!(backend(&run(&ns, "tcp", addr)), first, "{addr} left the affinity endpoint");
    }
    // A ClusterIP's unserved port: refused, as the packet path rejects it;
    // an address of the service CIDR no Service has: unreachable (the
    // packet path drops it).
    let lines = run(&ns, "tcp", "10.96.0.10:81");
    assert!(lines.iter().any(|l| l.contains("os error 111")), "{lines:?}");
    let lines = run(&ns, "tcp", "10.96.0.99:80");
    assert!(lines.iter().any(|l| l.contains("os error 101")), "{lines:?}");
    for counter in ["sock_connect", "sock_sendmsg", "sock_rev_nat", "sock_refused"] {
        assert!(ns.counter(1, counter) > 0, "{counter}");
    }
    // Per Service frontend, in /metrics.
    let metrics = fixture::curl(&ns.cluster.node(1).node, "http://127.0.0.1:10249/metrics").expect("metrics");
    let value = |metric: &str, frontend: &str| -> f64 {
        let label = format!("frontend=\"{frontend}\"");
        metrics
            .lines()
            .filter(|l| l.starts_with(metric) && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    };
    assert!(value("service_dataplane_service_socket_connects_total", "10.96.0.10:80") >= 16.0, "{metrics}");
    assert!(value("service_dataplane_service_socket_sendmsgs_total", "10.96.0.10:53") >= 16.0, "{metrics}");
    inspect_and_explain_show_the_socket_path(&ns, &cgroup);
    // Only sockets under --cgroup-root: the same client outside it is not
    // translated (and the node has no route to the ClusterIP).
    let client = binary("sock-client", "SOCK_CLIENT_BIN").display().to_string();
    let outside = ns.cluster.node(1).node.exec(&client, &["tcp", "10.96.0.10:80"]).expect("client");
    assert!(String::from_utf8_lossy(&outside.stdout).starts_with("error:"), "{outside:?}");
    // The agent leaves: its links go with their pins, and the cgroup's
    // sockets are not translated any more.
    let agent = ns.agents.remove(0);
    drop(agent);
    let lines = run(&ns, "tcp", "10.96.0.10:80");
    assert!(lines.first().is_some_and(|l| l.starts_with("error:")), "hooks still attached: {lines:?}");
}

/// The IPv6 side of the test above, on the same Services written
/// dual-stack: IPv6 sockets of the node reach the IPv6 ClusterIPs through
/// connect6/sendmsg6, and `inspect sockets` and `explain --from host` show
/// the IPv6 frontends' socket path.
#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn ipv6_host_sockets_are_translated_and_explained_through_the_socket_hooks() {
    let cgroup = TestCgroup::new().expect("test cgroup");
    let ns = start_with_host_sockets(Family::V6, &cgroup, "10.96.0.0/16,fd00:10:96::/112");
    both_backends_answer(&ns, &cgroup, "tcp", &SocketAddr::new(ns.addr(WEB_IP), 80).to_string());
    both_backends_answer(&ns, &cgroup, "udp", &SocketAddr::new(ns.addr(WEB_IP), 53).to_string());
    // A first connection to `sticky` makes the node's affinity entry.
    let sticky = SocketAddr::new(ns.addr(STICKY_IP), 80).to_string();
    backend(&cgroup.sock_client(&ns.cluster.node(1).node, "tcp", &sticky).expect("sock-client"));
    inspect_and_explain_show_the_socket_path(&ns, &cgroup);
}

/// `backends a1=N,b2=M` → the names and counts.
fn tally(lines: &[String]) -> Vec<(String, usize)> {
    let line = lines.iter().find_map(|l| l.strip_prefix("backends ")).unwrap_or_else(|| panic!("{lines:?}"));
    line.split(',')
        .map(|pair| {
            let (name, n) = pair.split_once('=').unwrap_or_else(|| panic!("{line}"));
            (name.to_owned(), n.parse().unwrap_or_else(|_| panic!("{line}")))
        })
        .collect()
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn host_sockets_keep_working_through_thousands_of_connections_and_an_agent_killed_and_restarted() {
    let cgroup = TestCgroup::new().expect("test cgroup");
    let root = cgroup.path().display().to_string();
    let node1_flags = ["--external-interfaces", "eth0", "--socket-lb", "host", "--cgroup-root", root.as_str()];
    let mut ns = NorthSouth::start_with(&[WEB], |_| {}, &[&node1_flags, &["--external-interfaces", "eth0"]]);
    let many = |ns: &NorthSouth, mode: &str, count: &str| {
        let lines = cgroup.sock_client_with(&ns.cluster.node(1).node, &[mode, "10.96.0.10:80", count]).expect("client");
        tally(&lines)
    };
    let spread = |t: &[(String, usize)], total: usize| {
        assert_eq!(t.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["a1", "b2"], "{t:?}");
        assert_eq!(t.iter().map(|(_, n)| n).sum::<usize>(), total);
        // A random slot of a 2-backend table: neither gets fewer than a
        // third (far beyond chance at these counts).
        assert!(t.iter().all(|(_, n)| *n * 3 > total), "{t:?}");
    };
    spread(&many(&ns, "tcp-many", "1000"), 1000);
    // UDP to the DNS port, unconnected, every reply from the Service.
    let lines =
        cgroup.sock_client_with(&ns.cluster.node(1).node, &["udp-many", "10.96.0.10:53", "1000"]).expect("client");
    spread(&tally(&lines), 1000);
    // SIGKILL: the links stay pinned, so host sockets keep being
    // translated while no agent runs.
    let mut killed = ns.agents.remove(0);
    killed.kill().expect("kill");
    spread(&many(&ns, "tcp-many", "300"), 300);
    // The next agent adopts the links (the same build on the same cgroup):
    // still one program per hook, still translating.
    let mut agent =
        Agent::start(&ns.cluster.node(1).node, ns.manifests.path(), "node1", &ns.root(1), &node1_flags).expect("agent");
    agent.wait_for_log("synced", 1, Duration::from_secs(20)).expect("first sync");
    let pins: Vec<String> = std::fs::read_dir(ns.root(1).join("links"))
        .expect("links")
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("sock-"))
        .collect();
    assert_eq!(pins.len(), 9, "{pins:?}");
    spread(&many(&ns, "tcp-many", "300"), 300);
    // The IPv6 hooks were adopted too: a v4-mapped ClusterIP from IPv6
    // sockets.
    let lines = cgroup
        .sock_client_with(&ns.cluster.node(1).node, &["tcp-many", "[::ffff:10.96.0.10]:80", "100"])
        .expect("client");
    spread(&tally(&lines), 100);
    drop(agent);
    drop(killed);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn a_backend_removed_mid_flow_keeps_tcp_going_and_closes_the_udp_sockets_connected_to_it() {
    removed_mid_flow("host", |ns| &ns.cluster.node(1).node);
}

/// The same from a pod with `--socket-lb all`: the pod's sockets are
/// translated by the hooks, and the agent finds its UDP socket in the
/// pod's network namespace to close it.
#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn with_socket_lb_all_a_pods_udp_socket_connected_to_a_removed_backend_is_closed_in_its_namespace() {
    removed_mid_flow("all", |ns| &ns.cluster.node(1).pod("client").ns);
}

/// A connected UDP socket and a TCP connection to one backend, from the
/// namespace `client` picks, through `--socket-lb mode`; the backend then
/// leaves its Service.
fn removed_mid_flow(mode: &str, client: impl Fn(&NorthSouth) -> &Netns) {
    use std::io::BufRead as _;
    let cgroup = TestCgroup::new().expect("test cgroup");
    let root = cgroup.path().display().to_string();
    let node1_flags = ["--external-interfaces", "eth0", "--socket-lb", mode, "--cgroup-root", root.as_str()];
    let mut ns = NorthSouth::start_with(&[WEB], |_| {}, &[&node1_flags, &["--external-interfaces", "eth0"]]);
    // Declared after `ns`, so dropped (stopped) before its namespaces go.
    let mut agents = std::mem::take(&mut ns.agents);
    let node = client(&ns);
    let hold = |mode: &str, addr: &str| {
        let mut child = cgroup.spawn_sock_client(node, &[mode, addr, "10"]).expect("client");
        let out = child.0.stdout.take().expect("stdout");
        (child, std::io::BufReader::new(out).lines())
    };
    // A connected UDP socket (as a DNS client that connects), and a TCP
    // connection to the same backend (new ones until one gets it).
    let (_udp, mut udp_lines) = hold("hold-udp", "10.96.0.10:53");
    let removed = line_starting(&mut udp_lines, "answer ")["answer ".len()..].to_owned();
    let mut tcp = None;
    for _ in 0..40 {
        let (child, mut lines) = hold("hold-tcp", "10.96.0.10:80");
        assert_eq!(line_starting(&mut lines, "peer "), "peer 10.96.0.10:80");
        if line_starting(&mut lines, "answer ")["answer ".len()..] == removed {
            tcp = Some((child, lines));
            break;
        }
    }
    let (_tcp, tcp_lines) = tcp.unwrap_or_else(|| panic!("no TCP connection reached {removed} in 40"));
    // The backend leaves its Service (its pod still runs, as a pod being
    // scaled down does while it drains).
    let kept = if removed == A1.0 { B2 } else { A1 };
    ns.manifests.write("web.yaml", &Svc { endpoints: &[kept], ..WEB }.yaml());
    agents[0]
        .wait_for_log("closed UDP sockets connected to removed backends", 1, Duration::from_secs(10))
        .expect("the UDP socket closed");
    // UDP: the connected socket was aborted and disconnected (its next
    // call fails: ECONNABORTED from a receive, EDESTADDRREQ from a send),
    // and a new one reaches the backend that is left.
    let aborted = line_starting(&mut udp_lines, "aborted after ");
    assert!(aborted.ends_with("(os error 103)") || aborted.ends_with("(os error 89)"), "{aborted}");
    assert_eq!(line_starting(&mut udp_lines, "reconnected "), format!("reconnected {}", kept.0));
    // TCP: the connection goes on with the removed backend to the end,
    // every exchange answered, as under kube-proxy.
    let rest: Vec<String> = tcp_lines.map(|l| l.expect("client output")).collect();
    assert!(rest.iter().all(|l| !l.starts_with("answer ") && !l.starts_with("error")), "{rest:?}");
    let exchanges: usize = rest
        .iter()
        .find_map(|l| l.strip_prefix("exchanges "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{rest:?}"));
    assert!(exchanges > 100, "{rest:?}");
    // New sockets, TCP and unconnected UDP, only reach the backend left.
    for mode in ["tcp", "udp"] {
        let addr = if mode == "tcp" { "10.96.0.10:80" } else { "10.96.0.10:53" };
        for _ in 0..16 {
            assert_eq!(backend(&cgroup.sock_client(node, mode, addr).expect("client")), kept.0, "{mode}");
        }
    }
}
