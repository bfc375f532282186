//! The model: a pure function from Kubernetes objects and the node's context
//! to the frontends the dataplane must serve and the backends behind each.
//! All Service API semantics live here; there is no I/O, so it is tested
//! with plain unit and golden tests.
//!
//! Implemented so far: ClusterIP Services (every IPv4 address of
//! `spec.clusterIPs`), multi-port with TCP and UDP, ServicePorts matched to
//! EndpointSlice ports by name, endpoints whose `conditions.ready` is not
//! false, headless/ExternalName/`service-proxy-name` Services skipped.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::EndpointSlice,
};

use crate::source::{ObjectRef, Objects};

/// Label linking an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Services carrying this label belong to another proxy (kube-proxy skips
/// them too).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

/// What the model needs to know about the node it runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    pub node_name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => service_common::PROTO_TCP,
            Self::Udp => service_common::PROTO_UDP,
        }
    }

    /// Parses a Kubernetes protocol name; `None` (unset) means TCP.
    fn parse(value: Option<&str>) -> Result<Self, String> {
        match value.unwrap_or("TCP") {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            other => Err(format!("protocol {other:?} is not supported by this dataplane yet (TCP, UDP)")),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

/// Which traffic a frontend answers (see `service_common::SCOPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Traffic entering from outside the node (NodePort, LoadBalancer,
    /// externalIPs).
    External,
    /// Traffic from pods (ClusterIP).
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
        write!(f, "{}:{}/{} {scope}", self.addr, self.port, self.protocol)
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
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.protocol)
    }
}

/// What the dataplane does with a new flow to a frontend without backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WhenEmpty {
    /// TCP RST / ICMP port unreachable, as kube-proxy does.
    Reject,
}

/// The desired state of one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFrontend {
    pub service: ObjectRef,
    /// The ServicePort's name ("" for the unnamed port).
    pub port_name: String,
    pub frontend: Frontend,
    /// Sorted and free of duplicates.
    pub backends: Vec<Backend>,
    pub when_empty: WhenEmpty,
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
    pub frontends: BTreeMap<Frontend, DesiredFrontend>,
    pub errors: Vec<ModelError>,
}

/// Computes the desired frontends from the objects.
#[must_use]
pub fn desired(objects: &Objects, node: &NodeContext) -> Desired {
    let mut out = Desired::default();
    let slices = slices_by_service(objects);
    for (svc_ref, svc) in &objects.services {
        let no_slices = Vec::new();
        let svc_slices = slices.get(svc_ref).unwrap_or(&no_slices);
        service_frontends(svc_ref, svc, svc_slices, node, &mut out);
    }
    out.errors.sort();
    out.errors.dedup();
    out
}

fn slices_by_service(objects: &Objects) -> BTreeMap<ObjectRef, Vec<&EndpointSlice>> {
    let mut by_service: BTreeMap<ObjectRef, Vec<&EndpointSlice>> = BTreeMap::new();
    for (slice_ref, slice) in &objects.endpoint_slices {
        let service_name = slice.metadata.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME));
        if let Some(name) = service_name {
            let key = ObjectRef { namespace: slice_ref.namespace.clone(), name: name.clone() };
            by_service.entry(key).or_default().push(slice);
        }
    }
    by_service
}

fn service_frontends(
    svc_ref: &ObjectRef,
    svc: &Service,
    slices: &[&EndpointSlice],
    node: &NodeContext,
    out: &mut Desired,
) {
    let err = |field: String, message: String| ModelError { kind: "Service", object: svc_ref.clone(), field, message };
    if svc.metadata.labels.as_ref().is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME)) {
        return;
    }
    let Some(spec) = &svc.spec else { return };
    if spec.type_.as_deref() == Some("ExternalName") {
        return;
    }
    let cluster_ips = cluster_ips(spec, svc_ref, out);
    if cluster_ips.is_empty() {
        return;
    }
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        let (port_number, protocol) = match service_port(port) {
            Ok(v) => v,
            Err((field, message)) => {
                out.errors.push(err(format!("spec.ports[{i}].{field}"), message));
                continue;
            }
        };
        let port_name = port.name.clone().unwrap_or_default();
        let backends = endpoints_for_port(svc_ref, &port_name, protocol, slices, node, &mut out.errors);
        for addr in &cluster_ips {
            let frontend = Frontend { addr: IpAddr::V4(*addr), port: port_number, protocol, scope: Scope::Internal };
            if let Some(existing) = out.frontends.get(&frontend) {
                out.errors.push(err(
                    format!("spec.ports[{i}]"),
                    format!("{frontend} is already served by Service {} port {:?}", existing.service, existing.port_name),
                ));
                continue;
            }
            out.frontends.insert(
                frontend,
                DesiredFrontend {
                    service: svc_ref.clone(),
                    port_name: port_name.clone(),
                    frontend,
                    backends: backends.clone(),
                    when_empty: WhenEmpty::Reject,
                },
            );
        }
    }
}

/// The IPv4 ClusterIPs of a Service: `spec.clusterIPs`, or `spec.clusterIP`
/// when the list is absent. `None`/empty means headless: no frontend.
fn cluster_ips(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    svc_ref: &ObjectRef,
    out: &mut Desired,
) -> Vec<Ipv4Addr> {
    let (field, ips): (&str, Vec<&String>) = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(list), _) if !list.is_empty() => ("spec.clusterIPs", list.iter().collect()),
        (_, Some(one)) => ("spec.clusterIP", vec![one]),
        _ => return Vec::new(),
    };
    let mut v4 = Vec::new();
    for (i, ip) in ips.into_iter().enumerate() {
        if ip.is_empty() || ip == "None" {
            continue;
        }
        let field = if field == "spec.clusterIPs" { format!("{field}[{i}]") } else { field.to_owned() };
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => v4.push(a),
            // Dual-stack Services list an IPv6 address too; this dataplane
            // serves IPv4 so far and skips it without an error. A
            // single-stack IPv6 Service is reported below.
            Ok(IpAddr::V6(_)) => {}
            Err(e) => out.errors.push(ModelError {
                kind: "Service",
                object: svc_ref.clone(),
                field,
                message: format!("{ip:?} is not an IP address: {e}"),
            }),
        }
    }
    v4
}

fn service_port(port: &ServicePort) -> Result<(u16, Protocol), (&'static str, String)> {
    let number = u16::try_from(port.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(("port", format!("{} is not a valid port (1-65535)", port.port)))?;
    let protocol = Protocol::parse(port.protocol.as_deref()).map_err(|m| ("protocol", m))?;
    Ok((number, protocol))
}

/// The backends of one ServicePort: the union of every slice's endpoints
/// that are ready (or whose readiness is unknown, as kube-proxy treats it),
/// on the slice port of the same name and protocol. The port number may
/// differ per slice (named targetPorts resolve per pod).
fn endpoints_for_port(
    svc_ref: &ObjectRef,
    port_name: &str,
    protocol: Protocol,
    slices: &[&EndpointSlice],
    node: &NodeContext,
    errors: &mut Vec<ModelError>,
) -> Vec<Backend> {
    let mut backends = BTreeSet::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let slice_ref = ObjectRef {
            namespace: svc_ref.namespace.clone(),
            name: slice.metadata.name.clone().unwrap_or_default(),
        };
        let slice_err = |field: String, message: String| ModelError {
            kind: "EndpointSlice",
            object: slice_ref.clone(),
            field,
            message,
        };
        let matching = slice.ports.iter().flatten().enumerate().find(|(_, p)| {
            p.name.as_deref().unwrap_or("") == port_name
                && Protocol::parse(p.protocol.as_deref()).is_ok_and(|proto| proto == protocol)
        });
        let Some((pi, slice_port)) = matching else { continue };
        let Some(port) = slice_port.port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) else {
            errors.push(slice_err(format!("ports[{pi}].port"), format!("{:?} is not a valid port", slice_port.port)));
            continue;
        };
        for (ei, endpoint) in slice.endpoints.iter().flatten().enumerate() {
            let ready = endpoint.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            let local = endpoint.node_name.as_deref() == Some(node.node_name.as_str());
            // Every address of an endpoint is fungible; Kubernetes uses the
            // first (kube-proxy too).
            let Some(addr) = endpoint.addresses.first() else { continue };
            match addr.parse::<Ipv4Addr>() {
                Ok(a) => {
                    backends.insert(Backend { addr: IpAddr::V4(a), port, protocol, local });
                }
                Err(e) => errors.push(slice_err(
                    format!("endpoints[{ei}].addresses[0]"),
                    format!("{addr:?} is not an IPv4 address: {e}"),
                )),
            }
        }
    }
    // An endpoint listed in two slices with different `nodeName`s would be
    // two entries; keep one per address:port.
    let mut seen = BTreeSet::new();
    backends.into_iter().filter(|b| seen.insert((b.addr, b.port))).collect()
}

#[cfg(test)]
mod tests;
