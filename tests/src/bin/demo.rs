//! What `cargo xtask demo` runs (as root): a node namespace with a client
//! pod and one pod per endpoint of the example manifests, the agent on the
//! node reading those manifests, real TCP and UDP traffic through every
//! Service, and an account of what happened. Everything is removed at the
//! end, also on failure.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use service_agent::{
    maps::{self, MapSizes, PinnedMaps},
    model::{self, NodeContext, Protocol},
    reconciler::{MapIo as _, dump},
    source::manifest,
};
use service_tests::netns::{Agent, BpffsMount, ChildGuard, Topology, binary, is_root};

const NODE: &str = "node-1";
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const TCP_CONNECTIONS: usize = 90;
const UDP_REQUESTS: usize = 30;

#[expect(clippy::too_many_lines, reason = "the demo reads top to bottom as the story it prints")]
fn main() -> Result<()> {
    if !is_root() {
        bail!("the demo creates network namespaces and loads BPF programs: run it as root");
    }
    let manifests =
        std::env::var_os("DEMO_MANIFESTS").map_or_else(|| PathBuf::from("examples/manifests"), PathBuf::from);
    let snapshot = manifest::load_dir(&manifests).with_context(|| format!("reading {}", manifests.display()))?;
    let desired = model::desired(&snapshot.objects, &NodeContext { node_name: NODE.into(), ..NodeContext::default() });

    // One pod per endpoint address, named after its targetRef.
    let mut pods: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for slice in snapshot.objects.endpoint_slices.values() {
        for ep in slice.endpoints.iter().flatten() {
            if let Some(Ok(ip)) = ep.addresses.first().map(|a| a.parse::<Ipv4Addr>()) {
                let name = ep.target_ref.as_ref().and_then(|r| r.name.clone()).unwrap_or_else(|| format!("pod-{ip}"));
                pods.entry(ip).or_insert(name);
            }
        }
    }

    println!("== topology (network namespaces, nothing connected to the host)");
    let mut topo = Topology::new()?;
    println!("   node    {:<14} netns {}", NODE, topo.node.name());
    topo.add_pod("client", CLIENT_IP)?;
    println!("   pod     {:<14} {CLIENT_IP:<13} (curl, UDP client)", "client");
    let mut servers: Vec<ChildGuard> = Vec::new();
    for (ip, name) in &pods {
        let pod = topo.add_pod(name, *ip)?;
        println!("   pod     {name:<14} {ip:<13} pod-echo on :8080/TCP and :5353/UDP, host side {}", pod.host_if);
        let mut server = pod.ns.spawn(&binary("pod-echo", "POD_ECHO_BIN"), &["--name", name])?;
        let mut ready = String::new();
        BufReader::new(server.0.stdout.as_mut().context("stdout")?).read_line(&mut ready)?;
        servers.push(server);
    }

    println!("\n== agent: service-agent run --manifests {} --node-name {NODE}", manifests.display());
    for e in &snapshot.errors {
        println!("   manifest problem: {e}");
    }
    let bpffs = BpffsMount::new()?;
    let root = bpffs.path().join(NODE);
    let mut agent = Agent::start(&topo.node, &manifests, NODE, &root, &[])?;
    agent.wait_for_log("synced", 1, Duration::from_secs(30))?;
    agent.wait_for_log("attached pod ingress program", pods.len() + 1, Duration::from_secs(5))?;
    for line in agent.log().lines() {
        println!("   {}", line.split_once("  INFO ").map_or(line, |(_, rest)| rest).trim());
    }

    println!("\n== what the agent programmed (pinned maps under {})", root.display());
    let programmed = PinnedMaps::open(&root, MapSizes::default())?.dump()?;
    for line in dump::render(&programmed).lines() {
        println!("   {line}");
    }

    println!("\n== traffic from the client pod");
    let mut failures = 0;
    for df in desired.frontends.values() {
        let IpAddr::V4(vip) = df.frontend.addr else { continue };
        let port = df.frontend.port;
        if df.frontend.protocol == Protocol::Sctp || df.frontend.scope != model::Scope::Internal {
            continue; // the demo's client speaks TCP and UDP to ClusterIPs
        }
        let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
        let attempts = match df.frontend.protocol {
            Protocol::Tcp => TCP_CONNECTIONS,
            _ => UDP_REQUESTS,
        };
        for _ in 0..attempts {
            let answer = match df.frontend.protocol {
                Protocol::Tcp => curl(&topo, vip, port),
                _ => udp(&topo, vip, port),
            };
            match answer {
                Ok(a) => *per_backend.entry(a.split_whitespace().next().unwrap_or("?").to_owned()).or_default() += 1,
                Err(e) => {
                    failures += 1;
                    eprintln!("   request failed: {e}");
                }
            }
        }
        let what = match df.frontend.protocol {
            Protocol::Tcp => "new TCP connections (curl http://…)",
            _ => "UDP requests",
        };
        println!("   Service {} port {:?}: {attempts} {what} to {vip}:{port}", df.service, df.port_name);
        for (backend, n) in &per_backend {
            #[expect(clippy::cast_precision_loss, reason = "small counts")]
            let share = *n as f64 * 100.0 / attempts as f64;
            println!("      {backend:<10} {n:>4}  {share:>5.1}%  {}", "#".repeat(*n * 40 / attempts));
        }
    }

    println!("\n== dataplane counters (per-CPU, summed)");
    for (name, value) in maps::read_stats(&root)? {
        if value > 0 {
            println!("   {name:<24} {value}");
        }
    }

    println!("\n== cleanup");
    let status = agent.stop()?;
    println!("   agent stopped ({status}); pins removed: {}", !root.exists());
    service_tests::netns::cleanup(&root)?;
    println!("   service-agent cleanup: nothing left under {}", root.display());
    drop(servers);
    let node_ns = topo.node.name().to_owned();
    drop(topo);
    drop(bpffs);
    let left = std::process::Command::new("ip").args(["netns", "list"]).output()?;
    let left = String::from_utf8_lossy(&left.stdout);
    println!("   namespaces removed: {}", !left.contains(&node_ns));
    if failures > 0 {
        bail!("{failures} requests failed");
    }
    println!("\nall requests answered through the ClusterIPs");
    Ok(())
}

fn curl(topo: &Topology, vip: Ipv4Addr, port: u16) -> Result<String> {
    let out = topo.pod("client").ns.exec("curl", &["-sS", "--max-time", "2", &format!("http://{vip}:{port}/")])?;
    if !out.status.success() {
        bail!("curl {vip}:{port}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn udp(topo: &Topology, vip: Ipv4Addr, port: u16) -> Result<String> {
    topo.pod("client").ns.run_in(|| {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        socket.send_to(b"hello", (vip, port))?;
        let mut buf = [0u8; 512];
        let (n, from) = socket.recv_from(&mut buf)?;
        if from != SocketAddr::from((vip, port)) {
            bail!("answer came from {from}, not the ClusterIP");
        }
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}
