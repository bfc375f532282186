//! The pipeline both classifiers run: one parse into [`Flow`], then an ICMP
//! error about a known flow → its translation; conntrack (an existing flow,
//! either direction) → its rewrite; a Service frontend (a new flow) →
//! backend, conntrack, rewrite, or a reject answer; else pass. Packets
//! whose new source is a node address leave by a FIB redirect. Every
//! outcome is a counter id from `service_common::stats`, counted here in
//! one place.

use aya_ebpf::{bindings::TC_ACT_SHOT, programs::TcContext};
use service_common::{
    PROTO_ICMP, PROTO_TCP,
    conntrack::{is_closing, is_expired, is_syn},
    ct_flags, stats,
};

use crate::{
    conntrack, fib,
    flow::{ktime_ns, parse_into, remember_first_fragment},
    icmp,
    maps::count,
    nat::{NEEDS_ICMP_ANSWER, NEEDS_JOIN, NEEDS_REDIRECT, NEEDS_REJECT, Outcome, Side, established, new_flow},
    reject,
    scratch::{Packet, packet},
};

/// Runs the pipeline; returns the TC action. `L2` is the length of the
/// device's link-layer header: `flow::ETH_HLEN`, or `flow::NO_L2` on an
/// L3 device (the packet starts at the IP header).
#[inline(always)]
pub fn run<const L2: usize>(ctx: &TcContext, side: Side) -> i32 {
    let Some(packet) = packet() else {
        count(stats::DROP_NO_SCRATCH);
        return TC_ACT_SHOT;
    };
    if let Err(pass_counter) = parse_into::<L2>(ctx, &mut packet.flow, &mut packet.key) {
        count(pass_counter);
        return aya_ebpf::bindings::TC_ACT_OK;
    }
    let packet: &Packet = packet;
    let flow = &packet.flow;
    let (action, counter) = match try_run(ctx, packet, side) {
        Ok((NEEDS_REDIRECT, counter)) => match fib::redirect(ctx, flow, counter) {
            // Too big, or out of TTL: the ICMP answer the stack's
            // forwarding would have sent.
            Ok((NEEDS_ICMP_ANSWER, answer)) => match reject::icmp_error_to_sender(ctx, flow, answer) {
                Ok(action) => (action, reject::answer_counter(answer)),
                Err(counter) => (TC_ACT_SHOT, counter),
            },
            Ok(verdict) => verdict,
            Err(counter) => (TC_ACT_SHOT, counter),
        },
        Ok(verdict) => verdict,
        Err(counter) => (TC_ACT_SHOT, counter),
    };
    count(counter);
    action
}

/// Not inlined: its frame sits beside the entry point's, and the deepest
/// chain (a new flow searching a SNAT port) must fit 512 bytes.
#[inline(never)]
fn try_run(ctx: &TcContext, packet: &Packet, side: Side) -> Outcome {
    let flow = &packet.flow;
    if flow.proto == PROTO_ICMP {
        return icmp::translate_error(ctx, flow);
    }
    if flow.first_fragment {
        remember_first_fragment(flow);
    }
    let key = &packet.key;
    if let Some(found) = conntrack::lookup(key) {
        // SAFETY: a valid map value pointer; conntrack values are plain
        // data, a concurrent update gives stale but valid fields.
        let entry = unsafe { &*found.ct };
        // A new connection on a closing or closed flow's tuple starts a
        // fresh flow; an expired entry blocks nothing.
        let reopened = flow.proto == PROTO_TCP
            && is_syn(flow.tcp_flags)
            && entry.flags & ct_flags::DNAT != 0
            && is_closing(flow.proto, entry.state);
        if !reopened && !is_expired(entry, flow.proto, ktime_ns()) {
            return established(ctx, flow, key, &found);
        }
        conntrack::kill(key, found.ct, found.assured)?;
    }
    match new_flow(ctx, flow, key, side) {
        // Answered here, not inside new_flow: the answer's buffers and
        // new_flow's locals never share one call chain's stack.
        Ok((NEEDS_REJECT, _)) => {
            let (saddr, daddr) = (u32::from_ne_bytes(flow.saddr), u32::from_ne_bytes(flow.daddr));
            if flow.proto == PROTO_TCP {
                reject::tcp_rst(ctx, saddr, daddr, reject::pack(flow.ip_off, flow.l4_off, flow.tcp_flags))
                    .map(|action| (action, stats::REJECT_TCP_RST))
            } else {
                reject::icmp_port_unreachable(ctx, saddr, daddr, reject::pack(flow.ip_off, flow.l4_off, 0))
                    .map(|action| (action, stats::REJECT_ICMP_UNREACHABLE))
            }
        }
        // Another CPU created this flow a moment ago: follow its entry.
        Ok((NEEDS_JOIN, _)) => match conntrack::lookup(key) {
            Some(found) => {
                count(stats::CT_RACE_JOINED);
                established(ctx, flow, key, &found)
            }
            None => Err(stats::DROP_CT_RACE),
        },
        outcome => outcome,
    }
}
