//! Benchmark 2: new TCP connections through a ClusterIP in the netns
//! topology (a client pod → ClusterIP → 3 backend pods on one node), with
//! 1, 1,000 and 10,000 Services present, for our dataplane, kube-proxy's
//! iptables and nftables rulesets for the same Services, and no
//! translation at all (the client dials the pod IPs itself), the last
//! without and with netfilter conntrack active in the node. Each case runs
//! in either family: in IPv6 the Services are single-stack IPv6 (every
//! address the [`ipv6_twin`](crate::netns::ipv6_twin) of its IPv4 one),
//! and kube-proxy's rulesets are its IPv6 ones (`ip6tables-restore`, an
//! `ip6 kube-proxy` table).
//!
//! The load client is this program: `workers` threads in the client pod,
//! each in a loop for the run's duration: connect, send `who`, read the
//! backend's one-line answer, close. Each connection's latency (connect to
//! answer) is recorded. Sockets close with `SO_LINGER 0` (an RST, no
//! TIME_WAIT) and the client's port range spans 1024-65535, so no 4-tuple
//! is reused while an earlier one still sits in TIME_WAIT or in conntrack
//! (the SYN-retransmit trap of `wrk -H 'Connection: close'`).

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{Stats, percentile, summarize};
use crate::{
    fixture::{self, ManifestDir},
    kube_proxy_rules::{self, RuleService},
    netns::{Agent, BpffsMount, ChildGuard, Family, Topology},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKENDS: [(&str, Ipv4Addr); 3] = [
    ("backend-a", Ipv4Addr::new(10, 244, 1, 11)),
    ("backend-b", Ipv4Addr::new(10, 244, 1, 12)),
    ("backend-c", Ipv4Addr::new(10, 244, 1, 13)),
];

/// What translates the client's connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Variant {
    /// This project's TC programs, the agent running on the node.
    Ours,
    /// kube-proxy's iptables-mode ruleset (iptables-restore).
    Iptables,
    /// kube-proxy's nftables-mode ruleset (nft -f).
    Nftables,
    /// No translation: the client dials the pod IPs, no netfilter rules.
    Floor,
    /// No translation, with netfilter conntrack active in the node (as it
    /// is under either kube-proxy ruleset).
    FloorConntrack,
}

impl Variant {
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::Ours => "eBPF dataplane (ours)",
            Self::Iptables => "kube-proxy iptables",
            Self::Nftables => "kube-proxy nftables",
            Self::Floor => "pod IP, no netfilter (floor)",
            Self::FloorConntrack => "pod IP, netfilter conntrack on",
        }
    }
}

/// One run's figures.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub connections_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: usize,
}

impl RunResult {
    /// The one line `sock-client tcp-rate|tcp-rr` prints.
    #[must_use]
    pub fn to_line(&self) -> String {
        format!("rate {} p50_ms {} p99_ms {} errors {}", self.connections_per_s, self.p50_ms, self.p99_ms, self.errors)
    }

    /// Reads [`Self::to_line`]'s line back.
    #[must_use]
    pub fn parse(line: &str) -> Option<Self> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["rate", rate, "p50_ms", p50, "p99_ms", p99, "errors", errors] => Some(Self {
                connections_per_s: rate.parse().ok()?,
                p50_ms: p50.parse().ok()?,
                p99_ms: p99.parse().ok()?,
                errors: errors.parse().ok()?,
            }),
            _ => None,
        }
    }
}

/// A variant at a Service count in a family, over the repeats.
#[derive(Clone, Debug)]
pub struct TrafficResult {
    pub variant: Variant,
    pub services: usize,
    pub family: Family,
    pub connections_per_s: Stats,
    pub p50_ms: Stats,
    pub p99_ms: Stats,
    pub errors: usize,
}

/// The measured Service plus `n - 1` others in `family`, for the rule
/// generators. The measured one sits in the middle of the list: iptables
/// matches `KUBE-SERVICES` rule by rule, so its position decides how many
/// rules a new connection passes; the middle is kube-proxy's average case.
fn rule_services(n: usize, family: Family) -> Vec<RuleService> {
    let mut out: Vec<RuleService> = (1..n)
        .map(|i| {
            let i32_ = u32::try_from(i).unwrap_or(0);
            let b = u32::from(Ipv4Addr::new(10, 250, 0, 0)) + 3 * i32_;
            RuleService {
                namespace: "bench".into(),
                name: format!("svc-{i}"),
                port_name: "http".into(),
                cluster_ip: family.addr(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 97, 0, 0)) + i32_)),
                port: 80,
                protocol: "tcp",
                endpoints: (0..3).map(|k| (family.addr(Ipv4Addr::from(b + k)), 8080)).collect(),
            }
        })
        .collect();
    out.insert(
        out.len() / 2,
        RuleService {
            namespace: "bench".into(),
            name: "web".into(),
            port_name: "who".into(),
            cluster_ip: family.addr(VIP),
            port: 80,
            protocol: "tcp",
            endpoints: BACKENDS.iter().map(|(_, ip)| (family.addr(*ip), 7000)).collect(),
        },
    );
    out
}

/// The same Services as manifests for the agent: single-stack Services of
/// their ClusterIP's family, with an EndpointSlice of that `addressType`.
fn manifests(services: &[RuleService]) -> String {
    let mut out = String::new();
    for s in services {
        let family = if s.cluster_ip.is_ipv4() { "IPv4" } else { "IPv6" };
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {n}, namespace: {ns}}}\nspec:\n  clusterIP: \"{ip}\"\n  ipFamilies: [{family}]\n  ports:\n  - {{name: {pn}, port: {p}, targetPort: {tp}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {n}-x\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {n}}}\naddressType: {family}\nports:\n- {{name: {pn}, port: {tp}}}\nendpoints:\n",
            n = s.name,
            ns = s.namespace,
            ip = s.cluster_ip,
            pn = s.port_name,
            p = s.port,
            tp = s.endpoints[0].1,
        );
        for (ip, _) in &s.endpoints {
            let _ = writeln!(out, "- addresses: [\"{ip}\"]\n  nodeName: bench-node");
        }
    }
    out
}

/// The node, its pods and servers, and whatever translates.
pub(crate) struct Bench {
    _agent: Option<Agent>,
    _servers: Vec<ChildGuard>,
    pub(crate) topo: Topology,
    bpffs: Option<BpffsMount>,
    _manifests: Option<ManifestDir>,
}

impl Bench {
    /// The agent's `--bpffs-root` ([`Variant::Ours`] only).
    pub(crate) fn agent_root(&self) -> Option<std::path::PathBuf> {
        self.bpffs.as_ref().map(|b| b.path().join("node"))
    }

    /// The client pod's network namespace.
    pub(crate) fn client(&self) -> &crate::netns::Netns {
        &self.topo.pod("client").ns
    }
}

/// The ClusterIP the client dials in `family`.
pub(crate) fn cluster_ip(family: Family) -> SocketAddr {
    SocketAddr::new(family.addr(VIP), 80)
}

/// The backend pods' addresses in `family`, for dialling them directly.
pub(crate) fn backends(family: Family) -> Vec<SocketAddr> {
    BACKENDS.iter().map(|(_, ip)| SocketAddr::new(family.addr(*ip), 7000)).collect()
}

fn setup(variant: Variant, services: usize, family: Family) -> Result<Bench> {
    setup_with(variant, services, family, &[])
}

/// [`setup`] with `agent_flags` appended to the agent's command line
/// ([`Variant::Ours`]). The topology is dual-stack whatever `family`; the
/// Services and rulesets are of `family` only.
pub(crate) fn setup_with(variant: Variant, services: usize, family: Family, agent_flags: &[&str]) -> Result<Bench> {
    let mut topo = Topology::new()?;
    topo.add_pod("client", CLIENT)?;
    topo.pod("client").ns.sysctl("net.ipv4.ip_local_port_range=1024 65535")?;
    let mut servers = Vec::new();
    for (name, ip) in BACKENDS {
        topo.add_pod(name, ip)?;
        servers.push(fixture::start_echo(&topo.pod(name).ns, name, &["--tcp-port", "7000"])?);
    }
    let rules = rule_services(services, family);
    let iptables_restore = kube_proxy_rules::iptables_restore_tool(family);
    let (mut agent, mut bpffs, mut dir) = (None, None, None);
    match variant {
        Variant::Ours => {
            let m = ManifestDir::new();
            m.write("bench.yaml", &manifests(&rules));
            let b = BpffsMount::new()?;
            let mut a = Agent::start(&topo.node, m.path(), "bench-node", &b.path().join("node"), agent_flags)?;
            a.wait_for_log("synced", 1, Duration::from_mins(2))?;
            a.wait_for_log("attached pod ingress program", 4, Duration::from_secs(10))?;
            (agent, bpffs, dir) = (Some(a), Some(b), Some(m));
        }
        Variant::Iptables => load(&topo, iptables_restore, &[], &kube_proxy_rules::iptables_restore(&rules))?,
        Variant::Nftables => load(&topo, "nft", &["-f"], &kube_proxy_rules::nftables(&rules))?,
        Variant::Floor => {}
        Variant::FloorConntrack => {
            // Any nat table of the family turns conntrack on for it in the
            // namespace; this one translates nothing the client sends.
            let rules = vec![RuleService {
                cluster_ip: family.addr(Ipv4Addr::new(10, 96, 255, 1)),
                ..rule_services(1, family).remove(0)
            }];
            load(&topo, iptables_restore, &[], &kube_proxy_rules::iptables_restore(&rules))?;
        }
    }
    Ok(Bench { _agent: agent, _servers: servers, topo, bpffs, _manifests: dir })
}

fn load(topo: &Topology, program: &str, args: &[&str], rules: &str) -> Result<()> {
    let file = std::env::temp_dir().join(format!("bench-rules-{}", topo.suffix));
    std::fs::write(&file, rules)?;
    let mut all = args.to_vec();
    let path = file.to_string_lossy().into_owned();
    all.push(&path);
    let out = topo.node.exec(program, &all);
    let _ = std::fs::remove_file(&file);
    let out = out?;
    anyhow::ensure!(out.status.success(), "{program}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// One connection: connect, `who`, one line back, RST close.
fn one(target: SocketAddr) -> Result<()> {
    let mut conn = connect(target)?;
    ask(&mut conn)?;
    linger_zero(conn.get_ref())?;
    Ok(())
}

/// A connection to `target` (2 s timeouts, no Nagle delay), read line by
/// line.
fn connect(target: SocketAddr) -> Result<BufReader<TcpStream>> {
    let s = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_nodelay(true)?;
    Ok(BufReader::new(s))
}

/// One round trip: `who`, and the backend's one-line answer.
fn ask(conn: &mut BufReader<TcpStream>) -> Result<()> {
    conn.get_mut().write_all(b"who\n")?;
    let mut line = String::new();
    conn.read_line(&mut line)?;
    anyhow::ensure!(line.starts_with("backend-"), "unexpected answer {line:?}");
    Ok(())
}

/// `SO_LINGER {on, 0}`: `close` sends an RST and leaves no TIME_WAIT.
fn linger_zero(s: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::linger>()).unwrap_or(8);
    // SAFETY: setsockopt with a valid linger struct of `len` bytes on an
    // open socket.
    let rc =
        unsafe { libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, (&raw const linger).cast(), len) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs the load from the client pod for `duration` with `workers`.
fn drive(bench: &Bench, variant: Variant, family: Family, workers: usize, duration: Duration) -> RunResult {
    let targets = if matches!(variant, Variant::Floor | Variant::FloorConntrack) {
        backends(family)
    } else {
        vec![cluster_ip(family)]
    };
    bench.client().run_in(move || new_connections(&targets, workers, duration))
}

/// `workers` threads, each repeating its operation (from `make`, given the
/// worker's index) for `duration`; the latency of every operation that
/// succeeded is recorded, the failures counted.
fn timed_loop<F>(workers: usize, duration: Duration, make: impl Fn(usize) -> F) -> RunResult
where
    F: FnMut() -> Result<()> + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (stop, errors, mut op) = (stop.clone(), errors.clone(), make(w));
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    match op() {
                        Ok(()) => lat.push(started.elapsed().as_secs_f64() * 1e3),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                lat
            })
        })
        .collect();
    let started = Instant::now();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<f64> = handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect();
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    #[expect(clippy::cast_precision_loss, reason = "operation counts")]
    let rate = all.len() as f64 / elapsed;
    RunResult {
        connections_per_s: rate,
        p50_ms: percentile(&all, 50.0),
        p99_ms: percentile(&all, 99.0),
        errors: errors.load(Ordering::Relaxed),
    }
}

/// New connections ([`one`]) from this thread's network namespace for
/// `duration`, `workers` at a time, each worker taking the targets in turn.
#[must_use]
pub fn new_connections(targets: &[SocketAddr], workers: usize, duration: Duration) -> RunResult {
    timed_loop(workers, duration, |w| {
        let (targets, mut next) = (targets.to_vec(), w);
        move || {
            next += 1;
            one(targets[next % targets.len()])
        }
    })
}

/// Round trips ([`ask`]) on one established connection per worker (worker
/// `w` connected to `targets[w % len]` before the clock starts) for
/// `duration`. A connection that failed is opened again by the next round
/// trip (its time counted in that one).
#[must_use]
pub fn round_trips(targets: &[SocketAddr], workers: usize, duration: Duration) -> RunResult {
    timed_loop(workers, duration, |w| {
        let target = targets[w % targets.len()];
        let mut held = connect(target).ok();
        move || {
            let mut conn = match held.take() {
                Some(conn) => conn,
                None => connect(target)?,
            };
            ask(&mut conn)?;
            held = Some(conn);
            Ok(())
        }
    })
}

/// One measurement of `variant` at `services` Services of `family` on a
/// fresh topology: set up, warm up (ARP or neighbour discovery, first
/// flows), then `duration` of load.
///
/// # Errors
/// When the topology or the translation cannot be set up.
pub fn run_once(
    variant: Variant,
    services: usize,
    family: Family,
    workers: usize,
    duration: Duration,
) -> Result<RunResult> {
    let started = Instant::now();
    let bench = setup(variant, services, family)
        .with_context(|| format!("{} at {services} {family} Services", variant.label()))?;
    eprintln!(
        "      (set-up of {} at {services} {family} Services: {:.1} s)",
        variant.label(),
        started.elapsed().as_secs_f64()
    );
    let _ = drive(&bench, variant, family, workers, Duration::from_millis(300));
    Ok(drive(&bench, variant, family, workers, duration))
}

/// The runs of one variant at one Service count in one family, summarized.
#[must_use]
pub fn combine(variant: Variant, services: usize, family: Family, runs: &[RunResult]) -> TrafficResult {
    TrafficResult {
        variant,
        services,
        family,
        connections_per_s: summarize(runs.iter().map(|r| r.connections_per_s).collect()),
        p50_ms: summarize(runs.iter().map(|r| r.p50_ms).collect()),
        p99_ms: summarize(runs.iter().map(|r| r.p99_ms).collect()),
        errors: runs.iter().map(|r| r.errors).sum(),
    }
}

/// Checks that traffic really flows through a variant's translation in
/// `family`: every backend answers through the ClusterIP, and each saw the
/// client's own address of that family (DNAT only, the client not
/// masqueraded).
///
/// # Errors
/// When a connection fails, a backend never answers or an answer names
/// another peer.
pub fn check_flows(variant: Variant, services: usize, family: Family) -> Result<()> {
    let bench = setup(variant, services, family)?;
    let vip = cluster_ip(family);
    let client: IpAddr = family.addr(CLIENT);
    let seen = bench.topo.pod("client").ns.run_in(|| -> Result<std::collections::BTreeSet<String>> {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..60 {
            let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"who\n")?;
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line)?;
            let mut words = line.split_whitespace();
            let backend = words.next().unwrap_or_default().to_owned();
            let peer: Option<SocketAddr> = words.next().and_then(|w| w.parse().ok());
            anyhow::ensure!(peer.map(|p| p.ip()) == Some(client), "{family} answer {line:?}: peer is not {client}");
            seen.insert(backend);
        }
        Ok(seen)
    })?;
    anyhow::ensure!(seen.len() == 3, "{} in {family}: backends reached {seen:?}", variant.label());
    Ok(())
}
