//! ICMP errors about a translated flow (port unreachable, fragmentation
//! needed, time exceeded): the quoted packet and the outer header are
//! translated too, so the peer that sent the offending packet sees the
//! error for the flow as it knows it — the way netfilter's NAT treats
//! "related" ICMP.
//!
//! The error quotes a packet that went out after translation; its reverse
//! tuple is the conntrack key of the other direction, whose entry says
//! which addresses that peer knows. Checksums are updated incrementally
//! (RFC 1624): the quoted IP header's own, the quoted TCP/UDP checksum when
//! present, the ICMP checksum over all of them, and the outer IP header's.

use aya_ebpf::{bindings::BPF_F_RECOMPUTE_CSUM, programs::TcContext};
use service_common::{
    Addr, CtKey, CtValue, FAMILY_IPV4, FAMILY_IPV6, PROTO_TCP, PROTO_UDP, addr_v4,
    csum::{self, Endpoints},
    ct_flags,
    stats::Counter,
};

use crate::{
    conntrack,
    flow::{
        Flow, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IP_TOT_LEN_OFF, IP6_DST_OFF, IP6_HLEN, IP6_PAYLOAD_LEN_OFF,
        IP6_SRC_OFF, TCP_CSUM_OFF, UDP_CSUM_OFF,
    },
    scratch::scratch,
    verdict::{Outcome, forward, pass},
};

/// Offsets inside the ICMP message.
const ICMP_CSUM_OFF: usize = 2;
const ICMP_HLEN: usize = 8;

/// Stores with `skb->csum` kept right for CHECKSUM_COMPLETE packets.
const STORE: u64 = BPF_F_RECOMPUTE_CSUM as u64;

#[inline(always)]
fn v4(addr: &[u8; 16]) -> [u8; 4] {
    [addr[0], addr[1], addr[2], addr[3]]
}

/// Translates an ICMP error if it quotes a translated flow; passes it
/// untouched otherwise.
#[inline(never)]
pub fn translate_error(ctx: &TcContext, flow: &Flow) -> Outcome {
    let ip_off = flow.l4_off + ICMP_HLEN;
    let Ok(ip) = ctx.load::<[u8; 20]>(ip_off) else { return pass(Counter::PassMalformed) };
    // A quoted header with options is left alone (rare; the ports would
    // move).
    if ip[0] != 0x45 {
        return pass(Counter::PassMalformed);
    }
    let proto = ip[9];
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return pass(Counter::PassOtherProto);
    }
    let l4_off = ip_off + 20;
    let Ok(ports) = ctx.load::<[u8; 4]>(l4_off) else { return pass(Counter::PassMalformed) };
    let old = Endpoints {
        saddr: [ip[12], ip[13], ip[14], ip[15]],
        daddr: [ip[16], ip[17], ip[18], ip[19]],
        sport: [ports[0], ports[1]],
        dport: [ports[2], ports[3]],
    };
    // The other direction of the quoted packet's flow.
    let key = CtKey {
        saddr: addr_v4(old.daddr),
        daddr: addr_v4(old.saddr),
        sport: old.dport,
        dport: old.sport,
        proto,
        family: FAMILY_IPV4,
        _pad: [0; 2],
    };
    let Some(found) = conntrack::lookup(&key) else { return pass(Counter::PassNoService) };
    // SAFETY: plain data; a racing update gives a stale but valid copy.
    let ct: CtValue = unsafe { *found.ct };
    let new = translated(&old, &ct);
    // The quote (its IP header and the 8 bytes RFC 792 guarantees) must
    // lie inside the outer datagram, as its IP total length says; bytes
    // past it (a trailer, link padding) are not part of the error. Read
    // here, after the lookup, so the bound is not held across the call.
    let Ok(outer_len) = ctx.load::<[u8; 2]>(flow.ip_off + IP_TOT_LEN_OFF) else {
        return pass(Counter::PassMalformed);
    };
    let outer_end = flow.ip_off + usize::from(u16::from_be_bytes(outer_len));
    if l4_off + 8 > outer_end {
        return pass(Counter::PassMalformed);
    }
    rewrite_quoted(ctx, outer_end, flow.l4_off, ip_off, l4_off, proto, &ip, &old, &new)?;
    // The error went to the quoted packet's source; if the quoted packet's
    // destination itself sent it, its address is translated the same way.
    let (saddr, daddr) = (v4(&flow.saddr), v4(&flow.daddr));
    let outer_destination = if daddr == old.saddr { new.saddr } else { daddr };
    let outer_source = if saddr == old.daddr { new.daddr } else { saddr };
    let ip = flow.ip_off;
    let Ok(mut check) = ctx.load::<[u8; 2]>(ip + IP_CSUM_OFF) else { return Err(Counter::DropLoad) };
    check = csum::update32(check, saddr, outer_source);
    check = csum::update32(check, daddr, outer_destination);
    ctx.store(ip + IP_SRC_OFF, &outer_source, STORE).map_err(|_| Counter::DropStore)?;
    ctx.store(ip + IP_DST_OFF, &outer_destination, STORE).map_err(|_| Counter::DropStore)?;
    ctx.store(ip + IP_CSUM_OFF, &check, STORE).map_err(|_| Counter::DropStore)?;
    if ct.flags & (ct_flags::EXTERNAL | ct_flags::SNAT) != 0 {
        // Its new addresses may include this node's own (see `fib`).
        return forward(Counter::IcmpErrorTranslated);
    }
    pass(Counter::IcmpErrorTranslated)
}

/// What the quoted packet becomes. An entry rewrites packets of its own
/// direction; the quoted packet runs the other way, so each rewrite lands
/// on the opposite end: a DNAT entry (rewrites destinations) gives the
/// quoted source, a REV_NAT entry (rewrites sources) the quoted
/// destination, and SNAT the remaining end.
#[inline(always)]
fn translated(old: &Endpoints, ct: &CtValue) -> Endpoints {
    let v6 = translated_v6(&widen(old), ct);
    Endpoints { saddr: v4(&v6.saddr), daddr: v4(&v6.daddr), sport: v6.sport, dport: v6.dport }
}

#[inline(always)]
fn widen(e: &Endpoints) -> Endpoints<16> {
    Endpoints { saddr: addr_v4(e.saddr), daddr: addr_v4(e.daddr), sport: e.sport, dport: e.dport }
}

/// [`translated`] over 16-byte addresses (either family's, as the
/// conntrack entry holds them).
#[inline(always)]
fn translated_v6(old: &Endpoints<16>, ct: &CtValue) -> Endpoints<16> {
    let mut new = *old;
    let snat = ct.flags & ct_flags::SNAT != 0;
    if ct.flags & ct_flags::DNAT != 0 {
        new.saddr = ct.nat_addr;
        new.sport = ct.nat_port;
        if snat {
            new.daddr = ct.snat_addr;
            new.dport = ct.snat_port;
        }
    } else if ct.flags & ct_flags::REV_NAT != 0 {
        new.daddr = ct.nat_addr;
        new.dport = ct.nat_port;
        if snat {
            new.saddr = ct.snat_addr;
            new.sport = ct.snat_port;
        }
    }
    new
}

/// Rewrites the quoted IP header and ports, their checksums and the ICMP
/// checksum; any helper failing here is `drop_icmp_quote`.
#[expect(clippy::too_many_arguments, reason = "offsets read once by the caller")]
#[inline(always)]
fn rewrite_quoted(
    ctx: &TcContext,
    outer_end: usize,
    icmp_off: usize,
    ip_off: usize,
    l4_off: usize,
    proto: u8,
    ip: &[u8; 20],
    old: &Endpoints,
    new: &Endpoints,
) -> Result<(), Counter> {
    let mut icmp_check: [u8; 2] = ctx.load(icmp_off + ICMP_CSUM_OFF).map_err(|_| Counter::DropIcmpQuote)?;
    // The quoted IP header: addresses and its checksum. The ICMP checksum
    // covers both; the header's sum does not change (that is what its
    // checksum is for), but each field is folded in anyway, exactly.
    let old_ip_check = [ip[10], ip[11]];
    let mut ip_check = csum::update32(old_ip_check, old.saddr, new.saddr);
    ip_check = csum::update32(ip_check, old.daddr, new.daddr);
    icmp_check = csum::update32(icmp_check, old.saddr, new.saddr);
    icmp_check = csum::update32(icmp_check, old.daddr, new.daddr);
    icmp_check = csum::update16(icmp_check, old_ip_check, ip_check);
    icmp_check = csum::update16(icmp_check, old.sport, new.sport);
    icmp_check = csum::update16(icmp_check, old.dport, new.dport);
    // The quoted TCP/UDP checksum, when the quote reaches it (UDP's always
    // does; TCP's only beyond the 8 bytes RFC 792 guarantees) and it is in
    // use (a UDP checksum of 0 means none), and only within the outer
    // datagram.
    let l4_check_off = l4_off + if proto == PROTO_TCP { TCP_CSUM_OFF } else { UDP_CSUM_OFF };
    if l4_check_off + 2 <= outer_end
        && let Ok(old_l4_check) = ctx.load::<[u8; 2]>(l4_check_off)
        && !(proto == PROTO_UDP && old_l4_check == [0, 0])
    {
        let l4_check = csum::update_endpoints(old_l4_check, proto == PROTO_UDP, old, new);
        icmp_check = csum::update16(icmp_check, old_l4_check, l4_check);
        ctx.store(l4_check_off, &l4_check, STORE).map_err(|_| Counter::DropIcmpQuote)?;
    }
    ctx.store(ip_off + 12, &new.saddr, STORE).map_err(|_| Counter::DropIcmpQuote)?;
    ctx.store(ip_off + 16, &new.daddr, STORE).map_err(|_| Counter::DropIcmpQuote)?;
    ctx.store(ip_off + 10, &ip_check, STORE).map_err(|_| Counter::DropIcmpQuote)?;
    ctx.store(l4_off, &new.sport, STORE).map_err(|_| Counter::DropIcmpQuote)?;
    ctx.store(l4_off + 2, &new.dport, STORE).map_err(|_| Counter::DropIcmpQuote)?;
    ctx.store(icmp_off + ICMP_CSUM_OFF, &icmp_check, STORE).map_err(|_| Counter::DropIcmpQuote)?;
    Ok(())
}

/// ICMPv6 (RFC 4443 errors: destination unreachable, packet too big, time
/// exceeded, parameter problem) about a translated flow: the same
/// translation as IPv4's. There is no IP header checksum; the ICMPv6
/// checksum covers a pseudo-header, so the outer addresses' change enters
/// it too. A quote whose IPv6 header is followed by an extension header
/// (its ports out of reach) passes untouched.
///
/// Called by the pipeline itself, not from [`translate_error`]: the
/// verifier adds up the frames of a call chain, and the two frames
/// together would not fit 512 bytes.
#[inline(never)]
pub fn translate_error_v6(ctx: &TcContext, flow: &Flow) -> Outcome {
    let ip_off = flow.l4_off + ICMP_HLEN;
    let Ok(head) = ctx.load::<[u8; 8]>(ip_off) else { return pass(Counter::PassMalformed) };
    if head[0] >> 4 != 6 {
        return pass(Counter::PassMalformed);
    }
    let proto = head[6];
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return pass(Counter::PassOtherProto);
    }
    let l4_off = ip_off + IP6_HLEN;
    let (Ok(saddr), Ok(daddr), Ok(ports)) =
        (ctx.load::<Addr>(ip_off + IP6_SRC_OFF), ctx.load::<Addr>(ip_off + IP6_DST_OFF), ctx.load::<[u8; 4]>(l4_off))
    else {
        return pass(Counter::PassMalformed);
    };
    let s = scratch()?;
    // The other direction of the quoted packet's flow.
    s.peer_key = CtKey {
        saddr: daddr,
        daddr: saddr,
        sport: [ports[2], ports[3]],
        dport: [ports[0], ports[1]],
        proto,
        family: FAMILY_IPV6,
        _pad: [0; 2],
    };
    let Some(found) = conntrack::lookup(&s.peer_key) else { return pass(Counter::PassNoService) };
    // SAFETY: plain data; a racing update gives a stale but valid copy.
    s.entry = unsafe { *found.ct };
    let old = Endpoints::<16> { saddr, daddr, sport: [ports[0], ports[1]], dport: [ports[2], ports[3]] };
    let new = translated_v6(&old, &s.entry);
    // The quote must lie inside the outer datagram (its payload length).
    let Ok(payload_len) = ctx.load::<[u8; 2]>(flow.ip_off + IP6_PAYLOAD_LEN_OFF) else {
        return pass(Counter::PassMalformed);
    };
    let outer_end = flow.ip_off + IP6_HLEN + usize::from(u16::from_be_bytes(payload_len));
    if l4_off + 8 > outer_end {
        return pass(Counter::PassMalformed);
    }
    // The outer header, as for IPv4; its addresses are in the ICMPv6
    // checksum's pseudo-header.
    let outer_destination = if flow.daddr == old.saddr { new.saddr } else { flow.daddr };
    let outer_source = if flow.saddr == old.daddr { new.daddr } else { flow.saddr };
    let outer = Endpoints::<16> { saddr: outer_source, daddr: outer_destination, sport: [0; 2], dport: [0; 2] };
    rewrite_quoted_v6(ctx, flow, outer_end, proto, &old, &new, &outer)?;
    let ip = flow.ip_off;
    ctx.store(ip + IP6_SRC_OFF, &outer.saddr, STORE).map_err(|_| Counter::DropStore)?;
    ctx.store(ip + IP6_DST_OFF, &outer.daddr, STORE).map_err(|_| Counter::DropStore)?;
    if s.entry.flags & (ct_flags::EXTERNAL | ct_flags::SNAT) != 0 {
        return forward(Counter::IcmpErrorTranslated);
    }
    pass(Counter::IcmpErrorTranslated)
}

/// [`rewrite_quoted`] for IPv6: the quoted addresses and ports, the quoted
/// TCP/UDP checksum, and the ICMPv6 checksum over all of them and over the
/// outer addresses' change (`outer`: the new outer source and destination,
/// which its pseudo-header covers); any helper failing here is
/// `drop_icmp_quote`.
#[inline(always)]
fn rewrite_quoted_v6(
    ctx: &TcContext,
    flow: &Flow,
    outer_end: usize,
    proto: u8,
    old: &Endpoints<16>,
    new: &Endpoints<16>,
    outer: &Endpoints<16>,
) -> Result<(), Counter> {
    let icmp_off = flow.l4_off;
    let ip_off = icmp_off + ICMP_HLEN;
    let l4_off = ip_off + IP6_HLEN;
    let mut icmp_check: [u8; 2] = ctx.load(icmp_off + ICMP_CSUM_OFF).map_err(|_| Counter::DropIcmpQuote)?;
    icmp_check = csum::update(icmp_check, &old.saddr, &new.saddr);
    icmp_check = csum::update(icmp_check, &old.daddr, &new.daddr);
    icmp_check = csum::update16(icmp_check, old.sport, new.sport);
    icmp_check = csum::update16(icmp_check, old.dport, new.dport);
    let l4_check_off = l4_off + if proto == PROTO_TCP { TCP_CSUM_OFF } else { UDP_CSUM_OFF };
    if l4_check_off + 2 <= outer_end
        && let Ok(old_l4_check) = ctx.load::<[u8; 2]>(l4_check_off)
        && !(proto == PROTO_UDP && old_l4_check == [0, 0])
    {
        let l4_check = csum::update_endpoints(old_l4_check, proto == PROTO_UDP, old, new);
        icmp_check = csum::update16(icmp_check, old_l4_check, l4_check);
        ctx.store(l4_check_off, &l4_check, STORE).map_err(|_| Counter::DropIcmpQuote)?;
    }
    ctx.store(ip_off + IP6_SRC_OFF, &new.saddr, STORE).map_err(|_| Counter::DropIcmpQuote)?;
    ctx.store(ip_off + IP6_DST_OFF, &new.daddr, STORE).map_err(|_| Counter::DropIcmpQuote)?;
    ctx.store(l4_off, &new.sport, STORE).map_err(|_| Counter::DropIcmpQuote)?;
    ctx.store(l4_off + 2, &new.dport, STORE).map_err(|_| Counter::DropIcmpQuote)?;
    icmp_check = csum::update(icmp_check, &flow.saddr, &outer.saddr);
    icmp_check = csum::update(icmp_check, &flow.daddr, &outer.daddr);
    ctx.store(icmp_off + ICMP_CSUM_OFF, &icmp_check, STORE).map_err(|_| Counter::DropIcmpQuote)
}
