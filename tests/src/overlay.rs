//! Two-node clusters whose cross-node traffic runs over an overlay or
//! tunnel device instead of the fabric's routes, the way CNIs wire nodes:
//! a VXLAN device on each node (flannel's wiring: the device has the node's
//! pod-CIDR `.0` address, the other node's pod CIDR is routed through it
//! via a permanent neighbour), or a TUN device on each node (an L3 device:
//! no Ethernet header, as WireGuard or IPIP are) joined by the `tun-relay`
//! process. The external client still reaches the nodes over the fabric.
//!
//! Built on [`NorthSouth`]: the same pods (a1 on node 1, b2 on node 2, a
//! client pod on node 1), Services and agents, started with
//! `--external-interfaces eth0` only — the overlay devices are found by
//! their link kind (`--tunnel-interfaces` defaults to `auto`).

use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
};

use crate::{
    cluster::{Cluster, node_ip, pod_cidr},
    netns::{ChildGuard, binary},
    north_south::{NorthSouth, Svc},
};

/// The overlay device's name on each node: neither name matches a glob of
/// the agent's, so only the link kind selects them.
pub const VXLAN_DEV: &str = "vx0";
pub const TUN_DEV: &str = "tun0";

/// Node `n`'s VXLAN device address: `.0` of its pod CIDR (as flannel).
#[must_use]
pub fn vxlan_ip(n: u8) -> Ipv4Addr {
    pod_cidr(n)
}

/// Node `n`'s TUN device address (a point-to-point link to the other node).
#[must_use]
pub fn tun_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 16, 0, n)
}

/// Where node 2 routes through its TUN device to node 1 (external IPs of
/// the tests' Services), from its TUN address.
pub const VIA_TUN: &str = "198.51.100.0/24";

/// Which overlay joins the nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Vxlan,
    Tun,
}

/// The cluster with its overlay. Field order is drop order: the cluster
/// (agents, servers, namespaces), then the relay (already killed with node
/// 2's namespace; reaped here).
pub struct Overlay {
    pub ns: NorthSouth,
    _relay: Option<ChildGuard>,
}

fn vxlan_mac(n: u8) -> String {
    format!("02:00:00:00:5d:{n:02x}")
}

fn other(n: u8) -> u8 {
    3 - n
}

fn wire_vxlan(c: &Cluster) {
    for n in 1..=2u8 {
        let node = &c.node(n).node;
        let (me, peer) = (node_ip(n).to_string(), node_ip(other(n)).to_string());
        node.ip(&[
            "link", "add", VXLAN_DEV, "type", "vxlan", "id", "42", "local", &me, "remote", &peer, "dstport", "4789",
            "dev", "eth0",
        ])
        .expect("vxlan device");
        node.ip(&["link", "set", VXLAN_DEV, "address", &vxlan_mac(n)]).expect("mac");
        node.ip(&["addr", "add", &format!("{}/32", vxlan_ip(n)), "dev", VXLAN_DEV]).expect("address");
        node.ip(&["link", "set", VXLAN_DEV, "up"]).expect("up");
        let gw = vxlan_ip(other(n)).to_string();
        node.ip(&["neigh", "add", &gw, "lladdr", &vxlan_mac(other(n)), "dev", VXLAN_DEV, "nud", "permanent"])
            .expect("neighbour");
        let cidr = format!("{}/24", pod_cidr(other(n)));
        node.ip(&["route", "replace", &cidr, "via", &gw, "dev", VXLAN_DEV, "onlink"]).expect("pod CIDR route");
    }
}

fn wire_tun(c: &Cluster) -> ChildGuard {
    let (n1, n2) = (&c.node(1).node, &c.node(2).node);
    let (p1, p2) = (n1.path(), n2.path());
    let mut relay = n1
        .spawn(&binary("tun-relay", "TUN_RELAY_BIN"), &[&p1.to_string_lossy(), TUN_DEV, &p2.to_string_lossy(), TUN_DEV])
        .expect("tun-relay");
    let mut line = String::new();
    BufReader::new(relay.0.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("relay output");
    assert_eq!(line.trim(), "ready", "tun-relay did not start");
    for n in 1..=2u8 {
        let node = &c.node(n).node;
        node.ip(&["addr", "add", &tun_ip(n).to_string(), "peer", &tun_ip(other(n)).to_string(), "dev", TUN_DEV])
            .expect("address");
        node.ip(&["link", "set", TUN_DEV, "up"]).expect("up");
        let cidr = format!("{}/24", pod_cidr(other(n)));
        node.ip(&["route", "replace", &cidr, "dev", TUN_DEV]).expect("pod CIDR route");
    }
    n2.ip(&["route", "add", VIA_TUN, "dev", TUN_DEV, "src", &tun_ip(2).to_string()]).expect("route via the tunnel");
    relay
}

impl Overlay {
    /// Two nodes joined by `kind`, the agents started on `services` with
    /// `--external-interfaces eth0` (nothing names the overlay device).
    #[must_use]
    pub fn start(kind: Kind, services: &[Svc]) -> Self {
        let mut relay = None;
        let ns = NorthSouth::start_with(
            services,
            |c| match kind {
                Kind::Vxlan => wire_vxlan(c),
                Kind::Tun => relay = Some(wire_tun(c)),
            },
            &[&["--external-interfaces", "eth0"], &["--external-interfaces", "eth0"]],
        );
        Self { ns, _relay: relay }
    }
}
