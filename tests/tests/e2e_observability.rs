//! Tier 3: the agent's metrics and health endpoints, scraped from the node
//! namespace with curl while real traffic flows (kube-proxy's names and
//! ports: `/metrics` on 127.0.0.1:10249, `/healthz` and `/livez` on :10256).
//!
//! The live-node test runs twice (`::ipv4`, `::ipv6`): its traffic in one
//! family, its Service dual-stack in IPv6 (the IPv6 frontend's labels,
//! rows and flows written `[addr]:port`).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use service_tests::{
    fixture::{self, ManifestDir},
    in_both_families,
    netns::{Agent, BpffsMount, Family, Topology, binary, http_url, wait_until},
    north_south::dual_stack,
};

in_both_families!(metrics_health_inspect_and_explain_work_on_a_live_node);

/// `service-agent ARGS... --bpffs-root ROOT`: its stdout.
fn agent_cli(root: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(binary("service-agent", "SERVICE_AGENT_BIN"))
        .args(args)
        .arg("--bpffs-root")
        .arg(root)
        .output()
        .expect("service-agent");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

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

/// `web`'s ClusterIP, its endpoint, the client pod, and an address no
/// Service has (IPv4 forms; the test's family picks the address).
const WEB_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const NO_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 99);

#[expect(clippy::float_cmp, reason = "counts are small integers, exact in f64")]
#[expect(clippy::too_many_lines, reason = "one live node, checked through every operator interface in turn")]
fn metrics_health_inspect_and_explain_work_on_a_live_node(family: Family) {
    let mut topo = Topology::new().expect("node");
    topo.add_pod("client", CLIENT).expect("client");
    topo.add_pod("backend", BACKEND).expect("backend");
    let _server = fixture::start_echo(&topo.pod("backend").ns, "backend", &[]).expect("echo");
    let manifests = ManifestDir::new();
    manifests.write(
        "services.yaml",
        &match family {
            Family::V4 => MANIFESTS.to_owned(),
            Family::V6 => dual_stack(MANIFESTS),
        },
    );
    // The addresses in the test's family, as explain, inspect and the
    // metrics labels write them (`[addr]:port` in IPv6).
    let cluster_ip = family.addr(WEB_CLUSTER_IP);
    let frontend = SocketAddr::new(cluster_ip, 80).to_string();
    let backend = SocketAddr::new(family.addr(BACKEND), 8080).to_string();
    let client = family.addr(CLIENT).to_string();
    let bpffs = BpffsMount::new().expect("bpffs");
    let mut agent =
        Agent::start(&topo.node, manifests.path(), "node-1", &bpffs.path().join("node-1"), &[]).expect("agent");
    agent.wait_for_log("synced", 1, Duration::from_secs(20)).expect("sync");
    for _ in 0..5 {
        fixture::curl(&topo.pod("client").ns, &http_url(cluster_ip, 80)).expect("traffic");
    }

    let scrape = || fixture::curl(&topo.node, "http://127.0.0.1:10249/metrics").ok().map(|b| samples(&b));
    let m = wait_until(Duration::from_secs(5), Duration::from_millis(50), scrape).expect("metrics served");
    let get = |k: &str| m.get(k).copied().unwrap_or_else(|| panic!("no sample {k} in {m:#?}"));
    assert!(get("kubeproxy_sync_proxy_rules_duration_seconds_count") >= 1.0);
    assert!(get("kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 1.7e9);
    assert!(get("kubeproxy_network_programming_duration_seconds_count") >= 1.0, "trigger-time annotation observed");
    assert_eq!(get("service_dataplane_invalid_objects{kind=\"Service\"}"), 1.0, "the broken Service");
    // One reverse-NAT row per frontend: the ClusterIP, and its IPv6 twin
    // when the Service is dual-stack.
    let frontends: u8 = match family {
        Family::V4 => 1,
        Family::V6 => 2,
    };
    assert_eq!(get("service_dataplane_map_entries{map=\"rev_nat\"}"), f64::from(frontends));
    assert!(get("service_dataplane_map_capacity{map=\"services\"}") >= 1.0);
    assert_eq!(get("service_dataplane_packets_total{verdict=\"dnat_new_flow\",drop=\"false\"}"), 5.0);
    assert!(get("service_dataplane_packets_total{verdict=\"rev_nat_reply\",drop=\"false\"}") >= 5.0);
    assert_eq!(get("service_dataplane_packets_total{verdict=\"drop_no_backend\",drop=\"true\"}"), 0.0);
    // The same new flows by the interface they entered on: the client's.
    assert_eq!(
        get("service_dataplane_interface_packets_total{interface=\"veth1\",verdict=\"dnat_new_flow\",drop=\"false\"}"),
        5.0
    );
    // Per-Service and per-backend traffic, both directions, named.
    let svc_packets = get(&format!(
        "service_dataplane_service_packets_total{{namespace=\"default\",name=\"web\",port=\"\",frontend=\"{frontend}\"}}"
    ));
    let backend_packets = get(&format!("service_dataplane_backend_packets_total{{backend=\"{backend}/TCP\"}}"));
    let dnat_and_replies = get("service_dataplane_packets_total{verdict=\"dnat_new_flow\",drop=\"false\"}")
        + get("service_dataplane_packets_total{verdict=\"dnat_established\",drop=\"false\"}")
        + get("service_dataplane_packets_total{verdict=\"rev_nat_reply\",drop=\"false\"}");
    assert_eq!(svc_packets, dnat_and_replies, "every translated packet is counted for its Service");
    assert_eq!(backend_packets, svc_packets);
    assert!(
        get(&format!(
            "service_dataplane_service_bytes_total{{namespace=\"default\",name=\"web\",port=\"\",frontend=\"{frontend}\"}}"
        )) > svc_packets * 40.0
    );
    // The broken Service is reported once, not on every sync.
    assert_eq!(agent.log().matches("Service default/broken: spec.clusterIP").count(), 1, "{}", agent.log());

    for path in ["healthz", "livez"] {
        let out = topo
            .node
            .exec(
                "curl",
                &["-sS", "-o", "/dev/stderr", "-w", "%{http_code}", &format!("http://127.0.0.1:10256/{path}")],
            )
            .expect("curl");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "/{path}");
        let body: serde_json::Value = serde_json::from_slice(&out.stderr).expect("kube-proxy's JSON body");
        assert!(body["lastUpdated"].as_str().is_some_and(|s| s.starts_with("20")), "{body}");
        assert!(body["currentTime"].is_string());
    }

    // inspect, straight from the pins, as text and as JSON.
    let root = bpffs.path().join("node-1");
    let text = agent_cli(&root, &["inspect", "services"]);
    assert!(text.starts_with("FRONTEND"), "{text}");
    assert!(
        text.contains(&format!("{frontend}/TCP internal")) && text.contains(&format!("{backend} (31/31)")),
        "{text}"
    );
    let services: serde_json::Value =
        serde_json::from_str(&agent_cli(&root, &["inspect", "services", "-o", "json"])).expect("json");
    // Two rows per ClusterIP (for pods, and for traffic from outside); the
    // pods' one of the test's family is read.
    let rows = services.as_array().expect("rows");
    assert_eq!(rows.len(), 2 * usize::from(frontends), "{services:#}");
    let service = rows
        .iter()
        .find(|r| r["address"] == cluster_ip.to_string() && r["scope"] == "internal")
        .unwrap_or_else(|| panic!("{services:#}"));
    assert_eq!(service["backends"][0][0]["address"], family.addr(BACKEND).to_string());
    assert_eq!(service["backends"][0][1], 31);
    assert!(service["packets"].as_u64().is_some_and(|p| p >= 5 * 6), "{services:#}");
    assert_eq!(service["backends"][0][0]["packets"], service["packets"]);
    let backends: serde_json::Value =
        serde_json::from_str(&agent_cli(&root, &["inspect", "backends", "-o", "json"])).expect("json");
    let row = backends
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["address"] == family.addr(BACKEND).to_string()))
        .unwrap_or_else(|| panic!("{backends:#}"));
    assert_eq!(row["port"], 8080);
    let ct: serde_json::Value =
        serde_json::from_str(&agent_cli(&root, &["inspect", "conntrack", "-o", "json"])).expect("json");
    let dnat: Vec<&serde_json::Value> =
        ct.as_array().expect("rows").iter().filter(|r| r["direction"] == "dnat").collect();
    assert_eq!(dnat.len(), 5, "one entry per connection: {ct:#}");
    assert!(dnat.iter().all(|r| r["destination"] == frontend && r["translated_to"] == backend), "{ct:#}");
    let stats: serde_json::Value =
        serde_json::from_str(&agent_cli(&root, &["inspect", "stats", "-o", "json"])).expect("json");
    let new_flows = stats.as_array().expect("rows").iter().find(|r| r["counter"] == "dnat_new_flow").expect("counter");
    assert_eq!(new_flows["packets"], 5);
    assert_eq!(agent_cli(&root, &["inspect", "affinity", "-o", "json"]).trim(), "[]");

    // bpftool reads every pinned map.
    for name in service_common::map_names::ALL {
        let out = std::process::Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(root.join(name))
            .output()
            .expect("bpftool");
        assert!(out.status.success(), "bpftool map dump pinned {name}: {}", String::from_utf8_lossy(&out.stderr));
        // The maps carry BTF: fields print by name, not as hex.
        let dump = String::from_utf8_lossy(&out.stdout);
        let field = match name {
            "services" => Some("\"rev_nat_id\""),
            "backends" => Some("\"state\""),
            "conntrack" => Some("\"nat_addr\""),
            "rev_nat" => Some("\"family\""),
            _ => None,
        };
        if let Some(field) = field {
            assert!(dump.contains(field), "bpftool shows {name} without field names:\n{dump}");
        }
    }

    // explain (in the node's namespace, where the route to the client pod
    // tells it entered from a pod): the service row, the client's conntrack
    // entries, the slot.
    let explain = |args: &[&str]| {
        let mut all = vec!["explain"];
        all.extend_from_slice(args);
        let root = root.to_string_lossy();
        all.extend_from_slice(&["--bpffs-root", &root]);
        let out =
            topo.node.exec(&binary("service-agent", "SERVICE_AGENT_BIN").to_string_lossy(), &all).expect("explain");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let to = format!("{frontend}/TCP");
    let why = explain(&[&client, &to]);
    assert!(why.contains(&format!("{client} is a local pod (routed via veth1")), "{why}");
    assert!(why.contains(&format!("frontend {to} internal")), "{why}");
    assert_eq!(why.matches("is pinned to backend").count(), 5, "{why}");
    let why = explain(&[&SocketAddr::new(family.addr(CLIENT), 55555).to_string(), &to]);
    assert!(why.contains("hashes to slot") && why.contains(&format!("{backend}/TCP")), "{why}");
    let why = explain(&[&client, &format!("{}/TCP", SocketAddr::new(family.addr(NO_SERVICE_IP), 80))]);
    assert!(why.contains("not a Service frontend"), "{why}");
}

/// Two LoadBalancer Services with `externalTrafficPolicy: Local`, each with
/// an endpoint on this node: `fits` (one backend) and `too-big` (41
/// backends, more than `--map-size-backends=24` holds next to `fits`).
fn lb_local_manifests(too_big_remote_endpoints: u8) -> String {
    let service = |name: &str, ip: &str, node_port: u16, hc: u16, lb: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: \
             LoadBalancer\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n  externalTrafficPolicy: Local\n  \
             healthCheckNodePort: {hc}\n  ports:\n  - {{port: 80, targetPort: 8080, nodePort: {node_port}}}\nstatus:\n  \
             loadBalancer:\n    ingress:\n    - ip: {lb}\n---\n"
        )
    };
    let slice = |name: &str, endpoints: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  \
             labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{port: 8080}}]\n\
             endpoints:\n{endpoints}---\n"
        )
    };
    let local = "- {addresses: [\"10.244.1.11\"], nodeName: node-1}\n".to_owned();
    let remote = (1..=too_big_remote_endpoints).fold(String::new(), |mut out, i| {
        use std::fmt::Write as _;
        let _ = writeln!(out, "- {{addresses: [\"10.244.2.{i}\"], nodeName: node-2}}");
        out
    });
    [
        service("fits", "10.96.0.20", 30080, 32110, "198.51.100.20"),
        slice("fits", &local),
        service("too-big", "10.96.0.21", 30081, 32111, "198.51.100.21"),
        slice("too-big", &(local.clone() + &remote)),
    ]
    .concat()
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
#[expect(clippy::float_cmp, reason = "counts are small integers, exact in f64")]
fn failed_map_writes_are_retried_reported_and_fail_only_their_own_services_health_check() {
    let topo = Topology::new().expect("node");
    let manifests = ManifestDir::new();
    manifests.write("services.yaml", &lb_local_manifests(40));
    let bpffs = BpffsMount::new().expect("bpffs");
    let mut agent =
        Agent::start(&topo.node, manifests.path(), "node-1", &bpffs.path().join("node-1"), &["--map-size-backends=24"])
            .expect("agent");
    agent.wait_for_log("synced", 1, Duration::from_secs(20)).expect("sync");
    // `GET url` from the node: status and JSON body.
    let get = |url: &str| {
        let out = topo.node.exec("curl", &["-sS", "--max-time", "2", "-w", "\n%{http_code}", url]).expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or_else(|| panic!("{url}: {text}"));
        // Not JSON (nothing listening yet: code 000): Null.
        (code.to_owned(), serde_json::from_str::<serde_json::Value>(body).unwrap_or_default())
    };
    let healthz = |port: u16| {
        wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            let (code, body) = get(&format!("http://127.0.0.1:{port}/"));
            (code != "000").then_some((code, body))
        })
        .expect("health check node port served")
    };

    // The Service whose rows were written answers by its local endpoint;
    // the one whose rows do not fit answers 503 and says why.
    let (code, body) = healthz(32110);
    assert_eq!(code, "200", "{body}");
    assert_eq!(body["localEndpoints"], 1);
    let (code, body) = healthz(32111);
    assert_eq!(code, "503", "{body}");
    assert!(body["reason"].as_str().is_some_and(|r| r.contains("--map-size-backends")), "{body}");
    // /healthz names the failure; /livez is not affected by it.
    let (_, body) = get("http://127.0.0.1:10256/healthz");
    assert!(body["reason"].as_str().is_some_and(|r| r.contains("--map-size-backends")), "{body}");
    assert_eq!(get("http://127.0.0.1:10256/livez").0, "200");

    // Nothing changes, yet the failed writes are tried again (1 s, 2 s, ...).
    let scrape = || fixture::curl(&topo.node, "http://127.0.0.1:10249/metrics").ok().map(|b| samples(&b));
    let m = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        scrape().filter(|m| m.get("service_dataplane_sync_retries_total").is_some_and(|n| *n >= 2.0))
    })
    .expect("two retries without any change");
    assert!(m["service_dataplane_map_update_errors_pending"] >= 1.0, "{m:#?}");
    assert!(m["service_dataplane_frontends_not_programmed"] >= 1.0, "{m:#?}");
    assert!(m["service_dataplane_map_update_errors_total"] >= 3.0, "one per attempt: {m:#?}");
    assert!(agent.log().contains("retrying"), "{}", agent.log());

    // Room again (fewer endpoints): the next sync writes everything.
    manifests.write("services.yaml", &lb_local_manifests(4));
    let (code, body) = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let (code, body) = get("http://127.0.0.1:32111/");
        (code == "200").then_some((code, body))
    })
    .expect("too-big answers 200 once its rows are written");
    assert_eq!((code.as_str(), &body["localEndpoints"]), ("200", &serde_json::json!(1)));
    assert!(body.get("reason").is_none(), "{body}");
    let m = scrape().expect("metrics");
    assert_eq!(m["service_dataplane_map_update_errors_pending"], 0.0, "{m:#?}");
    assert_eq!(m["service_dataplane_frontends_not_programmed"], 0.0, "{m:#?}");
    let (code, body) = get("http://127.0.0.1:10256/healthz");
    assert_eq!(code, "200");
    assert!(body.get("reason").is_none(), "{body}");
}
