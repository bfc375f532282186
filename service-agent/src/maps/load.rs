//! Loading the eBPF object with its maps pinned under `--bpffs-root`
//! (migrating pins of another layout or size, see [`super::layout`]), the
//! map capacities the `--map-size-*` flags set, and removing the pins.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{Ebpf, EbpfLoader};
use service_common::map_names;

use super::layout;

/// Where the maps and links are pinned unless `--bpffs-root` says
/// otherwise.
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/service-dataplane";

/// The eBPF object built by build.rs (empty when the toolchain was missing).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/service-ebpf"));

/// `statfs(2)` magic of the BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Capacities of the maps (the `--map-size-*` flags).
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// Frontends (`services` rows).
    pub services: u32,
    /// Backend slots and member ids of every table together
    /// (`backend_slots`, in blocks of
    /// [`service_common::backend_slots::PER_BLOCK`]).
    pub backend_slots: u32,
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
            backend_slots: capacity::BACKEND_SLOT_BLOCKS * service_common::backend_slots::PER_BLOCK,
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
    Ok(filesystem_type(path)? == BPF_FS_MAGIC)
}

/// The type (`statfs`'s magic number) of the filesystem `path` is on.
///
/// # Errors
/// When `statfs` fails (no such path, ...).
pub(crate) fn filesystem_type(path: &Path) -> io::Result<i64> {
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
    Ok(i64::from(buf.f_type))
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
            map_names::BACKEND_SLOTS => Some(self.backend_slots.div_ceil(service_common::backend_slots::PER_BLOCK)),
            // The counters have a row per backend and rev-NAT row.
            map_names::BACKENDS
            | map_names::REV_NAT
            | map_names::BACKEND_COUNTERS
            | map_names::SERVICE_COUNTERS
            | map_names::SOCK_COUNTERS => Some(self.backends),
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
