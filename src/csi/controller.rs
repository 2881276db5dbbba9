//! The CSI Controller service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{self, sorted};
use super::handle;
use super::proto::controller_server::Controller;
use super::proto::controller_service_capability::{Rpc, Type as CapType, rpc::Type};
use super::proto::{self, ControllerServiceCapability};
use crate::engine::types::{CreateSnapshot, CreateVolume};
use crate::engine::{Engine, Error};

/// Controller: provisioning, listing, capacity.
pub struct ControllerService {
    engine: Arc<Engine>,
}

impl ControllerService {
    pub fn new(engine: Arc<Engine>) -> Self {
        ControllerService { engine }
    }

    fn capabilities(&self) -> Vec<Type> {
        let mut types = vec![
            Type::CreateDeleteVolume,
            Type::ListVolumes,
            Type::GetCapacity,
            Type::GetVolume,
            Type::VolumeCondition,
            Type::SingleNodeMultiWriter,
            Type::ExpandVolume,
        ];
        if self.engine.supports_snapshots() {
            types.extend([
                Type::CreateDeleteSnapshot,
                Type::ListSnapshots,
                Type::GetSnapshot,
                Type::CloneVolume,
            ]);
        }
        // Only a process that also serves the node side knows where volumes are published.
        if self.engine.config().serves_node {
            types.push(Type::ListVolumesPublishedNodes);
        }
        types
    }
}

fn unimplemented<T>(what: &str) -> Result<Response<T>, Status> {
    Err(Status::unimplemented(format!(
        "{what} is not supported by k8scsi"
    )))
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<proto::CreateVolumeRequest>,
    ) -> Result<Response<proto::CreateVolumeResponse>, Status> {
        let r = request.into_inner();
        let name = r.name.clone();
        handle("CreateVolume", &name, async {
            if r.name.is_empty() {
                return Err(Error::Missing("name"));
            }
            if r.volume_capabilities.is_empty() {
                return Err(Error::Missing("volume_capabilities"));
            }
            crate::engine::params::check_map("secrets", &sorted(r.secrets))?;
            let request = CreateVolume {
                name: r.name,
                capacity: convert::capacity_range(r.capacity_range)?,
                capabilities: convert::capabilities("volume_capabilities", r.volume_capabilities)?,
                parameters: sorted(r.parameters),
                topology: convert::topology_requirement(r.accessibility_requirements),
                content_source: convert::content_source(r.volume_content_source)?,
            };
            if !r.mutable_parameters.is_empty() {
                return Err(Error::Unsupported(
                    "mutable_parameters are not supported (no MODIFY_VOLUME capability)".into(),
                ));
            }
            let volume = self.engine.create_volume(request).await?;
            Ok(proto::CreateVolumeResponse {
                volume: Some(convert::volume(volume)),
            })
        })
        .await
    }

    async fn delete_volume(
        &self,
        request: Request<proto::DeleteVolumeRequest>,
    ) -> Result<Response<proto::DeleteVolumeResponse>, Status> {
        let r = request.into_inner();
        handle("DeleteVolume", &r.volume_id, async {
            crate::engine::params::check_map("secrets", &sorted(r.secrets.clone()))?;
            self.engine.delete_volume(&r.volume_id).await?;
            Ok(proto::DeleteVolumeResponse {})
        })
        .await
    }

    async fn controller_publish_volume(
        &self,
        _request: Request<proto::ControllerPublishVolumeRequest>,
    ) -> Result<Response<proto::ControllerPublishVolumeResponse>, Status> {
        unimplemented("ControllerPublishVolume")
    }

    async fn controller_unpublish_volume(
        &self,
        _request: Request<proto::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<proto::ControllerUnpublishVolumeResponse>, Status> {
        unimplemented("ControllerUnpublishVolume")
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<proto::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<proto::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = request.into_inner();
        handle("ValidateVolumeCapabilities", &r.volume_id.clone(), async {
            if r.volume_id.is_empty() {
                return Err(Error::Missing("volume_id"));
            }
            if r.volume_capabilities.is_empty() {
                return Err(Error::Missing("volume_capabilities"));
            }
            crate::engine::params::check_map("volume_context", &sorted(r.volume_context.clone()))?;
            crate::engine::params::check_map("secrets", &sorted(r.secrets.clone()))?;
            let capabilities =
                convert::capabilities("volume_capabilities", r.volume_capabilities.clone())?;
            let parameters = sorted(r.parameters.clone());
            let verdict = self
                .engine
                .validate_capabilities(&r.volume_id, &capabilities, &parameters)
                .await?;
            Ok(match verdict {
                Ok(()) => proto::ValidateVolumeCapabilitiesResponse {
                    confirmed: Some(proto::validate_volume_capabilities_response::Confirmed {
                        volume_context: r.volume_context,
                        volume_capabilities: r.volume_capabilities,
                        parameters: r.parameters,
                        mutable_parameters: Default::default(),
                    }),
                    message: String::new(),
                },
                Err(reason) => proto::ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message: reason,
                },
            })
        })
        .await
    }

    async fn list_volumes(
        &self,
        request: Request<proto::ListVolumesRequest>,
    ) -> Result<Response<proto::ListVolumesResponse>, Status> {
        let r = request.into_inner();
        handle("ListVolumes", &r.starting_token.clone(), async {
            let max = usize::try_from(r.max_entries)
                .map_err(|_| Error::invalid("max_entries", "must not be negative"))?;
            // Blocking: each volume's storage is checked (bounded by the mount timeout).
            let (engine, token) = (self.engine.clone(), r.starting_token.clone());
            let page = tokio::task::spawn_blocking(move || engine.list_volumes(max, &token))
                .await
                .map_err(|e| Error::Internal(e.to_string()))??;
            let entries = page
                .entries
                .into_iter()
                .map(|(volume, status)| proto::list_volumes_response::Entry {
                    volume: Some(convert::volume(volume)),
                    status: Some(proto::list_volumes_response::VolumeStatus {
                        published_node_ids: status.published_node_ids,
                        volume_condition: Some(convert::condition(status.condition)),
                    }),
                })
                .collect();
            Ok(proto::ListVolumesResponse {
                entries,
                next_token: page.next_token.unwrap_or_default(),
            })
        })
        .await
    }

    async fn get_capacity(
        &self,
        request: Request<proto::GetCapacityRequest>,
    ) -> Result<Response<proto::GetCapacityResponse>, Status> {
        let r = request.into_inner();
        handle("GetCapacity", "", async {
            let capabilities = convert::capabilities("volume_capabilities", r.volume_capabilities)?;
            let topology = r.accessible_topology.map(|t| sorted(t.segments));
            let report =
                self.engine
                    .capacity(&capabilities, &sorted(r.parameters), topology.as_ref())?;
            Ok(proto::GetCapacityResponse {
                available_capacity: convert::int64(report.available_bytes),
                maximum_volume_size: Some(convert::int64(report.maximum_volume_size)),
                minimum_volume_size: Some(convert::int64(report.minimum_volume_size)),
            })
        })
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<proto::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<proto::ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = self
            .capabilities()
            .into_iter()
            .map(|t| ControllerServiceCapability {
                r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
            })
            .collect();
        Ok(Response::new(proto::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<proto::CreateSnapshotRequest>,
    ) -> Result<Response<proto::CreateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let ids = format!("{} {}", r.name, r.source_volume_id);
        handle("CreateSnapshot", &ids, async {
            if !self.engine.supports_snapshots() {
                return Err(Error::Unsupported("snapshots are not supported".into()));
            }
            if r.name.is_empty() {
                return Err(Error::Missing("name"));
            }
            crate::engine::params::check_map("secrets", &sorted(r.secrets))?;
            let snapshot = self
                .engine
                .create_snapshot(CreateSnapshot {
                    name: r.name,
                    source_volume_id: r.source_volume_id,
                    parameters: sorted(r.parameters),
                })
                .await?;
            Ok(proto::CreateSnapshotResponse {
                snapshot: Some(convert::snapshot(snapshot)),
            })
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        request: Request<proto::DeleteSnapshotRequest>,
    ) -> Result<Response<proto::DeleteSnapshotResponse>, Status> {
        let r = request.into_inner();
        handle("DeleteSnapshot", &r.snapshot_id.clone(), async {
            crate::engine::params::check_map("secrets", &sorted(r.secrets))?;
            self.engine.delete_snapshot(&r.snapshot_id).await?;
            Ok(proto::DeleteSnapshotResponse {})
        })
        .await
    }

    async fn list_snapshots(
        &self,
        request: Request<proto::ListSnapshotsRequest>,
    ) -> Result<Response<proto::ListSnapshotsResponse>, Status> {
        let r = request.into_inner();
        handle("ListSnapshots", &r.starting_token.clone(), async {
            let max = usize::try_from(r.max_entries)
                .map_err(|_| Error::invalid("max_entries", "must not be negative"))?;
            let page = self.engine.list_snapshots(
                max,
                &r.starting_token,
                &r.snapshot_id,
                &r.source_volume_id,
            )?;
            Ok(proto::ListSnapshotsResponse {
                entries: page
                    .entries
                    .into_iter()
                    .map(|s| proto::list_snapshots_response::Entry {
                        snapshot: Some(convert::snapshot(s)),
                    })
                    .collect(),
                next_token: page.next_token.unwrap_or_default(),
            })
        })
        .await
    }

    async fn get_snapshot(
        &self,
        request: Request<proto::GetSnapshotRequest>,
    ) -> Result<Response<proto::GetSnapshotResponse>, Status> {
        let r = request.into_inner();
        handle("GetSnapshot", &r.snapshot_id.clone(), async {
            let snapshot = self.engine.get_snapshot(&r.snapshot_id)?;
            Ok(proto::GetSnapshotResponse {
                snapshot: Some(convert::snapshot(snapshot)),
            })
        })
        .await
    }

    async fn controller_expand_volume(
        &self,
        request: Request<proto::ControllerExpandVolumeRequest>,
    ) -> Result<Response<proto::ControllerExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        handle("ControllerExpandVolume", &r.volume_id.clone(), async {
            if r.volume_id.is_empty() {
                return Err(Error::Missing("volume_id"));
            }
            if r.capacity_range.is_none() {
                return Err(Error::Missing("capacity_range"));
            }
            crate::engine::params::check_map("secrets", &sorted(r.secrets.clone()))?;
            let capability = r
                .volume_capability
                .map(|c| convert::capability("volume_capability", c))
                .transpose()?;
            let (capacity, node_expansion_required) = self
                .engine
                .expand_volume(
                    &r.volume_id,
                    convert::capacity_range(r.capacity_range)?,
                    capability,
                )
                .await?;
            Ok(proto::ControllerExpandVolumeResponse {
                capacity_bytes: convert::int64(capacity),
                node_expansion_required,
            })
        })
        .await
    }

    async fn controller_get_volume(
        &self,
        request: Request<proto::ControllerGetVolumeRequest>,
    ) -> Result<Response<proto::ControllerGetVolumeResponse>, Status> {
        let r = request.into_inner();
        handle("ControllerGetVolume", &r.volume_id.clone(), async {
            let (engine, id) = (self.engine.clone(), r.volume_id.clone());
            let (volume, status) = tokio::task::spawn_blocking(move || engine.get_volume(&id))
                .await
                .map_err(|e| Error::Internal(e.to_string()))??;
            Ok(proto::ControllerGetVolumeResponse {
                volume: Some(convert::volume(volume)),
                status: Some(proto::controller_get_volume_response::VolumeStatus {
                    published_node_ids: status.published_node_ids,
                    volume_condition: Some(convert::condition(status.condition)),
                }),
            })
        })
        .await
    }

    async fn controller_modify_volume(
        &self,
        _request: Request<proto::ControllerModifyVolumeRequest>,
    ) -> Result<Response<proto::ControllerModifyVolumeResponse>, Status> {
        unimplemented("ControllerModifyVolume")
    }
}
