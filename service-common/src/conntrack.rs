//! Connection tracking semantics shared by the programs (which track) and
//! the agent (whose garbage collector frees what expired): the state a flow
//! is in, its idle timeout, when it is closed, and how one entry of a flow
//! names the other. Pure functions, unit-tested on the host.
//!
//! The reference is netfilter's conntrack with kube-proxy's settings:
//! per-state TCP timeouts, UDP "unreplied" and "stream" timeouts, an
//! "assured" flow (TCP: the handshake completed; UDP: a reply seen) that a
//! flood of new flows can never evict, and a closed or expired entry that
//! never blocks a new flow or a SNAT port.

use crate::{CtKey, CtValue, PROTO_TCP, ct_flags};

/// `CtValue::state` bits, the same in both entries of a flow (a change seen
/// on one entry is written to the other too).
pub mod state {
    /// A packet went the reply way (backend → client).
    pub const SEEN_REPLY: u8 = 1 << 0;
    /// TCP: the client acknowledged the backend's SYN-ACK (netfilter's
    /// `IPS_ASSURED`); UDP and SCTP: a reply was seen. Assured flows live
    /// in the `conntrack` map, the others in `conntrack_new`.
    pub const ASSURED: u8 = 1 << 1;
    /// TCP: the client sent a FIN.
    pub const FIN_ORIGINAL: u8 = 1 << 2;
    /// TCP: the backend sent a FIN.
    pub const FIN_REPLY: u8 = 1 << 3;
    /// TCP: either side sent a RST.
    pub const RST: u8 = 1 << 4;
    /// UDP (and SCTP): traffic went on after the first reply, so the flow
    /// is a stream, not one request and its answer (netfilter's UDP
    /// "stream" timeout).
    pub const STREAM: u8 = 1 << 5;

    /// Each bit with the name `inspect` shows.
    pub const NAMES: [(u8, &str); 6] = [
        (SEEN_REPLY, "seen-reply"),
        (ASSURED, "assured"),
        (FIN_ORIGINAL, "fin-original"),
        (FIN_REPLY, "fin-reply"),
        (RST, "rst"),
        (STREAM, "stream"),
    ];
}

/// Idle timeouts (nanoseconds): netfilter's defaults, with kube-proxy's
/// `--conntrack-tcp-timeout-established` (24h) and
/// `--conntrack-tcp-timeout-close-wait` (1h).
pub mod timeouts {
    const S: u64 = 1_000_000_000;
    /// A SYN without an answer (`nf_conntrack_tcp_timeout_syn_sent`).
    pub const TCP_SYN_SENT_NS: u64 = 120 * S;
    /// Answered, handshake not completed (`…_syn_recv`).
    pub const TCP_SYN_RECV_NS: u64 = 60 * S;
    /// kube-proxy's `--conntrack-tcp-timeout-established` default.
    pub const TCP_ESTABLISHED_NS: u64 = 86_400 * S;
    /// One side has closed, the other still sends: the half-closed
    /// connection keeps being translated (kube-proxy's
    /// `--conntrack-tcp-timeout-close-wait` default).
    pub const TCP_CLOSE_WAIT_NS: u64 = 3_600 * S;
    /// Both sides have sent a FIN. netfilter keeps such a flow 120 s
    /// (`…_time_wait`); its tuple and SNAT port are free for a new flow at
    /// once here anyway, so its entries only wait for stragglers (a last
    /// ACK, a retransmitted FIN), as Cilium's 10 s close timeout does.
    pub const TCP_TIME_WAIT_NS: u64 = 10 * S;
    /// A RST was seen (`…_close`).
    pub const TCP_CLOSE_NS: u64 = 10 * S;
    /// UDP (and SCTP) without a reply, or one request and its answer
    /// (`nf_conntrack_udp_timeout`).
    pub const UDP_NS: u64 = 30 * S;
    /// UDP (and SCTP) that went on after its first reply
    /// (`nf_conntrack_udp_timeout_stream`).
    pub const UDP_STREAM_NS: u64 = 120 * S;
    /// The last-seen stamp is refreshed at most this often (and on every
    /// state change), to keep writes off the fast path.
    pub const REFRESH_NS: u64 = S;
}

/// The idle timeout of a flow of `proto` in `state`.
#[must_use]
pub const fn timeout_ns(proto: u8, st: u8) -> u64 {
    if proto != PROTO_TCP {
        return if st & state::STREAM != 0 { timeouts::UDP_STREAM_NS } else { timeouts::UDP_NS };
    }
    if st & state::RST != 0 {
        timeouts::TCP_CLOSE_NS
    } else if st & state::FIN_ORIGINAL != 0 && st & state::FIN_REPLY != 0 {
        timeouts::TCP_TIME_WAIT_NS
    } else if st & (state::FIN_ORIGINAL | state::FIN_REPLY) != 0 {
        timeouts::TCP_CLOSE_WAIT_NS
    } else if st & state::ASSURED != 0 {
        timeouts::TCP_ESTABLISHED_NS
    } else if st & state::SEEN_REPLY != 0 {
        timeouts::TCP_SYN_RECV_NS
    } else {
        timeouts::TCP_SYN_SENT_NS
    }
}

/// Whether the flow has ended: TCP after a RST or a FIN from both sides.
/// Its entries still translate stragglers until they expire, but its tuple
/// and its SNAT port are free for a new flow at once.
#[must_use]
pub const fn is_closed(proto: u8, st: u8) -> bool {
    proto == PROTO_TCP && (st & state::RST != 0 || (st & state::FIN_ORIGINAL != 0 && st & state::FIN_REPLY != 0))
}

/// Whether a TCP flow is closing or closed (a FIN or RST seen): a new SYN
/// on its tuple starts a fresh flow instead of inheriting this one.
#[must_use]
pub const fn is_closing(proto: u8, st: u8) -> bool {
    proto == PROTO_TCP && st & (state::RST | state::FIN_ORIGINAL | state::FIN_REPLY) != 0
}

/// Whether the entry has been idle longer than its state's timeout.
#[must_use]
pub const fn is_expired(ct: &CtValue, proto: u8, now_ns: u64) -> bool {
    now_ns.saturating_sub(ct.last_seen_ns) > timeout_ns(proto, ct.state)
}

/// Whether the entry may be replaced by a new flow that needs its tuple:
/// expired, or its flow closed.
#[must_use]
pub const fn is_free(ct: &CtValue, proto: u8, now_ns: u64) -> bool {
    is_expired(ct, proto, now_ns) || is_closed(proto, ct.state)
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Whether a TCP packet opens a connection (SYN without ACK).
#[must_use]
pub const fn is_syn(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// The state after a packet with `tcp_flags` (0 for UDP/SCTP) went the
/// `original` way (client → frontend) or the reply way.
#[must_use]
pub const fn next_state(proto: u8, st: u8, original: bool, tcp_flags: u8) -> u8 {
    if proto != PROTO_TCP {
        // Answered: assured (out of reach of floods). Any packet after the
        // first answer: a stream.
        let stream = if st & state::SEEN_REPLY != 0 { state::STREAM } else { 0 };
        return if original { st | stream } else { st | stream | state::SEEN_REPLY | state::ASSURED };
    }
    let mut next = st;
    if tcp_flags & TCP_RST != 0 {
        next |= state::RST;
    }
    if original {
        if tcp_flags & TCP_FIN != 0 {
            next |= state::FIN_ORIGINAL;
        }
        // The ACK that completes the handshake (or any later one, for a
        // flow picked up mid-stream after the backend answered).
        if st & state::SEEN_REPLY != 0 && tcp_flags & TCP_ACK != 0 && tcp_flags & (TCP_SYN | TCP_RST) == 0 {
            next |= state::ASSURED;
        }
    } else {
        next |= state::SEEN_REPLY;
        if tcp_flags & TCP_FIN != 0 {
            next |= state::FIN_REPLY;
        }
    }
    next
}

/// The key of the other entry of the flow `key`'s entry `ct` belongs to:
/// client → frontend for a reply entry, backend → client (or → this node's
/// SNAT address and port) for an original-direction entry.
#[must_use]
pub fn peer_key(key: &CtKey, ct: &CtValue) -> CtKey {
    let snat = ct.flags & ct_flags::SNAT != 0;
    let mut peer = *key;
    if ct.flags & ct_flags::DNAT != 0 {
        peer.saddr = ct.nat_addr;
        peer.sport = ct.nat_port;
        (peer.daddr, peer.dport) = if snat { (ct.snat_addr, ct.snat_port) } else { (key.saddr, key.sport) };
    } else {
        (peer.saddr, peer.sport) = if snat { (ct.snat_addr, ct.snat_port) } else { (key.daddr, key.dport) };
        peer.daddr = ct.nat_addr;
        peer.dport = ct.nat_port;
    }
    peer
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FAMILY_IPV4, PROTO_UDP, addr_v4, port_be};

    const SYN: u8 = TCP_SYN;
    const SYN_ACK: u8 = TCP_SYN | TCP_ACK;
    const ACK: u8 = TCP_ACK;
    const FIN_ACK: u8 = TCP_FIN | TCP_ACK;

    fn walk(steps: &[(bool, u8)]) -> u8 {
        steps.iter().fold(0, |st, (original, flags)| next_state(PROTO_TCP, st, *original, *flags))
    }

    #[test]
    fn tcp_handshake_goes_syn_sent_syn_recv_established() {
        assert_eq!(timeout_ns(PROTO_TCP, walk(&[(true, SYN)])), timeouts::TCP_SYN_SENT_NS);
        assert_eq!(timeout_ns(PROTO_TCP, walk(&[(true, SYN), (false, SYN_ACK)])), timeouts::TCP_SYN_RECV_NS);
        let est = walk(&[(true, SYN), (false, SYN_ACK), (true, ACK)]);
        assert_ne!(est & state::ASSURED, 0);
        assert_eq!(timeout_ns(PROTO_TCP, est), timeouts::TCP_ESTABLISHED_NS);
        // A retransmitted SYN does not assure a flow that was never answered.
        assert_eq!(walk(&[(true, SYN), (true, SYN)]) & state::ASSURED, 0);
        // Nor does a spoofed client's RST after the SYN-ACK.
        assert_eq!(walk(&[(true, SYN), (false, SYN_ACK), (true, TCP_RST | TCP_ACK)]) & state::ASSURED, 0);
    }

    #[test]
    fn half_closed_keeps_translating_until_both_sides_close() {
        let est = walk(&[(true, SYN), (false, SYN_ACK), (true, ACK)]);
        let half = next_state(PROTO_TCP, est, true, FIN_ACK);
        assert!(!is_closed(PROTO_TCP, half));
        assert!(is_closing(PROTO_TCP, half));
        assert_eq!(timeout_ns(PROTO_TCP, half), timeouts::TCP_CLOSE_WAIT_NS);
        let both = next_state(PROTO_TCP, half, false, FIN_ACK);
        assert!(is_closed(PROTO_TCP, both));
        assert_eq!(timeout_ns(PROTO_TCP, both), timeouts::TCP_TIME_WAIT_NS);
        let rst = next_state(PROTO_TCP, est, false, TCP_RST);
        assert!(is_closed(PROTO_TCP, rst));
        assert_eq!(timeout_ns(PROTO_TCP, rst), timeouts::TCP_CLOSE_NS);
    }

    #[test]
    fn udp_is_assured_by_a_reply_a_stream_after_it_and_never_closes() {
        let st = next_state(PROTO_UDP, 0, true, 0);
        assert_eq!(timeout_ns(PROTO_UDP, st), timeouts::UDP_NS);
        let st = next_state(PROTO_UDP, st, false, 0);
        assert_ne!(st & state::ASSURED, 0);
        // One request and its answer: the short timeout (a DNS lookup).
        assert_eq!(timeout_ns(PROTO_UDP, st), timeouts::UDP_NS);
        let st = next_state(PROTO_UDP, st, true, 0);
        assert_eq!(timeout_ns(PROTO_UDP, st), timeouts::UDP_STREAM_NS);
        assert!(!is_closed(PROTO_UDP, st) && !is_closing(PROTO_UDP, 0xff));
    }

    #[test]
    fn expired_or_closed_entries_are_free() {
        let mut ct: CtValue = bytemuck::Zeroable::zeroed();
        ct.last_seen_ns = 1_000;
        assert!(!is_free(&ct, PROTO_UDP, 1_000 + timeouts::UDP_NS));
        assert!(is_free(&ct, PROTO_UDP, 1_001 + timeouts::UDP_NS));
        ct.state = state::SEEN_REPLY | state::ASSURED | state::FIN_ORIGINAL | state::FIN_REPLY;
        assert!(is_free(&ct, PROTO_TCP, 1_000));
        // A clock before the stamp (another CPU stamped later) is not expiry.
        assert!(!is_expired(&ct, PROTO_TCP, 0));
    }

    #[test]
    fn syn_means_syn_without_ack() {
        assert!(is_syn(SYN));
        assert!(!is_syn(SYN_ACK) && !is_syn(ACK));
    }

    #[test]
    fn peer_keys_pair_up_with_and_without_snat() {
        let client = CtKey {
            saddr: addr_v4([10, 0, 0, 1]),
            daddr: addr_v4([10, 96, 0, 1]),
            sport: port_be(40_000),
            dport: port_be(80),
            proto: PROTO_TCP,
            family: FAMILY_IPV4,
            _pad: [0; 2],
        };
        for snat in [false, true] {
            let mut original: CtValue = bytemuck::Zeroable::zeroed();
            original.flags = ct_flags::DNAT;
            original.nat_addr = addr_v4([10, 244, 1, 5]);
            original.nat_port = port_be(8080);
            if snat {
                original.flags |= ct_flags::SNAT;
                original.snat_addr = addr_v4([192, 168, 0, 1]);
                original.snat_port = port_be(61_234);
            }
            let reply_key = peer_key(&client, &original);
            assert_eq!(reply_key.saddr, original.nat_addr);
            let mut reply: CtValue = bytemuck::Zeroable::zeroed();
            reply.flags = ct_flags::REV_NAT | (original.flags & ct_flags::SNAT);
            reply.nat_addr = client.daddr;
            reply.nat_port = client.dport;
            if snat {
                reply.snat_addr = client.saddr;
                reply.snat_port = client.sport;
            }
            assert_eq!(peer_key(&reply_key, &reply), client, "snat={snat}");
        }
    }
}
