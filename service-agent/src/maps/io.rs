//! The port the reconciler writes through: the rows of the maps the agent
//! owns ([`MapState`]), the operations on them ([`MapIo`]) and their
//! errors ([`MapError`]). The pinned BPF maps implement it
//! ([`super::PinnedMaps`]); tests use an in-memory fake (`super::fake`).

use std::collections::{BTreeMap, BTreeSet};

use service_common::{BackendValue, RevNatValue, ServiceKey, ServiceValue, SourceRangeKey};

/// The rows of the maps the reconciler owns: `services`, `backends`,
/// `rev_nat`, `source_ranges`, and the id record in `agent_state`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
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

impl MapState {
    /// Every (rev-NAT id, backend id) pair a frontend's live backend table
    /// holds: the flows conntrack may keep. A full pass over the rows; the
    /// reconciler keeps the same set indexed (`Reconciler::is_live_pair`).
    #[must_use]
    pub fn live_pairs(&self) -> BTreeSet<(u32, u32)> {
        self.services
            .iter()
            .filter(|(k, _)| k.slot != 0)
            .filter_map(|(k, v)| {
                let frontend = self.services.get(&k.with_slot(0, 0))?;
                (frontend.version == k.version && k.slot <= frontend.count)
                    .then_some((frontend.rev_nat_id, v.backend_id))
            })
            .collect()
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
}
