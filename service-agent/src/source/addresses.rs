//! The node's own addresses, the third input of the model besides Services
//! and EndpointSlices: NodePort frontends answer on them
//! (`--nodeport-addresses`), and SNAT writes them as the source of traffic
//! sent to a backend on another node. Read with `getifaddrs(3)` and
//! `/proc/net/route`, which both answer for the caller's network namespace;
//! re-read whenever an address or link event arrives.

use std::{
    collections::BTreeMap,
    ffi::CStr,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use service_common::{FAMILY_IPV4, FAMILY_IPV6, SNAT_HAIRPIN, SnatAddrKey};

use crate::vocabulary::{Cidr, Globs};

/// One address of an interface.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct InterfaceAddr {
    pub ifindex: u32,
    pub interface: String,
    pub addr: IpAddr,
}

/// Whether an IPv6 interface address is one kube-proxy would use for
/// NodePorts and the dataplane for SNAT: not link-local (fe80::/10). A
/// link-local address is only meaningful with its interface (a zone),
/// kube-proxy's NodePort rules never name one, and a packet SNATed to it
/// could not be routed off the link. Unique-local (fc00::/7) and global
/// addresses both count (the kernel's "global" scope).
#[must_use]
pub fn usable_ipv6(addr: Ipv6Addr) -> bool {
    addr.segments()[0] & 0xffc0 != 0xfe80
}

/// Every IPv4 and IPv6 address of every interface, in the kernel's order
/// (an interface's primary address first, for each family), IPv6
/// link-local addresses left out ([`usable_ipv6`]).
#[must_use]
pub fn node_addresses() -> Vec<InterfaceAddr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free below with
    // freeifaddrs; every pointer read is checked for NULL first.
    unsafe {
        if libc::getifaddrs(&raw mut list) != 0 {
            return out;
        }
        let mut p = list;
        while !p.is_null() {
            let ifa = &*p;
            p = ifa.ifa_next;
            if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
                continue;
            }
            // Read unaligned: the pointer is typed for the generic
            // sockaddr, smaller than either family's.
            let addr = match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = ifa.ifa_addr.cast::<libc::sockaddr_in>().read_unaligned();
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = ifa.ifa_addr.cast::<libc::sockaddr_in6>().read_unaligned();
                    let a = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                    if !usable_ipv6(a) {
                        continue;
                    }
                    IpAddr::V6(a)
                }
                _ => continue,
            };
            let ifindex = libc::if_nametoindex(ifa.ifa_name);
            let interface = CStr::from_ptr(ifa.ifa_name).to_string_lossy().into_owned();
            out.push(InterfaceAddr { ifindex, interface, addr });
        }
        libc::freeifaddrs(list);
    }
    out
}

/// The interfaces that carry a default route of either family
/// (`/proc/net/route`: destination and mask 0; `/proc/net/ipv6_route`:
/// `::/0`, up and not a reject route, as the kernel lists the unreachable
/// defaults of `lo`): the default `--external-interfaces`. An IPv6-only
/// node has no IPv4 default route.
#[must_use]
pub fn default_route_interfaces() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    if let Ok(table) = std::fs::read_to_string("/proc/net/route") {
        out.extend(table.lines().skip(1).filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_owned())
        }));
    }
    if let Ok(table) = std::fs::read_to_string("/proc/net/ipv6_route") {
        out.extend(ipv6_default_route_interfaces(&table));
    }
    out.sort();
    out.dedup();
    out
}

/// The interfaces of `/proc/net/ipv6_route`'s default routes: destination
/// `::`, prefix length 0, flags with RTF_UP and without RTF_REJECT.
fn ipv6_default_route_interfaces(table: &str) -> Vec<String> {
    const RTF_UP: u32 = 0x0001;
    const RTF_REJECT: u32 = 0x0200;
    table
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (flags, interface) = (u32::from_str_radix(f.get(8)?, 16).ok()?, f.get(9)?);
            let default = f[0].bytes().all(|b| b == b'0') && f[1] == "00";
            (default && flags & RTF_UP != 0 && flags & RTF_REJECT == 0).then(|| (*interface).to_owned())
        })
        .collect()
}

/// What the node's addresses give the model and the SNAT rows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAddresses {
    /// Where NodePorts answer, both families.
    pub nodeport: Vec<IpAddr>,
    /// (ifindex or [`SNAT_HAIRPIN`], family) → SNAT source address: the
    /// `snat_addrs` rows as they are written.
    pub snat: BTreeMap<SnatAddrKey, IpAddr>,
}

fn family(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { FAMILY_IPV4 } else { FAMILY_IPV6 }
}

/// Applies kube-proxy's `--nodeport-addresses` meaning, per family as its
/// proxier of each family does (`NewNodePortAddresses`): the CIDRs of a
/// family select every node address of that family inside one of them (on
/// any interface); a family none of the CIDRs is of (and every family
/// without CIDRs) answers on every address of that family of the external
/// interfaces. SNAT uses each external interface's first address of each
/// family; hairpin traffic the first external interface's of each family.
///
/// `localhost_nodeports` (`--localhost-nodeports`, kube-proxy's
/// `--iptables-localhost-nodeports`) adds 127.0.0.1 when no CIDR is IPv4
/// or one of them contains it, kube-proxy's rule (its
/// `ContainsIPv4Loopback`): IPv4 CIDRs that leave loopback out turn the
/// flag off, and without the flag a CIDR containing 127.0.0.1 does not
/// turn it on (kube-proxy's iptables mode skips loopback node IPs then).
/// IPv6 has no localhost NodePorts (nor has kube-proxy: the kernel has no
/// `route_localnet` for IPv6).
#[must_use]
pub fn select(
    all: &[InterfaceAddr],
    external: &Globs,
    nodeport_cidrs: &[Cidr],
    localhost_nodeports: bool,
) -> NodeAddresses {
    let on_external = |a: &&InterfaceAddr| external.matches(&a.interface);
    let cidrs_of = |v4: bool| nodeport_cidrs.iter().filter(move |c| c.addr.is_ipv4() == v4);
    let mut nodeport: Vec<IpAddr> = Vec::new();
    for v4 in [true, false] {
        let of_family = all.iter().filter(|a| a.addr.is_ipv4() == v4);
        if cidrs_of(v4).next().is_none() {
            nodeport.extend(of_family.filter(on_external).map(|a| a.addr));
        } else {
            nodeport.extend(
                of_family.filter(|a| !a.addr.is_loopback() && cidrs_of(v4).any(|c| c.contains(a.addr))).map(|a| a.addr),
            );
        }
    }
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut v4_cidrs = cidrs_of(true).peekable();
    if localhost_nodeports && (v4_cidrs.peek().is_none() || v4_cidrs.any(|c| c.contains(localhost))) {
        nodeport.push(localhost);
    }
    nodeport.sort();
    nodeport.dedup();
    let mut snat = BTreeMap::new();
    for a in all.iter().filter(on_external) {
        snat.entry(SnatAddrKey::new(a.ifindex, family(a.addr))).or_insert(a.addr);
        snat.entry(SnatAddrKey::new(SNAT_HAIRPIN, family(a.addr))).or_insert(a.addr);
    }
    NodeAddresses { nodeport, snat }
}

/// Adds a SNAT row for each of `interfaces` (the overlay and tunnel
/// devices) and each family it has an address of, keeping rows already
/// chosen: a flow SNATed out of a tunnel gets the tunnel's address, as
/// MASQUERADE gives it, so the reply returns through the tunnel. NodePorts
/// do not answer there.
pub fn add_snat_interfaces(
    all: &[InterfaceAddr],
    interfaces: &std::collections::BTreeSet<String>,
    out: &mut NodeAddresses,
) {
    for a in all.iter().filter(|a| interfaces.contains(&a.interface)) {
        out.snat.entry(SnatAddrKey::new(a.ifindex, family(a.addr))).or_insert(a.addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(ifindex: u32, interface: &str, a: &str) -> InterfaceAddr {
        InterfaceAddr { ifindex, interface: interface.into(), addr: a.parse().expect("address") }
    }

    fn ip(a: &str) -> IpAddr {
        a.parse().expect("address")
    }

    fn v4(ifindex: u32) -> SnatAddrKey {
        SnatAddrKey::new(ifindex, FAMILY_IPV4)
    }

    fn v6(ifindex: u32) -> SnatAddrKey {
        SnatAddrKey::new(ifindex, FAMILY_IPV6)
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn without_cidrs_nodeports_answer_on_the_external_interfaces() {
        let all = [
            addr(1, "lo", "127.0.0.1"),
            addr(2, "eth0", "192.168.100.11"),
            addr(2, "eth0", "192.168.100.21"),
            addr(3, "eth1", "10.0.0.1"),
        ];
        let got = select(&all, &Globs::parse("eth0"), &[], false);
        assert_eq!(got.nodeport, vec![ip("192.168.100.11"), ip("192.168.100.21")]);
        // The interface's first address; hairpin (0) too.
        assert_eq!(got.snat, BTreeMap::from([(v4(0), ip("192.168.100.11")), (v4(2), ip("192.168.100.11"))]));
    }

    #[test]
    fn cidrs_select_node_addresses_on_any_interface() {
        let all = [addr(1, "lo", "127.0.0.1"), addr(2, "eth0", "192.168.100.11"), addr(3, "eth1", "10.0.0.1")];
        let got = select(&all, &Globs::parse("eth0"), &cidrs(&["10.0.0.0/8", "127.0.0.0/8"]), false);
        assert_eq!(got.nodeport, vec![ip("10.0.0.1")]);
    }

    const DUAL: [(u32, &str, &str); 7] = [
        (1, "lo", "127.0.0.1"),
        (1, "lo", "::1"),
        (2, "eth0", "192.168.0.2"),
        (2, "eth0", "2001:db8::1"),
        (2, "eth0", "2001:db8:1::2"),
        (3, "eth1", "10.0.0.1"),
        (3, "eth1", "fd00::1"),
    ];

    fn dual() -> Vec<InterfaceAddr> {
        DUAL.iter().map(|(i, name, a)| addr(*i, name, a)).collect()
    }

    #[test]
    fn nodeports_answer_on_the_external_interfaces_addresses_of_both_families() {
        let got = select(&dual(), &Globs::parse("eth0"), &[], false);
        assert_eq!(got.nodeport, vec![ip("192.168.0.2"), ip("2001:db8::1"), ip("2001:db8:1::2")]);
    }

    /// kube-proxy's `NewNodePortAddresses`: each family takes the CIDRs of
    /// its own family; a family without any answers on all its addresses.
    #[test]
    fn nodeport_addresses_cidrs_apply_per_family() {
        let eth0 = Globs::parse("eth0");
        // kube-proxy's TestNodePorts "ipv6": 2001:db8::1/128 only.
        let both = select(&dual(), &eth0, &cidrs(&["192.168.0.2/32", "2001:db8::1/128"]), false);
        assert_eq!(both.nodeport, vec![ip("192.168.0.2"), ip("2001:db8::1")]);
        // "ipv6, multiple nodeport-addresses": a /64 and another interface.
        let wide = select(&dual(), &eth0, &cidrs(&["2001:db8::/64", "fd00::/8"]), false);
        assert_eq!(wide.nodeport, vec![ip("192.168.0.2"), ip("2001:db8::1"), ip("fd00::1")]);
        // IPv4 CIDRs only: IPv6 answers on the external interfaces'.
        let v4_only = select(&dual(), &eth0, &cidrs(&["10.0.0.0/8"]), false);
        assert_eq!(v4_only.nodeport, vec![ip("10.0.0.1"), ip("2001:db8::1"), ip("2001:db8:1::2")]);
        // ::1 is never a NodePort address, even under ::/0.
        let all6 = select(&dual(), &eth0, &cidrs(&["::/0"]), false);
        assert!(!all6.nodeport.contains(&ip("::1")));
        // Only IPv6 CIDRs: IPv4 has none, so localhost NodePorts follow
        // the flag as without CIDRs (kube-proxy adds 0.0.0.0/0 for IPv4).
        assert!(select(&dual(), &eth0, &cidrs(&["2001:db8::/64"]), true).nodeport.contains(&ip("127.0.0.1")));
    }

    #[test]
    fn snat_rows_are_written_per_interface_and_family_with_a_hairpin_row_per_family() {
        let mut got = select(&dual(), &Globs::parse("eth0"), &[], false);
        add_snat_interfaces(&dual(), &std::collections::BTreeSet::from(["eth1".to_owned()]), &mut got);
        assert_eq!(
            got.snat,
            BTreeMap::from([
                (v4(0), ip("192.168.0.2")),
                (v6(0), ip("2001:db8::1")),
                (v4(2), ip("192.168.0.2")),
                (v6(2), ip("2001:db8::1")),
                (v4(3), ip("10.0.0.1")),
                (v6(3), ip("fd00::1")),
            ])
        );
        // An IPv6-only external interface: IPv6 rows only.
        let v6_only = [addr(2, "eth0", "2001:db8::1")];
        let got = select(&v6_only, &Globs::parse("eth0"), &[], false);
        assert_eq!(got.snat, BTreeMap::from([(v6(0), ip("2001:db8::1")), (v6(2), ip("2001:db8::1"))]));
    }

    #[test]
    fn link_local_ipv6_addresses_are_not_node_addresses() {
        assert!(!usable_ipv6("fe80::1".parse().unwrap()));
        assert!(!usable_ipv6("febf:ffff::1".parse().unwrap()));
        assert!(usable_ipv6("fec0::1".parse().unwrap()));
        assert!(usable_ipv6("fd00::1".parse().unwrap()));
        assert!(usable_ipv6("2001:db8::1".parse().unwrap()));
        assert!(node_addresses().iter().all(|a| match a.addr {
            IpAddr::V6(a) => usable_ipv6(a),
            IpAddr::V4(_) => true,
        }));
    }

    #[test]
    fn ipv6_default_routes_are_read_without_the_reject_routes_of_lo() {
        let table = "\
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003     eth1
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
";
        assert_eq!(ipv6_default_route_interfaces(table), ["eth1"]);
    }

    /// kube-proxy's TestNodePorts (iptables): localhost NodePorts only with
    /// the flag, and only when `--nodeport-addresses` is unset or lets
    /// 127.0.0.1 in.
    #[test]
    fn localhost_nodeports_add_127_0_0_1_when_the_cidrs_allow_it() {
        let all = [addr(1, "lo", "127.0.0.1"), addr(2, "eth0", "192.168.0.2"), addr(2, "eth0", "192.168.1.2")];
        let eth0 = Globs::parse("eth0");
        let localhost = ip("127.0.0.1");
        // Unset: every external address, and 127.0.0.1 with the flag only.
        let on = select(&all, &eth0, &[], true).nodeport;
        assert_eq!(on, vec![localhost, ip("192.168.0.2"), ip("192.168.1.2")]);
        assert!(!select(&all, &eth0, &[], false).nodeport.contains(&localhost));
        // A CIDR containing 127.0.0.1: on with the flag ("localhost in
        // nodeport-addresses"), off without it ("localhost-nodeports
        // disabled, localhost in nodeport-addresses").
        let with_lo = cidrs(&["192.168.0.0/24", "127.0.0.1/32"]);
        assert_eq!(select(&all, &eth0, &with_lo, true).nodeport, vec![localhost, ip("192.168.0.2")]);
        assert_eq!(select(&all, &eth0, &with_lo, false).nodeport, vec![ip("192.168.0.2")]);
        assert_eq!(select(&all, &eth0, &cidrs(&["127.0.0.0/8"]), true).nodeport, vec![localhost]);
        // CIDRs that leave loopback out turn the flag off.
        let without_lo = select(&all, &eth0, &cidrs(&["192.168.0.0/16"]), true).nodeport;
        assert_eq!(without_lo, vec![ip("192.168.0.2"), ip("192.168.1.2")]);
    }

    #[test]
    fn an_external_interface_without_addresses_gets_no_snat_row() {
        let got = select(&[addr(1, "lo", "127.0.0.1")], &Globs::parse("eth0"), &[], false);
        assert!(got.nodeport.is_empty());
        assert!(got.snat.is_empty());
    }

    #[test]
    fn tunnel_interfaces_get_snat_rows_but_no_nodeports() {
        let all = [addr(2, "eth0", "192.168.100.11"), addr(5, "flannel.1", "10.244.1.0")];
        let mut got = select(&all, &Globs::parse("eth0"), &[], false);
        add_snat_interfaces(&all, &std::collections::BTreeSet::from(["flannel.1".to_owned()]), &mut got);
        assert_eq!(got.nodeport, vec![ip("192.168.100.11")]);
        assert_eq!(got.snat.get(&v4(5)), Some(&ip("10.244.1.0")));
        assert_eq!(got.snat.get(&v4(0)), Some(&ip("192.168.100.11")), "hairpin stays external");
    }

    #[test]
    fn this_namespace_has_a_loopback_address() {
        assert!(node_addresses().iter().any(|a| a.addr.is_loopback()));
    }
}
