//! The pipeline both classifiers run: one parse into [`Flow`], then an ICMP
//! error about a known flow → its translation; conntrack (an existing flow,
//! either direction) → its rewrite; a Service frontend (a new flow) →
//! backend, conntrack, rewrite, or a reject answer; else pass. Packets
//! whose new source is a node address leave by a FIB redirect. Every
//! outcome is a counter id from `service_common::stats`, counted here in
//! one place.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed by reference so they are not copied again on the 512-byte BPF stack"
)]

use aya_ebpf::{bindings::TC_ACT_SHOT, programs::TcContext};
use service_common::{PROTO_ICMP, PROTO_TCP, stats};

use crate::{
    fib,
    flow::{expired, ktime_ns, parse},
    icmp,
    maps::{CONNTRACK, count},
    nat::{NEEDS_REDIRECT, NEEDS_REJECT, Outcome, Side, established, new_flow, pass},
    reject,
};

/// Runs the pipeline; returns the TC action.
#[inline(always)]
pub fn run(ctx: &TcContext, side: Side) -> i32 {
    let (action, counter) = match try_run(ctx, side) {
        Ok((NEEDS_REDIRECT, counter)) => match fib::redirect(ctx, counter) {
            Ok(verdict) => verdict,
            Err(counter) => (TC_ACT_SHOT, counter),
        },
        Ok(verdict) => verdict,
        Err(counter) => (TC_ACT_SHOT, counter),
    };
    count(counter);
    action
}

#[inline(always)]
fn try_run(ctx: &TcContext, side: Side) -> Outcome {
    let flow = match parse(ctx) {
        Ok(flow) => flow,
        Err(pass_counter) => return pass(pass_counter),
    };
    if flow.proto == PROTO_ICMP {
        return icmp::translate_error(ctx, &flow);
    }
    let key = flow.ct_key();
    if let Some(ct) = CONNTRACK.get_ptr_mut(&key) {
        // SAFETY: a valid map value pointer; conntrack values are plain
        // data, a concurrent update gives stale but valid fields.
        if !expired(unsafe { &*ct }, flow.proto, ktime_ns()) {
            return established(ctx, &flow, &key, ct);
        }
    }
    match new_flow(ctx, &flow, &key, side) {
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
