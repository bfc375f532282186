//! The reconciler: diffs the model's desired frontends against the rows
//! applied to the maps and writes the difference in an order that never lets
//! a packet see a half-written Service:
//!
//! 1. new backend rows and rev-NAT rows;
//! 2. per frontend whose backend set changed: the slot rows of a **new
//!    version**, then the slot-0 row flipped to that version in one update,
//!    then the old version's slot rows deleted;
//! 3. deletes in reverse order: frontends that are gone (slot 0 first, then
//!    their slots), then rev-NAT and backend rows no row refers to.
//!
//! It starts from a dump of the maps (adopting what an earlier agent left),
//! so the first reconcile prunes every row that is not desired, and every
//! reconcile is safe to retry: a failed write leaves the affected frontend on
//! its previous rows and is reported; the others are still programmed.

pub mod dump;
pub mod fake;
pub mod maglev;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use service_common::{
    BackendValue, FAMILY_IPV4, FAMILY_IPV6, RevNatValue, ServiceKey, ServiceValue, SourceRangeKey, backend_flags,
    backend_state, service_flags,
};

use crate::model::{Backend, Desired, DesiredFrontend, Frontend, WhenEmpty};

/// The rows of the three maps the agent owns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, BackendValue>,
    pub rev_nat: BTreeMap<u32, RevNatValue>,
    /// `source_ranges` LPM-trie rows: (prefix length, key).
    pub source_ranges: BTreeSet<(u32, SourceRangeKey)>,
}

impl MapState {
    /// Every (rev-NAT id, backend id) pair a frontend's live backend table
    /// holds: the flows conntrack may keep.
    #[must_use]
    pub fn live_pairs(&self) -> BTreeSet<(u32, u32)> {
        self.services
            .iter()
            .filter(|(k, _)| k.slot != 0)
            .filter_map(|(k, v)| {
                let frontend = self.services.get(&ServiceKey { slot: 0, version: 0, ..*k })?;
                (frontend.version == k.version).then_some((frontend.rev_nat_id, v.backend_id))
            })
            .collect()
    }
}

/// A failed map operation.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("map {map} is full ({capacity} entries): raise it with {flag}")]
    Full { map: &'static str, capacity: u32, flag: &'static str },
    #[error("map {map}: {op} failed: {source}")]
    Io {
        map: &'static str,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Map I/O, behind a trait so reconciler tests run against an in-memory fake
/// ([`fake::FakeMaps`]) and the agent against the pinned BPF maps.
pub trait MapIo {
    /// Every row of the three maps.
    ///
    /// # Errors
    /// When a map cannot be read.
    fn dump(&self) -> Result<MapState, MapError>;
    /// # Errors
    /// When the map is full or the kernel refuses the update.
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapError>;
    /// Deleting a row that is absent is not an error.
    /// # Errors
    /// When the kernel refuses the delete.
    fn del_service(&mut self, key: &ServiceKey) -> Result<(), MapError>;
    /// # Errors
    /// When the map is full or the kernel refuses the update.
    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapError>;
    /// # Errors
    /// When the kernel refuses the delete.
    fn del_backend(&mut self, id: u32) -> Result<(), MapError>;
    /// # Errors
    /// When the map is full or the kernel refuses the update.
    fn put_rev_nat(&mut self, id: u32, value: &RevNatValue) -> Result<(), MapError>;
    /// # Errors
    /// When the kernel refuses the delete.
    fn del_rev_nat(&mut self, id: u32) -> Result<(), MapError>;
    /// # Errors
    /// When the map is full or the kernel refuses the update.
    fn put_source_range(&mut self, prefix_len: u32, key: &SourceRangeKey) -> Result<(), MapError>;
    /// # Errors
    /// When the kernel refuses the delete.
    fn del_source_range(&mut self, prefix_len: u32, key: &SourceRangeKey) -> Result<(), MapError>;
}

/// A frontend that could not be (fully) programmed, and why.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct ReconcileError {
    pub what: String,
    #[source]
    pub source: MapError,
}

/// What one reconcile did.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    pub frontends_written: usize,
    pub frontends_deleted: usize,
    pub rows_written: usize,
    pub rows_deleted: usize,
    pub errors: Vec<ReconcileError>,
}

impl ReconcileReport {
    #[must_use]
    pub fn changed(&self) -> bool {
        self.rows_written + self.rows_deleted > 0
    }
}

/// Owns the maps and a mirror of what is applied to them.
pub struct Reconciler<M> {
    maps: M,
    applied: MapState,
    /// What each frontend was last written from (the desired frontend, its
    /// rev-NAT id and backend ids). A frontend whose inputs are unchanged
    /// is skipped, so one EndpointSlice change costs its own frontends'
    /// Maglev tables, not every frontend's. Empty after a restart: the
    /// first reconcile checks every frontend against the dumped rows.
    written: HashMap<Frontend, WrittenFrontend>,
}

#[derive(PartialEq, Eq)]
struct WrittenFrontend {
    desired: DesiredFrontend,
    rev_nat_id: u32,
    backend_ids: Vec<u32>,
}

fn family(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { FAMILY_IPV4 } else { FAMILY_IPV6 }
}

fn addr_bytes(addr: IpAddr) -> service_common::Addr {
    match addr {
        IpAddr::V4(a) => service_common::addr_v4(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

/// The slot-0 key of a frontend.
#[must_use]
pub fn frontend_key(f: &Frontend) -> ServiceKey {
    ServiceKey::frontend(
        family(f.addr),
        addr_bytes(f.addr),
        service_common::port_be(f.port),
        f.protocol.number(),
        f.scope.number(),
    )
}

fn backend_value(b: &Backend) -> BackendValue {
    BackendValue {
        addr: addr_bytes(b.addr),
        port: service_common::port_be(b.port),
        proto: b.protocol.number(),
        family: family(b.addr),
        flags: if b.local { backend_flags::LOCAL } else { 0 },
        state: if b.terminating { backend_state::TERMINATING } else { backend_state::ACTIVE },
        _pad: [0; 2],
    }
}

fn rev_nat_value(f: &Frontend) -> RevNatValue {
    RevNatValue { addr: addr_bytes(f.addr), port: service_common::port_be(f.port), family: family(f.addr), _pad: 0 }
}

/// All rows of `key0`'s frontend (slot 0 and every slot of every version).
fn frontend_rows(services: &BTreeMap<ServiceKey, ServiceValue>, key0: &ServiceKey) -> Vec<ServiceKey> {
    let lo = key0.with_slot(0, 0);
    let hi = key0.with_slot(u32::MAX, u16::MAX);
    services.range(lo..=hi).map(|(k, _)| *k).collect()
}

/// Lowest ids not in `used`, handed out in order.
struct IdAllocator {
    used: BTreeSet<u32>,
    next: u32,
}

impl IdAllocator {
    fn new(used: impl IntoIterator<Item = u32>) -> Self {
        Self { used: used.into_iter().collect(), next: 1 }
    }

    fn allocate(&mut self) -> u32 {
        while self.used.contains(&self.next) {
            self.next += 1;
        }
        self.used.insert(self.next);
        self.next
    }
}

/// The `source_ranges` rows the desired frontends need.
fn source_range_rows(desired: &Desired, rev_nat_ids: &HashMap<Frontend, u32>) -> BTreeSet<(u32, SourceRangeKey)> {
    let mut rows = BTreeSet::new();
    for df in desired.frontends.values() {
        let Some(id) = rev_nat_ids.get(&df.frontend) else { continue };
        for cidr in &df.source_ranges {
            let key = SourceRangeKey { rev_nat_id: id.to_be_bytes(), addr: addr_bytes(cidr.addr) };
            rows.insert((32 + u32::from(cidr.prefix_len), key));
        }
    }
    rows
}

/// Gives every wanted value an id: the id of an identical applied row, or a
/// new one (written through `put`). Items whose row could not be written
/// get no id, so nothing refers to them.
fn write_ids<T: Copy + Eq + std::hash::Hash + std::fmt::Display, V: Copy + Eq + std::hash::Hash>(
    applied: &mut BTreeMap<u32, V>,
    wanted: impl Iterator<Item = (T, V)>,
    report: &mut ReconcileReport,
    what: &str,
    mut put: impl FnMut(u32, &V) -> Result<(), MapError>,
) -> HashMap<T, u32> {
    let mut by_value: HashMap<V, u32> = applied.iter().map(|(id, v)| (*v, *id)).collect();
    let mut ids = IdAllocator::new(applied.keys().copied());
    let mut out = HashMap::new();
    for (item, value) in wanted {
        if out.contains_key(&item) {
            continue;
        }
        if let Some(id) = by_value.get(&value) {
            out.insert(item, *id);
            continue;
        }
        let id = ids.allocate();
        match put(id, &value) {
            Ok(()) => {
                applied.insert(id, value);
                by_value.insert(value, id);
                report.rows_written += 1;
                out.insert(item, id);
            }
            Err(source) => report.errors.push(ReconcileError { what: format!("{what} {item}"), source }),
        }
    }
    out
}

impl<M: MapIo> Reconciler<M> {
    /// Adopts whatever the maps hold now; the first [`Self::reconcile`]
    /// prunes what is not desired.
    ///
    /// # Errors
    /// When the maps cannot be read.
    pub fn new(maps: M) -> Result<Self, MapError> {
        let applied = maps.dump()?;
        Ok(Self { maps, applied, written: HashMap::new() })
    }

    /// The rows as the reconciler believes them applied.
    #[must_use]
    pub fn applied(&self) -> &MapState {
        &self.applied
    }

    #[must_use]
    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// Brings the maps to `desired`.
    pub fn reconcile(&mut self, desired: &Desired) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        let backend_ids = self.write_backends(desired, &mut report);
        let rev_nat_ids = self.write_rev_nats(desired, &mut report);
        let ranges = source_range_rows(desired, &rev_nat_ids);
        for row in ranges.difference(&self.applied.source_ranges.clone()) {
            match self.maps.put_source_range(row.0, &row.1) {
                Ok(()) => {
                    self.applied.source_ranges.insert(*row);
                    report.rows_written += 1;
                }
                Err(source) => {
                    report.errors.push(ReconcileError { what: "loadBalancerSourceRanges row".into(), source });
                }
            }
        }
        for df in desired.frontends.values() {
            let Some(&rev_nat_id) = rev_nat_ids.get(&df.frontend) else { continue };
            let ids: Option<Vec<u32>> = df.backends.iter().map(|b| backend_ids.get(b).copied()).collect();
            let Some(ids) = ids else { continue }; // a backend row failed: keep the old rows
            let unchanged = self
                .written
                .get(&df.frontend)
                .is_some_and(|w| w.rev_nat_id == rev_nat_id && w.backend_ids == ids && w.desired == *df);
            if unchanged {
                continue;
            }
            match self.write_frontend(df, rev_nat_id, &ids, &mut report) {
                Ok(()) => {
                    let written = WrittenFrontend { desired: df.clone(), rev_nat_id, backend_ids: ids };
                    self.written.insert(df.frontend, written);
                }
                Err(source) => {
                    self.written.remove(&df.frontend);
                    report
                        .errors
                        .push(ReconcileError { what: format!("Service {} {}", df.service, df.frontend), source });
                }
            }
        }
        self.delete_undesired(desired, &mut report);
        self.written.retain(|f, _| desired.frontends.contains_key(f));
        for row in self.applied.source_ranges.difference(&ranges).copied().collect::<Vec<_>>() {
            match self.maps.del_source_range(row.0, &row.1) {
                Ok(()) => {
                    self.applied.source_ranges.remove(&row);
                    report.rows_deleted += 1;
                }
                Err(source) => report.errors.push(ReconcileError { what: "deleting a source range".into(), source }),
            }
        }
        report
    }

    fn write_backends(&mut self, desired: &Desired, report: &mut ReconcileReport) -> HashMap<Backend, u32> {
        let wanted = desired.frontends.values().flat_map(|f| &f.backends).map(|b| (*b, backend_value(b)));
        let maps = &mut self.maps;
        write_ids(&mut self.applied.backends, wanted, report, "backend", |id, v| maps.put_backend(id, v))
    }

    fn write_rev_nats(&mut self, desired: &Desired, report: &mut ReconcileReport) -> HashMap<Frontend, u32> {
        // Frontends differing only in protocol or scope share the address to
        // restore, and so one row.
        let wanted = desired.frontends.keys().map(|f| (*f, rev_nat_value(f)));
        let maps = &mut self.maps;
        write_ids(&mut self.applied.rev_nat, wanted, report, "rev-NAT", |id, v| maps.put_rev_nat(id, v))
    }

    /// Writes one frontend: new slot rows, then the slot-0 flip, then the old
    /// version's rows deleted.
    fn write_frontend(
        &mut self,
        df: &DesiredFrontend,
        rev_nat_id: u32,
        backend_ids: &[u32],
        report: &mut ReconcileReport,
    ) -> Result<(), MapError> {
        let key0 = frontend_key(&df.frontend);
        let table: Vec<u32> = if backend_ids.is_empty() {
            Vec::new()
        } else {
            let names: Vec<String> = df.backends.iter().map(ToString::to_string).collect();
            maglev::build(&names).into_iter().map(|i| backend_ids[i]).collect()
        };
        let mut flags = match (table.is_empty(), df.when_empty) {
            (false, _) => 0,
            (true, WhenEmpty::Reject) => service_flags::REJECT,
            (true, WhenEmpty::Drop) => service_flags::DROP,
        };
        if df.affinity_timeout_s.is_some() {
            flags |= service_flags::AFFINITY;
        }
        if !df.source_ranges.is_empty() {
            flags |= service_flags::SOURCE_RANGES;
        }
        let current = self.applied.services.get(&key0).copied();
        let current_table = current.map(|v| self.slot_table(&key0, &v));
        let rows = frontend_rows(&self.applied.services, &key0);
        let mut value = ServiceValue {
            backend_id: 0,
            count: u32::try_from(table.len()).unwrap_or(u32::MAX),
            version: 0,
            rev_nat_id,
            affinity_timeout_s: df.affinity_timeout_s.unwrap_or(0),
            flags,
            _pad: 0,
        };
        // Slot rows that are not part of the live table `version`/`count`.
        let stray_rows = |version: u32, count: u32| {
            rows.iter().filter(move |k| k.slot != 0 && (k.version != version || u32::from(k.slot) > count)).copied()
        };
        if current_table.as_deref() == Some(table.as_slice()) {
            value.version = current.map_or(0, |v| v.version);
            if current != Some(value) {
                self.maps.put_service(&key0, &value)?;
                self.applied.services.insert(key0, value);
                report.rows_written += 1;
                report.frontends_written += 1;
            }
            // Rows of versions an interrupted earlier run left behind.
            for k in stray_rows(value.version, value.count).collect::<Vec<_>>() {
                self.delete_service_row(&k, report);
            }
            return Ok(());
        }
        if !table.is_empty() {
            // A version no row of this frontend uses; never 0.
            let used: BTreeSet<u32> = rows.iter().map(|k| k.version).collect();
            let mut version = current.map_or(0, |v| v.version).wrapping_add(1).max(1);
            while used.contains(&version) {
                version = version.wrapping_add(1).max(1);
            }
            value.version = version;
            for (i, backend_id) in table.iter().enumerate() {
                let slot = u16::try_from(i + 1).unwrap_or(u16::MAX);
                let key = key0.with_slot(version, slot);
                let row = ServiceValue { backend_id: *backend_id, ..<ServiceValue as bytemuck::Zeroable>::zeroed() };
                if let Err(e) = self.maps.put_service(&key, &row) {
                    // Undo the partial version; the old one keeps serving.
                    for s in 1..=slot {
                        self.delete_service_row(&key0.with_slot(version, s), report);
                    }
                    return Err(e);
                }
                self.applied.services.insert(key, row);
                report.rows_written += 1;
            }
        }
        self.maps.put_service(&key0, &value)?;
        self.applied.services.insert(key0, value);
        report.rows_written += 1;
        report.frontends_written += 1;
        for k in stray_rows(value.version, value.count).collect::<Vec<_>>() {
            self.delete_service_row(&k, report);
        }
        Ok(())
    }

    /// The backend ids of the live version's slots, in slot order.
    fn slot_table(&self, key0: &ServiceKey, value: &ServiceValue) -> Vec<u32> {
        (1..=value.count)
            .map(|s| {
                let slot = u16::try_from(s).unwrap_or(u16::MAX);
                self.applied.services.get(&key0.with_slot(value.version, slot)).map_or(0, |v| v.backend_id)
            })
            .collect()
    }

    fn delete_service_row(&mut self, key: &ServiceKey, report: &mut ReconcileReport) {
        match self.maps.del_service(key) {
            Ok(()) => {
                self.applied.services.remove(key);
                report.rows_deleted += 1;
            }
            Err(source) => report.errors.push(ReconcileError { what: "deleting a service row".into(), source }),
        }
    }

    fn delete_undesired(&mut self, desired: &Desired, report: &mut ReconcileReport) {
        let wanted: BTreeSet<ServiceKey> = desired.frontends.keys().map(frontend_key).collect();
        // Frontends that are gone: slot 0 first (new flows stop), then the
        // slot rows. Slot rows without any slot-0 row are pruned too.
        let gone: Vec<ServiceKey> = self
            .applied
            .services
            .keys()
            .filter(|k| !wanted.contains(&k.with_slot(0, 0)))
            .map(|k| k.with_slot(0, 0))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        for key0 in gone {
            if self.applied.services.contains_key(&key0) {
                self.delete_service_row(&key0, report);
                report.frontends_deleted += 1;
            }
            for k in frontend_rows(&self.applied.services, &key0) {
                self.delete_service_row(&k, report);
            }
        }
        let used_rev_nat: BTreeSet<u32> =
            self.applied.services.iter().filter(|(k, _)| k.slot == 0).map(|(_, v)| v.rev_nat_id).collect();
        for id in self.applied.rev_nat.keys().copied().filter(|id| !used_rev_nat.contains(id)).collect::<Vec<_>>() {
            match self.maps.del_rev_nat(id) {
                Ok(()) => {
                    self.applied.rev_nat.remove(&id);
                    report.rows_deleted += 1;
                }
                Err(source) => report.errors.push(ReconcileError { what: format!("deleting rev-NAT {id}"), source }),
            }
        }
        let used_backends: BTreeSet<u32> =
            self.applied.services.iter().filter(|(k, _)| k.slot != 0).map(|(_, v)| v.backend_id).collect();
        for id in self.applied.backends.keys().copied().filter(|id| !used_backends.contains(id)).collect::<Vec<_>>() {
            match self.maps.del_backend(id) {
                Ok(()) => {
                    self.applied.backends.remove(&id);
                    report.rows_deleted += 1;
                }
                Err(source) => report.errors.push(ReconcileError { what: format!("deleting backend {id}"), source }),
            }
        }
    }
}

#[cfg(test)]
mod tests;
