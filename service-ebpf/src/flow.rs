//! Parsing: the link-layer header (Ethernet, or none on an L3 device),
//! IPv4 or IPv6 (its extension headers walked) and the L4 ports, read once
//! into [`Flow`]. A later fragment of a
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
    Addr, CtKey, FAMILY_IPV4, FAMILY_IPV6, FragKey, FragValue, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP,
    PROTO_UDP, Port, addr_v4, stats::Counter,
};

use crate::maps::FRAGMENTS;

pub const ETH_HLEN: usize = 14;
/// No link-layer header: the `L2` of the programs for L3 devices.
pub const NO_L2: usize = 0;
/// EtherTypes, as they appear on the wire.
const ETH_P_IP_BE: [u8; 2] = [0x08, 0x00];
const ETH_P_IPV6_BE: [u8; 2] = [0x86, 0xdd];
/// IPv4 header fields, as offsets from the start of the IP header (add
/// [`Flow::ip_off`]).
pub const IP_TOT_LEN_OFF: usize = 2;
pub const IP_TTL_OFF: usize = 8;
pub const IP_CSUM_OFF: usize = 10;
pub const IP_SRC_OFF: usize = 12;
pub const IP_DST_OFF: usize = 16;
/// IPv6 header fields (RFC 8200), as offsets from the start of the IP
/// header. There is no header checksum.
pub const IP6_HLEN: usize = 40;
pub const IP6_PAYLOAD_LEN_OFF: usize = 4;
pub const IP6_HOP_LIMIT_OFF: usize = 7;
pub const IP6_SRC_OFF: usize = 8;
pub const IP6_DST_OFF: usize = 24;
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;
const TCP_FLAGS_OFF: usize = 13;
/// IPv4 flags/fragment-offset field (host order after from_be_bytes).
const IP_DF: u16 = 0x4000;
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;
/// The IPv6 fragment header's offset/flags word: the offset in its top 13
/// bits, M (more fragments) in bit 0.
const IP6_OFFSET_MASK: u16 = 0xfff8;
const IP6_MF: u16 = 0x0001;
/// ICMP errors that quote the packet they are about (RFC 792).
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// ICMPv6 errors (RFC 4443 types 1-4: destination unreachable, packet too
/// big, time exceeded, parameter problem); types 128 and up are
/// informational (echo, neighbour discovery, router advertisements) and
/// are never touched.
const ICMPV6_ERROR_MAX: u8 = 4;
/// IPv6 extension headers (RFC 8200 4.1, and AH, RFC 4302) the parse
/// walks to reach the upper-layer header.
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
/// How many extension headers the parse walks (the walk is a bounded loop
/// for the verifier). RFC 8200 allows each of them once (destination
/// options twice), so a legitimate chain has at most six; a longer one is
/// passed untouched (`pass_ipv6_extension_headers`).
pub const MAX_EXTENSION_HEADERS: usize = 6;

/// Everything downstream needs from the headers, read once.
#[repr(C)]
pub struct Flow {
    /// The addresses as they sit in the header: an IPv4 one in the first
    /// 4 bytes (the rest zero), as in every map key.
    pub saddr: Addr,
    pub daddr: Addr,
    /// Zero for ICMP errors (their quoted packet has the ports).
    pub sport: Port,
    pub dport: Port,
    /// The upper-layer protocol (after IPv6's extension headers).
    pub proto: u8,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// Where the IP header starts: [`ETH_HLEN`] on an Ethernet device, 0
    /// on an L3 device.
    pub ip_off: usize,
    /// Where the upper-layer header starts (after IPv4 options or IPv6
    /// extension headers).
    pub l4_off: usize,
    pub tcp_flags: u8,
    /// First fragment of a fragmented datagram (MF set, offset 0): its
    /// ports are remembered for the later fragments.
    pub first_fragment: bool,
    /// A later fragment: no L4 header (the ports come from the first
    /// fragment), only the IP header is rewritten.
    pub later_fragment: bool,
    /// Don't Fragment set: a packet too big for its route is answered
    /// with fragmentation needed instead of being fragmented. Always set
    /// for IPv6, which routers never fragment (answered with packet too
    /// big).
    pub dont_fragment: bool,
    /// TTL, or IPv6's hop limit.
    pub ttl: u8,
    /// IP identification, network order: IPv4's 16 bits (then two zero
    /// bytes), or the 32 bits of IPv6's fragment header.
    pub ip_id: [u8; 4],
}

impl Flow {
    pub fn ct_key(&self) -> CtKey {
        CtKey {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }

    #[inline(always)]
    pub fn is_ipv6(&self) -> bool {
        self.family == FAMILY_IPV6
    }

    /// The ICMP of the flow's family: ICMP over IPv4, ICMPv6 over IPv6
    /// (the parse passes the other one as an unknown protocol).
    #[inline(always)]
    pub fn is_icmp(&self) -> bool {
        self.proto == icmp_of(self.family)
    }
}

/// The `fragments` key of a datagram (RFC 791's and RFC 8200's identity
/// of it: addresses, identification, protocol).
#[inline(always)]
fn frag_key(flow: &Flow) -> FragKey {
    FragKey {
        saddr: flow.saddr,
        daddr: flow.daddr,
        id: flow.ip_id,
        proto: flow.proto,
        family: flow.family,
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
    let _ = FRAGMENTS.insert(&frag_key(flow), &ports, 0);
}

/// The ports of a later fragment's datagram, from its first fragment
/// (`flow` has everything but the ports).
#[inline(never)]
fn fragment_ports(flow: &Flow) -> Option<[u8; 4]> {
    // SAFETY: plain data; a racing update gives a stale but valid copy.
    let v = unsafe { FRAGMENTS.get(&frag_key(flow)) }?;
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

/// Parses the link-layer header (`L2` bytes of Ethernet, or none), IPv4 or
/// IPv6 and the L4 ports into `out` (and the packet's conntrack key into
/// `key`). `Err` is the pass counter for a packet the programs leave alone.
///
/// Not inlined: its header copies stay out of the entry point's frame,
/// which every call chain below it pays for.
#[inline(never)]
pub fn parse_into<const L2: usize>(ctx: &TcContext, out: &mut Flow, key: &mut CtKey) -> Result<(), Counter> {
    let ipv6 = if L2 == ETH_HLEN {
        let ethertype: [u8; 2] = read(ctx, 12)?;
        if ethertype == ETH_P_IPV6_BE {
            true
        } else if ethertype == ETH_P_IP_BE {
            false
        } else {
            return Err(Counter::PassNotIp);
        }
    } else {
        // No MAC header to read: the device set skb->protocol (network
        // order, in the low 16 bits) from the packet (tun: from the IP
        // version nibble; tunnels: from the outer header).
        let protocol = ctx.skb.protocol();
        if protocol == u32::from(u16::from_ne_bytes(ETH_P_IPV6_BE)) {
            true
        } else if protocol == u32::from(u16::from_ne_bytes(ETH_P_IP_BE)) {
            false
        } else {
            return Err(Counter::PassNotIp);
        }
    };
    if ipv6 {
        parse_v6::<L2>(ctx, out)?
    } else {
        parse_v4::<L2>(ctx, out)?
    }
    *key = out.ct_key();
    Ok(())
}

/// The ICMP protocol number of `family`: an IPv4 packet saying ICMPv6 (or
/// an IPv6 one saying ICMP) carries no ICMP message of ours to translate.
#[inline(always)]
fn icmp_of(family: u8) -> u8 {
    if family == FAMILY_IPV6 { PROTO_ICMPV6 } else { PROTO_ICMP }
}

/// The ports (and TCP flags) of a first or only fragment whose upper-layer
/// header starts at `l4_off`; `Err` for a protocol the programs leave
/// alone (ICMP of the other family included). ICMP errors have no ports
/// here (their quote does).
#[inline(always)]
fn ports(ctx: &TcContext, family: u8, proto: u8, l4_off: usize) -> Result<([u8; 4], u8), Counter> {
    if (proto == PROTO_ICMP || proto == PROTO_ICMPV6) && proto != icmp_of(family) {
        return Err(Counter::PassOtherProto);
    }
    if proto == PROTO_TCP {
        // The checksum lies beyond the flags: a TCP header this short is
        // malformed, and rewriting it would fail anyway.
        let _: [u8; 2] = read(ctx, l4_off + TCP_CSUM_OFF)?;
        Ok((read(ctx, l4_off)?, read::<u8>(ctx, l4_off + TCP_FLAGS_OFF)?))
    } else if proto == PROTO_UDP {
        let _: [u8; 2] = read(ctx, l4_off + UDP_CSUM_OFF)?;
        Ok((read(ctx, l4_off)?, 0))
    } else if proto == PROTO_SCTP {
        // Ports, verification tag and CRC32c (12 bytes).
        let _: [u8; 12] = read(ctx, l4_off)?;
        Ok((read(ctx, l4_off)?, 0))
    } else if proto == PROTO_ICMP {
        let icmp_type: u8 = read(ctx, l4_off)?;
        if icmp_type != ICMP_DEST_UNREACH && icmp_type != ICMP_TIME_EXCEEDED && icmp_type != ICMP_PARAMETER_PROBLEM {
            return Err(Counter::PassOtherProto);
        }
        Ok(([0; 4], 0))
    } else if proto == PROTO_ICMPV6 {
        let icmp_type: u8 = read(ctx, l4_off)?;
        // Type 0 is reserved; neighbour discovery and router
        // advertisements (133-137) are informational: left alone.
        if icmp_type == 0 || icmp_type > ICMPV6_ERROR_MAX {
            return Err(Counter::PassOtherProto);
        }
        Ok(([0; 4], 0))
    } else {
        Err(Counter::PassOtherProto)
    }
}

#[inline(always)]
fn parse_v4<const L2: usize>(ctx: &TcContext, out: &mut Flow) -> Result<(), Counter> {
    let ip: [u8; 20] = read(ctx, L2)?;
    let ihl = usize::from(ip[0] & 0x0f);
    if ip[0] >> 4 != 4 || ihl < 5 {
        return Err(Counter::PassMalformed);
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    let later_fragment = frag & IP_OFFSET_MASK != 0;
    out.saddr = addr_v4([ip[12], ip[13], ip[14], ip[15]]);
    out.daddr = addr_v4([ip[16], ip[17], ip[18], ip[19]]);
    out.proto = ip[9];
    out.family = FAMILY_IPV4;
    out.ip_off = L2;
    out.l4_off = L2 + ihl * 4;
    out.first_fragment = !later_fragment && frag & IP_MF != 0;
    out.later_fragment = later_fragment;
    out.dont_fragment = frag & IP_DF != 0;
    out.ttl = ip[8];
    out.ip_id = [ip[4], ip[5], 0, 0];
    finish_l4(ctx, out)
}

/// IPv6: the fixed header, then the extension headers walked in a bounded
/// loop (hop-by-hop, routing, destination options, fragment, AH) to the
/// upper-layer header. A fragment header gives the fragment's place and
/// the datagram's 32-bit identification.
#[inline(always)]
fn parse_v6<const L2: usize>(ctx: &TcContext, out: &mut Flow) -> Result<(), Counter> {
    let ip: [u8; IP6_HLEN] = read(ctx, L2)?;
    if ip[0] >> 4 != 6 {
        return Err(Counter::PassMalformed);
    }
    let mut next = ip[6];
    let mut off = L2 + IP6_HLEN;
    let mut frag: u16 = 0;
    let mut id = [0u8; 4];
    let mut fragmented = false;
    let mut walked = false;
    for _ in 0..MAX_EXTENSION_HEADERS {
        if next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS {
            // Next header, then the length in 8-octet units beyond the first.
            let h: [u8; 2] = read(ctx, off)?;
            next = h[0];
            off += (usize::from(h[1]) + 1) * 8;
        } else if next == IPPROTO_FRAGMENT {
            let h: [u8; 8] = read(ctx, off)?;
            next = h[0];
            frag = u16::from_be_bytes([h[2], h[3]]);
            id = [h[4], h[5], h[6], h[7]];
            fragmented = true;
            off += 8;
        } else if next == IPPROTO_AH {
            // AH's length is in 4-octet units, minus 2 (RFC 4302).
            let h: [u8; 2] = read(ctx, off)?;
            next = h[0];
            off += (usize::from(h[1]) + 2) * 4;
        } else {
            walked = true;
            break;
        }
    }
    if !walked
        && (next == IPPROTO_HOPOPTS
            || next == IPPROTO_ROUTING
            || next == IPPROTO_DSTOPTS
            || next == IPPROTO_FRAGMENT
            || next == IPPROTO_AH)
    {
        return Err(Counter::PassExtensionHeaders);
    }
    let later_fragment = frag & IP6_OFFSET_MASK != 0;
    out.saddr = read(ctx, L2 + IP6_SRC_OFF)?;
    out.daddr = read(ctx, L2 + IP6_DST_OFF)?;
    out.proto = next;
    out.family = FAMILY_IPV6;
    out.ip_off = L2;
    out.l4_off = off;
    out.first_fragment = fragmented && !later_fragment && frag & IP6_MF != 0;
    out.later_fragment = later_fragment;
    out.dont_fragment = true;
    out.ttl = ip[IP6_HOP_LIMIT_OFF];
    out.ip_id = id;
    finish_l4(ctx, out)
}

/// The ports and TCP flags of the parsed header: a later fragment's from
/// its first fragment (fragments of other traffic, or ones that overtook
/// their first, pass untouched), the rest from the upper-layer header.
#[inline(always)]
fn finish_l4(ctx: &TcContext, out: &mut Flow) -> Result<(), Counter> {
    let proto = out.proto;
    let (ports, tcp_flags) = if out.later_fragment {
        if proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_SCTP {
            return Err(Counter::PassFragment);
        }
        (fragment_ports(out).ok_or(Counter::PassFragment)?, 0)
    } else {
        let (ports, flags) = ports(ctx, out.family, proto, out.l4_off)?;
        // A UDP checksum of 0 means "none" over IPv4 but is invalid over
        // IPv6 (RFC 8200 8.1): such a datagram is the receiver's to drop,
        // and an incremental update would give it a wrong checksum.
        if proto == PROTO_UDP && out.family == FAMILY_IPV6 {
            let check: [u8; 2] = read(ctx, out.l4_off + UDP_CSUM_OFF)?;
            if check == [0, 0] {
                return Err(Counter::PassMalformed);
            }
        }
        (ports, flags)
    };
    out.sport = [ports[0], ports[1]];
    out.dport = [ports[2], ports[3]];
    out.tcp_flags = tcp_flags;
    Ok(())
}

#[inline(always)]
pub fn ktime_ns() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions; it reads a clock.
    unsafe { bpf_ktime_get_ns() }
}
