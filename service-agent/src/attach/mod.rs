//! The attach manager: keeps a program attached to every interface it
//! selects, following links as they appear and disappear (an rtnetlink
//! link-event socket wakes it up). The agent runs two: the pod ingress
//! program on `--pod-interfaces`, the external ingress program on
//! `--external-interfaces` and on the node's overlay and tunnel devices
//! (`--tunnel-interfaces`).
//!
//! `select.rs` says which interfaces get which build (by name, kind and
//! link type); `hook.rs` puts one program on one interface and takes it
//! off (TCX link or clsact filter), lists what is attached where, and
//! cleans up; this file keeps each manager's set in step with the links.
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

mod hook;
pub mod netlink;
mod select;
pub mod sock_diag;
pub mod socket;

use std::{collections::BTreeMap, path::PathBuf};

use aya::programs::{
    SchedClassifier,
    links::{FdLink, PinnedLink},
};

pub use self::{
    hook::{
        AttachedProgram, FILTER_HANDLE_EXTERNAL, FILTER_HANDLE_POD, FILTER_PRIORITY_EXTERNAL, FILTER_PRIORITY_POD,
        ROLE_EXTERNAL, ROLE_POD, attached_programs, filter_id, remove_filters, remove_pinned_links,
    },
    select::{AttachMode, Selection, TUNNEL_KINDS, TunnelInterfaces, interfaces, is_l3, links},
};
use self::{
    hook::{
        Attachment, Leftover, attach, filter_role, parse_pin_name, program_tag, release, release_leftover,
        remove_filter, remove_pinned,
    },
    netlink::LinkInfo,
};
use crate::vocabulary::Globs;
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

#[cfg(test)]
mod tests {
    use super::{hook::pin_name, select::ARPHRD_ETHER, *};

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
