//! Tier 2: golden packets through the real `service_external_ingress`
//! program with BPF_PROG_TEST_RUN (root): a NodePort flow to a backend on
//! another node (DNAT + SNAT), its reply, and an ICMP error about it, each
//! compared byte for byte with a frame built from scratch (so every
//! checksum, the quoted ones inside the ICMP error included, is exact).
//! Each runs inside a fresh network namespace whose routes it sets: the
//! FIB lookup the program does for packets with a node-address source
//! finds them there (redirected, one TTL less), or finds none
//! (`drop_no_route`). Test runs only return the packet; nothing is sent.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsFd as _, BorrowedFd},
    path::Path,
};

use aya::programs::SchedClassifier;
use service_agent::{
    maps::{self, MapSizes, PinnedMaps},
    model::{self, NodeContext},
    reconciler::Reconciler,
    source::manifest,
};
use service_common::{CtKey, CtValue, FAMILY_IPV4, SnatAddrKey, addr_v4, port_be, snat_ports, stats::Counter};
use service_tests::{
    fixture::{ManifestDir, TEST_RUN_IFINDEX, interface_stat},
    netns::{BpffsMount, Netns, unique_suffix},
    packet,
};

const TC_ACT_SHOT: u32 = 2;
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

/// Loads the external program inside `ns` (a fresh namespace, perhaps
/// given routes by the caller), programs its maps from [`MANIFESTS`]
/// through the agent's reconciler, writes the SNAT row of loopback (the
/// interface BPF_PROG_TEST_RUN's skb comes from, ifindex 1), and runs
/// `check` there with the program and the pin root.
fn with_program(ns: &Netns, check: impl FnOnce(BorrowedFd<'_>, &Path) + Send) {
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
        maps::write_snat_addrs(&root, &BTreeMap::from([(SnatAddrKey::new(1, FAMILY_IPV4), IpAddr::V4(NODE))]))
            .expect("snat row");
        let prog: &mut SchedClassifier =
            ebpf.program_mut(service_common::PROG_EXTERNAL_INGRESS).expect("program").try_into().expect("classifier");
        prog.load().expect("verifier accepts the program");
        check(prog.fd().expect("fd").as_fd(), &root);
    });
}

/// Routes as a node has them: the backend's pod network and the clients'
/// network behind a veth, forwarding on.
fn route_like_a_node(ns: &Netns) {
    ns.ip(&["link", "set", "lo", "up"]).expect("lo");
    ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]).expect("veth");
    ns.ip(&["link", "set", "d0", "up"]).expect("d0 up");
    ns.ip(&["link", "set", "d1", "up"]).expect("d1 up");
    ns.ip(&["addr", "add", "10.244.2.1/24", "dev", "d0"]).expect("addr");
    ns.ip(&["route", "add", "192.168.100.0/24", "dev", "d0"]).expect("client route");
    ns.sysctl("net.ipv4.ip_forward=1").expect("forwarding");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn a_nodeport_flow_to_another_node_is_dnated_snated_reversed_and_its_icmp_errors_translated() {
    let ns = Netns::new(&format!("sd-ptr-{}", unique_suffix())).expect("netns");
    route_like_a_node(&ns);
    with_program(&ns, |fd, root| {
        let run = |frame: &[u8]| packet::prog_test_run(fd.as_fd(), frame, 1).expect("BPF_PROG_TEST_RUN");
        let stat = |id: Counter| maps::read_stats(root).expect("stats")[id as usize].1;
        // Every packet here has a node address as its new source (or
        // destination, for replies to a SNATed flow): it leaves by the FIB
        // redirect, one TTL less (the MAC header is the neighbour
        // output's business, after the program).
        let redirected = |out: &packet::TestRunOutput, want: &[u8]| {
            assert_eq!(out.retval, TC_ACT_REDIRECT);
            assert_eq!(out.data_out[14..], with_ttl(want, 63)[14..]);
        };

        // TCP SYN client → node:30080 becomes node:P → backend:8080, P in
        // the SNAT range.
        let out = run(&packet::tcp_v4(CLIENT, 40000, NODE, 30080, 0x02, b""));
        let p = packet::parse(&out.data_out).expect("parse");
        assert!((snat_ports::MIN..=snat_ports::MAX).contains(&p.sport), "{p:?}");
        let snat_port = p.sport;
        redirected(&out, &packet::tcp_v4(NODE, snat_port, BACKEND, 8080, 0x02, b""));
        assert_eq!((stat(Counter::DnatNew), stat(Counter::SnatNew)), (1, 1));
        // The backend's SYN-ACK to node:P becomes node:30080 → client:40000.
        let out = run(&packet::tcp_v4(BACKEND, 8080, NODE, snat_port, 0x12, b""));
        redirected(&out, &packet::tcp_v4(NODE, 30080, CLIENT, 40000, 0x12, b""));
        // The next client packet follows the same translation.
        let out = run(&packet::tcp_v4(CLIENT, 40000, NODE, 30080, 0x10, b"GET /"));
        redirected(&out, &packet::tcp_v4(NODE, snat_port, BACKEND, 8080, 0x10, b"GET /"));

        // UDP: the datagram as it left this node, then a "fragmentation
        // needed" about it from a router behind the node: translated into
        // the error the client expects for its own datagram.
        let out = run(&packet::udp_v4(CLIENT, 5000, NODE, 30053, b"query!"));
        let p = packet::parse(&out.data_out).expect("parse");
        let sent = packet::udp_v4(NODE, p.sport, BACKEND, 5353, b"query!");
        redirected(&out, &sent);
        let icmp = packet::icmp_frag_needed_v4(ROUTER, NODE, 1000, &sent);
        let out = run(&icmp);
        let client_sent = packet::udp_v4(CLIENT, 5000, NODE, 30053, b"query!");
        // Outer destination, quoted addresses, ports and every checksum.
        redirected(&out, &packet::icmp_frag_needed_v4(ROUTER, CLIENT, 1000, &client_sent));
        // An error sent by the backend itself: its address (the quoted
        // destination) becomes the NodePort's too.
        let unreachable = packet::icmp_frag_needed_v4(BACKEND, NODE, 0, &sent);
        let out = run(&unreachable);
        redirected(&out, &packet::icmp_frag_needed_v4(NODE, CLIENT, 0, &client_sent));
        assert_eq!(stat(Counter::IcmpErrorTranslated), 2);
        assert_eq!(interface_stat(root, TEST_RUN_IFINDEX, Counter::IcmpErrorTranslated), 2);
        // An ICMP error about no flow of ours passes untouched.
        let unrelated = packet::icmp_frag_needed_v4(ROUTER, NODE, 1000, &packet::udp_v4(NODE, 1, CLIENT, 2, b"xy"));
        let out = run(&unrelated);
        assert_eq!(out.data_out, unrelated);
    });
}

const TC_ACT_REDIRECT: u32 = 7;

/// `frame` with its IPv4 TTL set to `ttl` and the header checksum redone.
fn with_ttl(frame: &[u8], ttl: u8) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[14 + 8] = ttl;
    f[14 + 10] = 0;
    f[14 + 11] = 0;
    let c = packet::checksum(&f[14..34]);
    f[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    f
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn redirected_packets_lose_one_ttl_and_too_big_or_expiring_ones_get_the_forwarding_icmp_answer() {
    let ns = Netns::new(&format!("sd-ptr-{}", unique_suffix())).expect("netns");
    // A route to the backend (so the FIB redirect happens) over a path
    // with a 1000-byte MTU, and forwarding on, as on a node.
    ns.ip(&["link", "set", "lo", "up"]).expect("lo");
    ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]).expect("veth");
    ns.ip(&["link", "set", "d0", "up"]).expect("d0 up");
    ns.ip(&["link", "set", "d1", "up"]).expect("d1 up");
    ns.ip(&["addr", "add", "10.244.2.1/24", "dev", "d0"]).expect("addr");
    ns.ip(&["route", "add", &format!("{BACKEND}/32"), "dev", "d0", "mtu", "lock", "1000"]).expect("route");
    ns.sysctl("net.ipv4.ip_forward=1").expect("forwarding");
    with_program(&ns, |fd, root| {
        let run = |frame: &[u8]| packet::prog_test_run(fd.as_fd(), frame, 1).expect("BPF_PROG_TEST_RUN");
        let stat = |id: Counter| maps::read_stats(root).expect("stats")[id as usize].1;

        // The SYN is translated and redirected towards the backend with
        // its TTL one lower (and the header checksum to match).
        let out = run(&packet::tcp_v4(CLIENT, 40000, NODE, 30080, 0x02, b""));
        assert_eq!(out.retval, TC_ACT_REDIRECT);
        let snat_port = packet::parse(&out.data_out).expect("parse").sport;
        let want = with_ttl(&packet::tcp_v4(NODE, snat_port, BACKEND, 8080, 0x02, b""), 63);
        assert_eq!(out.data_out[14..], want[14..], "TTL 63, everything else as translated");

        // 1,400 bytes with DF towards a 1,000-byte path: the answer the
        // forwarding stack would give, sent back to the client from the
        // address it dialled, quoting its packet as it sent it.
        let big = packet::tcp_v4(CLIENT, 40000, NODE, 30080, 0x10, &[7u8; 1360]);
        let out = run(&big);
        assert_eq!(out.retval, TC_ACT_REDIRECT, "sent back out of the interface it came in on");
        let answer = &out.data_out;
        assert_eq!(answer.len(), 14 + 20 + 8 + 28);
        assert_eq!((&answer[0..6], &answer[6..12]), (&big[6..12], &big[0..6]), "MAC addresses swapped");
        let ip = &answer[14..34];
        assert_eq!((ip[9], &ip[12..16], &ip[16..20]), (1, &NODE.octets()[..], &CLIENT.octets()[..]));
        assert_eq!(packet::checksum(ip), 0, "IP header checksum");
        let icmp = &answer[34..];
        assert_eq!((icmp[0], icmp[1], u16::from_be_bytes([icmp[6], icmp[7]])), (3, 4, 1000), "frag needed, MTU 1000");
        assert_eq!(packet::checksum(icmp), 0, "ICMP checksum");
        assert_eq!(&icmp[8..], &big[14..14 + 28], "the client's own header and ports, untranslated");
        assert_eq!(stat(Counter::DropFragNeeded), 1);

        // A packet arriving with TTL 1 cannot be forwarded: time exceeded.
        let dying = with_ttl(&packet::tcp_v4(CLIENT, 40000, NODE, 30080, 0x10, b"x"), 1);
        let out = run(&dying);
        assert_eq!(out.retval, TC_ACT_REDIRECT);
        let icmp = &out.data_out[34..];
        assert_eq!((icmp[0], icmp[1]), (11, 0), "time exceeded in transit");
        assert_eq!(packet::checksum(icmp), 0);
        assert_eq!(&icmp[8..], &dying[14..14 + 28]);
        assert_eq!(stat(Counter::DropTtlExceeded), 1);

        // Too big again, but with IP options: the answer (which quotes a
        // 20-byte header) is not built; dropped as drop_icmp_answer.
        let big_with_options = packet::with_ip_options(&big);
        let out = run(&big_with_options);
        assert_eq!(out.retval, TC_ACT_SHOT);
        assert_eq!(stat(Counter::DropIcmpAnswer), 1);
        assert_eq!(interface_stat(root, TEST_RUN_IFINDEX, Counter::DropIcmpAnswer), 1);
        assert_eq!(stat(Counter::DropFragNeeded), 1, "counted as the unanswered drop only");
    });
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn a_packet_the_fib_has_no_route_for_is_dropped_as_drop_no_route() {
    let ns = Netns::new(&format!("sd-ptr-{}", unique_suffix())).expect("netns");
    // Forwarding on, but the backend is unreachable: bpf_fib_lookup
    // returns BPF_FIB_LKUP_RET_UNREACHABLE. Handed to the stack, the
    // packet (its new source is this node's address) would die there as a
    // martian; the program drops it and says why.
    ns.ip(&["link", "set", "lo", "up"]).expect("lo");
    ns.sysctl("net.ipv4.ip_forward=1").expect("forwarding");
    ns.ip(&["route", "add", "unreachable", &format!("{BACKEND}/32")]).expect("unreachable route");
    with_program(&ns, |fd, root| {
        let run = |frame: &[u8]| packet::prog_test_run(fd.as_fd(), frame, 1).expect("BPF_PROG_TEST_RUN");
        let stat = |id: Counter| maps::read_stats(root).expect("stats")[id as usize].1;
        let iface = |id: Counter| interface_stat(root, TEST_RUN_IFINDEX, id);
        let out = run(&packet::tcp_v4(CLIENT, 40000, NODE, 30080, 0x02, b""));
        assert_eq!(out.retval, TC_ACT_SHOT);
        assert_eq!((stat(Counter::DropNoRoute), iface(Counter::DropNoRoute)), (1, 1));
        assert_eq!(stat(Counter::DnatNew), 0, "not counted as the translation that could not leave");
        // A blackhole route says the same.
        ns.ip(&["route", "replace", "blackhole", &format!("{BACKEND}/32")]).expect("blackhole route");
        let out = run(&packet::tcp_v4(CLIENT, 40000, NODE, 30080, 0x10, b"x"));
        assert_eq!(out.retval, TC_ACT_SHOT);
        assert_eq!((stat(Counter::DropNoRoute), iface(Counter::DropNoRoute)), (2, 2));
        assert_eq!(stat(Counter::DnatEstablished), 0);
    });
}

/// Pins the calling thread to `cpu`.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it;
    // sched_setaffinity(0, ...) affects only the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set), 0, "pin to CPU {cpu}");
    }
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn two_cpus_creating_the_same_flow_at_once_give_it_one_snat_port() {
    if std::thread::available_parallelism().map_or(1, std::num::NonZero::get) < 2 {
        eprintln!("skipped: needs two CPUs");
        return;
    }
    let ns = Netns::new(&format!("sd-ptr-{}", unique_suffix())).expect("netns");
    route_like_a_node(&ns);
    with_program(&ns, |fd, root| {
        // The same first packet of each new flow goes through the program
        // on CPU 0 and CPU 1 at the same moment (a spinning start line).
        const FLOWS: u16 = 4_000;
        let start = std::sync::atomic::AtomicU32::new(0);
        let ports: Vec<Vec<u16>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..2)
                .map(|cpu| {
                    let (fd, start) = (&fd, &start);
                    s.spawn(move || {
                        pin_to_cpu(cpu);
                        (0..FLOWS)
                            .map(|i| {
                                start.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                                while start.load(std::sync::atomic::Ordering::Acquire) < 2 * u32::from(i + 1) {
                                    std::hint::spin_loop();
                                }
                                let syn = packet::tcp_v4(CLIENT, 10_000 + i, NODE, 30080, 0x02, b"");
                                let out = packet::prog_test_run(fd.as_fd(), &syn, 1).expect("BPF_PROG_TEST_RUN");
                                packet::parse(&out.data_out).expect("parse").sport
                            })
                            .collect::<Vec<u16>>()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().expect("worker")).collect()
        });
        let differing: Vec<_> = (0..usize::from(FLOWS)).filter(|&i| ports[0][i] != ports[1][i]).collect();
        let stats = maps::read_stats(root).expect("stats");
        let joined = stats[Counter::CtRaceJoined as usize].1;
        println!("{FLOWS} flows raced on two CPUs: {joined} joined the other CPU's flow");
        assert!(joined > u64::from(FLOWS) / 10, "the two CPUs really raced ({joined} joins)");
        assert!(differing.is_empty(), "flows whose two first packets left with different SNAT ports: {differing:?}");
        assert_eq!(stats[Counter::DropCtRace as usize].1, 0);
    });
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn every_port_of_the_snat_range_is_tried_and_only_a_full_range_refuses_a_flow() {
    let ns = Netns::new(&format!("sd-ptr-{}", unique_suffix())).expect("netns");
    route_like_a_node(&ns);
    with_program(&ns, |fd, root| {
        let run = |frame: &[u8]| packet::prog_test_run(fd, frame, 1).expect("BPF_PROG_TEST_RUN");
        let stat = |id: Counter| maps::read_stats(root).expect("stats")[id as usize].1;
        // Live flows hold every SNAT port towards the backend but one:
        // their reply entries (backend:8080 → node:P), assured, just seen.
        let pin = aya::maps::MapData::from_pin(root.join(service_common::map_names::CONNTRACK)).expect("pinned map");
        let mut conntrack: aya::maps::HashMap<_, CtKey, CtValue> =
            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(pin)).expect("conntrack");
        // The reply tuple of a SNATed flow on `port`: backend → node:port.
        let reply_key = |port: u16| CtKey {
            saddr: addr_v4(BACKEND.octets()),
            daddr: addr_v4(NODE.octets()),
            sport: port_be(8080),
            dport: port_be(port),
            proto: service_common::PROTO_TCP,
            family: service_common::FAMILY_IPV4,
            _pad: [0; 2],
        };
        let free = 63_333u16;
        let now = maps::monotonic_ns();
        for port in snat_ports::MIN..=snat_ports::MAX {
            if port == free {
                continue;
            }
            let key = reply_key(port);
            let value = CtValue {
                nat_addr: addr_v4(NODE.octets()),
                snat_addr: addr_v4([192, 168, 100, 200]),
                nat_port: port_be(30080),
                snat_port: port_be(port),
                flags: service_common::ct_flags::REV_NAT | service_common::ct_flags::SNAT,
                state: service_common::conntrack::state::SEEN_REPLY | service_common::conntrack::state::ASSURED,
                _pad: [0; 2],
                backend_id: 1,
                rev_nat_id: 1,
                last_seen_ns: now,
            };
            conntrack.insert(key, value, 0).expect("a live flow");
        }
        // A new flow finds the one free port, wherever its hash starts.
        let out = run(&packet::tcp_v4(CLIENT, 40_001, NODE, 30080, 0x02, b""));
        assert_eq!(out.retval, TC_ACT_REDIRECT);
        assert_eq!(packet::parse(&out.data_out).expect("parse").sport, free);
        // Now every port is live: the next new flow is refused, counted.
        let out = run(&packet::tcp_v4(CLIENT, 40_002, NODE, 30080, 0x02, b""));
        assert_eq!(out.retval, TC_ACT_SHOT);
        assert_eq!(stat(Counter::DropSnatNoPort), 1);
        // One flow closes (both FINs): its port is free at once.
        let closed_port = 61_234u16;
        let key = reply_key(closed_port);
        let mut value = conntrack.get(&key, 0).expect("its entry");
        value.state |= service_common::conntrack::state::FIN_ORIGINAL | service_common::conntrack::state::FIN_REPLY;
        conntrack.insert(key, value, 0).expect("closed");
        let out = run(&packet::tcp_v4(CLIENT, 40_003, NODE, 30080, 0x02, b""));
        assert_eq!(out.retval, TC_ACT_REDIRECT);
        assert_eq!(packet::parse(&out.data_out).expect("parse").sport, closed_port);
    });
}
