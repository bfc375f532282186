//! Tier 3: north-south traffic on a two-node cluster with real traffic
//! (root). An external client on the fabric, node 1 and node 2 each running
//! their own agent (`--external-interfaces eth0`), pods on both nodes
//! saw). Every test builds its own cluster and tears it down.
//!
//! Each test runs twice (`::ipv4`, `::ipv6`): over IPv4 against IPv4
//! Services, and over IPv6 against the same Services written dual-stack
//! (`Svc::yaml_dual`), on the dual-stack topology.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    time::Duration,
};

use service_common::stats::Counter;
use service_tests::{
    cluster::{external_addr, node_ip},
    fixture::interface_stat,
    in_both_families,
    netns::{Family, Netns, http_url, ipv6_twin, wait_until},
    north_south::{
        A1, B2, CLIENT_POD, EXTERNAL_SVC_IP, Ep, LB_IP, NorthSouth, Svc, TIMEOUT, WEB, answers, assert_both_backends,
        get, names, parse_answer,
    },
    traffic::{udp_connected, who},
};

in_both_families!(
    nodeport_lb_ip_and_external_ip_reach_backends_on_both_nodes,
    external_traffic_policy_local_keeps_the_client_address_and_drops_without_local_endpoints,
    load_balancer_source_ranges_drop_other_sources,
    nodeport_addresses_follow_the_flags_and_the_addresses_that_come_and_go,
    a_pod_reaching_its_own_service_lands_on_itself_and_pods_reach_backends_on_other_nodes,
    pods_reach_node_ports_load_balancer_ips_and_external_ips_through_every_endpoint,
    nodeport_rejects_without_endpoints_and_keeps_client_ip_affinity,
    removing_a_backend_flushes_its_udp_flows_and_lets_tcp_flows_finish,
    icmp_errors_about_a_translated_flow_reach_the_client,
    service_cidrs_reject_unserved_ports_drop_unallocated_addresses_and_translate_from_outside,
);

fn nodeport_lb_ip_and_external_ip_reach_backends_on_both_nodes(family: Family) {
    let ns = NorthSouth::start_in(family, &[WEB]);
    let client = &ns.cluster.external;
    // NodePort on node 1 and on node 2: each node SNATs to itself for the
    // other node's backend.
    assert_both_backends(&answers(client, &ns.url(node_ip(1), 30080), 24), ns.node_addr(1));
    assert_both_backends(&answers(client, &ns.url(node_ip(2), 30080), 24), ns.node_addr(2));
    // The LoadBalancer ingress IP and the external IP, on the Service port.
    assert_both_backends(&answers(client, &ns.url(LB_IP, 80), 24), ns.node_addr(1));
    assert_both_backends(&answers(client, &ns.url(EXTERNAL_SVC_IP, 80), 24), ns.node_addr(1));
    assert!(ns.counter(1, "snat_new_flow") > 0);
    // UDP through the NodePort: the answer comes back from the address
    // the client sent to (a connected socket accepts nothing else).
    let node1 = ns.node_addr(1);
    let got: Vec<String> = ns.cluster.external.run_in(move || {
        (0..12)
            .map(|_| {
                let s = udp_connected((node1, 30053), TIMEOUT).expect("socket");
                s.send(b"hello").expect("send");
                let mut buf = [0u8; 256];
                let n = s.recv(&mut buf).expect("udp answer through the NodePort");
                String::from_utf8_lossy(&buf[..n]).into_owned()
            })
            .collect()
    });
    let got: Vec<(String, SocketAddr)> = got.iter().map(|b| parse_answer(b)).collect();
    assert_both_backends(&got, ns.node_addr(1));
}

fn external_traffic_policy_local_keeps_the_client_address_and_drops_without_local_endpoints(family: Family) {
    let local = Svc {
        name: "local",
        cluster_ip: "10.96.0.20",
        type_: "LoadBalancer",
        ports: &[("http", 80, 8080, "TCP", Some(30081))],
        spec_extra: "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32100\n",
        status: "status:\n  loadBalancer:\n    ingress:\n    - ip: 198.51.100.10\n",
        endpoints: &[B2],
    };
    let ns = NorthSouth::start_in(family, &[local]);
    let client = &ns.cluster.external;
    // Node 2 has the endpoint: the backend sees the client's own address.
    for (name, peer) in answers(client, &ns.url(node_ip(2), 30081), 10) {
        assert_eq!((name.as_str(), peer.ip()), ("b2", external_addr(family)));
    }
    // Node 1 has none: dropped (counted), never forwarded to node 2.
    let before = ns.counter(1, "drop_no_local_backend");
    let err = get(client, &ns.url(node_ip(1), 30081)).expect_err("node 1 must drop");
    assert!(err.to_string().contains("timed out"), "a silent drop, not a refusal: {err}");
    assert!(ns.counter(1, "drop_no_local_backend") > before);
    // The LB IP routes to node 1 too: dropped the same way.
    assert!(get(client, &ns.url(LB_IP, 80)).is_err());
    // healthCheckNodePort: 503 on node 1, 200 on node 2, kube-proxy's body.
    for (node, code, count) in [(1, "503", 0), (2, "200", 1)] {
        let out = client
            .exec("curl", &["-sS", "--max-time", "2", "-w", "\n%{http_code}", &ns.url(node_ip(node), 32100)])
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').expect("status line");
        assert_eq!(status, code, "node {node}: {text}");
        let v: serde_json::Value = serde_json::from_str(body).expect("json body");
        assert_eq!(v["service"]["namespace"], "default");
        assert_eq!(v["service"]["name"], "local");
        assert_eq!(v["localEndpoints"], count, "node {node}: {body}");
    }
}

fn load_balancer_source_ranges_drop_other_sources(family: Family) {
    // Dual-stack Services list ranges of both families; each family's
    // ranges guard that family's addresses (the client is
    // fd00:192:168:100::100 in IPv6).
    let (allowed_ranges, denied_ranges) = match family {
        Family::V4 => {
            ("  loadBalancerSourceRanges: [192.168.100.96/29]\n", "  loadBalancerSourceRanges: [10.0.0.0/8]\n")
        }
        Family::V6 => (
            "  loadBalancerSourceRanges: [192.168.100.96/29, fd00:192:168:100::100/124]\n",
            "  loadBalancerSourceRanges: [10.0.0.0/8, fd00:10::/32]\n",
        ),
    };
    let allowed = Svc {
        name: "allowed",
        cluster_ip: "10.96.0.30",
        type_: "LoadBalancer",
        ports: &[("http", 80, 8080, "TCP", Some(30082))],
        spec_extra: allowed_ranges,
        status: "status:\n  loadBalancer:\n    ingress:\n    - ip: 198.51.100.10\n",
        endpoints: &[A1],
    };
    let denied = Svc {
        name: "denied",
        cluster_ip: "10.96.0.31",
        type_: "LoadBalancer",
        ports: &[("http", 80, 8080, "TCP", Some(30083))],
        spec_extra: denied_ranges,
        status: "status:\n  loadBalancer:\n    ingress:\n    - ip: 198.51.100.20\n",
        endpoints: &[A1],
    };
    let ns = NorthSouth::start_in(family, &[allowed, denied]);
    let client = &ns.cluster.external;
    let (name, _) = get(client, &ns.url(LB_IP, 80)).expect("inside the ranges");
    assert_eq!(name, "a1");
    let before = ns.counter(1, "drop_source_range");
    let err = get(client, &ns.url(EXTERNAL_SVC_IP, 80)).expect_err("outside the ranges");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(ns.counter(1, "drop_source_range") > before);
    // As with kube-proxy, the ranges guard the load balancer's addresses,
    // not the Service's NodePort.
    let (name, _) = get(client, &ns.url(node_ip(1), 30083)).expect("the NodePort stays open");
    assert_eq!(name, "a1");
}

/// Whether a TCP connection from `ns` to `addr:port` is accepted.
fn connects(ns: &Netns, addr: IpAddr, port: u16) -> bool {
    ns.run_in(move || TcpStream::connect_timeout(&SocketAddr::new(addr, port), TIMEOUT).is_ok())
}

fn nodeport_addresses_follow_the_flags_and_the_addresses_that_come_and_go(family: Family) {
    let np = Svc {
        name: "np",
        cluster_ip: "10.96.0.70",
        type_: "NodePort",
        ports: &[("http", 80, 8080, "TCP", Some(30089))],
        spec_extra: "",
        status: "",
        endpoints: &[A1, B2],
    };
    let node1_extra = family.addr(Ipv4Addr::new(192, 168, 100, 31));
    let node2_extra = family.addr(Ipv4Addr::new(192, 168, 100, 32));
    // The fabric's prefix length in this family, and the nodes' own /28
    // (.0-.15; in IPv6 fd00:192:168:100::/123 holds ::12 but not ::32).
    let (fabric, np_flag) = match family {
        Family::V4 => ("24", "192.168.100.0/28"),
        Family::V6 => ("64", "192.168.100.0/28,fd00:192:168:100::/123"),
    };
    let host = family.host_prefix();
    let external = external_addr(family).to_string();
    // Node 1: no --external-interfaces; its default route (via the
    // external client, a host of this topology) makes eth0 external.
    // Node 2: NodePorts only on addresses inside 192.168.100.0/28.
    let ns = NorthSouth::start_with_in(
        family,
        &[np],
        |c| {
            c.node(1).node.ip(&["route", "add", "default", "via", &external]).expect("default route");
            let extra = format!("{node2_extra}/{fabric}");
            c.node(2).node.ip(&["addr", "add", &extra, "dev", "eth0", "nodad"]).expect("address");
        },
        &[&[], &["--external-interfaces", "eth0", "--nodeport-addresses", np_flag]],
    );
    assert!(ns.agents[0].log().contains("attached external ingress program interface=eth0"), "{}", ns.agents[0].log());
    let client = &ns.cluster.external;
    assert!(connects(client, ns.node_addr(1), 30089));
    assert!(connects(client, ns.node_addr(2), 30089), "192.168.100.12 is inside 192.168.100.0/28");
    assert!(!connects(client, node2_extra, 30089), "192.168.100.32 is outside --nodeport-addresses");
    // An address added to node 1's eth0 answers NodePorts within moments;
    // once removed, it no longer does (nothing listens there).
    assert!(!connects(client, node1_extra, 30089));
    let node1 = &ns.cluster.node(1).node;
    node1.ip(&["addr", "add", &format!("{node1_extra}/{fabric}"), "dev", "eth0", "nodad"]).expect("add address");
    wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
        connects(client, node1_extra, 30089).then_some(())
    })
    .expect("the new address answers the NodePort");
    node1.ip(&["addr", "del", &format!("{node1_extra}/{fabric}"), "dev", "eth0"]).expect("remove address");
    node1.ip(&["addr", "add", &format!("{node1_extra}/{host}"), "dev", "lo"]).expect("address on lo");
    wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
        (!connects(client, node1_extra, 30089)).then_some(())
    })
    .expect("a removed address no longer answers the NodePort");
}

fn a_pod_reaching_its_own_service_lands_on_itself_and_pods_reach_backends_on_other_nodes(family: Family) {
    let selfish = Svc {
        name: "self",
        cluster_ip: "10.96.0.40",
        type_: "ClusterIP",
        ports: &[("http", 80, 8080, "TCP", None)],
        spec_extra: "",
        status: "",
        endpoints: &[A1],
    };
    let remote = Svc {
        name: "remote",
        cluster_ip: "10.96.0.41",
        type_: "ClusterIP",
        ports: &[("http", 80, 8080, "TCP", None), ("dns", 53, 5353, "UDP", None)],
        spec_extra: "",
        status: "",
        endpoints: &[B2],
    };
    let ns = NorthSouth::start_in(family, &[selfish, remote]);
    // Hairpin: a1 → its own Service → a1, seen from the node's address.
    for (name, peer) in answers(ns.pod(A1), &ns.url(Ipv4Addr::new(10, 96, 0, 40), 80), 5) {
        assert_eq!((name.as_str(), peer.ip()), ("a1", ns.node_addr(1)));
    }
    // A pod on node 1 to a ClusterIP whose backend is on node 2: the
    // backend sees the pod itself; the reply comes back over node 1's eth0
    // and is reverse-translated there (or the client would drop it).
    let before = ns.counter(1, "rev_nat_reply");
    let client = &ns.cluster.node(1).pod("client").ns;
    let remote_ip = ns.addr(Ipv4Addr::new(10, 96, 0, 41));
    for (name, peer) in answers(client, &http_url(remote_ip, 80), 5) {
        assert_eq!((name.as_str(), peer.ip()), ("b2", ns.addr(CLIENT_POD)));
    }
    assert!(ns.counter(1, "rev_nat_reply") > before, "node 1 reverse-translated the replies");
    let answer = client.run_in(|| {
        let s = udp_connected((remote_ip, 53), TIMEOUT).expect("socket");
        s.send(b"hi").expect("send");
        let mut buf = [0u8; 256];
        let n = s.recv(&mut buf).expect("udp answer");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    assert_eq!(parse_answer(&answer).0, "b2");
}

fn pods_reach_node_ports_load_balancer_ips_and_external_ips_through_every_endpoint(family: Family) {
    // externalTrafficPolicy Local with the only endpoint on node 2: external
    // clients at node 1 are dropped, but a pod on node 1 dialling node 1's
    // NodePort, the LB IP or the external IP is translated on its own node
    // to the cluster-wide endpoints (kube-proxy's short-circuit), keeping
    // its own address (a Local policy is not masqueraded).
    let local = Svc {
        name: "local",
        cluster_ip: "10.96.0.45",
        type_: "LoadBalancer",
        ports: &[("http", 80, 8080, "TCP", Some(30089))],
        spec_extra: "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32101\n  externalIPs: [198.51.100.20]\n",
        status: "status:\n  loadBalancer:\n    ingress:\n    - ip: 198.51.100.10\n",
        endpoints: &[B2],
    };
    // A backend on the client's own node, externalTrafficPolicy Cluster:
    // masqueraded to node 1's address, as kube-proxy marks pod traffic to
    // a NodePort; the reply enters a pod interface and leaves by a FIB
    // redirect (its restored source is node 1's).
    let near = Svc {
        name: "near",
        cluster_ip: "10.96.0.46",
        type_: "NodePort",
        ports: &[("http", 80, 8080, "TCP", Some(30090))],
        spec_extra: "",
        status: "",
        endpoints: &[A1],
    };
    let ns = NorthSouth::start_in(family, &[local, near]);
    let client = &ns.cluster.node(1).pod("client").ns;
    for (name, peer) in answers(client, &ns.url(node_ip(1), 30090), 3) {
        assert_eq!((name.as_str(), peer.ip()), ("a1", ns.node_addr(1)));
    }
    let before = ns.counter(1, "dnat_new_flow");
    for url in [ns.url(node_ip(1), 30089), ns.url(LB_IP, 80), ns.url(EXTERNAL_SVC_IP, 80)] {
        for (name, peer) in answers(client, &url, 3) {
            assert_eq!((name.as_str(), peer.ip()), ("b2", ns.addr(CLIENT_POD)), "{url}");
        }
    }
    assert!(ns.counter(1, "dnat_new_flow") >= before + 9, "translated on node 1's pod interface");
    // The external client at node 1 is still dropped (no local endpoint).
    let err = get(&ns.cluster.external, &ns.url(node_ip(1), 30089)).expect_err("node 1 must drop");
    assert!(err.to_string().contains("timed out"), "a silent drop: {err}");
}

fn nodeport_rejects_without_endpoints_and_keeps_client_ip_affinity(family: Family) {
    let empty = Svc {
        name: "empty",
        cluster_ip: "10.96.0.50",
        type_: "NodePort",
        ports: &[("http", 80, 8080, "TCP", Some(30084)), ("dns", 53, 5353, "UDP", Some(30085))],
        spec_extra: "",
        status: "",
        endpoints: &[],
    };
    let sticky = Svc {
        name: "sticky",
        cluster_ip: "10.96.0.51",
        type_: "NodePort",
        ports: &[("http", 80, 8080, "TCP", Some(30086))],
        spec_extra: "  sessionAffinity: ClientIP\n",
        status: "",
        endpoints: &[A1, B2],
    };
    let ns = NorthSouth::start_in(family, &[empty, sticky]);
    let client = &ns.cluster.external;
    let node1 = ns.node_addr(1);
    let tcp = client.run_in(move || {
        TcpStream::connect_timeout(&SocketAddr::new(node1, 30084), TIMEOUT).map(|_| ()).map_err(|e| e.kind())
    });
    assert_eq!(tcp, Err(std::io::ErrorKind::ConnectionRefused), "a TCP RST");
    let udp = client.run_in(move || {
        let s = udp_connected((node1, 30085), TIMEOUT).expect("socket");
        s.send(b"hi").expect("send");
        let mut buf = [0u8; 64];
        s.recv(&mut buf).map(|_| ()).map_err(|e| e.kind())
    });
    assert_eq!(udp, Err(std::io::ErrorKind::ConnectionRefused), "ICMP port unreachable");
    assert!(ns.counter(1, "reject_tcp_rst") >= 1);
    assert!(ns.counter(1, "reject_icmp_unreachable") >= 1);
    // Per interface: all of them on node 1's eth0, where they came in.
    let out = ns.cluster.node(1).node.exec("cat", &["/sys/class/net/eth0/ifindex"]).expect("ifindex");
    let eth0: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("ifindex");
    for (name, counter) in
        [("reject_tcp_rst", Counter::RejectTcpRst), ("reject_icmp_unreachable", Counter::RejectIcmpUnreachable)]
    {
        assert_eq!(interface_stat(&ns.root(1), eth0, counter), ns.counter(1, name), "{name} on eth0");
    }
    // ClientIP affinity: 20 connections, one backend.
    let got = answers(client, &ns.url(node_ip(1), 30086), 20);
    assert_eq!(names(&got).len(), 1, "{got:?}");
    assert!(ns.counter(1, "affinity_hit") >= 19);
}

fn removing_a_backend_flushes_its_udp_flows_and_lets_tcp_flows_finish(family: Family) {
    let ns = NorthSouth::start_in(family, &[WEB]);
    let node1 = ns.node_addr(1);
    // One UDP socket (one 5-tuple) and one TCP connection, both pinned to
    // a backend by conntrack.
    let (udp_first, tcp_first) = ns.cluster.external.run_in(move || {
        let s = udp_connected((node1, 30053), TIMEOUT).expect("socket");
        s.send(b"1").expect("send");
        let mut buf = [0u8; 256];
        let n = s.recv(&mut buf).expect("first udp answer");
        let mut tcp = TcpStream::connect_timeout(&SocketAddr::new(node1, 30080), TIMEOUT).expect("tcp");
        tcp.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let line = who(&mut tcp).expect("tcp answer");
        ((s, String::from_utf8_lossy(&buf[..n]).into_owned()), (tcp, line))
    });
    let (sock, first) = udp_first;
    let (mut tcp, tcp_line) = tcp_first;
    let udp_backend = parse_answer(&first).0;
    let tcp_backend = parse_answer(&tcp_line).0;
    // Remove the UDP flow's backend (and the TCP one's, if different: both
    // keep running).
    let keep: Vec<Ep> = [A1, B2].into_iter().filter(|e| e.0 != udp_backend && e.0 != tcp_backend).collect();
    let left = if keep.is_empty() {
        // Both flows sit on one backend: leave the other one.
        vec![if udp_backend == "a1" { B2 } else { A1 }]
    } else {
        keep
    };
    ns.write(&Svc { endpoints: &left, ..WEB });
    wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        ns.agents[0].log().contains("flushed UDP conntrack entries").then_some(())
    })
    .expect("node 1 flushed the UDP flow");
    // The same UDP socket now reaches the remaining backend.
    let next = ns.cluster.external.run_in(move || {
        sock.send(b"2").expect("send");
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("udp answer after the removal");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    assert_eq!(parse_answer(&next).0, left[0].0, "the UDP flow moved to a live backend");
    // The TCP connection still talks to its (removed, still running)
    // backend.
    let line = who(&mut tcp).expect("the established TCP flow keeps working");
    assert_eq!(parse_answer(&line).0, tcp_backend);
}

const IP_MTU_DISCOVER: i32 = 10;
const IP_PMTUDISC_DO: i32 = 2;
const IP_MTU: i32 = 14;
const IPV6_MTU_DISCOVER: i32 = 23;
const IPV6_PMTUDISC_DO: i32 = 2;
const IPV6_MTU: i32 = 24;

/// The (level, IP_MTU option) of a socket of `family`.
fn mtu_option(family: Family) -> (i32, i32) {
    match family {
        Family::V4 => (libc::IPPROTO_IP, IP_MTU),
        Family::V6 => (libc::IPPROTO_IPV6, IPV6_MTU),
    }
}

fn ip_mtu(sock: &UdpSocket, family: Family) -> i32 {
    let (level, option) = mtu_option(family);
    let mut mtu: i32 = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<i32>()).expect("len");
    // SAFETY: getsockopt into a valid i32 of `len` bytes on an open socket.
    let rc = unsafe { libc::getsockopt(sock.as_raw_fd(), level, option, (&raw mut mtu).cast(), &raw mut len) };
    assert_eq!(rc, 0, "getsockopt IP_MTU: {}", std::io::Error::last_os_error());
    mtu
}

fn icmp_errors_about_a_translated_flow_reach_the_client(family: Family) {
    // Only b2, on node 2: the flow is DNATed and SNATed by node 1.
    let big = Svc {
        name: "big",
        cluster_ip: "10.96.0.60",
        type_: "NodePort",
        ports: &[("dns", 53, 5353, "UDP", Some(30087)), ("closed", 54, 5999, "UDP", Some(30088))],
        spec_extra: "",
        status: "",
        endpoints: &[B2],
    };
    let ns = NorthSouth::start_in(family, &[big]);
    // Node 2's link to b2 carries at most 1000 bytes: node 2 answers a
    // bigger don't-fragment datagram with "fragmentation needed", sent to
    // node 1 (the SNAT address) and translated there for the client. In
    // IPv6 (whose links carry at least 1280 bytes) 1400, and the error is
    // an ICMPv6 Packet Too Big.
    let (link_mtu, datagram) = match family {
        Family::V4 => (1000, 1400),
        Family::V6 => (1400, 1450),
    };
    let b2_if = ns.cluster.node(2).pod("b2").host_if.clone();
    ns.cluster.node(2).node.ip(&["link", "set", "dev", &b2_if, "mtu", &link_mtu.to_string()]).expect("mtu");
    let node1 = ns.node_addr(1);
    let (mtu_before, mtu_after, refused) = ns.cluster.external.run_in(move || {
        let s = udp_connected((node1, 30087), TIMEOUT).expect("socket");
        let (level, option, mode) = match family {
            Family::V4 => (libc::IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO),
            Family::V6 => (libc::IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO),
        };
        // SAFETY: setsockopt with a valid i32 on an open socket.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                level,
                option,
                (&raw const mode).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<i32>()).expect("len"),
            )
        };
        assert_eq!(rc, 0);
        let before = ip_mtu(&s, family);
        let after = wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
            let _ = s.send(&vec![0u8; datagram]);
            let mtu = ip_mtu(&s, family);
            (mtu == link_mtu).then_some(mtu)
        })
        .unwrap_or_else(|_| ip_mtu(&s, family));
        // Port unreachable from b2 (nothing listens on 5999): the client's
        // connected socket sees ECONNREFUSED for its own flow.
        let c = udp_connected((node1, 30088), TIMEOUT).expect("socket");
        c.send(b"anyone?").expect("send");
        let mut buf = [0u8; 64];
        let refused = c.recv(&mut buf).map(|_| ()).map_err(|e| e.kind());
        (before, after, refused)
    });
    assert_eq!(mtu_before, 1500);
    assert_eq!(mtu_after, link_mtu, "the client learnt the path MTU from the translated ICMP error");
    assert_eq!(refused, Err(std::io::ErrorKind::ConnectionRefused), "port unreachable reached the client's socket");
    assert!(ns.counter(1, "icmp_error_translated") >= 2);
}

fn service_cidrs_reject_unserved_ports_drop_unallocated_addresses_and_translate_from_outside(family: Family) {
    // In IPv6 the Service CIDR is a /108 (the largest the API server
    // allows) holding WEB's fd00:10:96::10, and the unallocated address is
    // one of it: fd00:10:96::5:5.
    let (range, ranges, unallocated) = match family {
        Family::V4 => ("10.96.0.0/16", "10.96.0.0/16", IpAddr::from([10, 96, 5, 5])),
        Family::V6 => (
            "fd00:10:96::/108",
            "10.96.0.0/16,fd00:10:96::/108",
            IpAddr::V6(ipv6_twin(Ipv4Addr::new(10, 96, 0, 0)).to_bits().wrapping_add(0x5_0005).into()),
        ),
    };
    let flags: &[&str] = &["--external-interfaces", "eth0", "--service-cluster-ip-range", ranges];
    // The external client routes the service CIDR to node 1, as a BGP
    // announcement of it would.
    let ns = NorthSouth::start_with_in(
        family,
        &[WEB],
        |c| {
            let node1 = family.addr(node_ip(1)).to_string();
            c.external.ip(&["route", "add", range, "via", &node1]).expect("service route");
        },
        &[flags, flags],
    );
    let cluster_ip = ns.addr(Ipv4Addr::new(10, 96, 0, 10));
    let pod = &ns.cluster.node(1).pod("client").ns;
    // WEB's ClusterIP on a port it does not serve: refused at once (TCP RST,
    // ICMP port unreachable), as kube-proxy's nftables mode does.
    let tcp = pod.run_in(|| TcpStream::connect_timeout(&SocketAddr::new(cluster_ip, 81), TIMEOUT));
    let err = tcp.expect_err("port 81 is not served");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    let udp = pod.run_in(|| {
        let s = udp_connected((cluster_ip, 9999), TIMEOUT).expect("socket");
        s.send(b"x").expect("send");
        s.recv(&mut [0u8; 16])
    });
    let err = udp.expect_err("port 9999 is not served");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "ICMP port unreachable: {err}");
    // An address of the range no Service has: dropped silently, counted.
    let before = ns.counter(1, "drop_unallocated_service_ip");
    let tcp = pod.run_in(|| TcpStream::connect_timeout(&SocketAddr::new(unallocated, 80), TIMEOUT));
    let err = tcp.expect_err("not allocated");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "a silent drop of {unallocated}: {err}");
    assert!(ns.counter(1, "drop_unallocated_service_ip") > before);
    // From outside the node: the ClusterIP is translated and masqueraded,
    // its unserved port rejected.
    assert_both_backends(&answers(&ns.cluster.external, &http_url(cluster_ip, 80), 24), ns.node_addr(1));
    let tcp = ns.cluster.external.run_in(|| TcpStream::connect_timeout(&SocketAddr::new(cluster_ip, 81), TIMEOUT));
    assert_eq!(tcp.expect_err("not served").kind(), std::io::ErrorKind::ConnectionRefused);
}
