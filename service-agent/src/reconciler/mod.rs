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
//! Deletions of rows a packet may still be about to read are **deferred**
//! by a grace period ([`DELETION_GRACE`]): a packet that read a slot-0 row
//! just before its flip (or its deletion) goes on to read a slot row of the
//! old version, then its backend row; deleting those at once would drop it
//! (`drop_missing_row`). So slot rows that left their frontend's live table
//! and rev-NAT rows no slot-0 row refers to any more are queued and deleted
//! by a later [`Reconciler::reconcile`] or [`Reconciler::collect_deferred`]
//! once the grace has passed ([`Reconciler::next_deferred`] says when);
//! backend rows go when the last (deferred) slot row naming them has gone.
//! Rows awaiting deletion stay in the maps and in the mirror, so their ids
//! (backend ids, rev-NAT ids, versions) are never handed out again before
//! they are deleted. The clock is injectable ([`Clock`]) so tests do not
//! sleep.
//!
//! It starts from a dump of the maps (adopting what an earlier agent left),
//! so the first reconcile prunes every row that is not desired, and every
//! reconcile is safe to retry: a failed write leaves the affected frontend on
//! its previous rows and is reported; the others are still programmed.

mod clock;
pub mod maglev;
mod mirror;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use service_common::{ServiceKey, ServiceValue};

#[cfg(test)]
pub use self::clock::ManualClock;
pub use self::clock::{Clock, SystemClock};
use self::mirror::Mirror;
use crate::maps::{MapError, MapIo, MapState, NextIds};
use crate::{
    model::{Backend, Changes, Desired, DesiredFrontend, Frontend},
    rows::{self, SourceRangeRow},
    vocabulary::Cidr,
};

/// How long a row a packet may still be about to read (an old version's
/// slot rows, a deleted frontend's, an unreferenced rev-NAT row) stays
/// before it is deleted: far longer than a packet takes through the
/// program (microseconds), short enough that the services map's spare room
/// for a version being replaced is soon back.
pub const DELETION_GRACE: Duration = Duration::from_secs(2);

/// A row whose deletion waits for the grace period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Deferred {
    /// A slot row out of its frontend's live table.
    Slot(ServiceKey),
    /// A rev-NAT row no slot-0 row refers to.
    RevNat(u32),
}

/// Rows awaiting deletion, in the order they become due.
#[derive(Debug, Default)]
struct DeferredQueue {
    due: BTreeSet<(Instant, Deferred)>,
    pending: HashMap<Deferred, Instant>,
}

impl DeferredQueue {
    /// Queues `row` to go at `at`; a row already queued keeps its earlier
    /// time (the grace runs from when it first left a live table).
    fn push(&mut self, row: Deferred, at: Instant) -> bool {
        if self.pending.contains_key(&row) {
            return false;
        }
        self.pending.insert(row, at);
        self.due.insert((at, row));
        true
    }

    /// The next row due at `now`, taken off the queue.
    fn pop_due(&mut self, now: Instant) -> Option<Deferred> {
        let (at, row) = *self.due.first()?;
        if at > now {
            return None;
        }
        self.due.pop_first();
        self.pending.remove(&row);
        Some(row)
    }

    /// Takes `row` off the queue.
    fn cancel(&mut self, row: &Deferred) {
        if let Some(at) = self.pending.remove(row) {
            self.due.remove(&(at, *row));
        }
    }

    fn next(&self) -> Option<Instant> {
        self.due.first().map(|(at, _)| *at)
    }
}

/// A frontend that could not be (fully) programmed, and why.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct ReconcileError {
    pub what: String,
    /// The frontend or backend the failed operation was for, so a caller
    /// can tell which frontends it kept from being programmed.
    pub concerns: Concerns,
    #[source]
    pub source: MapError,
}

/// What a failed map operation was for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Concerns {
    /// A frontend's own rows (slot 0, slots, members, its rev-NAT row).
    Frontend(Frontend),
    /// A backend row.
    Backend(Backend),
    /// Rows of no one frontend (deletions, source ranges, the id record).
    Other,
}

impl ReconcileError {
    fn frontend(df: &DesiredFrontend, source: MapError) -> Self {
        Self {
            what: format!("Service {} {}", df.service, df.frontend),
            concerns: Concerns::Frontend(df.frontend),
            source,
        }
    }

    fn other(what: impl Into<String>, source: MapError) -> Self {
        Self { what: what.into(), concerns: Concerns::Other, source }
    }
}

/// What one reconcile did.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    pub frontends_written: usize,
    pub frontends_deleted: usize,
    pub rows_written: usize,
    pub rows_deleted: usize,
    /// Rows queued for deletion once [`DELETION_GRACE`] has passed.
    pub rows_deferred: usize,
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
    mirror: Mirror,
    /// What each frontend was last written from. A frontend whose desired
    /// state is unchanged is skipped (its rows, and so its backend and
    /// rev-NAT rows, are still there), so one EndpointSlice change costs its
    /// own frontends' Maglev tables, not every frontend's. Empty after a
    /// restart: the first reconcile checks every frontend against the
    /// dumped rows.
    written: HashMap<Frontend, WrittenFrontend>,
    /// Rows whose deletion waits for the grace period.
    deferred: DeferredQueue,
    clock: Arc<dyn Clock>,
    grace: Duration,
    /// The id counters as last recorded in the maps.
    recorded_next_ids: Option<NextIds>,
    /// The `source_ranges` rows the last desired state needs.
    ranges: RangeRows,
    /// The next [`Self::reconcile_changes`] compares everything: nothing
    /// was reconciled yet (the adopted rows are still to prune), or the
    /// last reconcile failed somewhere (what failed is written again).
    needs_full: bool,
}

/// The `source_ranges` rows each desired frontend and each `unserved`
/// entry needs, and how many need each row: frontends share rows (a
/// LoadBalancer IP's external and pod-side twins name one rev-NAT row),
/// so a row goes only when the last one that needs it does.
#[derive(Debug, Default)]
struct RangeRows {
    of_frontend: HashMap<Frontend, Vec<SourceRangeRow>>,
    of_unserved: HashMap<Cidr, Vec<SourceRangeRow>>,
    wanted: BTreeMap<SourceRangeRow, u32>,
}

impl RangeRows {
    /// Replaces what `old` (taken out of one of the maps) needed by
    /// `new`; the rows whose count changed go to `touched`.
    fn replace(
        wanted: &mut BTreeMap<SourceRangeRow, u32>,
        old: Option<&[SourceRangeRow]>,
        new: &[SourceRangeRow],
        touched: &mut BTreeSet<SourceRangeRow>,
    ) {
        for row in old.into_iter().flatten() {
            if let Some(n) = wanted.get_mut(row) {
                *n -= 1;
                if *n == 0 {
                    wanted.remove(row);
                }
            }
            touched.insert(*row);
        }
        for row in new {
            *wanted.entry(*row).or_default() += 1;
            touched.insert(*row);
        }
    }

    fn set_frontend(&mut self, f: Frontend, rows: Vec<SourceRangeRow>, touched: &mut BTreeSet<SourceRangeRow>) {
        let old = self.of_frontend.remove(&f);
        Self::replace(&mut self.wanted, old.as_deref(), &rows, touched);
        if !rows.is_empty() {
            self.of_frontend.insert(f, rows);
        }
    }

    fn set_unserved(&mut self, cidr: Cidr, rows: Vec<SourceRangeRow>, touched: &mut BTreeSet<SourceRangeRow>) {
        let old = self.of_unserved.remove(&cidr);
        Self::replace(&mut self.wanted, old.as_deref(), &rows, touched);
        if !rows.is_empty() {
            self.of_unserved.insert(cidr, rows);
        }
    }
}

struct WrittenFrontend {
    desired: DesiredFrontend,
    rev_nat_id: u32,
}

/// All rows of `key0`'s frontend (slot 0 and every slot of every version).
fn frontend_rows(services: &BTreeMap<ServiceKey, ServiceValue>, key0: &ServiceKey) -> Vec<ServiceKey> {
    let lo = key0.with_slot(0, 0);
    let hi = key0.with_slot(u32::MAX, u32::MAX);
    services.range(lo..=hi).map(|(k, _)| *k).collect()
}

impl<M: MapIo> Reconciler<M> {
    /// Adopts whatever the maps hold now; the first [`Self::reconcile`]
    /// prunes what is not desired.
    ///
    /// # Errors
    /// When the maps cannot be read.
    pub fn new(maps: M) -> Result<Self, MapError> {
        let state = maps.dump()?;
        let recorded_next_ids = Some(state.next_ids);
        let mirror = Mirror::new(state);
        Ok(Self {
            recorded_next_ids,
            maps,
            mirror,
            written: HashMap::new(),
            deferred: DeferredQueue::default(),
            clock: Arc::new(SystemClock),
            grace: DELETION_GRACE,
            ranges: RangeRows::default(),
            needs_full: true,
        })
    }

    /// Reads the time from `clock` (tests: a clock they advance).
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Deletes rows that left a live table after `grace` instead of
    /// [`DELETION_GRACE`] (`Duration::ZERO`: within the same reconcile, in
    /// the same order as the deferred deletions would run).
    #[must_use]
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// When the next deferred deletion is due (`None`: none is queued);
    /// call [`Self::collect_deferred`] then.
    #[must_use]
    pub fn next_deferred(&self) -> Option<Instant> {
        self.deferred.next()
    }

    /// How many rows await deletion.
    #[must_use]
    pub fn deferred_len(&self) -> usize {
        self.deferred.pending.len()
    }

    /// Runs the deferred deletions that are due: slot rows, then rev-NAT
    /// rows, then the backend rows no row refers to any more.
    pub fn collect_deferred(&mut self) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        self.collect_due(&mut report);
        #[cfg(test)]
        self.mirror.check_indexes();
        report
    }

    /// Panics unless every slot row out of its frontend's live table is
    /// queued for deletion (after a reconcile without errors) and no
    /// queued row is part of a live table.
    #[cfg(test)]
    pub(crate) fn check_deferred(&self) {
        for key in self.mirror.state().services.keys().filter(|k| k.slot != 0 && !k.is_member()) {
            let live = self.mirror.is_live_slot(key);
            let queued = self.deferred.pending.contains_key(&Deferred::Slot(*key));
            assert!(live != queued, "slot row {key:?}: live {live}, queued {queued}");
        }
    }

    /// The slot-0 rows (key, value) of every frontend.
    pub fn frontends(&self) -> impl Iterator<Item = (&ServiceKey, &ServiceValue)> {
        let services = &self.mirror.state().services;
        self.mirror.frontends().filter_map(|k| services.get_key_value(k))
    }

    /// The backend ids of the member rows of frontend `key0` (its current
    /// backend set).
    pub fn members(&self, key0: &ServiceKey) -> impl Iterator<Item = u32> + '_ {
        self.mirror.state().services.range(key0.member(0)..=key0.member(u32::MAX)).map(|(k, _)| k.version)
    }

    /// The rows the reconciler has programmed (its mirror of the maps).
    #[must_use]
    pub fn programmed(&self) -> &MapState {
        self.mirror.state()
    }

    #[must_use]
    pub fn maps(&self) -> &M {
        &self.maps
    }

    #[cfg(test)]
    pub(crate) fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// Whether a live backend table of a frontend with rev-NAT id `rev_nat`
    /// forwards to backend `backend` (the flows conntrack may keep), from
    /// the reconciler's index rather than a pass over every row.
    #[must_use]
    pub fn is_live_pair(&self, rev_nat: u32, backend: u32) -> bool {
        self.mirror.is_live_pair(rev_nat, backend)
    }

    /// Whether `df` is programmed as desired: its last write succeeded and
    /// it has not changed since. A frontend whose write failed is not (it
    /// keeps its previous rows, and the next reconcile writes it again).
    /// Read by the health check node ports, which answer per Service.
    #[must_use]
    pub fn is_programmed(&self, df: &DesiredFrontend) -> bool {
        self.written.get(&df.frontend).is_some_and(|w| w.desired == *df)
    }

    /// Brings the maps to `desired`, comparing every frontend with what
    /// was written, and every row with the maps' (the first reconcile
    /// prunes what an earlier agent left).
    pub fn reconcile(&mut self, desired: &Desired) -> ReconcileReport {
        self.reconcile_scoped(desired, None)
    }

    /// Brings the maps to `desired`, which differs from the state of the
    /// previous reconcile only where `changes` says (what
    /// [`crate::model::Model::update`] returns): only those frontends and
    /// `unserved` entries are compared, so the cost follows the change,
    /// not the number of Services. The first reconcile, and the one after
    /// a reconcile that failed somewhere, compare everything, as
    /// [`Self::reconcile`] does.
    pub fn reconcile_changes(&mut self, desired: &Desired, changes: &Changes) -> ReconcileReport {
        if changes.everything || self.needs_full {
            return self.reconcile(desired);
        }
        self.reconcile_scoped(desired, Some(changes))
    }

    /// [`Self::reconcile`] (`scope` `None`) or [`Self::reconcile_changes`].
    fn reconcile_scoped(&mut self, desired: &Desired, scope: Option<&Changes>) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        // Frontends whose desired state differs from what was last written
        // (every one after a restart).
        let differs = |df: &&DesiredFrontend| self.written.get(&df.frontend).is_none_or(|w| w.desired != **df);
        let changed: Vec<&DesiredFrontend> = match scope {
            None => desired.frontends.values().filter(differs).collect(),
            Some(c) => c.frontends.iter().filter_map(|f| desired.frontends.get(f)).filter(differs).collect(),
        };
        let backend_ids = self.write_backends(&changed, &mut report);
        let rev_nat_ids = self.write_rev_nats(&changed, &mut report);
        let touched = self.want_range_rows(desired, scope, &rev_nat_ids);
        for row in &touched {
            if self.ranges.wanted.contains_key(row) && !self.mirror.state().source_ranges.contains(row) {
                match self.maps.put_source_range(row.0, &row.1) {
                    Ok(()) => {
                        self.mirror.source_ranges_mut().insert(*row);
                        report.rows_written += 1;
                    }
                    Err(source) => {
                        report.errors.push(ReconcileError::other("loadBalancerSourceRanges row", source));
                    }
                }
            }
        }
        for df in changed {
            let Some(&rev_nat_id) = rev_nat_ids.get(&df.frontend) else { continue };
            let ids: Option<Vec<u32>> = df.backends.iter().map(|b| backend_ids.get(b).copied()).collect();
            let Some(ids) = ids else { continue }; // a backend row failed: keep the old rows
            match self.write_frontend(df, rev_nat_id, &ids, &mut report) {
                Ok(()) => {
                    self.written.insert(df.frontend, WrittenFrontend { desired: df.clone(), rev_nat_id });
                }
                Err(source) => {
                    self.written.remove(&df.frontend);
                    report.errors.push(ReconcileError::frontend(df, source));
                }
            }
        }
        match scope {
            None => {
                self.delete_undesired(desired, &mut report);
                self.written.retain(|f, _| desired.frontends.contains_key(f));
            }
            Some(c) => {
                for f in c.frontends.iter().filter(|f| !desired.frontends.contains_key(f)) {
                    self.delete_frontend(rows::frontend_key(f), &mut report);
                    self.written.remove(f);
                }
            }
        }
        self.record_next_ids(&mut report);
        self.collect_due(&mut report);
        for row in &touched {
            if !self.ranges.wanted.contains_key(row) && self.mirror.state().source_ranges.contains(row) {
                match self.maps.del_source_range(row.0, &row.1) {
                    Ok(()) => {
                        self.mirror.source_ranges_mut().remove(row);
                        report.rows_deleted += 1;
                    }
                    Err(source) => report.errors.push(ReconcileError::other("deleting a source range", source)),
                }
            }
        }
        self.needs_full = !report.errors.is_empty();
        #[cfg(test)]
        self.mirror.check_indexes();
        report
    }

    /// Brings [`Self::ranges`] to `desired` (every frontend and `unserved`
    /// entry, or those `scope` names) and returns the rows to compare
    /// with the maps': those whose need changed, and with `scope` `None`
    /// every row either side has.
    fn want_range_rows(
        &mut self,
        desired: &Desired,
        scope: Option<&Changes>,
        rev_nat_ids: &HashMap<Frontend, u32>,
    ) -> BTreeSet<SourceRangeRow> {
        let mut touched = BTreeSet::new();
        let (frontends, unserved): (Vec<Frontend>, Vec<Cidr>) = match scope {
            None => {
                touched.extend(self.mirror.state().source_ranges.iter().copied());
                self.ranges = RangeRows::default();
                (desired.frontends.keys().copied().collect(), desired.unserved.keys().copied().collect())
            }
            Some(c) => (c.frontends.iter().copied().collect(), c.unserved.iter().copied().collect()),
        };
        for f in frontends {
            // A changed frontend's rev-NAT id is the one just written, an
            // unchanged one's the one it was written with; without either
            // (its rev-NAT row failed) it gets no rows yet.
            let id = rev_nat_ids.get(&f).or_else(|| self.written.get(&f).map(|w| &w.rev_nat_id)).copied();
            let rows = match (desired.frontends.get(&f), id) {
                (Some(df), Some(id)) => rows::frontend_range_rows(df, id),
                _ => Vec::new(),
            };
            self.ranges.set_frontend(f, rows, &mut touched);
        }
        if !unserved.is_empty() {
            let service_cidrs = rows::service_cidrs(desired);
            for cidr in unserved {
                let rows = desired
                    .unserved
                    .get(&cidr)
                    .map(|w| rows::unserved_rows(&cidr, *w, &service_cidrs))
                    .unwrap_or_default();
                self.ranges.set_unserved(cidr, rows, &mut touched);
            }
        }
        touched
    }

    /// Gives every backend of the changed frontends a row id: the id of an
    /// identical applied row, or a new one. A backend whose row could not be
    /// written gets no id, so nothing refers to it.
    fn write_backends(&mut self, changed: &[&DesiredFrontend], report: &mut ReconcileReport) -> HashMap<Backend, u32> {
        let mut out = HashMap::new();
        for b in changed.iter().flat_map(|f| &f.backends) {
            if out.contains_key(b) {
                continue;
            }
            let value = rows::backend_value(b);
            let id = if let Some(id) = self.mirror.backend_id_of(&value) {
                id
            } else {
                let id = self.mirror.free_backend_id();
                if let Err(source) = self.maps.put_backend(id, &value) {
                    report.errors.push(ReconcileError {
                        what: format!("backend {b}"),
                        concerns: Concerns::Backend(*b),
                        source,
                    });
                    continue;
                }
                self.mirror.insert_backend(id, value);
                report.rows_written += 1;
                id
            };
            out.insert(*b, id);
        }
        out
    }

    /// The rev-NAT row ids of the changed frontends, as
    /// [`Self::write_backends`]. Frontends differing only in protocol or
    /// scope share the address to restore, and so one row.
    fn write_rev_nats(&mut self, changed: &[&DesiredFrontend], report: &mut ReconcileReport) -> HashMap<Frontend, u32> {
        let mut out = HashMap::new();
        for df in changed {
            let value = rows::rev_nat_value(&df.frontend);
            let id = if let Some(id) = self.mirror.rev_nat_id_of(&value) {
                id
            } else {
                let id = self.mirror.free_rev_nat_id();
                if let Err(source) = self.maps.put_rev_nat(id, &value) {
                    report.errors.push(ReconcileError {
                        what: format!("rev-NAT {}", df.frontend),
                        concerns: Concerns::Frontend(df.frontend),
                        source,
                    });
                    continue;
                }
                self.mirror.insert_rev_nat(id, value);
                report.rows_written += 1;
                id
            };
            out.insert(df.frontend, id);
        }
        out
    }

    /// Persists the id counters when ids were handed out since the last
    /// time (a failure is reported and retried at the next reconcile; a
    /// restart in between still starts above every id in the maps).
    fn record_next_ids(&mut self, report: &mut ReconcileReport) {
        let next = self.mirror.state().next_ids;
        if self.recorded_next_ids == Some(next) {
            return;
        }
        match self.maps.put_next_ids(next) {
            Ok(()) => self.recorded_next_ids = Some(next),
            Err(source) => report.errors.push(ReconcileError::other("recording the next ids", source)),
        }
    }

    fn put_service_row(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapError> {
        self.maps.put_service(&key, &value)?;
        self.mirror.put_service(key, value);
        Ok(())
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
        let key0 = rows::frontend_key(&df.frontend);
        // More endpoints than a table holds: the first ones (in the
        // model's order, the same on every node) get slots; reported.
        let backend_ids = &backend_ids[..backend_ids.len().min(maglev::MAX_BACKENDS)];
        if df.backends.len() > maglev::MAX_BACKENDS {
            report.errors.push(ReconcileError::frontend(
                df,
                MapError::TableFull { endpoints: df.backends.len(), max: maglev::MAX_BACKENDS },
            ));
        }
        let table: Vec<u32> = if backend_ids.is_empty() {
            Vec::new()
        } else {
            let names: Vec<String> = df.backends[..backend_ids.len()].iter().map(ToString::to_string).collect();
            maglev::build(&names).into_iter().map(|i| backend_ids[i]).collect()
        };
        let current = self.mirror.state().services.get(&key0).copied();
        let current_table = current.map(|v| self.slot_table(&key0, &v));
        let rows = frontend_rows(&self.mirror.state().services, &key0);
        // The Service port's ClusterIP has its rev-NAT row by now (rows are
        // shared by value, and the changed frontends' were written first);
        // without one (its write failed) the frontend keeps affinity alone.
        let scope =
            df.affinity_scope.and_then(|f| self.mirror.rev_nat_id_of(&rows::rev_nat_value(&f))).unwrap_or(rev_nat_id);
        let mut value = rows::frontend_value(df, rev_nat_id, scope, table.len());
        // Slot rows that are not part of the live table `version`/`count`.
        let stray_rows = |version: u32, count: u32| {
            rows.iter()
                .filter(move |k| k.slot != 0 && !k.is_member() && (k.version != version || k.slot > count))
                .copied()
        };
        // Member rows: every backend of the new set has one before the
        // flip; those of backends that left go after it.
        let members: BTreeSet<u32> = backend_ids.iter().copied().collect();
        let old_members: Vec<ServiceKey> =
            rows.iter().filter(|k| k.is_member() && !members.contains(&k.version)).copied().collect();
        for id in &members {
            let key = key0.member(*id);
            if !self.mirror.state().services.contains_key(&key) {
                let row = rows::member_value(*id);
                self.put_service_row(key, row)?;
                report.rows_written += 1;
            }
        }
        if current_table.as_deref() == Some(table.as_slice()) {
            value.version = current.map_or(0, |v| v.version);
            if current != Some(value) {
                self.put_service_row(key0, value)?;
                report.rows_written += 1;
                report.frontends_written += 1;
            }
            // Rows of versions an interrupted earlier run left behind.
            for k in stray_rows(value.version, value.count).collect::<Vec<_>>() {
                self.defer(Deferred::Slot(k), report);
            }
            return self.delete_members(&old_members, report);
        }
        if !table.is_empty() {
            // A version no row of this frontend uses; never 0.
            let used: BTreeSet<u32> = rows.iter().filter(|k| !k.is_member()).map(|k| k.version).collect();
            let mut version = current.map_or(0, |v| v.version).wrapping_add(1).max(1);
            while used.contains(&version) {
                version = version.wrapping_add(1).max(1);
            }
            value.version = version;
            for (slot, backend_id) in (1..).zip(&table) {
                let row = rows::slot_value(*backend_id);
                if let Err(e) = self.put_service_row(key0.with_slot(version, slot), row) {
                    // Undo the partial version; the old one keeps serving.
                    for s in 1..=slot {
                        self.delete_service_row(&key0.with_slot(version, s), report);
                    }
                    return Err(e);
                }
                report.rows_written += 1;
            }
        }
        self.put_service_row(key0, value)?;
        report.rows_written += 1;
        report.frontends_written += 1;
        // The old version: a packet that read the slot-0 row just before the
        // flip may still read it.
        for k in stray_rows(value.version, value.count).collect::<Vec<_>>() {
            self.defer(Deferred::Slot(k), report);
        }
        // No affinity entry is followed to a backend that left the set.
        self.delete_members(&old_members, report)
    }

    /// Deletes member rows; a failure fails the frontend's write, so the
    /// next reconcile tries again.
    fn delete_members(&mut self, keys: &[ServiceKey], report: &mut ReconcileReport) -> Result<(), MapError> {
        let mut first_error = None;
        for k in keys {
            match self.maps.del_service(k) {
                Ok(()) => {
                    self.mirror.remove_service(k);
                    report.rows_deleted += 1;
                }
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The backend ids of the live version's slots, in slot order.
    fn slot_table(&self, key0: &ServiceKey, value: &ServiceValue) -> Vec<u32> {
        let services = &self.mirror.state().services;
        (1..=value.count).map(|s| services.get(&key0.with_slot(value.version, s)).map_or(0, |v| v.backend_id)).collect()
    }

    /// Deletes one services row; a failure is reported. Returns whether
    /// the row is gone.
    fn delete_service_row(&mut self, key: &ServiceKey, report: &mut ReconcileReport) -> bool {
        match self.maps.del_service(key) {
            Ok(()) => {
                self.mirror.remove_service(key);
                report.rows_deleted += 1;
                true
            }
            Err(source) => {
                report.errors.push(ReconcileError::other("deleting a service row", source));
                false
            }
        }
    }

    /// Queues `row` for deletion after the grace period.
    fn defer(&mut self, row: Deferred, report: &mut ReconcileReport) {
        if self.deferred.push(row, self.clock.now() + self.grace) {
            report.rows_deferred += 1;
        }
    }

    fn delete_undesired(&mut self, desired: &Desired, report: &mut ReconcileReport) {
        let wanted: HashSet<ServiceKey> = desired.frontends.keys().map(rows::frontend_key).collect();
        // Frontends that are gone: slot 0 first (new flows stop), then, once
        // the grace has passed, the slot rows. Slot rows without any slot-0
        // row are pruned too.
        let gone: BTreeSet<ServiceKey> = self.mirror.frontends().filter(|k| !wanted.contains(k)).copied().collect();
        for key0 in gone {
            self.delete_frontend(key0, report);
        }
    }

    /// Deletes the frontend of slot-0 key `key0` (when it has rows): its
    /// slot-0 row at once, its other rows after the grace period.
    fn delete_frontend(&mut self, key0: ServiceKey, report: &mut ReconcileReport) {
        if self.mirror.state().services.contains_key(&key0) {
            self.delete_service_row(&key0, report);
            report.frontends_deleted += 1;
        }
        for k in frontend_rows(&self.mirror.state().services, &key0) {
            self.defer(Deferred::Slot(k), report);
        }
    }

    /// The deferred deletions that are due, then the rows nothing refers to:
    /// rev-NAT rows (deferred in turn when they were referenced a grace
    /// ago), then backend rows (only deferred slot rows could still lead a
    /// packet to them, and those have just gone).
    fn collect_due(&mut self, report: &mut ReconcileReport) {
        let now = self.clock.now();
        let mut due_rev_nats = BTreeSet::new();
        while let Some(row) = self.deferred.pop_due(now) {
            match row {
                Deferred::Slot(key) => {
                    // A row that is live again (never expected: versions of
                    // queued rows are not reused) is kept.
                    // A failed delete is tried again after another grace.
                    if !self.mirror.is_live_slot(&key) && !self.delete_service_row(&key, report) {
                        self.defer(Deferred::Slot(key), report);
                    }
                }
                Deferred::RevNat(id) => {
                    due_rev_nats.insert(id);
                }
            }
        }
        // A queued rev-NAT row referenced again (a frontend came back): its
        // grace starts afresh when it is next unreferenced.
        let referenced: Vec<Deferred> = self
            .deferred
            .pending
            .keys()
            .filter(|row| matches!(row, Deferred::RevNat(id) if self.mirror.rev_nat_referenced(*id)))
            .copied()
            .collect();
        for row in &referenced {
            self.deferred.cancel(row);
        }
        let unreferenced: Vec<u32> = self.mirror.unreferenced_rev_nats().collect();
        for id in unreferenced {
            if !due_rev_nats.contains(&id) && !self.grace.is_zero() {
                self.defer(Deferred::RevNat(id), report);
                continue;
            }
            match self.maps.del_rev_nat(id) {
                Ok(()) => {
                    self.mirror.remove_rev_nat(id);
                    report.rows_deleted += 1;
                }
                Err(source) => {
                    // Tried again after another grace.
                    self.defer(Deferred::RevNat(id), report);
                    report.errors.push(ReconcileError::other(format!("deleting rev-NAT {id}"), source));
                }
            }
        }
        let unused: Vec<u32> = self.mirror.unreferenced_backends().collect();
        for id in unused {
            match self.maps.del_backend(id) {
                Ok(()) => {
                    self.mirror.remove_backend(id);
                    report.rows_deleted += 1;
                }
                Err(source) => report.errors.push(ReconcileError::other(format!("deleting backend {id}"), source)),
            }
        }
    }
}

#[cfg(test)]
mod golden_tests;
#[cfg(test)]
mod tests;
