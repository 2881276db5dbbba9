//! Conversions between CSI protobuf messages and engine types. Required fields are checked
//! here, so a missing one is reported by its protocol name.

use std::collections::{BTreeMap, HashMap};

use super::proto;
use super::proto::volume_capability::access_mode::Mode;
use crate::engine::Error;
use crate::engine::types::*;

pub fn sorted(map: HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

pub fn unsorted(map: BTreeMap<String, String>) -> HashMap<String, String> {
    map.into_iter().collect()
}

pub fn capability(field: &'static str, cap: proto::VolumeCapability) -> Result<Capability, Error> {
    use proto::volume_capability::AccessType as Pb;
    let access_type = match cap.access_type {
        Some(Pb::Mount(m)) => AccessType::Mount {
            fs_type: m.fs_type,
            mount_flags: m.mount_flags,
        },
        Some(Pb::Block(_)) => AccessType::Block,
        None => return Err(Error::invalid(field, "has no access_type (mount or block)")),
    };
    let mode = cap
        .access_mode
        .ok_or_else(|| Error::invalid(field, "has no access_mode"))?
        .mode;
    let access_mode = match Mode::try_from(mode) {
        Ok(Mode::SingleNodeWriter) => AccessMode::SingleNodeWriter,
        Ok(Mode::SingleNodeReaderOnly) => AccessMode::SingleNodeReaderOnly,
        Ok(Mode::MultiNodeReaderOnly) => AccessMode::MultiNodeReaderOnly,
        Ok(Mode::MultiNodeSingleWriter) => AccessMode::MultiNodeSingleWriter,
        Ok(Mode::MultiNodeMultiWriter) => AccessMode::MultiNodeMultiWriter,
        Ok(Mode::SingleNodeSingleWriter) => AccessMode::SingleNodeSingleWriter,
        Ok(Mode::SingleNodeMultiWriter) => AccessMode::SingleNodeMultiWriter,
        Ok(Mode::Unknown) | Err(_) => {
            return Err(Error::invalid(
                field,
                format!("has unknown access mode {mode}"),
            ));
        }
    };
    Ok(Capability {
        access_type,
        access_mode,
    })
}

pub fn capabilities(
    field: &'static str,
    caps: Vec<proto::VolumeCapability>,
) -> Result<Vec<Capability>, Error> {
    caps.into_iter().map(|c| capability(field, c)).collect()
}

/// A non-negative int64 from the wire as u64.
pub fn bytes(field: &'static str, value: i64) -> Result<u64, Error> {
    u64::try_from(value).map_err(|_| Error::invalid(field, "must not be negative"))
}

pub fn capacity_range(range: Option<proto::CapacityRange>) -> Result<CapacityRange, Error> {
    let Some(range) = range else {
        return Ok(CapacityRange::default());
    };
    Ok(CapacityRange {
        required_bytes: bytes("capacity_range.required_bytes", range.required_bytes)?,
        limit_bytes: bytes("capacity_range.limit_bytes", range.limit_bytes)?,
    })
}

pub fn topology_requirement(
    req: Option<proto::TopologyRequirement>,
) -> Option<TopologyRequirement> {
    req.map(|r| TopologyRequirement {
        requisite: r
            .requisite
            .into_iter()
            .map(|t| sorted(t.segments))
            .collect(),
        preferred: r
            .preferred
            .into_iter()
            .map(|t| sorted(t.segments))
            .collect(),
    })
}

pub fn segment(segment: Segment) -> proto::Topology {
    proto::Topology {
        segments: unsorted(segment),
    }
}

/// u64 to the wire's int64, saturating (no volume or filesystem comes near 2^63 bytes).
pub fn int64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub fn volume(volume: Volume) -> proto::Volume {
    proto::Volume {
        capacity_bytes: int64(volume.capacity_bytes),
        volume_id: volume.id.to_string(),
        volume_context: unsorted(volume.context),
        content_source: volume
            .content_source
            .map(|source| proto::VolumeContentSource {
                r#type: Some(match source {
                    VolumeSource::Snapshot(snapshot_id) => {
                        proto::volume_content_source::Type::Snapshot(
                            proto::volume_content_source::SnapshotSource { snapshot_id },
                        )
                    }
                    VolumeSource::Volume(volume_id) => proto::volume_content_source::Type::Volume(
                        proto::volume_content_source::VolumeSource { volume_id },
                    ),
                }),
            }),
        accessible_topology: volume
            .accessible_topology
            .into_iter()
            .map(segment)
            .collect(),
    }
}

pub fn condition(condition: Condition) -> proto::VolumeCondition {
    proto::VolumeCondition {
        abnormal: condition.abnormal,
        message: condition.message,
    }
}

/// CreateVolume's content source; one without a type is refused.
pub fn content_source(
    source: Option<proto::VolumeContentSource>,
) -> Result<Option<VolumeSource>, Error> {
    use proto::volume_content_source::Type;
    let Some(source) = source else {
        return Ok(None);
    };
    match source.r#type {
        Some(Type::Snapshot(s)) => Ok(Some(VolumeSource::Snapshot(s.snapshot_id))),
        Some(Type::Volume(v)) => Ok(Some(VolumeSource::Volume(v.volume_id))),
        None => Err(Error::invalid(
            "volume_content_source",
            "names neither a snapshot nor a volume",
        )),
    }
}

/// Seconds and nanoseconds since the epoch as a protobuf timestamp.
pub fn timestamp(seconds: u64, nanos: u32) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: int64(seconds),
        nanos: i32::try_from(nanos).unwrap_or(0),
    }
}

pub fn snapshot(snapshot: Snapshot) -> proto::Snapshot {
    proto::Snapshot {
        size_bytes: int64(snapshot.size_bytes),
        snapshot_id: snapshot.id,
        source_volume_id: snapshot.source_volume_id,
        creation_time: Some(timestamp(snapshot.created_unix, snapshot.created_nanos)),
        ready_to_use: snapshot.ready_to_use,
        group_snapshot_id: snapshot.group_snapshot_id,
    }
}
