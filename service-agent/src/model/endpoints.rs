//! Which endpoints a frontend forwards to, as kube-proxy decides it
//! (pkg/proxy/topology.go `CategorizeEndpoints`):
//!
//! 1. readiness: the `ready` endpoints (unknown readiness counts as ready);
//!    when none is ready anywhere, those that are `serving` and
//!    `terminating` (KEP-1669); never the rest;
//! 2. traffic policy `Local`: only endpoints on this node (readiness
//!    fallback applied to the local ones on their own);
//! 3. otherwise topology, from the EndpointSlice hints alone (the
//!    EndpointSlice controller writes them only for Services that ask, by
//!    `trafficDistribution` or the topology-mode annotation): the ready
//!    endpoints hinted for this node when every ready endpoint has node
//!    hints and one names this node, else those hinted for this node's zone
//!    under the same rule, else all of them. The terminating fallback is
//!    never filtered by topology.
//!
//! The same address twice (across slices): a non-terminating one replaces
//! a terminating one.

use std::{collections::BTreeMap, net::IpAddr};

use super::{Backend, IpFamily, ModelError, NodeContext, Protocol};
use crate::vocabulary::{ObjectRef, Slice, SliceEndpoint};

/// One endpoint address:port with what the selection needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub backend: Backend,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// `hints.forZones[].name`; `None` when the endpoint has no zone hints.
    pub zones: Option<Vec<String>>,
    /// `hints.forNodes[].name`; `None` when the endpoint has no node hints.
    pub nodes: Option<Vec<String>>,
}

fn conditions(ep: &SliceEndpoint) -> (bool, bool, bool) {
    let c = ep.conditions.as_ref();
    // The API says: nil ready means unknown and "should be interpreted as
    // ready"; nil serving follows ready; nil terminating means false.
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    let serving = c.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
    (ready, serving, terminating)
}

/// Every endpoint of `slices` of `family` (`addressType`) on the slice port
/// named `port_name` with `protocol`, duplicates (same address and port)
/// removed, the first slice (by name) winning. Slices of the other family
/// never feed this family's frontends (kube-proxy's proxier of each family
/// reads only its own); FQDN slices feed none.
#[must_use]
pub fn candidates(
    namespace: &str,
    port_name: &str,
    protocol: Protocol,
    family: IpFamily,
    slices: &[&Slice],
    node: &NodeContext,
    errors: &mut Vec<ModelError>,
) -> Vec<Candidate> {
    let mut out: BTreeMap<(IpAddr, u16), Candidate> = BTreeMap::new();
    for slice in slices {
        if slice.address_type != family.name() {
            continue;
        }
        let slice_ref =
            ObjectRef { namespace: namespace.into(), name: slice.metadata.name.as_deref().unwrap_or_default().into() };
        let slice_err = |field: String, message: String| ModelError {
            kind: "EndpointSlice",
            object: slice_ref.clone(),
            field,
            message,
        };
        let mut matching = slice.ports.iter().flatten().enumerate().filter(|(_, p)| {
            p.name.as_deref().unwrap_or("") == port_name
                && Protocol::parse(p.protocol.as_deref()).is_ok_and(|proto| proto == protocol)
        });
        let Some((pi, slice_port)) = matching.next() else { continue };
        if let Some((again, _)) = matching.next() {
            // The API server refuses a port name twice in one slice.
            errors.push(slice_err(
                format!("ports[{again}]"),
                format!("port name {port_name:?} ({protocol}) is a duplicate of ports[{pi}]; only that one is used"),
            ));
        }
        let Some(port) = slice_port.port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) else {
            errors.push(slice_err(
                format!("ports[{pi}].port"),
                format!(
                    "{} is not a valid port (1-65535)",
                    slice_port.port.map_or_else(|| "unset".into(), |p| p.to_string())
                ),
            ));
            continue;
        };
        for (ei, endpoint) in slice.endpoints.iter().flatten().enumerate() {
            // All addresses of an endpoint are fungible; Kubernetes and
            // kube-proxy use the first.
            let Some(addr) = endpoint.address.as_deref() else { continue };
            let field = || format!("endpoints[{ei}].addresses[0]");
            let ip = match addr.parse::<IpAddr>() {
                Ok(ip) if IpFamily::of(ip) != family => {
                    errors.push(slice_err(field(), format!("{addr:?} is not an {family} address (addressType)")));
                    continue;
                }
                Ok(ip) => {
                    if let Some(why) = super::special_ip(ip) {
                        errors.push(slice_err(field(), format!("{addr:?} {why}")));
                        continue;
                    }
                    ip
                }
                Err(e) => {
                    errors.push(slice_err(field(), format!("{addr:?} is not an {family} address: {e}")));
                    continue;
                }
            };
            let (ready, serving, terminating) = conditions(endpoint);
            let hints = endpoint.hints.as_ref();
            let candidate = Candidate {
                backend: Backend {
                    addr: ip,
                    port,
                    protocol,
                    local: endpoint.node_name.as_deref() == Some(node.node_name.as_str()),
                    ready,
                },
                ready,
                serving,
                terminating,
                zones: hints.and_then(|h| h.for_zones.as_ref()).map(|z| z.iter().map(|z| z.name.clone()).collect()),
                nodes: hints.and_then(|h| h.for_nodes.as_ref()).map(|n| n.iter().map(|n| n.name.clone()).collect()),
            };
            // The same address twice (across slices, or an IP the pod
            // network reused before the terminating pod's endpoint is
            // gone): a non-terminating one replaces what came before, as
            // kube-proxy's EndpointSliceCache does.
            match out.entry((ip, port)) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(candidate);
                }
                std::collections::btree_map::Entry::Occupied(mut o) => {
                    if !candidate.terminating {
                        o.insert(candidate);
                    }
                }
            }
        }
    }
    out.into_values().collect()
}

/// Ready endpoints, else serving-and-terminating ones.
fn usable<'a>(candidates: impl Iterator<Item = &'a Candidate> + Clone) -> Vec<&'a Candidate> {
    let ready: Vec<&Candidate> = candidates.clone().filter(|c| c.ready).collect();
    if !ready.is_empty() {
        return ready;
    }
    candidates.filter(|c| c.serving && c.terminating).collect()
}

/// The ready endpoints hinted for `name` when every ready endpoint carries
/// such hints and at least one names it.
fn hinted<'a>(
    ready: &[&'a Candidate],
    hints: impl Fn(&Candidate) -> Option<&Vec<String>>,
    name: &str,
) -> Option<Vec<&'a Candidate>> {
    let all_hinted = ready.iter().all(|c| hints(c).is_some_and(|h| !h.is_empty()));
    let mine: Vec<&Candidate> =
        ready.iter().copied().filter(|c| hints(c).is_some_and(|h| h.iter().any(|n| n == name))).collect();
    (all_hinted && !mine.is_empty()).then_some(mine)
}

/// The endpoints for cluster-wide traffic (kube-proxy's
/// `CategorizeEndpoints`): the ready endpoints topology allows, where the
/// hints decide (node hints for this node when every ready endpoint has
/// some, else zone hints for this node's zone likewise, else all); when no
/// endpoint is ready anywhere, the serving-and-terminating ones, topology
/// not applied.
#[must_use]
pub fn cluster(candidates: &[Candidate], node: &NodeContext) -> Vec<Backend> {
    let ready: Vec<&Candidate> = candidates.iter().filter(|c| c.ready).collect();
    if ready.is_empty() {
        return candidates.iter().filter(|c| c.serving && c.terminating).map(|c| c.backend).collect();
    }
    let chosen = hinted(&ready, |c| c.nodes.as_ref(), &node.node_name)
        .or_else(|| node.zone.as_deref().and_then(|zone| hinted(&ready, |c| c.zones.as_ref(), zone)));
    chosen.unwrap_or(ready).into_iter().map(|c| c.backend).collect()
}

/// The endpoints for `Local` traffic policy: this node's only.
#[must_use]
pub fn local(candidates: &[Candidate]) -> Vec<Backend> {
    usable(candidates.iter().filter(|c| c.backend.local)).into_iter().map(|c| c.backend).collect()
}

/// Whether any endpoint at all is usable (else the Service rejects).
#[must_use]
pub fn any_usable(candidates: &[Candidate]) -> bool {
    !usable(candidates.iter()).is_empty()
}
