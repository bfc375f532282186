//! Typed access to pinned maps: opening one by its pin, walking and dumping
//! it, the kernel's monotonic clock its timestamps use, and the raw `bpf(2)`
//! element calls for what aya's typed maps do not offer.

use std::{io, path::Path};

use aya::maps::{HashMap, Map, MapData};

use super::{LoadError, MapError};

pub(crate) fn open_pinned(root: &Path, name: &'static str) -> Result<Map, LoadError> {
    let data = MapData::from_pin(root.join(name)).map_err(|source| LoadError::Map { name, source })?;
    Map::from_map_data(data).map_err(|source| LoadError::Map { name, source })
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

/// Every row of `map`, sorted; rows deleted during the walk are skipped.
pub(crate) fn dump_map<K: aya::Pod + Ord, V: aya::Pod>(
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

/// `CLOCK_MONOTONIC` in nanoseconds: the clock `bpf_ktime_get_ns()` reads,
/// to turn the programs' timestamps into ages.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
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
pub(crate) mod elem {
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
