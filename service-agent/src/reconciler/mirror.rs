//! The reconciler's mirror of the rows applied to the maps, with the indexes
//! that let one reconcile cost the frontends that changed rather than a pass
//! over every row: at 10,000 Services with 10 endpoints each the services
//! map holds about 1.3 million slot rows, and a scan of them per
//! EndpointSlice change would dominate the time to program it.
//!
//! Every change to the mirror goes through the methods here, so the indexes
//! can never disagree with [`MapState`] (a test checks them against a full
//! recomputation after every step).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use service_common::{BackendValue, RevNatValue, ServiceKey, ServiceValue};

use crate::maps::MapState;

/// Value → id for the backend and rev-NAT rows, and the next id to hand
/// out.
///
/// Ids are never reused while the 32-bit counter has not wrapped (four
/// billion ids): conntrack entries, affinity entries and old flows' packets
/// that still name a freed id can never reach, or be counted for, whoever
/// would get it next. The counter outlives the agent (`agent_state`), and
/// is never below an id in use.
#[derive(Debug)]
pub(super) struct IdIndex<V> {
    by_value: HashMap<V, u32>,
    next: u32,
}

impl<V: Copy + Eq + std::hash::Hash> IdIndex<V> {
    fn new(rows: &BTreeMap<u32, V>, next: u32) -> Self {
        let above_rows = rows.keys().next_back().map_or(1, |id| id.wrapping_add(1));
        Self { by_value: rows.iter().map(|(id, v)| (*v, *id)).collect(), next: next.max(above_rows).max(1) }
    }

    /// The next id [`Self::free_id`] starts from.
    pub(super) fn next(&self) -> u32 {
        self.next
    }

    /// The id of an applied row holding `value`.
    fn id_of(&self, value: &V) -> Option<u32> {
        self.by_value.get(value).copied()
    }

    /// A fresh id no row uses (never 0), consumed.
    fn free_id(&mut self, rows: &BTreeMap<u32, V>) -> u32 {
        loop {
            let id = self.next;
            self.next = self.next.wrapping_add(1).max(1);
            if !rows.contains_key(&id) {
                return id;
            }
        }
    }

    /// Inserts row `id` into `rows`, keeping the index.
    fn insert(&mut self, rows: &mut BTreeMap<u32, V>, id: u32, value: V) {
        if let Some(old) = rows.insert(id, value) {
            self.forget(id, &old);
        }
        self.by_value.insert(value, id);
    }

    /// Removes row `id` from `rows`, keeping the index.
    fn remove(&mut self, rows: &mut BTreeMap<u32, V>, id: u32) {
        if let Some(old) = rows.remove(&id) {
            self.forget(id, &old);
        }
    }

    fn forget(&mut self, id: u32, value: &V) {
        if self.by_value.get(value) == Some(&id) {
            self.by_value.remove(value);
        }
    }
}

/// Counts one more `key`; says whether it is the first.
fn inc<K: Eq + std::hash::Hash>(counts: &mut HashMap<K, u32>, key: K) -> bool {
    let n = counts.entry(key).or_insert(0);
    *n += 1;
    *n == 1
}

/// Counts one fewer `key`; says whether that was the last.
fn dec<K: Eq + std::hash::Hash>(counts: &mut HashMap<K, u32>, key: K) -> bool {
    if let std::collections::hash_map::Entry::Occupied(mut e) = counts.entry(key) {
        *e.get_mut() -= 1;
        if *e.get() == 0 {
            e.remove();
            return true;
        }
    }
    false
}

/// One more reference to row `id`: it leaves `unreferenced`.
fn reference(refs: &mut HashMap<u32, u32>, unreferenced: &mut BTreeSet<u32>, id: u32) {
    if inc(refs, id) {
        unreferenced.remove(&id);
    }
}

/// One fewer reference to row `id`: after its last, it joins
/// `unreferenced` (when `rows` has it).
fn unreference<V>(refs: &mut HashMap<u32, u32>, unreferenced: &mut BTreeSet<u32>, rows: &BTreeMap<u32, V>, id: u32) {
    if dec(refs, id) && rows.contains_key(&id) {
        unreferenced.insert(id);
    }
}

/// [`MapState`] and its indexes.
#[derive(Debug)]
pub(super) struct Mirror {
    state: MapState,
    /// Slot-0 key → rows of that frontend (slot 0 and every version's slots).
    rows_per_frontend: HashMap<ServiceKey, u32>,
    /// Backend id → slot rows (live or not) that name it.
    backend_refs: HashMap<u32, u32>,
    /// Rev-NAT id → slot-0 rows that name it.
    rev_nat_refs: HashMap<u32, u32>,
    /// (rev-NAT id, backend id) → slots of live tables holding the pair.
    live_pairs: HashMap<(u32, u32), u32>,
    /// Backend rows no slot row names, and rev-NAT rows no slot-0 row
    /// names: what a reconcile may delete, without a pass over every row.
    unreferenced_backends: BTreeSet<u32>,
    unreferenced_rev_nats: BTreeSet<u32>,
    backend_ids: IdIndex<BackendValue>,
    rev_nat_ids: IdIndex<RevNatValue>,
}

impl Mirror {
    /// Indexes `state` (one full pass, at start).
    pub(super) fn new(mut state: MapState) -> Self {
        let services = std::mem::take(&mut state.services);
        let mut applied = Self {
            rows_per_frontend: HashMap::new(),
            backend_refs: HashMap::new(),
            rev_nat_refs: HashMap::new(),
            live_pairs: HashMap::new(),
            // Until a row names them.
            unreferenced_backends: state.backends.keys().copied().collect(),
            unreferenced_rev_nats: state.rev_nat.keys().copied().collect(),
            backend_ids: IdIndex::new(&state.backends, state.next_ids.backend),
            rev_nat_ids: IdIndex::new(&state.rev_nat, state.next_ids.rev_nat),
            state,
        };
        // Slot-0 rows sort before their frontend's slot rows, so each slot
        // row finds its frontend's live version already there.
        for (key, value) in services {
            applied.put_service(key, value);
        }
        applied
    }

    pub(super) fn state(&self) -> &MapState {
        &self.state
    }

    /// The slot-0 keys of every frontend with rows.
    pub(super) fn frontends(&self) -> impl Iterator<Item = &ServiceKey> {
        self.rows_per_frontend.keys()
    }

    /// The id of an applied backend row holding `value`.
    pub(super) fn backend_id_of(&self, value: &BackendValue) -> Option<u32> {
        self.backend_ids.id_of(value)
    }

    /// A backend id never handed out before.
    pub(super) fn free_backend_id(&mut self) -> u32 {
        let id = self.backend_ids.free_id(&self.state.backends);
        self.state.next_ids.backend = self.backend_ids.next();
        id
    }

    /// The id of an applied rev-NAT row holding `value`.
    pub(super) fn rev_nat_id_of(&self, value: &RevNatValue) -> Option<u32> {
        self.rev_nat_ids.id_of(value)
    }

    /// A rev-NAT id never handed out before.
    pub(super) fn free_rev_nat_id(&mut self) -> u32 {
        let id = self.rev_nat_ids.free_id(&self.state.rev_nat);
        self.state.next_ids.rev_nat = self.rev_nat_ids.next();
        id
    }

    /// The backend rows no slot row names.
    pub(super) fn unreferenced_backends(&self) -> impl Iterator<Item = u32> + '_ {
        self.unreferenced_backends.iter().copied()
    }

    /// The rev-NAT rows no slot-0 row names.
    pub(super) fn unreferenced_rev_nats(&self) -> impl Iterator<Item = u32> + '_ {
        self.unreferenced_rev_nats.iter().copied()
    }

    pub(super) fn rev_nat_referenced(&self, id: u32) -> bool {
        self.rev_nat_refs.contains_key(&id)
    }

    /// Whether a live backend table of a frontend with rev-NAT id `rev_nat`
    /// forwards to backend `backend`: the flows conntrack may keep.
    pub(super) fn is_live_pair(&self, rev_nat: u32, backend: u32) -> bool {
        self.live_pairs.contains_key(&(rev_nat, backend))
    }

    /// Whether slot row `key` is part of its frontend's live table.
    pub(super) fn is_live_slot(&self, key: &ServiceKey) -> bool {
        self.live_slot_rev_nat(key).is_some()
    }

    /// The rev-NAT id of slot row `key`'s frontend when the row is part of
    /// its live table.
    fn live_slot_rev_nat(&self, key: &ServiceKey) -> Option<u32> {
        let frontend = self.state.services.get(&key.with_slot(0, 0))?;
        (key.slot != 0 && frontend.version == key.version && key.slot <= frontend.count).then_some(frontend.rev_nat_id)
    }

    /// Adds (`add`) or removes the live pairs of the table slot-0 row
    /// `value` of `key0` points at.
    fn count_table(&mut self, key0: &ServiceKey, value: &ServiceValue, add: bool) {
        for slot in 1..=value.count {
            if let Some(row) = self.state.services.get(&key0.with_slot(value.version, slot)) {
                let pair = (value.rev_nat_id, row.backend_id);
                if add {
                    inc(&mut self.live_pairs, pair);
                } else {
                    dec(&mut self.live_pairs, pair);
                }
            }
        }
    }

    pub(super) fn put_service(&mut self, key: ServiceKey, value: ServiceValue) {
        let key0 = key.with_slot(0, 0);
        if key.slot == 0 {
            let old = self.state.services.get(&key).copied();
            let same_table = old
                .is_some_and(|o| (o.version, o.count, o.rev_nat_id) == (value.version, value.count, value.rev_nat_id));
            if let Some(old) = old {
                unreference(
                    &mut self.rev_nat_refs,
                    &mut self.unreferenced_rev_nats,
                    &self.state.rev_nat,
                    old.rev_nat_id,
                );
                if !same_table {
                    self.count_table(&key0, &old, false);
                }
            }
            self.state.services.insert(key, value);
            reference(&mut self.rev_nat_refs, &mut self.unreferenced_rev_nats, value.rev_nat_id);
            if !same_table {
                self.count_table(&key0, &value, true);
            }
            if old.is_none() {
                inc(&mut self.rows_per_frontend, key0);
            }
            return;
        }
        let live = self.live_slot_rev_nat(&key);
        match self.state.services.insert(key, value) {
            Some(old) => {
                unreference(
                    &mut self.backend_refs,
                    &mut self.unreferenced_backends,
                    &self.state.backends,
                    old.backend_id,
                );
                if let Some(rev_nat) = live {
                    dec(&mut self.live_pairs, (rev_nat, old.backend_id));
                }
            }
            None => {
                inc(&mut self.rows_per_frontend, key0);
            }
        }
        reference(&mut self.backend_refs, &mut self.unreferenced_backends, value.backend_id);
        if let Some(rev_nat) = live {
            inc(&mut self.live_pairs, (rev_nat, value.backend_id));
        }
    }

    pub(super) fn remove_service(&mut self, key: &ServiceKey) {
        let key0 = key.with_slot(0, 0);
        let live = self.live_slot_rev_nat(key);
        let Some(old) = self.state.services.get(key).copied() else { return };
        if key.slot == 0 {
            self.count_table(&key0, &old, false);
            unreference(&mut self.rev_nat_refs, &mut self.unreferenced_rev_nats, &self.state.rev_nat, old.rev_nat_id);
        } else {
            unreference(&mut self.backend_refs, &mut self.unreferenced_backends, &self.state.backends, old.backend_id);
            if let Some(rev_nat) = live {
                dec(&mut self.live_pairs, (rev_nat, old.backend_id));
            }
        }
        self.state.services.remove(key);
        dec(&mut self.rows_per_frontend, key0);
    }

    pub(super) fn insert_backend(&mut self, id: u32, value: BackendValue) {
        self.backend_ids.insert(&mut self.state.backends, id, value);
        if !self.backend_refs.contains_key(&id) {
            self.unreferenced_backends.insert(id);
        }
    }

    pub(super) fn remove_backend(&mut self, id: u32) {
        self.backend_ids.remove(&mut self.state.backends, id);
        self.unreferenced_backends.remove(&id);
    }

    pub(super) fn insert_rev_nat(&mut self, id: u32, value: RevNatValue) {
        self.rev_nat_ids.insert(&mut self.state.rev_nat, id, value);
        if !self.rev_nat_refs.contains_key(&id) {
            self.unreferenced_rev_nats.insert(id);
        }
    }

    pub(super) fn remove_rev_nat(&mut self, id: u32) {
        self.rev_nat_ids.remove(&mut self.state.rev_nat, id);
        self.unreferenced_rev_nats.remove(&id);
    }

    pub(super) fn source_ranges_mut(
        &mut self,
    ) -> &mut std::collections::BTreeSet<(u32, service_common::SourceRangeKey)> {
        &mut self.state.source_ranges
    }

    /// Panics unless every index equals its recomputation from the rows.
    #[cfg(test)]
    pub(super) fn check_indexes(&self) {
        let fresh = Self::new(self.state.clone());
        assert_eq!(self.rows_per_frontend, fresh.rows_per_frontend, "rows per frontend");
        assert_eq!(self.backend_refs, fresh.backend_refs, "backend refs");
        assert_eq!(self.rev_nat_refs, fresh.rev_nat_refs, "rev-NAT refs");
        assert_eq!(self.live_pairs, fresh.live_pairs, "live pairs");
        assert_eq!(self.unreferenced_backends, fresh.unreferenced_backends, "unreferenced backends");
        assert_eq!(self.unreferenced_rev_nats, fresh.unreferenced_rev_nats, "unreferenced rev-NATs");
        let live: std::collections::BTreeSet<(u32, u32)> = self.live_pairs.keys().copied().collect();
        assert_eq!(live, self.state.live_pairs(), "live pairs against MapState::live_pairs");
        for (id, v) in &self.state.backends {
            let indexed = self.backend_ids.id_of(v).expect("every backend row indexed by value");
            assert_eq!(self.state.backends.get(&indexed), Some(v), "backend {id}: index names a row of that value");
        }
        for (id, v) in &self.state.rev_nat {
            let indexed = self.rev_nat_ids.id_of(v).expect("every rev-NAT row indexed by value");
            assert_eq!(self.state.rev_nat.get(&indexed), Some(v), "rev-NAT {id}: index names a row of that value");
        }
        assert_eq!(
            self.backend_ids.by_value.len(),
            self.state.backends.values().collect::<std::collections::HashSet<_>>().len()
        );
    }
}
