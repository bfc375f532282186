//! An in-memory [`MapIo`] for tests (built only for them): the same rows
//! the kernel maps would hold, the same capacity errors, and a log of every
//! operation so tests can check the order of writes.

use service_common::{BackendValue, RevNatValue, ServiceKey, ServiceValue, SourceRangeKey};

use super::{MapError, MapIo, MapState, NextIds};

/// One map operation, as the fake saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutService(ServiceKey, ServiceValue),
    DelService(ServiceKey),
    PutBackend(u32),
    DelBackend(u32),
    PutRevNat(u32),
    DelRevNat(u32),
}

#[derive(Debug, Default)]
pub struct FakeMaps {
    pub state: MapState,
    pub ops: Vec<Op>,
    /// Capacity of the services map (`None`: unlimited).
    pub services_capacity: Option<usize>,
}

impl FakeMaps {
    #[must_use]
    pub fn with_services_capacity(capacity: usize) -> Self {
        Self { services_capacity: Some(capacity), ..Self::default() }
    }
}

impl MapIo for FakeMaps {
    fn dump(&self) -> Result<MapState, MapError> {
        Ok(self.state.clone())
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
        Ok(())
    }

    fn del_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        self.ops.push(Op::DelService(*key));
        self.state.services.remove(key);
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
