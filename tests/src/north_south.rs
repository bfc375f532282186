//! The two-node north-south harness the end-to-end tests share: an
//! external client on the fabric, node 1 and node 2 each running their own
//! agent, pods on both nodes running `pod-echo` (which answers with its
//! name and the source address it saw), and Services written as manifests.

#![expect(
    clippy::must_use_candidate,
    clippy::missing_panics_doc,
    reason = "a test harness: a panic is how it reports a broken cluster, and every result is read"
)]

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use crate::{
    cluster::{self, node_ip},
    fixture::{self, ManifestDir},
    netns::{Agent, BpffsMount, ChildGuard, Family, Netns, binary, ipv6_twin},
};

/// A LoadBalancer ingress IP and an external IP, routed by the external
/// client to node 1 (as a load balancer or a BGP announcement would).
pub const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
pub const EXTERNAL_SVC_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// One endpoint: pod name, node (1-based), address.
#[derive(Clone, Copy)]
pub struct Ep(pub &'static str, pub u8, pub Ipv4Addr);

impl Ep {
    /// The endpoint's address in `family`.
    pub fn addr(self, family: Family) -> IpAddr {
        family.addr(self.2)
    }
}

pub const A1: Ep = Ep("a1", 1, Ipv4Addr::new(10, 244, 1, 11));
pub const B2: Ep = Ep("b2", 2, Ipv4Addr::new(10, 244, 2, 11));
/// A client pod on node 1.
pub const CLIENT_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);

/// A Service of the tests: `spec_extra` is YAML merged into the spec (at
/// two spaces of indentation), `status` the whole status block.
pub struct Svc<'a> {
    pub name: &'a str,
    pub cluster_ip: &'a str,
    pub type_: &'a str,
    /// (name, port, targetPort, protocol, nodePort)
    pub ports: &'a [(&'a str, u16, u16, &'a str, Option<u16>)],
    pub spec_extra: &'a str,
    pub status: &'a str,
    pub endpoints: &'a [Ep],
}

impl Svc<'_> {
    /// The Service as it is written for a test run in `family`: IPv4 as
    /// [`Self::yaml`], IPv6 as [`Self::yaml_dual`].
    pub fn yaml_in(&self, family: Family) -> String {
        match family {
            Family::V4 => self.yaml(),
            Family::V6 => self.yaml_dual(),
        }
    }

    /// The Service dual-stack ([`dual_stack`] of [`Self::yaml`]).
    pub fn yaml_dual(&self) -> String {
        dual_stack(&self.yaml())
    }

    pub fn yaml(&self) -> String {
        let mut ports = String::new();
        let mut slice_ports = String::new();
        for (name, port, target, proto, node_port) in self.ports {
            let _ =
                write!(ports, "  - name: {name}\n    port: {port}\n    targetPort: {target}\n    protocol: {proto}\n");
            if let Some(np) = node_port {
                let _ = writeln!(ports, "    nodePort: {np}");
            }
            let _ = write!(slice_ports, "- name: {name}\n  port: {target}\n  protocol: {proto}\n");
        }
        let mut endpoints = String::new();
        for Ep(_, node, ip) in self.endpoints {
            let _ =
                write!(endpoints, "- addresses: [\"{ip}\"]\n  conditions:\n    ready: true\n  nodeName: node{node}\n");
        }
        if endpoints.is_empty() {
            endpoints = " []\n".into();
        } else {
            endpoints.insert(0, '\n');
        }
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: {type_}\n  clusterIP: {cip}\n  clusterIPs: [{cip}]\n  ports:\n{ports}{extra}{status}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-abcde\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n{slice_ports}endpoints:{endpoints}",
            name = self.name,
            type_ = self.type_,
            cip = self.cluster_ip,
            extra = self.spec_extra,
            status = self.status,
        )
    }
}

/// IPv4 manifests (documents separated by `---`) made dual-stack, as the
/// API server and the EndpointSlice controller would store them had the
/// Services been created with `ipFamilyPolicy: RequireDualStack`:
/// - each Service with an IPv4 `clusterIP` gets `clusterIPs` [it, its
///   [`ipv6_twin`]], `ipFamilyPolicy: RequireDualStack` and `ipFamilies`
///   [IPv4, IPv6]; each `externalIPs` entry and load balancer ingress
///   `- ip:` is followed by its twin. Other lines (such as
///   `loadBalancerSourceRanges`, which a test gives in both families
///   itself) are kept as written;
/// - each `addressType: IPv4` EndpointSlice is followed by an
///   `addressType: IPv6` one named `<name>-v6` with its addresses' twins
///   (one slice per family, as the controller writes them).
pub fn dual_stack(manifests: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    for doc in manifests.split("\n---\n") {
        if doc.contains("kind: EndpointSlice") && doc.contains("addressType: IPv4") {
            out.push(doc.to_owned());
            out.push(ipv6_slice(doc));
        } else if doc.contains("kind: Service") {
            out.push(doc.lines().filter_map(dual_stack_service_line).collect::<Vec<_>>().join("\n"));
        } else {
            out.push(doc.to_owned());
        }
    }
    let mut text = out.join("\n---\n");
    if manifests.ends_with('\n') && !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

/// A line of a Service made dual-stack (see [`dual_stack`]); `None` drops
/// it (a single-family `clusterIPs`, written again after `clusterIP`).
fn dual_stack_service_line(line: &str) -> Option<String> {
    let trimmed = line.trim_start();
    let indent = &line[..line.len() - trimmed.len()];
    if trimmed.starts_with("clusterIPs:") {
        return None;
    }
    if let Some(ip) = trimmed.strip_prefix("clusterIP: ")
        && let Ok(ip) = ip.trim().parse::<Ipv4Addr>()
    {
        return Some(format!(
            "{line}\n{indent}clusterIPs: [{ip}, {}]\n{indent}ipFamilyPolicy: RequireDualStack\n{indent}ipFamilies: [IPv4, IPv6]",
            ipv6_twin(ip)
        ));
    }
    if let Some((head, list)) = line.split_once("externalIPs: [") {
        let list = list.trim_end().trim_end_matches(']');
        let mut all: Vec<String> = Vec::new();
        for item in list.split(',').map(str::trim) {
            all.push(item.to_owned());
            if let Ok(ip) = item.parse::<Ipv4Addr>() {
                all.push(ipv6_twin(ip).to_string());
            }
        }
        return Some(format!("{head}externalIPs: [{}]", all.join(", ")));
    }
    if let Some((indent, ip)) = line.split_once("- ip: ")
        && indent.trim().is_empty()
        && let Ok(ip) = ip.trim().parse::<Ipv4Addr>()
    {
        return Some(format!("{line}\n{indent}- ip: {}", ipv6_twin(ip)));
    }
    Some(line.to_owned())
}

/// The `addressType: IPv6` twin of an IPv4 EndpointSlice document: named
/// `<name>-v6`, every IPv4 address in it replaced by its [`ipv6_twin`].
fn ipv6_slice(doc: &str) -> String {
    let doc = doc.replace("addressType: IPv4", "addressType: IPv6");
    // The slice's own name: the first `name: ` after `metadata` (block or
    // flow style).
    let meta = doc.find("metadata").unwrap_or(0);
    let renamed = match doc[meta..].find("name: ") {
        Some(at) => {
            let at = meta + at + "name: ".len();
            let end = doc[at..].find([',', '}', '\n']).map_or(doc.len(), |e| at + e);
            format!("{}{}-v6{}", &doc[..at], doc[at..end].trim_end(), &doc[end..])
        }
        None => doc,
    };
    // Every maximal run of digits and dots that is an IPv4 address.
    let mut out = String::with_capacity(renamed.len() + 64);
    let mut rest = renamed.as_str();
    while let Some(start) = rest.find(|c: char| c.is_ascii_digit()) {
        let run_len = rest[start..].find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len() - start);
        let run = &rest[start..start + run_len];
        out.push_str(&rest[..start]);
        match run.parse::<Ipv4Addr>() {
            Ok(ip) => out.push_str(&ipv6_twin(ip).to_string()),
            Err(_) => out.push_str(run),
        }
        rest = &rest[start + run_len..];
    }
    out.push_str(rest);
    out
}

/// The cluster, its servers and agents. Field order is drop order: agents
/// first (detaching and unpinning), then servers, namespaces, the bpffs
/// mount and the manifests.
pub struct NorthSouth {
    /// The family the test's traffic uses (its Services are dual-stack in
    /// IPv6).
    pub family: Family,
    pub agents: Vec<Agent>,
    _servers: Vec<ChildGuard>,
    pub cluster: cluster::Cluster,
    pub bpffs: BpffsMount,
    pub manifests: ManifestDir,
}

impl NorthSouth {
    /// Two nodes with pods a1 (node 1) and b2 (node 2) serving, a client
    /// pod on node 1, routes on the external client for the LB and
    /// external IPs, and the agents started on `services`.
    pub fn start(services: &[Svc]) -> Self {
        Self::start_in(Family::V4, services)
    }

    /// [`Self::start`] for a test whose traffic uses `family` (dual-stack
    /// Services in IPv6).
    pub fn start_in(family: Family, services: &[Svc]) -> Self {
        Self::start_with_in(
            family,
            services,
            |_| {},
            &[&["--external-interfaces", "eth0"], &["--external-interfaces", "eth0"]],
        )
    }

    /// [`Self::start`] with `prepare` run on the cluster before the agents
    /// start, and each node's agent flags.
    pub fn start_with(services: &[Svc], prepare: impl FnOnce(&cluster::Cluster), flags: &[&[&str]; 2]) -> Self {
        Self::start_with_in(Family::V4, services, prepare, flags)
    }

    /// [`Self::start_with`] for a test whose traffic uses `family`.
    pub fn start_with_in(
        family: Family,
        services: &[Svc],
        prepare: impl FnOnce(&cluster::Cluster),
        flags: &[&[&str]; 2],
    ) -> Self {
        let mut cluster = cluster::Cluster::new(2).expect("cluster");
        let mut servers = Vec::new();
        for Ep(name, node, ip) in [A1, B2] {
            let pod = cluster.node_mut(node).add_pod(name, ip).expect("pod");
            servers.push(fixture::start_echo(&pod.ns, name, &[]).expect("pod-echo"));
        }
        cluster.node_mut(1).add_pod("client", CLIENT_POD).expect("client pod");
        for ip in [LB_IP, EXTERNAL_SVC_IP] {
            for family in Family::BOTH {
                cluster.route_from_external(family.addr(ip), 1).expect("route");
            }
        }
        prepare(&cluster);
        let manifests = ManifestDir::new();
        for svc in services {
            manifests.write(&format!("{}.yaml", svc.name), &svc.yaml_in(family));
        }
        let bpffs = BpffsMount::new().expect("bpffs");
        let mut agents = Vec::new();
        for n in 1..=2u8 {
            let root = bpffs.path().join(format!("node{n}"));
            let agent_flags = flags[usize::from(n) - 1];
            let mut agent =
                Agent::start(&cluster.node(n).node, manifests.path(), &format!("node{n}"), &root, agent_flags)
                    .expect("agent");
            agent.wait_for_log("synced", 1, Duration::from_secs(20)).expect("first sync");
            agent.wait_for_log("attached external ingress program", 1, Duration::from_secs(10)).expect("attach");
            agents.push(agent);
        }
        Self { family, agents, _servers: servers, cluster, bpffs, manifests }
    }

    /// Node `n`'s address in the test's family.
    pub fn node_addr(&self, n: u8) -> IpAddr {
        self.family.addr(node_ip(n))
    }

    /// The address whose IPv4 form is `v4`, in the test's family.
    pub fn addr(&self, v4: Ipv4Addr) -> IpAddr {
        self.family.addr(v4)
    }

    /// `http://ADDR:PORT/` for the address whose IPv4 form is `v4`, in the
    /// test's family.
    pub fn url(&self, v4: Ipv4Addr, port: u16) -> String {
        crate::netns::http_url(self.addr(v4), port)
    }

    /// Rewrites Service `svc`'s manifest (in the test's family).
    pub fn write(&self, svc: &Svc) {
        self.manifests.write(&format!("{}.yaml", svc.name), &svc.yaml_in(self.family));
    }

    pub fn root(&self, node: u8) -> std::path::PathBuf {
        self.bpffs.path().join(format!("node{node}"))
    }

    /// A counter of node `node`'s dataplane.
    pub fn counter(&self, node: u8, name: &str) -> u64 {
        fixture::counter(&self.root(node), name).expect("counter")
    }

    pub fn pod(&self, ep: Ep) -> &Netns {
        &self.cluster.node(ep.1).pod(ep.0).ns
    }
}

/// `service-agent COMMAND ARGS... --bpffs-root ROOT` in `node`'s network
/// namespace: its stdout.
pub fn agent_cli(node: &Netns, root: &std::path::Path, command: &str, args: &[&str]) -> String {
    let bin = binary("service-agent", "SERVICE_AGENT_BIN");
    let mut all = vec![command];
    all.extend_from_slice(args);
    let root = root.to_string_lossy();
    all.extend_from_slice(&["--bpffs-root", &root]);
    let out = node.exec(&bin.to_string_lossy(), &all).expect("service-agent");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `(pod name, source address the pod saw)` from a pod-echo answer.
pub fn parse_answer(body: &str) -> (String, SocketAddr) {
    let mut words = body.split_whitespace();
    let name = words.next().unwrap_or_else(|| panic!("empty answer {body:?}")).to_owned();
    let peer = words.next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("no peer in {body:?}"));
    (name, peer)
}

/// One HTTP request from `ns` to `url`.
///
/// # Errors
/// When curl fails (no answer, connection refused).
pub fn get(ns: &Netns, url: &str) -> anyhow::Result<(String, SocketAddr)> {
    fixture::curl(ns, url).map(|b| parse_answer(&b))
}

/// `count` new connections; every answer.
pub fn answers(ns: &Netns, url: &str, count: usize) -> Vec<(String, SocketAddr)> {
    (0..count).map(|i| get(ns, url).unwrap_or_else(|e| panic!("request {i} to {url}: {e}"))).collect()
}

/// The names of the pods that answered.
pub fn names(answers: &[(String, SocketAddr)]) -> BTreeSet<String> {
    answers.iter().map(|(n, _)| n.clone()).collect()
}

pub const WEB: Svc = Svc {
    name: "web",
    cluster_ip: "10.96.0.10",
    type_: "LoadBalancer",
    ports: &[("http", 80, 8080, "TCP", Some(30080)), ("dns", 53, 5353, "UDP", Some(30053))],
    spec_extra: "  externalIPs: [198.51.100.20]\n",
    status: "status:\n  loadBalancer:\n    ingress:\n    - ip: 198.51.100.10\n",
    endpoints: &[A1, B2],
};

/// Checks that answers came from both nodes' backends, each seeing `snat`
/// (the entry node's address) as the client: `externalTrafficPolicy:
/// Cluster` masquerades every flow from outside, as kube-proxy does,
/// whichever node the backend runs on.
pub fn assert_both_backends(answers: &[(String, SocketAddr)], snat: impl Into<IpAddr>) {
    let snat = snat.into();
    assert_eq!(names(answers), BTreeSet::from(["a1".to_owned(), "b2".to_owned()]), "{answers:?}");
    for (_, peer) in answers {
        assert_eq!(peer.ip(), snat, "every backend sees the entry node (masquerade): {answers:?}");
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    use serde::Deserialize as _;

    use super::{B2, Svc, WEB, dual_stack};

    /// Every document of `yaml` as Kubernetes objects: the Services and
    /// the EndpointSlices.
    fn objects(yaml: &str) -> (Vec<Service>, Vec<EndpointSlice>) {
        let (mut services, mut slices) = (Vec::new(), Vec::new());
        for doc in serde_norway::Deserializer::from_str(yaml) {
            let value = serde_norway::Value::deserialize(doc).expect("YAML");
            match value.get("kind").and_then(serde_norway::Value::as_str) {
                Some("Service") => services.push(serde_norway::from_value(value).expect("a Service")),
                Some("EndpointSlice") => slices.push(serde_norway::from_value(value).expect("an EndpointSlice")),
                other => panic!("unexpected kind {other:?}"),
            }
        }
        (services, slices)
    }

    #[test]
    fn a_dual_stack_service_has_both_cluster_ips_its_external_addresses_twins_and_a_slice_per_family() {
        let (services, slices) = objects(&WEB.yaml_dual());
        let spec = services[0].spec.as_ref().expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
        assert_eq!(spec.cluster_ips.as_deref(), Some(&["10.96.0.10".to_owned(), "fd00:10:96::10".to_owned()][..]));
        assert_eq!(spec.ip_family_policy.as_deref(), Some("RequireDualStack"));
        assert_eq!(spec.ip_families.as_deref(), Some(&["IPv4".to_owned(), "IPv6".to_owned()][..]));
        assert_eq!(
            spec.external_ips.as_deref(),
            Some(&["198.51.100.20".to_owned(), "fd00:198:51:100::20".to_owned()][..])
        );
        let ingress =
            services[0].status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.clone());
        let ingress: Vec<_> = ingress.expect("ingress").into_iter().filter_map(|i| i.ip).collect();
        assert_eq!(ingress, ["198.51.100.10", "fd00:198:51:100::10"]);
        let by_family: Vec<(String, String, Vec<String>)> = slices
            .iter()
            .map(|s| {
                let addrs = s.endpoints.iter().flatten().flat_map(|e| e.addresses.clone()).collect();
                (s.metadata.name.clone().unwrap_or_default(), s.address_type.clone(), addrs)
            })
            .collect();
        assert_eq!(
            by_family,
            [
                ("web-abcde".into(), "IPv4".into(), vec!["10.244.1.11".into(), "10.244.2.11".into()]),
                ("web-abcde-v6".into(), "IPv6".into(), vec!["fd00:10:244:1::11".into(), "fd00:10:244:2::11".into()]),
            ]
        );
        assert_eq!(slices[1].ports, slices[0].ports);
    }

    #[test]
    fn dual_stack_keeps_other_documents_and_handles_flow_style_and_empty_slices() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: default}\nspec:\n  clusterIP: 10.96.1.1\n  ports:\n  - {port: 80, targetPort: 8080}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: a-1\n  labels: {kubernetes.io/service-name: a}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints:\n- addresses: [\"10.244.1.12\"]\n  nodeName: node-2\n";
        let (services, slices) = objects(&dual_stack(yaml));
        assert_eq!(services.len(), 1);
        assert_eq!(slices[1].metadata.name.as_deref(), Some("a-1-v6"));
        let endpoint = &slices[1].endpoints.as_ref().expect("endpoints")[0];
        assert_eq!(endpoint.addresses, ["fd00:10:244:1::12"]);
        assert_eq!(endpoint.node_name.as_deref(), Some("node-2"));
        let empty = Svc { endpoints: &[], ..WEB };
        let (_, slices) = objects(&empty.yaml_dual());
        assert_eq!(slices.len(), 2);
        assert!(slices[1].endpoints.as_ref().is_none_or(Vec::is_empty));
        let one = Svc { endpoints: &[B2], ..WEB };
        let (_, slices) = objects(&one.yaml_dual());
        assert_eq!(slices[1].endpoints.as_ref().expect("endpoints")[0].addresses, ["fd00:10:244:2::11"]);
    }
}
