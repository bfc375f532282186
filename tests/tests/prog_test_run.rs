//! Tier 2: golden packets through the real `service_pod_ingress` program
//! with BPF_PROG_TEST_RUN (root). The maps are filled by the agent's own
//! source → model → reconciler from YAML; each crafted frame goes in and the
//! exact expected frame (every field, both checksums) must come out.

use std::{net::Ipv4Addr, os::fd::AsFd as _, path::PathBuf};

use aya::{Ebpf, programs::SchedClassifier};
use service_agent::{
    maps::{self, MapSizes, MapState, PinnedMaps},
    model::{self, NodeContext},
    reconciler::Reconciler,
    rows::frontend_key,
    source::manifest,
};
use service_common::{addr_v4, hash, port_be, stats::Counter};
use service_tests::{
    fixture::{TEST_RUN_IFINDEX, interface_stat},
    netns::BpffsMount,
    packet::{self, TestRunOutput},
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const LOCAL_POLICY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const STICKY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const BACKENDS: [Ipv4Addr; 3] =
    [Ipv4Addr::new(10, 244, 1, 11), Ipv4Addr::new(10, 244, 1, 12), Ipv4Addr::new(10, 244, 2, 13)];

const MANIFESTS: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [10.244.1.11]
- addresses: [10.244.1.12]
- addresses: [10.244.2.13]
---
apiVersion: v1
kind: Service
metadata: {name: no-endpoints, namespace: default}
spec:
  clusterIP: 10.96.0.20
  ports:
  - {name: http, port: 80}
  - {name: dns, port: 53, protocol: UDP}
---
# internalTrafficPolicy Local, but the only endpoint is on another node.
apiVersion: v1
kind: Service
metadata: {name: remote-only, namespace: default}
spec:
  clusterIP: 10.96.0.30
  internalTrafficPolicy: Local
  ports:
  - {port: 80, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: remote-only-1
  labels: {kubernetes.io/service-name: remote-only}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: [10.244.2.13]
  nodeName: node-b
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  clusterIP: 10.96.0.40
  sessionAffinity: ClientIP
  ports:
  - {port: 80, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: sticky-1
  labels: {kubernetes.io/service-name: sticky}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: [10.244.1.11]
- addresses: [10.244.1.12]
- addresses: [10.244.2.13]
---
apiVersion: v1
kind: Service
metadata: {name: signalling, namespace: default}
spec:
  clusterIP: 10.96.0.50
  ports:
  - {port: 36412, protocol: SCTP, targetPort: 36412}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: signalling-1
  labels: {kubernetes.io/service-name: signalling}
addressType: IPv4
ports: [{port: 36412, protocol: SCTP}]
endpoints:
- addresses: [10.244.1.12]
---
# A second SCTP Service with the same backend: a client port used for both
# clashes on the reply tuple, and SCTP's ports are never translated.
apiVersion: v1
kind: Service
metadata: {name: signalling-b, namespace: default}
spec:
  clusterIP: 10.96.0.51
  ports:
  - {port: 36412, protocol: SCTP, targetPort: 36412}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: signalling-b-1
  labels: {kubernetes.io/service-name: signalling-b}
addressType: IPv4
ports: [{port: 36412, protocol: SCTP}]
endpoints:
- addresses: [10.244.1.12]
---
# Two Services with one and the same backend: a client port used for both
# clashes on the reply tuple.
apiVersion: v1
kind: Service
metadata: {name: clash-a, namespace: default}
spec:
  clusterIP: 10.96.0.61
  ports:
  - {port: 80, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: clash-a-1
  labels: {kubernetes.io/service-name: clash-a}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: [10.244.1.11]
---
apiVersion: v1
kind: Service
metadata: {name: clash-b, namespace: default}
spec:
  clusterIP: 10.96.0.62
  ports:
  - {port: 80, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: clash-b-1
  labels: {kubernetes.io/service-name: clash-b}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: [10.244.1.11]
";

/// The loaded program with maps programmed through the reconciler.
struct Fixture {
    ebpf: Ebpf,
    applied: MapState,
    root: PathBuf,
    _manifests: ScratchDir,
    _bpffs: BpffsMount,
}

struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Fixture {
    fn new() -> Self {
        let bpffs = BpffsMount::new().expect("mount bpffs");
        let root = bpffs.path().join("node");
        let manifests =
            ScratchDir(std::env::temp_dir().join(format!("ptr-manifests-{}", service_tests::netns::unique_suffix())));
        std::fs::create_dir_all(&manifests.0).expect("mkdir");
        std::fs::write(manifests.0.join("web.yaml"), MANIFESTS).expect("write");

        let mut ebpf = maps::load(&root, MapSizes::default()).expect("load object");
        let snapshot = manifest::load_dir(&manifests.0).expect("manifests");
        assert!(snapshot.errors.is_empty(), "{:?}", snapshot.errors);
        let desired =
            model::desired(&snapshot.objects, &NodeContext { node_name: "node-a".into(), ..NodeContext::default() });
        let mut reconciler =
            Reconciler::new(PinnedMaps::from_ebpf(&mut ebpf, MapSizes::default()).expect("maps")).expect("dump");
        let report = reconciler.reconcile(&desired);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let applied = reconciler.programmed().clone();
        let prog: &mut SchedClassifier =
            ebpf.program_mut(service_common::PROG_POD_INGRESS).expect("program").try_into().expect("classifier");
        prog.load().expect("verifier accepts the program");
        Self { ebpf, applied, root, _manifests: manifests, _bpffs: bpffs }
    }

    fn run(&self, frame: &[u8]) -> TestRunOutput {
        let prog: &SchedClassifier =
            self.ebpf.program(service_common::PROG_POD_INGRESS).expect("program").try_into().expect("classifier");
        packet::prog_test_run(prog.fd().expect("fd").as_fd(), frame, 1).expect("BPF_PROG_TEST_RUN")
    }

    fn stat(&self, id: Counter) -> u64 {
        maps::read_stats(&self.root).expect("stats")[id as usize].1
    }

    /// Counter `id` of the interface test runs enter on.
    fn iface_stat(&self, id: Counter) -> u64 {
        interface_stat(&self.root, TEST_RUN_IFINDEX, id)
    }

    /// The backend the program must pick for a flow: the same hash and the
    /// same table, read from what the reconciler applied.
    fn expected_backend(&self, sport: u16, dport: u16, proto: u8) -> Ipv4Addr {
        let frontend = model::Frontend {
            addr: VIP.into(),
            port: dport,
            protocol: if proto == service_common::PROTO_TCP { model::Protocol::Tcp } else { model::Protocol::Udp },
            scope: model::Scope::Internal,
        };
        let key0 = frontend_key(&frontend);
        let svc = self.applied.services[&key0];
        let h =
            hash::flow_hash(&addr_v4(CLIENT.octets()), &addr_v4(VIP.octets()), port_be(sport), port_be(dport), proto);
        let slot = hash::slot_for(h, svc.count);
        let table = self.applied.table_of(&svc).expect("the frontend's table");
        let b = self.applied.backends[&table.slots[slot as usize - 1]];
        Ipv4Addr::new(b.addr[0], b.addr[1], b.addr[2], b.addr[3])
    }
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const SYN_ACK: u8 = 0x12;

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn tcp_to_a_cluster_ip_is_dnated_and_the_reply_reverse_nated_with_exact_checksums() {
    let f = Fixture::new();
    let backend = f.expected_backend(40000, 80, service_common::PROTO_TCP);
    assert!(BACKENDS.contains(&backend));

    // SYN client → VIP:80 becomes client → backend:8080, nothing else changes.
    let syn = packet::tcp_v4(CLIENT, 40000, VIP, 80, SYN, b"");
    let out = f.run(&syn);
    assert_eq!(out.retval, TC_ACT_OK);
    let expected = packet::tcp_v4(CLIENT, 40000, backend, 8080, SYN, b"");
    assert_eq!(out.data_out, expected, "DNATed SYN differs from the expected frame");
    assert!(packet::checksums_valid(&out.data_out));
    assert_eq!(f.stat(Counter::DnatNew), 1);

    // The backend's SYN-ACK gets the VIP back as its source.
    let reply = packet::tcp_v4(backend, 8080, CLIENT, 40000, SYN_ACK, b"");
    let out = f.run(&reply);
    assert_eq!(out.retval, TC_ACT_OK);
    assert_eq!(out.data_out, packet::tcp_v4(VIP, 80, CLIENT, 40000, SYN_ACK, b""));
    assert_eq!(f.stat(Counter::RevNat), 1);

    // A later packet with payload follows conntrack to the same backend.
    let data = packet::tcp_v4(CLIENT, 40000, VIP, 80, ACK, b"GET / HTTP/1.1\r\n\r\n");
    let out = f.run(&data);
    assert_eq!(out.retval, TC_ACT_OK);
    assert_eq!(out.data_out, packet::tcp_v4(CLIENT, 40000, backend, 8080, ACK, b"GET / HTTP/1.1\r\n\r\n"));
    assert_eq!(f.stat(Counter::DnatEstablished), 1);

    // Per interface: the new flow is counted for the interface it entered
    // on; the fast path (established flows, replies) adds no row.
    assert_eq!(f.iface_stat(Counter::DnatNew), 1);
    assert_eq!(f.iface_stat(Counter::RevNat), 0);
    assert_eq!(f.iface_stat(Counter::DnatEstablished), 0);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn new_flows_spread_over_every_backend() {
    let f = Fixture::new();
    let mut seen = std::collections::BTreeSet::new();
    for sport in 41000..41060 {
        let out = f.run(&packet::tcp_v4(CLIENT, sport, VIP, 80, SYN, b""));
        assert_eq!(out.retval, TC_ACT_OK);
        let parsed = packet::parse(&out.data_out).expect("parse");
        assert_eq!(parsed.ip_dst, f.expected_backend(sport, 80, service_common::PROTO_TCP));
        seen.insert(parsed.ip_dst);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn udp_is_translated_both_ways_and_a_zero_checksum_stays_zero() {
    let f = Fixture::new();
    let backend = f.expected_backend(5000, 53, service_common::PROTO_UDP);
    let out = f.run(&packet::udp_v4(CLIENT, 5000, VIP, 53, b"query"));
    assert_eq!(out.retval, TC_ACT_OK);
    assert_eq!(out.data_out, packet::udp_v4(CLIENT, 5000, backend, 5353, b"query"));

    let out = f.run(&packet::udp_v4(backend, 5353, CLIENT, 5000, b"answer"));
    assert_eq!(out.retval, TC_ACT_OK);
    assert_eq!(out.data_out, packet::udp_v4(VIP, 53, CLIENT, 5000, b"answer"));

    let backend = f.expected_backend(5001, 53, service_common::PROTO_UDP);
    let out = f.run(&packet::udp_v4_no_checksum(CLIENT, 5001, VIP, 53, b"query"));
    assert_eq!(out.retval, TC_ACT_OK);
    assert_eq!(out.data_out, packet::udp_v4_no_checksum(CLIENT, 5001, backend, 5353, b"query"));
}

/// The same frame with IHL 4 (16 bytes), which no valid IPv4 header has.
fn bad_ihl(mut frame: Vec<u8>) -> Vec<u8> {
    frame[14] = 0x44;
    frame
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn packets_not_for_a_service_come_out_byte_identical() {
    let f = Fixture::new();
    let cases: Vec<(&str, Vec<u8>, Counter)> = vec![
        ("pod-to-pod TCP", packet::tcp_v4(CLIENT, 40000, BACKENDS[0], 8080, SYN, b""), Counter::PassNoService),
        (
            "an address no Service has",
            packet::tcp_v4(CLIENT, 40000, Ipv4Addr::new(192, 0, 2, 77), 81, SYN, b""),
            Counter::PassNoService,
        ),
        ("ARP", packet::arp_request(CLIENT, VIP), Counter::PassNotIp),
        (
            "non-first fragment to the VIP",
            packet::ipv4_fragment(CLIENT, VIP, 185, b"middle of a datagram"),
            Counter::PassFragment,
        ),
        (
            "truncated TCP header",
            packet::tcp_v4(CLIENT, 40000, VIP, 80, SYN, b"")[..36].to_vec(),
            Counter::PassMalformed,
        ),
        (
            "IPv4 header length below 20 bytes",
            bad_ihl(packet::tcp_v4(CLIENT, 40000, VIP, 80, SYN, b"")),
            Counter::PassMalformed,
        ),
    ];
    for (what, frame, counter) in cases {
        let before = f.stat(counter);
        let out = f.run(&frame);
        assert_eq!(out.retval, TC_ACT_OK, "{what}");
        assert_eq!(out.data_out, frame, "{what} was modified");
        assert_eq!(f.stat(counter), before + 1, "{what} not counted");
    }
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn a_cluster_ip_rejects_a_port_it_does_not_serve() {
    // kube-proxy's nftables mode: a ClusterIP's unserved port or protocol
    // is refused, not left to time out.
    let f = Fixture::new();
    let out = f.run(&packet::tcp_v4(CLIENT, 40000, VIP, 81, SYN, b""));
    assert_eq!(out.retval, TC_ACT_REDIRECT, "an RST back out of the pod interface");
    let p = packet::parse(&out.data_out).expect("parse");
    assert_eq!((p.ip_src, p.ip_dst, p.sport, p.dport), (VIP, CLIENT, 81, 40000));
    assert_eq!(out.data_out[34 + 13], 0x14, "RST+ACK");
    assert!(packet::checksums_valid(&out.data_out));
    assert_eq!(f.stat(Counter::RejectTcpRst), 1);
    let out = f.run(&packet::udp_v4(CLIENT, 40001, VIP, 80, b"q"));
    assert_eq!(out.retval, TC_ACT_REDIRECT, "port 80 is TCP only: ICMP port unreachable");
    assert_eq!(f.stat(Counter::RejectIcmpUnreachable), 1);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn a_service_without_endpoints_rejects_tcp_with_an_exact_rst() {
    let f = Fixture::new();
    let syn = packet::tcp_v4(CLIENT, 40000, EMPTY_VIP, 80, SYN, b"");
    let out = f.run(&syn);
    assert_eq!(out.retval, TC_ACT_REDIRECT, "the RST goes back out of the pod interface");
    let rst = &out.data_out;
    assert_eq!(rst.len(), 54);
    assert_eq!(&rst[0..6], &syn[6..12], "addressed to the client's MAC");
    assert_eq!(&rst[6..12], &syn[0..6]);
    let p = packet::parse(rst).expect("parse");
    assert_eq!((p.ip_src, p.ip_dst, p.proto, p.sport, p.dport), (EMPTY_VIP, CLIENT, 6, 80, 40000));
    let tcp = &rst[34..54];
    assert_eq!(tcp[13], 0x14, "RST+ACK");
    assert_eq!(u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]), 0, "SEQ=0");
    assert_eq!(u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]), 1_000_001, "ACK=SEG.SEQ+1 for a SYN");
    assert!(packet::checksums_valid(rst), "IP and TCP checksums");
    assert_eq!(f.stat(Counter::RejectTcpRst), 1);

    // An ACK segment gets <SEQ=SEG.ACK><CTL=RST>; an RST is never answered.
    let out = f.run(&packet::tcp_v4(CLIENT, 40001, EMPTY_VIP, 80, ACK, b"data"));
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    assert_eq!(out.data_out[34 + 13], 0x04);
    assert_eq!(&out.data_out[34 + 4..34 + 8], &2_000_000u32.to_be_bytes());
    assert!(packet::checksums_valid(&out.data_out));
    assert_eq!((f.stat(Counter::RejectTcpRst), f.iface_stat(Counter::RejectTcpRst)), (2, 2));
    let out = f.run(&packet::tcp_v4(CLIENT, 40002, EMPTY_VIP, 80, 0x04, b""));
    assert_eq!(out.retval, TC_ACT_SHOT);
    // Dropped unanswered, and counted as that, not as a reject.
    assert_eq!(f.stat(Counter::DropRejectUnanswered), 1);
    assert_eq!(f.iface_stat(Counter::DropRejectUnanswered), 1);
    assert_eq!(f.stat(Counter::RejectTcpRst), 2);

    // A SYN whose TCP header is cut short after its checksum (18 bytes):
    // the parse has what a translation needs, the RST needs the whole
    // header, and reading it back fails (bpf_skb_load_bytes past skb->len).
    let short = packet::tcp_v4(CLIENT, 40003, EMPTY_VIP, 80, SYN, b"")[..14 + 20 + 18].to_vec();
    let out = f.run(&short);
    assert_eq!(out.retval, TC_ACT_SHOT);
    assert_eq!((f.stat(Counter::DropLoad), f.iface_stat(Counter::DropLoad)), (1, 1));
    assert_eq!(f.stat(Counter::RejectTcpRst), 2);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn a_service_without_endpoints_rejects_udp_with_icmp_port_unreachable() {
    let f = Fixture::new();
    let query = packet::udp_v4(CLIENT, 5000, EMPTY_VIP, 53, b"q");
    let out = f.run(&query);
    assert_eq!(out.retval, TC_ACT_REDIRECT);
    let icmp = &out.data_out;
    assert_eq!(icmp.len(), 14 + 20 + 8 + 28);
    assert_eq!(&icmp[0..6], &query[6..12]);
    assert_eq!(icmp[14 + 9], 1, "ICMP");
    assert_eq!(&icmp[26..30], &EMPTY_VIP.octets(), "from the Service address, as kube-proxy's REJECT");
    assert_eq!(&icmp[30..34], &CLIENT.octets());
    assert_eq!(packet::checksum(&icmp[14..34]), 0, "IP header checksum");
    assert_eq!((icmp[34], icmp[35]), (3, 3), "destination unreachable, port unreachable");
    assert_eq!(packet::checksum(&icmp[34..]), 0, "ICMP checksum");
    assert_eq!(&icmp[42..70], &query[14..42], "quotes the datagram's IP header and first 8 bytes");
    assert_eq!(f.stat(Counter::RejectIcmpUnreachable), 1);

    // A datagram with IP options gets no answer (the quote would not be
    // its header and 8 bytes): a drop of its own reason, not a reject.
    let with_options = packet::with_ip_options(&packet::udp_v4(CLIENT, 5001, EMPTY_VIP, 53, b"q"));
    assert!(packet::checksums_valid(&with_options));
    let out = f.run(&with_options);
    assert_eq!(out.retval, TC_ACT_SHOT);
    assert_eq!(f.stat(Counter::DropRejectUnanswered), 1);
    assert_eq!(f.iface_stat(Counter::DropRejectUnanswered), 1);
    assert_eq!(f.stat(Counter::RejectIcmpUnreachable), 1);
    assert_eq!(f.iface_stat(Counter::RejectIcmpUnreachable), 1);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn sctp_to_a_cluster_ip_is_dnated_with_its_crc32c_intact() {
    // The kernel here has no SCTP stack, so no netns test can carry real
    // SCTP; the program's SCTP path is shown on crafted packets.
    let f = Fixture::new();
    let vip = Ipv4Addr::new(10, 96, 0, 50);
    let init = packet::sctp_init_v4(CLIENT, 38412, vip, 36412);
    let out = f.run(&init);
    assert_eq!(out.retval, TC_ACT_OK);
    let expected = packet::sctp_init_v4(CLIENT, 38412, BACKENDS[1], 36412);
    assert_eq!(out.data_out, expected, "only the destination and the IP checksum change");
    let reply = packet::sctp_init_v4(BACKENDS[1], 36412, CLIENT, 38412);
    let out = f.run(&reply);
    assert_eq!(out.data_out, packet::sctp_init_v4(vip, 36412, CLIENT, 38412));
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn an_sctp_flow_whose_reply_tuple_is_taken_is_dropped_as_drop_sctp_tuple_taken() {
    let f = Fixture::new();
    let (a, b) = (Ipv4Addr::new(10, 96, 0, 50), Ipv4Addr::new(10, 96, 0, 51));
    let out = f.run(&packet::sctp_init_v4(CLIENT, 38500, a, 36412));
    assert_eq!((out.retval, out.data_out), (TC_ACT_OK, packet::sctp_init_v4(CLIENT, 38500, BACKENDS[1], 36412)));
    // The same client port to the other Service with the same backend:
    // the reply tuple (backend:36412 → client:38500) is the first flow's,
    // and SCTP's port cannot be remapped (its CRC32c covers it).
    let out = f.run(&packet::sctp_init_v4(CLIENT, 38500, b, 36412));
    assert_eq!(out.retval, TC_ACT_SHOT);
    assert_eq!(f.stat(Counter::DropSctpTupleTaken), 1);
    assert_eq!(f.iface_stat(Counter::DropSctpTupleTaken), 1);
    assert_eq!(f.stat(Counter::DropSnatNoPort), 0, "no longer hidden in the SNAT port counter");
    // Another client port is free.
    let out = f.run(&packet::sctp_init_v4(CLIENT, 38501, b, 36412));
    assert_eq!((out.retval, out.data_out), (TC_ACT_OK, packet::sctp_init_v4(CLIENT, 38501, BACKENDS[1], 36412)));
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn a_local_policy_without_a_local_endpoint_drops_silently() {
    let f = Fixture::new();
    let out = f.run(&packet::tcp_v4(CLIENT, 40000, LOCAL_POLICY_VIP, 80, SYN, b""));
    assert_eq!(out.retval, TC_ACT_SHOT);
    assert_eq!(f.stat(Counter::DropNoLocalBackend), 1);
    assert_eq!(f.stat(Counter::RejectTcpRst), 0);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn client_ip_affinity_sends_every_new_flow_of_a_client_to_one_backend() {
    let f = Fixture::new();
    let mut backends = std::collections::BTreeSet::new();
    for sport in 42000..42020 {
        let out = f.run(&packet::tcp_v4(CLIENT, sport, STICKY_VIP, 80, SYN, b""));
        assert_eq!(out.retval, TC_ACT_OK);
        backends.insert(packet::parse(&out.data_out).expect("parse").ip_dst);
    }
    assert_eq!(backends.len(), 1, "{backends:?}");
    assert_eq!(f.stat(Counter::AffinityHit), 19);
    // Another client is hashed on its own.
    let other = Ipv4Addr::new(10, 244, 1, 99);
    let out = f.run(&packet::tcp_v4(other, 42000, STICKY_VIP, 80, SYN, b""));
    assert_eq!(out.retval, TC_ACT_OK);
}

/// `cargo xtask build-ebpf` leaves the object where bpftool and packaging
/// find it (xtask passes its path): an eBPF ELF with the classifier and
/// the BTF of the map types.
#[test]
fn build_ebpf_leaves_an_object_bpftool_understands() {
    let Some(path) = std::env::var_os("SERVICE_EBPF_OBJECT") else {
        eprintln!("skipped: SERVICE_EBPF_OBJECT is set by `cargo xtask test`");
        return;
    };
    let bytes = std::fs::read(&path).expect("object");
    assert_eq!(&bytes[..4], b"\x7fELF");
    // e_machine EM_BPF (247), little-endian.
    assert_eq!(u16::from_le_bytes([bytes[18], bytes[19]]), 247);
    let out = std::process::Command::new("bpftool").args(["btf", "dump", "file"]).arg(&path).output().expect("bpftool");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let btf = String::from_utf8_lossy(&out.stdout);
    for ty in ["'ServiceKey'", "'CtValue'", "'service_pod_ingress'"] {
        assert!(btf.contains(ty), "no {ty} in the object's BTF");
    }
}

const FIN_ACK: u8 = 0x11;

/// The state names of the entry for `key`'s tuple and the table it is in.
fn entry(
    f: &Fixture,
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
) -> Option<(&'static str, Vec<&'static str>)> {
    let key = service_common::CtKey {
        saddr: addr_v4(src.octets()),
        daddr: addr_v4(dst.octets()),
        sport: port_be(sport),
        dport: port_be(dport),
        proto: service_common::PROTO_TCP,
        family: service_common::FAMILY_IPV4,
        _pad: [0; 2],
    };
    let names = |state: u8| {
        service_common::conntrack::state::NAMES.iter().filter(|(bit, _)| state & bit != 0).map(|(_, n)| *n).collect()
    };
    if let Some(v) = maps::read_conntrack(&f.root).expect("conntrack").get(&key) {
        return Some(("conntrack", names(v.state)));
    }
    maps::read_conntrack_new(&f.root).expect("conntrack_new").get(&key).map(|v| ("conntrack_new", names(v.state)))
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn tcp_flows_follow_netfilter_states_and_a_syn_on_a_closed_flow_starts_afresh() {
    let f = Fixture::new();
    let backend = f.expected_backend(40100, 80, service_common::PROTO_TCP);
    let run_ok = |frame: Vec<u8>| assert_eq!(f.run(&frame).retval, TC_ACT_OK);
    run_ok(packet::tcp_v4(CLIENT, 40100, VIP, 80, SYN, b""));
    assert_eq!(entry(&f, CLIENT, 40100, VIP, 80), Some(("conntrack_new", vec![])), "SYN_SENT, not assured");
    run_ok(packet::tcp_v4(backend, 8080, CLIENT, 40100, SYN_ACK, b""));
    assert_eq!(entry(&f, CLIENT, 40100, VIP, 80), Some(("conntrack_new", vec!["seen-reply"])), "SYN_RECV");
    run_ok(packet::tcp_v4(CLIENT, 40100, VIP, 80, ACK, b""));
    // The handshake completed: both entries moved to the assured table.
    assert_eq!(entry(&f, CLIENT, 40100, VIP, 80), Some(("conntrack", vec!["seen-reply", "assured"])));
    assert_eq!(entry(&f, backend, 8080, CLIENT, 40100), Some(("conntrack", vec!["seen-reply", "assured"])));
    assert_eq!(f.stat(Counter::CtAssured), 1);
    // The client closes; the backend keeps sending (half-closed) and is
    // still translated; then it closes too.
    run_ok(packet::tcp_v4(CLIENT, 40100, VIP, 80, FIN_ACK, b""));
    let out = f.run(&packet::tcp_v4(backend, 8080, CLIENT, 40100, ACK, b"more data"));
    assert_eq!(out.data_out, packet::tcp_v4(VIP, 80, CLIENT, 40100, ACK, b"more data"), "half-closed: translated");
    run_ok(packet::tcp_v4(backend, 8080, CLIENT, 40100, FIN_ACK, b""));
    assert_eq!(
        entry(&f, CLIENT, 40100, VIP, 80),
        Some(("conntrack", vec!["seen-reply", "assured", "fin-original", "fin-reply"]))
    );
    // The same client port opens a new connection: a fresh flow, not the
    // closed one's state.
    let out = f.run(&packet::tcp_v4(CLIENT, 40100, VIP, 80, SYN, b""));
    assert_eq!(out.data_out, packet::tcp_v4(CLIENT, 40100, backend, 8080, SYN, b""));
    assert_eq!(f.stat(Counter::CtReplaced), 1);
    assert_eq!(entry(&f, CLIENT, 40100, VIP, 80), Some(("conntrack_new", vec![])));
    assert_eq!(entry(&f, backend, 8080, CLIENT, 40100), Some(("conntrack_new", vec![])));
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn a_reply_tuple_held_by_a_live_flow_gets_the_new_flows_source_port_remapped() {
    let f = Fixture::new();
    let (a, b, backend) = (Ipv4Addr::new(10, 96, 0, 61), Ipv4Addr::new(10, 96, 0, 62), Ipv4Addr::new(10, 244, 1, 11));
    let out = f.run(&packet::tcp_v4(CLIENT, 40200, a, 80, SYN, b""));
    assert_eq!(out.data_out, packet::tcp_v4(CLIENT, 40200, backend, 8080, SYN, b""));
    // Same client port, other Service, same backend: the reply tuple
    // (backend:8080 → client:40200) is taken, so the source port moves.
    let out = f.run(&packet::tcp_v4(CLIENT, 40200, b, 80, SYN, b""));
    assert_eq!(out.retval, TC_ACT_OK);
    let second = packet::parse(&out.data_out).expect("parse");
    assert_eq!((second.ip_src, second.ip_dst, second.dport), (CLIENT, backend, 8080));
    assert_ne!(second.sport, 40200);
    assert!(second.sport >= service_common::snat_ports::REMAP_MIN);
    assert_eq!(out.data_out, packet::tcp_v4(CLIENT, second.sport, backend, 8080, SYN, b""), "exact checksums");
    assert_eq!(f.stat(Counter::NatClashRemapped), 1);
    // Each connection's replies come back from its own Service, to the
    // client's own port.
    let out = f.run(&packet::tcp_v4(backend, 8080, CLIENT, 40200, SYN_ACK, b""));
    assert_eq!(out.data_out, packet::tcp_v4(a, 80, CLIENT, 40200, SYN_ACK, b""));
    let out = f.run(&packet::tcp_v4(backend, 8080, CLIENT, second.sport, SYN_ACK, b""));
    assert_eq!(out.data_out, packet::tcp_v4(b, 80, CLIENT, 40200, SYN_ACK, b""));
    // And the client's later packets keep their translations.
    let out = f.run(&packet::tcp_v4(CLIENT, 40200, b, 80, ACK, b"x"));
    assert_eq!(out.data_out, packet::tcp_v4(CLIENT, second.sport, backend, 8080, ACK, b"x"));
    let out = f.run(&packet::tcp_v4(CLIENT, 40200, a, 80, ACK, b"y"));
    assert_eq!(out.data_out, packet::tcp_v4(CLIENT, 40200, backend, 8080, ACK, b"y"));
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn every_fragment_of_a_datagram_follows_its_first_fragment_both_ways() {
    let f = Fixture::new();
    let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let backend = f.expected_backend(5300, 53, service_common::PROTO_UDP);
    let (first, rest) = packet::udp_v4_fragments(CLIENT, 5300, VIP, 53, &payload, 1480);
    let (want_first, want_rest) = packet::udp_v4_fragments(CLIENT, 5300, backend, 5353, &payload, 1480);
    let out = f.run(&first);
    assert_eq!(out.retval, TC_ACT_OK, "the first fragment of a Service flow is translated");
    assert_eq!(out.data_out, want_first, "first fragment: ports, addresses, the datagram's checksum");
    let out = f.run(&rest);
    assert_eq!(out.retval, TC_ACT_OK);
    assert_eq!(out.data_out, want_rest, "later fragment: addresses and the IP checksum");
    // The answer, fragmented too.
    let (first, rest) = packet::udp_v4_fragments(backend, 5353, CLIENT, 5300, &payload, 1480);
    let (want_first, want_rest) = packet::udp_v4_fragments(VIP, 53, CLIENT, 5300, &payload, 1480);
    assert_eq!(f.run(&first).data_out, want_first);
    assert_eq!(f.run(&rest).data_out, want_rest);
    assert_eq!(f.stat(Counter::FragmentTranslated), 2);
    // A later fragment whose first fragment never came passes untouched.
    let (_, stray) = packet::udp_v4_fragments(CLIENT, 5301, Ipv4Addr::new(10, 96, 0, 99), 53, &payload, 1480);
    let out = f.run(&stray);
    assert_eq!((out.retval, &out.data_out), (TC_ACT_OK, &stray));
}
