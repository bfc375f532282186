//! The attach manager: keeps the pod-ingress program attached to every
//! interface whose name matches `--pod-interfaces`, following links as they
//! appear and disappear (an rtnetlink link-event socket wakes it up).
//!
//! Attachment uses a TCX link (kernel 6.6+) and falls back to a clsact
//! qdisc with a cls_bpf filter on older kernels.

pub mod netlink;

use std::{collections::BTreeMap, ffi::CStr};

use aya::programs::{
    SchedClassifier, TcAttachType,
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
    pub gone: Vec<String>,
    pub failed: Vec<(String, String)>,
}

/// Attachments by ifindex.
pub struct AttachManager {
    globs: Globs,
    attached: BTreeMap<u32, (String, SchedClassifierLinkId)>,
}

impl AttachManager {
    #[must_use]
    pub fn new(globs: Globs) -> Self {
        Self { globs, attached: BTreeMap::new() }
    }

    /// Attaches to every matching interface not attached yet and forgets
    /// interfaces that are gone (the kernel removed their links with them).
    pub fn sync(&mut self, prog: &mut SchedClassifier) -> SyncReport {
        let mut report = SyncReport::default();
        let now: BTreeMap<u32, String> = interfaces().into_iter().filter(|(_, n)| self.globs.matches(n)).collect();
        let gone: Vec<u32> =
            self.attached.iter().filter(|(idx, (name, _))| now.get(idx) != Some(name)).map(|(i, _)| *i).collect();
        for idx in gone {
            if let Some((name, link)) = self.attached.remove(&idx) {
                // The kernel removed the link with the interface; this only
                // releases our handle.
                if let Err(e) = prog.detach(link) {
                    tracing::debug!(interface = %name, error = %e, "releasing the link of a removed interface");
                }
                report.gone.push(name);
            }
        }
        for (idx, name) in now {
            if self.attached.contains_key(&idx) {
                continue;
            }
            match attach(prog, &name) {
                Ok(link) => {
                    self.attached.insert(idx, (name.clone(), link));
                    report.attached.push(name);
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

    /// Detaches from every interface.
    pub fn detach_all(&mut self, prog: &mut SchedClassifier) {
        for (_, (name, link)) in std::mem::take(&mut self.attached) {
            if let Err(e) = prog.detach(link) {
                tracing::debug!(interface = %name, error = %e, "detach (interface probably gone)");
            }
        }
    }
}

fn attach(prog: &mut SchedClassifier, name: &str) -> Result<SchedClassifierLinkId, String> {
    match prog.attach(name, TcAttachType::Ingress) {
        Ok(link) => Ok(link),
        Err(tcx_error) => {
            // Kernels before 6.6 have no TCX: use a clsact qdisc.
            if let Err(e) = tc::qdisc_add_clsact(name)
                && !matches!(&e, tc::TcError::NetlinkError(io) if io.raw_os_error() == Some(libc::EEXIST))
            {
                return Err(format!("TCX attach failed ({tcx_error}); adding clsact failed ({e})"));
            }
            prog.attach_with_options(name, TcAttachType::Ingress, TcAttachOptions::Netlink(NlOptions::default()))
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
    fn loopback_is_listed() {
        assert!(interfaces().iter().any(|(_, n)| n == "lo"));
    }
}
