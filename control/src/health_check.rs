//! The health-check node ports: kube-proxy's service health server
//! (`pkg/proxy/healthcheck/service_health.go`) for the gateway.
//!
//! For each [`HealthCheck`] of the published model (a served Service with
//! `externalTrafficPolicy: Local`, type LoadBalancer and a
//! `spec.healthCheckNodePort`), control listens on that TCP port on every
//! address, IPv6 and IPv4, and answers any GET with kube-proxy's JSON body
//! `{"service": {"namespace", "name"}, "localEndpoints": N,
//! "serviceProxyHealthy": B}` (`Content-Type: application/json`,
//! `X-Content-Type-Options: nosniff`, `X-Load-Balancing-Endpoint-Weight: N`):
//! 200 when N > 0 and `/healthz` is healthy, else 503.
//!
//! [`HealthChecks::sync`] is kube-proxy's `SyncServices` plus
//! `SyncEndpoints`: listeners of Services that are gone, or whose port
//! changed, are closed; new ones are opened; the counts are updated. A port
//! that cannot be bound is logged with the Service named (and tried again at
//! the next sync), never fatal.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Result;
use clustergate_control::model::HealthCheck;
use tracing::{error, info};

use crate::metrics::Telemetry;
use crate::serve::{Dynamic, Handler, Response};

type Key = (String, String);

/// The open health-check listeners and what they answer.
#[derive(Debug)]
pub struct HealthChecks {
    dynamic: Dynamic,
    telemetry: Arc<Telemetry>,
    /// What each open port answers about.
    state: Arc<Mutex<BTreeMap<u16, HealthCheck>>>,
    /// The Services with an open listener, and its port.
    open: BTreeMap<Key, u16>,
}

/// kube-proxy's body (the same text: tab-indented, no trailing newline).
#[must_use]
pub fn body(check: &HealthCheck, healthy: bool) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned());
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
        q(&check.namespace),
        q(&check.name),
        check.endpoints
    )
}

impl HealthChecks {
    /// No listeners yet.
    pub fn start(telemetry: Arc<Telemetry>) -> Result<Self> {
        Ok(Self {
            dynamic: Dynamic::start()?,
            telemetry,
            state: Arc::new(Mutex::new(BTreeMap::new())),
            open: BTreeMap::new(),
        })
    }

    /// Makes the listeners those of `checks` (see the module documentation).
    pub fn sync(&mut self, checks: &[HealthCheck]) {
        let wanted: BTreeMap<Key, &HealthCheck> = checks
            .iter()
            .map(|c| ((c.namespace.clone(), c.name.clone()), c))
            .collect();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.open.retain(|key, port| {
            if wanted.get(key).is_some_and(|c| c.port == *port) {
                return true;
            }
            info!(service = %format!("{}/{}", key.0, key.1), port = *port, "closing health check");
            self.dynamic.close(*port);
            state.remove(port);
            false
        });
        for (key, check) in wanted {
            state.insert(check.port, check.clone());
            if self.open.contains_key(&key) {
                continue;
            }
            let service = format!("{}/{}", key.0, key.1);
            match self.dynamic.open(check.port, &self.handler(check.port)) {
                Ok(()) => {
                    info!(%service, port = check.port, "opened health check");
                    self.open.insert(key, check.port);
                }
                Err(e) => {
                    state.remove(&check.port);
                    error!(%service, port = check.port, "cannot open the health check node port: {e:#}");
                }
            }
        }
    }

    fn handler(&self, port: u16) -> Handler {
        let state = Arc::clone(&self.state);
        let telemetry = Arc::clone(&self.telemetry);
        Arc::new(move |_path: &str| {
            let check = state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&port)
                .cloned();
            let Some(check) = check else {
                return Response::text(503, "health check closed\n");
            };
            let healthy = telemetry.healthz().0 == 200;
            Response {
                status: if check.endpoints > 0 && healthy {
                    200
                } else {
                    503
                },
                content_type: "application/json",
                headers: vec![
                    ("X-Content-Type-Options", "nosniff".to_owned()),
                    (
                        "X-Load-Balancing-Endpoint-Weight",
                        check.endpoints.to_string(),
                    ),
                ],
                body: body(&check, healthy),
            }
        })
    }
}
