use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU32, Ordering},
};

use super::*;

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "manifest-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("mkdir");
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.0.join(name), text).expect("write");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const SERVICE_AND_SLICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: web}
  clusterIP: 10.96.0.10
  ports:
  - name: http
    port: 80
    targetPort: 8080
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abcde
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: 8080
endpoints:
- addresses: ["10.244.1.11"]
  conditions: {ready: true}
"#;

fn key(ns: &str, name: &str) -> ObjectRef {
    ObjectRef { namespace: ns.into(), name: name.into() }
}

#[test]
fn multi_document_yaml_as_a_user_writes_it() {
    let dir = TempDir::new();
    dir.write("web.yaml", SERVICE_AND_SLICE);
    dir.write("notes.txt", "not a manifest");
    dir.write(".hidden.yaml", "garbage: [");
    let s = load_dir(&dir.0).expect("load");
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert!(s.objects.services.contains_key(&key("default", "web")));
    assert!(s.objects.endpoint_slices.contains_key(&key("default", "web-abcde")));
}

#[test]
fn json_lists_and_unknown_kinds() {
    let dir = TempDir::new();
    dir.write(
        "list.json",
        r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Service","metadata":{"name":"a","namespace":"x"},"spec":{"clusterIP":"10.96.0.1","ports":[{"port":80}]}},
            {"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"d"}}]}"#,
    );
    dir.write("cm.yml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: b}\n");
    let s = load_dir(&dir.0).expect("load");
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert_eq!(s.objects.services.keys().collect::<Vec<_>>(), [&key("x", "a")]);
}

#[test]
fn a_bad_field_is_reported_with_file_document_object_and_field_and_the_rest_loads() {
    let dir = TempDir::new();
    dir.write(
        "a.yaml",
        &format!("{SERVICE_AND_SLICE}---\napiVersion: v1\nkind: Service\nmetadata: {{name: bad, namespace: shop}}\nspec:\n  ports:\n  - port: http\n"),
    );
    dir.write("b.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: other\n  spec: [\n");
    dir.write(
        "c.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: c}\nspec: {clusterIP: 10.96.0.3, ports: [{port: 80}]}\n",
    );
    dir.write("d.yaml", "apiVersion: v1\nkind: Service\nmetadata: {namespace: x}\n");
    let s = load_dir(&dir.0).expect("load");
    let errors: Vec<String> =
        s.errors.iter().map(|e| e.to_string().replace(&format!("{}/", dir.0.display()), "")).collect();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(
        errors[0].starts_with(
            "a.yaml (document 3): Service shop/bad: spec.ports[0].port: invalid type: string \"http\", expected i32"
        ),
        "{errors:?}"
    );
    assert!(errors[1].starts_with("b.yaml (document 1): not valid YAML/JSON"), "{errors:?}");
    assert_eq!(errors[2], "d.yaml (document 1): Service: metadata.name: is required");
    assert_eq!(s.objects.services.len(), 2);
    assert_eq!(s.objects.endpoint_slices.len(), 1);
}

#[test]
fn duplicates_keep_the_first_by_file_order() {
    let dir = TempDir::new();
    dir.write("1.yaml", SERVICE_AND_SLICE);
    dir.write("2.yaml", &SERVICE_AND_SLICE.replace("10.96.0.10", "10.96.0.99"));
    let s = load_dir(&dir.0).expect("load");
    assert_eq!(s.errors.len(), 2, "{:?}", s.errors);
    assert!(s.errors[0].message.contains("1.yaml"));
    let svc = &s.objects.services[&key("default", "web")];
    assert_eq!(svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()), Some("10.96.0.10"));
}

const LEGACY: &str = r"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: data}
spec:
  clusterIP: 10.96.2.5
  ports: [{name: pg, port: 5432}]
---
apiVersion: v1
kind: Endpoints
metadata:
  name: db
  namespace: data
  labels: {team: storage}
subsets:
- addresses:
  - {ip: 10.244.3.40, nodeName: node-a}
  - {ip: not-an-ip}
  notReadyAddresses:
  - {ip: 10.244.3.42}
  ports:
  - {name: pg, port: 5432, protocol: TCP}
";

#[test]
fn endpoints_are_mirrored_for_a_service_without_selector() {
    let dir = TempDir::new();
    dir.write("db.yaml", LEGACY);
    let s = load_dir(&dir.0).expect("load");
    assert_eq!(s.errors.len(), 1, "{:?}", s.errors);
    assert_eq!(s.errors[0].field.as_deref(), Some("subsets[0].addresses[1].ip"));
    let slice = &s.objects.endpoint_slices[&key("data", "db-mirror-0")];
    assert_eq!(slice.service_name.as_deref(), Some("db"), "kept: the label the model reads");
    // The labels the mirroring controller writes (the slim slice keeps only
    // the service name): the Endpoints' own plus its two.
    let doc = LEGACY.split("\n---\n").find(|d| d.contains("kind: Endpoints")).expect("the Endpoints");
    let endpoints: Endpoints = serde_norway::from_str(doc).expect("Endpoints");
    let mirrored = mirror(&key("data", "db"), &endpoints, &mut |_, _| {});
    let labels = mirrored[0].metadata.labels.as_ref().expect("labels");
    assert_eq!(labels["kubernetes.io/service-name"], "db");
    assert_eq!(labels["endpointslice.kubernetes.io/managed-by"], MIRRORING_CONTROLLER);
    assert_eq!(labels["team"], "storage");
    assert_eq!(slice.address_type, "IPv4");
    let eps = slice.endpoints.as_ref().expect("endpoints");
    let got: Vec<(String, Option<bool>, Option<String>)> = eps
        .iter()
        .map(|e| {
            let addr = e.address.as_deref().unwrap_or_default().to_owned();
            (addr, e.conditions.as_ref().and_then(|c| c.ready), e.node_name.as_deref().map(str::to_owned))
        })
        .collect();
    assert_eq!(
        got,
        [("10.244.3.40".into(), Some(true), Some("node-a".into())), ("10.244.3.42".into(), Some(false), None)]
    );
    let ports = slice.ports.as_ref().expect("ports");
    assert_eq!((ports[0].name.as_deref(), ports[0].port), (Some("pg"), Some(5432)));
}

#[test]
fn endpoints_are_not_mirrored_with_a_selector_without_a_service_or_when_skipped() {
    for yaml in [
        LEGACY.replace("  clusterIP: 10.96.2.5", "  selector: {app: db}\n  clusterIP: 10.96.2.5"),
        LEGACY.replace("kind: Service\nmetadata: {name: db", "kind: Service\nmetadata: {name: other"),
        LEGACY.replace("labels: {team: storage}", "labels: {endpointslice.kubernetes.io/skip-mirror: \"true\"}"),
    ] {
        let dir = TempDir::new();
        dir.write("db.yaml", &yaml);
        let s = load_dir(&dir.0).expect("load");
        assert!(s.objects.endpoint_slices.is_empty(), "{yaml}");
    }
}

#[tokio::test]
async fn watch_sends_on_add_change_and_remove() {
    let dir = TempDir::new();
    let (tx, mut rx) = tokio::sync::watch::channel(Snapshot::default());
    let task = tokio::spawn(watch(dir.0.clone(), Duration::from_millis(20), tx, None));
    let next = async |rx: &mut tokio::sync::watch::Receiver<Snapshot>| {
        tokio::time::timeout(Duration::from_secs(5), rx.changed()).await.expect("in time").expect("open");
        rx.borrow_and_update().clone()
    };
    // The first poll always reports the current state.
    assert!(next(&mut rx).await.objects.services.is_empty());
    dir.write("web.yaml", SERVICE_AND_SLICE);
    assert_eq!(next(&mut rx).await.objects.services.len(), 1);
    // Same length, new content.
    dir.write("web.yaml", &SERVICE_AND_SLICE.replace("10.96.0.10", "10.96.0.11"));
    let s = next(&mut rx).await;
    assert_eq!(
        s.objects.services[&key("default", "web")].spec.as_ref().and_then(|s| s.cluster_ip.as_deref()),
        Some("10.96.0.11")
    );
    std::fs::remove_file(dir.0.join("web.yaml")).expect("rm");
    assert!(next(&mut rx).await.objects.services.is_empty());
    task.abort();
}

#[tokio::test]
async fn watch_given_the_loaded_fingerprint_sends_only_a_later_change() {
    let dir = TempDir::new();
    dir.write("web.yaml", SERVICE_AND_SLICE);
    let loaded = fingerprint(&dir.0).expect("fingerprint");
    let (tx, mut rx) = tokio::sync::watch::channel(load_dir(&dir.0).expect("load"));
    let task = tokio::spawn(watch(dir.0.clone(), Duration::from_millis(20), tx, Some(loaded)));
    // Ten polls of an unchanged directory: nothing sent (nothing parsed).
    let quiet = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
    assert!(quiet.is_err(), "the unchanged directory was sent again");
    dir.write("web.yaml", &SERVICE_AND_SLICE.replace("10.96.0.10", "10.96.0.11"));
    tokio::time::timeout(Duration::from_secs(5), rx.changed()).await.expect("in time").expect("open");
    let s = rx.borrow_and_update().clone();
    assert_eq!(
        s.objects.services[&key("default", "web")].spec.as_ref().and_then(|s| s.cluster_ip.as_deref()),
        Some("10.96.0.11")
    );
    task.abort();
}

/// Errors of `s` with the directory taken out of the file names.
fn errors_of(s: &Snapshot, dir: &TempDir) -> Vec<String> {
    s.errors.iter().map(|e| e.to_string().replace(&format!("{}/", dir.0.display()), "")).collect()
}

#[test]
fn alias_bombs_are_stopped_with_the_file_named_and_other_files_load() {
    // The classic billion laughs: 9 levels of 10 aliases (10^9 strings).
    let mut laughs = String::from("apiVersion: v1\nkind: Service\nmetadata: {name: lol}\nl0: &l0 [\"lol\"]\n");
    for i in 1..=9 {
        let refs = vec![format!("*l{}", i - 1); 10].join(", ");
        writeln!(laughs, "l{i}: &l{i} [{refs}]").expect("to a String");
    }
    // The quadratic form serde_norway's own alias limit (100 jumps per
    // event) lets through: one anchor of 20,000 scalars aliased 20,000
    // times, 4e8 values from 190 KB.
    let mut quadratic = String::from("a: &a [");
    quadratic.push_str(&"1,".repeat(20_000));
    quadratic.push_str("1]\nb: [");
    quadratic.push_str(&"*a,".repeat(20_000));
    quadratic.push_str("*a]\n");
    // One 512 KiB string aliased 20,000 times: 10 GiB of text.
    let long = format!("s: &s \"{}\"\nt: [{}*s]\n", "x".repeat(512 * 1024), "*s,".repeat(20_000));
    let dir = TempDir::new();
    dir.write("a-laughs.yaml", &laughs);
    dir.write("b-quadratic.yaml", &format!("{SERVICE_AND_SLICE}---\n{quadratic}"));
    dir.write("c-long.yaml", &long);
    dir.write("d-good.yaml", &SERVICE_AND_SLICE.replace("name: web", "name: good"));
    let s = load_dir(&dir.0).expect("load");
    let errors = errors_of(&s, &dir);
    assert_eq!(errors.len(), 3, "{errors:?}");
    // serde_norway's own limit on alias jumps catches the exponential
    // form; the budget the other two.
    assert_eq!(errors[0], "a-laughs.yaml (document 1): too large: repetition limit exceeded", "{errors:?}");
    for (e, prefix) in errors[1..].iter().zip(["b-quadratic.yaml (document 3)", "c-long.yaml (document 1)"]) {
        assert!(e.starts_with(&format!("{prefix}: too large: ")) && e.contains(bounded::OVER_BUDGET), "{e}");
    }
    // The file's documents before the bomb and the other files load.
    assert!(
        s.objects.services.contains_key(&key("default", "web")),
        "{:?}",
        s.objects.services.keys().collect::<Vec<_>>()
    );
    assert!(s.objects.services.contains_key(&key("default", "good")));
    assert_eq!(s.objects.endpoint_slices.len(), 2);
}

#[test]
fn anchors_within_the_budget_still_load() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n  labels: &labels {app: web, tier: front}\n  annotations: *labels\n\
                spec: {clusterIP: 10.96.0.1, selector: *labels, ports: [{port: 80}]}\n";
    let s = parse(Path::new("a.yaml"), yaml);
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    let svc = &s.objects.services[&key("default", "a")];
    assert_eq!(svc.spec.as_ref().and_then(|s| s.selector.as_ref()).map(BTreeMap::len), Some(2));
}

#[test]
fn an_oversized_file_is_skipped_unread_and_named() {
    let dir = TempDir::new();
    dir.write("a.yaml", SERVICE_AND_SLICE);
    // Sparse: no 9 MiB written to the disk.
    let big = std::fs::File::create(dir.0.join("big.yaml")).expect("create");
    big.set_len(MAX_FILE_BYTES + 1).expect("set_len");
    let s = load_dir(&dir.0).expect("load");
    assert_eq!(errors_of(&s, &dir), ["big.yaml: larger than the 8 MiB limit for a manifest file; skipped"]);
    assert_eq!(s.objects.services.len(), 1);
    // A file just at the limit is read (and here is not YAML: NULs).
    big.set_len(MAX_FILE_BYTES).expect("set_len");
    let s = load_dir(&dir.0).expect("load");
    assert!(errors_of(&s, &dir)[0].starts_with("big.yaml (document 1): not valid YAML/JSON"), "{:?}", s.errors);
    // The watcher's fingerprint tells the two apart without reading more.
    let small = fingerprint(&dir.0).expect("fingerprint");
    big.set_len(MAX_FILE_BYTES * 4).expect("set_len");
    assert_ne!(fingerprint(&dir.0).expect("fingerprint"), small);
}

#[test]
fn deep_nesting_and_huge_numbers_are_errors_not_crashes() {
    let deep = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: d}}\nspec: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let deep_json = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let huge = "apiVersion: v1\nkind: Service\nmetadata: {name: h}\nspec: {ports: [{port: 99999999999999999999999999999999}]}\n";
    let dir = TempDir::new();
    dir.write("deep.yaml", &deep);
    dir.write("deep.json", &deep_json);
    dir.write("huge.yaml", huge);
    dir.write("ok.yaml", SERVICE_AND_SLICE);
    let s = load_dir(&dir.0).expect("load");
    let errors = errors_of(&s, &dir);
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(
        errors[0].starts_with("deep.json (document 1): not valid YAML/JSON: recursion limit exceeded"),
        "{errors:?}"
    );
    assert!(
        errors[1]
            .starts_with("deep.yaml (document 1): too large: nested more than 128 levels deep (at line 4 column 134)"),
        "{errors:?}"
    );
    assert!(
        errors[2]
            .starts_with("huge.yaml (document 1): not valid YAML/JSON: spec.ports[0].port: JSON number out of range"),
        "{errors:?}"
    );
    assert_eq!(s.objects.services.len(), 1);
}

#[test]
fn a_node_manifest_gives_its_node_the_zone_and_other_nodes_nothing() {
    let yaml = r"
apiVersion: v1
kind: Node
metadata:
  name: node-a
  labels: {topology.kubernetes.io/zone: zone-a}
---
apiVersion: v1
kind: Node
metadata: {name: node-b, labels: {topology.kubernetes.io/zone: zone-b}}
---
apiVersion: v1
kind: Node
metadata: {name: node-a}
";
    let snapshot = parse(Path::new("nodes.yaml"), yaml);
    assert_eq!(snapshot.errors.len(), 1, "the second node-a is a duplicate: {:?}", snapshot.errors);
    assert!(snapshot.errors[0].to_string().contains("Node node-a"), "{}", snapshot.errors[0]);
    let zone = |name: &str| {
        snapshot
            .for_node(name)
            .node
            .and_then(|n| n.metadata.labels)
            .and_then(|l| l.get(crate::vocabulary::LABEL_ZONE).cloned())
    };
    assert_eq!(zone("node-a").as_deref(), Some("zone-a"));
    assert_eq!(zone("node-b").as_deref(), Some("zone-b"));
    assert_eq!(zone("node-c"), None);
}

#[test]
fn a_servicecidr_manifest_is_loaded_by_name_and_a_duplicate_or_bad_one_reported() {
    let dir = TempDir::new();
    dir.write(
        "1-cidrs.yaml",
        r#"
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata:
  name: extra
spec:
  cidrs:
  - 10.100.0.0/16
  - "fd00:100::/108"
---
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {name: broken}
spec: {cidrs: 10.101.0.0/16}
---
apiVersion: networking.k8s.io/v1beta1
kind: ServiceCIDR
metadata: {name: beta}
spec: {cidrs: [10.102.0.0/16]}
"#,
    );
    dir.write("2-again.yaml", "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: extra}\n");
    let s = load_dir(&dir.0).expect("load");
    let errors = errors_of(&s, &dir);
    assert_eq!(
        errors,
        [
            r#"1-cidrs.yaml (document 2): ServiceCIDR broken: spec.cidrs: invalid type: string "10.101.0.0/16", expected a sequence"#,
            "2-again.yaml (document 1): ServiceCIDR extra: duplicate of the one in 1-cidrs.yaml (that one is used)",
        ]
    );
    // Cluster-scoped: keyed by name, no namespace defaulted; the v1beta1
    // one is a kind this source does not handle, skipped as before.
    assert_eq!(s.objects.service_cidrs.keys().collect::<Vec<_>>(), ["extra"]);
    let cidrs = s.objects.service_cidrs["extra"].spec.as_ref().and_then(|spec| spec.cidrs.clone());
    assert_eq!(cidrs, Some(vec!["10.100.0.0/16".to_owned(), "fd00:100::/108".to_owned()]));
    assert_eq!(s.objects.service_cidrs["extra"].metadata.namespace, None);
    // Every node sees them.
    assert_eq!(s.for_node("node-a").service_cidrs, s.objects.service_cidrs);
}
