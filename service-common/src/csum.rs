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
    let c = update16(check, [old[0], old[1]], [new[0], new[1]]);
    update16(c, [old[2], old[3]], [new[2], new[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
