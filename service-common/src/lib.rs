//! Map keys, values and constants shared by the eBPF programs
//! (`service-ebpf`) and the agent (`service-agent`).
//!
//! Rules for every type here (STYLE.md): `#[repr(C)]`, bytemuck `Pod`
//! (which refuses hidden padding), explicit `_pad` fields, fixed-width
//! integers and byte arrays only, and a size assertion beside each type.
//! Addresses and ports are kept in **network byte order** as byte arrays;
//! every other integer is in host order. Id 0 means "unset" in every id
//! space (backend ids, rev-NAT ids, versions).
#![no_std]

use core::mem::size_of;

pub mod conntrack;
pub mod csum;
pub mod hash;
pub mod stats;

/// Map names as pinned under the agent's `--bpffs-root`.
pub mod map_names {
    pub const SERVICES: &str = "services";
    pub const BACKENDS: &str = "backends";
    pub const REV_NAT: &str = "rev_nat";
    pub const CONNTRACK: &str = "conntrack";
    pub const STATS: &str = "stats";
    pub const SOURCE_RANGES: &str = "source_ranges";
    pub const AFFINITY: &str = "affinity";
    pub const SERVICE_COUNTERS: &str = "service_counters";
    pub const BACKEND_COUNTERS: &str = "backend_counters";
    pub const SNAT_ADDRS: &str = "snat_addrs";
    /// Flows not yet assured (an unanswered SYN, a UDP flow without a
    /// reply): a flood of them evicts only each other, never an assured
    /// flow in `conntrack`.
    pub const CONNTRACK_NEW: &str = "conntrack_new";
    /// First fragments' ports, for the later fragments of a datagram.
    pub const FRAGMENTS: &str = "fragments";
    /// The agent's own bookkeeping (never read by the programs): each
    /// map's layout version and the next backend / rev-NAT id, so an agent
    /// started over pins of another layout or size migrates them
    /// (`service-agent`'s `maps::layout`) and ids are not reused across
    /// restarts. Its own layout never changes.
    pub const AGENT_STATE: &str = "agent_state";
    /// The counters of `stats` per ingress interface
    /// ([`InterfaceCounterKey`](super::InterfaceCounterKey) → packets, per
    /// CPU), for every counter but the fast path's
    /// (`stats::Counter::per_interface`).
    pub const INTERFACE_STATS: &str = "interface_stats";
    /// Socket-level load balancing: what a translated socket was
    /// connected or sent to (socket cookie, backend) → the Service address,
    /// for `recvmsg` and `getpeername` to show the Service again.
    pub const SOCK_REV_NAT: &str = "sock_rev_nat";
    /// Socket-level load balancing's configuration, one row written by the
    /// agent (`SocketLbConfig`).
    pub const SOCKET_LB: &str = "socket_lb";
    /// Per frontend (rev-NAT id): the connect() and sendmsg() calls the
    /// socket-level programs translated (`SockCounters`, per CPU).
    pub const SOCK_COUNTERS: &str = "sock_counters";
    /// Every backend table, in one array of blocks
    /// ([`super::backend_slots`]).
    pub const BACKEND_SLOTS: &str = "backend_slots";
    pub const ALL: [&str; 18] = [
        SERVICES,
        BACKEND_SLOTS,
        BACKENDS,
        REV_NAT,
        CONNTRACK,
        STATS,
        SOURCE_RANGES,
        AFFINITY,
        SERVICE_COUNTERS,
        BACKEND_COUNTERS,
        SNAT_ADDRS,
        CONNTRACK_NEW,
        FRAGMENTS,
        AGENT_STATE,
        INTERFACE_STATS,
        SOCK_REV_NAT,
        SOCKET_LB,
        SOCK_COUNTERS,
    ];
}

/// The `agent_state` map: a fixed-size name → `u64` table.
pub mod agent_state {
    /// Key of an `agent_state` row: an ASCII name, zero-padded.
    pub type Key = [u8; 32];

    /// The row key for `name` (truncated to 32 bytes).
    #[must_use]
    pub const fn key(name: &str) -> Key {
        let mut k = [0u8; 32];
        let b = name.as_bytes();
        let mut i = 0;
        while i < b.len() && i < 32 {
            k[i] = b[i];
            i += 1;
        }
        k
    }

    /// Rows: `layout/<map name>` → that map's layout version;
    /// `next_id/backends`, `next_id/rev_nat` → the next id to hand out.
    pub const LAYOUT_PREFIX: &str = "layout/";
    pub const NEXT_BACKEND_ID: &str = "next_id/backends";
    pub const NEXT_REV_NAT_ID: &str = "next_id/rev_nat";
    pub const CAPACITY: u32 = 64;
}

/// Each map's layout version: bumped whenever the meaning of its key or
/// value changes, even at the same size (sizes and map types are checked
/// as well). Pins without an `agent_state` row are of layout 1. An agent
/// finding a pinned map of another layout or size migrates it: rows are
/// copied when the key and value are unchanged (a new capacity), else the
/// map starts empty (the agent refills its own maps at the first sync;
/// flows in a recreated conntrack are picked up again as new flows).
pub mod layout {
    use super::map_names::{
        AFFINITY, AGENT_STATE, BACKEND_COUNTERS, BACKEND_SLOTS, BACKENDS, CONNTRACK, CONNTRACK_NEW, FRAGMENTS,
        INTERFACE_STATS, REV_NAT, SERVICE_COUNTERS, SERVICES, SNAT_ADDRS, SOCK_COUNTERS, SOCK_REV_NAT, SOCKET_LB,
        SOURCE_RANGES, STATS,
    };

    /// Layout 3 of `stats`: id 0 counts packets that are neither IPv4 nor
    /// IPv6 (`pass_not_ip`; IPv6 was counted there before the programs
    /// served it). Layout 2 of `snat_addrs`: keyed by [`super::SnatAddrKey`] (interface
    /// and family). Layout 2 of `sock_rev_nat`: the value names the socket's protocol
    /// and backend id (for the removed-backend UDP socket flush); layout 3: key and value
    /// carry the address family (IPv6 sockets, v4-mapped addresses). Layout 4
    /// of `services`: one row per frontend, naming its table in `backend_slots`
    /// (slot and member rows are gone). Layout 3
    /// of `services`: slot 0 carries the affinity scope in `backend_id`. Layout 2 of `services`: 32-bit slots and member rows; of
    /// `source_ranges`: keyed per frontend protocol and family; of `stats`:
    /// `drop_rewrite` split by stage (id 11 is `drop_l3_csum` now) and the
    /// rejects that were not answered counted as drops.
    pub const VERSIONS: [(&str, u32); 18] = [
        (SERVICES, 4),
        (BACKEND_SLOTS, 1),
        (BACKENDS, 1),
        (REV_NAT, 1),
        (CONNTRACK, 1),
        (STATS, 3),
        (SOURCE_RANGES, 2),
        (AFFINITY, 1),
        (SERVICE_COUNTERS, 1),
        (BACKEND_COUNTERS, 1),
        (SNAT_ADDRS, 2),
        (CONNTRACK_NEW, 1),
        (FRAGMENTS, 1),
        (AGENT_STATE, 1),
        (INTERFACE_STATS, 1),
        (SOCK_REV_NAT, 3),
        (SOCKET_LB, 1),
        (SOCK_COUNTERS, 1),
    ];

    /// The layout version of map `name` (1 for an unknown name).
    #[must_use]
    pub fn version(name: &str) -> u32 {
        VERSIONS.iter().find(|(n, _)| *n == name).map_or(1, |(_, v)| *v)
    }
}

/// Default capacities compiled into the object; the agent can raise them
/// at load time (`--map-size-*` flags) because aya rewrites `max_entries`.
pub mod capacity {
    /// Frontends (one row each).
    pub const SERVICES: u32 = 65_536;
    /// Blocks of [`crate::backend_slots::PER_BLOCK`] backend ids: about a
    /// million slots and member ids (4 MiB), every backend table together.
    pub const BACKEND_SLOT_BLOCKS: u32 = 65_536;
    pub const BACKENDS: u32 = 65_536;
    pub const REV_NAT: u32 = 65_536;
    pub const CONNTRACK: u32 = 262_144;
    pub const CONNTRACK_NEW: u32 = 65_536;
    pub const FRAGMENTS: u32 = 8_192;
    /// Every `loadBalancerSourceRanges` CIDR of every LoadBalancer
    /// frontend, plus a row per ClusterIP and per service CIDR
    /// ([`crate::service_ips`]). Not preallocated (an LPM trie never is).
    pub const SOURCE_RANGES: u32 = 131_072;
    pub const AFFINITY: u32 = 65_536;
    pub const SNAT_ADDRS: u32 = 256;
    /// `interface_stats` rows: (interface, counter) pairs, least recently
    /// used evicted first (about 500 interfaces with every counter).
    pub const INTERFACE_STATS: u32 = 16_384;
    /// Sockets translated at connect()/sendmsg() whose peer is shown as
    /// the Service address: one row per (socket, backend), least recently
    /// used evicted first.
    pub const SOCK_REV_NAT: u32 = 65_536;
}

/// `SocketLbConfig::mode` (`--socket-lb`).
pub mod socket_lb {
    /// No socket is translated: the packet path does everything.
    pub const OFF: u32 = 0;
    /// Only sockets of the agent's own network namespace (host processes
    /// and hostNetwork pods) are translated.
    pub const HOST: u32 = 1;
    /// Every socket under the cgroup root, pods' too.
    pub const ALL: u32 = 2;
}

/// The one row (key 0) of the `socket_lb` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SocketLbConfig {
    /// A [`socket_lb`] mode.
    pub mode: u32,
    pub _pad: u32,
    /// The network namespace cookie of the node's own namespace (the
    /// agent's), for [`socket_lb::HOST`].
    pub host_netns_cookie: u64,
}
const _: () = assert!(size_of::<SocketLbConfig>() == 16);

/// Key of the `sock_rev_nat` map: a socket (its cookie) and the backend a
/// Service address was translated to for it, with the backend's family (an
/// IPv6 socket may reach IPv4 backends through v4-mapped addresses, and an
/// IPv4 address is not told from an IPv6 one by its 16 bytes alone).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SockRevNatKey {
    pub cookie: u64,
    pub addr: Addr,
    pub port: Port,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`] (of `addr`, not of the socket).
    pub family: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(size_of::<SockRevNatKey>() == 32);

/// Value of the `sock_rev_nat` map: the Service address (and port) the
/// application used, its frontend's rev-NAT id, and the socket's protocol
/// and backend id: a UDP socket whose (rev-NAT id, backend id) pair is no
/// longer live is connected to a removed backend, and the agent closes it
/// (kube-proxy's UDP conntrack flush, for sockets).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SockRevNatValue {
    pub addr: Addr,
    pub port: Port,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`] (of `addr`: the Service
    /// address's, always the backend's too).
    pub family: u8,
    pub rev_nat_id: u32,
    pub backend_id: u32,
}
const _: () = assert!(size_of::<SockRevNatValue>() == 28);

/// Value of the per-CPU `sock_counters` map (keyed by rev-NAT id, created
/// and deleted by the agent with the frontend's rev-NAT row).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SockCounters {
    /// connect() calls to the frontend, translated to a backend.
    pub connects: u64,
    /// sendmsg() calls (unconnected UDP) to the frontend, translated.
    pub sendmsgs: u64,
}
const _: () = assert!(size_of::<SockCounters>() == 16);

/// The source ports SNAT picks from for traffic it sends to a backend on
/// another node (and for hairpin traffic): above Linux's default ephemeral
/// range (32768-60999), so the node's own connections do not collide.
pub mod snat_ports {
    pub const MIN: u16 = 61_000;
    pub const MAX: u16 = 65_535;
    /// The range a clashing flow's source port is remapped into (the
    /// client keeps its address), as netfilter's implicit source NAT
    /// picks from 1024-65535 for an unprivileged port.
    pub const REMAP_MIN: u16 = 1_024;
}

/// `SnatAddrKey::ifindex` of the row holding the hairpin address: the node
/// address a pod's own traffic is SNATed to when its Service sends it back
/// to itself. Other rows are keyed by the external interface's ifindex.
pub const SNAT_HAIRPIN: u32 = 0;

/// Key of the `snat_addrs` map: an interface (or [`SNAT_HAIRPIN`]) and an
/// address family. An interface has a row per family it has an address of;
/// IPv6 masquerade writes the interface's IPv6 row (as ip6tables'
/// MASQUERADE picks an address of the outgoing interface of that family).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SnatAddrKey {
    pub ifindex: u32,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<SnatAddrKey>() == 8);

impl SnatAddrKey {
    #[must_use]
    pub const fn new(ifindex: u32, family: u8) -> Self {
        Self { ifindex, family, _pad: [0; 3] }
    }
}

/// Name of the TC classifier that translates traffic entering the node from
/// a pod interface (host side of the pod's veth).
pub const PROG_POD_INGRESS: &str = "service_pod_ingress";
/// Name of the TC classifier that translates traffic entering the node on
/// an external interface (NodePort, LoadBalancer IPs, externalIPs; replies
/// from backends on other nodes).
pub const PROG_EXTERNAL_INGRESS: &str = "service_external_ingress";
/// The same two programs for L3 devices (no Ethernet header: WireGuard,
/// IPIP, tun in TUN mode); the agent picks them by the interface's link
/// type.
pub const PROG_POD_INGRESS_L3: &str = "service_pod_ingress_l3";
pub const PROG_EXTERNAL_INGRESS_L3: &str = "service_external_ingress_l3";

/// The socket-level programs (cgroup sock_addr hooks), attached to
/// `--cgroup-root`: a Service address given to connect() or sendmsg() is
/// replaced by a backend's; recvmsg() and getpeername() show the Service
/// address again. By attach type, as the agent attaches and pins them: the
/// IPv4 hooks, then the IPv6 ones (which also translate v4-mapped
/// addresses, `::ffff:a.b.c.d`, with the IPv4 frontends).
pub const PROGS_SOCK: [(&str, &str); 8] = [
    ("connect4", PROG_SOCK_CONNECT4),
    ("sendmsg4", PROG_SOCK_SENDMSG4),
    ("recvmsg4", PROG_SOCK_RECVMSG4),
    ("getpeername4", PROG_SOCK_GETPEERNAME4),
    ("connect6", PROG_SOCK_CONNECT6),
    ("sendmsg6", PROG_SOCK_SENDMSG6),
    ("recvmsg6", PROG_SOCK_RECVMSG6),
    ("getpeername6", PROG_SOCK_GETPEERNAME6),
];
pub const PROG_SOCK_CONNECT4: &str = "service_sock_connect4";
pub const PROG_SOCK_SENDMSG4: &str = "service_sock_sendmsg4";
pub const PROG_SOCK_RECVMSG4: &str = "service_sock_recvmsg4";
pub const PROG_SOCK_GETPEERNAME4: &str = "service_sock_getpeername4";
pub const PROG_SOCK_CONNECT6: &str = "service_sock_connect6";
pub const PROG_SOCK_SENDMSG6: &str = "service_sock_sendmsg6";
pub const PROG_SOCK_RECVMSG6: &str = "service_sock_recvmsg6";
pub const PROG_SOCK_GETPEERNAME6: &str = "service_sock_getpeername6";
/// The cgroup sock program on `sock_release` (attached beside
/// [`PROGS_SOCK`]): a closing socket's `sock_rev_nat` row goes with it.
pub const PROG_SOCK_RELEASE: (&str, &str) = ("sock_release", "service_sock_release");

/// Name of the classifier that only returns its pass verdict: the floor of
/// `cargo xtask bench`'s per-packet measurements (never attached).
pub const PROG_BENCH_FLOOR: &str = "service_bench_floor";

/// Address families, as in `AF_INET`/`AF_INET6`.
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// IP protocol numbers.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// `ServiceKey::scope`: which traffic a frontend row answers.
/// Internal = traffic from pods (ClusterIP); external = traffic entering the
/// node from outside (NodePort, LoadBalancer, externalIPs).
pub const SCOPE_EXTERNAL: u8 = 0;
pub const SCOPE_INTERNAL: u8 = 1;

/// An address in network byte order. IPv4 uses the first 4 bytes, the rest
/// stay zero, so one key layout serves both families.
pub type Addr = [u8; 16];
/// A port in network byte order.
pub type Port = [u8; 2];

#[must_use]
pub const fn addr_v4(octets: [u8; 4]) -> Addr {
    let mut a = [0u8; 16];
    a[0] = octets[0];
    a[1] = octets[1];
    a[2] = octets[2];
    a[3] = octets[3];
    a
}

#[must_use]
pub const fn port_be(port: u16) -> Port {
    port.to_be_bytes()
}

/// Key of the `services` map: one row per frontend (a Service port's
/// address, port and protocol, as seen from pods or from outside).
///
/// Its value names the frontend's backend table in `backend_slots`
/// ([`ServiceValue::table`]). A changed backend set is written as a new
/// table in free blocks, then the frontend row is switched to it in one
/// update, and the old table's blocks are only reused a grace period
/// after the last frontend left them: a packet reads the old table or the
/// new one, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ServiceKey {
    pub addr: Addr,
    pub port: Port,
    pub proto: u8,
    pub scope: u8,
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<ServiceKey>() == 24);

impl ServiceKey {
    /// The key of a frontend.
    #[must_use]
    pub const fn frontend(family: u8, addr: Addr, port: Port, proto: u8, scope: u8) -> Self {
        Self { addr, port, proto, scope, family, _pad: [0; 3] }
    }
}

/// The `backend_slots` map: every backend table in one array, used as an
/// arena of blocks of [`PER_BLOCK`] backend ids. A table starts at a block
/// ([`ServiceValue::table`]) and holds, position after position, its
/// `count` Maglev slots, then its `members` backend ids in ascending order
/// (the backend set, which a ClientIP affinity entry is checked against by
/// binary search). Tables are shared: every frontend with the same backend
/// set (a Service port's ClusterIP, NodePorts, LoadBalancer IPs, external
/// IPs and their pod-side twins) names one table. Block 0 is never used, so
/// a `table` of 0 means none.
pub mod backend_slots {
    /// Backend ids per block (one array element of 64 bytes).
    pub const PER_BLOCK: u32 = 16;
    /// Enough halvings to search the largest member list (`524_287`
    /// backends, under 2^20).
    pub const SEARCH_STEPS: u32 = 20;

    /// The block and lane of position `pos` of the table starting at
    /// block `table`.
    #[inline(always)]
    #[must_use]
    pub const fn locate(table: u32, pos: u32) -> (u32, usize) {
        (table.wrapping_add(pos / PER_BLOCK), (pos % PER_BLOCK) as usize)
    }

    /// Blocks a table of `count` slots and `members` backend ids takes.
    #[must_use]
    pub const fn blocks(count: u32, members: u32) -> u32 {
        (count + members).div_ceil(PER_BLOCK)
    }
}

/// One element of the `backend_slots` array (see [`backend_slots`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SlotBlock {
    pub ids: [u32; backend_slots::PER_BLOCK as usize],
}
const _: () = assert!(size_of::<SlotBlock>() == 64);

/// `ServiceValue::flags`.
pub mod service_flags {
    /// The Service has no usable endpoint: answer with TCP RST / ICMP port
    /// unreachable, as kube-proxy does (`count` is 0).
    pub const REJECT: u16 = 1 << 0;
    /// The traffic policy leaves no endpoint on this node: drop silently
    /// (`count` is 0).
    pub const DROP: u16 = 1 << 1;
    /// `sessionAffinity: ClientIP`; `affinity_timeout_s` applies.
    pub const AFFINITY: u16 = 1 << 2;
    /// `loadBalancerSourceRanges`: only sources in the `source_ranges` rows
    /// of this frontend's `rev_nat_id` may connect.
    pub const SOURCE_RANGES: u16 = 1 << 3;
    /// The frontend address is one of this node's own (a NodePort). A pod
    /// dialling it gets replies whose restored source is a node address,
    /// which the stack's input routing drops as a martian: they leave by a
    /// FIB lookup and a redirect, as replies of external flows do.
    pub const NODE_ADDRESS: u16 = 1 << 4;
    /// New flows get this node's address as their source (kube-proxy's
    /// masquerade mark; the model decides which frontends): the reply
    /// must come back through this node to be translated.
    pub const MASQUERADE: u16 = 1 << 5;

    /// Each flag with the name `inspect` and the golden dumps show.
    pub const NAMES: [(u16, &str); 6] = [
        (REJECT, "reject"),
        (DROP, "drop"),
        (AFFINITY, "affinity"),
        (SOURCE_RANGES, "source-ranges"),
        (NODE_ADDRESS, "node-address"),
        (MASQUERADE, "masquerade"),
    ];
}

/// Value of the `services` map: the frontend's backend table and how to
/// treat its flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ServiceValue {
    /// The first block of the frontend's table in `backend_slots` (0: no
    /// table; `count` is 0 then).
    pub table: u32,
    /// Maglev slots of the table (0: no usable backend, see `flags`).
    pub count: u32,
    /// Backend ids listed after the slots (the backend set), ascending.
    pub members: u32,
    pub rev_nat_id: u32,
    /// With [`service_flags::AFFINITY`]: the id naming the ClientIP
    /// affinity entries ([`AffinityKey::scope`]) this frontend shares with
    /// every other frontend of its Service port (ClusterIP, NodePorts,
    /// LoadBalancer IPs, external IPs), as kube-proxy keeps affinity per
    /// Service port: the rev-NAT id of the port's ClusterIP.
    pub affinity_scope: u32,
    pub affinity_timeout_s: u32,
    pub flags: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<ServiceValue>() == 28);

/// `BackendValue::flags`.
pub mod backend_flags {
    /// The backend's `nodeName` is this node.
    pub const LOCAL: u8 = 1 << 0;
}

/// `BackendValue::state`: for `inspect` and `explain` only. The programs
/// never read it: which backends a frontend uses is decided by the agent,
/// which puts only those into the frontend's table.
pub mod backend_state {
    /// The endpoint is ready.
    pub const READY: u8 = 0;
    /// Serving but terminating, in the table only because the Service has
    /// no ready endpoint (the fallback of KEP-1669).
    pub const TERMINATING: u8 = 1;
}

/// Value of the `backends` map, keyed by a `u32` backend id (never 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BackendValue {
    pub addr: Addr,
    pub port: Port,
    pub proto: u8,
    pub family: u8,
    pub flags: u8,
    pub state: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<BackendValue>() == 24);

/// Value of the `rev_nat` map, keyed by a `u32` rev-NAT id (never 0): the
/// frontend address and port that replies must carry as their source.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RevNatValue {
    pub addr: Addr,
    pub port: Port,
    pub family: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<RevNatValue>() == 20);

/// Key of the `conntrack` map: the tuple exactly as it appears in a packet.
/// A translated flow has two entries: the original direction
/// (client → frontend) and the reply direction (backend → client).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CtKey {
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: Port,
    pub dport: Port,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<CtKey>() == 40);

// The programs copy `service_flags::NODE_ADDRESS` into a conntrack entry as
// `ct_flags::EXTERNAL` with a mask: one bit for both.
const _: () = assert!(service_flags::NODE_ADDRESS == ct_flags::EXTERNAL as u16);

/// `CtValue::flags`.
pub mod ct_flags {
    /// Original direction: rewrite the destination to `nat_addr:nat_port`.
    pub const DNAT: u8 = 1 << 0;
    /// Reply direction: rewrite the source to `nat_addr:nat_port`.
    pub const REV_NAT: u8 = 1 << 1;
    // 1 << 2 was CLOSING, now `CtValue::state` (`crate::conntrack`).
    /// The flow is also source-NATed (to a backend on another node, or a
    /// hairpin): the original direction rewrites the source to
    /// `snat_addr:snat_port` (this node); the reply direction rewrites the
    /// destination to `snat_addr:snat_port` (the client).
    ///
    /// When `snat_addr` is the client's own address the flow's source port
    /// was only remapped, because its reply tuple clashed with another
    /// flow's (netfilter's implicit source NAT): it is not a node address.
    pub const SNAT: u8 = 1 << 3;
    /// The flow entered through an external interface (NodePort,
    /// LoadBalancer IP, externalIP), or a pod dialled this node's own
    /// address (`service_flags::NODE_ADDRESS`). Its replies get a source
    /// that may be one of this node's own addresses, which the stack's
    /// input routing drops as a martian, so they leave by a FIB lookup and
    /// a redirect (as SNATed packets do).
    pub const EXTERNAL: u8 = 1 << 4;
}

/// Value of the `conntrack` map. The address to rewrite to is stored in the
/// entry itself, so an established flow keeps working when its backend row
/// is deleted (TCP flows to a removed backend are left to finish).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CtValue {
    pub nat_addr: Addr,
    /// With [`ct_flags::SNAT`]: the other end's rewrite (see there).
    pub snat_addr: Addr,
    pub nat_port: Port,
    pub snat_port: Port,
    pub flags: u8,
    /// The flow's state (`conntrack::state` bits), the same in both of its
    /// entries: it picks the idle timeout and says when the flow is closed.
    pub state: u8,
    pub _pad: [u8; 2],
    pub backend_id: u32,
    pub rev_nat_id: u32,
    /// `bpf_ktime_get_ns()` of the last packet, refreshed at most once per
    /// [`conntrack::timeouts::REFRESH_NS`] (and on every state change) to
    /// keep writes off the fast path.
    pub last_seen_ns: u64,
}
const _: () = assert!(size_of::<CtValue>() == 56);

/// Key of the `fragments` map: a datagram's identity (RFC 791: source,
/// destination, protocol, identification). The id is network order; IPv4
/// uses its first two bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FragKey {
    pub saddr: Addr,
    pub daddr: Addr,
    pub id: [u8; 4],
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FragKey>() == 40);

/// Value of the `fragments` map: the ports the first fragment carried, so
/// the later ones (which carry none) find the flow's conntrack entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FragValue {
    pub sport: Port,
    pub dport: Port,
}
const _: () = assert!(size_of::<FragValue>() == 4);

/// The data part of a `source_ranges` LPM-trie key: the frontend (its
/// rev-NAT id, protocol and family), then the source address. The trie's
/// prefix length is [`SOURCE_RANGE_FRONTEND_BITS`] (the frontend, matched
/// whole) plus the CIDR's prefix length. Two frontends sharing an address
/// and port (a LoadBalancer IP serving TCP and UDP for two Services) keep
/// their own ranges; a range only ever matches a source of its family.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SourceRangeKey {
    /// Big-endian, so the trie's bit order matches the id's.
    pub rev_nat_id: [u8; 4],
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
    pub addr: Addr,
}
const _: () = assert!(size_of::<SourceRangeKey>() == 24);

/// The bits of a [`SourceRangeKey`] before the address.
pub const SOURCE_RANGE_FRONTEND_BITS: u32 = 64;

/// The `source_ranges` rows no frontend owns (rev-NAT id 0, never a
/// frontend's): the addresses Services may have, which a new flow that
/// matched no frontend is checked against, as kube-proxy's nftables mode
/// does. Their `proto` byte says which kind of row it is.
pub mod service_ips {
    /// The owner id of these rows.
    pub const OWNER: u32 = 0;
    /// Every address a Service may have: each service CIDR, and each
    /// ClusterIP (a /32) outside them. A new flow to such an address that
    /// is not a ClusterIP is dropped (`drop_unallocated_service_ip`).
    pub const RANGE: u8 = 0xfe;
    /// Each ClusterIP (a /32): a new flow to a port or protocol it does not
    /// serve is rejected (TCP RST / ICMP port unreachable).
    pub const CLUSTER_IP: u8 = 0xff;
}

impl SourceRangeKey {
    #[must_use]
    pub const fn new(rev_nat_id: u32, proto: u8, family: u8, addr: Addr) -> Self {
        Self { rev_nat_id: rev_nat_id.to_be_bytes(), proto, family, _pad: [0; 2], addr }
    }
}

/// Value of the per-CPU `service_counters` (keyed by rev-NAT id) and
/// `backend_counters` (keyed by backend id) maps: both directions of every
/// translated packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<Counters>() == 16);

/// Key of the `affinity` map (ClientIP session affinity).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AffinityKey {
    pub client: Addr,
    /// The Service port's scope ([`ServiceValue::affinity_scope`]): one
    /// entry per client whichever of the port's addresses it dialled.
    pub scope: u32,
    /// The frontend's protocol: TCP and UDP ports of one Service keep
    /// their own affinity, as kube-proxy's per-port `recent` lists do.
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<AffinityKey>() == 24);

/// Value of the `affinity` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` of the last new flow that used it.
    pub last_used_ns: u64,
}
const _: () = assert!(size_of::<AffinityValue>() == 16);

/// Key of the per-CPU `interface_stats` map (value: `u64` packets): a
/// counter of `stats` (`stats::Counter` id) for one ingress interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, bytemuck::Pod, bytemuck::Zeroable)]
pub struct InterfaceCounterKey {
    /// The interface the packet entered on (`skb->ifindex`).
    pub ifindex: u32,
    /// A `stats::Counter` id.
    pub counter: u32,
}
const _: () = assert!(size_of::<InterfaceCounterKey>() == 8);

#[cfg(feature = "user")]
mod user {
    // SAFETY (for each impl): the types are #[repr(C)], contain only integers
    // and byte arrays, and bytemuck::Pod's derive has proven there is no
    // padding, which is exactly what aya::Pod requires.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::SlotBlock {}
    unsafe impl aya::Pod for super::BackendValue {}
    unsafe impl aya::Pod for super::RevNatValue {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::SourceRangeKey {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityValue {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragValue {}
    unsafe impl aya::Pod for super::InterfaceCounterKey {}
    unsafe impl aya::Pod for super::SocketLbConfig {}
    unsafe impl aya::Pod for super::SockRevNatKey {}
    unsafe impl aya::Pod for super::SockRevNatValue {}
    unsafe impl aya::Pod for super::SockCounters {}
    unsafe impl aya::Pod for super::SnatAddrKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_addresses_use_the_first_four_bytes() {
        let a = addr_v4([10, 96, 0, 10]);
        assert_eq!(&a[..4], &[10, 96, 0, 10]);
        assert!(a[4..].iter().all(|b| *b == 0));
    }

    #[test]
    fn ports_are_network_order() {
        assert_eq!(port_be(80), [0, 80]);
        assert_eq!(port_be(0x1f90), [0x1f, 0x90]);
    }

    #[test]
    fn table_positions_fill_blocks_in_order() {
        use backend_slots::{PER_BLOCK, blocks, locate};
        assert_eq!(locate(5, 0), (5, 0));
        assert_eq!(locate(5, 15), (5, 15));
        assert_eq!(locate(5, 16), (6, 0));
        assert_eq!(locate(5, 127 + 9), (13, 8));
        // 127 slots and 10 members: 137 ids in 9 blocks.
        assert_eq!(blocks(127, 10), 9);
        assert_eq!(blocks(16, 0), 1);
        assert_eq!(blocks(16, 1), 2);
        // The largest table and member list fit the search and u32 math.
        const { assert!(1u32 << backend_slots::SEARCH_STEPS > 524_287) };
        assert_eq!(blocks(524_287, 524_287), (2 * 524_287u32).div_ceil(PER_BLOCK));
    }

    #[test]
    fn field_offsets_match_the_kernel_view() {
        let k = ServiceKey::frontend(FAMILY_IPV4, addr_v4([1, 2, 3, 4]), port_be(0x0102), PROTO_UDP, SCOPE_EXTERNAL);
        let b = bytemuck::bytes_of(&k);
        assert_eq!(&b[0..4], &[1, 2, 3, 4]);
        assert_eq!(&b[16..18], &[1, 2]);
        assert_eq!(b[18], PROTO_UDP);
        assert_eq!(b[19], SCOPE_EXTERNAL);
        assert_eq!(b[20], FAMILY_IPV4);
        assert_eq!(&b[21..24], &[0, 0, 0]);
    }
}
