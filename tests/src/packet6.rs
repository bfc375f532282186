//! Crafting and checking IPv6 frames for the BPF_PROG_TEST_RUN tier
//! (RFC 8200, RFC 4443), beside [`crate::packet`]'s IPv4 ones. Checksums
//! are computed here from scratch (pseudo-header with 128-bit addresses,
//! ICMPv6's included), so a frame the program rewrote can be compared byte
//! for byte with one built independently.

use std::net::Ipv6Addr;

use crate::packet::ones_complement_sum;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const ETH_P_IPV6: u16 = 0x86dd;
const HOP_LIMIT: u8 = 64;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const HOPOPTS: u8 = 0;
pub const ROUTING: u8 = 43;
pub const FRAGMENT: u8 = 44;
pub const DSTOPTS: u8 = 60;
/// The fragment identification the crafted fragments carry.
pub const FRAGMENT_ID: u32 = 0x0bad_cafe;

fn pseudo_header_sum(src: Ipv6Addr, dst: Ipv6Addr, next: u8, len: usize) -> u32 {
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, next]);
    u32::from(ones_complement_sum(0, &pseudo))
}

/// The upper-layer checksum over the IPv6 pseudo-header and `segment`
/// (its checksum field zeroed). A UDP result of 0 is sent as 0xffff (a 0
/// is invalid over IPv6).
#[must_use]
pub fn l4_checksum(src: Ipv6Addr, dst: Ipv6Addr, next: u8, segment: &[u8]) -> u16 {
    let c = !ones_complement_sum(pseudo_header_sum(src, dst, next, segment.len()), segment);
    if c == 0 && next == PROTO_UDP { 0xffff } else { c }
}

/// An extension header of the chain between the IPv6 header and the
/// upper-layer header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ext {
    /// Hop-by-hop options: one PadN option filling 8 bytes.
    HopByHop,
    /// Destination options of `len8` 8-byte units (PadN).
    DestinationOptions { len8: u8 },
    /// A routing header of type 4 (segment routing) with no segments left.
    Routing,
    /// A fragment header: `offset8` in 8-byte units, more fragments.
    Fragment { offset8: u16, more: bool },
}

impl Ext {
    fn number(self) -> u8 {
        match self {
            Self::HopByHop => HOPOPTS,
            Self::DestinationOptions { .. } => DSTOPTS,
            Self::Routing => ROUTING,
            Self::Fragment { .. } => FRAGMENT,
        }
    }

    fn bytes(self, next: u8) -> Vec<u8> {
        match self {
            Self::HopByHop => vec![next, 0, 1, 4, 0, 0, 0, 0],
            Self::DestinationOptions { len8 } => {
                let len = usize::from(len8) * 8;
                let mut h = vec![0u8; len.max(8)];
                h[0] = next;
                h[1] = u8::try_from(h.len() / 8 - 1).unwrap_or(0);
                // PadN over the rest.
                h[2] = 1;
                h[3] = u8::try_from(h.len() - 4).unwrap_or(0);
                h
            }
            Self::Routing => vec![next, 0, 4, 0, 0, 0, 0, 0],
            Self::Fragment { offset8, more } => {
                let word = (offset8 << 3) | u16::from(more);
                let mut h = vec![next, 0];
                h.extend_from_slice(&word.to_be_bytes());
                h.extend_from_slice(&FRAGMENT_ID.to_be_bytes());
                h
            }
        }
    }
}

/// The extension header chain `exts` ahead of an upper-layer header
/// `next`: the IPv6 header's next-header value and the chain's bytes.
fn chain(exts: &[Ext], next: u8) -> (u8, Vec<u8>) {
    let mut bytes = Vec::new();
    for (i, e) in exts.iter().enumerate() {
        let after = exts.get(i + 1).map_or(next, |n| n.number());
        bytes.extend_from_slice(&e.bytes(after));
    }
    (exts.first().map_or(next, |e| e.number()), bytes)
}

/// An Ethernet + IPv6 frame: the header (hop limit 64), the extension
/// headers `exts`, then `upper` (the upper-layer header `next` and its
/// payload).
#[must_use]
pub fn frame(src: Ipv6Addr, dst: Ipv6Addr, exts: &[Ext], next: u8, upper: &[u8]) -> Vec<u8> {
    let (first, ext_bytes) = chain(exts, next);
    let payload_len = u16::try_from(ext_bytes.len() + upper.len()).unwrap_or(u16::MAX);
    let mut f = Vec::with_capacity(14 + 40 + usize::from(payload_len));
    f.extend_from_slice(&NODE_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&payload_len.to_be_bytes());
    f.push(first);
    f.push(HOP_LIMIT);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&ext_bytes);
    f.extend_from_slice(upper);
    f
}

/// A TCP segment (the same header as IPv4's crafted ones) with its
/// checksum over the IPv6 pseudo-header.
#[must_use]
pub fn tcp_segment(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut seg = crate::packet::tcp_segment_without_checksum(sport, dport, flags, payload);
    let c = l4_checksum(src, dst, PROTO_TCP, &seg);
    seg[16..18].copy_from_slice(&c.to_be_bytes());
    seg
}

/// A UDP datagram with its checksum.
#[must_use]
pub fn udp_segment(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut seg = vec![0u8; 8];
    seg[0..2].copy_from_slice(&sport.to_be_bytes());
    seg[2..4].copy_from_slice(&dport.to_be_bytes());
    seg[4..6].copy_from_slice(&u16::try_from(8 + payload.len()).unwrap_or(u16::MAX).to_be_bytes());
    seg.extend_from_slice(payload);
    let c = l4_checksum(src, dst, PROTO_UDP, &seg);
    seg[6..8].copy_from_slice(&c.to_be_bytes());
    seg
}

/// An Ethernet + IPv6 + TCP frame with an exact checksum.
#[must_use]
pub fn tcp(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    frame(src, dst, &[], PROTO_TCP, &tcp_segment(src, sport, dst, dport, flags, payload))
}

/// An Ethernet + IPv6 + UDP frame with an exact checksum.
#[must_use]
pub fn udp(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    frame(src, dst, &[], PROTO_UDP, &udp_segment(src, sport, dst, dport, payload))
}

/// The two fragments of a UDP datagram (the first carries the UDP header
/// and `split` bytes of it in all, a multiple of 8; the second the rest),
/// each with a fragment header.
#[must_use]
pub fn udp_fragments(
    src: Ipv6Addr,
    sport: u16,
    dst: Ipv6Addr,
    dport: u16,
    payload: &[u8],
    split: usize,
) -> [Vec<u8>; 2] {
    let seg = udp_segment(src, sport, dst, dport, payload);
    let (first, rest) = seg.split_at(split);
    let offset8 = u16::try_from(split / 8).unwrap_or(0);
    [
        frame(src, dst, &[Ext::Fragment { offset8: 0, more: true }], PROTO_UDP, first),
        frame(src, dst, &[Ext::Fragment { offset8, more: false }], PROTO_UDP, rest),
    ]
}

/// An ICMPv6 message (type, code, the 32-bit word after the checksum,
/// body) in an Ethernet + IPv6 frame, with its checksum over the
/// pseudo-header.
#[must_use]
pub fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, icmp_type: u8, code: u8, word: u32, body: &[u8]) -> Vec<u8> {
    let mut msg = vec![icmp_type, code, 0, 0];
    msg.extend_from_slice(&word.to_be_bytes());
    msg.extend_from_slice(body);
    let c = l4_checksum(src, dst, PROTO_ICMPV6, &msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    frame(src, dst, &[], PROTO_ICMPV6, &msg)
}

/// An ICMPv6 error (RFC 4443: 1 destination unreachable, 2 packet too
/// big with `word` the MTU, 3 time exceeded, 4 parameter problem) quoting
/// `quoted_frame`'s IPv6 packet whole.
#[must_use]
pub fn icmp6_error(src: Ipv6Addr, dst: Ipv6Addr, icmp_type: u8, code: u8, word: u32, quoted_frame: &[u8]) -> Vec<u8> {
    icmp6(src, dst, icmp_type, code, word, &quoted_frame[14..])
}

/// A neighbour solicitation (RFC 4861 4.3) for `target`, to its
/// solicited-node multicast address, hop limit 255 as ND requires.
#[must_use]
pub fn neighbour_solicitation(src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let t = target.octets();
    let dst = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | u16::from(t[13]), u16::from_be_bytes([t[14], t[15]]));
    let mut body = t.to_vec();
    // Source link-layer address option.
    body.extend_from_slice(&[1, 1]);
    body.extend_from_slice(&CLIENT_MAC);
    let mut f = icmp6(src, dst, 135, 0, 0, &body);
    f[14 + 7] = 255;
    f
}

/// A router advertisement (RFC 4861 4.2) from a link-local router to all
/// nodes.
#[must_use]
pub fn router_advertisement(src: Ipv6Addr) -> Vec<u8> {
    let dst = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    // Cur hop limit 64, no flags, router lifetime 1800 s; reachable time
    // and retrans timer follow.
    let mut f = icmp6(src, dst, 134, 0, u32::from_be_bytes([64, 0, 0x07, 0x08]), &[0; 8]);
    f[14 + 7] = 255;
    f
}

/// The fields of an Ethernet + IPv6 (+ extension headers) + TCP/UDP/ICMPv6
/// frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub hop_limit: u8,
    /// The upper-layer protocol.
    pub next: u8,
    /// Where the upper-layer header starts in the frame.
    pub l4_off: usize,
    pub sport: u16,
    pub dport: u16,
}

/// Parses an Ethernet + IPv6 frame, walking its extension headers; `None`
/// when it is not one.
#[must_use]
pub fn parse(frame: &[u8]) -> Option<Parsed> {
    if u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]) != ETH_P_IPV6 {
        return None;
    }
    let ip = frame.get(14..54)?;
    let mut next = ip[6];
    let mut off = 54;
    while matches!(next, HOPOPTS | ROUTING | DSTOPTS | FRAGMENT) {
        let h = frame.get(off..off + 2)?;
        let len = if next == FRAGMENT { 8 } else { (usize::from(h[1]) + 1) * 8 };
        next = h[0];
        off += len;
    }
    let ports = frame.get(off..off + 4)?;
    Some(Parsed {
        src: Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).ok()?),
        dst: Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).ok()?),
        hop_limit: ip[7],
        next,
        l4_off: off,
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
    })
}

/// Whether the upper-layer checksum (TCP, UDP or ICMPv6) of an unfragmented
/// `frame` verifies over its pseudo-header (a UDP checksum of 0 never does:
/// it is invalid over IPv6).
#[must_use]
pub fn checksum_valid(frame: &[u8]) -> bool {
    let Some(p) = parse(frame) else { return false };
    let payload_len = usize::from(u16::from_be_bytes([frame[18], frame[19]]));
    let Some(seg) = frame.get(p.l4_off..54 + payload_len) else { return false };
    if p.next == PROTO_UDP && seg.get(6..8) == Some(&[0, 0]) {
        return false;
    }
    ones_complement_sum(pseudo_header_sum(p.src, p.dst, p.next, seg.len()), seg) == 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x10);
    const B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);

    #[test]
    fn crafted_frames_verify_and_parse() {
        let exts = [Ext::HopByHop, Ext::DestinationOptions { len8: 2 }, Ext::Routing];
        let f = frame(A, B, &exts, PROTO_TCP, &tcp_segment(A, 40000, B, 80, 0x02, b"x"));
        let p = parse(&f).expect("IPv6");
        assert_eq!((p.src, p.dst, p.next, p.sport, p.dport), (A, B, PROTO_TCP, 40000, 80));
        assert_eq!(p.l4_off, 54 + 8 + 16 + 8);
        assert!(checksum_valid(&f));
        assert!(checksum_valid(&udp(A, 1, B, 53, b"q")));
        let mut bad = udp(A, 1, B, 53, b"q");
        bad[54 + 6] = 0;
        bad[54 + 7] = 0;
        assert!(!checksum_valid(&bad), "a UDP checksum of 0 is invalid over IPv6");
        assert!(checksum_valid(&neighbour_solicitation(A, B)));
    }
}
