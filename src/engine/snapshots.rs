//! Snapshots and clones: CreateSnapshot, DeleteSnapshot, ListSnapshots, GetSnapshot, and the
//! content sources of CreateVolume.
//!
//! The point in time of a snapshot is fixed before CreateSnapshot answers: the backend cuts it
//! (btrfs snapshot, reflink under a filesystem freeze, or a full copy) while the call holds
//! the snapshot's name, its ID and the source volume, so a concurrent retry gets ABORTED and
//! later writes to the source can never reach it. Only then is the record committed, with the
//! snapshot directory entry in the same group commit, so a record always describes a complete,
//! durable snapshot (`ready_to_use` is always true); storage without a record (a crash before
//! the commit) is removed at start-up and by a retried CreateSnapshot, which lands on the same
//! ID because IDs derive from names.
//!
//! A restore or clone holds the source snapshot (or volume) for its duration, so deleting a
//! snapshot that is being copied from is ABORTED (the CSI "operation pending" answer) and
//! succeeds once the copy is done. Snapshots do not depend on their source volume: a volume with
//! snapshots can be deleted and its snapshots stay usable.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use super::error::{Error, Result};
use super::ids::{IdError, SnapshotId, VolumeId};
use super::types::{CreateSnapshot, Snapshot, SnapshotPage, VolumeSource};
use super::{Engine, blocking, params};
use crate::backend::ContentSource;
use crate::store::{Mutation, SnapshotRecord};

/// Keys the external-snapshotter adds with `--extra-create-metadata`.
const SNAPSHOT_METADATA_KEYS: &[&str] = &[
    "csi.storage.k8s.io/volumesnapshot/name",
    "csi.storage.k8s.io/volumesnapshot/namespace",
    "csi.storage.k8s.io/volumesnapshotcontent/name",
];

/// A content source checked against the store.
pub(super) struct ResolvedSource {
    /// The lock key that keeps the source from being deleted while it is copied.
    pub lock_key: String,
    /// The smallest volume the content fits in.
    pub size_bytes: u64,
    pub snapshot: Option<SnapshotId>,
    pub volume: Option<VolumeId>,
}

impl ResolvedSource {
    pub fn content(&self) -> ContentSource<'_> {
        match (&self.snapshot, &self.volume) {
            (Some(s), _) => ContentSource::Snapshot(s),
            (None, Some(v)) => ContentSource::Volume(v),
            (None, None) => unreachable!("a resolved source names a snapshot or a volume"),
        }
    }
}

fn now() -> (u64, u32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

fn snapshot_from_record(record: &SnapshotRecord) -> Snapshot {
    Snapshot {
        id: record.id.clone(),
        source_volume_id: record.source_volume_id.clone(),
        size_bytes: record.size_bytes,
        created_unix: record.created_unix,
        created_nanos: record.created_nanos,
        ready_to_use: record.ready_to_use,
        group_snapshot_id: record.group_snapshot_id.clone(),
    }
}

impl Engine {
    /// Whether every configured backend takes snapshots and clones (the capabilities are
    /// advertised only then).
    pub fn supports_snapshots(&self) -> bool {
        !self.backends.is_empty() && self.backends.values().all(|b| b.supports_snapshots())
    }

    /// Parses a snapshot ID from a request: malformed is INVALID_ARGUMENT, one we could never
    /// have issued is `None`.
    fn parse_snapshot_id(field: &'static str, raw: &str) -> Result<Option<SnapshotId>> {
        if raw.is_empty() {
            return Err(Error::Missing(field));
        }
        match SnapshotId::parse(raw) {
            Ok(id) => Ok(Some(id)),
            Err(IdError::Foreign(_)) => Ok(None),
            Err(IdError::Malformed(reason)) => Err(Error::invalid(field, reason)),
        }
    }

    /// CreateSnapshot.
    pub async fn create_snapshot(&self, request: CreateSnapshot) -> Result<Snapshot> {
        super::ids::check_name(&request.name).map_err(|reason| Error::invalid("name", reason))?;
        if request.source_volume_id.is_empty() {
            return Err(Error::Missing("source_volume_id"));
        }
        params::check_map("parameters", &request.parameters)?;
        let mut metadata = BTreeMap::new();
        for (key, value) in &request.parameters {
            if SNAPSHOT_METADATA_KEYS.contains(&key.as_str()) {
                metadata.insert(key.clone(), value.clone());
            } else {
                return Err(Error::UnknownParameter(key.clone()));
            }
        }
        let source = match Self::parse_id(&request.source_volume_id)? {
            Some(id) => id,
            None => return Err(Error::VolumeNotFound(request.source_volume_id)),
        };
        let name = request.name;
        let id = SnapshotId::for_name(source.backend(), &name);
        let _guard = self.lock(vec![
            format!("snapname:{name}"),
            format!("snap:{id}"),
            format!("vol:{source}"),
        ])?;

        if let Some(existing) = self.store.snapshot_id_for_name(&name)? {
            let record = self.store.snapshot(&existing)?.ok_or_else(|| {
                Error::Internal(format!("snapshot name {name:?} maps to a missing record"))
            })?;
            if record.source_volume_id != source.as_str() {
                return Err(Error::SnapshotExists {
                    name,
                    what: "source volume".into(),
                });
            }
            return Ok(snapshot_from_record(&record));
        }
        let volume = self
            .store
            .volume(source.as_str())?
            .ok_or_else(|| Error::VolumeNotFound(source.to_string()))?;
        let backend = self.backend_of(&source)?;
        if !backend.supports_snapshots() {
            return Err(Error::Unsupported(format!(
                "volumes of the {} backend cannot be snapshotted",
                backend.name()
            )));
        }

        let started = std::time::Instant::now();
        let (created_unix, created_nanos) = now();
        let sync_dirs = backend.snapshot_sync_dirs();
        let (b, s, i) = (backend.clone(), source.clone(), id.clone());
        let intent_store = self.store.clone();
        // Storage without a record is from an attempt that never answered: the backend
        // replaces it, so the snapshot's time is this call's.
        let mechanism = blocking(move || Ok(b.snapshot(&s, &i)?)).await?;
        tracing::info!(snapshot_id = %id, source_volume_id = %source,
            mechanism = mechanism.name(), duration_ms = started.elapsed().as_millis() as u64,
            "snapshot taken");
        let record = SnapshotRecord {
            id: id.to_string(),
            name,
            source_volume_id: source.to_string(),
            backend: backend.name().to_string(),
            size_bytes: volume.capacity_bytes,
            created_unix,
            created_nanos,
            ready_to_use: true,
            mechanism: mechanism.name().to_string(),
            group_snapshot_id: String::new(),
            metadata,
        };
        intent_store
            .commit(vec![Mutation::PutSnapshot(record.clone())], sync_dirs)
            .await?;
        Ok(snapshot_from_record(&record))
    }

    /// DeleteSnapshot: unknown IDs are success (the spec's idempotency).
    pub async fn delete_snapshot(&self, raw_id: &str) -> Result<()> {
        let Some(id) = Self::parse_snapshot_id("snapshot_id", raw_id)? else {
            return Ok(());
        };
        let _guard = self.lock(vec![format!("snap:{id}")])?;
        let record = self.store.snapshot(id.as_str())?;
        if let Some(record) = &record
            && !record.group_snapshot_id.is_empty()
        {
            return Err(Error::Precondition(format!(
                "snapshot {id} belongs to volume group snapshot {}; delete the group snapshot",
                record.group_snapshot_id
            )));
        }
        let Some(backend) = self.backends.get(id.backend()).cloned() else {
            return Ok(());
        };
        let sync_dirs = backend.snapshot_sync_dirs();
        let i = id.clone();
        blocking(move || Ok(backend.delete_snapshot(&i)?)).await?;
        let mutations = if record.is_some() {
            vec![Mutation::DeleteSnapshot { id: id.to_string() }]
        } else {
            vec![]
        };
        self.store.commit(mutations, sync_dirs).await?;
        Ok(())
    }

    /// GetSnapshot.
    pub fn get_snapshot(&self, raw_id: &str) -> Result<Snapshot> {
        let id = Self::parse_snapshot_id("snapshot_id", raw_id)?
            .ok_or_else(|| Error::SnapshotNotFound(raw_id.to_string()))?;
        let record = self
            .store
            .snapshot(id.as_str())?
            .ok_or_else(|| Error::SnapshotNotFound(raw_id.to_string()))?;
        Ok(snapshot_from_record(&record))
    }

    /// ListSnapshots, optionally of one snapshot or of one source volume. Filters that match
    /// nothing give an empty list, not an error. Tokens are the ID to continue from.
    pub fn list_snapshots(
        &self,
        max_entries: usize,
        starting_token: &str,
        snapshot_id: &str,
        source_volume_id: &str,
    ) -> Result<SnapshotPage> {
        if !starting_token.is_empty() && SnapshotId::parse(starting_token).is_err() {
            return Err(Error::BadToken(starting_token.to_string()));
        }
        let max = if max_entries == 0 {
            usize::MAX
        } else {
            max_entries
        };
        if !snapshot_id.is_empty() {
            let entries = match SnapshotId::parse(snapshot_id) {
                Ok(id) => self
                    .store
                    .snapshot(id.as_str())?
                    .filter(|r| {
                        source_volume_id.is_empty() || r.source_volume_id == source_volume_id
                    })
                    .map(|r| vec![snapshot_from_record(&r)])
                    .unwrap_or_default(),
                Err(_) => vec![],
            };
            return Ok(SnapshotPage {
                entries,
                next_token: None,
            });
        }
        let (records, next) = self.store.list_snapshots(starting_token, max, |r| {
            source_volume_id.is_empty() || r.source_volume_id == source_volume_id
        })?;
        Ok(SnapshotPage {
            entries: records.iter().map(snapshot_from_record).collect(),
            next_token: next,
        })
    }

    /// Checks a CreateVolume content source: it must exist (NOT_FOUND otherwise), live on the
    /// requested backend, and fit in `capacity` (OUT_OF_RANGE otherwise; 0 takes its size).
    pub(super) fn resolve_source(
        &self,
        source: &VolumeSource,
        backend: &str,
        limit_bytes: u64,
    ) -> Result<ResolvedSource> {
        let resolved = match source {
            VolumeSource::Snapshot(raw) => {
                let id =
                    Self::parse_snapshot_id("volume_content_source.snapshot.snapshot_id", raw)?
                        .ok_or_else(|| Error::SnapshotNotFound(raw.clone()))?;
                let record = self
                    .store
                    .snapshot(id.as_str())?
                    .ok_or_else(|| Error::SnapshotNotFound(raw.clone()))?;
                ResolvedSource {
                    lock_key: format!("snap:{id}"),
                    size_bytes: record.size_bytes,
                    snapshot: Some(id),
                    volume: None,
                }
            }
            VolumeSource::Volume(raw) => {
                if raw.is_empty() {
                    return Err(Error::Missing("volume_content_source.volume.volume_id"));
                }
                let id = Self::parse_id(raw)?.ok_or_else(|| Error::VolumeNotFound(raw.clone()))?;
                let record = self
                    .store
                    .volume(id.as_str())?
                    .ok_or_else(|| Error::VolumeNotFound(raw.clone()))?;
                ResolvedSource {
                    lock_key: format!("vol:{id}"),
                    size_bytes: record.capacity_bytes,
                    snapshot: None,
                    volume: Some(id),
                }
            }
        };
        let source_backend = match (&resolved.snapshot, &resolved.volume) {
            (Some(s), _) => s.backend().to_string(),
            (_, Some(v)) => v.backend().to_string(),
            _ => String::new(),
        };
        if source_backend != backend {
            return Err(Error::invalid(
                "volume_content_source",
                format!(
                    "is on the {source_backend} backend; it can only populate {source_backend} \
                     volumes, not {backend}"
                ),
            ));
        }
        if limit_bytes > 0 && limit_bytes < resolved.size_bytes {
            return Err(Error::CapacityOutOfRange(format!(
                "the content source is {} bytes; a volume of at most {limit_bytes} bytes cannot \
                 hold it",
                resolved.size_bytes
            )));
        }
        Ok(resolved)
    }

    /// Start-up recovery: thaws filesystems and removes partial copies (each backend), then
    /// removes complete snapshot storage that has no record (a crash before the commit; the CO
    /// never got an answer and will retry, and a retry makes a fresh snapshot anyway).
    pub fn recover_snapshots(&self) -> Result<()> {
        let recorded: BTreeSet<String> = self
            .store
            .all_snapshots()?
            .into_iter()
            .map(|s| s.id)
            .collect();
        for backend in self.backends.values() {
            backend.recover_snapshots()?;
            for id in backend.list_snapshots()? {
                if !recorded.contains(id.as_str()) {
                    tracing::warn!(snapshot_id = %id,
                        "removing snapshot storage without a record (interrupted CreateSnapshot)");
                    backend.delete_snapshot(&id)?;
                }
            }
        }
        Ok(())
    }
}
