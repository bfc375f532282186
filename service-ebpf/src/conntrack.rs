//! The two conntrack tables and what the packet path does with them.
//!
//! A flow has two entries, its original tuple (client → frontend) and its
//! reply tuple (backend → client, or → this node's SNAT address and port),
//! always in the same table: `conntrack_new` while the flow is not assured,
//! `conntrack` once it is (TCP: the client acknowledged the SYN-ACK; UDP: a
//! reply came). A flood of unanswered SYNs or datagrams therefore only
//! evicts its own kind, never an assured flow (netfilter's rule). The state
//! machine and timeouts are `service_common::conntrack`, shared with the
//! agent's garbage collector.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed by reference so they are not copied again on the 512-byte BPF stack"
)]

use core::ffi::c_void;

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_loop};
use service_common::{
    CtKey, CtValue, Port,
    conntrack::{is_free, next_state, peer_key, state, timeouts},
    ct_flags,
    stats::Counter,
};

use crate::{
    maps::{CONNTRACK, CONNTRACK_NEW, count},
    scratch::{Scratch, scratch},
};

/// A flow's entry and the table it is in.
pub struct Found {
    pub ct: *mut CtValue,
    /// In `conntrack` (assured), not `conntrack_new`.
    pub assured: bool,
}

/// The entry for `key`, the assured table first.
#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<Found> {
    if let Some(ct) = CONNTRACK.get_ptr_mut(key) {
        return Some(Found { ct, assured: true });
    }
    CONNTRACK_NEW.get_ptr_mut(key).map(|ct| Found { ct, assured: false })
}

#[inline(always)]
fn remove(key: &CtKey, assured: bool) {
    // Absent already (a racing CPU, the LRU) is as good as removed.
    let _ = if assured { CONNTRACK.remove(key) } else { CONNTRACK_NEW.remove(key) };
}

/// Removes a dead flow (expired, or closed and its tuple wanted again):
/// the entry and its peer (counted for interface `ifindex`). Not inlined:
/// a rare path.
#[inline(never)]
pub fn kill(key: &CtKey, ct: *const CtValue, assured: bool, ifindex: u32) -> Result<(), Counter> {
    let s = scratch()?;
    // SAFETY: a valid map value pointer; plain data.
    s.peer_key = peer_key(key, unsafe { &*ct });
    remove(&s.peer_key, assured);
    remove(key, assured);
    count(ifindex, Counter::CtReplaced);
    Ok(())
}

/// Follows a packet of a known flow through the state machine: a state
/// change is written to both entries (and an assured flow moves to the
/// assured table); otherwise the last-seen stamp of both is refreshed at
/// most once per [`timeouts::REFRESH_NS`], so the pair expires together.
/// A flow made assured is counted for interface `ifindex`.
#[inline(always)]
pub fn track(
    key: &CtKey,
    ct: *mut CtValue,
    assured: bool,
    tcp_flags: u8,
    now: u64,
    ifindex: u32,
) -> Result<(), Counter> {
    // SAFETY: a valid map value pointer from a successful lookup; racing
    // writers store the same kind of plain values.
    let entry = unsafe { &mut *ct };
    let original = entry.flags & ct_flags::DNAT != 0;
    let next = next_state(key.proto, entry.state, original, tcp_flags);
    if next == entry.state && now.saturating_sub(entry.last_seen_ns) <= timeouts::REFRESH_NS {
        return Ok(());
    }
    update_pair(key, ct, u32::from(next) | (u32::from(assured) << 8), now, ifindex)
}

/// Not inlined: once a second per flow, or on a state change. The new
/// state and the table share one argument (a BPF function takes five;
/// the Result comes back in a register).
#[inline(never)]
fn update_pair(key: &CtKey, ct: *mut CtValue, next_and_table: u32, now: u64, ifindex: u32) -> Result<(), Counter> {
    #[expect(clippy::cast_possible_truncation, reason = "the state is the low byte")]
    let next = next_and_table as u8;
    let assured = next_and_table >> 8 != 0;
    // SAFETY: as in `track`.
    let entry = unsafe { &mut *ct };
    entry.state = next;
    entry.last_seen_ns = now;
    let s = scratch()?;
    s.peer_key = peer_key(key, entry);
    let peer = if assured { CONNTRACK.get_ptr_mut(&s.peer_key) } else { CONNTRACK_NEW.get_ptr_mut(&s.peer_key) };
    if let Some(peer) = peer {
        // SAFETY: a valid map value pointer; plain data.
        unsafe {
            (*peer).state = next;
            (*peer).last_seen_ns = now;
        }
    }
    if !assured && next & state::ASSURED != 0 {
        // Assured: into the table floods cannot evict, then out of the
        // new-flow table. In between both tables hold it; lookups try the
        // assured table first, so every packet sees one consistent entry.
        // SAFETY: map value pointers from successful lookups.
        CONNTRACK.insert(key, unsafe { &*ct }, 0).map_err(|_| Counter::DropCtInsert)?;
        if let Some(peer) = peer {
            // SAFETY: as above.
            CONNTRACK.insert(&s.peer_key, unsafe { &*peer }, 0).map_err(|_| Counter::DropCtInsert)?;
        }
        remove(&s.peer_key, false);
        remove(key, false);
        count(ifindex, Counter::CtAssured);
    }
    Ok(())
}

/// Claims `s.reply_key` for the new flow whose reply entry is `s.reply`:
/// inserted into `conntrack_new` unless a live flow holds that tuple in
/// either table. A holder that expired or closed is removed with its peer
/// (its tuple and SNAT port are free at once).
#[inline(always)]
fn claim(s: &mut Scratch, now: u64) -> bool {
    let proto = s.reply_key.proto;
    if CONNTRACK_NEW.insert(&s.reply_key, &s.reply, u64::from(BPF_NOEXIST)).is_err() {
        let Some(held) = CONNTRACK_NEW.get_ptr(&s.reply_key) else { return false };
        // SAFETY: a valid map value pointer; plain data.
        let held = unsafe { &*held };
        if !is_free(held, proto, now) {
            return false;
        }
        s.peer_key = peer_key(&s.reply_key, held);
        remove(&s.peer_key, false);
        remove(&s.reply_key, false);
        if CONNTRACK_NEW.insert(&s.reply_key, &s.reply, u64::from(BPF_NOEXIST)).is_err() {
            return false;
        }
    }
    // Checked after the insert: a flow being made assured is inserted in
    // `conntrack` before it leaves `conntrack_new`, so it is seen here.
    if let Some(held) = CONNTRACK.get_ptr(&s.reply_key) {
        // SAFETY: a valid map value pointer; plain data.
        let held = unsafe { &*held };
        if !is_free(held, proto, now) {
            remove(&s.reply_key, false);
            return false;
        }
        s.peer_key = peer_key(&s.reply_key, held);
        remove(&s.peer_key, true);
        remove(&s.reply_key, true);
    }
    true
}

/// Claims the reply tuple as it is (no source translation needed).
#[inline(never)]
pub fn claim_reply(now: u64) -> Result<bool, Counter> {
    Ok(claim(scratch()?, now))
}

/// What the port search's callback needs; lives on the caller's stack.
#[repr(C)]
struct PortSearch {
    now: u64,
    start: u32,
    span: u32,
    min: u32,
    port: u32,
    found: u32,
    /// Set when this CPU's scratch slot could not be looked up: the search
    /// stopped for that, not for want of a free port.
    no_scratch: u32,
}

/// One candidate of the port search: `min + (start + i) % span`.
extern "C" fn try_port(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop hands back the PortSearch pointer `claim_port`
    // passed, which lives in that caller's frame for the whole loop.
    let search = unsafe { &mut *ctx.cast::<PortSearch>() };
    let Ok(s) = scratch() else {
        search.no_scratch = 1;
        return 1;
    };
    #[expect(clippy::cast_possible_truncation, reason = "i < span <= 65536")]
    let offset = (search.start.wrapping_add(i as u32)) % search.span.max(1);
    let port = search.min + offset;
    #[expect(clippy::cast_possible_truncation, reason = "min + offset <= 65535")]
    let be = (port as u16).to_be_bytes();
    s.reply_key.dport = be;
    if claim(s, search.now) {
        search.port = port;
        search.found = 1;
        return 1;
    }
    0
}

/// Finds a source port in `min..=max` for the new flow in scratch (reply
/// entry `reply`, reply key `reply_key` with its destination address set)
/// and claims its reply tuple. Every port of the range is tried, starting
/// at a flow-hashed one, so allocation succeeds while any port is free for
/// this (address, backend address, backend port, protocol).
#[inline(never)]
pub fn claim_port(min: u16, max: u16, start: u32, now: u64) -> Result<Port, Counter> {
    let span = u32::from(max - min) + 1;
    let mut search = PortSearch { now, start, span, min: u32::from(min), port: 0, found: 0, no_scratch: 0 };
    // SAFETY: the callback and its context follow bpf_loop's contract (the
    // verifier checks the callback); the context is this frame's.
    unsafe {
        bpf_loop(span, try_port as *const () as *mut c_void, (&raw mut search).cast::<c_void>(), 0);
    }
    if search.no_scratch != 0 {
        return Err(Counter::DropNoScratch);
    }
    if search.found == 0 {
        return Err(Counter::DropSnatNoPort);
    }
    #[expect(clippy::cast_possible_truncation, reason = "a port found in min..=max")]
    Ok((search.port as u16).to_be_bytes())
}
