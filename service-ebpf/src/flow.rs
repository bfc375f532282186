//! Parsing: the link-layer header (Ethernet, or none on an L3 device),
//! IPv4 and the L4 ports, read once into [`Flow`]. A later fragment of a
//! datagram (no L4 header) gets the ports its first fragment carried, from
//! the `fragments` map.
//!
//! On an L3 device (WireGuard, IPIP, a tun in TUN mode: `ARPHRD_NONE`,
//! `ARPHRD_TUNNEL`, …) the packet starts at the IP header and there is no
//! EtherType to read: the protocol is `skb->protocol`. Which kind of device
//! a program runs on is fixed per entry point (the `L2` const generic of
//! [`parse_into`]: the agent attaches the `_l3` programs to L3 devices), so
//! the verifier sees constant header offsets; everything downstream reads
//! the IP header's offset from [`Flow::ip_off`].
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed by reference so they are not copied again on the 512-byte BPF stack"
)]

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use service_common::{
    CtKey, FAMILY_IPV4, FragKey, FragValue, PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP, Port, addr_v4, stats::Counter,
};

use crate::maps::FRAGMENTS;

pub const ETH_HLEN: usize = 14;
/// No link-layer header: the `L2` of the programs for L3 devices.
pub const NO_L2: usize = 0;
/// EtherType IPv4, as it appears on the wire.
const ETH_P_IP_BE: [u8; 2] = [0x08, 0x00];
/// IPv4 header fields, as offsets from the start of the IP header (add
/// [`Flow::ip_off`]).
pub const IP_TOT_LEN_OFF: usize = 2;
pub const IP_TTL_OFF: usize = 8;
pub const IP_CSUM_OFF: usize = 10;
pub const IP_SRC_OFF: usize = 12;
pub const IP_DST_OFF: usize = 16;
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;
const TCP_FLAGS_OFF: usize = 13;
/// IPv4 flags/fragment-offset field (host order after from_be_bytes).
const IP_DF: u16 = 0x4000;
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;
/// ICMP errors that quote the packet they are about (RFC 792).
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// Everything downstream needs from the headers, read once.
#[repr(C)]
pub struct Flow {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// Zero for ICMP errors (their quoted packet has the ports).
    pub sport: Port,
    pub dport: Port,
    pub proto: u8,
    /// Where the IP header starts: [`ETH_HLEN`] on an Ethernet device, 0
    /// on an L3 device.
    pub ip_off: usize,
    pub l4_off: usize,
    pub tcp_flags: u8,
    /// First fragment of a fragmented datagram (MF set, offset 0): its
    /// ports are remembered for the later fragments.
    pub first_fragment: bool,
    /// A later fragment: no L4 header (the ports come from the first
    /// fragment), only the IP header is rewritten.
    pub later_fragment: bool,
    /// Don't Fragment set: a packet too big for its route is answered
    /// with fragmentation needed instead of being fragmented.
    pub dont_fragment: bool,
    pub ttl: u8,
    /// IP identification, network order.
    pub ip_id: [u8; 2],
}

impl Flow {
    pub fn ct_key(&self) -> CtKey {
        CtKey {
            saddr: addr_v4(self.saddr),
            daddr: addr_v4(self.daddr),
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            family: FAMILY_IPV4,
            _pad: [0; 2],
        }
    }
}

/// The `fragments` key of an IPv4 datagram (RFC 791's identity of it).
#[inline(always)]
fn frag_key(saddr: [u8; 4], daddr: [u8; 4], id: [u8; 2], proto: u8) -> FragKey {
    FragKey {
        saddr: addr_v4(saddr),
        daddr: addr_v4(daddr),
        id: [id[0], id[1], 0, 0],
        proto,
        family: FAMILY_IPV4,
        _pad: [0; 2],
    }
}

/// Remembers a first fragment's ports for the datagram's later fragments.
/// Not inlined: the key's 40 bytes stay off the translation's stack.
#[inline(never)]
pub fn remember_first_fragment(flow: &Flow) {
    let ports = FragValue { sport: flow.sport, dport: flow.dport };
    // Losing the row (a full LRU) loses this datagram's later fragments,
    // as a full reassembly queue would.
    let _ = FRAGMENTS.insert(&frag_key(flow.saddr, flow.daddr, flow.ip_id, flow.proto), &ports, 0);
}

/// The ports of a later fragment's datagram, from its first fragment.
#[inline(never)]
fn fragment_ports(saddr: [u8; 4], daddr: [u8; 4], id: [u8; 2], proto: u8) -> Option<[u8; 4]> {
    // SAFETY: plain data; a racing update gives a stale but valid copy.
    let v = unsafe { FRAGMENTS.get(&frag_key(saddr, daddr, id, proto)) }?;
    Some([v.sport[0], v.sport[1], v.dport[0], v.dport[1]])
}

/// Reads a `T` at `off` by direct packet access (a load from the linear
/// area, no helper call). Headers that sit in a paged fragment of a
/// non-linear skb are pulled into the linear area first; a packet shorter
/// than `off + size_of::<T>()` is malformed.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, Counter> {
    if let Some(value) = read_linear(ctx, off) {
        return Ok(value);
    }
    let len = u32::try_from(off + core::mem::size_of::<T>()).map_err(|_| Counter::PassMalformed)?;
    ctx.pull_data(len).map_err(|_| Counter::PassMalformed)?;
    // bpf_skb_pull_data invalidates every packet pointer: read_linear
    // loads them again.
    read_linear(ctx, off).ok_or(Counter::PassMalformed)
}

#[inline(always)]
fn read_linear<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    // The bound is checked on the very pointer that is read (pointer + size
    // against data_end): a check on data + (off + size) computed apart
    // gives the verifier (6.x) no range for data + off.
    // black_box keeps LLVM from folding the constant size into the
    // variable offset, which would leave the read pointer without a range.
    let ptr = core::hint::black_box(ctx.data() + off);
    if ptr + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: [ptr, ptr + size_of::<T>()) lies inside the linear packet
    // data, checked just above; T is plain bytes, read unaligned.
    Some(unsafe { core::ptr::read_unaligned(ptr as *const T) })
}

/// Parses the link-layer header (`L2` bytes of Ethernet, or none), IPv4
/// and the L4 ports into `out` (and the packet's conntrack key into `key`).
/// `Err` is the pass counter for a packet the programs leave alone.
///
/// Not inlined: its header copies stay out of the entry point's frame,
/// which every call chain below it pays for.
#[inline(never)]
pub fn parse_into<const L2: usize>(ctx: &TcContext, out: &mut Flow, key: &mut CtKey) -> Result<(), Counter> {
    *out = parse::<L2>(ctx)?;
    *key = out.ct_key();
    Ok(())
}

#[inline(always)]
fn parse<const L2: usize>(ctx: &TcContext) -> Result<Flow, Counter> {
    if L2 == ETH_HLEN {
        let ethertype: [u8; 2] = read(ctx, 12)?;
        if ethertype != ETH_P_IP_BE {
            return Err(Counter::PassNotIpv4);
        }
    } else if ctx.skb.protocol() != u32::from(u16::from_ne_bytes(ETH_P_IP_BE)) {
        // No MAC header to read: the device set skb->protocol (network
        // order, in the low 16 bits) from the packet (tun: from the IP
        // version nibble; tunnels: from the outer header).
        return Err(Counter::PassNotIpv4);
    }
    let ip: [u8; 20] = read(ctx, L2)?;
    let ihl = usize::from(ip[0] & 0x0f);
    if ip[0] >> 4 != 4 || ihl < 5 {
        return Err(Counter::PassMalformed);
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    let proto = ip[9];
    let l4_off = L2 + ihl * 4;
    let later_fragment = frag & IP_OFFSET_MASK != 0;
    let (ports, tcp_flags): ([u8; 4], u8) = if later_fragment {
        // No L4 header: the ports of the datagram's first fragment, if it
        // went through here (fragments of other traffic, or ones that
        // overtook their first, pass untouched).
        if proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_SCTP {
            return Err(Counter::PassFragment);
        }
        let saddr = [ip[12], ip[13], ip[14], ip[15]];
        let daddr = [ip[16], ip[17], ip[18], ip[19]];
        (fragment_ports(saddr, daddr, [ip[4], ip[5]], proto).ok_or(Counter::PassFragment)?, 0)
    } else if proto == PROTO_TCP {
        // The checksum lies beyond the flags: a TCP header this short is
        // malformed, and rewriting it would fail anyway.
        let _: [u8; 2] = read(ctx, l4_off + TCP_CSUM_OFF)?;
        (read(ctx, l4_off)?, read::<u8>(ctx, l4_off + TCP_FLAGS_OFF)?)
    } else if proto == PROTO_UDP {
        let _: [u8; 2] = read(ctx, l4_off + UDP_CSUM_OFF)?;
        (read(ctx, l4_off)?, 0)
    } else if proto == PROTO_SCTP {
        // Ports, verification tag and CRC32c (12 bytes).
        let _: [u8; 12] = read(ctx, l4_off)?;
        (read(ctx, l4_off)?, 0)
    } else if proto == PROTO_ICMP {
        let icmp_type: u8 = read(ctx, l4_off)?;
        if icmp_type != ICMP_DEST_UNREACH && icmp_type != ICMP_TIME_EXCEEDED && icmp_type != ICMP_PARAMETER_PROBLEM {
            return Err(Counter::PassOtherProto);
        }
        ([0; 4], 0)
    } else {
        return Err(Counter::PassOtherProto);
    };
    Ok(Flow {
        saddr: [ip[12], ip[13], ip[14], ip[15]],
        daddr: [ip[16], ip[17], ip[18], ip[19]],
        sport: [ports[0], ports[1]],
        dport: [ports[2], ports[3]],
        proto,
        ip_off: L2,
        l4_off,
        tcp_flags,
        first_fragment: !later_fragment && frag & IP_MF != 0,
        later_fragment,
        dont_fragment: frag & IP_DF != 0,
        ttl: ip[8],
        ip_id: [ip[4], ip[5]],
    })
}

#[inline(always)]
pub fn ktime_ns() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions; it reads a clock.
    unsafe { bpf_ktime_get_ns() }
}
