//! `service-agent run`: wires the pieces together and drives them.
//!
//! One task owns everything (the loaded object, the reconciler, the attach
//! manager) and reacts to three inputs: a new snapshot from the source, a
//! link event (or the periodic re-scan), and SIGINT/SIGTERM.

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use aya::programs::SchedClassifier;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    attach::{AttachManager, Globs, netlink},
    maps::{self, MapSizes, PinnedMaps},
    metrics::{Health, Metrics},
    model::{self, NodeContext},
    reconciler::Reconciler,
    source::{Objects, kube, manifest},
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
    let prog: &mut SchedClassifier = ebpf
        .program_mut(service_common::PROG_POD_INGRESS)
        .context("the eBPF object has no pod ingress program")?
        .try_into()
        .context("the pod ingress program is not a TC classifier")?;
    prog.load().context("loading the pod ingress program into the kernel")?;
    let mut attach = AttachManager::new(config.pod_interfaces.clone(), links_dir(&config.bpffs_root));
    log_attach(&attach.adopt(prog));
    let mut links = netlink::watch_links().context("opening the rtnetlink link-event socket")?;

    let metrics = Arc::new(Metrics::new(config.bpffs_root.clone(), config.map_sizes));
    let health = Arc::new(Health::default());
    health.queued();
    crate::metrics::serve(config.metrics_bind_address, config.healthz_bind_address, metrics.clone(), health.clone())
        .await
        .context("binding --metrics-bind-address / --healthz-bind-address")?;
    let mut reported = BTreeSet::new();
    let mut snapshots = start_source(&config).await?;
    let node = NodeContext { node_name: config.node_name.clone(), ..NodeContext::default() };

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut rescan = tokio::time::interval(RESCAN);
    log_attach(&attach.sync(prog));
    // Nothing is reconciled before the source's first complete state: an
    // empty start would prune what a previous agent programmed.
    loop {
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
                health.queued();
                let snapshot = snapshots.borrow_and_update().clone();
                if sync_once(&mut reconciler, &config.bpffs_root, &snapshot, &node, &metrics, &mut reported) {
                    health.synced();
                }
            }
            Some(()) = links.recv() => log_attach(&attach.sync(prog)),
            _ = rescan.tick() => log_attach(&attach.sync(prog)),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    if config.keep_on_exit {
        tracing::info!("shutting down: programs stay attached and maps pinned for the next agent");
        attach.leave_attached();
        return Ok(());
    }
    tracing::info!("shutting down: detaching and removing pins");
    attach.detach_all(prog);
    drop(reconciler);
    drop(ebpf);
    maps::remove_pins(&config.bpffs_root).context("removing pins")?;
    Ok(())
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

/// One sync: model, reconcile, metrics. Invalid fields are logged once
/// each (`reported` remembers them while they stay invalid). Returns
/// whether every row was written.
fn sync_once(
    reconciler: &mut Reconciler<PinnedMaps>,
    bpffs_root: &std::path::Path,
    objects: &Objects,
    node: &NodeContext,
    metrics: &Metrics,
    reported: &mut BTreeSet<String>,
) -> bool {
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
    let live_rev_nat: BTreeSet<u32> = reconciler.applied().rev_nat.keys().copied().collect();
    let live_backends: BTreeSet<u32> = reconciler.applied().backends.keys().copied().collect();
    if let Err(e) = maps::prune_counters(bpffs_root, &live_rev_nat, &live_backends) {
        tracing::warn!(error = %e, "pruning the counters of removed frontends and backends");
    }
    tracing::info!(
        services = objects.services.len(),
        endpoint_slices = objects.endpoint_slices.len(),
        frontends = desired.frontends.len(),
        written = report.frontends_written,
        deleted = report.frontends_deleted,
        rows_written = report.rows_written,
        rows_deleted = report.rows_deleted,
        elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        "synced"
    );
    if report.changed() {
        for df in desired.frontends.values() {
            let backends: Vec<String> = df.backends.iter().map(ToString::to_string).collect();
            tracing::debug!(service = %df.service, frontend = %df.frontend, backends = ?backends, "frontend");
        }
    }
    report.errors.is_empty()
}

/// Where link pins live.
#[must_use]
pub fn links_dir(bpffs_root: &std::path::Path) -> PathBuf {
    bpffs_root.join("links")
}

fn log_attach(report: &crate::attach::SyncReport) {
    for name in &report.attached {
        tracing::info!(interface = %name, "attached pod ingress program");
    }
    for name in &report.adopted {
        tracing::info!(interface = %name, "adopted the pinned link of an earlier agent");
    }
    for name in &report.replaced {
        tracing::info!(interface = %name, "replaced an earlier agent's program (upgrade)");
    }
    for name in &report.gone {
        tracing::info!(interface = %name, "interface gone");
    }
    for (name, error) in &report.failed {
        tracing::warn!(interface = %name, %error, "attach failed");
    }
}
