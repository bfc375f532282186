//! The model: a pure function from Kubernetes objects and the node's context
//! to the frontends the dataplane must serve and the backends behind each.
//! All Service API semantics live here; there is no I/O, so it is tested
//! with plain unit and golden tests.
//!
//! - Types: ClusterIP (`spec.clusterIPs`, one per family),
//!   NodePort (each port's `nodePort` on every node address of the
//!   ClusterIP's family, plus the ClusterIP), LoadBalancer (NodePort plus
//!   each `status.loadBalancer.ingress[].ip`, except `ipMode: Proxy` ones,
//!   whose traffic must go through the load balancer), `spec.externalIPs`;
//!   headless, ExternalName and Services labelled
//!   `service.kubernetes.io/service-proxy-name` get nothing.
//! - Families, as kube-proxy's one proxier per family: a Service is served
//!   in each family it has a ClusterIP of (`spec.clusterIPs`, checked
//!   against `clusterIP`, `ipFamilies` and `ipFamilyPolicy`), each family's
//!   frontends (its ClusterIP, NodePorts on the node's addresses of it, its
//!   LoadBalancer and external IPs, its `loadBalancerSourceRanges`) with
//!   the endpoints of that family's EndpointSlices only.
//! - Ports: ServicePorts matched to EndpointSlice ports by name, per slice
//!   (named targetPorts may resolve differently per pod); TCP, UDP, SCTP.
//! - Endpoints, traffic policies and topology: see [`endpoints`].
//! - `sessionAffinity: ClientIP` with its timeout (default 10800 s),
//!   `loadBalancerSourceRanges`, `healthCheckNodePort` carried to the rows.
//! - No usable endpoint: "reject"; endpoints, but none this node may use
//!   under a `Local` policy: "drop".
//! - Masquerade per frontend, as kube-proxy marks it: traffic from outside
//!   under `externalTrafficPolicy: Cluster`, pod traffic to the external
//!   frontends of such a Service, traffic from outside to a ClusterIP (each
//!   ClusterIP has an external-scope twin), and with `--masquerade-all` pod
//!   traffic to ClusterIPs.
//! - The service IP ranges (`unserved`): a ClusterIP's unserved port
//!   rejects, an unallocated address of `--service-cluster-ip-range` or of
//!   a ServiceCIDR object drops.
//!
//! What the API server's validation would refuse (an unknown type, a port
//! out of 1-65535, the same port and protocol twice, an invalid targetPort,
//! an address that is not one or is special, an unknown policy) is reported
//! as a [`ModelError`] naming the object and the field; the rest of the
//! object is served where that is safe (a bad port skips that port, a bad
//! address that address, a bad policy or affinity timeout falls back to
//! the default), and every other object is unaffected.

pub mod endpoints;
mod incremental;
pub mod trace;

pub use self::incremental::{Changes, Model};

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        networking::v1::ServiceCIDR,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::vocabulary::{Cidr, LABEL_SERVICE_PROXY_NAME, LABEL_ZONE, ObjectRef, Objects, Slice};

/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The API server's largest `sessionAffinityConfig.clientIP.timeoutSeconds`
/// (one day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// What the model needs to know about the node it runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    pub node_name: String,
    /// The node's zone; the Node object's `topology.kubernetes.io/zone`
    /// label takes precedence when the source has the Node.
    pub zone: Option<String>,
    /// The addresses NodePorts answer on (`--nodeport-addresses`).
    pub nodeport_addresses: Vec<IpAddr>,
    /// kube-proxy's `--masquerade-all`: pod traffic to ClusterIPs is
    /// masqueraded too.
    pub masquerade_all: bool,
    /// The ranges ClusterIPs are allocated from (`--service-cluster-ip-range`):
    /// traffic to an address of them that no Service has is dropped. The
    /// ServiceCIDR objects' ranges are added to these.
    pub service_cidrs: Vec<Cidr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => service_common::PROTO_TCP,
            Self::Udp => service_common::PROTO_UDP,
            Self::Sctp => service_common::PROTO_SCTP,
        }
    }

    /// Parses a Kubernetes protocol name; `None` (unset) means TCP.
    fn parse(value: Option<&str>) -> Result<Self, String> {
        match value.unwrap_or("TCP") {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            "SCTP" => Ok(Self::Sctp),
            other => Err(format!("{other:?} is not a protocol (TCP, UDP, SCTP)")),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// Which traffic a frontend answers (see `service_common::SCOPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Traffic entering from outside the node (NodePort, LoadBalancer,
    /// externalIPs): `externalTrafficPolicy` applies.
    External,
    /// Traffic from pods to a ClusterIP: `internalTrafficPolicy` applies.
    Internal,
}

impl Scope {
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Self::External => service_common::SCOPE_EXTERNAL,
            Self::Internal => service_common::SCOPE_INTERNAL,
        }
    }
}

/// An address:port/protocol a Service answers on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scope = match self.scope {
            Scope::External => "external",
            Scope::Internal => "internal",
        };
        write!(f, "{}/{} {scope}", SocketAddr::new(self.addr, self.port), self.protocol)
    }
}

/// What kind of address a frontend is (for logs, `inspect` and golden
/// files; the dataplane only sees the scope).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
            Self::ExternalIp => "externalIP",
        })
    }
}

/// One endpoint address:port a frontend forwards to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// The endpoint's `nodeName` is this node.
    pub local: bool,
    /// `false`: a serving-but-terminating endpoint, used only because the
    /// Service has no ready one (the fallback of KEP-1669).
    pub ready: bool,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", SocketAddr::new(self.addr, self.port), self.protocol)
    }
}

/// What the dataplane does with a new flow to a frontend without backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WhenEmpty {
    /// The Service has no usable endpoint: TCP RST / ICMP port unreachable,
    /// as kube-proxy does.
    Reject,
    /// It has endpoints, but a `Local` traffic policy leaves none on this
    /// node: drop silently, as kube-proxy does.
    Drop,
}

/// The desired state of one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFrontend {
    pub service: ObjectRef,
    /// The ServicePort's name ("" for the unnamed port).
    pub port_name: String,
    pub frontend: Frontend,
    pub kind: FrontendKind,
    /// Sorted and free of duplicates.
    pub backends: Vec<Backend>,
    pub when_empty: WhenEmpty,
    /// `sessionAffinity: ClientIP`: the timeout in seconds.
    pub affinity_timeout_s: Option<u32>,
    /// With affinity: the Service port's ClusterIP frontend, whose rev-NAT
    /// id names the affinity entries every frontend of the port shares
    /// (kube-proxy keeps affinity per Service port: a client keeps its
    /// endpoint whether it dials the ClusterIP, a NodePort, a LoadBalancer
    /// IP or an external IP). `None` without affinity.
    pub affinity_scope: Option<Frontend>,
    /// `loadBalancerSourceRanges` (the LoadBalancer ingress frontends, as
    /// kube-proxy filters them, plus the ingress IPs themselves, which a
    /// load balancer that SNATs to its own address uses); empty means every
    /// source.
    pub source_ranges: Vec<Cidr>,
    /// New flows get this node's address as their source (kube-proxy's
    /// masquerade mark): traffic from outside the node unless a `Local`
    /// external policy keeps the client's address, pod traffic to a
    /// NodePort, LoadBalancer IP or external IP of a `Cluster` policy
    /// Service, and with `--masquerade-all` pod traffic to ClusterIPs. (A
    /// pod landing on itself is masqueraded whatever this says.)
    pub masquerade: bool,
}

/// A Service with `externalTrafficPolicy: Local` and a `healthCheckNodePort`:
/// the node answers on that port whether it has local endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    pub local_endpoints: usize,
}

/// An object, or a field of it, the model could not use. Reported with the
/// field path; other objects and the object's other ports are unaffected.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, thiserror::Error)]
#[error("{kind} {object}: {field}: {message}")]
pub struct ModelError {
    pub kind: &'static str,
    pub object: ObjectRef,
    pub field: String,
    pub message: String,
}

/// Everything the dataplane should serve.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Each shared with the model's per-Service output (an `Arc`: cloning
    /// the desired state, or keeping what was written, copies no frontend).
    pub frontends: BTreeMap<Frontend, Arc<DesiredFrontend>>,
    /// What a new flow to a Service address gets when no frontend serves
    /// its port and protocol: every ClusterIP rejects (a /32), the rest of
    /// each service CIDR drops, as kube-proxy's nftables mode does.
    pub unserved: BTreeMap<Cidr, WhenEmpty>,
    pub health_checks: BTreeMap<ObjectRef, HealthCheck>,
    pub errors: Vec<ModelError>,
}

/// Computes the desired frontends from the objects, every Service from
/// scratch. The agent keeps a [`Model`] instead, which recomputes only the
/// Services whose inputs changed and always equals this.
///
/// Services are taken in [`ObjectRef`] order and each Service's frontends
/// in the order it lists them: a frontend two of them ask for goes to the
/// first, and the others are told (a [`ModelError`]).
#[must_use]
pub fn desired(objects: &Objects, node: &NodeContext) -> Desired {
    let node = node_with_zone(objects, node);
    let mut out = Desired::default();
    let slices = slices_by_service(objects);
    for (svc_ref, svc) in &objects.services {
        let svc_slices = slices.get(svc_ref).map_or(&[][..], Vec::as_slice);
        let output = service_frontends(svc_ref, svc, svc_slices, &node);
        out.errors.extend(output.errors);
        let mut has_external_frontend = false;
        for c in output.claims {
            if let Some(existing) = out.frontends.get(&c.df.frontend) {
                out.errors.push(c.conflict(existing));
                continue;
            }
            has_external_frontend |= c.is_external();
            out.errors.extend(c.sctp_error.map(|e| *e));
            out.frontends.insert(c.df.frontend, c.df);
        }
        match output.health {
            Some(Ok(check)) if has_external_frontend => {
                out.health_checks.insert(svc_ref.clone(), check);
            }
            Some(Err(e)) if has_external_frontend => out.errors.push(*e),
            _ => {}
        }
    }
    for cidr in node.service_cidrs.iter().copied().chain(service_cidr_objects(&objects.service_cidrs, &mut out.errors))
    {
        out.unserved.insert(cidr, WhenEmpty::Drop);
    }
    let cluster_ips = out.frontends.values().filter(|df| df.kind == FrontendKind::ClusterIp);
    for df in cluster_ips.filter(|df| df.frontend.scope == Scope::Internal) {
        out.unserved.insert(Cidr::host(df.frontend.addr), WhenEmpty::Reject);
    }
    out.errors.sort();
    out.errors.dedup();
    out
}

/// `node` with the zone of the Node object's `topology.kubernetes.io/zone`
/// label, when the source has the Node and it has one.
fn node_with_zone(objects: &Objects, node: &NodeContext) -> NodeContext {
    let mut node = node.clone();
    if let Some(zone) = objects.node.as_ref().and_then(|n| n.metadata.labels.as_ref()).and_then(|l| l.get(LABEL_ZONE)) {
        node.zone = Some(zone.clone());
    }
    node
}

/// The ranges of every ServiceCIDR object (`spec.cidrs`), used as
/// `--service-cluster-ip-range` is. One being deleted still counts: the API
/// server keeps it while addresses of it are allocated, and kube-proxy uses
/// it until it is gone. Ranges of both families apply (the rows are keyed
/// per family). A range that does not parse is reported and the others
/// apply.
fn service_cidr_objects(service_cidrs: &BTreeMap<String, ServiceCIDR>, errors: &mut Vec<ModelError>) -> Vec<Cidr> {
    let mut cidrs = Vec::new();
    for (name, object) in service_cidrs {
        let listed = object.spec.as_ref().and_then(|spec| spec.cidrs.as_ref());
        for (i, text) in listed.into_iter().flatten().enumerate() {
            match text.parse::<Cidr>() {
                Ok(cidr) => cidrs.push(cidr),
                Err(message) => errors.push(ModelError {
                    kind: "ServiceCIDR",
                    // Cluster-scoped: named by its name alone.
                    object: ObjectRef { namespace: "".into(), name: name.as_str().into() },
                    field: format!("spec.cidrs[{i}]"),
                    message,
                }),
            }
        }
    }
    cidrs
}

fn slices_by_service(objects: &Objects) -> BTreeMap<ObjectRef, Vec<&Slice>> {
    let mut by_service: BTreeMap<ObjectRef, Vec<&Slice>> = BTreeMap::new();
    for (slice_ref, slice) in &objects.endpoint_slices {
        if let Some(key) = slice_service(slice_ref, slice) {
            by_service.entry(key).or_default().push(slice.as_ref());
        }
    }
    by_service
}

/// The Service a slice belongs to: its `kubernetes.io/service-name` label,
/// in its own namespace.
fn slice_service(slice_ref: &ObjectRef, slice: &Slice) -> Option<ObjectRef> {
    let name = slice.service_name.as_ref()?;
    Some(ObjectRef { namespace: slice_ref.namespace.clone(), name: Arc::clone(name) })
}

/// What one Service asks for on its own, before frontends are shared out
/// between Services (a frontend two of them ask for goes to the first,
/// which only the whole set of Services can tell).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ServiceOutput {
    /// Every frontend the Service asks for, in the order it lists them;
    /// of two asking for one frontend, the first gets it.
    claims: Vec<FrontendClaim>,
    /// What is wrong with the Service or its slices, whatever the other
    /// Services ask for.
    errors: Vec<ModelError>,
    /// Its `healthCheckNodePort`, or why it is not served: applied when
    /// one of its external frontends (other than the ClusterIP's twin) is
    /// served.
    health: Option<HealthOutcome>,
}

/// A Service's health check, or why it has none (the error boxed: it is
/// rare, and an outcome is kept per Service).
type HealthOutcome = Result<HealthCheck, Box<ModelError>>;

/// A frontend a Service asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FrontendClaim {
    /// Shared with [`Desired::frontends`] and the reconciler's record of
    /// what it wrote: one copy of each frontend however many hold it.
    df: Arc<DesiredFrontend>,
    /// The index of its ServicePort in `spec.ports`.
    port_index: usize,
    /// Reported when it is served: SCTP endpoints left out for their port.
    /// (Boxed: rare, and a claim is kept per frontend.)
    sctp_error: Option<Box<ModelError>>,
}

impl FrontendClaim {
    /// Whether it is an external frontend other than the ClusterIP's twin
    /// (one of those makes the health check node port served).
    fn is_external(&self) -> bool {
        self.df.frontend.scope == Scope::External && self.df.kind != FrontendKind::ClusterIp
    }

    /// The error telling its Service that `served` (an earlier claim)
    /// has the frontend.
    fn conflict(&self, served: &DesiredFrontend) -> ModelError {
        ModelError {
            kind: "Service",
            object: self.df.service.clone(),
            field: format!("spec.ports[{}]", self.port_index),
            message: format!(
                "{} is already served by Service {} port {:?}",
                self.df.frontend, served.service, served.port_name
            ),
        }
    }
}

/// An address family: `spec.ipFamilies`, an EndpointSlice's `addressType`.
/// kube-proxy runs one proxier per family; the model serves each family a
/// Service has a ClusterIP of, each from that family's slices only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    Ipv4,
    Ipv6,
}

impl IpFamily {
    #[must_use]
    pub const fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Self::Ipv4,
            IpAddr::V6(_) => Self::Ipv6,
        }
    }

    /// The Kubernetes name (`ipFamilies`, `addressType`).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ipv4 => "IPv4",
            Self::Ipv6 => "IPv6",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        [Self::Ipv4, Self::Ipv6].into_iter().find(|f| f.name() == name)
    }

    const fn other(self) -> Self {
        match self {
            Self::Ipv4 => Self::Ipv6,
            Self::Ipv6 => Self::Ipv4,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why `ip` may not be a Service or endpoint address, as the API server's
/// `ValidateNonSpecialIP`/`ValidateEndpointIP` say it (a frontend there
/// would capture the node's own or link-local traffic).
#[must_use]
pub fn special_ipv4(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("may not be unspecified (0.0.0.0)")
    } else if ip.is_loopback() {
        Some("may not be in the loopback range (127.0.0.0/8)")
    } else if ip.is_link_local() {
        Some("may not be in the link-local range (169.254.0.0/16)")
    } else if ip.octets()[..3] == [224, 0, 0] {
        Some("may not be in the link-local multicast range (224.0.0.0/24)")
    } else {
        None
    }
}

/// [`special_ipv4`]'s IPv6 counterpart: the API server's checks (Go's
/// `IsLinkLocalMulticast` takes every ff02::/16 whatever the flag bits),
/// and IPv4-mapped addresses, which the API server refuses since 1.33
/// (strict IP validation) and which would be a second spelling of an IPv4
/// address here.
#[must_use]
pub fn special_ipv6(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    if ip.is_unspecified() {
        Some("may not be unspecified (::)")
    } else if ip.is_loopback() {
        Some("may not be the loopback address (::1)")
    } else if first & 0xffc0 == 0xfe80 {
        Some("may not be in the link-local range (fe80::/10)")
    } else if first & 0xff0f == 0xff02 {
        Some("may not be in the link-local multicast range (ff02::/16)")
    } else if ip.to_ipv4_mapped().is_some() {
        Some("may not be an IPv4-mapped IPv6 address (::ffff:0:0/96)")
    } else {
        None
    }
}

/// [`special_ipv4`] or [`special_ipv6`], by the address's family.
#[must_use]
pub fn special_ip(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) => special_ipv4(a),
        IpAddr::V6(a) => special_ipv6(a),
    }
}

/// A Service or endpoint address: an IP address of either family that is
/// not special; else why not.
fn usable_ip(text: &str) -> Result<IpAddr, String> {
    let ip = text.parse::<IpAddr>().map_err(|e| format!("{text:?} is not an IP address: {e}"))?;
    special_ip(ip).map_or(Ok(ip), |why| Err(format!("{text:?} {why}")))
}

/// Parses the addresses of an address list field (`spec.externalIPs`, the
/// LoadBalancer ingress IPs), keeping those of the `families` the Service
/// has a ClusterIP of. Unparsable and special ones are reported, and so is
/// an address of another family: kube-proxy's proxier of that family
/// skips a Service without a ClusterIP of it, so nothing serves it.
fn ip_list<'a>(
    field: &str,
    values: impl Iterator<Item = (String, &'a str)>,
    families: &[IpFamily],
    svc_ref: &ObjectRef,
    errors: &mut Vec<ModelError>,
) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for (suffix, text) in values {
        let err = |message: String| ModelError {
            kind: "Service",
            object: svc_ref.clone(),
            field: format!("{field}{suffix}"),
            message,
        };
        match usable_ip(text) {
            Ok(ip) if families.contains(&IpFamily::of(ip)) => out.push(ip),
            Ok(ip) => errors.push(err(format!(
                "{ip} is {}, and the Service has no {} ClusterIP (spec.clusterIPs): it is not served",
                IpFamily::of(ip),
                IpFamily::of(ip)
            ))),
            Err(message) => errors.push(err(message)),
        }
    }
    out
}

/// The ClusterIPs the Service is served on, at most one per family, the
/// primary (`spec.clusterIPs[0]`) first; `None` when headless. Each
/// ClusterIP is served in its own address's family. What contradicts
/// itself is reported and the consistent rest served: `clusterIP` other
/// than `clusterIPs[0]` (the list is used), a second ClusterIP of one
/// family (the first is used), `ipFamilies` that do not match the
/// addresses or name a family twice or an unknown one, more than one
/// family under `ipFamilyPolicy: SingleStack` (the primary is used), a
/// family without its ClusterIP under `RequireDualStack`. (Under
/// `PreferDualStack` one family is a valid outcome: the API server
/// allocates what the cluster has.)
fn cluster_ips(spec: &ServiceSpec, svc_ref: &ObjectRef, errors: &mut Vec<ModelError>) -> Option<Vec<IpAddr>> {
    let err = |field: String, message: String| ModelError { kind: "Service", object: svc_ref.clone(), field, message };
    let from_list = spec.cluster_ips.as_ref().is_some_and(|l| !l.is_empty());
    let list: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(list), _) if from_list => list.iter().map(String::as_str).collect(),
        (_, Some(one)) => vec![one.as_str()],
        _ => return None,
    };
    if list.iter().all(|ip| ip.is_empty() || *ip == "None") {
        return None;
    }
    let field = |i: usize| if from_list { format!("spec.clusterIPs[{i}]") } else { "spec.clusterIP".into() };
    if let Some(one) = spec.cluster_ip.as_deref().filter(|one| from_list && !one.is_empty() && *one != list[0]) {
        errors.push(err(
            "spec.clusterIP".into(),
            format!("{one:?} is not spec.clusterIPs[0] ({:?}); spec.clusterIPs is served", list[0]),
        ));
    }
    // (index in the list, address), one per family.
    let mut served: Vec<(usize, IpAddr)> = Vec::new();
    for (i, text) in list.iter().enumerate() {
        match usable_ip(text) {
            Err(message) => errors.push(err(field(i), message)),
            Ok(ip) => match served.iter().find(|(_, s)| IpFamily::of(*s) == IpFamily::of(ip)) {
                Some((first, _)) => errors.push(err(
                    field(i),
                    format!(
                        "{ip} is a second {} ClusterIP (a Service has one per family); only spec.clusterIPs[{first}] \
                         is served",
                        IpFamily::of(ip)
                    ),
                )),
                None => served.push((i, ip)),
            },
        }
    }
    let mut named: Vec<IpFamily> = Vec::new();
    for (k, name) in spec.ip_families.iter().flatten().enumerate() {
        let field = format!("spec.ipFamilies[{k}]");
        let Some(family) = IpFamily::parse(name) else {
            errors.push(err(field, format!("{name:?} is not an IP family (IPv4, IPv6)")));
            continue;
        };
        if named.contains(&family) {
            errors.push(err(field, format!("{family} is listed twice")));
            continue;
        }
        named.push(family);
        if let Some((i, ip)) = served.iter().find(|(i, _)| *i == k).filter(|(_, ip)| IpFamily::of(*ip) != family) {
            errors.push(err(
                field,
                format!(
                    "{family}, but spec.clusterIPs[{i}] ({ip}) is {}: each ClusterIP is served in its own family",
                    IpFamily::of(*ip)
                ),
            ));
        }
    }
    let policy = spec.ip_family_policy.as_deref();
    match policy {
        None | Some("SingleStack" | "PreferDualStack" | "RequireDualStack") => {}
        Some(other) => errors.push(err(
            "spec.ipFamilyPolicy".into(),
            format!(
                "{other:?} is not an IP family policy (SingleStack, PreferDualStack, RequireDualStack); it is ignored"
            ),
        )),
    }
    let primary = served.first().map(|(_, ip)| IpFamily::of(*ip));
    if policy == Some("SingleStack") && (list.len() > 1 || named.len() > 1) {
        errors.push(err(
            "spec.ipFamilyPolicy".into(),
            format!(
                "SingleStack, but the Service lists two families (spec.clusterIPs, spec.ipFamilies); only its primary \
                 ClusterIP{} is served",
                served.first().map(|(_, ip)| format!(" ({ip})")).unwrap_or_default()
            ),
        ));
        served.truncate(1);
    }
    if let (Some("RequireDualStack"), Some(primary), 1) = (policy, primary, served.len()) {
        let missing = primary.other();
        let field = named
            .iter()
            .position(|f| *f == missing)
            .map_or_else(|| "spec.ipFamilyPolicy".to_owned(), |k| format!("spec.ipFamilies[{k}]"));
        errors.push(err(
            field,
            format!(
                "{missing} has no ClusterIP (spec.clusterIPs) under ipFamilyPolicy RequireDualStack; only {primary} is \
                 served"
            ),
        ));
    }
    Some(served.into_iter().map(|(_, ip)| ip).collect())
}

fn service_port(port: &ServicePort) -> Result<(u16, Protocol), (&'static str, String)> {
    let number = u16::try_from(port.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(("port", format!("{} is not a valid port (1-65535)", port.port)))?;
    let protocol = Protocol::parse(port.protocol.as_deref()).map_err(|m| ("protocol", m))?;
    target_port(port.target_port.as_ref()).map_err(|m| ("targetPort", m))?;
    Ok((number, protocol))
}

/// Checks a targetPort the way the API server does after defaulting (0 and
/// "" become the port): a number in 1-65535 or an IANA service name (at
/// most 15 of a-z, 0-9 and '-', at least one letter, no '-' at either end
/// or twice in a row). The model itself does not use it: EndpointSlices
/// carry the resolved port of each endpoint.
fn target_port(value: Option<&IntOrString>) -> Result<(), String> {
    match value {
        None | Some(IntOrString::Int(0)) => Ok(()),
        Some(IntOrString::Int(n)) if (1..=65535).contains(n) => Ok(()),
        Some(IntOrString::Int(n)) => Err(format!("{n} is not a valid port (1-65535)")),
        Some(IntOrString::String(name)) => {
            let valid = name.is_empty()
                || name.len() <= 15
                    && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && name.bytes().any(|b| b.is_ascii_lowercase())
                    && !name.starts_with('-')
                    && !name.ends_with('-')
                    && !name.contains("--");
            if valid {
                Ok(())
            } else {
                Err(format!(
                    "{name:?} is neither a port number nor a port name (at most 15 of a-z, 0-9 and '-', with a letter, \
                     no '-' at an end or twice in a row)"
                ))
            }
        }
    }
}

/// A policy field's value: `Local`, or `Cluster` (also when unset). Another
/// value is reported and taken as `Cluster`, the default.
fn is_local_policy(
    value: Option<&str>,
    field: &str,
    err: &dyn Fn(String, String) -> ModelError,
) -> Result<bool, ModelError> {
    match value {
        None | Some("Cluster") => Ok(false),
        Some("Local") => Ok(true),
        Some(other) => {
            Err(err(field.into(), format!("{other:?} is not a traffic policy (Cluster, Local); Cluster is used")))
        }
    }
}

/// What a Service's spec says once for all its ports and families.
struct ServiceView<'a> {
    svc_ref: &'a ObjectRef,
    slices: &'a [&'a Slice],
    node: &'a NodeContext,
    external_ips: Vec<IpAddr>,
    lb_ingress: Vec<IpAddr>,
    /// `loadBalancerSourceRanges` of both families, plus the ingress IPs
    /// of each family whose ranges let this node in.
    source_ranges: Vec<Cidr>,
    affinity_timeout_s: Option<u32>,
    internal_local: bool,
    external_local: bool,
}

impl ServiceView<'_> {
    fn err(&self, field: String, message: String) -> ModelError {
        ModelError { kind: "Service", object: self.svc_ref.clone(), field, message }
    }
}

/// One ServicePort, checked.
struct PortView {
    index: usize,
    name: String,
    number: u16,
    protocol: Protocol,
    node_port: Option<u16>,
}

/// Everything Service `svc_ref` asks for, from its own object, its slices
/// and the node alone.
fn service_frontends(svc_ref: &ObjectRef, svc: &Service, slices: &[&Slice], node: &NodeContext) -> ServiceOutput {
    let mut out = ServiceOutput::default();
    service_claims(svc_ref, svc, slices, node, &mut out);
    // Kept until the Service changes: no growth slack.
    out.claims.shrink_to_fit();
    out
}

#[expect(clippy::too_many_lines, reason = "one pass over a Service's spec, in the order the API documents it")]
fn service_claims(svc_ref: &ObjectRef, svc: &Service, slices: &[&Slice], node: &NodeContext, out: &mut ServiceOutput) {
    let err = |field: String, message: String| ModelError { kind: "Service", object: svc_ref.clone(), field, message };
    if svc.metadata.labels.as_ref().is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME)) {
        return;
    }
    let Some(spec) = &svc.spec else { return };
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    match type_ {
        "ExternalName" => return,
        "ClusterIP" | "NodePort" | "LoadBalancer" => {}
        other => {
            out.errors.push(err(
                "spec.type".into(),
                format!("{other:?} is not a Service type (ClusterIP, NodePort, LoadBalancer, ExternalName)"),
            ));
            return;
        }
    }
    let Some(cluster_ips) = cluster_ips(spec, svc_ref, &mut out.errors) else { return };
    if cluster_ips.is_empty() {
        // Only broken addresses: reported above.
        return;
    }
    let families: Vec<IpFamily> = cluster_ips.iter().map(|ip| IpFamily::of(*ip)).collect();
    let is_node_port = matches!(type_, "NodePort" | "LoadBalancer");
    let is_lb = type_ == "LoadBalancer";
    let external_ips = ip_list(
        "spec.externalIPs",
        spec.external_ips.iter().flatten().enumerate().map(|(i, ip)| (format!("[{i}]"), ip.as_str())),
        &families,
        svc_ref,
        &mut out.errors,
    );
    let lb_ingress: Vec<IpAddr> = if is_lb {
        let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
        ip_list(
            "status.loadBalancer.ingress",
            ingress
                .into_iter()
                .flatten()
                .enumerate()
                // ipMode Proxy: the load balancer proxies the traffic, so
                // it must reach the LB, not be short-circuited here.
                .filter(|(_, i)| i.ip_mode.as_deref() != Some("Proxy"))
                .filter_map(|(n, i)| i.ip.as_deref().map(|ip| (format!("[{n}].ip"), ip))),
            &families,
            svc_ref,
            &mut out.errors,
        )
    } else {
        Vec::new()
    };
    let source_ranges: Vec<Cidr> = if is_lb {
        let mut ranges = Vec::new();
        for (i, r) in spec.load_balancer_source_ranges.iter().flatten().enumerate() {
            match r.parse::<Cidr>() {
                Ok(c) => ranges.push(c),
                Err(m) => out.errors.push(err(format!("spec.loadBalancerSourceRanges[{i}]"), m)),
            }
        }
        // As kube-proxy (per family, as each of its proxiers sees its own
        // node addresses): when the ranges let this node in, the ingress
        // IPs are let in too. A VIP-style load balancer's address is often
        // local to the nodes, so a node's request to it loops back with
        // the VIP as its source.
        let node_in = |addr: &IpAddr| {
            ranges.iter().any(|r| {
                node.nodeport_addresses
                    .iter()
                    .any(|a| IpFamily::of(*a) == IpFamily::of(*addr) && !a.is_loopback() && r.contains(*a))
            })
        };
        let ingress: Vec<Cidr> = lb_ingress.iter().filter(|ip| node_in(ip)).map(|ip| Cidr::host(*ip)).collect();
        ranges.extend(ingress);
        ranges.sort();
        ranges.dedup();
        ranges
    } else {
        Vec::new()
    };
    let affinity_timeout_s = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            Some(match timeout.map(u32::try_from) {
                None => DEFAULT_AFFINITY_TIMEOUT_S,
                Some(Ok(t)) if (1..=MAX_AFFINITY_TIMEOUT_S).contains(&t) => t,
                Some(_) => {
                    out.errors.push(err(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                        format!(
                            "{} is not in 1-{MAX_AFFINITY_TIMEOUT_S}; the default {DEFAULT_AFFINITY_TIMEOUT_S} is used",
                            timeout.unwrap_or_default()
                        ),
                    ));
                    DEFAULT_AFFINITY_TIMEOUT_S
                }
            })
        }
        Some(other) => {
            out.errors.push(err(
                "spec.sessionAffinity".into(),
                format!("{other:?} is not a session affinity (None, ClientIP); None is used"),
            ));
            None
        }
    };
    let mut policy = |value: Option<&str>, field: &str| {
        is_local_policy(value, field, &err).unwrap_or_else(|e| {
            out.errors.push(e);
            false
        })
    };
    let internal_local = policy(spec.internal_traffic_policy.as_deref(), "spec.internalTrafficPolicy");
    let external_local = policy(spec.external_traffic_policy.as_deref(), "spec.externalTrafficPolicy");
    let view = ServiceView {
        svc_ref,
        slices,
        node,
        external_ips,
        lb_ingress,
        source_ranges,
        affinity_timeout_s,
        internal_local,
        external_local,
    };
    // kube-proxy's health check counts the distinct ready local endpoint
    // addresses over all ports; terminating ones do not count, so a node
    // whose endpoints are all terminating answers 503 and is drained.
    let mut local_ready: std::collections::BTreeSet<IpAddr> = std::collections::BTreeSet::new();
    // (port, protocol) -> index of the first ServicePort with it.
    let mut seen_ports: BTreeMap<(u16, Protocol), usize> = BTreeMap::new();

    for (i, port) in spec.ports.iter().flatten().enumerate() {
        let (number, protocol) = match service_port(port) {
            Ok(v) => v,
            Err((field, message)) => {
                out.errors.push(err(format!("spec.ports[{i}].{field}"), message));
                continue;
            }
        };
        if let Some(first) = seen_ports.insert((number, protocol), i) {
            // The API server refuses this (Duplicate value); serving the
            // first keeps the Service's other ports working.
            seen_ports.insert((number, protocol), first);
            out.errors.push(err(
                format!("spec.ports[{i}]"),
                format!("{number}/{protocol} is a duplicate of spec.ports[{first}]; only that one is served"),
            ));
            continue;
        }
        let node_port = match port.node_port.map(u16::try_from) {
            Some(Ok(np)) if np != 0 && is_node_port => Some(np),
            // Unset: not allocated yet (or allocateLoadBalancerNodePorts
            // false); nothing to serve on the nodes.
            None => None,
            _ if !is_node_port => None,
            Some(_) => {
                out.errors.push(err(
                    format!("spec.ports[{i}].nodePort"),
                    format!("{} is not a valid port (1-65535)", port.node_port.unwrap_or_default()),
                ));
                None
            }
        };
        let port = PortView { index: i, name: port.name.clone().unwrap_or_default(), number, protocol, node_port };
        // One set of frontends per family, as kube-proxy's proxier of each
        // family builds its own, from that family's slices only.
        for cluster_ip in &cluster_ips {
            family_frontends(&view, &port, *cluster_ip, &mut local_ready, out);
        }
    }
    // kube-proxy serves healthCheckNodePort for LoadBalancer Services with
    // `externalTrafficPolicy: Local` (the API allocates it only for those),
    // once one of their external frontends is served.
    if external_local && is_lb {
        match spec.health_check_node_port.map(u16::try_from) {
            Some(Ok(port)) if port != 0 => {
                // Each of kube-proxy's proxiers counts its own family's
                // endpoints; one server here answers for both, with the
                // larger count (a dual-stack pod is one endpoint of each).
                let count = |f: IpFamily| local_ready.iter().filter(|a| IpFamily::of(**a) == f).count();
                let local_endpoints = count(IpFamily::Ipv4).max(count(IpFamily::Ipv6));
                out.health = Some(Ok(HealthCheck { port, local_endpoints }));
            }
            None => {}
            Some(_) => {
                out.health = Some(Err(Box::new(err(
                    "spec.healthCheckNodePort".into(),
                    format!("{} is not a valid port (1-65535)", spec.health_check_node_port.unwrap_or_default()),
                ))));
            }
        }
    }
}

/// The frontends of one Service port in the family of `cluster_ip`: the
/// ClusterIP (both scopes), NodePorts on this node's addresses, the
/// LoadBalancer ingress IPs and external IPs of that family, each with the
/// endpoints of that family's slices, as claims. Adds the ready local
/// endpoints to `local_ready`.
fn family_frontends(
    s: &ServiceView<'_>,
    port: &PortView,
    cluster_ip: IpAddr,
    local_ready: &mut std::collections::BTreeSet<IpAddr>,
    out: &mut ServiceOutput,
) {
    let family = IpFamily::of(cluster_ip);
    let of_family = |addr: &&IpAddr| IpFamily::of(**addr) == family;
    let (i, protocol) = (port.index, port.protocol);
    let candidates =
        endpoints::candidates(&s.svc_ref.namespace, &port.name, protocol, family, s.slices, s.node, &mut out.errors);
    let any = endpoints::any_usable(&candidates);
    let cluster = endpoints::cluster(&candidates, s.node);
    let local = endpoints::local(&candidates);
    local_ready.extend(candidates.iter().filter(|c| c.backend.local && c.ready).map(|c| c.backend.addr));
    let pick = |is_local: bool| {
        let backends = if is_local { local.clone() } else { cluster.clone() };
        let when_empty = if any { WhenEmpty::Drop } else { WhenEmpty::Reject };
        (backends, when_empty)
    };
    let frontend = |addr: IpAddr, scope: Scope| Frontend { addr, port: port.number, protocol, scope };
    let affinity_scope = s.affinity_timeout_s.map(|_| frontend(cluster_ip, Scope::Internal));
    // (frontend, kind, Local policy, masquerade)
    let mut frontends: Vec<(Frontend, FrontendKind, bool, bool)> = vec![
        (frontend(cluster_ip, Scope::Internal), FrontendKind::ClusterIp, s.internal_local, s.node.masquerade_all),
        // Traffic from outside the node to a ClusterIP (a service CIDR
        // routed to the nodes): translated under the internal policy and
        // masqueraded, as kube-proxy does.
        (frontend(cluster_ip, Scope::External), FrontendKind::ClusterIp, s.internal_local, true),
    ];
    let external = |addr: IpAddr, kind: FrontendKind| {
        let np = if kind == FrontendKind::NodePort { port.node_port } else { Some(port.number) };
        np.map(|np| {
            let f = Frontend { addr, port: np, protocol, scope: Scope::External };
            (f, kind, s.external_local, !s.external_local)
        })
    };
    let node_ports = s.node.nodeport_addresses.iter().filter(of_family);
    frontends.extend(node_ports.filter_map(|a| external(*a, FrontendKind::NodePort)));
    frontends.extend(s.lb_ingress.iter().filter(of_family).filter_map(|a| external(*a, FrontendKind::LoadBalancer)));
    frontends.extend(s.external_ips.iter().filter(of_family).filter_map(|a| external(*a, FrontendKind::ExternalIp)));
    // Pods reach the external frontends too: a pod dialling this node's
    // address:NodePort, a LoadBalancer ingress IP or an external IP is
    // translated on its own node, as kube-proxy's "short-circuit" does,
    // to the cluster-wide endpoints whatever either policy says (pod
    // traffic is not external traffic), masqueraded unless the external
    // policy is `Local`, as kube-proxy marks it.
    let from_pods: Vec<_> = frontends
        .iter()
        .filter(|(f, kind, _, _)| f.scope == Scope::External && *kind != FrontendKind::ClusterIp)
        .map(|(f, kind, _, masquerade)| (Frontend { scope: Scope::Internal, ..*f }, *kind, false, *masquerade))
        .collect();
    frontends.extend(from_pods);
    // 127.0.0.1 (`--localhost-nodeports`) is a NodePort address for the
    // node's own sockets only: a packet to it from outside the node is a
    // martian that must never be translated (CVE-2020-8558).
    frontends.retain(|(f, ..)| f.scope == Scope::Internal || !f.addr.is_loopback());
    for (frontend, kind, is_local, masquerade) in frontends {
        let (mut backends, mut when_empty) = pick(is_local);
        let mut sctp_error = None;
        if protocol == Protocol::Sctp {
            // SCTP's CRC32c covers the ports and cannot be updated in place
            // like the Internet checksum, so the dataplane only translates
            // the address: endpoints on another port are left out and
            // reported.
            let before = backends.len();
            backends.retain(|b| b.port == frontend.port);
            if backends.len() < before {
                if backends.is_empty() {
                    when_empty = WhenEmpty::Reject;
                }
                sctp_error = Some(Box::new(s.err(
                    format!("spec.ports[{i}]"),
                    format!(
                        "{kind} {frontend}: SCTP endpoints on another port than {} are not supported (no port \
                         translation for SCTP)",
                        frontend.port
                    ),
                )));
            }
        }
        // kube-proxy filters only traffic to the load balancer's addresses
        // (its KUBE-FW chain / firewall-ips set), with the ranges of the
        // frontend's family (a Service whose ranges are all of the other
        // family is not restricted in this one); NodePorts and external
        // IPs stay open.
        let ranges = if kind == FrontendKind::LoadBalancer {
            s.source_ranges.iter().filter(|r| IpFamily::of(r.addr) == family).copied().collect()
        } else {
            Vec::new()
        };
        // Kept for as long as the frontend is: no growth slack.
        backends.shrink_to_fit();
        let df = DesiredFrontend {
            service: s.svc_ref.clone(),
            port_name: port.name.clone(),
            frontend,
            kind,
            backends,
            when_empty,
            affinity_timeout_s: s.affinity_timeout_s,
            affinity_scope,
            source_ranges: ranges,
            masquerade,
        };
        out.claims.push(FrontendClaim { df: Arc::new(df), port_index: i, sctp_error });
    }
}

#[cfg(test)]
mod family_tests;
#[cfg(test)]
pub(crate) mod fuzz;
#[cfg(test)]
mod tests;
