//! The CSI Node service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use super::handle;
use super::proto::node_server::Node;
use super::proto::node_service_capability::{Rpc, Type as CapType, rpc::Type};
use super::proto::volume_usage::Unit;
use super::proto::{self, NodeServiceCapability, VolumeUsage};
use crate::engine::types::Publish;
use crate::engine::{Engine, Error};

/// Node: publishing volumes where the kubelet asks.
pub struct NodeService {
    engine: Arc<Engine>,
}

impl NodeService {
    pub fn new(engine: Arc<Engine>) -> Self {
        NodeService { engine }
    }
}

/// Checks the string maps NodeStageVolume and NodePublishVolume carry against CSI's limits.
fn check_maps(
    secrets: std::collections::HashMap<String, String>,
    volume_context: std::collections::HashMap<String, String>,
) -> Result<(), Error> {
    crate::engine::params::check_map("secrets", &convert::sorted(secrets))?;
    crate::engine::params::check_map("volume_context", &convert::sorted(volume_context))
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<proto::NodeStageVolumeRequest>,
    ) -> Result<Response<proto::NodeStageVolumeResponse>, Status> {
        let r = request.into_inner();
        let ids = format!("{} {}", r.volume_id, r.staging_target_path);
        handle("NodeStageVolume", &ids, async {
            if r.volume_id.is_empty() {
                return Err(Error::Missing("volume_id"));
            }
            if r.staging_target_path.is_empty() {
                return Err(Error::Missing("staging_target_path"));
            }
            let capability = r
                .volume_capability
                .ok_or(Error::Missing("volume_capability"))?;
            check_maps(r.secrets, r.volume_context)?;
            self.engine
                .stage(
                    &r.volume_id,
                    &r.staging_target_path,
                    convert::capability("volume_capability", capability)?,
                )
                .await?;
            Ok(proto::NodeStageVolumeResponse {})
        })
        .await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<proto::NodeUnstageVolumeRequest>,
    ) -> Result<Response<proto::NodeUnstageVolumeResponse>, Status> {
        let r = request.into_inner();
        let ids = format!("{} {}", r.volume_id, r.staging_target_path);
        handle("NodeUnstageVolume", &ids, async {
            if r.volume_id.is_empty() {
                return Err(Error::Missing("volume_id"));
            }
            if r.staging_target_path.is_empty() {
                return Err(Error::Missing("staging_target_path"));
            }
            self.engine
                .unstage(&r.volume_id, &r.staging_target_path)
                .await?;
            Ok(proto::NodeUnstageVolumeResponse {})
        })
        .await
    }

    async fn node_publish_volume(
        &self,
        request: Request<proto::NodePublishVolumeRequest>,
    ) -> Result<Response<proto::NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let ids = format!("{} {}", r.volume_id, r.target_path);
        handle("NodePublishVolume", &ids, async {
            if r.volume_id.is_empty() {
                return Err(Error::Missing("volume_id"));
            }
            if r.target_path.is_empty() {
                return Err(Error::Missing("target_path"));
            }
            let capability = r
                .volume_capability
                .ok_or(Error::Missing("volume_capability"))?;
            check_maps(r.secrets, r.volume_context)?;
            self.engine
                .publish(Publish {
                    volume_id: r.volume_id,
                    target_path: r.target_path,
                    staging_target_path: r.staging_target_path,
                    capability: convert::capability("volume_capability", capability)?,
                    readonly: r.readonly,
                })
                .await?;
            Ok(proto::NodePublishVolumeResponse {})
        })
        .await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<proto::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<proto::NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let ids = format!("{} {}", r.volume_id, r.target_path);
        handle("NodeUnpublishVolume", &ids, async {
            if r.target_path.is_empty() && !r.volume_id.is_empty() {
                return Err(Error::Missing("target_path"));
            }
            self.engine.unpublish(&r.volume_id, &r.target_path).await?;
            Ok(proto::NodeUnpublishVolumeResponse {})
        })
        .await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<proto::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<proto::NodeGetVolumeStatsResponse>, Status> {
        let r = request.into_inner();
        let ids = format!("{} {}", r.volume_id, r.volume_path);
        handle("NodeGetVolumeStats", &ids, async {
            if r.volume_path.is_empty() && !r.volume_id.is_empty() {
                return Err(Error::Missing("volume_path"));
            }
            let stats = self.engine.stats(&r.volume_id, &r.volume_path).await?;
            Ok(proto::NodeGetVolumeStatsResponse {
                usage: vec![
                    VolumeUsage {
                        available: convert::int64(stats.available_bytes),
                        total: convert::int64(stats.total_bytes),
                        used: convert::int64(stats.used_bytes),
                        unit: Unit::Bytes as i32,
                    },
                    VolumeUsage {
                        available: convert::int64(stats.available_inodes),
                        total: convert::int64(stats.total_inodes),
                        used: convert::int64(stats.used_inodes),
                        unit: Unit::Inodes as i32,
                    },
                ],
                volume_condition: Some(convert::condition(stats.condition)),
            })
        })
        .await
    }

    async fn node_expand_volume(
        &self,
        request: Request<proto::NodeExpandVolumeRequest>,
    ) -> Result<Response<proto::NodeExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        let ids = format!("{} {}", r.volume_id, r.volume_path);
        handle("NodeExpandVolume", &ids, async {
            if r.volume_id.is_empty() {
                return Err(Error::Missing("volume_id"));
            }
            if r.volume_path.is_empty() {
                return Err(Error::Missing("volume_path"));
            }
            crate::engine::params::check_map("secrets", &convert::sorted(r.secrets.clone()))?;
            let capability = r
                .volume_capability
                .map(|c| convert::capability("volume_capability", c))
                .transpose()?;
            let capacity = self
                .engine
                .node_expand(&r.volume_id, &r.volume_path, capability)
                .await?;
            Ok(proto::NodeExpandVolumeResponse {
                capacity_bytes: convert::int64(capacity),
            })
        })
        .await
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<proto::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<proto::NodeGetCapabilitiesResponse>, Status> {
        let capabilities = [
            Type::StageUnstageVolume,
            Type::ExpandVolume,
            Type::GetVolumeStats,
            Type::VolumeCondition,
            Type::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| NodeServiceCapability {
            r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(proto::NodeGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<proto::NodeGetInfoRequest>,
    ) -> Result<Response<proto::NodeGetInfoResponse>, Status> {
        let info = self.engine.node_info();
        Ok(Response::new(proto::NodeGetInfoResponse {
            node_id: info.node_id,
            max_volumes_per_node: convert::int64(info.max_volumes_per_node),
            accessible_topology: Some(convert::segment(info.topology)),
        }))
    }
}
