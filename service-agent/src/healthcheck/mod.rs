//! kube-proxy's service health check node ports: for every LoadBalancer
//! Service with `externalTrafficPolicy: Local`, an HTTP server on its
//! `healthCheckNodePort` tells the load balancer whether this node has a
//! local endpoint: 200 with local endpoints, 503 without, and kube-proxy's
//! JSON body (`{"service":{"namespace":..,"name":..},"localEndpoints":N,
//! "serviceProxyHealthy":..}`), so load balancers only send traffic to
//! nodes that will not drop it.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse};

use crate::{metrics::Health, model::HealthCheck, source::ObjectRef};

/// What one port's server answers from.
struct Served {
    service: ObjectRef,
    local_endpoints: AtomicUsize,
    health: Arc<Health>,
}

/// The response for a Service: status and kube-proxy's body.
fn response(service: &ObjectRef, local_endpoints: usize, proxy_healthy: bool) -> (StatusCode, String) {
    let body = serde_json::json!({
        "service": { "namespace": service.namespace, "name": service.name },
        "localEndpoints": local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    });
    let code = if local_endpoints > 0 && proxy_healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, body.to_string())
}

async fn handler(State(s): State<Arc<Served>>) -> impl IntoResponse {
    let n = s.local_endpoints.load(Ordering::Relaxed);
    let (code, body) = response(&s.service, n, s.health.is_healthy());
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
    /// gone ones stopped, counts updated in place.
    pub async fn sync(&mut self, wanted: &BTreeMap<ObjectRef, HealthCheck>) {
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
            if let Some((served, _)) = self.servers.get(&port) {
                served.local_endpoints.store(hc.local_endpoints, Ordering::Relaxed);
                continue;
            }
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(service = %svc, field = "spec.healthCheckNodePort", port, error = %e, "cannot serve the health check node port");
                    continue;
                }
            };
            let served = Arc::new(Served {
                service: svc.clone(),
                local_endpoints: AtomicUsize::new(hc.local_endpoints),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxy_status_and_body() {
        let svc = ObjectRef { namespace: "shop".into(), name: "web".into() };
        let (code, body) = response(&svc, 2, true);
        assert_eq!(code, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["service"]["namespace"], "shop");
        assert_eq!(v["service"]["name"], "web");
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(v["serviceProxyHealthy"], true);
        assert_eq!(response(&svc, 0, true).0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response(&svc, 3, false).0, StatusCode::SERVICE_UNAVAILABLE);
    }
}
