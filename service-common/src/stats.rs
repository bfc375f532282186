//! The one table of verdict and drop-reason counters. The eBPF programs
//! increment `stats[id]` (a per-CPU array, so no shared writes); the agent and
//! `inspect` read them by the same ids and names.

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident = $id:literal, $label:literal; )*) => {
        $( $(#[$doc])* pub const $name: u32 = $id; )*
        /// Number of counters (the `stats` map's size).
        pub const COUNT: u32 = 0 $( + { let _ = $id; 1 } )*;
        /// `(id, name)` for every counter, in id order.
        pub const ALL: [(u32, &str); COUNT as usize] = [ $( ($id, $label), )* ];
    };
}

counters! {
    /// Not IPv4 (ARP, IPv6, ...): passed untouched.
    PASS_NOT_IPV4 = 0, "pass_not_ipv4";
    /// IPv4 but neither TCP nor UDP: passed untouched.
    PASS_OTHER_PROTO = 1, "pass_other_proto";
    /// A later IP fragment whose first fragment did not pass here (not a
    /// Service flow, or it overtook its first fragment): passed untouched.
    PASS_FRAGMENT = 2, "pass_fragment";
    /// Too short or malformed headers: passed untouched for the stack to judge.
    PASS_MALFORMED = 3, "pass_malformed";
    /// No conntrack entry and no Service frontend: passed untouched.
    PASS_NO_SERVICE = 4, "pass_no_service";
    /// First packet of a flow to a Service: backend chosen, DNATed.
    DNAT_NEW = 5, "dnat_new_flow";
    /// Later packet of a known flow: DNATed to its conntrack backend.
    DNAT_ESTABLISHED = 6, "dnat_established";
    /// Reply from a backend: source restored to the Service frontend.
    REV_NAT = 7, "rev_nat_reply";
    /// Dropped: the Service has no usable endpoint.
    DROP_NO_BACKEND = 8, "drop_no_backend";
    /// Dropped: the slot or backend row a frontend points at is missing
    /// (should not happen: the agent writes them before the frontend).
    DROP_MISSING_ROW = 9, "drop_missing_row";
    /// Dropped: the conntrack entry could not be created.
    DROP_CT_INSERT = 10, "drop_ct_insert";
    /// Dropped: a kernel helper failed to rewrite the packet.
    DROP_REWRITE = 11, "drop_rewrite";
    /// Dropped: two CPUs created the same flow at once and the loser could
    /// not find the winner's entry (it was removed in between).
    DROP_CT_RACE = 12, "drop_ct_race";
    /// Rejected with a TCP RST: the Service has no usable endpoint.
    REJECT_TCP_RST = 13, "reject_tcp_rst";
    /// Rejected with ICMP port unreachable: the Service has no usable
    /// endpoint (UDP, SCTP).
    REJECT_ICMP_UNREACHABLE = 14, "reject_icmp_unreachable";
    /// Dropped: a `Local` traffic policy leaves no endpoint on this node.
    DROP_NO_LOCAL_BACKEND = 15, "drop_no_local_backend";
    /// Dropped: SCTP to a backend on another port (SCTP's CRC32c cannot be
    /// updated incrementally; the model reports such Services).
    DROP_SCTP_PORT_TRANSLATION = 16, "drop_sctp_port_translation";
    /// Affinity: a new flow followed its client's earlier backend.
    AFFINITY_HIT = 17, "affinity_hit";
    /// Dropped: the source is outside the Service's
    /// `loadBalancerSourceRanges`.
    DROP_SOURCE_RANGE = 18, "drop_source_range";
    /// Dropped: no free SNAT source port for a new flow to a backend on
    /// another node (or a hairpin).
    DROP_SNAT_NO_PORT = 19, "drop_snat_no_port";
    /// Dropped: the flow needs SNAT but the agent has written no address
    /// for the interface (`snat_addrs`).
    DROP_SNAT_NO_ADDRESS = 20, "drop_snat_no_address";
    /// A new flow was also SNATed (backend on another node, or hairpin).
    SNAT_NEW = 21, "snat_new_flow";
    /// An ICMP error about a translated flow was translated for its peer.
    ICMP_ERROR_TRANSLATED = 22, "icmp_error_translated";
    /// A later IP fragment translated with its first fragment's flow.
    FRAGMENT_TRANSLATED = 23, "fragment_translated";
    /// A new flow replaced the expired or closed flow that held its tuple
    /// (a SYN on a closing connection's ports starts afresh).
    CT_REPLACED = 24, "conntrack_replaced";
    /// A flow became assured (TCP handshake completed, UDP answered) and
    /// moved to the table a flood of new flows cannot evict.
    CT_ASSURED = 25, "conntrack_assured";
    /// A new flow's reply tuple was held by another live flow: its source
    /// port was remapped (netfilter's implicit source NAT).
    NAT_CLASH_REMAPPED = 26, "nat_clash_remapped";
    /// Two CPUs created the same flow at once: this packet joined the
    /// winner's flow (same backend, same SNAT port).
    CT_RACE_JOINED = 27, "conntrack_race_joined";
    /// Dropped: too big for the egress interface's MTU on the redirect
    /// path; answered with ICMP fragmentation needed (the kernel's answer).
    DROP_FRAG_NEEDED = 28, "drop_frag_needed";
    /// Dropped: the TTL ran out on the redirect path; answered with ICMP
    /// time exceeded.
    DROP_TTL_EXCEEDED = 29, "drop_ttl_exceeded";
    /// Dropped: too big or TTL exhausted on the redirect path, and the
    /// ICMP answer could not be built (IP options, helper failure).
    DROP_ICMP_ANSWER = 30, "drop_icmp_answer";
    /// Dropped: this CPU's per-CPU scratch or packet slot could not be
    /// looked up (should not happen: the arrays are preallocated).
    DROP_NO_SCRATCH = 31, "drop_no_scratch";
}

/// Whether counter `id` counts dropped packets.
#[must_use]
pub const fn is_drop(id: u32) -> bool {
    matches!(
        id,
        DROP_NO_BACKEND
            | DROP_MISSING_ROW
            | DROP_CT_INSERT
            | DROP_REWRITE
            | DROP_CT_RACE
            | DROP_FRAG_NEEDED
            | DROP_TTL_EXCEEDED
            | DROP_ICMP_ANSWER
            | DROP_NO_SCRATCH
            | REJECT_TCP_RST
            | REJECT_ICMP_UNREACHABLE
            | DROP_NO_LOCAL_BACKEND
            | DROP_SCTP_PORT_TRANSLATION
            | DROP_SOURCE_RANGE
            | DROP_SNAT_NO_PORT
            | DROP_SNAT_NO_ADDRESS
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_dense_and_in_order() {
        for (i, (id, name)) in ALL.iter().enumerate() {
            assert_eq!(*id as usize, i, "{name}");
        }
    }

    #[test]
    fn names_are_unique() {
        for (i, (_, a)) in ALL.iter().enumerate() {
            for (_, b) in &ALL[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
