//! `service_pod_ingress`: ClusterIP translation for traffic leaving pods.
//!
//! One parse into [`Flow`], then: conntrack (an existing flow, either
//! direction) → service frontend (a new flow) → pass. Every outcome is a
//! counter id from `service_common::stats`; the entry point maps `Ok` to
//! `TC_ACT_OK` and `Err` to `TC_ACT_SHOT` and counts it, in one place.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed by reference so they are not copied again on the 512-byte BPF stack"
)]

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
    helpers::bpf_ktime_get_ns,
    macros::{btf_map, classifier},
    programs::TcContext,
};
use service_common::{
    AffinityKey, AffinityValue, BackendValue, Counters, CtKey, CtValue, FAMILY_IPV4, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
    Port, RevNatValue, SCOPE_INTERNAL, ServiceKey, ServiceValue, SourceRangeKey, addr_v4, capacity, ct_flags,
    ct_timeouts, hash, service_flags, stats,
};

use crate::reject;

#[btf_map(name = "services")]
static SERVICES: HashMap<ServiceKey, ServiceValue, { capacity::SERVICES as usize }> = HashMap::new();
#[btf_map(name = "backends")]
static BACKENDS: HashMap<u32, BackendValue, { capacity::BACKENDS as usize }> = HashMap::new();
/// Not read by this program (conntrack stores the frontend itself); kept in
/// the object so it is created and pinned for the agent and `inspect`.
#[btf_map(name = "rev_nat")]
static REV_NAT: HashMap<u32, RevNatValue, { capacity::REV_NAT as usize }> = HashMap::new();
#[btf_map(name = "conntrack")]
static CONNTRACK: LruHashMap<CtKey, CtValue, { capacity::CONNTRACK as usize }> = LruHashMap::new();
#[btf_map(name = "stats")]
static STATS: PerCpuArray<u64, { stats::COUNT as usize }> = PerCpuArray::new();
/// `loadBalancerSourceRanges` rows, written by the agent; enforced on the
/// external path (north-south traffic).
#[btf_map(name = "source_ranges")]
static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8, { capacity::SOURCE_RANGES as usize }> = LpmTrie::new();
/// Packets and bytes per frontend (rev-NAT id) and per backend, both
/// directions; per-CPU, so no CPU ever writes another's counters.
#[btf_map(name = "service_counters")]
static SERVICE_COUNTERS: PerCpuHashMap<u32, Counters, { capacity::REV_NAT as usize }> = PerCpuHashMap::new();
#[btf_map(name = "backend_counters")]
static BACKEND_COUNTERS: PerCpuHashMap<u32, Counters, { capacity::BACKENDS as usize }> = PerCpuHashMap::new();

/// Adds one packet of `len` bytes to `map[id]`.
#[inline(always)]
fn add_counter<const N: usize>(map: &PerCpuHashMap<u32, Counters, N>, id: u32, len: u64) {
    if let Some(c) = map.get_ptr_mut(&id) {
        // SAFETY: a per-CPU value: only this CPU writes it.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
        }
    } else {
        // The first packet on this CPU; losing it to a race only loses one.
        let _ = map.insert(&id, &Counters { packets: 1, bytes: len }, 0);
    }
}

/// Not inlined, to keep its temporaries off the caller's stack frame.
#[inline(never)]
fn count_flow(ctx: &TcContext, rev_nat_id: u32, backend_id: u32) {
    let len = u64::from(ctx.len());
    add_counter(&SERVICE_COUNTERS, rev_nat_id, len);
    add_counter(&BACKEND_COUNTERS, backend_id, len);
}

/// ClientIP session affinity: (client, frontend, protocol) → backend.
#[btf_map(name = "affinity")]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { capacity::AFFINITY as usize }> = LruHashMap::new();

const ETH_HLEN: usize = 14;
/// EtherType IPv4, as it appears on the wire.
const ETH_P_IP_BE: [u8; 2] = [0x08, 0x00];
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
const TCP_CSUM_OFF: usize = 16;
const UDP_CSUM_OFF: usize = 6;
const TCP_FLAGS_OFF: usize = 13;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
/// IPv4 flags/fragment-offset field (host order after from_be_bytes).
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;

/// Everything downstream needs from the headers, read once.
struct Flow {
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: Port,
    dport: Port,
    proto: u8,
    l4_off: usize,
    tcp_flags: u8,
    /// First fragment of a fragmented datagram (MF set, offset 0).
    first_fragment: bool,
}

impl Flow {
    fn ct_key(&self) -> CtKey {
        CtKey {
            saddr: addr_v4(self.saddr),
            daddr: addr_v4(self.daddr),
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            family: FAMILY_IPV4,
            _pad: [0; 2],
        }
    }
}

/// `Ok((action, counter))` lets the packet go on (`TC_ACT_OK`, or
/// redirected as a reject answer); `Err(counter)` drops it.
type Outcome = Result<(i32, u32), u32>;

#[inline(always)]
#[expect(clippy::unnecessary_wraps, reason = "an Outcome, so every return site reads alike")]
fn pass(counter: u32) -> Outcome {
    Ok((TC_ACT_OK, counter))
}

#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "the classifier macro fixes the signature")]
pub fn service_pod_ingress(ctx: TcContext) -> i32 {
    let (action, counter) = match try_pod_ingress(&ctx) {
        Ok(verdict) => verdict,
        Err(counter) => (TC_ACT_SHOT, counter),
    };
    count(counter);
    action
}

#[inline(always)]
fn count(id: u32) {
    if let Some(counter) = STATS.get_ptr_mut(id) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup,
        // so it is valid and only this CPU writes to it.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn ktime_ns() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions; it reads a clock.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn try_pod_ingress(ctx: &TcContext) -> Outcome {
    let flow = match parse(ctx) {
        Ok(flow) => flow,
        Err(pass_counter) => return pass(pass_counter),
    };
    let key = flow.ct_key();
    // SAFETY: conntrack values are plain data; a concurrent update of the
    // same entry can at worst give a stale copy, never an invalid one.
    if let Some(ct) = unsafe { CONNTRACK.get(&key) } {
        // Not copied here: `established` copies it into its own frame.
        if !expired(ct, flow.proto, ktime_ns()) {
            return established(ctx, &flow, &key, ct);
        }
    }
    match new_flow(ctx, &flow, &key) {
        // Answered here, not inside new_flow: the answer's buffers and
        // new_flow's locals never share one call chain's stack.
        Ok((NEEDS_REJECT, _)) => {
            let (saddr, daddr) = (u32::from_ne_bytes(flow.saddr), u32::from_ne_bytes(flow.daddr));
            if flow.proto == PROTO_TCP {
                reject::tcp_rst(ctx, saddr, daddr, reject::pack(flow.l4_off, flow.tcp_flags))
                    .map(|action| (action, stats::REJECT_TCP_RST))
            } else {
                reject::icmp_port_unreachable(ctx, saddr, daddr, reject::pack(flow.l4_off, 0))
                    .map(|action| (action, stats::REJECT_ICMP_UNREACHABLE))
            }
        }
        outcome => outcome,
    }
}

/// The action [`new_flow`] returns when the packet must be rejected.
const NEEDS_REJECT: i32 = i32::MIN;

/// Per-CPU room for the two conntrack entries a new flow writes, kept off
/// the 512-byte stack.
#[repr(C)]
struct NewFlowScratch {
    reply_key: CtKey,
    original: CtValue,
    reply: CtValue,
}

#[btf_map(name = "scratch")]
static SCRATCH: PerCpuArray<NewFlowScratch, 1> = PerCpuArray::new();

/// Parses Ethernet + IPv4 + the L4 ports. `Err` is the pass counter for a
/// packet this program leaves alone.
#[inline(always)]
fn parse(ctx: &TcContext) -> Result<Flow, u32> {
    let ethertype: [u8; 2] = ctx.load(12).map_err(|_| stats::PASS_MALFORMED)?;
    if ethertype != ETH_P_IP_BE {
        return Err(stats::PASS_NOT_IPV4);
    }
    let ip: [u8; 20] = ctx.load(ETH_HLEN).map_err(|_| stats::PASS_MALFORMED)?;
    let ihl = usize::from(ip[0] & 0x0f);
    if ip[0] >> 4 != 4 || ihl < 5 {
        return Err(stats::PASS_MALFORMED);
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if frag & IP_OFFSET_MASK != 0 {
        // No L4 header in this fragment: nothing to match on.
        return Err(stats::PASS_FRAGMENT);
    }
    let proto = ip[9];
    if proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_SCTP {
        return Err(stats::PASS_OTHER_PROTO);
    }
    let l4_off = ETH_HLEN + ihl * 4;
    let ports: [u8; 4] = ctx.load(l4_off).map_err(|_| stats::PASS_MALFORMED)?;
    let tcp_flags = if proto == PROTO_TCP {
        // The checksum lies beyond the flags: a TCP header this short is
        // malformed, and rewriting it would fail anyway.
        let _: [u8; 2] = ctx.load(l4_off + TCP_CSUM_OFF).map_err(|_| stats::PASS_MALFORMED)?;
        ctx.load::<u8>(l4_off + TCP_FLAGS_OFF).map_err(|_| stats::PASS_MALFORMED)?
    } else if proto == PROTO_UDP {
        let _: [u8; 2] = ctx.load(l4_off + UDP_CSUM_OFF).map_err(|_| stats::PASS_MALFORMED)?;
        0
    } else {
        // SCTP: ports, verification tag and CRC32c (12 bytes).
        let _: [u8; 12] = ctx.load(l4_off).map_err(|_| stats::PASS_MALFORMED)?;
        0
    };
    Ok(Flow {
        saddr: [ip[12], ip[13], ip[14], ip[15]],
        daddr: [ip[16], ip[17], ip[18], ip[19]],
        sport: [ports[0], ports[1]],
        dport: [ports[2], ports[3]],
        proto,
        l4_off,
        tcp_flags,
        first_fragment: frag & IP_MF != 0,
    })
}

#[inline(always)]
fn expired(ct: &CtValue, proto: u8, now: u64) -> bool {
    let timeout = if proto != PROTO_TCP {
        ct_timeouts::UDP_NS
    } else if ct.flags & ct_flags::CLOSING != 0 {
        ct_timeouts::TCP_CLOSING_NS
    } else {
        ct_timeouts::TCP_ESTABLISHED_NS
    };
    now.saturating_sub(ct.last_seen_ns) > timeout
}

/// A packet of a known flow: translate it the way its entry says.
///
/// This and [`new_flow`] are separate BPF functions (not inlined): each
/// gets its own stack frame, so the two paths' locals never add up in one
/// frame (the verifier allows 512 bytes for the deepest call chain).
#[inline(never)]
fn established(ctx: &TcContext, flow: &Flow, key: &CtKey, ct: &CtValue) -> Outcome {
    let ct = *ct;
    let now = ktime_ns();
    if flow.first_fragment {
        return Err(stats::DROP_FRAGMENTED_SERVICE);
    }
    let closing = flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 && ct.flags & ct_flags::CLOSING == 0;
    if closing || now.saturating_sub(ct.last_seen_ns) > ct_timeouts::REFRESH_NS {
        let mut fresh = ct;
        fresh.last_seen_ns = now;
        if closing {
            fresh.flags |= ct_flags::CLOSING;
            mark_peer_closing(key, &ct);
        }
        // Losing this refresh only shortens the entry's life; never drop
        // the packet for it.
        let _ = CONNTRACK.insert(key, &fresh, 0);
    }
    let nat_addr = [ct.nat_addr[0], ct.nat_addr[1], ct.nat_addr[2], ct.nat_addr[3]];
    if ct.flags & ct_flags::DNAT != 0 {
        rewrite(ctx, flow, IP_DST_OFF, flow.daddr, nat_addr, 2, flow.dport, ct.nat_port)?;
        count_flow(ctx, ct.rev_nat_id, ct.backend_id);
        pass(stats::DNAT_ESTABLISHED)
    } else if ct.flags & ct_flags::REV_NAT != 0 {
        rewrite(ctx, flow, IP_SRC_OFF, flow.saddr, nat_addr, 0, flow.sport, ct.nat_port)?;
        count_flow(ctx, ct.rev_nat_id, ct.backend_id);
        pass(stats::REV_NAT)
    } else {
        pass(stats::PASS_NO_SERVICE)
    }
}

/// On FIN/RST, the other direction's entry starts its closing timeout too.
#[inline(always)]
fn mark_peer_closing(key: &CtKey, ct: &CtValue) {
    let peer = if ct.flags & ct_flags::DNAT != 0 {
        // client → frontend; the peer is backend → client.
        CtKey { saddr: ct.nat_addr, daddr: key.saddr, sport: ct.nat_port, dport: key.sport, ..*key }
    } else {
        // backend → client; the peer is client → frontend.
        CtKey { saddr: key.daddr, daddr: ct.nat_addr, sport: key.dport, dport: ct.nat_port, ..*key }
    };
    if let Some(entry) = CONNTRACK.get_ptr_mut(&peer) {
        // SAFETY: a valid map value pointer; a racing writer can only set
        // the same bit or refresh the timestamp.
        unsafe { (*entry).flags |= ct_flags::CLOSING };
    }
}

/// The first packet of a flow: look up the frontend, pick a backend, record
/// both directions in conntrack, DNAT.
#[inline(never)]
fn new_flow(ctx: &TcContext, flow: &Flow, key: &CtKey) -> Outcome {
    let frontend = ServiceKey::frontend(FAMILY_IPV4, key.daddr, flow.dport, flow.proto, SCOPE_INTERNAL);
    // SAFETY: service values are plain data written whole by the agent.
    let Some(service) = (unsafe { SERVICES.get(&frontend) }) else {
        return pass(stats::PASS_NO_SERVICE);
    };
    let service = *service;
    if flow.first_fragment {
        // Later fragments carry no ports and could not follow the DNAT.
        return Err(stats::DROP_FRAGMENTED_SERVICE);
    }
    if service.count == 0 {
        if service.flags & service_flags::DROP != 0 {
            return Err(stats::DROP_NO_LOCAL_BACKEND);
        }
        if service.flags & service_flags::REJECT == 0 {
            return Err(stats::DROP_NO_BACKEND);
        }
        return Ok((NEEDS_REJECT, 0));
    }
    let now = ktime_ns();
    let (backend_id, backend, affinity_hit) = choose_backend(&frontend, &service, key, flow, now)?;
    if flow.proto == PROTO_SCTP && backend.port != flow.dport {
        return Err(stats::DROP_SCTP_PORT_TRANSLATION);
    }
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(stats::DROP_CT_INSERT)?;
    // SAFETY: this CPU's own scratch slot; a BPF program is not preempted
    // by itself on one CPU, so nothing else uses it meanwhile.
    let scratch = unsafe { &mut *scratch };
    scratch.original = CtValue {
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags: ct_flags::DNAT,
        _pad: 0,
        backend_id,
        rev_nat_id: service.rev_nat_id,
        _pad2: 0,
        last_seen_ns: now,
    };
    scratch.reply_key = CtKey { saddr: backend.addr, daddr: key.saddr, sport: backend.port, dport: flow.sport, ..*key };
    scratch.reply = CtValue { nat_addr: key.daddr, nat_port: flow.dport, flags: ct_flags::REV_NAT, ..scratch.original };
    // The reply entry first: once the original entry exists, a reply must
    // find its way back.
    CONNTRACK.insert(&scratch.reply_key, &scratch.reply, 0).map_err(|_| stats::DROP_CT_INSERT)?;
    CONNTRACK.insert(key, &scratch.original, 0).map_err(|_| stats::DROP_CT_INSERT)?;
    let backend_addr = [backend.addr[0], backend.addr[1], backend.addr[2], backend.addr[3]];
    rewrite(ctx, flow, IP_DST_OFF, flow.daddr, backend_addr, 2, flow.dport, backend.port)?;
    if affinity_hit {
        count(stats::AFFINITY_HIT);
    }
    count_flow(ctx, service.rev_nat_id, backend_id);
    pass(stats::DNAT_NEW)
}

/// The backend for a new flow: the client's affinity entry when the
/// Service has ClientIP affinity and the entry is fresh and its backend
/// still exists, else the Maglev slot the flow hashes to (then remembered
/// for affinity).
#[inline(always)]
fn choose_backend(
    frontend: &ServiceKey,
    service: &ServiceValue,
    key: &CtKey,
    flow: &Flow,
    now: u64,
) -> Result<(u32, BackendValue, bool), u32> {
    let sticky = service.flags & service_flags::AFFINITY != 0;
    let affinity_key =
        AffinityKey { client: key.saddr, rev_nat_id: service.rev_nat_id, proto: flow.proto, _pad: [0; 3] };
    if sticky {
        // SAFETY: plain data; a racing update gives a stale but valid copy.
        if let Some(entry) = unsafe { AFFINITY.get(&affinity_key) } {
            let entry = *entry;
            let timeout_ns = u64::from(service.affinity_timeout_s) * 1_000_000_000;
            if now.saturating_sub(entry.last_used_ns) <= timeout_ns {
                // SAFETY: plain data written whole by the agent.
                if let Some(backend) = unsafe { BACKENDS.get(&entry.backend_id) } {
                    let backend = *backend;
                    let fresh = AffinityValue { last_used_ns: now, ..entry };
                    let _ = AFFINITY.insert(&affinity_key, &fresh, 0);
                    return Ok((entry.backend_id, backend, true));
                }
            }
        }
    }
    let h = hash::flow_hash(&key.saddr, &key.daddr, flow.sport, flow.dport, flow.proto);
    #[expect(clippy::cast_possible_truncation, reason = "count <= 16381 (the largest Maglev table): the slot fits")]
    let slot = hash::slot_for(h, service.count) as u16;
    // SAFETY: plain data written whole by the agent.
    let backend_id = match unsafe { SERVICES.get(&frontend.with_slot(service.version, slot)) } {
        Some(row) => row.backend_id,
        None => return Err(stats::DROP_MISSING_ROW),
    };
    // SAFETY: as above.
    let backend = match unsafe { BACKENDS.get(&backend_id) } {
        Some(b) => *b,
        None => return Err(stats::DROP_MISSING_ROW),
    };
    if sticky {
        let entry = AffinityValue { backend_id, _pad: 0, last_used_ns: now };
        // Losing the entry only loses stickiness for the next flow.
        let _ = AFFINITY.insert(&affinity_key, &entry, 0);
    }
    Ok((backend_id, backend, false))
}

/// Rewrites one address (at `addr_off`) and the port at `l4_off +
/// port_off`, fixing the IP checksum and the L4 checksum (pseudo-header
/// included). The kernel helpers handle CHECKSUM_PARTIAL packets (only the
/// pseudo-header sum is updated) as well as complete checksums; a UDP
/// checksum of 0 ("none") stays 0 (BPF_F_MARK_MANGLED_0).
#[expect(clippy::too_many_arguments, reason = "one call site per direction; a struct would only rename them")]
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    flow: &Flow,
    addr_off: usize,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    port_off: usize,
    old_port: Port,
    new_port: Port,
) -> Result<(), u32> {
    let (csum_off, mangled_0) = if flow.proto == PROTO_TCP {
        (flow.l4_off + TCP_CSUM_OFF, 0)
    } else {
        (flow.l4_off + UDP_CSUM_OFF, u64::from(BPF_F_MARK_MANGLED_0))
    };
    if old_addr != new_addr {
        // The helpers take the raw (network-order) field values.
        let from = u64::from(u32::from_ne_bytes(old_addr));
        let to = u64::from(u32::from_ne_bytes(new_addr));
        ctx.l4_csum_replace(csum_off, from, to, u64::from(BPF_F_PSEUDO_HDR) | mangled_0 | 4)
            .map_err(|_| stats::DROP_REWRITE)?;
        ctx.l3_csum_replace(IP_CSUM_OFF, from, to, 4).map_err(|_| stats::DROP_REWRITE)?;
        ctx.store(addr_off, &new_addr, 0).map_err(|_| stats::DROP_REWRITE)?;
    }
    if old_port != new_port {
        let from = u64::from(u16::from_ne_bytes(old_port));
        let to = u64::from(u16::from_ne_bytes(new_port));
        ctx.l4_csum_replace(csum_off, from, to, mangled_0 | 2).map_err(|_| stats::DROP_REWRITE)?;
        ctx.store(flow.l4_off + port_off, &new_port, 0).map_err(|_| stats::DROP_REWRITE)?;
    }
    Ok(())
}
