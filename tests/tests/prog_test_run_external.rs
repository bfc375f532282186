//! Tier 2: golden packets through the real `service_external_ingress`
//! program with BPF_PROG_TEST_RUN (root): a NodePort flow to a backend on
//! another node (DNAT + SNAT), its reply, and an ICMP error about it, each
//! compared byte for byte with a frame built from scratch (so every
//! checksum, the quoted ones inside the ICMP error included, is exact).
//! Run inside a fresh network namespace: the FIB lookup the program does
//! for packets with a node-address source finds no route there, so the
//! verdict is the stack's (`TC_ACT_OK`) and deterministic.

use std::{collections::BTreeMap, net::Ipv4Addr, os::fd::AsFd as _};

use aya::programs::SchedClassifier;
use service_agent::{
    maps::{self, MapSizes, PinnedMaps},
    model::{self, NodeContext},
    reconciler::Reconciler,
    source::manifest,
};
use service_common::{snat_ports, stats};
use service_tests::{
    fixture::ManifestDir,
    netns::{BpffsMount, Netns, skip_unless_root, unique_suffix},
    packet,
};

const TC_ACT_OK: u32 = 0;
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 100);
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 11);
const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 12);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 13);

const MANIFESTS: &str = r"
apiVersion: v1
kind: Service
metadata: {name: np, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: 30053}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: np-1
  labels: {kubernetes.io/service-name: np}
addressType: IPv4
ports:
- {name: http, port: 8080}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [10.244.2.13]
  nodeName: node-b
";

#[test]
fn a_nodeport_flow_to_another_node_is_dnated_snated_reversed_and_its_icmp_errors_translated() {
    if skip_unless_root() {
        return;
    }
    let ns = Netns::new(&format!("sd-ptr-{}", unique_suffix())).expect("netns");
    let bpffs = BpffsMount::new().expect("bpffs");
    let manifests = ManifestDir::new();
    manifests.write("np.yaml", MANIFESTS);
    let root = bpffs.path().join("node");
    let dir = manifests.path().to_owned();
    ns.run_in(move || {
        let mut ebpf = maps::load(&root, MapSizes::default()).expect("load object");
        let snapshot = manifest::load_dir(&dir).expect("manifests");
        let node =
            NodeContext { node_name: "node-a".into(), nodeport_addresses: vec![NODE.into()], ..NodeContext::default() };
        let mut reconciler =
            Reconciler::new(PinnedMaps::from_ebpf(&mut ebpf, MapSizes::default()).expect("maps")).expect("dump");
        assert!(reconciler.reconcile(&model::desired(&snapshot.objects, &node)).errors.is_empty());
        // BPF_PROG_TEST_RUN's skb comes from loopback (ifindex 1).
        maps::write_snat_addrs(&root, &BTreeMap::from([(1, NODE)])).expect("snat row");
        let prog: &mut SchedClassifier =
            ebpf.program_mut(service_common::PROG_EXTERNAL_INGRESS).expect("program").try_into().expect("classifier");
        prog.load().expect("verifier accepts the program");
        let fd = prog.fd().expect("fd").as_fd().try_clone_to_owned().expect("fd");
        let run = |frame: &[u8]| packet::prog_test_run(fd.as_fd(), frame, 1).expect("BPF_PROG_TEST_RUN");
        let stat = |id: u32| maps::read_stats(&root).expect("stats")[id as usize].1;

        // TCP SYN client → node:30080 becomes node:P → backend:8080, P in
        // the SNAT range.
        let out = run(&packet::tcp_v4(CLIENT, 40000, NODE, 30080, 0x02, b""));
        assert_eq!(out.retval, TC_ACT_OK);
        let p = packet::parse(&out.data_out).expect("parse");
        assert!((snat_ports::MIN..=snat_ports::MAX).contains(&p.sport), "{p:?}");
        let snat_port = p.sport;
        assert_eq!(out.data_out, packet::tcp_v4(NODE, snat_port, BACKEND, 8080, 0x02, b""));
        assert_eq!((stat(stats::DNAT_NEW), stat(stats::SNAT_NEW)), (1, 1));
        // The backend's SYN-ACK to node:P becomes node:30080 → client:40000.
        let out = run(&packet::tcp_v4(BACKEND, 8080, NODE, snat_port, 0x12, b""));
        assert_eq!(out.retval, TC_ACT_OK);
        assert_eq!(out.data_out, packet::tcp_v4(NODE, 30080, CLIENT, 40000, 0x12, b""));
        // The next client packet follows the same translation.
        let out = run(&packet::tcp_v4(CLIENT, 40000, NODE, 30080, 0x10, b"GET /"));
        assert_eq!(out.data_out, packet::tcp_v4(NODE, snat_port, BACKEND, 8080, 0x10, b"GET /"));

        // UDP: the datagram as it left this node, then a "fragmentation
        // needed" about it from a router behind the node: translated into
        // the error the client expects for its own datagram.
        let out = run(&packet::udp_v4(CLIENT, 5000, NODE, 30053, b"query!"));
        let p = packet::parse(&out.data_out).expect("parse");
        let sent = packet::udp_v4(NODE, p.sport, BACKEND, 5353, b"query!");
        assert_eq!(out.data_out, sent);
        let icmp = packet::icmp_frag_needed_v4(ROUTER, NODE, 1000, &sent);
        let out = run(&icmp);
        assert_eq!(out.retval, TC_ACT_OK);
        let client_sent = packet::udp_v4(CLIENT, 5000, NODE, 30053, b"query!");
        assert_eq!(
            out.data_out,
            packet::icmp_frag_needed_v4(ROUTER, CLIENT, 1000, &client_sent),
            "outer destination, quoted addresses, ports and every checksum"
        );
        // An error sent by the backend itself: its address (the quoted
        // destination) becomes the NodePort's too.
        let unreachable = packet::icmp_frag_needed_v4(BACKEND, NODE, 0, &sent);
        let out = run(&unreachable);
        assert_eq!(out.data_out, packet::icmp_frag_needed_v4(NODE, CLIENT, 0, &client_sent));
        assert_eq!(stat(stats::ICMP_ERROR_TRANSLATED), 2);
        // An ICMP error about no flow of ours passes untouched.
        let unrelated = packet::icmp_frag_needed_v4(ROUTER, NODE, 1000, &packet::udp_v4(NODE, 1, CLIENT, 2, b"xy"));
        let out = run(&unrelated);
        assert_eq!(out.data_out, unrelated);
    });
}
