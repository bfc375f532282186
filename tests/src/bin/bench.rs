//! What `cargo xtask bench [--quick]` runs (as root): the benchmarks of
//! `service_tests::bench`, each beside its baseline in the same run, then
//! the report (`<out>/benchmarks.md` and its PNG charts), also printed.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use service_tests::{
    bench::{
        Plan, Stats, control_plane, packet_cost,
        report::{self, Results},
        socket_lb,
        traffic::{self, Variant},
    },
    netns::{Family, clean_up_on_signal, is_root, sweep_leftovers},
};

fn main() -> Result<()> {
    if !is_root() {
        bail!("the benchmarks create network namespaces and load BPF programs: run them as root");
    }
    // SIGINT/SIGTERM (also forwarded by `cargo xtask bench`) remove this
    // run's namespaces and mounts; a killed run's are swept here.
    for what in sweep_leftovers() {
        println!("removed a leftover of a killed run: {what}");
    }
    clean_up_on_signal();
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map_or_else(|| PathBuf::from("target/bench"), PathBuf::from);
    std::fs::create_dir_all(&out)?;
    // `--only packet|traffic|control|socket` (or several, comma-separated):
    // those sections only (for development; the report then lacks the
    // others).
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned();
    let wants = |section: &str| only.as_deref().is_none_or(|o| o.split(',').any(|s| s == section));
    // `--scale`: the traffic section also at 30,000 Services, the control
    // plane section also at 50,000.
    let mut plan = if args.iter().any(|a| a == "--scale") { Plan::with_scale(quick) } else { Plan::new(quick) };
    // `--ours-only`: the control plane section without kube-proxy's loads.
    plan.control_kube_proxy = !args.iter().any(|a| a == "--ours-only");
    let started = std::process::Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output()?;
    let mut results = Results {
        plan,
        commit: std::env::var("BENCH_COMMIT").unwrap_or_else(|_| "unknown".into()),
        env: report::environment(),
        started: String::from_utf8_lossy(&started.stdout).trim().to_owned(),
        packet: Vec::new(),
        repeat_check: None,
        traffic: Vec::new(),
        control: Vec::new(),
        socket: Vec::new(),
        socket_programs: Vec::new(),
    };
    println!("== environment: {}", results.env);

    // The report is written after every section, so a section that fails
    // keeps the figures of those before it.
    let sections: [(&str, Section); 4] = [
        ("packet", packet_section),
        ("traffic", traffic_section),
        ("control", control_section),
        ("socket", socket_section),
    ];
    for (name, section) in sections {
        if wants(name) {
            section(&plan, &mut results)?;
            std::fs::write(out.join("benchmarks.md"), report::markdown(&results))?;
        }
    }
    let md = report::markdown(&results);
    std::fs::write(out.join("benchmarks.md"), &md)?;
    report::charts(&results, &out)?;
    println!("\n{md}");
    println!("written: {}", out.join("benchmarks.md").display());
    Ok(())
}

#[expect(clippy::cast_precision_loss, reason = "byte counts shown in MiB")]
fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// One section of the run: measures and adds its figures to the results.
type Section = fn(&Plan, &mut Results) -> Result<()>;

fn packet_section(plan: &Plan, results: &mut Results) -> Result<()> {
    println!("== 1. per-packet cost (BPF_PROG_TEST_RUN, {} samples per case)", plan.packet_runs);
    for n in plan.packet_sizes {
        let cases = packet_cost::measure(*n, plan.packet_runs).with_context(|| format!("packet cost at {n}"))?;
        for c in &cases {
            println!("   {n:>7} Services  {:<22} median {:>5.0} ns  p99 {:>5.0} ns", c.case, c.ns.median, c.ns.p99);
        }
        results.packet.extend(cases);
    }
    let repeat = 1_000_000;
    let (floor, other) = packet_cost::repeat_cross_check(repeat)?;
    println!("   repeat={repeat}: floor {floor:.1} ns, not a Service {other:.1} ns");
    results.repeat_check = Some((repeat, floor, other));
    Ok(())
}

fn traffic_section(plan: &Plan, results: &mut Results) -> Result<()> {
    println!("== 2. connections through a ClusterIP");
    for family in Family::BOTH {
        for v in [Variant::Ours, Variant::Iptables, Variant::Nftables] {
            traffic::check_flows(v, 3, family)
                .with_context(|| format!("checking that traffic flows through {} in {family}", v.label()))?;
            println!("   checked: {} reaches all 3 backends through the {family} ClusterIP", v.label());
        }
    }
    let duration = Duration::from_secs_f64(plan.traffic_seconds);
    // Every case once per round, rounds repeated: slow drift of the
    // machine spreads over all cases instead of landing on one.
    let mut cases = Vec::new();
    for family in Family::BOTH {
        cases.extend([(Variant::Floor, 1, family), (Variant::FloorConntrack, 1, family)]);
        for n in plan.traffic_sizes {
            for v in [Variant::Ours, Variant::Iptables, Variant::Nftables] {
                cases.push((v, *n, family));
            }
        }
    }
    let mut runs: Vec<Vec<traffic::RunResult>> = vec![Vec::new(); cases.len()];
    for round in 1..=plan.traffic_repeats {
        println!("   round {round} of {}", plan.traffic_repeats);
        for (i, (v, n, family)) in cases.iter().enumerate() {
            runs[i].push(traffic::run_once(*v, *n, *family, plan.workers, duration)?);
        }
    }
    for ((v, n, family), runs) in cases.iter().zip(&runs) {
        let t = traffic::combine(*v, *n, *family, runs);
        println!(
            "   {family} {:>6} Services  {:<32} {:>7.0} conn/s ({:.0}-{:.0})  p50 {:.3} ms  p99 {:.3} ms  errors {}",
            n,
            v.label(),
            t.connections_per_s.median,
            t.connections_per_s.min,
            t.connections_per_s.max,
            t.p50_ms.median,
            t.p99_ms.median,
            t.errors
        );
        results.traffic.push(t);
    }
    Ok(())
}

fn control_section(plan: &Plan, results: &mut Results) -> Result<()> {
    println!(
        "== 3. control plane ({} Services x {} endpoints)",
        plan.control_services, plan.control_endpoints_per_service
    );
    let sizes = [(plan.control_services, plan.control_kube_proxy)]
        .into_iter()
        .chain(plan.control_scale_services.map(|n| (n, false)));
    for (services, with_kube_proxy) in sizes {
        if !with_kube_proxy {
            println!("   at {services} Services (ours only)");
        }
        let c = control_plane::measure(
            services,
            plan.control_endpoints_per_service,
            plan.control_changes,
            plan.control_repeats,
            plan.program_all_repeats,
            with_kube_proxy,
        )?;
        let ms = |s: Option<&Stats>| s.map_or_else(|| "not run".to_owned(), |s| format!("{:.1} ms", s.median));
        println!(
            "   program all {:.1} ms, one change p50 {:.2} ms (model {:.2} ms) p99 {:.2} ms, agent RSS {:.1} MiB, \
             Service maps {:.1} MiB, iptables-restore {}, nft -f {}",
            c.program_all.median,
            c.one_change.median,
            c.one_change_model.median,
            c.one_change.p99,
            mib(c.agent_rss_bytes),
            mib(c.service_state_bytes()),
            ms(c.iptables_restore.as_ref()),
            ms(c.nft_load.as_ref())
        );
        results.control.push(c);
    }
    Ok(())
}

fn socket_section(plan: &Plan, results: &mut Results) -> Result<()> {
    println!("== 4. socket-level load balancing for pods (--socket-lb all)");
    for p in socket_lb::Path::ALL {
        socket_lb::check(p).with_context(|| format!("checking {}", p.label()))?;
    }
    println!("   checked: the socket path translates at connect(), the packet path at the first packet");
    #[expect(clippy::cast_precision_loss, reason = "a few slices")]
    let slice = Duration::from_secs_f64(plan.traffic_seconds / plan.socket_slices as f64);
    let mut runs: Vec<Vec<socket_lb::Run>> = vec![Vec::new(); socket_lb::Path::ALL.len()];
    for round in 1..=plan.traffic_repeats {
        println!("   round {round} of {}", plan.traffic_repeats);
        let round = socket_lb::round(plan.workers, plan.round_trip_connections, plan.socket_slices, slice)?;
        for (all, more) in runs.iter_mut().zip(round) {
            all.extend(more);
        }
    }
    let services = plan.packet_sizes[0];
    results.socket_programs = socket_lb::program_cost(services, plan.packet_runs)?;
    for c in &results.socket_programs {
        println!("   {:<44} programs {:.0} + {:.0} ns per round trip", c.path.label(), c.request_ns, c.reply_ns);
    }
    for (p, runs) in socket_lb::Path::ALL.iter().zip(&runs) {
        let r = socket_lb::combine(*p, runs);
        println!(
            "   {:<44} {:>7.0} conn/s ({:.0}-{:.0})  round trip p50 {:.1} us  errors {}",
            p.label(),
            r.connections.connections_per_s.median,
            r.connections.connections_per_s.min,
            r.connections.connections_per_s.max,
            r.round_trips.p50_ms.median * 1e3,
            r.connections.errors + r.round_trips.errors
        );
        results.socket.push(r);
    }
    Ok(())
}
