//! The pipeline both classifiers run: one parse into [`Flow`], then an ICMP
//! error about a known flow → its translation; conntrack (an existing flow,
//! either direction) → its rewrite; a Service frontend (a new flow) →
//! backend, conntrack, rewrite, or a reject answer; else pass. Packets
//! whose new source is a node address leave by a FIB redirect. Inner
//! functions return a [`Verdict`] or the drop reason (`Err(Counter)`);
//! [`run`] turns it into a TC action and one counter, in one place.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    programs::TcContext,
};
use service_common::{
    PROTO_TCP,
    conntrack::{is_closing, is_expired, is_syn},
    ct_flags,
    stats::Counter,
};

use crate::{
    conntrack, fib,
    flow::{Flow, ktime_ns, parse_into, remember_first_fragment},
    icmp,
    maps::{count, ifindex},
    nat::{NewFlow, Side, established, new_flow},
    reject,
    scratch::{Packet, packet},
    verdict::{Outcome, Sent, Verdict},
};

/// Runs the pipeline; returns the TC action. `L2` is the length of the
/// device's link-layer header: `flow::ETH_HLEN`, or `flow::NO_L2` on an
/// L3 device (the packet starts at the IP header).
#[inline(always)]
pub fn run<const L2: usize>(ctx: &TcContext, side: Side) -> i32 {
    // The one place a verdict becomes a TC action and a counter. The
    // steps that send the packet (the FIB redirect with its ICMP answers,
    // the reject answers) are BPF functions of their own, called from
    // here, so their buffers never share a call chain with new_flow's.
    let (action, counter) = match pipeline::<L2>(ctx, side) {
        Ok((Verdict::Pass(counter), _)) => (TC_ACT_OK, counter),
        Ok((Verdict::Forward(counter), flow)) => match fib::forward(ctx, flow, counter) {
            Ok(Sent(counter)) => (TC_ACT_REDIRECT, counter),
            Err(counter) => (TC_ACT_SHOT, counter),
        },
        Ok((Verdict::Reject, flow)) => match reject::refuse(ctx, flow) {
            Ok(Sent(counter)) => (TC_ACT_REDIRECT, counter),
            Err(counter) => (TC_ACT_SHOT, counter),
        },
        Err(counter) => (TC_ACT_SHOT, counter),
    };
    count(ifindex(ctx), counter);
    action
}

/// Parses the packet into this CPU's packet slot and translates it: its
/// verdict and the parsed flow. A packet the programs do not touch (not
/// IPv4, malformed, ...) passes with the parse's counter.
#[inline(always)]
fn pipeline<const L2: usize>(ctx: &TcContext, side: Side) -> Result<(Verdict, &'static Flow), Counter> {
    let packet = packet().ok_or(Counter::DropNoScratch)?;
    if let Err(counter) = parse_into::<L2>(ctx, &mut packet.flow, &mut packet.key) {
        return Ok((Verdict::Pass(counter), &packet.flow));
    }
    let packet: &'static Packet = packet;
    Ok((try_run(ctx, packet, side)?, &packet.flow))
}

/// Not inlined: its frame sits beside the entry point's, and the deepest
/// chain (a new flow searching a SNAT port) must fit 512 bytes.
#[inline(never)]
fn try_run(ctx: &TcContext, packet: &Packet, side: Side) -> Outcome {
    let flow = &packet.flow;
    if flow.is_icmp() {
        // Two BPF functions, dispatched here: see `translate_error_v6`.
        return if flow.is_ipv6() { icmp::translate_error_v6(ctx, flow) } else { icmp::translate_error(ctx, flow) };
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
        conntrack::kill(key, found.ct, found.assured, ifindex(ctx))?;
    }
    match new_flow(ctx, flow, key, side)? {
        NewFlow::Verdict(verdict) => Ok(verdict),
        // Another CPU created this flow a moment ago: follow its entry.
        NewFlow::Join => match conntrack::lookup(key) {
            Some(found) => {
                count(ifindex(ctx), Counter::CtRaceJoined);
                established(ctx, flow, key, &found)
            }
            None => Err(Counter::DropCtRace),
        },
    }
}
