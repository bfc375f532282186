//! Rejecting a new flow to a Service without usable endpoints, the way
//! kube-proxy's `REJECT` rules do: a TCP RST for TCP, an ICMP port
//! unreachable (from the Service address) otherwise. The packet is turned
//! into the answer in place and sent back out of the interface it came in
//! on, towards the pod.
//!
//! On an Ethernet device the MAC addresses are swapped; on an L3 device
//! (the IP header at offset 0) there are none, and `bpf_redirect` to it
//! takes the kernel's no-MAC path (`__bpf_redirect_no_mac`).

use aya_ebpf::{bindings::TC_ACT_REDIRECT, helpers::bpf_redirect, programs::TcContext};
use service_common::{PROTO_TCP, csum, stats::Counter};

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
    let (saddr, daddr) = (u32::from_ne_bytes(flow.saddr), u32::from_ne_bytes(flow.daddr));
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

/// The counter for an answer built by [`icmp_error_to_sender`].
#[inline(always)]
fn answer_counter(answer: u32) -> Counter {
    if answer >> 24 == 11 { Counter::DropTtlExceeded } else { Counter::DropFragNeeded }
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
    let sent = csum::Endpoints { saddr: flow.saddr, daddr: flow.daddr, sport: flow.sport, dport: flow.dport };
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
    let ip_hdr = ipv4_header(flow.daddr, flow.saddr, PROTO_ICMP, (IP_HLEN + ICMP_HLEN + QUOTE_LEN) as u16);
    buf[..IP_HLEN].copy_from_slice(&ip_hdr);
    #[expect(clippy::cast_possible_truncation, reason = "70 bytes at most")]
    change_tail(ctx, (ip_off + IP_HLEN + ICMP_HLEN + QUOTE_LEN) as u32)?;
    swap_macs(ctx, ip_off)?;
    ctx.store(ip_off, &s.answer, 0).map_err(|_| Counter::DropStore)?;
    send_back(ctx, answer_counter(answer))
}
