//! Tier 3: the agent's metrics and health endpoints, scraped from the node
//! namespace with curl while real traffic flows (kube-proxy's names and
//! ports: `/metrics` on 127.0.0.1:10249, `/healthz` and `/livez` on :10256).

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use service_tests::{
    fixture::{self, ManifestDir},
    netns::{Agent, BpffsMount, Topology, is_root, wait_until},
};

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {port: 80, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
  annotations:
    endpoints.kubernetes.io/last-change-trigger-time: "2026-01-01T00:00:00Z"
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: ["10.244.1.11"]
---
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: default}
spec:
  clusterIP: 10.96.0.300
  ports:
  - {port: 80}
"#;

/// `name{labels} value` lines of a Prometheus/OpenMetrics text body. The
/// values compared exactly below are small integer counts, which f64 holds
/// exactly.
fn samples(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

#[test]
#[expect(clippy::float_cmp, reason = "counts are small integers, exact in f64")]
fn metrics_and_health_are_served_with_kube_proxys_names() {
    if !is_root() {
        eprintln!("skipped: needs root (run through `cargo xtask test`)");
        return;
    }
    let mut topo = Topology::new().expect("node");
    topo.add_pod("client", Ipv4Addr::new(10, 244, 1, 10)).expect("client");
    topo.add_pod("backend", Ipv4Addr::new(10, 244, 1, 11)).expect("backend");
    let _server = fixture::start_echo(&topo.pod("backend").ns, "backend", &[]).expect("echo");
    let manifests = ManifestDir::new();
    manifests.write("services.yaml", MANIFESTS);
    let bpffs = BpffsMount::new().expect("bpffs");
    let mut agent = Agent::start(&topo.node, manifests.path(), "node-1", &bpffs.path().join("node-1"), &[]).expect("agent");
    agent.wait_for_log("synced", 1, Duration::from_secs(20)).expect("sync");
    for _ in 0..5 {
        fixture::curl(&topo.pod("client").ns, "http://10.96.0.10/").expect("traffic");
    }

    let scrape = || fixture::curl(&topo.node, "http://127.0.0.1:10249/metrics").ok().map(|b| samples(&b));
    let m = wait_until(Duration::from_secs(5), Duration::from_millis(50), scrape).expect("metrics served");
    let get = |k: &str| m.get(k).copied().unwrap_or_else(|| panic!("no sample {k} in {m:#?}"));
    assert!(get("kubeproxy_sync_proxy_rules_duration_seconds_count") >= 1.0);
    assert!(get("kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 1.7e9);
    assert!(get("kubeproxy_network_programming_duration_seconds_count") >= 1.0, "trigger-time annotation observed");
    assert_eq!(get("service_dataplane_invalid_objects{kind=\"Service\"}"), 1.0, "the broken Service");
    assert_eq!(get("service_dataplane_map_entries{map=\"rev_nat\"}"), 1.0);
    assert!(get("service_dataplane_map_capacity{map=\"services\"}") >= 1.0);
    assert_eq!(get("service_dataplane_packets_total{verdict=\"dnat_new_flow\",drop=\"false\"}"), 5.0);
    assert!(get("service_dataplane_packets_total{verdict=\"rev_nat_reply\",drop=\"false\"}") >= 5.0);
    assert_eq!(get("service_dataplane_packets_total{verdict=\"drop_no_backend\",drop=\"true\"}"), 0.0);
    // The broken Service is reported once, not on every sync.
    assert_eq!(agent.log().matches("Service default/broken: spec.clusterIP").count(), 1, "{}", agent.log());

    for path in ["healthz", "livez"] {
        let out = topo.node.exec("curl", &["-sS", "-o", "/dev/stderr", "-w", "%{http_code}", &format!("http://127.0.0.1:10256/{path}")]).expect("curl");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "/{path}");
        let body: serde_json::Value = serde_json::from_slice(&out.stderr).expect("kube-proxy's JSON body");
        assert!(body["lastUpdated"].as_str().is_some_and(|s| s.starts_with("20")), "{body}");
        assert!(body["currentTime"].is_string());
    }
}
