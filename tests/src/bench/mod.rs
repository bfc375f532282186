//! `cargo xtask bench [--quick]`: the benchmarks of issue "Benchmarks side
//! by side with kube-proxy's iptables and nftables rulesets", run on this
//! machine in one go, each beside its baseline, reported as ratios.
//!
//! - [`packet_cost`]: ns per packet of the programs (BPF_PROG_TEST_RUN)
//!   against a program that only returns its verdict, at 10, 10k and 100k
//!   Services;
//! - [`traffic`]: connections per second and latency through a ClusterIP
//!   in the netns topology, ours against kube-proxy's iptables and nftables
//!   rulesets and against no translation;
//! - [`control_plane`]: programming time, one-change latency, memory,
//!   against `iptables-restore` / `nft -f` of the same Services;
//! - [`socket_lb`]: a pod's new connections and round trips on an
//!   established connection through a ClusterIP with `--socket-lb all`,
//!   against the packet path and against dialling the pod directly, and
//!   the pod program's share of such a round trip on each;
//! - [`report`]: the environment line, the tables (printed and written to
//!   `benchmarks.md`) and the PNG charts.

pub mod control_plane;
pub mod packet_cost;
pub mod report;
pub mod socket_lb;
pub mod traffic;

/// A distribution summary.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub n: usize,
    pub median: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
}

/// The `p`th percentile (nearest rank) of sorted samples; 0 when empty.
#[must_use]
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a rank within the slice"
    )]
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summarizes samples.
#[must_use]
pub fn summarize(mut samples: Vec<f64>) -> Stats {
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    if n == 0 {
        return Stats::default();
    }
    #[expect(clippy::cast_precision_loss, reason = "sample counts")]
    let mean = samples.iter().sum::<f64>() / n as f64;
    Stats {
        n,
        median: percentile(&samples, 50.0),
        p99: percentile(&samples, 99.0),
        min: samples[0],
        max: samples[n - 1],
        mean,
    }
}

/// How much to run.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub quick: bool,
    /// BPF_PROG_TEST_RUN samples per case.
    pub packet_runs: usize,
    pub packet_sizes: &'static [usize],
    /// Repeats of each traffic measurement (fresh topology each).
    pub traffic_repeats: usize,
    pub traffic_seconds: f64,
    pub traffic_sizes: &'static [usize],
    pub workers: usize,
    /// Established connections of the round-trip load ([`socket_lb`]).
    pub round_trip_connections: usize,
    /// The slices each of [`socket_lb`]'s runs is cut into (the paths
    /// take turns slice by slice).
    pub socket_slices: usize,
    pub control_services: usize,
    /// `--scale`: the control plane section again at this many Services
    /// (ours only: kube-proxy's full loads take minutes to hours there).
    pub control_scale_services: Option<usize>,
    /// kube-proxy's iptables-restore and nft loads beside ours at
    /// [`Self::control_services`] (`--ours-only` turns them off, to profile
    /// the agent's own steps: they take minutes at 10,000 Services).
    pub control_kube_proxy: bool,
    pub control_endpoints_per_service: usize,
    pub control_changes: usize,
    /// Repeats of kube-proxy's full loads.
    pub control_repeats: usize,
    /// Repeats of ours (program all and the changes), each into fresh
    /// maps: program all moves by a third between runs on a shared
    /// machine, so more than kube-proxy's minutes-long loads get.
    pub program_all_repeats: usize,
}

impl Plan {
    /// The Services of the traffic section's `--scale` case.
    pub const TRAFFIC_SCALE_SERVICES: usize = 30_000;
    /// The Services of the control plane section's `--scale` case.
    pub const CONTROL_SCALE_SERVICES: usize = 50_000;

    /// [`Self::new`], with the `--scale` cases: the traffic section also
    /// at 30,000 Services, the control plane section also at 50,000.
    #[must_use]
    pub const fn with_scale(quick: bool) -> Self {
        let mut plan = Self::new(quick);
        plan.traffic_sizes = &[1, 1_000, 10_000, Self::TRAFFIC_SCALE_SERVICES];
        plan.control_scale_services = Some(Self::CONTROL_SCALE_SERVICES);
        plan
    }

    #[must_use]
    pub const fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                packet_runs: 100_000,
                packet_sizes: &[10, 10_000, 100_000],
                traffic_repeats: 2,
                traffic_seconds: 1.5,
                traffic_sizes: &[1, 1_000, 10_000],
                workers: 4,
                round_trip_connections: 1,
                socket_slices: 2,
                // nft -f of 100,000 endpoint chains alone takes minutes on
                // nft 1.0.6: the quick run uses a fifth of the full size.
                control_services: 2_000,
                control_scale_services: None,
                control_kube_proxy: true,
                control_endpoints_per_service: 10,
                control_changes: 50,
                control_repeats: 1,
                program_all_repeats: 3,
            }
        } else {
            Self {
                quick,
                packet_runs: 1_000_000,
                packet_sizes: &[10, 10_000, 100_000],
                traffic_repeats: 5,
                traffic_seconds: 8.0,
                traffic_sizes: &[1, 1_000, 10_000],
                workers: 4,
                round_trip_connections: 1,
                socket_slices: 8,
                control_services: 10_000,
                control_scale_services: None,
                control_kube_proxy: true,
                control_endpoints_per_service: 10,
                control_changes: 200,
                control_repeats: 2,
                program_all_repeats: 5,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile(&s, 50.0) - 50.0).abs() < f64::EPSILON);
        assert!((percentile(&s, 99.0) - 99.0).abs() < f64::EPSILON);
        assert!((percentile(&[7.0], 99.0) - 7.0).abs() < f64::EPSILON);
        let st = summarize(vec![3.0, 1.0, 2.0]);
        assert_eq!((st.n, st.min, st.max), (3, 1.0, 3.0));
        assert!((st.median - 2.0).abs() < f64::EPSILON);
    }
}
