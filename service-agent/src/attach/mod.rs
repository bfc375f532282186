//! The attach manager: keeps a program attached to every interface it
//! selects, following links as they appear and disappear (an rtnetlink
//! link-event socket wakes it up). The agent runs two: the pod ingress
//! program on `--pod-interfaces`, the external ingress program on
//! `--external-interfaces` and on the node's overlay and tunnel devices
//! (`--tunnel-interfaces`).
//!
//! Each program comes in two builds: one for Ethernet devices and one for
//! L3 devices (WireGuard, IPIP, tun in TUN mode: no MAC header, the packet
//! starts at the IP header); the interface's link type (`ARPHRD_*`, from
//! rtnetlink) picks one.
//!
//! Attachment uses a TCX link (kernel 6.6+), pinned under
//! `<bpffs-root>/links/`, and falls back to a clsact qdisc with a cls_bpf
//! filter on older kernels (`--attach-mode` forces either). The filters are
//! the agent's by their priority and handle ([`FILTER_PRIORITY_POD`], …)
//! and program name: a restarted agent finds them on the interfaces'
//! clsact ingress hook and adopts them (same program tag) or replaces them
//! in place (an upgrade), and `service-agent cleanup` removes them, as it
//! removes the pinned TCX links.

pub mod netlink;

use std::{
    collections::BTreeMap,
    ffi::CStr,
    path::{Path, PathBuf},
};

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
};

use self::netlink::LinkInfo;
use crate::vocabulary::Globs;
/// `(ifindex, name)` of every interface in this network namespace.
/// (`/sys/class/net` would show the namespace sysfs was mounted in, which is
/// not ours under `nsenter --net`; `if_nameindex(3)` asks the kernel.)
#[must_use]
pub fn interfaces() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zeroed entry, or
    // NULL; we read it before freeing it with if_freenameindex.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            out.push(((*p).if_index, CStr::from_ptr((*p).if_name).to_string_lossy().into_owned()));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// How programs are attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachMode {
    /// TCX links where the kernel has them (6.6+), clsact filters
    /// otherwise; adopts either kind an earlier agent left.
    #[default]
    Auto,
    /// TCX links only (an earlier agent's clsact filters are replaced).
    Tcx,
    /// clsact/cls_bpf filters only, as on kernels before 6.6 (an earlier
    /// agent's TCX links are replaced).
    Tc,
}

impl std::str::FromStr for AttachMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "tcx" => Ok(Self::Tcx),
            "tc" => Ok(Self::Tc),
            other => Err(format!("unknown attach mode {other:?} (auto, tcx or tc)")),
        }
    }
}

/// The link kinds (`IFLA_INFO_KIND`) of overlay and tunnel devices: what
/// `--tunnel-interfaces auto` selects (flannel.1, vxlan.calico,
/// cilium_vxlan are `vxlan`; cilium_geneve `geneve`; tunl0 `ipip`; wg0,
/// Calico's wireguard.cali `wireguard`; tun devices `tun`).
pub const TUNNEL_KINDS: &[&str] =
    &["vxlan", "geneve", "ipip", "gre", "gretap", "sit", "ip6tnl", "ip6gre", "ip6gretap", "wireguard", "tun"];

/// `--tunnel-interfaces`: globs, and with the word `auto` every interface
/// whose link kind is one of [`TUNNEL_KINDS`].
#[derive(Clone, Debug)]
pub struct TunnelInterfaces {
    pub globs: Globs,
    pub kinds: bool,
}

impl TunnelInterfaces {
    /// Parses the flag: `auto`, globs, both (`auto,mytun*`), or `none`.
    #[must_use]
    pub fn parse(list: &str) -> Self {
        let mut kinds = false;
        let mut globs = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item {
                "auto" => kinds = true,
                "none" => {}
                glob => globs.push(glob.to_owned()),
            }
        }
        Self { globs: Globs::from_patterns(globs), kinds }
    }

    #[must_use]
    pub fn matches(&self, link: &LinkInfo) -> bool {
        self.globs.matches(&link.name)
            || (self.kinds && link.kind.as_deref().is_some_and(|k| TUNNEL_KINDS.contains(&k)))
    }
}

/// Which interfaces an [`AttachManager`] attaches to: those matching
/// `globs`, and the tunnel interfaces not matching `exclude` (the pod
/// interfaces' globs: one hook never gets both programs).
#[derive(Clone, Debug)]
pub struct Selection {
    pub globs: Globs,
    pub tunnels: Option<TunnelInterfaces>,
    pub exclude: Globs,
}

impl Selection {
    /// Interfaces matching `globs`, nothing else.
    #[must_use]
    pub fn globs(globs: Globs) -> Self {
        Self { globs, tunnels: None, exclude: Globs::default() }
    }

    #[must_use]
    pub fn matches(&self, link: &LinkInfo) -> bool {
        self.globs.matches(&link.name)
            || (!self.exclude.matches(&link.name) && self.tunnels.as_ref().is_some_and(|t| t.matches(link)))
    }

    /// Whether `link` is selected as a tunnel interface (and not by
    /// `globs`): those get SNAT addresses but no NodePorts.
    #[must_use]
    pub fn is_tunnel(&self, link: &LinkInfo) -> bool {
        !self.globs.matches(&link.name) && self.matches(link)
    }
}

/// The interfaces of this namespace: rtnetlink's view (with link types and
/// kinds), or `if_nameindex(3)`'s names as Ethernet devices when the dump
/// fails.
#[must_use]
pub fn links() -> Vec<LinkInfo> {
    match netlink::links() {
        Ok(links) => links,
        Err(e) => {
            tracing::warn!(error = %e, "rtnetlink link dump failed; taking every interface for Ethernet");
            interfaces()
                .into_iter()
                .map(|(ifindex, name)| LinkInfo { ifindex, name, link_type: ARPHRD_ETHER, kind: None })
                .collect()
        }
    }
}

/// `linux/if_arp.h` link types.
const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;

/// Whether a device of this link type carries no MAC header (the packet
/// starts at the IP header at TC ingress), as the kernel's
/// `dev_is_mac_header_xmit` lists them: `Some(true)` for the L3 build,
/// `Some(false)` for the Ethernet build (Ethernet and loopback, whose
/// header is Ethernet's), `None` for link types neither build parses.
#[must_use]
pub fn is_l3(link_type: u16) -> Option<bool> {
    const ARPHRD_PPP: u16 = 512;
    const ARPHRD_RAWIP: u16 = 519;
    const ARPHRD_TUNNEL: u16 = 768;
    const ARPHRD_TUNNEL6: u16 = 769;
    const ARPHRD_SIT: u16 = 776;
    const ARPHRD_IPGRE: u16 = 778;
    const ARPHRD_PIMREG: u16 = 784;
    const ARPHRD_IP6GRE: u16 = 823;
    const ARPHRD_VOID: u16 = 0xffff;
    const ARPHRD_NONE: u16 = 0xfffe;
    match link_type {
        ARPHRD_ETHER | ARPHRD_LOOPBACK => Some(false),
        ARPHRD_PPP | ARPHRD_RAWIP | ARPHRD_TUNNEL | ARPHRD_TUNNEL6 | ARPHRD_SIT | ARPHRD_IPGRE | ARPHRD_PIMREG
        | ARPHRD_IP6GRE | ARPHRD_VOID | ARPHRD_NONE => Some(true),
        _ => None,
    }
}

/// One role's two builds of its program.
pub struct Programs<'a> {
    /// For Ethernet devices.
    pub ether: &'a mut SchedClassifier,
    /// For L3 devices.
    pub l3: &'a mut SchedClassifier,
}

impl Programs<'_> {
    fn get(&mut self, l3: bool) -> &mut SchedClassifier {
        if l3 { self.l3 } else { self.ether }
    }

    fn tag(&self, l3: bool) -> Option<u64> {
        program_tag(if l3 { self.l3 } else { self.ether })
    }
}

/// What one [`AttachManager::sync`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Interfaces attached to, with the build used (`true`: L3).
    pub attached: Vec<(String, bool)>,
    /// Links an earlier agent pinned, running this very program: kept.
    pub adopted: Vec<String>,
    /// clsact filters an earlier agent installed, running this very
    /// program: kept.
    pub adopted_filters: Vec<String>,
    /// Links or filters an earlier agent left, running another program (an
    /// upgrade) or attached the other way (`--attach-mode`): replaced, new
    /// program first (a filter with this agent's priority and handle is
    /// replaced in place, atomically).
    pub replaced: Vec<String>,
    /// Other filters of the agent's programs on an interface (stacked by
    /// an older agent that did not adopt them): removed.
    pub removed_filters: Vec<String>,
    pub gone: Vec<String>,
    pub failed: Vec<(String, String)>,
}

/// How one interface's program is attached.
enum Attachment {
    /// A TCX link pinned under `<bpffs-root>/links/`, so it survives the
    /// agent being killed; detached by removing the pin and closing `link`.
    Pinned { pin: PathBuf, link: FdLink },
    /// A clsact/cls_bpf filter (kernels before 6.6, `--attach-mode tc`):
    /// it stays until deleted, found again by its priority and handle.
    Filter { priority: u16, handle: u32 },
}

/// What an earlier agent left on an interface that is replaced once this
/// agent's program is attached there.
enum Leftover {
    Pin { pin: PathBuf, link: FdLink },
    Filter { priority: u16, handle: u32 },
}

/// Attachments by ifindex.
pub struct AttachManager {
    /// The pin name prefix of this manager's links ([`ROLE_POD`],
    /// [`ROLE_EXTERNAL`]).
    role: &'static str,
    selection: Selection,
    links_dir: PathBuf,
    mode: AttachMode,
    /// ifindex → (interface name, L3 build, attachment).
    attached: BTreeMap<u32, (String, bool, Attachment)>,
    /// What earlier agents left on interfaces this manager attaches to,
    /// replaced by the next sync: (ifindex, name, leftover).
    replacing: Vec<(u32, String, Leftover)>,
}

/// Pin prefix of the pod ingress program's links.
pub const ROLE_POD: &str = "ingress";
/// Pin prefix of the external ingress program's links.
pub const ROLE_EXTERNAL: &str = "external";

/// The clsact filters' priorities (`tc filter show … pref N`) and handles:
/// the agent's own, so a restarted agent finds its filters, and a pod and
/// an external filter could share one hook.
pub const FILTER_PRIORITY_POD: u16 = 0x5d01;
pub const FILTER_PRIORITY_EXTERNAL: u16 = 0x5d02;
pub const FILTER_HANDLE_POD: u32 = 0x5d01;
pub const FILTER_HANDLE_EXTERNAL: u32 = 0x5d02;

/// The names the agent's programs carry in a cls_bpf filter
/// (`TCA_BPF_NAME`), by role.
fn role_programs(role: &str) -> [&'static str; 2] {
    if role == ROLE_POD {
        [service_common::PROG_POD_INGRESS, service_common::PROG_POD_INGRESS_L3]
    } else {
        [service_common::PROG_EXTERNAL_INGRESS, service_common::PROG_EXTERNAL_INGRESS_L3]
    }
}

/// Which role a clsact filter belongs to, if it is the agent's: by its
/// priority and handle first (whatever program an earlier version put
/// there), then by program name (filters stacked by agents that did not
/// set their own priority and handle).
fn filter_role(f: &netlink::TcFilter) -> Option<&'static str> {
    if f.kind != "bpf" {
        return None;
    }
    [ROLE_POD, ROLE_EXTERNAL]
        .into_iter()
        .find(|role| filter_id(role) == (f.priority, f.handle))
        .or_else(|| [ROLE_POD, ROLE_EXTERNAL].into_iter().find(|role| role_programs(role).contains(&f.name.as_str())))
}

/// The priority and handle of a role's filters.
#[must_use]
pub fn filter_id(role: &str) -> (u16, u32) {
    if role == ROLE_POD {
        (FILTER_PRIORITY_POD, FILTER_HANDLE_POD)
    } else {
        (FILTER_PRIORITY_EXTERNAL, FILTER_HANDLE_EXTERNAL)
    }
}

/// The pin of a link: `<role>-<ifindex>-<ifname>-<program tag>`.
fn pin_name(role: &str, ifindex: u32, name: &str, tag: u64) -> String {
    format!("{role}-{ifindex}-{name}-{tag:016x}")
}

fn parse_pin_name(role: &str, file: &str) -> Option<(u32, String, u64)> {
    let rest = file.strip_prefix(role)?.strip_prefix('-')?;
    let (ifindex, rest) = rest.split_once('-')?;
    let (name, tag) = rest.rsplit_once('-')?;
    Some((ifindex.parse().ok()?, name.to_owned(), u64::from_str_radix(tag, 16).ok()?))
}

/// Removes a pinned link: the pin, then our handle; the link is detached
/// when its last reference goes.
fn remove_pinned(pin: &Path, link: FdLink) {
    if let Err(e) = std::fs::remove_file(pin) {
        tracing::warn!(pin = %pin.display(), error = %e, "removing a link pin");
    }
    drop(link);
}

/// Deletes a filter; one already gone (with its interface) is fine.
fn remove_filter(ifindex: u32, priority: u16, handle: u32) {
    match netlink::delete_filter(ifindex, priority, handle) {
        Ok(()) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV | libc::EINVAL)) => {
            tracing::debug!(ifindex, priority, handle, error = %e, "filter already gone");
        }
        Err(e) => tracing::warn!(ifindex, priority, handle, error = %e, "deleting a clsact filter"),
    }
}

fn release_leftover(ifindex: u32, leftover: Leftover) {
    match leftover {
        Leftover::Pin { pin, link } => remove_pinned(&pin, link),
        Leftover::Filter { priority, handle } => remove_filter(ifindex, priority, handle),
    }
}

impl AttachManager {
    /// `links_dir` (created if needed) holds the link pins; it must be on a
    /// BPF filesystem (the agent uses `<bpffs-root>/links`).
    #[must_use]
    pub fn new(role: &'static str, selection: Selection, links_dir: PathBuf, mode: AttachMode) -> Self {
        Self { role, selection, links_dir, mode, attached: BTreeMap::new(), replacing: Vec::new() }
    }

    /// Replaces the globs (the default external interfaces follow the
    /// default route); the next [`Self::sync`] applies them.
    pub fn set_globs(&mut self, globs: Globs) {
        self.selection.globs = globs;
    }

    /// The selection (the tunnel interfaces get SNAT addresses).
    #[must_use]
    pub fn selection(&self) -> &Selection {
        &self.selection
    }

    /// Takes over what an earlier agent left: pinned TCX links and clsact
    /// filters of this role on interfaces that still match and run this
    /// program (the build for the interface's link type) are kept as they
    /// are (no packet notices the restart); those running another program,
    /// or attached the way `--attach-mode` rules out, are replaced by
    /// [`Self::sync`] (the new program first); the rest are removed.
    pub fn adopt(&mut self, progs: &Programs) -> SyncReport {
        let mut report = SyncReport::default();
        let now: BTreeMap<u32, LinkInfo> = links().into_iter().map(|l| (l.ifindex, l)).collect();
        let expected = |ifindex: u32, name: &str| -> Option<Option<u64>> {
            let link = now.get(&ifindex).filter(|l| l.name == name && self.selection.matches(l))?;
            Some(is_l3(link.link_type).and_then(|l3| progs.tag(l3)))
        };
        // Pinned TCX links.
        let mut stale = Vec::new();
        for entry in std::fs::read_dir(&self.links_dir).into_iter().flatten().filter_map(Result::ok) {
            let pin = entry.path();
            let Some((ifindex, name, pinned_tag)) =
                entry.file_name().to_str().and_then(|f| parse_pin_name(self.role, f))
            else {
                continue;
            };
            let link: FdLink = match PinnedLink::from_pin(&pin) {
                Ok(p) => p.into(),
                Err(e) => {
                    tracing::warn!(pin = %pin.display(), error = %e, "unreadable link pin; removing it");
                    let _ = std::fs::remove_file(&pin);
                    continue;
                }
            };
            match expected(ifindex, &name) {
                Some(Some(tag))
                    if tag == pinned_tag && self.mode != AttachMode::Tc && !self.attached.contains_key(&ifindex) =>
                {
                    let l3 = now.get(&ifindex).and_then(|l| is_l3(l.link_type)).unwrap_or(false);
                    self.attached.insert(ifindex, (name.clone(), l3, Attachment::Pinned { pin, link }));
                    report.adopted.push(name);
                }
                Some(_) => stale.push((ifindex, name, Leftover::Pin { pin, link })),
                None => remove_pinned(&pin, link),
            }
        }
        // clsact filters of this role, on any interface.
        let (priority, handle) = filter_id(self.role);
        for link in now.values() {
            let Ok(filters) = netlink::ingress_filters(link.ifindex) else { continue };
            for f in filters.into_iter().filter(|f| filter_role(f) == Some(self.role)) {
                match expected(link.ifindex, &link.name) {
                    Some(Some(tag))
                        if Some(tag) == f.tag
                            && (f.priority, f.handle) == (priority, handle)
                            && self.mode != AttachMode::Tcx
                            && !self.attached.contains_key(&link.ifindex) =>
                    {
                        let l3 = is_l3(link.link_type).unwrap_or(false);
                        self.attached.insert(
                            link.ifindex,
                            (link.name.clone(), l3, Attachment::Filter { priority: f.priority, handle: f.handle }),
                        );
                        report.adopted_filters.push(link.name.clone());
                    }
                    Some(_) => stale.push((
                        link.ifindex,
                        link.name.clone(),
                        Leftover::Filter { priority: f.priority, handle: f.handle },
                    )),
                    None => {
                        remove_filter(link.ifindex, f.priority, f.handle);
                        report.removed_filters.push(link.name.clone());
                    }
                }
            }
        }
        // On an interface whose program was adopted, anything else of ours
        // is a duplicate: the adopted one serves, remove the rest now.
        for (ifindex, name, leftover) in stale {
            if self.attached.contains_key(&ifindex) {
                if matches!(leftover, Leftover::Filter { .. }) {
                    report.removed_filters.push(name);
                }
                release_leftover(ifindex, leftover);
            } else {
                // Replaced by sync: the new program first, then this goes.
                self.replacing.push((ifindex, name, leftover));
            }
        }
        report
    }

    /// Attaches to every selected interface not attached yet and forgets
    /// interfaces that are gone (the kernel removed their links and
    /// filters with them).
    pub fn sync(&mut self, progs: &mut Programs) -> SyncReport {
        let mut report = SyncReport::default();
        let now: BTreeMap<u32, LinkInfo> =
            links().into_iter().filter(|l| self.selection.matches(l)).map(|l| (l.ifindex, l)).collect();
        let gone: Vec<u32> = self
            .attached
            .iter()
            .filter(|(idx, (name, _, _))| now.get(idx).is_none_or(|l| l.name != *name))
            .map(|(i, _)| *i)
            .collect();
        for idx in gone {
            if let Some((name, _, attachment)) = self.attached.remove(&idx) {
                // The interface is gone (the kernel removed the link with
                // it), or no longer matches (its link is detached here).
                release(idx, attachment);
                report.gone.push(name);
            }
        }
        // Leftovers on interfaces no longer selected go too.
        let (keep, drop_now): (Vec<_>, Vec<_>) = std::mem::take(&mut self.replacing)
            .into_iter()
            .partition(|(idx, name, _)| now.get(idx).is_some_and(|l| l.name == *name));
        self.replacing = keep;
        for (idx, _, leftover) in drop_now {
            release_leftover(idx, leftover);
        }
        let (priority, handle) = filter_id(self.role);
        for (idx, link) in now {
            if self.attached.contains_key(&idx) {
                continue;
            }
            let Some(l3) = is_l3(link.link_type) else {
                report.failed.push((link.name, format!("link type {} is neither Ethernet nor L3", link.link_type)));
                continue;
            };
            // A filter with this role's priority and handle (an earlier
            // agent's, another program): replaced in place.
            let in_place = self.mode != AttachMode::Tcx
                && self.replacing.iter().any(|(i, _, l)| {
                    *i == idx
                        && matches!(l, Leftover::Filter { priority: p, handle: h } if (*p, *h) == (priority, handle))
                });
            let tag = progs.tag(l3);
            match attach(progs.get(l3), self.role, &link.name, idx, tag, &self.links_dir, self.mode, in_place) {
                Ok(attachment) => {
                    self.attached.insert(idx, (link.name.clone(), l3, attachment));
                    let mut replaced = false;
                    let leftovers: Vec<_>;
                    (leftovers, self.replacing) =
                        std::mem::take(&mut self.replacing).into_iter().partition(|(i, _, _)| *i == idx);
                    for (_, _, leftover) in leftovers {
                        replaced = true;
                        match leftover {
                            // Now ours: replaced in place.
                            Leftover::Filter { priority: p, handle: h } if in_place && (p, h) == (priority, handle) => {
                            }
                            other => release_leftover(idx, other),
                        }
                    }
                    if replaced {
                        report.replaced.push(link.name);
                    } else {
                        report.attached.push((link.name, l3));
                    }
                }
                Err(e) => report.failed.push((link.name, e)),
            }
        }
        report
    }

    /// Names of the interfaces attached to.
    #[must_use]
    pub fn attached(&self) -> Vec<String> {
        self.attached.values().map(|(n, _, _)| n.clone()).collect()
    }

    /// Detaches from every interface and removes the link pins.
    pub fn detach_all(&mut self) {
        for (idx, (_, _, attachment)) in std::mem::take(&mut self.attached) {
            release(idx, attachment);
        }
        for (idx, _, leftover) in std::mem::take(&mut self.replacing) {
            release_leftover(idx, leftover);
        }
        let _ = std::fs::remove_dir(&self.links_dir);
    }

    /// Leaves every link and filter attached for the next agent, releasing
    /// only this process's handles.
    pub fn leave_attached(&mut self) {
        self.attached.clear();
        self.replacing.clear();
    }
}

/// Removes every link pinned under `links_dir` (detaching it) and the
/// directory: what `service-agent cleanup` does for links.
///
/// # Errors
/// When the directory exists but cannot be read.
pub fn remove_pinned_links(links_dir: &Path) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(links_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries.filter_map(Result::ok) {
        std::fs::remove_file(entry.path())?;
        removed += 1;
    }
    let _ = std::fs::remove_dir(links_dir);
    Ok(removed)
}

/// A program the agent attached, as the kernel and the pins show it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AttachedProgram {
    pub interface: String,
    pub ifindex: u32,
    /// "pod" (`service_pod_ingress*`) or "external" (`service_external_ingress*`).
    pub program: &'static str,
    /// "tcx" (a pinned TCX link) or "tc" (a clsact filter).
    pub via: &'static str,
    /// The program's tag (which build of it runs there).
    pub tag: String,
}

/// Which of the agent's programs are attached to which interfaces of this
/// network namespace: the TCX links pinned under `links_dir` whose
/// interface still exists, and the agent's clsact filters.
#[must_use]
pub fn attached_programs(links_dir: &Path) -> Vec<AttachedProgram> {
    let links: BTreeMap<u32, LinkInfo> = links().into_iter().map(|l| (l.ifindex, l)).collect();
    let program = |role: &str| if role == ROLE_POD { "pod" } else { "external" };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(links_dir).into_iter().flatten().filter_map(Result::ok) {
        let Some(file) = entry.file_name().to_str().map(str::to_owned) else { continue };
        for role in [ROLE_POD, ROLE_EXTERNAL] {
            if let Some((ifindex, name, tag)) = parse_pin_name(role, &file)
                && links.get(&ifindex).is_some_and(|l| l.name == name)
            {
                out.push(AttachedProgram {
                    interface: name,
                    ifindex,
                    program: program(role),
                    via: "tcx",
                    tag: format!("{tag:016x}"),
                });
                break;
            }
        }
    }
    for link in links.values() {
        let Ok(filters) = netlink::ingress_filters(link.ifindex) else { continue };
        for f in filters {
            if let Some(role) = filter_role(&f) {
                out.push(AttachedProgram {
                    interface: link.name.clone(),
                    ifindex: link.ifindex,
                    program: program(role),
                    via: "tc",
                    tag: f.tag.map_or_else(|| "?".into(), |t| format!("{t:016x}")),
                });
            }
        }
    }
    out.sort_by(|a, b| (a.ifindex, a.program).cmp(&(b.ifindex, b.program)));
    out
}

/// Removes every clsact ingress filter of the agent's (its priorities and
/// handles, or one of its program names) from every interface of this
/// network namespace: what `service-agent cleanup` does for the clsact
/// fallback. Returns how many went. The clsact qdiscs stay (other tools
/// may use them).
///
/// # Errors
/// When the interfaces cannot be listed or a filter cannot be deleted.
pub fn remove_filters() -> std::io::Result<usize> {
    let mut removed = 0;
    for link in netlink::links()? {
        let Ok(filters) = netlink::ingress_filters(link.ifindex) else { continue };
        for f in filters {
            if filter_role(&f).is_some() {
                netlink::delete_filter(link.ifindex, f.priority, f.handle)?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

fn release(ifindex: u32, attachment: Attachment) {
    match attachment {
        Attachment::Pinned { pin, link } => remove_pinned(&pin, link),
        Attachment::Filter { priority, handle } => remove_filter(ifindex, priority, handle),
    }
}

/// The loaded program's tag (a hash of its instructions).
fn program_tag(prog: &SchedClassifier) -> Option<u64> {
    prog.info().ok().map(|i| i.tag())
}

#[expect(clippy::too_many_arguments, reason = "one call site; a struct would only rename them")]
fn attach(
    prog: &mut SchedClassifier,
    role: &str,
    name: &str,
    ifindex: u32,
    tag: Option<u64>,
    links_dir: &Path,
    mode: AttachMode,
    in_place: bool,
) -> Result<Attachment, String> {
    let tcx_error = if mode == AttachMode::Tc {
        None
    } else {
        match prog.attach_with_options(name, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::default())) {
            Ok(id) => {
                let link = prog.take_link(id).map_err(|e| format!("taking the TCX link: {e}"))?;
                let link = FdLink::try_from(link).map_err(|e| format!("TCX link without an fd: {e}"))?;
                std::fs::create_dir_all(links_dir).map_err(|e| format!("creating {}: {e}", links_dir.display()))?;
                let pin = links_dir.join(pin_name(role, ifindex, name, tag.unwrap_or(0)));
                let pinned = link.pin(&pin).map_err(|e| format!("pinning the link at {}: {e}", pin.display()))?;
                return Ok(Attachment::Pinned { pin, link: pinned.into() });
            }
            Err(e) if mode == AttachMode::Tcx => return Err(format!("TCX attach failed ({e})")),
            // Kernels before 6.6 have no TCX: use a clsact qdisc.
            Err(e) => Some(e.to_string()),
        }
    };
    let context = |what: &str, e: &dyn std::fmt::Display| match &tcx_error {
        Some(tcx) => format!("TCX attach failed ({tcx}); {what} failed ({e})"),
        None => format!("{what} failed ({e})"),
    };
    if let Err(e) = tc::qdisc_add_clsact(name)
        && !matches!(&e, tc::TcError::NetlinkError(io) if io.raw_os_error() == Some(libc::EEXIST))
    {
        return Err(context("adding clsact", &e));
    }
    let (priority, handle) = filter_id(role);
    let id = if in_place {
        // The earlier agent's filter at this priority and handle gets this
        // program in one netlink change (cls_bpf swaps it atomically).
        let old = SchedClassifierLink::attached(name, TcAttachType::Ingress, priority, TcHandle::from(handle), None)
            .map_err(|e| context("finding the earlier filter", &e))?;
        prog.attach_to_link(old).map_err(|e| context("replacing the clsact filter", &e))?
    } else {
        prog.attach_with_options(
            name,
            TcAttachType::Ingress,
            TcAttachOptions::Netlink(NlOptions { priority, handle: TcHandle::from(handle), classid: None }),
        )
        .map_err(|e| context("clsact attach", &e))?
    };
    // Out of the program's own list, so unloading the program (the agent
    // exiting with --keep-on-exit) does not detach it; the agent finds the
    // filter again by its priority and handle. The link object is only
    // (ifindex, priority, handle): forgetting it leaks no resource, and
    // dropping it would delete the filter.
    let link = prog.take_link(id).map_err(|e| context("taking the filter link", &e))?;
    std::mem::forget(link);
    Ok(Attachment::Filter { priority, handle })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_the_shell() {
        let g = Globs::parse("veth*, cali*,lxc*,eth?");
        for yes in ["veth1", "veth", "cali123abc", "lxc00", "eth0"] {
            assert!(g.matches(yes), "{yes}");
        }
        for no in ["eth10", "lo", "xveth1", "cilium_host", ""] {
            assert!(!g.matches(no), "{no}");
        }
    }

    #[test]
    fn pin_names_round_trip() {
        let name = pin_name(ROLE_POD, 42, "veth-a1", 0xdead_beef);
        assert_eq!(parse_pin_name(ROLE_POD, &name), Some((42, "veth-a1".into(), 0xdead_beef)));
        assert_eq!(parse_pin_name(ROLE_EXTERNAL, &name), None);
        let name = pin_name(ROLE_EXTERNAL, 2, "eth0", 7);
        assert_eq!(parse_pin_name(ROLE_EXTERNAL, &name), Some((2, "eth0".into(), 7)));
        assert_eq!(parse_pin_name(ROLE_POD, "services"), None);
    }

    #[test]
    fn tunnel_interfaces_by_kind_and_glob() {
        let link = |name: &str, kind: Option<&str>| LinkInfo {
            ifindex: 3,
            name: name.into(),
            link_type: ARPHRD_ETHER,
            kind: kind.map(str::to_owned),
        };
        let auto = TunnelInterfaces::parse("auto");
        assert!(auto.matches(&link("flannel.1", Some("vxlan"))));
        assert!(auto.matches(&link("wg0", Some("wireguard"))));
        assert!(!auto.matches(&link("veth1", Some("veth"))));
        assert!(!auto.matches(&link("eth0", None)));
        let globs = TunnelInterfaces::parse("auto,ovl*");
        assert!(globs.matches(&link("ovl3", None)));
        assert!(!TunnelInterfaces::parse("none").matches(&link("flannel.1", Some("vxlan"))));
        let sel = Selection { globs: Globs::parse("eth0"), tunnels: Some(auto), exclude: Globs::parse("veth*") };
        assert!(sel.matches(&link("eth0", None)) && !sel.is_tunnel(&link("eth0", None)));
        assert!(sel.is_tunnel(&link("vxlan.calico", Some("vxlan"))));
        assert!(!sel.matches(&link("veth-tun", Some("tun"))), "pod interfaces are never tunnels");
    }

    #[test]
    fn link_types_pick_the_build() {
        assert_eq!(is_l3(1), Some(false), "Ethernet");
        assert_eq!(is_l3(772), Some(false), "loopback");
        assert_eq!(is_l3(0xfffe), Some(true), "none: tun, WireGuard");
        assert_eq!(is_l3(768), Some(true), "IPIP");
        assert_eq!(is_l3(32), None, "InfiniBand");
    }

    #[test]
    fn filters_belong_to_a_role_by_priority_and_handle_then_by_name() {
        let filter = |priority, handle, name: &str| netlink::TcFilter {
            priority,
            handle,
            kind: "bpf".into(),
            name: name.into(),
            tag: None,
            prog_id: None,
        };
        assert_eq!(filter_role(&filter(FILTER_PRIORITY_POD, FILTER_HANDLE_POD, "anything")), Some(ROLE_POD));
        assert_eq!(
            filter_role(&filter(FILTER_PRIORITY_POD, FILTER_HANDLE_POD, service_common::PROG_EXTERNAL_INGRESS)),
            Some(ROLE_POD)
        );
        assert_eq!(filter_role(&filter(49152, 1, service_common::PROG_EXTERNAL_INGRESS_L3)), Some(ROLE_EXTERNAL));
        assert_eq!(filter_role(&filter(49152, 1, "cil_from_container")), None);
        assert_eq!("tc".parse::<AttachMode>(), Ok(AttachMode::Tc));
        assert!("tcp".parse::<AttachMode>().is_err());
    }

    #[test]
    fn loopback_is_listed() {
        assert!(interfaces().iter().any(|(_, n)| n == "lo"));
    }
}
