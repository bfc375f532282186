//! An in-process Kubernetes API server test double, over plain HTTP on
//! 127.0.0.1, for Services, EndpointSlices, Nodes and ServiceCIDRs. It
//! follows the documented list/watch protocol where clients depend on it:
//!
//! - one resourceVersion counter across all kinds;
//! - list: `{kind: XList, metadata: {resourceVersion}, items}`;
//! - `?watch=1|true&resourceVersion=N`: newline-delimited JSON events of
//!   every change after N (ADDED/MODIFIED/DELETED), BOOKMARKs when
//!   `allowWatchBookmarks=true`, and the stream ends after `timeoutSeconds`;
//! - a resourceVersion older than the retained history is answered `200`
//!   with one `ERROR` event carrying a `410 Expired` Status (what the real
//!   server does, and the only thing kube's watcher relists on);
//! - `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (..)`,
//!   `k notin (..)`): an object moving into or out of the selector arrives
//!   as ADDED / DELETED;
//! - `fieldSelector` on `metadata.name` / `metadata.namespace`; anything
//!   else is `400 Bad Request` with a Status.
//!
//! The test drives it: create/update/delete objects, `compact()` the
//! history, `drop_watches()` mid-stream, `stop()` and `start()` on the same
//! port, `refuse()` a kind's list and watch with a status (a cluster that
//! does not have the resource: 404; RBAC not granting it: 403) and
//! `serve_again()`.

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

/// The kinds served, with their list paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    ServiceCidr,
}

impl Kind {
    fn api_version(self) -> &'static str {
        match self {
            Self::Service | Self::Node => "v1",
            Self::EndpointSlice => "discovery.k8s.io/v1",
            Self::ServiceCidr => "networking.k8s.io/v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Node => "Node",
            Self::ServiceCidr => "ServiceCIDR",
        }
    }

    fn namespaced(self) -> bool {
        !matches!(self, Self::Node | Self::ServiceCidr)
    }
}

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    /// The object before (None when created).
    old: Option<Value>,
    /// The object after (None when deleted).
    new: Option<Value>,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    history: VecDeque<Change>,
    /// Watches from a resourceVersion below this get 410 Expired.
    oldest_rv: u64,
    uid: u64,
    /// Kinds whose list and watch are answered with this status instead.
    refused: BTreeMap<Kind, StatusCode>,
}

struct Shared {
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Change>,
    /// Bumped to end every open watch.
    generation: watch::Sender<u64>,
}

/// The running double.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl ApiServer {
    /// Starts on a random local port.
    ///
    /// # Panics
    /// When it cannot bind.
    pub async fn start() -> Self {
        let (changes, _) = broadcast::channel(4096);
        let (generation, _) = watch::channel(0);
        let shared = Arc::new(Shared { inner: Mutex::new(Inner::default()), changes, generation });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut me = Self { shared, addr, server: None };
        me.serve(listener);
        me
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let app = Router::new()
            .route("/api/v1/services", get(list_or_watch_services))
            .route("/api/v1/namespaces/{ns}/services", get(list_or_watch_services_ns))
            .route("/apis/discovery.k8s.io/v1/endpointslices", get(list_or_watch_slices))
            .route("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", get(list_or_watch_slices_ns))
            .route("/api/v1/nodes", get(list_or_watch_nodes))
            .route("/apis/networking.k8s.io/v1/servicecidrs", get(list_or_watch_service_cidrs))
            .route("/api", get(discovery_core_versions))
            .route("/apis", get(discovery_groups))
            .route("/api/v1", get(discovery_core_v1))
            .route("/apis/discovery.k8s.io/v1", get(discovery_slices_v1))
            .route("/apis/networking.k8s.io/v1", get(discovery_networking_v1))
            .route("/version", get(version))
            .with_state(self.shared.clone());
        self.server = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
    }

    /// `http://127.0.0.1:PORT`
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving: open watches end, new connections are refused.
    pub async fn stop(&mut self) {
        self.drop_watches();
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
    }

    /// Serves again on the same port (state kept, as an API server backed
    /// by the same etcd would).
    ///
    /// # Panics
    /// When the port cannot be bound again.
    pub async fn restart(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.expect("rebind");
        self.serve(listener);
    }

    /// Ends every open watch stream mid-stream.
    pub fn drop_watches(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// Forgets the history: a watch from any earlier resourceVersion gets
    /// `410 Expired`.
    pub fn compact(&self) {
        let mut inner = self.shared.inner.lock().expect("lock");
        inner.oldest_rv = inner.rv;
        inner.history.clear();
    }

    /// Answers `kind`'s list and watch requests with `code` (and a Status)
    /// from now on; open watches are not cut (see `drop_watches`).
    pub fn refuse(&self, kind: Kind, code: StatusCode) {
        self.shared.inner.lock().expect("lock").refused.insert(kind, code);
    }

    /// Serves `kind` again after `refuse`.
    pub fn serve_again(&self, kind: Kind) {
        self.shared.inner.lock().expect("lock").refused.remove(&kind);
    }

    /// Creates or replaces an object (a typed k8s-openapi object or JSON).
    ///
    /// # Panics
    /// When the object has no name.
    pub fn apply(&self, kind: Kind, object: impl serde::Serialize) -> u64 {
        let mut object = serde_json::to_value(object).expect("serialize");
        let mut inner = self.shared.inner.lock().expect("lock");
        inner.rv += 1;
        inner.uid += 1;
        let rv = inner.rv;
        let name = object["metadata"]["name"].as_str().expect("metadata.name").to_owned();
        let ns = if kind.namespaced() {
            object["metadata"]["namespace"].as_str().unwrap_or("default").to_owned()
        } else {
            String::new()
        };
        object["apiVersion"] = json!(kind.api_version());
        object["kind"] = json!(kind.name());
        if kind.namespaced() {
            object["metadata"]["namespace"] = json!(ns);
        }
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = (kind, ns, name);
        let old = inner.objects.get(&key).cloned();
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] =
                old.as_ref().map_or_else(|| json!(format!("uid-{}", inner.uid)), |o| o["metadata"]["uid"].clone());
        }
        inner.objects.insert(key, object.clone());
        let change = Change { rv, kind, old, new: Some(object) };
        inner.history.push_back(change.clone());
        drop(inner);
        let _ = self.shared.changes.send(change);
        rv
    }

    /// Deletes an object; absent objects are ignored.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut inner = self.shared.inner.lock().expect("lock");
        let ns = if kind.namespaced() { namespace.to_owned() } else { String::new() };
        let Some(mut old) = inner.objects.remove(&(kind, ns, name.to_owned())) else { return };
        inner.rv += 1;
        let rv = inner.rv;
        // A DELETED event carries the object as last seen, with the
        // deletion's resourceVersion.
        old["metadata"]["resourceVersion"] = json!(rv.to_string());
        let change = Change { rv, kind, old: Some(old), new: None };
        inner.history.push_back(change.clone());
        drop(inner);
        let _ = self.shared.changes.send(change);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.drop_watches();
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// A parsed label selector.
#[derive(Debug, Default)]
struct LabelSelector(Vec<Requirement>);

#[derive(Debug)]
enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl LabelSelector {
    fn parse(s: &str) -> Result<Self, String> {
        // Split on commas outside parentheses.
        let mut terms = Vec::new();
        let (mut depth, mut start) = (0, 0);
        for (i, c) in s.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    terms.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        terms.push(&s[start..]);
        let mut reqs = Vec::new();
        for t in terms.into_iter().map(str::trim).filter(|t| !t.is_empty()) {
            let set = |rest: &str| -> Result<Vec<String>, String> {
                let inner = rest
                    .trim()
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or(format!("bad set in {t:?}"))?;
                Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
            };
            let req = if let Some((k, v)) = t.split_once("!=") {
                Requirement::NotEq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = t.split_once("==") {
                Requirement::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = t.split_once('=') {
                Requirement::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, rest)) = t.split_once(" notin ") {
                Requirement::NotIn(k.trim().into(), set(rest)?)
            } else if let Some((k, rest)) = t.split_once(" in ") {
                Requirement::In(k.trim().into(), set(rest)?)
            } else if let Some(k) = t.strip_prefix('!') {
                Requirement::NotExists(k.trim().into())
            } else {
                Requirement::Exists(t.into())
            };
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Eq(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEq(k, v) => get(k) != Some(v.as_str()),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
            Requirement::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
        })
    }
}

/// A parsed field selector (metadata.name / metadata.namespace only).
#[derive(Debug, Default)]
struct FieldSelector(Vec<(String, String, bool)>);

impl FieldSelector {
    fn parse(s: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (k, v, eq) = if let Some((k, v)) = t.split_once("!=") {
                (k, v, false)
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                (k, v, true)
            } else {
                return Err(format!("invalid field selector {t:?}"));
            };
            if !matches!(k.trim(), "metadata.name" | "metadata.namespace") {
                return Err(format!("field label not supported: {}", k.trim()));
            }
            out.push((k.trim().to_owned(), v.trim().to_owned(), eq));
        }
        Ok(Self(out))
    }

    fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(k, v, eq)| {
            let field = k.strip_prefix("metadata.").unwrap_or(k);
            (object["metadata"][field].as_str() == Some(v.as_str())) == *eq
        })
    }
}

struct Filter {
    kind: Kind,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn matches(&self, o: &Value) -> bool {
        self.namespace.as_deref().is_none_or(|ns| o["metadata"]["namespace"].as_str() == Some(ns))
            && self.labels.matches(o)
            && self.fields.matches(o)
    }

    /// The event a watcher with this filter sees for `change`, if any.
    fn event(&self, change: &Change) -> Option<Value> {
        if change.kind != self.kind {
            return None;
        }
        let old = change.old.as_ref().filter(|o| self.matches(o));
        let new = change.new.as_ref().filter(|o| self.matches(o));
        let (type_, object) = match (old, new, &change.new) {
            (None, Some(n), _) => ("ADDED", n.clone()),
            (Some(_), Some(n), _) => ("MODIFIED", n.clone()),
            // Moved out of the selector: DELETED with the new state.
            (Some(_), None, Some(n)) => ("DELETED", n.clone()),
            (Some(o), None, None) => ("DELETED", o.clone()),
            (None, None, _) => return None,
        };
        Some(json!({"type": type_, "object": object}))
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

async fn list_or_watch_services(s: State<Arc<Shared>>, q: Query<BTreeMap<String, String>>) -> Response {
    handle(&s.0, Kind::Service, None, &q.0)
}
async fn list_or_watch_services_ns(
    s: State<Arc<Shared>>,
    ns: Path<String>,
    q: Query<BTreeMap<String, String>>,
) -> Response {
    handle(&s.0, Kind::Service, Some(ns.0), &q.0)
}
async fn list_or_watch_slices(s: State<Arc<Shared>>, q: Query<BTreeMap<String, String>>) -> Response {
    handle(&s.0, Kind::EndpointSlice, None, &q.0)
}
async fn list_or_watch_slices_ns(
    s: State<Arc<Shared>>,
    ns: Path<String>,
    q: Query<BTreeMap<String, String>>,
) -> Response {
    handle(&s.0, Kind::EndpointSlice, Some(ns.0), &q.0)
}
async fn list_or_watch_nodes(s: State<Arc<Shared>>, q: Query<BTreeMap<String, String>>) -> Response {
    handle(&s.0, Kind::Node, None, &q.0)
}
async fn list_or_watch_service_cidrs(s: State<Arc<Shared>>, q: Query<BTreeMap<String, String>>) -> Response {
    handle(&s.0, Kind::ServiceCidr, None, &q.0)
}

// Legacy (unaggregated) discovery, enough for kubectl to map resource names.
async fn discovery_core_versions() -> Response {
    json_response(
        StatusCode::OK,
        &json!({"kind": "APIVersions", "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
    )
}
async fn discovery_groups() -> Response {
    let group = |name: &str| {
        let gv = json!({"groupVersion": format!("{name}/v1"), "version": "v1"});
        json!({"name": name, "versions": [gv.clone()], "preferredVersion": gv})
    };
    json_response(
        StatusCode::OK,
        &json!({"kind": "APIGroupList", "apiVersion": "v1",
        "groups": [group("discovery.k8s.io"), group("networking.k8s.io")]}),
    )
}
fn resource(name: &str, singular: &str, kind: &str, namespaced: bool, short: &[&str]) -> Value {
    json!({"name": name, "singularName": singular, "namespaced": namespaced, "kind": kind,
           "verbs": ["get", "list", "watch"], "shortNames": short})
}
/// The resources of one group version.
fn resource_list(group_version: &str, resources: &[Value]) -> Response {
    json_response(
        StatusCode::OK,
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}),
    )
}
async fn discovery_core_v1() -> Response {
    resource_list(
        "v1",
        &[
            resource("services", "service", "Service", true, &["svc"]),
            resource("nodes", "node", "Node", false, &["no"]),
        ],
    )
}
async fn discovery_slices_v1() -> Response {
    resource_list("discovery.k8s.io/v1", &[resource("endpointslices", "endpointslice", "EndpointSlice", true, &[])])
}
async fn discovery_networking_v1() -> Response {
    resource_list("networking.k8s.io/v1", &[resource("servicecidrs", "servicecidr", "ServiceCIDR", false, &[])])
}
async fn version() -> Response {
    json_response(StatusCode::OK, &json!({"major": "1", "minor": "37", "gitVersion": "v1.37.0-apiserver-double"}))
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn handle(shared: &Arc<Shared>, kind: Kind, namespace: Option<String>, q: &BTreeMap<String, String>) -> Response {
    let refused = shared.inner.lock().expect("lock").refused.get(&kind).copied();
    if let Some(code) = refused {
        let (reason, message) = match code {
            StatusCode::NOT_FOUND => ("NotFound", "the server could not find the requested resource".to_owned()),
            StatusCode::FORBIDDEN => (
                "Forbidden",
                format!("cannot list resource {:?} at the cluster scope", kind.name().to_lowercase() + "s"),
            ),
            _ => ("InternalError", format!("{kind:?} refused")),
        };
        return json_response(code, &status(code.as_u16(), reason, &message));
    }
    let labels = match LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str)) {
        Ok(l) => l,
        Err(m) => return json_response(StatusCode::BAD_REQUEST, &status(400, "BadRequest", &m)),
    };
    let fields = match FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str)) {
        Ok(f) => f,
        Err(m) => return json_response(StatusCode::BAD_REQUEST, &status(400, "BadRequest", &m)),
    };
    let filter = Filter { kind, namespace, labels, fields };
    let watching = q.get("watch").is_some_and(|w| w == "1" || w == "true");
    if !watching {
        let inner = shared.inner.lock().expect("lock");
        let items: Vec<Value> = inner
            .objects
            .iter()
            .filter(|((k, _, _), o)| *k == kind && filter.matches(o))
            .map(|(_, o)| o.clone())
            .collect();
        let list = json!({"kind": format!("{}List", kind.name()), "apiVersion": kind.api_version(),
                          "metadata": {"resourceVersion": inner.rv.to_string()}, "items": items});
        return json_response(StatusCode::OK, &list);
    }
    let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true" || b == "1");
    let timeout = Duration::from_secs(q.get("timeoutSeconds").and_then(|t| t.parse().ok()).unwrap_or(1800));

    // Subscribe before reading the history so no change falls in between.
    let mut live = shared.changes.subscribe();
    let mut generation = shared.generation.subscribe();
    let (backlog, expired, current) = {
        let inner = shared.inner.lock().expect("lock");
        let expired = from != 0 && from < inner.oldest_rv;
        let backlog: Vec<Change> = inner.history.iter().filter(|c| c.rv > from).cloned().collect();
        (backlog, expired, inner.rv)
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(256);
    tokio::spawn(async move {
        let send = |v: Value| {
            let tx = tx.clone();
            async move { tx.send(Ok(format!("{v}\n"))).await.is_ok() }
        };
        if expired {
            let msg = format!("too old resource version: {from} ({current})");
            send(json!({"type": "ERROR", "object": status(410, "Expired", &msg)})).await;
            return;
        }
        let mut last = from;
        for change in backlog {
            last = change.rv;
            if let Some(ev) = filter.event(&change)
                && !send(ev).await
            {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                () = &mut deadline => return,
                _ = generation.changed() => return,
                _ = tick.tick(), if bookmarks => {
                    let rv = last.max(current);
                    let bm = json!({"type": "BOOKMARK", "object": {"kind": kind.name(), "apiVersion": kind.api_version(),
                                     "metadata": {"resourceVersion": rv.to_string()}}});
                    if !send(bm).await { return; }
                }
                change = live.recv() => match change {
                    Ok(change) if change.rv > last => {
                        last = change.rv;
                        if let Some(ev) = filter.event(&change) && !send(ev).await {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                },
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .expect("response")
}
