//! Translation: a known flow rewritten the way its conntrack entry says
//! ([`established`]), a new flow given a backend, a conntrack entry pair and
//! its first rewrite ([`new_flow`]).
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed by reference so they are not copied again on the 512-byte BPF stack"
)]

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST},
    btf_maps::{PerCpuArray, lpm_trie::Key},
    macros::btf_map,
    programs::TcContext,
};
use service_common::{
    Addr, AffinityKey, AffinityValue, BackendValue, CtKey, CtValue, FAMILY_IPV4, PROTO_SCTP, PROTO_TCP, Port,
    SCOPE_EXTERNAL, SCOPE_INTERNAL, SNAT_HAIRPIN, ServiceKey, ServiceValue, SourceRangeKey, backend_flags, ct_flags,
    ct_timeouts, hash, service_flags, snat_ports, stats,
};

use crate::{
    flow::{Flow, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, TCP_CSUM_OFF, TCP_FIN, TCP_RST, UDP_CSUM_OFF, ktime_ns},
    maps::{AFFINITY, BACKENDS, CONNTRACK, SERVICES, SNAT_ADDRS, SOURCE_RANGES, count, count_flow},
};

/// `Ok((action, counter))` lets the packet go on (`TC_ACT_OK`, or
/// redirected as a reject answer); `Err(counter)` drops it.
pub type Outcome = Result<(i32, u32), u32>;

/// The action [`new_flow`] returns when the packet must be rejected.
pub const NEEDS_REJECT: i32 = i32::MIN;
/// The action returned for a translated packet that must leave by a FIB
/// lookup and redirect (see `fib`); done by the caller, so the lookup's
/// buffers never share a call chain's stack with the translation's.
pub const NEEDS_REDIRECT: i32 = i32::MIN + 1;

#[inline(always)]
#[expect(clippy::unnecessary_wraps, reason = "an Outcome, so every return site reads alike")]
pub fn redirect(counter: u32) -> Outcome {
    Ok((NEEDS_REDIRECT, counter))
}

#[inline(always)]
#[expect(clippy::unnecessary_wraps, reason = "an Outcome, so every return site reads alike")]
pub fn pass(counter: u32) -> Outcome {
    Ok((aya_ebpf::bindings::TC_ACT_OK, counter))
}

/// Which interface a packet entered on: it decides which frontends a new
/// flow may match and when it needs SNAT.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The host side of a pod interface: ClusterIP frontends; SNAT only
    /// for a hairpin (the pod lands on itself).
    Pod,
    /// An external interface: NodePort, LoadBalancer and external IPs;
    /// SNAT when the backend runs on another node.
    External,
}

/// Per-CPU room for what a packet's translation builds (the frontend key
/// and row, the two conntrack entries of a new flow, the peer key a closing
/// flow updates), kept off the 512-byte stack.
#[repr(C)]
struct Scratch {
    frontend: ServiceKey,
    service: ServiceValue,
    reply_key: CtKey,
    original: CtValue,
    reply: CtValue,
}

#[btf_map(name = "scratch")]
static SCRATCH: PerCpuArray<Scratch, 1> = PerCpuArray::new();

/// This CPU's scratch space.
#[inline(always)]
fn scratch() -> Result<&'static mut Scratch, u32> {
    let ptr = SCRATCH.get_ptr_mut(0).ok_or(stats::DROP_CT_INSERT)?;
    // SAFETY: this CPU's own slot; a BPF program is not preempted by
    // itself on one CPU, so nothing else uses it while this packet runs.
    Ok(unsafe { &mut *ptr })
}

#[inline(always)]
fn v4(addr: &Addr) -> [u8; 4] {
    [addr[0], addr[1], addr[2], addr[3]]
}

/// A packet of a known flow: translate it the way its entry says.
///
/// This and [`new_flow`] are separate BPF functions (not inlined): each
/// gets its own stack frame, so the two paths' locals never add up in one
/// frame (the verifier allows 512 bytes for the deepest call chain).
#[inline(never)]
pub fn established(ctx: &TcContext, flow: &Flow, key: &CtKey, ct: *mut CtValue) -> Outcome {
    // SAFETY: a valid map value pointer from a successful lookup; the
    // fields are plain data, a racing update gives stale but valid values.
    let ct = unsafe { &mut *ct };
    let now = ktime_ns();
    if flow.first_fragment {
        return Err(stats::DROP_FRAGMENTED_SERVICE);
    }
    let closing = flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 && ct.flags & ct_flags::CLOSING == 0;
    if closing {
        ct.flags |= ct_flags::CLOSING;
        mark_peer_closing(key, ct)?;
    }
    // Refreshed in place, at most once a second, to keep writes off the
    // fast path.
    if closing || now.saturating_sub(ct.last_seen_ns) > ct_timeouts::REFRESH_NS {
        ct.last_seen_ns = now;
    }
    let flags = ct.flags;
    let snat = flags & ct_flags::SNAT != 0;
    if flags & ct_flags::DNAT != 0 {
        rewrite(ctx, flow, IP_DST_OFF, flow.daddr, v4(&ct.nat_addr), 2, flow.dport, ct.nat_port)?;
        count_flow(ctx, ct.rev_nat_id, ct.backend_id);
        if snat {
            rewrite(ctx, flow, IP_SRC_OFF, flow.saddr, v4(&ct.snat_addr), 0, flow.sport, ct.snat_port)?;
            return redirect(stats::DNAT_ESTABLISHED);
        }
        pass(stats::DNAT_ESTABLISHED)
    } else if flags & ct_flags::REV_NAT != 0 {
        rewrite(ctx, flow, IP_SRC_OFF, flow.saddr, v4(&ct.nat_addr), 0, flow.sport, ct.nat_port)?;
        if snat {
            rewrite(ctx, flow, IP_DST_OFF, flow.daddr, v4(&ct.snat_addr), 2, flow.dport, ct.snat_port)?;
        }
        count_flow(ctx, ct.rev_nat_id, ct.backend_id);
        if flags & ct_flags::EXTERNAL != 0 {
            return redirect(stats::REV_NAT);
        }
        pass(stats::REV_NAT)
    } else {
        pass(stats::PASS_NO_SERVICE)
    }
}

/// On FIN/RST, the other direction's entry starts its closing timeout too.
#[inline(always)]
fn mark_peer_closing(key: &CtKey, ct: &CtValue) -> Result<(), u32> {
    let snat = ct.flags & ct_flags::SNAT != 0;
    let peer = &mut scratch()?.reply_key;
    *peer = *key;
    if ct.flags & ct_flags::DNAT != 0 {
        // client → frontend; the peer is backend → client (or → this
        // node's SNAT address and port).
        peer.saddr = ct.nat_addr;
        peer.sport = ct.nat_port;
        (peer.daddr, peer.dport) = if snat { (ct.snat_addr, ct.snat_port) } else { (key.saddr, key.sport) };
    } else {
        // backend → client; the peer is client → frontend.
        (peer.saddr, peer.sport) = if snat { (ct.snat_addr, ct.snat_port) } else { (key.daddr, key.dport) };
        peer.daddr = ct.nat_addr;
        peer.dport = ct.nat_port;
    }
    if let Some(entry) = CONNTRACK.get_ptr_mut(peer) {
        // SAFETY: a valid map value pointer; a racing writer can only set
        // the same bit or refresh the timestamp.
        unsafe { (*entry).flags |= ct_flags::CLOSING };
    }
    Ok(())
}

/// The first packet of a flow: look up the frontend, pick a backend, record
/// both directions in conntrack, DNAT (and SNAT when the reply must come
/// back through this node).
#[inline(never)]
pub fn new_flow(ctx: &TcContext, flow: &Flow, key: &CtKey, side: Side) -> Outcome {
    let scope = if side == Side::External { SCOPE_EXTERNAL } else { SCOPE_INTERNAL };
    let scratch = scratch()?;
    scratch.frontend = ServiceKey::frontend(FAMILY_IPV4, key.daddr, flow.dport, flow.proto, scope);
    // SAFETY: service values are plain data written whole by the agent.
    let Some(service) = (unsafe { SERVICES.get(&scratch.frontend) }) else {
        return pass(stats::PASS_NO_SERVICE);
    };
    scratch.service = *service;
    let service = &scratch.service;
    if flow.first_fragment {
        // Later fragments carry no ports and could not follow the DNAT.
        return Err(stats::DROP_FRAGMENTED_SERVICE);
    }
    if service.flags & service_flags::SOURCE_RANGES != 0 {
        // The trie key: the frontend's id (32 bits, matched whole), then
        // the IPv4 source (32 bits).
        let range_key = Key::new(64, SourceRangeKey { rev_nat_id: service.rev_nat_id.to_be_bytes(), addr: key.saddr });
        if SOURCE_RANGES.get(&range_key).is_none() {
            return Err(stats::DROP_SOURCE_RANGE);
        }
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
    let (backend_id, backend, affinity_hit) = choose_backend(&scratch.frontend, service, key, flow, now)?;
    if flow.proto == PROTO_SCTP && backend.port != flow.dport {
        return Err(stats::DROP_SCTP_PORT_TRANSLATION);
    }
    // SNAT: a backend on another node would answer the client directly,
    // bypassing this node's reverse translation; a pod reaching itself
    // would see its own address as the source and drop the packet.
    let snat_row = match side {
        Side::External if backend.flags & backend_flags::LOCAL == 0 => Some(
            // SAFETY: reading the receiving interface from the context.
            unsafe { (*ctx.skb.skb).ifindex },
        ),
        Side::Pod if backend.addr == key.saddr => Some(SNAT_HAIRPIN),
        _ => None,
    };
    let rev_nat_id = service.rev_nat_id;
    scratch.original = CtValue {
        nat_addr: backend.addr,
        snat_addr: [0; 16],
        nat_port: backend.port,
        snat_port: [0; 2],
        flags: if side == Side::External { ct_flags::DNAT | ct_flags::EXTERNAL } else { ct_flags::DNAT },
        _pad: [0; 3],
        backend_id,
        rev_nat_id,
        last_seen_ns: now,
    };
    // A pod dialling a NodePort: its replies' restored source is a node
    // address, so they leave by a FIB redirect as external flows' do. The
    // two flags share one bit (asserted in service-common), so this is one
    // load and one OR on the scratch value, no new stack slot: new_flow's
    // frame sits at the 512-byte limit of its call chain.
    #[expect(clippy::cast_possible_truncation, reason = "the bit is below 8")]
    {
        scratch.original.flags |= (scratch.service.flags & service_flags::NODE_ADDRESS) as u8;
    }
    scratch.reply_key = CtKey { saddr: backend.addr, daddr: key.saddr, sport: backend.port, dport: flow.sport, ..*key };
    scratch.reply = CtValue {
        nat_addr: key.daddr,
        nat_port: flow.dport,
        flags: scratch.original.flags & ct_flags::EXTERNAL | ct_flags::REV_NAT,
        ..scratch.original
    };
    if let Some(row) = snat_row {
        // SAFETY: plain data written whole by the agent.
        let snat_addr = *unsafe { SNAT_ADDRS.get(&row) }.ok_or(stats::DROP_SNAT_NO_ADDRESS)?;
        scratch.reply.flags |= ct_flags::SNAT;
        scratch.reply.snat_addr = key.saddr;
        scratch.reply.snat_port = flow.sport;
        scratch.reply_key.daddr = snat_addr;
        let port = snat_port(scratch, flow)?;
        scratch.original.flags |= ct_flags::SNAT;
        scratch.original.snat_addr = snat_addr;
        scratch.original.snat_port = port;
    } else {
        // The reply entry first: once the original entry exists, a reply
        // must find its way back.
        CONNTRACK.insert(&scratch.reply_key, &scratch.reply, 0).map_err(|_| stats::DROP_CT_INSERT)?;
    }
    CONNTRACK.insert(key, &scratch.original, 0).map_err(|_| stats::DROP_CT_INSERT)?;
    rewrite(ctx, flow, IP_DST_OFF, flow.daddr, v4(&backend.addr), 2, flow.dport, backend.port)?;
    if affinity_hit {
        count(stats::AFFINITY_HIT);
    }
    count_flow(ctx, rev_nat_id, backend_id);
    if snat_row.is_some() {
        rewrite(
            ctx,
            flow,
            IP_SRC_OFF,
            flow.saddr,
            v4(&scratch.original.snat_addr),
            0,
            flow.sport,
            scratch.original.snat_port,
        )?;
        count(stats::SNAT_NEW);
        // The new source is this node's own address.
        return redirect(stats::DNAT_NEW);
    }
    pass(stats::DNAT_NEW)
}

/// Claims a SNAT source port for the flow: the reply entry (backend →
/// node address:port) is inserted only if no other flow holds it, trying
/// [`snat_ports::TRIES`] hash-chosen ports of the SNAT range.
#[inline(always)]
fn snat_port(scratch: &mut Scratch, flow: &Flow) -> Result<Port, u32> {
    let h = hash::flow_hash(&scratch.reply.snat_addr, &scratch.reply.nat_addr, flow.sport, flow.dport, flow.proto);
    let span = u32::from(snat_ports::MAX - snat_ports::MIN) + 1;
    if flow.proto == PROTO_SCTP {
        // No port translation for SCTP (its CRC32c covers the ports): the
        // client's own port, if free.
        scratch.reply_key.dport = flow.sport;
        return match CONNTRACK.insert(&scratch.reply_key, &scratch.reply, u64::from(BPF_NOEXIST)) {
            Ok(()) => Ok(flow.sport),
            Err(_) => Err(stats::DROP_SNAT_NO_PORT),
        };
    }
    let mut i = 0;
    while i < snat_ports::TRIES {
        let offset = h.wrapping_add(i.wrapping_mul(0x9e37_79b9)) % span;
        #[expect(clippy::cast_possible_truncation, reason = "offset < span <= 65536 - MIN")]
        let port = (snat_ports::MIN + offset as u16).to_be_bytes();
        scratch.reply_key.dport = port;
        if CONNTRACK.insert(&scratch.reply_key, &scratch.reply, u64::from(BPF_NOEXIST)).is_ok() {
            return Ok(port);
        }
        i += 1;
    }
    Err(stats::DROP_SNAT_NO_PORT)
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
    // Read once: `service` lives in scratch memory, and the check must
    // cover the value the slot is computed from.
    let count = service.count;
    if count == 0 {
        return Err(stats::DROP_NO_BACKEND);
    }
    let h = hash::flow_hash(&key.saddr, &key.daddr, flow.sport, flow.dport, flow.proto);
    #[expect(clippy::cast_possible_truncation, reason = "count <= 16381 (the largest Maglev table): the slot fits")]
    let slot = hash::slot_for(h, count) as u16;
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
    // SCTP's CRC32c covers no pseudo-header and its ports are never
    // rewritten (the model and `new_flow` see to that): only the IP
    // header changes.
    let sctp = flow.proto == PROTO_SCTP;
    if old_addr != new_addr {
        // The helpers take the raw (network-order) field values.
        let from = u64::from(u32::from_ne_bytes(old_addr));
        let to = u64::from(u32::from_ne_bytes(new_addr));
        if !sctp {
            ctx.l4_csum_replace(csum_off, from, to, u64::from(BPF_F_PSEUDO_HDR) | mangled_0 | 4)
                .map_err(|_| stats::DROP_REWRITE)?;
        }
        ctx.l3_csum_replace(IP_CSUM_OFF, from, to, 4).map_err(|_| stats::DROP_REWRITE)?;
        ctx.store(addr_off, &new_addr, 0).map_err(|_| stats::DROP_REWRITE)?;
    }
    if old_port != new_port && !sctp {
        let from = u64::from(u16::from_ne_bytes(old_port));
        let to = u64::from(u16::from_ne_bytes(new_port));
        ctx.l4_csum_replace(csum_off, from, to, mangled_0 | 2).map_err(|_| stats::DROP_REWRITE)?;
        ctx.store(flow.l4_off + port_off, &new_port, 0).map_err(|_| stats::DROP_REWRITE)?;
    }
    Ok(())
}
