//! Tier 3: the agent binary in cluster mode (`service-agent run
//! --kubeconfig FILE`, no `--manifests`) against the API server double,
//! with real traffic through the Service it learns about.
//!
//! The double listens inside the node's network namespace (its listening
//! socket is created there), so the agent reaches it on 127.0.0.1 like a
//! kube-proxy reaching a local API server endpoint; nothing touches the
//! root namespace.

#[path = "../../service-agent/tests/support/apiserver.rs"]
#[allow(dead_code, reason = "the shared double has controls this test does not use")]
mod apiserver;

use std::{net::Ipv4Addr, time::Duration};

use apiserver::{ApiServer, Kind};
use serde_json::json;
use service_tests::{
    fixture::{self, ManifestDir},
    netns::{Agent, BpffsMount, Topology, wait_until},
};

/// Something to do to the double, on its own thread.
type Command = Box<dyn FnOnce(&ApiServer) + Send>;

/// The double running on its own runtime, on a thread inside the node
/// namespace; stopped on drop.
struct DoubleInNode {
    url: String,
    commands: std::sync::mpsc::Sender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DoubleInNode {
    fn start(topo: &Topology) -> Self {
        let path = topo.node.path();
        let (url_tx, url_rx) = std::sync::mpsc::channel();
        let (commands, rx) = std::sync::mpsc::channel::<Command>();
        let thread = std::thread::spawn(move || {
            let ns = std::fs::File::open(path).expect("netns");
            // SAFETY: setns on this thread only; the runtime below is a
            // current-thread one, so every socket it opens is in this netns.
            assert_eq!(unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) }, 0);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let api = ApiServer::start().await;
                url_tx.send(api.url()).expect("url");
                loop {
                    match rx.try_recv() {
                        Ok(command) => command(&api),
                        Err(std::sync::mpsc::TryRecvError::Empty) => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
                    }
                }
            });
        });
        let url = url_rx.recv_timeout(Duration::from_secs(10)).expect("double started");
        Self { url, commands, thread: Some(thread) }
    }

    fn apply(&self, kind: Kind, object: serde_json::Value) {
        self.commands
            .send(Box::new(move |api| {
                api.apply(kind, object);
            }))
            .expect("double running");
    }
}

impl Drop for DoubleInNode {
    fn drop(&mut self) {
        let (tx, _) = std::sync::mpsc::channel();
        drop(std::mem::replace(&mut self.commands, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn the_agent_programs_services_it_watches_on_the_api_server() {
    let mut topo = Topology::new().expect("node");
    topo.add_pod("client", Ipv4Addr::new(10, 244, 1, 10)).expect("client");
    topo.add_pod("backend-a", Ipv4Addr::new(10, 244, 1, 11)).expect("pod");
    topo.add_pod("backend-b", Ipv4Addr::new(10, 244, 1, 12)).expect("pod");
    let _servers = [
        fixture::start_echo(&topo.pod("backend-a").ns, "backend-a", &[]).expect("echo"),
        fixture::start_echo(&topo.pod("backend-b").ns, "backend-b", &[]).expect("echo"),
    ];
    let double = DoubleInNode::start(&topo);
    double.apply(
        Kind::Node,
        json!({"metadata": {"name": "node-1", "labels": {"topology.kubernetes.io/zone": "zone-a"}}}),
    );
    double.apply(
        Kind::Service,
        json!({"metadata": {"name": "web", "namespace": "default"},
               "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
    );
    double.apply(
        Kind::EndpointSlice,
        json!({"metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
               "endpoints": [{"addresses": ["10.244.1.11"], "nodeName": "node-1"}]}),
    );

    // A kubeconfig as a user writes one, pointing at the double.
    let config_dir = ManifestDir::new();
    config_dir.write(
        "kubeconfig",
        &format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: {}\ncontexts:\n- name: double\n  context:\n    cluster: double\n    user: agent\ncurrent-context: double\nusers:\n- name: agent\n  user: {{}}\n",
            double.url
        ),
    );
    let bpffs = BpffsMount::new().expect("bpffs");
    let kubeconfig = config_dir.path().join("kubeconfig");
    let mut agent = Agent::start_with(
        &topo.node,
        &["--kubeconfig", &kubeconfig.to_string_lossy()],
        "node-1",
        &bpffs.path().join("node-1"),
    )
    .expect("agent");
    agent.wait_for_log("synced", 1, Duration::from_secs(20)).expect("first sync from the API server");
    let client = &topo.pod("client").ns;
    let body = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        fixture::curl(client, "http://10.96.0.10:80/").ok()
    })
    .expect("the Service from the API server is programmed");
    assert!(body.starts_with("backend-a"), "{body}");

    // A change on the API server reaches the dataplane.
    double.apply(
        Kind::EndpointSlice,
        json!({"metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
               "endpoints": [{"addresses": ["10.244.1.12"], "nodeName": "node-1"}]}),
    );
    wait_until(Duration::from_secs(3), Duration::from_millis(20), || {
        fixture::curl(client, "http://10.96.0.10:80/").ok().filter(|b| b.starts_with("backend-b"))
    })
    .unwrap_or_else(|e| panic!("the endpoint change was not programmed: {e}\n{}", agent.log()));
}
