//! What the packet path does with the first packet of a flow (and the
//! socket path with a connect() of the node's own), worked out from the
//! desired frontends alone: which frontend it matches (by where it
//! enters the node), whether its source may connect, the endpoints it may
//! be sent to, and whether its source is masqueraded.
//!
//! This is the specification the eBPF programs implement, stated without
//! maps: the flow tables of `tests/flows` (kube-proxy's own packet-flow
//! cases among them) are checked against it without root, and against the
//! live programs with real packets (and, for the node's own sockets, real
//! sockets under the socket-level programs).

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, SocketAddr},
};

use super::{Backend, Desired, DesiredFrontend, Frontend, Protocol, Scope, WhenEmpty};

/// Where a packet enters the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// From a pod of this node, through its pod interface.
    Pod,
    /// From outside the node, through an external interface.
    External,
    /// From a socket of the node itself (a node address or 127.0.0.1 as
    /// its source): translated at connect()/sendmsg() by the socket-level
    /// programs (`service-ebpf/src/socket.rs`), never seen by the packet
    /// path.
    Host,
}

/// The first packet of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub source: IpAddr,
    pub destination: SocketAddr,
    pub protocol: Protocol,
    pub entry: Entry,
}

/// What happens to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not a Service flow: the packet goes on as it is.
    Untouched,
    /// Answered with a TCP RST or an ICMP port unreachable.
    Reject,
    /// Dropped (a source outside `loadBalancerSourceRanges`, or a `Local`
    /// policy with no endpoint on this node).
    Drop,
    /// Sent to one of `endpoints` (address:port); `masquerade` when its
    /// source is rewritten to this node's address for at least one of them
    /// (never for [`Entry::Host`]: a socket's source is the node's already).
    Forward { endpoints: BTreeSet<SocketAddr>, masquerade: bool },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Untouched => f.write_str("untouched"),
            Self::Reject => f.write_str("REJECT"),
            Self::Drop => f.write_str("DROP"),
            Self::Forward { endpoints, masquerade } => {
                let list: Vec<String> = endpoints.iter().map(ToString::to_string).collect();
                write!(f, "{}{}", list.join(", "), if *masquerade { " (masqueraded)" } else { "" })
            }
        }
    }
}

/// The frontend `probe` matches, if any.
#[must_use]
pub fn frontend<'a>(desired: &'a Desired, probe: &Probe) -> Option<&'a DesiredFrontend> {
    let scope = match probe.entry {
        // The node's own sockets get what kube-proxy gives traffic from
        // the node: the internal-scope frontends, as pods do.
        Entry::Pod | Entry::Host => Scope::Internal,
        Entry::External => Scope::External,
    };
    let key =
        Frontend { addr: probe.destination.ip(), port: probe.destination.port(), protocol: probe.protocol, scope };
    desired.frontends.get(&key).map(AsRef::as_ref)
}

/// Whether the flow to `backend` has its source rewritten: the frontend
/// masquerades, or a pod lands on itself (hairpin).
fn masqueraded(df: &DesiredFrontend, probe: &Probe, backend: &Backend) -> bool {
    df.masquerade || (probe.entry == Entry::Pod && backend.addr == probe.source)
}

/// What the packet path does with `probe` (the socket path, for
/// [`Entry::Host`]).
#[must_use]
pub fn trace(desired: &Desired, probe: &Probe) -> Outcome {
    let Some(df) = frontend(desired, probe) else {
        // No frontend for this port and protocol: a ClusterIP rejects, the
        // rest of a service CIDR drops (the longest prefix decides).
        let dst = probe.destination.ip();
        return match desired.unserved.iter().filter(|(c, _)| c.contains(dst)).max_by_key(|(c, _)| c.prefix_len) {
            Some((_, WhenEmpty::Reject)) => Outcome::Reject,
            Some((_, WhenEmpty::Drop)) => Outcome::Drop,
            None => Outcome::Untouched,
        };
    };
    if probe.entry == Entry::Host {
        return socket(df);
    }
    if !df.source_ranges.is_empty() && !df.source_ranges.iter().any(|r| r.contains(probe.source)) {
        return Outcome::Drop;
    }
    if df.backends.is_empty() {
        return match df.when_empty {
            WhenEmpty::Reject => Outcome::Reject,
            WhenEmpty::Drop => Outcome::Drop,
        };
    }
    Outcome::Forward {
        endpoints: df.backends.iter().map(|b| SocketAddr::new(b.addr, b.port)).collect(),
        masquerade: df.backends.iter().any(|b| masqueraded(df, probe, b)),
    }
}

/// What the socket path does with a connect() or sendmsg() of the node's
/// own to `df`'s address: no source check (`loadBalancerSourceRanges`
/// filter what comes from outside); without an endpoint this node may use
/// the call fails with ECONNREFUSED, whether the packet path would reject
/// or drop (an application is told at once rather than left to time out);
/// else one of the endpoints. Nothing rewrites the socket's source: the
/// kernel picks the node's address for the route to the backend.
fn socket(df: &DesiredFrontend) -> Outcome {
    if df.backends.is_empty() {
        return Outcome::Reject;
    }
    Outcome::Forward {
        endpoints: df.backends.iter().map(|b| SocketAddr::new(b.addr, b.port)).collect(),
        masquerade: false,
    }
}
