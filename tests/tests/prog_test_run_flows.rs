//! Tier 2: the flow tables of `tests/flows` (kube-proxy's own packet-flow
//! cases among them, format in `tests/flows/FORMAT.md`) against the real
//! programs. Each table's objects go through the agent's source → model →
//! reconciler into the pinned maps; each flow's first packet is crafted
//! and run through `service_pod_ingress` (a source inside the node's
//! `clusterCIDR`: a pod of this node) or `service_external_ingress`
//! (anything else) with BPF_PROG_TEST_RUN, and what comes out is read back
//! as an outcome:
//! - the frame unchanged: untouched;
//! - the program's drop verdict: DROP;
//! - a TCP RST or an ICMP port unreachable addressed back to the source:
//!   REJECT;
//! - a rewritten destination: forwarded to that endpoint, masqueraded when
//!   the source was rewritten too. New flows (a fresh source port each) are
//!   run until every expected endpoint has been chosen (or a bound is
//!   reached), so the set of endpoints is the set the program can pick.
//!
//!
//! A flow from the node itself (a node address or 127.0.0.1 as its source)
//! never meets those programs: it is run with real sockets through the
//! socket-level programs (`service_sock_*4`, from the same object and maps)
//! attached to a test cgroup. `sock-client probe-tcp|probe-udp` connects new
//! sockets from that cgroup, in the table's node namespace, until every
//! expected endpoint has been the real peer of one (or a bound is reached):
//! ECONNREFUSED is REJECT, ENETUNREACH is DROP, the destination itself as
//! the peer is untouched, anything else is an endpoint it was sent to.
//!
//! The expectation is kube-proxy's, or the flow's `ours:` where this
//! project deliberately differs: the same as the model runner
//! (`service-agent/tests/kube_proxy_flows.rs`) checks without root. Each
//! table runs in a namespace of its own, with the node's addresses on a
//! veth and a default route into it, so the programs' FIB lookups find an
//! egress; BPF_PROG_TEST_RUN only returns the packet, nothing is sent (the
//! probes' SYNs leave by the default route and meet nobody).

#[path = "../../service-agent/tests/support/flows.rs"]
mod flows;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::{AsFd as _, BorrowedFd},
    path::Path,
};

use aya::programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier};
use service_agent::{
    maps::{self, MapSizes, PinnedMaps},
    model::{
        self, Protocol,
        trace::{Entry, Outcome},
    },
    reconciler::Reconciler,
    source::manifest,
};
use service_common::{FAMILY_IPV4, FAMILY_IPV6, SnatAddrKey};
use service_tests::{
    cgroup::TestCgroup,
    fixture::TEST_RUN_IFINDEX,
    netns::{BpffsMount, Netns, unique_suffix},
    packet, packet6,
};

const TC_ACT_SHOT: u32 = 2;
/// Whether the socket-level programs translate IPv6 (connect6 and the
/// rest) yet.
const HOST_IPV6: bool = true;
/// New flows tried per flow at most while collecting its endpoints: with
/// the largest table's 4 endpoints, missing one of them by chance in 200
/// flows has a probability below 1e-24 (and the hash is deterministic, so
/// a run that passes passes every time).
const MAX_PROBES: u16 = 200;

/// What one packet did, read from the program's verdict and output frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    Untouched,
    Drop,
    Reject,
    Forward {
        endpoint: SocketAddr,
        masquerade: bool,
    },
    /// Anything else (a frame the runner cannot read back as one of the
    /// above): always a failure.
    Other,
}

/// Addresses, protocol and destination port of an Ethernet + IPv4 or IPv6
/// frame (the port read from the same bytes of TCP, UDP and SCTP alike),
/// plus the TCP flags and the ICMP/ICMPv6 type and code where there are
/// some.
struct Header {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    dport: u16,
    tcp_flags: u8,
    icmp: (u8, u8),
}

fn header(frame: &[u8]) -> Option<Header> {
    if let Some(p) = packet6::parse(frame) {
        let l4 = frame.get(p.l4_off..)?;
        let icmp = p.next == packet6::PROTO_ICMPV6;
        return Some(Header {
            src: p.src.into(),
            dst: p.dst.into(),
            proto: p.next,
            dport: if icmp { 0 } else { p.dport },
            tcp_flags: if p.next == 6 { *l4.get(13)? } else { 0 },
            icmp: if icmp { (*l4.first()?, *l4.get(1)?) } else { (0, 0) },
        });
    }
    let ip = frame.get(14..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    let l4 = ip.get(ihl..)?;
    let (proto, src, dst) = (*ip.get(9)?, ip.get(12..16)?, ip.get(16..20)?);
    Some(Header {
        src: Ipv4Addr::new(src[0], src[1], src[2], src[3]).into(),
        dst: Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3]).into(),
        proto,
        dport: if proto == 1 { 0 } else { u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?]) },
        tcp_flags: if proto == 6 { *l4.get(13)? } else { 0 },
        icmp: if proto == 1 { (*l4.first()?, *l4.get(1)?) } else { (0, 0) },
    })
}

/// A flow's first packet; `None` for SCTP over IPv6 (no table has one).
fn frame(protocol: Protocol, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Option<Vec<u8>> {
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => Some(match protocol {
            Protocol::Tcp => packet::tcp_v4(src, sport, dst, dport, 0x02, b""),
            Protocol::Udp => packet::udp_v4(src, sport, dst, dport, b"probe"),
            Protocol::Sctp => packet::sctp_init_v4(src, sport, dst, dport),
        }),
        (IpAddr::V6(src), IpAddr::V6(dst)) => match protocol {
            Protocol::Tcp => Some(packet6::tcp(src, sport, dst, dport, 0x02, b"")),
            Protocol::Udp => Some(packet6::udp(src, sport, dst, dport, b"probe")),
            Protocol::Sctp => None,
        },
        _ => None,
    }
}

fn seen(sent: &[u8], retval: u32, out: &[u8]) -> Seen {
    if retval == TC_ACT_SHOT {
        return Seen::Drop;
    }
    if out == sent {
        return Seen::Untouched;
    }
    let (Some(sent), Some(got)) = (header(sent), header(out)) else { return Seen::Other };
    if got.dst == sent.src && got.src == sent.dst {
        let rst = got.proto == 6 && got.tcp_flags & 0x04 != 0;
        // ICMP port unreachable (3/3), ICMPv6 port unreachable (1/4).
        let unreachable = got.proto == 1 && got.icmp == (3, 3) || got.proto == 58 && got.icmp == (1, 4);
        return if rst || unreachable { Seen::Reject } else { Seen::Other };
    }
    if got.proto != sent.proto || got.dst == sent.dst && got.dport == sent.dport {
        return Seen::Other;
    }
    Seen::Forward { endpoint: SocketAddr::new(got.dst, got.dport), masquerade: got.src != sent.src }
}

/// Both classifiers, loaded once, and the socket-level programs attached
/// to a test cgroup, with the maps they share pinned under a private bpffs.
struct Programs {
    ebpf: aya::Ebpf,
    root: std::path::PathBuf,
    _bpffs: BpffsMount,
    /// Last: removed after the programs (dropped with `ebpf`) left it.
    cgroup: TestCgroup,
}

impl Programs {
    fn load() -> Self {
        let bpffs = BpffsMount::new().expect("mount bpffs");
        let root = bpffs.path().join("node");
        let mut ebpf = maps::load(&root, MapSizes::default()).expect("load object");
        for name in [service_common::PROG_POD_INGRESS, service_common::PROG_EXTERNAL_INGRESS] {
            let prog: &mut SchedClassifier = ebpf.program_mut(name).expect("program").try_into().expect("classifier");
            prog.load().expect("verifier accepts the program");
        }
        // Attached as the agent attaches them (attach/socket.rs), to a
        // cgroup only this test's probes run in.
        let cgroup = TestCgroup::new().expect("test cgroup");
        let dir = std::fs::File::open(cgroup.path()).expect("open the test cgroup");
        for (_, name) in service_common::PROGS_SOCK {
            let prog: &mut CgroupSockAddr = ebpf.program_mut(name).expect("program").try_into().expect("sock_addr");
            prog.load().expect("verifier accepts the program");
            prog.attach(&dir, CgroupAttachMode::Single).expect("attach to the test cgroup");
        }
        Self { ebpf, root, _bpffs: bpffs, cgroup }
    }

    fn fd(&self, entry: Entry) -> BorrowedFd<'_> {
        let name = match entry {
            Entry::Pod => service_common::PROG_POD_INGRESS,
            Entry::External => service_common::PROG_EXTERNAL_INGRESS,
            Entry::Host => unreachable!("host flows run through sockets, not a classifier"),
        };
        let prog: &SchedClassifier = self.ebpf.program(name).expect("program").try_into().expect("classifier");
        prog.fd().expect("fd").as_fd()
    }

    /// The counters that moved between two readings, by name.
    fn moved(before: &[(&'static str, u64)], after: &[(&'static str, u64)]) -> String {
        let mut out = String::new();
        for ((name, a), (_, b)) in before.iter().zip(after) {
            if b > a {
                let _ = write!(out, " {name}+{}", b - a);
            }
        }
        out
    }
}

/// A namespace routed like the table's node: its addresses on a veth, a
/// default route of each family into it, forwarding on.
fn node_namespace(addresses: &[IpAddr]) -> Netns {
    let ns = Netns::new(&format!("sd-flows-{}", unique_suffix())).expect("netns");
    ns.ip(&["link", "set", "lo", "up"]).expect("lo");
    ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"]).expect("veth");
    ns.ip(&["link", "set", "eth0", "up"]).expect("eth0 up");
    ns.ip(&["link", "set", "eth1", "up"]).expect("eth1 up");
    for a in addresses {
        match a {
            IpAddr::V4(a) => ns.ip(&["addr", "add", &format!("{a}/24"), "dev", "eth0"]),
            IpAddr::V6(a) => ns.ip(&["-6", "addr", "add", &format!("{a}/64"), "dev", "eth0", "nodad"]),
        }
        .expect("node address");
    }
    ns.ip(&["route", "add", "default", "dev", "eth0"]).expect("default route");
    ns.ip(&["-6", "route", "add", "default", "dev", "eth0"]).expect("IPv6 default route");
    ns.sysctl("net.ipv4.ip_forward=1").expect("forwarding");
    ns.sysctl("net.ipv6.conf.all.forwarding=1").expect("IPv6 forwarding");
    ns
}

/// Runs `flow`'s first packets through the program of `entry` and sums up
/// what they did as an outcome (with the counters that moved, for the
/// report).
fn run_flow(
    programs: &Programs,
    entry: Entry,
    flow: &flows::Flow,
    expected: &Outcome,
    next_port: &mut u16,
) -> (Outcome, String) {
    let probe = flow.probe(entry);
    let dst = probe.destination.ip();
    let fd = programs.fd(entry);
    let stats = || maps::read_stats(&programs.root).expect("stats");
    let before = stats();
    let mut endpoints = BTreeSet::new();
    let mut masquerade = false;
    let mut last = Seen::Other;
    for _ in 0..MAX_PROBES {
        // A fresh source port each time: a new flow, never a conntrack
        // entry of an earlier one.
        *next_port = if *next_port == u16::MAX { 1024 } else { *next_port + 1 };
        let Some(sent) = frame(probe.protocol, probe.source, *next_port, dst, probe.destination.port()) else {
            panic!("flow {:?}: {} from {} to {dst}: no such frame", flow.name, probe.protocol, probe.source)
        };
        let out = packet::prog_test_run(fd, &sent, 1).expect("BPF_PROG_TEST_RUN");
        last = seen(&sent, out.retval, &out.data_out);
        let Seen::Forward { endpoint, masquerade: m } = last else { break };
        endpoints.insert(endpoint);
        masquerade |= m;
        if let Outcome::Forward { endpoints: want, .. } = expected
            && want.is_subset(&endpoints)
        {
            break;
        }
    }
    let outcome = match last {
        Seen::Untouched => Outcome::Untouched,
        Seen::Drop => Outcome::Drop,
        Seen::Reject => Outcome::Reject,
        Seen::Forward { .. } => Outcome::Forward { endpoints, masquerade },
        Seen::Other => Outcome::Forward { endpoints: BTreeSet::new(), masquerade: false },
    };
    (outcome, Programs::moved(&before, &stats()))
}

/// Sockets a host flow connects at most while collecting its endpoints,
/// in batches of [`PROBE_BATCH`] until every expected one was a peer. Each
/// socket gets a random slot of the Maglev table (at least 31 slots, every
/// backend within one slot of an equal share, so at least 1/n - 1/31 of
/// them): with 4 endpoints, missing one in 128 sockets has a probability
/// below 4 × (1 - (1/4 - 1/31))^128 ≈ 1e-13.
const MAX_SOCKETS: usize = 128;
const PROBE_BATCH: usize = 16;

/// Runs the node's own `flow` through the socket-level programs: sockets
/// connected from the test cgroup in `ns` (with `sock-client probe-*`),
/// their real peers summed up as an outcome.
fn run_host_flow(programs: &Programs, ns: &Netns, flow: &flows::Flow, expected: &Outcome) -> (Outcome, String) {
    let mode = match flow.protocol() {
        Protocol::Tcp => "probe-tcp",
        Protocol::Udp => "probe-udp",
        Protocol::Sctp => panic!("flow {:?}: SCTP from the node (the socket path has no SCTP)", flow.name),
    };
    let stats = || maps::read_stats(&programs.root).expect("stats");
    let before = stats();
    let destination = flow.destination.to_string();
    let batch = PROBE_BATCH.to_string();
    let mut peers = BTreeSet::new();
    let mut failure = None;
    for _ in 0..MAX_SOCKETS / PROBE_BATCH {
        let lines = programs.cgroup.sock_client_with(ns, &[mode, &destination, &batch]).expect("sock-client");
        for line in &lines {
            match line.strip_prefix("peer ").map(str::parse::<SocketAddr>) {
                Some(Ok(peer)) => {
                    peers.insert(peer);
                }
                _ => failure = Some(line.clone()),
            }
        }
        let all_seen = matches!(expected, Outcome::Forward { endpoints, .. } if endpoints.is_subset(&peers));
        if failure.is_some() || peers.contains(&flow.destination) || all_seen {
            break;
        }
    }
    let errno = |n: i32| failure.as_deref().is_some_and(|l| l.contains(&format!("(os error {n})")));
    let outcome = if errno(libc::ECONNREFUSED) && peers.is_empty() {
        Outcome::Reject
    } else if errno(libc::ENETUNREACH) && peers.is_empty() {
        Outcome::Drop
    } else if failure.is_none() && peers == BTreeSet::from([flow.destination]) {
        Outcome::Untouched
    } else if failure.is_none() && !peers.contains(&flow.destination) {
        Outcome::Forward { endpoints: peers, masquerade: false }
    } else {
        // A failure of another kind, or a mix: never an expectation.
        Outcome::Forward { endpoints: BTreeSet::new(), masquerade: false }
    };
    let detail = failure.map(|f| format!(" [{f}]")).unwrap_or_default();
    (outcome, format!("{}{detail}", Programs::moved(&before, &stats())))
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn every_flow_table_agrees_with_the_programs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("flows");
    let tables = flows::load(&dir);
    assert!(!tables.is_empty(), "no flow tables under {}", dir.display());
    let mut programs = Programs::load();
    let mut reconciler =
        Reconciler::new(PinnedMaps::from_ebpf(&mut programs.ebpf, MapSizes::default()).expect("maps")).expect("dump");
    let mut tally = flows::Tally::new();
    let mut next_port = 1024;
    for (path, table) in &tables {
        let name = path.strip_prefix(&dir).unwrap_or(path).display().to_string();
        let snapshot = manifest::parse(Path::new(&name), &table.objects);
        assert!(snapshot.errors.is_empty(), "{name}: objects: {:?}", snapshot.errors);
        // The same reconciler goes from table to table, as an agent goes
        // from one state of the cluster to the next.
        let report = reconciler.reconcile(&model::desired(&snapshot.objects, &table.node_context()));
        assert!(report.errors.is_empty(), "{name}: {:?}", report.errors);
        // The first node address of each family is the SNAT address of
        // that family, for the interface test runs come from and hairpins.
        let mut snat = BTreeMap::new();
        for node in &table.node.addresses {
            let family = if node.is_ipv6() { FAMILY_IPV6 } else { FAMILY_IPV4 };
            snat.entry(SnatAddrKey::new(service_common::SNAT_HAIRPIN, family)).or_insert(*node);
            snat.entry(SnatAddrKey::new(TEST_RUN_IFINDEX, family)).or_insert(*node);
        }
        maps::write_snat_addrs(&programs.root, &snat).expect("snat rows");
        let ns = node_namespace(&table.node.addresses);
        let programs = &programs;
        let ns = &ns;
        ns.run_in(|| {
            // The node's own sockets are those of this namespace, as the
            // agent's are (`--socket-lb host`): the cookie is read here.
            maps::write_socket_lb(&programs.root, service_common::socket_lb::HOST).expect("socket_lb row");
            for flow in &table.flows {
                match table.entry(flow) {
                    Ok(Entry::Host) if flow.destination.is_ipv6() && !HOST_IPV6 => {
                        tally.skip(&name, flow, "IPv6 from the node: the connect6 hooks are not in yet");
                    }
                    Ok(entry) => {
                        let (got, moved) = if entry == Entry::Host {
                            run_host_flow(programs, ns, flow, &flow.expected())
                        } else {
                            run_flow(programs, entry, flow, &flow.expected(), &mut next_port)
                        };
                        tally.record(&name, flow, entry, &got, &format!(" (counters:{moved})"));
                    }
                    Err(why) => tally.skip(&name, flow, &why),
                }
            }
        });
    }
    tally.finish("the programs", tables.len());
}
