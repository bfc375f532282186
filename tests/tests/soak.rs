//! Tier 4: the soak (root). Sustained traffic on every path at once while
//! the cluster changes under it: an endpoint added and removed every
//! second, one Service deleted and re-created, the agent on node 1 killed
//! (SIGKILL) and restarted twice. Every connection must succeed; afterwards
//! conntrack, affinity and SNAT occupancy must fall back to near zero and
//! the per-Service counters must account for the traffic.
//!
//! Each path runs until it has made `SOAK_CONNECTIONS` connections and
//! `SOAK_SECONDS` have passed. `cargo xtask test` runs the short version
//! (2,000 connections and 30 s, so in practice tens of thousands);
//! `cargo xtask soak [--minutes N]` the long one (at least 50,000
//! connections per path and N minutes), printing a table.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use service_tests::{
    cluster::node_ip,
    fixture,
    netns::{Agent, Netns, wait_until},
    north_south::{A1, B2, Ep, LB_IP, NorthSouth, Svc, TIMEOUT},
    traffic::{tcp_who, udp_ask},
};

/// The endpoint that comes and goes every second.
const C1: Ep = Ep("c1", 1, Ipv4Addr::new(10, 244, 1, 12));

fn web(with_churn: bool) -> Svc<'static> {
    Svc {
        name: "web",
        cluster_ip: "10.96.0.10",
        type_: "LoadBalancer",
        ports: &[("http", 80, 8080, "TCP", Some(30080))],
        spec_extra: "",
        status: "status:\n  loadBalancer:\n    ingress:\n    - ip: 198.51.100.10\n",
        endpoints: if with_churn { &[A1, B2, C1] } else { &[A1, B2] },
    }
}

/// UDP keeps its endpoints: removing a UDP endpoint flushes its flows (as
/// kube-proxy does), which loses an answer in flight by design.
const DNS: Svc = Svc {
    name: "dns",
    cluster_ip: "10.96.0.53",
    type_: "ClusterIP",
    ports: &[("dns", 53, 5353, "UDP", None)],
    spec_extra: "",
    status: "",
    endpoints: &[A1, B2],
};

/// Only on node 2: a NodePort on node 1 reaches it through SNAT, one on
/// node 2 locally; pods on node 1 reach its ClusterIP across nodes.
const REMOTE: Svc = Svc {
    name: "remote",
    cluster_ip: "10.96.0.20",
    type_: "NodePort",
    ports: &[("http", 80, 8080, "TCP", Some(30081))],
    spec_extra: "",
    status: "",
    endpoints: &[B2],
};

/// A pod reaching itself.
const OWN: Svc = Svc {
    name: "own",
    cluster_ip: "10.96.0.30",
    type_: "ClusterIP",
    ports: &[("http", 80, 8080, "TCP", None)],
    spec_extra: "",
    status: "",
    endpoints: &[A1],
};

/// Deleted and re-created during the run.
const RECREATED: Svc = Svc {
    name: "recreated",
    cluster_ip: "10.96.0.70",
    type_: "ClusterIP",
    ports: &[("http", 80, 8080, "TCP", None)],
    spec_extra: "",
    status: "",
    endpoints: &[A1],
};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One path of the soak: where its client runs and what it does once.
struct Path<'a> {
    name: &'static str,
    client: &'a Netns,
    step: Box<dyn Fn() -> std::io::Result<()> + Send + Sync>,
}

#[derive(Default)]
struct Tally {
    done: AtomicUsize,
    failed: AtomicUsize,
    first_failures: std::sync::Mutex<Vec<String>>,
}

/// `/metrics` of node `n`'s agent.
fn metrics(node: &Netns) -> String {
    node.run_in(|| {
        let mut s = TcpStream::connect_timeout(&"127.0.0.1:10249".parse().expect("addr"), TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok::<_, std::io::Error>(body)
    })
    .unwrap_or_default()
}

/// The sum of the samples of `metric` whose labels contain `labels`.
fn sample(text: &str, metric: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// Occupancy on one node: conntrack (both tables), affinity, SNAT ports.
fn occupancy(node: &Netns) -> (f64, f64, f64) {
    let m = metrics(node);
    (
        sample(&m, "service_dataplane_gc_live_entries", "map=\"conntrack\"")
            + sample(&m, "service_dataplane_gc_live_entries", "map=\"conntrack_new\""),
        sample(&m, "service_dataplane_gc_live_entries", "map=\"affinity\""),
        sample(&m, "service_dataplane_snat_ports_in_use", ""),
    )
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
#[expect(clippy::cast_precision_loss, reason = "connection counts far below 2^52, as ratios and rates")]
fn every_path_keeps_working_through_churn_and_agent_restarts() {
    let per_path = env_usize("SOAK_CONNECTIONS", 2_000);
    let min_duration = Duration::from_secs(env_usize("SOAK_SECONDS", 30) as u64);
    let sticky = Svc {
        name: "sticky",
        cluster_ip: "10.96.0.80",
        type_: "ClusterIP",
        ports: &[("http", 80, 8080, "TCP", None)],
        spec_extra: "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 10\n",
        status: "",
        endpoints: &[A1, B2],
    };
    // Sized for the load: closed TCP flows keep their two entries 10 s and
    // answered datagrams 30-120 s, so at ~15,000 new flows a second the
    // tables need ~400,000 entries (the default 262,144 would make the LRU
    // evict live flows, as a full nf_conntrack table drops new ones).
    let flags: &[&str] = &["--external-interfaces", "eth0", "--map-size-conntrack", "524288"];
    // Loopback up on the nodes: the agents' /metrics listen there.
    let loopback = |c: &service_tests::cluster::Cluster| {
        for n in 1..=2 {
            c.node(n).node.ip(&["link", "set", "lo", "up"]).expect("lo up");
        }
    };
    let mut ns = NorthSouth::start_with(&[web(false), DNS, REMOTE, OWN, RECREATED, sticky], loopback, &[flags, flags]);
    // The churning endpoint's pod serves all along; only its EndpointSlice
    // entry comes and goes.
    let c1 = ns.cluster.node_mut(1).add_pod(C1.0, C1.2).expect("pod c1");
    let _c1_server = fixture::start_echo(&c1.ns, C1.0, &[]).expect("pod-echo c1");
    for client in [&ns.cluster.external, &ns.cluster.node(1).pod("client").ns, ns.pod(A1)] {
        client.sysctl("net.ipv4.ip_local_port_range=1024 65535").expect("port range");
        client.sysctl("net.ipv4.tcp_tw_reuse=1").expect("tw_reuse");
    }
    let before = [occupancy(&ns.cluster.node(1).node), occupancy(&ns.cluster.node(2).node)];

    let tcp = |addr: SocketAddrV4| -> Box<dyn Fn() -> std::io::Result<()> + Send + Sync> {
        Box::new(move || tcp_who(addr, TIMEOUT).map(drop))
    };
    let vip = |last: u8| SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, last), 80);
    let client_pod = &ns.cluster.node(1).pod("client").ns;
    let external = &ns.cluster.external;
    let paths = vec![
        Path { name: "pod → ClusterIP (TCP)", client: client_pod, step: tcp(vip(10)) },
        Path {
            name: "pod → ClusterIP (UDP)",
            client: client_pod,
            step: Box::new(|| udp_ask(SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 53), 53), b"hi", TIMEOUT).map(drop)),
        },
        Path {
            name: "external → NodePort, local backend",
            client: external,
            step: tcp(SocketAddrV4::new(node_ip(2), 30081)),
        },
        Path {
            name: "external → NodePort, remote backend (SNAT)",
            client: external,
            step: tcp(SocketAddrV4::new(node_ip(1), 30081)),
        },
        Path { name: "external → LoadBalancer IP", client: external, step: tcp(SocketAddrV4::new(LB_IP, 80)) },
        Path { name: "pod → its own Service (hairpin)", client: ns.pod(A1), step: tcp(vip(30)) },
        Path { name: "pod → ClusterIP on another node", client: client_pod, step: tcp(vip(20)) },
        Path { name: "pod → ClusterIP with affinity", client: client_pod, step: tcp(vip(80)) },
    ];

    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let tallies: Vec<Arc<Tally>> = paths.iter().map(|_| Arc::new(Tally::default())).collect();
    let workers: Vec<_> = paths
        .into_iter()
        .zip(&tallies)
        .map(|(path, tally)| {
            let (tally, stop) = (Arc::clone(tally), Arc::clone(&stop));
            let label = path.name;
            let once = path.step;
            let handle = path.client.spawn_in(move || {
                while !stop.load(Ordering::Relaxed)
                    && (tally.done.load(Ordering::Relaxed) < per_path || started.elapsed() < min_duration)
                {
                    if let Err(e) = once() {
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                        let mut first = tally.first_failures.lock().expect("lock");
                        if first.len() < 5 {
                            first.push(format!(
                                "#{} after {:?}: {e}",
                                tally.done.load(Ordering::Relaxed),
                                started.elapsed()
                            ));
                        }
                    }
                    tally.done.fetch_add(1, Ordering::Relaxed);
                }
            });
            (label, handle)
        })
        .collect();

    // The cluster changes while the traffic flows, driven by progress.
    // Both the connection count and the duration must be reached.
    let progress = || {
        let least = tallies.iter().map(|t| t.done.load(Ordering::Relaxed)).min().unwrap_or(0) as f64;
        (least / per_path as f64).min(started.elapsed().as_secs_f64() / min_duration.as_secs_f64().max(1.0))
    };
    let mut events = Vec::new();
    let mut retired = Vec::new();
    let (mut churns, mut kills, mut deleted, mut recreated) = (0, 0, false, false);
    let mut churn_on = false;
    // Generous: twice the run, plus half an hour for slow machines.
    let deadline = started + min_duration * 2 + Duration::from_mins(30);
    while workers.iter().any(|(_, h)| !h.is_finished()) {
        assert!(Instant::now() < deadline, "the soak did not finish in time");
        thread::sleep(Duration::from_secs(1));
        churn_on = !churn_on;
        ns.manifests.write("web.yaml", &web(churn_on).yaml());
        churns += 1;
        let p = progress();
        if !deleted && p >= 0.2 {
            std::fs::remove_file(ns.manifests.path().join("recreated.yaml")).expect("delete recreated");
            deleted = true;
            events.push(format!("{:>6.1?} Service recreated deleted", started.elapsed()));
        }
        if deleted && !recreated && p >= 0.4 {
            ns.manifests.write("recreated.yaml", &RECREATED.yaml());
            recreated = true;
            events.push(format!("{:>6.1?} Service recreated created again", started.elapsed()));
        }
        if (kills == 0 && p >= 0.33) || (kills == 1 && p >= 0.66) {
            let root = ns.root(1);
            ns.agents[0].kill().expect("SIGKILL the agent on node 1");
            let mut agent = Agent::start(&ns.cluster.node(1).node, ns.manifests.path(), "node1", &root, flags)
                .expect("restart the agent");
            agent.wait_for_log("synced", 1, Duration::from_secs(20)).expect("the restarted agent synced");
            // The killed agent's handle is kept until the end: dropping it
            // runs `service-agent cleanup`, which would unpin the new one.
            retired.push(std::mem::replace(&mut ns.agents[0], agent));
            kills += 1;
            events.push(format!("{:>6.1?} agent on node 1 killed and restarted", started.elapsed()));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let mut names = Vec::new();
    for (name, handle) in workers {
        handle.join().unwrap_or_else(|_| panic!("worker {name} panicked"));
        names.push(name);
    }
    ns.manifests.write("web.yaml", &web(false).yaml());
    // The re-created Service works.
    let recreated_ok = ns.cluster.node(1).pod("client").ns.run_in(|| {
        wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            tcp_who(SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 70), 80), TIMEOUT).ok()
        })
    });

    // Once the flows have ended (closed TCP flows go after 10 s, answered
    // datagrams after 30 s), the garbage collector brings occupancy down.
    let settle = Instant::now();
    // (A UDP client port reused within 30 s makes its flow a stream, 120 s,
    // as netfilter does.)
    let after = wait_until(Duration::from_secs(150), Duration::from_secs(2), || {
        let after = [occupancy(&ns.cluster.node(1).node), occupancy(&ns.cluster.node(2).node)];
        after.iter().all(|(ct, aff, snat)| *ct <= 16.0 && *aff <= 4.0 && *snat <= 4.0).then_some(after)
    });
    let last = [occupancy(&ns.cluster.node(1).node), occupancy(&ns.cluster.node(2).node)];

    // The table.
    println!(
        "\nsoak: {per_path} connections per path minimum, {elapsed:.1?}, {churns} endpoint changes, {kills} agent restarts"
    );
    println!("{:<44} {:>12} {:>8} {:>10}", "path", "connections", "failed", "per second");
    let mut total_failed = 0;
    let mut counts = BTreeMap::new();
    for (i, t) in tallies.iter().enumerate() {
        let (done, failed) = (t.done.load(Ordering::Relaxed), t.failed.load(Ordering::Relaxed));
        total_failed += failed;
        counts.insert(i, done);
    }
    for (i, t) in tallies.iter().enumerate() {
        let (done, failed) = (t.done.load(Ordering::Relaxed), t.failed.load(Ordering::Relaxed));
        println!("{:<44} {:>12} {:>8} {:>10.0}", names[i], done, failed, done as f64 / elapsed.as_secs_f64());
        for f in t.first_failures.lock().expect("lock").iter() {
            println!("    {f}");
        }
    }
    for e in &events {
        println!("  {e}");
    }
    for (n, (b, l)) in before.iter().zip(&last).enumerate() {
        println!(
            "node {}: occupancy before conntrack {} affinity {} snat {}; after settling ({:.0?}) conntrack {} affinity {} snat {}",
            n + 1,
            b.0,
            b.1,
            b.2,
            settle.elapsed(),
            l.0,
            l.1,
            l.2
        );
    }
    let node_metrics = [metrics(&ns.cluster.node(1).node), metrics(&ns.cluster.node(2).node)];
    for (n, m) in node_metrics.iter().enumerate() {
        println!(
            "node {}: drop_missing_row {} drop_snat_no_port {} conntrack_replaced {} conntrack_assured {} gc deleted {}",
            n + 1,
            sample(m, "service_dataplane_packets_total", "drop_missing_row"),
            sample(m, "service_dataplane_packets_total", "drop_snat_no_port"),
            sample(m, "service_dataplane_packets_total", "conntrack_replaced"),
            sample(m, "service_dataplane_packets_total", "conntrack_assured"),
            sample(m, "service_dataplane_gc_deleted_entries_total", ""),
        );
    }

    for (n, m) in node_metrics.iter().enumerate() {
        let drops: Vec<&str> = m
            .lines()
            .filter(|l| {
                l.starts_with("service_dataplane_packets_total") && l.contains("drop=\"true\"") && !l.ends_with(" 0")
            })
            .collect();
        println!("node {}: drops {drops:?}", n + 1);
    }
    // Datagrams lost at a socket (not in the dataplane) show here.
    for (label, pod) in [("client", &ns.cluster.node(1).pod("client").ns), ("a1", ns.pod(A1)), ("b2", ns.pod(B2))] {
        let snmp = pod.exec("cat", &["/proc/net/snmp"]).map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        let udp: Vec<String> =
            snmp.unwrap_or_default().lines().filter(|l| l.starts_with("Udp:")).map(str::to_owned).collect();
        println!("{label}: {}", udp.join(" | "));
    }
    if total_failed > 0 {
        // Where a lost packet went when the dataplane counted no drop: the
        // kernel's own counters (non-zero ones) and the devices' drops.
        let hosts = [
            ("node 1", &ns.cluster.node(1).node),
            ("node 2", &ns.cluster.node(2).node),
            ("client", &ns.cluster.node(1).pod("client").ns),
            ("a1", ns.pod(A1)),
            ("b2", ns.pod(B2)),
        ];
        for (label, host) in hosts {
            let nstat = host.exec("nstat", &["-as"]).map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            let counters: Vec<String> = nstat
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    !l.starts_with('#') && !l.starts_with("Tcp") && !l.contains("Octets") && !l.contains("Pkts")
                })
                .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join("="))
                .collect();
            println!("{label} nstat: {}", counters.join(" "));
            let devices =
                host.exec("ip", &["-s", "-o", "link"]).map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            for l in devices.unwrap_or_default().lines() {
                println!("{label} link: {}", l.split_whitespace().collect::<Vec<_>>().join(" "));
            }
        }
    }
    assert_eq!(total_failed, 0, "failed connections (see the table)");
    assert!(counts.values().all(|c| *c >= per_path));
    recreated_ok.expect("the re-created Service answers");
    after.expect("occupancy fell back to near zero once the flows ended");
    for m in &node_metrics {
        assert!(sample(m, "service_dataplane_packets_total", "drop_missing_row") < 0.5, "no packet raced a flip");
    }
    // Every TCP connection is at least 5 packets through its entry node
    // (SYN, ACK, request, FIN, ACK): the per-Service counters account for
    // them, restarts included (the counters live in pinned maps).
    let web_connections = (counts[&0] + counts[&4]) as f64;
    let web_packets: f64 =
        node_metrics.iter().map(|m| sample(m, "service_dataplane_service_packets_total", "name=\"web\"")).sum();
    assert!(web_packets >= 5.0 * web_connections, "web: {web_packets} packets for {web_connections} connections");
}
