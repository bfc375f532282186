//! Rejecting a new flow to a Service without usable endpoints, the way
//! kube-proxy's `REJECT` rules do: a TCP RST for TCP, an ICMP port
//! unreachable (from the Service address) otherwise. The packet is turned
//! into the answer in place and sent back out of the interface it came in
//! on, towards the pod.
//!
//! On an Ethernet device the MAC addresses are swapped; on an L3 device
//! (the IP header at offset 0) there are none, and `bpf_redirect` to it
//! takes the kernel's no-MAC path (`__bpf_redirect_no_mac`).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::TC_ACT_REDIRECT,
    helpers::{bpf_redirect, bpf_skb_load_bytes},
    programs::TcContext,
};
use service_common::{PROTO_ICMPV6, PROTO_TCP, csum, stats::Counter};

use crate::{flow::Flow, verdict::Sent};

const ETH_HLEN: usize = 14;
const IP_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
const ICMP_HLEN: usize = 8;
/// The quoted part of the offending datagram: its IP header and 8 bytes.
const QUOTE_LEN: usize = IP_HLEN + 8;
const PROTO_ICMP: u8 = 1;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const DEFAULT_TTL: u8 = 64;

/// A fresh IPv4 header (no options, DF, TTL 64) with its checksum.
#[inline(always)]
fn ipv4_header(saddr: [u8; 4], daddr: [u8; 4], proto: u8, total_len: u16) -> [u8; IP_HLEN] {
    let mut h = [0u8; IP_HLEN];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&total_len.to_be_bytes());
    h[6] = 0x40; // DF
    h[8] = DEFAULT_TTL;
    h[9] = proto;
    h[12..16].copy_from_slice(&saddr);
    h[16..20].copy_from_slice(&daddr);
    let c = csum::finish(csum::sum(0, &h));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// What the reject path needs to know about the offending packet.
struct Offender {
    saddr: [u8; 4],
    daddr: [u8; 4],
    /// 0 on an L3 device, `ETH_HLEN` on an Ethernet one.
    ip_off: usize,
    l4_off: usize,
    tcp_flags: u8,
}

impl Offender {
    #[inline(always)]
    fn new(saddr: u32, daddr: u32, offsets_flags: u32) -> Self {
        Self {
            saddr: saddr.to_ne_bytes(),
            daddr: daddr.to_ne_bytes(),
            ip_off: ((offsets_flags >> 16) & 0xff) as usize,
            l4_off: ((offsets_flags >> 8) & 0xff) as usize,
            tcp_flags: (offsets_flags & 0xff) as u8,
        }
    }
}

/// The IP and L4 offsets and the TCP flags in one argument: a BPF
/// function takes at most five, and the returned Result already uses one.
#[inline(always)]
#[expect(clippy::cast_possible_truncation, reason = "both offsets are at most 14 + 60")]
pub fn pack(ip_off: usize, l4_off: usize, tcp_flags: u8) -> u32 {
    ((ip_off as u32) << 16) | ((l4_off as u32) << 8) | u32::from(tcp_flags)
}

/// Rejects a new flow to a frontend without endpoints: a TCP RST for TCP,
/// an ICMP port unreachable otherwise, sent back; counted as
/// `reject_tcp_rst` / `reject_icmp_unreachable`.
#[inline(always)]
pub fn refuse(ctx: &TcContext, flow: &Flow) -> Result<Sent, Counter> {
    if flow.is_ipv6() {
        return if flow.proto == PROTO_TCP { tcp_rst_v6(ctx, flow) } else { icmp6_port_unreachable(ctx, flow) };
    }
    let s = &flow.saddr;
    let d = &flow.daddr;
    let (saddr, daddr) = (u32::from_ne_bytes([s[0], s[1], s[2], s[3]]), u32::from_ne_bytes([d[0], d[1], d[2], d[3]]));
    if flow.proto == PROTO_TCP {
        tcp_rst(ctx, saddr, daddr, pack(flow.ip_off, flow.l4_off, flow.tcp_flags))
    } else {
        icmp_port_unreachable(ctx, saddr, daddr, pack(flow.ip_off, flow.l4_off, 0))
    }
}

/// Swaps the Ethernet addresses (the answer goes back to the sender), when
/// there are any: an L3 device's packet (`ip_off` 0) has no MAC header.
#[inline(always)]
fn swap_macs(ctx: &TcContext, ip_off: usize) -> Result<(), Counter> {
    if ip_off != ETH_HLEN {
        return Ok(());
    }
    let macs: [u8; 12] = ctx.load(0).map_err(|_| Counter::DropLoad)?;
    let mut swapped = [0u8; 12];
    swapped[0..6].copy_from_slice(&macs[6..12]);
    swapped[6..12].copy_from_slice(&macs[0..6]);
    ctx.store(0, &swapped, 0).map_err(|_| Counter::DropStore)
}

/// Sends the answer back out of the interface it came in on, to be
/// counted as `counter`.
#[inline(always)]
fn send_back(ctx: &TcContext, counter: Counter) -> Result<Sent, Counter> {
    // SAFETY: reading the ingress ifindex from the context the kernel
    // handed us; bpf_redirect has no memory preconditions.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: see above.
    let action = unsafe { bpf_redirect(ifindex, 0) };
    // TC_ACT_SHOT when the kernel refuses the redirect's flags.
    if action != i64::from(TC_ACT_REDIRECT) {
        return Err(Counter::DropRedirectRefused);
    }
    Ok(Sent(counter))
}

/// Turns a TCP segment into the RST that refuses it (RFC 793 reset
/// generation) and sends it back. An incoming RST is dropped unanswered
/// (`drop_reject_unanswered`).
///
/// Not inlined: a rare path whose buffers must not count against the
/// fast path's 512-byte stack (a BPF-to-BPF call gets its own frame).
#[inline(never)]
///
/// `saddr`/`daddr` are the offending packet's addresses as they sit in the
/// header (`u32::from_ne_bytes` of the wire bytes): scalars, not a struct,
/// so nothing more lands on the stack.
fn tcp_rst(ctx: &TcContext, saddr: u32, daddr: u32, l4_off_flags: u32) -> Result<Sent, Counter> {
    let p = Offender::new(saddr, daddr, l4_off_flags);
    if p.tcp_flags & TCP_RST != 0 {
        return Err(Counter::DropRejectUnanswered);
    }
    let tcp: [u8; TCP_HLEN] = ctx.load(p.l4_off).map_err(|_| Counter::DropLoad)?;
    let ip: [u8; IP_HLEN] = ctx.load(p.ip_off).map_err(|_| Counter::DropLoad)?;
    let ip_total = u32::from(u16::from_be_bytes([ip[2], ip[3]]));
    let ihl = u32::from(ip[0] & 0x0f) * 4;
    let doff = u32::from(tcp[12] >> 4) * 4;
    let payload = ip_total.saturating_sub(ihl + doff);
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);

    let mut rst = [0u8; TCP_HLEN];
    rst[0..2].copy_from_slice(&tcp[2..4]);
    rst[2..4].copy_from_slice(&tcp[0..2]);
    if p.tcp_flags & TCP_ACK != 0 {
        // <SEQ=SEG.ACK><CTL=RST>
        rst[4..8].copy_from_slice(&ack.to_be_bytes());
        rst[13] = TCP_RST;
    } else {
        // <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>
        let len = payload + u32::from(p.tcp_flags & TCP_SYN != 0) + u32::from(p.tcp_flags & TCP_FIN != 0);
        rst[8..12].copy_from_slice(&seq.wrapping_add(len).to_be_bytes());
        rst[13] = TCP_RST | TCP_ACK;
    }
    rst[12] = 5 << 4;
    #[expect(clippy::cast_possible_truncation, reason = "20-byte header")]
    let tcp_len = TCP_HLEN as u16;
    let c = csum::finish(csum::sum(csum::pseudo_header_v4(p.daddr, p.saddr, service_common::PROTO_TCP, tcp_len), &rst));
    rst[16..18].copy_from_slice(&c.to_be_bytes());
    #[expect(clippy::cast_possible_truncation, reason = "40 bytes")]
    let ip_hdr = ipv4_header(p.daddr, p.saddr, service_common::PROTO_TCP, (IP_HLEN + TCP_HLEN) as u16);

    swap_macs(ctx, p.ip_off)?;
    ctx.store(p.ip_off, &ip_hdr, 0).map_err(|_| Counter::DropStore)?;
    ctx.store(p.ip_off + IP_HLEN, &rst, 0).map_err(|_| Counter::DropStore)?;
    #[expect(clippy::cast_possible_truncation, reason = "54 bytes at most")]
    change_tail(ctx, (p.ip_off + IP_HLEN + TCP_HLEN) as u32)?;
    send_back(ctx, Counter::RejectTcpRst)
}

/// Turns a datagram into the ICMP port unreachable that refuses it, sent
/// from the Service address, quoting its IP header and first 8 bytes.
/// Datagrams with IP options are dropped unanswered
/// (`drop_reject_unanswered`).
#[inline(never)]
fn icmp_port_unreachable(ctx: &TcContext, saddr: u32, daddr: u32, l4_off_flags: u32) -> Result<Sent, Counter> {
    let p = Offender::new(saddr, daddr, l4_off_flags);
    if p.l4_off != p.ip_off + IP_HLEN {
        return Err(Counter::DropRejectUnanswered);
    }
    let quote: [u8; QUOTE_LEN] = ctx.load(p.ip_off).map_err(|_| Counter::DropLoad)?;
    let mut icmp = [0u8; ICMP_HLEN + QUOTE_LEN];
    icmp[0] = 3; // destination unreachable
    icmp[1] = 3; // port unreachable
    icmp[ICMP_HLEN..].copy_from_slice(&quote);
    let c = csum::finish(csum::sum(0, &icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    #[expect(clippy::cast_possible_truncation, reason = "56 bytes")]
    let ip_hdr = ipv4_header(p.daddr, p.saddr, PROTO_ICMP, (IP_HLEN + ICMP_HLEN + QUOTE_LEN) as u16);

    // Size the packet first (it may grow: a short datagram is smaller than
    // its answer), then write every byte of the answer.
    #[expect(clippy::cast_possible_truncation, reason = "70 bytes at most")]
    change_tail(ctx, (p.ip_off + IP_HLEN + ICMP_HLEN + QUOTE_LEN) as u32)?;
    swap_macs(ctx, p.ip_off)?;
    ctx.store(p.ip_off, &ip_hdr, 0).map_err(|_| Counter::DropStore)?;
    ctx.store(p.ip_off + IP_HLEN, &icmp, 0).map_err(|_| Counter::DropStore)?;
    send_back(ctx, Counter::RejectIcmpUnreachable)
}

#[inline(always)]
fn change_tail(ctx: &TcContext, len: u32) -> Result<(), Counter> {
    // SAFETY: the helper takes the context pointer the kernel gave us.
    let rc = unsafe { aya_ebpf::helpers::bpf_skb_change_tail(ctx.skb.skb, len, 0) };
    if rc == 0 { Ok(()) } else { Err(Counter::DropResize) }
}

/// Where the quote starts in an ICMP answer built by
/// [`icmp_error_to_sender`]: after the IP and ICMP headers.
const Q: usize = IP_HLEN + ICMP_HLEN;

/// ICMP type, code and the 16-bit next-hop MTU in one argument (a BPF
/// function takes at most five).
#[inline(always)]
pub fn pack_icmp(icmp_type: u8, code: u8, mtu: u16) -> u32 {
    (u32::from(icmp_type) << 24) | (u32::from(code) << 16) | u32::from(mtu)
}

/// Whether a packed answer is time exceeded (ICMP type 11, what `fib`
/// packs for an exhausted TTL or hop limit) rather than fragmentation
/// needed.
#[inline(always)]
fn is_time_exceeded(answer: u32) -> bool {
    answer >> 24 == 11
}

/// The counter for an answer built by [`icmp_error_to_sender`].
#[inline(always)]
fn answer_counter(answer: u32) -> Counter {
    if is_time_exceeded(answer) { Counter::DropTtlExceeded } else { Counter::DropFragNeeded }
}

/// Answers a packet that cannot be forwarded (too big for the egress MTU,
/// TTL exhausted) with the ICMP error the kernel's forwarding would have
/// sent, back to its sender, quoting the packet as the sender sent it:
/// the translation already written into it is undone in the quote (its
/// addresses, ports, IP checksum and UDP checksum). Sent from the address
/// the sender addressed. A packet with IP options is dropped unanswered
/// (`drop_icmp_answer`). The answer is built in scratch memory, off the
/// stack.
#[inline(never)]
pub fn icmp_error_to_sender(ctx: &TcContext, flow: &Flow, answer: u32) -> Result<Sent, Counter> {
    let s = crate::scratch::scratch()?;
    let buf = &mut s.answer;
    // [0, 20): IP header; [20, 28): ICMP header; [28, 56): the quote.
    let ip_off = flow.ip_off;
    let quote: [u8; QUOTE_LEN] = ctx.load(ip_off).map_err(|_| Counter::DropLoad)?;
    if quote[0] != 0x45 {
        return Err(Counter::DropIcmpAnswer);
    }
    buf[Q..].copy_from_slice(&quote);
    // The endpoints as they now sit in the packet, and as its sender sent
    // them (the flow as parsed, before the translation).
    let now = csum::Endpoints {
        saddr: [quote[12], quote[13], quote[14], quote[15]],
        daddr: [quote[16], quote[17], quote[18], quote[19]],
        sport: [quote[20], quote[21]],
        dport: [quote[22], quote[23]],
    };
    let (fs, fd) = (&flow.saddr, &flow.daddr);
    let sent = csum::Endpoints {
        saddr: [fs[0], fs[1], fs[2], fs[3]],
        daddr: [fd[0], fd[1], fd[2], fd[3]],
        sport: flow.sport,
        dport: flow.dport,
    };
    let udp_check = [quote[26], quote[27]];
    buf[Q + 12..Q + 16].copy_from_slice(&sent.saddr);
    buf[Q + 16..Q + 20].copy_from_slice(&sent.daddr);
    buf[Q + 10] = 0;
    buf[Q + 11] = 0;
    let mut ip_part = [0u8; IP_HLEN];
    ip_part.copy_from_slice(&buf[Q..Q + IP_HLEN]);
    let c = csum::finish(csum::sum(0, &ip_part));
    buf[Q + 10..Q + 12].copy_from_slice(&c.to_be_bytes());
    if !flow.later_fragment && (flow.proto == service_common::PROTO_TCP || flow.proto == service_common::PROTO_UDP) {
        buf[Q + 20..Q + 22].copy_from_slice(&sent.sport);
        buf[Q + 22..Q + 24].copy_from_slice(&sent.dport);
        // UDP's checksum lies in the quoted 8 bytes (TCP's does not).
        if flow.proto == service_common::PROTO_UDP && udp_check != [0, 0] {
            buf[Q + 26..Q + 28].copy_from_slice(&csum::update_endpoints(udp_check, true, &now, &sent));
        }
    }
    #[expect(clippy::cast_possible_truncation, reason = "unpacking pack_icmp")]
    {
        buf[IP_HLEN] = (answer >> 24) as u8;
        buf[IP_HLEN + 1] = (answer >> 16) as u8;
        buf[IP_HLEN + 2] = 0;
        buf[IP_HLEN + 3] = 0;
        buf[IP_HLEN + 4] = 0;
        buf[IP_HLEN + 5] = 0;
        buf[IP_HLEN + 6..IP_HLEN + 8].copy_from_slice(&(answer as u16).to_be_bytes());
    }
    let mut icmp = [0u8; ICMP_HLEN + QUOTE_LEN];
    icmp.copy_from_slice(&buf[IP_HLEN..]);
    let c = csum::finish(csum::sum(0, &icmp));
    buf[IP_HLEN + 2..IP_HLEN + 4].copy_from_slice(&c.to_be_bytes());
    #[expect(clippy::cast_possible_truncation, reason = "56 bytes")]
    let ip_hdr = ipv4_header(sent.daddr, sent.saddr, PROTO_ICMP, (IP_HLEN + ICMP_HLEN + QUOTE_LEN) as u16);
    buf[..IP_HLEN].copy_from_slice(&ip_hdr);
    #[expect(clippy::cast_possible_truncation, reason = "70 bytes at most")]
    change_tail(ctx, (ip_off + IP_HLEN + ICMP_HLEN + QUOTE_LEN) as u32)?;
    swap_macs(ctx, ip_off)?;
    ctx.store(ip_off, &s.answer, 0).map_err(|_| Counter::DropStore)?;
    send_back(ctx, answer_counter(answer))
}

// IPv6 (RFC 8200, RFC 4443): the same answers, built in scratch memory
// (`Scratch::answer6`: the IPv6 header alone is 40 bytes).

const IP6_HLEN: usize = 40;
/// The quote of an ICMPv6 answer: the offending packet's IPv6 header and
/// the 8 bytes after it (RFC 4443 asks for as much as fits in the minimum
/// MTU; the same 8 bytes as IPv4's quote carry the ports).
const QUOTE6_LEN: usize = IP6_HLEN + 8;
const ICMP6_LEN: usize = ICMP_HLEN + QUOTE6_LEN;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;

/// A fresh IPv6 header (traffic class and flow label 0, hop limit 64).
#[inline(always)]
fn ipv6_header(out: &mut [u8], saddr: &[u8; 16], daddr: &[u8; 16], next: u8, payload_len: u16) {
    out[0] = 0x60;
    out[1] = 0;
    out[2] = 0;
    out[3] = 0;
    out[4..6].copy_from_slice(&payload_len.to_be_bytes());
    out[6] = next;
    out[7] = DEFAULT_TTL;
    out[8..24].copy_from_slice(saddr);
    out[24..40].copy_from_slice(daddr);
}

/// The ICMPv6 checksum of the message in `s.answer6[IP6_HLEN..]`, sent
/// from `saddr` to `daddr` (the pseudo-header is part of it).
#[inline(always)]
fn icmp6_checksum(msg: &[u8; ICMP6_LEN], saddr: &[u8; 16], daddr: &[u8; 16]) -> [u8; 2] {
    #[expect(clippy::cast_possible_truncation, reason = "56 bytes")]
    let len = ICMP6_LEN as u16;
    csum::finish(csum::sum(csum::pseudo_header_v6(saddr, daddr, PROTO_ICMPV6, len), msg)).to_be_bytes()
}

/// [`tcp_rst`] for IPv6: the RST comes from the address the segment was
/// sent to, without the segment's extension headers.
#[inline(never)]
fn tcp_rst_v6(ctx: &TcContext, flow: &Flow) -> Result<Sent, Counter> {
    if flow.tcp_flags & TCP_RST != 0 {
        return Err(Counter::DropRejectUnanswered);
    }
    let tcp: [u8; TCP_HLEN] = ctx.load(flow.l4_off).map_err(|_| Counter::DropLoad)?;
    let payload_len: [u8; 2] = ctx.load(flow.ip_off + 4).map_err(|_| Counter::DropLoad)?;
    // The segment's length: the IPv6 payload minus the extension headers
    // and the TCP header.
    #[expect(clippy::cast_possible_truncation, reason = "extension headers are walked a bounded number of times")]
    let ext = (flow.l4_off - flow.ip_off - IP6_HLEN) as u32;
    let doff = u32::from(tcp[12] >> 4) * 4;
    let payload = u32::from(u16::from_be_bytes(payload_len)).saturating_sub(ext + doff);
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let s = crate::scratch::scratch()?;
    let buf = &mut s.answer6;
    let (hdr, rst) = buf.split_at_mut(IP6_HLEN);
    let rst = &mut rst[..TCP_HLEN];
    rst.fill(0);
    rst[0..2].copy_from_slice(&tcp[2..4]);
    rst[2..4].copy_from_slice(&tcp[0..2]);
    if flow.tcp_flags & TCP_ACK != 0 {
        // <SEQ=SEG.ACK><CTL=RST>
        rst[4..8].copy_from_slice(&tcp[8..12]);
        rst[13] = TCP_RST;
    } else {
        // <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>
        let len = payload + u32::from(flow.tcp_flags & TCP_SYN != 0) + u32::from(flow.tcp_flags & TCP_FIN != 0);
        rst[8..12].copy_from_slice(&seq.wrapping_add(len).to_be_bytes());
        rst[13] = TCP_RST | TCP_ACK;
    }
    rst[12] = 5 << 4;
    #[expect(clippy::cast_possible_truncation, reason = "20-byte header")]
    let tcp_len = TCP_HLEN as u16;
    let c = csum::finish(csum::sum(
        csum::pseudo_header_v6(&flow.daddr, &flow.saddr, PROTO_TCP, tcp_len),
        array::<TCP_HLEN>(rst)?,
    ));
    rst[16..18].copy_from_slice(&c.to_be_bytes());
    ipv6_header(hdr, &flow.daddr, &flow.saddr, PROTO_TCP, tcp_len);
    let ip_off = flow.ip_off;
    #[expect(clippy::cast_possible_truncation, reason = "74 bytes at most")]
    change_tail(ctx, (ip_off + IP6_HLEN + TCP_HLEN) as u32)?;
    swap_macs(ctx, ip_off)?;
    ctx.store(ip_off, array::<{ IP6_HLEN + TCP_HLEN }>(&buf[..IP6_HLEN + TCP_HLEN])?, 0)
        .map_err(|_| Counter::DropStore)?;
    send_back(ctx, Counter::RejectTcpRst)
}

/// [`icmp_port_unreachable`] for IPv6: ICMPv6 destination unreachable,
/// port unreachable (RFC 4443 3.1), from the Service address, quoting the
/// datagram's first 48 bytes.
#[inline(never)]
fn icmp6_port_unreachable(ctx: &TcContext, flow: &Flow) -> Result<Sent, Counter> {
    let s = crate::scratch::scratch()?;
    let buf = &mut s.answer6;
    {
        let quote: &mut [u8; QUOTE6_LEN] =
            (&mut buf[IP6_HLEN + ICMP_HLEN..]).try_into().map_err(|_| Counter::DropRejectUnanswered)?;
        load_into(ctx, flow.ip_off, quote)?;
    }
    buf[IP6_HLEN..IP6_HLEN + ICMP_HLEN].fill(0);
    buf[IP6_HLEN] = ICMPV6_DEST_UNREACH;
    buf[IP6_HLEN + 1] = ICMPV6_PORT_UNREACH;
    send_icmp6(ctx, flow, Counter::RejectIcmpUnreachable)
}

/// Finishes the ICMPv6 message in `s.answer6[IP6_HLEN..]` (its checksum,
/// the IPv6 header from the flow's destination back to its source) and
/// sends it back, counted as `counter`.
#[inline(always)]
fn send_icmp6(ctx: &TcContext, flow: &Flow, counter: Counter) -> Result<Sent, Counter> {
    let s = crate::scratch::scratch()?;
    let buf = &mut s.answer6;
    buf[IP6_HLEN + 2] = 0;
    buf[IP6_HLEN + 3] = 0;
    let c = icmp6_checksum(array(&buf[IP6_HLEN..])?, &flow.daddr, &flow.saddr);
    buf[IP6_HLEN + 2..IP6_HLEN + 4].copy_from_slice(&c);
    #[expect(clippy::cast_possible_truncation, reason = "56 bytes")]
    ipv6_header(&mut buf[..IP6_HLEN], &flow.daddr, &flow.saddr, PROTO_ICMPV6, ICMP6_LEN as u16);
    let ip_off = flow.ip_off;
    // Size the packet first (it may grow), then write every byte.
    #[expect(clippy::cast_possible_truncation, reason = "110 bytes at most")]
    change_tail(ctx, (ip_off + IP6_HLEN + ICMP6_LEN) as u32)?;
    swap_macs(ctx, ip_off)?;
    ctx.store(ip_off, &s.answer6, 0).map_err(|_| Counter::DropStore)?;
    send_back(ctx, counter)
}

/// A fixed-size view of `bytes` (no copy): what the checksum helpers take.
#[inline(always)]
fn array<const N: usize>(bytes: &[u8]) -> Result<&[u8; N], Counter> {
    bytes.try_into().map_err(|_| Counter::DropIcmpAnswer)
}

/// Copies `N` packet bytes at `off` into `dst` (scratch memory), not
/// through the stack.
#[inline(always)]
fn load_into<const N: usize>(ctx: &TcContext, off: usize, dst: &mut [u8; N]) -> Result<(), Counter> {
    #[expect(clippy::cast_possible_truncation, reason = "a header offset and a small constant")]
    // SAFETY: `dst` is N writable bytes; the helper checks the packet
    // bounds itself.
    let rc = unsafe { bpf_skb_load_bytes(ctx.skb.skb as *const c_void, off as u32, dst.as_mut_ptr().cast(), N as u32) };
    if rc == 0 { Ok(()) } else { Err(Counter::DropLoad) }
}

/// [`icmp_error_to_sender`] for IPv6: packet too big (RFC 4443 3.2, the
/// MTU in 32 bits) for an answer packed as fragmentation needed, time
/// exceeded (hop limit, 3.3) for time exceeded, quoting the packet as its
/// sender sent it (addresses, and the ports and UDP checksum when no
/// extension header sits between them and the IPv6 header).
///
/// Called by `fib::forward` itself, not from [`icmp_error_to_sender`]:
/// the two frames in one call chain would not fit 512 bytes.
#[inline(never)]
pub fn icmp6_error_to_sender(ctx: &TcContext, flow: &Flow, answer: u32) -> Result<Sent, Counter> {
    const Q6: usize = IP6_HLEN + ICMP_HLEN;
    let s = crate::scratch::scratch()?;
    let buf = &mut s.answer6;
    {
        let quote: &mut [u8; QUOTE6_LEN] = (&mut buf[Q6..]).try_into().map_err(|_| Counter::DropIcmpAnswer)?;
        load_into(ctx, flow.ip_off, quote)?;
    }
    let ports_quoted = flow.l4_off == flow.ip_off + IP6_HLEN && !flow.later_fragment;
    if ports_quoted && (flow.proto == PROTO_TCP || flow.proto == service_common::PROTO_UDP) {
        // UDP's checksum lies in the quoted 8 bytes (TCP's does not): it
        // follows the endpoints back, computed before they are restored.
        let udp_check = [buf[Q6 + 46], buf[Q6 + 47]];
        if flow.proto == service_common::PROTO_UDP && udp_check != [0, 0] {
            let mut c = csum::update(udp_check, array::<16>(&buf[Q6 + 8..Q6 + 24])?, &flow.saddr);
            c = csum::update(c, array::<16>(&buf[Q6 + 24..Q6 + 40])?, &flow.daddr);
            c = csum::update16(c, [buf[Q6 + 40], buf[Q6 + 41]], flow.sport);
            c = csum::update16(c, [buf[Q6 + 42], buf[Q6 + 43]], flow.dport);
            if c == [0, 0] {
                c = [0xff, 0xff];
            }
            buf[Q6 + 46..Q6 + 48].copy_from_slice(&c);
        }
        buf[Q6 + 40..Q6 + 42].copy_from_slice(&flow.sport);
        buf[Q6 + 42..Q6 + 44].copy_from_slice(&flow.dport);
    }
    buf[Q6 + 8..Q6 + 24].copy_from_slice(&flow.saddr);
    buf[Q6 + 24..Q6 + 40].copy_from_slice(&flow.daddr);
    let too_big = !is_time_exceeded(answer);
    buf[IP6_HLEN] = if too_big { ICMPV6_PKT_TOOBIG } else { ICMPV6_TIME_EXCEED };
    buf[IP6_HLEN + 1] = 0;
    // Packet too big's MTU is 32 bits; time exceeded's word is unused.
    #[expect(clippy::cast_possible_truncation, reason = "unpacking pack_icmp")]
    let mtu = if too_big { u32::from(answer as u16) } else { 0 };
    buf[IP6_HLEN + 4..IP6_HLEN + 8].copy_from_slice(&mtu.to_be_bytes());
    send_icmp6(ctx, flow, answer_counter(answer))
}
