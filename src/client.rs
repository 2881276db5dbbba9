//! `k8scsi client`: drives a running k8scsi (or any CSI driver) from the shell, so a newcomer
//! can create, publish and inspect volumes without Kubernetes or other tools.

use std::collections::HashMap;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Uri};

use crate::csi::proto::controller_client::ControllerClient;
use crate::csi::proto::identity_client::IdentityClient;
use crate::csi::proto::node_client::NodeClient;
use crate::csi::proto::volume_capability::access_mode::Mode;
use crate::csi::proto::volume_capability::{AccessMode, AccessType, MountVolume};
use crate::csi::proto::{self, VolumeCapability};
use crate::server::Endpoint;
use crate::units::{format_size, parse_size};

/// Opens a gRPC channel to a CSI endpoint.
pub async fn connect(endpoint: &Endpoint) -> Result<Channel, tonic::transport::Error> {
    match endpoint {
        Endpoint::Unix(path) => {
            let path = path.clone();
            // The URI is a placeholder: the connector below decides where bytes go.
            tonic::transport::Endpoint::from_static("http://[::1]:1")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        tokio::net::UnixStream::connect(path)
                            .await
                            .map(TokioIo::new)
                    }
                }))
                .await
        }
        Endpoint::Tcp(addr) => {
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .connect()
                .await
        }
    }
}

/// A mount capability with the given access mode.
pub fn mount_capability(mode: Mode, mount_flags: Vec<String>) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: String::new(),
            mount_flags,
            volume_mount_group: String::new(),
        })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

/// Client subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ClientCommand {
    /// Show the driver's name, version, capabilities and node info.
    Info,
    /// Create a volume (prints its ID).
    CreateVolume {
        name: String,
        /// Size, e.g. 1Gi or 500Mi.
        #[arg(long, default_value = "1Gi")]
        size: String,
        /// StorageClass parameter key=value (repeatable).
        #[arg(long = "param", value_parser = parse_key_value)]
        params: Vec<(String, String)>,
        /// Restore the content of this snapshot.
        #[arg(long, conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        /// Clone the content of this volume.
        #[arg(long)]
        from_volume: Option<String>,
    },
    /// Snapshots: create, list, get, delete.
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// Delete a volume by ID.
    Delete { volume_id: String },
    /// List volumes.
    List,
    /// Show one volume.
    Get { volume_id: String },
    /// Free capacity for new volumes.
    Capacity,
    /// Bind-mount a volume at a target path (inside the kubelet directory).
    Publish {
        volume_id: String,
        target_path: String,
        #[arg(long)]
        readonly: bool,
        /// Mount flag (repeatable), e.g. noexec.
        #[arg(long = "mount-flag")]
        mount_flags: Vec<String>,
    },
    /// Unmount a volume from a target path.
    Unpublish {
        volume_id: String,
        target_path: String,
    },
    /// Usage and health of a published volume.
    Stats {
        volume_id: String,
        volume_path: String,
    },
}

/// `client snapshot` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot a volume (prints the snapshot).
    Create {
        name: String,
        source_volume_id: String,
    },
    /// List snapshots, optionally of one volume.
    List {
        #[arg(long)]
        source: Option<String>,
    },
    /// Show one snapshot.
    Get { snapshot_id: String },
    /// Delete a snapshot by ID.
    Delete { snapshot_id: String },
}

fn print_snapshot(s: &proto::Snapshot) {
    let created = s
        .creation_time
        .as_ref()
        .map(|t| crate::ops::format_unix(t.seconds.max(0) as u64))
        .unwrap_or_default();
    out!(
        "{}\t{}\t{}\t{}\tready={}",
        s.snapshot_id,
        s.source_volume_id,
        format_size(s.size_bytes.max(0) as u64),
        created,
        s.ready_to_use
    );
}

fn parse_key_value(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{raw:?} is not key=value"))
}

fn print_volume(v: &proto::Volume) {
    let topology: Vec<String> = v
        .accessible_topology
        .iter()
        .flat_map(|t| t.segments.iter().map(|(k, v)| format!("{k}={v}")))
        .collect();
    out!(
        "{}\t{}\t{}",
        v.volume_id,
        format_size(v.capacity_bytes.max(0) as u64),
        topology.join(",")
    );
}

/// Runs one client command, printing human-readable results.
pub async fn run(endpoint: &Endpoint, command: ClientCommand) -> Result<(), String> {
    let channel = connect(endpoint)
        .await
        .map_err(|e| format!("connecting to {endpoint:?}: {e}"))?;
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    let mut controller = ControllerClient::new(channel.clone());
    let mut node = NodeClient::new(channel.clone());
    match command {
        ClientCommand::Info => {
            let mut identity = IdentityClient::new(channel);
            let info = identity
                .get_plugin_info(proto::GetPluginInfoRequest {})
                .await
                .map_err(status)?
                .into_inner();
            out!("driver:   {} {}", info.name, info.vendor_version);
            let ready = identity
                .probe(proto::ProbeRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .ready;
            out!("ready:    {}", ready.unwrap_or(true));
            if let Ok(caps) = controller
                .controller_get_capabilities(proto::ControllerGetCapabilitiesRequest {})
                .await
            {
                let names: Vec<String> = caps
                    .into_inner()
                    .capabilities
                    .iter()
                    .filter_map(|c| {
                        let proto::controller_service_capability::Type::Rpc(r) =
                            c.r#type.as_ref()?;
                        Some(
                            proto::controller_service_capability::rpc::Type::try_from(r.r#type)
                                .map(|t| t.as_str_name().to_string())
                                .unwrap_or_else(|_| r.r#type.to_string()),
                        )
                    })
                    .collect();
                out!("controller: {}", names.join(" "));
            }
            if let Ok(info) = node.node_get_info(proto::NodeGetInfoRequest {}).await {
                let info = info.into_inner();
                let topology: Vec<String> = info
                    .accessible_topology
                    .iter()
                    .flat_map(|t| t.segments.iter().map(|(k, v)| format!("{k}={v}")))
                    .collect();
                out!("node:     {} ({})", info.node_id, topology.join(","));
            }
        }
        ClientCommand::CreateVolume {
            name,
            size,
            params,
            from_snapshot,
            from_volume,
        } => {
            let bytes = parse_size(&size)? as i64;
            use proto::volume_content_source::{SnapshotSource, Type, VolumeSource};
            let source = match (from_snapshot, from_volume) {
                (Some(snapshot_id), _) => Some(Type::Snapshot(SnapshotSource { snapshot_id })),
                (None, Some(volume_id)) => Some(Type::Volume(VolumeSource { volume_id })),
                (None, None) => None,
            };
            let response = controller
                .create_volume(proto::CreateVolumeRequest {
                    name,
                    capacity_range: Some(proto::CapacityRange {
                        required_bytes: bytes,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![mount_capability(Mode::SingleNodeWriter, vec![])],
                    parameters: params.into_iter().collect::<HashMap<_, _>>(),
                    volume_content_source: source
                        .map(|t| proto::VolumeContentSource { r#type: Some(t) }),
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner();
            if let Some(v) = response.volume {
                print_volume(&v);
            }
        }
        ClientCommand::Snapshot { command } => match command {
            SnapshotCommand::Create {
                name,
                source_volume_id,
            } => {
                let response = controller
                    .create_snapshot(proto::CreateSnapshotRequest {
                        source_volume_id,
                        name,
                        ..Default::default()
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                if let Some(s) = response.snapshot {
                    print_snapshot(&s);
                }
            }
            SnapshotCommand::List { source } => {
                let mut token = String::new();
                loop {
                    let page = controller
                        .list_snapshots(proto::ListSnapshotsRequest {
                            max_entries: 500,
                            starting_token: token,
                            source_volume_id: source.clone().unwrap_or_default(),
                            ..Default::default()
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    for entry in &page.entries {
                        if let Some(s) = &entry.snapshot {
                            print_snapshot(s);
                        }
                    }
                    if page.next_token.is_empty() {
                        break;
                    }
                    token = page.next_token;
                }
            }
            SnapshotCommand::Get { snapshot_id } => {
                let response = controller
                    .get_snapshot(proto::GetSnapshotRequest {
                        snapshot_id,
                        ..Default::default()
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                if let Some(s) = response.snapshot {
                    print_snapshot(&s);
                }
            }
            SnapshotCommand::Delete { snapshot_id } => {
                controller
                    .delete_snapshot(proto::DeleteSnapshotRequest {
                        snapshot_id: snapshot_id.clone(),
                        secrets: Default::default(),
                    })
                    .await
                    .map_err(status)?;
                out!("deleted {snapshot_id}");
            }
        },
        ClientCommand::Delete { volume_id } => {
            controller
                .delete_volume(proto::DeleteVolumeRequest {
                    volume_id: volume_id.clone(),
                    secrets: Default::default(),
                })
                .await
                .map_err(status)?;
            out!("deleted {volume_id}");
        }
        ClientCommand::List => {
            let mut token = String::new();
            loop {
                let page = controller
                    .list_volumes(proto::ListVolumesRequest {
                        max_entries: 500,
                        starting_token: token,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                for entry in &page.entries {
                    if let Some(v) = &entry.volume {
                        print_volume(v);
                    }
                }
                if page.next_token.is_empty() {
                    break;
                }
                token = page.next_token;
            }
        }
        ClientCommand::Get { volume_id } => {
            let r = controller
                .controller_get_volume(proto::ControllerGetVolumeRequest { volume_id })
                .await
                .map_err(status)?
                .into_inner();
            if let Some(v) = &r.volume {
                print_volume(v);
            }
            if let Some(s) = r.status {
                out!("published on: {:?}", s.published_node_ids);
                if let Some(c) = s.volume_condition {
                    out!(
                        "condition: {} ({})",
                        if c.abnormal { "ABNORMAL" } else { "normal" },
                        c.message
                    );
                }
            }
        }
        ClientCommand::Capacity => {
            let r = controller
                .get_capacity(proto::GetCapacityRequest::default())
                .await
                .map_err(status)?
                .into_inner();
            out!(
                "available: {} ({} bytes)",
                format_size(r.available_capacity.max(0) as u64),
                r.available_capacity
            );
        }
        ClientCommand::Publish {
            volume_id,
            target_path,
            readonly,
            mount_flags,
        } => {
            node.node_publish_volume(proto::NodePublishVolumeRequest {
                volume_id: volume_id.clone(),
                target_path: target_path.clone(),
                volume_capability: Some(mount_capability(Mode::SingleNodeWriter, mount_flags)),
                readonly,
                ..Default::default()
            })
            .await
            .map_err(status)?;
            out!("published {volume_id} at {target_path}");
        }
        ClientCommand::Unpublish {
            volume_id,
            target_path,
        } => {
            node.node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
                volume_id: volume_id.clone(),
                target_path: target_path.clone(),
            })
            .await
            .map_err(status)?;
            out!("unpublished {volume_id} from {target_path}");
        }
        ClientCommand::Stats {
            volume_id,
            volume_path,
        } => {
            let r = node
                .node_get_volume_stats(proto::NodeGetVolumeStatsRequest {
                    volume_id,
                    volume_path,
                    staging_target_path: String::new(),
                })
                .await
                .map_err(status)?
                .into_inner();
            for u in &r.usage {
                let unit = proto::volume_usage::Unit::try_from(u.unit)
                    .map(|u| u.as_str_name())
                    .unwrap_or("?");
                let show = |v: i64| {
                    if unit == "BYTES" {
                        format_size(v.max(0) as u64)
                    } else {
                        v.to_string()
                    }
                };
                out!(
                    "{unit:<7} used {:>10}  available {:>10}  total {:>10}",
                    show(u.used),
                    show(u.available),
                    show(u.total)
                );
            }
            if let Some(c) = r.volume_condition {
                out!(
                    "condition: {} ({})",
                    if c.abnormal { "ABNORMAL" } else { "normal" },
                    c.message
                );
            }
        }
    }
    Ok(())
}
