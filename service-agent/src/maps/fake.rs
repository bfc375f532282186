//! An in-memory [`MapIo`] for tests (built only for them): the same rows
//! the kernel maps would hold, the same capacity errors, and a log of every
//! operation so tests can check the order of writes.

use std::collections::BTreeMap;

use service_common::{BackendValue, RevNatValue, ServiceKey, ServiceValue, SlotBlock, SourceRangeKey};

use super::{MapError, MapIo, MapState, NextIds};

/// One map operation, as the fake saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutService(ServiceKey, ServiceValue),
    DelService(ServiceKey),
    /// Blocks written from the first, how many.
    PutSlotBlocks(u32, usize),
    PutBackend(u32),
    DelBackend(u32),
    PutRevNat(u32),
    DelRevNat(u32),
}

#[derive(Debug, Default)]
pub struct FakeMaps {
    /// The rows; `state.tables` is read out of `blocks` after every write,
    /// as a dump of the kernel maps would.
    pub state: MapState,
    /// `backend_slots`, by block (absent: zeroed).
    pub blocks: BTreeMap<u32, SlotBlock>,
    /// Blocks in `backend_slots` (`None`: [`DEFAULT_SLOT_BLOCKS`]).
    pub slot_blocks: Option<u32>,
    pub ops: Vec<Op>,
    /// Capacity of the services map (`None`: unlimited).
    pub services_capacity: Option<usize>,
}

/// The fake's `backend_slots` size unless a test sets one.
pub const DEFAULT_SLOT_BLOCKS: u32 = 1 << 20;

impl FakeMaps {
    #[must_use]
    pub fn with_services_capacity(capacity: usize) -> Self {
        Self { services_capacity: Some(capacity), ..Self::default() }
    }
}

impl FakeMaps {
    /// Reads `state.tables` out of the blocks the frontend rows name (as
    /// a dump would; tests call it after changing rows or the size).
    pub fn refresh_tables(&mut self) {
        let capacity = self.slot_block_capacity();
        let blocks = &self.blocks;
        self.state.tables = MapState::read_tables(&self.state.services, |b| {
            (b < capacity).then(|| blocks.get(&b).copied().unwrap_or_else(bytemuck::Zeroable::zeroed))
        });
    }
}

impl MapIo for FakeMaps {
    fn dump(&self) -> Result<MapState, MapError> {
        Ok(self.state.clone())
    }

    fn put_slot_blocks(&mut self, first: u32, blocks: &[SlotBlock]) -> Result<(), MapError> {
        let end = u64::from(first) + blocks.len() as u64;
        if end > u64::from(self.slot_block_capacity()) {
            return Err(MapError::Io {
                map: service_common::map_names::BACKEND_SLOTS,
                op: "update",
                source: std::io::Error::from_raw_os_error(libc::E2BIG),
            });
        }
        self.ops.push(Op::PutSlotBlocks(first, blocks.len()));
        for (b, block) in (first..).zip(blocks) {
            self.blocks.insert(b, *block);
        }
        self.refresh_tables();
        Ok(())
    }

    fn slot_block_capacity(&self) -> u32 {
        self.slot_blocks.unwrap_or(DEFAULT_SLOT_BLOCKS)
    }

    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapError> {
        if let Some(cap) = self.services_capacity
            && !self.state.services.contains_key(key)
            && self.state.services.len() >= cap
        {
            return Err(MapError::Full {
                map: service_common::map_names::SERVICES,
                capacity: u32::try_from(cap).unwrap_or(u32::MAX),
                flag: "--map-size-services",
            });
        }
        self.ops.push(Op::PutService(*key, *value));
        self.state.services.insert(*key, *value);
        self.refresh_tables();
        Ok(())
    }

    fn del_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        self.ops.push(Op::DelService(*key));
        self.state.services.remove(key);
        self.refresh_tables();
        Ok(())
    }

    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapError> {
        self.ops.push(Op::PutBackend(id));
        self.state.backends.insert(id, *value);
        Ok(())
    }

    fn del_backend(&mut self, id: u32) -> Result<(), MapError> {
        self.ops.push(Op::DelBackend(id));
        self.state.backends.remove(&id);
        Ok(())
    }

    fn put_rev_nat(&mut self, id: u32, value: &RevNatValue) -> Result<(), MapError> {
        self.ops.push(Op::PutRevNat(id));
        self.state.rev_nat.insert(id, *value);
        Ok(())
    }

    fn del_rev_nat(&mut self, id: u32) -> Result<(), MapError> {
        self.ops.push(Op::DelRevNat(id));
        self.state.rev_nat.remove(&id);
        Ok(())
    }

    fn put_source_range(&mut self, prefix_len: u32, key: &SourceRangeKey) -> Result<(), MapError> {
        self.state.source_ranges.insert((prefix_len, *key));
        Ok(())
    }

    fn del_source_range(&mut self, prefix_len: u32, key: &SourceRangeKey) -> Result<(), MapError> {
        self.state.source_ranges.remove(&(prefix_len, *key));
        Ok(())
    }

    fn put_next_ids(&mut self, next: NextIds) -> Result<(), MapError> {
        self.state.next_ids = next;
        Ok(())
    }
}
