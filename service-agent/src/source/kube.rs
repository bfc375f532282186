//! The Kubernetes API source: kube-rs reflectors for Services,
//! EndpointSlices (deserialized straight into the slim
//! [`crate::vocabulary::Slice`]), this node's Node and the ServiceCIDRs,
//! published as whole [`Objects`].
//!
//! - Services are watched with kube-proxy's label selector
//!   (`!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name`),
//!   so objects moving in or out of it arrive as additions and deletions.
//! - The published state is always read from the reflector stores, never
//!   assembled from the events' objects: the events only say which keys to
//!   read again. Each publication applies those keys to the last one's
//!   persistent maps ([`crate::vocabulary::ObjectMap`]), so one changed
//!   object costs O(log n) here and in the model, not a walk over every
//!   object. After a relist (for instance after a `410 Expired`) the store
//!   holds exactly what the API server listed and the maps are rebuilt from
//!   it, so whatever disappeared meanwhile is pruned.
//! - Nothing is published before the Service, EndpointSlice and Node stores
//!   have completed their first list, so a half-listed cluster is never
//!   programmed.
//! - The ServiceCIDR store is not waited for: a cluster before 1.33 (no
//!   `networking.k8s.io/v1` ServiceCIDR) or whose RBAC does not grant
//!   `servicecidrs` list/watch answers its list with an error, and must
//!   still be served. Without ServiceCIDRs only the drop rows of their
//!   unallocated addresses are missing (`--service-cluster-ip-range`'s
//!   still apply): it fails open. So publication starts without them and
//!   republishes when they are listed; their watch retries with backoff
//!   like the others, and its errors are logged once per error streak.
//! - Watch errors back off and retry (kube's default backoff); while the API
//!   server is away the last published state stays in force.
//! - A burst of changes is coalesced: after a change the publisher waits
//!   [`COALESCE`] for more before it publishes once.
//! - Each watcher runs in its own task: a watcher only reconnects while it
//!   is polled.

use std::{
    collections::BTreeSet,
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    networking::v1::ServiceCIDR,
};
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::{Notify, watch};

use crate::vocabulary::{ObjectMap, ObjectRef, Objects, Slice, rebase};

/// kube-proxy's Service label selector.
pub const SERVICE_SELECTOR: &str = "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name";
/// How long the publisher waits after a change for more changes.
pub const COALESCE: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig { path: String, source: kube::config::KubeconfigError },
    #[error("Kubernetes client configuration: {0}")]
    Config(String),
    #[error("creating the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
    #[error("a reflector store was dropped before it was ready")]
    StoreDropped,
}

/// A client from `kubeconfig`, or the in-cluster configuration (service
/// account token and CA, `KUBERNETES_SERVICE_HOST`/`KUBERNETES_SERVICE_PORT`)
/// when it is `None`. `master` (kube-proxy's `--master`) replaces the
/// server address of either, keeping its credentials; without a kubeconfig
/// and outside a pod it is used alone, unauthenticated, as kube-proxy does.
///
/// The DaemonSet needs one of the two: in the host network without
/// kube-proxy, the `kubernetes` Service's ClusterIP (what the kubelet puts
/// in `KUBERNETES_SERVICE_HOST`) is not translated for the agent's own
/// connections, so it is given the API server's real address
/// (deploy/apiserver.yaml overrides those two variables).
///
/// # Errors
/// When the configuration cannot be read, `master` is not a URL, or the
/// client cannot be built.
pub async fn client(kubeconfig: Option<&Path>, master: Option<&str>) -> Result<Client, Error> {
    // axum re-exports the `http` crate kube's config uses (one version in
    // the lockfile).
    let master = master
        .map(|m| m.parse::<axum::http::Uri>().map_err(|e| Error::Config(format!("--master {m:?} is not a URL: {e}"))))
        .transpose()?;
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|source| Error::Kubeconfig { path: path.display().to_string(), source })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| Error::Kubeconfig { path: path.display().to_string(), source })?
        }
        None => match (kube::Config::incluster(), &master) {
            (Ok(config), _) => config,
            (Err(e), Some(m)) => {
                tracing::info!(error = %e, master = %m, "no in-cluster credentials: using --master without them");
                kube::Config::new(m.clone())
            }
            (Err(e), None) => return Err(Error::Config(e.to_string())),
        },
    };
    if let Some(m) = master {
        config.cluster_url = m;
    }
    tracing::info!(server = %config.cluster_url, "API server");
    Ok(Client::try_from(config)?)
}

/// The keys of one kind whose store entries changed since the last
/// publication, or all of them (a relist, or nothing published yet).
#[derive(Debug)]
enum Dirty {
    All,
    Keys(BTreeSet<ObjectRef>),
}

impl Dirty {
    fn add(&mut self, key: ObjectRef) {
        if let Self::Keys(keys) = self {
            keys.insert(key);
        }
    }
}

/// Shared between a watcher's task (which marks) and the publisher (which
/// takes the marks).
type DirtyKeys = Arc<Mutex<Dirty>>;

fn dirty_keys() -> DirtyKeys {
    Arc::new(Mutex::new(Dirty::All))
}

fn take(dirty: &DirtyKeys) -> Dirty {
    std::mem::replace(&mut *dirty.lock().unwrap_or_else(PoisonError::into_inner), Dirty::Keys(BTreeSet::new()))
}

/// Drives one watcher stream in its own task, marking the keys its events
/// touch in `dirty` when given (every key on a relist; the kinds read
/// whole at each publication have none) and waking `changed` on every
/// event, and logging errors once per error streak (with `meanwhile`,
/// what the failure means for the dataplane). The reflector has applied an
/// event to its store before the stream yields it, so the publisher that
/// takes a mark always reads the store as of that event or later.
fn drive<S, K>(kind: &'static str, stream: S, changed: Arc<Notify>, dirty: Option<DirtyKeys>, meanwhile: &'static str)
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    K: Resource + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if failing {
                        tracing::info!(kind, "watch resumed");
                        failing = false;
                    }
                    if let Some(dirty) = &dirty {
                        let mut dirty = dirty.lock().unwrap_or_else(PoisonError::into_inner);
                        match &event {
                            watcher::Event::Apply(o) | watcher::Event::Delete(o) => dirty.add(key_of(o)),
                            // A relist: the store is replaced whole at its end.
                            watcher::Event::Init | watcher::Event::InitApply(_) | watcher::Event::InitDone => {
                                *dirty = Dirty::All;
                            }
                        }
                    }
                    changed.notify_one();
                }
                Err(error) => {
                    if !failing {
                        tracing::warn!(kind, %error, meanwhile, "watch failed; retrying with backoff");
                        failing = true;
                    }
                }
            }
        }
    });
}

/// Drops what an object carries that the agent never reads before it is
/// stored: its `managedFields`, often larger than the rest of a small
/// object.
fn strip<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// What a failing watch of a kind the publication waits for means.
const KEEPING: &str = "the last state is kept";

/// An object's key (a namespaced object without a namespace is in
/// `default`).
fn key_of<K: Resource>(o: &K) -> ObjectRef {
    let meta = o.meta();
    ObjectRef {
        namespace: meta.namespace.as_deref().unwrap_or("default").into(),
        name: meta.name.as_deref().unwrap_or_default().into(),
    }
}

/// Brings `map` to `store` for the `dirty` keys: each is read again from
/// the store (present: its object, shared with the store; absent:
/// removed), or, for [`Dirty::All`], the map is rebuilt from the whole
/// store and rebased on the old one, so what did not change keeps its
/// allocation and its place in the shared structure.
fn refresh<K>(map: &mut ObjectMap<K>, store: &Store<K>, dirty: Dirty)
where
    K: Resource<DynamicType = ()> + Clone + PartialEq,
{
    match dirty {
        Dirty::All => {
            let all: ObjectMap<K> = store.state().into_iter().map(|o| (key_of(o.as_ref()), o)).collect();
            *map = rebase(&all, map);
        }
        Dirty::Keys(keys) => {
            for key in keys {
                match store.get(&reflector::ObjectRef::new(&key.name).within(&key.namespace)) {
                    Some(object) => {
                        map.insert(key, object);
                    }
                    None => {
                        map.remove(&key);
                    }
                }
            }
        }
    }
}

/// Watches the cluster and publishes [`Objects`] on `tx` until `tx` has no
/// receivers left.
///
/// # Errors
/// When a store is dropped before its first list (a watcher task died).
pub async fn run(client: Client, node_name: String, tx: watch::Sender<Objects>) -> Result<(), Error> {
    let changed = Arc::new(Notify::new());

    // managedFields (the server-side apply bookkeeping) are nothing the
    // model reads: dropped before the store keeps an object.
    let (services, writer) = reflector::store::<Service>();
    let config = watcher::Config::default().labels(SERVICE_SELECTOR);
    let stream = watcher(Api::<Service>::all(client.clone()), config).default_backoff().modify(strip);
    let stream = reflector::reflector(writer, stream);
    let services_dirty = dirty_keys();
    drive("Service", stream, changed.clone(), Some(Arc::clone(&services_dirty)), KEEPING);

    // Deserialized straight into the slim form: no full EndpointSlice is
    // kept (see `vocabulary::Slice`).
    let (slices, writer) = reflector::store::<Slice>();
    // (`Slice` drops its managedFields itself.)
    let stream = watcher(Api::<Slice>::all(client.clone()), watcher::Config::default()).default_backoff();
    let stream = reflector::reflector(writer, stream);
    let slices_dirty = dirty_keys();
    drive("EndpointSlice", stream, changed.clone(), Some(Arc::clone(&slices_dirty)), KEEPING);

    let (nodes, writer) = reflector::store::<Node>();
    let config = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let stream = reflector::reflector(writer, watcher(Api::<Node>::all(client.clone()), config).default_backoff());
    drive("Node", stream, changed.clone(), None, KEEPING);

    // Not waited for (see the module documentation): a cluster without
    // them, or without the right to list them, is served all the same.
    let (service_cidrs, writer) = reflector::store::<ServiceCIDR>();
    let stream = reflector::reflector(
        writer,
        watcher(Api::<ServiceCIDR>::all(client), watcher::Config::default()).default_backoff(),
    );
    drive(
        "ServiceCIDR",
        stream,
        changed.clone(),
        None,
        "the last listed ServiceCIDRs are kept; before the first list only --service-cluster-ip-range's \
         unallocated addresses are dropped (a cluster before 1.33 has no ServiceCIDRs; otherwise check that the \
         RBAC grants servicecidrs list and watch)",
    );

    for ready in [services.wait_until_ready().await, slices.wait_until_ready().await, nodes.wait_until_ready().await] {
        ready.map_err(|_| Error::StoreDropped)?;
    }
    tracing::info!("initial lists complete");
    let mut stores =
        Stores { services, slices, nodes, service_cidrs, services_dirty, slices_dirty, published: Objects::default() };
    loop {
        stores.publish(&node_name, &tx);
        changed.notified().await;
        // Coalesce a burst into one publication.
        tokio::time::sleep(COALESCE).await;
        if tx.is_closed() {
            return Ok(());
        }
    }
}

/// The reflector stores a publication is read from, the keys changed
/// since the last one, and the last one.
struct Stores {
    services: Store<Service>,
    slices: Store<Slice>,
    nodes: Store<Node>,
    service_cidrs: Store<ServiceCIDR>,
    services_dirty: DirtyKeys,
    slices_dirty: DirtyKeys,
    published: Objects,
}

impl Stores {
    fn publish(&mut self, node_name: &str, tx: &watch::Sender<Objects>) {
        refresh(&mut self.published.services, &self.services, take(&self.services_dirty));
        refresh(&mut self.published.endpoint_slices, &self.slices, take(&self.slices_dirty));
        // One Node and a few ServiceCIDRs: read whole.
        self.published.node = self
            .nodes
            .state()
            .into_iter()
            .find(|n| n.metadata.name.as_deref() == Some(node_name))
            .map(|n| (*n).clone());
        // Cluster-scoped: by name. Empty until (and unless) listed.
        self.published.service_cidrs = self
            .service_cidrs
            .state()
            .into_iter()
            .map(|c| (c.metadata.name.clone().unwrap_or_default(), (*c).clone()))
            .collect();
        tx.send_if_modified(|current| {
            // Equal maps that share their structure compare in O(1).
            if *current == self.published {
                false
            } else {
                current.clone_from(&self.published);
                true
            }
        });
    }
}
