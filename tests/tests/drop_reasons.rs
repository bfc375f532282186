//! One drop reason per cause (`service_common::stats`): where each drop
//! reason added when `drop_rewrite` was split is provoked, and why some
//! cannot be.
//!
//! Provoked with crafted packets through the real programs
//! (BPF_PROG_TEST_RUN), each asserting its counter and its
//! `interface_stats` row went up by one:
//!
//! | counter | test |
//! |---|---|
//! | `drop_no_route` | `prog_test_run_external::a_packet_the_fib_has_no_route_for_is_dropped_as_drop_no_route` (an `unreachable`, then a `blackhole` route to the backend) |
//! | `drop_reject_unanswered` | `prog_test_run::a_service_without_endpoints_rejects_tcp_with_an_exact_rst` (an incoming RST), `prog_test_run::a_service_without_endpoints_rejects_udp_with_icmp_port_unreachable` (a datagram with IP options) |
//! | `drop_sctp_tuple_taken` | `prog_test_run::an_sctp_flow_whose_reply_tuple_is_taken_is_dropped_as_drop_sctp_tuple_taken` |
//! | `drop_icmp_answer` (now only IP options) | `prog_test_run_external::redirected_packets_lose_one_ttl_and_too_big_or_expiring_ones_get_the_forwarding_icmp_answer` |
//! | `drop_load` | `prog_test_run::a_service_without_endpoints_rejects_tcp_with_an_exact_rst` (a SYN whose TCP header ends after its checksum: the RST needs all 20 bytes; found by the fuzzer) |
//!
//! No packet can provoke the others: they count a kernel helper failing
//! on a well-formed skb, which the parse has already bounded:
//!
//! - `drop_l3_csum` (id 11): `bpf_l3_csum_replace` fails only for an odd
//!   or out-of-range offset or an skb it cannot make writable
//!   (`bpf_l3_csum_replace` in net/core/filter.c); the offset is the IP
//!   header's checksum, even and inside the parsed header.
//! - `drop_l4_csum`: the same for `bpf_l4_csum_replace` (the TCP/UDP
//!   checksum the parse read).
//! - `drop_store`, `drop_icmp_quote`: `bpf_skb_store_bytes` (and the
//!   quote's `bpf_skb_load_bytes`) fail only outside `skb->len`
//!   (`____bpf_skb_store_bytes`, `____bpf_skb_load_bytes`); every offset
//!   written lies inside bytes the parse (or the ICMP quote bound) checked
//!   or the answer's resize made. (`drop_load`'s other sites read bytes
//!   the parse checked: only the RST's header read can fail.)
//! - `drop_resize`: `bpf_skb_change_tail` fails below the headers' end or
//!   above `BPF_SKB_MAX_LEN` (`__bpf_skb_change_tail`), the answers are 54
//!   or 70 bytes; `bpf_skb_change_head` (L3 ingress only) fails above
//!   `BPF_SKB_MAX_LEN` (`__bpf_skb_change_head`), and a test run's packet
//!   is at most a page (`bpf_test_init`).
//! - `drop_redirect_refused`: `bpf_redirect_neigh` returns `TC_ACT_SHOT`
//!   only for flags or a short `params` (`bpf_redirect_neigh`),
//!   `bpf_redirect` only for unknown flags (`bpf_redirect`); the programs
//!   pass neither.
//! - `drop_no_scratch` (the `bpf_loop` port search now reports it instead
//!   of `drop_snat_no_port`): a per-CPU array lookup of index 0 never
//!   fails (`percpu_array_map_lookup_elem`).
//!
//! So instead of a packet, the test below reads the programs' source and
//! checks that each of those helper calls is counted as its own stage and
//! that each stage counter is only ever the reason of its helper: a
//! rewrite of a call site that maps a helper failure to another stage's
//! counter, or back to one catch-all, fails it. It needs no root.

use std::{fs, path::PathBuf};

/// Where the programs' sources are.
fn ebpf_src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../service-ebpf/src")
}

/// A kernel helper call site kind and the drop reasons its failure may be
/// counted as (beside pass counters for a read that only decides the packet
/// is not ours).
struct Helper {
    /// What the call looks like in the source.
    calls: &'static [&'static str],
    /// The counters its failure may be counted as.
    reasons: &'static [&'static str],
}

const HELPERS: &[Helper] = &[
    Helper { calls: &["l3_csum_replace("], reasons: &["DropL3Csum"] },
    Helper { calls: &["l4_csum_replace(", "bpf_csum_diff("], reasons: &["DropL4Csum"] },
    Helper { calls: &[".store("], reasons: &["DropStore", "DropIcmpQuote"] },
    Helper {
        calls: &[".load(", ".load::<", "bpf_skb_load_bytes("],
        reasons: &["DropLoad", "DropIcmpQuote", "PassMalformed"],
    },
    Helper { calls: &["bpf_skb_change_tail(", "bpf_skb_change_head("], reasons: &["DropResize"] },
    Helper { calls: &["bpf_redirect(", "bpf_redirect_neigh("], reasons: &["DropRedirectRefused"] },
    Helper { calls: &[".insert("], reasons: &["DropCtInsert"] },
];

/// The stage counters: each may only follow a call of its own helper.
const STAGES: &[&str] = &[
    "DropL3Csum",
    "DropL4Csum",
    "DropStore",
    "DropLoad",
    "DropResize",
    "DropIcmpQuote",
    "DropRedirectRefused",
    "DropCtInsert",
];

/// `(offset, helper index)` of every helper call in `text`, in order.
fn calls(text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (h, helper) in HELPERS.iter().enumerate() {
        for call in helper.calls {
            out.extend(text.match_indices(call).map(|(at, _)| (at, h)));
        }
    }
    out.sort_unstable();
    out
}

/// `(offset, name)` of every `Counter::Name` in `text`, in order.
fn counters(text: &str) -> Vec<(usize, &str)> {
    text.match_indices("Counter::")
        .map(|(at, m)| {
            let rest = &text[at + m.len()..];
            let end = rest.find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(rest.len());
            (at, &rest[..end])
        })
        .collect()
}

/// The byte range of `fn name(` … its closing brace at column 0.
fn function(text: &str, name: &str) -> std::ops::Range<usize> {
    let start = text.find(&format!("fn {name}(")).unwrap_or_else(|| panic!("fn {name}"));
    let end = start + text[start..].find("\n}\n").expect("end of function");
    start..end
}

#[test]
fn every_helper_failure_is_counted_as_its_own_stage() {
    let mut seen = std::collections::BTreeSet::new();
    for file in ["nat.rs", "fib.rs", "reject.rs", "icmp.rs", "conntrack.rs", "maps.rs"] {
        let text = fs::read_to_string(ebpf_src().join(file)).expect("source");
        // Comments name helpers and counters too: only code counts.
        let code: String = text.lines().map(|l| if l.trim_start().starts_with("//") { "" } else { l }).fold(
            String::with_capacity(text.len()),
            |mut code, line| {
                code.push_str(line);
                code.push('\n');
                code
            },
        );
        let calls = calls(&code);
        let counters = counters(&code);
        // The quote's rewrite of each family.
        let quote: Vec<std::ops::Range<usize>> = if file == "icmp.rs" {
            vec![function(&code, "rewrite_quoted"), function(&code, "rewrite_quoted_v6")]
        } else {
            Vec::new()
        };
        // Forward: the first counter after a call, with no other call in
        // between, is one its helper's failure may be counted as.
        for (i, &(at, h)) in calls.iter().enumerate() {
            let next_call = calls.get(i + 1).map_or(code.len(), |c| c.0);
            if let Some(&(c_at, name)) = counters.iter().find(|(c_at, _)| *c_at > at && *c_at < next_call)
                && STAGES.contains(&name)
            {
                let line = code[..c_at].lines().count();
                assert!(HELPERS[h].reasons.contains(&name), "{file}:{line}: {} counted as {name}", HELPERS[h].calls[0]);
                let in_quote = quote.iter().any(|q| q.contains(&at));
                assert_eq!(
                    name == "DropIcmpQuote",
                    in_quote,
                    "{file}:{line}: the ICMP quote's rewrite (and only it) is drop_icmp_quote"
                );
                seen.insert(name.to_owned());
            }
        }
        // Backward: each stage counter is the reason of the nearest helper
        // call before it.
        for &(c_at, name) in &counters {
            if !STAGES.contains(&name) {
                continue;
            }
            let line = code[..c_at].lines().count();
            let Some(&(_, h)) = calls.iter().rev().find(|(at, _)| *at < c_at) else {
                panic!("{file}:{line}: {name} with no helper call before it");
            };
            assert!(
                HELPERS[h].reasons.contains(&name),
                "{file}:{line}: {name} follows {}, not its own helper",
                HELPERS[h].calls[0]
            );
        }
    }
    assert_eq!(seen.len(), STAGES.len(), "every stage counter is used: {seen:?}");
}

#[test]
fn a_failed_scratch_lookup_is_drop_no_scratch_wherever_it_happens() {
    let scratch = fs::read_to_string(ebpf_src().join("scratch.rs")).expect("source");
    assert!(scratch.contains("SCRATCH.get_ptr_mut(0).ok_or(Counter::DropNoScratch)"));
    // The port search's bpf_loop callback cannot return a Result: it
    // records the failed lookup, and the search reports it.
    let conntrack = fs::read_to_string(ebpf_src().join("conntrack.rs")).expect("source");
    let search = &conntrack[function(&conntrack, "claim_port")];
    let no_scratch = search.find("Err(Counter::DropNoScratch)").expect("claim_port reports a failed scratch lookup");
    let no_port = search.find("Err(Counter::DropSnatNoPort)").expect("and a full port range");
    assert!(no_scratch < no_port, "checked before the port range is judged full");
    let ingress = fs::read_to_string(ebpf_src().join("ingress.rs")).expect("source");
    assert!(ingress.contains("packet().ok_or(Counter::DropNoScratch)"));
}
