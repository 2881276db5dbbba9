//! The CSI Identity service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::proto::identity_server::Identity;
use super::proto::plugin_capability::{Service, service};
use super::proto::{self, PluginCapability, plugin_capability};
use crate::engine::Engine;

/// Identity: name, version, capabilities and readiness.
pub struct IdentityService {
    engine: Arc<Engine>,
    driver_name: String,
    serves_controller: bool,
}

impl IdentityService {
    pub fn new(engine: Arc<Engine>, driver_name: String, serves_controller: bool) -> Self {
        IdentityService {
            engine,
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
        let mut types = vec![service::Type::VolumeAccessibilityConstraints];
        if self.serves_controller {
            types.insert(0, service::Type::ControllerService);
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
        let engine = self.engine.clone();
        let ready = tokio::task::spawn_blocking(move || engine.ready())
            .await
            .unwrap_or(false);
        Ok(Response::new(proto::ProbeResponse { ready: Some(ready) }))
    }
}
