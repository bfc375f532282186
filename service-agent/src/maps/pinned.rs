//! The maps the reconciler writes, opened from the loaded object or from
//! their pins, and their [`MapIo`] implementation.

use std::{collections::BTreeSet, io, path::Path};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuHashMap, lpm_trie::Key as LpmKey},
};
use service_common::{
    BackendValue, Counters, RevNatValue, ServiceKey, ServiceValue, SlotBlock, SockCounters, SourceRangeKey,
    agent_state, map_names,
};

use super::{
    LoadError, MapError, MapIo, MapSizes, MapState, NextIds,
    access::{dump_map, is_not_found, open_pinned},
};

/// The maps the reconciler writes: the frontends, backends, rev-NAT and
/// source-range rows, the counters of backend and rev-NAT ids (created by
/// an id's first packet, deleted with its row), and the id counters in
/// `agent_state`.
pub struct PinnedMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backend_slots: Array<MapData, SlotBlock>,
    /// `backend_slots` mapped into this process (the map is created with
    /// `BPF_F_MMAPABLE`): tables are written and read with plain memory
    /// accesses, not a syscall per block. `None` for a pin made without
    /// the flag (then through `backend_slots`).
    mapped_slots: Option<MappedSlots>,
    backends: HashMap<MapData, u32, BackendValue>,
    rev_nat: HashMap<MapData, u32, RevNatValue>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    service_counters: PerCpuHashMap<MapData, u32, Counters>,
    backend_counters: PerCpuHashMap<MapData, u32, Counters>,
    sock_counters: PerCpuHashMap<MapData, u32, SockCounters>,
    agent_state: HashMap<MapData, agent_state::Key, u64>,
    sizes: MapSizes,
}

impl PinnedMaps {
    /// Takes the maps out of a loaded object.
    ///
    /// # Errors
    /// When a map is missing or of the wrong type.
    pub fn from_ebpf(ebpf: &mut Ebpf, sizes: MapSizes) -> Result<Self, LoadError> {
        Self::from_maps(|name| ebpf.take_map(name).ok_or(LoadError::MissingMap(name)), sizes)
    }

    /// The maps the reconciler writes, each from `get`, typed.
    fn from_maps(
        mut get: impl FnMut(&'static str) -> Result<Map, LoadError>,
        sizes: MapSizes,
    ) -> Result<Self, LoadError> {
        use map_names::{
            AGENT_STATE, BACKEND_COUNTERS, BACKEND_SLOTS, BACKENDS, REV_NAT, SERVICE_COUNTERS, SERVICES, SOCK_COUNTERS,
            SOURCE_RANGES,
        };
        let err = |name| move |source| LoadError::Map { name, source };
        let (services, backends, rev_nat, source_ranges) =
            (get(SERVICES)?, get(BACKENDS)?, get(REV_NAT)?, get(SOURCE_RANGES)?);
        let (service_counters, backend_counters, agent_state) =
            (get(SERVICE_COUNTERS)?, get(BACKEND_COUNTERS)?, get(AGENT_STATE)?);
        let (sock_counters, backend_slots) = (get(SOCK_COUNTERS)?, get(BACKEND_SLOTS)?);
        let backend_slots: Array<MapData, SlotBlock> = Array::try_from(backend_slots).map_err(err(BACKEND_SLOTS))?;
        let mapped_slots = match MappedSlots::new(aya::maps::IterableMap::map(&backend_slots), backend_slots.len()) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(error = %e, "backend_slots cannot be mapped: writing it a block per syscall");
                None
            }
        };
        Ok(Self {
            services: HashMap::try_from(services).map_err(err(SERVICES))?,
            backend_slots,
            mapped_slots,
            backends: HashMap::try_from(backends).map_err(err(BACKENDS))?,
            rev_nat: HashMap::try_from(rev_nat).map_err(err(REV_NAT))?,
            source_ranges: LpmTrie::try_from(source_ranges).map_err(err(SOURCE_RANGES))?,
            service_counters: PerCpuHashMap::try_from(service_counters).map_err(err(SERVICE_COUNTERS))?,
            backend_counters: PerCpuHashMap::try_from(backend_counters).map_err(err(BACKEND_COUNTERS))?,
            sock_counters: PerCpuHashMap::try_from(sock_counters).map_err(err(SOCK_COUNTERS))?,
            agent_state: HashMap::try_from(agent_state).map_err(err(AGENT_STATE))?,
            sizes,
        })
    }

    /// Opens the maps pinned under `root` (for tests and tools).
    ///
    /// # Errors
    /// When a pin is missing or of the wrong type.
    pub fn open(root: &Path, sizes: MapSizes) -> Result<Self, LoadError> {
        Self::from_maps(|name| open_pinned(root, name), sizes)
    }

    fn delete_counters<V: aya::Pod>(map: &mut PerCpuHashMap<MapData, u32, V>, name: &'static str, id: u32) {
        if let Err(e) = map.remove(&id)
            && !is_not_found(&e)
        {
            tracing::warn!(map = name, id, error = %e, "deleting the counters of a freed id");
        }
    }

    /// Deletes the counter rows of ids `live` has no row for: rows an
    /// old flow's packet re-created in the moment between the programs'
    /// liveness check and the agent's delete, or an earlier agent left.
    /// Returns how many went.
    ///
    /// # Errors
    /// When a counter map cannot be read.
    fn sweep_rows<V: aya::Pod>(
        counters: &mut PerCpuHashMap<MapData, u32, V>,
        name: &'static str,
        live: impl Fn(u32) -> bool,
    ) -> Result<usize, MapError> {
        let dead: Vec<u32> = ids(counters.keys().collect(), name)?.into_iter().filter(|id| !live(*id)).collect();
        for id in &dead {
            Self::delete_counters(counters, name, *id);
        }
        Ok(dead.len())
    }

    fn state_row(&self, name: &str) -> u64 {
        self.agent_state.get(&agent_state::key(name), 0).unwrap_or(0)
    }
}

/// `backend_slots` mapped shared into the agent: the same pages the
/// programs read.
struct MappedSlots {
    at: std::ptr::NonNull<SlotBlock>,
    blocks: u32,
    len: usize,
}

// SAFETY: the mapping belongs to this value alone and is only reached
// through `&self` (reads) and `&mut self` (writes).
unsafe impl Send for MappedSlots {}
// SAFETY: as above; `&self` only reads.
unsafe impl Sync for MappedSlots {}

impl MappedSlots {
    /// Maps the `blocks` blocks of array `map`; fails for a map created
    /// without `BPF_F_MMAPABLE`.
    fn new(map: &MapData, blocks: u32) -> io::Result<Self> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        // SAFETY: sysconf reads a constant of the system.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
        let len = (blocks as usize * std::mem::size_of::<SlotBlock>()).div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of the map's fd, of no more than
        // the map's own (page-rounded) size; nothing else is overlapped.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let at = std::ptr::NonNull::new(at.cast::<SlotBlock>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Self { at, blocks, len })
    }

    /// Block `index` (`None` past the end).
    fn read(&self, index: u32) -> Option<SlotBlock> {
        // SAFETY: in bounds (checked); SlotBlock is plain data, and a block
        // the programs only read cannot be torn by them.
        (index < self.blocks).then(|| unsafe { self.at.as_ptr().add(index as usize).read_volatile() })
    }

    /// Writes `blocks` from block `first` on (`Err` past the end). The
    /// blocks are free ones no frontend row names: no packet reads them
    /// until the row naming them is written, by a syscall after this.
    fn write(&mut self, first: u32, blocks: &[SlotBlock]) -> Result<(), ()> {
        let end = u64::from(first) + blocks.len() as u64;
        if end > u64::from(self.blocks) {
            return Err(());
        }
        for (i, block) in blocks.iter().enumerate() {
            // SAFETY: in bounds (checked above).
            unsafe { self.at.as_ptr().add(first as usize + i).write_volatile(*block) };
        }
        // The table is whole before the frontend row naming it is written
        // (a syscall, itself a full barrier on the architectures the
        // programs run on).
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for MappedSlots {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of that length, unmapped once.
        unsafe { libc::munmap(self.at.as_ptr().cast(), self.len) };
    }
}

/// The ids a dump of map `name` gave (keys gone meanwhile skipped).
fn ids(keys: Vec<Result<u32, aya::maps::MapError>>, name: &'static str) -> Result<BTreeSet<u32>, MapError> {
    keys.into_iter()
        .filter(|r| !r.as_ref().is_err_and(is_not_found))
        .collect::<Result<BTreeSet<u32>, _>>()
        .map_err(|e| MapError::Io { map: name, op: "dump", source: io::Error::other(e) })
}

fn classify(
    map: &'static str,
    op: &'static str,
    capacity: u32,
    flag: &'static str,
    e: aya::maps::MapError,
) -> MapError {
    if let aya::maps::MapError::SyscallError(aya::sys::SyscallError { io_error, .. }) = &e {
        // A full hash map answers E2BIG to an insert of a new key.
        if io_error.raw_os_error() == Some(libc::E2BIG) || io_error.raw_os_error() == Some(libc::ENOSPC) {
            return MapError::Full { map, capacity, flag };
        }
    }
    MapError::Io { map, op, source: io::Error::other(e) }
}

/// Deletes `key`; a row that is already gone is not an error.
fn delete_row<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    key: &K,
) -> Result<(), MapError> {
    match map.remove(key) {
        Err(e) if !is_not_found(&e) => Err(MapError::Io { map: name, op: "delete", source: io::Error::other(e) }),
        _ => Ok(()),
    }
}

impl MapIo for PinnedMaps {
    fn dump(&self) -> Result<MapState, MapError> {
        let services = dump_map(&self.services, map_names::SERVICES)?;
        Ok(MapState {
            tables: match &self.mapped_slots {
                Some(m) => MapState::read_tables(&services, |b| m.read(b)),
                None => MapState::read_tables(&services, |b| self.backend_slots.get(&b, 0).ok()),
            },
            services,
            backends: dump_map(&self.backends, map_names::BACKENDS)?,
            rev_nat: dump_map(&self.rev_nat, map_names::REV_NAT)?,
            source_ranges: {
                let mut rows = std::collections::BTreeSet::new();
                for key in self.source_ranges.keys() {
                    match key {
                        Ok(k) => {
                            rows.insert((k.prefix_len(), k.data()));
                        }
                        Err(e) if is_not_found(&e) => {}
                        Err(e) => {
                            return Err(MapError::Io {
                                map: map_names::SOURCE_RANGES,
                                op: "dump",
                                source: io::Error::other(e),
                            });
                        }
                    }
                }
                rows
            },
            next_ids: NextIds {
                backend: u32::try_from(self.state_row(agent_state::NEXT_BACKEND_ID)).unwrap_or(0),
                rev_nat: u32::try_from(self.state_row(agent_state::NEXT_REV_NAT_ID)).unwrap_or(0),
            },
        })
    }

    fn put_next_ids(&mut self, next: NextIds) -> Result<(), MapError> {
        for (name, id) in [(agent_state::NEXT_BACKEND_ID, next.backend), (agent_state::NEXT_REV_NAT_ID, next.rev_nat)] {
            self.agent_state.insert(agent_state::key(name), u64::from(id), 0).map_err(|e| MapError::Io {
                map: map_names::AGENT_STATE,
                op: "update",
                source: io::Error::other(e),
            })?;
        }
        Ok(())
    }

    fn put_source_range(&mut self, prefix_len: u32, key: &SourceRangeKey) -> Result<(), MapError> {
        self.source_ranges.insert(&LpmKey::new(prefix_len, *key), 1, 0).map_err(|e| {
            classify(map_names::SOURCE_RANGES, "update", service_common::capacity::SOURCE_RANGES, "(fixed size)", e)
        })
    }

    fn del_source_range(&mut self, prefix_len: u32, key: &SourceRangeKey) -> Result<(), MapError> {
        match self.source_ranges.remove(&LpmKey::new(prefix_len, *key)) {
            Err(e) if !is_not_found(&e) => {
                Err(MapError::Io { map: map_names::SOURCE_RANGES, op: "delete", source: io::Error::other(e) })
            }
            _ => Ok(()),
        }
    }

    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapError> {
        self.services
            .insert(key, value, 0)
            .map_err(|e| classify(map_names::SERVICES, "update", self.sizes.services, "--map-size-services", e))
    }

    fn del_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        delete_row(&mut self.services, map_names::SERVICES, key)
    }

    fn put_slot_blocks(&mut self, first: u32, blocks: &[SlotBlock]) -> Result<(), MapError> {
        if let Some(m) = &mut self.mapped_slots {
            return m.write(first, blocks).map_err(|()| MapError::Full {
                map: map_names::BACKEND_SLOTS,
                capacity: m.blocks.saturating_mul(service_common::backend_slots::PER_BLOCK),
                flag: "--map-size-backend-slots",
            });
        }
        for (index, block) in (first..).zip(blocks) {
            self.backend_slots.set(index, block, 0).map_err(|e| {
                classify(map_names::BACKEND_SLOTS, "update", self.slot_block_capacity(), "--map-size-backend-slots", e)
            })?;
        }
        Ok(())
    }

    fn slot_block_capacity(&self) -> u32 {
        self.backend_slots.len()
    }

    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapError> {
        // No counter row: the id's first packet creates it.
        self.backends
            .insert(id, value, 0)
            .map_err(|e| classify(map_names::BACKENDS, "update", self.sizes.backends, "--map-size-backends", e))
    }

    fn del_backend(&mut self, id: u32) -> Result<(), MapError> {
        // The row first: the programs create no counter row for an id
        // without one.
        delete_row(&mut self.backends, map_names::BACKENDS, &id)?;
        Self::delete_counters(&mut self.backend_counters, map_names::BACKEND_COUNTERS, id);
        Ok(())
    }

    fn put_rev_nat(&mut self, id: u32, value: &RevNatValue) -> Result<(), MapError> {
        self.rev_nat
            .insert(id, value, 0)
            .map_err(|e| classify(map_names::REV_NAT, "update", self.sizes.backends, "--map-size-backends", e))
    }

    fn del_rev_nat(&mut self, id: u32) -> Result<(), MapError> {
        delete_row(&mut self.rev_nat, map_names::REV_NAT, &id)?;
        Self::delete_counters(&mut self.service_counters, map_names::SERVICE_COUNTERS, id);
        Self::delete_counters(&mut self.sock_counters, map_names::SOCK_COUNTERS, id);
        Ok(())
    }

    fn sweep_ids(&mut self, live: &MapState) -> Result<usize, MapError> {
        let backend = |id| live.backends.contains_key(&id);
        let rev_nat = |id| live.rev_nat.contains_key(&id);
        Ok(Self::sweep_rows(&mut self.backend_counters, map_names::BACKEND_COUNTERS, backend)?
            + Self::sweep_rows(&mut self.service_counters, map_names::SERVICE_COUNTERS, rev_nat)?
            + Self::sweep_rows(&mut self.sock_counters, map_names::SOCK_COUNTERS, rev_nat)?)
    }
}
