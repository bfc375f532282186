use std::sync::Arc;

use super::*;

/// Parses multi-document YAML as a user writes it into the store.
pub(super) fn objects(yaml: &str) -> Objects {
    let mut objects = Objects::default();
    for doc in serde_norway::Deserializer::from_str(yaml) {
        let value: serde_json::Value = serde::Deserialize::deserialize(doc).expect("yaml");
        let meta = &value["metadata"];
        let key = ObjectRef {
            namespace: meta["namespace"].as_str().unwrap_or("default").into(),
            name: meta["name"].as_str().expect("name").into(),
        };
        match value["kind"].as_str() {
            Some("Service") => {
                objects.services.insert(key, Arc::new(serde_json::from_value(value).expect("service")));
            }
            Some("EndpointSlice") => {
                objects.endpoint_slices.insert(key, Arc::new(serde_json::from_value(value).expect("slice")));
            }
            Some("ServiceCIDR") => {
                objects.service_cidrs.insert(key.name.to_string(), serde_json::from_value(value).expect("servicecidr"));
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

/// The twin of a ClusterIP frontend for traffic from outside the node.
fn is_external_cluster_ip(f: &DesiredFrontend) -> bool {
    f.kind == FrontendKind::ClusterIp && f.frontend.scope == Scope::External
}

fn fe(addr: [u8; 4], port: u16, protocol: Protocol) -> Frontend {
    Frontend { addr: IpAddr::from(addr), port, protocol, scope: Scope::Internal }
}

#[test]
fn clusterip_ports_get_ready_endpoints_of_the_same_port_name() {
    let d = desired(&objects(WEB), &node());
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert_eq!(d.frontends.values().filter(|f| !is_external_cluster_ip(f)).count(), 2);
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
    assert_eq!(d.frontends.values().filter(|f| !is_external_cluster_ip(f)).count(), 3);
}

#[test]
fn duplicate_endpoints_across_slices_are_merged() {
    let yaml = format!(
        "{WEB}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-def\n  namespace: shop\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n- addresses: [10.244.1.11]\n"
    );
    let d = desired(&objects(&yaml), &node());
    assert_eq!(d.frontends[&fe([10, 96, 0, 10], 80, Protocol::Tcp)].backends.len(), 2);
}

/// One of each invalid field the API server would refuse: each is reported
/// with its object and field, the rest of that Service is served where safe,
/// and every other Service is programmed.
#[test]
#[expect(clippy::too_many_lines, reason = "one table of invalid inputs and one of what is still served")]
fn invalid_fields_the_api_would_refuse_are_reported_and_everything_else_served() {
    let svc = |name: &str, spec: &str| {
        format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {spec}\n")
    };
    let yaml = [
        WEB.to_owned(),
        svc("type", "{type: Balanced, clusterIP: 10.96.1.1, ports: [{port: 80}]}"),
        svc("zero", "{clusterIP: 0.0.0.0, ports: [{port: 80}]}"),
        svc("loop", "{clusterIPs: [127.0.0.1, 10.96.1.3], ports: [{port: 80}]}"),
        svc("ext", "{clusterIP: 10.96.1.4, externalIPs: [169.254.0.9, 224.0.0.5, 192.0.2.4, nope], ports: [{port: 80}]}"),
        svc(
            "ports",
            "{clusterIP: 10.96.1.5, ports: [{name: a, port: 80}, {name: b, port: 80}, {name: c, port: 80, protocol: UDP}, \
             {name: d, port: 81, targetPort: 70000}, {name: e, port: 82, targetPort: Http_Port}, {name: f, port: 83, targetPort: -1}, \
             {name: g, port: 84, targetPort: web-2}, {name: h, port: 65536}, {name: i, port: 85, protocol: tcp}]}",
        ),
        svc("np", "{type: NodePort, clusterIP: 10.96.1.6, ports: [{port: 80, nodePort: 70000}, {port: 81, nodePort: -5}, {port: 82, nodePort: 30082}]}"),
        svc(
            "sticky",
            "{clusterIP: 10.96.1.7, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}, ports: [{port: 80}]}",
        ),
        svc("aff", "{clusterIP: 10.96.1.8, sessionAffinity: Sticky, ports: [{port: 80}]}"),
        svc(
            "pol",
            "{type: NodePort, clusterIP: 10.96.1.9, externalTrafficPolicy: Nowhere, internalTrafficPolicy: local, ports: [{port: 80, nodePort: 30080}]}",
        ),
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: ports-1, namespace: shop, labels: {kubernetes.io/service-name: ports}}\n\
         addressType: IPv4\nports: [{name: a, port: 8080}, {name: a, port: 9090}]\n\
         endpoints: [{addresses: [127.0.0.1]}, {addresses: [0.0.0.0]}, {addresses: [224.0.0.1]}, {addresses: [10.244.1.5]}]\n"
            .to_owned(),
    ]
    .concat();
    let node = NodeContext { nodeport_addresses: vec![IpAddr::from([10, 0, 0, 11])], ..node() };
    let d = desired(&objects(&yaml), &node);
    let errors: Vec<String> = d.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        errors,
        [
            "EndpointSlice shop/ports-1: endpoints[0].addresses[0]: \"127.0.0.1\" may not be in the loopback range (127.0.0.0/8)",
            "EndpointSlice shop/ports-1: endpoints[1].addresses[0]: \"0.0.0.0\" may not be unspecified (0.0.0.0)",
            "EndpointSlice shop/ports-1: endpoints[2].addresses[0]: \"224.0.0.1\" may not be in the link-local multicast range (224.0.0.0/24)",
            "EndpointSlice shop/ports-1: ports[1]: port name \"a\" (TCP) is a duplicate of ports[0]; only that one is used",
            "Service shop/aff: spec.sessionAffinity: \"Sticky\" is not a session affinity (None, ClientIP); None is used",
            "Service shop/ext: spec.externalIPs[0]: \"169.254.0.9\" may not be in the link-local range (169.254.0.0/16)",
            "Service shop/ext: spec.externalIPs[1]: \"224.0.0.5\" may not be in the link-local multicast range (224.0.0.0/24)",
            "Service shop/ext: spec.externalIPs[3]: \"nope\" is not an IP address: invalid IP address syntax",
            "Service shop/loop: spec.clusterIPs[0]: \"127.0.0.1\" may not be in the loopback range (127.0.0.0/8)",
            "Service shop/np: spec.ports[0].nodePort: 70000 is not a valid port (1-65535)",
            "Service shop/np: spec.ports[1].nodePort: -5 is not a valid port (1-65535)",
            "Service shop/pol: spec.externalTrafficPolicy: \"Nowhere\" is not a traffic policy (Cluster, Local); Cluster is used",
            "Service shop/pol: spec.internalTrafficPolicy: \"local\" is not a traffic policy (Cluster, Local); Cluster is used",
            "Service shop/ports: spec.ports[1]: 80/TCP is a duplicate of spec.ports[0]; only that one is served",
            "Service shop/ports: spec.ports[3].targetPort: 70000 is not a valid port (1-65535)",
            "Service shop/ports: spec.ports[4].targetPort: \"Http_Port\" is neither a port number nor a port name (at most 15 of a-z, 0-9 and '-', with a letter, no '-' at an end or twice in a row)",
            "Service shop/ports: spec.ports[5].targetPort: -1 is not a valid port (1-65535)",
            "Service shop/ports: spec.ports[7].port: 65536 is not a valid port (1-65535)",
            "Service shop/ports: spec.ports[8].protocol: \"tcp\" is not a protocol (TCP, UDP, SCTP)",
            "Service shop/sticky: spec.sessionAffinityConfig.clientIP.timeoutSeconds: 86401 is not in 1-86400; the default 10800 is used",
            "Service shop/type: spec.type: \"Balanced\" is not a Service type (ClusterIP, NodePort, LoadBalancer, ExternalName)",
            "Service shop/zero: spec.clusterIP: \"0.0.0.0\" may not be unspecified (0.0.0.0)",
        ]
    );
    let served: Vec<String> = d
        .frontends
        .values()
        .filter(|f| &*f.service.name != "web" && !is_external_cluster_ip(f))
        .map(|f| {
            format!(
                "{} {} {}",
                f.service.name,
                f.frontend,
                f.backends.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
            )
        })
        .collect();
    assert_eq!(
        served,
        [
            "pol 10.0.0.11:30080/TCP external ",
            "pol 10.0.0.11:30080/TCP internal ",
            "np 10.0.0.11:30082/TCP external ",
            "np 10.0.0.11:30082/TCP internal ",
            "loop 10.96.1.3:80/TCP internal ",
            "ext 10.96.1.4:80/TCP internal ",
            "ports 10.96.1.5:80/TCP internal 10.244.1.5:8080/TCP",
            "ports 10.96.1.5:80/UDP internal ",
            "ports 10.96.1.5:84/TCP internal ",
            "np 10.96.1.6:80/TCP internal ",
            "np 10.96.1.6:81/TCP internal ",
            "np 10.96.1.6:82/TCP internal ",
            "sticky 10.96.1.7:80/TCP internal ",
            "aff 10.96.1.8:80/TCP internal ",
            "pol 10.96.1.9:80/TCP internal ",
            "ext 192.0.2.4:80/TCP external ",
            "ext 192.0.2.4:80/TCP internal ",
        ]
    );
    let sticky = d.frontends.values().find(|f| &*f.service.name == "sticky").expect("sticky");
    assert_eq!(sticky.affinity_timeout_s, Some(DEFAULT_AFFINITY_TIMEOUT_S));
    // Every frontend of the port shares the ClusterIP's affinity scope.
    let scope =
        Frontend { addr: IpAddr::from([10, 96, 1, 7]), port: 80, protocol: Protocol::Tcp, scope: Scope::Internal };
    assert!(d.frontends.values().filter(|f| &*f.service.name == "sticky").all(|f| f.affinity_scope == Some(scope)));
    assert!(d.frontends.values().filter(|f| f.affinity_timeout_s.is_none()).all(|f| f.affinity_scope.is_none()));
    assert!(d.frontends.values().find(|f| &*f.service.name == "aff").is_some_and(|f| f.affinity_timeout_s.is_none()));
    // The valid Service beside them is untouched.
    let web: Vec<_> =
        d.frontends.values().filter(|f| &*f.service.name == "web" && !is_external_cluster_ip(f)).collect();
    assert_eq!(web.len(), 2);
    assert_eq!(web.iter().map(|f| f.backends.len()).sum::<usize>(), 4);
}

#[test]
fn a_port_name_no_slice_has_rejects_without_error() {
    // `targetPort: metrics` named on the Service, but no pod has a port of
    // that name: the endpoint slice controller leaves the port out of the
    // slices, and kube-proxy rejects (no endpoints), reporting nothing.
    let yaml = WEB.replace(
        "{name: dns, port: 53, protocol: UDP, targetPort: 5353}",
        "{name: metrics, port: 9100, targetPort: metrics}",
    );
    let d = desired(&objects(&yaml), &node());
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    let metrics = &d.frontends[&fe([10, 96, 0, 10], 9100, Protocol::Tcp)];
    assert!(metrics.backends.is_empty());
    assert_eq!(metrics.when_empty, WhenEmpty::Reject);
}

/// 100 EndpointSlices of 1,000 endpoints: the model handles the largest
/// Service a cluster can have without panicking, every endpoint a backend.
/// The time is printed (no timing is asserted): run with `--nocapture`.
#[test]
fn a_service_with_100_000_endpoints() {
    use k8s_openapi::api::{
        core::v1::{ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
    };
    let mut objects = Objects::default();
    let svc_ref = ObjectRef { namespace: "big".into(), name: "big".into() };
    let svc = Service {
        spec: Some(ServiceSpec {
            type_: Some("NodePort".into()),
            cluster_ip: Some("10.96.100.1".into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                node_port: Some(30080),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    objects.services.insert(svc_ref, Arc::new(svc));
    for s in 0..100u32 {
        let mut slice = EndpointSlice {
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort { name: Some("http".into()), port: Some(8080), ..EndpointPort::default() }]),
            endpoints: Some(
                (0..1000u32)
                    .map(|e| {
                        let n = s * 1000 + e;
                        Endpoint {
                            addresses: vec![Ipv4Addr::from(0x0af4_0000 + n).to_string()],
                            node_name: Some(format!("node-{}", n % 50)),
                            ..Endpoint::default()
                        }
                    })
                    .collect(),
            ),
            ..EndpointSlice::default()
        };
        let name = format!("big-{s:03}");
        slice.metadata.name = Some(name.clone());
        slice.metadata.labels = Some([(crate::vocabulary::LABEL_SERVICE_NAME.to_owned(), "big".to_owned())].into());
        objects
            .endpoint_slices
            .insert(ObjectRef { namespace: "big".into(), name: name.into() }, Arc::new(slice.into()));
    }
    let node =
        NodeContext { node_name: "node-0".into(), nodeport_addresses: vec![IpAddr::from([10, 0, 0, 11])], ..node() };
    let started = std::time::Instant::now();
    let d = desired(&objects, &node);
    let took = started.elapsed();
    eprintln!("model::desired with 100,000 endpoints (100 slices x 1,000), 3 frontends: {took:?}");
    assert!(d.errors.is_empty(), "{:?}", &d.errors[..d.errors.len().min(5)]);
    assert_eq!(d.frontends.len(), 4, "ClusterIP from pods and from outside, NodePort from pods and from outside");
    for f in d.frontends.values() {
        assert_eq!(f.backends.len(), 100_000, "{}", f.frontend);
        assert!(f.backends.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates");
    }
    assert_eq!(d.frontends.values().next().map(|f| f.backends.iter().filter(|b| b.local).count()), Some(2_000));
}

#[test]
fn a_health_check_counts_ready_local_endpoints_only_and_a_duplicate_prefers_the_running_one() {
    // kube-proxy's LocalReadyEndpoints: a node whose local endpoints are all
    // terminating answers 503 (0), so load balancers drain it; distinct
    // addresses over every port. The same address in two slices: the
    // non-terminating copy wins (a pod IP reused before the old pod's
    // endpoint is gone).
    let yaml = r"
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.9.1
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports: [{name: a, port: 80, nodePort: 30900}, {name: b, port: 81, nodePort: 30901}]
status: {loadBalancer: {ingress: [{ip: 198.51.100.9}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-1, namespace: shop, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{name: a, port: 8080}, {name: b, port: 8081}]
endpoints:
- {addresses: [10.244.0.1], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.244.0.2], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.244.0.3], nodeName: node-b}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-2, namespace: shop, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{name: a, port: 8080}, {name: b, port: 8081}]
endpoints:
- {addresses: [10.244.0.2], nodeName: node-a, conditions: {ready: true}}
";
    let mut objs = objects(yaml);
    let lb_ref = ObjectRef { namespace: "shop".into(), name: "lb".into() };
    let d = desired(&objs, &node());
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    // 10.244.0.2 is ready through lb-2, which replaced its terminating copy.
    assert_eq!(d.health_checks[&lb_ref].local_endpoints, 1);
    let external = |d: &Desired| {
        d.frontends
            .values()
            .find(|f| f.kind == FrontendKind::LoadBalancer && f.frontend.scope == Scope::External && f.port_name == "a")
            .map(|f| f.backends.iter().map(ToString::to_string).collect::<Vec<_>>())
    };
    assert_eq!(external(&d), Some(vec!["10.244.0.2:8080/TCP".to_owned()]));
    // Without lb-2 only terminating endpoints are local: they still serve
    // (the fallback), but the health check says 0.
    objs.endpoint_slices =
        objs.endpoint_slices.iter().filter(|(r, _)| &*r.name != "lb-2").map(|(r, s)| (r.clone(), s.clone())).collect();
    let d = desired(&objs, &node());
    assert_eq!(d.health_checks[&lb_ref].local_endpoints, 0);
    assert_eq!(external(&d), Some(vec!["10.244.0.1:8080/TCP".to_owned(), "10.244.0.2:8080/TCP".to_owned()]));
}

fn cidr(text: &str) -> Cidr {
    text.parse().expect("cidr")
}

/// The flag's ranges.
fn node_with_ranges(ranges: &[&str]) -> NodeContext {
    NodeContext { service_cidrs: ranges.iter().map(|r| cidr(r)).collect(), ..node() }
}

const SERVICE_CIDRS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {name: kubernetes}
spec: {cidrs: [10.96.0.0/16, "fd00:10:96::/108"]}
---
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {name: retiring, deletionTimestamp: "2026-01-01T00:00:00Z", finalizers: [networking.k8s.io/service-cidr-finalizer]}
spec: {cidrs: [10.97.0.0/24]}
"#;

#[test]
fn servicecidr_ranges_drop_unallocated_addresses_with_the_flags_and_a_deleted_one_until_it_is_gone() {
    let d =
        desired(&objects(&format!("{WEB}---{SERVICE_CIDRS}")), &node_with_ranges(&["10.100.0.0/24", "10.96.0.0/16"]));
    // The IPv6 range is kept as the flag's would be (the encoder writes no
    // row of that family): a dual-stack ServiceCIDR is not an error.
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    let got: Vec<String> = d.unserved.iter().map(|(c, w)| format!("{c} {w:?}")).collect();
    assert_eq!(
        got,
        [
            "10.96.0.0/16 Drop",
            "10.96.0.10/32 Reject",
            "10.97.0.0/24 Drop",
            "10.100.0.0/24 Drop",
            "fd00:10:96::/108 Drop",
        ]
    );
    // Without the objects, the flag's alone.
    let d = desired(&objects(WEB), &node_with_ranges(&["10.100.0.0/24"]));
    let got: Vec<String> = d.unserved.keys().map(ToString::to_string).collect();
    assert_eq!(got, ["10.96.0.10/32", "10.100.0.0/24"]);
}

#[test]
fn a_malformed_servicecidr_range_is_reported_with_object_and_field_and_the_other_ranges_apply() {
    let yaml = format!(
        "{SERVICE_CIDRS}---
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {{name: broken}}
spec: {{cidrs: [10.98.0.0/33, 10.99.0.0/16, not-a-cidr]}}
"
    );
    let d = desired(&objects(&yaml), &node_with_ranges(&["10.100.0.0/24"]));
    let errors: Vec<String> = d.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        errors,
        [
            r#"ServiceCIDR broken: spec.cidrs[0]: "10.98.0.0/33" has an invalid prefix length"#,
            r#"ServiceCIDR broken: spec.cidrs[2]: "not-a-cidr" is not a CIDR (address/length)"#,
        ]
    );
    let got: Vec<String> = d.unserved.keys().map(ToString::to_string).collect();
    assert_eq!(got, ["10.96.0.0/16", "10.97.0.0/24", "10.99.0.0/16", "10.100.0.0/24", "fd00:10:96::/108"]);
}

#[test]
fn a_localhost_nodeport_is_a_frontend_for_the_node_itself_only() {
    // `--localhost-nodeports` puts 127.0.0.1 among the NodePort addresses:
    // the internal-scope row (what the socket path reads) is there, the
    // external-scope one never (a packet to 127.0.0.1 from outside the
    // node is CVE-2020-8558's martian).
    let yaml = r"
apiVersion: v1
kind: Service
metadata: {name: np, namespace: shop}
spec:
  type: NodePort
  clusterIP: 10.96.0.20
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
";
    let node =
        NodeContext { nodeport_addresses: vec![IpAddr::from([127, 0, 0, 1]), IpAddr::from([10, 0, 0, 11])], ..node() };
    let d = desired(&objects(yaml), &node);
    let loopback: Vec<Scope> =
        d.frontends.keys().filter(|f| f.addr == IpAddr::from([127, 0, 0, 1])).map(|f| f.scope).collect();
    assert_eq!(loopback, [Scope::Internal]);
    let node_address: Vec<Scope> =
        d.frontends.keys().filter(|f| f.addr == IpAddr::from([10, 0, 0, 11])).map(|f| f.scope).collect();
    assert_eq!(node_address.len(), 2, "the node address serves both scopes");
}

#[test]
fn the_nodes_own_sockets_get_what_the_socket_path_gives_them() {
    // A pod and the node itself (Entry::Host) dial the same frontends: an
    // internal Local policy with no endpoint on this node drops the pod's
    // packet but fails the node's connect() with ECONNREFUSED; source
    // ranges that leave both out drop the pod, not the node's socket; the
    // node's socket is never masqueraded (its source is the node's).
    use std::net::SocketAddr;

    use trace::{Entry, Outcome, Probe};
    let yaml = r"
apiVersion: v1
kind: Service
metadata: {name: local, namespace: shop}
spec:
  clusterIP: 10.96.0.30
  internalTrafficPolicy: Local
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, namespace: shop, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.2.5], nodeName: node-b}]
---
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.31
  loadBalancerSourceRanges: [203.0.113.0/24]
  ports: [{port: 80, targetPort: 8080, nodePort: 30031}]
status: {loadBalancer: {ingress: [{ip: 198.51.100.31}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-1, namespace: shop, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.2.6], nodeName: node-b}]
";
    let node = NodeContext { nodeport_addresses: vec![IpAddr::from([10, 0, 0, 11])], ..node() };
    let d = desired(&objects(yaml), &node);
    let probe = |source: [u8; 4], destination: &str, entry: Entry| Probe {
        source: IpAddr::from(source),
        destination: destination.parse().unwrap(),
        protocol: Protocol::Tcp,
        entry,
    };
    let pod = [10, 244, 1, 5];
    let host = [10, 0, 0, 11];
    assert_eq!(trace::trace(&d, &probe(pod, "10.96.0.30:80", Entry::Pod)), Outcome::Drop);
    assert_eq!(trace::trace(&d, &probe(host, "10.96.0.30:80", Entry::Host)), Outcome::Reject);
    assert_eq!(trace::trace(&d, &probe(pod, "198.51.100.31:80", Entry::Pod)), Outcome::Drop);
    let to_lb = Outcome::Forward { endpoints: [SocketAddr::from(([10, 244, 2, 6], 8080))].into(), masquerade: false };
    assert_eq!(trace::trace(&d, &probe(host, "198.51.100.31:80", Entry::Host)), to_lb);
    assert_eq!(trace::trace(&d, &probe([127, 0, 0, 1], "10.0.0.11:30031", Entry::Host)), to_lb);
    // The service IP rows decide an unserved port for both.
    assert_eq!(trace::trace(&d, &probe(host, "10.96.0.31:81", Entry::Host)), Outcome::Reject);
}
