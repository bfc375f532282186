//! The environment line, the tables (Markdown, printed and written to
//! `benchmarks.md`) and the PNG charts (plotters, bitmap backend, DejaVu
//! Sans from the system's fonts-dejavu-core).

use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use plotters::prelude::*;

use super::{
    Plan, Stats,
    control_plane::ControlPlane,
    packet_cost::{CASES, CaseResult},
    socket_lb::{Path as SocketPath, ProgramCost, SocketLbResult},
    traffic::{TrafficResult, Variant},
};
use crate::netns::Family;

/// Kernel, CPU model and cores of this machine.
#[must_use]
pub fn environment() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_owned()))
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    format!("kernel {}, CPU {model}, {cores} cores", kernel.trim())
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 { format!("{:.2}×", a / b) } else { "-".into() }
}

/// Everything one run measured.
pub struct Results {
    pub plan: Plan,
    pub commit: String,
    pub env: String,
    pub started: String,
    pub packet: Vec<CaseResult>,
    /// `(floor, not a Service)` ns from one call with `repeat`.
    pub repeat_check: Option<(u32, f64, f64)>,
    pub traffic: Vec<TrafficResult>,
    /// At the plan's size, then (`--scale`) at the larger one.
    pub control: Vec<ControlPlane>,
    pub socket: Vec<SocketLbResult>,
    /// The pod program's share of a round trip per path (section 4).
    pub socket_programs: Vec<ProgramCost>,
}

/// The Markdown report.
#[must_use]
#[expect(clippy::too_many_lines, reason = "one table after the other")]
pub fn markdown(r: &Results) -> String {
    let mut md = String::new();
    let mode = if r.plan.quick { "`cargo xtask bench --quick`" } else { "`cargo xtask bench`" };
    let _ = writeln!(md, "# Benchmarks\n");
    let _ =
        writeln!(md, "Measured by {mode} at commit `{}` on {}.\n\n**Environment:** {}.\n", r.commit, r.started, r.env);
    let _ = writeln!(
        md,
        "Every figure is measured in the same run as its baseline and reported as a ratio to it. \
         Noise guard: each traffic figure is the median of {} runs, each on a fresh topology, the cases \
         interleaved round by round so drift of the machine spreads over all of them (spread = min–max of \
         the runs); each per-packet figure is the median over {} samples, with p99.\n",
        r.plan.traffic_repeats, r.plan.packet_runs
    );

    let _ = writeln!(md, "## 1. Per-packet cost of the programs (BPF_PROG_TEST_RUN)\n");
    let _ = writeln!(
        md,
        "ns per packet as the kernel times one program run (`repeat = 1` per sample on a fresh copy of the \
         frame, since the program rewrites it in place), {} samples per case. The floor is \
         `service_bench_floor`, a program that only returns its pass verdict: it carries the same \
         test-run overhead, so *ratio* = case / floor and *above floor* = case − floor.\n",
        r.plan.packet_runs
    );
    let _ = writeln!(
        md,
        "| Services in the maps | case | median ns | p99 ns | mean ns | ratio to floor (median) | above floor (ns) |"
    );
    let _ = writeln!(md, "|---:|---|---:|---:|---:|---:|---:|");
    for n in r.plan.packet_sizes {
        let floor = r.packet.iter().find(|c| c.services == *n && c.case == CASES[0]).map_or(0.0, |c| c.ns.median);
        for c in r.packet.iter().filter(|c| c.services == *n) {
            let _ = writeln!(
                md,
                "| {n} | {} | {:.0} | {:.0} | {:.1} | {} | {:.0} |",
                c.case,
                c.ns.median,
                c.ns.p99,
                c.ns.mean,
                ratio(c.ns.median, floor),
                c.ns.median - floor
            );
        }
    }
    if let Some((repeat, floor, other)) = r.repeat_check {
        let _ = writeln!(
            md,
            "\nCross-check with one call of `repeat = {repeat}` (frames the programs leave unchanged): floor \
             {floor:.1} ns, not a Service {other:.1} ns per run (ratio {}).\n",
            ratio(other, floor)
        );
    }
    let _ = writeln!(md, "\n![ns per packet](bench-packet-cost.png)\n");

    let _ = writeln!(md, "## 2. Connections through a ClusterIP (netns, real TCP)\n");
    let _ = writeln!(
        md,
        "A client pod opens new TCP connections to a ClusterIP with 3 backend pods on the same node \
         ({} worker threads, {:.0} s per run): connect, send one line, read the backend's answer, close. \
         Latency is connect to answer. Sockets close with `SO_LINGER 0` and the client's port range is \
         1024–65535, so no 4-tuple is reused while an earlier one lingers in TIME_WAIT or conntrack (the \
         SYN-retransmit trap). The floors dial the pod IPs directly; one without any netfilter rule, one \
         with netfilter conntrack active in the node (as it is under either kube-proxy ruleset): compare \
         the kube-proxy rows with the second, ours with the first. Each family is measured on its own: \
         the IPv6 rows use single-stack IPv6 Services (the same plan, every address its IPv6 twin) and \
         kube-proxy's IPv6 rulesets (`ip6tables-restore`, an `ip6 kube-proxy` table), and their ratios are \
         to the IPv6 floors.\n",
        r.plan.workers, r.plan.traffic_seconds
    );
    let conn = |v: Variant, n: Option<usize>, family: Family| {
        r.traffic
            .iter()
            .find(|t| t.variant == v && t.family == family && n.is_none_or(|n| t.services == n))
            .map_or(0.0, |t| t.connections_per_s.median)
    };
    let _ = writeln!(
        md,
        "| family | Services | dataplane | conn/s (median) | spread | ratio to floor | ratio to floor with conntrack | p50 ms | p99 ms | errors |"
    );
    let _ = writeln!(md, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for t in &r.traffic {
        let services = if matches!(t.variant, Variant::Floor | Variant::FloorConntrack) {
            "-".to_owned()
        } else {
            t.services.to_string()
        };
        let (floor, floor_ct) = (conn(Variant::Floor, None, t.family), conn(Variant::FloorConntrack, None, t.family));
        let _ = writeln!(
            md,
            "| {} | {services} | {} | {:.0} | {:.0}–{:.0} | {} | {} | {:.3} | {:.3} | {} |",
            t.family,
            t.variant.label(),
            t.connections_per_s.median,
            t.connections_per_s.min,
            t.connections_per_s.max,
            ratio(t.connections_per_s.median, floor),
            ratio(t.connections_per_s.median, floor_ct),
            t.p50_ms.median,
            t.p99_ms.median,
            t.errors
        );
    }
    let _ = writeln!(
        md,
        "\nRatios between the dataplanes at the same Service count and family, and of each dataplane's IPv6 \
         rate to its IPv4 rate:\n"
    );
    let _ = writeln!(md, "| family | Services | ours / iptables | ours / nftables |");
    let _ = writeln!(md, "|---|---:|---:|---:|");
    for family in traffic_families(r) {
        for n in r.plan.traffic_sizes {
            let get = |v: Variant| conn(v, Some(*n), family);
            let _ = writeln!(
                md,
                "| {family} | {n} | {} | {} |",
                ratio(get(Variant::Ours), get(Variant::Iptables)),
                ratio(get(Variant::Ours), get(Variant::Nftables))
            );
        }
    }
    if traffic_families(r).len() == 2 {
        let _ = writeln!(md, "\n| Services | ours IPv6 / IPv4 | iptables IPv6 / IPv4 | nftables IPv6 / IPv4 |");
        let _ = writeln!(md, "|---:|---:|---:|---:|");
        for n in r.plan.traffic_sizes {
            let six_to_four = |v: Variant| ratio(conn(v, Some(*n), Family::V6), conn(v, Some(*n), Family::V4));
            let _ = writeln!(
                md,
                "| {n} | {} | {} | {} |",
                six_to_four(Variant::Ours),
                six_to_four(Variant::Iptables),
                six_to_four(Variant::Nftables)
            );
        }
    }
    let _ = writeln!(md, "\n![connections per second](bench-connections.png)\n");

    if let Some(c) = r.control.first() {
        let _ = writeln!(md, "## 3. Control plane\n");
        let _ = writeln!(
            md,
            "{} Services with {} endpoints in all. *Program all*: model + reconcile + every map write into an \
             empty dataplane, in process. *One change*: one EndpointSlice changed, until the maps are updated \
             and the sync's metrics refreshed (as the agent's sync step does it: the model diffs the snapshot \
             with the last one and recomputes the one Service whose slice changed, the reconciler compares and \
             writes only the frontends that changed, the metrics follow them), over {} changes. Ours {} times, \
             each into fresh maps. kube-proxy's way: `iptables-restore` / `nft -f` of the full ruleset for the \
             same Services into an empty namespace (a full sync), {} times.\n",
            c.services, c.endpoints, r.plan.control_changes, r.plan.program_all_repeats, r.plan.control_repeats
        );
        let _ = writeln!(md, "| what | median ms | p99 ms | min–max ms | ratio to ours |");
        let _ = writeln!(md, "|---|---:|---:|---:|---:|");
        let row = |md: &mut String, what: &str, s: &Stats, base: f64| {
            let _ = writeln!(
                md,
                "| {what} | {:.1} | {:.1} | {:.1}–{:.1} | {} |",
                s.median,
                s.p99,
                s.min,
                s.max,
                ratio(s.median, base)
            );
        };
        row(&mut md, "ours: program all", &c.program_all, c.program_all.median);
        row(&mut md, "of which the model (every Service computed)", &c.program_all_model, c.program_all.median);
        if let Some(s) = &c.iptables_restore {
            row(&mut md, "iptables-restore, full ruleset", s, c.program_all.median);
        }
        if let Some(s) = &c.nft_load {
            row(&mut md, "nft -f, full ruleset", s, c.program_all.median);
        }
        row(&mut md, "ours: one EndpointSlice change", &c.one_change, c.one_change.median);
        row(
            &mut md,
            "of which the model (snapshot diff, that Service recomputed)",
            &c.one_change_model,
            c.one_change.median,
        );
        #[expect(clippy::cast_precision_loss, reason = "byte counts shown in MiB")]
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let _ = writeln!(
            md,
            "\nThe agent (the real binary, on these Services as a manifest directory): peak RSS {:.1} MiB \
             while it parses the manifests and programs the maps, {:.1} MiB resident once synced (read when it has \
             settled: two readings half a second apart within 1 MiB), both without the {:.1} MiB of \
             `backend_slots` it maps to write tables (the map's own memory, counted below).\n\n\
             BPF map memory (kernel `memlock` of the pinned maps, with room for twice these Services: \
             `--map-size-services {}`, `--map-size-backend-slots {}`, `--map-size-backends {}`; the flow maps \
             at their defaults, `--map-size-conntrack {}`): **{:.1} MiB for the Service state** (the maps whose \
             size follows the Services: {}), {:.1} MiB in all.\n",
            mib(c.agent_peak_rss_bytes),
            mib(c.agent_rss_bytes),
            mib(c.agent_mapped_map_bytes),
            c.map_sizes.services,
            c.map_sizes.backend_slots,
            c.map_sizes.backends,
            c.map_sizes.conntrack,
            mib(c.service_state_bytes()),
            crate::bench::control_plane::SERVICE_STATE_MAPS.join(", "),
            mib(c.map_memory_bytes)
        );
        let _ = writeln!(md, "| map | MiB |\n|---|---:|");
        for (name, bytes) in &c.map_memory {
            let _ = writeln!(md, "| {name} | {:.2} |", mib(*bytes));
        }
        let _ = writeln!(md);
        if r.control.len() > 1 {
            scale_table(&mut md, r);
        }
        let _ = writeln!(md, "![control plane](bench-control-plane.png)\n");
    }
    if !r.socket.is_empty() {
        socket_lb(&mut md, r);
    }
    md
}

/// A Markdown table: the first column left-aligned, the figures right.
fn table(md: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let _ = writeln!(md, "| {} |", header.join(" | "));
    let _ = writeln!(md, "|---|{}", "---:|".repeat(header.len() - 1));
    for row in rows {
        let _ = writeln!(md, "| {} |", row.join(" | "));
    }
}

/// Section 4's third table: the pod program's share of a round trip.
fn socket_lb_programs(md: &mut String, r: &Results) {
    if r.socket_programs.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "\nThe programs' share of a round trip, measured as section 1 does (BPF_PROG_TEST_RUN, {} samples \
         per case, {} Services in the maps): on the packet path the pod program translates the client's \
         packet (established flow) and the backend's answer (reverse NAT); on the socket path both carry \
         pod addresses and the program finds no Service for either (section 1's *not a Service* case, \
         for the answer too: the same lookups, missing); dialled directly, no program runs.\n",
        r.plan.packet_runs, r.plan.packet_sizes[0]
    );
    let packet_path =
        r.socket_programs.iter().find(|c| c.path == SocketPath::PacketPath).map_or(0.0, |c| c.request_ns + c.reply_ns);
    let rows: Vec<Vec<String>> = r
        .socket_programs
        .iter()
        .map(|c| {
            vec![
                c.path.label().to_owned(),
                format!("{:.0}", c.request_ns),
                format!("{:.0}", c.reply_ns),
                format!("{:.0}", c.request_ns + c.reply_ns),
                ratio(c.request_ns + c.reply_ns, packet_path),
            ]
        })
        .collect();
    let header = ["path", "client's packet ns", "answer ns", "ns per round trip", "ratio to packet path"];
    table(md, &header, &rows);
}

/// Section 4: the socket path for pods against the packet path and the
/// pod dialled directly.
fn socket_lb(md: &mut String, r: &Results) {
    #[expect(clippy::cast_precision_loss, reason = "a few slices")]
    let slices = r.plan.socket_slices as f64;
    let _ = writeln!(md, "## 4. Socket-level load balancing for pods (`--socket-lb all`)\n");
    let _ = writeln!(
        md,
        "The topology of section 2 with 1 Service: a client pod, a ClusterIP with 3 backend pods on the same \
         node. The client is one process (`sock-client`) in the client pod's network namespace and in a \
         cgroup the bench creates under its own; with `--socket-lb all` that cgroup is the agent's \
         `--cgroup-root`, so connect() is translated to a backend by the cgroup hook and the flow's packets \
         carry the backend's address (the TC program on the pod interface passes them untranslated); with \
         `--socket-lb off` the packet path translates them (DNAT of the first packet, conntrack, reverse NAT \
         of the replies); directly: the client dials the pod IPs, no agent running. *New connections*: as in \
         section 2, {} worker threads. *Established flow*: {} connection(s) opened before the clock starts, \
         then `who` and the backend's one-line answer back and forth; a round trip is one data packet each \
         way through the node. Each figure is the median over {} rounds × {} slices of {} s: in each round \
         the three paths are set up side by side on fresh topologies and take turns slice by slice (each \
         slice led by the next path), so a \
         change of the machine's load lands on all three alike (spread = min–max of the slices). Time \
         ratios above 1 are slower.\n",
        r.plan.workers,
        r.plan.round_trip_connections,
        r.plan.traffic_repeats,
        r.plan.socket_slices,
        r.plan.traffic_seconds / slices
    );
    let get = |p: SocketPath| r.socket.iter().find(|s| s.path == p);
    let conn = |p: SocketPath| get(p).map_or(0.0, |s| s.connections.connections_per_s.median);
    let rows: Vec<Vec<String>> = r
        .socket
        .iter()
        .map(|s| {
            let c = &s.connections;
            vec![
                s.path.label().to_owned(),
                format!("{:.0}", c.connections_per_s.median),
                format!("{:.0}–{:.0}", c.connections_per_s.min, c.connections_per_s.max),
                ratio(c.connections_per_s.median, conn(SocketPath::Direct)),
                ratio(c.connections_per_s.median, conn(SocketPath::PacketPath)),
                format!("{:.3}", c.p50_ms.median),
                format!("{:.3}", c.p99_ms.median),
                c.errors.to_string(),
            ]
        })
        .collect();
    let header =
        ["path", "conn/s (median)", "spread", "ratio to direct", "ratio to packet path", "p50 ms", "p99 ms", "errors"];
    table(md, &header, &rows);
    let us = |p: SocketPath| get(p).map_or(0.0, |s| s.round_trips.p50_ms.median * 1e3);
    let rows: Vec<Vec<String>> = r
        .socket
        .iter()
        .map(|s| {
            let t = &s.round_trips;
            let p50 = t.p50_ms.median * 1e3;
            vec![
                s.path.label().to_owned(),
                format!("{p50:.1}"),
                format!("{:.1}", t.p99_ms.median * 1e3),
                format!("{:.1}", p50 - us(SocketPath::Direct)),
                ratio(p50, us(SocketPath::Direct)),
                ratio(p50, us(SocketPath::PacketPath)),
                format!("{:.0}", t.connections_per_s.median),
                format!("{:.0}–{:.0}", t.connections_per_s.min, t.connections_per_s.max),
                t.errors.to_string(),
            ]
        })
        .collect();
    let _ = writeln!(md);
    let header = [
        "path",
        "µs per round trip (p50)",
        "p99 µs",
        "above direct (µs)",
        "time ratio to direct",
        "time ratio to packet path",
        "round trips/s (median)",
        "spread",
        "errors",
    ];
    table(md, &header, &rows);
    socket_lb_programs(md, r);
    let _ = writeln!(md);
}

/// Registers DejaVu Sans for the charts' text.
fn register_font() -> Result<()> {
    let path = Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf");
    let bytes = std::fs::read(path).with_context(|| format!("reading {} (fonts-dejavu-core)", path.display()))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("registering the chart font"))?;
    Ok(())
}

/// The y axis of a bar chart.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scale {
    Linear,
    /// Decades, for figures spanning orders of magnitude.
    Log,
}

/// Formats a bar's value for its label.
fn short(v: f64) -> String {
    if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.1}") }
}

/// A grouped bar chart: one group per label, one bar per series, each bar
/// labelled with its value.
fn bars(
    path: &Path,
    title: &str,
    y_label: &str,
    scale: Scale,
    groups: &[String],
    series: &[(String, Vec<f64>)],
) -> Result<()> {
    let root = BitMapBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let values = || series.iter().flat_map(|(_, v)| v.iter().copied()).filter(|v| *v > 0.0);
    let max = values().fold(0.0_f64, f64::max).max(1.0);
    // Bars are drawn in axis units: the value itself, or its log10 above
    // the lowest whole decade.
    let (lo, hi) = match scale {
        Scale::Linear => (0.0, max * 1.15),
        Scale::Log => (values().fold(max, f64::min).log10().floor(), max.log10().ceil() + 0.3),
    };
    let to_axis = move |v: f64| match scale {
        Scale::Linear => v,
        Scale::Log => v.max(f64::MIN_POSITIVE).log10().max(lo),
    };
    #[expect(clippy::cast_precision_loss, reason = "a handful of groups")]
    let width = groups.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..width, lo..hi)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let labels = groups.to_vec();
    let y_format = move |y: &f64| match scale {
        Scale::Linear => format!("{y}"),
        Scale::Log if (y - y.round()).abs() < 1e-6 => short(10f64.powf(*y)),
        Scale::Log => String::new(),
    };
    #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "a few decades")]
    let y_ticks = match scale {
        Scale::Linear => 10,
        Scale::Log => (hi - lo).floor() as usize + 1,
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(y_label)
        .y_labels(y_ticks)
        // On a log axis, evenly spaced light lines would read as linear.
        .light_line_style(if scale == Scale::Log { WHITE } else { RGBColor(230, 230, 230) })
        .y_label_formatter(&y_format)
        .x_labels(groups.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let frac = x.fract();
            #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "a group index")]
            let i = x.floor() as usize;
            if (frac - 0.5).abs() < 0.01 { labels.get(i).cloned().unwrap_or_default() } else { String::new() }
        })
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    #[expect(clippy::cast_precision_loss, reason = "a handful of series")]
    let bar = 0.8 / series.len() as f64;
    for (k, (name, values)) in series.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        #[expect(clippy::cast_precision_loss, reason = "indices")]
        let x0 = move |g: usize| g as f64 + 0.1 + bar * k as f64;
        let rects = values
            .iter()
            .enumerate()
            .map(move |(g, v)| Rectangle::new([(x0(g), lo), (x0(g) + bar * 0.95, to_axis(*v))], color.filled()));
        chart
            .draw_series(rects)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        let texts = values
            .iter()
            .enumerate()
            .map(move |(g, v)| Text::new(short(*v), (x0(g), to_axis(*v) + (hi - lo) * 0.025), ("sans-serif", 12)));
        chart.draw_series(texts).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Writes the three charts into `dir`.
///
/// # Errors
/// When the font or a file cannot be written.
pub fn charts(r: &Results, dir: &Path) -> Result<()> {
    register_font()?;
    let groups: Vec<String> = r.plan.packet_sizes.iter().map(|n| format!("{n} Services")).collect();
    let series: Vec<(String, Vec<f64>)> = CASES
        .iter()
        .map(|case| {
            let v = r
                .plan
                .packet_sizes
                .iter()
                .map(|n| r.packet.iter().find(|c| c.services == *n && c.case == *case).map_or(0.0, |c| c.ns.median))
                .collect();
            ((*case).to_owned(), v)
        })
        .collect();
    bars(
        &dir.join("bench-packet-cost.png"),
        "ns per packet (median, BPF_PROG_TEST_RUN)",
        "ns",
        Scale::Linear,
        &groups,
        &series,
    )?;

    let families = traffic_families(r);
    let groups: Vec<String> = families
        .iter()
        .flat_map(|family| r.plan.traffic_sizes.iter().map(move |n| format!("{n} Services {family}")))
        .collect();
    let series: Vec<(String, Vec<f64>)> =
        [Variant::Ours, Variant::Iptables, Variant::Nftables, Variant::Floor, Variant::FloorConntrack]
            .iter()
            .map(|v| {
                let vals = families
                    .iter()
                    .flat_map(|family| r.plan.traffic_sizes.iter().map(move |n| (*family, *n)))
                    .map(|(family, n)| {
                        r.traffic
                            .iter()
                            .find(|t| {
                                t.variant == *v
                                    && t.family == family
                                    && (t.services == n || matches!(v, Variant::Floor | Variant::FloorConntrack))
                            })
                            .map_or(0.0, |t| t.connections_per_s.median)
                    })
                    .collect();
                (v.label().to_owned(), vals)
            })
            .collect();
    bars(
        &dir.join("bench-connections.png"),
        "new TCP connections per second through a ClusterIP",
        "conn/s",
        Scale::Linear,
        &groups,
        &series,
    )?;

    if let Some(c) = r.control.first() {
        let groups = vec![format!("{} Services, {} endpoints", c.services, c.endpoints)];
        let median = |s: &Option<Stats>| vec![s.as_ref().map_or(0.0, |s| s.median)];
        let series = vec![
            ("ours: program all".to_owned(), vec![c.program_all.median]),
            ("iptables-restore".to_owned(), median(&c.iptables_restore)),
            ("nft -f".to_owned(), median(&c.nft_load)),
            ("ours: one change".to_owned(), vec![c.one_change.median]),
        ];
        bars(
            &dir.join("bench-control-plane.png"),
            "control plane (median ms, log scale)",
            "ms",
            Scale::Log,
            &groups,
            &series,
        )?;
    }
    Ok(())
}

/// `--scale`: the control plane at each size side by side, and the cost of
/// one change at the largest relative to the first.
fn scale_table(md: &mut String, r: &Results) {
    #[expect(clippy::cast_precision_loss, reason = "byte counts shown in MiB")]
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let _ = writeln!(md, "### At scale (`cargo xtask bench --scale`)\n");
    let head: Vec<String> = r.control.iter().map(|c| format!("{} / {}", c.services, c.endpoints)).collect();
    let _ = writeln!(md, "| Services / endpoints | {} |", head.join(" | "));
    let _ = writeln!(md, "|---|{}", "---:|".repeat(r.control.len()));
    let line = |md: &mut String, what: &str, f: &dyn Fn(&ControlPlane) -> String| {
        let cells: Vec<String> = r.control.iter().map(f).collect();
        let _ = writeln!(md, "| {what} | {} |", cells.join(" | "));
    };
    line(md, "program all, median ms", &|c| format!("{:.0}", c.program_all.median));
    line(md, "of which the model, median ms", &|c| format!("{:.0}", c.program_all_model.median));
    line(md, "one EndpointSlice change, p50 ms", &|c| format!("{:.2}", c.one_change.median));
    line(md, "one EndpointSlice change, p99 ms", &|c| format!("{:.2}", c.one_change.p99));
    line(md, "of which the model, p50 ms", &|c| format!("{:.2}", c.one_change_model.median));
    line(md, "agent RSS once synced, MiB", &|c| format!("{:.1}", mib(c.agent_rss_bytes)));
    line(md, "agent peak RSS, MiB", &|c| format!("{:.1}", mib(c.agent_peak_rss_bytes)));
    line(md, "Service state maps, MiB", &|c| format!("{:.1}", mib(c.service_state_bytes())));
    if let (Some(first), Some(last)) = (r.control.first(), r.control.last()) {
        let _ = writeln!(
            md,
            "\nOne change at {} Services costs {} its cost at {} (p50), {} at p99; the model's part {} \
             (p50). kube-proxy's full loads are not run at the larger size (`nft -f` alone takes minutes at {}).\n",
            last.services,
            ratio(last.one_change.median, first.one_change.median),
            first.services,
            ratio(last.one_change.p99, first.one_change.p99),
            ratio(last.one_change_model.median, first.one_change_model.median),
            first.services
        );
    }
}

/// The families the traffic section measured, IPv4 first.
fn traffic_families(r: &Results) -> Vec<Family> {
    let mut families: Vec<Family> = r.traffic.iter().map(|t| t.family).collect();
    families.sort();
    families.dedup();
    families
}
