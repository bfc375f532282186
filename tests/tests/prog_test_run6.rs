//! Tier 2, IPv6: golden frames through the real `service_pod_ingress` and
//! `service_external_ingress` programs with BPF_PROG_TEST_RUN (root). The
//! maps are filled by the agent's own source → model → reconciler from a
//! dual-stack YAML; each crafted IPv6 frame goes in, and the exact expected
//! frame comes out (every address, port and checksum, extension headers
//! kept; ICMPv6 answers and translated ICMPv6 errors byte for byte, their
//! pseudo-header checksums included). The external program runs inside a
//! fresh network namespace whose IPv6 routes it sets, for its FIB lookups.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::programs::SchedClassifier;
use service_agent::{
    maps::{self, MapSizes, PinnedMaps},
    model::{self, NodeContext},
    reconciler::Reconciler,
    source::manifest,
    vocabulary::Cidr,
};
use service_common::{FAMILY_IPV4, FAMILY_IPV6, SnatAddrKey, snat_ports, stats::Counter};
use service_tests::{
    netns::{BpffsMount, Netns, unique_suffix},
    packet::{self, TestRunOutput},
    packet6::{self, Ext, PROTO_TCP, PROTO_UDP},
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const SYN_ACK: u8 = 0x12;
const RST: u8 = 0x04;

const fn v6(s: [u16; 8]) -> Ipv6Addr {
    Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7])
}

const CLIENT: Ipv6Addr = v6([0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x10]);
const VIP: Ipv6Addr = v6([0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10]);
const EMPTY_VIP: Ipv6Addr = v6([0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x20]);
const STICKY_VIP: Ipv6Addr = v6([0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x40]);
const UNALLOCATED: Ipv6Addr = v6([0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x99]);
const BACKENDS: [Ipv6Addr; 3] = [
    v6([0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x11]),
    v6([0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x12]),
    v6([0xfd00, 0x10, 0x244, 2, 0, 0, 0, 0x13]),
];
/// The node's IPv6 address (NodePorts, SNAT) and a client outside.
const NODE: Ipv6Addr = v6([0xfd00, 0x192, 0x168, 0x100, 0, 0, 0, 0x11]);
const OUTSIDE: Ipv6Addr = v6([0xfd00, 0x192, 0x168, 0x100, 0, 0, 0, 0x99]);
const ROUTER: Ipv6Addr = v6([0xfd00, 0x10, 0x244, 2, 0, 0, 0, 1]);
const REMOTE_BACKEND: Ipv6Addr = v6([0xfd00, 0x10, 0x244, 2, 0, 0, 0, 0x13]);

const MANIFESTS: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, 'fd00:10:96::10']
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-v6
  labels: {kubernetes.io/service-name: web}
addressType: IPv6
ports:
- {name: http, port: 8080}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: ['fd00:10:244:1::11']
- addresses: ['fd00:10:244:1::12']
- addresses: ['fd00:10:244:2::13']
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-v4
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [10.244.1.11]
---
apiVersion: v1
kind: Service
metadata: {name: no-endpoints, namespace: default}
spec:
  ipFamilies: [IPv6]
  clusterIP: 'fd00:10:96::20'
  clusterIPs: ['fd00:10:96::20']
  ports:
  - {name: http, port: 80}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  ipFamilies: [IPv6]
  clusterIP: 'fd00:10:96::40'
  clusterIPs: ['fd00:10:96::40']
  sessionAffinity: ClientIP
  ports:
  - {port: 80, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: sticky-v6
  labels: {kubernetes.io/service-name: sticky}
addressType: IPv6
ports: [{port: 8080}]
endpoints:
- addresses: ['fd00:10:244:1::11']
- addresses: ['fd00:10:244:1::12']
- addresses: ['fd00:10:244:2::13']
---
apiVersion: v1
kind: Service
metadata: {name: np, namespace: default}
spec:
  type: NodePort
  ipFamilies: [IPv6]
  clusterIP: 'fd00:10:96::50'
  clusterIPs: ['fd00:10:96::50']
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: 30053}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: np-v6
  labels: {kubernetes.io/service-name: np}
addressType: IPv6
ports:
- {name: http, port: 8080}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: ['fd00:10:244:2::13']
  nodeName: node-b
---
apiVersion: v1
kind: Service
metadata: {name: guarded, namespace: default}
spec:
  type: LoadBalancer
  ipFamilies: [IPv6]
  clusterIP: 'fd00:10:96::60'
  clusterIPs: ['fd00:10:96::60']
  externalTrafficPolicy: Local
  loadBalancerSourceRanges: ['fd00:192:168:100::/120', 192.168.0.0/16]
  ports:
  - {port: 80, targetPort: 8080, nodePort: 30081}
status:
  loadBalancer:
    ingress: [{ip: 'fd00:203::7'}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: guarded-v6
  labels: {kubernetes.io/service-name: guarded}
addressType: IPv6
ports: [{port: 8080}]
endpoints:
- addresses: ['fd00:10:244:1::11']
  nodeName: node-a
";

const LB_IP: Ipv6Addr = v6([0xfd00, 0x203, 0, 0, 0, 0, 0, 7]);

struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Loads `prog` with its maps programmed from [`MANIFESTS`] through the
/// reconciler (and the SNAT rows of loopback, the interface test runs come
/// from, in both families), inside `ns` when given, and runs `check` with
/// the program and the pin root.
fn with_program(prog_name: &'static str, ns: Option<&Netns>, check: impl FnOnce(BorrowedFd<'_>, &Path) + Send) {
    let bpffs = BpffsMount::new().expect("bpffs");
    let manifests = ScratchDir(std::env::temp_dir().join(format!("ptr6-manifests-{}", unique_suffix())));
    std::fs::create_dir_all(&manifests.0).expect("mkdir");
    std::fs::write(manifests.0.join("web.yaml"), MANIFESTS).expect("write");
    let root = bpffs.path().join("node");
    let dir = manifests.0.clone();
    let body = move || {
        let mut ebpf = maps::load(&root, MapSizes::default()).expect("load object");
        let snapshot = manifest::load_dir(&dir).expect("manifests");
        assert!(snapshot.errors.is_empty(), "{:?}", snapshot.errors);
        let node = NodeContext {
            node_name: "node-a".into(),
            nodeport_addresses: vec![NODE.into(), Ipv4Addr::new(192, 168, 100, 11).into()],
            service_cidrs: vec![Cidr { addr: IpAddr::V6(v6([0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0])), prefix_len: 112 }],
            ..NodeContext::default()
        };
        let desired = model::desired(&snapshot.objects, &node);
        assert!(desired.errors.is_empty(), "{:?}", desired.errors);
        let mut reconciler =
            Reconciler::new(PinnedMaps::from_ebpf(&mut ebpf, MapSizes::default()).expect("maps")).expect("dump");
        let report = reconciler.reconcile(&desired);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let snat = BTreeMap::from([
            (SnatAddrKey::new(1, FAMILY_IPV6), IpAddr::V6(NODE)),
            (SnatAddrKey::new(service_common::SNAT_HAIRPIN, FAMILY_IPV6), IpAddr::V6(NODE)),
            (SnatAddrKey::new(1, FAMILY_IPV4), IpAddr::V4(Ipv4Addr::new(192, 168, 100, 11))),
        ]);
        maps::write_snat_addrs(&root, &snat).expect("snat rows");
        let prog: &mut SchedClassifier = ebpf.program_mut(prog_name).expect("program").try_into().expect("classifier");
        prog.load().expect("verifier accepts the program");
        check(prog.fd().expect("fd").as_fd(), &root);
    };
    match ns {
        Some(ns) => ns.run_in(body),
        None => body(),
    }
    drop(manifests);
}

fn run(fd: BorrowedFd<'_>, frame: &[u8]) -> TestRunOutput {
    packet::prog_test_run(fd, frame, 1).expect("BPF_PROG_TEST_RUN")
}

fn stat(root: &Path, id: Counter) -> u64 {
    maps::read_stats(root).expect("stats")[id as usize].1
}

fn dst(out: &TestRunOutput) -> Ipv6Addr {
    packet6::parse(&out.data_out).expect("IPv6 out").dst
}

/// `frame` with its Ethernet addresses swapped: an answer sent back.
fn swapped(mut frame: Vec<u8>) -> Vec<u8> {
    let (a, b) = (frame[0..6].to_vec(), frame[6..12].to_vec());
    frame[0..6].copy_from_slice(&b);
    frame[6..12].copy_from_slice(&a);
    frame
}

/// `frame` with hop limit `hops` (what a FIB redirect leaves).
fn with_hop_limit(mut frame: Vec<u8>, hops: u8) -> Vec<u8> {
    frame[14 + 7] = hops;
    frame
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn tcp_and_udp_to_an_ipv6_cluster_ip_are_translated_both_ways_with_exact_checksums() {
    with_program(service_common::PROG_POD_INGRESS, None, |fd, root| {
        // SYN client → VIP:80 becomes client → backend:8080.
        let out = run(fd, &packet6::tcp(CLIENT, 40000, VIP, 80, SYN, b""));
        assert_eq!(out.retval, TC_ACT_OK);
        let backend = dst(&out);
        assert!(BACKENDS.contains(&backend), "{backend}");
        assert_eq!(out.data_out, packet6::tcp(CLIENT, 40000, backend, 8080, SYN, b""));
        assert!(packet6::checksum_valid(&out.data_out));
        // The reply gets the VIP back; a later packet follows conntrack.
        let out = run(fd, &packet6::tcp(backend, 8080, CLIENT, 40000, SYN_ACK, b""));
        assert_eq!((out.retval, out.data_out.clone()), (TC_ACT_OK, packet6::tcp(VIP, 80, CLIENT, 40000, SYN_ACK, b"")));
        let out = run(fd, &packet6::tcp(CLIENT, 40000, VIP, 80, ACK, b"GET / HTTP/1.1\r\n\r\n"));
        assert_eq!(out.data_out, packet6::tcp(CLIENT, 40000, backend, 8080, ACK, b"GET / HTTP/1.1\r\n\r\n"));
        assert_eq!(
            (stat(root, Counter::DnatNew), stat(root, Counter::RevNat), stat(root, Counter::DnatEstablished)),
            (1, 1, 1)
        );

        // UDP: both ways, exact; never a checksum of 0.
        let out = run(fd, &packet6::udp(CLIENT, 5000, VIP, 53, b"query"));
        assert_eq!(out.retval, TC_ACT_OK);
        let backend = dst(&out);
        assert_eq!(out.data_out, packet6::udp(CLIENT, 5000, backend, 5353, b"query"));
        let out = run(fd, &packet6::udp(backend, 5353, CLIENT, 5000, b"answer"));
        assert_eq!(out.data_out, packet6::udp(VIP, 53, CLIENT, 5000, b"answer"));
        assert!(packet6::checksum_valid(&out.data_out));

        // New flows spread over every backend, from the IPv6 slice only
        // (the IPv4 slice's endpoint never serves the IPv6 ClusterIP).
        let mut seen = std::collections::BTreeSet::new();
        for sport in 41000..41060 {
            let out = run(fd, &packet6::tcp(CLIENT, sport, VIP, 80, SYN, b""));
            seen.insert(dst(&out));
        }
        assert_eq!(seen, BACKENDS.into_iter().collect(), "every IPv6 endpoint and nothing else");
    });
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn extension_headers_are_walked_and_kept_and_fragments_follow_their_first() {
    with_program(service_common::PROG_POD_INGRESS, None, |fd, root| {
        // Hop-by-hop, destination options (16 bytes) and a routing header
        // before TCP: translated, the chain untouched, the checksum exact.
        let exts = [Ext::HopByHop, Ext::DestinationOptions { len8: 2 }, Ext::Routing];
        let syn = |to: Ipv6Addr, port: u16| {
            packet6::frame(CLIENT, to, &exts, PROTO_TCP, &packet6::tcp_segment(CLIENT, 42000, to, port, SYN, b""))
        };
        let out = run(fd, &syn(VIP, 80));
        assert_eq!(out.retval, TC_ACT_OK);
        let backend = dst(&out);
        assert_eq!(out.data_out, syn(backend, 8080));
        assert!(packet6::checksum_valid(&out.data_out));

        // An atomic fragment header (offset 0, no more fragments) is walked too.
        let atomic = |to: Ipv6Addr, port: u16| {
            let seg = packet6::udp_segment(CLIENT, 5001, to, port, b"atomic");
            packet6::frame(CLIENT, to, &[Ext::Fragment { offset8: 0, more: false }], PROTO_UDP, &seg)
        };
        let out = run(fd, &atomic(VIP, 53));
        let backend = dst(&out);
        assert_eq!(out.data_out, atomic(backend, 5353));

        // A fragmented datagram: the first fragment is translated (ports,
        // checksum: it holds the UDP header), the later one follows it by
        // the fragment identification (only its destination changes).
        let payload = [7u8; 40];
        let [first, later] = packet6::udp_fragments(CLIENT, 5002, VIP, 53, &payload, 24);
        let out_first = run(fd, &first);
        let backend = dst(&out_first);
        let [want_first, want_later] = packet6::udp_fragments(CLIENT, 5002, backend, 5353, &payload, 24);
        assert_eq!(out_first.data_out, want_first);
        let out_later = run(fd, &later);
        assert_eq!((out_later.retval, out_later.data_out), (TC_ACT_OK, want_later));
        assert_eq!(stat(root, Counter::FragmentTranslated), 1);

        // More extension headers than the walk follows: passed untouched.
        let many = [Ext::DestinationOptions { len8: 1 }; 7];
        let frame = packet6::frame(CLIENT, VIP, &many, PROTO_TCP, &packet6::tcp_segment(CLIENT, 1, VIP, 80, SYN, b""));
        let out = run(fd, &frame);
        assert_eq!((out.retval, out.data_out), (TC_ACT_OK, frame));
        assert_eq!(stat(root, Counter::PassExtensionHeaders), 1);
    });
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn ipv6_rejects_answer_with_a_tcp_rst_and_icmpv6_port_unreachable() {
    with_program(service_common::PROG_POD_INGRESS, None, |fd, root| {
        // TCP SYN to a Service without endpoints: RST+ACK from the Service
        // address, ack = seq + 1, back out of the same interface.
        let out = run(fd, &packet6::tcp(CLIENT, 40000, EMPTY_VIP, 80, SYN, b""));
        assert_eq!(out.retval, TC_ACT_REDIRECT);
        let mut rst = vec![0u8; 20];
        rst[0..2].copy_from_slice(&80u16.to_be_bytes());
        rst[2..4].copy_from_slice(&40000u16.to_be_bytes());
        rst[8..12].copy_from_slice(&1_000_001u32.to_be_bytes());
        rst[12] = 5 << 4;
        rst[13] = RST | ACK;
        let c = packet6::l4_checksum(EMPTY_VIP, CLIENT, PROTO_TCP, &rst);
        rst[16..18].copy_from_slice(&c.to_be_bytes());
        assert_eq!(out.data_out, swapped(packet6::frame(EMPTY_VIP, CLIENT, &[], PROTO_TCP, &rst)));
        assert!(packet6::checksum_valid(&out.data_out));
        assert_eq!(stat(root, Counter::RejectTcpRst), 1);

        // UDP: ICMPv6 destination unreachable / port unreachable (1/4),
        // quoting the datagram's first 48 bytes, its checksum over the
        // pseudo-header exact.
        let datagram = packet6::udp(CLIENT, 5000, EMPTY_VIP, 53, b"query that is longer than the quote");
        let out = run(fd, &datagram);
        assert_eq!(out.retval, TC_ACT_REDIRECT);
        let want = packet6::icmp6(EMPTY_VIP, CLIENT, 1, 4, 0, &datagram[14..14 + 48]);
        assert_eq!(out.data_out, swapped(want));
        assert!(packet6::checksum_valid(&out.data_out));
        assert_eq!(stat(root, Counter::RejectIcmpUnreachable), 1);

        // A ClusterIP's unserved port is rejected too; an unallocated
        // address of the IPv6 service CIDR is dropped.
        let out = run(fd, &packet6::tcp(CLIENT, 40001, VIP, 81, SYN, b""));
        assert_eq!(out.retval, TC_ACT_REDIRECT);
        let out = run(fd, &packet6::tcp(CLIENT, 40002, UNALLOCATED, 80, SYN, b""));
        assert_eq!(out.retval, TC_ACT_SHOT);
        assert_eq!(stat(root, Counter::DropUnallocatedServiceIp), 1);
    });
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn icmpv6_errors_about_a_translated_flow_are_translated_and_nd_is_never_touched() {
    with_program(service_common::PROG_POD_INGRESS, None, |fd, root| {
        // A datagram to the VIP, DNATed; the backend answers with port
        // unreachable, then a router on the way with packet too big, both
        // quoting the datagram as it arrived there: the client must get
        // them about its own datagram, from the VIP.
        let original = packet6::udp(CLIENT, 6000, VIP, 53, b"query");
        let out = run(fd, &original);
        let backend = dst(&out);
        let translated = out.data_out;
        let error = packet6::icmp6_error(backend, CLIENT, 1, 4, 0, &translated);
        let out = run(fd, &error);
        assert_eq!(out.retval, TC_ACT_OK);
        assert_eq!(out.data_out, packet6::icmp6_error(VIP, CLIENT, 1, 4, 0, &original));
        assert!(packet6::checksum_valid(&out.data_out));
        let too_big = packet6::icmp6_error(ROUTER, CLIENT, 2, 0, 1280, &translated);
        let out = run(fd, &too_big);
        assert_eq!(out.data_out, packet6::icmp6_error(ROUTER, CLIENT, 2, 0, 1280, &original));
        let exceeded = packet6::icmp6_error(ROUTER, CLIENT, 3, 0, 0, &translated);
        assert_eq!(run(fd, &exceeded).data_out, packet6::icmp6_error(ROUTER, CLIENT, 3, 0, 0, &original));
        assert_eq!(stat(root, Counter::IcmpErrorTranslated), 3);

        // Neighbour discovery, router advertisements and echo requests to
        // the VIP pass untouched.
        for frame in [
            packet6::neighbour_solicitation(CLIENT, VIP),
            packet6::router_advertisement(v6([0xfe80, 0, 0, 0, 0, 0, 0, 1])),
            packet6::icmp6(CLIENT, VIP, 128, 0, 1, b"ping"),
        ] {
            let out = run(fd, &frame);
            assert_eq!((out.retval, out.data_out), (TC_ACT_OK, frame));
        }
        assert_eq!(stat(root, Counter::PassOtherProto), 3);

        // A UDP checksum of 0 is invalid over IPv6: passed untouched, for
        // the receiver to drop, never rewritten into a wrong one.
        let mut zero = packet6::udp(CLIENT, 7000, VIP, 53, b"q");
        zero[14 + 40 + 6] = 0;
        zero[14 + 40 + 7] = 0;
        let out = run(fd, &zero);
        assert_eq!((out.retval, out.data_out), (TC_ACT_OK, zero));
        assert_eq!(stat(root, Counter::PassMalformed), 1);
        // Not UDP/TCP in the quote: an ICMPv6 error quoting an echo is
        // left alone.
        let echo = packet6::icmp6(CLIENT, VIP, 128, 0, 1, b"ping");
        let about_echo = packet6::icmp6_error(ROUTER, CLIENT, 3, 0, 0, &echo);
        assert_eq!(run(fd, &about_echo).data_out, about_echo);
    });
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn client_ip_affinity_holds_over_ipv6() {
    with_program(service_common::PROG_POD_INGRESS, None, |fd, root| {
        let first = dst(&run(fd, &packet6::tcp(CLIENT, 43000, STICKY_VIP, 80, SYN, b"")));
        for sport in 43001..43040 {
            assert_eq!(dst(&run(fd, &packet6::tcp(CLIENT, sport, STICKY_VIP, 80, SYN, b""))), first);
        }
        assert_eq!(stat(root, Counter::AffinityHit), 39);
    });
}

/// IPv6 routes as a node has them: the pod network of the other node and
/// the clients' network behind a veth, forwarding on.
fn route_like_a_node(ns: &Netns) {
    ns.ip(&["link", "set", "lo", "up"]).expect("lo");
    ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]).expect("veth");
    ns.ip(&["link", "set", "d0", "up"]).expect("d0 up");
    ns.ip(&["link", "set", "d1", "up"]).expect("d1 up");
    ns.ip(&["-6", "addr", "add", "fd00:10:244:2::1/64", "dev", "d0", "nodad"]).expect("addr");
    ns.ip(&["-6", "route", "add", "fd00:192:168:100::/64", "dev", "d0"]).expect("client route");
    ns.sysctl("net.ipv6.conf.all.forwarding=1").expect("forwarding");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn an_ipv6_nodeport_flow_to_another_node_is_masqueraded_forwarded_and_answered() {
    let ns = Netns::new(&format!("sd-ptr6-{}", unique_suffix())).expect("netns");
    route_like_a_node(&ns);
    with_program(service_common::PROG_EXTERNAL_INGRESS, Some(&ns), |fd, root| {
        let redirected = |out: &TestRunOutput, want: Vec<u8>| {
            assert_eq!(out.retval, TC_ACT_REDIRECT);
            assert_eq!(out.data_out[14..], with_hop_limit(want, 63)[14..]);
        };
        // SYN outside → node:30080 becomes node:P → backend:8080 (IPv6
        // masquerade), redirected with one hop less.
        let out = run(fd, &packet6::tcp(OUTSIDE, 40000, NODE, 30080, SYN, b""));
        let p = packet6::parse(&out.data_out).expect("parse");
        assert!((snat_ports::MIN..=snat_ports::MAX).contains(&p.sport), "{p:?}");
        let port = p.sport;
        redirected(&out, packet6::tcp(NODE, port, REMOTE_BACKEND, 8080, SYN, b""));
        assert_eq!((stat(root, Counter::DnatNew), stat(root, Counter::SnatNew)), (1, 1));
        // The SYN-ACK to node:P becomes node:30080 → outside:40000.
        let out = run(fd, &packet6::tcp(REMOTE_BACKEND, 8080, NODE, port, SYN_ACK, b""));
        redirected(&out, packet6::tcp(NODE, 30080, OUTSIDE, 40000, SYN_ACK, b""));

        // UDP, then packet too big about it from a router behind the node:
        // the client gets it about its own datagram (outer and quote).
        let original = packet6::udp(OUTSIDE, 5000, NODE, 30053, b"query!");
        let out = run(fd, &original);
        let p = packet6::parse(&out.data_out).expect("parse");
        let sent = packet6::udp(NODE, p.sport, REMOTE_BACKEND, 5353, b"query!");
        redirected(&out, sent.clone());
        let too_big = packet6::icmp6_error(ROUTER, NODE, 2, 0, 1400, &with_hop_limit(sent, 63));
        let out = run(fd, &too_big);
        assert_eq!(out.retval, TC_ACT_REDIRECT);
        // The quote is the datagram as the client sent it, but for the hop
        // it made through this node (as netfilter's NAT leaves it).
        let want = packet6::icmp6_error(ROUTER, OUTSIDE, 2, 0, 1400, &with_hop_limit(original, 63));
        assert_eq!(out.data_out[14..], with_hop_limit(want, 63)[14..]);
        assert!(packet6::checksum_valid(&out.data_out));

        // Hop limit 1: answered with ICMPv6 time exceeded from the node
        // address the client dialled, quoting its packet as it sent it.
        let mut last_hop = packet6::tcp(OUTSIDE, 40100, NODE, 30080, SYN, b"");
        last_hop[14 + 7] = 1;
        let out = run(fd, &last_hop);
        assert_eq!(out.retval, TC_ACT_REDIRECT);
        let want = packet6::icmp6(NODE, OUTSIDE, 3, 0, 0, &last_hop[14..14 + 48]);
        assert_eq!(out.data_out, swapped(want));
        assert_eq!(stat(root, Counter::DropTtlExceeded), 1);
    });
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn ipv6_packets_too_big_for_the_route_get_packet_too_big() {
    let ns = Netns::new(&format!("sd-ptr6m-{}", unique_suffix())).expect("netns");
    route_like_a_node(&ns);
    ns.ip(&["-6", "route", "add", &format!("{REMOTE_BACKEND}/128"), "dev", "d0", "mtu", "lock", "1280"])
        .expect("mtu route");
    with_program(service_common::PROG_EXTERNAL_INGRESS, Some(&ns), |fd, root| {
        let big = packet6::tcp(OUTSIDE, 40200, NODE, 30080, ACK | SYN, &[0u8; 1300]);
        // A SYN with payload opens the flow; the packet is larger than the
        // route's 1280 bytes: packet too big (2/0) with MTU 1280, from the
        // address the client dialled.
        let out = run(fd, &big);
        assert_eq!(out.retval, TC_ACT_REDIRECT);
        let want = packet6::icmp6(NODE, OUTSIDE, 2, 0, 1280, &big[14..14 + 48]);
        assert_eq!(out.data_out, swapped(want));
        assert_eq!(stat(root, Counter::DropFragNeeded), 1);
    });
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn ipv6_source_ranges_admit_only_their_prefix() {
    with_program(service_common::PROG_EXTERNAL_INGRESS, None, |fd, root| {
        // externalTrafficPolicy Local, local endpoint: no SNAT, no redirect.
        let out = run(fd, &packet6::tcp(OUTSIDE, 40000, LB_IP, 80, SYN, b""));
        assert_eq!(out.retval, TC_ACT_OK);
        assert_eq!(out.data_out, packet6::tcp(OUTSIDE, 40000, BACKENDS[0], 8080, SYN, b""));
        let stranger = v6([0xfd00, 0x192, 0x168, 0x200, 0, 0, 0, 1]);
        let out = run(fd, &packet6::tcp(stranger, 40000, LB_IP, 80, SYN, b""));
        assert_eq!(out.retval, TC_ACT_SHOT);
        assert_eq!(stat(root, Counter::DropSourceRange), 1);
    });
}
