//! The node's own addresses, the third input of the model besides Services
//! and EndpointSlices: NodePort frontends answer on them
//! (`--nodeport-addresses`), and SNAT writes them as the source of traffic
//! sent to a backend on another node. Read with `getifaddrs(3)` and
//! `/proc/net/route`, which both answer for the caller's network namespace;
//! re-read whenever an address or link event arrives.

use std::{
    collections::BTreeMap,
    ffi::CStr,
    net::{IpAddr, Ipv4Addr},
};

use crate::vocabulary::{Cidr, Globs};

/// One IPv4 address of an interface.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct InterfaceAddr {
    pub ifindex: u32,
    pub interface: String,
    pub addr: Ipv4Addr,
}

/// Every IPv4 address of every interface, in the kernel's order (an
/// interface's primary address first).
#[must_use]
pub fn ipv4_addresses() -> Vec<InterfaceAddr> {
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
            if !ifa.ifa_addr.is_null()
                && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET
                && !ifa.ifa_name.is_null()
            {
                // An AF_INET address is a sockaddr_in; read unaligned, as
                // the pointer is typed for the smaller sockaddr.
                let sin = ifa.ifa_addr.cast::<libc::sockaddr_in>().read_unaligned();
                let addr = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                let ifindex = libc::if_nametoindex(ifa.ifa_name);
                let interface = CStr::from_ptr(ifa.ifa_name).to_string_lossy().into_owned();
                out.push(InterfaceAddr { ifindex, interface, addr });
            }
            p = ifa.ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out
}

/// The interfaces that carry an IPv4 default route (`/proc/net/route`:
/// destination and mask 0): the default `--external-interfaces`.
#[must_use]
pub fn default_route_interfaces() -> Vec<String> {
    let Ok(table) = std::fs::read_to_string("/proc/net/route") else { return Vec::new() };
    let mut out: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_owned())
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What the node's addresses give the model and the SNAT rows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAddresses {
    /// Where NodePorts answer.
    pub nodeport: Vec<IpAddr>,
    /// ifindex (or `service_common::SNAT_HAIRPIN`) → SNAT source address.
    pub snat: BTreeMap<u32, Ipv4Addr>,
}

/// Applies kube-proxy's `--nodeport-addresses` meaning: with CIDRs, every
/// node address inside one of them (on any interface); without, every
/// address of the external interfaces. SNAT uses each external interface's
/// first address; hairpin traffic the first external interface's.
///
/// `localhost_nodeports` (`--localhost-nodeports`, kube-proxy's
/// `--iptables-localhost-nodeports`) adds 127.0.0.1 when
/// `nodeport_cidrs` is empty or one of them contains it, kube-proxy's rule
/// (its `ContainsIPv4Loopback`): CIDRs that leave loopback out turn the
/// flag off, and without the flag a CIDR containing 127.0.0.1 does not
/// turn it on (kube-proxy's iptables mode skips loopback node IPs then).
#[must_use]
pub fn select(
    all: &[InterfaceAddr],
    external: &Globs,
    nodeport_cidrs: &[Cidr],
    localhost_nodeports: bool,
) -> NodeAddresses {
    let on_external = |a: &&InterfaceAddr| external.matches(&a.interface);
    let mut nodeport: Vec<IpAddr> = if nodeport_cidrs.is_empty() {
        all.iter().filter(on_external).map(|a| IpAddr::V4(a.addr)).collect()
    } else {
        all.iter()
            .filter(|a| !a.addr.is_loopback())
            .filter(|a| nodeport_cidrs.iter().any(|c| c.contains(IpAddr::V4(a.addr))))
            .map(|a| IpAddr::V4(a.addr))
            .collect()
    };
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    if localhost_nodeports && (nodeport_cidrs.is_empty() || nodeport_cidrs.iter().any(|c| c.contains(localhost))) {
        nodeport.push(localhost);
    }
    nodeport.sort();
    nodeport.dedup();
    let mut snat = BTreeMap::new();
    for a in all.iter().filter(on_external) {
        snat.entry(a.ifindex).or_insert(a.addr);
        snat.entry(service_common::SNAT_HAIRPIN).or_insert(a.addr);
    }
    NodeAddresses { nodeport, snat }
}

/// Adds a SNAT row for each of `interfaces` (the overlay and tunnel
/// devices) that has an address, keeping rows already chosen: a flow SNATed
/// out of a tunnel gets the tunnel's address, as MASQUERADE gives it, so
/// the reply returns through the tunnel. NodePorts do not answer there.
pub fn add_snat_interfaces(
    all: &[InterfaceAddr],
    interfaces: &std::collections::BTreeSet<String>,
    out: &mut NodeAddresses,
) {
    for a in all.iter().filter(|a| interfaces.contains(&a.interface)) {
        out.snat.entry(a.ifindex).or_insert(a.addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(ifindex: u32, interface: &str, a: [u8; 4]) -> InterfaceAddr {
        InterfaceAddr { ifindex, interface: interface.into(), addr: Ipv4Addr::from(a) }
    }

    #[test]
    fn without_cidrs_nodeports_answer_on_the_external_interfaces() {
        let all = [
            addr(1, "lo", [127, 0, 0, 1]),
            addr(2, "eth0", [192, 168, 100, 11]),
            addr(2, "eth0", [192, 168, 100, 21]),
            addr(3, "eth1", [10, 0, 0, 1]),
        ];
        let got = select(&all, &Globs::parse("eth0"), &[], false);
        assert_eq!(got.nodeport, vec![IpAddr::from([192, 168, 100, 11]), IpAddr::from([192, 168, 100, 21])]);
        // The interface's first address; hairpin (0) too.
        assert_eq!(
            got.snat,
            BTreeMap::from([(0, Ipv4Addr::new(192, 168, 100, 11)), (2, Ipv4Addr::new(192, 168, 100, 11))])
        );
    }

    #[test]
    fn cidrs_select_node_addresses_on_any_interface() {
        let all = [addr(1, "lo", [127, 0, 0, 1]), addr(2, "eth0", [192, 168, 100, 11]), addr(3, "eth1", [10, 0, 0, 1])];
        let cidrs: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap(), "127.0.0.0/8".parse().unwrap()];
        let got = select(&all, &Globs::parse("eth0"), &cidrs, false);
        assert_eq!(got.nodeport, vec![IpAddr::from([10, 0, 0, 1])]);
    }

    /// kube-proxy's TestNodePorts (iptables): localhost NodePorts only with
    /// the flag, and only when `--nodeport-addresses` is unset or lets
    /// 127.0.0.1 in.
    #[test]
    fn localhost_nodeports_add_127_0_0_1_when_the_cidrs_allow_it() {
        let all = [addr(1, "lo", [127, 0, 0, 1]), addr(2, "eth0", [192, 168, 0, 2]), addr(2, "eth0", [192, 168, 1, 2])];
        let eth0 = Globs::parse("eth0");
        let localhost = IpAddr::from([127, 0, 0, 1]);
        let cidrs = |list: &[&str]| -> Vec<Cidr> { list.iter().map(|c| c.parse().unwrap()).collect() };
        // Unset: every external address, and 127.0.0.1 with the flag only.
        let on = select(&all, &eth0, &[], true).nodeport;
        assert_eq!(on, vec![localhost, IpAddr::from([192, 168, 0, 2]), IpAddr::from([192, 168, 1, 2])]);
        assert!(!select(&all, &eth0, &[], false).nodeport.contains(&localhost));
        // A CIDR containing 127.0.0.1: on with the flag ("localhost in
        // nodeport-addresses"), off without it ("localhost-nodeports
        // disabled, localhost in nodeport-addresses").
        let with_lo = cidrs(&["192.168.0.0/24", "127.0.0.1/32"]);
        assert_eq!(select(&all, &eth0, &with_lo, true).nodeport, vec![localhost, IpAddr::from([192, 168, 0, 2])]);
        assert_eq!(select(&all, &eth0, &with_lo, false).nodeport, vec![IpAddr::from([192, 168, 0, 2])]);
        assert_eq!(select(&all, &eth0, &cidrs(&["127.0.0.0/8"]), true).nodeport, vec![localhost]);
        // CIDRs that leave loopback out turn the flag off.
        let without_lo = select(&all, &eth0, &cidrs(&["192.168.0.0/16"]), true).nodeport;
        assert_eq!(without_lo, vec![IpAddr::from([192, 168, 0, 2]), IpAddr::from([192, 168, 1, 2])]);
    }

    #[test]
    fn an_external_interface_without_addresses_gets_no_snat_row() {
        let got = select(&[addr(1, "lo", [127, 0, 0, 1])], &Globs::parse("eth0"), &[], false);
        assert!(got.nodeport.is_empty());
        assert!(got.snat.is_empty());
    }

    #[test]
    fn tunnel_interfaces_get_snat_rows_but_no_nodeports() {
        let all = [addr(2, "eth0", [192, 168, 100, 11]), addr(5, "flannel.1", [10, 244, 1, 0])];
        let mut got = select(&all, &Globs::parse("eth0"), &[], false);
        add_snat_interfaces(&all, &std::collections::BTreeSet::from(["flannel.1".to_owned()]), &mut got);
        assert_eq!(got.nodeport, vec![IpAddr::from([192, 168, 100, 11])]);
        assert_eq!(got.snat.get(&5), Some(&Ipv4Addr::new(10, 244, 1, 0)));
        assert_eq!(got.snat.get(&0), Some(&Ipv4Addr::new(192, 168, 100, 11)), "hairpin stays external");
    }

    #[test]
    fn this_namespace_has_a_loopback_address() {
        assert!(ipv4_addresses().iter().any(|a| a.addr.is_loopback()));
    }
}
