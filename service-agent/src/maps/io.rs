//! The port the reconciler writes through: the rows of the maps the agent
//! owns ([`MapState`]), the operations on them ([`MapIo`]) and their
//! errors ([`MapError`]). The pinned BPF maps implement it
//! ([`super::PinnedMaps`]); tests use an in-memory fake (`super::fake`).

use std::collections::{BTreeMap, BTreeSet};

use service_common::{
    BackendValue, RevNatValue, ServiceKey, ServiceValue, SlotBlock, SourceRangeKey,
    backend_slots::{PER_BLOCK, locate},
};

/// The rows of the maps the reconciler owns: `services`, the tables of
/// `backend_slots` they name, `backends`, `rev_nat`, `source_ranges`, and
/// the id record in `agent_state`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    /// One row per frontend.
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// The backend tables the frontend rows name, by first block (blocks
    /// no frontend names are free space, whatever they hold).
    pub tables: BTreeMap<u32, BackendTable>,
    pub backends: BTreeMap<u32, BackendValue>,
    pub rev_nat: BTreeMap<u32, RevNatValue>,
    /// `source_ranges` LPM-trie rows: (prefix length, key).
    pub source_ranges: BTreeSet<(u32, SourceRangeKey)>,
    /// The next ids to hand out (`agent_state`; 0: none recorded).
    pub next_ids: NextIds,
}

/// The next backend and rev-NAT ids to hand out, kept across restarts so
/// an id is not reused (see `reconciler::mirror::IdIndex`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextIds {
    pub backend: u32,
    pub rev_nat: u32,
}

/// A backend table of `backend_slots`: its Maglev slots (backend ids, in
/// slot order) and its member list (the backend set, ascending).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendTable {
    pub slots: Vec<u32>,
    pub members: Vec<u32>,
}

impl BackendTable {
    /// The table's blocks as written to `backend_slots` (the last one
    /// zero-padded).
    #[must_use]
    pub fn blocks(&self) -> Vec<SlotBlock> {
        let ids: Vec<u32> = self.slots.iter().chain(&self.members).copied().collect();
        ids.chunks(PER_BLOCK as usize)
            .map(|chunk| {
                let mut block = SlotBlock { ids: [0; PER_BLOCK as usize] };
                block.ids[..chunk.len()].copy_from_slice(chunk);
                block
            })
            .collect()
    }

    /// Reads the table frontend row `value` names, block by block through
    /// `block` (`None`: that block could not be read).
    pub fn read(value: &ServiceValue, mut block: impl FnMut(u32) -> Option<SlotBlock>) -> Option<Self> {
        let mut ids = Vec::with_capacity(usize::try_from(value.count + value.members).unwrap_or(0));
        let mut current: Option<(u32, SlotBlock)> = None;
        for pos in 0..value.count.checked_add(value.members)? {
            let (b, lane) = locate(value.table, pos);
            if current.is_none_or(|(at, _)| at != b) {
                current = Some((b, block(b)?));
            }
            ids.push(current?.1.ids[lane]);
        }
        let members = ids.split_off(usize::try_from(value.count).ok()?);
        Some(Self { slots: ids, members })
    }
}

impl MapState {
    /// Every (rev-NAT id, backend id) pair a frontend's live backend table
    /// holds: the flows conntrack may keep. A full pass over the rows; the
    /// reconciler keeps the same set indexed (`Reconciler::is_live_pair`).
    #[must_use]
    pub fn live_pairs(&self) -> BTreeSet<(u32, u32)> {
        self.services
            .values()
            .filter(|v| v.count > 0)
            .filter_map(|v| Some((v.rev_nat_id, self.tables.get(&v.table)?)))
            .flat_map(|(rev_nat, t)| t.members.iter().map(move |b| (rev_nat, *b)))
            .collect()
    }

    /// The table of frontend row `value` (`None`: it has none, or the
    /// table was not read).
    #[must_use]
    pub fn table_of(&self, value: &ServiceValue) -> Option<&BackendTable> {
        if value.count == 0 { None } else { self.tables.get(&value.table) }
    }

    /// The tables `services` names, each read once through `block`; a
    /// table that cannot be read (a block out of range) is left out, so
    /// its frontends are written again.
    pub fn read_tables(
        services: &BTreeMap<ServiceKey, ServiceValue>,
        mut block: impl FnMut(u32) -> Option<SlotBlock>,
    ) -> BTreeMap<u32, BackendTable> {
        let mut tables = BTreeMap::new();
        for v in services.values().filter(|v| v.count > 0 && v.table != 0) {
            if tables.contains_key(&v.table) {
                continue;
            }
            if let Some(t) = BackendTable::read(v, &mut block) {
                tables.insert(v.table, t);
            }
        }
        tables
    }
}

/// A failed map operation.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("map {map} is full ({capacity} entries): raise it with {flag}")]
    Full { map: &'static str, capacity: u32, flag: &'static str },
    #[error("{endpoints} endpoints, more than a backend table holds: the first {max} receive traffic")]
    TableFull { endpoints: usize, max: usize },
    #[error("map {map}: {op} failed: {source}")]
    Io {
        map: &'static str,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Map I/O, behind a trait so reconciler tests run against an in-memory fake
/// (`fake::FakeMaps`, test builds only) and the agent against the pinned
/// BPF maps.
pub trait MapIo {
    /// Every row of the maps the reconciler owns.
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
    /// Writes `blocks` to `backend_slots` from block `first` on.
    /// # Errors
    /// When the kernel refuses an update.
    fn put_slot_blocks(&mut self, first: u32, blocks: &[SlotBlock]) -> Result<(), MapError>;
    /// How many blocks `backend_slots` has (block 0 is never used).
    fn slot_block_capacity(&self) -> u32;
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
    /// Records the next ids to hand out.
    /// # Errors
    /// When the kernel refuses the update.
    fn put_next_ids(&mut self, next: NextIds) -> Result<(), MapError>;
    /// Deletes what the maps hold, beside the rows above, for backend and
    /// rev-NAT ids `live` has no row for (the per-id counters the programs
    /// create on an id's first packet); returns how many rows went.
    /// # Errors
    /// When a map cannot be read.
    fn sweep_ids(&mut self, live: &MapState) -> Result<usize, MapError> {
        let _ = live;
        Ok(0)
    }
}
