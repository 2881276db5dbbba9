//! The CSI GroupController service: volume group snapshots.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{self, sorted};
use super::handle;
use super::proto::group_controller_server::GroupController;
use super::proto::group_controller_service_capability::{Rpc, Type as CapType, rpc::Type};
use super::proto::{self, GroupControllerServiceCapability};
use crate::engine::Engine;
use crate::engine::types::GroupSnapshot;

/// GroupController: CreateVolumeGroupSnapshot, DeleteVolumeGroupSnapshot,
/// GetVolumeGroupSnapshot.
pub struct GroupControllerService {
    engine: Arc<Engine>,
}

impl GroupControllerService {
    pub fn new(engine: Arc<Engine>) -> Self {
        GroupControllerService { engine }
    }
}

fn group(group: GroupSnapshot) -> proto::VolumeGroupSnapshot {
    proto::VolumeGroupSnapshot {
        group_snapshot_id: group.id,
        snapshots: group.members.into_iter().map(convert::snapshot).collect(),
        creation_time: Some(convert::timestamp(group.created_unix, group.created_nanos)),
        ready_to_use: group.ready_to_use,
    }
}

#[tonic::async_trait]
impl GroupController for GroupControllerService {
    async fn group_controller_get_capabilities(
        &self,
        _request: Request<proto::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<proto::GroupControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(
            proto::GroupControllerGetCapabilitiesResponse {
                capabilities: vec![GroupControllerServiceCapability {
                    r#type: Some(CapType::Rpc(Rpc {
                        r#type: Type::CreateDeleteGetVolumeGroupSnapshot as i32,
                    })),
                }],
            },
        ))
    }

    async fn create_volume_group_snapshot(
        &self,
        request: Request<proto::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<proto::CreateVolumeGroupSnapshotResponse>, Status> {
        let r = request.into_inner();
        let ids = format!("{} {}", r.name, r.source_volume_ids.join(","));
        handle("CreateVolumeGroupSnapshot", &ids, async {
            crate::engine::params::check_map("secrets", &sorted(r.secrets))?;
            let created = self
                .engine
                .create_group_snapshot(&r.name, &r.source_volume_ids, &sorted(r.parameters))
                .await?;
            Ok(proto::CreateVolumeGroupSnapshotResponse {
                group_snapshot: Some(group(created)),
            })
        })
        .await
    }

    async fn delete_volume_group_snapshot(
        &self,
        request: Request<proto::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<proto::DeleteVolumeGroupSnapshotResponse>, Status> {
        let r = request.into_inner();
        handle(
            "DeleteVolumeGroupSnapshot",
            &r.group_snapshot_id.clone(),
            async {
                crate::engine::params::check_map("secrets", &sorted(r.secrets))?;
                self.engine
                    .delete_group_snapshot(&r.group_snapshot_id, &r.snapshot_ids)
                    .await?;
                Ok(proto::DeleteVolumeGroupSnapshotResponse {})
            },
        )
        .await
    }

    async fn get_volume_group_snapshot(
        &self,
        request: Request<proto::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<proto::GetVolumeGroupSnapshotResponse>, Status> {
        let r = request.into_inner();
        handle(
            "GetVolumeGroupSnapshot",
            &r.group_snapshot_id.clone(),
            async {
                let found = self
                    .engine
                    .get_group_snapshot(&r.group_snapshot_id, &r.snapshot_ids)?;
                Ok(proto::GetVolumeGroupSnapshotResponse {
                    group_snapshot: Some(group(found)),
                })
            },
        )
        .await
    }
}
