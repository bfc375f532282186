//! One program on one interface's ingress hook: attached as a TCX link
//! pinned under `<bpffs-root>/links/` by role, interface and program tag,
//! or as a clsact cls_bpf filter known by its priority and handle; taken
//! off again; listed (what is attached where); and every trace of the
//! agent's removed by `service-agent cleanup`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    links::FdLink,
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
};

use super::{
    netlink::{self, LinkInfo},
    select::{AttachMode, links},
};

/// How one interface's program is attached.
pub(super) enum Attachment {
    /// A TCX link pinned under `<bpffs-root>/links/`, so it survives the
    /// agent being killed; detached by removing the pin and closing `link`.
    Pinned { pin: PathBuf, link: FdLink },
    /// A clsact/cls_bpf filter (kernels before 6.6, `--attach-mode tc`):
    /// it stays until deleted, found again by its priority and handle.
    Filter { priority: u16, handle: u32 },
}

/// What an earlier agent left on an interface that is replaced once this
/// agent's program is attached there.
pub(super) enum Leftover {
    Pin { pin: PathBuf, link: FdLink },
    Filter { priority: u16, handle: u32 },
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
pub(super) fn role_programs(role: &str) -> [&'static str; 2] {
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
pub(super) fn filter_role(f: &netlink::TcFilter) -> Option<&'static str> {
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
pub(super) fn pin_name(role: &str, ifindex: u32, name: &str, tag: u64) -> String {
    format!("{role}-{ifindex}-{name}-{tag:016x}")
}

pub(super) fn parse_pin_name(role: &str, file: &str) -> Option<(u32, String, u64)> {
    let rest = file.strip_prefix(role)?.strip_prefix('-')?;
    let (ifindex, rest) = rest.split_once('-')?;
    let (name, tag) = rest.rsplit_once('-')?;
    Some((ifindex.parse().ok()?, name.to_owned(), u64::from_str_radix(tag, 16).ok()?))
}

/// Removes a pinned link: the pin, then our handle; the link is detached
/// when its last reference goes.
pub(super) fn remove_pinned(pin: &Path, link: FdLink) {
    if let Err(e) = std::fs::remove_file(pin) {
        tracing::warn!(pin = %pin.display(), error = %e, "removing a link pin");
    }
    drop(link);
}

/// Deletes a filter; one already gone (with its interface) is fine.
pub(super) fn remove_filter(ifindex: u32, priority: u16, handle: u32) {
    match netlink::delete_filter(ifindex, priority, handle) {
        Ok(()) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV | libc::EINVAL)) => {
            tracing::debug!(ifindex, priority, handle, error = %e, "filter already gone");
        }
        Err(e) => tracing::warn!(ifindex, priority, handle, error = %e, "deleting a clsact filter"),
    }
}

pub(super) fn release_leftover(ifindex: u32, leftover: Leftover) {
    match leftover {
        Leftover::Pin { pin, link } => remove_pinned(&pin, link),
        Leftover::Filter { priority, handle } => remove_filter(ifindex, priority, handle),
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

pub(super) fn release(ifindex: u32, attachment: Attachment) {
    match attachment {
        Attachment::Pinned { pin, link } => remove_pinned(&pin, link),
        Attachment::Filter { priority, handle } => remove_filter(ifindex, priority, handle),
    }
}

/// The loaded program's tag (a hash of its instructions).
pub(super) fn program_tag(prog: &SchedClassifier) -> Option<u64> {
    prog.info().ok().map(|i| i.tag())
}

#[expect(clippy::too_many_arguments, reason = "one call site; a struct would only rename them")]
pub(super) fn attach(
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
