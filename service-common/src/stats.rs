//! The one table of verdict and drop-reason counters. The eBPF programs
//! increment `stats[id]` (a per-CPU array, so no shared writes), and for
//! every counter not marked `fast` also the `interface_stats` row of the
//! interface the packet entered on; the agent and `inspect` read them by
//! the same ids and names.
//!
//! Each row: `Name = id, "name"` and its markers: `drop` (the packet is
//! dropped, or refused with an answer: [`is_drop`]), `fast` (counted for
//! every packet of an established flow or of traffic that is not a
//! Service's: kept out of `interface_stats`, so the fast path pays no hash
//! lookup: [`per_interface`]).

/// Whether `$want` is among the markers that follow the `;`.
macro_rules! marked {
    ($want:ident;) => { false };
    (drop; drop $($rest:ident)*) => { true };
    (fast; fast $($rest:ident)*) => { true };
    ($want:ident; $other:ident $($rest:ident)*) => { marked!($want; $($rest)*) };
}

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident = $id:literal, $label:literal $(, $marker:ident)*; )*) => {
        /// A counter id: the `stats` map's index, the `counter` of an
        /// `interface_stats` key.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Counter {
            $( $(#[$doc])* $name = $id, )*
        }
        /// Number of counters (the `stats` map's size).
        pub const COUNT: u32 = 0 $( + { let _ = $id; 1 } )*;
        /// `(id, name)` for every counter, in id order.
        pub const ALL: [(u32, &str); COUNT as usize] = [ $( ($id, $label), )* ];

        impl Counter {
            /// Every counter, in id order.
            pub const ALL: [Counter; COUNT as usize] = [ $( Counter::$name, )* ];

            /// The counter of id `id`.
            #[must_use]
            pub const fn from_id(id: u32) -> Option<Self> {
                match id {
                    $( $id => Some(Counter::$name), )*
                    _ => None,
                }
            }

            /// The name the agent's metrics and `inspect` show.
            #[must_use]
            pub const fn name(self) -> &'static str {
                match self {
                    $( Counter::$name => $label, )*
                }
            }

            /// Whether this counter counts dropped (or refused) packets.
            #[must_use]
            pub const fn is_drop(self) -> bool {
                match self {
                    $( Counter::$name => marked!(drop; $($marker)*), )*
                }
            }

            /// Whether the programs also count it per ingress interface
            /// (`interface_stats`): every counter but the fast path's.
            #[must_use]
            pub const fn per_interface(self) -> bool {
                match self {
                    $( Counter::$name => !marked!(fast; $($marker)*), )*
                }
            }
        }
    };
}

impl Counter {
    /// The counter's id (its `stats` index).
    #[must_use]
    pub const fn id(self) -> u32 {
        self as u32
    }
}

/// Whether counter `id` counts dropped packets (false for an unknown id).
#[must_use]
pub const fn is_drop(id: u32) -> bool {
    match Counter::from_id(id) {
        Some(c) => c.is_drop(),
        None => false,
    }
}

/// Whether counter `id` is also counted per interface (false for an
/// unknown id).
#[must_use]
pub const fn per_interface(id: u32) -> bool {
    match Counter::from_id(id) {
        Some(c) => c.per_interface(),
        None => false,
    }
}

counters! {
    /// Neither IPv4 nor IPv6 (ARP, ...): passed untouched.
    PassNotIp = 0, "pass_not_ip", fast;
    /// IP but neither TCP, UDP, SCTP nor an ICMP/ICMPv6 error (ICMPv6
    /// neighbour discovery and router advertisements among them): passed
    /// untouched.
    PassOtherProto = 1, "pass_other_proto", fast;
    /// A later IP fragment whose first fragment did not pass here (not a
    /// Service flow, or it overtook its first fragment): passed untouched.
    PassFragment = 2, "pass_fragment", fast;
    /// Too short or malformed headers: passed untouched for the stack to judge.
    PassMalformed = 3, "pass_malformed", fast;
    /// No conntrack entry and no Service frontend: passed untouched.
    PassNoService = 4, "pass_no_service", fast;
    /// First packet of a flow to a Service: backend chosen, DNATed.
    DnatNew = 5, "dnat_new_flow";
    /// Later packet of a known flow: DNATed to its conntrack backend.
    DnatEstablished = 6, "dnat_established", fast;
    /// Reply from a backend: source restored to the Service frontend.
    RevNat = 7, "rev_nat_reply", fast;
    /// Dropped: the Service has no usable endpoint.
    DropNoBackend = 8, "drop_no_backend", drop;
    /// Dropped: the slot or backend row a frontend points at is missing
    /// (should not happen: the agent writes them before the frontend).
    DropMissingRow = 9, "drop_missing_row", drop;
    /// Dropped: a conntrack entry could not be inserted (`bpf_map_update_elem`
    /// failed for another reason than an existing entry): a new flow's
    /// original entry, or an assured flow's entries moved to `conntrack`.
    DropCtInsert = 10, "drop_ct_insert", drop;
    /// Dropped: `bpf_l3_csum_replace` failed to update the IP header
    /// checksum for a rewritten address or the redirect path's TTL.
    /// (Id 11 was `drop_rewrite`, the catch-all of every rewrite stage.)
    DropL3Csum = 11, "drop_l3_csum", drop;
    /// Dropped: two CPUs created the same flow at once and the loser could
    /// not find the winner's entry (it was removed in between).
    DropCtRace = 12, "drop_ct_race", drop;
    /// Rejected with a TCP RST: the Service has no usable endpoint.
    RejectTcpRst = 13, "reject_tcp_rst", drop;
    /// Rejected with ICMP port unreachable: the Service has no usable
    /// endpoint (UDP, SCTP).
    RejectIcmpUnreachable = 14, "reject_icmp_unreachable", drop;
    /// Dropped: a `Local` traffic policy leaves no endpoint on this node.
    DropNoLocalBackend = 15, "drop_no_local_backend", drop;
    /// Dropped: SCTP to a backend on another port (SCTP's CRC32c cannot be
    /// updated incrementally; the model reports such Services).
    DropSctpPortTranslation = 16, "drop_sctp_port_translation", drop;
    /// Affinity: a new flow followed its client's earlier backend.
    AffinityHit = 17, "affinity_hit";
    /// Dropped: the source is outside the Service's
    /// `loadBalancerSourceRanges`.
    DropSourceRange = 18, "drop_source_range", drop;
    /// Dropped: every SNAT source port (or, for a clash, every remap port)
    /// towards the backend is held by a live flow: a new TCP/UDP flow to a
    /// backend on another node, a hairpin, or a clashing reply tuple.
    DropSnatNoPort = 19, "drop_snat_no_port", drop;
    /// Dropped: the flow needs SNAT but the agent has written no address
    /// for the interface (`snat_addrs`).
    DropSnatNoAddress = 20, "drop_snat_no_address", drop;
    /// A new flow was also SNATed (backend on another node, or hairpin).
    SnatNew = 21, "snat_new_flow";
    /// An ICMP error about a translated flow was translated for its peer.
    IcmpErrorTranslated = 22, "icmp_error_translated";
    /// A later IP fragment translated with its first fragment's flow.
    FragmentTranslated = 23, "fragment_translated", fast;
    /// A new flow replaced the expired or closed flow that held its tuple
    /// (a SYN on a closing connection's ports starts afresh).
    CtReplaced = 24, "conntrack_replaced";
    /// A flow became assured (TCP handshake completed, UDP answered) and
    /// moved to the table a flood of new flows cannot evict.
    CtAssured = 25, "conntrack_assured";
    /// A new flow's reply tuple was held by another live flow: its source
    /// port was remapped (netfilter's implicit source NAT).
    NatClashRemapped = 26, "nat_clash_remapped";
    /// Two CPUs created the same flow at once: this packet joined the
    /// winner's flow (same backend, same SNAT port).
    CtRaceJoined = 27, "conntrack_race_joined";
    /// Dropped: too big for the egress interface's MTU on the redirect
    /// path; answered with ICMP fragmentation needed (the kernel's answer),
    /// or unanswered when the stack would not answer either (no DF, an
    /// ICMP error, a later fragment).
    DropFragNeeded = 28, "drop_frag_needed", drop;
    /// Dropped: the TTL ran out on the redirect path; answered with ICMP
    /// time exceeded (unanswered for an ICMP error or a later fragment).
    DropTtlExceeded = 29, "drop_ttl_exceeded", drop;
    /// Dropped: too big or TTL exhausted on the redirect path, and
    /// unanswered because the packet carries IP options (the answer quotes
    /// a 20-byte header). Helper failures while building the answer count
    /// as their stage (`drop_load`, `drop_resize`, `drop_store`).
    DropIcmpAnswer = 30, "drop_icmp_answer", drop;
    /// Dropped: this CPU's per-CPU scratch or packet slot could not be
    /// looked up (should not happen: the arrays are preallocated).
    DropNoScratch = 31, "drop_no_scratch", drop;
    /// Dropped: `bpf_l4_csum_replace` failed to update the TCP/UDP
    /// checksum for a rewritten address or port.
    DropL4Csum = 32, "drop_l4_csum", drop;
    /// Dropped: `bpf_skb_store_bytes` failed to write a rewritten address,
    /// port or TTL, an ICMP error's outer header, or a reject or ICMP
    /// answer into the packet.
    DropStore = 33, "drop_store", drop;
    /// Dropped: `bpf_skb_load_bytes` failed to read header bytes an answer
    /// or the FIB path needs (a reject's RST needs the whole 20-byte TCP
    /// header, which the parse only reads up to its checksum; the ICMP
    /// answers' quote, the FIB path's addresses, an ICMP error's outer
    /// checksum).
    DropLoad = 34, "drop_load", drop;
    /// Dropped: `bpf_skb_change_tail` (sizing a reject or ICMP answer) or
    /// `bpf_skb_change_head` (the MAC header room an L3 ingress needs
    /// before `bpf_redirect_neigh`) failed.
    DropResize = 35, "drop_resize", drop;
    /// Dropped: rewriting the packet quoted inside an ICMP error (its
    /// addresses, ports, checksums, and the ICMP checksum) failed
    /// (`bpf_skb_load_bytes`/`bpf_skb_store_bytes`).
    DropIcmpQuote = 36, "drop_icmp_quote", drop;
    /// Dropped: a packet whose new source is a node address has no route
    /// to forward it by (`bpf_fib_lookup` returned neither success, "no
    /// neighbour" nor "fragmentation needed": blackhole, unreachable,
    /// prohibited, not forwarded, forwarding disabled). The stack would
    /// drop it as a martian.
    DropNoRoute = 37, "drop_no_route", drop;
    /// Dropped: the kernel refused a redirect (`bpf_redirect_neigh` or
    /// `bpf_redirect` returned `TC_ACT_SHOT`): a forwarded packet, or a
    /// reject or ICMP answer sent back.
    DropRedirectRefused = 38, "drop_redirect_refused", drop;
    /// Dropped: a new flow to a Service without endpoints (REJECT) that is
    /// not answered: an incoming TCP RST (RFC 793 never answers one) or a
    /// datagram with IP options (the port unreachable quotes a 20-byte
    /// header).
    DropRejectUnanswered = 39, "drop_reject_unanswered", drop;
    /// Dropped: a new SCTP flow whose reply tuple (with the client's own
    /// port: SCTP's ports are never translated) is held by a live flow,
    /// through SNAT or clashing with another Service's flow to the same
    /// backend.
    DropSctpTupleTaken = 40, "drop_sctp_tuple_taken", drop;
    /// Dropped: a new flow to an address of a service CIDR
    /// (`--service-cluster-ip-range`) that no Service has, as kube-proxy's
    /// nftables mode drops it. (A ClusterIP's unserved port is rejected.)
    DropUnallocatedServiceIp = 41, "drop_unallocated_service_ip", drop;
    /// Socket-level load balancing: a connect() to a Service address went
    /// to a backend instead (the socket's packets need no translation).
    SockConnect = 42, "sock_connect", fast;
    /// Socket-level load balancing: a datagram sent to a Service address
    /// (sendmsg() on an unconnected UDP socket) went to a backend instead.
    SockSendmsg = 43, "sock_sendmsg", fast;
    /// Socket-level load balancing: recvmsg() or getpeername() showed the
    /// Service address instead of the backend's.
    SockRevNat = 44, "sock_rev_nat", fast;
    /// Socket-level load balancing: a connect() or sendmsg() failed at
    /// once: to a Service without endpoints, or to a ClusterIP's unserved
    /// port (ECONNREFUSED, as kube-proxy's reject makes it fail), or to an
    /// unallocated address of a service CIDR (ENETUNREACH, where kube-proxy
    /// drops). (No packet was dropped: no packet was sent. The
    /// socket counters have no interface, so none has an
    /// `interface_stats` row.)
    SockRefused = 45, "sock_refused", fast;
    /// IPv6 whose extension headers the parse does not walk to the end
    /// (more than `flow::MAX_EXTENSION_HEADERS`, or ESP, whose payload is
    /// encrypted): passed untouched.
    PassExtensionHeaders = 46, "pass_ipv6_extension_headers", fast;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_dense_and_in_order() {
        for (i, (id, name)) in ALL.iter().enumerate() {
            assert_eq!(*id as usize, i, "{name}");
        }
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.id() as usize, i, "{}", c.name());
            assert_eq!(Counter::from_id(c.id()), Some(*c));
            assert_eq!(ALL[i].1, c.name());
        }
        assert_eq!(Counter::from_id(COUNT), None);
    }

    #[test]
    fn names_are_unique() {
        for (i, (_, a)) in ALL.iter().enumerate() {
            for (_, b) in &ALL[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn drop_and_per_interface_markers() {
        for c in Counter::ALL {
            assert_eq!(is_drop(c.id()), c.is_drop());
            assert_eq!(per_interface(c.id()), c.per_interface());
            // Every drop reason is counted per interface.
            assert!(!c.is_drop() || c.per_interface(), "{}", c.name());
            if c.name().starts_with("drop_") || c.name().starts_with("reject_") {
                assert!(c.is_drop(), "{}", c.name());
            }
        }
        let fast: [Counter; 13] = [
            Counter::PassNotIp,
            Counter::PassOtherProto,
            Counter::PassFragment,
            Counter::PassMalformed,
            Counter::PassNoService,
            Counter::DnatEstablished,
            Counter::RevNat,
            Counter::FragmentTranslated,
            // The socket-level programs': no interface.
            Counter::SockConnect,
            Counter::SockSendmsg,
            Counter::SockRevNat,
            Counter::SockRefused,
            Counter::PassExtensionHeaders,
        ];
        for c in Counter::ALL {
            assert_eq!(c.per_interface(), !fast.contains(&c), "{}", c.name());
        }
        assert!(!is_drop(COUNT) && !per_interface(COUNT));
    }

    #[test]
    fn the_result_of_a_counter_is_one_register() {
        // Inner BPF functions return `Result<_, Counter>`: a 4-byte id.
        assert_eq!(size_of::<Counter>(), 4);
        assert!(size_of::<Result<(), Counter>>() <= 8);
    }
}
