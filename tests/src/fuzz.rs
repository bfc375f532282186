//! Packet fuzzing for the BPF_PROG_TEST_RUN tier (`tests/prog_test_run_fuzz.rs`):
//! a small seeded PRNG, mutators that turn golden frames into malformed
//! ones, random frames whose addresses cannot be a Service's, the split of
//! the `stats` ids into per-packet verdicts and extra events, a reader of
//! the per-CPU `stats` map in one syscall, and the checks that judge what a
//! program did to a frame.
//!
//! The checks never trust the program's own arithmetic: checksums are
//! recomputed here from the bytes (RFC 1071), and a translation is judged
//! by which bytes it touched and whether each checksum's one's-complement
//! sum is the same after it as before (what a correct incremental update,
//! RFC 1624, guarantees: a valid checksum stays valid, an invalid one is
//! not laundered into a valid one).

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

use service_common::stats::{self, Counter};

use crate::packet::ones_complement_sum;

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: [u8; 2] = [0x08, 0x00];
const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_SCTP: u8 = 132;
/// `TC_ACT_*` as BPF_PROG_TEST_RUN returns them.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

// ---------------------------------------------------------------------------
// The PRNG.

/// SplitMix64: tiny, fast, and every seed gives a full-period stream, so a
/// failure reproduces from the seed the test prints.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: usize) -> usize {
        let n = u64::try_from(n.max(1)).unwrap_or(u64::MAX);
        usize::try_from(self.next_u64() % n).unwrap_or(0)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    pub fn u8(&mut self) -> u8 {
        self.next_u64().to_le_bytes()[0]
    }

    pub fn u16(&mut self) -> u16 {
        let b = self.next_u64().to_le_bytes();
        u16::from_le_bytes([b[0], b[1]])
    }

    /// True with probability `percent` / 100.
    pub fn percent(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    /// One element of a non-empty slice.
    ///
    /// # Panics
    /// When `items` is empty.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// One of `items`, or (as often as any one of them) a random byte.
    pub fn byte_from(&mut self, items: &[u8]) -> u8 {
        let i = self.below(items.len() + 1);
        if i == items.len() { self.u8() } else { items[i] }
    }

    /// One of `items`, or (as often as any one of them) a random word.
    pub fn word_from(&mut self, items: &[u16]) -> u16 {
        let i = self.below(items.len() + 1);
        if i == items.len() { self.u16() } else { items[i] }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let r = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }

    #[must_use]
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.fill(&mut v);
        v
    }
}

/// The seed from `var` (decimal or 0x-hex), else one from the clock.
#[must_use]
pub fn seed_from_env(var: &str) -> u64 {
    if let Ok(text) = std::env::var(var) {
        let text = text.trim();
        let parsed = match text.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => text.parse(),
        };
        if let Ok(seed) = parsed {
            return seed;
        }
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let nanos = u64::try_from(now.as_nanos() & u128::from(u64::MAX)).unwrap_or(0);
    Rng::new(nanos ^ u64::from(std::process::id())).next_u64()
}

// ---------------------------------------------------------------------------
// The counters: one verdict per packet, and events beside it.

/// What a verdict counter says happened to the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerdictKind {
    /// Left alone: `TC_ACT_OK`, not one byte changed.
    Pass,
    /// Rewritten and let go (`TC_ACT_OK`, or `TC_ACT_REDIRECT` by the FIB).
    Translated,
    /// Turned into the answer that refuses it (TCP RST, ICMP error) and
    /// sent back (`TC_ACT_REDIRECT`); or, for the forwarding answers,
    /// dropped unanswered where the stack would not answer (no DF, an ICMP
    /// error, a later fragment). A refused new flow that cannot be
    /// answered is `drop_reject_unanswered`, a drop.
    Answered,
    /// Dropped (`TC_ACT_SHOT`).
    Dropped,
}

/// Every per-packet verdict counter: the entry point (`ingress::run`)
/// counts exactly one of these for each packet, in one place.
pub const VERDICT_COUNTERS: [(Counter, VerdictKind); 37] = [
    (Counter::PassNotIp, VerdictKind::Pass),
    (Counter::PassOtherProto, VerdictKind::Pass),
    (Counter::PassFragment, VerdictKind::Pass),
    (Counter::PassMalformed, VerdictKind::Pass),
    (Counter::PassNoService, VerdictKind::Pass),
    (Counter::PassExtensionHeaders, VerdictKind::Pass),
    (Counter::DnatNew, VerdictKind::Translated),
    (Counter::DnatEstablished, VerdictKind::Translated),
    (Counter::RevNat, VerdictKind::Translated),
    (Counter::IcmpErrorTranslated, VerdictKind::Translated),
    (Counter::FragmentTranslated, VerdictKind::Translated),
    (Counter::RejectTcpRst, VerdictKind::Answered),
    (Counter::RejectIcmpUnreachable, VerdictKind::Answered),
    (Counter::DropFragNeeded, VerdictKind::Answered),
    (Counter::DropTtlExceeded, VerdictKind::Answered),
    (Counter::DropNoBackend, VerdictKind::Dropped),
    (Counter::DropMissingRow, VerdictKind::Dropped),
    (Counter::DropCtInsert, VerdictKind::Dropped),
    (Counter::DropL3Csum, VerdictKind::Dropped),
    (Counter::DropCtRace, VerdictKind::Dropped),
    (Counter::DropNoLocalBackend, VerdictKind::Dropped),
    (Counter::DropSctpPortTranslation, VerdictKind::Dropped),
    (Counter::DropSourceRange, VerdictKind::Dropped),
    (Counter::DropSnatNoPort, VerdictKind::Dropped),
    (Counter::DropSnatNoAddress, VerdictKind::Dropped),
    (Counter::DropIcmpAnswer, VerdictKind::Dropped),
    (Counter::DropNoScratch, VerdictKind::Dropped),
    (Counter::DropL4Csum, VerdictKind::Dropped),
    (Counter::DropStore, VerdictKind::Dropped),
    (Counter::DropLoad, VerdictKind::Dropped),
    (Counter::DropResize, VerdictKind::Dropped),
    (Counter::DropIcmpQuote, VerdictKind::Dropped),
    (Counter::DropNoRoute, VerdictKind::Dropped),
    (Counter::DropRedirectRefused, VerdictKind::Dropped),
    (Counter::DropRejectUnanswered, VerdictKind::Dropped),
    (Counter::DropSctpTupleTaken, VerdictKind::Dropped),
    (Counter::DropUnallocatedServiceIp, VerdictKind::Dropped),
];

/// Counted beside a packet's verdict (`maps::count` calls outside the entry
/// point's one `count(counter)`): something that happened to its flow.
pub const EVENT_COUNTERS: [Counter; 10] = [
    Counter::AffinityHit,
    Counter::SnatNew,
    Counter::CtReplaced,
    Counter::CtAssured,
    Counter::NatClashRemapped,
    Counter::CtRaceJoined,
    // The socket-level programs' (no packet reaches them).
    Counter::SockConnect,
    Counter::SockSendmsg,
    Counter::SockRevNat,
    Counter::SockRefused,
];

/// The kind of verdict counter `id`, `None` for an event counter.
#[must_use]
pub fn verdict_kind(id: Counter) -> Option<VerdictKind> {
    VERDICT_COUNTERS.iter().find(|(v, _)| *v == id).map(|(_, k)| *k)
}

/// The name of counter `id`.
#[must_use]
pub fn counter_name(id: Counter) -> &'static str {
    id.name()
}

/// `bpf_attr.batch` (include/uapi/linux/bpf.h), for BPF_MAP_LOOKUP_BATCH.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Reads the whole per-CPU `stats` array in one bpf(2) call (the agent's
/// `maps::read_stats` takes one per id: too slow to run after every frame).
pub struct StatsReader {
    map: aya::maps::MapData,
    cpus: usize,
    keys: Vec<u32>,
    values: Vec<u64>,
}

impl StatsReader {
    /// # Errors
    /// When the pin cannot be opened or the CPU count read.
    pub fn open(pin: &Path) -> io::Result<Self> {
        let map = aya::maps::MapData::from_pin(pin).map_err(io::Error::other)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let n = stats::COUNT as usize;
        Ok(Self { map, cpus, keys: vec![0; n], values: vec![0; n * cpus] })
    }

    /// Every counter, summed over the CPUs, by id.
    ///
    /// # Errors
    /// The bpf(2) error, or fewer rows than counters.
    pub fn read(&mut self) -> io::Result<Vec<u64>> {
        let mut next_key = 0u32;
        let mut attr = BatchAttr {
            out_batch: (&raw mut next_key) as u64,
            keys: self.keys.as_mut_ptr() as u64,
            values: self.values.as_mut_ptr() as u64,
            count: stats::COUNT,
            map_fd: u32::try_from(self.map.fd().as_fd().as_raw_fd()).map_err(io::Error::other)?,
            ..BatchAttr::default()
        };
        // SAFETY: attr is a valid bpf_attr prefix of the size passed; keys
        // holds COUNT u32s and values COUNT * cpus u64s (a per-CPU value of
        // 8 bytes is 8 bytes per possible CPU), both outliving the call.
        let rc = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &raw mut attr, std::mem::size_of::<BatchAttr>())
        };
        // ENOENT: the batch reached the end of the array (every row read).
        if rc != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT) {
            return Err(io::Error::last_os_error());
        }
        if attr.count != stats::COUNT {
            return Err(io::Error::other(format!("read {} of {} counters", attr.count, stats::COUNT)));
        }
        let mut out = vec![0u64; stats::COUNT as usize];
        for (row, key) in self.keys.iter().enumerate() {
            let per_cpu = &self.values[row * self.cpus..(row + 1) * self.cpus];
            if let Some(slot) = out.get_mut(*key as usize) {
                *slot = per_cpu.iter().sum();
            }
        }
        Ok(out)
    }
}

/// What one run counted: the verdict counters that moved and the events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counted {
    /// `(id, delta)` of every verdict counter that moved.
    pub verdicts: Vec<(Counter, u64)>,
    /// `(id, delta)` of every event counter that moved.
    pub events: Vec<(Counter, u64)>,
}

impl Counted {
    #[must_use]
    pub fn between(before: &[u64], after: &[u64]) -> Self {
        let mut c = Self::default();
        for (id, (b, a)) in (0u32..).zip(before.iter().zip(after)) {
            let delta = a.wrapping_sub(*b);
            let Some(id) = Counter::from_id(id) else { continue };
            if delta == 0 {
                continue;
            }
            if verdict_kind(id).is_some() { c.verdicts.push((id, delta)) } else { c.events.push((id, delta)) }
        }
        c
    }

    /// The one verdict of the run, when exactly one verdict counter moved,
    /// by exactly one.
    #[must_use]
    pub fn single_verdict(&self) -> Option<Counter> {
        match self.verdicts.as_slice() {
            [(id, 1)] => Some(*id),
            _ => None,
        }
    }

    #[must_use]
    pub fn describe(&self) -> String {
        let list =
            |v: &[(Counter, u64)]| v.iter().map(|(id, d)| format!("{}+{d}", counter_name(*id))).collect::<Vec<_>>();
        format!("verdicts {:?}, events {:?}", list(&self.verdicts), list(&self.events))
    }
}

// ---------------------------------------------------------------------------
// Reading frames the way the programs do.

/// An Ethernet + IPv4 frame's header fields, read the way the programs'
/// parser reads them (EtherType 0x0800, version 4, IHL at least 5, a whole
/// 20-byte header in the frame); offsets are from the frame's start.
#[derive(Clone, Copy, Debug)]
pub struct Ipv4View {
    /// Header length in bytes (IHL × 4).
    pub ihl: usize,
    pub tot_len: usize,
    pub proto: u8,
    /// Fragment offset, in 8-byte units.
    pub frag_offset: u16,
    pub more_fragments: bool,
    pub ttl: u8,
    /// Where the L4 header starts (14 + IHL × 4), wherever the frame ends.
    pub l4: usize,
    /// Where the IP datagram ends by its total length (may lie beyond the
    /// frame, or before the L4 header).
    pub ip_end: usize,
}

impl Ipv4View {
    #[must_use]
    pub fn later_fragment(&self) -> bool {
        self.frag_offset != 0
    }
}

#[must_use]
pub fn ipv4_view(frame: &[u8]) -> Option<Ipv4View> {
    if frame.len() < ETH_HLEN + 20 || frame[12..14] != ETH_P_IP {
        return None;
    }
    let ip = &frame[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return None;
    }
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    Some(Ipv4View {
        ihl,
        tot_len,
        proto: ip[9],
        frag_offset: frag & 0x1fff,
        more_fragments: frag & 0x2000 != 0,
        ttl: ip[8],
        l4: ETH_HLEN + ihl,
        ip_end: ETH_HLEN + tot_len,
    })
}

fn be16(frame: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]))
}

/// A folded one's-complement sum with its two zeros (0x0000, 0xffff) made
/// one: sums that differ only there are the same number.
fn norm(sum: u16) -> u16 {
    if sum == 0xffff { 0 } else { sum }
}

fn pseudo_sum(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u32 {
    let mut p = [0u8; 12];
    p[0..4].copy_from_slice(&src[..4]);
    p[4..8].copy_from_slice(&dst[..4]);
    p[9] = proto;
    p[10..12].copy_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
    u32::from(ones_complement_sum(0, &p))
}

/// The sum over the IPv4 header (as far as the frame holds it): 0xffff when
/// its checksum is valid.
#[must_use]
pub fn ip_header_sum(frame: &[u8], v: &Ipv4View) -> u16 {
    let end = (ETH_HLEN + v.ihl).min(frame.len());
    ones_complement_sum(0, &frame[ETH_HLEN..end])
}

/// The range of the TCP/UDP segment a checksum covers, and the length the
/// pseudo-header carries; `None` when the frame does not hold a segment
/// with its checksum field (a later fragment has no L4 header; a UDP
/// checksum of 0 is "none").
fn l4_range(frame: &[u8], v: &Ipv4View) -> Option<(usize, usize, usize)> {
    if v.later_fragment() {
        return None;
    }
    let end = v.ip_end.min(frame.len());
    match v.proto {
        PROTO_TCP if v.ip_end <= frame.len() && v.l4 + 18 <= v.ip_end => Some((v.l4, v.ip_end, v.ip_end - v.l4)),
        PROTO_UDP => {
            if be16(frame, v.l4 + 6)? == 0 {
                return None;
            }
            let udp_len = usize::from(be16(frame, v.l4 + 4)?);
            if v.more_fragments {
                // A first fragment: the checksum covers the whole datagram,
                // only part of it is here; the sum is still preserved.
                (v.ip_end <= frame.len() && v.l4 + 8 <= end).then_some((v.l4, end, udp_len))
            } else {
                (udp_len >= 8 && v.l4 + udp_len <= end).then_some((v.l4, v.l4 + udp_len, udp_len))
            }
        }
        _ => None,
    }
}

/// The sum over pseudo-header + TCP/UDP segment: 0xffff when the L4
/// checksum is valid; `None` where there is no segment to sum.
#[must_use]
pub fn l4_sum(frame: &[u8], v: &Ipv4View) -> Option<u16> {
    let (start, end, len) = l4_range(frame, v)?;
    let ip = &frame[ETH_HLEN..];
    Some(ones_complement_sum(pseudo_sum(&ip[12..16], &ip[16..20], v.proto, len), &frame[start..end]))
}

/// The sum over the ICMP message (the IP datagram's payload, by its total
/// length): 0xffff when the ICMP checksum is valid.
#[must_use]
pub fn icmp_sum(frame: &[u8], v: &Ipv4View) -> Option<u16> {
    (v.proto == PROTO_ICMP && v.ip_end <= frame.len() && v.l4 + 4 <= v.ip_end)
        .then(|| ones_complement_sum(0, &frame[v.l4..v.ip_end]))
}

/// Where an ICMP error's quoted IP header starts.
fn quote_at(v: &Ipv4View) -> usize {
    v.l4 + 8
}

/// The sum over an ICMP error's quoted 20-byte IP header.
#[must_use]
pub fn quoted_ip_sum(frame: &[u8], v: &Ipv4View) -> Option<u16> {
    let q = quote_at(v);
    frame.get(q..q + 20).map(|h| ones_complement_sum(0, h))
}

/// The quoted TCP/UDP checksum's offset in the frame, when the frame holds
/// it and it is in use.
fn quoted_l4_check_at(frame: &[u8], v: &Ipv4View) -> Option<usize> {
    let q = quote_at(v);
    let off = match *frame.get(q + 9)? {
        PROTO_TCP => q + 20 + 16,
        PROTO_UDP => q + 20 + 6,
        _ => return None,
    };
    // The quote ends with the outer datagram (its IP total length), not
    // with the frame: bytes past it are a trailer, not part of the error.
    (off + 2 <= frame.len().min(v.ip_end)).then_some(off)
}

/// The sum over the quoted packet's pseudo-header (addresses, protocol)
/// and the quoted TCP/UDP bytes up to the datagram's end: not a checksum that
/// can be valid (the quote is cut short), but one a correct translation
/// leaves unchanged.
#[must_use]
pub fn quoted_l4_sum(frame: &[u8], v: &Ipv4View) -> Option<u16> {
    let check = quoted_l4_check_at(frame, v)?;
    if frame[check..check + 2] == [0, 0] {
        return None;
    }
    let q = quote_at(v);
    Some(ones_complement_sum(
        pseudo_sum(&frame[q + 12..q + 16], &frame[q + 16..q + 20], frame[q + 9], 0),
        &frame[q + 20..frame.len().min(v.ip_end)],
    ))
}

/// Whether the frame is IPv4 with a valid header checksum.
#[must_use]
pub fn ip_checksum_valid(frame: &[u8]) -> bool {
    ipv4_view(frame).is_some_and(|v| ETH_HLEN + v.ihl <= frame.len() && ip_header_sum(frame, &v) == 0xffff)
}

/// Whether the frame's TCP/UDP (or ICMP) checksum is valid.
#[must_use]
pub fn l4_checksum_valid(frame: &[u8]) -> bool {
    let Some(v) = ipv4_view(frame) else { return false };
    if v.proto == PROTO_ICMP {
        return icmp_sum(frame, &v) == Some(0xffff);
    }
    l4_sum(frame, &v) == Some(0xffff)
}

// ---------------------------------------------------------------------------
// Fixing checksums (mutators that keep a frame otherwise well-formed).

fn store16(frame: &mut [u8], off: usize, value: u16) {
    if let Some(field) = frame.get_mut(off..off + 2) {
        field.copy_from_slice(&value.to_be_bytes());
    }
}

/// Recomputes the IPv4 header checksum (when the frame holds the header).
pub fn fix_ip_checksum(frame: &mut [u8]) {
    let Some(v) = ipv4_view(frame) else { return };
    if ETH_HLEN + v.ihl > frame.len() {
        return;
    }
    store16(frame, ETH_HLEN + 10, 0);
    let c = !ones_complement_sum(0, &frame[ETH_HLEN..ETH_HLEN + v.ihl]);
    store16(frame, ETH_HLEN + 10, c);
}

/// Recomputes the TCP, UDP or ICMP checksum over what the frame holds of
/// the datagram (a UDP checksum of 0 stays 0).
pub fn fix_l4_checksum(frame: &mut [u8]) {
    let Some(v) = ipv4_view(frame) else { return };
    if v.later_fragment() {
        return;
    }
    let end = v.ip_end.min(frame.len());
    let (off, pseudo) = match v.proto {
        PROTO_TCP => (v.l4 + 16, true),
        PROTO_UDP => (v.l4 + 6, true),
        PROTO_ICMP => (v.l4 + 2, false),
        _ => return,
    };
    if off + 2 > end {
        return;
    }
    if v.proto == PROTO_UDP && frame[off..off + 2] == [0, 0] {
        return;
    }
    store16(frame, off, 0);
    let initial = if pseudo {
        let len = if v.proto == PROTO_UDP { usize::from(be16(frame, v.l4 + 4).unwrap_or(0)) } else { end - v.l4 };
        pseudo_sum(&frame[ETH_HLEN + 12..ETH_HLEN + 16], &frame[ETH_HLEN + 16..ETH_HLEN + 20], v.proto, len)
    } else {
        0
    };
    let mut c = !ones_complement_sum(initial, &frame[v.l4..end]);
    if v.proto == PROTO_UDP && c == 0 {
        c = 0xffff;
    }
    store16(frame, off, c);
}

/// Both checksums.
pub fn fix_checksums(frame: &mut [u8]) {
    fix_l4_checksum(frame);
    fix_ip_checksum(frame);
}

// ---------------------------------------------------------------------------
// Addresses that cannot be a Service's.

/// Whether `addr` lies outside every range the fuzz fixture programs
/// (frontends, backends, clients, node and SNAT addresses all lie in
/// 10.0.0.0/8 and 192.168.0.0/16; 0/8 and 127/8 are left out too).
#[must_use]
pub fn is_foreign(addr: [u8; 4]) -> bool {
    !matches!(addr[0], 0 | 10 | 127 | 192)
}

#[must_use]
pub fn foreign_addr(rng: &mut Rng) -> [u8; 4] {
    loop {
        let b = rng.next_u64().to_le_bytes();
        let a = [b[0], b[1], b[2], b[3]];
        if is_foreign(a) {
            return a;
        }
    }
}

fn overwrite(frame: &mut [u8], off: usize, bytes: &[u8]) {
    for (i, b) in bytes.iter().enumerate() {
        if let Some(slot) = frame.get_mut(off + i) {
            *slot = *b;
        }
    }
}

/// Where an ICMP error's quoted addresses sit for the programs (which read
/// the quote 8 bytes after an L4 header placed by the IHL, at least 20).
fn quote_for_program(frame: &[u8]) -> usize {
    let ihl = usize::from(frame.get(ETH_HLEN).map_or(5, |b| b & 0x0f)).max(5) * 4;
    ETH_HLEN + ihl + 8
}

/// Makes `frame` one that cannot be a Service's, whatever else it holds:
/// when its EtherType is IPv4, the IPv4 source and destination become
/// foreign addresses, and so do an ICMP error's quoted ones (so no
/// frontend, conntrack entry or fragment row can match it: every one of
/// those has a fixture address in it). Checksums that were valid are kept
/// valid.
pub fn foreignize(rng: &mut Rng, frame: &mut [u8]) {
    if frame.len() < ETH_HLEN || frame[12..14] != ETH_P_IP {
        return;
    }
    let (ip_ok, l4_ok) = (ip_checksum_valid(frame), l4_checksum_valid(frame));
    let (src, dst) = (foreign_addr(rng), foreign_addr(rng));
    overwrite(frame, ETH_HLEN + 12, &src);
    overwrite(frame, ETH_HLEN + 16, &dst);
    if frame.get(ETH_HLEN + 9) == Some(&PROTO_ICMP) {
        let q = quote_for_program(frame);
        let (qsrc, qdst) = (foreign_addr(rng), foreign_addr(rng));
        overwrite(frame, q + 12, &qsrc);
        overwrite(frame, q + 16, &qdst);
    }
    if l4_ok {
        fix_l4_checksum(frame);
    }
    if ip_ok {
        fix_ip_checksum(frame);
    }
}

/// Whether `frame` provably cannot be a Service's (the precondition of
/// invariant (a)): not IPv4 by EtherType, too short for the programs to
/// read an IPv4 header, or foreign source and destination (and, for ICMP,
/// foreign quoted addresses or no quote the programs can read).
#[must_use]
pub fn provably_foreign(frame: &[u8]) -> bool {
    if frame.len() < ETH_HLEN + 20 || frame[12..14] != ETH_P_IP {
        return true;
    }
    let addr = |off: usize| [frame[off], frame[off + 1], frame[off + 2], frame[off + 3]];
    if !is_foreign(addr(ETH_HLEN + 12)) || !is_foreign(addr(ETH_HLEN + 16)) {
        return false;
    }
    if frame[ETH_HLEN + 9] == PROTO_ICMP {
        let q = quote_for_program(frame);
        if q + 20 <= frame.len() {
            return is_foreign(addr(q + 12)) && is_foreign(addr(q + 16));
        }
    }
    true
}

// ---------------------------------------------------------------------------
// Frames from nothing.

/// Random bytes, 14 to 300 of them; half of them claim to be IPv4.
#[must_use]
pub fn random_frame(rng: &mut Rng) -> Vec<u8> {
    let len = rng.range(ETH_HLEN, 300);
    let mut f = rng.bytes(len);
    if rng.percent(50) {
        f[12..14].copy_from_slice(&ETH_P_IP);
        if let Some(b) = f.get_mut(ETH_HLEN) {
            *b = 0x40 | (*b & 0x0f);
        }
    }
    foreignize(rng, &mut f);
    f
}

/// 0 to 60 bytes (BPF_PROG_TEST_RUN refuses fewer than 14).
#[must_use]
pub fn tiny_frame(rng: &mut Rng) -> Vec<u8> {
    let len = rng.range(0, 60);
    let mut f = rng.bytes(len);
    if f.len() >= ETH_HLEN && rng.percent(70) {
        f[12..14].copy_from_slice(&ETH_P_IP);
        if let Some(b) = f.get_mut(ETH_HLEN) {
            *b = *rng.pick(&[0x45, 0x46, 0x4f, 0x44, 0x40, 0x55]);
        }
        if let Some(p) = f.get_mut(ETH_HLEN + 9) {
            *p = *rng.pick(&[PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_SCTP]);
        }
    }
    foreignize(rng, &mut f);
    f
}

/// A well-formed-looking frame with random fields and foreign addresses:
/// IPv4 (TCP, UDP, ICMP errors and echoes, SCTP, other protocols, options,
/// fragments) or another EtherType.
#[must_use]
pub fn structured_frame(rng: &mut Rng) -> Vec<u8> {
    let mut f = vec![0u8; ETH_HLEN];
    rng.fill(&mut f[..12]);
    let ethertype = match rng.below(10) {
        0 => 0x0806,
        1 => 0x86dd,
        2 => 0x8100,
        3 => 0x88a8,
        4 => rng.u16(),
        _ => 0x0800,
    };
    f[12..14].copy_from_slice(&ethertype.to_be_bytes());
    if ethertype == 0x8100 || ethertype == 0x88a8 {
        // A tag, then an IPv4 EtherType the programs must not look behind.
        f.extend_from_slice(&[0, 42, 0x08, 0x00]);
    }
    let options = if rng.percent(20) { rng.range(1, 10) * 4 } else { 0 };
    let proto = *rng.pick(&[PROTO_TCP, PROTO_TCP, PROTO_UDP, PROTO_UDP, PROTO_ICMP, PROTO_ICMP, PROTO_SCTP, 0, 47, 50]);
    let mut l4 = match proto {
        PROTO_TCP => {
            let len = 20 + rng.below(40);
            let mut t = rng.bytes(len);
            t[12] = u8::try_from(rng.range(0, 15)).unwrap_or(5) << 4;
            t
        }
        PROTO_ICMP => {
            let mut m = vec![*rng.pick(&[3, 11, 12, 0, 8, 5, 4]), 0, 0, 0, 0, 0, 0, 0];
            m[1] = rng.u8() & 0x0f;
            // A quote: an IPv4 header and 8 bytes of TCP/UDP, or less.
            let mut quote = rng.bytes(28);
            quote[0] = if rng.percent(80) { 0x45 } else { rng.u8() };
            quote[9] = rng.byte_from(&[PROTO_TCP, PROTO_UDP, PROTO_ICMP]);
            let keep = if rng.percent(70) { 28 } else { rng.below(28) };
            m.extend_from_slice(&quote[..keep]);
            let extra = rng.below(16);
            m.extend(rng.bytes(extra));
            m
        }
        _ => {
            let len = 8 + rng.below(40);
            rng.bytes(len)
        }
    };
    if proto == PROTO_UDP {
        let len = u16::try_from(l4.len()).unwrap_or(0);
        l4[4..6].copy_from_slice(&(if rng.percent(80) { len } else { rng.u16() }).to_be_bytes());
        if rng.percent(20) {
            l4[6..8].copy_from_slice(&[0, 0]);
        }
    }
    let mut ip = vec![0u8; 20 + options];
    ip[0] = 0x40 | u8::try_from((20 + options) / 4).unwrap_or(5);
    let tot = u16::try_from(ip.len() + l4.len()).unwrap_or(u16::MAX);
    ip[2..4].copy_from_slice(&(if rng.percent(85) { tot } else { rng.u16() }).to_be_bytes());
    rng.fill(&mut ip[4..6]);
    let frag: u16 = match rng.below(8) {
        0 => 0x2000,
        1 => 0x2000 | (rng.u16() & 0x1fff),
        2 => rng.u16() & 0x1fff,
        3 => 0x8000,
        _ => 0x4000,
    };
    ip[6..8].copy_from_slice(&frag.to_be_bytes());
    ip[8] = rng.u8();
    ip[9] = proto;
    if options > 0 {
        rng.fill(&mut ip[20..]);
    }
    f.extend_from_slice(&ip);
    f.extend_from_slice(&l4);
    // Addresses (and the checksums over them) last.
    foreignize(rng, &mut f);
    if rng.percent(80) {
        fix_checksums(&mut f);
    }
    foreignize(rng, &mut f);
    f
}

// ---------------------------------------------------------------------------
// Mutators.

/// The IPv4 total length field, written (the header checksum left as is).
fn set_tot_len(frame: &mut [u8], tot_len: usize) {
    store16(frame, ETH_HLEN + 2, u16::try_from(tot_len).unwrap_or(u16::MAX));
}

/// Applies one to three mutations to `frame`; returns their names.
pub fn mutate(rng: &mut Rng, frame: &mut Vec<u8>) -> Vec<&'static str> {
    let n = rng.range(1, 3);
    let mut names = Vec::with_capacity(n + 1);
    for _ in 0..n {
        names.push(mutate_once(rng, frame));
    }
    if rng.percent(30) {
        fix_checksums(frame);
        names.push("fix_checksums");
    }
    names
}

#[expect(clippy::too_many_lines, reason = "one match arm per mutation, in one place")]
fn mutate_once(rng: &mut Rng, frame: &mut Vec<u8>) -> &'static str {
    let v = ipv4_view(frame);
    match rng.below(22) {
        0 | 1 if !frame.is_empty() => {
            // A bit anywhere, mostly in the headers.
            let limit = if rng.percent(70) { frame.len().min(ETH_HLEN + 60 + 40) } else { frame.len() };
            let i = rng.below(limit);
            frame[i] ^= 1 << rng.below(8);
            "bit_flip"
        }
        2 if !frame.is_empty() => {
            let limit = if rng.percent(70) { frame.len().min(ETH_HLEN + 60 + 40) } else { frame.len() };
            let i = rng.below(limit);
            frame[i] = rng.byte_from(&[0, 0xff, 0x7f, 0x80, 1]);
            "byte_set"
        }
        3 => {
            let len = rng.below(frame.len() + 1);
            frame.truncate(len);
            "truncate"
        }
        4 => {
            let extra = rng.range(1, 64);
            let bytes = if rng.percent(50) { vec![0; extra] } else { rng.bytes(extra) };
            frame.extend_from_slice(&bytes);
            "trailer"
        }
        5 => {
            let len = frame.len().saturating_sub(ETH_HLEN);
            let tot = match rng.below(6) {
                0 => usize::from(rng.u16()),
                1 => len.saturating_sub(rng.range(1, 30)),
                2 => len + rng.range(1, 30),
                3 => 0,
                4 => rng.range(0, 28),
                _ => v.map_or(20, |v| v.ihl).saturating_sub(1),
            };
            set_tot_len(frame, tot);
            if rng.percent(60) {
                fix_ip_checksum(frame);
            }
            "ip_total_length"
        }
        6 => {
            let Some(v) = v else { return "ip_options_skipped" };
            let room = 60usize.saturating_sub(v.ihl) / 4;
            if room == 0 || frame.len() < v.l4 {
                return "ip_options_skipped";
            }
            let words = rng.range(1, room);
            let mut opts = match rng.below(4) {
                0 => vec![1u8; words * 4], // NOPs
                1 => vec![0u8; words * 4], // EOLs
                2 => {
                    // Record route with room for the rest.
                    let mut o = vec![0u8; words * 4];
                    o[0] = 7;
                    o[1] = u8::try_from(words * 4).unwrap_or(4).max(3);
                    o[2] = 4;
                    o
                }
                _ => rng.bytes(words * 4),
            };
            if opts.len() > 1 && rng.percent(50) {
                let last = opts.len() - 1;
                opts[last] = 0;
            }
            let at = v.l4;
            frame.splice(at..at, opts);
            frame[ETH_HLEN] = (frame[ETH_HLEN] & 0xf0) | u8::try_from((v.ihl / 4) + words).unwrap_or(15);
            set_tot_len(frame, v.tot_len + words * 4);
            fix_ip_checksum(frame);
            "ip_options"
        }
        7 => {
            let frag: u16 = match rng.below(7) {
                0 => 0x2000,
                1 => 0x2000 | u16::try_from(rng.range(1, 0x1fff)).unwrap_or(1),
                2 => u16::try_from(rng.range(1, 0x1fff)).unwrap_or(1),
                3 => 0x8000,
                4 => 0x4000 | u16::try_from(rng.range(1, 3)).unwrap_or(1),
                5 => 0,
                _ => rng.u16(),
            };
            store16(frame, ETH_HLEN + 6, frag);
            if rng.percent(80) {
                fix_ip_checksum(frame);
            }
            "ip_flags_fragment"
        }
        8 => {
            if let Some(ttl) = frame.get_mut(ETH_HLEN + 8) {
                *ttl = *rng.pick(&[0, 1, 1, 2, 255]);
            }
            fix_ip_checksum(frame);
            "ttl"
        }
        9 => {
            if let Some(b) = frame.get_mut(ETH_HLEN) {
                *b = rng.byte_from(&[0x44, 0x40, 0x46, 0x4f, 0x65, 0x35, 0x05]);
            }
            "ip_version_ihl"
        }
        10 => {
            if let Some(p) = frame.get_mut(ETH_HLEN + 9) {
                *p = *rng.pick(&[PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_SCTP, 0, 4, 41, 47, 50, 255]);
            }
            fix_checksums(frame);
            "ip_protocol"
        }
        11 => {
            let Some(v) = v.filter(|v| v.proto == PROTO_TCP && !v.later_fragment()) else { return "tcp_flags_skipped" };
            let flags = rng.byte_from(&[0x00, 0x03, 0x06, 0x07, 0x29, 0x3f, 0xff, 0x04, 0x14, 0x11, 0x01, 0x12]);
            if let Some(b) = frame.get_mut(v.l4 + 13) {
                *b = flags;
            }
            fix_l4_checksum(frame);
            "tcp_flags"
        }
        12 => {
            let Some(v) = v.filter(|v| v.proto == PROTO_TCP) else { return "tcp_data_offset_skipped" };
            if let Some(b) = frame.get_mut(v.l4 + 12) {
                *b = (*b & 0x0f) | (u8::try_from(rng.range(0, 15)).unwrap_or(0) << 4);
            }
            if rng.percent(50) {
                fix_l4_checksum(frame);
            }
            "tcp_data_offset"
        }
        13 => {
            let Some(v) = v.filter(|v| v.proto == PROTO_UDP) else { return "udp_length_skipped" };
            let len = u16::try_from(frame.len().saturating_sub(v.l4)).unwrap_or(u16::MAX);
            let bad = rng.word_from(&[0, 1, 7, 8, len.saturating_sub(1), len.saturating_add(1), 0xffff]);
            store16(frame, v.l4 + 4, bad);
            if rng.percent(50) {
                fix_l4_checksum(frame);
            }
            "udp_length"
        }
        14 => {
            let Some(v) = v.filter(|v| v.proto == PROTO_ICMP) else { return "icmp_quote_skipped" };
            let q = quote_at(&v);
            if frame.len() <= q {
                return "icmp_quote_skipped";
            }
            match rng.below(4) {
                0 => {
                    // The quote cut short, the total length and checksum
                    // to match (or not).
                    let keep = rng.range(0, frame.len() - q);
                    frame.truncate(q + keep);
                    if rng.percent(80) {
                        let tot = frame.len() - ETH_HLEN;
                        set_tot_len(frame, tot);
                    }
                }
                1 => {
                    let i = rng.range(q, frame.len() - 1);
                    frame[i] = rng.u8();
                }
                2 => frame[q] = *rng.pick(&[0x46, 0x44, 0x55, 0x4f, 0x05]),
                _ => {
                    if let Some(p) = frame.get_mut(q + 9) {
                        *p = rng.byte_from(&[PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP]);
                    }
                }
            }
            if rng.percent(70) {
                fix_checksums(frame);
            }
            "icmp_quote"
        }
        15 => {
            let Some(v) = v.filter(|v| v.proto == PROTO_ICMP) else { return "icmp_type_skipped" };
            let (t, c) =
                *rng.pick(&[(3, 0), (3, 1), (3, 3), (3, 4), (11, 0), (11, 1), (12, 0), (0, 0), (8, 0), (5, 1)]);
            if frame.len() >= v.l4 + 2 {
                frame[v.l4] = t;
                frame[v.l4 + 1] = c;
            }
            fix_l4_checksum(frame);
            "icmp_type"
        }
        16 if frame.len() >= ETH_HLEN => {
            match rng.below(5) {
                0 => frame[12..14].copy_from_slice(&[0x08, 0x06]),
                1 => frame[12..14].copy_from_slice(&[0x86, 0xdd]),
                2 => {
                    // An 802.1Q tag in front of the IPv4 EtherType.
                    frame.splice(12..12, [0x81, 0x00, 0x00, 0x2a]);
                }
                3 => frame[12..14].copy_from_slice(&[0x88, 0xa8]),
                _ => {
                    let e = rng.u16().to_be_bytes();
                    frame[12..14].copy_from_slice(&e);
                }
            }
            "ethertype"
        }
        17 => {
            let Some(v) = v.filter(|v| matches!(v.proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP)) else {
                return "port_skipped";
            };
            let port = rng.word_from(&[0, 1, 53, 80, 8080, 5353, 30080, 30053, 36412, 61000, 65535]);
            store16(frame, v.l4 + if rng.percent(50) { 0 } else { 2 }, port);
            fix_checksums(frame);
            "port"
        }
        18 => {
            // One byte of an address: mostly a new flow, sometimes another
            // Service's or a foreign one.
            let off = ETH_HLEN + 12 + rng.below(8);
            if let Some(b) = frame.get_mut(off) {
                *b = if rng.percent(50) { rng.u8() } else { b.wrapping_add(1) };
            }
            fix_checksums(frame);
            "address_byte"
        }
        19 => {
            // The payload grown or shrunk, lengths and checksums to match.
            let Some(v) = v.filter(|v| v.ip_end == frame.len()) else { return "payload_len_skipped" };
            if rng.percent(50) {
                let extra = rng.range(1, 200);
                frame.extend(rng.bytes(extra));
            } else {
                let keep = rng.range(v.l4.min(frame.len()), frame.len());
                frame.truncate(keep);
            }
            let tot = frame.len() - ETH_HLEN;
            set_tot_len(frame, tot);
            if v.proto == PROTO_UDP && !v.later_fragment() {
                let udp_len = u16::try_from(frame.len().saturating_sub(v.l4)).unwrap_or(0);
                store16(frame, v.l4 + 4, udp_len);
            }
            fix_checksums(frame);
            "payload_length"
        }
        20 => {
            // Odd sizes for the redirect path's MTU check.
            let Some(v) = v.filter(|v| v.ip_end == frame.len()) else { return "big_skipped" };
            let target = *rng.pick(&[999, 1000, 1001, 1400, 1500]) + ETH_HLEN;
            if target > frame.len() {
                let extra = target - frame.len();
                frame.extend(rng.bytes(extra));
                let tot = frame.len() - ETH_HLEN;
                set_tot_len(frame, tot);
                if v.proto == PROTO_UDP && !v.later_fragment() {
                    let udp_len = u16::try_from(frame.len().saturating_sub(v.l4)).unwrap_or(0);
                    store16(frame, v.l4 + 4, udp_len);
                }
                fix_checksums(frame);
            }
            "big"
        }
        _ => {
            // IP checksum damaged on purpose.
            if let Some(b) = frame.get_mut(ETH_HLEN + 10 + rng.below(2)) {
                *b ^= 1 << rng.below(8);
            }
            "ip_checksum_broken"
        }
    }
}

// ---------------------------------------------------------------------------
// The checks.

/// A broken invariant: the name of the check (stable, for grepping and for
/// the report) and what was seen.
#[derive(Clone, Debug)]
pub struct Violation {
    pub check: &'static str,
    pub detail: String,
}

fn violation(check: &'static str, detail: impl Into<String>) -> Violation {
    Violation { check, detail: detail.into() }
}

/// What a verified translation looked like, for the summary.
#[derive(Clone, Copy, Debug, Default)]
#[expect(clippy::struct_excessive_bools, reason = "independent facts about one translation, for the summary")]
pub struct Translation {
    /// The input's IP header checksum was valid (and so is the output's).
    pub ip_valid: bool,
    /// The input's TCP/UDP/ICMP checksum was valid (and so is the output's).
    pub l4_valid: bool,
    /// No TCP/UDP/ICMP checksum could be summed (cut short, a later
    /// fragment, UDP without checksum): only the bytes touched were checked.
    pub l4_unverifiable: bool,
    /// Not one byte changed.
    pub identity: bool,
}

/// Which bytes of `input` a translation may change: the IPv4 addresses and
/// header checksum (and the TTL when the FIB redirected the packet); the
/// TCP/UDP ports and checksum (none for SCTP or a later fragment); for an
/// ICMP error the ICMP checksum and the quoted addresses, IP checksum,
/// ports and TCP/UDP checksum.
fn may_change(v: &Ipv4View, input: &[u8], redirected: bool) -> Vec<bool> {
    let mut mask = vec![false; input.len()];
    let mut allow = |range: std::ops::Range<usize>| {
        for i in range {
            if let Some(m) = mask.get_mut(i) {
                *m = true;
            }
        }
    };
    let ip = ETH_HLEN;
    allow(ip + 10..ip + 20);
    if redirected {
        allow(ip + 8..ip + 9);
    }
    match v.proto {
        PROTO_TCP if !v.later_fragment() => {
            allow(v.l4..v.l4 + 4);
            allow(v.l4 + 16..v.l4 + 18);
        }
        PROTO_UDP if !v.later_fragment() => {
            allow(v.l4..v.l4 + 4);
            allow(v.l4 + 6..v.l4 + 8);
        }
        PROTO_ICMP => {
            allow(v.l4 + 2..v.l4 + 4);
            let q = quote_at(v);
            allow(q + 10..q + 24);
            match input.get(q + 9) {
                Some(&PROTO_TCP) => allow(q + 36..q + 38),
                Some(&PROTO_UDP) => allow(q + 26..q + 28),
                _ => {}
            }
        }
        _ => {}
    }
    mask
}

/// Judges a frame the program translated (`TC_ACT_OK` or a redirect): same
/// length, only the bytes a translation owns changed, and every checksum's
/// sum what it was (so a valid checksum is still valid, the pseudo-header
/// included; a UDP checksum of 0 is still 0).
///
/// # Errors
/// The first broken invariant.
pub fn check_translation(input: &[u8], output: &[u8], retval: u32) -> Result<Translation, Violation> {
    if output.len() != input.len() {
        return Err(violation(
            "translation_changed_the_length",
            format!("{} bytes in, {} out", input.len(), output.len()),
        ));
    }
    let Some(v) = ipv4_view(input) else {
        return Err(violation(
            "translated_a_frame_that_is_not_ipv4",
            "the input has no IPv4 header the programs accept",
        ));
    };
    let ip_valid = ip_checksum_valid(input);
    let l4_valid = l4_checksum_valid(input);
    if input == output {
        return Ok(Translation { ip_valid, l4_valid, l4_unverifiable: false, identity: true });
    }
    let redirected = retval == TC_ACT_REDIRECT;
    let mask = may_change(&v, input, redirected);
    let touched: Vec<usize> = (0..input.len()).filter(|&i| input[i] != output[i] && !mask[i]).collect();
    if !touched.is_empty() {
        return Err(violation("translation_touched_bytes_it_does_not_own", format!("offsets {touched:?}")));
    }
    if output[ETH_HLEN + 8] != input[ETH_HLEN + 8] && output[ETH_HLEN + 8] != input[ETH_HLEN + 8].wrapping_sub(1) {
        return Err(violation(
            "ttl_not_decremented_by_one",
            format!("TTL {} in, {} out", input[ETH_HLEN + 8], output[ETH_HLEN + 8]),
        ));
    }
    let Some(out_v) = ipv4_view(output) else {
        return Err(violation("translation_broke_the_ipv4_header", "output does not parse"));
    };
    if norm(ip_header_sum(input, &v)) != norm(ip_header_sum(output, &out_v)) {
        return Err(violation(
            "ip_header_checksum_not_preserved",
            format!("input header checksum valid: {ip_valid}; output valid: {}", ip_checksum_valid(output)),
        ));
    }
    let mut l4_unverifiable = true;
    match v.proto {
        PROTO_UDP | PROTO_TCP if !v.later_fragment() => {
            if v.proto == PROTO_UDP && be16(input, v.l4 + 6) == Some(0) && be16(output, v.l4 + 6) != Some(0) {
                return Err(violation("udp_zero_checksum_not_kept_zero", "a UDP checksum of 0 (none) was changed"));
            }
            if let (Some(a), Some(b)) = (l4_sum(input, &v), l4_sum(output, &out_v)) {
                l4_unverifiable = false;
                if norm(a) != norm(b) {
                    return Err(violation(
                        "l4_checksum_not_preserved",
                        format!(
                            "proto {}: input checksum valid: {l4_valid}; output valid: {}",
                            v.proto,
                            l4_checksum_valid(output)
                        ),
                    ));
                }
            }
        }
        PROTO_ICMP => {
            if let (Some(a), Some(b)) = (icmp_sum(input, &v), icmp_sum(output, &out_v)) {
                l4_unverifiable = false;
                if norm(a) != norm(b) {
                    let beyond: Vec<usize> = (v.ip_end..input.len()).filter(|&i| input[i] != output[i]).collect();
                    return Err(violation(
                        "icmp_checksum_not_preserved",
                        format!(
                            "input ICMP checksum valid: {l4_valid}; output valid: {}; IP total length ends the \
                             datagram at {}, bytes changed beyond it: {beyond:?}",
                            l4_checksum_valid(output),
                            v.ip_end
                        ),
                    ));
                }
            }
            if let (Some(a), Some(b)) = (quoted_ip_sum(input, &v), quoted_ip_sum(output, &out_v))
                && norm(a) != norm(b)
            {
                return Err(violation("quoted_ip_checksum_not_preserved", "the quoted IPv4 header's sum changed"));
            }
            if let Some(off) = quoted_l4_check_at(input, &v)
                && input[off..off + 2] == [0, 0]
                && output[off..off + 2] != [0, 0]
                && input[quote_at(&v) + 9] == PROTO_UDP
            {
                return Err(violation("udp_zero_checksum_not_kept_zero", "the quoted UDP checksum of 0 was changed"));
            }
            if let (Some(a), Some(b)) = (quoted_l4_sum(input, &v), quoted_l4_sum(output, &out_v))
                && norm(a) != norm(b)
            {
                return Err(violation(
                    "quoted_l4_checksum_not_preserved",
                    "the quoted TCP/UDP checksum does not match the quoted addresses and ports",
                ));
            }
        }
        _ => {}
    }
    Ok(Translation { ip_valid, l4_valid, l4_unverifiable, identity: false })
}

/// ICMP types that are errors (RFC 1122 3.2.2: never answered with an
/// error; Linux's `icmp_pointers[].error`).
fn is_icmp_error(t: u8) -> bool {
    // `icmp_send` takes any type it does not know (above 18) for an error.
    matches!(t, 3 | 4 | 5 | 11 | 12) || t > 18
}

/// Judges an answer the program built in place of the frame (`verdict`
/// one of REJECT_TCP_RST, REJECT_ICMP_UNREACHABLE, DROP_FRAG_NEEDED,
/// DROP_TTL_EXCEEDED): the documented size, MAC addresses swapped, a fresh
/// IPv4 header from the address the sender addressed to the sender, every
/// checksum valid, and the quote of the offending packet as its sender
/// sent it. Answers the forwarding stack would not send (about an ICMP
/// error, about a later fragment: RFC 1122 3.2.2, Linux's `icmp_send`) are
/// violations too.
///
/// # Errors
/// The first broken invariant.
#[expect(clippy::too_many_lines, reason = "one check after another, in the order a reader verifies an answer")]
pub fn check_answer(input: &[u8], output: &[u8], verdict: Counter) -> Result<(), Violation> {
    let Some(v) = ipv4_view(input) else {
        return Err(violation("answered_a_frame_that_is_not_ipv4", "no IPv4 header in the input"));
    };
    let forwarding_answer = verdict == Counter::DropFragNeeded || verdict == Counter::DropTtlExceeded;
    if verdict == Counter::DropFragNeeded && input[ETH_HLEN + 6] & 0x40 == 0 {
        return Err(violation(
            "frag_needed_sent_for_a_packet_without_df",
            format!(
                "fragmentation needed answered a {}-byte packet without DF; the forwarding stack fragments it \
                 (ip_forward: ip_exceeds_mtu is false without DF)",
                v.tot_len
            ),
        ));
    }
    if forwarding_answer {
        if v.proto == PROTO_ICMP && input.get(v.l4).copied().is_some_and(is_icmp_error) {
            return Err(violation(
                "icmp_error_sent_about_an_icmp_error",
                format!(
                    "{} answered an ICMP error (type {}) with an ICMP error; the forwarding stack never does \
                     (RFC 1122 3.2.2, icmp_send)",
                    counter_name(verdict),
                    input[v.l4]
                ),
            ));
        }
        if v.later_fragment() {
            return Err(violation(
                "icmp_error_sent_about_a_later_fragment",
                format!(
                    "{} answered a non-first fragment (offset {}); icmp_send only answers fragment 0",
                    counter_name(verdict),
                    v.frag_offset
                ),
            ));
        }
    }
    let rst = verdict == Counter::RejectTcpRst;
    let want_len = if rst { ETH_HLEN + 40 } else { ETH_HLEN + 20 + 8 + 28 };
    if output.len() != want_len {
        return Err(violation("answer_has_the_wrong_length", format!("{} bytes, want {want_len}", output.len())));
    }
    if output[0..6] != input[6..12] || output[6..12] != input[0..6] || output[12..14] != ETH_P_IP {
        return Err(violation("answer_mac_header_wrong", "MAC addresses not swapped or EtherType not IPv4"));
    }
    let ip = &output[ETH_HLEN..ETH_HLEN + 20];
    let in_ip = &input[ETH_HLEN..];
    let proto = if rst { PROTO_TCP } else { PROTO_ICMP };
    if ip[0] != 0x45
        || usize::from(u16::from_be_bytes([ip[2], ip[3]])) != want_len - ETH_HLEN
        || ip[9] != proto
        || ip[12..16] != in_ip[16..20]
        || ip[16..20] != in_ip[12..16]
        || u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0
    {
        return Err(violation("answer_ip_header_wrong", format!("{ip:02x?}")));
    }
    if ones_complement_sum(0, ip) != 0xffff {
        return Err(violation("answer_ip_checksum_invalid", format!("{ip:02x?}")));
    }
    let l4 = &output[ETH_HLEN + 20..];
    if rst {
        if ones_complement_sum(pseudo_sum(&ip[12..16], &ip[16..20], PROTO_TCP, 20), l4) != 0xffff {
            return Err(violation("answer_tcp_checksum_invalid", format!("{l4:02x?}")));
        }
        let in_l4 = &input[v.l4..];
        if l4[0..2] != in_l4[2..4] || l4[2..4] != in_l4[0..2] || l4[13] & 0x04 == 0 || l4[12] != 0x50 {
            return Err(violation("answer_rst_wrong", format!("{l4:02x?}")));
        }
        return Ok(());
    }
    if ones_complement_sum(0, l4) != 0xffff {
        return Err(violation("answer_icmp_checksum_invalid", format!("{l4:02x?}")));
    }
    let want_type = match verdict {
        Counter::RejectIcmpUnreachable => (3, 3),
        Counter::DropFragNeeded => (3, 4),
        _ => (11, 0),
    };
    if (l4[0], l4[1]) != want_type {
        return Err(violation("answer_icmp_type_wrong", format!("type {} code {}, want {want_type:?}", l4[0], l4[1])));
    }
    let quote = &l4[8..36];
    let sent = &input[ETH_HLEN..ETH_HLEN + 28];
    if verdict == Counter::RejectIcmpUnreachable {
        if quote != sent {
            return Err(violation(
                "answer_quote_differs_from_the_offending_packet",
                format!("quote {quote:02x?}, packet {sent:02x?}"),
            ));
        }
        return Ok(());
    }
    // The forwarding answers rebuild the quote from the translated packet:
    // its IP checksum is recomputed, a UDP checksum restored incrementally
    // (the same number, perhaps the other zero).
    let udp = v.proto == PROTO_UDP && !v.later_fragment();
    let differs = (0..28).filter(|&i| {
        let exempt = matches!(i, 10 | 11) || (udp && matches!(i, 26 | 27));
        !exempt && quote[i] != sent[i]
    });
    let differs: Vec<usize> = differs.collect();
    let udp_same = !udp
        || if sent[26..28] == [0, 0] {
            quote[26..28] == [0, 0]
        } else {
            norm(u16::from_be_bytes([quote[26], quote[27]])) == norm(u16::from_be_bytes([sent[26], sent[27]]))
        };
    if !differs.is_empty() || !udp_same || ones_complement_sum(0, &quote[..20]) != 0xffff {
        return Err(violation(
            "answer_quote_differs_from_the_offending_packet",
            format!("quote {quote:02x?}, packet as sent {sent:02x?}, differing offsets {differs:?}"),
        ));
    }
    Ok(())
}

/// `bytes` as lowercase hex, for failure reports.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::packet;

    const A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
    const B: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    const C: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);

    #[test]
    fn every_counter_is_a_verdict_or_an_event_and_never_both() {
        for id in Counter::ALL {
            let name = id.name();
            let verdict = VERDICT_COUNTERS.iter().filter(|(v, _)| *v == id).count();
            let event = EVENT_COUNTERS.iter().filter(|e| **e == id).count();
            assert_eq!(verdict + event, 1, "classify counter {name} ({}) as a verdict or an event", id.id());
        }
        assert_eq!(VERDICT_COUNTERS.len() + EVENT_COUNTERS.len(), stats::COUNT as usize);
    }

    #[test]
    fn drop_counters_are_dropping_verdicts() {
        for (id, kind) in VERDICT_COUNTERS {
            if id.is_drop() {
                assert!(matches!(kind, VerdictKind::Dropped | VerdictKind::Answered), "{}", counter_name(id));
            }
        }
    }

    #[test]
    fn the_rng_is_deterministic_per_seed() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        assert!((0..100).all(|_| a.next_u64() == b.next_u64()));
        assert_ne!(Rng::new(7).next_u64(), Rng::new(8).next_u64());
        let mut r = Rng::new(1);
        assert!((0..10_000).all(|_| r.range(3, 5) >= 3 && r.range(3, 5) <= 5));
    }

    #[test]
    fn checksum_helpers_agree_with_the_packet_builders() {
        for f in [
            packet::tcp_v4(A, 40000, B, 80, 0x02, b"hello"),
            packet::udp_v4(A, 5000, B, 53, b"odd"),
            packet::icmp_frag_needed_v4(C, A, 1000, &packet::udp_v4(A, 5000, C, 5353, b"q")),
        ] {
            assert!(ip_checksum_valid(&f) && l4_checksum_valid(&f));
            let mut g = f.clone();
            fix_checksums(&mut g);
            assert_eq!(f, g, "recomputing valid checksums changes nothing");
        }
    }

    /// A correct DNAT passes; one with a stale checksum or a stray byte
    /// does not.
    #[test]
    fn check_translation_tells_a_correct_rewrite_from_a_broken_one() {
        let input = packet::tcp_v4(A, 40000, B, 80, 0x02, b"x");
        let good = packet::tcp_v4(A, 40000, C, 8080, 0x02, b"x");
        let t = check_translation(&input, &good, TC_ACT_OK).expect("a correct DNAT");
        assert!(t.ip_valid && t.l4_valid && !t.l4_unverifiable);
        let mut stale = good.clone();
        stale[ETH_HLEN + 20 + 16] ^= 1;
        assert_eq!(check_translation(&input, &stale, TC_ACT_OK).unwrap_err().check, "l4_checksum_not_preserved");
        let mut stray = good.clone();
        stray[ETH_HLEN + 20 + 4] ^= 1;
        assert_eq!(
            check_translation(&input, &stray, TC_ACT_OK).unwrap_err().check,
            "translation_touched_bytes_it_does_not_own"
        );
        // UDP without a checksum keeps none.
        let input = packet::udp_v4_no_checksum(A, 1, B, 53, b"q");
        check_translation(&input, &packet::udp_v4_no_checksum(A, 1, C, 5353, b"q"), TC_ACT_OK).expect("zero kept");
        let mut bad = packet::udp_v4_no_checksum(A, 1, C, 5353, b"q");
        bad[ETH_HLEN + 20 + 7] = 1;
        assert_eq!(check_translation(&input, &bad, TC_ACT_OK).unwrap_err().check, "udp_zero_checksum_not_kept_zero");
    }

    #[test]
    fn check_translation_accepts_a_correct_icmp_error_translation() {
        let sent = packet::udp_v4(Ipv4Addr::new(192, 168, 100, 11), 61000, C, 5353, b"query!");
        let input = packet::icmp_frag_needed_v4(
            Ipv4Addr::new(192, 168, 100, 12),
            Ipv4Addr::new(192, 168, 100, 11),
            1000,
            &sent,
        );
        let client_sent =
            packet::udp_v4(Ipv4Addr::new(192, 168, 100, 100), 5000, Ipv4Addr::new(192, 168, 100, 11), 30053, b"query!");
        let output = packet::icmp_frag_needed_v4(
            Ipv4Addr::new(192, 168, 100, 12),
            Ipv4Addr::new(192, 168, 100, 100),
            1000,
            &client_sent,
        );
        check_translation(&input, &output, TC_ACT_OK).expect("a correct ICMP error translation");
    }

    #[test]
    fn foreignized_frames_are_provably_foreign_and_mutators_never_panic() {
        let mut rng = Rng::new(42);
        let goldens = [
            packet::tcp_v4(A, 40000, B, 80, 0x02, b"hello"),
            packet::udp_v4(A, 5000, B, 53, b"odd"),
            packet::icmp_frag_needed_v4(C, A, 1000, &packet::udp_v4(A, 5000, C, 5353, b"q")),
            packet::arp_request(A, B),
        ];
        for i in 0..50_000 {
            let mut f = goldens[i % goldens.len()].clone();
            let _ = mutate(&mut rng, &mut f);
            let _ = check_translation(&goldens[i % goldens.len()], &f, TC_ACT_OK);
            foreignize(&mut rng, &mut f);
            assert!(provably_foreign(&f), "{}", hex(&f));
            for g in [random_frame(&mut rng), tiny_frame(&mut rng), structured_frame(&mut rng)] {
                assert!(provably_foreign(&g), "{}", hex(&g));
            }
        }
    }

    #[test]
    fn foreignize_keeps_valid_checksums_valid() {
        let mut rng = Rng::new(3);
        let mut f = packet::tcp_v4(A, 40000, B, 80, 0x02, b"hello");
        foreignize(&mut rng, &mut f);
        assert!(ip_checksum_valid(&f) && l4_checksum_valid(&f));
    }
}
