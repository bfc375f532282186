//! Benchmark 1: the per-packet cost of the programs, with BPF_PROG_TEST_RUN,
//! over IPv4 and IPv6.
//!
//! The maps are filled through the agent's own reconciler with `n` ClusterIP
//! Services (the measured one, 10.96.0.10:80 with three backends, plus
//! `n - 1` others). Then, inside a fresh network namespace, each case runs
//! the real `service_pod_ingress` program on a crafted frame: a new flow's
//! SYN, a packet of an established flow, a backend's reply, a packet to no
//! Service; and `service_bench_floor`, which only returns its pass verdict.
//!
//! The programs rewrite the frame in place and BPF_PROG_TEST_RUN reuses one
//! skb for all repetitions of a call, so a call with `repeat > 1` would
//! measure the first packet once and then the rewritten one. Each sample is
//! therefore one call with `repeat = 1` on a fresh copy of the frame (the
//! kernel times the program run alone, in ns); `runs` samples per case. The
//! floor and the non-service packet, which are not rewritten, are also
//! measured the classic way (one call, `repeat = 1e6`) as a cross-check.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd as _,
};

use anyhow::{Context as _, Result};
use aya::programs::SchedClassifier;
use service_agent::{
    maps::{self, MapSizes, PinnedMaps},
    model::{Backend, Desired, DesiredFrontend, Frontend, FrontendKind, Protocol, Scope, WhenEmpty},
    reconciler::Reconciler,
    vocabulary::ObjectRef,
};

use super::{Stats, summarize};
use crate::{
    netns::{BpffsMount, Netns, unique_suffix},
    packet, packet6,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKENDS: [Ipv4Addr; 3] =
    [Ipv4Addr::new(10, 244, 1, 11), Ipv4Addr::new(10, 244, 1, 12), Ipv4Addr::new(10, 244, 1, 13)];

/// One case's samples at one Service count.
#[derive(Clone, Debug)]
pub struct CaseResult {
    pub services: usize,
    pub case: &'static str,
    pub ns: Stats,
}

/// The cases, in report order: IPv4's, then the same over IPv6 (an IPv6
/// ClusterIP with three backends beside the IPv4 ones).
pub const CASES: [&str; 9] = [
    "floor (pass only)",
    "not a Service",
    "new flow (SYN)",
    "established flow",
    "reply (reverse NAT)",
    "IPv6: not a Service",
    "IPv6: new flow (SYN)",
    "IPv6: established flow",
    "IPv6: reply (reverse NAT)",
];

const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);
const BACKENDS6: [Ipv6Addr; 3] = [
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x11),
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x12),
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x13),
];

/// `n` ClusterIP frontends: the measured one and `n - 1` others with two
/// backends each, as the model would produce them; and the measured IPv6
/// ClusterIP (the IPv6 twin of a dual-stack Service).
#[must_use]
pub fn synthetic(n: usize) -> Desired {
    let mut desired = Desired::default();
    let mut add = |i: usize, vip: IpAddr, backends: Vec<IpAddr>| {
        let frontend = Frontend { addr: vip, port: 80, protocol: Protocol::Tcp, scope: Scope::Internal };
        let mut backends: Vec<Backend> = backends
            .into_iter()
            .map(|b| Backend { addr: b, port: 8080, protocol: Protocol::Tcp, local: true, ready: true })
            .collect();
        backends.sort();
        desired.frontends.insert(
            frontend,
            std::sync::Arc::new(DesiredFrontend {
                service: ObjectRef { namespace: "bench".into(), name: format!("svc-{i}").into() },
                port_name: "http".into(),
                frontend,
                kind: FrontendKind::ClusterIp,
                backends,
                when_empty: WhenEmpty::Reject,
                affinity_timeout_s: None,
                affinity_scope: None,
                source_ranges: Vec::new(),
                masquerade: false,
            }),
        );
    };
    add(0, VIP.into(), BACKENDS.iter().map(|b| IpAddr::V4(*b)).collect());
    add(0, VIP6.into(), BACKENDS6.iter().map(|b| IpAddr::V6(*b)).collect());
    for i in 1..n {
        let i32_ = u32::try_from(i).unwrap_or(u32::MAX);
        // 10.97.0.0/16 and up for the others; backends in 10.250.0.0/15.
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 97, 0, 0)) + i32_);
        let b = u32::from(Ipv4Addr::new(10, 250, 0, 0)) + 2 * i32_;
        add(i, vip.into(), vec![Ipv4Addr::from(b).into(), Ipv4Addr::from(b + 1).into()]);
    }
    desired
}

/// Map capacities for `n` Services of [`synthetic`].
#[must_use]
pub fn sizes(n: usize) -> MapSizes {
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    MapSizes {
        // A row per frontend and a table of 31 slots and 2 members (3
        // blocks of 16 ids) per Service, with room for twice that.
        services: (n * 2).max(service_common::capacity::SERVICES),
        backend_slots: (n * 2 * 48).max(service_common::capacity::BACKEND_SLOT_BLOCKS * 16),
        backends: (n * 2 + 16).max(service_common::capacity::BACKENDS),
        conntrack: 4_194_304,
        conntrack_new: 4_194_304,
        ..MapSizes::default()
    }
}

/// Runs every case at `n` Services, `runs` samples each.
///
/// # Errors
/// When the object cannot be loaded, the maps filled or a run fails.
pub fn measure(n: usize, runs: usize) -> Result<Vec<CaseResult>> {
    let bpffs = BpffsMount::new()?;
    let root = bpffs.path().join("bench");
    let ns = Netns::new(&format!("sd-bench-ptr-{}", unique_suffix()))?;
    let desired = synthetic(n);
    let sizes = sizes(n);
    let mut ebpf = maps::load(&root, sizes).context("loading the object")?;
    let mut reconciler = Reconciler::new(PinnedMaps::from_ebpf(&mut ebpf, sizes)?)?;
    let report = reconciler.reconcile(&desired);
    anyhow::ensure!(report.errors.is_empty(), "filling the maps: {:?}", report.errors.first());
    let mut loaded = BTreeMap::new();
    for name in [service_common::PROG_POD_INGRESS, service_common::PROG_BENCH_FLOOR] {
        let prog: &mut SchedClassifier =
            ebpf.program_mut(name).with_context(|| format!("no program {name}"))?.try_into()?;
        prog.load().with_context(|| format!("loading {name}"))?;
        loaded.insert(name, prog.fd()?.as_fd().try_clone_to_owned()?);
    }
    let pod = loaded[service_common::PROG_POD_INGRESS].try_clone()?;
    let floor = loaded[service_common::PROG_BENCH_FLOOR].try_clone()?;
    let results = ns.run_in(move || -> Result<Vec<CaseResult>> {
        let sample = |fd: &std::os::fd::OwnedFd, frame: &[u8]| -> Result<f64> {
            Ok(f64::from(packet::prog_test_run(fd.as_fd(), frame, 1)?.duration_ns))
        };
        let mut out = Vec::new();
        let mut floor_ns = Vec::with_capacity(runs);
        let floor_frame = packet::tcp_v4(CLIENT, 40000, BACKENDS[0], 8080, 0x10, b"");
        for _ in 0..runs {
            floor_ns.push(sample(&floor, &floor_frame)?);
        }
        let pod_sample = |frame: &[u8]| sample(&pod, frame);
        let [other_ns, new_ns, est_ns, rev_ns] =
            family_cases(&pod_sample, &pod, runs, CLIENT.into(), VIP.into(), BACKENDS[0].into(), |i| {
                Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 248, 0, 0)) + u32::try_from(i / 50_000).unwrap_or(0)).into()
            })?;
        let [v6_other_ns, v6_new_ns, v6_est_ns, v6_rev_ns] =
            family_cases(&pod_sample, &pod, runs, CLIENT6.into(), VIP6.into(), BACKENDS6[0].into(), |i| {
                Ipv6Addr::new(0xfd00, 0x10, 0x248, 0, 0, 0, u16::try_from(i / 50_000).unwrap_or(u16::MAX), 1).into()
            })?;
        let all = [floor_ns, other_ns, new_ns, est_ns, rev_ns, v6_other_ns, v6_new_ns, v6_est_ns, v6_rev_ns];
        for (case, samples) in CASES.iter().zip(all) {
            out.push(CaseResult { services: n, case, ns: summarize(samples) });
        }
        Ok(out)
    })?;
    drop(ebpf);
    drop(reconciler);
    Ok(results)
}

/// A TCP frame `src:sport → dst:dport` of the addresses' family.
fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => packet::tcp_v4(s, sport, d, dport, flags, payload),
        (IpAddr::V6(s), IpAddr::V6(d)) => packet6::tcp(s, sport, d, dport, flags, payload),
        _ => unreachable!("a frame's addresses share a family"),
    }
}

/// The destination address of a frame of either family.
fn destination(frame: &[u8]) -> Option<IpAddr> {
    match u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]) {
        0x0800 => packet::parse(frame).map(|p| IpAddr::V4(p.ip_dst)),
        0x86dd => packet6::parse(frame).map(|p| IpAddr::V6(p.dst)),
        _ => None,
    }
}

/// One family's four cases through `pod` (`sample` times one run of a
/// frame), `runs` samples each: a packet to no Service (to `outside`),
/// new flows to `vip` (a distinct `new_client(i)` and port per sample),
/// then one established flow of `client` (its SYN first) and the replies
/// of the backend conntrack chose for it.
fn family_cases(
    sample: &dyn Fn(&[u8]) -> Result<f64>,
    pod: &std::os::fd::OwnedFd,
    runs: usize,
    client: IpAddr,
    vip: IpAddr,
    outside: IpAddr,
    new_client: impl Fn(usize) -> IpAddr,
) -> Result<[Vec<f64>; 4]> {
    let non_service = tcp(client, 40000, outside, 8080, 0x10, b"");
    let (mut other_ns, mut new_ns) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for i in 0..runs {
        other_ns.push(sample(&non_service)?);
        let sport = 10_000 + u16::try_from(i % 50_000).unwrap_or(0);
        new_ns.push(sample(&tcp(new_client(i), sport, vip, 80, 0x02, b""))?);
    }
    let syn = packet::prog_test_run(pod.as_fd(), &tcp(client, 40000, vip, 80, 0x02, b""), 1)?;
    let backend = destination(&syn.data_out).context("parse the SYN's rewrite")?;
    let data = tcp(client, 40000, vip, 80, 0x10, b"GET / HTTP/1.1\r\n\r\n");
    let reply = tcp(backend, 8080, client, 40000, 0x10, b"HTTP/1.1 200 OK\r\n\r\n");
    let (mut est_ns, mut rev_ns) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        est_ns.push(sample(&data)?);
        rev_ns.push(sample(&reply)?);
    }
    Ok([other_ns, new_ns, est_ns, rev_ns])
}

/// The classic measurement for the frames that are not rewritten: one
/// call, `repeat` repetitions, the kernel's average. `(floor, not a
/// Service)` in ns.
///
/// # Errors
/// When the object cannot be loaded or a run fails.
pub fn repeat_cross_check(repeat: u32) -> Result<(f64, f64)> {
    let bpffs = BpffsMount::new()?;
    let root = bpffs.path().join("bench");
    let ns = Netns::new(&format!("sd-bench-rep-{}", unique_suffix()))?;
    let desired = synthetic(10);
    let mut ebpf = maps::load(&root, MapSizes::default())?;
    let mut reconciler = Reconciler::new(PinnedMaps::from_ebpf(&mut ebpf, MapSizes::default())?)?;
    anyhow::ensure!(reconciler.reconcile(&desired).errors.is_empty(), "filling the maps");
    let mut fds = Vec::new();
    for name in [service_common::PROG_BENCH_FLOOR, service_common::PROG_POD_INGRESS] {
        let prog: &mut SchedClassifier = ebpf.program_mut(name).context("program")?.try_into()?;
        prog.load()?;
        fds.push(prog.fd()?.as_fd().try_clone_to_owned()?);
    }
    let frame = packet::tcp_v4(CLIENT, 40000, BACKENDS[0], 8080, 0x10, b"");
    ns.run_in(move || -> Result<(f64, f64)> {
        let floor = packet::prog_test_run(fds[0].as_fd(), &frame, repeat)?.duration_ns;
        let other = packet::prog_test_run(fds[1].as_fd(), &frame, repeat)?.duration_ns;
        Ok((f64::from(floor), f64::from(other)))
    })
}
