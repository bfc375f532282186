//! Per-CPU room for what a packet's translation builds (the frontend key
//! and row, the two conntrack entries of a new flow, a peer entry's key,
//! the FIB lookup's parameters), kept off the 512-byte stack.

use aya_ebpf::{bindings::bpf_fib_lookup as FibParams, btf_maps::PerCpuArray, macros::btf_map};
use service_common::{
    AffinityKey, AffinityValue, BackendValue, CtKey, CtValue, ServiceKey, ServiceValue, stats::Counter,
};

use crate::flow::Flow;

/// The packet being handled, parsed once: its flow description and its
/// conntrack key. In a per-CPU map of its own (not on the stack: the
/// deepest call chain, a new flow searching a SNAT port, needs the room;
/// not in [`Scratch`]: read through shared references while scratch is
/// written).
#[repr(C)]
pub struct Packet {
    pub flow: Flow,
    pub key: CtKey,
}

#[btf_map(name = "packet")]
static PACKET: PerCpuArray<Packet, 1> = PerCpuArray::new();

/// This CPU's packet slot.
#[inline(always)]
pub fn packet() -> Option<&'static mut Packet> {
    let ptr = PACKET.get_ptr_mut(0)?;
    // SAFETY: this CPU's own slot, used by one packet at a time (see
    // `scratch`).
    Some(unsafe { &mut *ptr })
}

#[repr(C)]
pub struct Scratch {
    pub frontend: ServiceKey,
    pub service: ServiceValue,
    pub reply_key: CtKey,
    pub original: CtValue,
    pub reply: CtValue,
    /// A known flow's entry, copied before tracking may free it.
    pub entry: CtValue,
    /// The other entry of a flow whose state changes or that is removed.
    pub peer_key: CtKey,
    pub fib: FibParams,
    /// The backend a new flow got.
    pub backend: BackendValue,
    pub backend_id: u32,
    /// Non-zero when the backend came from the client's affinity entry.
    pub affinity_hit: u32,
    /// Backend choice: the affinity row looked up, then written.
    pub affinity_key: AffinityKey,
    pub affinity: AffinityValue,
    /// An ICMP error being built: IP header, ICMP header, quote.
    pub answer: [u8; 56],
    /// The same for IPv6 (IPv6 header, ICMPv6 header, a 48-byte quote), or
    /// a TCP RST over IPv6.
    pub answer6: [u8; 96],
}

#[btf_map(name = "scratch")]
static SCRATCH: PerCpuArray<Scratch, 1> = PerCpuArray::new();

/// This CPU's scratch space.
#[inline(always)]
pub fn scratch() -> Result<&'static mut Scratch, Counter> {
    let ptr = SCRATCH.get_ptr_mut(0).ok_or(Counter::DropNoScratch)?;
    // SAFETY: this CPU's own slot; a BPF program is not preempted by
    // itself on one CPU, so nothing else uses it while this packet runs.
    Ok(unsafe { &mut *ptr })
}
