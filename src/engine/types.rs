//! Protocol-free request and response types of the engine. The gRPC adapter converts CSI
//! messages to and from these, so the engine never sees protobuf.

use std::collections::BTreeMap;

use super::ids::VolumeId;

/// CSI access modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl AccessMode {
    /// The CSI enum name, as stored in records.
    pub fn name(self) -> &'static str {
        match self {
            AccessMode::SingleNodeWriter => "SINGLE_NODE_WRITER",
            AccessMode::SingleNodeReaderOnly => "SINGLE_NODE_READER_ONLY",
            AccessMode::MultiNodeReaderOnly => "MULTI_NODE_READER_ONLY",
            AccessMode::MultiNodeSingleWriter => "MULTI_NODE_SINGLE_WRITER",
            AccessMode::MultiNodeMultiWriter => "MULTI_NODE_MULTI_WRITER",
            AccessMode::SingleNodeSingleWriter => "SINGLE_NODE_SINGLE_WRITER",
            AccessMode::SingleNodeMultiWriter => "SINGLE_NODE_MULTI_WRITER",
        }
    }

    /// Whether the mode confines the volume to one node.
    pub fn is_single_node(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeWriter
                | AccessMode::SingleNodeReaderOnly
                | AccessMode::SingleNodeSingleWriter
                | AccessMode::SingleNodeMultiWriter
        )
    }

    /// Whether the mode allows reads only.
    pub fn is_read_only(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeReaderOnly
        )
    }
}

/// How the volume is consumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessType {
    /// A mounted filesystem (for `dir`, a bind-mounted directory).
    Mount {
        fs_type: String,
        mount_flags: Vec<String>,
    },
    /// A raw block device.
    Block,
}

/// One requested volume capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access_type: AccessType,
    pub access_mode: AccessMode,
}

/// CSI capacity range; 0 means "not set" as in the protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapacityRange {
    pub required_bytes: u64,
    pub limit_bytes: u64,
}

/// A topology segment: key/value pairs.
pub type Segment = BTreeMap<String, String>;

/// CSI topology requirement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopologyRequirement {
    pub requisite: Vec<Segment>,
    pub preferred: Vec<Segment>,
}

/// A CreateVolume request, validated for presence of fields by the adapter.
#[derive(Debug, Clone)]
pub struct CreateVolume {
    pub name: String,
    pub capacity: CapacityRange,
    pub capabilities: Vec<Capability>,
    pub parameters: BTreeMap<String, String>,
    pub topology: Option<TopologyRequirement>,
    /// The snapshot or volume to pre-populate the volume from.
    pub content_source: Option<VolumeSource>,
}

/// A CreateVolume content source, by the raw ID the CO sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSource {
    Snapshot(String),
    Volume(String),
}

/// A provisioned volume as returned to the CO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub id: VolumeId,
    pub capacity_bytes: u64,
    pub context: BTreeMap<String, String>,
    pub accessible_topology: Vec<Segment>,
    /// What the volume was pre-populated from (echoed in CreateVolume's answer).
    pub content_source: Option<VolumeSource>,
}

/// A CreateSnapshot request.
#[derive(Debug, Clone)]
pub struct CreateSnapshot {
    pub name: String,
    pub source_volume_id: String,
    pub parameters: BTreeMap<String, String>,
}

/// A snapshot as returned to the CO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    pub source_volume_id: String,
    pub size_bytes: u64,
    pub created_unix: u64,
    pub created_nanos: u32,
    pub ready_to_use: bool,
    pub group_snapshot_id: String,
}

/// One page of ListSnapshots.
#[derive(Debug, Clone)]
pub struct SnapshotPage {
    pub entries: Vec<Snapshot>,
    pub next_token: Option<String>,
}

/// A volume group snapshot as returned to the CO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSnapshot {
    pub id: String,
    pub members: Vec<Snapshot>,
    pub created_unix: u64,
    pub created_nanos: u32,
    pub ready_to_use: bool,
}

/// Health of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub abnormal: bool,
    pub message: String,
}

impl Condition {
    pub fn healthy() -> Condition {
        Condition {
            abnormal: false,
            message: "volume is healthy".to_string(),
        }
    }

    pub fn abnormal(message: impl Into<String>) -> Condition {
        Condition {
            abnormal: true,
            message: message.into(),
        }
    }
}

/// Controller-side status of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStatus {
    pub published_node_ids: Vec<String>,
    pub condition: Condition,
}

/// One page of ListVolumes.
#[derive(Debug, Clone)]
pub struct VolumePage {
    pub entries: Vec<(Volume, VolumeStatus)>,
    pub next_token: Option<String>,
}

/// GetCapacity's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapacityReport {
    pub available_bytes: u64,
    pub maximum_volume_size: u64,
    pub minimum_volume_size: u64,
}

/// A NodePublishVolume request.
#[derive(Debug, Clone)]
pub struct Publish {
    pub volume_id: String,
    pub target_path: String,
    /// Where the volume was staged; empty when the CO did not stage it.
    pub staging_target_path: String,
    pub capability: Capability,
    pub readonly: bool,
}

/// Bytes and inodes of a published volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStats {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
    pub total_inodes: u64,
    pub used_inodes: u64,
    pub available_inodes: u64,
    pub condition: Condition,
}

/// What NodeGetInfo reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub node_id: String,
    pub max_volumes_per_node: u64,
    pub topology: Segment,
}
