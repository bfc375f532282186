//! What the pipeline decided for a packet. Inner functions return
//! `Result<_, Counter>` and use `?`: an `Err` is a drop and names its
//! reason. The entry point (`ingress::run`) turns the verdict into a TC
//! action and one counter, in one `match`.

use service_common::stats::Counter;

/// A packet that goes on (a dropped one is `Err(Counter)`).
#[derive(Clone, Copy)]
pub enum Verdict {
    /// Left to the stack (`TC_ACT_OK`), counted as the counter.
    Pass(Counter),
    /// Rewritten, and its new source may be a node address: it leaves by
    /// a FIB lookup and a redirect (`fib::forward`), which the stack's
    /// input routing would drop as a martian otherwise. Counted as the
    /// counter once sent.
    Forward(Counter),
    /// A new flow to a frontend without endpoints that rejects: turned
    /// into a TCP RST or an ICMP port unreachable and sent back
    /// (`reject::refuse`). Built by the entry point, not inside the
    /// translation: the answer's buffers and `new_flow`'s locals never
    /// share one call chain's stack.
    Reject,
}

/// The verdict of the translation, or the drop reason.
pub type Outcome = Result<Verdict, Counter>;

#[inline(always)]
#[expect(clippy::unnecessary_wraps, reason = "an Outcome, so every return site reads alike")]
pub fn pass(counter: Counter) -> Outcome {
    Ok(Verdict::Pass(counter))
}

#[inline(always)]
#[expect(clippy::unnecessary_wraps, reason = "an Outcome, so every return site reads alike")]
pub fn forward(counter: Counter) -> Outcome {
    Ok(Verdict::Forward(counter))
}

/// A packet a helper redirected (`bpf_redirect_neigh`, `bpf_redirect`
/// returned `TC_ACT_REDIRECT`), counted as the counter.
#[derive(Clone, Copy)]
pub struct Sent(pub Counter);

// Returned in one register pair, never through a pointer to the caller's
// frame (which would take one of a BPF function's five arguments).
const _: () = assert!(size_of::<Outcome>() <= 8);
const _: () = assert!(size_of::<Result<Sent, Counter>>() <= 8);
