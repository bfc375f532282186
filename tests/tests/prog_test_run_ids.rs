//! Tier 2 (root): what a stale id or a shared frontend address must never
//! do, through the real `service_pod_ingress` program with
//! BPF_PROG_TEST_RUN, its maps programmed by the agent's own manifest →
//! model → reconciler and reprogrammed between frames:
//!
//! - `loadBalancerSourceRanges` are per frontend protocol and family: an
//!   IPv6 range does not open an IPv4 Service, and two Services sharing a
//!   LoadBalancer IP for TCP and UDP keep their own ranges;
//! - a ClientIP affinity entry is followed only to a backend still in the
//!   frontend's set (not to one removed from it that another Service still
//!   uses), and the set's member list is searched right wherever the id
//!   sits in it (a set of 300 backends, whose list spans 19 blocks);
//! - ClientIP affinity is kept per Service port, as kube-proxy keeps it: a
//!   client that reached the ClusterIP keeps its endpoint through the
//!   port's NodePort, LoadBalancer IP and external IP;
//! - a packet of an old flow whose frontend and backend are gone re-creates
//!   no counter for their ids.

use std::{net::Ipv4Addr, os::fd::AsFd as _, path::PathBuf, time::Duration};

use aya::{Ebpf, programs::SchedClassifier};
use service_agent::{
    maps::{self, MapSizes, PinnedMaps},
    model::{self, NodeContext},
    reconciler::Reconciler,
    source::manifest,
};
use service_common::{AffinityKey, AffinityValue, Counters, addr_v4, map_names, stats::Counter};
use service_tests::{
    fixture::ManifestDir,
    netns::BpffsMount,
    packet::{self, TestRunOutput},
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const SYN: u8 = 0x02;

/// The program with its maps, reprogrammed from YAML on demand.
struct Fixture {
    ebpf: Ebpf,
    reconciler: Reconciler<PinnedMaps>,
    root: PathBuf,
    manifests: ManifestDir,
    _bpffs: BpffsMount,
}

impl Fixture {
    fn new(yaml: &str) -> Self {
        let bpffs = BpffsMount::new().expect("mount bpffs");
        let root = bpffs.path().join("node");
        let mut ebpf = maps::load(&root, MapSizes::default()).expect("load object");
        // No grace: rows leave at once, as they do for good 2 s later.
        let reconciler = Reconciler::new(PinnedMaps::from_ebpf(&mut ebpf, MapSizes::default()).expect("maps"))
            .expect("dump")
            .with_grace(Duration::ZERO);
        let prog: &mut SchedClassifier =
            ebpf.program_mut(service_common::PROG_POD_INGRESS).expect("program").try_into().expect("classifier");
        prog.load().expect("verifier accepts the program");
        let mut f = Self { ebpf, reconciler, root, manifests: ManifestDir::new(), _bpffs: bpffs };
        f.program(yaml);
        f
    }

    fn program(&mut self, yaml: &str) {
        self.manifests.write("objects.yaml", yaml);
        let snapshot = manifest::load_dir(self.manifests.path()).expect("manifests");
        assert!(snapshot.errors.is_empty(), "{:?}", snapshot.errors);
        let node =
            NodeContext { node_name: "node-a".into(), nodeport_addresses: vec![NODE.into()], ..NodeContext::default() };
        let report = self.reconciler.reconcile(&model::desired(&snapshot.objects, &node));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
    }

    fn run(&self, frame: &[u8]) -> TestRunOutput {
        let prog: &SchedClassifier =
            self.ebpf.program(service_common::PROG_POD_INGRESS).expect("program").try_into().expect("classifier");
        packet::prog_test_run(prog.fd().expect("fd").as_fd(), frame, 1).expect("BPF_PROG_TEST_RUN")
    }

    fn stat(&self, id: Counter) -> u64 {
        maps::read_stats(&self.root).expect("stats")[id as usize].1
    }
}

/// The destination of a DNATed frame.
fn dnat_target(out: &TestRunOutput) -> (Ipv4Addr, u16) {
    assert_eq!(out.retval, TC_ACT_OK);
    let p = packet::parse(&out.data_out).expect("an IPv4 TCP/UDP frame");
    assert!(packet::checksums_valid(&out.data_out));
    (p.ip_dst, p.dport)
}

const LB: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// The node's address: NodePorts answer there.
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);

/// Two Services on one LoadBalancer IP (reached here from a pod, through
/// its pod-side frontend; the external program keys source ranges the same
/// way), one for TCP, one for UDP, with their own ranges; the TCP one lists
/// an IPv6 range too. `externalTrafficPolicy: Local`, so a pod's flow is
/// not masqueraded (this fixture writes no SNAT addresses).
const SHARED_ADDRESS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: tcp-side, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.5.1
  loadBalancerSourceRanges: ["10.244.0.0/16", "::/0"]
  externalTrafficPolicy: Local
  ports:
  - {port: 53, protocol: TCP, targetPort: 5353, nodePort: 30053}
status:
  loadBalancer:
    ingress: [{ip: 192.0.2.10}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: tcp-side-1
  labels: {kubernetes.io/service-name: tcp-side}
addressType: IPv4
ports: [{port: 5353, protocol: TCP}]
endpoints:
- addresses: [10.244.1.21]
---
apiVersion: v1
kind: Service
metadata: {name: udp-side, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.5.2
  loadBalancerSourceRanges: ["172.16.0.0/12"]
  externalTrafficPolicy: Local
  ports:
  - {port: 53, protocol: UDP, targetPort: 5353, nodePort: 30054}
status:
  loadBalancer:
    ingress: [{ip: 192.0.2.10}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: udp-side-1
  labels: {kubernetes.io/service-name: udp-side}
addressType: IPv4
ports: [{port: 5353, protocol: UDP}]
endpoints:
- addresses: [10.244.1.22]
"#;

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn source_ranges_are_per_protocol_and_family() {
    let f = Fixture::new(SHARED_ADDRESS);
    let inside = Ipv4Addr::new(10, 244, 3, 3);
    let other = Ipv4Addr::new(172, 16, 3, 3);
    // TCP: only 10.244.0.0/16; the "::/0" range must not let 172.16.x in
    // (on the old code it was written into the IPv4 trie as /0).
    let out = f.run(&packet::tcp_v4(inside, 40000, LB, 53, SYN, b""));
    assert_eq!(dnat_target(&out), (Ipv4Addr::new(10, 244, 1, 21), 5353));
    let dropped = f.stat(Counter::DropSourceRange);
    let out = f.run(&packet::tcp_v4(other, 40000, LB, 53, SYN, b""));
    assert_eq!(out.retval, TC_ACT_SHOT, "an IPv6 range opened an IPv4 frontend");
    assert_eq!(f.stat(Counter::DropSourceRange), dropped + 1);
    // UDP on the same address and port: only 172.16.0.0/12 (on the old
    // code both protocols shared the rev-NAT id, so each got the union).
    let out = f.run(&packet::udp_v4(other, 40001, LB, 53, b"q"));
    assert_eq!(dnat_target(&out), (Ipv4Addr::new(10, 244, 1, 22), 5353));
    let out = f.run(&packet::udp_v4(inside, 40001, LB, 53, b"q"));
    assert_eq!(out.retval, TC_ACT_SHOT, "the TCP Service's range let a UDP client in");
    assert_eq!(f.stat(Counter::DropSourceRange), dropped + 2);
}

const STICKY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 6, 1);

/// `sticky` (ClientIP affinity) and `other`, whose endpoints `sticky`'s
/// are: its backend rows stay when `sticky` drops one of them.
fn sticky_yaml(sticky_endpoints: &str) -> String {
    format!(
        r"
apiVersion: v1
kind: Service
metadata: {{name: sticky, namespace: default}}
spec:
  clusterIP: 10.96.6.1
  sessionAffinity: ClientIP
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: sticky-1
  labels: {{kubernetes.io/service-name: sticky}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints: {sticky_endpoints}
---
apiVersion: v1
kind: Service
metadata: {{name: other, namespace: default}}
spec:
  clusterIP: 10.96.6.2
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: other-1
  labels: {{kubernetes.io/service-name: other}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:
- addresses: [10.244.1.31]
- addresses: [10.244.1.32]
"
    )
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn an_affinity_entry_is_not_followed_to_a_backend_that_left_the_frontends_set() {
    let client = Ipv4Addr::new(10, 244, 9, 9);
    let mut f = Fixture::new(&sticky_yaml("[{addresses: [10.244.1.31]}]"));
    let out = f.run(&packet::tcp_v4(client, 41000, STICKY_VIP, 80, SYN, b""));
    assert_eq!(dnat_target(&out), (Ipv4Addr::new(10, 244, 1, 31), 8080));
    // .31 leaves `sticky` (it still serves `other`, so its backend row and
    // id stay): the client's next flows must go to .32, its only backend.
    f.program(&sticky_yaml("[{addresses: [10.244.1.32]}]"));
    for sport in 41001..41017 {
        let out = f.run(&packet::tcp_v4(client, sport, STICKY_VIP, 80, SYN, b""));
        assert_eq!(
            dnat_target(&out),
            (Ipv4Addr::new(10, 244, 1, 32), 8080),
            "flow from port {sport} followed the affinity entry to a backend the Service no longer has"
        );
    }
    // The stickiness is to the new backend now.
    assert!(f.stat(Counter::AffinityHit) >= 15);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn the_member_search_finds_every_backend_of_a_large_set_and_no_other_id() {
    // `sticky` has 300 endpoints: a table of 4093 slots, then 300 member
    // ids in 19 blocks, searched by the program for each affinity entry.
    let endpoints: Vec<String> =
        (0..300u32).map(|i| format!("{{addresses: [10.245.{}.{}]}}", i / 250, i % 250 + 1)).collect();
    let mut f = Fixture::new(&sticky_yaml(&format!("[{}]", endpoints.join(", "))));
    let state = maps::MapIo::dump(&PinnedMaps::open(&f.root, MapSizes::default()).expect("maps")).expect("dump");
    let frontend = state
        .services
        .iter()
        .find(|(k, _)| k.addr[..4] == STICKY_VIP.octets() && k.scope == service_common::SCOPE_INTERNAL)
        .map(|(_, v)| *v)
        .expect("sticky's frontend");
    let members = &state.table_of(&frontend).expect("its table").members;
    assert_eq!((frontend.count, members.len()), (4093, 300));
    // Ids around the set: `other`'s backends (ids of rows that exist), and
    // ids no row has, below, between and above the members.
    let others: Vec<u32> = state.backends.keys().copied().filter(|id| !members.contains(id)).collect();
    assert_eq!(others.len(), 2);
    let affinity_path = f.root.join(map_names::AFFINITY);
    let mut affinity: aya::maps::HashMap<aya::maps::MapData, AffinityKey, AffinityValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(
            aya::maps::MapData::from_pin(&affinity_path).expect("affinity pin"),
        ))
        .expect("affinity map");
    let hits = f.stat(Counter::AffinityHit);
    let mut sport = 50000;
    let client =
        |last: u32| Ipv4Addr::new(10, 246, u8::try_from(last / 250).unwrap(), 1 + u8::try_from(last % 250).unwrap());
    let mut ask = |f: &mut Fixture, i: u32, backend_id: u32| -> (Ipv4Addr, u16) {
        let c = client(i);
        let key = AffinityKey { client: addr_v4(c.octets()), scope: frontend.affinity_scope, proto: 6, _pad: [0; 3] };
        let fresh = AffinityValue { backend_id, _pad: 0, last_used_ns: maps::monotonic_ns() };
        affinity.insert(key, fresh, 0).expect("affinity entry");
        sport += 1;
        dnat_target(&f.run(&packet::tcp_v4(c, sport, STICKY_VIP, 80, SYN, b"")))
    };
    for (i, id) in members.iter().enumerate() {
        let b = state.backends[id];
        let want = (Ipv4Addr::new(b.addr[0], b.addr[1], b.addr[2], b.addr[3]), 8080);
        assert_eq!(ask(&mut f, u32::try_from(i).unwrap(), *id), want, "member #{i} (id {id}) not followed");
    }
    assert_eq!(f.stat(Counter::AffinityHit), hits + 300, "every member's entry followed");
    let strangers = others.iter().copied().chain([1, members[0].saturating_sub(1), members[299] + 1, u32::MAX]);
    for (i, id) in strangers.enumerate() {
        if members.contains(&id) || id == 0 {
            continue;
        }
        let (addr, _) = ask(&mut f, 300 + u32::try_from(i).unwrap(), id);
        assert!(addr.octets()[1] == 245, "an entry naming id {id}, no member, was followed to {addr}");
    }
    assert_eq!(f.stat(Counter::AffinityHit), hits + 300, "no stranger's entry followed");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn an_old_flows_packets_recreate_no_counter_for_freed_ids() {
    let client = Ipv4Addr::new(10, 244, 9, 8);
    let mut f = Fixture::new(&sticky_yaml("[{addresses: [10.244.1.33]}]"));
    // Programming writes no counter row: an id's first packet creates it.
    let none = maps::read_counters(&f.root, map_names::SERVICE_COUNTERS).expect("counters");
    assert!(none.is_empty(), "the agent wrote counter rows: {none:?}");
    let syn = packet::tcp_v4(client, 42000, STICKY_VIP, 80, SYN, b"");
    assert_eq!(dnat_target(&f.run(&syn)), (Ipv4Addr::new(10, 244, 1, 33), 8080));
    let services = maps::read_counters(&f.root, map_names::SERVICE_COUNTERS).expect("counters");
    let backends = maps::read_counters(&f.root, map_names::BACKEND_COUNTERS).expect("counters");
    assert_eq!((services.len(), backends.len()), (1, 1), "the first packet created its ids' rows");
    assert_eq!(services.values().next().map(|c| c.packets), Some(1), "and was counted");
    // `sticky` goes, with its only backend: their ids are freed.
    f.program(
        &sticky_yaml("[{addresses: [10.244.1.33]}]").split("\n---\n").skip(2).collect::<Vec<_>>().join("\n---\n"),
    );
    let live_services = maps::read_counters(&f.root, map_names::SERVICE_COUNTERS).expect("counters");
    let live_backends = maps::read_counters(&f.root, map_names::BACKEND_COUNTERS).expect("counters");
    let freed_service: Vec<u32> = services.keys().filter(|id| !live_services.contains_key(id)).copied().collect();
    let freed_backend: Vec<u32> = backends.keys().filter(|id| !live_backends.contains_key(id)).copied().collect();
    assert_eq!((freed_service.len(), freed_backend.len()), (1, 1), "{services:?} {backends:?}");
    // The flow's conntrack entries outlive its frontend: its packets are
    // still translated, but counted for no id (the old code re-created the
    // freed ids' counters, to be handed to whoever got the ids next).
    let ack = packet::tcp_v4(client, 42000, STICKY_VIP, 80, 0x10, b"data");
    assert_eq!(dnat_target(&f.run(&ack)), (Ipv4Addr::new(10, 244, 1, 33), 8080));
    let after_services = maps::read_counters(&f.root, map_names::SERVICE_COUNTERS).expect("counters");
    let after_backends = maps::read_counters(&f.root, map_names::BACKEND_COUNTERS).expect("counters");
    for id in &freed_service {
        assert!(!after_services.contains_key(id), "service counter {id} re-created");
    }
    for id in &freed_backend {
        assert!(!after_backends.contains_key(id), "backend counter {id} re-created");
    }
    // A new Service gets fresh ids, never the freed ones.
    f.program(&sticky_yaml("[{addresses: [10.244.1.34]}]"));
    let now_services = maps::read_counters(&f.root, map_names::SERVICE_COUNTERS).expect("counters");
    let now_backends = maps::read_counters(&f.root, map_names::BACKEND_COUNTERS).expect("counters");
    assert!(freed_service.iter().all(|id| !now_services.contains_key(id)));
    assert!(freed_backend.iter().all(|id| !now_backends.contains_key(id)));
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn the_sweep_deletes_counter_rows_of_freed_ids_and_keeps_the_live_ones() {
    let client = Ipv4Addr::new(10, 244, 9, 9);
    let mut f = Fixture::new(&sticky_yaml("[{addresses: [10.244.1.33]}]"));
    let syn = packet::tcp_v4(client, 42001, STICKY_VIP, 80, SYN, b"");
    assert_eq!(dnat_target(&f.run(&syn)), (Ipv4Addr::new(10, 244, 1, 33), 8080));
    let live_services = maps::read_counters(&f.root, map_names::SERVICE_COUNTERS).expect("counters");
    let live_backends = maps::read_counters(&f.root, map_names::BACKEND_COUNTERS).expect("counters");
    // What a packet racing the delete of its id's row leaves: counter rows
    // of ids no row names.
    let stale = [(map_names::SERVICE_COUNTERS, u32::MAX - 7), (map_names::BACKEND_COUNTERS, u32::MAX - 7)];
    for (name, id) in stale {
        let mut map: aya::maps::PerCpuHashMap<_, u32, Counters> = aya::maps::PerCpuHashMap::try_from(
            aya::maps::Map::PerCpuHashMap(aya::maps::MapData::from_pin(f.root.join(name)).expect("pin")),
        )
        .expect("per-CPU hash");
        let cpus = aya::util::nr_cpus().expect("cpus");
        let one = Counters { packets: 1, bytes: 60 };
        map.insert(id, aya::maps::PerCpuValues::try_from(vec![one; cpus]).expect("values"), 0).expect("insert");
    }
    assert_eq!(f.reconciler.sweep_ids().expect("sweep"), 2, "both stale rows swept");
    assert_eq!(maps::read_counters(&f.root, map_names::SERVICE_COUNTERS).expect("counters"), live_services);
    assert_eq!(maps::read_counters(&f.root, map_names::BACKEND_COUNTERS).expect("counters"), live_backends);
    assert_eq!(f.reconciler.sweep_ids().expect("sweep"), 0, "nothing left to sweep");
}

/// A sticky LoadBalancer Service with a NodePort and an external IP, three
/// endpoints. `externalTrafficPolicy: Local`, so a pod's flows to the
/// node-side frontends are not masqueraded (this fixture writes no SNAT
/// addresses) and go to the cluster-wide endpoints, as kube-proxy's
/// short-circuit sends them.
const STICKY_EVERYWHERE: &str = r"
apiVersion: v1
kind: Service
metadata: {name: sticky-lb, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.7.1
  externalIPs: [192.0.2.71]
  externalTrafficPolicy: Local
  sessionAffinity: ClientIP
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
status:
  loadBalancer:
    ingress: [{ip: 192.0.2.70}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: sticky-lb-1
  labels: {kubernetes.io/service-name: sticky-lb}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.41], nodeName: node-a}
- {addresses: [10.244.2.42], nodeName: node-b}
- {addresses: [10.244.3.43], nodeName: node-c}
";

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn affinity_is_kept_per_service_port_whichever_address_the_client_dials() {
    let f = Fixture::new(STICKY_EVERYWHERE);
    let cluster_ip = Ipv4Addr::new(10, 96, 7, 1);
    let others = [(NODE, 30080), (Ipv4Addr::new(192, 0, 2, 70), 80), (Ipv4Addr::new(192, 0, 2, 71), 80)];
    let mut chosen = std::collections::BTreeSet::new();
    let mut sport = 43000;
    // Twelve clients: with a per-frontend scope each of the 36 later flows
    // would be hashed anew (a third of them landing on the first endpoint
    // by chance).
    for host in 1..=12 {
        let client = Ipv4Addr::new(10, 244, 9, host);
        sport += 1;
        let first = dnat_target(&f.run(&packet::tcp_v4(client, sport, cluster_ip, 80, SYN, b"")));
        chosen.insert(first);
        for (addr, port) in others {
            sport += 1;
            let later = dnat_target(&f.run(&packet::tcp_v4(client, sport, addr, port, SYN, b"")));
            assert_eq!(later, first, "client {client} dialled {addr}:{port} after the ClusterIP: another endpoint");
        }
    }
    assert!(chosen.len() > 1, "the clients' first flows all went to one endpoint: {chosen:?}");
    assert_eq!(f.stat(Counter::AffinityHit), 36);
}
