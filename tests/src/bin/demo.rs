//! What `cargo xtask demo` runs (as root): a two-node cluster of network
//! namespaces (an external client, node-1 and node-2 on a fabric bridge,
//! one pod per endpoint of the example manifests on the node its
//! EndpointSlice names, a client pod on node-1), an agent on each node
//! reading those manifests, real TCP and UDP traffic through every
//! ClusterIP from the client pod and through every NodePort on both nodes
//! from the external client, and an account of what happened. Everything
//! is removed at the end, also on failure.
//!
//! The topology is dual-stack (every pod, node and the client has the IPv6
//! twin of its IPv4 address, see `netns::ipv6_twin`), and so is the
//! example `web` Service: its IPv4 and IPv6 ClusterIPs and NodePorts are
//! each dialled in their own family, and the account ends with how each
//! dual-stack Service answered over each family.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use service_agent::{
    maps::{self, MapIo as _, MapSizes, PinnedMaps},
    model::{self, Desired, FrontendKind, NodeContext, Protocol, Scope},
    rows::render as dump,
    source::manifest,
};
use service_tests::{
    cluster::{Cluster, EXTERNAL_IP, external_ip6, node_ip},
    netns::{
        Agent, BpffsMount, ChildGuard, Family, Netns, binary, clean_up_on_signal, http_url, ipv6_twin, is_root,
        sweep_leftovers,
    },
    traffic::any_port_for,
};

const NODES: u8 = 2;
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const TCP_CONNECTIONS: usize = 60;
const UDP_REQUESTS: usize = 30;

fn node_name(n: u8) -> String {
    format!("node-{n}")
}

/// The pod each endpoint address names (`targetRef.name`), as the
/// manifests in `dir` write it, in EndpointSlices and v1 Endpoints alike
/// (the agent keeps no targetRef: the demo names its pods after them).
fn target_names(dir: &std::path::Path) -> Result<BTreeMap<String, String>> {
    use serde_norway::Value;
    let mut names = BTreeMap::new();
    let mut add = |address: &Value, target: &Value| {
        if let (Some(a), Some(t)) = (address.as_str(), target.get("name").and_then(Value::as_str)) {
            names.insert(a.to_owned(), t.to_owned());
        }
    };
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if !path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        for document in text.split("\n---") {
            let Ok(doc) = serde_norway::from_str::<Value>(document) else { continue };
            let seq = |v: Option<&Value>| v.and_then(Value::as_sequence).cloned().unwrap_or_default();
            for ep in seq(doc.get("endpoints")) {
                if let (Some(a), Some(t)) = (seq(ep.get("addresses")).first(), ep.get("targetRef")) {
                    add(a, t);
                }
            }
            for subset in seq(doc.get("subsets")) {
                for a in seq(subset.get("addresses")).into_iter().chain(seq(subset.get("notReadyAddresses"))) {
                    if let (Some(ip), Some(t)) = (a.get("ip"), a.get("targetRef")) {
                        add(ip, t);
                    }
                }
            }
        }
    }
    Ok(names)
}

#[expect(clippy::too_many_lines, reason = "the demo reads top to bottom as the story it prints")]
fn main() -> Result<()> {
    if !is_root() {
        bail!("the demo creates network namespaces and loads BPF programs: run it as root");
    }
    // Ctrl-C (or SIGTERM, also forwarded by `cargo xtask demo`) removes
    // the demo's namespaces, agents and mounts; a killed run's are swept.
    for what in sweep_leftovers() {
        println!("removed a leftover of a killed run: {what}");
    }
    clean_up_on_signal();
    let manifests =
        std::env::var_os("DEMO_MANIFESTS").map_or_else(|| PathBuf::from("examples/manifests"), PathBuf::from);
    let snapshot = manifest::load_dir(&manifests).with_context(|| format!("reading {}", manifests.display()))?;
    // The frontends as node-1 sees them (NodePorts on node-1's address);
    // node-2 serves the same ports on its own.
    let desired = model::desired(
        &snapshot.objects,
        &NodeContext {
            node_name: node_name(1),
            nodeport_addresses: Family::BOTH.iter().map(|f| f.addr(node_ip(1))).collect(),
            ..NodeContext::default()
        },
    );

    // One pod per IPv4 endpoint address, named after its targetRef, on its
    // node; it gets the IPv6 twin of that address too, which is what the
    // IPv6 slices must name (checked below).
    let mut pods: BTreeMap<Ipv4Addr, (String, u8)> = BTreeMap::new();
    let mut ipv6_endpoints: Vec<(String, String)> = Vec::new();
    let targets = target_names(&manifests)?;
    for slice in snapshot.objects.endpoint_slices.values() {
        for ep in slice.endpoints.iter().flatten() {
            let target = ep.address.as_deref().and_then(|a| targets.get(a)).cloned();
            if let Some(Ok(ip)) = ep.address.as_deref().map(str::parse::<std::net::Ipv6Addr>) {
                ipv6_endpoints.push((target.clone().unwrap_or_else(|| format!("pod-{ip}")), ip.to_string()));
            }
            if let Some(Ok(ip)) = ep.address.as_deref().map(str::parse::<Ipv4Addr>) {
                let name = target.unwrap_or_else(|| format!("pod-{ip}"));
                let node = ep
                    .node_name
                    .as_deref()
                    .and_then(|n| n.strip_prefix("node-"))
                    .and_then(|n| n.parse::<u8>().ok())
                    .filter(|n| (1..=NODES).contains(n))
                    .unwrap_or(1);
                pods.entry(ip).or_insert((name, node));
            }
        }
    }

    println!("== topology (network namespaces, nothing connected to the host; dual-stack: IPv4 and IPv6 everywhere)");
    let mut cluster = Cluster::new(NODES)?;
    println!("   fabric  bridge br0                netns {}", cluster.fabric.name());
    println!(
        "   client  external {EXTERNAL_IP:<15} {:<22} netns {}",
        external_ip6().to_string(),
        cluster.external.name()
    );
    for n in 1..=NODES {
        println!(
            "   node    {:<8} {:<15} {:<22} netns {}, pods 10.244.{n}.0/24 and {}/64",
            node_name(n),
            node_ip(n),
            ipv6_twin(node_ip(n)).to_string(),
            cluster.node(n).node.name(),
            ipv6_twin(Ipv4Addr::new(10, 244, n, 0)),
        );
    }
    cluster.node_mut(1).add_pod("client", CLIENT_IP)?;
    println!(
        "   pod     {:<8} {CLIENT_IP:<15} {:<22} on node-1 (curl, UDP client)",
        "client",
        ipv6_twin(CLIENT_IP).to_string()
    );
    let mut servers: Vec<ChildGuard> = Vec::new();
    for (ip, (name, node)) in &pods {
        let pod = cluster.node_mut(*node).add_pod(name, *ip)?;
        println!(
            "   pod     {name:<8} {ip:<15} {:<22} on node-{node}, pod-echo on :8080/TCP and :5353/UDP",
            pod.ip6.to_string()
        );
        let mut server = pod.ns.spawn(&binary("pod-echo", "POD_ECHO_BIN"), &["--name", name])?;
        let mut ready = String::new();
        BufReader::new(server.0.stdout.as_mut().context("stdout")?).read_line(&mut ready)?;
        servers.push(server);
    }

    for (name, ip) in &ipv6_endpoints {
        let pod = pods.iter().find(|(_, (n, _))| n == name);
        if pod.is_none_or(|(v4, _)| ipv6_twin(*v4).to_string() != *ip) {
            println!("   manifest problem: IPv6 endpoint {ip} ({name}) is no pod's address in this topology");
        }
    }
    for e in &snapshot.errors {
        println!("   manifest problem: {e}");
    }
    let bpffs = BpffsMount::new()?;
    let mut agents = Vec::new();
    for n in 1..=NODES {
        let name = node_name(n);
        println!(
            "\n== agent on {name}: service-agent run --manifests {} --node-name {name} --external-interfaces eth0",
            manifests.display()
        );
        let root = bpffs.path().join(&name);
        let node = &cluster.node(n).node;
        let mut agent = Agent::start(node, &manifests, &name, &root, &["--external-interfaces", "eth0"])?;
        agent.wait_for_log("synced", 1, Duration::from_secs(30))?;
        agent.wait_for_log("attached external ingress program", 1, Duration::from_secs(5))?;
        for line in agent.log().lines() {
            println!("   {}", line.split_once("  INFO ").map_or(line, |(_, rest)| rest).trim());
        }
        agents.push((agent, root));
    }

    println!("\n== what node-1's agent programmed (pinned maps under {})", agents[0].1.display());
    let programmed = PinnedMaps::open(&agents[0].1, MapSizes::default())?.dump()?;
    for line in dump::render(&programmed).lines() {
        println!("   {line}");
    }

    let mut tally = Tally::new();
    println!("\n== ClusterIP traffic from the client pod on node-1 (each ClusterIP in its own family)");
    let client_pod = &cluster.node(1).pod("client").ns;
    traffic(&desired, Scope::Internal, client_pod, &[None], &mut tally);
    println!("\n== NodePort traffic from the external client {EXTERNAL_IP} / {}, to both nodes", external_ip6());
    println!(
        "   (every backend sees the node the client hit: externalTrafficPolicy Cluster masquerades, as kube-proxy)"
    );
    let nodes: Vec<Option<u8>> = (1..=NODES).map(Some).collect();
    traffic(&desired, Scope::External, &cluster.external, &nodes, &mut tally);

    println!("\n== each Service over each family (dual-stack Services are reached over both)");
    for ((service, family), (ok, tried)) in &tally {
        let families = desired
            .frontends
            .values()
            .filter(|df| df.service.to_string() == *service)
            .fold((false, false), |(v4, v6), df| (v4 || df.frontend.addr.is_ipv4(), v6 || df.frontend.addr.is_ipv6()));
        let stack = if families == (true, true) { "dual-stack" } else { "single-stack" };
        println!("   Service {service} ({stack}) over {family}: {ok}/{tried} requests answered");
    }
    let failures: usize = tally.values().map(|(ok, tried)| tried - ok).sum();

    println!("\n== dataplane counters (per-CPU, summed)");
    for (_, root) in &agents {
        println!("   {}", root.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
        for (name, value) in maps::read_stats(root)? {
            if value > 0 {
                println!("      {name:<24} {value}");
            }
        }
    }

    println!("\n== cleanup");
    for (mut agent, root) in agents {
        let status = agent.stop()?;
        println!("   agent stopped ({status}); pins removed: {}", !root.exists());
        service_tests::netns::cleanup(&root)?;
    }
    drop(servers);
    let names: Vec<String> = cluster.nodes.iter().map(|t| t.node.name().to_owned()).collect();
    drop(cluster);
    drop(bpffs);
    let left = std::process::Command::new("ip").args(["netns", "list"]).output()?;
    let left = String::from_utf8_lossy(&left.stdout);
    println!("   namespaces removed: {}", names.iter().all(|n| !left.contains(n.as_str())));
    if failures > 0 {
        bail!("{failures} requests failed");
    }
    println!("\nall requests answered through the ClusterIPs and the NodePorts, in both families");
    Ok(())
}

/// Requests answered and sent, per Service and family.
type Tally = BTreeMap<(String, Family), (usize, usize)>;

/// Sends TCP connections and UDP requests from `ns` to every TCP/UDP
/// frontend of `scope` (NodePorts to the address of each node of `nodes`
/// in the frontend's family, others to their own address) and prints which
/// backend answered and which source it saw. Counts the requests answered
/// and sent per Service and family in `tally`.
fn traffic(desired: &Desired, scope: Scope, ns: &Netns, nodes: &[Option<u8>], tally: &mut Tally) {
    for df in desired.frontends.values() {
        let addr = df.frontend.addr;
        let family = if addr.is_ipv4() { Family::V4 } else { Family::V6 };
        if df.frontend.protocol == Protocol::Sctp || df.frontend.scope != scope {
            continue; // the demo's clients speak TCP and UDP
        }
        if scope == Scope::External && df.kind == FrontendKind::ClusterIp {
            continue; // the external client has no route to the service CIDR
        }
        let port = df.frontend.port;
        for node in nodes {
            let addr = match node {
                Some(n) if df.kind == FrontendKind::NodePort => family.addr(node_ip(*n)),
                _ => addr,
            };
            let attempts = if df.frontend.protocol == Protocol::Tcp { TCP_CONNECTIONS } else { UDP_REQUESTS };
            let mut per_backend: BTreeMap<(String, String), usize> = BTreeMap::new();
            let counts = tally.entry((df.service.to_string(), family)).or_default();
            for _ in 0..attempts {
                let answer = match df.frontend.protocol {
                    Protocol::Tcp => curl(ns, addr, port),
                    _ => udp(ns, addr, port),
                };
                counts.1 += 1;
                match answer {
                    Ok(a) => {
                        counts.0 += 1;
                        let mut words = a.split_whitespace();
                        let backend = words.next().unwrap_or("?").to_owned();
                        let seen = words
                            .next()
                            .and_then(|p| p.parse::<SocketAddr>().ok())
                            .map_or_else(|| "?".to_owned(), |p| p.ip().to_string());
                        *per_backend.entry((backend, seen)).or_default() += 1;
                    }
                    Err(e) => eprintln!("   request failed: {e}"),
                }
            }
            let what = match df.frontend.protocol {
                Protocol::Tcp => "new TCP connections",
                _ => "UDP requests",
            };
            println!(
                "   Service {} port {:?} ({}): {attempts} {what} to {}",
                df.service,
                df.port_name,
                df.kind,
                SocketAddr::new(addr, port)
            );
            for ((backend, seen), n) in &per_backend {
                #[expect(clippy::cast_precision_loss, reason = "small counts")]
                let share = *n as f64 * 100.0 / attempts as f64;
                println!("      {backend:<8} {n:>4}  {share:>5.1}%  saw {seen:<20} {}", "#".repeat(*n * 40 / attempts));
            }
            if df.kind != FrontendKind::NodePort {
                break;
            }
        }
    }
}

fn curl(ns: &Netns, addr: IpAddr, port: u16) -> Result<String> {
    let url = http_url(addr, port);
    let out = ns.exec("curl", &["-sS", "--max-time", "2", &url])?;
    if !out.status.success() {
        bail!("curl {url}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn udp(ns: &Netns, addr: IpAddr, port: u16) -> Result<String> {
    let to = SocketAddr::new(addr, port);
    ns.run_in(|| {
        let socket = UdpSocket::bind(any_port_for(to))?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        socket.send_to(b"hello", to)?;
        let mut buf = [0u8; 512];
        let (n, from) = socket.recv_from(&mut buf)?;
        if from != to {
            bail!("answer came from {from}, not {to}");
        }
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}
