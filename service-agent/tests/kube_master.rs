//! `--master` (kube-proxy's flag): the API server address that overrides the
//! kubeconfig's (or the in-cluster one). Against the in-process API server
//! double (tests/support/apiserver.rs), through a real `kube::Client`; no
//! root needed.

#[expect(dead_code, reason = "the double's other controls (stop, compact, delete, ...) serve kube_source.rs")]
mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use serde_json::json;
use service_agent::{source::kube as source, vocabulary::Objects};
use support::apiserver::{ApiServer, Kind};
use tokio::sync::watch;

/// A kubeconfig whose server is `server`.
fn kubeconfig(dir: &std::path::Path, server: &str) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {{server: \"{server}\"}}
users:
- name: u
  user: {{}}
contexts:
- name: x
  context: {{cluster: c, user: u}}
current-context: x
"
    );
    std::fs::write(&path, text).expect("write kubeconfig");
    path
}

/// A closed local port: nothing answers there.
fn nowhere() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    format!("http://127.0.0.1:{port}")
}

fn service() -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "ports": [{"port": 80}]}
    }))
    .expect("service")
}

fn node() -> k8s_openapi::api::core::v1::Node {
    serde_json::from_value(json!({"metadata": {"name": "node-a"}})).expect("node")
}

/// Runs the source with `client`; whether it publishes the Service within
/// `within`.
async fn publishes(client: kube::Client, within: Duration) -> bool {
    let (tx, mut rx) = watch::channel(Objects::default());
    let task = tokio::spawn(async move {
        let _ = source::run(client, "node-a".into(), tx).await;
    });
    let found = tokio::time::timeout(within, rx.wait_for(|o| o.services.len() == 1)).await.is_ok_and(|r| r.is_ok());
    task.abort();
    found
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("service-agent-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[tokio::test]
async fn master_overrides_the_kubeconfigs_server() {
    let api = ApiServer::start().await;
    api.apply(Kind::Service, service());
    api.apply(Kind::Node, node());
    let dir = scratch("master");
    let wrong = kubeconfig(&dir, &nowhere());

    // The kubeconfig alone points nowhere: nothing is ever listed.
    let client = source::client(Some(&wrong), None).await.expect("client");
    assert!(!publishes(client, Duration::from_secs(2)).await, "the kubeconfig's server must be unreachable");

    // --master points at the API server: the agent lists and publishes.
    let client = source::client(Some(&wrong), Some(&api.url())).await.expect("client");
    assert!(publishes(client, Duration::from_secs(15)).await, "--master {} not used", api.url());
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_master_that_is_not_a_url_is_refused_with_the_flag_named() {
    let dir = scratch("master-bad");
    let kc = kubeconfig(&dir, &nowhere());
    let Err(err) = source::client(Some(&kc), Some("http://exa mple:6443")).await else {
        panic!("a client from a master that is not a URL");
    };
    assert!(err.to_string().contains("--master"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
