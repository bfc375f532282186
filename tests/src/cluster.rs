//! A small multi-node cluster of network namespaces (BRIEF.md "Test
//! topology"): a fabric namespace holding a bridge, nodes joined to it by
//! their `eth0` (node addresses 192.168.100.1N/24), each node with its own
//! pods on 10.244.N.0/24 and routes to the other nodes' pod CIDRs, and an
//! external client on the fabric (192.168.100.100). Nothing connects to the
//! root namespace; everything is removed on drop.
//!
//! Dual-stack: every host also has the [`ipv6_twin`] of its IPv4 address
//! (nodes fd00:192:168:100::1N/64, the client fd00:192:168:100::100/64,
//! pods fd00:10:244:N::P/128 in node N's fd00:10:244:N::/64), with the
//! same routes in IPv6.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Result;

use crate::netns::{Family, Netns, Topology, ipv6_twin, run, unique_suffix};

/// The fabric's /24.
pub const FABRIC_PREFIX: u8 = 24;
/// The fabric's IPv6 prefix length (fd00:192:168:100::/64).
pub const FABRIC_PREFIX6: u8 = 64;
/// The prefix length of a node's IPv6 pod CIDR (fd00:10:244:N::/64).
pub const POD_CIDR_PREFIX6: u8 = 64;
/// The external client's address on the fabric.
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 100);

/// The external client's IPv6 address on the fabric.
#[must_use]
pub fn external_ip6() -> Ipv6Addr {
    ipv6_twin(EXTERNAL_IP)
}

/// The external client's address in `family`.
#[must_use]
pub fn external_addr(family: Family) -> IpAddr {
    family.addr(EXTERNAL_IP)
}

/// Node `n`'s (1-based) address on the fabric in `family`.
#[must_use]
pub fn node_addr(family: Family, n: u8) -> IpAddr {
    family.addr(node_ip(n))
}

/// Pod `p` on node `n` in `family`: 10.244.N.P or fd00:10:244:N::P.
#[must_use]
pub fn pod_addr(family: Family, n: u8, p: u8) -> IpAddr {
    family.addr(pod_ip(n, p))
}

/// Node `n`'s (1-based) address on the fabric.
#[must_use]
pub fn node_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 100, 10 + n)
}

/// Node `n`'s pod CIDR base (a /24).
#[must_use]
pub fn pod_cidr(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, n, 0)
}

/// Pod `p` on node `n`: 10.244.N.P.
#[must_use]
pub fn pod_ip(n: u8, p: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, n, p)
}

/// The cluster. Field order is drop order: nodes (and their pods), the
/// external client, then the fabric.
pub struct Cluster {
    pub nodes: Vec<Topology>,
    pub external: Netns,
    pub fabric: Netns,
    pub suffix: String,
}

impl Cluster {
    /// `count` nodes (1..=9) on one fabric, plus the external client.
    ///
    /// # Errors
    /// When a namespace, link or route cannot be made.
    pub fn new(count: u8) -> Result<Self> {
        let suffix = unique_suffix();
        let fabric = Netns::new(&format!("sd-fabric-{suffix}"))?;
        // No multicast snooping: neighbour solicitations (to solicited-node
        // multicast groups) are flooded like ARP broadcasts, whatever MLD
        // reports the bridge has or has not seen yet.
        fabric.ip(&["link", "add", "br0", "type", "bridge", "mcast_snooping", "0"])?;
        fabric.ip(&["link", "set", "br0", "up"])?;
        let mut nodes = Vec::new();
        for n in 1..=count {
            let node = Topology::new()?;
            let up = format!("up{suffix}{n}");
            run(
                "ip",
                &[
                    "link",
                    "add",
                    &up,
                    "netns",
                    fabric.name(),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    node.node.name(),
                ],
            )?;
            fabric.ip(&["link", "set", &up, "master", "br0"])?;
            fabric.ip(&["link", "set", &up, "up"])?;
            node.node.ip(&["addr", "add", &format!("{}/{FABRIC_PREFIX}", node_ip(n)), "dev", "eth0"])?;
            let addr6 = format!("{}/{FABRIC_PREFIX6}", ipv6_twin(node_ip(n)));
            node.node.ip(&["-6", "addr", "add", &addr6, "dev", "eth0", "nodad"])?;
            node.node.ip(&["link", "set", "eth0", "up"])?;
            nodes.push(node);
        }
        // Pod CIDR routes between nodes, as a CNI's host routes do.
        for (i, node) in nodes.iter().enumerate() {
            for other in 1..=count {
                if usize::from(other) != i + 1 {
                    let cidr = format!("{}/24", pod_cidr(other));
                    node.node.ip(&["route", "add", &cidr, "via", &node_ip(other).to_string()])?;
                    let cidr6 = format!("{}/{POD_CIDR_PREFIX6}", ipv6_twin(pod_cidr(other)));
                    node.node.ip(&["-6", "route", "add", &cidr6, "via", &ipv6_twin(node_ip(other)).to_string()])?;
                }
            }
        }
        let external = Netns::new(&format!("sd-external-{suffix}"))?;
        let ex = format!("ex{suffix}");
        run(
            "ip",
            &[
                "link",
                "add",
                &ex,
                "netns",
                fabric.name(),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                external.name(),
            ],
        )?;
        fabric.ip(&["link", "set", &ex, "master", "br0"])?;
        fabric.ip(&["link", "set", &ex, "up"])?;
        external.ip(&["addr", "add", &format!("{EXTERNAL_IP}/{FABRIC_PREFIX}"), "dev", "eth0"])?;
        external.ip(&["-6", "addr", "add", &format!("{}/{FABRIC_PREFIX6}", external_ip6()), "dev", "eth0", "nodad"])?;
        external.ip(&["link", "set", "eth0", "up"])?;
        Ok(Self { nodes, external, fabric, suffix })
    }

    /// Node `n` (1-based).
    ///
    /// # Panics
    /// When there is no such node.
    #[must_use]
    pub fn node(&self, n: u8) -> &Topology {
        &self.nodes[usize::from(n) - 1]
    }

    /// Routes `addr` (one host: /32 or /128) on the external client via
    /// node `n`'s address of the same family, as a load balancer or a BGP
    /// announcement of a Service address would.
    ///
    /// # Errors
    /// When the route cannot be added.
    pub fn route_from_external(&self, addr: IpAddr, n: u8) -> Result<()> {
        let family = if addr.is_ipv4() { Family::V4 } else { Family::V6 };
        let dst = format!("{addr}/{}", family.host_prefix());
        self.external.ip(&["route", "add", &dst, "via", &node_addr(family, n).to_string()])?;
        Ok(())
    }

    /// Node `n` (1-based), to add pods.
    ///
    /// # Panics
    /// When there is no such node.
    pub fn node_mut(&mut self, n: u8) -> &mut Topology {
        &mut self.nodes[usize::from(n) - 1]
    }
}
