//! The reconciler's mirror of the rows applied to the maps, with the indexes
//! that let one reconcile cost the frontends that changed rather than a pass
//! over every row (at 10,000 Services with 10 endpoints each: 20,000
//! frontends, 10,000 tables holding 1.4 million backend ids), and the
//! allocator of `backend_slots`' blocks.
//!
//! Every change to the mirror goes through the methods here, so the indexes
//! can never disagree with [`MapState`] (a test checks them against a full
//! recomputation after every step).

use std::collections::{BTreeMap, BTreeSet};

use foldhash::{HashMap, HashMapExt as _};

use service_common::{BackendValue, RevNatValue, ServiceKey, ServiceValue, backend_slots};

use crate::maps::{BackendTable, MapState};

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

/// The free blocks of `backend_slots`: extents kept by start and by size,
/// so an allocation takes the smallest extent that fits (best fit) and a
/// freed extent merges with its free neighbours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Arena {
    capacity: u32,
    by_start: BTreeMap<u32, u32>,
    by_len: BTreeSet<(u32, u32)>,
}

impl Arena {
    /// Every block free but block 0 (never used: a `table` of 0 is none)
    /// and those of `used` (first block, blocks).
    fn new(capacity: u32, used: impl IntoIterator<Item = (u32, u32)>) -> Self {
        let mut arena = Self { capacity, by_start: BTreeMap::new(), by_len: BTreeSet::new() };
        let mut at = 1;
        let mut used: Vec<(u32, u32)> = used.into_iter().collect();
        used.sort_unstable();
        for (first, len) in used {
            if first > at {
                arena.insert(at, first - at);
            }
            at = at.max(first.saturating_add(len));
        }
        if capacity > at {
            arena.insert(at, capacity - at);
        }
        arena
    }

    fn insert(&mut self, start: u32, len: u32) {
        self.by_start.insert(start, len);
        self.by_len.insert((len, start));
    }

    fn take(&mut self, start: u32, len: u32) {
        self.by_start.remove(&start);
        self.by_len.remove(&(len, start));
    }

    /// The first of `len` free blocks, taken (`None`: no free extent is
    /// that long).
    pub(super) fn alloc(&mut self, len: u32) -> Option<u32> {
        let &(have, start) = self.by_len.range((len, 0)..).next()?;
        self.take(start, have);
        if have > len {
            self.insert(start + len, have - len);
        }
        Some(start)
    }

    /// Gives `len` blocks from `start` back, merged with free neighbours.
    pub(super) fn free(&mut self, start: u32, len: u32) {
        let (mut start, mut len) = (start, len);
        if let Some((&prev, &prev_len)) = self.by_start.range(..start).next_back()
            && prev + prev_len == start
        {
            self.take(prev, prev_len);
            start = prev;
            len += prev_len;
        }
        if let Some(&next_len) = self.by_start.get(&(start + len)) {
            self.take(start + len, next_len);
            len += next_len;
        }
        self.insert(start, len);
    }

    /// Blocks in use (block 0 counted).
    pub(super) fn used(&self) -> u32 {
        self.capacity - self.by_start.values().sum::<u32>()
    }

    pub(super) fn capacity(&self) -> u32 {
        self.capacity
    }
}

/// The blocks `table` takes.
fn blocks_of(table: &BackendTable) -> u32 {
    let (count, members) = (u32::try_from(table.slots.len()), u32::try_from(table.members.len()));
    backend_slots::blocks(count.unwrap_or(u32::MAX), members.unwrap_or(u32::MAX))
}

/// Whether an adopted table is one this agent could have written: members
/// ascending, none 0, every slot a member, inside the map.
fn well_formed(first: u32, table: &BackendTable, capacity: u32) -> bool {
    !table.members.is_empty()
        && table.members.windows(2).all(|w| w[0] < w[1])
        && table.members[0] != 0
        && table.slots.iter().all(|s| table.members.binary_search(s).is_ok())
        && first != 0
        && u64::from(first) + u64::from(blocks_of(table)) <= u64::from(capacity)
}

/// [`MapState`] and its indexes.
#[derive(Debug)]
pub(super) struct Mirror {
    /// What a dump of the maps would show: `tables` holds the tables a
    /// frontend row names.
    state: MapState,
    /// Tables no frontend row names, their blocks not yet free again (a
    /// packet may still be reading them; a frontend may take one back).
    pending: BTreeMap<u32, BackendTable>,
    /// Table (first block) → frontend rows naming it.
    table_refs: HashMap<u32, u32>,
    /// Frontend row → the table it is counted in `table_refs` and
    /// `live_pairs` for (a row naming a table that was not adopted is
    /// counted for none, even once its blocks hold another table).
    counted: HashMap<ServiceKey, u32>,
    /// Member list → the table holding it: a frontend with the same
    /// backend set shares it. Tables awaiting reuse of their blocks are
    /// still here (a frontend may take one back).
    by_members: HashMap<Vec<u32>, u32>,
    /// Backend id → tables (named or awaiting reuse) listing it.
    backend_refs: HashMap<u32, u32>,
    /// Rev-NAT id → frontend rows that name it.
    rev_nat_refs: HashMap<u32, u32>,
    /// (rev-NAT id, backend id) → frontend rows whose table holds the pair.
    live_pairs: HashMap<(u32, u32), u32>,
    /// Backend rows no table lists, and rev-NAT rows no frontend row
    /// names: what a reconcile may delete, without a pass over every row.
    unreferenced_backends: BTreeSet<u32>,
    unreferenced_rev_nats: BTreeSet<u32>,
    backend_ids: IdIndex<BackendValue>,
    rev_nat_ids: IdIndex<RevNatValue>,
    arena: Arena,
}

impl Mirror {
    /// Indexes `state` (one full pass, at start), in a `backend_slots` of
    /// `slot_blocks` blocks. Adopted tables that are not well formed,
    /// overlap another or list a backend without its row are dropped:
    /// their frontends are written again.
    pub(super) fn new(state: MapState, slot_blocks: u32) -> Self {
        Self::with_pending(state, BTreeMap::new(), slot_blocks)
    }

    /// [`Self::new`], with tables no frontend names still holding their
    /// blocks.
    fn with_pending(mut state: MapState, pending: BTreeMap<u32, BackendTable>, slot_blocks: u32) -> Self {
        let services = std::mem::take(&mut state.services);
        let mut tables = std::mem::take(&mut state.tables);
        tables.extend(pending);
        let mut applied = Self {
            pending: BTreeMap::new(),
            table_refs: HashMap::new(),
            counted: HashMap::new(),
            by_members: HashMap::new(),
            backend_refs: HashMap::new(),
            rev_nat_refs: HashMap::new(),
            live_pairs: HashMap::new(),
            // Until a row names them.
            unreferenced_backends: state.backends.keys().copied().collect(),
            unreferenced_rev_nats: state.rev_nat.keys().copied().collect(),
            backend_ids: IdIndex::new(&state.backends, state.next_ids.backend),
            rev_nat_ids: IdIndex::new(&state.rev_nat, state.next_ids.rev_nat),
            arena: Arena::new(slot_blocks, []),
            state,
        };
        let mut end = 0;
        let mut kept = Vec::new();
        for (first, table) in tables {
            // Every member with its backend row, too: a packet must never
            // reach a slot naming none.
            if first >= end
                && well_formed(first, &table, slot_blocks)
                && !applied.by_members.contains_key(&table.members)
                && table.members.iter().all(|b| applied.state.backends.contains_key(b))
            {
                end = first + blocks_of(&table);
                kept.push((first, blocks_of(&table)));
                applied.add_table(first, table);
            }
        }
        applied.arena = Arena::new(slot_blocks, kept);
        for (key, value) in services {
            applied.put_service(key, value);
        }
        applied
    }

    pub(super) fn state(&self) -> &MapState {
        &self.state
    }

    /// The keys of every frontend row.
    pub(super) fn frontends(&self) -> impl Iterator<Item = &ServiceKey> {
        self.state.services.keys()
    }

    /// The table holding exactly `members` (ascending), when there is one.
    pub(super) fn table_with(&self, members: &[u32]) -> Option<u32> {
        self.by_members.get(members).copied()
    }

    /// Whether frontend row `key` is counted as naming table `first` (0:
    /// as naming none).
    pub(super) fn names(&self, key: &ServiceKey, first: u32) -> bool {
        self.counted.get(key).copied().unwrap_or(0) == first
    }

    /// Table `first`, named or not.
    pub(super) fn table(&self, first: u32) -> Option<&BackendTable> {
        self.state.tables.get(&first).or_else(|| self.pending.get(&first))
    }

    /// The tables no frontend row names (their blocks not yet free).
    #[cfg(test)]
    pub(super) fn pending_tables(&self) -> impl Iterator<Item = u32> + '_ {
        self.pending.keys().copied()
    }

    pub(super) fn is_pending(&self, first: u32) -> bool {
        self.pending.contains_key(&first)
    }

    /// `len` free blocks of `backend_slots`, taken.
    pub(super) fn alloc_blocks(&mut self, len: u32) -> Option<u32> {
        self.arena.alloc(len)
    }

    /// Gives back blocks taken by [`Self::alloc_blocks`] that hold no table.
    pub(super) fn free_blocks(&mut self, first: u32, len: u32) {
        self.arena.free(first, len);
    }

    /// (blocks in use, blocks) of `backend_slots`.
    pub(super) fn slot_blocks(&self) -> (u32, u32) {
        (self.arena.used(), self.arena.capacity())
    }

    /// Records table `table`, written at block `first` (its blocks taken),
    /// named by no frontend row yet.
    pub(super) fn add_table(&mut self, first: u32, table: BackendTable) {
        for b in &table.members {
            reference(&mut self.backend_refs, &mut self.unreferenced_backends, *b);
        }
        self.by_members.insert(table.members.clone(), first);
        self.pending.insert(first, table);
    }

    /// Forgets table `first`, which no frontend row names, and frees its
    /// blocks; its backends lose a reference.
    pub(super) fn remove_table(&mut self, first: u32) {
        let Some(table) = self.pending.remove(&first) else { return };
        if self.by_members.get(&table.members) == Some(&first) {
            self.by_members.remove(&table.members);
        }
        for b in &table.members {
            unreference(&mut self.backend_refs, &mut self.unreferenced_backends, &self.state.backends, *b);
        }
        self.arena.free(first, blocks_of(&table));
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

    /// The backend rows no table lists.
    pub(super) fn unreferenced_backends(&self) -> impl Iterator<Item = u32> + '_ {
        self.unreferenced_backends.iter().copied()
    }

    /// The rev-NAT rows no frontend row names.
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

    /// Adds (`add`) or removes the live pairs of table `first` for a
    /// frontend of rev-NAT id `rev_nat`.
    fn count_table(&mut self, rev_nat: u32, first: u32, add: bool) {
        let Some(table) = self.table(first) else { return };
        let pairs: Vec<(u32, u32)> = table.members.iter().map(|b| (rev_nat, *b)).collect();
        for pair in pairs {
            if add {
                inc(&mut self.live_pairs, pair);
            } else {
                dec(&mut self.live_pairs, pair);
            }
        }
    }

    /// The table a frontend row names, for the reference counts (`None`:
    /// no table, or one that was not adopted).
    fn named_table(&self, value: &ServiceValue) -> Option<u32> {
        (value.count > 0 && self.table(value.table).is_some()).then_some(value.table)
    }

    pub(super) fn put_service(&mut self, key: ServiceKey, value: ServiceValue) {
        // Named first, so a table both rows name never looks unnamed.
        let named = self.named_table(&value);
        if let Some(t) = named
            && inc(&mut self.table_refs, t)
            && let Some(table) = self.pending.remove(&t)
        {
            self.state.tables.insert(t, table);
        }
        if let Some(old) = self.state.services.insert(key, value) {
            self.forget_service(&key, &old);
        }
        reference(&mut self.rev_nat_refs, &mut self.unreferenced_rev_nats, value.rev_nat_id);
        if let Some(t) = named {
            self.counted.insert(key, t);
            self.count_table(value.rev_nat_id, t, true);
        }
    }

    /// Drops what frontend row `old` of `key` holds references to.
    fn forget_service(&mut self, key: &ServiceKey, old: &ServiceValue) {
        unreference(&mut self.rev_nat_refs, &mut self.unreferenced_rev_nats, &self.state.rev_nat, old.rev_nat_id);
        let Some(t) = self.counted.remove(key) else { return };
        self.count_table(old.rev_nat_id, t, false);
        if dec(&mut self.table_refs, t)
            && let Some(table) = self.state.tables.remove(&t)
        {
            self.pending.insert(t, table);
        }
    }

    pub(super) fn remove_service(&mut self, key: &ServiceKey) {
        let Some(old) = self.state.services.remove(key) else { return };
        self.forget_service(key, &old);
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
        let fresh = Self::with_pending(self.state.clone(), self.pending.clone(), self.arena.capacity());
        assert_eq!(self.pending, fresh.pending, "tables no frontend names");
        assert_eq!(self.table_refs, fresh.table_refs, "table refs");
        assert_eq!(self.counted, fresh.counted, "the table each row is counted for");
        assert_eq!(self.by_members, fresh.by_members, "tables by members");
        assert_eq!(self.backend_refs, fresh.backend_refs, "backend refs");
        assert_eq!(self.rev_nat_refs, fresh.rev_nat_refs, "rev-NAT refs");
        assert_eq!(self.live_pairs, fresh.live_pairs, "live pairs");
        assert_eq!(self.unreferenced_backends, fresh.unreferenced_backends, "unreferenced backends");
        assert_eq!(self.unreferenced_rev_nats, fresh.unreferenced_rev_nats, "unreferenced rev-NATs");
        assert_eq!(self.arena, fresh.arena, "free blocks");
        assert_eq!(fresh.state.tables.len(), self.state.tables.len(), "every table well formed and apart");
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

#[cfg(test)]
mod tests {
    use super::Arena;

    #[test]
    fn arena_takes_the_smallest_fitting_extent_and_merges_freed_neighbours() {
        // Blocks 1..100 free but 10..20 and 40..45.
        let mut a = Arena::new(100, [(10, 10), (40, 5)]);
        assert_eq!(a.used(), 1 + 10 + 5);
        // Free: 1..10 (9), 20..40 (20), 45..100 (55): 5 blocks go to 1..10.
        assert_eq!(a.alloc(5), Some(1));
        assert_eq!(a.alloc(15), Some(20));
        assert_eq!(a.alloc(56), None);
        assert_eq!(a.alloc(55), Some(45));
        a.free(20, 15);
        a.free(10, 10);
        a.free(1, 5);
        // 1..35 is one extent again (1..6, 6..10, 10..20, 20..35 merged).
        assert_eq!(a.alloc(34), Some(1));
        assert_eq!(a.used(), 100 - 5);
    }
}
