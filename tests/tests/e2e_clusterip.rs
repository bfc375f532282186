//! Tier 3: ClusterIP end to end with real traffic (root). One node
//! namespace, a client pod and backend pods wired like a CNI wires them,
//! `pod-echo` servers, and the agent running on the node from a manifest
//! directory. Every test builds its own topology and tears it down.
//!
//! The traffic tests run in both families (`::ipv4`, `::ipv6`): in IPv6 the
//! Service is dual-stack (both clusterIPs, one EndpointSlice per family)
//! and the client pod dials its IPv6 ClusterIP.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use service_tests::{
    fixture::{self, ManifestDir},
    in_both_families,
    netns::{Agent, BpffsMount, ChildGuard, Family, Topology, http_url, wait_until},
    north_south::{dual_stack, parse_answer},
    traffic::any_port_for,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const TIMEOUT: Duration = Duration::from_secs(2);

/// The manifests of these tests.
struct Manifests(ManifestDir);

impl Manifests {
    fn new() -> Self {
        Self(ManifestDir::new())
    }

    /// Writes the `web` Service with `backends` as its ready endpoints, the
    /// way a user writes it, atomically (rename) so the agent never reads a
    /// half-written file. For an IPv6 test the Service is dual-stack, and
    /// the backends' IPv6 twins are in an `addressType: IPv6` slice of
    /// their own, as the EndpointSlice controller writes them
    /// ([`dual_stack`]).
    fn write_web(&self, family: Family, backends: &[Ipv4Addr]) {
        let mut endpoints = String::new();
        for ip in backends {
            let _ = write!(endpoints, "- addresses: [\"{ip}\"]\n  conditions:\n    ready: true\n  nodeName: node-1\n");
        }
        let yaml = format!(
            r"apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  type: ClusterIP
  clusterIP: {VIP}
  clusterIPs: [{VIP}]
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: 8080
    protocol: TCP
  - name: dns
    port: 53
    targetPort: 5353
    protocol: UDP
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-x7k2p
  namespace: default
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
- name: dns
  port: 5353
  protocol: UDP
endpoints:
{endpoints}"
        );
        match family {
            Family::V4 => self.write("web.yaml", &yaml),
            Family::V6 => self.write("web.yaml", &dual_stack(&yaml)),
        }
    }

    fn write(&self, name: &str, text: &str) {
        self.0.write(name, text);
    }
}

/// The topology, its servers and the agent. Field order is drop order: the
/// agent stops first (detaching and unpinning), then servers, namespaces,
/// the bpffs mount and the manifests.
struct Cluster {
    family: Family,
    agent: Agent,
    servers: Vec<ChildGuard>,
    topo: Topology,
    bpffs: BpffsMount,
    manifests: Manifests,
}

const BACKENDS: [(&str, Ipv4Addr); 3] = [
    ("backend-a", Ipv4Addr::new(10, 244, 1, 11)),
    ("backend-b", Ipv4Addr::new(10, 244, 1, 12)),
    ("backend-c", Ipv4Addr::new(10, 244, 1, 13)),
];

fn start_echo(topo: &Topology, pod: &str) -> ChildGuard {
    fixture::start_echo(&topo.pod(pod).ns, pod, &[]).expect("pod-echo")
}

impl Cluster {
    fn start() -> Self {
        Self::start_in(Family::V4)
    }

    /// The node, its pods and the agent, the Service written for a test
    /// in `family`.
    fn start_in(family: Family) -> Self {
        let mut topo = Topology::new().expect("node");
        topo.add_pod("client", CLIENT_IP).expect("client pod");
        let mut servers = Vec::new();
        for (name, ip) in BACKENDS {
            topo.add_pod(name, ip).expect("backend pod");
            servers.push(start_echo(&topo, name));
        }
        let manifests = Manifests::new();
        manifests.write_web(family, &BACKENDS.map(|(_, ip)| ip));
        let bpffs = BpffsMount::new().expect("bpffs");
        let mut agent =
            Agent::start(&topo.node, manifests.0.path(), "node-1", &bpffs.path().join("node-1"), &[]).expect("agent");
        agent.wait_for_log("synced", 1, Duration::from_secs(20)).expect("first sync");
        agent.wait_for_log("attached pod ingress program", 4, Duration::from_secs(5)).expect("attached to 4 pods");
        Self { family, agent, servers, topo, bpffs, manifests }
    }

    /// The ClusterIP in the test's family.
    fn vip(&self) -> IpAddr {
        self.family.addr(VIP)
    }

    /// Rewrites the Service with `backends`.
    fn write_web(&self, backends: &[Ipv4Addr]) {
        self.manifests.write_web(self.family, backends);
    }

    /// An HTTP GET to the ClusterIP with curl in the client pod: the body.
    fn curl(&self) -> anyhow::Result<String> {
        fixture::curl(&self.topo.pod("client").ns, &http_url(self.vip(), 80))
    }

    /// A TCP connection from the client pod, opened in its namespace.
    fn connect(&self) -> std::io::Result<TcpStream> {
        let vip = self.vip();
        self.topo.pod("client").ns.run_in(|| {
            let s = TcpStream::connect_timeout(&SocketAddr::new(vip, 80), TIMEOUT)?;
            s.set_read_timeout(Some(TIMEOUT))?;
            Ok(s)
        })
    }
}

/// Asks over a held connection which backend serves it.
fn who(stream: &mut TcpStream) -> String {
    stream.write_all(b"who\n").expect("write");
    let mut line = String::new();
    BufReader::new(stream.try_clone().expect("clone")).read_line(&mut line).expect("read");
    line.split_whitespace().next().unwrap_or_default().to_owned()
}

in_both_families!(
    sixty_new_tcp_connections_to_the_cluster_ip_reach_all_three_backends,
    udp_request_and_response_through_the_cluster_ip,
    an_established_connection_keeps_working_while_the_other_backends_are_removed,
    a_backend_added_to_the_manifests_receives_new_connections_within_one_second,
);

fn sixty_new_tcp_connections_to_the_cluster_ip_reach_all_three_backends(family: Family) {
    let cluster = Cluster::start_in(family);
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..60 {
        let body = cluster.curl().unwrap_or_else(|e| panic!("connection {i} failed: {e}\n{}", cluster.agent.log()));
        // "backend-x 10.244.1.10:port": the backend saw the client's own
        // address (no SNAT for pod-to-ClusterIP traffic).
        let (backend, seen) = parse_answer(&body);
        assert_eq!(seen.ip(), family.addr(CLIENT_IP), "{body}");
        *per_backend.entry(backend).or_default() += 1;
    }
    assert_eq!(per_backend.keys().collect::<Vec<_>>(), ["backend-a", "backend-b", "backend-c"], "{per_backend:?}");
    // The client's socket talks to the ClusterIP: replies were reverse-NATed.
    let stream = cluster.connect().expect("connect");
    assert_eq!(stream.peer_addr().expect("peer"), SocketAddr::new(cluster.vip(), 80));
    eprintln!("60 connections: {per_backend:?}");
}

fn udp_request_and_response_through_the_cluster_ip(family: Family) {
    let cluster = Cluster::start_in(family);
    let vip = SocketAddr::new(cluster.vip(), 53);
    let (from, answer) = cluster.topo.pod("client").ns.run_in(|| {
        let socket = std::net::UdpSocket::bind(any_port_for(vip)).expect("bind");
        socket.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        socket.send_to(b"hello", vip).expect("send");
        let mut buf = [0u8; 512];
        let (n, from) = socket.recv_from(&mut buf).expect("an answer through the ClusterIP");
        (from, String::from_utf8_lossy(&buf[..n]).into_owned())
    });
    assert_eq!(from, vip, "the reply must come from the ClusterIP");
    let (backend, seen) = parse_answer(&answer);
    assert!(backend.starts_with("backend-"), "{answer}");
    assert_eq!(seen.ip(), family.addr(CLIENT_IP), "{answer}");
}

fn an_established_connection_keeps_working_while_the_other_backends_are_removed(family: Family) {
    let cluster = Cluster::start_in(family);
    let mut held = cluster.connect().expect("connect");
    let serving = who(&mut held);
    let keep = BACKENDS.iter().find(|(n, _)| *n == serving).expect("a known backend").1;

    cluster.write_web(&[keep]);
    // Once the change is programmed, every new connection lands on `keep`.
    wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        (0..6).all(|_| cluster.curl().is_ok_and(|b| b.starts_with(&serving))).then_some(())
    })
    .expect("new connections only reach the remaining backend");
    assert_eq!(who(&mut held), serving, "the held connection broke");
    assert_eq!(who(&mut held), serving);
}

fn a_backend_added_to_the_manifests_receives_new_connections_within_one_second(family: Family) {
    let mut cluster = Cluster::start_in(family);
    let new_ip = Ipv4Addr::new(10, 244, 1, 14);
    cluster.topo.add_pod("backend-d", new_ip).expect("pod");
    cluster.servers.push(start_echo(&cluster.topo, "backend-d"));
    // The agent attaches to the new pod's interface by itself.
    cluster
        .agent
        .wait_for_log("attached pod ingress program", 5, Duration::from_secs(5))
        .expect("attach to the new pod");

    let written = Instant::now();
    let mut all: Vec<Ipv4Addr> = BACKENDS.map(|(_, ip)| ip).to_vec();
    all.push(new_ip);
    cluster.write_web(&all);
    let reached = wait_until(Duration::from_secs(1), Duration::from_millis(10), || {
        cluster.curl().ok().filter(|b| b.starts_with("backend-d")).map(|_| written.elapsed())
    });
    let elapsed = reached.unwrap_or_else(|e| panic!("backend-d got no connection: {e}\n{}", cluster.agent.log()));
    eprintln!("backend-d received a new connection {elapsed:?} after the manifest was written");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn a_malformed_manifest_is_reported_and_everything_else_is_still_programmed() {
    let cluster = Cluster::start();
    cluster.manifests.write(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken, namespace: default}\nspec:\n  clusterIP: 10.96.0.99\n  ports:\n  - port: eighty\n",
    );
    cluster.manifests.write(
        "api.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: default}\nspec:\n  clusterIP: 10.96.0.11\n  ports:\n  - {port: 8080, targetPort: 8080}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: api-1\n  labels: {kubernetes.io/service-name: api}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints:\n- addresses: [10.244.1.12]\n",
    );
    let mut agent_log = String::new();
    wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        agent_log = cluster.agent.log();
        agent_log.contains("broken.yaml").then_some(())
    })
    .expect("the broken file is reported");
    assert!(
        agent_log.contains("Service default/broken: spec.ports[0].port: invalid type: string \"eighty\""),
        "{agent_log}"
    );
    let body = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        cluster
            .topo
            .pod("client")
            .ns
            .exec("curl", &["-sS", "--max-time", "1", "http://10.96.0.11:8080/"])
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    })
    .expect("the good Service next to the broken one is programmed");
    assert!(body.starts_with("backend-b"), "{body}");
    assert!(cluster.curl().is_ok(), "the existing Service still works");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn sigterm_detaches_the_programs_and_removes_the_pins() {
    let mut cluster = Cluster::start();
    let root = cluster.bpffs.path().join("node-1");
    assert!(root.join("services").exists() && root.join("conntrack").exists());
    let status = cluster.agent.stop().expect("clean exit");
    assert!(status.success(), "{status}\n{}", cluster.agent.log());
    assert!(!Path::new(&root).exists(), "pins left behind under {}", root.display());
    // (bpftool 7.1 does not list TCX links by interface; the traffic check
    // below shows the program is off the interfaces.)
    // Without the dataplane the ClusterIP is just an unknown address.
    assert!(cluster.curl().is_err());
}
