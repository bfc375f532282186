//! The pinned BPF maps: loading the eBPF object with its maps pinned under
//! `--bpffs-root` (migrating pins of another layout or size, see
//! [`layout`]), the [`MapIo`] implementation the reconciler writes
//! through, reading the per-CPU counters, and removing the pins.

pub mod layout;

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues, lpm_trie::Key as LpmKey},
};
use service_common::{
    AffinityKey, AffinityValue, BackendValue, Counters, CtKey, CtValue, RevNatValue, ServiceKey, ServiceValue,
    SourceRangeKey, agent_state, map_names, stats,
};

use crate::reconciler::{MapError, MapIo, MapState, NextIds};

/// The eBPF object built by build.rs (empty when the toolchain was missing).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/service-ebpf"));

/// `BPF_NOEXIST`: an update that only creates.
const BPF_NOEXIST: u64 = 1;

/// `statfs(2)` magic of the BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Capacities of the maps (the `--map-size-*` flags).
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    /// Assured flows (`conntrack`).
    pub conntrack: u32,
    /// Flows not yet assured (`conntrack_new`).
    pub conntrack_new: u32,
    /// Datagrams whose later fragments are awaited (`fragments`).
    pub fragments: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        use service_common::capacity;
        Self {
            services: capacity::SERVICES,
            backends: capacity::BACKENDS,
            conntrack: capacity::CONNTRACK,
            conntrack_new: capacity::CONNTRACK_NEW,
            fragments: capacity::FRAGMENTS,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "this service-agent was built without its eBPF object (nightly rust-src or bpf-linker was missing at build time): run `cargo xtask setup` and rebuild"
    )]
    NoObject,
    #[error("--bpffs-root {path}: {source}")]
    BpffsRoot { path: PathBuf, source: io::Error },
    #[error("--bpffs-root {0} is not on a BPF filesystem: mount one first (`mount -t bpf bpf /sys/fs/bpf`)")]
    NotBpffs(PathBuf),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("parsing the eBPF object: {0}")]
    Object(String),
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
}

fn is_bpffs(path: &Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path and `buf` a properly sized,
    // writable statfs struct that outlives the call.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    if unsafe { libc::statfs(c.as_ptr(), &raw mut buf) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[expect(clippy::useless_conversion, reason = "f_type's width differs between libc targets")]
    Ok(i64::from(buf.f_type) == BPF_FS_MAGIC)
}

/// Creates `root` (and parents) and checks it lives on a bpffs. When the
/// conventional `/sys/fs/bpf` is not mounted yet, mounts it, as Cilium does.
///
/// # Errors
/// When the directory cannot be created or is not on a bpffs.
pub fn prepare_bpffs_root(root: &Path) -> Result<(), LoadError> {
    let sys_fs_bpf = Path::new("/sys/fs/bpf");
    if root.starts_with(sys_fs_bpf) && sys_fs_bpf.is_dir() && !is_bpffs(sys_fs_bpf).unwrap_or(true) {
        tracing::info!("mounting a BPF filesystem on /sys/fs/bpf");
        let ok = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(LoadError::NotBpffs(root.to_owned()));
        }
    }
    std::fs::create_dir_all(root).map_err(|source| LoadError::BpffsRoot { path: root.to_owned(), source })?;
    match is_bpffs(root) {
        Ok(true) => Ok(()),
        Ok(false) => Err(LoadError::NotBpffs(root.to_owned())),
        Err(source) => Err(LoadError::BpffsRoot { path: root.to_owned(), source }),
    }
}

/// Loads the eBPF object; its maps are pinned under `root` by name, or
/// reused when an earlier agent pinned them (so flows survive a restart).
///
/// # Errors
/// When the object is missing, bpffs is unusable or the kernel refuses it.
pub fn load(root: &Path, sizes: MapSizes) -> Result<Ebpf, LoadError> {
    load_migrating(root, sizes).map(|(ebpf, _)| ebpf)
}

impl MapSizes {
    /// The capacity the `--map-size-*` flags set for map `name` (`None`:
    /// the object's).
    #[must_use]
    pub fn of(&self, name: &str) -> Option<u32> {
        match name {
            map_names::SERVICES => Some(self.services),
            map_names::BACKENDS | map_names::REV_NAT => Some(self.backends),
            map_names::CONNTRACK => Some(self.conntrack),
            map_names::CONNTRACK_NEW => Some(self.conntrack_new),
            map_names::FRAGMENTS => Some(self.fragments),
            _ => None,
        }
    }
}

/// [`load`], also returning the pinned maps it replaced because their
/// layout or capacity differed (each logged).
///
/// # Errors
/// As [`load`].
pub fn load_migrating(root: &Path, sizes: MapSizes) -> Result<(Ebpf, Vec<layout::Migration>), LoadError> {
    if OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    prepare_bpffs_root(root)?;
    let wanted = layout::wanted(OBJECT, |name| sizes.of(name))?;
    let mut migrations = layout::prepare(root, &wanted)?;
    // The maps are BTF-defined (so `bpftool map dump` prints fields by
    // name) and carry no pinning attribute: each gets its pin path here,
    // where aya reuses an existing pin or creates and pins the map.
    let paths: Vec<(&str, PathBuf)> = map_names::ALL.iter().map(|n| (*n, root.join(n))).collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    for name in map_names::ALL {
        if let Some(size) = sizes.of(name) {
            loader.map_max_entries(name, size);
        }
    }
    let ebpf = loader.load(OBJECT)?;
    layout::finish(root, &mut migrations)?;
    for m in &migrations {
        tracing::warn!(
            map = m.name,
            change = ?m.change,
            from = ?m.from,
            to = ?m.to,
            rows_copied = m.rows_copied,
            rows_dropped = m.rows_dropped,
            "a pinned map of another layout or capacity was replaced"
        );
    }
    Ok((ebpf, migrations))
}

/// Removes the pins `load` made under `root`, and `root` if it is then
/// empty. Absent pins are not an error.
///
/// # Errors
/// When a pin exists but cannot be removed.
pub fn remove_pins(root: &Path) -> io::Result<()> {
    layout::remove_migrating_pins(root)?;
    for name in map_names::ALL {
        match std::fs::remove_file(root.join(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    match std::fs::remove_dir(root) {
        Err(e) if e.kind() != io::ErrorKind::NotFound && e.raw_os_error() != Some(libc::ENOTEMPTY) => Err(e),
        _ => Ok(()),
    }
}

/// The maps the reconciler writes: the frontends, backends, rev-NAT and
/// source-range rows, the counters created and deleted with the backend
/// and rev-NAT rows of the same id, and the id counters in `agent_state`.
pub struct PinnedMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, BackendValue>,
    rev_nat: HashMap<MapData, u32, RevNatValue>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    service_counters: PerCpuHashMap<MapData, u32, Counters>,
    backend_counters: PerCpuHashMap<MapData, u32, Counters>,
    agent_state: HashMap<MapData, agent_state::Key, u64>,
    sizes: MapSizes,
}

fn open_pinned(root: &Path, name: &'static str) -> Result<Map, LoadError> {
    let data = MapData::from_pin(root.join(name)).map_err(|source| LoadError::Map { name, source })?;
    Map::from_map_data(data).map_err(|source| LoadError::Map { name, source })
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
        use map_names::{AGENT_STATE, BACKEND_COUNTERS, BACKENDS, REV_NAT, SERVICE_COUNTERS, SERVICES, SOURCE_RANGES};
        let err = |name| move |source| LoadError::Map { name, source };
        let (services, backends, rev_nat, source_ranges) =
            (get(SERVICES)?, get(BACKENDS)?, get(REV_NAT)?, get(SOURCE_RANGES)?);
        let (service_counters, backend_counters, agent_state) =
            (get(SERVICE_COUNTERS)?, get(BACKEND_COUNTERS)?, get(AGENT_STATE)?);
        Ok(Self {
            services: HashMap::try_from(services).map_err(err(SERVICES))?,
            backends: HashMap::try_from(backends).map_err(err(BACKENDS))?,
            rev_nat: HashMap::try_from(rev_nat).map_err(err(REV_NAT))?,
            source_ranges: LpmTrie::try_from(source_ranges).map_err(err(SOURCE_RANGES))?,
            service_counters: PerCpuHashMap::try_from(service_counters).map_err(err(SERVICE_COUNTERS))?,
            backend_counters: PerCpuHashMap::try_from(backend_counters).map_err(err(BACKEND_COUNTERS))?,
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

    /// Creates the zeroed counters of a new id (a row already there, e.g.
    /// adopted from an earlier agent, is kept).
    fn create_counters(
        map: &mut PerCpuHashMap<MapData, u32, Counters>,
        name: &'static str,
        id: u32,
    ) -> Result<(), MapError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| MapError::Io { map: name, op: "nr_cpus", source: e })?;
        let zero = PerCpuValues::try_from(vec![Counters::default(); cpus]).map_err(|e| MapError::Io {
            map: name,
            op: "update",
            source: e,
        })?;
        match map.insert(id, zero, BPF_NOEXIST) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(aya::sys::SyscallError { io_error, .. }))
                if io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(())
            }
            // Counters are not worth failing a row for: a missing row only
            // means the id's packets are not counted.
            Err(e) => {
                tracing::warn!(map = name, id, error = %e, "creating the counters of a new id");
                Ok(())
            }
        }
    }

    fn delete_counters(map: &mut PerCpuHashMap<MapData, u32, Counters>, name: &'static str, id: u32) {
        if let Err(e) = map.remove(&id)
            && !is_not_found(&e)
        {
            tracing::warn!(map = name, id, error = %e, "deleting the counters of a freed id");
        }
    }

    /// Gives the counters the lifecycle of their rows for whatever an
    /// earlier agent left, once at start (from then on they are created and
    /// deleted with the backend and rev-NAT rows): a counter row for every
    /// id in `backends` / `rev_nat`, none for any other id (older programs
    /// created rows on first use, and kept those of freed ids alive).
    /// Returns (created, deleted).
    ///
    /// # Errors
    /// When a map cannot be read.
    pub fn sync_counters(&mut self) -> Result<(usize, usize), MapError> {
        let keys = |ids: Vec<Result<u32, aya::maps::MapError>>, name| {
            ids.into_iter()
                .filter(|r| !r.as_ref().is_err_and(is_not_found))
                .collect::<Result<std::collections::BTreeSet<u32>, _>>()
                .map_err(|e| MapError::Io { map: name, op: "dump", source: io::Error::other(e) })
        };
        let (mut created, mut deleted) = (0, 0);
        for (rows, counters, name) in [
            (
                keys(self.backends.keys().collect(), map_names::BACKENDS)?,
                &mut self.backend_counters,
                map_names::BACKEND_COUNTERS,
            ),
            (
                keys(self.rev_nat.keys().collect(), map_names::REV_NAT)?,
                &mut self.service_counters,
                map_names::SERVICE_COUNTERS,
            ),
        ] {
            let existing = keys(counters.keys().collect(), name)?;
            for id in rows.difference(&existing) {
                Self::create_counters(counters, name, *id)?;
                created += 1;
            }
            for id in existing.difference(&rows) {
                Self::delete_counters(counters, name, *id);
                deleted += 1;
            }
        }
        Ok((created, deleted))
    }

    fn state_row(&self, name: &str) -> u64 {
        self.agent_state.get(&agent_state::key(name), 0).unwrap_or(0)
    }
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

pub(crate) fn is_not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(aya::sys::SyscallError { io_error, .. }) => {
            io_error.raw_os_error() == Some(libc::ENOENT)
        }
        _ => false,
    }
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

fn dump_map<K: aya::Pod + Ord, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<std::collections::BTreeMap<K, V>, MapError> {
    let mut out = std::collections::BTreeMap::new();
    for row in map {
        match row {
            Ok((k, v)) => {
                out.insert(k, v);
            }
            // A row deleted while iterating.
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(MapError::Io { map: name, op: "dump", source: io::Error::other(e) }),
        }
    }
    Ok(out)
}

impl MapIo for PinnedMaps {
    fn dump(&self) -> Result<MapState, MapError> {
        Ok(MapState {
            services: dump_map(&self.services, map_names::SERVICES)?,
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

    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapError> {
        // The counters first: the row's first packet is counted.
        Self::create_counters(&mut self.backend_counters, map_names::BACKEND_COUNTERS, id)?;
        self.backends
            .insert(id, value, 0)
            .map_err(|e| classify(map_names::BACKENDS, "update", self.sizes.backends, "--map-size-backends", e))
    }

    fn del_backend(&mut self, id: u32) -> Result<(), MapError> {
        delete_row(&mut self.backends, map_names::BACKENDS, &id)?;
        Self::delete_counters(&mut self.backend_counters, map_names::BACKEND_COUNTERS, id);
        Ok(())
    }

    fn put_rev_nat(&mut self, id: u32, value: &RevNatValue) -> Result<(), MapError> {
        Self::create_counters(&mut self.service_counters, map_names::SERVICE_COUNTERS, id)?;
        self.rev_nat
            .insert(id, value, 0)
            .map_err(|e| classify(map_names::REV_NAT, "update", self.sizes.backends, "--map-size-backends", e))
    }

    fn del_rev_nat(&mut self, id: u32) -> Result<(), MapError> {
        delete_row(&mut self.rev_nat, map_names::REV_NAT, &id)?;
        Self::delete_counters(&mut self.service_counters, map_names::SERVICE_COUNTERS, id);
        Ok(())
    }
}

/// A pinned hash-like map (HASH or LRU_HASH; the syscalls are the same).
pub(crate) fn open_hash<K: aya::Pod, V: aya::Pod>(
    root: &Path,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, LoadError> {
    match open_pinned(root, name)? {
        Map::HashMap(data) | Map::LruHashMap(data) => {
            HashMap::try_from(Map::HashMap(data)).map_err(|source| LoadError::Map { name, source })
        }
        _ => Err(LoadError::MissingMap(name)),
    }
}

/// Every row of a pinned hash-like map (HASH or LRU_HASH).
fn read_pinned<K: aya::Pod + Ord, V: aya::Pod>(
    root: &Path,
    name: &'static str,
) -> Result<std::collections::BTreeMap<K, V>, LoadError> {
    let map: HashMap<MapData, K, V> = open_hash(root, name)?;
    dump_map(&map, name).map_err(|e| LoadError::Map {
        name,
        source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_get_next_key",
            io_error: io::Error::other(e.to_string()),
        }),
    })
}

/// The conntrack entries pinned under `root`: the assured flows'
/// (`conntrack`).
///
/// # Errors
/// When the pin is missing or unreadable.
pub fn read_conntrack(root: &Path) -> Result<std::collections::BTreeMap<CtKey, CtValue>, LoadError> {
    read_pinned(root, map_names::CONNTRACK)
}

/// The entries of flows not yet assured (`conntrack_new`).
///
/// # Errors
/// When the pin is missing or unreadable.
pub fn read_conntrack_new(root: &Path) -> Result<std::collections::BTreeMap<CtKey, CtValue>, LoadError> {
    read_pinned(root, map_names::CONNTRACK_NEW)
}

/// The ClientIP affinity entries pinned under `root`.
///
/// # Errors
/// When the pin is missing or unreadable.
pub fn read_affinity(root: &Path) -> Result<std::collections::BTreeMap<AffinityKey, AffinityValue>, LoadError> {
    read_pinned(root, map_names::AFFINITY)
}

fn counters_map(
    root: &Path,
    name: &'static str,
) -> Result<aya::maps::PerCpuHashMap<MapData, u32, service_common::Counters>, LoadError> {
    aya::maps::PerCpuHashMap::try_from(open_pinned(root, name)?).map_err(|source| LoadError::Map { name, source })
}

/// Packets and bytes per id (rev-NAT id for `service_counters`, backend
/// id for `backend_counters`), summed over CPUs.
///
/// # Errors
/// When the pin is missing or unreadable.
pub fn read_counters(
    root: &Path,
    name: &'static str,
) -> Result<std::collections::BTreeMap<u32, service_common::Counters>, LoadError> {
    let map = counters_map(root, name)?;
    let mut out = std::collections::BTreeMap::new();
    for row in &map {
        match row {
            Ok((id, per_cpu)) => {
                let sum = per_cpu.iter().fold(service_common::Counters::default(), |a, c| service_common::Counters {
                    packets: a.packets + c.packets,
                    bytes: a.bytes + c.bytes,
                });
                out.insert(id, sum);
            }
            Err(e) if is_not_found(&e) => {}
            Err(source) => return Err(LoadError::Map { name, source }),
        }
    }
    Ok(out)
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock `bpf_ktime_get_ns()` reads,
/// to turn the programs' timestamps into ages.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// The verdict and drop counters summed over CPUs, in id order, with their
/// names, read from the pinned `stats` map.
///
/// # Errors
/// When the pin is missing or unreadable.
pub fn read_stats(root: &Path) -> Result<Vec<(&'static str, u64)>, LoadError> {
    let name = map_names::STATS;
    let map: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(open_pinned(root, name)?).map_err(|source| LoadError::Map { name, source })?;
    let mut out = Vec::new();
    for (id, label) in stats::ALL {
        let values = map.get(&id, 0).map_err(|source| LoadError::Map { name, source })?;
        out.push((label, values.iter().sum()));
    }
    Ok(out)
}

/// Makes the pinned `snat_addrs` map hold exactly `rows` (ifindex, or
/// `service_common::SNAT_HAIRPIN`, → the IPv4 address SNAT writes).
///
/// # Errors
/// When the pin is missing or a row cannot be written.
pub fn write_snat_addrs(
    root: &Path,
    rows: &std::collections::BTreeMap<u32, std::net::Ipv4Addr>,
) -> Result<(), LoadError> {
    let name = map_names::SNAT_ADDRS;
    let mut map: HashMap<MapData, u32, service_common::Addr> = open_hash(root, name)?;
    let stale: Vec<u32> = map.keys().filter_map(Result::ok).filter(|k| !rows.contains_key(k)).collect();
    for key in stale {
        map.remove(&key).map_err(|source| LoadError::Map { name, source })?;
    }
    for (key, addr) in rows {
        let value = service_common::addr_v4(addr.octets());
        if map.get(key, 0).ok() != Some(value) {
            map.insert(key, value, 0).map_err(|source| LoadError::Map { name, source })?;
        }
    }
    Ok(())
}

/// Deletes the UDP conntrack entries (both directions, in `conntrack` and
/// `conntrack_new`) whose (frontend, backend) pair is no longer live, so
/// clients of a removed backend move to a live one with their next
/// datagram, as kube-proxy's conntrack cleanup does. TCP entries are left
/// alone: a removed backend that still runs finishes its connections.
/// Returns how many entries were deleted.
///
/// # Errors
/// When a pin is missing or unreadable.
pub fn flush_udp_conntrack(root: &Path, live: impl Fn(u32, u32) -> bool) -> Result<usize, LoadError> {
    let mut removed = 0;
    for name in [map_names::CONNTRACK, map_names::CONNTRACK_NEW] {
        let mut map: HashMap<MapData, CtKey, CtValue> = open_hash(root, name)?;
        let stale: Vec<CtKey> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| k.proto == service_common::PROTO_UDP && !live(v.rev_nat_id, v.backend_id))
            .map(|(k, _)| k)
            .collect();
        for key in stale {
            // Read again just before the delete: a client reusing the
            // tuple may have replaced the stale flow with a new one (of a
            // live backend) since the walk saw it.
            if map.get(&key, 0).is_ok_and(|v| live(v.rev_nat_id, v.backend_id)) {
                continue;
            }
            match map.remove(&key) {
                Ok(()) => removed += 1,
                Err(e) if is_not_found(&e) => {}
                Err(source) => return Err(LoadError::Map { name, source }),
            }
        }
    }
    Ok(removed)
}

/// The key after `key` in a pinned map (`None`: the first key), as the
/// kernel's `BPF_MAP_GET_NEXT_KEY` walks it; `Ok(None)` at the end. aya
/// only offers a walk that borrows the map for its whole length, and the
/// garbage collector resumes its walk from a saved key at every tick.
/// When `key` is no longer in the map the kernel answers with the first
/// key (the walk starts over).
///
/// # Errors
/// When the kernel refuses the call.
pub fn next_key<K: aya::Pod, V: aya::Pod>(map: &HashMap<MapData, K, V>, key: Option<&K>) -> io::Result<Option<K>> {
    use aya::maps::IterableMap as _;
    let mut next = std::mem::MaybeUninit::<K>::uninit();
    let from = key.map_or(std::ptr::null(), |k| std::ptr::from_ref(k).cast::<u8>());
    // SAFETY: `from` (when set) points at a live K and `next` has room for
    // one K, the map's key size (aya checked it when typing `map`).
    match unsafe { elem::call(elem::GET_NEXT_KEY, elem::fd_of(map.map())?, from, next.as_mut_ptr().cast(), 0) } {
        // SAFETY: the kernel wrote a whole key on success; K is Pod.
        Ok(()) => Ok(Some(unsafe { next.assume_init() })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The `bpf(2)` element commands on raw bytes, for what aya's typed maps
/// do not offer: a walk resumed from a saved key, and copying the rows of
/// a map whose types are only known by their sizes.
mod elem {
    use std::{
        io,
        os::fd::{AsFd as _, AsRawFd as _},
    };

    use aya::maps::MapData;

    pub const LOOKUP: libc::c_long = 1;
    pub const UPDATE: libc::c_long = 2;
    pub const GET_NEXT_KEY: libc::c_long = 4;

    /// The `BPF_MAP_*_ELEM` / `GET_NEXT_KEY` part of `union bpf_attr`.
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        /// The value (lookup, update) or the next key (get next key).
        value: u64,
        flags: u64,
    }

    /// Runs element command `cmd` on map `fd`.
    ///
    /// # Safety
    /// `key` is null (get next key: the first) or points at the map's key
    /// size of readable bytes; `value` points at room for the map's key
    /// size (get next key) or value size (per-CPU maps: one 8-byte-aligned
    /// slot per possible CPU).
    pub unsafe fn call(cmd: libc::c_long, fd: u32, key: *const u8, value: *mut u8, flags: u64) -> io::Result<()> {
        let attr = Attr { map_fd: fd, _pad: 0, key: key as u64, value: value as u64, flags };
        // SAFETY: `attr` is a valid `bpf_attr` prefix of the size passed;
        // the pointers are as the caller promised.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, &raw const attr, std::mem::size_of::<Attr>()) };
        if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }

    pub fn fd_of(map: &MapData) -> io::Result<u32> {
        u32::try_from(map.fd().as_fd().as_raw_fd()).map_err(io::Error::other)
    }
}
