//! Sending a translated packet straight out of the interface the kernel's
//! FIB picks for its destination (`bpf_fib_lookup` + `bpf_redirect_neigh`,
//! which resolves the neighbour and writes the MAC addresses).
//!
//! Needed when the packet's new source is one of this node's own addresses
//! (SNAT, and replies to NodePort clients whose restored source is the node
//! address): the stack's input routing would drop such a packet as a
//! martian (a local source arriving from outside). Everything else keeps
//! the ordinary forwarding path.
//!
//! The redirect skips the stack's forwarding, so it does what forwarding
//! would: the TTL (IPv6: hop limit) is decremented (an exhausted one is
//! answered with ICMP time exceeded), and a packet too big for the egress
//! MTU (the route's, or the device's for a GSO packet) is answered with
//! ICMP fragmentation needed (ICMPv6 packet too big) carrying that MTU,
//! instead of vanishing at the device. A packet
//! the FIB has no route for is dropped (`drop_no_route`): handing it to the
//! stack would only have it dropped there as a martian.
//!
//! L3 devices (no MAC header: WireGuard, IPIP, tun): `bpf_redirect_neigh`
//! drops a packet whose `mac_header` is not before its `network_header`
//! (`__bpf_redirect_neigh`, every kernel since 5.10), which is the case for
//! every packet that entered an L3 device. So a packet from an L3 ingress
//! gets an all-zero Ethernet header pushed first (`bpf_skb_change_head`,
//! the helper's documented use: "an L3 skb that needs to push mac header
//! for redirection into L2 device"); the redirect pulls it again and the
//! neighbour output writes the real one, or none on an L3 egress (its
//! neighbours output directly). A packet from an Ethernet ingress to an L3
//! egress needs nothing: the redirect pulls the MAC header and the L3
//! device's neighbour output adds none.

use core::{mem::size_of, ptr::null_mut};

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_REDIRECT},
    helpers::{bpf_fib_lookup, bpf_redirect_neigh, bpf_skb_change_head},
    programs::TcContext,
};
use service_common::{Addr, FAMILY_IPV6, addr_v4, stats::Counter};

use crate::{
    flow::{
        ETH_HLEN, Flow, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IP_TOT_LEN_OFF, IP_TTL_OFF, IP6_DST_OFF, IP6_HLEN,
        IP6_HOP_LIMIT_OFF, IP6_PAYLOAD_LEN_OFF, IP6_SRC_OFF,
    },
    reject,
    scratch::scratch,
    verdict::Sent,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_TIME_EXCEEDED: u8 = 11;

/// An IPv6 address as the FIB parameters hold it: four 32-bit words, each
/// in network order.
#[inline(always)]
fn words(a: &Addr) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// Looks `daddr` up in the FIB from `saddr` (the parameters live in
/// scratch); returns the helper's code. `tot_len` 0 asks the kernel to
/// judge the packet against the egress device's MTU (GSO aware).
#[inline(always)]
fn lookup(ctx: &TcContext, family: u8, saddr: &Addr, daddr: &Addr, tot_len: u16) -> Result<(i64, u32, u16), Counter> {
    let s = scratch()?;
    // SAFETY: bpf_fib_lookup is plain data (integers, arrays, unions of
    // integers); all zeroes is a valid value.
    s.fib = unsafe { core::mem::zeroed() };
    let params = &mut s.fib;
    // SAFETY: reading the receiving interface from the context.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if family == FAMILY_IPV6 {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = words(saddr);
        params.__bindgen_anon_4.ipv6_dst = words(daddr);
    } else {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([saddr[0], saddr[1], saddr[2], saddr[3]]);
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([daddr[0], daddr[1], daddr[2], daddr[3]]);
    }
    params.__bindgen_anon_1.tot_len = tot_len;
    #[expect(clippy::cast_possible_truncation, clippy::cast_possible_wrap, reason = "64 bytes")]
    let len = size_of::<aya_ebpf::bindings::bpf_fib_lookup>() as i32;
    // SAFETY: params is a valid, writable bpf_fib_lookup of `len` bytes
    // (a per-CPU map value); the context pointer is the program's own.
    let rc = unsafe { bpf_fib_lookup(ctx.skb.skb.cast(), &raw mut *params, len, 0) };
    // SAFETY: the helper fills mtu_result (a union with tot_len).
    let mtu = unsafe { params.__bindgen_anon_1.mtu_result };
    Ok((rc, params.ifindex, mtu))
}

/// The interface a packet to `daddr` leaves by, or 0 when the FIB has no
/// forwarding route for it. SNAT uses that interface's address (what
/// MASQUERADE does), not the one the flow came in on.
#[inline(never)]
pub fn egress_ifindex(ctx: &TcContext, daddr: &Addr, family: u8) -> Result<u32, Counter> {
    let (rc, ifindex, _) = lookup(ctx, family, &[0; 16], daddr, 0)?;
    let routed = rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) || rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH);
    Ok(if routed { ifindex } else { 0 })
}

/// The IP length of each segment of a GSO packet: headers plus
/// `gso_size` bytes of payload.
#[inline(always)]
fn gso_segment_len(ctx: &TcContext, flow: &Flow, gso_size: u32) -> u16 {
    let l4_header = if flow.proto == service_common::PROTO_TCP {
        ctx.load::<u8>(flow.l4_off + 12).map_or(20, |doff| usize::from(doff >> 4) * 4)
    } else {
        8
    };
    let len = (flow.l4_off - flow.ip_off) + l4_header + gso_size as usize;
    u16::try_from(len).unwrap_or(u16::MAX)
}

/// The packet's addresses as they now are (rewritten), and its IP length.
#[inline(always)]
fn rewritten(ctx: &TcContext, flow: &Flow) -> Result<(Addr, Addr, u16), Counter> {
    let ip = flow.ip_off;
    if flow.is_ipv6() {
        let (Ok(saddr), Ok(daddr), Ok(payload_len)) = (
            ctx.load::<Addr>(ip + IP6_SRC_OFF),
            ctx.load::<Addr>(ip + IP6_DST_OFF),
            ctx.load::<[u8; 2]>(ip + IP6_PAYLOAD_LEN_OFF),
        ) else {
            return Err(Counter::DropLoad);
        };
        #[expect(clippy::cast_possible_truncation, reason = "40")]
        let len = u16::from_be_bytes(payload_len).saturating_add(IP6_HLEN as u16);
        return Ok((saddr, daddr, len));
    }
    let (Ok(saddr), Ok(daddr), Ok(tot_len)) = (
        ctx.load::<[u8; 4]>(ip + IP_SRC_OFF),
        ctx.load::<[u8; 4]>(ip + IP_DST_OFF),
        ctx.load::<[u8; 2]>(ip + IP_TOT_LEN_OFF),
    ) else {
        return Err(Counter::DropLoad);
    };
    Ok((addr_v4(saddr), addr_v4(daddr), u16::from_be_bytes(tot_len)))
}

/// Answers the packet with the ICMP or ICMPv6 error `packed` (one BPF
/// function per family, called from here: one calling the other would not
/// fit the verifier's 512-byte call chain).
#[inline(always)]
fn answer(ctx: &TcContext, flow: &Flow, packed: u32) -> Result<Sent, Counter> {
    if flow.is_ipv6() {
        reject::icmp6_error_to_sender(ctx, flow, packed)
    } else {
        reject::icmp_error_to_sender(ctx, flow, packed)
    }
}

/// The FIB lookup for the (already rewritten) packet: its addresses and
/// length (each segment's for a GSO packet of `gso_size`), the helper's
/// code returned (the egress interface and MTU are left in `scratch.fib`).
/// A BPF function of its own: the 16-byte addresses stay off `forward`'s
/// frame, which sits under the ICMP answers' in one call chain.
#[inline(never)]
fn route(ctx: &TcContext, flow: &Flow, gso_size: u32) -> Result<u32, Counter> {
    let (saddr, daddr, tot_len) = rewritten(ctx, flow)?;
    let tot_len = if gso_size == 0 { tot_len } else { gso_segment_len(ctx, flow, gso_size) };
    let (rc, _, _) = lookup(ctx, flow.family, &saddr, &daddr, tot_len)?;
    // The codes are small non-negative numbers (BPF_FIB_LKUP_RET_*); a
    // negative one is an argument error, never returned for these.
    u32::try_from(rc).map_err(|_| Counter::DropNoRoute)
}

/// Redirects the (already rewritten) packet towards its destination, to
/// be counted as `counter`; a packet too big or out of TTL (hop limit) is
/// answered instead (counted as `drop_frag_needed` / `drop_ttl_exceeded`;
/// IPv6: packet too big, time exceeded). A packet the FIB has no
/// forwarding route for is dropped (`drop_no_route`).
#[inline(never)]
pub fn forward(ctx: &TcContext, flow: &Flow, counter: Counter) -> Result<Sent, Counter> {
    let ip = flow.ip_off;
    // RFC 1122 3.2.2 and RFC 4443 2.4 (e) (as the kernel's icmp_send and
    // icmp6_send): no ICMP error about an ICMP error (the only ICMP this
    // path carries) or a later fragment.
    let may_answer = !flow.is_icmp() && !flow.later_fragment;
    // The route's MTU (`tot_len` set) is checked against what will go on
    // the wire: the IP length, or for a GSO packet (a TCP sender's super
    // segment, kept whole through veths) the length of each segment, as
    // the stack's forwarding checks it (skb_gso_validate_network_len).
    // SAFETY: reading a field of the context the kernel handed us.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    let rc = i64::from(route(ctx, flow, gso_size)?);
    let params = &scratch()?.fib;
    // SAFETY: the helper filled mtu_result (a union with tot_len).
    let (ifindex, mtu) = (params.ifindex, unsafe { params.__bindgen_anon_1.mtu_result });
    if rc == i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) {
        // Without DF the stack would fragment it, which a redirect cannot
        // do: dropped, counted, not answered (the answer says "DF set").
        // IPv6 is never fragmented on the way (`dont_fragment` is set).
        if !flow.dont_fragment || !may_answer {
            return Err(Counter::DropFragNeeded);
        }
        return answer(ctx, flow, reject::pack_icmp(ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, mtu));
    }
    // Blackhole, unreachable, prohibited, not forwarded (a local
    // destination), forwarding disabled, unsupported encapsulation: the
    // stack would drop it too, as a martian.
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) && rc != i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        return Err(Counter::DropNoRoute);
    }
    if flow.ttl <= 1 {
        if !may_answer {
            return Err(Counter::DropTtlExceeded);
        }
        return answer(ctx, flow, reject::pack_icmp(ICMP_TIME_EXCEEDED, 0, 0));
    }
    if flow.is_ipv6() {
        // No header checksum to follow the hop limit.
        ctx.store(ip + IP6_HOP_LIMIT_OFF, &(flow.ttl - 1), 0).map_err(|_| Counter::DropStore)?;
    } else {
        // TTL - 1: the 16-bit word (TTL, protocol) changes in the checksum.
        // The protocol byte is the header's own (flow.proto is the same for
        // IPv4: no extension headers).
        let old = u64::from(u16::from_ne_bytes([flow.ttl, flow.proto]));
        let new = u64::from(u16::from_ne_bytes([flow.ttl - 1, flow.proto]));
        ctx.l3_csum_replace(ip + IP_CSUM_OFF, old, new, 2).map_err(|_| Counter::DropL3Csum)?;
        ctx.store(ip + IP_TTL_OFF, &(flow.ttl - 1), 0).map_err(|_| Counter::DropStore)?;
    }
    if ip != ETH_HLEN {
        // An L3 ingress: room for the MAC header the redirect expects (see
        // the module comment); zeroes, pulled again before transmission.
        #[expect(clippy::cast_possible_truncation, reason = "14")]
        // SAFETY: the helper takes the context pointer the kernel gave us.
        let rc = unsafe { bpf_skb_change_head(ctx.skb.skb, ETH_HLEN as u32, 0) };
        if rc != 0 {
            return Err(Counter::DropResize);
        }
    }
    // SAFETY: no neighbour parameters (the helper looks the next hop up
    // itself); the ifindex comes from the FIB.
    let action = unsafe { bpf_redirect_neigh(ifindex, null_mut(), 0, 0) };
    // TC_ACT_SHOT when the kernel refuses the redirect's arguments.
    if action != i64::from(TC_ACT_REDIRECT) {
        return Err(Counter::DropRedirectRefused);
    }
    Ok(Sent(counter))
}
