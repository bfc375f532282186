use std::sync::atomic::{AtomicU32, Ordering};

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
    let labels = slice.metadata.labels.as_ref().expect("labels");
    assert_eq!(labels["kubernetes.io/service-name"], "db");
    assert_eq!(labels["endpointslice.kubernetes.io/managed-by"], MIRRORING_CONTROLLER);
    assert_eq!(labels["team"], "storage");
    assert_eq!(slice.address_type, "IPv4");
    let eps = slice.endpoints.as_ref().expect("endpoints");
    let got: Vec<(String, Option<bool>, Option<String>)> = eps
        .iter()
        .map(|e| (e.addresses[0].clone(), e.conditions.as_ref().and_then(|c| c.ready), e.node_name.clone()))
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
    let task = tokio::spawn(watch(dir.0.clone(), Duration::from_millis(20), tx));
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
