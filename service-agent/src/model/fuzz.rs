//! Property tests of the model (and, from `source::manifest::fuzz`, of the
//! manifest reader): many generated inputs, a small seeded PRNG, no panic
//! and a few invariants on every one.
//!
//! `FUZZ_CASES` sets the number of cases of each test (default
//! [`DEFAULT_CASES`]),
//! `FUZZ_SEED` the base seed (default fixed, so a run is reproducible);
//! a failing case prints both and its index, and `FUZZ_CASE=<index>` runs
//! that case alone.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use k8s_openapi::{
    api::{
        core::v1::{
            ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Node, Service, ServicePort, ServiceSpec,
            ServiceStatus, SessionAffinityConfig,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode, ForZone},
        networking::v1::{ServiceCIDR, ServiceCIDRSpec},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::{NodeContext, desired};
use crate::vocabulary::{Cidr, LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME, LABEL_ZONE, ObjectRef, Objects};

/// splitmix64: tiny, fast, and good enough to pick test inputs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    #[expect(clippy::cast_possible_truncation, reason = "the result is below n, a usize")]
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True one time in `n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// Usually one of the edges of the Service API's ranges, else anything.
    #[expect(clippy::cast_possible_truncation, reason = "any i32 will do")]
    pub fn int(&mut self) -> i32 {
        const EDGES: [i32; 14] = [0, 1, -1, 53, 80, 443, 8080, 30080, 32767, 65535, 65536, 86_400, i32::MAX, i32::MIN];
        if self.one_in(4) { self.next_u64() as i32 } else { *self.pick(&EDGES) }
    }

    /// Usually a plausible address from a small pool (so frontends and
    /// backends collide), sometimes something invalid or special.
    pub fn ip(&mut self) -> String {
        const POOL: [&str; 22] = [
            "10.96.0.1",
            "10.96.0.2",
            "10.244.1.5",
            "10.244.2.6",
            "192.0.2.10",
            "0.0.0.0",
            "127.0.0.1",
            "169.254.1.1",
            "224.0.0.1",
            "255.255.255.255",
            "fd00::1",
            "fd00:10:96::1",
            "fd00:10:244::5",
            "2001:db8::10",
            "fe80::1",
            "ff02::1",
            "::ffff:10.96.0.1",
            "::",
            "10.96.0.300",
            "",
            "None",
            "010.096.000.001",
        ];
        match self.below(8) {
            0 => format!("10.{}.{}.{}", self.below(256), self.below(256), self.below(256)),
            1 => self.text(),
            _ => (*self.pick(&POOL)).to_owned(),
        }
    }

    /// A short string: a name from a pool, or random characters.
    pub fn text(&mut self) -> String {
        const POOL: [&str; 11] = ["", "a", "web", "http", "dns", "node-a", "node-b", "zone-a", "-", "UPPER", "é"];
        if self.one_in(3) {
            let len = self.below(20);
            (0..len).map(|_| char::from_u32(u32::try_from(self.below(0x250)).unwrap_or(0)).unwrap_or('?')).collect()
        } else {
            (*self.pick(&POOL)).to_owned()
        }
    }

    pub fn maybe<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> Option<T> {
        if self.one_in(3) { None } else { Some(f(self)) }
    }

    pub fn list<T>(&mut self, max: usize, mut f: impl FnMut(&mut Self) -> T) -> Vec<T> {
        let n = self.below(max + 1);
        (0..n).map(|_| f(self)).collect()
    }
}

const NAMES: [&str; 4] = ["web", "db", "dns", "x"];
const NAMESPACES: [&str; 2] = ["default", "shop"];

fn one_of(rng: &mut Rng, pool: &[&str]) -> String {
    if rng.one_in(6) { rng.text() } else { (*rng.pick(pool)).to_owned() }
}

/// A Service with random (mostly plausible, often invalid) fields.
pub fn service(rng: &mut Rng) -> (ObjectRef, Service) {
    let key = ObjectRef { namespace: (*rng.pick(&NAMESPACES)).into(), name: (*rng.pick(&NAMES)).into() };
    let mut svc = Service::default();
    svc.metadata.name = Some(key.name.to_string());
    svc.metadata.namespace = Some(key.namespace.to_string());
    if rng.one_in(20) {
        svc.metadata.labels = Some([(LABEL_SERVICE_PROXY_NAME.to_owned(), "other".to_owned())].into());
    }
    if rng.one_in(10) {
        svc.metadata.annotations =
            Some([(crate::vocabulary::ANNOTATION_TOPOLOGY_MODE.to_owned(), one_of(rng, &["Auto", "auto"]))].into());
    }
    let port = |rng: &mut Rng| ServicePort {
        name: rng.maybe(|r| one_of(r, &["http", "dns", "", "a"])),
        port: rng.int(),
        protocol: rng.maybe(|r| one_of(r, &["TCP", "UDP", "SCTP", "tcp"])),
        node_port: rng.maybe(Rng::int),
        target_port: rng.maybe(|r| {
            if r.one_in(2) {
                IntOrString::Int(r.int())
            } else {
                IntOrString::String(one_of(r, &["http", "web-2", "8080", ""]))
            }
        }),
        app_protocol: None,
    };
    svc.spec = rng.maybe(|rng| ServiceSpec {
        type_: rng.maybe(|r| one_of(r, &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"])),
        cluster_ip: rng.maybe(Rng::ip),
        cluster_ips: rng.maybe(|r| r.list(3, Rng::ip)),
        external_ips: rng.maybe(|r| r.list(3, Rng::ip)),
        ports: rng.maybe(|r| r.list(4, port)),
        session_affinity: rng.maybe(|r| one_of(r, &["None", "ClientIP"])),
        session_affinity_config: rng.maybe(|r| SessionAffinityConfig {
            client_ip: r.maybe(|r| ClientIPConfig { timeout_seconds: r.maybe(Rng::int) }),
        }),
        external_traffic_policy: rng.maybe(|r| one_of(r, &["Cluster", "Local"])),
        internal_traffic_policy: rng.maybe(|r| one_of(r, &["Cluster", "Local"])),
        health_check_node_port: rng.maybe(Rng::int),
        load_balancer_source_ranges: rng.maybe(|r| {
            r.list(3, |r| {
                one_of(r, &["10.0.0.0/8", "192.0.2.7/32", "0.0.0.0/0", "1.2.3.4/33", "::/0", "10.0.0.1/8", "x/"])
            })
        }),
        traffic_distribution: rng.maybe(|r| one_of(r, &["PreferClose", "PreferSameZone", "PreferSameNode"])),
        ip_families: rng.maybe(|r| r.list(3, |r| one_of(r, &["IPv4", "IPv6"]))),
        ip_family_policy: rng.maybe(|r| one_of(r, &["SingleStack", "PreferDualStack", "RequireDualStack"])),
        ..ServiceSpec::default()
    });
    if rng.one_in(3) {
        svc.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: rng.maybe(|r| {
                    r.list(3, |r| LoadBalancerIngress {
                        ip: r.maybe(Rng::ip),
                        ip_mode: r.maybe(|r| one_of(r, &["VIP", "Proxy"])),
                        ..LoadBalancerIngress::default()
                    })
                }),
            }),
            ..ServiceStatus::default()
        });
    }
    (key, svc)
}

/// An EndpointSlice with random fields, usually labelled for one of the
/// Services `service` makes.
pub fn endpoint_slice(rng: &mut Rng, max_endpoints: usize) -> (ObjectRef, EndpointSlice) {
    let key = ObjectRef { namespace: (*rng.pick(&NAMESPACES)).into(), name: format!("slice-{}", rng.below(6)).into() };
    let mut slice = EndpointSlice {
        address_type: one_of(rng, &["IPv4", "IPv4", "IPv6", "FQDN"]),
        ports: rng.maybe(|r| {
            r.list(3, |r| EndpointPort {
                name: r.maybe(|r| one_of(r, &["http", "dns", "", "a"])),
                port: r.maybe(Rng::int),
                protocol: r.maybe(|r| one_of(r, &["TCP", "UDP", "SCTP"])),
                app_protocol: None,
            })
        }),
        endpoints: rng.maybe(|r| {
            r.list(max_endpoints, |r| Endpoint {
                addresses: r.list(2, Rng::ip),
                conditions: r.maybe(|r| EndpointConditions {
                    ready: r.maybe(|r| r.one_in(2)),
                    serving: r.maybe(|r| r.one_in(2)),
                    terminating: r.maybe(|r| r.one_in(2)),
                }),
                node_name: r.maybe(|r| one_of(r, &["node-a", "node-b"])),
                hints: r.maybe(|r| EndpointHints {
                    for_zones: r.maybe(|r| r.list(2, |r| ForZone { name: one_of(r, &["zone-a", "zone-b"]) })),
                    for_nodes: r.maybe(|r| r.list(2, |r| ForNode { name: one_of(r, &["node-a", "node-b"]) })),
                }),
                ..Endpoint::default()
            })
        }),
        ..EndpointSlice::default()
    };
    slice.metadata.name = Some(key.name.to_string());
    slice.metadata.namespace = Some(key.namespace.to_string());
    if !rng.one_in(10) {
        slice.metadata.labels = Some([(LABEL_SERVICE_NAME.to_owned(), (*rng.pick(&NAMES)).to_owned())].into());
    }
    (key, slice)
}

/// A valid Service and a slice of valid endpoints for it, then one to three
/// of their fields replaced by random (often invalid) values: inputs near
/// the valid ones, where most of the model's code runs.
fn coherent(rng: &mut Rng, objects: &mut Objects) {
    let (key, mut svc) = service(rng);
    let ports: Vec<(String, &str)> =
        (0..=rng.below(2)).map(|i| (format!("p{i}"), *rng.pick(&["TCP", "UDP", "SCTP"]))).collect();
    // IPv4, IPv6 or dual-stack (either family first), with slices of the
    // Service's families.
    let v4 = format!("10.96.{}.{}", rng.below(4), 1 + rng.below(4));
    let v6 = format!("fd00:10:96::{}", 1 + rng.below(4));
    let families: Vec<&str> = rng.pick(&[&["IPv4"][..], &["IPv6"], &["IPv4", "IPv6"], &["IPv6", "IPv4"]]).to_vec();
    let ips: Vec<String> = families.iter().map(|f| if *f == "IPv4" { v4.clone() } else { v6.clone() }).collect();
    let slice_family = *rng.pick(&families);
    svc.spec = Some(ServiceSpec {
        type_: Some((*rng.pick(&["ClusterIP", "NodePort", "LoadBalancer"])).to_owned()),
        cluster_ip: Some(ips[0].clone()),
        cluster_ips: Some(ips),
        ip_families: Some(families.iter().map(|f| (*f).to_owned()).collect()),
        ip_family_policy: Some(
            (if families.len() == 2 { *rng.pick(&["PreferDualStack", "RequireDualStack"]) } else { "SingleStack" })
                .to_owned(),
        ),
        ports: Some(
            ports
                .iter()
                .enumerate()
                .map(|(i, (name, proto))| ServicePort {
                    name: Some(name.clone()),
                    port: i32::try_from(80 + i).unwrap_or(80),
                    protocol: Some((*proto).to_owned()),
                    node_port: Some(i32::try_from(30_000 + rng.below(10)).unwrap_or(30_000)),
                    ..ServicePort::default()
                })
                .collect(),
        ),
        external_traffic_policy: Some((*rng.pick(&["Cluster", "Local"])).to_owned()),
        ..svc.spec.take().unwrap_or_default()
    });
    let (_, mut slice) = endpoint_slice(rng, 8);
    slice_family.clone_into(&mut slice.address_type);
    slice.metadata.name = Some(format!("{}-{}", key.name, rng.below(3)));
    slice.metadata.namespace = Some(key.namespace.to_string());
    slice.metadata.labels = Some([(LABEL_SERVICE_NAME.to_owned(), key.name.to_string())].into());
    slice.ports = Some(
        ports
            .iter()
            .map(|(name, proto)| EndpointPort {
                name: Some(name.clone()),
                port: Some(if *proto == "SCTP" { 80 } else { 8080 }),
                protocol: Some((*proto).to_owned()),
                app_protocol: None,
            })
            .collect(),
    );
    for ep in slice.endpoints.get_or_insert_with(Vec::new) {
        ep.addresses = vec![if slice_family == "IPv4" {
            format!("10.244.{}.{}", rng.below(3), 1 + rng.below(20))
        } else {
            format!("fd00:10:244:{}::{}", rng.below(3), 1 + rng.below(20))
        }];
    }
    for _ in 0..=rng.below(2) {
        let (_, other_svc) = service(rng);
        let (_, other_slice) = endpoint_slice(rng, 2);
        // One field of the random ones over the valid.
        let (spec, other) = (svc.spec.get_or_insert_default(), other_svc.spec.unwrap_or_default());
        match rng.below(11) {
            0 => spec.cluster_ip = other.cluster_ip,
            8 => spec.cluster_ips = other.cluster_ips,
            9 => spec.ip_families = other.ip_families,
            10 => spec.ip_family_policy = other.ip_family_policy,
            1 => spec.ports = other.ports,
            2 => spec.type_ = other.type_,
            3 => spec.external_ips = other.external_ips,
            4 => spec.session_affinity = other.session_affinity,
            5 => slice.ports = other_slice.ports,
            6 => slice.endpoints = other_slice.endpoints,
            _ => slice.address_type = other_slice.address_type,
        }
    }
    let slice_key =
        ObjectRef { namespace: key.namespace.clone(), name: slice.metadata.name.as_deref().unwrap_or_default().into() };
    objects.services.insert(key, Arc::new(svc));
    objects.endpoint_slices.insert(slice_key, Arc::new(slice.into()));
}

/// A few Services and slices, and maybe the Node.
pub fn objects(rng: &mut Rng) -> Objects {
    let mut objects = Objects::default();
    for _ in 0..rng.below(3) {
        coherent(rng, &mut objects);
    }
    for _ in 0..rng.below(4) {
        let (k, s) = service(rng);
        objects.services.insert(k, Arc::new(s));
    }
    for _ in 0..rng.below(4) {
        let (k, s) = endpoint_slice(rng, 6);
        objects.endpoint_slices.insert(k, Arc::new(s.into()));
    }
    if rng.one_in(4) {
        let mut node = Node::default();
        node.metadata.labels = Some([(LABEL_ZONE.to_owned(), one_of(rng, &["zone-a", "zone-b"]))].into());
        objects.node = Some(node);
    }
    if rng.one_in(4) {
        // A ServiceCIDR, its ranges often invalid.
        let mut object = ServiceCIDR::default();
        let cidrs = rng.list(2, |r| {
            let len = if r.one_in(4) { r.int().to_string() } else { r.below(33).to_string() };
            format!("{}/{len}", r.ip())
        });
        object.spec = Some(ServiceCIDRSpec { cidrs: Some(cidrs) });
        let name = (*rng.pick(&["kubernetes", "extra"])).to_owned();
        object.metadata.name = Some(name.clone());
        objects.service_cidrs.insert(name, object);
    }
    objects
}

pub fn node(rng: &mut Rng) -> NodeContext {
    NodeContext {
        node_name: one_of(rng, &["node-a", "node-b"]),
        zone: rng.maybe(|r| one_of(r, &["zone-a", "zone-b"])),
        nodeport_addresses: rng.list(2, |r| r.ip().parse::<IpAddr>().unwrap_or(IpAddr::from([10, 0, 0, 11]))),
        masquerade_all: rng.one_in(4),
        service_cidrs: rng.list(1, |r| {
            r.ip().parse::<IpAddr>().map_or(Cidr { addr: IpAddr::from([10, 96, 0, 0]), prefix_len: 12 }, |addr| Cidr {
                addr,
                prefix_len: 24,
            })
        }),
    }
}

/// Replaces about half the objects of `map` by equal copies (new
/// allocations, as a relist gives).
fn copy_some<T: Clone>(rng: &mut Rng, map: &mut crate::vocabulary::ObjectMap<T>) {
    let copies: Vec<_> =
        map.iter().filter(|_| rng.one_in(2)).map(|(k, o)| (k.clone(), Arc::new(T::clone(o)))).collect();
    map.extend(copies);
}

/// A random key of `map` (`None` when it is empty).
fn pick_key<V>(rng: &mut Rng, map: &crate::vocabulary::ObjectMap<V>) -> Option<ObjectRef> {
    (!map.is_empty()).then(|| map.keys().nth(rng.below(map.len())).cloned()).flatten()
}

/// One random change of the kinds a cluster sees, drawing new objects from
/// the fuzz generators: a Service added, changed or deleted, a slice added,
/// changed, moved to another Service or deleted, the node context or the
/// Node's zone changed, the ServiceCIDRs changed, or an object replaced by
/// an equal copy (a new allocation, as a relist gives).
pub fn change(rng: &mut Rng, objects: &mut Objects, node: &mut NodeContext) -> &'static str {
    let pool = self::objects(rng);
    match rng.below(11) {
        0 => {
            let Some((k, s)) = pool.services.into_iter().next() else { return "nothing" };
            objects.services.insert(k, s);
            "service added"
        }
        1 => {
            let (Some(k), Some((_, s))) = (pick_key(rng, &objects.services), pool.services.into_iter().next()) else {
                return "nothing";
            };
            objects.services.insert(k, s);
            "service changed"
        }
        2 => {
            let Some(k) = pick_key(rng, &objects.services) else { return "nothing" };
            objects.services.remove(&k);
            "service deleted"
        }
        3 => {
            let Some((k, s)) = pool.endpoint_slices.into_iter().next() else { return "nothing" };
            objects.endpoint_slices.insert(k, s);
            "slice added"
        }
        4 => {
            let (Some(k), Some((_, s))) =
                (pick_key(rng, &objects.endpoint_slices), pool.endpoint_slices.into_iter().next())
            else {
                return "nothing";
            };
            objects.endpoint_slices.insert(k, s);
            "slice changed"
        }
        5 => {
            let (Some(k), Some(to)) = (pick_key(rng, &objects.endpoint_slices), pick_key(rng, &objects.services))
            else {
                return "nothing";
            };
            let mut slice = (*objects.endpoint_slices[&k]).clone();
            slice.service_name = Some(to.name);
            objects.endpoint_slices.insert(k, Arc::new(slice));
            "slice moved"
        }
        6 => {
            let Some(k) = pick_key(rng, &objects.endpoint_slices) else { return "nothing" };
            objects.endpoint_slices.remove(&k);
            "slice deleted"
        }
        7 => {
            *node = self::node(rng);
            "node context changed"
        }
        8 => {
            let mut n = objects.node.take().unwrap_or_default();
            let zone = self::node(rng).zone;
            n.metadata.labels = zone.map(|z| [(LABEL_ZONE.to_owned(), z)].into());
            objects.node = Some(n);
            "node zone changed"
        }
        9 => {
            objects.service_cidrs = pool.service_cidrs;
            "service CIDRs changed"
        }
        _ => {
            copy_some(rng, &mut objects.services);
            copy_some(rng, &mut objects.endpoint_slices);
            "equal copies"
        }
    }
}

/// What every `desired` output must satisfy, whatever the input.
pub fn check_invariants(objects: &Objects, d: &super::Desired) {
    for (key, f) in &d.frontends {
        assert_eq!(*key, f.frontend);
        assert!(objects.services.contains_key(&f.service), "{} from no Service", f.frontend);
        assert!(f.backends.windows(2).all(|w| w[0] < w[1]), "{}: backends sorted, no duplicates", f.frontend);
        assert!(f.frontend.port != 0 && f.backends.iter().all(|b| b.port != 0), "{}: a port 0", f.frontend);
        // NodePorts answer on the addresses the operator gave; every other
        // frontend address comes from an object and must be usable.
        if f.kind != super::FrontendKind::NodePort {
            assert!(super::special_ip(f.frontend.addr).is_none(), "{}", f.frontend);
        }
        // Each family's frontends get that family's endpoints only, and
        // share affinity with that family's ClusterIP.
        let family = super::IpFamily::of(f.frontend.addr);
        assert!(
            f.backends.iter().all(|b| super::IpFamily::of(b.addr) == family),
            "{}: a backend of another family",
            f.frontend
        );
        assert!(
            f.source_ranges.iter().all(|r| super::IpFamily::of(r.addr) == family),
            "{}: a range of another family",
            f.frontend
        );
        if let Some(scope) = f.affinity_scope {
            assert_eq!(super::IpFamily::of(scope.addr), family, "{}: affinity scope {scope}", f.frontend);
        }
    }
    assert!(d.errors.windows(2).all(|w| w[0] < w[1]), "errors sorted, no duplicates");
    for e in &d.errors {
        let known = match e.kind {
            "Service" => objects.services.contains_key(&e.object),
            "ServiceCIDR" => e.object.namespace.is_empty() && objects.service_cidrs.contains_key(&*e.object.name),
            _ => objects.endpoint_slices.contains_key(&e.object) || e.object.name.is_empty(),
        };
        assert!(known, "an error about an object not in the input: {e}");
    }
}

/// Cases per test when `FUZZ_CASES` is not set: 100,000 in an optimized
/// build (`cargo xtask test` runs the unit tests with `--release`), 20,000
/// in a debug one, where each case costs about ten times as much.
pub const DEFAULT_CASES: u64 = if cfg!(debug_assertions) { 20_000 } else { 100_000 };

/// Names the failing case when dropped by a panic.
struct OnPanic<'a>(&'a str, u64, u64);

impl Drop for OnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}: failing case: FUZZ_SEED={} FUZZ_CASE={}", self.0, self.1, self.2);
        }
    }
}

/// The cases to run, from the environment.
pub struct Plan {
    pub seed: u64,
    pub cases: u64,
    pub only: Option<u64>,
}

impl Plan {
    pub fn from_env(default_cases: u64) -> Self {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        Self {
            seed: var("FUZZ_SEED").unwrap_or(0x5eed_0f12),
            cases: var("FUZZ_CASES").unwrap_or(default_cases),
            only: var("FUZZ_CASE"),
        }
    }

    /// Runs `case(index, rng)` for every case, each with its own seed; a
    /// panic names the case, and a case running for over a minute is
    /// named while it runs (a hang).
    pub fn run(&self, test: &str, mut case: impl FnMut(u64, &mut Rng)) {
        let current = Arc::new(AtomicU64::new(u64::MAX));
        let watch = Arc::clone(&current);
        let (seed, test_name) = (self.seed, test.to_owned());
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            let mut last = u64::MAX;
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop_rx.recv_timeout(Duration::from_mins(1)) {
                let now = watch.load(Ordering::Relaxed);
                if now == last && now != u64::MAX {
                    eprintln!("{test_name}: case {now} has run for over a minute (FUZZ_SEED={seed} FUZZ_CASE={now})");
                }
                last = now;
            }
        });
        let range = self.only.map_or(0..self.cases, |i| i..i + 1);
        for i in range {
            current.store(i, Ordering::Relaxed);
            let guard = OnPanic(test, self.seed, i);
            let mut rng = Rng::new(self.seed ^ i.wrapping_mul(0x2545_f491_4f6c_dd1d));
            case(i, &mut rng);
            drop(guard);
        }
        drop(stop_tx);
        let _ = watchdog.join();
    }
}

#[test]
fn random_objects_never_panic_and_keep_the_invariants() {
    let plan = Plan::from_env(DEFAULT_CASES);
    let mut stats: BTreeMap<&str, u64> = BTreeMap::new();
    plan.run("model::fuzz", |i, rng| {
        let objects = objects(rng);
        let node = node(rng);
        let d = desired(&objects, &node);
        check_invariants(&objects, &d);
        // Pure: the same input gives the same output.
        if i % 16 == 0 {
            assert_eq!(desired(&objects, &node), d);
        }
        *stats.entry("frontends").or_default() += d.frontends.len() as u64;
        *stats.entry("errors").or_default() += d.errors.len() as u64;
        *stats.entry("backends").or_default() += d.frontends.values().map(|f| f.backends.len() as u64).sum::<u64>();
    });
    eprintln!("model::fuzz: {} cases (FUZZ_SEED={}): {stats:?}", plan.cases, plan.seed);
    // The generator reaches the interesting parts: frontends with backends
    // and errors of all kinds.
    assert!(plan.only.is_some() || stats.values().all(|n| *n > 0), "{stats:?}");
}
