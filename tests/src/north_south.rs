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
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use crate::{
    cluster::{self, node_ip},
    fixture::{self, ManifestDir},
    netns::{Agent, BpffsMount, ChildGuard, Netns, binary},
};

/// A LoadBalancer ingress IP and an external IP, routed by the external
/// client to node 1 (as a load balancer or a BGP announcement would).
pub const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
pub const EXTERNAL_SVC_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// One endpoint: pod name, node (1-based), address.
#[derive(Clone, Copy)]
pub struct Ep(pub &'static str, pub u8, pub Ipv4Addr);

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

/// The cluster, its servers and agents. Field order is drop order: agents
/// first (detaching and unpinning), then servers, namespaces, the bpffs
/// mount and the manifests.
pub struct NorthSouth {
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
        Self::start_with(services, |_| {}, &[&["--external-interfaces", "eth0"], &["--external-interfaces", "eth0"]])
    }

    /// [`Self::start`] with `prepare` run on the cluster before the agents
    /// start, and each node's agent flags.
    pub fn start_with(services: &[Svc], prepare: impl FnOnce(&cluster::Cluster), flags: &[&[&str]; 2]) -> Self {
        let mut cluster = cluster::Cluster::new(2).expect("cluster");
        let mut servers = Vec::new();
        for Ep(name, node, ip) in [A1, B2] {
            let pod = cluster.node_mut(node).add_pod(name, ip).expect("pod");
            servers.push(fixture::start_echo(&pod.ns, name, &[]).expect("pod-echo"));
        }
        cluster.node_mut(1).add_pod("client", CLIENT_POD).expect("client pod");
        for ip in [LB_IP, EXTERNAL_SVC_IP] {
            cluster.external.ip(&["route", "add", &format!("{ip}/32"), "via", &node_ip(1).to_string()]).expect("route");
        }
        prepare(&cluster);
        let manifests = ManifestDir::new();
        for svc in services {
            manifests.write(&format!("{}.yaml", svc.name), &svc.yaml());
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
        Self { agents, _servers: servers, cluster, bpffs, manifests }
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
pub fn assert_both_backends(answers: &[(String, SocketAddr)], snat: Ipv4Addr) {
    assert_eq!(names(answers), BTreeSet::from(["a1".to_owned(), "b2".to_owned()]), "{answers:?}");
    for (_, peer) in answers {
        assert_eq!(peer.ip(), snat, "every backend sees the entry node (masquerade): {answers:?}");
    }
}
