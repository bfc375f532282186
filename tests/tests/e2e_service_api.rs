//! Tier 3: the Service API semantics that change what ClusterIP traffic
//! does, with real traffic through the agent on a node: reject for no
//! endpoints, `internalTrafficPolicy: Local`, ClientIP affinity, the
//! serving-terminating fallback, and multi-port Services with named target
//! ports resolving to different numbers per pod.
//!
//! (SCTP is shown on crafted packets in prog_test_run.rs: this kernel has
//! no SCTP stack for real SCTP sockets.)
//!
//! Each test runs in both families (`::ipv4`, `::ipv6`); in IPv6 the
//! manifests are made dual-stack (`north_south::dual_stack`) and the client
//! dials the IPv6 ClusterIPs.

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

use service_tests::{
    fixture::{self, ManifestDir},
    in_both_families,
    netns::{Agent, BpffsMount, ChildGuard, Family, Topology, http_url},
    north_south::dual_stack,
    traffic::udp_connected,
};

const NODE: &str = "node-1";
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 12);
const C: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 13);
const D: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 14);

/// Every Service of these tests, as a user writes them.
const MANIFESTS: &str = r#"
# No endpoints at all: rejected (TCP RST / ICMP port unreachable).
apiVersion: v1
kind: Service
metadata: {name: nothing-here, namespace: default}
spec:
  clusterIP: 10.96.1.1
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
---
# internalTrafficPolicy Local: backend-b is listed on another node.
apiVersion: v1
kind: Service
metadata: {name: node-local, namespace: default}
spec:
  clusterIP: 10.96.1.2
  internalTrafficPolicy: Local
  ports:
  - {port: 80, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: node-local-1
  namespace: default
  labels: {kubernetes.io/service-name: node-local}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: ["10.244.1.11"]
  nodeName: node-1
- addresses: ["10.244.1.12"]
  nodeName: node-2
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  clusterIP: 10.96.1.3
  sessionAffinity: ClientIP
  sessionAffinityConfig:
    clientIP: {timeoutSeconds: 300}
  ports:
  - {port: 80, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: sticky-1
  namespace: default
  labels: {kubernetes.io/service-name: sticky}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: ["10.244.1.11"]
- addresses: ["10.244.1.12"]
- addresses: ["10.244.1.13"]
---
# A rollout's last moments: no endpoint is ready; backend-c is terminating
# but still serving, backend-b is neither.
apiVersion: v1
kind: Service
metadata: {name: draining, namespace: default}
spec:
  clusterIP: 10.96.1.4
  ports:
  - {port: 80, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: draining-1
  namespace: default
  labels: {kubernetes.io/service-name: draining}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: ["10.244.1.12"]
  conditions: {ready: false, serving: false, terminating: true}
- addresses: ["10.244.1.13"]
  conditions: {ready: false, serving: true, terminating: true}
---
# Named target ports: "web" is 8080 on backend-a and 9090 on backend-d
# (two slices, as during a rollout), "admin" is 9000 on backend-a.
apiVersion: v1
kind: Service
metadata: {name: app, namespace: default}
spec:
  clusterIP: 10.96.1.5
  ports:
  - {name: http, port: 80, targetPort: web}
  - {name: admin, port: 9000, targetPort: admin}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: app-v1
  namespace: default
  labels: {kubernetes.io/service-name: app}
addressType: IPv4
ports:
- {name: http, port: 8080}
- {name: admin, port: 9000}
endpoints:
- addresses: ["10.244.1.11"]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: app-v2
  namespace: default
  labels: {kubernetes.io/service-name: app}
addressType: IPv4
ports:
- {name: http, port: 9090}
endpoints:
- addresses: ["10.244.1.14"]
"#;

struct Cluster {
    family: Family,
    agent: Agent,
    _servers: Vec<ChildGuard>,
    topo: Topology,
    _bpffs: BpffsMount,
    _manifests: ManifestDir,
}

impl Cluster {
    fn start(family: Family) -> Self {
        let mut topo = Topology::new().expect("node");
        topo.add_pod("client", CLIENT_IP).expect("client");
        let mut servers = Vec::new();
        for (name, ip) in [("backend-a", A), ("backend-b", B), ("backend-c", C), ("backend-d", D)] {
            topo.add_pod(name, ip).expect("pod");
        }
        for (pod, name, args) in [
            ("backend-a", "backend-a", &["--tcp-port", "8080"][..]),
            ("backend-a", "backend-a-admin", &["--tcp-port", "9000", "--udp-port", "5354"][..]),
            ("backend-b", "backend-b", &[][..]),
            ("backend-c", "backend-c", &[][..]),
            ("backend-d", "backend-d", &["--tcp-port", "9090"][..]),
        ] {
            servers.push(fixture::start_echo(&topo.pod(pod).ns, name, args).expect("pod-echo"));
        }
        let manifests = ManifestDir::new();
        let text = match family {
            Family::V4 => MANIFESTS.to_owned(),
            Family::V6 => dual_stack(MANIFESTS),
        };
        manifests.write("services.yaml", &text);
        let bpffs = BpffsMount::new().expect("bpffs");
        let mut agent = Agent::start(&topo.node, manifests.path(), NODE, &bpffs.path().join(NODE), &[]).expect("agent");
        agent.wait_for_log("synced", 1, Duration::from_secs(20)).expect("first sync");
        agent.wait_for_log("attached pod ingress program", 5, Duration::from_secs(5)).expect("attached");
        Self { family, agent, _servers: servers, topo, _bpffs: bpffs, _manifests: manifests }
    }

    /// The backends that answered `n` new connections to the ClusterIP
    /// whose IPv4 form is `v4` (in the test's family), on `port`.
    fn spread(&self, v4: [u8; 4], port: u16, n: usize) -> BTreeMap<String, usize> {
        let url = http_url(self.family.addr(Ipv4Addr::from(v4)), port);
        let url = url.as_str();
        let mut seen = BTreeMap::new();
        for i in 0..n {
            let body = fixture::curl(&self.topo.pod("client").ns, url)
                .unwrap_or_else(|e| panic!("connection {i} to {url}: {e}\n{}", self.agent.log()));
            *seen.entry(body.split_whitespace().next().unwrap_or_default().to_owned()).or_default() += 1;
        }
        seen
    }
}

in_both_families!(
    a_service_without_endpoints_refuses_tcp_and_udp_at_once,
    internal_traffic_policy_local_only_reaches_this_nodes_endpoints,
    client_ip_affinity_keeps_a_client_on_one_backend_across_20_connections,
    without_ready_endpoints_the_serving_terminating_ones_are_used,
    named_target_ports_resolve_per_pod_on_a_multi_port_service,
);

fn a_service_without_endpoints_refuses_tcp_and_udp_at_once(family: Family) {
    let cluster = Cluster::start(family);
    let vip = family.addr(Ipv4Addr::new(10, 96, 1, 1));
    let (tcp, udp) = cluster.topo.pod("client").ns.run_in(|| {
        let tcp = TcpStream::connect_timeout(&SocketAddr::new(vip, 80), Duration::from_secs(2));
        let socket = udp_connected((vip, 53), Duration::from_secs(2)).expect("socket");
        socket.send(b"query").expect("send");
        let mut buf = [0u8; 64];
        (tcp.map(|_| ()), socket.recv(&mut buf).map(|_| ()))
    });
    // A RST makes connect() fail with "connection refused" right away (a
    // silent drop would time out); the ICMP port unreachable does the same
    // to a connected UDP socket.
    assert_eq!(tcp.expect_err("TCP must be refused").kind(), ErrorKind::ConnectionRefused);
    assert_eq!(udp.expect_err("UDP must be refused").kind(), ErrorKind::ConnectionRefused);
}

fn internal_traffic_policy_local_only_reaches_this_nodes_endpoints(family: Family) {
    let cluster = Cluster::start(family);
    let seen = cluster.spread([10, 96, 1, 2], 80, 20);
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["backend-a"], "{seen:?}");
}

fn client_ip_affinity_keeps_a_client_on_one_backend_across_20_connections(family: Family) {
    let cluster = Cluster::start(family);
    let seen = cluster.spread([10, 96, 1, 3], 80, 20);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen.values().sum::<usize>(), 20);
}

fn without_ready_endpoints_the_serving_terminating_ones_are_used(family: Family) {
    let cluster = Cluster::start(family);
    let seen = cluster.spread([10, 96, 1, 4], 80, 12);
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["backend-c"], "{seen:?}");
}

fn named_target_ports_resolve_per_pod_on_a_multi_port_service(family: Family) {
    let cluster = Cluster::start(family);
    let http = cluster.spread([10, 96, 1, 5], 80, 30);
    assert_eq!(http.keys().collect::<Vec<_>>(), ["backend-a", "backend-d"], "{http:?}");
    let admin = cluster.spread([10, 96, 1, 5], 9000, 5);
    assert_eq!(admin.keys().collect::<Vec<_>>(), ["backend-a-admin"], "{admin:?}");
}
