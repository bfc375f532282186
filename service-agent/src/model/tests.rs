use super::*;

/// Parses multi-document YAML as a user writes it into the store.
fn objects(yaml: &str) -> Objects {
    let mut objects = Objects::default();
    for doc in serde_norway::Deserializer::from_str(yaml) {
        let value: serde_json::Value = serde::Deserialize::deserialize(doc).expect("yaml");
        let meta = &value["metadata"];
        let key = ObjectRef {
            namespace: meta["namespace"].as_str().unwrap_or("default").to_owned(),
            name: meta["name"].as_str().expect("name").to_owned(),
        };
        match value["kind"].as_str() {
            Some("Service") => {
                objects.services.insert(key, serde_json::from_value(value).expect("service"));
            }
            Some("EndpointSlice") => {
                objects.endpoint_slices.insert(key, serde_json::from_value(value).expect("slice"));
            }
            other => panic!("unexpected kind {other:?}"),
        }
    }
    objects
}

fn node() -> NodeContext {
    NodeContext { node_name: "node-a".into(), ..NodeContext::default() }
}

const WEB: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [10.244.1.11]
  conditions: {ready: true}
  nodeName: node-a
- addresses: [10.244.1.12]
  conditions: {ready: false}
- addresses: [10.244.2.13]
  nodeName: node-b
";

fn fe(addr: [u8; 4], port: u16, protocol: Protocol) -> Frontend {
    Frontend { addr: IpAddr::from(addr), port, protocol, scope: Scope::Internal }
}

#[test]
fn clusterip_ports_get_ready_endpoints_of_the_same_port_name() {
    let d = desired(&objects(WEB), &node());
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert_eq!(d.frontends.len(), 2);
    let http = &d.frontends[&fe([10, 96, 0, 10], 80, Protocol::Tcp)];
    assert_eq!(http.port_name, "http");
    let got: Vec<String> = http.backends.iter().map(|b| format!("{b} local={}", b.local)).collect();
    // 10.244.1.12 is not ready; unknown readiness counts as ready.
    assert_eq!(got, ["10.244.1.11:8080/TCP local=true", "10.244.2.13:8080/TCP local=false"]);
    let dns = &d.frontends[&fe([10, 96, 0, 10], 53, Protocol::Udp)];
    assert_eq!(dns.backends.iter().map(|b| b.port).collect::<Vec<_>>(), [5353, 5353]);
}

#[test]
fn slices_of_other_services_or_namespaces_are_not_used() {
    let yaml = WEB.replace("namespace: shop\n  labels", "namespace: other\n  labels");
    let d = desired(&objects(&yaml), &node());
    assert!(d.frontends.values().all(|f| f.backends.is_empty()));
    assert!(d.frontends.values().all(|f| f.when_empty == WhenEmpty::Reject));
}

#[test]
fn headless_external_name_and_other_proxies_produce_nothing() {
    for spec in [
        "spec: {clusterIP: None, ports: [{port: 80}]}",
        "spec: {type: ExternalName, externalName: example.test, ports: [{port: 80}]}",
    ] {
        let yaml = format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\n{spec}\n");
        assert!(desired(&objects(&yaml), &node()).frontends.is_empty(), "{spec}");
    }
    let yaml = "apiVersion: v1\nkind: Service\nmetadata:\n  name: s\n  labels: {service.kubernetes.io/service-proxy-name: other}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
    assert!(desired(&objects(yaml), &node()).frontends.is_empty());
}

#[test]
fn bad_fields_are_reported_and_other_ports_and_services_still_programmed() {
    let yaml = format!(
        "{WEB}---\napiVersion: v1\nkind: Service\nmetadata: {{name: bad, namespace: shop}}\nspec:\n  clusterIP: 10.96.0.300\n  ports: [{{port: 80}}]\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: half, namespace: shop}}\nspec:\n  clusterIP: 10.96.0.11\n  ports: [{{port: 0}}, {{port: 81, protocol: QUIC}}, {{port: 82}}]\n"
    );
    let d = desired(&objects(&yaml), &node());
    let errors: Vec<String> = d.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        errors,
        [
            "Service shop/bad: spec.clusterIP: \"10.96.0.300\" is not an IP address: invalid IP address syntax",
            "Service shop/half: spec.ports[0].port: 0 is not a valid port (1-65535)",
            "Service shop/half: spec.ports[1].protocol: \"QUIC\" is not a protocol (TCP, UDP, SCTP)",
        ]
    );
    assert!(d.frontends.contains_key(&fe([10, 96, 0, 11], 82, Protocol::Tcp)));
    assert_eq!(d.frontends.len(), 3);
}

#[test]
fn duplicate_endpoints_across_slices_are_merged() {
    let yaml = format!(
        "{WEB}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-def\n  namespace: shop\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n- addresses: [10.244.1.11]\n"
    );
    let d = desired(&objects(&yaml), &node());
    assert_eq!(d.frontends[&fe([10, 96, 0, 10], 80, Protocol::Tcp)].backends.len(), 2);
}
