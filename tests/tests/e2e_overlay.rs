//! Tier 3: the nodes' cross-node traffic runs over an overlay or tunnel
//! device (`tests/src/overlay.rs`), as it does with flannel, Calico's
//! VXLAN/IPIP, Cilium's tunnels or WireGuard. Replies of cross-node flows
//! come back decapsulated on that device: they are translated there
//! without the device being named in `--external-interfaces` (the agent
//! finds it by its link kind). The TUN variant is an L3 device (no
//! Ethernet header): the programs parse it, answer rejects on it and
//! redirect to and from it.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};

use service_tests::{
    cluster::node_ip,
    netns::Netns,
    north_south::{B2, CLIENT_POD, Svc, TIMEOUT, answers, parse_answer},
    overlay::{Kind, Overlay, TUN_DEV, VXLAN_DEV, tun_ip, vxlan_ip},
    traffic,
};

/// A ClusterIP whose only endpoint is on node 2.
const REMOTE: Svc = Svc {
    name: "remote",
    cluster_ip: "10.96.0.41",
    type_: "ClusterIP",
    ports: &[("http", 80, 8080, "TCP", None), ("dns", 53, 5353, "UDP", None)],
    spec_extra: "",
    status: "",
    endpoints: &[B2],
};

/// A NodePort (and an external IP, routed through node 2's tunnel in the
/// TUN test) whose only endpoint is on node 2: node 1 SNATs.
const EXTERNAL_IP_VIA_TUN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const NODEPORT: Svc = Svc {
    name: "np",
    cluster_ip: "10.96.0.42",
    type_: "NodePort",
    ports: &[("http", 80, 8080, "TCP", Some(30089))],
    spec_extra: "  externalIPs: [198.51.100.20]\n",
    status: "",
    endpoints: &[B2],
};

/// No endpoints: rejected (TCP RST, ICMP port unreachable).
const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 30);
const EMPTY: Svc = Svc {
    name: "empty",
    cluster_ip: "10.96.0.43",
    type_: "ClusterIP",
    ports: &[("http", 80, 8080, "TCP", None), ("dns", 53, 5353, "UDP", None)],
    spec_extra: "  externalIPs: [198.51.100.30]\n",
    status: "",
    endpoints: &[],
};

/// One UDP exchange from `ns` with `dst`: the answer, or the error kind.
fn udp(ns: &Netns, dst: SocketAddrV4) -> Result<String, std::io::ErrorKind> {
    ns.run_in(move || {
        traffic::udp_ask(dst, b"hi", TIMEOUT).map(|b| String::from_utf8_lossy(&b).into_owned()).map_err(|e| e.kind())
    })
}

/// The agent log line for an overlay device attached by its link kind.
fn attached(ov: &Overlay, node: u8, dev: &str, build: &str) -> bool {
    ov.ns.agents[usize::from(node) - 1]
        .log()
        .contains(&format!("attached external ingress program interface={dev} build={build}"))
}

/// Fails on an agent that only attaches to `--external-interfaces`: the
/// pod's ClusterIP replies come back on vx0 untranslated (the client
/// resets them), and NodePort traffic SNATed out of vx0 keeps the eth0
/// address.
#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn vxlan_overlay_replies_are_translated_without_naming_the_device() {
    let ov = Overlay::start(Kind::Vxlan, &[REMOTE, NODEPORT]);
    assert!(attached(&ov, 1, VXLAN_DEV, "ethernet"), "{}", ov.ns.agents[0].log());
    // A pod on node 1 to a ClusterIP served on node 2: the request is
    // encapsulated, the reply comes back decapsulated on node 1's vx0 and
    // is reverse-translated there.
    let before = ov.ns.counter(1, "rev_nat_reply");
    let client = &ov.ns.cluster.node(1).pod("client").ns;
    for (name, peer) in answers(client, "http://10.96.0.41/", 5) {
        assert_eq!((name.as_str(), peer.ip()), ("b2", CLIENT_POD.into()));
    }
    assert_eq!(parse_answer(&udp(client, "10.96.0.41:53".parse().expect("addr")).expect("udp answer")).0, "b2");
    assert!(ov.ns.counter(1, "rev_nat_reply") >= before + 5, "node 1 reverse-translated the replies");
    // The external client to node 1's NodePort: SNATed to vx0's address
    // (the device the backend is reached by, as MASQUERADE picks), so the
    // reply returns through the overlay and is translated on vx0.
    for (name, peer) in answers(&ov.ns.cluster.external, &format!("http://{}:30089/", node_ip(1)), 5) {
        assert_eq!((name.as_str(), peer.ip()), ("b2", vxlan_ip(1).into()), "SNAT to node 1's overlay address");
    }
    assert!(ov.ns.counter(1, "snat_new_flow") >= 5);
    // No helper failed at any stage of a rewrite or redirect.
    for stage in [
        "drop_l3_csum",
        "drop_l4_csum",
        "drop_store",
        "drop_load",
        "drop_resize",
        "drop_icmp_quote",
        "drop_redirect_refused",
    ] {
        assert_eq!(ov.ns.counter(1, stage), 0, "{stage}");
    }
}

/// Fails on the old programs twice over: tun0 is not attached (not in
/// `--external-interfaces`), and even when named there the Ethernet
/// program reads an EtherType out of the IP header and passes every
/// packet untranslated; an old agent would also SNAT to eth0's address.
#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn tun_l3_device_carries_service_traffic_rejects_and_replies() {
    let ov = Overlay::start(Kind::Tun, &[REMOTE, NODEPORT, EMPTY]);
    for node in [1, 2] {
        assert!(attached(&ov, node, TUN_DEV, "l3"), "{}", ov.ns.agents[usize::from(node) - 1].log());
    }
    // Cross-node ClusterIP from a pod: replies come back on the L3 device
    // (parsed from offset 0) and are reverse-translated there.
    let before = ov.ns.counter(1, "rev_nat_reply");
    let client = &ov.ns.cluster.node(1).pod("client").ns;
    for (name, peer) in answers(client, "http://10.96.0.41/", 5) {
        assert_eq!((name.as_str(), peer.ip()), ("b2", CLIENT_POD.into()));
    }
    assert_eq!(parse_answer(&udp(client, "10.96.0.41:53".parse().expect("addr")).expect("udp answer")).0, "b2");
    assert!(ov.ns.counter(1, "rev_nat_reply") >= before + 5, "node 1 reverse-translated the replies");
    // NodePort from the external client: DNAT + SNAT to tun0's address on
    // eth0 (Ethernet ingress), redirected into the L3 device; the reply
    // comes back on tun0 and is redirected out of eth0 (L3 ingress to an
    // Ethernet egress: a MAC header is pushed for bpf_redirect_neigh).
    for (name, peer) in answers(&ov.ns.cluster.external, &format!("http://{}:30089/", node_ip(1)), 5) {
        assert_eq!((name.as_str(), peer.ip()), ("b2", tun_ip(1).into()), "SNAT to node 1's tunnel address");
    }
    // From node 2's host over the tunnel to node 1's external IP: a new
    // flow parsed on the L3 device, SNATed and redirected back into it;
    // the reply is redirected L3 to L3.
    let node2 = &ov.ns.cluster.node(2).node;
    let got = node2.run_in(|| {
        (0..3)
            .map(|_| {
                let mut s = TcpStream::connect_timeout(&SocketAddr::from((EXTERNAL_IP_VIA_TUN, 80)), TIMEOUT)
                    .expect("connect over the tunnel");
                s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
                service_tests::traffic::who(&mut s).expect("answer over the tunnel")
            })
            .collect::<Vec<_>>()
    });
    for line in got {
        let (name, peer) = parse_answer(&line);
        assert_eq!((name.as_str(), peer.ip()), ("b2", tun_ip(1).into()), "{line}");
    }
    // No endpoints: node 1 answers on the L3 device itself (RST, ICMP port
    // unreachable), back out of tun0 to node 2.
    let (rst_before, icmp_before) = (ov.ns.counter(1, "reject_tcp_rst"), ov.ns.counter(1, "reject_icmp_unreachable"));
    let tcp = node2.run_in(|| {
        TcpStream::connect_timeout(&SocketAddr::from((EMPTY_IP, 80)), TIMEOUT).map(|_| ()).map_err(|e| e.kind())
    });
    assert_eq!(tcp, Err(std::io::ErrorKind::ConnectionRefused), "a TCP RST over the tunnel");
    assert_eq!(udp(node2, SocketAddrV4::new(EMPTY_IP, 53)), Err(std::io::ErrorKind::ConnectionRefused));
    assert!(ov.ns.counter(1, "reject_tcp_rst") > rst_before);
    assert!(ov.ns.counter(1, "reject_icmp_unreachable") > icmp_before);
}
