//! The Kubernetes API source: kube-rs reflectors for Services,
//! EndpointSlices, this node's Node and the ServiceCIDRs, published as
//! whole [`Objects`].
//!
//! - Services are watched with kube-proxy's label selector
//!   (`!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name`),
//!   so objects moving in or out of it arrive as additions and deletions.
//! - The published state is always read from the reflector stores, never
//!   assembled from individual events: after a relist (for instance after a
//!   `410 Expired`) the store holds exactly what the API server listed, so
//!   whatever disappeared meanwhile is pruned.
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

use std::{path::Path, sync::Arc, time::Duration};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
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

use crate::vocabulary::{ObjectRef, Objects};

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

/// Drives one watcher stream in its own task, waking `changed` on every
/// event and logging errors once per error streak (with `meanwhile`, what
/// the failure means for the dataplane).
fn drive<S, T>(kind: &'static str, stream: S, changed: Arc<Notify>, meanwhile: &'static str)
where
    S: Stream<Item = Result<T, watcher::Error>> + Send + 'static,
    T: Send,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => {
                    if failing {
                        tracing::info!(kind, "watch resumed");
                        failing = false;
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

/// What a failing watch of a kind the publication waits for means.
const KEEPING: &str = "the last state is kept";

/// The store's objects by reference, shared with the store: an object the
/// watch did not replace keeps its allocation from one publication to the
/// next, which is how the model tells it has not changed.
fn keyed<K: Resource>(objects: Vec<Arc<K>>) -> std::collections::BTreeMap<ObjectRef, Arc<K>> {
    objects
        .into_iter()
        .map(|o| {
            let meta = o.meta();
            let key = ObjectRef {
                namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
                name: meta.name.clone().unwrap_or_default(),
            };
            (key, o)
        })
        .collect()
}

/// Watches the cluster and publishes [`Objects`] on `tx` until `tx` has no
/// receivers left.
///
/// # Errors
/// When a store is dropped before its first list (a watcher task died).
pub async fn run(client: Client, node_name: String, tx: watch::Sender<Objects>) -> Result<(), Error> {
    let changed = Arc::new(Notify::new());

    let (services, writer) = reflector::store::<Service>();
    let config = watcher::Config::default().labels(SERVICE_SELECTOR);
    let stream = reflector::reflector(writer, watcher(Api::<Service>::all(client.clone()), config).default_backoff());
    drive("Service", stream, changed.clone(), KEEPING);

    let (slices, writer) = reflector::store::<EndpointSlice>();
    let stream = reflector::reflector(
        writer,
        watcher(Api::<EndpointSlice>::all(client.clone()), watcher::Config::default()).default_backoff(),
    );
    drive("EndpointSlice", stream, changed.clone(), KEEPING);

    let (nodes, writer) = reflector::store::<Node>();
    let config = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let stream = reflector::reflector(writer, watcher(Api::<Node>::all(client.clone()), config).default_backoff());
    drive("Node", stream, changed.clone(), KEEPING);

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
        "the last listed ServiceCIDRs are kept; before the first list only --service-cluster-ip-range's \
         unallocated addresses are dropped (a cluster before 1.33 has no ServiceCIDRs; otherwise check that the \
         RBAC grants servicecidrs list and watch)",
    );

    for ready in [services.wait_until_ready().await, slices.wait_until_ready().await, nodes.wait_until_ready().await] {
        ready.map_err(|_| Error::StoreDropped)?;
    }
    tracing::info!("initial lists complete");
    let stores = Stores { services, slices, nodes, service_cidrs };
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

/// The reflector stores a publication is read from.
struct Stores {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    service_cidrs: Store<ServiceCIDR>,
}

impl Stores {
    fn publish(&self, node_name: &str, tx: &watch::Sender<Objects>) {
        let objects = Objects {
            services: keyed(self.services.state()),
            endpoint_slices: keyed(self.slices.state()),
            node: self
                .nodes
                .state()
                .into_iter()
                .find(|n| n.metadata.name.as_deref() == Some(node_name))
                .map(|n| (*n).clone()),
            // Cluster-scoped: by name. Empty until (and unless) listed.
            service_cidrs: self
                .service_cidrs
                .state()
                .into_iter()
                .map(|c| (c.metadata.name.clone().unwrap_or_default(), (*c).clone()))
                .collect(),
        };
        tx.send_if_modified(|current| {
            if current.is_same(&objects) {
                false
            } else {
                *current = objects;
                true
            }
        });
    }
}
