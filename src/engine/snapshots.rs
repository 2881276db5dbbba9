//! Snapshots and clones: CreateSnapshot, DeleteSnapshot, ListSnapshots, GetSnapshot, and the
//! content sources of CreateVolume.
//!
//! The point in time of a snapshot is fixed before CreateSnapshot answers: the backend cuts it
//! (btrfs snapshot, reflink under a filesystem freeze, or a full copy) while the call holds
//! the snapshot's name, its ID and the source volume, so a concurrent retry gets ABORTED and
//! later writes to the source can never reach it. Only then is the record committed, with the
//! snapshot directory entry in the same group commit, so a ready record always describes a
//! complete, durable snapshot; storage without a record (a crash before the commit) is removed
//! at start-up and by a retried CreateSnapshot, which lands on the same ID because IDs derive
//! from names.
//!
//! Background copies: when the snapshot would be a slow full copy (the backend says it is not
//! instant, and the source holds at least [`BACKGROUND_COPY_MIN_BYTES`]) of a node-local source
//! that is neither staged nor published, CreateSnapshot commits the record with
//! `ready_to_use = false` and answers at once; a task copies (into a temporary name, synced,
//! then renamed) and then commits `ready_to_use = true`. The point in time is still fixed
//! before the answer: the task keeps the source volume's key, so nothing can stage, publish,
//! expand or delete the source (ABORTED) until the copy is done, and an unpublished volume has
//! no writer. Other volumes are never blocked. Meanwhile GetSnapshot and ListSnapshots say
//! not ready, a repeated CreateSnapshot returns the same not-ready snapshot, restores from the
//! snapshot get ABORTED (the CSI "operation pending" answer; the CO retries), and DeleteSnapshot
//! cancels the copy, waits for it to remove what it made, and succeeds. Shutdown stops copies
//! but keeps their not-ready records, which the next start copies again. A staged or published source is copied before answering, as before (frozen where
//! it is a loop filesystem): a pod can write to it at any time. A crash during a background copy
//! leaves a not-ready record: start-up removes the partial copy, re-takes the keys before the
//! server serves and copies again, or removes the snapshot when its source is gone. A copy that
//! fails removes the snapshot (storage, then record), so the CO's retry starts afresh.
//!
//! A restore or clone holds the source snapshot (or volume) for its duration, so deleting a
//! snapshot that is being copied from is ABORTED (the CSI "operation pending" answer) and
//! succeeds once the copy is done. Snapshots do not depend on their source volume: a volume with
//! snapshots can be deleted and its snapshots stay usable.
//!
//! A volume group snapshot quiesces every member (freezes each mounted filesystem) before it
//! cuts any, then thaws them all, so all members show one point in time. Its members are
//! ordinary snapshot records tagged with the group ID, committed in one transaction; the group
//! has no record of its own. Group IDs are `group-` + 32 hex digits derived from the name.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use super::copies::Registration;
use super::error::{Error, Result};
use super::ids::{IdError, SnapshotId, VolumeId};
use super::locks::InFlightGuard;
use super::types::{CreateSnapshot, GroupSnapshot, Snapshot, SnapshotPage, VolumeSource};
use super::{Engine, blocking, params};
use crate::backend::{Backend, Cancel, ContentSource};
use crate::store::{Mutation, SnapshotRecord, Store};

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

/// Below this much data a full copy takes well under a second, so CreateSnapshot copies
/// before answering and the snapshot is ready at once (no polling for the CO).
pub const BACKGROUND_COPY_MIN_BYTES: u64 = 16 << 20;

/// How long DeleteSnapshot waits for a cancelled background copy to stop and clean up before
/// it answers ABORTED (the copy looks at its flag at least every 64 MiB).
const CANCEL_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs the copy of a snapshot whose record is committed with `ready_to_use = false`, then
/// commits it ready. `guard` holds the snapshot's name, its ID and its source volume until the
/// copy ends, so the source cannot be staged, published, expanded or deleted meanwhile, and
/// restores of the snapshot get ABORTED. A failed or cancelled copy (see [`BackgroundCopies`])
/// removes its storage and the record: the CO's next CreateSnapshot retry starts a fresh one.
fn spawn_copy(
    store: Store,
    backend: std::sync::Arc<dyn Backend>,
    record: SnapshotRecord,
    guard: InFlightGuard,
    registration: Registration,
) {
    tokio::spawn(async move {
        // Declared first, dropped last: a DeleteSnapshot woken by the end of the registration
        // must find the keys released.
        let registration = registration;
        let _guard = guard;
        let (Ok(source), Ok(id)) = (
            VolumeId::parse(&record.source_volume_id),
            SnapshotId::parse(&record.id),
        ) else {
            tracing::error!(snapshot_id = %record.id, "stored snapshot record has malformed IDs");
            return;
        };
        let sync_dirs = backend.snapshot_sync_dirs();
        let started = std::time::Instant::now();
        let (b, s, i) = (backend.clone(), source.clone(), id.clone());
        let cancel = registration.cancel();
        let flag = cancel.clone();
        // The backend copies into a temporary name, syncs and renames; only then is the
        // record marked ready, so a crash before that leaves a record that is not ready.
        match blocking(move || Ok(b.snapshot(&s, &i, &flag)?)).await {
            Ok(mechanism) => {
                tracing::info!(snapshot_id = %id, source_volume_id = %source,
                    mechanism = mechanism.name(),
                    duration_ms = started.elapsed().as_millis() as u64,
                    background = true, "snapshot taken");
                let ready = SnapshotRecord {
                    ready_to_use: true,
                    mechanism: mechanism.name().to_string(),
                    ..record
                };
                if let Err(e) = store
                    .commit(vec![Mutation::PutSnapshot(ready)], sync_dirs)
                    .await
                {
                    // Stays not ready; the next start copies it again.
                    tracing::error!(snapshot_id = %id, error = %e,
                        "could not record a finished background snapshot copy");
                }
            }
            Err(_) if cancel.is_set() && registration.stopped_for_shutdown() => {
                // Its partial storage is gone; the record stays not ready, and the next start
                // copies it again (as after a crash).
                tracing::info!(snapshot_id = %id, source_volume_id = %source,
                    "background snapshot copy stopped for shutdown; the next start copies it again");
            }
            Err(_) if cancel.is_set() => {
                tracing::info!(snapshot_id = %id, source_volume_id = %source,
                    duration_ms = started.elapsed().as_millis() as u64,
                    "background snapshot copy cancelled by DeleteSnapshot; removing the snapshot");
                discard_snapshot(&store, backend, id).await;
            }
            Err(e) => {
                tracing::error!(snapshot_id = %id, source_volume_id = %source, error = %e,
                    "background snapshot copy failed; removing the snapshot");
                discard_snapshot(&store, backend, id).await;
            }
        }
    });
}

/// Removes a snapshot's storage and then its record (storage first: a crash in between
/// leaves a not-ready record, which start-up handles again).
async fn discard_snapshot(store: &Store, backend: std::sync::Arc<dyn Backend>, id: SnapshotId) {
    let sync_dirs = backend.snapshot_sync_dirs();
    let i = id.clone();
    if let Err(e) = blocking(move || Ok(backend.delete_snapshot(&i)?)).await {
        tracing::error!(snapshot_id = %id, error = %e, "could not remove snapshot storage");
        return;
    }
    if let Err(e) = store
        .commit(
            vec![Mutation::DeleteSnapshot { id: id.to_string() }],
            sync_dirs,
        )
        .await
    {
        tracing::error!(snapshot_id = %id, error = %e, "could not remove a snapshot record");
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
    /// Whether the snapshot and clone capabilities are advertised: when any configured backend
    /// takes snapshots. CSI capabilities are plugin-wide, so a backend that cannot is refused
    /// per request (CreateSnapshot and content sources: INVALID_ARGUMENT) rather than switching
    /// the feature off for every backend.
    pub fn supports_snapshots(&self) -> bool {
        self.backends.values().any(|b| b.supports_snapshots())
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
        let source = match Self::parse_id_in("source_volume_id", &request.source_volume_id)? {
            Some(id) => id,
            None => return Err(Error::VolumeNotFound(request.source_volume_id)),
        };
        let name = request.name;
        let id = SnapshotId::for_source(&source, &name);
        // A repeat of a snapshot whose copy still runs in the background finds its record
        // without the keys that copy holds, so it answers (not ready yet) instead of ABORTED.
        if let Some(found) = self.snapshot_named(&name, &source)? {
            return Ok(found);
        }
        let guard = self.lock(vec![
            format!("snapname:{name}"),
            format!("snap:{id}"),
            format!("vol:{source}"),
        ])?;
        if let Some(found) = self.snapshot_named(&name, &source)? {
            return Ok(found);
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

        let (created_unix, created_nanos) = now();
        let mut record = SnapshotRecord {
            id: id.to_string(),
            name,
            source_volume_id: source.to_string(),
            backend: backend.name().to_string(),
            size_bytes: volume.capacity_bytes,
            created_unix,
            created_nanos,
            ready_to_use: true,
            mechanism: String::new(),
            group_snapshot_id: String::new(),
            metadata,
        };
        if backend.node_local() {
            // The copy reads the volume's tree, unbounded: look at it first, bounded, so a
            // dead filesystem over it answers UNAVAILABLE instead of holding a thread per retry
            // of the snapshotter.
            self.storage_exists(&backend, &source).await?;
        }
        let sync_dirs = backend.snapshot_sync_dirs();
        if self.copies_in_background(&backend, &source).await? {
            // Nothing can write to the source while this call holds its key, and the copy
            // keeps holding it, so the data the copy reads later is the data of now.
            record.ready_to_use = false;
            record.mechanism = crate::backend::Mechanism::Copy.name().to_string();
            self.store
                .commit(vec![Mutation::PutSnapshot(record.clone())], sync_dirs)
                .await?;
            let registration = self.copies.register(id.as_str());
            spawn_copy(
                self.store.clone(),
                backend,
                record.clone(),
                guard,
                registration,
            );
            return Ok(snapshot_from_record(&record));
        }

        let started = std::time::Instant::now();
        let (b, s, i) = (backend.clone(), source.clone(), id.clone());
        // Storage without a record is from an attempt that never answered: the backend
        // replaces it, so the snapshot's time is this call's.
        let mechanism = blocking(move || Ok(b.snapshot(&s, &i, Cancel::never())?)).await?;
        tracing::info!(snapshot_id = %id, source_volume_id = %source,
            mechanism = mechanism.name(), duration_ms = started.elapsed().as_millis() as u64,
            "snapshot taken");
        record.mechanism = mechanism.name().to_string();
        self.store
            .commit(vec![Mutation::PutSnapshot(record.clone())], sync_dirs)
            .await?;
        drop(guard);
        Ok(snapshot_from_record(&record))
    }

    /// The recorded snapshot called `name`, when it is of `source` (another source is
    /// ALREADY_EXISTS).
    fn snapshot_named(&self, name: &str, source: &VolumeId) -> Result<Option<Snapshot>> {
        let Some(existing) = self.store.snapshot_id_for_name(name)? else {
            return Ok(None);
        };
        let record = self.store.snapshot(&existing)?.ok_or_else(|| {
            Error::Internal(format!("snapshot name {name:?} maps to a missing record"))
        })?;
        if record.source_volume_id != source.as_str() {
            return Err(Error::SnapshotExists {
                name: name.to_string(),
                what: "source volume".into(),
            });
        }
        Ok(Some(snapshot_from_record(&record)))
    }

    /// Whether a snapshot of `source` is copied after CreateSnapshot answers: only a slow full
    /// copy (not instant, at least [`BACKGROUND_COPY_MIN_BYTES`] of data) of a source that is
    /// neither staged nor published on this node, which serves the node side, so the store
    /// knows every place it is in use. A staged or published source is copied before the
    /// answer (frozen where it is a loop filesystem): a pod may write to it at any time, and
    /// holding the volume's key for a long copy would stop the pod's node operations.
    /// Storage other nodes reach (shares) is never copied in the background, because this
    /// node cannot see whether another node has it mounted.
    async fn copies_in_background(
        &self,
        backend: &std::sync::Arc<dyn Backend>,
        source: &VolumeId,
    ) -> Result<bool> {
        if !backend.node_local()
            || !self.config.serves_node
            || !self.store.publications(source.as_str())?.is_empty()
        {
            return Ok(false);
        }
        let (b, s) = (backend.clone(), source.clone());
        blocking(move || {
            Ok(!b.snapshot_is_instant(&s) && b.usage(&s)?.used_bytes >= BACKGROUND_COPY_MIN_BYTES)
        })
        .await
    }

    /// DeleteSnapshot: unknown IDs are success (the spec's idempotency).
    pub async fn delete_snapshot(&self, raw_id: &str) -> Result<()> {
        let Some(id) = Self::parse_snapshot_id("snapshot_id", raw_id)? else {
            return Ok(());
        };
        if let Some(mut ended) = self.copies.cancel(id.as_str()) {
            tracing::info!(snapshot_id = %id, "DeleteSnapshot cancels the snapshot's background copy");
            // The copy removes what it made and the record, then lets go of the keys.
            if tokio::time::timeout(CANCEL_WAIT, ended.changed())
                .await
                .is_err()
            {
                return Err(Error::InProgress(format!(
                    "snap:{id} (its background copy is being cancelled)"
                )));
            }
        }
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
    pub(super) async fn resolve_source(
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
                let size_bytes = match self.store.snapshot(id.as_str())? {
                    // Its copy still runs (or must run again): the CO retries on ABORTED.
                    Some(record) if !record.ready_to_use => {
                        return Err(Error::InProgress(format!("snap:{id}")));
                    }
                    Some(record) => record.size_bytes,
                    // Not in this store: a snapshot kept on shared storage (taken by a
                    // controller with another state directory) is found through its ID. That
                    // may mount a share, so it runs on a blocking thread.
                    None => {
                        let Some(backend) = self.backends.get(id.backend()).cloned() else {
                            return Err(Error::SnapshotNotFound(raw.clone()));
                        };
                        let i = id.clone();
                        blocking(move || Ok(backend.stored_snapshot(&i)?))
                            .await?
                            .ok_or_else(|| Error::SnapshotNotFound(raw.clone()))?
                            .size_bytes
                    }
                };
                ResolvedSource {
                    lock_key: format!("snap:{id}"),
                    size_bytes,
                    snapshot: Some(id),
                    volume: None,
                }
            }
            VolumeSource::Volume(raw) => {
                if raw.is_empty() {
                    return Err(Error::Missing("volume_content_source.volume.volume_id"));
                }
                let id = Self::parse_id_in("volume_content_source.volume.volume_id", raw)?
                    .ok_or_else(|| Error::VolumeNotFound(raw.clone()))?;
                let record = self
                    .store
                    .volume(id.as_str())?
                    .ok_or_else(|| Error::VolumeNotFound(raw.clone()))?;
                // The clone reads the source's tree: a bounded look first, as for snapshots.
                if let Ok(source_backend) = self.backend_of(&id)
                    && source_backend.node_local()
                {
                    self.storage_exists(&source_backend, &id).await?;
                }
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
    ///
    /// A record that is not ready is a background copy a crash interrupted (its partial copy
    /// was just removed): its keys are taken here, before the server serves, and the copy
    /// starts again in the background; if its source volume is gone, the snapshot is removed.
    /// Must run inside the Tokio runtime (it spawns those tasks).
    pub fn recover_snapshots(&self) -> Result<()> {
        let records = self.store.all_snapshots()?;
        let recorded: BTreeSet<String> = records.iter().map(|s| s.id.clone()).collect();
        // A store without a single record next to a data directory with snapshots is not the
        // store those snapshots were made with (a lost or mistyped --state-dir, a state
        // directory on tmpfs after a reboot): their storage is reported, never removed.
        let fresh_store = records.is_empty() && self.store.list_volumes(0, 1)?.0.is_empty();
        for backend in self.backends.values() {
            backend.recover_snapshots()?;
            for id in backend.list_snapshots()? {
                if recorded.contains(id.as_str()) {
                    continue;
                }
                if fresh_store {
                    tracing::warn!(snapshot_id = %id,
                        "snapshot storage without a record, and the state store is empty: is \
                         --state-dir the store this data directory was used with? Keeping it");
                } else {
                    tracing::warn!(snapshot_id = %id,
                        "removing snapshot storage without a record (interrupted CreateSnapshot)");
                    backend.delete_snapshot(&id)?;
                }
            }
        }
        for record in records.into_iter().filter(|r| !r.ready_to_use) {
            self.resume_copy(record)?;
        }
        Ok(())
    }

    /// Restarts (or, without a source, discards) an interrupted background copy.
    fn resume_copy(&self, record: SnapshotRecord) -> Result<()> {
        let id = SnapshotId::parse(&record.id)
            .map_err(|e| Error::Internal(format!("stored snapshot ID: {e}")))?;
        let source = VolumeId::parse(&record.source_volume_id)
            .map_err(|e| Error::Internal(format!("stored source volume ID: {e}")))?;
        let guard = self.lock(vec![
            format!("snapname:{}", record.name),
            format!("snap:{id}"),
            format!("vol:{source}"),
        ])?;
        let backend = self.backends.get(id.backend()).cloned();
        let source_alive = match &backend {
            Some(b) => self.store.volume(source.as_str())?.is_some() && b.exists(&source)?,
            None => false,
        };
        match backend {
            Some(backend) if source_alive => {
                tracing::warn!(snapshot_id = %id, source_volume_id = %source,
                    "copying a snapshot again: its background copy was interrupted");
                let registration = self.copies.register(id.as_str());
                spawn_copy(self.store.clone(), backend, record, guard, registration);
            }
            Some(backend) => {
                tracing::warn!(snapshot_id = %id, source_volume_id = %source,
                    "removing a snapshot whose copy was interrupted and whose source is gone");
                let store = self.store.clone();
                tokio::spawn(async move {
                    let _guard = guard;
                    discard_snapshot(&store, backend, id).await;
                });
            }
            None => {
                // A backend no longer configured: its storage cannot be reached from here.
                tracing::warn!(snapshot_id = %id,
                    "removing the record of an interrupted snapshot of an unconfigured backend");
                let store = self.store.clone();
                tokio::spawn(async move {
                    let _guard = guard;
                    let _ = store
                        .commit(
                            vec![Mutation::DeleteSnapshot { id: id.to_string() }],
                            vec![],
                        )
                        .await;
                });
            }
        }
        Ok(())
    }

    /// CreateVolumeGroupSnapshot.
    pub async fn create_group_snapshot(
        &self,
        name: &str,
        source_volume_ids: &[String],
        parameters: &BTreeMap<String, String>,
    ) -> Result<GroupSnapshot> {
        super::ids::check_name(name).map_err(|reason| Error::invalid("name", reason))?;
        if source_volume_ids.is_empty() {
            return Err(Error::Missing("source_volume_ids"));
        }
        params::check_map("parameters", parameters)?;
        if let Some(key) = parameters
            .keys()
            .find(|k| !k.starts_with("csi.storage.k8s.io/volumegroupsnapshot"))
        {
            return Err(Error::UnknownParameter(key.clone()));
        }
        let mut sources = Vec::new();
        for raw in source_volume_ids {
            let id = Self::parse_id_in("source_volume_ids", raw)?
                .ok_or_else(|| Error::VolumeNotFound(raw.clone()))?;
            if !sources.contains(&id) {
                sources.push(id);
            }
        }
        sources.sort();
        let group_id = group_id_for_name(name);
        let members: Vec<(VolumeId, SnapshotId)> = sources
            .iter()
            .map(|v| {
                (
                    v.clone(),
                    SnapshotId::for_source(v, &format!("{group_id}/{v}")),
                )
            })
            .collect();
        let mut keys = vec![format!("groupname:{name}"), format!("group:{group_id}")];
        for (v, s) in &members {
            keys.push(format!("vol:{v}"));
            keys.push(format!("snap:{s}"));
        }
        let _guard = self.lock(keys)?;

        let existing = self.group_members(&group_id)?;
        if !existing.is_empty() {
            let mut recorded: Vec<&str> = existing
                .iter()
                .map(|r| r.source_volume_id.as_str())
                .collect();
            recorded.sort();
            let wanted: Vec<&str> = sources.iter().map(|v| v.as_str()).collect();
            if recorded != wanted {
                return Err(Error::SnapshotExists {
                    name: name.to_string(),
                    what: "set of source volumes (volume group snapshot)".into(),
                });
            }
            return Ok(group_from_records(&group_id, &existing));
        }
        let mut volumes = Vec::new();
        for (v, _) in &members {
            let record = self
                .store
                .volume(v.as_str())?
                .ok_or_else(|| Error::VolumeNotFound(v.to_string()))?;
            volumes.push((record, self.backend_of(v)?));
        }

        let (created_unix, created_nanos) = now();
        let work: Vec<_> = members
            .iter()
            .zip(&volumes)
            .map(|((v, s), (_, b))| (v.clone(), s.clone(), b.clone()))
            .collect();
        let started = std::time::Instant::now();
        let mechanisms = blocking(move || {
            // Freeze every member first; guards thaw (in reverse) when dropped, also on error.
            let mut frozen = Vec::new();
            for (v, _, b) in &work {
                frozen.push(b.quiesce(v)?);
            }
            let mut made: Vec<(SnapshotId, std::sync::Arc<dyn crate::backend::Backend>)> =
                Vec::new();
            let mut mechanisms = Vec::new();
            for (v, s, b) in &work {
                match b.snapshot_quiesced(v, s) {
                    Ok(m) => {
                        made.push((s.clone(), b.clone()));
                        mechanisms.push(m);
                    }
                    Err(e) => {
                        drop(frozen);
                        for (s, b) in made {
                            let _ = b.delete_snapshot(&s);
                        }
                        return Err(e.into());
                    }
                }
            }
            drop(frozen);
            Ok(mechanisms)
        })
        .await?;
        tracing::info!(group_snapshot_id = %group_id, members = members.len(),
            duration_ms = started.elapsed().as_millis() as u64, "volume group snapshot taken");
        let mut sync_dirs = Vec::new();
        let mut mutations = Vec::new();
        let mut records = Vec::new();
        for (((v, s), (volume, backend)), mechanism) in
            members.iter().zip(&volumes).zip(&mechanisms)
        {
            sync_dirs.extend(backend.snapshot_sync_dirs());
            let record = SnapshotRecord {
                id: s.to_string(),
                name: format!("{group_id}/{v}"),
                source_volume_id: v.to_string(),
                backend: backend.name().to_string(),
                size_bytes: volume.capacity_bytes,
                created_unix,
                created_nanos,
                ready_to_use: true,
                mechanism: mechanism.name().to_string(),
                group_snapshot_id: group_id.clone(),
                metadata: parameters.clone(),
            };
            mutations.push(Mutation::PutSnapshot(record.clone()));
            records.push(record);
        }
        sync_dirs.sort();
        sync_dirs.dedup();
        // All members become visible together, or none (one transaction).
        self.store.commit(mutations, sync_dirs).await?;
        Ok(group_from_records(&group_id, &records))
    }

    fn group_members(&self, group_id: &str) -> Result<Vec<SnapshotRecord>> {
        Ok(self
            .store
            .list_snapshots("", usize::MAX, |r| r.group_snapshot_id == group_id)?
            .0)
    }

    /// Checks a group snapshot ID and the member snapshot IDs a request lists against the
    /// recorded members (a mismatch is INVALID_ARGUMENT, as the spec suggests).
    fn group_of_request(
        &self,
        raw_id: &str,
        snapshot_ids: &[String],
    ) -> Result<Option<(String, Vec<SnapshotRecord>)>> {
        if raw_id.is_empty() {
            return Err(Error::Missing("group_snapshot_id"));
        }
        if raw_id.len() > super::ids::MAX_NAME_BYTES || raw_id.chars().any(char::is_control) {
            return Err(Error::invalid("group_snapshot_id", "is malformed"));
        }
        if !is_group_id(raw_id) {
            return Ok(None);
        }
        let members = self.group_members(raw_id)?;
        if members.is_empty() {
            return Ok(None);
        }
        if !snapshot_ids.is_empty() {
            let mut listed: Vec<&str> = snapshot_ids.iter().map(String::as_str).collect();
            listed.sort();
            listed.dedup();
            let mut recorded: Vec<&str> = members.iter().map(|r| r.id.as_str()).collect();
            recorded.sort();
            if listed != recorded {
                return Err(Error::invalid(
                    "snapshot_ids",
                    format!("do not match the members of group snapshot {raw_id}"),
                ));
            }
        }
        Ok(Some((raw_id.to_string(), members)))
    }

    /// GetVolumeGroupSnapshot.
    pub fn get_group_snapshot(
        &self,
        raw_id: &str,
        snapshot_ids: &[String],
    ) -> Result<GroupSnapshot> {
        let (id, members) = self
            .group_of_request(raw_id, snapshot_ids)?
            .ok_or_else(|| {
                Error::NotFound(format!("volume group snapshot {raw_id} does not exist"))
            })?;
        Ok(group_from_records(&id, &members))
    }

    /// DeleteVolumeGroupSnapshot: removes every member; unknown IDs are success.
    pub async fn delete_group_snapshot(&self, raw_id: &str, snapshot_ids: &[String]) -> Result<()> {
        let Some((id, members)) = self.group_of_request(raw_id, snapshot_ids)? else {
            return Ok(());
        };
        let mut keys = vec![format!("group:{id}")];
        keys.extend(members.iter().map(|m| format!("snap:{}", m.id)));
        let _guard = self.lock(keys)?;
        let mut sync_dirs = Vec::new();
        let mut mutations = Vec::new();
        for member in &members {
            let Ok(sid) = SnapshotId::parse(&member.id) else {
                continue;
            };
            if let Some(backend) = self.backends.get(sid.backend()).cloned() {
                sync_dirs.extend(backend.snapshot_sync_dirs());
                blocking(move || Ok(backend.delete_snapshot(&sid)?)).await?;
            }
            mutations.push(Mutation::DeleteSnapshot {
                id: member.id.clone(),
            });
        }
        sync_dirs.sort();
        sync_dirs.dedup();
        self.store.commit(mutations, sync_dirs).await?;
        Ok(())
    }
}

const GROUP_PREFIX: &str = "group-";

/// `group-` + 32 hex digits of the name's SHA-256.
fn group_id_for_name(name: &str) -> String {
    let volume_shaped = VolumeId::for_name("x", name);
    format!("{GROUP_PREFIX}{}", &volume_shaped.as_str()[2..])
}

fn is_group_id(raw: &str) -> bool {
    raw.strip_prefix(GROUP_PREFIX).is_some_and(|digits| {
        digits.len() == 32
            && digits
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

fn group_from_records(id: &str, records: &[SnapshotRecord]) -> GroupSnapshot {
    let first = records.first();
    GroupSnapshot {
        id: id.to_string(),
        members: records.iter().map(snapshot_from_record).collect(),
        created_unix: first.map(|r| r.created_unix).unwrap_or_default(),
        created_nanos: first.map(|r| r.created_nanos).unwrap_or_default(),
        ready_to_use: records.iter().all(|r| r.ready_to_use),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_ids_are_derived_and_checked() {
        let id = group_id_for_name("g1");
        assert_eq!(id, group_id_for_name("g1"));
        assert_ne!(id, group_id_for_name("g2"));
        assert!(is_group_id(&id), "{id}");
        assert!(!is_group_id("group-../../etc"));
        assert!(!is_group_id(&format!("{id}0")));
    }
}
