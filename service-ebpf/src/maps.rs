//! Every map the programs share, and the counter helpers. Both classifiers
//! see the same maps: a flow translated on a pod interface may have its
//! reply arrive on an external interface, and the other way round.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed by reference so they are not copied again on the 512-byte BPF stack"
)]

use aya_ebpf::bindings::BPF_NOEXIST;
use aya_ebpf::btf_maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap};
use aya_ebpf::macros::btf_map;
use aya_ebpf::programs::TcContext;
/// `BPF_F_MMAPABLE`: the agent writes `backend_slots`' tables through a
/// shared mapping of the array, not a syscall per block.
const MMAPABLE: usize = aya_ebpf::bindings::BPF_F_MMAPABLE as usize;

/// `BPF_F_NO_PREALLOC` for the maps only the agent adds rows to: their
/// memory follows the rows written, not the capacity (a preallocated hash
/// map holds every element of its `max_entries` from creation), and a
/// deleted row is freed after an RCU grace period instead of being reused
/// at once by the next insert while a packet may still read it.
const NO_PREALLOC: usize = aya_ebpf::bindings::BPF_F_NO_PREALLOC as usize;

use service_common::{
    Addr, AffinityKey, AffinityValue, BackendValue, Counters, CtKey, CtValue, FragKey, FragValue, InterfaceCounterKey,
    RevNatValue, ServiceKey, ServiceValue, SlotBlock, SnatAddrKey, SockCounters, SockRevNatKey, SockRevNatValue,
    SocketLbConfig, SourceRangeKey, agent_state, capacity,
    stats::{self, Counter},
};

/// One row per frontend: how to treat its flows and which table of
/// `backend_slots` holds its backends.
#[btf_map(name = "services")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { capacity::SERVICES as usize }, NO_PREALLOC> = HashMap::new();
/// Every backend table (Maglev slots, then the sorted backend set), in
/// blocks of 16 ids (`service_common::backend_slots`); read through
/// [`crate::backend_table`]. A table is shared by the frontends with the
/// same backend set and never rewritten in place (a new one is written
/// into free blocks, then the frontend rows are switched to it), so an
/// array (no per-slot keys, no hashing) is enough.
#[btf_map(name = "backend_slots")]
pub static BACKEND_SLOTS: Array<SlotBlock, { capacity::BACKEND_SLOT_BLOCKS as usize }, MMAPABLE> = Array::new();
#[btf_map(name = "backends")]
pub static BACKENDS: HashMap<u32, BackendValue, { capacity::BACKENDS as usize }, NO_PREALLOC> = HashMap::new();
/// Not read by the programs (conntrack stores the frontend itself); kept in
/// the object so it is created and pinned for the agent and `inspect`.
#[btf_map(name = "rev_nat")]
pub static REV_NAT: HashMap<u32, RevNatValue, { capacity::REV_NAT as usize }, NO_PREALLOC> = HashMap::new();
/// Assured flows (TCP: handshake completed; UDP: answered), both entries
/// of each. Only other assured flows can evict them.
#[btf_map(name = "conntrack")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue, { capacity::CONNTRACK as usize }> = LruHashMap::new();
/// Flows not yet assured, both entries of each, until they are moved to
/// `conntrack`: a flood of unanswered SYNs or UDP evicts only its own kind
/// (netfilter never early-drops an assured flow).
#[btf_map(name = "conntrack_new")]
pub static CONNTRACK_NEW: LruHashMap<CtKey, CtValue, { capacity::CONNTRACK_NEW as usize }> = LruHashMap::new();
/// A first fragment's ports, keyed by its datagram, for the later
/// fragments (which carry none).
#[btf_map(name = "fragments")]
pub static FRAGMENTS: LruHashMap<FragKey, FragValue, { capacity::FRAGMENTS as usize }> = LruHashMap::new();
#[btf_map(name = "stats")]
pub static STATS: PerCpuArray<u64, { stats::COUNT as usize }> = PerCpuArray::new();
/// `loadBalancerSourceRanges` rows, written by the agent.
#[btf_map(name = "source_ranges")]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8, { capacity::SOURCE_RANGES as usize }> = LpmTrie::new();
/// Packets and bytes per frontend (rev-NAT id) and per backend, both
/// directions; per-CPU, so no CPU ever writes another's counters.
#[btf_map(name = "service_counters")]
pub static SERVICE_COUNTERS: PerCpuHashMap<u32, Counters, { capacity::REV_NAT as usize }, NO_PREALLOC> =
    PerCpuHashMap::new();
#[btf_map(name = "backend_counters")]
pub static BACKEND_COUNTERS: PerCpuHashMap<u32, Counters, { capacity::BACKENDS as usize }, NO_PREALLOC> =
    PerCpuHashMap::new();
/// ClientIP session affinity: (client, Service port, protocol) → backend.
#[btf_map(name = "affinity")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { capacity::AFFINITY as usize }> = LruHashMap::new();
/// The node address SNAT writes as the source: per external interface
/// and family (keyed by ifindex and family), and the hairpin address under
/// `service_common::SNAT_HAIRPIN`.
#[btf_map(name = "snat_addrs")]
pub static SNAT_ADDRS: HashMap<SnatAddrKey, Addr, { capacity::SNAT_ADDRS as usize }> = HashMap::new();

/// The agent's bookkeeping (layout versions, next ids); never read here,
/// kept in the object so it is created and pinned with the others.
#[btf_map(name = "agent_state")]
pub static AGENT_STATE: HashMap<agent_state::Key, u64, { agent_state::CAPACITY as usize }> = HashMap::new();

/// The counters of `stats` per ingress interface, for every counter but
/// the fast path's (`Counter::per_interface`). An LRU: rows of interfaces
/// long gone make room for new ones.
#[btf_map(name = "interface_stats")]
pub static INTERFACE_STATS: LruPerCpuHashMap<InterfaceCounterKey, u64, { capacity::INTERFACE_STATS as usize }> =
    LruPerCpuHashMap::new();

/// Socket-level load balancing: (socket cookie, backend) → the Service
/// address the application named, for recvmsg and getpeername.
#[btf_map(name = "sock_rev_nat")]
pub static SOCK_REV_NAT: LruHashMap<SockRevNatKey, SockRevNatValue, { capacity::SOCK_REV_NAT as usize }> =
    LruHashMap::new();
/// Per frontend (rev-NAT id): connect() and sendmsg() calls translated;
/// rows created by the first call (`counter_row`), deleted by the agent
/// with the rev-NAT rows.
#[btf_map(name = "sock_counters")]
pub static SOCK_COUNTERS: PerCpuHashMap<u32, SockCounters, { capacity::REV_NAT as usize }, NO_PREALLOC> =
    PerCpuHashMap::new();
/// Socket-level load balancing's one configuration row (`--socket-lb`).
#[btf_map(name = "socket_lb")]
pub static SOCKET_LB: Array<SocketLbConfig, 1> = Array::new();

/// The interface the packet entered on.
#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: reading a field of the context the kernel handed us.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Adds one to counter `id` (this CPU's copy), and to its row for
/// interface `ifindex` unless it is a fast-path counter (a constant `id`
/// folds the test away).
#[inline(always)]
pub fn count(ifindex: u32, id: Counter) {
    if let Some(counter) = STATS.get_ptr_mut(id as u32) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup,
        // so it is valid and only this CPU writes to it.
        unsafe { *counter += 1 };
    }
    if id.per_interface() {
        count_interface(ifindex, id);
    }
}

/// Adds one to `interface_stats[(ifindex, id)]`, creating the row. Not
/// inlined: the key stays off the callers' frames.
#[inline(never)]
fn count_interface(ifindex: u32, id: Counter) {
    let key = InterfaceCounterKey { ifindex, counter: id as u32 };
    if let Some(row) = INTERFACE_STATS.get_ptr_mut(&key) {
        // SAFETY: a per-CPU value: only this CPU writes it.
        unsafe { *row += 1 };
        return;
    }
    // The interface's first packet of this counter (on any CPU): the row
    // starts at 1 for this CPU (0 for the others). A racing insert of the
    // same row by another CPU makes this one fail with EEXIST: the row is
    // there now, so the lookup is tried once more.
    if INTERFACE_STATS.insert(&key, &1, u64::from(BPF_NOEXIST)).is_err()
        && let Some(row) = INTERFACE_STATS.get_ptr_mut(&key)
    {
        // SAFETY: as above.
        unsafe { *row += 1 };
    }
}

/// This CPU's copy of `map[id]`, the row created (zeroed on every CPU)
/// by the id's first packet when `live` says the id has its row in
/// `backends` / `rev_nat`. The agent writes no counter row when it
/// programs a Service (a per-CPU insert per id made up a quarter of
/// programming 10,000 Services), and deletes an id's row when it frees the
/// id; a packet of an old flow whose id is gone counts nowhere, and the
/// rare row such a packet re-creates between the liveness check and the
/// agent's delete is swept by the agent (`Reconciler::sweep_ids`).
/// A racing insert by another CPU makes this one fail with EEXIST: the
/// row is there, so the lookup is tried once more.
#[inline(always)]
pub fn counter_row<V: Default, const N: usize, const F: usize>(
    map: &PerCpuHashMap<u32, V, N, F>,
    id: u32,
    live: impl FnOnce(u32) -> bool,
) -> Option<*mut V> {
    if let Some(row) = map.get_ptr_mut(&id) {
        return Some(row);
    }
    if !live(id) {
        return None;
    }
    let _ = map.insert(&id, &V::default(), u64::from(BPF_NOEXIST));
    map.get_ptr_mut(&id)
}

/// Whether backend `id` has its row (its counters may be created).
#[inline(always)]
pub fn backend_is_live(id: u32) -> bool {
    BACKENDS.get_ptr(&id).is_some()
}

/// Whether rev-NAT `id` has its row (its counters may be created).
#[inline(always)]
pub fn rev_nat_is_live(id: u32) -> bool {
    REV_NAT.get_ptr(&id).is_some()
}

/// Adds one packet of `len` bytes to `map[id]`.
#[inline(always)]
fn add_counter<const N: usize, const F: usize>(
    map: &PerCpuHashMap<u32, Counters, N, F>,
    id: u32,
    len: u64,
    live: impl FnOnce(u32) -> bool,
) {
    if let Some(c) = counter_row(map, id, live) {
        // SAFETY: a per-CPU value: only this CPU writes it.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
        }
    }
}

/// Counts a translated packet for its frontend and backend. Not inlined,
/// to keep its temporaries off the caller's stack frame.
#[inline(never)]
pub fn count_flow(ctx: &TcContext, rev_nat_id: u32, backend_id: u32) {
    let len = u64::from(ctx.len());
    add_counter(&SERVICE_COUNTERS, rev_nat_id, len, rev_nat_is_live);
    add_counter(&BACKEND_COUNTERS, backend_id, len, backend_is_live);
}
