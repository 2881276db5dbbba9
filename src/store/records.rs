//! The records kept in the state store. They are serialised as JSON so an operator can read a
//! dump and so fields can be added without a migration (unknown fields are ignored, missing
//! ones take their defaults).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A provisioned volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Our opaque volume ID (see `engine::ids`).
    pub id: String,
    /// The CO-chosen name that made it; CreateVolume's idempotency key.
    pub name: String,
    /// Creation order; assigned by the store on first insert.
    #[serde(default)]
    pub seq: u64,
    /// Which backend holds the data (`dir`).
    pub backend: String,
    /// Capacity promised to the CO, in bytes (0 = not specified).
    pub capacity_bytes: u64,
    /// StorageClass parameters the volume was created with (without provisioner metadata).
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// Access modes requested at creation, by CSI enum name.
    #[serde(default)]
    pub access_modes: Vec<String>,
    /// The node whose topology segment the volume is accessible from.
    pub accessible_node: String,
    /// Seconds since the epoch at creation.
    #[serde(default)]
    pub created_unix: u64,
    /// How the size is enforced (`btrfs-qgroup`, `none`); empty in records from before
    /// enforcement existed, which were all unenforced.
    #[serde(default)]
    pub enforcement: String,
    /// Provisioner metadata (PV name, PVC name and namespace), when the CO sent it.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// The snapshot the volume was restored from (empty: none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source_snapshot_id: String,
    /// The volume the volume was cloned from (empty: none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source_volume_id: String,
    /// How the content was copied from its source (`btrfs-snapshot`, `reflink`, `copy`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub populated_by: String,
}

/// A snapshot of a volume. Only complete snapshots are recorded: the record is committed after
/// the snapshot's storage is durable, so a record always means "ready to use".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Our opaque snapshot ID (see `engine::ids::SnapshotId`).
    pub id: String,
    /// The CO-chosen name; CreateSnapshot's idempotency key.
    pub name: String,
    /// The volume it was taken of (which may since have been deleted).
    pub source_volume_id: String,
    /// Which backend holds the data.
    pub backend: String,
    /// The source volume's capacity when the snapshot was taken: the smallest volume it can be
    /// restored into.
    pub size_bytes: u64,
    /// When the snapshot was cut, seconds and nanoseconds since the epoch.
    pub created_unix: u64,
    #[serde(default)]
    pub created_nanos: u32,
    /// Always true for records written by this version (see above).
    pub ready_to_use: bool,
    /// How it was taken (`btrfs-snapshot`, `reflink`, `copy`).
    pub mechanism: String,
    /// The volume group snapshot it belongs to (empty: none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group_snapshot_id: String,
    /// Provisioner metadata (VolumeSnapshot name and namespace), when the CO sent it.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// A volume published (bind-mounted) at a path on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicationRecord {
    pub volume_id: String,
    /// The absolute, normalised target path.
    pub path: String,
    pub node_id: String,
    pub readonly: bool,
    /// CSI access mode name the volume was published with.
    pub access_mode: String,
    /// Mount flags applied, as given by the CO (validated).
    #[serde(default)]
    pub mount_flags: Vec<String>,
    /// Whether this is the volume's staging path (NodeStageVolume) rather than a target.
    #[serde(default)]
    pub staging: bool,
}
