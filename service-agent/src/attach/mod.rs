//! The attach manager: keeps a program attached to every interface whose
//! name matches its globs, following links as they appear and disappear (an
//! rtnetlink link-event socket wakes it up). The agent runs two: the pod
//! ingress program on `--pod-interfaces`, the external ingress program on
//! `--external-interfaces`.
//!
//! Attachment uses a TCX link (kernel 6.6+) and falls back to a clsact
//! qdisc with a cls_bpf filter on older kernels.

pub mod netlink;

use std::{
    collections::BTreeMap,
    ffi::CStr,
    path::{Path, PathBuf},
};

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions},
};

/// Interface name globs (`*` and `?`), kube-proxy-style comma separated.
#[derive(Clone, Debug)]
pub struct Globs(Vec<String>);

impl Globs {
    #[must_use]
    pub fn parse(list: &str) -> Self {
        Self(list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
    }

    #[must_use]
    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|g| glob_match(g.as_bytes(), name.as_bytes()))
    }
}

fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.split_first(), name.split_first()) {
        (None, None) => true,
        (Some((b'*', rest)), _) => glob_match(rest, name) || (!name.is_empty() && glob_match(pattern, &name[1..])),
        (Some((b'?', rest)), Some((_, name_rest))) => glob_match(rest, name_rest),
        (Some((p, rest)), Some((n, name_rest))) if p == n => glob_match(rest, name_rest),
        _ => false,
    }
}

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

/// What one [`AttachManager::sync`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub attached: Vec<String>,
    /// Links an earlier agent pinned, running this very program: kept.
    pub adopted: Vec<String>,
    /// Links an earlier agent pinned, running another program (an
    /// upgrade): replaced, new program first.
    pub replaced: Vec<String>,
    pub gone: Vec<String>,
    pub failed: Vec<(String, String)>,
}

/// One interface's attachment.
enum Attachment {
    /// A TCX link pinned under `<bpffs-root>/links/`, so it survives the
    /// agent being killed; detached by removing the pin and closing `link`.
    Pinned { pin: PathBuf, link: FdLink },
    /// A clsact/cls_bpf filter (kernels before 6.6); not pinnable.
    Netlink(SchedClassifierLinkId),
}

/// Attachments by ifindex.
pub struct AttachManager {
    /// The pin name prefix of this manager's links ([`ROLE_POD`],
    /// [`ROLE_EXTERNAL`]).
    role: &'static str,
    globs: Globs,
    links_dir: PathBuf,
    attached: BTreeMap<u32, (String, Attachment)>,
    /// Pinned links of an earlier agent running another program, replaced
    /// by the next sync: (ifindex, name, pin, link).
    replacing: Vec<(u32, String, PathBuf, FdLink)>,
}

/// Pin prefix of the pod ingress program's links.
pub const ROLE_POD: &str = "ingress";
/// Pin prefix of the external ingress program's links.
pub const ROLE_EXTERNAL: &str = "external";

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

impl AttachManager {
    /// `links_dir` (created if needed) holds the link pins; it must be on a
    /// BPF filesystem (the agent uses `<bpffs-root>/links`).
    #[must_use]
    pub fn new(role: &'static str, globs: Globs, links_dir: PathBuf) -> Self {
        Self { role, globs, links_dir, attached: BTreeMap::new(), replacing: Vec::new() }
    }

    /// Replaces the globs (the default external interfaces follow the
    /// default route); the next [`Self::sync`] applies them.
    pub fn set_globs(&mut self, globs: Globs) {
        self.globs = globs;
    }

    /// Takes over the links an earlier agent pinned: those on interfaces
    /// that still match and run this program are kept as they are (no
    /// packet notices the restart); those running another program are
    /// replaced by [`Self::sync`] (the new link first); the rest are removed.
    pub fn adopt(&mut self, prog: &SchedClassifier) -> SyncReport {
        let mut report = SyncReport::default();
        let Ok(entries) = std::fs::read_dir(&self.links_dir) else { return report };
        let tag = program_tag(prog);
        let now: BTreeMap<u32, String> = interfaces().into_iter().collect();
        let mut stale = Vec::new();
        for entry in entries.filter_map(Result::ok) {
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
            let live = now.get(&ifindex) == Some(&name) && self.globs.matches(&name);
            if live && Some(pinned_tag) == tag && !self.attached.contains_key(&ifindex) {
                self.attached.insert(ifindex, (name.clone(), Attachment::Pinned { pin, link }));
                report.adopted.push(name);
            } else if live && !self.attached.contains_key(&ifindex) {
                stale.push((ifindex, name, pin, link));
            } else {
                remove_pinned(&pin, link);
            }
        }
        // Another program (an upgrade): attach ours next to it first, then
        // remove the old link, so the interface is never without one.
        self.replacing = stale;
        report
    }

    /// Attaches to every matching interface not attached yet and forgets
    /// interfaces that are gone (the kernel removed their links with them).
    pub fn sync(&mut self, prog: &mut SchedClassifier) -> SyncReport {
        let mut report = SyncReport::default();
        let now: BTreeMap<u32, String> = interfaces().into_iter().filter(|(_, n)| self.globs.matches(n)).collect();
        let gone: Vec<u32> =
            self.attached.iter().filter(|(idx, (name, _))| now.get(idx) != Some(name)).map(|(i, _)| *i).collect();
        for idx in gone {
            if let Some((name, attachment)) = self.attached.remove(&idx) {
                // The interface is gone (the kernel removed the link with
                // it), or no longer matches (its link is detached here).
                release(prog, attachment);
                report.gone.push(name);
            }
        }
        let tag = program_tag(prog);
        for (idx, name) in now {
            if self.attached.contains_key(&idx) {
                continue;
            }
            match attach(prog, self.role, &name, idx, tag, &self.links_dir) {
                Ok(attachment) => {
                    self.attached.insert(idx, (name.clone(), attachment));
                    if let Some(pos) = self.replacing.iter().position(|(i, n, _, _)| *i == idx && *n == name) {
                        let (_, _, pin, link) = self.replacing.remove(pos);
                        remove_pinned(&pin, link);
                        report.replaced.push(name);
                    } else {
                        report.attached.push(name);
                    }
                }
                Err(e) => report.failed.push((name, e)),
            }
        }
        report
    }

    /// Names of the interfaces attached to.
    #[must_use]
    pub fn attached(&self) -> Vec<String> {
        self.attached.values().map(|(n, _)| n.clone()).collect()
    }

    /// Detaches from every interface and removes the link pins.
    pub fn detach_all(&mut self, prog: &mut SchedClassifier) {
        for (_, (_, attachment)) in std::mem::take(&mut self.attached) {
            release(prog, attachment);
        }
        for (_, _, pin, link) in std::mem::take(&mut self.replacing) {
            remove_pinned(&pin, link);
        }
        let _ = std::fs::remove_dir(&self.links_dir);
    }

    /// Leaves every link attached and pinned for the next agent, releasing
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

fn release(prog: &mut SchedClassifier, attachment: Attachment) {
    match attachment {
        Attachment::Pinned { pin, link } => remove_pinned(&pin, link),
        Attachment::Netlink(link) => {
            if let Err(e) = prog.detach(link) {
                tracing::debug!(error = %e, "detach (interface probably gone)");
            }
        }
    }
}

/// The loaded program's tag (a hash of its instructions).
fn program_tag(prog: &SchedClassifier) -> Option<u64> {
    prog.info().ok().map(|i| i.tag())
}

fn attach(
    prog: &mut SchedClassifier,
    role: &str,
    name: &str,
    ifindex: u32,
    tag: Option<u64>,
    links_dir: &Path,
) -> Result<Attachment, String> {
    match prog.attach_with_options(name, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::default())) {
        Ok(id) => {
            let link = prog.take_link(id).map_err(|e| format!("taking the TCX link: {e}"))?;
            let link = FdLink::try_from(link).map_err(|e| format!("TCX link without an fd: {e}"))?;
            std::fs::create_dir_all(links_dir).map_err(|e| format!("creating {}: {e}", links_dir.display()))?;
            let pin = links_dir.join(pin_name(role, ifindex, name, tag.unwrap_or(0)));
            let pinned = link.pin(&pin).map_err(|e| format!("pinning the link at {}: {e}", pin.display()))?;
            Ok(Attachment::Pinned { pin, link: pinned.into() })
        }
        Err(tcx_error) => {
            // Kernels before 6.6 have no TCX: use a clsact qdisc.
            if let Err(e) = tc::qdisc_add_clsact(name)
                && !matches!(&e, tc::TcError::NetlinkError(io) if io.raw_os_error() == Some(libc::EEXIST))
            {
                return Err(format!("TCX attach failed ({tcx_error}); adding clsact failed ({e})"));
            }
            prog.attach_with_options(name, TcAttachType::Ingress, TcAttachOptions::Netlink(NlOptions::default()))
                .map(Attachment::Netlink)
                .map_err(|e| format!("TCX attach failed ({tcx_error}); clsact attach failed ({e})"))
        }
    }
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
    fn loopback_is_listed() {
        assert!(interfaces().iter().any(|(_, n)| n == "lo"));
    }
}
