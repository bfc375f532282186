//! The per-flow hash that picks a backend slot. It runs in the kernel on
//! every new flow and on the host in unit tests and `explain`, so it is pure,
//! loop-free over fixed-size input and seeded with a constant: every node
//! picks the same slot for the same flow.

use crate::{Addr, Port};

const SEED: u32 = 0x5eed_cafe;

#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    // MurmurHash3's block mix.
    let k = k.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finalize(mut h: u32) -> u32 {
    // MurmurHash3's fmix32: every input bit affects every output bit.
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
const fn word(a: &Addr, i: usize) -> u32 {
    u32::from_be_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]])
}

/// Hash of a flow's original tuple (client → frontend).
#[inline(always)]
#[must_use]
pub const fn flow_hash(saddr: &Addr, daddr: &Addr, sport: Port, dport: Port, proto: u8) -> u32 {
    let mut h = SEED;
    h = mix(h, word(saddr, 0));
    h = mix(h, word(saddr, 4));
    h = mix(h, word(saddr, 8));
    h = mix(h, word(saddr, 12));
    h = mix(h, word(daddr, 0));
    h = mix(h, word(daddr, 4));
    h = mix(h, word(daddr, 8));
    h = mix(h, word(daddr, 12));
    h = mix(h, u32::from_be_bytes([sport[0], sport[1], dport[0], dport[1]]));
    h = mix(h, proto as u32);
    finalize(h)
}

/// The 1-based slot a flow lands on in a backend table of `count` slots
/// (`count` > 0).
#[inline(always)]
#[must_use]
pub const fn slot_for(hash: u32, count: u32) -> u32 {
    hash % count + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{addr_v4, port_be};

    #[test]
    fn is_deterministic_and_depends_on_every_field() {
        let (s, d) = (addr_v4([10, 0, 1, 10]), addr_v4([10, 96, 0, 10]));
        let base = flow_hash(&s, &d, port_be(40000), port_be(80), 6);
        assert_eq!(base, flow_hash(&s, &d, port_be(40000), port_be(80), 6));
        assert_ne!(base, flow_hash(&addr_v4([10, 0, 1, 11]), &d, port_be(40000), port_be(80), 6));
        assert_ne!(base, flow_hash(&s, &addr_v4([10, 96, 0, 11]), port_be(40000), port_be(80), 6));
        assert_ne!(base, flow_hash(&s, &d, port_be(40001), port_be(80), 6));
        assert_ne!(base, flow_hash(&s, &d, port_be(40000), port_be(81), 6));
        assert_ne!(base, flow_hash(&s, &d, port_be(40000), port_be(80), 17));
    }

    #[test]
    fn spreads_source_ports_evenly_over_slots() {
        let (s, d) = (addr_v4([10, 0, 1, 10]), addr_v4([10, 96, 0, 10]));
        let mut hits = [0u32; 31];
        for p in 30000..36200u16 {
            let slot = slot_for(flow_hash(&s, &d, port_be(p), port_be(80), 6), 31);
            hits[(slot - 1) as usize] += 1;
        }
        // 6200 flows over 31 slots: 200 each on average.
        assert!(hits.iter().all(|h| (140..=260).contains(h)), "{hits:?}");
    }

    #[test]
    fn slots_are_one_based_and_in_range() {
        for h in [0, 1, 30, 31, u32::MAX] {
            let s = slot_for(h, 31);
            assert!((1..=31).contains(&s));
        }
    }
}
