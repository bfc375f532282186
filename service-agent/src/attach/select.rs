//! Which interfaces get which program: the interfaces of this namespace
//! (rtnetlink's view, with link types and kinds), the overlay and tunnel
//! devices of `--tunnel-interfaces`, a manager's [`Selection`], the
//! Ethernet or L3 build by link type, and `--attach-mode`.

use std::ffi::CStr;

use super::netlink::{self, LinkInfo};
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
pub(super) const ARPHRD_ETHER: u16 = 1;
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
