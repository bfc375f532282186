//! Internet checksums (RFC 1071) over fixed-size buffers, for the packets
//! the dataplane builds itself (TCP RST, ICMP port unreachable). Pure and
//! loop-bounded, so the same code runs in the kernel and in unit tests.

/// One's-complement sum of a buffer of even length, not folded.
#[inline(always)]
#[must_use]
pub fn sum<const N: usize>(initial: u32, bytes: &[u8; N]) -> u32 {
    let mut s = initial;
    let mut i = 0;
    while i + 1 < N {
        s += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    s
}

/// Folds a sum to 16 bits and inverts it: the value for the header field.
#[inline(always)]
#[must_use]
pub fn finish(mut s: u32) -> u16 {
    // Two folds are enough for any sum of fewer than 2^16 words.
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits above")]
    let folded = s as u16;
    !folded
}

/// The sum of an IPv4 pseudo-header.
#[inline(always)]
#[must_use]
pub fn pseudo_header_v4(saddr: [u8; 4], daddr: [u8; 4], proto: u8, l4_len: u16) -> u32 {
    let mut p = [0u8; 12];
    p[0..4].copy_from_slice(&saddr);
    p[4..8].copy_from_slice(&daddr);
    p[9] = proto;
    p[10..12].copy_from_slice(&l4_len.to_be_bytes());
    sum(0, &p)
}

/// The sum of an IPv6 pseudo-header (RFC 8200 8.1: both addresses, the
/// upper-layer length as 32 bits, three zero bytes, the next header).
#[inline(always)]
#[must_use]
pub fn pseudo_header_v6(saddr: &[u8; 16], daddr: &[u8; 16], proto: u8, l4_len: u16) -> u32 {
    let mut s = sum(0, saddr);
    s = sum(s, daddr);
    s + u32::from(l4_len) + u32::from(proto)
}

/// The new value of a checksum field after one 16-bit word of the data it
/// covers changed from `old` to `new` (RFC 1624, eqn. 3: `HC' = ~(~HC +
/// ~m + m')`). Words are in network order, as read from the packet.
#[inline(always)]
#[must_use]
pub fn update16(check: [u8; 2], old: [u8; 2], new: [u8; 2]) -> [u8; 2] {
    let s = u32::from(!u16::from_be_bytes(check))
        + u32::from(!u16::from_be_bytes(old))
        + u32::from(u16::from_be_bytes(new));
    finish(s).to_be_bytes()
}

/// [`update16`] for a 32-bit field (an IPv4 address).
#[inline(always)]
#[must_use]
pub fn update32(check: [u8; 2], old: [u8; 4], new: [u8; 4]) -> [u8; 2] {
    update(check, &old, &new)
}

/// [`update16`] for a field of `N` bytes (`N` even: an IPv4 or IPv6
/// address), word by word.
#[inline(always)]
#[must_use]
pub fn update<const N: usize>(check: [u8; 2], old: &[u8; N], new: &[u8; N]) -> [u8; 2] {
    let mut c = check;
    let mut i = 0;
    while i + 1 < N {
        c = update16(c, [old[i], old[i + 1]], [new[i], new[i + 1]]);
        i += 2;
    }
    c
}

/// The addresses and ports of a TCP/UDP packet, as they sit in its
/// headers (network order): `N` is 4 for IPv4, 16 for IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoints<const N: usize = 4> {
    pub saddr: [u8; N],
    pub daddr: [u8; N],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
}

/// The TCP/UDP checksum `check` after the packet's endpoints changed from
/// `old` to `new`: the pseudo-header's addresses and the ports. A UDP
/// result of 0 (which would mean "no checksum") is sent as 0xffff; the
/// caller leaves a UDP checksum of 0 alone in the first place.
#[inline(always)]
#[must_use]
pub fn update_endpoints<const N: usize>(check: [u8; 2], udp: bool, old: &Endpoints<N>, new: &Endpoints<N>) -> [u8; 2] {
    let mut c = update(check, &old.saddr, &new.saddr);
    c = update(c, &old.daddr, &new.daddr);
    c = update16(c, old.sport, new.sport);
    c = update16(c, old.dport, new.dport);
    if udp && c == [0, 0] { [0xff, 0xff] } else { c }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checksum of a UDP segment over its IPv4 pseudo-header.
    fn udp_check(e: &Endpoints, payload: [u8; 4]) -> [u8; 2] {
        let mut seg = [0u8; 12];
        seg[0..2].copy_from_slice(&e.sport);
        seg[2..4].copy_from_slice(&e.dport);
        seg[4..6].copy_from_slice(&12u16.to_be_bytes());
        seg[8..12].copy_from_slice(&payload);
        finish(sum(pseudo_header_v4(e.saddr, e.daddr, 17, 12), &seg)).to_be_bytes()
    }

    #[test]
    fn endpoint_updates_match_a_full_recompute() {
        let old = Endpoints { saddr: [10, 244, 1, 10], daddr: [10, 96, 0, 10], sport: [0x9c, 0x40], dport: [0, 53] };
        let new =
            Endpoints { saddr: [192, 168, 100, 11], daddr: [10, 244, 2, 13], sport: [0xee, 0x48], dport: [0x14, 0xe9] };
        let payload = [1, 2, 3, 4];
        assert_eq!(update_endpoints(udp_check(&old, payload), true, &old, &new), udp_check(&new, payload));
        // Where the sum comes out as 0, UDP sends 0xffff and TCP keeps 0.
        let zero = (0..=u16::MAX)
            .map(u16::to_be_bytes)
            .find(|c| update_endpoints(*c, false, &old, &new) == [0, 0])
            .expect("some checksum updates to 0");
        assert_eq!(update_endpoints(zero, true, &old, &new), [0xff, 0xff]);
    }

    #[test]
    fn incremental_updates_match_a_full_recompute() {
        let mut h = [0x45, 0x00, 0x00, 0x28, 0x12, 0x34, 0x40, 0x00, 0x40, 0x06, 0, 0, 10, 96, 0, 10, 10, 244, 1, 10];
        let c = finish(sum(0, &h)).to_be_bytes();
        h[10..12].copy_from_slice(&c);
        let new_dst = [192, 168, 100, 11];
        let updated = update32(c, [10, 244, 1, 10], new_dst);
        h[16..20].copy_from_slice(&new_dst);
        h[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(updated, finish(sum(0, &h)).to_be_bytes());
        h[10..12].copy_from_slice(&updated);
        assert_eq!(finish(sum(0, &h)), 0);
        // A 16-bit field, including the checksum field itself changing.
        let c2 = update16(updated, [0x12, 0x34], [0xab, 0xcd]);
        h[4..6].copy_from_slice(&[0xab, 0xcd]);
        h[10..12].copy_from_slice(&c2);
        assert_eq!(finish(sum(0, &h)), 0);
    }

    #[test]
    fn a_known_ipv4_header() {
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0, 0, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8, 0x00,
            0xc7,
        ];
        assert_eq!(finish(sum(0, &h)), 0xb861);
    }

    #[test]
    fn a_header_with_its_checksum_sums_to_all_ones() {
        let mut h = [0x45, 0x00, 0x00, 0x28, 0x12, 0x34, 0x40, 0x00, 0x40, 0x06, 0, 0, 10, 96, 0, 10, 10, 244, 1, 10];
        let c = finish(sum(0, &h));
        h[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(finish(sum(0, &h)), 0);
    }

    #[test]
    fn pseudo_header_sum() {
        // 10.0.0.1 → 10.0.0.2, TCP, 20 bytes: 0x0a00+0x0001+0x0a00+0x0002+6+20.
        assert_eq!(pseudo_header_v4([10, 0, 0, 1], [10, 0, 0, 2], 6, 20), 0x0a00 + 1 + 0x0a00 + 2 + 6 + 20);
    }

    /// The checksum of a UDP segment over its IPv6 pseudo-header.
    fn udp6_check(e: &Endpoints<16>, payload: [u8; 4]) -> [u8; 2] {
        let mut seg = [0u8; 12];
        seg[0..2].copy_from_slice(&e.sport);
        seg[2..4].copy_from_slice(&e.dport);
        seg[4..6].copy_from_slice(&12u16.to_be_bytes());
        seg[8..12].copy_from_slice(&payload);
        finish(sum(pseudo_header_v6(&e.saddr, &e.daddr, 17, 12), &seg)).to_be_bytes()
    }

    #[test]
    fn ipv6_endpoint_updates_match_a_full_recompute() {
        let a = |last: u8, mid: u8| {
            let mut x = [0u8; 16];
            x[0] = 0xfd;
            x[7] = mid;
            x[15] = last;
            x
        };
        let old = Endpoints { saddr: a(10, 0x44), daddr: a(10, 0x96), sport: [0x9c, 0x40], dport: [0, 53] };
        let new = Endpoints { saddr: a(11, 0x68), daddr: a(13, 0x44), sport: [0xee, 0x48], dport: [0x14, 0xe9] };
        let payload = [1, 2, 3, 4];
        assert_eq!(update_endpoints(udp6_check(&old, payload), true, &old, &new), udp6_check(&new, payload));
    }

    #[test]
    fn ipv6_pseudo_header_sum() {
        // ::1 → ::2, UDP, 12 bytes: 1 + 2 + 12 + 17 (RFC 8200 8.1).
        let (mut s, mut d) = ([0u8; 16], [0u8; 16]);
        s[15] = 1;
        d[15] = 2;
        assert_eq!(pseudo_header_v6(&s, &d, 17, 12), 1 + 2 + 12 + 17);
    }
}
