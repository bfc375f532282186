//! Tier 3: socket-level load balancing over IPv6 (connect6, sendmsg6,
//! recvmsg6, getpeername6, and sock_release for IPv6 sockets) with real
//! sockets, and IPv4 Services dialled from IPv6 sockets through v4-mapped
//! addresses (`::ffff:a.b.c.d`), as dual-stack applications do.
//!
//! The hooks, the maps and their rows are the agent's own code run from
//! this test: the object is loaded with the agent's loader, the hooks are
//! attached, pinned and adopted by `attach::socket::SocketHooks` on a test
//! cgroup, rows are written by the agent's reconciler from a
//! `model::Desired` built here (IPv6 ClusterIPs, as the model will write
//! them for a Service of `ipFamilies: [IPv6]`), and the UDP sockets of a
//! removed backend are closed by the agent's `take_udp_sockets_of_removed
//! _backends` and `sock_diag::destroy_udp`, as its sync loop calls them.
//!
//! The topology: a node namespace (the harness's, dual-stack) with its own
//! addresses 192.168.100.11 and fd00:192:168:100::11, given here on a veth
//! to nowhere that holds its default routes (so an untranslated connect()
//! to an address no one has goes out and waits rather than failing), and
//! two pods on it (the harness's: IPv4 and IPv6 twin addresses, /32 and
//! /128 routes), each serving TCP and UDP on [::]:8080 (both families). Clients run in the test cgroup in the node's namespace, as
//! host processes do (`--socket-lb host`).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader},
    net::IpAddr,
    path::{Path, PathBuf},
};

use service_agent::{
    attach::{sock_diag, socket::SocketHooks},
    maps::{self, MapSizes, PinnedMaps},
    model::{Backend, Desired, DesiredFrontend, Frontend, FrontendKind, Protocol, Scope, WhenEmpty},
    reconciler::Reconciler,
    vocabulary::{Cidr, ObjectRef},
};
use service_tests::{
    cgroup::{TestCgroup, line_starting},
    netns::{BpffsMount, ChildGuard, Netns, Topology, binary},
    north_south::agent_cli,
};

/// The node's addresses (the IPv6 one the harness's twin of the IPv4 one).
const NODE6: &str = "fd00:192:168:100::11";
const NODE4: &str = "192.168.100.11";
/// The pods: name, IPv4, and the IPv6 twin the harness gives them.
const PODS: [(&str, &str, &str); 2] =
    [("a1", "10.244.1.11", "fd00:10:244:1::11"), ("a2", "10.244.1.12", "fd00:10:244:1::12")];
/// The IPv6 service CIDR and its ClusterIPs.
const SERVICE_CIDR6: &str = "fd00:10:96::/112";
const WEB6: &str = "fd00:10:96::10";
const EMPTY6: &str = "fd00:10:96::30";
/// An address of the service CIDR no Service has.
const UNALLOCATED6: &str = "fd00:10:96::99";
/// The IPv4 Service dialled through v4-mapped addresses.
const SERVICE_CIDR4: &str = "10.96.0.0/16";
const WEB4: &str = "10.96.0.10";
const TARGET_PORT: u16 = 8080;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn cidr(s: &str) -> Cidr {
    let (addr, len) = s.split_once('/').expect("cidr");
    Cidr { addr: ip(addr), prefix_len: len.parse().expect("prefix") }
}

/// One ClusterIP frontend of Service `name` with `backends` (the pods'
/// addresses of the frontend's family).
fn frontend(name: &str, addr: &str, port: u16, protocol: Protocol, backends: &[IpAddr]) -> DesiredFrontend {
    let mut backends: Vec<Backend> =
        backends.iter().map(|a| Backend { addr: *a, port: TARGET_PORT, protocol, local: true, ready: true }).collect();
    backends.sort();
    DesiredFrontend {
        service: ObjectRef { namespace: "default".into(), name: name.into() },
        port_name: String::new(),
        frontend: Frontend { addr: ip(addr), port, protocol, scope: Scope::Internal },
        kind: FrontendKind::ClusterIp,
        backends,
        when_empty: WhenEmpty::Reject,
        affinity_timeout_s: None,
        affinity_scope: None,
        source_ranges: Vec::new(),
        masquerade: false,
    }
}

/// What the model writes for these Services: `web6` (TCP 80 and UDP 53 to
/// the pods' IPv6 addresses listed in `v6`), `empty6` (no endpoint), `web`
/// (its IPv4 twin, to the pods' IPv4 addresses in `v4`), and the service
/// IP rows: each ClusterIP rejects an unserved port, the rest of each
/// service CIDR drops.
fn desired(v6: &[IpAddr], v4: &[IpAddr]) -> Desired {
    let frontends = [
        frontend("web6", WEB6, 80, Protocol::Tcp, v6),
        frontend("web6", WEB6, 53, Protocol::Udp, v6),
        frontend("empty6", EMPTY6, 80, Protocol::Tcp, &[]),
        frontend("web", WEB4, 80, Protocol::Tcp, v4),
        frontend("web", WEB4, 53, Protocol::Udp, v4),
    ];
    let unserved = BTreeMap::from([
        (cidr(SERVICE_CIDR6), WhenEmpty::Drop),
        (cidr(&format!("{WEB6}/128")), WhenEmpty::Reject),
        (cidr(&format!("{EMPTY6}/128")), WhenEmpty::Reject),
        (cidr(SERVICE_CIDR4), WhenEmpty::Drop),
        (cidr(&format!("{WEB4}/32")), WhenEmpty::Reject),
    ]);
    Desired {
        frontends: frontends.into_iter().map(|df| (df.frontend, std::sync::Arc::new(df))).collect(),
        unserved,
        ..Desired::default()
    }
}

/// The node and its pods, with IPv6 given to them here.
fn topology() -> Topology {
    let mut topo = Topology::new().expect("node");
    let node = &topo.node;
    // A veth pair whose far end nobody answers on (no dummy devices on
    // every kernel): what leaves by the default route meets no one.
    node.ip(&["link", "add", "dum0", "type", "veth", "peer", "name", "dum1"]).expect("veth");
    node.ip(&["link", "set", "dum0", "up"]).expect("dum0 up");
    node.ip(&["link", "set", "dum1", "up"]).expect("dum1 up");
    node.ip(&["-6", "addr", "add", &format!("{NODE6}/64"), "dev", "dum0", "nodad"]).expect("node address");
    node.ip(&["addr", "add", &format!("{NODE4}/24"), "dev", "dum0"]).expect("node address");
    node.ip(&["-6", "route", "add", "default", "dev", "dum0"]).expect("default route");
    node.ip(&["route", "add", "default", "dev", "dum0"]).expect("default route");
    for (name, v4, v6) in PODS {
        let pod = topo.add_pod(name, v4.parse().expect("pod address")).expect("pod");
        assert_eq!(pod.ip6.to_string(), v6, "the harness's IPv6 twin of {v4}");
    }
    topo
}

/// `sock-client serve [::]:8080 NAME` in the pod: TCP and UDP, both
/// families.
fn serve(ns: &Netns, name: &str) -> ChildGuard {
    let addr = format!("[::]:{TARGET_PORT}");
    let mut child = ns.spawn(&binary("sock-client", "SOCK_CLIENT_BIN"), &["serve", &addr, name]).expect("server");
    let mut line = String::new();
    BufReader::new(child.0.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("ready");
    assert_eq!(line.trim(), "ready", "server {name}");
    child
}

/// The backend name of an `answer NAME PEER` line, and the peer it saw.
fn answer(lines: &[String]) -> (String, String) {
    let a = lines.iter().find_map(|l| l.strip_prefix("answer ")).unwrap_or_else(|| panic!("no answer in {lines:?}"));
    let (name, peer) = a.split_once(' ').unwrap_or_else(|| panic!("{a:?}"));
    (name.to_owned(), peer.to_owned())
}

/// The maps, the programs and the hooks on the test cgroup, as an agent
/// holds them.
struct Dataplane {
    hooks: SocketHooks,
    reconciler: Reconciler<PinnedMaps>,
    _ebpf: aya::Ebpf,
}

impl Dataplane {
    /// Loads (or, over existing pins, reopens) the object, attaches the
    /// socket hooks (adopting pinned ones) and writes `--socket-lb host`
    /// for the node's namespace.
    fn start(root: &Path, cgroup: &TestCgroup, node: &Netns) -> Self {
        let mut ebpf = maps::load(root, MapSizes::default()).expect("load the object");
        let hooks = SocketHooks::attach(&mut ebpf, cgroup.path(), &root.join("links")).expect("socket hooks");
        node.run_in(|| maps::write_socket_lb(root, service_common::socket_lb::HOST)).expect("socket_lb row");
        let reconciler =
            Reconciler::new(PinnedMaps::from_ebpf(&mut ebpf, MapSizes::default()).expect("maps")).expect("dump");
        Self { hooks, reconciler, _ebpf: ebpf }
    }

    fn reconcile(&mut self, desired: &Desired) {
        let report = self.reconciler.reconcile(desired);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
    }

    /// What the agent does after a change: the UDP sockets connected to a
    /// removed backend are closed (in the node's namespace).
    fn close_udp_sockets_of_removed_backends(&self, root: &Path, node: &Netns) -> usize {
        let live = |rev_nat, backend| self.reconciler.is_live_pair(rev_nat, backend);
        let sockets = maps::take_udp_sockets_of_removed_backends(root, live).expect("sock_rev_nat");
        node.run_in(|| sock_diag::destroy_udp(&sockets, false)).expect("sock_diag")
    }
}

/// The socket-level link pins under `root`.
fn pins(root: &Path) -> BTreeSet<String> {
    std::fs::read_dir(root.join("links"))
        .expect("links")
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("sock-"))
        .collect()
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
#[expect(clippy::too_many_lines, reason = "one scenario told in order")]
fn host_sockets_reach_ipv6_and_v4_mapped_service_addresses_through_the_socket_hooks() {
    // Declared first, removed last: the cgroup, then the bpffs (the pins,
    // so the links), then the namespaces; the servers go first.
    let cgroup = TestCgroup::new().expect("test cgroup");
    let bpffs = BpffsMount::new().expect("bpffs");
    let root: PathBuf = bpffs.path().join("node");
    let topo = topology();
    let node = &topo.node;
    let servers: Vec<ChildGuard> = PODS.iter().map(|(name, _, _)| serve(&topo.pod(name).ns, name)).collect();
    let v6: Vec<IpAddr> = PODS.iter().map(|p| ip(p.2)).collect();
    let v4: Vec<IpAddr> = PODS.iter().map(|p| ip(p.1)).collect();
    let mut dp = Dataplane::start(&root, &cgroup, node);
    dp.reconcile(&desired(&v6, &v4));
    let run = |args: &[&str]| cgroup.sock_client_with(node, args).expect("sock-client");
    let both: BTreeSet<String> = PODS.iter().map(|p| p.0.to_owned()).collect();

    let hooks: BTreeSet<String> =
        pins(&root).iter().filter_map(|p| p.strip_prefix("sock-")?.split('-').next().map(str::to_owned)).collect();
    let want = ["connect4", "sendmsg4", "recvmsg4", "getpeername4", "connect6", "sendmsg6", "recvmsg6"];
    let want: BTreeSet<String> = want.into_iter().chain(["getpeername6", "sock_release"]).map(str::to_owned).collect();
    assert_eq!(hooks, want);

    // For each of the IPv6 ClusterIP and the IPv4 one dialled v4-mapped
    // from an IPv6 socket: TCP reaches both backends and getpeername()
    // shows the Service address; unconnected UDP's replies come from the
    // Service address; connected UDP's peer is the Service address; the
    // backends see the node's own address of that family (the servers'
    // sockets are IPv6 ones: an IPv4 peer shows v4-mapped).
    let mapped = format!("[::ffff:{WEB4}]");
    for (service, node_addr) in
        [(format!("[{WEB6}]"), format!("[{NODE6}]:")), (mapped.clone(), format!("[::ffff:{NODE4}]:"))]
    {
        let (tcp, udp) = (format!("{service}:80"), format!("{service}:53"));
        let mut seen = BTreeSet::new();
        for _ in 0..16 {
            let lines = run(&["tcp", &tcp]);
            assert_eq!(lines.first(), Some(&format!("peer {tcp}")), "{lines:?}");
            let (name, peer) = answer(&lines);
            assert!(peer.starts_with(&node_addr), "{tcp}: the backend saw {peer}");
            seen.insert(name);
        }
        assert_eq!(seen, both, "TCP to {tcp}");
        let mut seen = BTreeSet::new();
        for _ in 0..16 {
            let lines = run(&["udp", &udp]);
            assert_eq!(lines.first(), Some(&format!("from {udp}")), "{lines:?}");
            seen.insert(answer(&lines).0);
        }
        assert_eq!(seen, both, "unconnected UDP to {udp}");
        let lines = run(&["udp-connected", &udp]);
        assert_eq!(lines.first(), Some(&format!("peer {udp}")), "{lines:?}");
        answer(&lines);
    }
    // Where the sockets really are connected: the backends' addresses, of
    // the Service's family (v4-mapped for the IPv4 Service).
    for (service, ipv6) in [(format!("[{WEB6}]"), true), (mapped.clone(), false)] {
        for (mode, port) in [("probe-tcp", 80), ("probe-udp", 53)] {
            let service = format!("{service}:{port}");
            let lines = run(&[mode, &service, "64"]);
            let want: BTreeSet<String> = PODS
                .iter()
                .map(|p| if ipv6 { format!("peer [{}]:8080", p.2) } else { format!("peer [::ffff:{}]:8080", p.1) })
                .collect();
            assert_eq!(lines.into_iter().collect::<BTreeSet<_>>(), want, "{mode} {service}");
        }
    }
    // No endpoints, or a ClusterIP's unserved port: ECONNREFUSED at once.
    // An address of the service CIDR no Service has: ENETUNREACH (without
    // the hooks the SYN would leave by the default route and wait).
    for addr in [format!("[{EMPTY6}]:80"), format!("[{WEB6}]:81"), format!("[::ffff:{WEB4}]:81")] {
        let lines = run(&["probe-tcp", &addr]);
        assert!(lines.iter().any(|l| l.contains("os error 111")), "{addr}: {lines:?}");
    }
    for addr in [format!("[{UNALLOCATED6}]:80"), "[::ffff:10.96.0.99]:80".to_owned()] {
        let lines = run(&["probe-tcp", &addr]);
        assert!(lines.iter().any(|l| l.contains("os error 101")), "{addr}: {lines:?}");
    }
    // Any other IPv6 address is left alone.
    let lines = run(&["probe-tcp", "[fd00:200::1]:80"]);
    assert_eq!(lines, ["peer [fd00:200::1]:80"]);
    let stats: BTreeMap<&str, u64> = maps::read_stats(&root).expect("stats").into_iter().collect();
    for counter in ["sock_connect", "sock_sendmsg", "sock_rev_nat", "sock_refused"] {
        assert!(stats[counter] > 0, "{counter}: {stats:?}");
    }

    // `inspect sockets`: the IPv6 hooks, and the rows of the translated
    // sockets: sock_release took every closed TCP socket's, IPv6 ones and
    // v4-mapped ones alike; the unconnected UDP sockets' rows stay.
    let sockets: serde_json::Value =
        serde_json::from_str(&agent_cli(node, &root, "inspect", &["sockets", "-o", "json"])).expect("json");
    let attach: BTreeSet<String> = sockets["hooks"]
        .as_array()
        .expect("hooks")
        .iter()
        .filter_map(|h| h["attach"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(attach, want, "{sockets}");
    let rows = sockets["sockets"].as_array().expect("sockets");
    assert!(rows.iter().all(|s| s["protocol"] == "UDP"), "rows of closed TCP sockets left: {sockets}");
    let shows = |service: &str, backend: &str| {
        rows.iter().any(|s| {
            s["service"].as_str().is_some_and(|v| v.starts_with(service))
                && s["backend"].as_str().is_some_and(|v| v.starts_with(backend))
        })
    };
    assert!(shows(&format!("[{WEB6}]:53"), "[fd00:10:244:1::1"), "{sockets}");
    assert!(shows(&format!("{WEB4}:53"), "10.244.1.1"), "{sockets}");

    // A backend leaves the Services: the connected UDP sockets to it (an
    // IPv6 one, and a v4-mapped one) are closed, a new socket reaches the
    // backend left; the other backend's sockets are not touched.
    let hold = |addr: &str| {
        let mut child = cgroup.spawn_sock_client(node, &["hold-udp", addr, "10"]).expect("client");
        let out = child.0.stdout.take().expect("stdout");
        (child, BufReader::new(out).lines())
    };
    let (_udp6, mut udp6_lines) = hold(&format!("[{WEB6}]:53"));
    let removed = line_starting(&mut udp6_lines, "answer ")["answer ".len()..].to_owned();
    let mut udp4 = None;
    for _ in 0..40 {
        let (child, mut lines) = hold(&format!("{mapped}:53"));
        if line_starting(&mut lines, "answer ")["answer ".len()..] == removed {
            udp4 = Some((child, lines));
            break;
        }
    }
    let (_udp4, mut udp4_lines) = udp4.unwrap_or_else(|| panic!("no v4-mapped UDP socket reached {removed} in 40"));
    let (kept, kept4, kept6) = *PODS.iter().find(|p| p.0 != removed).expect("the other pod");
    dp.reconcile(&desired(&[ip(kept6)], &[ip(kept4)]));
    assert_eq!(dp.close_udp_sockets_of_removed_backends(&root, node), 2);
    for lines in [&mut udp6_lines, &mut udp4_lines] {
        let aborted = line_starting(lines, "aborted after ");
        assert!(aborted.ends_with("(os error 103)") || aborted.ends_with("(os error 89)"), "{aborted}");
        assert_eq!(line_starting(lines, "reconnected "), format!("reconnected {kept}"));
    }
    for addr in [format!("[{WEB6}]:80"), format!("{mapped}:80")] {
        for _ in 0..8 {
            assert_eq!(answer(&run(&["tcp", &addr])).0, kept, "{addr}");
        }
    }

    // An agent restart: the links stay pinned and the next one adopts
    // them (the same pins), still translating.
    dp.reconcile(&desired(&v6, &v4));
    let before = pins(&root);
    dp.hooks.leave_attached();
    drop(dp);
    let lines = run(&["tcp", &format!("[{WEB6}]:80")]);
    assert_eq!(lines.first(), Some(&format!("peer [{WEB6}]:80")), "no agent: {lines:?}");
    let mut dp = Dataplane::start(&root, &cgroup, node);
    assert_eq!(pins(&root), before, "the hooks were not adopted");
    let lines = run(&["tcp", &format!("[{WEB6}]:80")]);
    assert_eq!(lines.first(), Some(&format!("peer [{WEB6}]:80")), "{lines:?}");
    // Detached: the node's sockets are not translated any more (the
    // ClusterIP is no address: the SYN leaves by the default route).
    dp.hooks.detach_all();
    let lines = run(&["probe-tcp", &format!("[{WEB6}]:80")]);
    assert_eq!(lines, [format!("peer [{WEB6}]:80")], "hooks still attached");
    drop(dp);
    drop(servers);
}
