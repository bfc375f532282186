//! The manifest-directory source: the YAML/JSON a user would `kubectl
//! apply`, read from a directory and polled for changes.
//!
//! Handled kinds: `v1 Service`, `discovery.k8s.io/v1 EndpointSlice`,
//! `v1 Endpoints`, which are mirrored into EndpointSlices the way the
//! endpointslice-mirroring controller does (only for a Service without a
//! selector, unless labelled `endpointslice.kubernetes.io/skip-mirror`), and
//! `v1 Node` (the agent uses the one named like its node: its
//! `topology.kubernetes.io/zone` label drives topology, as in cluster mode),
//! and `networking.k8s.io/v1 ServiceCIDR` (its ranges are used as
//! `--service-cluster-ip-range`'s). Other kinds are skipped. A broken file
//! or object is reported with the file, the document, the object and the
//! field; everything else loads.
//!
//! No file can exhaust the agent: one over [`MAX_FILE_BYTES`] is skipped
//! unread, and a file's documents may expand (through YAML aliases) to at
//! most [`EXPANSION_PER_BYTE`] budget units per byte of the file plus
//! [`EXPANSION_SLACK`] (see [`bounded`]), and nest at most
//! [`nesting::MAX_NESTING`] levels deep (see [`nesting`]); past that the
//! document is reported and the file's remaining documents are skipped. The
//! other files load as usual.

use std::{
    cell::Cell,
    collections::{BTreeMap, hash_map::DefaultHasher},
    fmt,
    hash::{Hash as _, Hasher as _},
    io::Read as _,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Node, Service},
    discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    networking::v1::ServiceCIDR,
};
use serde::de::{DeserializeOwned, DeserializeSeed as _};

use crate::vocabulary::{
    LABEL_MANAGED_BY, LABEL_SERVICE_NAME, LABEL_SKIP_MIRROR, MIRRORING_CONTROLLER, ObjectRef, Objects, Slice,
};

/// The largest manifest file read (8 MiB); a larger one is reported and
/// skipped without being read. The API server refuses a request over 3 MiB
/// and etcd an object over 1.5 MiB, so this holds several of the largest
/// objects a cluster can have; bigger sets belong in several files.
pub const MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;
/// How far a file may expand when parsed: its documents together may take
/// this many budget units per byte of the file (a node costs
/// [`bounded::NODE_COST`], each byte of text one; a file without aliases
/// takes at most about 5 per byte) ...
pub const EXPANSION_PER_BYTE: usize = 8;
/// ... plus this many, so a small file may use anchors freely.
pub const EXPANSION_SLACK: usize = 1024 * 1024;

mod bounded;
mod nesting;

/// A file, document or field that could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based index of the YAML document in the file (0: the whole file).
    pub document: usize,
    /// `Kind namespace/name`, when known.
    pub object: Option<String>,
    /// The field path, e.g. `spec.ports[0].port`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.document > 0 {
            write!(f, " (document {})", self.document)?;
        }
        if let Some(object) = &self.object {
            write!(f, ": {object}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ManifestError {}

/// What the directory holds right now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub objects: Objects,
    /// The Node objects, by name; [`Snapshot::for_node`] picks this node's.
    pub nodes: BTreeMap<String, Node>,
    pub errors: Vec<ManifestError>,
}

impl Snapshot {
    /// The objects as node `node_name` sees them: with its Node object
    /// when the directory has one.
    #[must_use]
    pub fn for_node(&self, node_name: &str) -> Objects {
        Objects { node: self.nodes.get(node_name).cloned(), ..self.objects.clone() }
    }
}

fn is_manifest(path: &Path) -> bool {
    let hidden = path.file_name().and_then(|n| n.to_str()).is_none_or(|n| n.starts_with('.'));
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    !hidden && matches!(ext, "yaml" | "yml" | "json") && path.is_file()
}

/// The manifest files of `dir`, sorted by name.
fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(dir)?.filter_map(Result::ok).map(|e| e.path()).filter(|p| is_manifest(p)).collect();
    files.sort();
    Ok(files)
}

/// Reads every manifest in `dir`.
///
/// # Errors
/// Only when `dir` itself cannot be read; problems with files and objects
/// are in [`Snapshot::errors`].
pub fn load_dir(dir: &Path) -> std::io::Result<Snapshot> {
    let mut loader = Loader::default();
    for file in manifest_files(dir)? {
        match read_bounded(&file) {
            Ok(text) => loader.load_file(&file, &text),
            Err(message) => loader.error(&file, 0, None, None, message),
        }
    }
    Ok(loader.finish())
}

/// What a directory holding only `file` with `text` would load (`file`
/// names it in errors and tells JSON, by its extension, from YAML).
#[must_use]
pub fn parse(file: &Path, text: &str) -> Snapshot {
    let mut loader = Loader::default();
    loader.load_file(file, text);
    loader.finish()
}

/// The file's text, or why it is not read: over [`MAX_FILE_BYTES`] (also
/// when it grows while being read, or is a special file without a size),
/// not UTF-8, unreadable.
fn read_bounded(file: &Path) -> Result<String, String> {
    let too_big = || format!("larger than the {} MiB limit for a manifest file; skipped", MAX_FILE_BYTES >> 20);
    let f = std::fs::File::open(file).map_err(|e| format!("cannot read: {e}"))?;
    if f.metadata().is_ok_and(|m| m.len() > MAX_FILE_BYTES) {
        return Err(too_big());
    }
    let mut bytes = Vec::new();
    f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_big());
    }
    String::from_utf8(bytes).map_err(|e| format!("cannot read: not UTF-8: {e}"))
}

#[derive(Default)]
struct Loader {
    services: BTreeMap<ObjectRef, (PathBuf, Service)>,
    slices: BTreeMap<ObjectRef, (PathBuf, Slice)>,
    /// With the document each is in.
    endpoints: BTreeMap<ObjectRef, (PathBuf, (usize, Endpoints))>,
    nodes: BTreeMap<String, (PathBuf, Node)>,
    service_cidrs: BTreeMap<String, (PathBuf, ServiceCIDR)>,
    errors: Vec<ManifestError>,
}

/// Keeps the first object of a key, in file order; a later one is reported
/// against its own file and document.
fn keep_first<K: Ord, T>(
    objects: &mut BTreeMap<K, (PathBuf, T)>,
    errors: &mut Vec<ManifestError>,
    (file, document, object): (&Path, usize, &str),
    key: K,
    value: T,
) {
    if let Some((first, _)) = objects.get(&key) {
        let message = format!("duplicate of the one in {} (that one is used)", first.display());
        errors.push(ManifestError {
            file: file.to_owned(),
            document,
            object: Some(object.to_owned()),
            field: None,
            message,
        });
    } else {
        objects.insert(key, (file.to_owned(), value));
    }
}

impl Loader {
    fn error(&mut self, file: &Path, document: usize, object: Option<String>, field: Option<String>, message: String) {
        self.errors.push(ManifestError { file: file.to_owned(), document, object, field, message });
    }

    /// Loads one file; a panic of the parser (a bug, never expected) is
    /// reported against the file instead of taking the agent down.
    fn load_file(&mut self, file: &Path, text: &str) {
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.load_text(file, text)));
        if let Err(panic) = loaded {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            self.error(file, 0, None, None, format!("the parser failed (a bug; the file is skipped): {what}"));
        }
    }

    fn load_text(&mut self, file: &Path, text: &str) {
        let is_json = file.extension().is_some_and(|e| e == "json");
        // Shared by all the file's documents: the file as a whole is bounded.
        let budget = Cell::new(text.len().saturating_mul(EXPANSION_PER_BYTE).saturating_add(EXPANSION_SLACK));
        // Each document is converted as soon as it is parsed, so only one
        // document's generic value is held at a time.
        let mut load = |i: usize, doc: Result<serde_json::Value, String>| match doc {
            Ok(serde_json::Value::Null) => {}
            Ok(value) => self.load_value(file, i, value),
            Err(message)
                if message.contains(bounded::OVER_BUDGET)
                    || message.contains(nesting::TOO_DEEP)
                    || message.contains("repetition limit exceeded") =>
            {
                self.error(file, i, None, None, format!("too large: {message}"));
            }
            Err(message) => self.error(file, i, None, None, format!("not valid YAML/JSON: {message}")),
        };
        if is_json {
            let mut de = serde_json::Deserializer::from_str(text);
            let parsed = bounded::Budgeted(&budget).deserialize(&mut de).and_then(|v| de.end().map(|()| v));
            load(1, parsed.map_err(|e| e.to_string()));
            return;
        }
        let too_deep = nesting::too_deep(text);
        let mut documents = serde_norway::Deserializer::from_str(text);
        for i in 1.. {
            // Checked before the iterator loads the document: loading is
            // what takes the time.
            if let Some((deep, at)) = &too_deep
                && *deep == i
            {
                load(i, Err(at.clone()));
                break;
            }
            let Some(doc) = documents.next() else { break };
            let parsed = bounded::Budgeted(&budget).deserialize(doc).map_err(|e: serde_norway::Error| e.to_string());
            let failed = parsed.is_err();
            load(i, parsed);
            // After a syntax error the stream cannot resynchronise (and may
            // repeat the error forever): stop at the first.
            if failed {
                break;
            }
        }
    }

    fn load_value(&mut self, file: &Path, document: usize, value: serde_json::Value) {
        let kind = value.get("kind").and_then(serde_json::Value::as_str).unwrap_or("").to_owned();
        let api_version = value.get("apiVersion").and_then(serde_json::Value::as_str).unwrap_or("").to_owned();
        if kind == "List" || kind.ends_with("List") && value.get("items").is_some() {
            if let Some(serde_json::Value::Array(items)) = value.get("items") {
                for item in items.clone() {
                    self.load_value(file, document, item);
                }
            }
            return;
        }
        let meta = value.get("metadata");
        let name = meta.and_then(|m| m.get("name")).and_then(serde_json::Value::as_str).map(str::to_owned);
        let namespace = meta
            .and_then(|m| m.get("namespace"))
            .and_then(serde_json::Value::as_str)
            .filter(|n| !n.is_empty())
            .unwrap_or("default")
            .to_owned();
        let handled = matches!(
            (api_version.as_str(), kind.as_str()),
            ("v1", "Service" | "Endpoints" | "Node")
                | ("discovery.k8s.io/v1", "EndpointSlice")
                | ("networking.k8s.io/v1", "ServiceCIDR")
        );
        if !handled {
            tracing::debug!(file = %file.display(), document, %api_version, %kind, "skipping a kind this source does not handle");
            return;
        }
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            self.error(file, document, Some(kind), Some("metadata.name".into()), "is required".into());
            return;
        };
        // Cluster-scoped kinds are named by their name alone.
        match kind.as_str() {
            "Node" => {
                let object = format!("Node {name}");
                if let Some(node) = self.typed::<Node>(file, document, &object, value) {
                    keep_first(&mut self.nodes, &mut self.errors, (file, document, &object), name, node);
                }
                return;
            }
            "ServiceCIDR" => {
                let object = format!("ServiceCIDR {name}");
                if let Some(cidr) = self.typed::<ServiceCIDR>(file, document, &object, value) {
                    keep_first(&mut self.service_cidrs, &mut self.errors, (file, document, &object), name, cidr);
                }
                return;
            }
            _ => {}
        }
        let key = ObjectRef { namespace: namespace.into(), name: name.into() };
        let object = format!("{kind} {key}");
        match kind.as_str() {
            "Service" => {
                if let Some(svc) = self.typed::<Service>(file, document, &object, value) {
                    keep_first(&mut self.services, &mut self.errors, (file, document, &object), key, svc);
                }
            }
            "EndpointSlice" => {
                // Checked whole as the API type, kept slimmed.
                if let Some(slice) = self.typed::<EndpointSlice>(file, document, &object, value) {
                    keep_first(&mut self.slices, &mut self.errors, (file, document, &object), key, Slice::from(slice));
                }
            }
            _ => {
                if let Some(endpoints) = self.typed::<Endpoints>(file, document, &object, value) {
                    let at = (file, document, object.as_str());
                    keep_first(&mut self.endpoints, &mut self.errors, at, key, (document, endpoints));
                }
            }
        }
    }

    /// Deserializes with the failing field's path in the error.
    fn typed<T: DeserializeOwned>(
        &mut self,
        file: &Path,
        document: usize,
        object: &str,
        value: serde_json::Value,
    ) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(t) => Some(t),
            Err(e) => {
                let path = e.path().to_string();
                let field = (path != ".").then_some(path);
                self.error(file, document, Some(object.to_owned()), field, e.into_inner().to_string());
                None
            }
        }
    }

    fn finish(mut self) -> Snapshot {
        // Moved, not copied: the loader is done with them.
        let mut objects = Objects {
            services: std::mem::take(&mut self.services).into_iter().map(|(k, (_, s))| (k, Arc::new(s))).collect(),
            endpoint_slices: std::mem::take(&mut self.slices).into_iter().map(|(k, (_, s))| (k, Arc::new(s))).collect(),
            node: None,
            service_cidrs: std::mem::take(&mut self.service_cidrs).into_iter().map(|(k, (_, c))| (k, c)).collect(),
        };
        let endpoints = std::mem::take(&mut self.endpoints);
        for (key, (file, (document, endpoints))) in endpoints {
            let Some(svc) = objects.services.get(&key) else { continue };
            let has_selector = svc.spec.as_ref().and_then(|s| s.selector.as_ref()).is_some_and(|s| !s.is_empty());
            let skip =
                endpoints.metadata.labels.as_ref().and_then(|l| l.get(LABEL_SKIP_MIRROR)).is_some_and(|v| v == "true");
            if has_selector || skip {
                continue;
            }
            for slice in mirror(&key, &endpoints, &mut |field, message| {
                self.errors.push(ManifestError {
                    file: file.clone(),
                    document,
                    object: Some(format!("Endpoints {key}")),
                    field: Some(field),
                    message,
                });
            }) {
                let name = slice.metadata.name.clone().unwrap_or_default();
                objects
                    .endpoint_slices
                    .insert(ObjectRef { namespace: key.namespace.clone(), name: name.into() }, Arc::new(slice.into()));
            }
        }
        let nodes = self.nodes.into_iter().map(|(name, (_, node))| (name, node)).collect();
        Snapshot { objects, nodes, errors: self.errors }
    }
}

/// Mirrors one v1 Endpoints into EndpointSlices: one per subset and address
/// family, named `<endpoints name>-mirror-<n>` (n counts from 0 in subset
/// order), labelled with the Endpoints' labels plus
/// `kubernetes.io/service-name` and `endpointslice.kubernetes.io/managed-by`.
/// `addresses` become ready endpoints, `notReadyAddresses` not-ready ones.
fn mirror(key: &ObjectRef, endpoints: &Endpoints, report: &mut dyn FnMut(String, String)) -> Vec<EndpointSlice> {
    let mut out = Vec::new();
    for (si, subset) in endpoints.subsets.iter().flatten().enumerate() {
        let ports: Vec<EndpointPort> = subset
            .ports
            .iter()
            .flatten()
            .map(|p| EndpointPort {
                name: p.name.clone(),
                port: Some(p.port),
                protocol: p.protocol.clone(),
                app_protocol: p.app_protocol.clone(),
            })
            .collect();
        let mut by_family: BTreeMap<&'static str, Vec<Endpoint>> = BTreeMap::new();
        let groups = [
            ("addresses", subset.addresses.as_ref(), true),
            ("notReadyAddresses", subset.not_ready_addresses.as_ref(), false),
        ];
        for (field, addresses, ready) in groups {
            for (ai, address) in addresses.into_iter().flatten().enumerate() {
                let family = match address.ip.parse::<IpAddr>() {
                    Ok(IpAddr::V4(_)) => "IPv4",
                    Ok(IpAddr::V6(_)) => "IPv6",
                    Err(e) => {
                        report(
                            format!("subsets[{si}].{field}[{ai}].ip"),
                            format!("{:?} is not an IP address: {e}", address.ip),
                        );
                        continue;
                    }
                };
                by_family.entry(family).or_default().push(Endpoint {
                    addresses: vec![address.ip.clone()],
                    conditions: Some(EndpointConditions {
                        ready: Some(ready),
                        serving: Some(ready),
                        terminating: Some(false),
                    }),
                    hostname: address.hostname.clone(),
                    node_name: address.node_name.clone(),
                    target_ref: address.target_ref.clone(),
                    ..Endpoint::default()
                });
            }
        }
        for (family, eps) in by_family {
            let mut labels = endpoints.metadata.labels.clone().unwrap_or_default();
            labels.insert(LABEL_SERVICE_NAME.into(), key.name.to_string());
            labels.insert(LABEL_MANAGED_BY.into(), MIRRORING_CONTROLLER.into());
            let mut slice = EndpointSlice {
                address_type: family.into(),
                endpoints: Some(eps),
                ports: Some(ports.clone()),
                ..EndpointSlice::default()
            };
            slice.metadata.name = Some(format!("{}-mirror-{}", key.name, out.len()));
            slice.metadata.namespace = Some(key.namespace.to_string());
            slice.metadata.labels = Some(labels);
            out.push(slice);
        }
    }
    out
}

/// What [`fingerprint`] takes of a directory.
pub type Fingerprint = Vec<(PathBuf, u64)>;

/// A fingerprint of the directory: every manifest's name and a hash of its
/// contents (so an edit that keeps size and mtime is still seen).
///
/// Reads every file at every poll. A fingerprint of metadata alone (with
/// the contents of recently changed files) was tried and reverted: its
/// value changed when a file aged out of the "recent" window, which made
/// a new snapshot (and a sync) out of nothing.
///
/// # Errors
/// When the directory cannot be listed.
pub fn fingerprint(dir: &Path) -> std::io::Result<Fingerprint> {
    let mut out = Vec::new();
    for file in manifest_files(dir)? {
        let mut h = DefaultHasher::new();
        // An oversized file is not read (it would be, every poll): its
        // error text, with its size, stands for it.
        match read_bounded(&file) {
            Ok(text) => text.hash(&mut h),
            Err(message) => {
                message.hash(&mut h);
                std::fs::metadata(&file).ok().map(|m| (m.len(), m.modified().ok())).hash(&mut h);
            }
        }
        out.push((file, h.finish()));
    }
    Ok(out)
}

/// Polls `dir` every `interval` and sends a new [`Snapshot`] when a
/// manifest was added, changed or removed. Polling rather than inotify:
/// kubelet updates ConfigMap mounts by swapping a symlinked directory,
/// which inotify watches on the files miss, and hashing a directory of
/// manifests a few times a second costs next to nothing. When the
/// directory cannot be read, the last snapshot stays in force.
///
/// `loaded` is the directory's fingerprint taken before the caller loaded
/// the snapshot `tx` holds: the first poll sends only when the directory
/// changed since (so a start does not parse every manifest twice, the
/// second time while the first sync runs). `None`: the first poll sends.
pub async fn watch(
    dir: PathBuf,
    interval: Duration,
    tx: tokio::sync::watch::Sender<Snapshot>,
    loaded: Option<Fingerprint>,
) {
    let mut last = loaded;
    let mut warned = false;
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        if tx.is_closed() {
            return;
        }
        let now = match fingerprint(&dir) {
            Ok(f) => f,
            Err(e) => {
                if !warned {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot read the manifest directory; keeping the last state");
                    warned = true;
                }
                continue;
            }
        };
        warned = false;
        if last.as_ref() == Some(&now) {
            continue;
        }
        last = Some(now);
        match load_dir(&dir) {
            Ok(mut snapshot) => {
                for e in &snapshot.errors {
                    tracing::warn!(error = %e, "invalid manifest (skipped)");
                }
                // What did not change stays the same allocation: the model
                // recomputes only the Services of what did.
                snapshot.objects.share_unchanged(&tx.borrow().objects);
                tx.send_replace(snapshot);
                // The parse's temporaries, and the objects the previous
                // snapshot's stand in for.
                crate::memory::release_freed();
            }
            Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot read the manifest directory"),
        }
    }
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
