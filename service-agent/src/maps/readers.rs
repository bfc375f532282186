//! Read-only views of the maps the programs write (conntrack, affinity, the
//! counters), for `inspect`, `explain`, `/metrics` and the garbage
//! collector's statistics. [`Readers`] opens each pin once and is then read
//! as often as needed; the `read_*` functions open one map for one read
//! (tests and one-shot tools).

use std::{collections::BTreeMap, path::Path};

use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap};
use service_common::{
    AffinityKey, AffinityValue, BackendValue, Counters, CtKey, CtValue, InterfaceCounterKey, SockCounters,
    SockRevNatKey, SockRevNatValue, SocketLbConfig, map_names, stats,
};

use super::{
    LoadError,
    access::{dump_map, is_not_found, open_hash, open_pinned},
};

/// The per-CPU packet and byte counters of one id space.
type CounterMap = PerCpuHashMap<MapData, u32, Counters>;

/// The maps `inspect` and `/metrics` read, each opened once.
pub struct Readers {
    conntrack: HashMap<MapData, CtKey, CtValue>,
    conntrack_new: HashMap<MapData, CtKey, CtValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    backends: HashMap<MapData, u32, BackendValue>,
    service_counters: CounterMap,
    backend_counters: CounterMap,
    sock_counters: PerCpuHashMap<MapData, u32, SockCounters>,
    sock_rev_nat: HashMap<MapData, SockRevNatKey, SockRevNatValue>,
    socket_lb: Array<MapData, SocketLbConfig>,
    stats: PerCpuArray<MapData, u64>,
    interface_stats: PerCpuHashMap<MapData, InterfaceCounterKey, u64>,
}

impl Readers {
    /// Opens the pins under `root`.
    ///
    /// # Errors
    /// When a pin is missing or of the wrong type.
    pub fn open(root: &Path) -> Result<Self, LoadError> {
        Ok(Self {
            conntrack: open_hash(root, map_names::CONNTRACK)?,
            conntrack_new: open_hash(root, map_names::CONNTRACK_NEW)?,
            affinity: open_hash(root, map_names::AFFINITY)?,
            backends: open_hash(root, map_names::BACKENDS)?,
            service_counters: open_counters(root, map_names::SERVICE_COUNTERS)?,
            backend_counters: open_counters(root, map_names::BACKEND_COUNTERS)?,
            sock_counters: open_per_cpu_hash(root, map_names::SOCK_COUNTERS)?,
            sock_rev_nat: open_hash(root, map_names::SOCK_REV_NAT)?,
            socket_lb: {
                let name = map_names::SOCKET_LB;
                Array::try_from(open_pinned(root, name)?).map_err(|source| LoadError::Map { name, source })?
            },
            stats: open_stats(root)?,
            interface_stats: open_per_cpu_hash(root, map_names::INTERFACE_STATS)?,
        })
    }

    /// The assured flows' entries (`conntrack`).
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn conntrack(&self) -> Result<BTreeMap<CtKey, CtValue>, LoadError> {
        dump(&self.conntrack, map_names::CONNTRACK)
    }

    /// The entries of flows not yet assured (`conntrack_new`).
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn conntrack_new(&self) -> Result<BTreeMap<CtKey, CtValue>, LoadError> {
        dump(&self.conntrack_new, map_names::CONNTRACK_NEW)
    }

    /// The sockets the socket path translated (`sock_rev_nat`): socket
    /// cookie and backend → the Service address shown to the application.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn sock_rev_nat(&self) -> Result<BTreeMap<SockRevNatKey, SockRevNatValue>, LoadError> {
        dump(&self.sock_rev_nat, map_names::SOCK_REV_NAT)
    }

    /// The `socket_lb` row (`--socket-lb` and the node's network namespace
    /// cookie); all zero (off) before an agent wrote it.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn socket_lb(&self) -> Result<SocketLbConfig, LoadError> {
        self.socket_lb.get(&0, 0).map_err(|source| LoadError::Map { name: map_names::SOCKET_LB, source })
    }

    /// The ClientIP affinity entries.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn affinity(&self) -> Result<BTreeMap<AffinityKey, AffinityValue>, LoadError> {
        dump(&self.affinity, map_names::AFFINITY)
    }

    /// Packets and bytes per rev-NAT id (`service_counters`), summed over
    /// CPUs.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn service_counters(&self) -> Result<BTreeMap<u32, Counters>, LoadError> {
        sum_counters(&self.service_counters, map_names::SERVICE_COUNTERS)
    }

    /// connect() and sendmsg() calls translated per frontend (rev-NAT id,
    /// `sock_counters`), summed over CPUs.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn sock_counters(&self) -> Result<BTreeMap<u32, SockCounters>, LoadError> {
        sum_per_cpu(&self.sock_counters, map_names::SOCK_COUNTERS, |a, c| SockCounters {
            connects: a.connects + c.connects,
            sendmsgs: a.sendmsgs + c.sendmsgs,
        })
    }

    /// The `backends` rows of `ids` that have one (one lookup each: for the
    /// ids of counter rows, not a walk of the whole map).
    #[must_use]
    pub fn backends_of(&self, ids: impl Iterator<Item = u32>) -> BTreeMap<u32, BackendValue> {
        ids.filter_map(|id| Some((id, self.backends.get(&id, 0).ok()?))).collect()
    }

    /// Packets and bytes per backend id (`backend_counters`), summed over
    /// CPUs.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn backend_counters(&self) -> Result<BTreeMap<u32, Counters>, LoadError> {
        sum_counters(&self.backend_counters, map_names::BACKEND_COUNTERS)
    }

    /// The verdict and drop counters summed over CPUs, in id order, with
    /// their names.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn stats(&self) -> Result<Vec<(&'static str, u64)>, LoadError> {
        sum_stats(&self.stats)
    }

    /// The counters per ingress interface, summed over CPUs: (ifindex,
    /// counter id) → packets (`interface_stats`; the fast path's counters
    /// are counted in total only).
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn interface_stats(&self) -> Result<BTreeMap<(u32, u32), u64>, LoadError> {
        let name = map_names::INTERFACE_STATS;
        let mut out = BTreeMap::new();
        for row in &self.interface_stats {
            match row {
                Ok((k, per_cpu)) => {
                    out.insert((k.ifindex, k.counter), per_cpu.iter().sum());
                }
                Err(e) if is_not_found(&e) => {}
                Err(source) => return Err(LoadError::Map { name, source }),
            }
        }
        Ok(out)
    }
}

fn dump<K: aya::Pod + Ord, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<BTreeMap<K, V>, LoadError> {
    dump_map(map, name).map_err(|e| LoadError::Map {
        name,
        source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_get_next_key",
            io_error: std::io::Error::other(e.to_string()),
        }),
    })
}

/// A pinned per-CPU hash map (plain or LRU).
fn open_per_cpu_hash<K: aya::Pod, V: aya::Pod>(
    root: &Path,
    name: &'static str,
) -> Result<PerCpuHashMap<MapData, K, V>, LoadError> {
    PerCpuHashMap::try_from(open_pinned(root, name)?).map_err(|source| LoadError::Map { name, source })
}

fn open_counters(root: &Path, name: &'static str) -> Result<CounterMap, LoadError> {
    open_per_cpu_hash(root, name)
}

fn open_stats(root: &Path) -> Result<PerCpuArray<MapData, u64>, LoadError> {
    let name = map_names::STATS;
    PerCpuArray::try_from(open_pinned(root, name)?).map_err(|source| LoadError::Map { name, source })
}

fn sum_counters(map: &CounterMap, name: &'static str) -> Result<BTreeMap<u32, Counters>, LoadError> {
    sum_per_cpu(map, name, |a, c| Counters { packets: a.packets + c.packets, bytes: a.bytes + c.bytes })
}

/// Every row of a per-CPU map keyed by id, its CPUs' values added up.
fn sum_per_cpu<V: aya::Pod + Default>(
    map: &PerCpuHashMap<MapData, u32, V>,
    name: &'static str,
    add: impl Fn(V, &V) -> V,
) -> Result<BTreeMap<u32, V>, LoadError> {
    let mut out = BTreeMap::new();
    for row in map {
        match row {
            Ok((id, per_cpu)) => {
                let sum = per_cpu.iter().fold(V::default(), &add);
                out.insert(id, sum);
            }
            Err(e) if is_not_found(&e) => {}
            Err(source) => return Err(LoadError::Map { name, source }),
        }
    }
    Ok(out)
}

fn sum_stats(map: &PerCpuArray<MapData, u64>) -> Result<Vec<(&'static str, u64)>, LoadError> {
    let name = map_names::STATS;
    let mut out = Vec::new();
    for (id, label) in stats::ALL {
        let values = map.get(&id, 0).map_err(|source| LoadError::Map { name, source })?;
        out.push((label, values.iter().sum()));
    }
    Ok(out)
}

/// The conntrack entries pinned under `root`: the assured flows'
/// (`conntrack`).
///
/// # Errors
/// When the pin is missing or unreadable.
pub fn read_conntrack(root: &Path) -> Result<BTreeMap<CtKey, CtValue>, LoadError> {
    dump(&open_hash(root, map_names::CONNTRACK)?, map_names::CONNTRACK)
}

/// The entries of flows not yet assured (`conntrack_new`).
///
/// # Errors
/// When the pin is missing or unreadable.
pub fn read_conntrack_new(root: &Path) -> Result<BTreeMap<CtKey, CtValue>, LoadError> {
    dump(&open_hash(root, map_names::CONNTRACK_NEW)?, map_names::CONNTRACK_NEW)
}

/// The ClientIP affinity entries pinned under `root`.
///
/// # Errors
/// When the pin is missing or unreadable.
pub fn read_affinity(root: &Path) -> Result<BTreeMap<AffinityKey, AffinityValue>, LoadError> {
    dump(&open_hash(root, map_names::AFFINITY)?, map_names::AFFINITY)
}

/// Packets and bytes per id (rev-NAT id for `service_counters`, backend
/// id for `backend_counters`), summed over CPUs.
///
/// # Errors
/// When the pin is missing or unreadable.
pub fn read_counters(root: &Path, name: &'static str) -> Result<BTreeMap<u32, Counters>, LoadError> {
    sum_counters(&open_counters(root, name)?, name)
}

/// The verdict and drop counters summed over CPUs, in id order, with their
/// names, read from the pinned `stats` map.
///
/// # Errors
/// When the pin is missing or unreadable.
pub fn read_stats(root: &Path) -> Result<Vec<(&'static str, u64)>, LoadError> {
    sum_stats(&open_stats(root)?)
}
