//! Reading a frontend's backend table in `backend_slots`: the packet path
//! ([`crate::nat`]) and the socket path ([`crate::socket`]) choose backends
//! through these two functions only.
//!
//! A table starts at block [`ServiceValue::table`] and holds, position
//! after position (`backend_slots::locate`), the frontend's `count` Maglev
//! slots, then its `members` backend ids in ascending order. One table
//! serves every frontend with the same backend set (a Service port's
//! ClusterIP, NodePorts, LoadBalancer IPs, external IPs), and the agent
//! never writes a table in place: a changed set is written into free
//! blocks, then the frontend rows are switched to it, and the old blocks
//! are reused only a grace period after the last frontend left them. A
//! packet that read a frontend row therefore reads that row's table whole,
//! old or new, never a mix, with no version to check.

use core::ffi::c_void;

use aya_ebpf::helpers::bpf_loop;
use service_common::{
    ServiceValue,
    backend_slots::{PER_BLOCK, SEARCH_STEPS, locate},
};

use crate::maps::BACKEND_SLOTS;

/// A lane index made visibly in bounds: the verifier sees `[0, 15]` (and
/// the compiler drops the bounds check) whatever `locate` was compiled to.
const LANE_MASK: usize = PER_BLOCK as usize - 1;

/// The backend id at position `pos` of the table starting at block
/// `table` (0 where nothing was written; `None` past the array's end).
#[inline(always)]
fn id_at(table: u32, pos: u32) -> Option<u32> {
    let (block, lane) = locate(table, pos);
    BACKEND_SLOTS.get(block).map(|b| b.ids[lane & LANE_MASK])
}

/// The backend id in Maglev slot `slot` (1-based, `hash::slot_for`) of a
/// table of `count` slots starting at block `table`. `None` for a slot
/// outside the table, a block the array does not have, or an unset id (0):
/// each a row the agent should have written (`drop_missing_row`).
#[inline(always)]
pub fn slot_backend(table: u32, count: u32, slot: u32) -> Option<u32> {
    // Slot 0 wraps to u32::MAX: one comparison rejects both ends.
    let pos = slot.wrapping_sub(1);
    if pos >= count {
        return None;
    }
    id_at(table, pos).filter(|id| *id != 0)
}

/// What one step of the member search needs; lives on [`is_member`]'s
/// stack for the whole loop. The search state proper is `lo` and `n`; the
/// rest is read only (`found` is the answer).
#[repr(C)]
struct MemberSearch {
    table: u32,
    /// The position of the first member: the table's slot count.
    base: u32,
    backend_id: u32,
    /// The first position (relative to `base`) still searched.
    lo: u32,
    /// How many positions from `lo` are still searched.
    n: u32,
    found: u32,
}

/// `bpf_loop` callback verdicts.
const CONTINUE: i64 = 0;
const STOP: i64 = 1;

/// One step of the binary search: reads the middle id of what is left
/// and keeps the half that can hold `backend_id`, so `n` becomes `n / 2`
/// or `n - n / 2 - 1`: at least halved.
extern "C" fn member_step(_i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop hands back the MemberSearch pointer `is_member`
    // passed, which lives in that caller's frame for the whole loop.
    let s = unsafe { &mut *ctx.cast::<MemberSearch>() };
    let n = s.n;
    if n == 0 {
        return STOP;
    }
    let half = n / 2;
    let mid = s.lo.wrapping_add(half);
    let Some(id) = id_at(s.table, s.base.wrapping_add(mid)) else { return STOP };
    if id == s.backend_id {
        s.found = 1;
        return STOP;
    }
    if id < s.backend_id {
        s.lo = mid.wrapping_add(1);
        s.n = n - half - 1;
    } else {
        s.n = half;
    }
    CONTINUE
}

/// Whether `backend_id` is in the frontend's backend set: a binary search
/// of the member list (positions `count..count + members`, ascending),
/// one array lookup per step.
///
/// The steps run under `bpf_loop` with at most [`SEARCH_STEPS`]
/// iterations, which empty any list shorter than 2^20 (the agent writes at
/// most 524,287 members); a longer list is only searched in part, which
/// can answer "not a member" (the caller then falls back to the Maglev
/// table), never name a backend outside the set. Not an open-coded loop:
/// its two-way branch per step made the verifier (6.18) walk the paths of
/// the 20 steps almost one by one, as it records few states inside a loop
/// it is still exploring (over its million-instruction limit); the
/// callback is checked as one body. Not inlined either: the search's
/// context stays off the callers' frames (in the packet path, under
/// `new_flow`'s).
#[inline(never)]
pub fn is_member(value: &ServiceValue, backend_id: u32) -> bool {
    // Id 0 is never a backend: an unset lane must not match it.
    if backend_id == 0 {
        return false;
    }
    let mut search =
        MemberSearch { table: value.table, base: value.count, backend_id, lo: 0, n: value.members, found: 0 };
    // SAFETY: the callback and its context follow bpf_loop's contract (the
    // verifier checks the callback); the context is this frame's.
    unsafe {
        bpf_loop(SEARCH_STEPS, member_step as *const () as *mut c_void, (&raw mut search).cast::<c_void>(), 0);
    }
    search.found != 0
}
