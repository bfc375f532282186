//! kube-proxy's service health check node ports: for every LoadBalancer
//! Service with `externalTrafficPolicy: Local`, an HTTP server on its
//! `healthCheckNodePort` tells the load balancer whether this node has a
//! local endpoint: 200 with local endpoints, 503 without, and kube-proxy's
//! JSON body (`{"service":{"namespace":..,"name":..},"localEndpoints":N,
//! "serviceProxyHealthy":..}`), so load balancers only send traffic to
//! nodes that will not drop it.
//!
//! Each Service answers for itself: a Service whose own frontends could
//! not be written as desired (a full map, a refused update) answers 503
//! with a `reason`, until a retry writes them; one whose frontends are
//! programmed answers by its local endpoints, whatever happened to the rows
//! of other Services. `serviceProxyHealthy` is false only when the agent
//! stopped trying to program changes at all ([`Health::is_syncing`]).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse};

use crate::{
    metrics::Health,
    model::{Desired, DesiredFrontend, HealthCheck},
    reconciler::{Concerns, ReconcileError},
    vocabulary::ObjectRef,
};

/// How many failed frontends a Service's reason names before summing up.
const FRONTENDS_SHOWN: usize = 3;

/// Why each Service with a frontend not programmed as desired is failing:
/// the frontends, each with the map errors of this reconcile that concern
/// it (its own rows, its rev-NAT row, its backends' rows). Every
/// unprogrammed frontend is written again by each reconcile, so its error
/// is among `errors`; "see the log" covers any other case.
#[must_use]
pub fn unprogrammed_services(
    desired: &Desired,
    is_programmed: impl Fn(&DesiredFrontend) -> bool,
    errors: &[ReconcileError],
) -> BTreeMap<ObjectRef, String> {
    let mut failed: BTreeMap<&ObjectRef, Vec<String>> = BTreeMap::new();
    for df in desired.frontends.values().filter(|df| !is_programmed(df)) {
        let why: Vec<String> = errors
            .iter()
            .filter(|e| match e.concerns {
                Concerns::Frontend(f) => f == df.frontend,
                Concerns::Backend(b) => df.backends.contains(&b),
                Concerns::Other => false,
            })
            .map(|e| e.source.to_string())
            .collect();
        let frontend = df.frontend;
        let why = if why.is_empty() { "see the agent log".to_owned() } else { why.join(", ") };
        failed.entry(&df.service).or_default().push(format!("{frontend}: {why}"));
    }
    failed
        .into_iter()
        .map(|(svc, mut frontends)| {
            let n = frontends.len();
            frontends.truncate(FRONTENDS_SHOWN);
            if n > FRONTENDS_SHOWN {
                frontends.push(format!("and {} more", n - FRONTENDS_SHOWN));
            }
            let reason = format!("{n} frontend(s) not programmed, retrying: {}", frontends.join("; "));
            (svc.clone(), reason)
        })
        .collect()
}

/// What one port's server answers from.
struct Served {
    service: ObjectRef,
    local_endpoints: AtomicUsize,
    /// Why the Service's own frontends are not programmed (`None`: they are).
    failure: Mutex<Option<String>>,
    health: Arc<Health>,
}

/// The response for a Service: status and kube-proxy's body, plus a
/// `reason` when the Service's own rows could not be written.
fn response(
    service: &ObjectRef,
    local_endpoints: usize,
    proxy_healthy: bool,
    failure: Option<&str>,
) -> (StatusCode, String) {
    let mut body = serde_json::json!({
        "service": { "namespace": &*service.namespace, "name": &*service.name },
        "localEndpoints": local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    });
    if let Some(reason) = failure {
        body["reason"] = reason.into();
    }
    let code = if local_endpoints > 0 && proxy_healthy && failure.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body.to_string())
}

async fn handler(State(s): State<Arc<Served>>) -> impl IntoResponse {
    let n = s.local_endpoints.load(Ordering::Relaxed);
    let failure = s.failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let (code, body) = response(&s.service, n, s.health.is_syncing(), failure.as_deref());
    (
        code,
        [
            ("content-type", "application/json".to_owned()),
            ("x-content-type-options", "nosniff".to_owned()),
            ("x-load-balancing-endpoint-weight", n.to_string()),
        ],
        body,
    )
}

/// The running servers, by port.
pub struct HealthCheckServers {
    health: Arc<Health>,
    servers: BTreeMap<u16, (Arc<Served>, tokio::task::JoinHandle<()>)>,
}

impl HealthCheckServers {
    #[must_use]
    pub fn new(health: Arc<Health>) -> Self {
        Self { health, servers: BTreeMap::new() }
    }

    /// Makes the servers match `wanted`: new ports are bound (a failure is
    /// logged with the Service and field, and retried at the next sync),
    /// gone ones stopped, counts and failures (`failed`: the Services whose
    /// own frontends are not programmed, and why) updated in place.
    pub fn sync(&mut self, wanted: &BTreeMap<ObjectRef, HealthCheck>, failed: &BTreeMap<ObjectRef, String>) {
        let by_port: BTreeMap<u16, (&ObjectRef, &HealthCheck)> =
            wanted.iter().map(|(svc, hc)| (hc.port, (svc, hc))).collect();
        let gone: Vec<u16> = self
            .servers
            .iter()
            .filter(|(port, (served, _))| by_port.get(port).is_none_or(|(svc, _)| **svc != served.service))
            .map(|(port, _)| *port)
            .collect();
        for port in gone {
            if let Some((served, task)) = self.servers.remove(&port) {
                task.abort();
                tracing::info!(service = %served.service, port, "health check node port closed");
            }
        }
        for (port, (svc, hc)) in by_port {
            let failure = failed.get(svc).cloned();
            if let Some((served, _)) = self.servers.get(&port) {
                served.local_endpoints.store(hc.local_endpoints, Ordering::Relaxed);
                *served.failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = failure;
                continue;
            }
            let listener = match bind_any(port) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(service = %svc, field = "spec.healthCheckNodePort", port, error = %e, "cannot serve the health check node port");
                    continue;
                }
            };
            let served = Arc::new(Served {
                service: svc.clone(),
                local_endpoints: AtomicUsize::new(hc.local_endpoints),
                failure: Mutex::new(failure),
                health: self.health.clone(),
            });
            let app = Router::new().fallback(handler).with_state(served.clone());
            let service = svc.clone();
            let task = tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::warn!(service = %service, port, error = %e, "health check server stopped");
                }
            });
            tracing::info!(service = %svc, port, local_endpoints = hc.local_endpoints, "health check node port serving");
            self.servers.insert(port, (served, task));
        }
    }
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for (_, (_, task)) in std::mem::take(&mut self.servers) {
            task.abort();
        }
    }
}

/// A listener on `port` of every address of both families (`[::]` with
/// IPV6_V6ONLY off, as kube-proxy's health check servers listen on a
/// dual-stack node), or of IPv4's alone where IPv6 is disabled.
fn bind_any(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let dual = tokio::net::TcpSocket::new_v6().and_then(|socket| {
        set_v6only(&socket, false)?;
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)))?;
        socket.listen(1024)
    });
    match dual {
        Ok(listener) => Ok(listener),
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) || e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.set_reuseaddr(true)?;
            socket.bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
            socket.listen(1024)
        }
        Err(e) => Err(e),
    }
}

fn set_v6only(socket: &tokio::net::TcpSocket, on: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let value = libc::c_int::from(on);
    #[expect(clippy::cast_possible_truncation, reason = "4 bytes")]
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket descriptor and an int option of its size.
    let rc = unsafe {
        libc::setsockopt(socket.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, (&raw const value).cast(), len)
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, time::Duration};

    use super::*;
    use crate::{
        maps::fake::FakeMaps,
        model::{Backend, Frontend, FrontendKind, Protocol, Scope, WhenEmpty},
        reconciler::Reconciler,
    };

    #[test]
    fn kube_proxy_status_and_body() {
        let svc = ObjectRef { namespace: "shop".into(), name: "web".into() };
        let (code, body) = response(&svc, 2, true, None);
        assert_eq!(code, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["service"]["namespace"], "shop");
        assert_eq!(v["service"]["name"], "web");
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(v["serviceProxyHealthy"], true);
        assert!(v.get("reason").is_none());
        assert_eq!(response(&svc, 0, true, None).0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response(&svc, 3, false, None).0, StatusCode::SERVICE_UNAVAILABLE);
        let (code, body) = response(&svc, 3, true, Some("map services is full"));
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "local endpoints, but its rows are not written");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["reason"], "map services is full");
        assert_eq!(v["localEndpoints"], 3);
    }

    fn svc(name: &str) -> ObjectRef {
        ObjectRef { namespace: "default".into(), name: name.into() }
    }

    /// `name`'s ClusterIP frontend 10.96.0.`ip`:80 with backends 10.244.1.`b`.
    fn frontend(d: &mut Desired, name: &str, ip: u8, backends: &[u8]) {
        let f =
            Frontend { addr: IpAddr::from([10, 96, 0, ip]), port: 80, protocol: Protocol::Tcp, scope: Scope::Internal };
        let backends = backends
            .iter()
            .map(|b| Backend {
                addr: IpAddr::from([10, 244, 1, *b]),
                port: 8080,
                protocol: Protocol::Tcp,
                local: true,
                ready: true,
            })
            .collect();
        d.frontends.insert(
            f,
            Arc::new(DesiredFrontend {
                service: svc(name),
                port_name: String::new(),
                frontend: f,
                kind: FrontendKind::ClusterIp,
                backends,
                when_empty: WhenEmpty::Reject,
                affinity_timeout_s: None,
                affinity_scope: None,
                source_ranges: Vec::new(),
                masquerade: false,
            }),
        );
    }

    #[test]
    fn only_the_services_whose_own_frontends_failed_are_reported_with_the_map_error() {
        let mut d = Desired::default();
        frontend(&mut d, "fits", 10, &[1, 2]);
        frontend(&mut d, "too-big", 11, &[3, 4]);
        // Room for one frontend row, not two.
        let mut r = Reconciler::new(FakeMaps::with_services_capacity(1)).expect("dump").with_grace(Duration::ZERO);
        let report = r.reconcile(&d);
        assert_eq!(report.errors.len(), 1, "{report:?}");
        let failed = unprogrammed_services(&d, |df| r.is_programmed(df), &report.errors);
        assert_eq!(failed.keys().collect::<Vec<_>>(), [&svc("too-big")]);
        let reason = &failed[&svc("too-big")];
        assert!(reason.contains("10.96.0.11:80/TCP") && reason.contains("--map-size-services"), "{reason}");
        // The same desired state again: the failed frontend is tried again
        // and still reported; the programmed one is left alone.
        let report = r.reconcile(&d);
        assert_eq!(report.errors.len(), 1, "the failed frontend is written again: {report:?}");
        let failed = unprogrammed_services(&d, |df| r.is_programmed(df), &report.errors);
        assert_eq!(failed.keys().collect::<Vec<_>>(), [&svc("too-big")]);
        // Once it fits (the other Service deleted: its rows go after the
        // writes of the reconcile that deletes it), nothing is reported.
        d.frontends.retain(|_, df| df.service == svc("too-big"));
        r.reconcile(&d);
        let report = r.reconcile(&d);
        assert!(report.errors.is_empty(), "{report:?}");
        assert!(unprogrammed_services(&d, |df| r.is_programmed(df), &report.errors).is_empty());
    }

    /// A port nothing listens on now.
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
    }

    async fn get(port: u16) -> (u16, serde_json::Value) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
        conn.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").await.expect("request");
        let mut raw = String::new();
        conn.read_to_string(&mut raw).await.expect("response");
        let code = raw.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status line");
        let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        (code, serde_json::from_str(&body).expect("json body"))
    }

    #[tokio::test]
    async fn a_service_whose_rows_failed_answers_503_and_the_others_by_their_local_endpoints() {
        let health = Arc::new(Health::default());
        let mut servers = HealthCheckServers::new(health.clone());
        let (fits, too_big) = (free_port(), free_port());
        let wanted = BTreeMap::from([
            (svc("fits"), HealthCheck { port: fits, local_endpoints: 2 }),
            (svc("too-big"), HealthCheck { port: too_big, local_endpoints: 2 }),
        ]);
        let failed = BTreeMap::from([(svc("too-big"), "map services is full".to_owned())]);
        // The agent synced, but one Service's rows do not fit: /healthz
        // fails once that has lasted past the timeout.
        health.queued();
        health.sync_failed(vec!["map services is full".into()]);
        health.backdate_pending(Duration::from_mins(5));
        assert!(!health.is_healthy());
        servers.sync(&wanted, &failed);
        let (code, body) = get(fits).await;
        assert_eq!(code, 200, "another Service's failed rows do not fail this one: {body}");
        assert_eq!(body["localEndpoints"], 2);
        assert_eq!(body["serviceProxyHealthy"], true);
        let (code, body) = get(too_big).await;
        assert_eq!(code, 503, "{body}");
        assert_eq!(body["reason"], "map services is full");
        assert_eq!(body["localEndpoints"], 2);
        // A retry wrote its rows: it answers by its endpoints again.
        servers.sync(&wanted, &BTreeMap::new());
        assert_eq!(get(too_big).await.0, 200);
    }
}
