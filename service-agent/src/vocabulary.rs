//! The words every layer shares, and nothing else: Kubernetes object
//! references and the object store the sources fill ([`Objects`]), the
//! well-known label and annotation names, CIDRs, and interface-name globs.
//! A leaf: it imports no other module of the agent, so sources, model and
//! attach manager all use it without depending on each other.

use std::{collections::BTreeMap, fmt, net::IpAddr, sync::Arc};

use imbl::ordmap::DiffItem;

use k8s_openapi::api::{
    core::v1::{Node, Service},
    networking::v1::ServiceCIDR,
};

mod slice;
pub use slice::{Slice, SliceEndpoint};

/// `namespace/name` of an object. An object without a namespace is in
/// `default`, as `kubectl apply` would put it. A cluster-scoped object (a
/// ServiceCIDR) has an empty namespace and is shown by its name alone.
///
/// Both strings are shared (`Arc<str>`): a reference is held in many
/// places (the snapshot maps, the model's indexes, each frontend's
/// Service), and a clone costs a count, not two allocations.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() { f.write_str(&self.name) } else { write!(f, "{}/{}", self.namespace, self.name) }
    }
}

/// Objects of one kind by reference: a persistent ordered map. A clone
/// costs O(1) and shares every node; an insert or removal copies only the
/// path to its key, so a snapshot that differs from the last in a few
/// objects shares all the rest of its structure with it, and
/// [`imbl::OrdMap::diff`] between the two skips the shared subtrees: the
/// model finds a change in O(changes × log n), not by walking every key.
pub type ObjectMap<T> = imbl::OrdMap<ObjectRef, Arc<T>>;

/// Everything a source currently knows: the store the model reads.
///
/// Services and EndpointSlices are shared (`Arc`) in persistent maps
/// ([`ObjectMap`]): a snapshot is cloned per change without copying the
/// objects or the maps, and a source that changes a few objects changes
/// only their paths, so the incremental model ([`crate::model::Model`])
/// finds them by diffing the last snapshot's maps with the new ones,
/// skipping what both share. Sources keep that sharing: the Kubernetes
/// source applies each watch event to its last published maps, and one
/// that rebuilds everything (the manifest directory) rebases its new maps
/// on the last ones ([`Self::share_unchanged`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    pub services: ObjectMap<Service>,
    /// Slimmed at the source ([`Slice`]).
    pub endpoint_slices: ObjectMap<Slice>,
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
    /// Rebases this snapshot's Services and EndpointSlices on `previous`'s
    /// maps: the result holds the same objects, but every object equal in
    /// both is `previous`'s allocation and every subtree without a change
    /// is `previous`'s node, so a source that rebuilds the whole snapshot
    /// (the manifest directory) still hands the model a snapshot whose
    /// diff with the last one is only what changed.
    pub fn share_unchanged(&mut self, previous: &Self) {
        self.services = rebase(&self.services, &previous.services);
        self.endpoint_slices = rebase(&self.endpoint_slices, &previous.endpoint_slices);
    }
}

/// The keys added, changed or removed from `old` to `new`, in key order;
/// the subtrees the two maps share are skipped (objects are compared by
/// value only where their allocations differ).
#[must_use]
pub fn changed_keys<T: PartialEq>(old: &ObjectMap<T>, new: &ObjectMap<T>) -> Vec<ObjectRef> {
    old.diff(new)
        .map(|change| match change {
            DiffItem::Add(key, _) | DiffItem::Update { new: (key, _), .. } | DiffItem::Remove(key, _) => key.clone(),
        })
        .collect()
}

/// `now`'s content built on `previous`: `previous` with the differences
/// applied (objects compared by value where their allocations differ).
#[must_use]
pub fn rebase<T: PartialEq>(now: &ObjectMap<T>, previous: &ObjectMap<T>) -> ObjectMap<T> {
    let mut out = previous.clone();
    for change in previous.diff(now) {
        match change {
            DiffItem::Add(key, object) | DiffItem::Update { new: (key, object), .. } => {
                out.insert(key.clone(), Arc::clone(object));
            }
            DiffItem::Remove(key, _) => {
                out.remove(key);
            }
        }
    }
    out
}

/// Label linking an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The EndpointSlice annotation kube-proxy measures network programming
/// latency from.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";
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
        for i in 0..1000 {
            before.services.insert(key(&format!("s{i:04}")), service(&format!("10.96.{}.{}", i / 256, i % 256)));
        }
        // Rebuilt from scratch, as the manifest source does: every object
        // a new allocation, one of them changed, one added, one removed.
        let mut now = Objects::default();
        for i in 1..1000 {
            let ip = if i == 500 { "10.100.0.1".to_owned() } else { format!("10.96.{}.{}", i / 256, i % 256) };
            now.services.insert(key(&format!("s{i:04}")), service(&ip));
        }
        now.services.insert(key("t"), service("10.100.0.2"));
        let expected = now.clone();
        now.share_unchanged(&before);
        assert_eq!(now, expected, "the same content");
        assert!(Arc::ptr_eq(&now.services[&key("s0001")], &before.services[&key("s0001")]));
        assert!(!Arc::ptr_eq(&now.services[&key("s0500")], &before.services[&key("s0500")]));
        let changed: Vec<String> =
            changed_keys(&before.services, &now.services).into_iter().map(|k| k.name.to_string()).collect();
        assert_eq!(changed, ["s0000", "s0500", "t"]);
        let mut copy = now.clone();
        assert_eq!(copy, now, "a clone shares every object");
        copy.services.insert(key("s0001"), service("10.96.0.1"));
        assert_eq!(copy, now, "an equal copy is equal");
    }
}
