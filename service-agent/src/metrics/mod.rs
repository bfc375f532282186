//! Metrics and health, the way kube-proxy exposes them:
//!
//! - `/metrics` on `--metrics-bind-address` (default 127.0.0.1:10249):
//!   kube-proxy's names for the same figures
//!   (`kubeproxy_sync_proxy_rules_duration_seconds`,
//!   `kubeproxy_sync_proxy_rules_last_timestamp_seconds`,
//!   `kubeproxy_network_programming_duration_seconds`), plus this
//!   dataplane's own: packets per verdict and drop reason (read from the
//!   per-CPU `stats` map at scrape time), map occupancy against capacity,
//!   objects rejected as invalid, and the conntrack garbage collector's
//!   work and findings ([`GcMetrics`](crate::gc::GcMetrics): passes, entries deleted by map and
//!   reason, live entries, SNAT ports in use).
//!   Failed map writes are counted (`service_dataplane_map_update_errors`),
//!   and while they are retried the failures of the last attempt and the
//!   frontends left unprogrammed are gauges.
//! - `/healthz` on `--healthz-bind-address` (default 0.0.0.0:10256): 200
//!   while syncs keep up, 503 when a change has waited longer than
//!   [`HEALTH_TIMEOUT`] to be programmed (kube-proxy's semantics), with
//!   kube-proxy's JSON body plus a `reason` naming what is wrong (the failed
//!   map writes being retried, or how long a change has waited).
//! - `/livez` on the same address: 503 only when the agent's main loop has
//!   not gone round for [`LIVENESS_TIMEOUT`] (it is wedged). An agent that
//!   is merely behind (a map full, writes retried) stays live: restarting
//!   it would not help and would drop its retry state.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Duration, Instant, SystemTime},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use imbl::ordmap::DiffItem;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{
    gc::{GcMetrics, MapLabel},
    maps::{MapSizes, MapState, Readers},
    model::{Desired, DesiredFrontend, Frontend, Protocol, Scope},
    rows,
    vocabulary::{ObjectMap, Objects, Slice},
};

/// A change not programmed within this long makes `/healthz` fail.
pub const HEALTH_TIMEOUT: Duration = Duration::from_mins(1);
/// The main loop not going round for this long makes `/livez` fail. It
/// wakes at least every 5 s (the interface re-scan) and a sync of a large
/// cluster takes seconds, so only a wedged loop (a blocked syscall, a
/// deadlock, a sync that never ends) misses it.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_mins(2);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabel {
    verdict: String,
    drop: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InterfaceVerdictLabel {
    interface: String,
    verdict: String,
    drop: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FrontendLabel {
    namespace: String,
    name: String,
    port: String,
    frontend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: String,
}

/// What the rev-NAT ids of the counters stand for, kept up to date by
/// every sync: for the frontends it changed (all of them after a full
/// reconcile). A label of an id whose rows are gone is never shown (its
/// counter row went with them) and is pruned once such labels outnumber
/// the live ones. Backend ids need no labels here: a backend counter is
/// named after its `backends` row, read at scrape time.
#[derive(Debug, Default)]
struct CounterLabels {
    /// rev-NAT id → the first frontend (Service, port name, address) using
    /// it: frontends sharing an address:port (TCP and UDP of one port)
    /// share a counter, reported under the first. The model's own shared
    /// copy; the label strings are written at scrape time only.
    frontends: foldhash::HashMap<u32, Arc<DesiredFrontend>>,
}

/// Which labels a sync refreshes.
#[derive(Clone, Copy, Debug)]
pub enum Relabel<'a> {
    /// Every frontend's (the first sync, and any reconcile that compared
    /// every frontend).
    All,
    /// Those of these frontends (the model's changes).
    Frontends(&'a BTreeSet<Frontend>),
}

impl<'a> Relabel<'a> {
    /// What a sync refreshes after its reconcile: everything when the
    /// reconcile compared every frontend (`full`: the first one, which the
    /// model's `everything` always makes full, and the one after a
    /// failure), else the `changed` frontends'.
    #[must_use]
    pub fn after(full: bool, changed: &'a BTreeSet<Frontend>) -> Self {
        if full { Self::All } else { Self::Frontends(changed) }
    }
}

impl CounterLabels {
    fn rebuild(&mut self, desired: &Desired, applied: &MapState) {
        self.frontends.clear();
        for df in desired.frontends.values() {
            if let Some(row) = applied.services.get(&rows::frontend_key(&df.frontend)) {
                self.frontends.entry(row.rev_nat_id).or_insert_with(|| Arc::clone(df));
            }
        }
    }

    /// Labels again the rev-NAT ids of `addr:port` (the frontends sharing
    /// it: its protocols and scopes, adjacent in the model's order), as
    /// applied.
    fn label_address(&mut self, addr: std::net::IpAddr, port: u16, desired: &Desired, applied: &MapState) {
        let first = Frontend { addr, port, protocol: Protocol::Tcp, scope: Scope::External };
        let mut labelled: Vec<u32> = Vec::new();
        for (f, df) in desired.frontends.range(first..).take_while(|(f, _)| f.addr == addr && f.port == port) {
            let Some(row) = applied.services.get(&rows::frontend_key(f)) else { continue };
            // The first frontend in the model's order names the counter.
            if !labelled.contains(&row.rev_nat_id) {
                labelled.push(row.rev_nat_id);
                self.frontends.insert(row.rev_nat_id, Arc::clone(df));
            }
        }
    }

    fn update(&mut self, relabel: Relabel<'_>, desired: &Desired, applied: &MapState) {
        // Labels of gone ids outnumber the live ones: start afresh (the
        // cost of a full rebuild, once per as many changes).
        let stale = self.frontends.len() > 2 * applied.rev_nat.len() + 64;
        match relabel {
            Relabel::All => self.rebuild(desired, applied),
            _ if stale || self.frontends.is_empty() => self.rebuild(desired, applied),
            Relabel::Frontends(changed) => {
                let mut addresses: Vec<(std::net::IpAddr, u16)> = changed.iter().map(|f| (f.addr, f.port)).collect();
                addresses.dedup();
                for (addr, port) in addresses {
                    self.label_address(addr, port, desired, applied);
                }
            }
        }
    }
}

impl FrontendLabel {
    fn of(df: &DesiredFrontend) -> Self {
        Self {
            namespace: df.service.namespace.to_string(),
            name: df.service.name.to_string(),
            port: df.port_name.clone(),
            // `[addr]:port` for IPv6, as a socket address is written.
            frontend: std::net::SocketAddr::new(df.frontend.addr, df.frontend.port).to_string(),
        }
    }
}

impl BackendLabel {
    fn of(b: &service_common::BackendValue) -> Self {
        let addr = rows::render::ip(b.family, &b.addr);
        let endpoint = std::net::SocketAddr::new(addr, u16::from_be_bytes(b.port));
        Self { backend: format!("{endpoint}/{}", rows::render::proto_name(b.proto)) }
    }
}

/// Reads the per-CPU counters at scrape time, through maps opened once (at
/// the first scrape that finds them pinned).
struct PacketCounters {
    bpffs_root: PathBuf,
    readers: Mutex<Option<Readers>>,
    labels: Arc<Mutex<CounterLabels>>,
}

impl std::fmt::Debug for PacketCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketCounters").field("bpffs_root", &self.bpffs_root).finish_non_exhaustive()
    }
}

impl PacketCounters {
    /// Runs `read` on the readers, opening them first if needed; `None`
    /// while the maps are not pinned (yet).
    fn read<T>(&self, read: impl FnOnce(&Readers) -> T) -> Option<T> {
        let mut readers = self.readers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if readers.is_none() {
            *readers = Readers::open(&self.bpffs_root).ok();
        }
        readers.as_ref().map(read)
    }

    fn encode_traffic(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let labels = self.labels.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // A backend counter is named after its `backends` row, read from
        // the map (an id whose row is gone is not shown).
        let (services, backends, sockets, rows) = self
            .read(|r| {
                let backends = r.backend_counters().unwrap_or_default();
                let rows = r.backends_of(backends.keys().copied());
                (r.service_counters().unwrap_or_default(), backends, r.sock_counters().unwrap_or_default(), rows)
            })
            .unwrap_or_default();
        let per_frontend = [
            (
                "service_dataplane_service_packets",
                "Packets translated per Service frontend, both directions",
                services.iter().map(|(id, c)| (*id, c.packets)).collect::<Vec<_>>(),
            ),
            (
                "service_dataplane_service_bytes",
                "Bytes translated per Service frontend, both directions",
                services.iter().map(|(id, c)| (*id, c.bytes)).collect(),
            ),
            (
                "service_dataplane_service_socket_connects",
                "connect() calls to a Service frontend translated at the socket (--socket-lb)",
                sockets.iter().map(|(id, c)| (*id, c.connects)).collect(),
            ),
            (
                "service_dataplane_service_socket_sendmsgs",
                "sendmsg() calls (unconnected UDP) to a Service frontend translated at the socket (--socket-lb)",
                sockets.iter().map(|(id, c)| (*id, c.sendmsgs)).collect(),
            ),
        ];
        for (metric, help, values) in per_frontend {
            let mut m = encoder.encode_descriptor(metric, help, None, MetricType::Counter)?;
            for (id, value) in values {
                if let Some(df) = labels.frontends.get(&id) {
                    ConstCounter::new(value).encode(m.encode_family(&FrontendLabel::of(df))?)?;
                }
            }
        }
        for (metric, help, bytes) in [
            ("service_dataplane_backend_packets", "Packets translated per backend, both directions", false),
            ("service_dataplane_backend_bytes", "Bytes translated per backend, both directions", true),
        ] {
            let mut m = encoder.encode_descriptor(metric, help, None, MetricType::Counter)?;
            for (id, c) in &backends {
                if let Some(backend) = rows.get(id) {
                    let label = BackendLabel::of(backend);
                    ConstCounter::new(if bytes { c.bytes } else { c.packets }).encode(m.encode_family(&label)?)?;
                }
            }
        }
        Ok(())
    }
}

impl Collector for PacketCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(Ok(stats)) = self.read(Readers::stats) else { return Ok(()) };
        let mut metric = encoder.encode_descriptor(
            "service_dataplane_packets",
            "Packets seen by the dataplane programs, by verdict or drop reason",
            None,
            MetricType::Counter,
        )?;
        for (id, (name, value)) in stats.into_iter().enumerate() {
            let labels = VerdictLabel {
                verdict: name.to_owned(),
                drop: service_common::stats::is_drop(u32::try_from(id).unwrap_or(u32::MAX)).to_string(),
            };
            ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
        }
        if let Some(Ok(per_interface)) = self.read(Readers::interface_stats) {
            let names: BTreeMap<u32, String> =
                crate::attach::links().into_iter().map(|l| (l.ifindex, l.name)).collect();
            let mut metric = encoder.encode_descriptor(
                "service_dataplane_interface_packets",
                "Packets by the interface they entered on and verdict or drop reason (all but the fast path's)",
                None,
                MetricType::Counter,
            )?;
            for ((ifindex, id), value) in per_interface {
                let labels = InterfaceVerdictLabel {
                    interface: names.get(&ifindex).cloned().unwrap_or_else(|| ifindex.to_string()),
                    verdict: service_common::stats::Counter::from_id(id).map_or("?", |c| c.name()).to_owned(),
                    drop: service_common::stats::is_drop(id).to_string(),
                };
                ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
            }
        }
        self.encode_traffic(&mut encoder)
    }
}

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    sync_duration: Histogram,
    last_sync: Gauge<f64, AtomicU64>,
    network_programming: Histogram,
    invalid_objects: Family<KindLabel, Gauge>,
    map_entries: Family<MapLabel, Gauge>,
    map_update_errors: prometheus_client::metrics::counter::Counter,
    map_update_errors_pending: Gauge,
    frontends_not_programmed: Gauge,
    sync_retries: prometheus_client::metrics::counter::Counter,
    gc: GcMetrics,
    /// The EndpointSlices of the last sync (their trigger times are
    /// observed): an O(1) clone of the snapshot's map.
    seen_slices: Mutex<ObjectMap<Slice>>,
    counter_labels: Arc<Mutex<CounterLabels>>,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    // kube-proxy's sync buckets: 1 ms doubling up to ~16 s.
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15)
}

impl Metrics {
    #[must_use]
    pub fn new(bpffs_root: PathBuf, sizes: MapSizes) -> Self {
        let mut registry = Registry::default();
        let sync_duration = Histogram::new(latency_buckets());
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds (model + map reconcile)",
            sync_duration.clone(),
        );
        let last_sync = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time the maps were successfully synced",
            last_sync.clone(),
        );
        let network_programming =
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.01, 2.0, 16));
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "In-cluster network programming latency in seconds (from the EndpointSlice's last-change-trigger-time)",
            network_programming.clone(),
        );
        let invalid_objects = Family::<KindLabel, Gauge>::default();
        registry.register(
            "service_dataplane_invalid_objects",
            "Objects with at least one field the agent could not use (reported in the log)",
            invalid_objects.clone(),
        );
        let map_entries = Family::<MapLabel, Gauge>::default();
        registry.register(
            "service_dataplane_map_entries",
            "Entries in each map: the agent-written ones after every sync, conntrack, conntrack_new, affinity and \
             fragments after every garbage collector pass",
            map_entries.clone(),
        );
        let map_capacity = Family::<MapLabel, Gauge>::default();
        registry.register("service_dataplane_map_capacity", "Capacity of each map", map_capacity.clone());
        for (map, cap) in [
            (service_common::map_names::SERVICES, sizes.services),
            (service_common::map_names::BACKEND_SLOTS, sizes.backend_slots),
            (service_common::map_names::BACKENDS, sizes.backends),
            (service_common::map_names::REV_NAT, sizes.backends),
            (service_common::map_names::CONNTRACK, sizes.conntrack),
            (service_common::map_names::CONNTRACK_NEW, sizes.conntrack_new),
            (service_common::map_names::FRAGMENTS, sizes.fragments),
            (service_common::map_names::AFFINITY, service_common::capacity::AFFINITY),
        ] {
            map_capacity.get_or_create(&MapLabel { map: map.into() }).set(i64::from(cap));
        }
        let map_update_errors = prometheus_client::metrics::counter::Counter::default();
        registry.register(
            "service_dataplane_map_update_errors",
            "Map writes that failed (a full map names the flag to raise in the log)",
            map_update_errors.clone(),
        );
        let map_update_errors_pending = Gauge::default();
        registry.register(
            "service_dataplane_map_update_errors_pending",
            "Map writes that failed in the last sync and are retried with backoff (0 once a sync writes every row)",
            map_update_errors_pending.clone(),
        );
        let frontends_not_programmed = Gauge::default();
        registry.register(
            "service_dataplane_frontends_not_programmed",
            "Desired frontends whose rows could not be written as desired (they keep their previous rows; retried \
             with backoff, and their Services' health check node ports answer 503)",
            frontends_not_programmed.clone(),
        );
        let sync_retries = prometheus_client::metrics::counter::Counter::default();
        registry.register(
            "service_dataplane_sync_retries",
            "Syncs run again after failed map writes (1 s after the failure, doubling up to 30 s)",
            sync_retries.clone(),
        );
        let gc = GcMetrics::register(&mut registry, map_entries.clone());
        let counter_labels = Arc::new(Mutex::new(CounterLabels::default()));
        registry.register_collector(Box::new(PacketCounters {
            bpffs_root,
            readers: Mutex::new(None),
            labels: counter_labels.clone(),
        }));
        Self {
            registry,
            sync_duration,
            last_sync,
            network_programming,
            invalid_objects,
            map_entries,
            map_update_errors,
            map_update_errors_pending,
            frontends_not_programmed,
            sync_retries,
            gc,
            seen_slices: Mutex::new(ObjectMap::new()),
            counter_labels,
        }
    }

    /// Records one sync.
    pub fn observe_sync(
        &self,
        elapsed: Duration,
        objects: &Objects,
        desired: &Desired,
        applied: &MapState,
        map_errors: usize,
        relabel: Relabel<'_>,
    ) {
        self.sync_duration.observe(elapsed.as_secs_f64());
        if map_errors == 0 {
            let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
            self.last_sync.set(now.as_secs_f64());
        }
        self.map_update_errors.inc_by(map_errors as u64);
        self.map_update_errors_pending.set(i64::try_from(map_errors).unwrap_or(i64::MAX));
        let mut invalid: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for e in &desired.errors {
            invalid.entry(e.kind).or_default().insert(e.object.to_string());
        }
        for kind in ["Service", "EndpointSlice", "Endpoints", "ServiceCIDR"] {
            let n = invalid.get(kind).map_or(0, BTreeSet::len);
            self.invalid_objects
                .get_or_create(&KindLabel { kind: kind.into() })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.observe_programming(objects);
        self.counter_labels.lock().unwrap_or_else(std::sync::PoisonError::into_inner).update(relabel, desired, applied);
    }

    /// How many desired frontends are not programmed as desired after a
    /// sync.
    pub fn observe_not_programmed(&self, frontends: usize) {
        self.frontends_not_programmed.set(i64::try_from(frontends).unwrap_or(i64::MAX));
    }

    /// A sync run by the retry backoff rather than by a change.
    pub fn record_retry(&self) {
        self.sync_retries.inc();
    }

    /// The garbage collector's metrics.
    #[must_use]
    pub fn gc(&self) -> GcMetrics {
        self.gc.clone()
    }

    /// The agent-written maps' occupancy (after a sync, or after deferred
    /// deletions ran): rows, and for `backend_slots` the ids its blocks in
    /// use hold room for (`slot_blocks_used`, whole blocks: what fills it
    /// up, against a capacity given in ids). O(1): a sync's cost follows
    /// its changes.
    pub fn observe_maps(&self, applied: &MapState, slot_blocks_used: u32) {
        let slot_ids = u64::from(slot_blocks_used) * u64::from(service_common::backend_slots::PER_BLOCK);
        for (map, n) in [
            (service_common::map_names::SERVICES, applied.services.len() as u64),
            (service_common::map_names::BACKEND_SLOTS, slot_ids),
            (service_common::map_names::BACKENDS, applied.backends.len() as u64),
            (service_common::map_names::REV_NAT, applied.rev_nat.len() as u64),
        ] {
            self.map_entries.get_or_create(&MapLabel { map: map.into() }).set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// kube-proxy's network programming latency: for every EndpointSlice
    /// whose trigger time is new since the last sync, now minus that time.
    /// The slices are diffed with the last sync's (shared structure
    /// skipped): a sync's cost follows its changes, not every slice.
    fn observe_programming(&self, objects: &Objects) {
        let now = k8s_openapi::jiff::Timestamp::now();
        let trigger = |s: &Slice| s.trigger_time.clone();
        let mut seen = self.seen_slices.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for change in seen.diff(&objects.endpoint_slices) {
            let (old, new) = match change {
                DiffItem::Add(_, new) => (None, new),
                DiffItem::Update { old: (_, old), new: (_, new) } => (Some(old), new),
                DiffItem::Remove(..) => continue,
            };
            let Some(at) = trigger(new) else { continue };
            if old.and_then(|o| trigger(o)).as_ref() == Some(&at) {
                continue;
            }
            if let Ok(at) = at.parse::<k8s_openapi::jiff::Timestamp>() {
                let latency = now.duration_since(at).as_secs_f64();
                if latency >= 0.0 {
                    self.network_programming.observe(latency);
                }
            }
        }
        *seen = objects.endpoint_slices.clone();
    }

    /// The OpenMetrics text of every metric.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Whether syncs keep up (`/healthz`), and whether the main loop still goes
/// round (`/livez`).
#[derive(Debug, Default)]
pub struct Health {
    state: Mutex<HealthState>,
}

#[derive(Debug)]
struct HealthState {
    last_synced: Option<SystemTime>,
    /// When the oldest change not yet programmed arrived.
    pending_since: Option<Instant>,
    /// When the oldest change no sync has tried to program yet arrived.
    unattempted_since: Option<Instant>,
    /// The map writes the last sync could not do (retried with backoff).
    failures: Vec<String>,
    /// When the main loop last went round.
    heartbeat: Instant,
}

impl Default for HealthState {
    fn default() -> Self {
        Self {
            last_synced: None,
            pending_since: None,
            unattempted_since: None,
            failures: Vec::new(),
            heartbeat: Instant::now(),
        }
    }
}

/// How many failures `/healthz` names before summing up the rest.
const REASONS_SHOWN: usize = 3;

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A change arrived (from the source, or the agent started).
    pub fn queued(&self) {
        let mut s = self.lock();
        let now = Instant::now();
        s.pending_since.get_or_insert(now);
        s.unattempted_since.get_or_insert(now);
    }

    /// Everything queued so far is programmed.
    pub fn synced(&self) {
        let mut s = self.lock();
        s.pending_since = None;
        s.unattempted_since = None;
        s.failures.clear();
        s.last_synced = Some(SystemTime::now());
    }

    /// A sync ran but could not write every row (`failures`, one line
    /// each); what is queued stays pending until a retry writes it.
    pub fn sync_failed(&self, failures: Vec<String>) {
        let mut s = self.lock();
        s.unattempted_since = None;
        s.failures = failures;
    }

    /// The main loop went round.
    pub fn beat(&self) {
        self.lock().heartbeat = Instant::now();
    }

    /// No change has waited longer than the timeout to be programmed.
    #[must_use]
    pub fn is_healthy(&self) -> bool {
        self.lock().pending_since.is_none_or(|since| since.elapsed() <= HEALTH_TIMEOUT)
    }

    /// Every change has been tried within the timeout, whether or not all
    /// of its writes succeeded: what a Service's health check node port
    /// takes as the proxy's health, so that rows of *other* Services that
    /// do not fit never fail it (its own failed rows do, see
    /// `crate::healthcheck`).
    #[must_use]
    pub fn is_syncing(&self) -> bool {
        self.lock().unattempted_since.is_none_or(|since| since.elapsed() <= HEALTH_TIMEOUT)
    }

    /// Makes the oldest pending change `by` old (tests).
    #[cfg(test)]
    pub(crate) fn backdate_pending(&self, by: Duration) {
        self.lock().pending_since = Instant::now().checked_sub(by);
    }

    /// The main loop went round within [`LIVENESS_TIMEOUT`].
    #[must_use]
    pub fn is_live(&self) -> bool {
        self.lock().heartbeat.elapsed() <= LIVENESS_TIMEOUT
    }

    fn body(s: &HealthState, reason: Option<String>) -> String {
        let fmt =
            |t: SystemTime| k8s_openapi::jiff::Timestamp::try_from(t).map_or_else(|_| String::new(), |t| t.to_string());
        let mut body = serde_json::json!({
            "lastUpdated": s.last_synced.map(fmt).unwrap_or_default(),
            "currentTime": fmt(SystemTime::now()),
        });
        if let Some(reason) = reason {
            body["reason"] = reason.into();
        }
        body.to_string()
    }

    /// `/healthz`: 200 or 503, and kube-proxy's body; `reason` names the
    /// failed writes being retried (even before they make it fail), or
    /// how long a change has waited.
    fn report(&self) -> (StatusCode, String) {
        let healthy = self.is_healthy();
        let s = self.lock();
        let reason = if s.failures.is_empty() {
            s.pending_since
                .filter(|_| !healthy)
                .map(|since| format!("a change has waited {}s to be programmed", since.elapsed().as_secs()))
        } else {
            let mut shown: Vec<&str> = s.failures.iter().take(REASONS_SHOWN).map(String::as_str).collect();
            let more = s.failures.len().saturating_sub(REASONS_SHOWN);
            let more = format!("and {more} more (see the log)");
            if s.failures.len() > REASONS_SHOWN {
                shown.push(&more);
            }
            Some(format!(
                "{} map write(s) failed, retrying with backoff{}: {}",
                s.failures.len(),
                s.pending_since
                    .map_or_else(String::new, |since| format!(" (changes waiting {}s)", since.elapsed().as_secs())),
                shown.join("; ")
            ))
        };
        (if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Self::body(&s, reason))
    }

    /// `/livez`: 503 only when the main loop is wedged.
    fn live_report(&self) -> (StatusCode, String) {
        let s = self.lock();
        let stalled = s.heartbeat.elapsed();
        if stalled <= LIVENESS_TIMEOUT {
            return (StatusCode::OK, Self::body(&s, None));
        }
        let reason = format!("the agent's main loop has not run for {}s (wedged)", stalled.as_secs());
        (StatusCode::SERVICE_UNAVAILABLE, Self::body(&s, Some(reason)))
    }
}

async fn metrics_handler(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], m.encode())
}

async fn health_handler(State(h): State<Arc<Health>>) -> impl IntoResponse {
    let (code, body) = h.report();
    (code, [("content-type", "application/json")], body)
}

async fn live_handler(State(h): State<Arc<Health>>) -> impl IntoResponse {
    let (code, body) = h.live_report();
    (code, [("content-type", "application/json")], body)
}

/// `/healthz` (syncs keep up) and `/livez` (the main loop is not wedged).
fn health_router(health: Arc<Health>) -> Router {
    Router::new().route("/healthz", get(health_handler)).route("/livez", get(live_handler)).with_state(health)
}

/// Binds both servers (failing fast on a taken port) and serves them in
/// the background.
///
/// # Errors
/// When an address cannot be bound.
pub async fn serve(
    metrics_addr: SocketAddr,
    healthz_addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> std::io::Result<()> {
    let metrics_listener = tokio::net::TcpListener::bind(metrics_addr).await?;
    let healthz_listener = tokio::net::TcpListener::bind(healthz_addr).await?;
    let metrics_app = Router::new().route("/metrics", get(metrics_handler)).with_state(metrics);
    let health_app = health_router(health);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(metrics_listener, metrics_app).await {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(healthz_listener, health_app).await {
            tracing::warn!(error = %e, "healthz server stopped");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gc_and_map_size_metrics_are_exported() {
        let m = Metrics::new(PathBuf::from("/nonexistent"), MapSizes::default());
        let gc = m.gc();
        gc.record_deleted("conntrack_new", "expired");
        gc.record_scanned("conntrack", 10);
        let mut pass = crate::gc::PassSummary::default();
        pass.live.insert(crate::gc::Table::Conntrack, 7);
        gc.record_pass(&pass);
        let text = m.encode();
        for want in [
            "service_dataplane_gc_passes_total 1",
            "service_dataplane_gc_deleted_entries_total{map=\"conntrack_new\",reason=\"expired\"} 1",
            "service_dataplane_gc_scanned_entries_total{map=\"conntrack\"} 10",
            "service_dataplane_gc_live_entries{map=\"conntrack\"} 7",
            "service_dataplane_gc_last_pass_duration_seconds",
            "service_dataplane_snat_ports_in_use 0",
            "service_dataplane_snat_ports_in_use_busiest_group 0",
            "service_dataplane_snat_port_range 4536",
            "service_dataplane_map_capacity{map=\"conntrack_new\"} 65536",
            "service_dataplane_map_capacity{map=\"fragments\"} 8192",
            "service_dataplane_map_entries{map=\"fragments\"} 0",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
    }

    #[test]
    fn failed_writes_and_retries_are_exported() {
        let m = Metrics::new(PathBuf::from("/nonexistent"), MapSizes::default());
        let objects = Objects::default();
        let desired = Desired::default();
        let applied = MapState::default();
        m.observe_sync(Duration::from_millis(1), &objects, &desired, &applied, 2, Relabel::All);
        m.observe_not_programmed(3);
        m.record_retry();
        m.observe_sync(Duration::from_millis(1), &objects, &desired, &applied, 2, Relabel::All);
        let text = m.encode();
        for want in [
            "service_dataplane_map_update_errors_total 4",
            "service_dataplane_map_update_errors_pending 2",
            "service_dataplane_frontends_not_programmed 3",
            "service_dataplane_sync_retries_total 1",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
        // A sync that writes everything: nothing pending any more.
        m.observe_sync(Duration::from_millis(1), &objects, &desired, &applied, 0, Relabel::All);
        m.observe_not_programmed(0);
        let text = m.encode();
        assert!(text.contains("service_dataplane_map_update_errors_pending 0"), "{text}");
        assert!(text.contains("service_dataplane_frontends_not_programmed 0"), "{text}");
    }

    #[test]
    fn network_programming_latency_is_observed_once_per_new_trigger_time() {
        let m = Metrics::new(PathBuf::from("/nonexistent"), MapSizes::default());
        let (desired, applied) = (Desired::default(), MapState::default());
        let slice =
            |trigger: Option<&str>| Arc::new(Slice { trigger_time: trigger.map(str::to_owned), ..Slice::default() });
        let key = |name: &str| crate::vocabulary::ObjectRef { namespace: "ns".into(), name: name.into() };
        let count = |m: &Metrics| {
            let text = m.encode();
            let line = text
                .lines()
                .find(|l| l.starts_with("kubeproxy_network_programming_duration_seconds_count"))
                .unwrap_or_default()
                .to_owned();
            line.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0)
        };
        let mut objects = Objects::default();
        for i in 0..100 {
            objects.endpoint_slices.insert(key(&format!("s{i}")), slice(Some("2026-01-01T00:00:00Z")));
        }
        objects.endpoint_slices.insert(key("untimed"), slice(None));
        m.observe_sync(Duration::from_millis(1), &objects, &desired, &applied, 0, Relabel::All);
        assert_eq!(count(&m), 100, "every slice's trigger time, once");
        m.observe_sync(Duration::from_millis(1), &objects, &desired, &applied, 0, Relabel::Frontends(&BTreeSet::new()));
        assert_eq!(count(&m), 100, "the same snapshot again: nothing new");
        // An equal copy (a relist) is not a new trigger; a new time is.
        objects.endpoint_slices.insert(key("s1"), slice(Some("2026-01-01T00:00:00Z")));
        objects.endpoint_slices.insert(key("s2"), slice(Some("2026-01-01T00:00:05Z")));
        objects.endpoint_slices.insert(key("untimed"), slice(None));
        m.observe_sync(Duration::from_millis(1), &objects, &desired, &applied, 0, Relabel::All);
        assert_eq!(count(&m), 101);
        // A slice deleted and added back with its time: observed again, as
        // a slice the last sync did not have.
        objects.endpoint_slices.remove(&key("s3"));
        m.observe_sync(Duration::from_millis(1), &objects, &desired, &applied, 0, Relabel::All);
        objects.endpoint_slices.insert(key("s3"), slice(Some("2026-01-01T00:00:00Z")));
        m.observe_sync(Duration::from_millis(1), &objects, &desired, &applied, 0, Relabel::All);
        assert_eq!(count(&m), 102);
    }

    /// Labels kept up to date change by change name every live counter id
    /// as a rebuild from scratch does, over random changes of the kinds a
    /// cluster sees (ports renamed, endpoints moved, Services gone).
    #[test]
    fn labels_updated_per_change_equal_a_rebuild() {
        use crate::{
            maps::fake::FakeMaps,
            model::{Model, fuzz},
            reconciler::Reconciler,
        };
        fuzz::Plan::from_env(40).run("labels_updated_per_change_equal_a_rebuild", |_, rng| {
            let (mut objects, mut node) = (fuzz::objects(rng), fuzz::node(rng));
            let mut model = Model::new();
            let mut reconciler = Reconciler::new(FakeMaps::default()).expect("fake dump");
            let mut labels = CounterLabels::default();
            for step in 0..12 {
                if step > 0 {
                    fuzz::change(rng, &mut objects, &mut node);
                }
                let changes = model.update(&objects, &node);
                let report = reconciler.reconcile_changes(model.desired(), &changes);
                let applied = reconciler.programmed();
                labels.update(Relabel::after(report.full, &changes.frontends), model.desired(), applied);
                let mut fresh = CounterLabels::default();
                fresh.rebuild(model.desired(), applied);
                // Every id a desired frontend uses (an id only rows in their
                // grace still use keeps its last label: its counters are
                // still shown under the name they were counted for).
                for id in fresh.frontends.keys() {
                    let name = |l: &CounterLabels| l.frontends.get(id).map(|df| FrontendLabel::of(df));
                    assert_eq!(name(&labels), name(&fresh), "step {step}: rev-NAT id {id}");
                }
            }
        });
    }

    #[test]
    fn healthz_names_the_failed_writes_and_fails_when_they_outlast_the_timeout() {
        let h = Health::default();
        h.queued();
        let failure = "Service default/web 10.96.0.10:81/TCP internal: map services is full (40 entries): raise it \
                       with --map-size-services";
        h.sync_failed(vec![failure.to_owned()]);
        let (code, body) = h.report();
        assert_eq!(code, StatusCode::OK, "within the timeout: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        let reason = v["reason"].as_str().expect("a reason while writes fail");
        assert!(reason.contains("--map-size-services") && reason.contains("retrying"), "{reason}");
        // Still failing after the timeout: unhealthy, and says why.
        h.lock().pending_since = Instant::now().checked_sub(HEALTH_TIMEOUT + Duration::from_secs(1));
        let (code, body) = h.report();
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("map services is full"), "{body}");
        assert!(h.is_syncing(), "the failed change was tried: other Services' health checks are unaffected");
        // Many failures: a few named, the rest counted.
        h.sync_failed((0..5).map(|i| format!("failure {i}")).collect());
        let (_, body) = h.report();
        assert!(body.contains("5 map write(s) failed") && body.contains("and 2 more"), "{body}");
        // A retry that writes everything.
        h.synced();
        let (code, body) = h.report();
        assert_eq!(code, StatusCode::OK);
        assert!(!body.contains("reason"), "{body}");
    }

    #[test]
    fn a_change_never_tried_fails_the_proxy_health_of_health_check_node_ports() {
        let h = Health::default();
        h.queued();
        assert!(h.is_syncing());
        h.lock().unattempted_since = Instant::now().checked_sub(HEALTH_TIMEOUT + Duration::from_secs(1));
        assert!(!h.is_syncing());
        h.sync_failed(vec!["x".into()]);
        assert!(h.is_syncing(), "tried, though not all written");
    }

    /// `GET path` against `router` served on a loopback port: status and body.
    async fn get(router: Router, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move { axum::serve(listener, router).await });
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .expect("request");
        let mut raw = String::new();
        conn.read_to_string(&mut raw).await.expect("response");
        server.abort();
        let code = raw.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status line");
        let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        (code, body)
    }

    #[tokio::test]
    async fn livez_fails_only_when_the_main_loop_is_wedged_and_healthz_only_when_syncs_fall_behind() {
        let h = Arc::new(Health::default());
        h.queued();
        // Behind: a change waiting past the timeout, the loop going round.
        h.lock().pending_since = Instant::now().checked_sub(HEALTH_TIMEOUT + Duration::from_secs(1));
        h.beat();
        let (code, body) = get(health_router(h.clone()), "/healthz").await;
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("a change has waited"), "{body}");
        let (code, body) = get(health_router(h.clone()), "/livez").await;
        assert_eq!(code, 200, "behind but not wedged: a restart would not help: {body}");
        // Wedged: synced long ago, the loop has not gone round since.
        h.synced();
        h.lock().heartbeat = Instant::now().checked_sub(LIVENESS_TIMEOUT + Duration::from_secs(1)).expect("past");
        let (code, _) = get(health_router(h.clone()), "/healthz").await;
        assert_eq!(code, 200);
        let (code, body) = get(health_router(h.clone()), "/livez").await;
        assert_eq!(code, 503);
        assert!(body.contains("main loop has not run"), "{body}");
        h.beat();
        assert_eq!(get(health_router(h.clone()), "/livez").await.0, 200);
    }

    #[test]
    fn health_fails_only_when_a_change_waits_longer_than_the_timeout() {
        let h = Health::default();
        h.queued();
        assert_eq!(h.report().0, StatusCode::OK, "a change just queued");
        h.synced();
        let (code, body) = h.report();
        assert_eq!(code, StatusCode::OK);
        let body: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert!(body["lastUpdated"].as_str().is_some_and(|s| !s.is_empty()));
        // A change queued longer ago than the timeout and still not synced.
        h.state.lock().expect("lock").pending_since =
            Instant::now().checked_sub(HEALTH_TIMEOUT + Duration::from_secs(1));
        assert_eq!(h.report().0, StatusCode::SERVICE_UNAVAILABLE);
        h.synced();
        assert_eq!(h.report().0, StatusCode::OK);
    }
}
