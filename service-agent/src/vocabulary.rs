//! The words every layer shares, and nothing else: Kubernetes object
//! references and the object store the sources fill ([`Objects`]), the
//! well-known label and annotation names, CIDRs, and interface-name globs.
//! A leaf: it imports no other module of the agent, so sources, model and
//! attach manager all use it without depending on each other.

use std::{collections::BTreeMap, fmt, net::IpAddr, sync::Arc};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::ServiceCIDR,
};

/// `namespace/name` of an object. An object without a namespace is in
/// `default`, as `kubectl apply` would put it. A cluster-scoped object (a
/// ServiceCIDR) has an empty namespace and is shown by its name alone.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() { f.write_str(&self.name) } else { write!(f, "{}/{}", self.namespace, self.name) }
    }
}

/// Everything a source currently knows: the store the model reads.
///
/// Services and EndpointSlices are shared (`Arc`): a snapshot is cloned
/// per change without copying the objects, and an object a source did not
/// replace is the same allocation in the next snapshot, so the incremental
/// model ([`crate::model::Model`]) tells what changed with
/// [`Arc::ptr_eq`] rather than a deep comparison. (A new allocation of an
/// equal object only costs its Service a recomputation.)
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    pub services: BTreeMap<ObjectRef, Arc<Service>>,
    pub endpoint_slices: BTreeMap<ObjectRef, Arc<EndpointSlice>>,
    /// This node's Node object, when the source knows it (its zone label
    /// drives topology-aware routing).
    pub node: Option<Node>,
    /// The ServiceCIDR objects (`networking.k8s.io/v1`, cluster-scoped), by
    /// name: the ranges ClusterIPs are allocated from, besides
    /// `--service-cluster-ip-range`. May be empty in a cluster that has
    /// some: the Kubernetes source publishes without them until they are
    /// listed, and before 1.33 or without RBAC for them never lists them.
    pub service_cidrs: BTreeMap<String, ServiceCIDR>,
}

impl Objects {
    /// Takes over `previous`'s allocation of every Service and
    /// EndpointSlice that is equal in both, so a source that rebuilds the
    /// whole snapshot (the manifest directory) still hands the model the
    /// same `Arc` for what did not change.
    pub fn share_unchanged(&mut self, previous: &Self) {
        share(&mut self.services, &previous.services);
        share(&mut self.endpoint_slices, &previous.endpoint_slices);
    }

    /// Whether `other` holds the very same Service and EndpointSlice
    /// allocations (compared by pointer, not by value) and equal Node and
    /// ServiceCIDRs: a cheap "nothing changed" for sources that share
    /// their objects.
    #[must_use]
    pub fn is_same(&self, other: &Self) -> bool {
        same_arcs(&self.services, &other.services)
            && same_arcs(&self.endpoint_slices, &other.endpoint_slices)
            && self.node == other.node
            && self.service_cidrs == other.service_cidrs
    }
}

fn same_arcs<T>(a: &BTreeMap<ObjectRef, Arc<T>>, b: &BTreeMap<ObjectRef, Arc<T>>) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|((ka, va), (kb, vb))| Arc::ptr_eq(va, vb) && ka == kb)
}

fn share<T: PartialEq>(now: &mut BTreeMap<ObjectRef, Arc<T>>, previous: &BTreeMap<ObjectRef, Arc<T>>) {
    for (key, object) in now.iter_mut() {
        if let Some(old) = previous.get(key).filter(|old| !Arc::ptr_eq(old, object) && ***old == **object) {
            object.clone_from(old);
        }
    }
}

/// Label linking an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Services carrying this label belong to another proxy (kube-proxy skips
/// them too).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

/// Node label with the node's zone (topology-aware routing).
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// The older annotation that turns on topology-aware hints.
pub const ANNOTATION_TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";
/// Label that stops the mirroring controller from mirroring an Endpoints.
pub const LABEL_SKIP_MIRROR: &str = "endpointslice.kubernetes.io/skip-mirror";
/// `managed-by` value of mirrored slices.
pub const MIRRORING_CONTROLLER: &str = "endpointslicemirroring-controller.k8s.io";

/// The EndpointSlice label naming the controller that manages a slice.
pub const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";

/// An IPv4 or IPv6 prefix (`loadBalancerSourceRanges`, service CIDRs,
/// `--nodeport-addresses`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl Cidr {
    /// The prefix of `addr` alone (/32, /128).
    #[must_use]
    pub const fn host(addr: IpAddr) -> Self {
        Self { addr, prefix_len: if addr.is_ipv4() { 32 } else { 128 } }
    }

    /// Whether `addr` lies inside the prefix (never across families).
    #[must_use]
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.addr, addr) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = 32u32.checked_sub(u32::from(self.prefix_len)).map_or(u32::MAX, |shift| {
                    // A /0 shifts by 32: nothing of the address is compared.
                    u32::MAX.checked_shl(shift).unwrap_or(0)
                });
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = 128u32
                    .checked_sub(u32::from(self.prefix_len))
                    .map_or(u128::MAX, |shift| u128::MAX.checked_shl(shift).unwrap_or(0));
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s.trim().split_once('/').ok_or_else(|| format!("{s:?} is not a CIDR (address/length)"))?;
        let addr: IpAddr = addr.parse().map_err(|e| format!("{s:?} is not a CIDR: {e}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len: u8 =
            len.parse().ok().filter(|l| *l <= max).ok_or_else(|| format!("{s:?} has an invalid prefix length"))?;
        Ok(Self { addr, prefix_len })
    }
}

/// Interface name globs (`*` and `?`), kube-proxy-style comma separated.
#[derive(Clone, Debug, Default)]
pub struct Globs(Vec<String>);

impl Globs {
    /// The patterns as given.
    #[must_use]
    pub fn from_patterns(patterns: Vec<String>) -> Self {
        Self(patterns)
    }

    #[must_use]
    pub fn parse(list: &str) -> Self {
        Self(list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
    }

    #[must_use]
    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|g| glob_match(g.as_bytes(), name.as_bytes()))
    }
}

fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.split_first(), name.split_first()) {
        (None, None) => true,
        (Some((b'*', rest)), _) => glob_match(rest, name) || (!name.is_empty() && glob_match(pattern, &name[1..])),
        (Some((b'?', rest)), Some((_, name_rest))) => glob_match(rest, name_rest),
        (Some((p, rest)), Some((n, name_rest))) if p == n => glob_match(rest, name_rest),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ServiceSpec;

    use super::*;

    #[test]
    fn share_unchanged_keeps_the_allocation_of_equal_objects_only() {
        let key = |name: &str| ObjectRef { namespace: "default".into(), name: name.into() };
        let service = |ip: &str| {
            Arc::new(Service {
                spec: Some(ServiceSpec { cluster_ip: Some(ip.into()), ..ServiceSpec::default() }),
                ..Service::default()
            })
        };
        let mut before = Objects::default();
        before.services.insert(key("a"), service("10.96.0.1"));
        before.services.insert(key("b"), service("10.96.0.2"));
        let mut now = Objects::default();
        now.services.insert(key("a"), service("10.96.0.1"));
        now.services.insert(key("b"), service("10.96.0.3"));
        now.services.insert(key("c"), service("10.96.0.4"));
        now.share_unchanged(&before);
        assert!(Arc::ptr_eq(&now.services[&key("a")], &before.services[&key("a")]));
        assert!(!Arc::ptr_eq(&now.services[&key("b")], &before.services[&key("b")]));
        assert!(!now.is_same(&before));
        assert!(now.clone().is_same(&now), "a clone shares every object");
        let mut copy = now.clone();
        copy.services.insert(key("a"), service("10.96.0.1"));
        assert!(!copy.is_same(&now), "an equal copy is another allocation");
        assert_eq!(copy, now);
    }
}
