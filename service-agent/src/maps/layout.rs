//! Pinned maps across agent versions and flags.
//!
//! The maps outlive the agent (pinned under `--bpffs-root`), so a new agent
//! may find pins made by an older one, of another layout (a value struct
//! that grew, as `CtValue` did from 40 to 56 bytes), or of another capacity
//! (a `--map-size-*` flag changed). Reusing such a pin would have the
//! verifier reject the new programs (a crash loop) or, for a same-size
//! change of meaning, have them read garbage; ignoring the flag would leave
//! the old capacity in place while the metrics report the new one.
//!
//! So before the object is loaded each pin is compared with the map the
//! object wants — type, key size, value size, capacity, and the layout
//! version recorded in `agent_state` (`service_common::layout`). A pin that
//! differs is moved aside (`migrating-<name>`; bpffs refuses names with a
//! dot); the load then creates and
//! pins a new map; [`finish`] copies the rows over when the key and value
//! layouts are unchanged (a new capacity: nothing is lost), or leaves the
//! new map empty when they changed (the agent refills its own maps at its
//! first sync; conntrack flows are picked up again by their next packet as
//! new flows, which the Maglev table sends to the same backend unless the
//! backend set changed meanwhile), then removes the old pin. The old map
//! lives on for the old programs still attached until the new ones replace
//! them. A migration interrupted by a crash is resumed by the next start.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapInfo};
use service_common::{agent_state, layout, map_names};

use super::{LoadError, access::elem};

/// What a map is, as far as a pin's compatibility goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// `enum bpf_map_type`.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// `BPF_F_*` creation flags (e.g. `BPF_F_NO_PREALLOC`): another value
    /// is a new map, its rows copied when the layout is the same.
    pub map_flags: u32,
    /// `service_common::layout` version.
    pub version: u32,
}

/// Why a pinned map was replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Same key and value layout, another capacity: rows copied.
    Resized,
    /// Another type, key, value or layout version: the new map starts empty.
    Recreated,
}

/// One pinned map replaced by a new one.
#[derive(Clone, Debug)]
pub struct Migration {
    pub name: &'static str,
    pub change: Change,
    pub from: Shape,
    pub to: Shape,
    /// Where the old map's pin was moved.
    old_pin: PathBuf,
    /// Rows copied ([`Change::Resized`]), after [`finish`].
    pub rows_copied: usize,
    /// Rows that did not fit a smaller capacity.
    pub rows_dropped: usize,
}

/// `enum bpf_map_type` values used here.
mod map_type {
    pub const PERCPU_HASH: u32 = 5;
    pub const PERCPU_ARRAY: u32 = 6;
}

/// Where a replaced map's pin waits for its rows to be copied.
#[must_use]
pub fn migrating_pin(root: &Path, name: &str) -> PathBuf {
    root.join(format!("migrating-{name}"))
}

/// The layout versions recorded in a pinned `agent_state` (1 for every map
/// without a row: pins of agents from before the versions were recorded).
fn recorded_versions(root: &Path) -> impl Fn(&str) -> u32 {
    let rows: Vec<(String, u32)> = (|| {
        let map: aya::maps::HashMap<MapData, agent_state::Key, u64> = aya::maps::HashMap::try_from(
            aya::maps::Map::HashMap(MapData::from_pin(root.join(map_names::AGENT_STATE)).ok()?),
        )
        .ok()?;
        Some(
            map.iter()
                .filter_map(Result::ok)
                .filter_map(|(k, v)| {
                    let name = std::str::from_utf8(&k).ok()?.trim_end_matches('\0');
                    Some((name.strip_prefix(agent_state::LAYOUT_PREFIX)?.to_owned(), u32::try_from(v).ok()?))
                })
                .collect(),
        )
    })()
    .unwrap_or_default();
    move |name| rows.iter().find(|(n, _)| n == name).map_or(1, |(_, v)| *v)
}

fn pinned_shape(pin: &Path, version: u32) -> io::Result<Shape> {
    let info = MapInfo::from_pin(pin).map_err(io::Error::other)?;
    let map_type = info.map_type().map_or(u32::MAX, |t| t as u32);
    Ok(Shape {
        map_type,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        map_flags: info.map_flags(),
        version,
    })
}

/// The shape of each map the object defines, with the capacities `sizes`
/// sets (as the loader will create them).
///
/// # Errors
/// When the object cannot be parsed.
pub fn wanted(object: &[u8], capacity: impl Fn(&str) -> Option<u32>) -> Result<Vec<(&'static str, Shape)>, LoadError> {
    let obj = aya_obj::Object::parse(object).map_err(|e| LoadError::Object(e.to_string()))?;
    let mut out = Vec::new();
    for name in map_names::ALL {
        let map = obj.maps.get(name).ok_or(LoadError::MissingMap(name))?;
        out.push((
            name,
            Shape {
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries: capacity(name).unwrap_or_else(|| map.max_entries()),
                map_flags: map.map_flags(),
                version: layout::version(name),
            },
        ));
    }
    Ok(out)
}

/// Moves aside every pin under `root` that differs from `wanted`, so the
/// loader creates a new map in its place. Returns the migrations to
/// [`finish`] once the object is loaded.
///
/// # Errors
/// When a pin cannot be inspected or moved.
pub fn prepare(root: &Path, wanted: &[(&'static str, Shape)]) -> Result<Vec<Migration>, LoadError> {
    let version = recorded_versions(root);
    let mut out = Vec::new();
    for (name, to) in wanted {
        let (pin, old_pin) = (root.join(name), migrating_pin(root, name));
        let io_err = |source| LoadError::BpffsRoot { path: root.join(name), source };
        if old_pin.exists() && !pin.exists() {
            // Interrupted before the load: start over from the old pin.
            std::fs::rename(&old_pin, &pin).map_err(io_err)?;
        }
        let from = if old_pin.exists() {
            // Interrupted after the load: copy again (the copy only adds).
            pinned_shape(&old_pin, version(name)).map_err(io_err)?
        } else if pin.exists() {
            let from = pinned_shape(&pin, version(name)).map_err(io_err)?;
            if from == *to {
                continue;
            }
            std::fs::rename(&pin, &old_pin).map_err(io_err)?;
            from
        } else {
            continue;
        };
        out.push(Migration {
            name,
            change: change(&from, to),
            from,
            to: *to,
            old_pin,
            rows_copied: 0,
            rows_dropped: 0,
        });
    }
    Ok(out)
}

fn change(from: &Shape, to: &Shape) -> Change {
    let same_rows = (from.map_type, from.key_size, from.value_size, from.version)
        == (to.map_type, to.key_size, to.value_size, to.version);
    if same_rows { Change::Resized } else { Change::Recreated }
}

/// Copies the rows of resized maps into their new maps, removes the old
/// pins, and records every map's layout version in `agent_state`.
///
/// # Errors
/// When a pin cannot be opened or removed, or `agent_state` written.
pub fn finish(root: &Path, migrations: &mut [Migration]) -> Result<(), LoadError> {
    for m in migrations.iter_mut() {
        if m.change == Change::Resized {
            let old = MapData::from_pin(&m.old_pin).map_err(|source| LoadError::Map { name: m.name, source })?;
            let new = MapData::from_pin(root.join(m.name)).map_err(|source| LoadError::Map { name: m.name, source })?;
            let (copied, dropped) = copy_rows(&old, &new, &m.to)
                .map_err(|source| LoadError::BpffsRoot { path: root.join(m.name), source })?;
            m.rows_copied = copied;
            m.rows_dropped = dropped;
        }
        std::fs::remove_file(&m.old_pin).map_err(|source| LoadError::BpffsRoot { path: m.old_pin.clone(), source })?;
    }
    record_versions(root)
}

/// Writes `layout/<map>` = version for every map.
fn record_versions(root: &Path) -> Result<(), LoadError> {
    let name = map_names::AGENT_STATE;
    let data = MapData::from_pin(root.join(name)).map_err(|source| LoadError::Map { name, source })?;
    let mut map: aya::maps::HashMap<MapData, agent_state::Key, u64> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))
            .map_err(|source| LoadError::Map { name, source })?;
    for (map_name, version) in layout::VERSIONS {
        let key = agent_state::key(&format!("{}{map_name}", agent_state::LAYOUT_PREFIX));
        map.insert(key, u64::from(version), 0).map_err(|source| LoadError::Map { name, source })?;
    }
    Ok(())
}

/// Copies every row of `old` into `new` (same key and value layout) as raw
/// bytes. Returns (copied, dropped because `new` was full).
fn copy_rows(old: &MapData, new: &MapData, shape: &Shape) -> io::Result<(usize, usize)> {
    let (old_fd, new_fd) = (elem::fd_of(old)?, elem::fd_of(new)?);
    let key_size = usize::try_from(shape.key_size).map_err(io::Error::other)?;
    let value_size = usize::try_from(shape.value_size).map_err(io::Error::other)?;
    // Per-CPU values come as one 8-byte-aligned slot per possible CPU.
    let value_len = if matches!(shape.map_type, map_type::PERCPU_HASH | map_type::PERCPU_ARRAY) {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        value_size.div_ceil(8) * 8 * cpus
    } else {
        value_size
    };
    let (mut key, mut next) = (vec![0u8; key_size], vec![0u8; key_size]);
    let mut value = vec![0u8; value_len];
    let (mut copied, mut dropped) = (0, 0);
    let mut first = true;
    loop {
        let from = if first { std::ptr::null() } else { key.as_ptr() };
        // SAFETY (the three calls): `key`/`next` hold the map's key size and
        // `value` its value size (per CPU slots included), as `shape` says.
        match unsafe { elem::call(elem::GET_NEXT_KEY, old_fd, from, next.as_mut_ptr(), 0) } {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        first = false;
        key.copy_from_slice(&next);
        match unsafe { elem::call(elem::LOOKUP, old_fd, key.as_ptr(), value.as_mut_ptr(), 0) } {
            Ok(()) => {}
            // Deleted meanwhile (an old program is still running).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        }
        match unsafe { elem::call(elem::UPDATE, new_fd, key.as_ptr(), value.as_mut_ptr(), 0) } {
            Ok(()) => copied += 1,
            Err(e) if matches!(e.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)) => dropped += 1,
            Err(e) => return Err(e),
        }
    }
    Ok((copied, dropped))
}

/// Removes the `migrating-*` pins a crashed migration left under `root`
/// (`service-agent cleanup`).
///
/// # Errors
/// When a pin exists but cannot be removed.
pub fn remove_migrating_pins(root: &Path) -> io::Result<()> {
    for name in map_names::ALL {
        match std::fs::remove_file(migrating_pin(root, name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}
