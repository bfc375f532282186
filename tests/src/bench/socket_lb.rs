//! Benchmark 4: socket-level load balancing for pods (`--socket-lb all`)
//! against the packet path (`--socket-lb off`) and against dialling the pod
//! directly, in the topology of [`super::traffic`] (a client pod, a
//! ClusterIP with 3 backend pods on the node, 1 Service).
//!
//! The client is a `sock-client` process in the client pod's network
//! namespace, inside a [`TestCgroup`] under the bench's own cgroup: with
//! `--socket-lb all` that cgroup is the agent's `--cgroup-root`, so the
//! client's connect() is translated by the cgroup hook and its packets
//! carry the backend's address (the TC program passes them untouched). The
//! other two paths run the same client in a cgroup of their own, so the
//! three differ only in what translates. They run side by side, taking
//! turns in short slices ([`round`]). Two loads: new connections
//! ([`traffic::new_connections`], as in section 2) and round trips on
//! established connections ([`traffic::round_trips`]), which price the
//! per-packet work of a flow that is already set up.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result};

use super::{
    packet_cost::{self, CASES},
    traffic::{self, Bench, RunResult, TrafficResult, Variant},
};
use crate::{cgroup::TestCgroup, fixture, netns::Family};

/// What takes the client's connections to a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// `--socket-lb all`: the connect() hook, then no translation at all.
    SocketLb,
    /// `--socket-lb off`: the TC programs (DNAT, conntrack, reverse NAT).
    PacketPath,
    /// The client dials the pod IPs; no agent.
    Direct,
}

impl Path {
    pub const ALL: [Self; 3] = [Self::SocketLb, Self::PacketPath, Self::Direct];

    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::SocketLb => "ClusterIP, `--socket-lb all` (socket path)",
            Self::PacketPath => "ClusterIP, `--socket-lb off` (packet path)",
            Self::Direct => "pod IP dialled directly, no dataplane",
        }
    }

    /// The addresses the client dials (the workers take them in turn).
    fn targets(self) -> Vec<SocketAddr> {
        match self {
            Self::SocketLb | Self::PacketPath => vec![traffic::cluster_ip(Family::V4)],
            Self::Direct => traffic::backends(Family::V4),
        }
    }
}

/// One run's figures: new connections, and round trips on established
/// connections (its `connections_per_s` is round trips per second).
#[derive(Clone, Debug)]
pub struct Run {
    pub connections: RunResult,
    pub round_trips: RunResult,
}

/// A path over the repeats.
#[derive(Clone, Debug)]
pub struct SocketLbResult {
    pub path: Path,
    pub connections: TrafficResult,
    pub round_trips: TrafficResult,
}

/// What the pod program costs a round trip on `path`, in ns per packet
/// (BPF_PROG_TEST_RUN medians, as in section 1).
#[derive(Clone, Debug)]
pub struct ProgramCost {
    pub path: Path,
    /// The client's packet, on the client pod's interface.
    pub request_ns: f64,
    /// The backend's answer, on the backend pod's interface.
    pub reply_ns: f64,
}

/// The programs' share of a round trip, measured as section 1 does
/// ([`packet_cost::measure`] at `services` Services, `runs` samples): on the
/// packet path an established flow's packet (DNAT) and the backend's reply
/// (reverse NAT); on the socket path both carry pod addresses, so the
/// program finds no Service for either (the "not a Service" case: the
/// client pod's packet to a backend pod; the reply takes the same lookups
/// and misses); dialled directly, no program runs.
///
/// # Errors
/// When the object cannot be loaded or a run fails.
pub fn program_cost(services: usize, runs: usize) -> Result<Vec<ProgramCost>> {
    let cases = packet_cost::measure(services, runs)?;
    let ns = |case: &str| cases.iter().find(|c| c.case == case).map_or(0.0, |c| c.ns.median);
    let (not_a_service, established, reply) = (ns(CASES[1]), ns(CASES[3]), ns(CASES[4]));
    Ok(vec![
        ProgramCost { path: Path::SocketLb, request_ns: not_a_service, reply_ns: not_a_service },
        ProgramCost { path: Path::PacketPath, request_ns: established, reply_ns: reply },
        ProgramCost { path: Path::Direct, request_ns: 0.0, reply_ns: 0.0 },
    ])
}

/// The topology, the agent as `path` wants it, and the client's cgroup.
/// Field order is drop order: the agent detaches its hooks before the
/// cgroup is removed.
struct Setup {
    bench: Bench,
    cgroup: TestCgroup,
}

fn setup(path: Path) -> Result<Setup> {
    let cgroup = TestCgroup::new()?;
    let root = cgroup.path().display().to_string();
    let bench = match path {
        Path::SocketLb => {
            traffic::setup_with(Variant::Ours, 1, Family::V4, &["--socket-lb", "all", "--cgroup-root", &root])?
        }
        Path::PacketPath => traffic::setup_with(Variant::Ours, 1, Family::V4, &[])?,
        Path::Direct => traffic::setup_with(Variant::Floor, 1, Family::V4, &[])?,
    };
    Ok(Setup { bench, cgroup })
}

/// `sock-client MODE TARGET WORKERS SECONDS [TARGET...]` in the client pod,
/// inside the cgroup; its figures.
fn client(s: &Setup, mode: &str, targets: &[SocketAddr], workers: usize, duration: Duration) -> Result<RunResult> {
    let (workers, seconds) = (workers.to_string(), duration.as_secs_f64().to_string());
    let targets: Vec<String> = targets.iter().map(ToString::to_string).collect();
    let mut args = vec![mode, targets[0].as_str(), workers.as_str(), seconds.as_str()];
    args.extend(targets[1..].iter().map(String::as_str));
    let lines = s.cgroup.sock_client_with(s.bench.client(), &args)?;
    lines.iter().find_map(|l| RunResult::parse(l)).with_context(|| format!("sock-client {mode}: {lines:?}"))
}

/// One round: the three paths set up side by side on fresh topologies
/// (each warmed up: ARP, first flows), then `slices` slices of `slice`
/// each of both loads, the paths taking turns slice by slice (each slice
/// led by the next path), so that a change of the machine's load (other
/// work on a small machine) lands on all three alike. A slice of the round-trip load keeps `connections`
/// established connections, one of new connections runs `workers`
/// workers. The runs of each path, in [`Path::ALL`]'s order.
///
/// # Errors
/// When a topology, an agent or the client fails.
pub fn round(workers: usize, connections: usize, slices: usize, slice: Duration) -> Result<Vec<Vec<Run>>> {
    let setups = Path::ALL
        .iter()
        .map(|p| {
            let s = setup(*p).with_context(|| p.label())?;
            client(&s, "tcp-rate", &p.targets(), workers, Duration::from_millis(300))?;
            Ok((*p, s))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut runs = vec![Vec::new(); setups.len()];
    for k in 0..slices {
        // Each slice starts with another path: what a slice leaves behind
        // (the packet path's agent collecting the conntrack entries of
        // thousands of closed flows) lands on each path in turn.
        let order: Vec<usize> = (0..setups.len()).map(|i| (i + k) % setups.len()).collect();
        let mut round_trips = vec![None; setups.len()];
        for &i in &order {
            let (p, s) = &setups[i];
            round_trips[i] = Some(client(s, "tcp-rr", &p.targets(), connections, slice)?);
        }
        for &i in &order {
            let (p, s) = &setups[i];
            let connections = client(s, "tcp-rate", &p.targets(), workers, slice)?;
            let round_trips = round_trips[i].take().context("measured above")?;
            runs[i].push(Run { connections, round_trips });
        }
    }
    Ok(runs)
}

/// The runs of one path, summarized.
#[must_use]
pub fn combine(path: Path, runs: &[Run]) -> SocketLbResult {
    let variant = if path == Path::Direct { Variant::Floor } else { Variant::Ours };
    let of = |pick: fn(&Run) -> RunResult| {
        traffic::combine(variant, 1, Family::V4, &runs.iter().map(pick).collect::<Vec<_>>())
    };
    SocketLbResult { path, connections: of(|r| r.connections.clone()), round_trips: of(|r| r.round_trips.clone()) }
}

/// Checks that a ClusterIP path is what it claims: 60 connections from the
/// pod reach all 3 backends, and with `--socket-lb all` the connect() hook
/// translated them and the packet path never saw a new Service flow
/// (`sock_connect` moved, `dnat_new_flow` did not); with `off`, the
/// other way round. Nothing to check when dialling directly.
///
/// # Errors
/// When a connection fails, a backend is not reached or the wrong path
/// translated.
pub fn check(path: Path) -> Result<()> {
    if path == Path::Direct {
        return Ok(());
    }
    let s = setup(path)?;
    let root = s.bench.agent_root().context("the agent's bpffs root")?;
    let counters = || -> Result<(u64, u64)> {
        Ok((fixture::counter(&root, "sock_connect")?, fixture::counter(&root, "dnat_new_flow")?))
    };
    let before = counters()?;
    let vip = traffic::cluster_ip(Family::V4).to_string();
    let lines = s.cgroup.sock_client_with(s.bench.client(), &["tcp-many", &vip, "60"])?;
    let after = counters()?;
    let reached = lines.iter().find_map(|l| l.strip_prefix("backends ")).map(|b| b.split(',').count());
    anyhow::ensure!(reached == Some(3), "{}: {lines:?}", path.label());
    let moved = (after.0 - before.0, after.1 - before.1);
    let expected = if path == Path::SocketLb { moved.0 >= 60 && moved.1 == 0 } else { moved.0 == 0 && moved.1 >= 60 };
    anyhow::ensure!(expected, "{}: sock_connect +{}, dnat_new_flow +{}", path.label(), moved.0, moved.1);
    Ok(())
}
