//! Translation: a known flow rewritten the way its conntrack entry says
//! ([`established`]), a new flow given a backend, a conntrack entry pair and
//! its first rewrite ([`new_flow`]).
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed by reference so they are not copied again on the 512-byte BPF stack"
)]

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST},
    btf_maps::lpm_trie::Key,
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use service_common::{
    Addr, AffinityKey, AffinityValue, CtKey, FAMILY_IPV6, PROTO_SCTP, PROTO_TCP, Port, SCOPE_EXTERNAL, SCOPE_INTERNAL,
    SNAT_HAIRPIN, SOURCE_RANGE_FRONTEND_BITS, ServiceKey, SnatAddrKey, SourceRangeKey, conntrack::next_state, ct_flags,
    hash, service_flags, service_ips, snat_ports, stats::Counter,
};

use crate::{
    backend_table::{is_member, slot_backend},
    conntrack::{self, Found, claim_port, claim_reply},
    fib::egress_ifindex,
    flow::{Flow, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IP6_DST_OFF, IP6_SRC_OFF, TCP_CSUM_OFF, UDP_CSUM_OFF, ktime_ns},
    maps::{AFFINITY, BACKENDS, CONNTRACK_NEW, SERVICES, SNAT_ADDRS, SOURCE_RANGES, count, count_flow, ifindex},
    scratch::{Scratch, scratch},
    verdict::{Outcome, Verdict, forward, pass},
};

/// `bpf_map_update_elem`'s error for `BPF_NOEXIST` on an existing key.
const EEXIST: i32 = 17;

/// What [`new_flow`] decided.
#[derive(Clone, Copy)]
pub enum NewFlow {
    /// The packet's verdict.
    Verdict(Verdict),
    /// Another CPU created the same flow first: the caller looks the flow
    /// up again and translates the packet the way the winner's entry says
    /// (one backend, one SNAT port per flow).
    Join,
}

const _: () = assert!(size_of::<Result<NewFlow, Counter>>() <= 8);

/// Which interface a packet entered on: it decides which frontends a new
/// flow may match and when it needs SNAT.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The host side of a pod interface: the frontends pods reach
    /// (ClusterIPs, and this node's NodePorts, LoadBalancer IPs and
    /// external IPs); SNAT for a hairpin (the pod lands on itself) or a
    /// masquerading frontend.
    Pod,
    /// An external interface: NodePort, LoadBalancer IP, external IP and
    /// ClusterIP frontends for traffic from outside; SNAT for a
    /// masquerading frontend.
    External,
}

/// A packet of a known flow: track it, then translate it the way its entry
/// says.
///
/// This and [`new_flow`] are separate BPF functions (not inlined): each
/// gets its own stack frame, so the two paths' locals never add up in one
/// frame (the verifier allows 512 bytes for the deepest call chain).
#[inline(never)]
pub fn established(ctx: &TcContext, flow: &Flow, key: &CtKey, found: &Found) -> Outcome {
    // The entry is copied before tracking: a flow made assured moves to
    // the other table, and the element it leaves is freed at once. Another
    // CPU may reuse that element for a new flow straight away (hash map
    // elements are recycled without waiting for readers), so reading it
    // after the move could translate this packet with another flow's
    // addresses.
    // SAFETY: a valid map value pointer from a successful lookup; the
    // fields are plain data.
    scratch()?.entry = unsafe { *found.ct };
    // A later fragment carries no news about the flow's state (its first
    // fragment did): it only follows the translation.
    if !flow.later_fragment {
        conntrack::track(key, found.ct, found.assured, flow.tcp_flags, ktime_ns(), ifindex(ctx))?;
    }
    let ct = &scratch()?.entry;
    let flags = ct.flags;
    let snat = flags & ct_flags::SNAT != 0;
    let counter = if flow.later_fragment { Counter::FragmentTranslated } else { Counter::DnatEstablished };
    if flags & ct_flags::DNAT != 0 {
        rewrite(ctx, flow, End::Destination, &flow.daddr, &ct.nat_addr, flow.dport, ct.nat_port)?;
        count_flow(ctx, ct.rev_nat_id, ct.backend_id);
        if snat {
            rewrite(ctx, flow, End::Source, &flow.saddr, &ct.snat_addr, flow.sport, ct.snat_port)?;
            // A remapped source port keeps the client's own address: no
            // node address to route around.
            if ct.snat_addr != flow.saddr {
                return forward(counter);
            }
        }
        pass(counter)
    } else if flags & ct_flags::REV_NAT != 0 {
        rewrite(ctx, flow, End::Source, &flow.saddr, &ct.nat_addr, flow.sport, ct.nat_port)?;
        if snat {
            rewrite(ctx, flow, End::Destination, &flow.daddr, &ct.snat_addr, flow.dport, ct.snat_port)?;
        }
        count_flow(ctx, ct.rev_nat_id, ct.backend_id);
        let counter = if flow.later_fragment { Counter::FragmentTranslated } else { Counter::RevNat };
        if flags & ct_flags::EXTERNAL != 0 {
            return forward(counter);
        }
        pass(counter)
    } else {
        pass(Counter::PassNoService)
    }
}

/// The first packet of a flow: look up the frontend, pick a backend, record
/// both directions in conntrack, DNAT (and SNAT when the reply must come
/// back through this node, or a source port remapped when the reply tuple
/// clashes with another flow's).
#[inline(never)]
#[expect(
    clippy::too_many_lines,
    reason = "one new flow's steps in order; each further split is a BPF frame the 512-byte stack cannot afford"
)]
pub fn new_flow(ctx: &TcContext, flow: &Flow, key: &CtKey, side: Side) -> Result<NewFlow, Counter> {
    let scope = if side == Side::External { SCOPE_EXTERNAL } else { SCOPE_INTERNAL };
    let scratch = scratch()?;
    scratch.frontend = ServiceKey::frontend(key.family, key.daddr, flow.dport, flow.proto, scope);
    // SAFETY: service values are plain data written whole by the agent.
    let Some(service) = (unsafe { SERVICES.get(&scratch.frontend) }) else {
        if flow.later_fragment {
            return Ok(NewFlow::Verdict(Verdict::Pass(Counter::PassNoService)));
        }
        return unserved(key);
    };
    if flow.later_fragment {
        // Its first fragment's flow is gone: nothing to follow.
        return Ok(NewFlow::Verdict(Verdict::Pass(Counter::PassFragment)));
    }
    scratch.service = *service;
    let service = &scratch.service;
    if service.flags & service_flags::SOURCE_RANGES != 0 {
        // The trie key: the frontend (id, protocol, family: matched
        // whole), then the source (32 or 128 bits).
        let range_key = Key::new(
            SOURCE_RANGE_FRONTEND_BITS + address_bits(key.family),
            SourceRangeKey::new(service.rev_nat_id, flow.proto, key.family, key.saddr),
        );
        if SOURCE_RANGES.get(&range_key).is_none() {
            return Err(Counter::DropSourceRange);
        }
    }
    if service.count == 0 {
        if service.flags & service_flags::DROP != 0 {
            return Err(Counter::DropNoLocalBackend);
        }
        if service.flags & service_flags::REJECT == 0 {
            return Err(Counter::DropNoBackend);
        }
        return Ok(NewFlow::Verdict(Verdict::Reject));
    }
    let now = ktime_ns();
    choose_backend(scratch, key, flow, now)?;
    // The backend stays in scratch memory and is read from there: a copy
    // (and a 16-byte address handed on by reference) would sit on this
    // frame, the deepest of the new-flow path.
    let (backend_id, affinity_hit) = (scratch.backend_id, scratch.affinity_hit != 0);
    let backend = &scratch.backend;
    if flow.proto == PROTO_SCTP && backend.port != flow.dport {
        return Err(Counter::DropSctpPortTranslation);
    }
    // SNAT: a pod reaching itself would see its own address as the source
    // and drop the packet; a frontend the agent marks masquerades (traffic
    // from outside under a Cluster policy, whose backend on another node
    // would answer the client directly, bypassing this node's reverse
    // translation; pod traffic to a NodePort, as kube-proxy does).
    let snat_row = if side == Side::Pod && backend.addr == key.saddr {
        Some(SNAT_HAIRPIN)
    } else if scratch.service.flags & service_flags::MASQUERADE != 0 {
        // The address of the interface the packet leaves by towards the
        // backend (MASQUERADE's choice); failing that the entry
        // interface's, then the node's first external address.
        Some(match egress_ifindex(ctx, &backend.addr, key.family)? {
            0 => ifindex(ctx),
            egress => egress,
        })
    } else {
        None
    };
    let rev_nat_id = scratch.service.rev_nat_id;
    scratch.original = service_common::CtValue {
        nat_addr: backend.addr,
        snat_addr: [0; 16],
        nat_port: backend.port,
        snat_port: [0; 2],
        flags: if side == Side::External { ct_flags::DNAT | ct_flags::EXTERNAL } else { ct_flags::DNAT },
        state: next_state(flow.proto, 0, true, flow.tcp_flags),
        _pad: [0; 2],
        backend_id,
        rev_nat_id,
        last_seen_ns: now,
    };
    // A pod dialling a NodePort: its replies' restored source is a node
    // address, so they leave by a FIB redirect as external flows' do. The
    // two flags share one bit (asserted in service-common), so this is one
    // load and one OR on the scratch value, no new stack slot.
    scratch.original.flags |= (scratch.service.flags & service_flags::NODE_ADDRESS) as u8;
    scratch.reply_key = CtKey { saddr: backend.addr, daddr: key.saddr, sport: backend.port, dport: flow.sport, ..*key };
    scratch.reply = service_common::CtValue {
        nat_addr: key.daddr,
        nat_port: flow.dport,
        flags: scratch.original.flags & ct_flags::EXTERNAL | ct_flags::REV_NAT,
        ..scratch.original
    };
    let sctp = flow.proto == PROTO_SCTP;
    let mut remapped = false;
    if let Some(row) = snat_row {
        let family = key.family;
        // SAFETY: plain data written whole by the agent.
        scratch.original.snat_addr = *unsafe {
            SNAT_ADDRS
                .get(&SnatAddrKey::new(row, family))
                .or_else(|| SNAT_ADDRS.get(&SnatAddrKey::new(ifindex(ctx), family)))
                .or_else(|| SNAT_ADDRS.get(&SnatAddrKey::new(SNAT_HAIRPIN, family)))
        }
        .ok_or(Counter::DropSnatNoAddress)?;
        scratch.reply.flags |= ct_flags::SNAT;
        scratch.reply.snat_addr = key.saddr;
        scratch.reply.snat_port = flow.sport;
        scratch.reply_key.daddr = scratch.original.snat_addr;
        let port = if sctp {
            // No port translation for SCTP (its CRC32c covers the ports):
            // the client's own port, if free.
            if !claim_reply(now)? {
                return Err(Counter::DropSctpTupleTaken);
            }
            flow.sport
        } else {
            let h = hash::flow_hash(&key.saddr, &backend.addr, flow.sport, flow.dport, flow.proto);
            claim_port(snat_ports::MIN, snat_ports::MAX, h, now)?
        };
        scratch.original.flags |= ct_flags::SNAT;
        scratch.original.snat_port = port;
    } else if !claim_reply(now)? {
        // The reply tuple (backend → client) is another live flow's: the
        // same client port to two Services with the same backend. Remap
        // this flow's source port, keeping the client's address (what
        // netfilter's NAT does on a clash).
        if sctp {
            return Err(Counter::DropSctpTupleTaken);
        }
        scratch.reply.flags |= ct_flags::SNAT;
        scratch.reply.snat_addr = key.saddr;
        scratch.reply.snat_port = flow.sport;
        let h = hash::flow_hash(&key.saddr, &backend.addr, flow.sport, flow.dport, flow.proto);
        let port = claim_port(snat_ports::REMAP_MIN, snat_ports::MAX, h, now)?;
        scratch.original.flags |= ct_flags::SNAT;
        scratch.original.snat_addr = key.saddr;
        scratch.original.snat_port = port;
        remapped = true;
    }
    // The flow itself, last: a reply finds its entry as soon as the first
    // packet leaves. Two CPUs creating the same flow: one insert wins, the
    // other packet gives its claim back and follows the winner's entry.
    if let Err(e) = CONNTRACK_NEW.insert(key, &scratch.original, u64::from(BPF_NOEXIST)) {
        let _ = CONNTRACK_NEW.remove(&scratch.reply_key);
        if e == -EEXIST {
            return Ok(NewFlow::Join);
        }
        return Err(Counter::DropCtInsert);
    }
    let snat = scratch.original.flags & ct_flags::SNAT != 0;
    rewrite(ctx, flow, End::Destination, &flow.daddr, &scratch.backend.addr, flow.dport, scratch.backend.port)?;
    if affinity_hit {
        count(ifindex(ctx), Counter::AffinityHit);
    }
    count_flow(ctx, rev_nat_id, backend_id);
    if snat {
        let original = &scratch.original;
        rewrite(ctx, flow, End::Source, &flow.saddr, &original.snat_addr, flow.sport, original.snat_port)?;
        if remapped {
            count(ifindex(ctx), Counter::NatClashRemapped);
            return Ok(NewFlow::Verdict(Verdict::Pass(Counter::DnatNew)));
        }
        count(ifindex(ctx), Counter::SnatNew);
        // The new source is this node's own address.
        return Ok(NewFlow::Verdict(Verdict::Forward(Counter::DnatNew)));
    }
    Ok(NewFlow::Verdict(Verdict::Pass(Counter::DnatNew)))
}

/// A new flow that matched no frontend: to a ClusterIP (on a port or
/// protocol it does not serve) rejected, to another address of a service
/// CIDR dropped, to anything else passed untouched ([`service_ip`], not
/// inlined: its trie keys stay out of `new_flow`'s frame; a packet for no
/// Service pays one trie lookup there).
#[inline(always)]
fn unserved(key: &CtKey) -> Result<NewFlow, Counter> {
    match service_ip(&key.daddr, key.family) {
        ServiceIp::None => Ok(NewFlow::Verdict(Verdict::Pass(Counter::PassNoService))),
        ServiceIp::ClusterIp => Ok(NewFlow::Verdict(Verdict::Reject)),
        ServiceIp::Unallocated => Err(Counter::DropUnallocatedServiceIp),
    }
}

/// What the service IP rows (`source_ranges`, owner
/// [`service_ips::OWNER`]) say of an address no frontend serves.
pub enum ServiceIp {
    /// No Service address: not the dataplane's business.
    None,
    /// A ClusterIP (on a port or protocol it does not serve).
    ClusterIp,
    /// An address of a service CIDR that no Service has.
    Unallocated,
}

/// Looks `addr` up among the service IP rows: what the packet path and the
/// socket path both decide an unserved address by. Not inlined: its trie
/// keys stay out of the callers' frames.
#[inline(never)]
pub fn service_ip(addr: &Addr, family: u8) -> ServiceIp {
    let bits = SOURCE_RANGE_FRONTEND_BITS + address_bits(family);
    let range = Key::new(bits, SourceRangeKey::new(service_ips::OWNER, service_ips::RANGE, family, *addr));
    if SOURCE_RANGES.get(&range).is_none() {
        return ServiceIp::None;
    }
    let host = Key::new(bits, SourceRangeKey::new(service_ips::OWNER, service_ips::CLUSTER_IP, family, *addr));
    if SOURCE_RANGES.get(&host).is_some() { ServiceIp::ClusterIp } else { ServiceIp::Unallocated }
}

/// The backend for a new flow: the client's affinity entry when the
/// Service has ClientIP affinity, the entry is fresh and its backend is
/// still in the frontend's backend set and exists, else the Maglev slot
/// the flow hashes to (then remembered for affinity). Both are read from
/// the frontend's table in `backend_slots` ([`crate::backend_table`]),
/// which the row in `scratch.service` names: the table it was switched
/// to, whole.
///
/// Not inlined (its keys stay out of `new_flow`'s frame); the result goes
/// to `scratch.backend`, `backend_id`, `affinity_hit`.
#[inline(never)]
fn choose_backend(s: &mut Scratch, key: &CtKey, flow: &Flow, now: u64) -> Result<(), Counter> {
    // Keys and values are built in scratch memory: this frame sits under
    // `new_flow`'s in the deepest call chain.
    let sticky = s.service.flags & service_flags::AFFINITY != 0;
    // One entry per client and Service port, whichever of the port's
    // frontends (ClusterIP, NodePort, LoadBalancer IP, external IP) it used.
    s.affinity_key =
        AffinityKey { client: key.saddr, scope: s.service.affinity_scope, proto: flow.proto, _pad: [0; 3] };
    if sticky {
        // SAFETY: plain data; a racing update gives a stale but valid copy.
        if let Some(entry) = unsafe { AFFINITY.get(&s.affinity_key) } {
            s.affinity = *entry;
            let timeout_ns = u64::from(s.service.affinity_timeout_s) * 1_000_000_000;
            // Only a backend still in this frontend's set (its member
            // list): an entry naming a removed backend, or an id handed to
            // another Service since, falls through to the table.
            if now.saturating_sub(s.affinity.last_used_ns) <= timeout_ns
                && is_member(&s.service, s.affinity.backend_id)
                // SAFETY: plain data written whole by the agent.
                && let Some(backend) = unsafe { BACKENDS.get(&s.affinity.backend_id) }
            {
                s.backend = *backend;
                s.backend_id = s.affinity.backend_id;
                s.affinity_hit = 1;
                s.affinity.last_used_ns = now;
                let _ = AFFINITY.insert(&s.affinity_key, &s.affinity, 0);
                return Ok(());
            }
        }
    }
    // Read once: `service` lives in scratch memory, and the check must
    // cover the value the slot is computed from.
    let count = s.service.count;
    if count == 0 {
        return Err(Counter::DropNoBackend);
    }
    let h = hash::flow_hash(&key.saddr, &key.daddr, flow.sport, flow.dport, flow.proto);
    let backend_id = slot_backend(s.service.table, count, hash::slot_for(h, count)).ok_or(Counter::DropMissingRow)?;
    // SAFETY: plain data written whole by the agent.
    match unsafe { BACKENDS.get(&backend_id) } {
        Some(b) => s.backend = *b,
        None => return Err(Counter::DropMissingRow),
    }
    s.backend_id = backend_id;
    s.affinity_hit = 0;
    if sticky {
        s.affinity = AffinityValue { backend_id, _pad: 0, last_used_ns: now };
        // Losing the entry only loses stickiness for the next flow.
        let _ = AFFINITY.insert(&s.affinity_key, &s.affinity, 0);
    }
    Ok(())
}

/// The length of an address of `family` in bits: a whole-address match in
/// the `source_ranges` trie.
#[inline(always)]
fn address_bits(family: u8) -> u32 {
    if family == FAMILY_IPV6 { 128 } else { 32 }
}

/// Which end of a packet a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Source,
    Destination,
}

/// Rewrites one end's address (in the IP header, which starts at
/// `flow.ip_off`: 0 on an L3 device) and port, fixing the L4 checksum
/// (pseudo-header included) and, for IPv4, the header checksum (IPv6 has
/// none). The kernel helpers handle CHECKSUM_PARTIAL packets (only the
/// pseudo-header sum is updated) as well as complete checksums; a UDP
/// checksum of 0 ("none", IPv4 only: the parse passes an IPv6 one
/// untouched) stays 0 and a result of 0 is written as 0xffff
/// (BPF_F_MARK_MANGLED_0). A failed helper is counted as its stage:
/// `drop_l4_csum`, `drop_l3_csum`, `drop_store`.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    flow: &Flow,
    end: End,
    old_addr: &Addr,
    new_addr: &Addr,
    old_port: Port,
    new_port: Port,
) -> Result<(), Counter> {
    let ports = (u64::from(end == End::Source) << 32)
        | (u64::from(u16::from_ne_bytes(old_port)) << 16)
        | u64::from(u16::from_ne_bytes(new_port));
    rewrite_end(ctx, flow, old_addr, new_addr, ports)
}

/// [`rewrite`]'s body, a BPF function of its own (so its locals never
/// sit in `new_flow`'s or `established`'s frame): the end (bit 32: the
/// source) and both ports (raw network-order values) share one argument,
/// a BPF function taking five.
#[inline(never)]
fn rewrite_end(ctx: &TcContext, flow: &Flow, old_addr: &Addr, new_addr: &Addr, ports: u64) -> Result<(), Counter> {
    let end = if ports >> 32 != 0 { End::Source } else { End::Destination };
    #[expect(clippy::cast_possible_truncation, reason = "unpacking the 16-bit ports")]
    let (old_port, new_port) = (((ports >> 16) as u16).to_ne_bytes(), (ports as u16).to_ne_bytes());
    let (csum_off, mangled_0) = if flow.proto == PROTO_TCP {
        (flow.l4_off + TCP_CSUM_OFF, 0)
    } else {
        (flow.l4_off + UDP_CSUM_OFF, u64::from(BPF_F_MARK_MANGLED_0))
    };
    // Only the IP header changes for SCTP (its CRC32c covers no
    // pseudo-header and its ports are never rewritten: the model and
    // `new_flow` see to that) and for a later fragment (no L4 header: the
    // first fragment's checksum update covered the whole datagram).
    let sctp = flow.proto == PROTO_SCTP || flow.later_fragment;
    if old_addr != new_addr {
        if flow.family == FAMILY_IPV6 {
            let addr_off = if end == End::Source { IP6_SRC_OFF } else { IP6_DST_OFF };
            let l4_flags = if sctp { NO_L4_CHECKSUM } else { mangled_0 };
            #[expect(clippy::cast_possible_truncation, reason = "both offsets are below 14 + 40 + 6 * 2048 + 16")]
            let offsets = (((flow.ip_off + addr_off) as u32) << 16) | csum_off as u32;
            rewrite_addr_v6(ctx, old_addr, new_addr, offsets, l4_flags)?;
        } else {
            let addr_off = if end == End::Source { IP_SRC_OFF } else { IP_DST_OFF };
            let (old4, new4) = (v4(old_addr), v4(new_addr));
            // The helpers take the raw (network-order) field values.
            let from = u64::from(u32::from_ne_bytes(old4));
            let to = u64::from(u32::from_ne_bytes(new4));
            if !sctp {
                ctx.l4_csum_replace(csum_off, from, to, u64::from(BPF_F_PSEUDO_HDR) | mangled_0 | 4)
                    .map_err(|_| Counter::DropL4Csum)?;
            }
            ctx.l3_csum_replace(flow.ip_off + IP_CSUM_OFF, from, to, 4).map_err(|_| Counter::DropL3Csum)?;
            ctx.store(flow.ip_off + addr_off, &new4, 0).map_err(|_| Counter::DropStore)?;
        }
    }
    if old_port != new_port && !sctp {
        let port_off = if end == End::Source { 0 } else { 2 };
        let from = u64::from(u16::from_ne_bytes(old_port));
        let to = u64::from(u16::from_ne_bytes(new_port));
        ctx.l4_csum_replace(csum_off, from, to, mangled_0 | 2).map_err(|_| Counter::DropL4Csum)?;
        ctx.store(flow.l4_off + port_off, &new_port, 0).map_err(|_| Counter::DropStore)?;
    }
    Ok(())
}

#[inline(always)]
fn v4(addr: &Addr) -> [u8; 4] {
    [addr[0], addr[1], addr[2], addr[3]]
}

/// `rewrite_addr_v6`'s flags when no L4 checksum covers the addresses
/// (SCTP, a later fragment): a bit no `bpf_l4_csum_replace` flag uses.
const NO_L4_CHECKSUM: u64 = 1 << 63;

/// An IPv6 address rewrite: the 128-bit change enters the L4 checksum
/// through its pseudo-header as one difference (`bpf_csum_diff`, then
/// `bpf_l4_csum_replace` with size 0: "add this difference"). `offsets`
/// holds where the address is (high 16 bits) and where the L4 checksum is
/// (low 16 bits), `l4_flags` the checksum helper's flags or
/// [`NO_L4_CHECKSUM`]: a BPF function takes five arguments. Not inlined:
/// used by both directions of every translation.
#[inline(never)]
fn rewrite_addr_v6(
    ctx: &TcContext,
    old_addr: &Addr,
    new_addr: &Addr,
    offsets: u32,
    l4_flags: u64,
) -> Result<(), Counter> {
    let at = (offsets >> 16) as usize;
    let csum_off = (offsets & 0xffff) as usize;
    if l4_flags & NO_L4_CHECKSUM == 0 {
        // SAFETY: both pointers are to 16 readable bytes (map values or
        // this program's stack), as the helper's sizes say; it only reads
        // them.
        let diff = unsafe {
            bpf_csum_diff(old_addr.as_ptr().cast_mut().cast(), 16, new_addr.as_ptr().cast_mut().cast(), 16, 0)
        };
        if diff < 0 {
            return Err(Counter::DropL4Csum);
        }
        #[expect(clippy::cast_sign_loss, reason = "checked non-negative: a 32-bit checksum difference")]
        let diff = diff as u64;
        ctx.l4_csum_replace(csum_off, 0, diff, u64::from(BPF_F_PSEUDO_HDR) | l4_flags)
            .map_err(|_| Counter::DropL4Csum)?;
    }
    ctx.store(at, new_addr, 0).map_err(|_| Counter::DropStore)
}
