//! IPv6 and dual-stack: the model serves each family a Service has a
//! ClusterIP of, each from that family's EndpointSlices only (kube-proxy's
//! one proxier per family), and reports what contradicts itself.

use std::net::{IpAddr, SocketAddr};

use super::{tests::objects, *};

fn node() -> NodeContext {
    NodeContext {
        node_name: "node-a".into(),
        nodeport_addresses: vec![ip("10.0.0.11"), ip("2001:db8::11"), ip("2001:db8:1::11")],
        ..NodeContext::default()
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("ip")
}

fn fe(addr: &str, port: u16, scope: Scope) -> Frontend {
    Frontend { addr: ip(addr), port, protocol: Protocol::Tcp, scope }
}

fn backends(d: &Desired, f: &Frontend) -> Vec<String> {
    d.frontends.get(f).unwrap_or_else(|| panic!("no frontend {f}")).backends.iter().map(ToString::to_string).collect()
}

fn errors(d: &Desired) -> Vec<String> {
    d.errors.iter().map(ToString::to_string).collect()
}

fn addresses(d: &Desired, service: &str) -> BTreeSet<String> {
    d.frontends
        .values()
        .filter(|f| &*f.service.name == service)
        .map(|f| format!("{} {}", f.kind, SocketAddr::new(f.frontend.addr, f.frontend.port)))
        .collect()
}

use std::collections::BTreeSet;

/// An EndpointSlice of `service` in namespace `shop`, as YAML: `family`
/// its addressType, `port` its one unnamed port, each endpoint
/// `(address, nodeName)`.
fn slice(name: &str, service: &str, family: &str, port: u16, endpoints: &[(&str, &str)]) -> String {
    let endpoints: Vec<String> =
        endpoints.iter().map(|(addr, node)| format!("{{addresses: [\"{addr}\"], nodeName: {node}}}")).collect();
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: shop, labels: \
         {{kubernetes.io/service-name: {service}}}}}\naddressType: {family}\nports: [{{port: {port}}}]\nendpoints: [{}]\n",
        endpoints.join(", ")
    )
}

const DUAL: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: LoadBalancer
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:10:96::10"]
  externalIPs: [192.0.2.10, "2001:db8:e::10"]
  loadBalancerSourceRanges: [203.0.113.0/24, "2001:db8:5::/48", "2001:db8::/64"]
  sessionAffinity: ClientIP
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
status: {loadBalancer: {ingress: [{ip: 198.51.100.10}, {ip: "2001:db8:1b::10"}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v4, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.11], nodeName: node-a}
- {addresses: [10.244.2.12], nodeName: node-b}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: ["fd00:10:244:1::11"], nodeName: node-a}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-fqdn, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: FQDN
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [web.example.test]}
"#;

#[test]
fn a_dual_stack_service_serves_each_family_with_only_that_familys_endpoints() {
    let d = desired(&objects(DUAL), &node());
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    let expected: BTreeSet<String> = [
        "ClusterIP 10.96.0.10:80",
        "ClusterIP [fd00:10:96::10]:80",
        "NodePort 10.0.0.11:30080",
        "NodePort [2001:db8::11]:30080",
        "NodePort [2001:db8:1::11]:30080",
        "LoadBalancer 198.51.100.10:80",
        "LoadBalancer [2001:db8:1b::10]:80",
        "externalIP 192.0.2.10:80",
        "externalIP [2001:db8:e::10]:80",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(addresses(&d, "web"), expected);
    // Both scopes of each.
    assert_eq!(d.frontends.len(), 18);
    for df in d.frontends.values() {
        let want: &[&str] = if df.frontend.addr.is_ipv4() {
            &["10.244.1.11:8080/TCP", "10.244.2.12:8080/TCP"]
        } else {
            &["[fd00:10:244:1::11]:8080/TCP"]
        };
        assert_eq!(backends(&d, &df.frontend), want, "{}", df.frontend);
        // Affinity is shared per Service port and family: the scope is
        // that family's ClusterIP.
        let scope = if df.frontend.addr.is_ipv4() { "10.96.0.10" } else { "fd00:10:96::10" };
        assert_eq!(df.affinity_scope, Some(fe(scope, 80, Scope::Internal)), "{}", df.frontend);
    }
    // The ClusterIPs of both families reject an unserved port.
    let rejects: Vec<String> =
        d.unserved.iter().filter(|(_, w)| **w == WhenEmpty::Reject).map(|(c, _)| c.to_string()).collect();
    assert_eq!(rejects, ["10.96.0.10/32", "fd00:10:96::10/128"]);
}

#[test]
fn source_ranges_apply_per_family_and_let_in_the_ingress_ips_of_a_family_whose_ranges_contain_the_node() {
    let d = desired(&objects(DUAL), &node());
    let ranges = |addr: &str| -> Vec<String> {
        d.frontends[&fe(addr, 80, Scope::External)].source_ranges.iter().map(ToString::to_string).collect()
    };
    // IPv4: 10.0.0.11 is not in 203.0.113.0/24, so the ingress IP is not
    // let in. IPv6: 2001:db8::/64 holds the node's 2001:db8::11, so the
    // IPv6 ingress IP is.
    assert_eq!(ranges("198.51.100.10"), ["203.0.113.0/24"]);
    assert_eq!(ranges("2001:db8:1b::10"), ["2001:db8::/64", "2001:db8:5::/48", "2001:db8:1b::10/128"]);
    // NodePorts and external IPs stay open.
    assert!(ranges("2001:db8:e::10").is_empty());
    // Ranges of the other family only: this family is not restricted.
    let v4_only = DUAL.replace(r#"[203.0.113.0/24, "2001:db8:5::/48", "2001:db8::/64"]"#, "[203.0.113.0/24]");
    let d = desired(&objects(&v4_only), &node());
    assert!(d.frontends[&fe("2001:db8:1b::10", 80, Scope::External)].source_ranges.is_empty());
    let probe = trace::Probe {
        source: ip("2001:db8:99::1"),
        destination: "[2001:db8:1b::10]:80".parse().unwrap(),
        protocol: Protocol::Tcp,
        entry: trace::Entry::External,
    };
    assert!(matches!(trace::trace(&d, &probe), trace::Outcome::Forward { .. }));
    let v4_probe = trace::Probe { source: ip("192.0.2.99"), destination: "198.51.100.10:80".parse().unwrap(), ..probe };
    assert_eq!(trace::trace(&d, &v4_probe), trace::Outcome::Drop);
}

#[test]
fn ipv6_slices_never_feed_an_ipv4_only_service_and_ipv4_slices_never_an_ipv6_only_one() {
    let yaml = [
        r"
apiVersion: v1
kind: Service
metadata: {name: v4, namespace: shop}
spec: {clusterIP: 10.96.0.20, ports: [{port: 80}]}
",
        &slice("v4-1", "v4", "IPv6", 80, &[("fd00:10:244::20", "node-b")]),
        r#"---
apiVersion: v1
kind: Service
metadata: {name: v6, namespace: shop}
spec:
  type: NodePort
  ipFamilyPolicy: SingleStack
  ipFamilies: [IPv6]
  clusterIP: "fd00:10:96::21"
  clusterIPs: ["fd00:10:96::21"]
  ports: [{port: 80, nodePort: 30021}]
"#,
        &slice("v6-1", "v6", "IPv4", 80, &[("10.244.0.21", "node-b")]),
        &slice("v6-2", "v6", "IPv6", 80, &[("fd00:10:244::21", "node-a")]),
    ]
    .concat();
    let d = desired(&objects(&yaml), &node());
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    let v4 = &d.frontends[&fe("10.96.0.20", 80, Scope::Internal)];
    assert!(v4.backends.is_empty());
    assert_eq!(v4.when_empty, WhenEmpty::Reject, "the other family's endpoints do not count as endpoints");
    assert_eq!(addresses(&d, "v4"), BTreeSet::from(["ClusterIP 10.96.0.20:80".to_owned()]));
    // An IPv6-only NodePort Service: NodePorts on the node's IPv6
    // addresses only, every frontend with the IPv6 endpoint only.
    let v6: BTreeSet<String> = addresses(&d, "v6");
    assert_eq!(
        v6,
        ["ClusterIP [fd00:10:96::21]:80", "NodePort [2001:db8::11]:30021", "NodePort [2001:db8:1::11]:30021"]
            .into_iter()
            .map(str::to_owned)
            .collect()
    );
    for df in d.frontends.values().filter(|f| &*f.service.name == "v6") {
        assert_eq!(backends(&d, &df.frontend), ["[fd00:10:244::21]:80/TCP"], "{}", df.frontend);
    }
}

#[test]
fn an_ipv6_service_without_ip_families_is_served_by_its_address() {
    // A hand-written manifest (or an object from before dual-stack): no
    // ipFamilies, no clusterIPs; the ClusterIP's own family is served.
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: bare, namespace: shop}
spec: {clusterIP: "fd00:10:96::22", ports: [{port: 443}]}
"#;
    let d = desired(&objects(yaml), &node());
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert_eq!(addresses(&d, "bare"), BTreeSet::from(["ClusterIP [fd00:10:96::22]:443".to_owned()]));
}

#[test]
fn contradictory_family_fields_are_reported_and_the_consistent_rest_served() {
    let svc = |name: &str, spec: &str| {
        format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {spec}\n")
    };
    let yaml = [
        svc("first", r#"{clusterIP: 10.96.1.1, clusterIPs: [10.96.1.2, "fd00::1:2"], ports: [{port: 80}]}"#),
        svc("twice", r"{clusterIP: 10.96.1.3, clusterIPs: [10.96.1.3, 10.96.1.4], ports: [{port: 80}]}"),
        svc(
            "require",
            "{ipFamilyPolicy: RequireDualStack, ipFamilies: [IPv6, IPv4], clusterIP: \"fd00::1:5\", \
             clusterIPs: [\"fd00::1:5\"], ports: [{port: 80}]}",
        ),
        svc("require-one", "{ipFamilyPolicy: RequireDualStack, clusterIP: 10.96.1.6, ports: [{port: 80}]}"),
        svc(
            "single",
            "{ipFamilyPolicy: SingleStack, clusterIP: 10.96.1.7, clusterIPs: [10.96.1.7, \"fd00::1:7\"], \
             ports: [{port: 80}]}",
        ),
        svc(
            "swapped",
            "{ipFamilies: [IPv6, IPv4], clusterIP: 10.96.1.8, clusterIPs: [10.96.1.8, \"fd00::1:8\"], \
             ports: [{port: 80}]}",
        ),
        svc(
            "names",
            "{ipFamilyPolicy: Both, ipFamilies: [IPv5, IPv4, IPv4], clusterIP: 10.96.1.9, ports: [{port: 80}]}",
        ),
        svc(
            "special",
            "{clusterIP: 10.96.1.10, clusterIPs: [10.96.1.10, \"fe80::1\"], externalIPs: [\"::1\", \
             \"::ffff:192.0.2.1\", \"ff02::1\", \"::\"], ports: [{port: 80}]}",
        ),
        svc("other", r#"{clusterIP: 10.96.1.11, externalIPs: ["2001:db8:e::11"], ports: [{port: 80}]}"#),
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: first-1, namespace: shop, \
         labels: {kubernetes.io/service-name: first}}\naddressType: IPv6\nports: [{port: 80}]\n\
         endpoints: [{addresses: [\"fe80::5\"]}, {addresses: [10.244.0.5]}, {addresses: [\"fd00:10:244::5\"]}]\n"
            .to_owned(),
    ]
    .concat();
    let d = desired(&objects(&yaml), &node());
    assert_eq!(
        errors(&d),
        [
            r#"EndpointSlice shop/first-1: endpoints[0].addresses[0]: "fe80::5" may not be in the link-local range (fe80::/10)"#,
            r#"EndpointSlice shop/first-1: endpoints[1].addresses[0]: "10.244.0.5" is not an IPv6 address (addressType)"#,
            r#"Service shop/first: spec.clusterIP: "10.96.1.1" is not spec.clusterIPs[0] ("10.96.1.2"); spec.clusterIPs is served"#,
            r#"Service shop/names: spec.ipFamilies[0]: "IPv5" is not an IP family (IPv4, IPv6)"#,
            "Service shop/names: spec.ipFamilies[2]: IPv4 is listed twice",
            r#"Service shop/names: spec.ipFamilyPolicy: "Both" is not an IP family policy (SingleStack, PreferDualStack, RequireDualStack); it is ignored"#,
            "Service shop/other: spec.externalIPs[0]: 2001:db8:e::11 is IPv6, and the Service has no IPv6 ClusterIP (spec.clusterIPs): it is not served",
            "Service shop/require: spec.ipFamilies[1]: IPv4 has no ClusterIP (spec.clusterIPs) under ipFamilyPolicy RequireDualStack; only IPv6 is served",
            "Service shop/require-one: spec.ipFamilyPolicy: IPv6 has no ClusterIP (spec.clusterIPs) under ipFamilyPolicy RequireDualStack; only IPv4 is served",
            "Service shop/single: spec.ipFamilyPolicy: SingleStack, but the Service lists two families (spec.clusterIPs, spec.ipFamilies); only its primary ClusterIP (10.96.1.7) is served",
            r#"Service shop/special: spec.clusterIPs[1]: "fe80::1" may not be in the link-local range (fe80::/10)"#,
            r#"Service shop/special: spec.externalIPs[0]: "::1" may not be the loopback address (::1)"#,
            r#"Service shop/special: spec.externalIPs[1]: "::ffff:192.0.2.1" may not be an IPv4-mapped IPv6 address (::ffff:0:0/96)"#,
            r#"Service shop/special: spec.externalIPs[2]: "ff02::1" may not be in the link-local multicast range (ff02::/16)"#,
            r#"Service shop/special: spec.externalIPs[3]: "::" may not be unspecified (::)"#,
            "Service shop/swapped: spec.ipFamilies[0]: IPv6, but spec.clusterIPs[0] (10.96.1.8) is IPv4: each ClusterIP is served in its own family",
            "Service shop/swapped: spec.ipFamilies[1]: IPv4, but spec.clusterIPs[1] (fd00::1:8) is IPv6: each ClusterIP is served in its own family",
            "Service shop/twice: spec.clusterIPs[1]: 10.96.1.4 is a second IPv4 ClusterIP (a Service has one per family); only spec.clusterIPs[0] is served",
        ]
    );
    let served: BTreeSet<String> = d
        .frontends
        .values()
        .filter(|f| f.frontend.scope == Scope::Internal)
        .map(|f| format!("{} {}", f.service.name, SocketAddr::new(f.frontend.addr, f.frontend.port)))
        .collect();
    let expected: BTreeSet<String> = [
        "first 10.96.1.2:80",
        "first [fd00::1:2]:80",
        "twice 10.96.1.3:80",
        "require [fd00::1:5]:80",
        "require-one 10.96.1.6:80",
        "single 10.96.1.7:80",
        "swapped 10.96.1.8:80",
        "swapped [fd00::1:8]:80",
        "names 10.96.1.9:80",
        "special 10.96.1.10:80",
        "other 10.96.1.11:80",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(served, expected);
    // The valid IPv6 endpoint of first-1 is still used.
    assert_eq!(backends(&d, &fe("fd00::1:2", 80, Scope::Internal)), ["[fd00:10:244::5]:80/TCP"]);
}

#[test]
fn the_health_check_counts_each_familys_local_endpoints_once() {
    // One dual-stack pod on this node is one endpoint in each family: the
    // health check says 1 (each of kube-proxy's proxiers would), not 2.
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: shop}
spec:
  type: LoadBalancer
  ipFamilyPolicy: PreferDualStack
  clusterIP: 10.96.9.1
  clusterIPs: [10.96.9.1, "fd00:10:96::9:1"]
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports: [{port: 80, nodePort: 30900}]
status: {loadBalancer: {ingress: [{ip: "2001:db8:1b::9"}]}}
"#
    .to_owned()
        + &slice("lb-4", "lb", "IPv4", 8080, &[("10.244.0.1", "node-a")])
        + &slice("lb-6", "lb", "IPv6", 8080, &[("fd00:10:244::1", "node-a")]);
    let d = desired(&objects(&yaml), &node());
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    let lb = ObjectRef { namespace: "shop".into(), name: "lb".into() };
    assert_eq!(d.health_checks[&lb], HealthCheck { port: 32000, local_endpoints: 1 });
    // Local policy, per family: the IPv6 LoadBalancer IP gets the local
    // IPv6 endpoint only.
    assert_eq!(backends(&d, &fe("2001:db8:1b::9", 80, Scope::External)), ["[fd00:10:244::1]:8080/TCP"]);
}

#[test]
fn ipv6_flows_are_traced_like_ipv4_ones() {
    use trace::{Entry, Outcome, Probe};
    let d = desired(&objects(DUAL), &node());
    let probe = |source: &str, destination: &str, entry: Entry| Probe {
        source: ip(source),
        destination: destination.parse().unwrap(),
        protocol: Protocol::Tcp,
        entry,
    };
    let v6_backend =
        Outcome::Forward { endpoints: ["[fd00:10:244:1::11]:8080".parse().unwrap()].into(), masquerade: false };
    assert_eq!(trace::trace(&d, &probe("fd00:10:244:2::5", "[fd00:10:96::10]:80", Entry::Pod)), v6_backend);
    // A pod landing on itself is masqueraded (hairpin), per family too.
    let hairpin =
        Outcome::Forward { endpoints: ["[fd00:10:244:1::11]:8080".parse().unwrap()].into(), masquerade: true };
    assert_eq!(trace::trace(&d, &probe("fd00:10:244:1::11", "[fd00:10:96::10]:80", Entry::Pod)), hairpin);
    // From outside to the IPv6 NodePort: masqueraded (Cluster policy).
    let external = trace::trace(&d, &probe("2001:db8:99::1", "[2001:db8::11]:30080", Entry::External));
    assert_eq!(
        external,
        Outcome::Forward { endpoints: ["[fd00:10:244:1::11]:8080".parse().unwrap()].into(), masquerade: true }
    );
    // An unserved port of the IPv6 ClusterIP rejects.
    assert_eq!(trace::trace(&d, &probe("fd00:10:244:2::5", "[fd00:10:96::10]:81", Entry::Pod)), Outcome::Reject);
    // The IPv4 NodePort port on an IPv6 address the node does not answer on.
    assert_eq!(
        trace::trace(&d, &probe("2001:db8:99::1", "[2001:db8:2::11]:30080", Entry::External)),
        Outcome::Untouched
    );
}
