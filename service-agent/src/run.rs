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
//!
//! A sync that could not write every row (a full map, a refused update) is
//! run again with backoff ([`RetryBackoff`]: 1 s doubling to 30 s, back to
//! 1 s after a sync that wrote everything) even when nothing changes: the
//! reconciler writes again exactly the frontends it could not program. The
//! loop bumps a heartbeat on every turn, idle ticks included, for `/livez`.

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use aya::programs::SchedClassifier;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    attach::{
        AttachManager, AttachMode, Programs, ROLE_EXTERNAL, ROLE_POD, Selection, TunnelInterfaces, netlink,
        socket::{SocketHooks, SocketLb},
    },
    gc::{self, AffinityFrontends},
    healthcheck::{self, HealthCheckServers},
    maps::{self, MapSizes, PinnedMaps},
    metrics::{Health, Metrics, Relabel},
    model::{HealthCheck, Model, NodeContext},
    reconciler::Reconciler,
    source::{
        addresses::{self, NodeAddresses},
        kube, manifest,
    },
    vocabulary::{Cidr, Globs, ObjectRef, Objects},
};

/// How often the manifest directory is polled.
const MANIFEST_POLL: Duration = Duration::from_millis(200);
/// Interfaces are re-scanned this often even without link events.
const RESCAN: Duration = Duration::from_secs(5);
/// How often the counter rows of freed ids are swept: only a packet that
/// raced the delete of its id's row re-creates one, so they are rare.
const SWEEP: Duration = Duration::from_mins(1);
/// The first retry of a sync that failed to write some rows.
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// The longest wait between retries.
pub const RETRY_MAX: Duration = Duration::from_secs(30);

/// When a sync that could not write every row is run again: [`RETRY_MIN`]
/// after the first failure, doubling up to [`RETRY_MAX`] while failures
/// go on, back to [`RETRY_MIN`] after a sync that wrote everything. A sync
/// a change triggers runs at once regardless.
#[derive(Debug)]
pub struct RetryBackoff {
    next_delay: Duration,
    due: Option<std::time::Instant>,
}

impl Default for RetryBackoff {
    fn default() -> Self {
        Self { next_delay: RETRY_MIN, due: None }
    }
}

impl RetryBackoff {
    /// Records a sync's outcome at `now`; returns the wait before the
    /// retry when it failed.
    pub fn record(&mut self, ok: bool, now: std::time::Instant) -> Option<Duration> {
        if ok {
            *self = Self::default();
            return None;
        }
        let delay = self.next_delay;
        self.due = Some(now + delay);
        self.next_delay = (delay * 2).min(RETRY_MAX);
        Some(delay)
    }

    /// When the retry is due (`None`: the last sync wrote everything).
    #[must_use]
    pub fn due(&self) -> Option<std::time::Instant> {
        self.due
    }
}

/// Where the Services and EndpointSlices come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A directory of manifests (`--manifests`).
    Manifests(PathBuf),
    /// The API server: in-cluster config, or `--kubeconfig`; `--master`
    /// (kube-proxy's flag) overrides the server address of either.
    Cluster { kubeconfig: Option<PathBuf>, master: Option<String> },
}

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub source: SourceConfig,
    pub node_name: String,
    pub pod_interfaces: Globs,
    /// `--external-interfaces`; `None`: the interfaces that carry a
    /// default route, followed as routes change.
    pub external_interfaces: Option<Globs>,
    /// `--tunnel-interfaces`: overlay and tunnel devices that also get the
    /// external program (replies of cross-node flows come back
    /// decapsulated there) and SNAT addresses, but no NodePorts.
    pub tunnel_interfaces: TunnelInterfaces,
    /// `--attach-mode`: TCX links, clsact filters, or TCX with the clsact
    /// fallback.
    pub attach_mode: AttachMode,
    /// kube-proxy's `--nodeport-addresses`; empty: every address on the
    /// external interfaces.
    pub nodeport_addresses: Vec<Cidr>,
    /// kube-proxy's `--masquerade-all`.
    pub masquerade_all: bool,
    /// `--service-cluster-ip-range`: unallocated addresses are dropped.
    pub service_cidrs: Vec<Cidr>,
    /// `--socket-lb`.
    pub socket_lb: SocketLb,
    /// `--localhost-nodeports`: NodePorts answer on 127.0.0.1 too (on the
    /// socket path only), as `addresses::select` decides.
    pub localhost_nodeports: bool,
    /// `--cgroup-root`; `None`: the host's cgroup2 mount.
    pub cgroup_root: Option<PathBuf>,
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
    let (mut ebpf, migrations) =
        maps::load_migrating(&config.bpffs_root, config.map_sizes).context("loading the dataplane")?;
    let mut reconciler = adopt_maps(&config, &mut ebpf)?;
    let socket_hooks = socket_hooks(&config, &mut ebpf)?;
    let (mut pod_prog, mut ext_prog) = programs(&mut ebpf)?;
    let (pod_prog, ext_prog) = (&mut pod_prog, &mut ext_prog);
    let (mut pod_attach, mut ext_attach) = attach_managers(&config, pod_prog, ext_prog);
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
    let mut node = NodeContext {
        node_name: config.node_name.clone(),
        masquerade_all: config.masquerade_all,
        service_cidrs: config.service_cidrs.clone(),
        ..NodeContext::default()
    };
    let mut node_addrs = NodeAddresses::default();
    refresh_node(&config, &mut ext_attach, &mut node_addrs, &mut node);
    let mut snapshot: Option<Objects> = None;
    // Kept across syncs: each recomputes only the Services whose objects
    // changed (all of them when the node context did).
    let mut model = Model::new();

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut rescan = tokio::time::interval(RESCAN);
    let mut sweep = tokio::time::interval_at(tokio::time::Instant::now() + SWEEP, SWEEP);
    if refill_before_attach(&migrations) {
        // An upgrade recreated the agent's own maps empty: the programs
        // already attached (an older agent's, on the old maps) keep
        // serving until the new maps hold the source's first state.
        tracing::info!("refilling the recreated maps before attaching the new programs");
        if snapshots.changed().await.is_ok() {
            let objects = snapshots.borrow_and_update().clone();
            sync_once(&mut reconciler, &mut model, &config, &objects, &node, &metrics, &mut reported);
            // The loop syncs again (writing nothing) for health and retries.
            snapshots.mark_changed();
        }
    }
    log_attach("pod ingress", &pod_attach.sync(pod_prog));
    log_attach("external ingress", &ext_attach.sync(ext_prog));
    let mut retry = RetryBackoff::default();
    // Nothing is reconciled before the source's first complete state: an
    // empty start would prune what a previous agent programmed.
    loop {
        // Every turn, idle ticks (RESCAN) included: `/livez` fails only
        // when this stops.
        health.beat();
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
            _ = sweep.tick() => {
                sweep_ids(&mut reconciler);
                false
            }
            () = sleep_until(deferred) => {
                collect_deferred(&mut reconciler, &metrics);
                false
            }
            () = sleep_until(retry.due()) => {
                metrics.record_retry();
                true
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        };
        if let (true, Some(objects)) = (resync, &snapshot) {
            let outcome = sync_once(&mut reconciler, &mut model, &config, objects, &node, &metrics, &mut reported);
            let ok = outcome.failures.is_empty();
            if let Some(delay) = retry.record(ok, std::time::Instant::now()) {
                tracing::warn!(
                    failed_writes = outcome.failures.len(),
                    services_not_programmed = outcome.failed_services.len(),
                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "some rows were not written; retrying"
                );
                health.sync_failed(outcome.failures);
            } else {
                health.synced();
            }
            publish_frontends(&frontends_tx, &reconciler);
            health_checks.sync(&outcome.health_checks, &outcome.failed_services);
        }
    }
    collector.abort();
    drop(health_checks);
    drop(reconciler);
    shut_down(&config, pod_attach, ext_attach, socket_hooks, ebpf)
}

/// `--socket-lb`: the mode written for the programs, and the hooks on
/// `--cgroup-root` (none, and an earlier agent's removed, when off).
fn socket_hooks(config: &RunConfig, ebpf: &mut aya::Ebpf) -> anyhow::Result<SocketHooks> {
    maps::write_socket_lb(&config.bpffs_root, config.socket_lb.mode()).context("writing the socket_lb row")?;
    let links_dir = links_dir(&config.bpffs_root);
    if config.socket_lb == SocketLb::Off {
        let removed = crate::attach::socket::remove_pins(&links_dir);
        if removed > 0 {
            tracing::info!(removed, "--socket-lb off: socket-level links removed");
        }
        return Ok(SocketHooks::default());
    }
    let root = match &config.cgroup_root {
        Some(path) => path.clone(),
        None => crate::attach::socket::default_cgroup_root()?,
    };
    let hooks = SocketHooks::attach(ebpf, &root, &links_dir)?;
    tracing::info!(cgroup_root = %root.display(), mode = ?config.socket_lb, "socket-level load balancing attached");
    Ok(hooks)
}

/// On SIGTERM/SIGINT: leaves everything for the next agent
/// (`--keep-on-exit`), or detaches and removes the pins.
fn shut_down(
    config: &RunConfig,
    mut pod_attach: AttachManager,
    mut ext_attach: AttachManager,
    mut socket_hooks: SocketHooks,
    ebpf: aya::Ebpf,
) -> anyhow::Result<()> {
    if config.keep_on_exit {
        tracing::info!("shutting down: programs stay attached and maps pinned for the next agent");
        pod_attach.leave_attached();
        ext_attach.leave_attached();
        socket_hooks.leave_attached();
        return Ok(());
    }
    tracing::info!("shutting down: detaching and removing pins");
    pod_attach.detach_all();
    ext_attach.detach_all();
    socket_hooks.detach_all();
    drop(ebpf);
    maps::remove_pins(&config.bpffs_root).context("removing pins")?;
    Ok(())
}

/// Whether a migration left one of the agent's own maps (those the
/// reconciler fills) empty: then the new programs are attached only once
/// they are filled again.
fn refill_before_attach(migrations: &[maps::layout::Migration]) -> bool {
    use service_common::map_names::{BACKENDS, REV_NAT, SERVICES, SOURCE_RANGES};
    migrations.iter().any(|m| {
        m.change == maps::layout::Change::Recreated && [SERVICES, BACKENDS, REV_NAT, SOURCE_RANGES].contains(&m.name)
    })
}

/// The reconciler over the loaded maps, starting from what they hold; the
/// counters of ids without a row (an earlier agent's) swept.
fn adopt_maps(config: &RunConfig, ebpf: &mut aya::Ebpf) -> anyhow::Result<Reconciler<PinnedMaps>> {
    let maps = PinnedMaps::from_ebpf(ebpf, config.map_sizes)?;
    let mut reconciler = Reconciler::new(maps).context("reading the pinned maps")?;
    sweep_ids(&mut reconciler);
    tracing::info!(
        bpffs_root = %config.bpffs_root.display(),
        adopted_rows = reconciler.programmed().services.len(),
        "maps pinned"
    );
    Ok(reconciler)
}

/// Hands the garbage collector the frontends' affinity settings and
/// backend sets as last programmed.
fn publish_frontends(
    tx: &tokio::sync::watch::Sender<Option<Arc<AffinityFrontends>>>,
    reconciler: &Reconciler<PinnedMaps>,
) {
    tx.send_replace(Some(Arc::new(AffinityFrontends::from_rows(
        reconciler.frontends(),
        |k| reconciler.members(k).collect::<Vec<_>>(),
        maps::monotonic_ns(),
    ))));
}

/// Deletes the counter rows of ids without a row ([`Reconciler::sweep_ids`]).
fn sweep_ids(reconciler: &mut Reconciler<PinnedMaps>) {
    match reconciler.sweep_ids() {
        Ok(0) => {}
        Ok(deleted) => tracing::info!(deleted, "counter rows of freed ids swept"),
        Err(e) => tracing::warn!(error = %e, "sweeping the counter rows of freed ids"),
    }
}

/// Sleeps until `at`; never wakes when it is `None`.
async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// Runs the reconciler's deferred deletions that are due (rows that left
/// a live table a grace period ago; the counters of the ids they free go
/// with their rows).
fn collect_deferred(reconciler: &mut Reconciler<PinnedMaps>, metrics: &Metrics) {
    let _span = tracing::info_span!("collect_deferred").entered();
    let report = reconciler.collect_deferred();
    for e in &report.errors {
        tracing::error!(error = %e, "map update failed");
    }
    if !report.changed() {
        return;
    }
    metrics.observe_maps(reconciler.programmed(), reconciler.slot_blocks().0);
    tracing::debug!(rows_deleted = report.rows_deleted, pending = reconciler.deferred_len(), "deferred deletions");
}

/// The two attach managers, having taken over what an earlier agent left:
/// the pod program on `--pod-interfaces`, the external program on
/// `--external-interfaces` and the tunnel interfaces.
fn attach_managers(config: &RunConfig, pod: &Programs, ext: &Programs) -> (AttachManager, AttachManager) {
    let links_dir = links_dir(&config.bpffs_root);
    let pod_selection = Selection::globs(config.pod_interfaces.clone());
    let mut pod_attach = AttachManager::new(ROLE_POD, pod_selection, links_dir.clone(), config.attach_mode);
    log_attach("pod ingress", &pod_attach.adopt(pod));
    let ext_selection = Selection {
        globs: external_globs(config),
        tunnels: Some(config.tunnel_interfaces.clone()),
        exclude: config.pod_interfaces.clone(),
    };
    let mut ext_attach = AttachManager::new(ROLE_EXTERNAL, ext_selection, links_dir, config.attach_mode);
    log_attach("external ingress", &ext_attach.adopt(ext));
    (pod_attach, ext_attach)
}

/// Loads the classifiers into the kernel: each role's Ethernet and L3
/// builds.
fn programs(ebpf: &mut aya::Ebpf) -> anyhow::Result<(Programs<'_>, Programs<'_>)> {
    let (mut pod, mut pod_l3, mut ext, mut ext_l3) = (None, None, None, None);
    for (name, prog) in ebpf.programs_mut() {
        match name {
            service_common::PROG_POD_INGRESS => pod = Some(prog),
            service_common::PROG_POD_INGRESS_L3 => pod_l3 = Some(prog),
            service_common::PROG_EXTERNAL_INGRESS => ext = Some(prog),
            service_common::PROG_EXTERNAL_INGRESS_L3 => ext_l3 = Some(prog),
            _ => {}
        }
    }
    let pod = Programs {
        ether: load_classifier(pod, "pod ingress")?,
        l3: load_classifier(pod_l3, "pod ingress (L3 devices)")?,
    };
    let ext = Programs {
        ether: load_classifier(ext, "external ingress")?,
        l3: load_classifier(ext_l3, "external ingress (L3 devices)")?,
    };
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
    let all = addresses::node_addresses();
    let mut now = addresses::select(&all, &globs, &config.nodeport_addresses, config.localhost_nodeports);
    ext_attach.set_globs(globs);
    // Overlay and tunnel devices: SNAT through one writes its address
    // (MASQUERADE's choice), so the reply comes back through it.
    let tunnels: BTreeSet<String> =
        crate::attach::links().into_iter().filter(|l| ext_attach.selection().is_tunnel(l)).map(|l| l.name).collect();
    addresses::add_snat_interfaces(&all, &tunnels, &mut now);
    if now == *current {
        return false;
    }
    if let Err(e) = maps::write_snat_addrs(&config.bpffs_root, &now.snat) {
        tracing::error!(error = %e, "writing the SNAT addresses");
    }
    let nodeport: Vec<String> = now.nodeport.iter().map(ToString::to_string).collect();
    let snat: Vec<String> = now.snat.iter().map(|(k, a)| format!("{}={a}", k.ifindex)).collect();
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
    pod: (&mut AttachManager, &mut Programs),
    ext: (&mut AttachManager, &mut Programs),
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
            // Fail fast on an unreadable directory. The fingerprint first:
            // a change after it is seen by the watch's first poll.
            let loaded = manifest::fingerprint(dir).ok();
            let first = manifest::load_dir(dir).with_context(|| format!("reading --manifests {}", dir.display()))?;
            let (snapshot_tx, mut snapshots) = tokio::sync::watch::channel(first);
            snapshots.mark_changed();
            tokio::spawn(manifest::watch(dir.clone(), MANIFEST_POLL, snapshot_tx, loaded));
            let node_name = config.node_name.clone();
            tokio::spawn(async move {
                while snapshots.changed().await.is_ok() {
                    let objects = snapshots.borrow_and_update().for_node(&node_name);
                    tx.send_replace(objects);
                }
            });
        }
        SourceConfig::Cluster { kubeconfig, master } => {
            let client =
                kube::client(kubeconfig.as_deref(), master.as_deref()).await.context("connecting to the API server")?;
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

/// What one sync leaves to the loop.
struct SyncOutcome {
    /// The map writes that failed (empty: every row was written).
    failures: Vec<String>,
    /// The health check node ports to serve.
    health_checks: std::collections::BTreeMap<ObjectRef, HealthCheck>,
    /// The Services whose own frontends are not programmed, and why.
    failed_services: std::collections::BTreeMap<ObjectRef, String>,
}

/// One sync: model (the Services whose inputs changed), reconcile (the
/// frontends that changed), UDP conntrack flush (and the UDP sockets of
/// removed backends closed), metrics. Invalid fields are logged once each
/// (`reported` remembers them while they stay invalid).
fn sync_once(
    reconciler: &mut Reconciler<PinnedMaps>,
    model: &mut Model,
    config: &RunConfig,
    objects: &Objects,
    node: &NodeContext,
    metrics: &Metrics,
    reported: &mut BTreeSet<String>,
) -> SyncOutcome {
    let _span = tracing::info_span!("sync").entered();
    let started = std::time::Instant::now();
    let changes = model.update(objects, node);
    let desired = model.desired();
    let now: BTreeSet<String> = desired.errors.iter().map(ToString::to_string).collect();
    for e in now.difference(reported) {
        tracing::warn!(error = %e, "invalid object field (skipped)");
    }
    *reported = now;
    let report = reconciler.reconcile_changes(desired, &changes);
    for e in &report.errors {
        tracing::error!(error = %e, "map update failed");
    }
    metrics.observe_sync(
        started.elapsed(),
        objects,
        desired,
        reconciler.programmed(),
        report.errors.len(),
        // The labels follow the desired frontends (a port renamed writes
        // no row) and the rows (ids): those of the changed frontends, or
        // all after a reconcile that compared them all.
        Relabel::after(report.full, &changes.frontends),
    );
    // A reconcile without errors leaves every desired frontend programmed
    // (the one after a failure compares them all): only after errors is
    // each frontend checked, so a sync's cost still follows its change.
    let (not_programmed, failed_services) = if report.errors.is_empty() {
        (0, std::collections::BTreeMap::new())
    } else {
        (
            desired.frontends.values().filter(|df| !reconciler.is_programmed(df)).count(),
            healthcheck::unprogrammed_services(desired, |df| reconciler.is_programmed(df), &report.errors),
        )
    };
    metrics.observe_maps(reconciler.programmed(), reconciler.slot_blocks().0);
    metrics.observe_not_programmed(not_programmed);
    // Only when a flow may have lost its backend: conntrack is walked
    // whole, so not for every change (kube-proxy likewise cleans up after
    // syncs that removed UDP endpoints).
    if report.full || report.pairs_ended > 0 {
        flush_removed_backends(reconciler, config);
    }
    if report.rows_written + report.rows_deleted >= RELEASE_AFTER_ROWS {
        crate::memory::release_freed();
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
    if report.changed() && tracing::enabled!(tracing::Level::DEBUG) {
        let logged =
            desired.frontends.values().filter(|df| changes.everything || changes.frontends.contains(&df.frontend));
        for df in logged {
            let backends: Vec<String> = df.backends.iter().map(ToString::to_string).collect();
            tracing::debug!(service = %df.service, frontend = %df.frontend, backends = ?backends, "frontend");
        }
    }
    SyncOutcome {
        failures: report.errors.iter().map(ToString::to_string).collect(),
        health_checks: desired.health_checks.clone(),
        failed_services,
    }
}

/// A sync that wrote or deleted this many rows (the first one, a relist)
/// built and dropped large temporaries: the memory they freed is handed
/// back to the kernel afterwards.
const RELEASE_AFTER_ROWS: usize = 10_000;

/// kube-proxy's conntrack cleanup after a change: UDP flows of a removed
/// backend are flushed (their next datagram picks a live one), and with
/// socket-level translation on, the UDP sockets connected to such a backend
/// are closed (see `attach::sock_diag`).
fn flush_removed_backends(reconciler: &Reconciler<PinnedMaps>, config: &RunConfig) {
    let live = |rev_nat, backend| reconciler.is_live_pair(rev_nat, backend);
    match maps::flush_udp_conntrack(&config.bpffs_root, live) {
        Ok(0) => {}
        Ok(n) => tracing::info!(entries = n, "flushed UDP conntrack entries of removed backends"),
        Err(e) => tracing::warn!(error = %e, "flushing UDP conntrack entries of removed backends"),
    }
    if config.socket_lb == SocketLb::Off {
        return;
    }
    let sockets = match maps::take_udp_sockets_of_removed_backends(&config.bpffs_root, live) {
        Ok(sockets) => sockets,
        Err(e) => return tracing::warn!(error = %e, "reading the UDP sockets of removed backends"),
    };
    match crate::attach::sock_diag::destroy_udp(&sockets, config.socket_lb == SocketLb::All) {
        Ok(0) => {}
        Ok(n) => tracing::info!(sockets = n, "closed UDP sockets connected to removed backends"),
        Err(e) => tracing::warn!(error = %e, "closing UDP sockets connected to removed backends (sock_diag)"),
    }
}

/// Where link pins live.
#[must_use]
pub fn links_dir(bpffs_root: &std::path::Path) -> PathBuf {
    bpffs_root.join("links")
}

fn log_attach(program: &str, report: &crate::attach::SyncReport) {
    for (name, l3) in &report.attached {
        let build = if *l3 { "l3" } else { "ethernet" };
        tracing::info!(interface = %name, build = %build, "attached {program} program");
    }
    for name in &report.adopted {
        tracing::info!(interface = %name, "adopted the pinned {program} link of an earlier agent");
    }
    for name in &report.adopted_filters {
        tracing::info!(interface = %name, "adopted the {program} clsact filter of an earlier agent");
    }
    for name in &report.removed_filters {
        tracing::info!(interface = %name, "removed a stray {program} clsact filter");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_sync_is_retried_after_1s_doubling_to_30s_and_success_resets_it() {
        let mut b = RetryBackoff::default();
        let t0 = std::time::Instant::now();
        assert_eq!(b.due(), None, "nothing to retry before a failure");
        let waits: Vec<u64> = (0..7).map(|_| b.record(false, t0).expect("a retry").as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(b.due(), Some(t0 + RETRY_MAX));
        assert_eq!(b.record(true, t0), None);
        assert_eq!(b.due(), None, "a sync that wrote everything cancels the retry");
        assert_eq!(b.record(false, t0), Some(RETRY_MIN), "and starts the next streak at 1 s");
    }
}
