//! Benchmark 3: the control plane. Programming 10,000 Services with
//! 100,000 endpoints into an empty dataplane (model + reconciler + map
//! writes + the sync's metrics, in process, as the agent's sync loop runs
//! them), one EndpointSlice change at that size until the maps and
//! metrics are updated, the agent's peak RSS and the BPF maps' memory; beside
//! the time kube-proxy's way takes: `iptables-restore` and `nft -f` of the
//! equivalent full rulesets in a scratch network namespace.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use service_agent::{
    maps::{self, MapSizes, PinnedMaps},
    metrics::{Metrics, Relabel},
    model::{self, Model, NodeContext},
    reconciler::{Reconciler, maglev},
    vocabulary::{self, ObjectRef, Objects},
};
use service_common::map_names;

use super::{Stats, summarize};
use crate::{
    fixture::ManifestDir,
    kube_proxy_rules::{self, RuleService},
    netns::{Agent, BpffsMount, Netns, unique_suffix},
};

/// The control plane figures.
#[derive(Clone, Debug)]
pub struct ControlPlane {
    pub services: usize,
    pub endpoints: usize,
    /// Empty dataplane to every row written.
    pub program_all: Stats,
    /// Of which the model (every Service computed).
    pub program_all_model: Stats,
    /// One EndpointSlice changed to the maps updated.
    pub one_change: Stats,
    /// Of which the model (objects → desired frontends).
    pub one_change_model: Stats,
    /// kube-proxy's full loads (`None`: not run at this size).
    pub iptables_restore: Option<Stats>,
    pub nft_load: Option<Stats>,
    /// The agent's peak resident set, running on those manifests.
    pub agent_peak_rss_bytes: u64,
    /// Its resident set once synced and settled (the parse of the manifests
    /// and the first sync's temporaries released). Both less
    /// [`Self::agent_mapped_map_bytes`].
    pub agent_rss_bytes: u64,
    /// The resident pages of the BPF maps the agent maps into its address
    /// space (`backend_slots`): counted in its RSS by the kernel, but the
    /// map's memory (in [`Self::map_memory_bytes`]), so left out of the
    /// two above.
    pub agent_mapped_map_bytes: u64,
    /// The map sizes the benchmark programs into.
    pub map_sizes: MapSizes,
    /// Kernel memory of the agent's maps at that size (fdinfo `memlock`).
    pub map_memory_bytes: u64,
    /// The same, per map (in `map_names::ALL` order).
    pub map_memory: Vec<(&'static str, u64)>,
}

/// The maps whose size follows the Services and endpoints (the rest hold
/// flows, sized by their flags whatever the Services).
pub const SERVICE_STATE_MAPS: [&str; 8] = [
    map_names::SERVICES,
    map_names::BACKEND_SLOTS,
    map_names::BACKENDS,
    map_names::REV_NAT,
    map_names::SERVICE_COUNTERS,
    map_names::BACKEND_COUNTERS,
    map_names::SOCK_COUNTERS,
    map_names::SOURCE_RANGES,
];

impl ControlPlane {
    /// The memory of the maps of [`SERVICE_STATE_MAPS`].
    #[must_use]
    pub fn service_state_bytes(&self) -> u64 {
        self.map_memory.iter().filter(|(n, _)| SERVICE_STATE_MAPS.contains(n)).map(|(_, b)| b).sum()
    }
}

fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + u32::try_from(i).unwrap_or(0))
}

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 10 + u32::try_from(i).unwrap_or(0))
}

/// `services` ClusterIP Services with `per` endpoints each, as objects.
#[must_use]
pub fn objects(services: usize, per: usize) -> Objects {
    let mut objects = Objects::default();
    for i in 0..services {
        let name = format!("svc-{i}");
        let r = ObjectRef { namespace: "bench".into(), name: name.as_str().into() };
        let svc = Service {
            metadata: ObjectMeta { name: Some(name.clone()), namespace: Some("bench".into()), ..ObjectMeta::default() },
            spec: Some(ServiceSpec {
                cluster_ip: Some(vip(i).to_string()),
                cluster_ips: Some(vec![vip(i).to_string()]),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    target_port: Some(IntOrString::Int(8080)),
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            status: None,
        };
        objects.services.insert(r.clone(), Arc::new(svc));
        objects.endpoint_slices.insert(
            ObjectRef { namespace: "bench".into(), name: format!("{name}-x").into() },
            Arc::new(slice(i, per, 0).into()),
        );
    }
    objects
}

/// The slice of Service `i`; `shift` moves its first endpoint (a change).
fn slice(i: usize, per: usize, shift: usize) -> EndpointSlice {
    let endpoints = Some(
        (0..per)
            .map(|j| {
                let ip = if j == 0 && shift > 0 { pod_ip(4_000_000 + shift) } else { pod_ip(i * per + j) };
                Endpoint { addresses: vec![ip.to_string()], ..Endpoint::default() }
            })
            .collect(),
    );
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}-x")),
            namespace: Some("bench".into()),
            labels: Some([(vocabulary::LABEL_SERVICE_NAME.to_owned(), format!("svc-{i}"))].into()),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        endpoints,
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..EndpointPort::default()
        }]),
    }
}

/// The same Services for the kube-proxy rule generators.
#[must_use]
pub fn rule_services(services: usize, per: usize) -> Vec<RuleService> {
    (0..services)
        .map(|i| RuleService {
            namespace: "bench".into(),
            name: format!("svc-{i}"),
            port_name: "http".into(),
            cluster_ip: vip(i).into(),
            port: 80,
            protocol: "tcp",
            endpoints: (0..per).map(|j| (pod_ip(i * per + j).into(), 8080)).collect(),
        })
        .collect()
}

/// The manifests of [`objects`], as YAML a user would write.
fn manifests_yaml(services: usize, per: usize) -> String {
    let mut out = String::new();
    for i in 0..services {
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\nspec:\n  clusterIP: {v}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-x\n  namespace: bench\n  labels: {{kubernetes.io/service-name: svc-{i}}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080}}\nendpoints:\n",
            v = vip(i)
        );
        for j in 0..per {
            let _ = writeln!(out, "- addresses: [\"{}\"]", pod_ip(i * per + j));
        }
    }
    out
}

/// The kernel memory charged to a pinned map (`memlock` in its fdinfo).
fn memlock(pin: &Path) -> Result<u64> {
    let data = aya::maps::MapData::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
    let fd = data.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:").and_then(|v| v.trim().parse().ok()))
        .context("no memlock in fdinfo")
}

/// Times `program args < input` inside a fresh namespace, `repeats` times
/// (a new namespace each time: kube-proxy's full sync into empty tables).
fn time_load(program: &str, args: &[&str], input: &str, repeats: usize) -> Result<Stats> {
    let file = std::env::temp_dir().join(format!("bench-rules-{}", unique_suffix()));
    std::fs::write(&file, input)?;
    let mut samples = Vec::new();
    for _ in 0..repeats {
        let ns = Netns::new(&format!("sd-bench-rules-{}", unique_suffix()))?;
        let mut full: Vec<&str> = args.to_vec();
        let path = file.to_string_lossy().into_owned();
        full.push(&path);
        let started = Instant::now();
        let out = ns.exec(program, &full)?;
        let took = started.elapsed();
        if !out.status.success() {
            let _ = std::fs::remove_file(&file);
            bail!("{program} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        samples.push(took.as_secs_f64() * 1e3);
    }
    let _ = std::fs::remove_file(&file);
    Ok(summarize(samples))
}

/// Map capacities for `services` Services of `per` endpoints each, with
/// room for twice that: every Service's ClusterIP is two frontends (from
/// pods and from outside) sharing one backend table (its Maglev slots and
/// member list, in whole blocks).
#[must_use]
pub fn sizes(services: usize, per: usize) -> MapSizes {
    use service_common::backend_slots::{PER_BLOCK, blocks};
    let per_u32 = u32::try_from(per).unwrap_or(u32::MAX);
    let table = blocks(maglev::table_size(per), per_u32) * PER_BLOCK;
    let room = |n: usize| u32::try_from(2 * n).unwrap_or(u32::MAX);
    MapSizes {
        services: room(services * 2),
        backend_slots: room(services * table as usize),
        backends: room(services * per),
        ..MapSizes::default()
    }
}

/// Runs the control plane benchmark at `services` × `per` endpoints:
/// `ours` times program all then `changes` single-slice changes, and,
/// when `with_kube_proxy`, kube-proxy's full loads of the same Services
/// `repeats` times.
///
/// # Errors
/// When a step fails.
pub fn measure(
    services: usize,
    per: usize,
    changes: usize,
    repeats: usize,
    ours: usize,
    with_kube_proxy: bool,
) -> Result<ControlPlane> {
    let node = NodeContext { node_name: "bench-node".into(), ..NodeContext::default() };
    let sizes = sizes(services, per);
    let mut program_all = Vec::new();
    let mut program_all_model = Vec::new();
    let mut one_change = Vec::new();
    let mut one_change_model = Vec::new();
    let mut map_memory_bytes = 0;
    let mut map_memory = Vec::new();
    for _ in 0..ours {
        // Each repeat starts from the same objects (the changes below edit
        // them).
        let mut objects = objects(services, per);
        let bpffs = BpffsMount::new()?;
        let root = bpffs.path().join("bench");
        let mut ebpf = maps::load(&root, sizes)?;
        let mut reconciler = Reconciler::new(PinnedMaps::from_ebpf(&mut ebpf, sizes)?)?;
        // As the agent's sync loop: the incremental model over each
        // snapshot, the reconciler given what it says changed.
        let mut model = Model::new();
        let metrics = Metrics::new(root.clone(), sizes);
        // The agent's sync step (run.rs `sync_once`): the model, the
        // reconciler given what changed, then the sync's metrics (the
        // counter labels of what changed).
        let mut sync = |objects: &Objects| {
            let started = Instant::now();
            let delta = model.update(objects, &node);
            let model_ms = started.elapsed().as_secs_f64() * 1e3;
            let report = reconciler.reconcile_changes(model.desired(), &delta);
            metrics.observe_sync(
                started.elapsed(),
                objects,
                model.desired(),
                reconciler.programmed(),
                report.errors.len(),
                Relabel::after(report.full, &delta.frontends),
            );
            metrics.observe_maps(reconciler.programmed(), reconciler.slot_blocks().0);
            (started.elapsed().as_secs_f64() * 1e3, model_ms, report)
        };
        let (ms, model_ms, report) = sync(&objects);
        program_all.push(ms);
        program_all_model.push(model_ms);
        anyhow::ensure!(report.errors.is_empty(), "programming: {:?}", report.errors.first());
        for c in 0..changes {
            let i = (c * 7919) % services;
            let r = ObjectRef { namespace: "bench".into(), name: format!("svc-{i}-x").into() };
            objects.endpoint_slices.insert(r, Arc::new(slice(i, per, c + 1).into()));
            let (ms, model_ms, report) = sync(&objects);
            one_change_model.push(model_ms);
            one_change.push(ms);
            anyhow::ensure!(report.changed() && report.errors.is_empty(), "change {c} wrote nothing");
        }
        // Outside the clock: the incremental result is the full one.
        anyhow::ensure!(*model.desired() == model::desired(&objects, &node), "the incremental model drifted");
        map_memory = map_names::ALL.iter().map(|n| Ok((*n, memlock(&root.join(n))?))).collect::<Result<Vec<_>>>()?;
        map_memory_bytes = map_memory.iter().map(|(_, b)| b).sum();
        drop(reconciler);
        drop(ebpf);
        maps::remove_pins(&root)?;
    }
    let (iptables_restore, nft_load) = if with_kube_proxy {
        let rules = rule_services(services, per);
        (
            Some(time_load("iptables-restore", &[], &kube_proxy_rules::iptables_restore(&rules), repeats)?),
            Some(time_load("nft", &["-f"], &kube_proxy_rules::nftables(&rules), repeats)?),
        )
    } else {
        (None, None)
    };
    let (agent_peak_rss_bytes, agent_rss_bytes, agent_mapped_map_bytes) = agent_rss(services, per, sizes)?;
    Ok(ControlPlane {
        services,
        endpoints: services * per,
        program_all: summarize(program_all),
        program_all_model: summarize(program_all_model),
        one_change: summarize(one_change),
        one_change_model: summarize(one_change_model),
        iptables_restore,
        nft_load,
        agent_peak_rss_bytes,
        agent_mapped_map_bytes,
        agent_rss_bytes,
        map_sizes: sizes,
        map_memory_bytes,
        map_memory,
    })
}

/// Runs the real agent on the manifests in a scratch node namespace until
/// its first sync, and reads its peak and current resident set (`VmHWM`,
/// `VmRSS`), each less the mapped BPF maps' pages, and those.
fn agent_rss(services: usize, per: usize, sizes: MapSizes) -> Result<(u64, u64, u64)> {
    let dir = ManifestDir::new();
    // In files of 1,000 Services (0.7 MB): a manifest file is read up to
    // 8 MiB, and 50,000 Services in one would be skipped as too large.
    let yaml = manifests_yaml(services, per);
    let mut file = String::new();
    for (i, doc) in yaml.split_inclusive("\n---\n").enumerate() {
        file.push_str(doc);
        if (i + 1) % 2_000 == 0 {
            dir.write(&format!("bench-{:04}.yaml", i / 2_000), &std::mem::take(&mut file));
            file.push_str("---\n");
        }
    }
    dir.write("bench-last.yaml", &file);
    let ns = Netns::new(&format!("sd-bench-agent-{}", unique_suffix()))?;
    let bpffs = BpffsMount::new()?;
    let root = bpffs.path().join("bench");
    let (s, b, c) = (sizes.services.to_string(), sizes.backends.to_string(), sizes.conntrack.to_string());
    let slots = sizes.backend_slots.to_string();
    let mut agent = Agent::start(
        &ns,
        dir.path(),
        "bench-node",
        &root,
        &[
            "--map-size-services",
            &s,
            "--map-size-backend-slots",
            &slots,
            "--map-size-backends",
            &b,
            "--map-size-conntrack",
            &c,
            "--metrics-bind-address",
            "127.0.0.1:0",
            "--healthz-bind-address",
            "127.0.0.1:0",
        ],
    )?;
    agent.wait_for_log("synced", 1, Duration::from_mins(5))?;
    // Every Service read, none skipped.
    let want = format!("synced services={services} ");
    anyhow::ensure!(agent.log().contains(&want), "the agent did not sync {services} Services: {}", agent.log());
    let pid = agent.pid().context("agent pid")?;
    let kib = |field: &str| -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()))
            .map(|kib: u64| kib * 1024)
            .with_context(|| format!("no {field} in /proc/{pid}/status"))
    };
    // Once settled: what the first sync's work freed is handed back by
    // the sync and by the source task after it (`memory::release_freed`),
    // so the resident set read at the log line can still be on its way
    // down. Read every half second until two readings agree within
    // 1 MiB (at most 10 s).
    let mut now = kib("VmRSS:")?;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(500));
        let next = kib("VmRSS:")?;
        let settled = next.abs_diff(now) < 1024 * 1024;
        now = next;
        if settled {
            break;
        }
    }
    let peak = kib("VmHWM:")?;
    let mapped = mapped_map_rss(pid)?;
    agent.stop()?;
    Ok((peak.saturating_sub(mapped), now.saturating_sub(mapped), mapped))
}

/// The resident pages of BPF maps process `pid` has mapped (`backend_slots`,
/// mapped so tables are written without a syscall per block): the map's
/// own memory, counted under the map memory, not the agent's.
fn mapped_map_rss(pid: u32) -> Result<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut in_map = false;
    let mut kib = 0;
    for line in smaps.lines() {
        // A mapping's header: `start-end perms offset dev inode [path]`.
        let mut fields = line.split_whitespace();
        if fields.next().is_some_and(|f| f.contains('-') && f.chars().all(|c| c.is_ascii_hexdigit() || c == '-')) {
            in_map = fields.nth(4) == Some("anon_inode:bpf-map");
        } else if in_map && let Some(v) = line.strip_prefix("Rss:") {
            kib += v.trim().trim_end_matches("kB").trim().parse::<u64>().context("Rss in smaps")?;
        }
    }
    Ok(kib * 1024)
}
