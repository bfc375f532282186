//! Tier 2 fuzzing (root): millions of random and mutated frames through
//! both classifiers, `service_pod_ingress` and `service_external_ingress`,
//! with BPF_PROG_TEST_RUN, their maps programmed by the agent's own
//! manifest → model → reconciler. Every frame runs through both programs
//! (in a random order, sharing their maps as on a node), and every run is
//! judged on its own:
//!
//! (a) A frame that is not a Service's comes out byte for byte as it went
//!     in, with `TC_ACT_OK` and a pass verdict. "A Service's frame": its
//!     IPv4 destination address:port/protocol is a programmed frontend; or
//!     its tuple is in conntrack (a packet of a translated flow, either
//!     way); or it is an ICMP error quoting such a packet; or a later
//!     fragment of such a datagram. Every conntrack entry, frontend and
//!     fragment row holds an address of this fixture (all in 10.0.0.0/8
//!     and 192.168.0.0/16), so a frame whose IPv4 source and destination
//!     (and, for ICMP, quoted addresses) lie outside those ranges is
//!     provably not a Service's: random frames, and most mutated ones, are
//!     made so (`fuzz::foreignize`), and checked for (a).
//! (b) Frames derived from golden Service frames may be translated: a
//!     changed frame keeps its length, changes only the bytes a translation
//!     owns, and every checksum's one's-complement sum is what it was (a
//!     valid IPv4 header checksum, TCP/UDP checksum with its pseudo-header,
//!     ICMP checksum, quoted IP and TCP/UDP checksums stay valid; a UDP
//!     checksum of 0 stays 0). A frame turned into an answer (TCP RST, ICMP
//!     port unreachable, fragmentation needed, time exceeded) has the
//!     documented size, swapped MACs and all checksums valid, and quotes
//!     the offending packet as its sender sent it.
//! (c) Counters account for every frame: after every run, exactly one
//!     verdict counter of the per-CPU `stats` map moved, by one, and it
//!     agrees with what the program did (pass → untouched `TC_ACT_OK`,
//!     drop → `TC_ACT_SHOT`, ...); at the end the verdict counters' deltas
//!     sum to the number of runs, read through the agent's own
//!     `maps::read_stats`.
//!
//! `FUZZ_FRAMES` sets the number of frames (each run twice), `FUZZ_SEED`
//! the seed (printed, so a failure reproduces). `cargo xtask fuzz` runs
//! this test alone with 10 million frames.
//!
//! It runs in a fresh network namespace with routes towards the backends
//! (one with a 1000-byte MTU) and clients, so the FIB redirect, its TTL
//! decrement and its ICMP answers are fuzzed too; test runs only ever
//! return the packet, nothing is sent.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsFd as _, BorrowedFd},
    path::Path,
    time::Instant,
};

use aya::programs::SchedClassifier;
use service_agent::{
    maps::{self, MapSizes, PinnedMaps},
    model::{self, NodeContext},
    reconciler::Reconciler,
    source::manifest,
};
use service_common::{CtKey, CtValue, FAMILY_IPV4, SnatAddrKey, map_names, stats::Counter};
use service_tests::{
    fixture::ManifestDir,
    fuzz::{self, Counted, Rng, StatsReader, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, VerdictKind, Violation, hex},
    netns::{BpffsMount, Netns, unique_suffix},
    packet,
};

/// Frames per `cargo xtask test` run: about two minutes on a 2-core
/// machine (each frame runs through both programs).
const DEFAULT_FRAMES: u64 = 4_000_000;

const POD_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const LOCAL_POLICY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const STICKY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const SCTP_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const CLASH_VIPS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 96, 0, 61), Ipv4Addr::new(10, 96, 0, 62)];
const BACKENDS: [Ipv4Addr; 3] =
    [Ipv4Addr::new(10, 244, 1, 11), Ipv4Addr::new(10, 244, 1, 12), Ipv4Addr::new(10, 244, 2, 13)];
const REMOTE_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 13);
const EXT_CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 100);
const OUT_OF_RANGE_CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 7);
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 11);
const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 12);
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 200, 10);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 201, 5);

const MANIFESTS: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- {addresses: [10.244.1.11], nodeName: node-a}
- {addresses: [10.244.1.12], nodeName: node-a}
- {addresses: [10.244.2.13], nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: no-endpoints, namespace: default}
spec:
  clusterIP: 10.96.0.20
  ports:
  - {name: http, port: 80}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: remote-only, namespace: default}
spec:
  clusterIP: 10.96.0.30
  internalTrafficPolicy: Local
  ports:
  - {port: 80, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: remote-only-1
  labels: {kubernetes.io/service-name: remote-only}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.2.13], nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  clusterIP: 10.96.0.40
  sessionAffinity: ClientIP
  ports:
  - {port: 80, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: sticky-1
  labels: {kubernetes.io/service-name: sticky}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.11], nodeName: node-a}
- {addresses: [10.244.1.12], nodeName: node-a}
- {addresses: [10.244.2.13], nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: signalling, namespace: default}
spec:
  clusterIP: 10.96.0.50
  ports:
  - {port: 36412, protocol: SCTP, targetPort: 36412}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: signalling-1
  labels: {kubernetes.io/service-name: signalling}
addressType: IPv4
ports: [{port: 36412, protocol: SCTP}]
endpoints:
- {addresses: [10.244.1.12], nodeName: node-a}
---
apiVersion: v1
kind: Service
metadata: {name: clash-a, namespace: default}
spec:
  clusterIP: 10.96.0.61
  ports:
  - {port: 80, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: clash-a-1
  labels: {kubernetes.io/service-name: clash-a}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.11], nodeName: node-a}
---
apiVersion: v1
kind: Service
metadata: {name: clash-b, namespace: default}
spec:
  clusterIP: 10.96.0.62
  ports:
  - {port: 80, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: clash-b-1
  labels: {kubernetes.io/service-name: clash-b}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.11], nodeName: node-a}
---
# NodePort and an external IP, served by a backend on another node:
# DNAT + SNAT on the external side.
apiVersion: v1
kind: Service
metadata: {name: np, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.70
  externalIPs: [192.168.201.5]
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: 30053}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: np-1
  labels: {kubernetes.io/service-name: np}
addressType: IPv4
ports:
- {name: http, port: 8080}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- {addresses: [10.244.2.13], nodeName: node-b}
---
# A LoadBalancer with source ranges and a Local policy (local backend).
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.80
  externalTrafficPolicy: Local
  loadBalancerSourceRanges: [192.168.100.0/24]
  ports:
  - {port: 80, targetPort: 8080, nodePort: 30081}
status:
  loadBalancer:
    ingress: [{ip: 192.168.200.10}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: lb-1
  labels: {kubernetes.io/service-name: lb}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.12], nodeName: node-a}
";

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Prog {
    Pod,
    External,
}

impl Prog {
    fn name(self) -> &'static str {
        match self {
            Self::Pod => service_common::PROG_POD_INGRESS,
            Self::External => service_common::PROG_EXTERNAL_INGRESS,
        }
    }
}

/// Where a frame came from, which decides what it is checked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Origin {
    /// A golden frame as built (a Service's, or an ordinary one).
    Golden,
    /// A golden frame mutated: maybe a Service's; checked for (b), (c).
    Mutated,
    /// A mutated golden frame given foreign addresses: checked for (a).
    ForeignMutated,
    /// Random fields around foreign addresses, or another EtherType: (a).
    ForeignStructured,
    /// Random bytes: (a).
    ForeignRandom,
    /// 0 to 60 bytes: (a), or refused by the kernel under 14 bytes.
    ForeignTiny,
}

impl Origin {
    fn foreign(self) -> bool {
        matches!(self, Self::ForeignMutated | Self::ForeignStructured | Self::ForeignRandom | Self::ForeignTiny)
    }
}

/// `frame` with its IPv4 TTL set and the header checksum redone.
fn with_ttl(mut f: Vec<u8>, ttl: u8) -> Vec<u8> {
    f[14 + 8] = ttl;
    fuzz::fix_ip_checksum(&mut f);
    f
}

/// The golden frames: every path of both programs, parameters drawn from
/// small pools so flows recur (established, replies, closes) as well as
/// start.
struct Goldens {
    /// Replies to and ICMP errors about translated golden frames, built
    /// from what the programs sent.
    dynamic: Vec<(Vec<u8>, &'static str)>,
}

impl Goldens {
    fn pick(&self, rng: &mut Rng) -> (Vec<u8>, &'static str) {
        if !self.dynamic.is_empty() && rng.percent(30) {
            return self.dynamic[rng.below(self.dynamic.len())].clone();
        }
        let sport = 40_000 + u16::try_from(rng.below(64)).unwrap_or(0);
        let payload_len = *rng.pick(&[0, 0, 1, 5, 18, 47]);
        let payload = rng.bytes(payload_len);
        let flags = *rng.pick(&[SYN, SYN, SYN, ACK, ACK | 0x08, ACK | 0x01, 0x04, ACK]);
        let udp_len = rng.range(0, 40);
        let udp_payload = rng.bytes(udp_len);
        match rng.below(22) {
            0 => (packet::tcp_v4(POD_CLIENT, sport, VIP, 80, flags, &payload), "pod TCP to a ClusterIP"),
            1 => (packet::udp_v4(POD_CLIENT, sport, VIP, 53, &udp_payload), "pod UDP to a ClusterIP"),
            2 => (packet::udp_v4_no_checksum(POD_CLIENT, sport, VIP, 53, &udp_payload), "pod UDP, no checksum"),
            3 => (
                packet::tcp_v4(POD_CLIENT, sport, EMPTY_VIP, 80, flags, &payload),
                "TCP to a Service without endpoints",
            ),
            4 => (packet::udp_v4(POD_CLIENT, sport, EMPTY_VIP, 53, &udp_payload), "UDP to a Service without endpoints"),
            5 => (
                packet::tcp_v4(POD_CLIENT, sport, LOCAL_POLICY_VIP, 80, flags, &payload),
                "Local policy, no local endpoint",
            ),
            6 => (packet::tcp_v4(POD_CLIENT, sport, STICKY_VIP, 80, flags, &payload), "ClientIP affinity"),
            7 => (packet::sctp_init_v4(POD_CLIENT, sport, SCTP_VIP, 36412), "SCTP to a ClusterIP"),
            8 => {
                let data: Vec<u8> = (0..100u8).collect();
                let (first, rest) = packet::udp_v4_fragments(POD_CLIENT, sport % 4 + 5300, VIP, 53, &data, 48);
                if rng.percent(60) { (first, "pod UDP first fragment") } else { (rest, "pod UDP later fragment") }
            }
            9 => (packet::tcp_v4(BACKENDS[0], sport, VIP, 80, flags, &payload), "hairpin"),
            10 => (
                packet::tcp_v4(POD_CLIENT, sport, *rng.pick(&CLASH_VIPS), 80, flags, &payload),
                "clashing reply tuples",
            ),
            11 => (packet::tcp_v4(POD_CLIENT, sport, NODE, 30080, flags, &payload), "pod to a NodePort"),
            12 => (packet::tcp_v4(POD_CLIENT, sport, BACKENDS[1], 8080, flags, &payload), "pod to pod (no Service)"),
            13 | 14 => (packet::tcp_v4(EXT_CLIENT, sport, NODE, 30080, flags, &payload), "external TCP to a NodePort"),
            15 => (packet::udp_v4(EXT_CLIENT, sport, NODE, 30053, &udp_payload), "external UDP to a NodePort"),
            16 => {
                let client = if rng.percent(70) { EXT_CLIENT } else { OUT_OF_RANGE_CLIENT };
                (packet::tcp_v4(client, sport, LB_IP, 80, flags, &payload), "LoadBalancer with source ranges")
            }
            17 => (packet::tcp_v4(EXT_CLIENT, sport, EXTERNAL_IP, 80, flags, &payload), "external IP"),
            18 => (packet::tcp_v4(EXT_CLIENT, sport, NODE, 30080, ACK, &[7u8; 1360]), "too big for the path"),
            19 => (with_ttl(packet::tcp_v4(EXT_CLIENT, sport, NODE, 30080, flags, &payload), 1), "TTL 1 to a NodePort"),
            20 => {
                let data: Vec<u8> = (0..100u8).collect();
                let (first, rest) = packet::udp_v4_fragments(EXT_CLIENT, sport % 4 + 5300, NODE, 30053, &data, 48);
                if rng.percent(60) {
                    (first, "external UDP first fragment")
                } else {
                    (rest, "external UDP later fragment")
                }
            }
            _ => {
                if rng.percent(50) {
                    (packet::arp_request(POD_CLIENT, VIP), "ARP for a ClusterIP")
                } else {
                    // An echo request to the ClusterIP: ICMP, not an error.
                    let mut echo =
                        packet::icmp_frag_needed_v4(POD_CLIENT, VIP, 0, &packet::udp_v4(POD_CLIENT, 1, VIP, 2, b""));
                    echo[34] = 8;
                    echo[35] = 0;
                    fuzz::fix_checksums(&mut echo);
                    (echo, "ICMP echo to a ClusterIP")
                }
            }
        }
    }

    /// Learns from a golden frame the program translated: the reply its
    /// peer would send, and an ICMP error about it from the peer or a
    /// router.
    fn learn(&mut self, rng: &mut Rng, sent: &[u8]) {
        let Some(p) = packet::parse(sent) else { return };
        let reply = match p.proto {
            6 => {
                let flags = *rng.pick(&[0x12, ACK, ACK | 0x08, ACK | 0x01, 0x04]);
                (
                    packet::tcp_v4(p.ip_dst, p.dport, p.ip_src, p.sport, flags, &p.payload),
                    "reply to a translated TCP flow",
                )
            }
            17 => (packet::udp_v4(p.ip_dst, p.dport, p.ip_src, p.sport, &p.payload), "reply to a translated UDP flow"),
            _ => return,
        };
        let from = if rng.percent(50) { p.ip_dst } else { ROUTER };
        let icmp = (packet::icmp_frag_needed_v4(from, p.ip_src, 1000, sent), "ICMP error about a translated flow");
        for entry in [reply, icmp] {
            if self.dynamic.len() < 256 {
                self.dynamic.push(entry);
            } else {
                let i = rng.below(self.dynamic.len());
                self.dynamic[i] = entry;
            }
        }
    }
}

/// One broken invariant with everything needed to reproduce it.
struct Failure {
    violation: Violation,
    index: u64,
    prog: Prog,
    origin: Origin,
    what: String,
    input: Vec<u8>,
    output: Vec<u8>,
    retval: u32,
    counted: String,
}

/// A frame worth showing: its index, program, origin and bytes.
type Example = (u64, Prog, String, Vec<u8>);

#[derive(Default)]
struct Tally {
    runs: BTreeMap<Prog, u64>,
    verdicts: BTreeMap<(Prog, Counter), u64>,
    events: BTreeMap<Counter, u64>,
    origins: BTreeMap<Origin, u64>,
    foreign_checked: u64,
    translations: u64,
    translations_l4_valid: u64,
    translations_ip_valid: u64,
    translations_l4_unverifiable: u64,
    identity_translations: u64,
    answers: BTreeMap<Counter, u64>,
    /// Answers built for frames whose IPv4 header checksum is bad (the IP
    /// layer would have dropped them), or whose TCP/UDP checksum is bad
    /// (netfilter's REJECT does not answer those).
    answers_to_bad_ip_checksums: u64,
    answers_to_bad_l4_checksums: u64,
    refused_tiny: u64,
    /// EtherType → the longest frame of it the kernel refused.
    refused: BTreeMap<u16, usize>,
    conntrack_flushes: u64,
    /// The first examples of verdicts that should be rare (a helper or map
    /// operation failed): not broken invariants, but worth a look.
    notable: BTreeMap<Counter, Vec<Example>>,
    failures: BTreeMap<&'static str, (u64, Vec<Failure>)>,
}

impl Tally {
    fn fail(&mut self, failure: Failure) {
        let slot = self.failures.entry(failure.violation.check).or_insert((0, Vec::new()));
        slot.0 += 1;
        if slot.1.len() < 3 {
            slot.1.push(failure);
        }
    }
}

/// Judges one run by its verdict counter (and, for a foreign frame, by
/// invariant (a) first).
fn judge(
    tally: &mut Tally,
    prog: Prog,
    origin: Origin,
    input: &[u8],
    output: &[u8],
    retval: u32,
    counted: &Counted,
) -> Result<(), Violation> {
    let v = |check: &'static str, detail: String| Violation { check, detail };
    let Some(verdict) = counted.single_verdict() else {
        return Err(v("verdict_not_counted_exactly_once", counted.describe()));
    };
    *tally.verdicts.entry((prog, verdict)).or_default() += 1;
    for (id, d) in &counted.events {
        *tally.events.entry(*id).or_default() += d;
    }
    let kind = fuzz::verdict_kind(verdict).expect("a verdict counter");
    let name = fuzz::counter_name(verdict);
    if origin.foreign() {
        tally.foreign_checked += 1;
        if output != input {
            return Err(v("foreign_frame_changed", format!("verdict {name}, action {retval}")));
        }
        if retval != TC_ACT_OK {
            return Err(v("foreign_frame_not_passed", format!("verdict {name}, action {retval}")));
        }
        if kind != VerdictKind::Pass {
            return Err(v("foreign_frame_not_counted_as_a_pass", format!("verdict {name}")));
        }
    }
    match kind {
        VerdictKind::Pass => {
            if retval != TC_ACT_OK {
                return Err(v("pass_verdict_but_not_tc_act_ok", format!("verdict {name}, action {retval}")));
            }
            if output != input {
                return Err(v("pass_verdict_but_frame_changed", format!("verdict {name}")));
            }
        }
        VerdictKind::Translated => {
            if retval != TC_ACT_OK && retval != TC_ACT_REDIRECT {
                return Err(v("translation_with_an_unexpected_action", format!("verdict {name}, action {retval}")));
            }
            let t = fuzz::check_translation(input, output, retval)?;
            tally.translations += 1;
            tally.translations_ip_valid += u64::from(t.ip_valid);
            tally.translations_l4_valid += u64::from(t.l4_valid);
            tally.translations_l4_unverifiable += u64::from(t.l4_unverifiable);
            tally.identity_translations += u64::from(t.identity);
        }
        VerdictKind::Answered => {
            if retval == TC_ACT_REDIRECT {
                fuzz::check_answer(input, output, verdict)?;
                *tally.answers.entry(verdict).or_default() += 1;
                if !fuzz::ip_checksum_valid(input) {
                    tally.answers_to_bad_ip_checksums += 1;
                } else if !fuzz::l4_checksum_valid(input) {
                    tally.answers_to_bad_l4_checksums += 1;
                }
            } else if retval == TC_ACT_SHOT {
                // Documented unanswered drops (an RST or a datagram with IP
                // options refused count as drop_reject_unanswered, never as
                // a reject): the
                // forwarding answers are not sent about an ICMP error or a
                // later fragment (RFC 1122 3.2.2), and a packet too big
                // without DF (the stack would fragment it; a redirect
                // cannot) is dropped unanswered.
                let view = fuzz::ipv4_view(input);
                let unanswerable = view.is_some_and(|w| {
                    w.later_fragment() || (w.proto == service_common::PROTO_ICMP && input.get(w.l4).is_some())
                });
                let documented = match verdict {
                    Counter::DropFragNeeded => unanswerable || input.get(14 + 6).is_some_and(|f| f & 0x40 == 0),
                    Counter::DropTtlExceeded => unanswerable,
                    _ => false,
                };
                if !documented {
                    return Err(v("answer_verdict_dropped_without_a_documented_reason", format!("verdict {name}")));
                }
            } else {
                return Err(v("answer_with_an_unexpected_action", format!("verdict {name}, action {retval}")));
            }
        }
        VerdictKind::Dropped => {
            if retval != TC_ACT_SHOT {
                return Err(v("drop_verdict_but_not_tc_act_shot", format!("verdict {name}, action {retval}")));
            }
            // A refused new flow goes unanswered only when it is a TCP RST
            // (RFC 793) or carries IP options (the answer quotes 20 bytes).
            if verdict == Counter::DropRejectUnanswered {
                let documented = fuzz::ipv4_view(input).is_some_and(|w| {
                    w.ihl > 20
                        || (w.proto == service_common::PROTO_TCP && input.get(w.l4 + 13).is_some_and(|f| f & 0x04 != 0))
                });
                if !documented {
                    return Err(v("reject_unanswered_without_a_documented_reason", format!("verdict {name}")));
                }
            }
        }
    }
    Ok(())
}

/// Empties both conntrack tables (SNAT ports run out after a few thousand
/// unanswered new flows to one backend; then every further one searches
/// the whole range). Returns the number of entries removed.
fn flush_conntrack(root: &Path) -> usize {
    let mut removed = 0;
    for name in [map_names::CONNTRACK, map_names::CONNTRACK_NEW] {
        let pin = aya::maps::MapData::from_pin(root.join(name)).expect("pinned conntrack");
        let mut map: aya::maps::HashMap<_, CtKey, CtValue> =
            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(pin)).expect("conntrack map");
        let keys: Vec<CtKey> = map.keys().filter_map(Result::ok).collect();
        for key in &keys {
            if map.remove(key).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

/// Draws the next frame: where it comes from, what it is, its mutations.
fn next_frame(rng: &mut Rng, goldens: &Goldens) -> (Origin, Vec<u8>, String) {
    let roll = rng.below(100);
    if roll < 50 {
        let (mut frame, what) = goldens.pick(rng);
        if roll < 8 {
            return (Origin::Golden, frame, what.to_owned());
        }
        let mutations = fuzz::mutate(rng, &mut frame);
        let what = format!("{what}, mutated: {}", mutations.join(" + "));
        if roll < 32 {
            return (Origin::Mutated, frame, what);
        }
        fuzz::foreignize(rng, &mut frame);
        return (Origin::ForeignMutated, frame, format!("{what}, foreign addresses"));
    }
    if roll < 82 {
        return (Origin::ForeignStructured, fuzz::structured_frame(rng), "structured random".into());
    }
    if roll < 95 {
        return (Origin::ForeignRandom, fuzz::random_frame(rng), "random bytes".into());
    }
    (Origin::ForeignTiny, fuzz::tiny_frame(rng), "tiny".into())
}

/// Runs `frames` frames through both programs and returns the tally.
#[expect(clippy::too_many_lines, reason = "the fuzz loop and its bookkeeping, in order")]
fn fuzz_both(pod: BorrowedFd<'_>, external: BorrowedFd<'_>, root: &Path, frames: u64, seed: u64) -> Tally {
    let mut rng = Rng::new(seed);
    let mut goldens = Goldens { dynamic: Vec::new() };
    let mut tally = Tally::default();
    let mut reader = StatsReader::open(&root.join(map_names::STATS)).expect("stats map");
    let totals_before: Vec<u64> = maps::read_stats(root).expect("stats").iter().map(|(_, n)| *n).collect();
    let mut before = reader.read().expect("stats");
    let started = Instant::now();
    let mut flush_pending = false;
    for index in 0..frames {
        let (origin, frame, what) = next_frame(&mut rng, &goldens);
        *tally.origins.entry(origin).or_default() += 1;
        assert!(!origin.foreign() || fuzz::provably_foreign(&frame), "the generator made a foreign frame that is not");
        let order = if rng.percent(50) { [Prog::Pod, Prog::External] } else { [Prog::External, Prog::Pod] };
        for (n, prog) in order.into_iter().enumerate() {
            let fd = if prog == Prog::Pod { pod } else { external };
            let result = packet::prog_test_run(fd, &frame, 1);
            if frame.len() < fuzz::ETH_HLEN {
                // The kernel refuses a frame shorter than an Ethernet
                // header; nothing runs, nothing may be counted.
                let after = reader.read().expect("stats");
                let refused = matches!(&result, Err(e) if e.raw_os_error() == Some(libc::EINVAL));
                if !refused || after != before {
                    tally.fail(Failure {
                        violation: Violation {
                            check: "frame_shorter_than_ethernet_not_refused",
                            detail: format!("{result:?}"),
                        },
                        index,
                        prog,
                        origin,
                        what: what.clone(),
                        input: frame.clone(),
                        output: Vec::new(),
                        retval: 0,
                        counted: Counted::between(&before, &after).describe(),
                    });
                }
                tally.refused_tiny += 1;
                before = after;
                continue;
            }
            let out = match result {
                Ok(out) => out,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // The kernel refuses some frames before any program
                    // runs (an IPv4 or IPv6 EtherType without room for
                    // its header): nothing may be counted for them.
                    let after = reader.read().expect("stats");
                    if after != before {
                        tally.fail(Failure {
                            violation: Violation {
                                check: "refused_frame_counted",
                                detail: Counted::between(&before, &after).describe(),
                            },
                            index,
                            prog,
                            origin,
                            what: what.clone(),
                            input: frame.clone(),
                            output: Vec::new(),
                            retval: 0,
                            counted: String::new(),
                        });
                    }
                    before = after;
                    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
                    let longest = tally.refused.entry(ethertype).or_default();
                    *longest = (*longest).max(frame.len());
                    continue;
                }
                Err(e) => {
                    tally.fail(Failure {
                        violation: Violation { check: "test_run_failed", detail: e.to_string() },
                        index,
                        prog,
                        origin,
                        what: what.clone(),
                        input: frame.clone(),
                        output: Vec::new(),
                        retval: 0,
                        counted: String::new(),
                    });
                    before = reader.read().expect("stats");
                    continue;
                }
            };
            *tally.runs.entry(prog).or_default() += 1;
            let after = reader.read().expect("stats");
            let counted = Counted::between(&before, &after);
            before = after;
            if let Err(violation) = judge(&mut tally, prog, origin, &frame, &out.data_out, out.retval, &counted) {
                tally.fail(Failure {
                    violation,
                    index,
                    prog,
                    origin,
                    what: what.clone(),
                    input: frame.clone(),
                    output: out.data_out.clone(),
                    retval: out.retval,
                    counted: counted.describe(),
                });
            }
            if let Some(
                id @ (Counter::DropL3Csum
                | Counter::DropL4Csum
                | Counter::DropStore
                | Counter::DropLoad
                | Counter::DropResize
                | Counter::DropIcmpQuote
                | Counter::DropRedirectRefused
                | Counter::DropCtInsert
                | Counter::DropMissingRow
                | Counter::DropNoScratch
                | Counter::DropCtRace
                | Counter::DropSnatNoAddress
                | Counter::DropNoBackend),
            ) = counted.single_verdict()
            {
                let examples = tally.notable.entry(id).or_default();
                if examples.len() < 3 {
                    examples.push((index, prog, what.clone(), frame.clone()));
                }
            }
            if counted.single_verdict() == Some(Counter::DropSnatNoPort) {
                flush_pending = true;
            }
            if n == 0
                && origin == Origin::Golden
                && matches!(counted.single_verdict(), Some(Counter::DnatNew | Counter::DnatEstablished))
                && out.data_out.len() == frame.len()
            {
                goldens.learn(&mut rng, &out.data_out);
            }
        }
        if flush_pending {
            flush_conntrack(root);
            tally.conntrack_flushes += 1;
            flush_pending = false;
        }
        if (index + 1) % 1_000_000 == 0 {
            let secs = started.elapsed().as_secs_f64();
            #[expect(clippy::cast_precision_loss, reason = "a rate for the log")]
            let rate = (index + 1) as f64 / secs;
            println!("fuzz: {} frames in {secs:.1} s ({rate:.0} frames/s)", index + 1);
        }
    }
    // (c) over the whole run, through the agent's own reader.
    let totals_after: Vec<u64> = maps::read_stats(root).expect("stats").iter().map(|(_, n)| *n).collect();
    let verdict_delta: u64 =
        fuzz::VERDICT_COUNTERS.iter().map(|(id, _)| totals_after[*id as usize] - totals_before[*id as usize]).sum();
    let runs: u64 = tally.runs.values().sum();
    if verdict_delta != runs {
        tally.fail(Failure {
            violation: Violation {
                check: "verdict_counters_do_not_sum_to_the_runs",
                detail: format!("{verdict_delta} verdicts counted for {runs} runs"),
            },
            index: frames,
            prog: Prog::Pod,
            origin: Origin::Golden,
            what: "the whole run".into(),
            input: Vec::new(),
            output: Vec::new(),
            retval: 0,
            counted: String::new(),
        });
    }
    tally
}

fn report(tally: &Tally, frames: u64, seed: u64, secs: f64) {
    let runs: u64 = tally.runs.values().sum();
    #[expect(clippy::cast_precision_loss, reason = "rates for the log")]
    let (fps, rps) = (frames as f64 / secs, runs as f64 / secs);
    println!(
        "fuzz: {frames} frames, {runs} program runs ({}: {}, {}: {}) in {secs:.1} s: {fps:.0} frames/s, {rps:.0} runs/s; seed {seed:#x}",
        Prog::Pod.name(),
        tally.runs.get(&Prog::Pod).copied().unwrap_or(0),
        Prog::External.name(),
        tally.runs.get(&Prog::External).copied().unwrap_or(0),
    );
    println!("fuzz: origins {:?}", tally.origins);
    println!(
        "fuzz: (a) {} foreign runs untouched; (b) {} translations verified ({} with a valid IP checksum, {} with a \
         valid L4 checksum, {} with no L4 checksum to sum, {} identity), answers {:?} ({} to frames with a bad IP \
         header checksum, {} more with a bad L4 checksum); {} tiny frames refused; longest other refused frame per EtherType {:x?}; {} conntrack flushes",
        tally.foreign_checked,
        tally.translations,
        tally.translations_ip_valid,
        tally.translations_l4_valid,
        tally.translations_l4_unverifiable,
        tally.identity_translations,
        tally.answers.iter().map(|(id, n)| (fuzz::counter_name(*id), *n)).collect::<Vec<_>>(),
        tally.answers_to_bad_ip_checksums,
        tally.answers_to_bad_l4_checksums,
        tally.refused_tiny,
        tally.refused,
        tally.conntrack_flushes,
    );
    for prog in [Prog::Pod, Prog::External] {
        let list: Vec<String> = tally
            .verdicts
            .iter()
            .filter(|((p, _), _)| *p == prog)
            .map(|((_, id), n)| format!("{}={n}", fuzz::counter_name(*id)))
            .collect();
        println!("fuzz: {} verdicts: {}", prog.name(), list.join(" "));
    }
    let events: Vec<String> = tally.events.iter().map(|(id, n)| format!("{}={n}", fuzz::counter_name(*id))).collect();
    println!("fuzz: events: {}", events.join(" "));
    for (id, examples) in &tally.notable {
        for (index, prog, what, frame) in examples {
            println!(
                "fuzz: note: {} for frame #{index} in {} ({what}): {}",
                fuzz::counter_name(*id),
                prog.name(),
                hex(frame)
            );
        }
    }
    for (check, (count, examples)) in &tally.failures {
        println!("\nFUZZ FAILURE {check}: {count} runs");
        for f in examples {
            println!(
                "  seed {seed:#x} frame #{} program {} ({:?}: {})\n    {}\n    action {}, counted {}\n    in  {}\n    out {}",
                f.index,
                f.prog.name(),
                f.origin,
                f.what,
                f.violation.detail,
                f.retval,
                f.counted,
                hex(&f.input),
                hex(&f.output),
            );
        }
    }
}

/// Builds the fuzz fixture and runs `f` with the two programs and the pin
/// root: a fresh network namespace with routes as a node has them (the
/// remote backend over a path with a 1000-byte MTU, the local pods, the
/// external clients; forwarding on), the object loaded on a private bpffs
/// and its maps programmed from [`MANIFESTS`] by the agent's manifest →
/// model → reconciler.
fn with_fixture<T: Send>(f: impl FnOnce(BorrowedFd<'_>, BorrowedFd<'_>, &Path) -> T + Send) -> T {
    let ns = Netns::new(&format!("sd-fuzz-{}", unique_suffix())).expect("netns");
    ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]).expect("veth");
    ns.ip(&["link", "set", "d0", "up"]).expect("d0 up");
    ns.ip(&["link", "set", "d1", "up"]).expect("d1 up");
    ns.ip(&["addr", "add", "10.244.2.1/24", "dev", "d0"]).expect("addr");
    ns.ip(&["route", "add", &format!("{REMOTE_BACKEND}/32"), "dev", "d0", "mtu", "lock", "1000"]).expect("route");
    ns.ip(&["route", "add", "10.244.1.0/24", "dev", "d0"]).expect("pod route");
    ns.ip(&["route", "add", "192.168.100.0/24", "dev", "d0"]).expect("client route");
    ns.sysctl("net.ipv4.ip_forward=1").expect("forwarding");

    let bpffs = BpffsMount::new().expect("bpffs");
    let manifests = ManifestDir::new();
    manifests.write("fuzz.yaml", MANIFESTS);
    let root = bpffs.path().join("node");
    let dir = manifests.path().to_owned();
    ns.run_in(move || {
        let mut ebpf = maps::load(&root, MapSizes::default()).expect("load object");
        let snapshot = manifest::load_dir(&dir).expect("manifests");
        assert!(snapshot.errors.is_empty(), "{:?}", snapshot.errors);
        let node =
            NodeContext { node_name: "node-a".into(), nodeport_addresses: vec![NODE.into()], ..NodeContext::default() };
        let desired = model::desired(&snapshot.objects, &node);
        let mut reconciler =
            Reconciler::new(PinnedMaps::from_ebpf(&mut ebpf, MapSizes::default()).expect("maps")).expect("dump");
        let report = reconciler.reconcile(&desired);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        // BPF_PROG_TEST_RUN's packets come from loopback (ifindex 1); the
        // hairpin address is the node's too.
        maps::write_snat_addrs(
            &root,
            &BTreeMap::from([
                (SnatAddrKey::new(1, FAMILY_IPV4), IpAddr::V4(NODE)),
                (SnatAddrKey::new(service_common::SNAT_HAIRPIN, FAMILY_IPV4), IpAddr::V4(NODE)),
            ]),
        )
        .expect("snat rows");
        for prog in [Prog::Pod, Prog::External] {
            let p: &mut SchedClassifier =
                ebpf.program_mut(prog.name()).expect("program").try_into().expect("classifier");
            p.load().expect("verifier accepts the program");
        }
        let fd = |prog: Prog| {
            let p: &SchedClassifier = ebpf.program(prog.name()).expect("program").try_into().expect("classifier");
            p.fd().expect("fd")
        };
        let (pod, external) = (fd(Prog::Pod), fd(Prog::External));
        f(pod.as_fd(), external.as_fd(), &root)
    })
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn fuzzed_frames_through_both_classifiers_keep_every_invariant() {
    let frames: u64 = std::env::var("FUZZ_FRAMES")
        .ok()
        .and_then(|s| s.trim().replace('_', "").parse().ok())
        .unwrap_or(DEFAULT_FRAMES);
    let seed = fuzz::seed_from_env("FUZZ_SEED");
    println!(
        "fuzz: seed {seed:#x}, {frames} frames through both classifiers (reproduce: FUZZ_SEED={seed:#x} FUZZ_FRAMES={frames})"
    );
    for addr in [POD_CLIENT, VIP, EMPTY_VIP, NODE, ROUTER, EXT_CLIENT, OUT_OF_RANGE_CLIENT, LB_IP, EXTERNAL_IP]
        .into_iter()
        .chain(BACKENDS)
        .chain(CLASH_VIPS)
    {
        assert!(!fuzz::is_foreign(addr.octets()), "{addr} must lie in the fixture's ranges");
    }

    let (tally, secs) = with_fixture(move |pod, external, root| {
        let started = Instant::now();
        let tally = fuzz_both(pod, external, root, frames, seed);
        (tally, started.elapsed().as_secs_f64())
    });
    report(&tally, frames, seed, secs);
    let broken: BTreeSet<&str> = tally.failures.keys().copied().collect();
    assert!(broken.is_empty(), "invariants broken (seed {seed:#x}, details above): {broken:?}");
}

/// The findings of the fuzzer, each as the smallest well-formed frame that
/// shows it, run through the program that hits it and judged by the same
/// checks (so a fix shows here first, deterministically).
#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn fuzz_findings_reproduce_on_well_formed_frames() {
    let failures = with_fixture(|pod, external, root| {
        let mut reader = StatsReader::open(&root.join(map_names::STATS)).expect("stats map");
        let mut tally = Tally::default();
        let mut failures = Vec::new();
        // Runs `frame` through `prog`; returns what came out, judged.
        let mut run = |name: &str, prog: Prog, frame: &[u8]| {
            let before = reader.read().expect("stats");
            let fd = if prog == Prog::Pod { pod } else { external };
            let out = packet::prog_test_run(fd, frame, 1).expect("BPF_PROG_TEST_RUN");
            let counted = Counted::between(&before, &reader.read().expect("stats"));
            if let Err(v) = judge(&mut tally, prog, Origin::Golden, frame, &out.data_out, out.retval, &counted) {
                failures.push(format!(
                    "{name} ({}): {}: {}\n    action {}, counted {}\n    in  {}\n    out {}",
                    prog.name(),
                    v.check,
                    v.detail,
                    out.retval,
                    counted.describe(),
                    hex(frame),
                    hex(&out.data_out)
                ));
            }
            out.data_out
        };
        // 1. A 1,228-byte UDP datagram without DF to a NodePort whose
        //    backend sits behind a 1000-byte-MTU path: the forwarding stack
        //    fragments it; it must not be refused with "fragmentation
        //    needed".
        run(
            "UDP without DF, bigger than the path MTU",
            Prog::External,
            &packet::udp_v4(EXT_CLIENT, 5000, NODE, 30053, &[9u8; 1200]),
        );
        // 2. An ICMP error about a NodePort flow, arriving with TTL 1: it
        //    must not be answered with an ICMP error.
        let sent = run("UDP to a NodePort", Prog::External, &packet::udp_v4(EXT_CLIENT, 5001, NODE, 30053, b"query"));
        let error = with_ttl(packet::icmp_frag_needed_v4(ROUTER, NODE, 576, &sent), 1);
        run("ICMP error with TTL 1", Prog::External, &error);
        // 3. A later fragment of a NodePort datagram, arriving with TTL 1:
        //    only fragment 0 may be answered.
        let data: Vec<u8> = (0..100u8).collect();
        let (first, rest) = packet::udp_v4_fragments(EXT_CLIENT, 5002, NODE, 30053, &data, 48);
        run("first fragment", Prog::External, &first);
        run("later fragment with TTL 1", Prog::External, &with_ttl(rest, 1));
        // 4. An ICMP error quoting a translated TCP segment with the 8
        //    bytes RFC 792 guarantees, in a frame that carries 16 more
        //    bytes after the IP datagram (a trailer): the quoted TCP
        //    checksum is not in the datagram, and the ICMP checksum over
        //    the datagram must stay valid.
        let syn = run("SYN to a ClusterIP", Prog::Pod, &packet::tcp_v4(POD_CLIENT, 40_000, VIP, 80, SYN, b""));
        let backend = Ipv4Addr::new(syn[30], syn[31], syn[32], syn[33]);
        let mut error = packet::icmp_frag_needed_v4(backend, POD_CLIENT, 0, &syn[..14 + 28]);
        error.extend_from_slice(&[0u8; 16]);
        run("ICMP error with an 8-byte quote and a frame trailer", Prog::Pod, &error);
        // 5. The same kind of ICMP error about the translated SYN, in an
        //    IPv4 header whose protocol says ICMPv6 (58): no ICMP message
        //    of IPv4, so it passes untouched in both programs (the parse
        //    once took either family's ICMP number in either family, and
        //    translated it).
        let mut error = packet::icmp_frag_needed_v4(backend, POD_CLIENT, 1400, &syn);
        error[14 + 9] = 58;
        fuzz::fix_ip_checksum(&mut error);
        let rewritten: Vec<String> = [Prog::Pod, Prog::External]
            .into_iter()
            .filter_map(|prog| {
                let out = run("IPv4 saying ICMPv6, carrying an ICMP error", prog, &error);
                (out != error)
                    .then(|| format!("IPv4 saying ICMPv6 ({}): rewritten\n    out {}", prog.name(), hex(&out)))
            })
            .collect();
        failures.extend(rewritten);
        failures
    });
    for f in &failures {
        println!("FINDING {f}");
    }
    assert!(failures.is_empty(), "{} findings reproduce (details above)", failures.len());
}
