//! `service-agent run`: wires the pieces together and drives them.
//!
//! One task owns everything (the loaded object, the reconciler, the attach
//! managers, the health check servers) and reacts to four inputs: a new
//! snapshot from the source, a link/address/route event (or the periodic
//! re-scan), the time the reconciler's next deferred deletion is due, and
//! SIGINT/SIGTERM. The node's addresses are part of the model's input: when
//! they change, the frontends are synced again. The conntrack garbage
//! collector (`crate::gc`) runs as its own periodic task over the pinned
//! maps; each sync hands it the frontends' affinity timeouts.

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use aya::programs::SchedClassifier;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    attach::{AttachManager, Globs, ROLE_EXTERNAL, ROLE_POD, netlink},
    gc::{self, AffinityFrontends},
    healthcheck::HealthCheckServers,
    maps::{self, MapSizes, PinnedMaps},
    metrics::{Health, Metrics},
    model::{self, Cidr, HealthCheck, NodeContext},
    reconciler::Reconciler,
    source::{
        ObjectRef, Objects,
        addresses::{self, NodeAddresses},
        kube, manifest,
    },
};

/// How often the manifest directory is polled.
const MANIFEST_POLL: Duration = Duration::from_millis(200);
/// Interfaces are re-scanned this often even without link events.
const RESCAN: Duration = Duration::from_secs(5);

/// Where the Services and EndpointSlices come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A directory of manifests (`--manifests`).
    Manifests(PathBuf),
    /// The API server: in-cluster config, or `--kubeconfig`.
    Cluster { kubeconfig: Option<PathBuf> },
}

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub source: SourceConfig,
    pub node_name: String,
    pub pod_interfaces: Globs,
    /// `--external-interfaces`; `None`: the interfaces that carry a
    /// default route, followed as routes change.
    pub external_interfaces: Option<Globs>,
    /// kube-proxy's `--nodeport-addresses`; empty: every address on the
    /// external interfaces.
    pub nodeport_addresses: Vec<Cidr>,
    pub bpffs_root: PathBuf,
    pub map_sizes: MapSizes,
    /// Leave links and pins in place on exit (for the next agent).
    pub keep_on_exit: bool,
    /// kube-proxy's `--metrics-bind-address`.
    pub metrics_bind_address: SocketAddr,
    /// kube-proxy's `--healthz-bind-address`.
    pub healthz_bind_address: SocketAddr,
}

/// Runs until SIGINT/SIGTERM, then detaches and removes the pins.
///
/// # Errors
/// When the dataplane cannot be loaded or the manifest directory read.
pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    let mut ebpf = maps::load(&config.bpffs_root, config.map_sizes).context("loading the dataplane")?;
    let mut reconciler =
        Reconciler::new(PinnedMaps::from_ebpf(&mut ebpf, config.map_sizes)?).context("reading the pinned maps")?;
    tracing::info!(
        bpffs_root = %config.bpffs_root.display(),
        adopted_rows = reconciler.applied().services.len(),
        "maps pinned"
    );
    let (pod_prog, ext_prog) = programs(&mut ebpf)?;
    let links_dir = links_dir(&config.bpffs_root);
    let mut pod_attach = AttachManager::new(ROLE_POD, config.pod_interfaces.clone(), links_dir.clone());
    log_attach("pod ingress", &pod_attach.adopt(pod_prog));
    let mut ext_attach = AttachManager::new(ROLE_EXTERNAL, external_globs(&config), links_dir);
    log_attach("external ingress", &ext_attach.adopt(ext_prog));
    let mut events = netlink::watch_links().context("opening the rtnetlink event socket")?;

    let metrics = Arc::new(Metrics::new(config.bpffs_root.clone(), config.map_sizes));
    let health = Arc::new(Health::default());
    health.queued();
    crate::metrics::serve(config.metrics_bind_address, config.healthz_bind_address, metrics.clone(), health.clone())
        .await
        .context("binding --metrics-bind-address / --healthz-bind-address")?;
    let (frontends_tx, frontends_rx) = tokio::sync::watch::channel(None);
    let collector = gc::Collector::new(config.bpffs_root.clone(), config.map_sizes, frontends_rx, metrics.gc());
    let collector = tokio::spawn(collector.run());
    let mut health_checks = HealthCheckServers::new(health.clone());
    let mut reported = BTreeSet::new();
    let mut snapshots = start_source(&config).await?;
    let mut node = NodeContext { node_name: config.node_name.clone(), ..NodeContext::default() };
    let mut node_addrs = NodeAddresses::default();
    refresh_node(&config, &mut ext_attach, &mut node_addrs, &mut node);
    let mut snapshot: Option<Objects> = None;

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut rescan = tokio::time::interval(RESCAN);
    log_attach("pod ingress", &pod_attach.sync(pod_prog));
    log_attach("external ingress", &ext_attach.sync(ext_prog));
    // Nothing is reconciled before the source's first complete state: an
    // empty start would prune what a previous agent programmed.
    loop {
        let deferred = reconciler.next_deferred();
        let resync = tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
                health.queued();
                snapshot = Some(snapshots.borrow_and_update().clone());
                true
            }
            Some(()) = events.recv() => rescan_node(&config, (&mut pod_attach, pod_prog), (&mut ext_attach, ext_prog), &mut node_addrs, &mut node),
            _ = rescan.tick() => rescan_node(&config, (&mut pod_attach, pod_prog), (&mut ext_attach, ext_prog), &mut node_addrs, &mut node),
            () = sleep_until(deferred) => {
                collect_deferred(&mut reconciler, &config.bpffs_root, &metrics);
                false
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        };
        if let (true, Some(objects)) = (resync, &snapshot) {
            let (ok, wanted) = sync_once(&mut reconciler, &config.bpffs_root, objects, &node, &metrics, &mut reported);
            if ok {
                health.synced();
            }
            frontends_tx.send_replace(Some(Arc::new(AffinityFrontends::from_rows(
                reconciler.frontends(),
                maps::monotonic_ns(),
            ))));
            health_checks.sync(&wanted).await;
        }
    }
    collector.abort();
    drop(health_checks);
    if config.keep_on_exit {
        tracing::info!("shutting down: programs stay attached and maps pinned for the next agent");
        pod_attach.leave_attached();
        ext_attach.leave_attached();
        return Ok(());
    }
    tracing::info!("shutting down: detaching and removing pins");
    pod_attach.detach_all(pod_prog);
    ext_attach.detach_all(ext_prog);
    drop(reconciler);
    drop(ebpf);
    maps::remove_pins(&config.bpffs_root).context("removing pins")?;
    Ok(())
}

/// Sleeps until `at`; never wakes when it is `None`.
async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// Runs the reconciler's deferred deletions that are due (rows that left
/// a live table a grace period ago), then prunes the counters of the ids
/// they freed.
fn collect_deferred(reconciler: &mut Reconciler<PinnedMaps>, bpffs_root: &std::path::Path, metrics: &Metrics) {
    let _span = tracing::info_span!("collect_deferred").entered();
    let report = reconciler.collect_deferred();
    for e in &report.errors {
        tracing::error!(error = %e, "map update failed");
    }
    if !report.changed() {
        return;
    }
    metrics.observe_maps(reconciler.applied());
    prune_counters(reconciler, bpffs_root);
    tracing::debug!(rows_deleted = report.rows_deleted, pending = reconciler.deferred_len(), "deferred deletions");
}

/// Drops the per-Service and per-backend counters of ids the maps no
/// longer hold (after a sync, and after deferred deletions).
fn prune_counters(reconciler: &Reconciler<PinnedMaps>, bpffs_root: &std::path::Path) {
    let applied = reconciler.applied();
    let live_rev_nat = |id: u32| applied.rev_nat.contains_key(&id);
    let live_backend = |id: u32| applied.backends.contains_key(&id);
    if let Err(e) = maps::prune_counters(bpffs_root, &live_rev_nat, &live_backend) {
        tracing::warn!(error = %e, "pruning the counters of removed frontends and backends");
    }
}

/// Loads both classifiers into the kernel.
fn programs(ebpf: &mut aya::Ebpf) -> anyhow::Result<(&mut SchedClassifier, &mut SchedClassifier)> {
    let (mut pod, mut ext) = (None, None);
    for (name, prog) in ebpf.programs_mut() {
        match name {
            service_common::PROG_POD_INGRESS => pod = Some(prog),
            service_common::PROG_EXTERNAL_INGRESS => ext = Some(prog),
            _ => {}
        }
    }
    let pod = load_classifier(pod, "pod ingress")?;
    let ext = load_classifier(ext, "external ingress")?;
    Ok((pod, ext))
}

fn load_classifier<'a>(
    prog: Option<&'a mut aya::programs::Program>,
    what: &str,
) -> anyhow::Result<&'a mut SchedClassifier> {
    let prog: &mut SchedClassifier = prog
        .with_context(|| format!("the eBPF object has no {what} program"))?
        .try_into()
        .with_context(|| format!("the {what} program is not a TC classifier"))?;
    prog.load().with_context(|| format!("loading the {what} program into the kernel"))?;
    Ok(prog)
}

/// The external interfaces: the flag's, or those with a default route now.
fn external_globs(config: &RunConfig) -> Globs {
    config.external_interfaces.clone().unwrap_or_else(|| Globs::parse(&addresses::default_route_interfaces().join(",")))
}

/// Re-reads the external interfaces and the node's addresses; writes the
/// SNAT rows and updates the model's node context when they changed.
/// Returns whether the frontends must be synced again.
fn refresh_node(
    config: &RunConfig,
    ext_attach: &mut AttachManager,
    current: &mut NodeAddresses,
    node: &mut NodeContext,
) -> bool {
    let globs = external_globs(config);
    let now = addresses::select(&addresses::ipv4_addresses(), &globs, &config.nodeport_addresses);
    ext_attach.set_globs(globs);
    if now == *current {
        return false;
    }
    if let Err(e) = maps::write_snat_addrs(&config.bpffs_root, &now.snat) {
        tracing::error!(error = %e, "writing the SNAT addresses");
    }
    let nodeport: Vec<String> = now.nodeport.iter().map(ToString::to_string).collect();
    let snat: Vec<String> = now.snat.iter().map(|(i, a)| format!("{i}={a}")).collect();
    tracing::info!(nodeport_addresses = ?nodeport, snat_addresses = ?snat, "node addresses");
    node.nodeport_addresses.clone_from(&now.nodeport);
    let changed = current.nodeport != now.nodeport;
    *current = now;
    changed
}

/// A link, address or route event (or the periodic re-scan): attach to
/// new interfaces, and pick up address changes.
#[expect(clippy::needless_pass_by_value, reason = "pairs of borrows, not owned values")]
fn rescan_node(
    config: &RunConfig,
    pod: (&mut AttachManager, &mut SchedClassifier),
    ext: (&mut AttachManager, &mut SchedClassifier),
    node_addrs: &mut NodeAddresses,
    node: &mut NodeContext,
) -> bool {
    let changed = refresh_node(config, ext.0, node_addrs, node);
    log_attach("pod ingress", &pod.0.sync(pod.1));
    log_attach("external ingress", &ext.0.sync(ext.1));
    changed
}

/// Starts the configured source; its first publication is its first
/// complete state.
async fn start_source(config: &RunConfig) -> anyhow::Result<tokio::sync::watch::Receiver<Objects>> {
    let (tx, rx) = tokio::sync::watch::channel(Objects::default());
    match &config.source {
        SourceConfig::Manifests(dir) => {
            // Fail fast on an unreadable directory.
            let first = manifest::load_dir(dir).with_context(|| format!("reading --manifests {}", dir.display()))?;
            let (snapshot_tx, mut snapshots) = tokio::sync::watch::channel(first);
            snapshots.mark_changed();
            tokio::spawn(manifest::watch(dir.clone(), MANIFEST_POLL, snapshot_tx));
            tokio::spawn(async move {
                while snapshots.changed().await.is_ok() {
                    let objects = snapshots.borrow_and_update().objects.clone();
                    tx.send_replace(objects);
                }
            });
        }
        SourceConfig::Cluster { kubeconfig } => {
            let client = kube::client(kubeconfig.as_deref()).await.context("connecting to the API server")?;
            let node = config.node_name.clone();
            tokio::spawn(async move {
                if let Err(e) = kube::run(client, node, tx).await {
                    tracing::error!(error = %e, "the Kubernetes API source stopped");
                }
            });
        }
    }
    Ok(rx)
}

/// One sync: model, reconcile, UDP conntrack flush, metrics. Invalid
/// fields are logged once each (`reported` remembers them while they stay
/// invalid). Returns whether every row was written, and the health check
/// node ports to serve.
fn sync_once(
    reconciler: &mut Reconciler<PinnedMaps>,
    bpffs_root: &std::path::Path,
    objects: &Objects,
    node: &NodeContext,
    metrics: &Metrics,
    reported: &mut BTreeSet<String>,
) -> (bool, std::collections::BTreeMap<ObjectRef, HealthCheck>) {
    let _span = tracing::info_span!("sync").entered();
    let started = std::time::Instant::now();
    let desired = model::desired(objects, node);
    let now: BTreeSet<String> = desired.errors.iter().map(ToString::to_string).collect();
    for e in now.difference(reported) {
        tracing::warn!(error = %e, "invalid object field (skipped)");
    }
    *reported = now;
    let report = reconciler.reconcile(&desired);
    for e in &report.errors {
        tracing::error!(error = %e, "map update failed");
    }
    metrics.observe_sync(started.elapsed(), objects, &desired, reconciler.applied(), report.errors.len());
    prune_counters(reconciler, bpffs_root);
    if report.changed() {
        match maps::flush_udp_conntrack(bpffs_root, |rev_nat, backend| reconciler.is_live_pair(rev_nat, backend)) {
            Ok(0) => {}
            Ok(n) => tracing::info!(entries = n, "flushed UDP conntrack entries of removed backends"),
            Err(e) => tracing::warn!(error = %e, "flushing UDP conntrack entries of removed backends"),
        }
    }
    tracing::info!(
        services = objects.services.len(),
        endpoint_slices = objects.endpoint_slices.len(),
        frontends = desired.frontends.len(),
        written = report.frontends_written,
        deleted = report.frontends_deleted,
        rows_written = report.rows_written,
        rows_deleted = report.rows_deleted,
        rows_deferred = report.rows_deferred,
        elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        "synced"
    );
    if report.changed() {
        for df in desired.frontends.values() {
            let backends: Vec<String> = df.backends.iter().map(ToString::to_string).collect();
            tracing::debug!(service = %df.service, frontend = %df.frontend, backends = ?backends, "frontend");
        }
    }
    (report.errors.is_empty(), desired.health_checks)
}

/// Where link pins live.
#[must_use]
pub fn links_dir(bpffs_root: &std::path::Path) -> PathBuf {
    bpffs_root.join("links")
}

fn log_attach(program: &str, report: &crate::attach::SyncReport) {
    for name in &report.attached {
        tracing::info!(interface = %name, "attached {program} program");
    }
    for name in &report.adopted {
        tracing::info!(interface = %name, "adopted the pinned {program} link of an earlier agent");
    }
    for name in &report.replaced {
        tracing::info!(interface = %name, "replaced an earlier agent's {program} program (upgrade)");
    }
    for name in &report.gone {
        tracing::info!(interface = %name, "interface gone");
    }
    for (name, error) in &report.failed {
        tracing::warn!(interface = %name, %error, "attaching the {program} program failed");
    }
}
