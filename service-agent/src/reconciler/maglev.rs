//! Maglev backend tables (Eisenbud et al., NSDI 2016). Each frontend gets a
//! table of `M` slots (M prime, well above the backend count); the kernel
//! hashes a new flow onto a slot. Every node builds the same table for the
//! same backend set (the permutations depend only on the backends' names),
//! and a backend change moves only the flows of the slots it touches.

/// Table sizes: primes, each at least double the previous. The smallest with
/// at least [`SLOTS_PER_BACKEND`] slots per backend is used, up to
/// [`USUAL_MAX`] slots, which bounds the spread between backends to about
/// 1/SLOTS_PER_BACKEND for up to 2,047 backends. Beyond that the table
/// stays at [`USUAL_MAX`] slots (the spread grows, the map does not), until
/// the backends outnumber the slots: then the smallest size with a slot
/// for each backend, so every endpoint stays reachable.
const SIZES: [u32; 15] =
    [31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131_071, 262_139, 524_287];
const SLOTS_PER_BACKEND: u32 = 8;
/// The largest table the usual 8 slots per backend lead to.
const USUAL_MAX: u32 = 16381;

/// The largest backend count one table holds (a slot each). A Service port
/// with more ready endpoints is programmed with the first `MAX_BACKENDS` of
/// them (by name, so every node agrees) and the rest are reported.
pub const MAX_BACKENDS: usize = 524_287;

/// The table size for `n` backends.
#[must_use]
pub fn table_size(n: usize) -> u32 {
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    let want = n.saturating_mul(SLOTS_PER_BACKEND).min(USUAL_MAX).max(n);
    SIZES.iter().copied().find(|m| *m >= want).unwrap_or(SIZES[SIZES.len() - 1])
}

fn fnv1a64(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Builds the lookup table: `table[i]` is the index into `names` of the
/// backend slot `i + 1` forwards to. `names` must be non-empty, unique and
/// at most [`MAX_BACKENDS`] long; they should be stable across nodes (the
/// backend's `addr:port/proto`), and sorted so every node lists them alike.
///
/// # Panics
/// When `names` is empty or longer than [`MAX_BACKENDS`].
#[must_use]
pub fn build(names: &[String]) -> Vec<usize> {
    assert!(!names.is_empty() && names.len() <= MAX_BACKENDS, "maglev: {} backends", names.len());
    let m = u64::from(table_size(names.len()));
    let perms: Vec<(u64, u64)> = names
        .iter()
        .map(|n| {
            let offset = fnv1a64(0, n.as_bytes()) % m;
            let skip = fnv1a64(0x9e37_79b9_7f4a_7c15, n.as_bytes()) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let m_usize = usize::try_from(m).unwrap_or(usize::MAX);
    let mut table = vec![usize::MAX; m_usize];
    let mut next = vec![0u64; names.len()];
    let mut filled = 0;
    'fill: loop {
        for (i, (offset, skip)) in perms.iter().enumerate() {
            // Walk backend i's permutation to its next free slot.
            let mut c = (offset + next[i] * skip) % m;
            while table[usize::try_from(c).unwrap_or(0)] != usize::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            table[usize::try_from(c).unwrap_or(0)] = i;
            next[i] += 1;
            filled += 1;
            if filled == m_usize {
                break 'fill;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.{}.{}.{}:8080/TCP", i / 62_500, i / 250 % 250, i % 250 + 1)).collect()
    }

    #[test]
    fn sizes_grow_with_the_backend_count() {
        assert_eq!(table_size(1), 31);
        assert_eq!(table_size(3), 31);
        assert_eq!(table_size(4), 61);
        assert_eq!(table_size(100), 1021);
        assert_eq!(table_size(5000), 16381);
        assert_eq!(table_size(16381), 16381);
        // More backends than the usual largest table: a slot each.
        assert_eq!(table_size(16382), 32749);
        assert_eq!(table_size(100_000), 131_071);
        assert_eq!(table_size(MAX_BACKENDS), 524_287);
    }

    #[test]
    fn every_backend_is_reachable_in_a_table_larger_than_the_usual() {
        // 17 EndpointSlices of 1,000: the count that used to panic.
        for n in [16_382, 17_000, 100_000] {
            let t = build(&names(n));
            let mut seen = vec![false; n];
            for i in &t {
                seen[*i] = true;
            }
            assert!(seen.iter().all(|s| *s), "n={n}: a backend without a slot");
        }
    }

    #[test]
    fn every_backend_gets_an_even_share() {
        for n in [1, 2, 3, 7, 10, 100] {
            let t = build(&names(n));
            let mut counts = vec![0usize; n];
            for i in &t {
                counts[*i] += 1;
            }
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            assert!(max - min <= 1, "n={n}: {counts:?}");
        }
    }

    #[test]
    fn is_deterministic() {
        assert_eq!(build(&names(5)), build(&names(5)));
    }

    #[test]
    fn removing_one_backend_moves_few_other_slots() {
        let all = names(10);
        let before = build(&all);
        let mut fewer = all.clone();
        fewer.remove(4);
        let after = build(&fewer);
        assert_eq!(before.len(), after.len());
        // Slots that did not point at the removed backend and now point
        // elsewhere: Maglev keeps this small.
        let moved = before.iter().zip(&after).filter(|(b, a)| **b != 4 && all[**b] != fewer[**a]).count();
        assert!(moved * 10 < before.len(), "moved {moved} of {}", before.len());
    }
}
