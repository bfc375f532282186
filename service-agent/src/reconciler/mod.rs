//! The reconciler: diffs the model's desired frontends against the rows
//! applied to the maps and writes the difference in an order that never lets
//! a packet see a half-written Service:
//!
//! 1. new backend rows and rev-NAT rows;
//! 2. per frontend whose backend set changed: the set's **table** (its
//!    Maglev slots and member list) written into free blocks of
//!    `backend_slots` (unless a table of that set exists: frontends with the
//!    same backend set share one), then the frontend row switched to it in
//!    one update;
//! 3. deletes in reverse order: frontends that are gone, then rev-NAT and
//!    backend rows no row refers to.
//!
//! A table is never written while a frontend names it, and its blocks are
//! reused only a grace period ([`DELETION_GRACE`]) after the last frontend
//! left it: a packet that read a frontend row just before its switch (or
//! its deletion) goes on to read the old table, then a backend row, and
//! must find them as they were. So tables no frontend names and rev-NAT
//! rows no frontend row refers to are queued and released by a later
//! [`Reconciler::reconcile`] or [`Reconciler::collect_deferred`] once the
//! grace has passed ([`Reconciler::next_deferred`] says when); backend rows
//! go when the last table listing them has gone. Rows and tables awaiting
//! release stay in the maps and in the mirror, so their ids and blocks are
//! never handed out again before. The clock is injectable ([`Clock`]) so
//! tests do not sleep.
//!
//! It starts from a dump of the maps (adopting what an earlier agent left),
//! so the first reconcile prunes every row that is not desired, and every
//! reconcile is safe to retry: a failed write leaves the affected frontend on
//! its previous rows and is reported; the others are still programmed.

mod clock;
pub mod maglev;
mod mirror;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use service_common::{ServiceKey, ServiceValue, backend_slots};

#[cfg(test)]
pub use self::clock::ManualClock;
pub use self::clock::{Clock, SystemClock};
use foldhash::{HashMap, HashMapExt as _, HashSet};

use self::mirror::Mirror;
use crate::maps::{BackendTable, MapError, MapIo, MapState, NextIds};
use crate::{
    model::{Backend, Changes, Desired, DesiredFrontend, Frontend},
    rows::{self, SourceRangeRow},
    vocabulary::Cidr,
};

/// How long what a packet may still be about to read (a table no frontend
/// names any more, an unreferenced rev-NAT row) stays before it is
/// released: far longer than a packet takes through the program
/// (microseconds), short enough that `backend_slots`' spare room for a
/// table being replaced is soon back.
pub const DELETION_GRACE: Duration = Duration::from_secs(2);

/// A row whose deletion waits for the grace period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Deferred {
    /// A table no frontend row names (by first block): its blocks are
    /// free again once the grace has passed.
    Table(u32),
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
    fn cancel(&mut self, row: Deferred) {
        if let Some(at) = self.pending.remove(&row) {
            self.due.remove(&(at, row));
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
    /// Every desired frontend was compared with what is applied (the first
    /// reconcile, or the one after a failure), not only the changed ones.
    pub full: bool,
    /// (rev-NAT id, backend id) pairs a changed frontend forwarded to
    /// before and no frontend forwards to after (a backend left a Service,
    /// or a frontend went): the flows conntrack keeps of them are stale.
    /// Counted for the changed frontends only; a full reconcile does not
    /// count (compare everything after it).
    pub pairs_ended: usize,
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
    /// The model's own (shared) copy.
    desired: Arc<DesiredFrontend>,
    rev_nat_id: u32,
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
        let mirror = Mirror::new(state, maps.slot_block_capacity());
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

    /// Runs the deferred releases that are due: tables, then rev-NAT rows,
    /// then the backend rows no table lists any more.
    pub fn collect_deferred(&mut self) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        self.collect_due(&mut report);
        #[cfg(test)]
        self.mirror.check_indexes();
        report
    }

    /// Panics unless every table no frontend names is queued for release
    /// and no queued table is named.
    #[cfg(test)]
    pub(crate) fn check_deferred(&self) {
        for first in self.mirror.pending_tables() {
            assert!(self.deferred.pending.contains_key(&Deferred::Table(first)), "table at block {first} not queued");
        }
        for row in self.deferred.pending.keys() {
            if let Deferred::Table(first) = row {
                assert!(self.mirror.is_pending(*first), "table at block {first} queued while named");
            }
        }
    }

    /// The rows (key, value) of every frontend.
    pub fn frontends(&self) -> impl Iterator<Item = (&ServiceKey, &ServiceValue)> {
        self.mirror.state().services.iter()
    }

    /// The backend ids of frontend `key`'s table (its current backend
    /// set), ascending.
    pub fn members(&self, key: &ServiceKey) -> impl Iterator<Item = u32> + '_ {
        let state = self.mirror.state();
        state.services.get(key).and_then(|v| state.table_of(v)).into_iter().flat_map(|t| t.members.iter().copied())
    }

    /// Blocks of `backend_slots` in use (block 0 counted), and its size.
    #[must_use]
    pub fn slot_blocks(&self) -> (u32, u32) {
        self.mirror.slot_blocks()
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

    /// Deletes what the maps hold for ids no row is left for (the
    /// counters an old flow's packet re-created: [`MapIo::sweep_ids`]);
    /// returns how many rows went.
    ///
    /// # Errors
    /// When a map cannot be read.
    pub fn sweep_ids(&mut self) -> Result<usize, MapError> {
        self.maps.sweep_ids(self.mirror.state())
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
        self.written.get(&df.frontend).is_some_and(|w| *w.desired == *df)
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
        let mut report = ReconcileReport { full: scope.is_none(), ..ReconcileReport::default() };
        // Frontends whose desired state differs from what was last written
        // (every one after a restart).
        // (The same allocation is the same frontend: no deep comparison.)
        let differs = |df: &&Arc<DesiredFrontend>| {
            self.written.get(&df.frontend).is_none_or(|w| !Arc::ptr_eq(&w.desired, df) && *w.desired != ***df)
        };
        let changed: Vec<&Arc<DesiredFrontend>> = match scope {
            None => desired.frontends.values().filter(differs).collect(),
            Some(c) => c.frontends.iter().filter_map(|f| desired.frontends.get(f)).filter(differs).collect(),
        };
        // The pairs the changed frontends forward to now, to tell which end.
        let pairs_before: Vec<(u32, u32)> =
            scope.map(|c| c.frontends.iter().flat_map(|f| self.pairs_of(f)).collect()).unwrap_or_default();
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
                    self.written.insert(df.frontend, WrittenFrontend { desired: Arc::clone(df), rev_nat_id });
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
        report.pairs_ended = pairs_before.iter().filter(|(r, b)| !self.mirror.is_live_pair(*r, *b)).count();
        #[cfg(test)]
        self.mirror.check_indexes();
        report
    }

    /// The (rev-NAT id, backend id) pairs frontend `f`'s applied row
    /// forwards to.
    fn pairs_of(&self, f: &Frontend) -> Vec<(u32, u32)> {
        let key = rows::frontend_key(f);
        let Some(row) = self.mirror.state().services.get(&key) else { return Vec::new() };
        self.members(&key).map(|b| (row.rev_nat_id, b)).collect()
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
    fn write_backends(
        &mut self,
        changed: &[&Arc<DesiredFrontend>],
        report: &mut ReconcileReport,
    ) -> HashMap<Backend, u32> {
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
    fn write_rev_nats(
        &mut self,
        changed: &[&Arc<DesiredFrontend>],
        report: &mut ReconcileReport,
    ) -> HashMap<Frontend, u32> {
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

    /// Writes one frontend: its backend set's table (a new one in free
    /// blocks, unless one exists), then its row switched to it in one
    /// update. The table it leaves, when no frontend names it any more, is
    /// queued for release.
    fn write_frontend(
        &mut self,
        df: &DesiredFrontend,
        rev_nat_id: u32,
        backend_ids: &[u32],
        report: &mut ReconcileReport,
    ) -> Result<(), MapError> {
        let key = rows::frontend_key(&df.frontend);
        // More endpoints than a table holds: the first ones (in the
        // model's order, the same on every node) get slots; reported.
        let backend_ids = &backend_ids[..backend_ids.len().min(maglev::MAX_BACKENDS)];
        if df.backends.len() > maglev::MAX_BACKENDS {
            report.errors.push(ReconcileError::frontend(
                df,
                MapError::TableFull { endpoints: df.backends.len(), max: maglev::MAX_BACKENDS },
            ));
        }
        let table = if backend_ids.is_empty() { None } else { Some(self.table_for(df, backend_ids, report)?) };
        // The Service port's ClusterIP has its rev-NAT row by now (rows are
        // shared by value, and the changed frontends' were written first);
        // without one (its write failed) the frontend keeps affinity alone.
        let scope =
            df.affinity_scope.and_then(|f| self.mirror.rev_nat_id_of(&rows::rev_nat_value(&f))).unwrap_or(rev_nat_id);
        let (first, slots, members) = table.unwrap_or((0, 0, 0));
        let mut value = rows::frontend_value(df, rev_nat_id, scope, slots as usize);
        value.table = first;
        value.members = members;
        let current = self.mirror.state().services.get(&key).copied();
        // (An adopted row naming a table that was not adopted may name its
        // blocks again, now holding the new table: written again all the
        // same, so the row counts for it.)
        if current == Some(value) && self.mirror.names(&key, first) {
            return Ok(());
        }
        if let Err(e) = self.put_service_row(key, value) {
            self.release_if_unnamed(first, report);
            return Err(e);
        }
        report.rows_written += 1;
        report.frontends_written += 1;
        if let Some(old) = current {
            self.release_if_unnamed(old.table, report);
        }
        Ok(())
    }

    /// The table of the backend set `backend_ids` (in the model's order):
    /// the one that exists, or a new one written into free blocks. Returns
    /// (first block, slots, members).
    fn table_for(
        &mut self,
        df: &DesiredFrontend,
        backend_ids: &[u32],
        report: &mut ReconcileReport,
    ) -> Result<(u32, u32, u32), MapError> {
        let mut members = backend_ids.to_vec();
        members.sort_unstable();
        let n = u32::try_from(members.len()).unwrap_or(u32::MAX);
        if let Some(first) = self.mirror.table_with(&members) {
            // Named again: its release (if queued) is off.
            self.deferred.cancel(Deferred::Table(first));
            let slots = self.mirror.table(first).map_or(0, |t| t.slots.len());
            return Ok((first, u32::try_from(slots).unwrap_or(u32::MAX), n));
        }
        let names: Vec<String> = df.backends[..backend_ids.len()].iter().map(ToString::to_string).collect();
        let slots: Vec<u32> = maglev::build(&names).into_iter().map(|i| backend_ids[i]).collect();
        let count = u32::try_from(slots.len()).unwrap_or(u32::MAX);
        let table = BackendTable { slots, members };
        let blocks = table.blocks();
        let len = u32::try_from(blocks.len()).unwrap_or(u32::MAX);
        let Some(first) = self.mirror.alloc_blocks(len) else {
            let (_, capacity) = self.mirror.slot_blocks();
            return Err(MapError::Full {
                map: service_common::map_names::BACKEND_SLOTS,
                capacity: capacity.saturating_mul(backend_slots::PER_BLOCK),
                flag: "--map-size-backend-slots",
            });
        };
        if let Err(e) = self.maps.put_slot_blocks(first, &blocks) {
            self.mirror.free_blocks(first, len);
            return Err(e);
        }
        report.rows_written += blocks.len();
        self.mirror.add_table(first, table);
        Ok((first, count, n))
    }

    /// Queues table `first` for release when no frontend row names it.
    fn release_if_unnamed(&mut self, first: u32, report: &mut ReconcileReport) {
        if self.mirror.is_pending(first) {
            self.defer(Deferred::Table(first), report);
        }
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
        // Frontends that are gone: their rows now (new flows stop), their
        // tables once the grace has passed.
        let gone: BTreeSet<ServiceKey> = self.mirror.frontends().filter(|k| !wanted.contains(k)).copied().collect();
        for key in gone {
            self.delete_frontend(key, report);
        }
    }

    /// Deletes the row of frontend `key` (when it has one) at once; its
    /// table, when no other frontend names it, after the grace period.
    fn delete_frontend(&mut self, key: ServiceKey, report: &mut ReconcileReport) {
        let Some(old) = self.mirror.state().services.get(&key).copied() else { return };
        if self.delete_service_row(&key, report) {
            report.frontends_deleted += 1;
            self.release_if_unnamed(old.table, report);
        }
    }

    /// The deferred releases that are due, then the rows nothing refers to:
    /// rev-NAT rows (deferred in turn when they were referenced a grace
    /// ago), then backend rows (only released tables could still lead a
    /// packet to them, and those have just gone).
    fn collect_due(&mut self, report: &mut ReconcileReport) {
        let now = self.clock.now();
        let mut due_rev_nats = BTreeSet::new();
        while let Some(row) = self.deferred.pop_due(now) {
            match row {
                Deferred::Table(first) => {
                    // A table named again was taken off the queue; this
                    // check only guards the blocks of a named table.
                    if self.mirror.is_pending(first) {
                        self.mirror.remove_table(first);
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
        for row in referenced {
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
