//! The socket-level programs (`service_common::PROGS_SOCK`: connect4,
//! sendmsg4, recvmsg4, getpeername4 and their IPv6 twins connect6,
//! sendmsg6, recvmsg6, getpeername6; and `PROG_SOCK_RELEASE`, which
//! forgets a closing socket of either family) on the cgroup `--cgroup-root`:
//! attached as links pinned under `<bpffs-root>/links/` (named by attach
//! type, the cgroup's inode and the program's tag), so they survive the
//! agent being killed; a restarted agent adopts links of the same program
//! on the same cgroup, attaches the new ones before it removes older ones
//! (an upgrade leaves no moment without translation), and `service-agent
//! cleanup` removes them with the other link pins. Nothing is attached
//! anywhere but the given cgroup.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, Program,
        links::{FdLink, PinnedLink},
    },
};

/// Pin name prefix of the socket-level links.
pub const PIN_PREFIX: &str = "sock-";

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Where the agent mounts a cgroup2 filesystem when the host has none.
pub const FALLBACK_CGROUP_ROOT: &str = "/run/service-dataplane/cgroup2";

#[derive(Debug, thiserror::Error)]
pub enum SocketHookError {
    #[error("--cgroup-root {path}: {message}")]
    CgroupRoot { path: PathBuf, message: String },
    #[error("program {program}: {message}")]
    Program { program: &'static str, message: String },
}

/// `--socket-lb`: whose sockets the socket-level programs translate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketLb {
    /// Only the node's own (host processes, hostNetwork pods): what the
    /// packet path cannot see. Pods keep the packet path.
    Host,
    /// Every socket under `--cgroup-root`, pods' too: a pod's TCP to a
    /// ClusterIP connects straight to the backend, and its packets need no
    /// translation.
    All,
    /// None: nothing is attached to any cgroup.
    Off,
}

impl SocketLb {
    /// The `socket_lb` row's mode.
    #[must_use]
    pub const fn mode(self) -> u32 {
        match self {
            Self::Host => service_common::socket_lb::HOST,
            Self::All => service_common::socket_lb::ALL,
            Self::Off => service_common::socket_lb::OFF,
        }
    }
}

impl std::str::FromStr for SocketLb {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "host" => Ok(Self::Host),
            "all" => Ok(Self::All),
            "off" => Ok(Self::Off),
            other => Err(format!("unknown --socket-lb {other:?} (host, all or off)")),
        }
    }
}

/// The socket-level links this agent holds.
#[derive(Default)]
pub struct SocketHooks {
    links: Vec<(PathBuf, FdLink)>,
}

/// `e` and its sources, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn pin_name(attach: &str, cgroup_ino: u64, tag: u64) -> String {
    format!("{PIN_PREFIX}{attach}-{cgroup_ino}-{tag:016x}")
}

/// A socket-level program of either kind: the sock_addr hooks, and the
/// sock hook on `sock_release`.
enum SockProgram<'a> {
    Addr(&'a mut CgroupSockAddr),
    Sock(&'a mut CgroupSock),
}

impl SockProgram<'_> {
    /// Loads it; its tag.
    fn load(&mut self) -> Result<u64, String> {
        let refused = |e: &aya::programs::ProgramError| format!("the verifier refused it: {}", chain(e));
        let info = match self {
            Self::Addr(p) => p.load().map_err(|e| refused(&e)).and_then(|()| p.info().map_err(|e| e.to_string())),
            Self::Sock(p) => p.load().map_err(|e| refused(&e)).and_then(|()| p.info().map_err(|e| e.to_string())),
        }?;
        Ok(info.tag())
    }

    /// Attaches it to `cgroup` as a link, which the caller pins.
    fn attach(&mut self, cgroup: &std::fs::File) -> Result<FdLink, String> {
        let link =
            |r: Result<FdLink, aya::programs::links::LinkError>| r.map_err(|e| format!("a link without an fd: {e}"));
        match self {
            Self::Addr(p) => {
                let id = p.attach(cgroup, CgroupAttachMode::Single).map_err(|e| chain(&e))?;
                link(FdLink::try_from(p.take_link(id).map_err(|e| e.to_string())?))
            }
            Self::Sock(p) => {
                let id = p.attach(cgroup, CgroupAttachMode::Single).map_err(|e| chain(&e))?;
                link(FdLink::try_from(p.take_link(id).map_err(|e| e.to_string())?))
            }
        }
    }
}

/// One socket-level link pinned under `links/`: `inspect sockets`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PinnedHook {
    /// The attach type (connect4, sendmsg4, recvmsg4, getpeername4, their
    /// `6` twins, sock_release).
    pub attach: String,
    /// The inode of the cgroup directory it is attached to.
    pub cgroup_inode: u64,
    /// The program's tag (which build of it runs there).
    pub tag: String,
}

/// The socket-level links pinned under `links_dir`, by attach type.
#[must_use]
pub fn pinned_hooks(links_dir: &Path) -> Vec<PinnedHook> {
    let mut out: Vec<PinnedHook> =
        pins(links_dir).iter().filter_map(|p| p.file_name()?.to_str().and_then(parse_pin_name)).collect();
    out.sort_by(|a, b| (&a.attach, a.cgroup_inode).cmp(&(&b.attach, b.cgroup_inode)));
    out
}

fn parse_pin_name(name: &str) -> Option<PinnedHook> {
    let mut parts = name.strip_prefix(PIN_PREFIX)?.split('-');
    let (attach, ino, tag) = (parts.next()?, parts.next()?, parts.next()?);
    (parts.next().is_none()).then_some(())?;
    Some(PinnedHook { attach: attach.to_owned(), cgroup_inode: ino.parse().ok()?, tag: tag.to_owned() })
}

fn is_cgroup2(path: &Path) -> std::io::Result<bool> {
    Ok(crate::maps::filesystem_type(path)? == CGROUP2_SUPER_MAGIC)
}

/// The cgroup2 mount point from `mountinfo` (the text of
/// `/proc/self/mountinfo`): the first mount of type `cgroup2`.
#[must_use]
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        (after.split_whitespace().next() == Some("cgroup2"))
            .then(|| before.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// The default `--cgroup-root`: the host's cgroup2 mount, or one the agent
/// mounts at [`FALLBACK_CGROUP_ROOT`].
///
/// # Errors
/// When there is none and mounting one fails.
pub fn default_cgroup_root() -> Result<PathBuf, SocketHookError> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if let Some(path) = cgroup2_mount(&mountinfo) {
        return Ok(path);
    }
    let path = PathBuf::from(FALLBACK_CGROUP_ROOT);
    let fail = |message: String| SocketHookError::CgroupRoot { path: path.clone(), message };
    std::fs::create_dir_all(&path).map_err(|e| fail(e.to_string()))?;
    tracing::info!(path = %path.display(), "no cgroup2 filesystem mounted: mounting one");
    let ok = std::process::Command::new("mount")
        .args(["-t", "cgroup2", "none"])
        .arg(&path)
        .status()
        .is_ok_and(|s| s.success());
    if ok { Ok(path) } else { Err(fail("mounting a cgroup2 filesystem failed".into())) }
}

impl SocketHooks {
    /// Loads the socket-level programs and attaches them to `cgroup_root`,
    /// adopting links pinned by an earlier agent for the same programs and
    /// cgroup, then removing any other socket-level link pin.
    ///
    /// # Errors
    /// When `cgroup_root` is not a cgroup2 directory, or a program cannot
    /// be loaded, attached or pinned (what was attached stays; the caller
    /// keeps the returned links only on success).
    pub fn attach(ebpf: &mut Ebpf, cgroup_root: &Path, links_dir: &Path) -> Result<Self, SocketHookError> {
        let root_error = |message: String| SocketHookError::CgroupRoot { path: cgroup_root.to_owned(), message };
        match is_cgroup2(cgroup_root) {
            Ok(true) => {}
            Ok(false) => {
                return Err(root_error("not a cgroup2 filesystem (mount one, or name a cgroup2 directory)".into()));
            }
            Err(e) => return Err(root_error(e.to_string())),
        }
        let cgroup = std::fs::File::open(cgroup_root).map_err(|e| root_error(e.to_string()))?;
        let ino = cgroup.metadata().map_err(|e| root_error(e.to_string()))?.ino();
        std::fs::create_dir_all(links_dir).map_err(|e| root_error(format!("creating {}: {e}", links_dir.display())))?;
        let mut hooks = Self::default();
        let programs = service_common::PROGS_SOCK.into_iter().chain([service_common::PROG_SOCK_RELEASE]);
        for (attach, program) in programs {
            let fail = |message: String| SocketHookError::Program { program, message };
            let mut prog = match ebpf.program_mut(program) {
                Some(Program::CgroupSockAddr(p)) => SockProgram::Addr(p),
                Some(Program::CgroupSock(p)) => SockProgram::Sock(p),
                Some(_) => return Err(fail("not a cgroup sock or sock_addr program".into())),
                None => return Err(fail("missing from the eBPF object".into())),
            };
            let tag = prog.load().map_err(fail)?;
            let pin = links_dir.join(pin_name(attach, ino, tag));
            if let Ok(adopted) = PinnedLink::from_pin(&pin) {
                hooks.links.push((pin, adopted.into()));
                continue;
            }
            // A link (kernels 5.7+) always shares the hook with other
            // programs; the kernel refuses any attach flag with it.
            let link = prog.attach(&cgroup).map_err(fail)?;
            let pinned = link.pin(&pin).map_err(|e| fail(format!("pinning {}: {e}", pin.display())))?;
            hooks.links.push((pin, pinned.into()));
        }
        // Now that this agent's programs are in place: an earlier agent's
        // (another build, or another cgroup) go.
        let keep: Vec<&PathBuf> = hooks.links.iter().map(|(p, _)| p).collect();
        for stale in pins(links_dir).into_iter().filter(|p| !keep.contains(&p)) {
            tracing::info!(pin = %stale.display(), "removing an earlier socket-level link");
            let _ = std::fs::remove_file(&stale);
        }
        Ok(hooks)
    }

    /// Detaches: removes the pins (the links go with the last reference).
    pub fn detach_all(&mut self) {
        for (pin, link) in self.links.drain(..) {
            let _ = std::fs::remove_file(&pin);
            drop(link);
        }
    }

    /// Leaves the links pinned for the next agent.
    pub fn leave_attached(&mut self) {
        self.links.clear();
    }
}

/// Every socket-level link pin under `links_dir`.
#[must_use]
pub fn pins(links_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(links_dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(PIN_PREFIX)))
        .map(|e| e.path())
        .collect()
}

/// Removes every socket-level link pin under `links_dir` (`--socket-lb
/// off`): the programs leave the cgroup. Returns how many there were.
#[must_use = "the count says whether anything was attached"]
pub fn remove_pins(links_dir: &Path) -> usize {
    let stale = pins(links_dir);
    for pin in &stale {
        let _ = std::fs::remove_file(pin);
    }
    stale.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_in_mountinfo() {
        let hybrid = "\
35 25 0:30 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
37 35 0:32 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu";
        assert_eq!(cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(cgroup2_mount("36 35 0:31 / /sys/fs/cgroup rw - cgroup2 none rw"), Some("/sys/fs/cgroup".into()));
        assert_eq!(cgroup2_mount("37 35 0:32 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu"), None);
    }

    #[test]
    fn pin_names_carry_the_attach_type_cgroup_and_tag() {
        assert_eq!(pin_name("connect4", 1234, 0xab), "sock-connect4-1234-00000000000000ab");
        assert_eq!(
            parse_pin_name(&pin_name("recvmsg4", 99, 0xcd)),
            Some(PinnedHook { attach: "recvmsg4".into(), cgroup_inode: 99, tag: "00000000000000cd".into() })
        );
        assert_eq!(
            parse_pin_name(&pin_name("getpeername6", 7, 0xef)),
            Some(PinnedHook { attach: "getpeername6".into(), cgroup_inode: 7, tag: "00000000000000ef".into() })
        );
        assert_eq!(parse_pin_name("sock-connect4-x-00"), None);
        assert_eq!(parse_pin_name("pod-3-veth0-00"), None);
    }
}
