//! Sending a translated packet straight out of the interface the kernel's
//! FIB picks for its destination (`bpf_fib_lookup` + `bpf_redirect_neigh`,
//! which resolves the neighbour and writes the MAC addresses).
//!
//! Needed when the packet's new source is one of this node's own addresses
//! (SNAT, and replies to NodePort clients whose restored source is the node
//! address): the stack's input routing would drop such a packet as a
//! martian (a local source arriving from outside). Everything else keeps
//! the ordinary forwarding path.

use core::{mem::size_of, ptr::null_mut};

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams},
    helpers::{bpf_fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
};

use crate::{
    flow::{IP_DST_OFF, IP_SRC_OFF},
    nat::{Outcome, pass},
};

const AF_INET: u8 = 2;

/// Redirects the (already rewritten) packet towards its destination and
/// counts it as `counter`. When the FIB has no forwarding route for it the
/// packet is left to the stack.
#[inline(never)]
pub fn redirect(ctx: &TcContext, counter: u32) -> Outcome {
    let (Ok(saddr), Ok(daddr)) = (ctx.load::<[u8; 4]>(IP_SRC_OFF), ctx.load::<[u8; 4]>(IP_DST_OFF)) else {
        return pass(counter);
    };
    // SAFETY: bpf_fib_lookup is plain data (integers, arrays, unions of
    // integers); all zeroes is a valid value.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    // SAFETY: reading the receiving interface from the context.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(saddr);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(daddr);
    #[expect(clippy::cast_possible_truncation, clippy::cast_possible_wrap, reason = "64 bytes")]
    let len = size_of::<FibParams>() as i32;
    // SAFETY: params is a valid, writable bpf_fib_lookup of `len` bytes;
    // the context pointer is the program's own.
    let rc = unsafe { bpf_fib_lookup(ctx.skb.skb.cast(), &raw mut params, len, 0) };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) && rc != i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        return pass(counter);
    }
    // SAFETY: no neighbour parameters (the helper looks the next hop up
    // itself); the ifindex comes from the FIB.
    let action = unsafe { bpf_redirect_neigh(params.ifindex, null_mut(), 0, 0) };
    #[expect(clippy::cast_possible_truncation, reason = "TC_ACT_REDIRECT or TC_ACT_SHOT")]
    Ok((action as i32, counter))
}
