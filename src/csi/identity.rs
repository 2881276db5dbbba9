//! The CSI Identity service.

use std::time::Instant;

use tonic::{Code, Request, Response, Status};

use super::proto::identity_server::Identity;
use super::proto::plugin_capability::{Service, service};
use super::proto::{self, PluginCapability, plugin_capability};
use crate::health::Health;

/// Identity: name, version, capabilities and readiness.
pub struct IdentityService {
    health: Health,
    driver_name: String,
    serves_controller: bool,
}

impl IdentityService {
    pub fn new(health: Health, driver_name: String, serves_controller: bool) -> Self {
        IdentityService {
            health,
            driver_name,
            serves_controller,
        }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<proto::GetPluginInfoRequest>,
    ) -> Result<Response<proto::GetPluginInfoResponse>, Status> {
        let _call = Observed::new("GetPluginInfo");
        Ok(Response::new(proto::GetPluginInfoResponse {
            name: self.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<proto::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<proto::GetPluginCapabilitiesResponse>, Status> {
        let _call = Observed::new("GetPluginCapabilities");
        let mut types = vec![service::Type::VolumeAccessibilityConstraints];
        if self.serves_controller {
            types.insert(0, service::Type::ControllerService);
            // Volume group snapshots (loop volumes; see the GroupController service).
            types.push(service::Type::GroupControllerService);
        }
        let mut capabilities: Vec<PluginCapability> = types
            .into_iter()
            .map(|t| PluginCapability {
                r#type: Some(plugin_capability::Type::Service(Service {
                    r#type: t as i32,
                })),
            })
            .collect();
        // Volumes grow while published (a raised qgroup limit takes effect at once).
        capabilities.push(PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(
                plugin_capability::VolumeExpansion {
                    r#type: plugin_capability::volume_expansion::Type::Online as i32,
                },
            )),
        });
        Ok(Response::new(proto::GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn probe(
        &self,
        _request: Request<proto::ProbeRequest>,
    ) -> Result<Response<proto::ProbeResponse>, Status> {
        let _call = Observed::new("Probe");
        let report = self.health.check().await;
        if !report.ready() {
            tracing::warn!(problems = ?report.problems, "Probe: not ready");
        }
        Ok(Response::new(proto::ProbeResponse {
            ready: Some(report.ready()),
        }))
    }
}

/// Records an Identity call in the CSI call metrics when it ends. Identity calls cannot fail, so
/// they are always `OK`; they are logged at debug level only, because the livenessprobe sidecar
/// calls Probe every few seconds.
struct Observed {
    method: &'static str,
    started: Instant,
}

impl Observed {
    fn new(method: &'static str) -> Observed {
        Observed {
            method,
            started: Instant::now(),
        }
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        crate::metrics::record_call(self.method, Code::Ok, elapsed);
        tracing::debug!(
            method = self.method,
            duration_us = elapsed.as_micros() as u64,
            code = "OK"
        );
    }
}
