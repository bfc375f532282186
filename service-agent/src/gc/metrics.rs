//! The garbage collector's metrics, registered with the agent's others by
//! `crate::metrics`: passes, entries deleted by map and reason, keys
//! scanned, live entries, SNAT ports in use.

use std::{collections::BTreeMap, sync::atomic::AtomicU64};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
/// A map's name as a metric label (shared with the agent's own map gauges).
pub(crate) struct MapLabel {
    pub(crate) map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GcDeletedLabel {
    map: String,
    reason: String,
}

/// The garbage collector's metrics (`crate::gc`), registered with the
/// others; clones share the values.
#[derive(Clone, Debug, Default)]
pub struct GcMetrics {
    passes: prometheus_client::metrics::counter::Counter,
    deleted: Family<GcDeletedLabel, prometheus_client::metrics::counter::Counter>,
    scanned: Family<MapLabel, prometheus_client::metrics::counter::Counter>,
    last_pass_duration: Gauge<f64, AtomicU64>,
    live_entries: Family<MapLabel, Gauge>,
    map_entries: Family<MapLabel, Gauge>,
    snat_ports_in_use: Gauge,
    snat_ports_busiest_group: Gauge,
}

impl GcMetrics {
    pub(crate) fn register(registry: &mut Registry, map_entries: Family<MapLabel, Gauge>) -> Self {
        let m = Self { map_entries, ..Self::default() };
        registry.register(
            "service_dataplane_gc_passes",
            "Completed passes of the conntrack and affinity garbage collector",
            m.passes.clone(),
        );
        registry.register(
            "service_dataplane_gc_deleted_entries",
            "Entries the garbage collector deleted, by map and reason (expired, closed, orphaned)",
            m.deleted.clone(),
        );
        registry.register(
            "service_dataplane_gc_scanned_entries",
            "Keys the garbage collector looked at, by map",
            m.scanned.clone(),
        );
        registry.register(
            "service_dataplane_gc_last_pass_duration_seconds",
            "How long the last garbage collector pass took (it is spread over ticks on purpose)",
            m.last_pass_duration.clone(),
        );
        registry.register(
            "service_dataplane_gc_live_entries",
            "Entries not expired after the last garbage collector pass, by map",
            m.live_entries.clone(),
        );
        registry.register(
            "service_dataplane_snat_ports_in_use",
            "SNAT ports held by live flows (reply entries of SNATed flows), after the last garbage collector pass",
            m.snat_ports_in_use.clone(),
        );
        registry.register(
            "service_dataplane_snat_ports_in_use_busiest_group",
            "SNAT ports in use by the busiest (SNAT address, backend address, backend port, protocol) group; each \
             group has service_dataplane_snat_port_range ports",
            m.snat_ports_busiest_group.clone(),
        );
        let range = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        range.set(i64::from(super::SNAT_RANGE));
        registry.register(
            "service_dataplane_snat_port_range",
            "Ports one (SNAT address, backend, protocol) group can use (61000-65535)",
            range,
        );
        m
    }

    /// An entry the collector deleted from `map`.
    pub fn record_deleted(&self, map: &str, reason: &str) {
        self.deleted.get_or_create(&GcDeletedLabel { map: map.into(), reason: reason.into() }).inc();
    }

    /// Keys the collector looked at in `map`.
    pub fn record_scanned(&self, map: &str, n: usize) {
        self.scanned.get_or_create(&MapLabel { map: map.into() }).inc_by(n as u64);
    }

    /// A completed pass.
    pub fn record_pass(&self, pass: &super::PassSummary) {
        self.passes.inc();
        self.last_pass_duration.set(pass.duration.as_secs_f64());
        for table in super::Table::ALL {
            let label = MapLabel { map: table.map_name().into() };
            let n = |m: &BTreeMap<super::Table, u64>| {
                i64::try_from(m.get(&table).copied().unwrap_or(0)).unwrap_or(i64::MAX)
            };
            self.live_entries.get_or_create(&label).set(n(&pass.live));
            self.map_entries.get_or_create(&label).set(n(&pass.entries));
        }
        self.snat_ports_in_use.set(i64::try_from(pass.snat.ports_in_use).unwrap_or(i64::MAX));
        self.snat_ports_busiest_group.set(pass.snat.busiest().map_or(0, |(_, n)| i64::from(n)));
    }
}
