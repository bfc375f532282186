//! Tier 3: connection tracking under real traffic (root), on the two-node
//! cluster of `north_south`: thousands of connections past the SNAT port
//! range, a hairpin, one client port towards two Services with the same
//! backend, datagrams larger than the MTU, a flood of new flows beside an
//! assured one, and a route MTU smaller than the client's packets. Each of
//! these broke before connection tracking followed netfilter's rules.
//!
//! The tests that hold in IPv6 as they are run in both families (`::ipv4`,
//! `::ipv6`, dual-stack Services in IPv6); the narrow route, the public NIC
//! and the hairpin past the port range stay IPv4 tests.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use service_tests::{
    cluster::{node_ip, pod_cidr},
    in_both_families,
    netns::Family,
    north_south::{A1, B2, CLIENT_POD, NorthSouth, Svc, TIMEOUT, parse_answer},
    traffic::{any_port_for, tcp_from_port, tcp_who, udp_ask, who},
};

in_both_families!(
    nodeport_to_a_remote_backend_keeps_working_past_the_snat_port_range,
    one_client_port_to_two_services_with_the_same_backend_keeps_both_connections,
    datagrams_larger_than_the_mtu_reach_services_and_their_answers_come_back,
    an_assured_flow_through_snat_survives_a_flood_of_new_flows_past_the_table_size,
    a_new_pods_very_first_datagram_to_a_cluster_ip_is_translated,
);

const NODEPORT_ONLY_REMOTE: Svc = Svc {
    name: "remote",
    cluster_ip: "10.96.0.10",
    type_: "NodePort",
    ports: &[("http", 80, 8080, "TCP", Some(30080))],
    spec_extra: "",
    status: "",
    endpoints: &[B2],
};

/// More connections than the SNAT port range (61000-65535) holds.
const PAST_THE_RANGE: usize = 6_000;

/// A client namespace that opens connections as fast as a busy client: the
/// whole port range, TIME_WAIT ports reused for new connections.
fn busy_client(ns: &service_tests::netns::Netns) {
    // (IPv6 sockets take their ports and TIME_WAIT reuse from these too.)
    ns.sysctl("net.ipv4.ip_local_port_range=1024 65535").expect("port range");
    ns.sysctl("net.ipv4.tcp_tw_reuse=1").expect("tw_reuse");
}

/// `count` connections in a row to `addr`; the failures, with their index.
fn connections(count: usize, addr: SocketAddr) -> (Vec<String>, Vec<(usize, String)>) {
    let mut answers = Vec::new();
    let mut failures = Vec::new();
    for i in 0..count {
        match tcp_who(addr, TIMEOUT) {
            Ok(a) => answers.push(a),
            Err(e) => failures.push((i, e.to_string())),
        }
        if failures.len() > 10 {
            break;
        }
    }
    (answers, failures)
}

fn nodeport_to_a_remote_backend_keeps_working_past_the_snat_port_range(family: Family) {
    let ns = NorthSouth::start_in(family, &[NODEPORT_ONLY_REMOTE]);
    busy_client(&ns.cluster.external);
    let started = Instant::now();
    let addr = SocketAddr::new(ns.node_addr(1), 30080);
    let (answers, failures) = ns.cluster.external.run_in(move || connections(PAST_THE_RANGE, addr));
    assert!(failures.is_empty(), "failed connections after {} good ones: {failures:?}", answers.len());
    assert_eq!(answers.len(), PAST_THE_RANGE);
    for a in &answers {
        let (name, peer) = parse_answer(a);
        assert_eq!((name.as_str(), peer.ip()), ("b2", ns.node_addr(1)), "SNAT to node 1");
    }
    println!("{PAST_THE_RANGE} NodePort connections through SNAT in {:?}", started.elapsed());
    assert_eq!(ns.counter(1, "drop_snat_no_port"), 0);
    assert!(ns.counter(1, "snat_new_flow") >= PAST_THE_RANGE as u64);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn a_pod_reaching_itself_keeps_working_past_the_snat_port_range() {
    let own = Svc {
        name: "own",
        cluster_ip: "10.96.0.30",
        type_: "ClusterIP",
        ports: &[("http", 80, 8080, "TCP", None)],
        spec_extra: "",
        status: "",
        endpoints: &[A1],
    };
    let ns = NorthSouth::start(&[own]);
    let pod = ns.pod(A1);
    busy_client(pod);
    let addr = SocketAddr::from((Ipv4Addr::new(10, 96, 0, 30), 80));
    let (answers, failures) = pod.run_in(move || connections(PAST_THE_RANGE, addr));
    assert!(failures.is_empty(), "failed hairpin connections after {} good ones: {failures:?}", answers.len());
    assert_eq!(ns.counter(1, "drop_snat_no_port"), 0);
}

fn one_client_port_to_two_services_with_the_same_backend_keeps_both_connections(family: Family) {
    let svc = |name, cluster_ip| Svc {
        name,
        cluster_ip,
        type_: "ClusterIP",
        ports: &[("http", 80, 8080, "TCP", None)],
        spec_extra: "",
        status: "",
        endpoints: &[A1],
    };
    let ns = NorthSouth::start_in(family, &[svc("first", "10.96.0.41"), svc("second", "10.96.0.42")]);
    let client = &ns.cluster.node(1).pod("client").ns;
    let first_addr = SocketAddr::new(ns.addr(Ipv4Addr::new(10, 96, 0, 41)), 80);
    let second_addr = SocketAddr::new(ns.addr(Ipv4Addr::new(10, 96, 0, 42)), 80);
    let seen = client.run_in(|| {
        let mut first = tcp_from_port(40_000, first_addr, TIMEOUT).expect("first connection");
        let mut second = tcp_from_port(40_000, second_addr, TIMEOUT).expect("second connection, same source port");
        let mut seen = Vec::new();
        for round in 0..5 {
            let a = who(&mut first).unwrap_or_else(|e| panic!("round {round}: the first connection broke: {e}"));
            let b = who(&mut second).unwrap_or_else(|e| panic!("round {round}: the second connection broke: {e}"));
            seen.push((parse_answer(&a), parse_answer(&b)));
        }
        seen
    });
    for ((name_a, peer_a), (name_b, peer_b)) in &seen {
        assert_eq!((name_a.as_str(), name_b.as_str()), ("a1", "a1"));
        assert_eq!(peer_a.ip(), ns.addr(CLIENT_POD));
        assert_eq!(peer_b.ip(), ns.addr(CLIENT_POD), "the client keeps its address");
        assert_ne!(peer_a.port(), peer_b.port(), "the backend tells the two connections apart");
    }
    assert_eq!(ns.counter(1, "nat_clash_remapped"), 1);
}

fn datagrams_larger_than_the_mtu_reach_services_and_their_answers_come_back(family: Family) {
    let dns = Svc {
        name: "dns",
        cluster_ip: "10.96.0.53",
        type_: "NodePort",
        ports: &[("dns", 53, 5353, "UDP", Some(30053))],
        spec_extra: "",
        status: "",
        endpoints: &[A1, B2],
    };
    let ns = NorthSouth::start_in(family, &[dns]);
    let mut payload = b"echo:".to_vec();
    payload.resize(3_000, b'x');
    let ask = |payload: Vec<u8>, addr: SocketAddr| {
        move || {
            (0..20)
                .map(|i| {
                    let answer = udp_ask(addr, &payload, TIMEOUT)
                        .unwrap_or_else(|e| panic!("datagram {i} of {} bytes to {addr}: {e}", payload.len()));
                    let line_end = answer.iter().position(|b| *b == b'\n').expect("answer line");
                    assert_eq!(&answer[line_end + 1..], &payload[..], "the whole datagram came back");
                    String::from_utf8_lossy(&answer[..line_end]).into_owned()
                })
                .collect::<Vec<_>>()
        }
    };
    // A pod to the ClusterIP: a local and a remote backend; fragments both
    // ways, on the pod program and on the uplink.
    let client = &ns.cluster.node(1).pod("client").ns;
    let from_pod = client.run_in(ask(payload.clone(), SocketAddr::new(ns.addr(Ipv4Addr::new(10, 96, 0, 53)), 53)));
    // The external client to the NodePort: SNAT for the remote backend.
    let from_outside = ns.cluster.external.run_in(ask(payload, SocketAddr::new(ns.node_addr(1), 30053)));
    let names =
        |answers: &[String]| answers.iter().map(|a| parse_answer(a).0).collect::<std::collections::BTreeSet<_>>();
    assert_eq!(names(&from_pod).len(), 2, "both backends answered the pod: {from_pod:?}");
    assert_eq!(names(&from_outside).len(), 2, "both backends answered the client: {from_outside:?}");
    assert!(ns.counter(1, "fragment_translated") >= 40);
    assert_eq!(ns.counter(1, "pass_fragment"), 0, "no fragment of a Service flow went untranslated");
}

fn an_assured_flow_through_snat_survives_a_flood_of_new_flows_past_the_table_size(family: Family) {
    let sink = Svc {
        name: "sink",
        cluster_ip: "10.96.0.60",
        type_: "NodePort",
        // Nothing listens on 9999: the flood is never answered.
        ports: &[("flood", 99, 9999, "UDP", Some(30099))],
        spec_extra: "",
        status: "",
        endpoints: &[B2],
    };
    let flags: &[&str] = &["--external-interfaces", "eth0", "--map-size-conntrack-new", "256"];
    let ns = NorthSouth::start_with_in(family, &[NODEPORT_ONLY_REMOTE, sink], |_| {}, &[flags, flags]);
    busy_client(&ns.cluster.external);
    let node1 = ns.node_addr(1);
    let before = ns.counter(1, "dnat_new_flow");
    let (held, flooded) = ns.cluster.external.run_in(move || {
        let mut held = TcpStream::connect_timeout(&SocketAddr::new(node1, 30080), TIMEOUT).expect("held");
        held.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        who(&mut held).expect("the held connection answers before the flood");
        // 4,000 unanswered flows (16 times the new-flow table), each from
        // its own source port.
        let mut ports = std::collections::BTreeSet::new();
        for _ in 0..4_000 {
            let sink = SocketAddr::new(node1, 30099);
            let s = UdpSocket::bind(any_port_for(sink)).expect("bind");
            s.send_to(b"flood", sink).expect("send");
            ports.insert(s.local_addr().expect("local address").port());
        }
        let flooded = ports.len() as u64;
        std::thread::sleep(Duration::from_millis(200));
        let after = who(&mut held);
        (after, flooded)
    });
    let answer = held.expect("the held connection still answers after the flood");
    assert_eq!(parse_answer(&answer).0, "b2");
    assert!(flooded > 3_000, "{flooded} flows, more than ten times the new-flow table");
    assert!(ns.counter(1, "dnat_new_flow") - before >= flooded, "every flooded source port was a new flow");
    // And new connections still work.
    let fresh = ns.cluster.external.run_in(move || tcp_who(SocketAddr::new(node1, 30080), TIMEOUT));
    assert_eq!(parse_answer(&fresh.expect("a new connection after the flood")).0, "b2");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn a_packet_too_big_for_the_route_towards_the_backend_gets_fragmentation_needed() {
    // Node 1 reaches node 2's pods over a path with a 1200-byte MTU.
    let narrow = |c: &service_tests::cluster::Cluster| {
        let cidr = format!("{}/24", pod_cidr(2));
        c.node(1)
            .node
            .ip(&["route", "replace", &cidr, "via", &node_ip(2).to_string(), "mtu", "lock", "1200"])
            .expect("narrow route");
    };
    let flags: &[&str] = &["--external-interfaces", "eth0"];
    let ns = NorthSouth::start_with(&[NODEPORT_ONLY_REMOTE], narrow, &[flags, flags]);
    let node1 = node_ip(1);
    let response = ns.cluster.external.run_in(move || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::from((node1, 30080)), TIMEOUT).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        // One request larger than the narrow path: the client's first full
        // segments are too big for it.
        let filler = "x".repeat(4_000);
        write!(s, "GET / HTTP/1.1\r\nHost: t\r\nX-Filler: {filler}\r\nConnection: close\r\n\r\n").expect("send");
        let mut response = String::new();
        s.read_to_string(&mut response).expect("the response arrives once the client lowered its segments");
        response
    });
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let route = ns.cluster.external.ip(&["route", "get", &node1.to_string()]).expect("route get");
    let route = String::from_utf8_lossy(&route.stdout).into_owned();
    assert!(route.contains("mtu 1200"), "the client learnt the path MTU from node 1's ICMP error: {route}");
    assert!(ns.counter(1, "drop_frag_needed") >= 1);
}

fn a_new_pods_very_first_datagram_to_a_cluster_ip_is_translated(family: Family) {
    let dns = Svc {
        name: "dns",
        cluster_ip: "10.96.0.53",
        type_: "ClusterIP",
        ports: &[("dns", 53, 5353, "UDP", None)],
        spec_extra: "",
        status: "",
        endpoints: &[A1],
    };
    let mut ns = NorthSouth::start_in(family, &[dns]);
    let vip = SocketAddr::new(ns.addr(Ipv4Addr::new(10, 96, 0, 53)), 53);
    // Pods wired the way a CNI does it while the agent runs, each sending
    // one datagram (no retry) the moment its interface is ready.
    for i in 0..10u8 {
        let name = format!("new{i}");
        let pod = ns.cluster.node_mut(1).add_pod(&name, Ipv4Addr::new(10, 244, 1, 50 + i)).expect("new pod");
        let answer = pod.ns.run_in(|| udp_ask(vip, b"first", TIMEOUT));
        let answer = answer.unwrap_or_else(|e| panic!("pod {name}'s first datagram: {e}"));
        assert_eq!(parse_answer(&String::from_utf8_lossy(&answer)).0, "a1");
    }
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn snat_uses_the_address_of_the_interface_towards_the_backend() {
    // Node 1 has a second, "public" NIC facing the client directly
    // (203.0.113.0/24), which node 2 has no route to: a backend on node 2
    // can only answer node 1's fabric address.
    let public_nic = |c: &service_tests::cluster::Cluster| {
        service_tests::netns::run(
            "ip",
            &[
                "link",
                "add",
                "pub0",
                "netns",
                c.node(1).node.name(),
                "type",
                "veth",
                "peer",
                "name",
                "pub0",
                "netns",
                c.external.name(),
            ],
        )
        .expect("public veth");
        c.node(1).node.ip(&["addr", "add", "203.0.113.1/24", "dev", "pub0"]).expect("node address");
        c.node(1).node.ip(&["link", "set", "pub0", "up"]).expect("up");
        c.external.ip(&["addr", "add", "203.0.113.100/24", "dev", "pub0"]).expect("client address");
        c.external.ip(&["link", "set", "pub0", "up"]).expect("up");
    };
    let flags: &[&str] = &["--external-interfaces", "eth0,pub0"];
    let ns = NorthSouth::start_with(&[NODEPORT_ONLY_REMOTE], public_nic, &[flags, &["--external-interfaces", "eth0"]]);
    let addr = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 1), 30080);
    let answers = ns.cluster.external.run_in(move || {
        (0..20)
            .map(|i| tcp_who(addr, TIMEOUT).unwrap_or_else(|e| panic!("connection {i} via the public NIC: {e}")))
            .collect::<Vec<_>>()
    });
    for a in &answers {
        let (name, peer) = parse_answer(a);
        assert_eq!(name, "b2");
        assert_eq!(peer.ip(), std::net::IpAddr::V4(node_ip(1)), "SNAT to the fabric address, not the public one");
    }
}
