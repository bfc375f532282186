//! The pinned BPF maps, below the reconciler and the readers:
//! - [`load`](load()): loading the eBPF object with its maps pinned under
//!   `--bpffs-root` (pins of another layout or size migrated, [`layout`]),
//!   the `--map-size-*` capacities, removing the pins;
//! - [`io`]: the port the reconciler writes through ([`MapIo`], the rows it
//!   owns, [`MapError`]), implemented by [`PinnedMaps`] (`pinned.rs`) and,
//!   in test builds, by an in-memory fake (`fake.rs`);
//! - [`Readers`]: read-only views (conntrack, affinity, counters) for
//!   `inspect`, `explain` and `/metrics`;
//! - `upkeep.rs`: the SNAT addresses and the UDP conntrack flush;
//! - `access.rs`: opening pins, walking maps, the raw `bpf(2)` calls.

mod access;
#[cfg(test)]
pub mod fake;
pub mod io;
pub mod layout;
mod load;
mod pinned;
mod readers;
mod upkeep;

pub(crate) use self::{
    access::{is_not_found, open_hash},
    load::filesystem_type,
};
pub use self::{
    access::{monotonic_ns, next_key},
    io::{BackendTable, MapError, MapIo, MapState, NextIds},
    load::{DEFAULT_BPFFS_ROOT, LoadError, MapSizes, load, load_migrating, prepare_bpffs_root, remove_pins},
    pinned::PinnedMaps,
    readers::{Readers, read_affinity, read_conntrack, read_conntrack_new, read_counters, read_stats},
    upkeep::{flush_udp_conntrack, take_udp_sockets_of_removed_backends, write_snat_addrs, write_socket_lb},
};
