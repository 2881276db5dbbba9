//! The volume engine: the CSI semantics, independent of gRPC.
//!
//! It owns the rules the spec spells out: idempotent create and delete keyed by name and ID,
//! ALREADY_EXISTS for incompatible repeats, ABORTED (via [`Error::InProgress`]) for concurrent
//! operations on one volume, durable records before replies, capability checks and topology.
//! Storage work is delegated to a [`Backend`], mounts to a [`Mounter`], metadata to the
//! [`Store`].

mod copies;
pub mod error;
pub mod ids;
pub mod locks;
mod node;
pub mod params;
mod reconcile;
mod snapshots;
pub mod types;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub use error::{Error, Result};
pub use reconcile::ReconcileReport;

use crate::backend::{Backend, VolumeOptions};
use crate::mount::{Hung, MountError, Mounter, Probes};
use crate::store::{Mutation, Store, VolumeRecord};
use ids::{IdError, VolumeId};
use locks::{InFlight, InFlightGuard};
use types::*;

/// Volume context key saying how the volume's size is enforced (`btrfs-qgroup`, `none`).
pub const CONTEXT_ENFORCEMENT: &str = "k8scsi.io/capacity-enforcement";
/// Volume context key naming a shared volume's share (`nfs server:/export`); informational,
/// the node reads the share from the volume ID.
pub const CONTEXT_SHARE: &str = "k8scsi.io/share";

/// What the engine needs to know about its node and deployment.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub node_id: String,
    pub topology_key: String,
    pub max_volumes_per_node: u64,
    /// The only tree where staging and target paths may live.
    pub kubelet_dir: PathBuf,
    /// Whether this process also serves the node side, so it knows publications.
    pub serves_node: bool,
    /// How long an inspection or unmount of a publish target may block (on a dead network
    /// filesystem) before the target is detached lazily instead.
    pub mount_timeout: std::time::Duration,
}

/// The volume engine. Cheap to share behind an `Arc`.
pub struct Engine {
    config: EngineConfig,
    store: Store,
    /// Configured backends by name; a volume ID's prefix names its backend.
    backends: BTreeMap<&'static str, Arc<dyn Backend>>,
    mounter: Arc<dyn Mounter>,
    in_flight: Arc<InFlight>,
    /// Bounded calls on volume and target paths; remembers which ones hang.
    probes: Arc<Probes>,
    /// Snapshot copies running in the background, which DeleteSnapshot cancels.
    copies: Arc<copies::BackgroundCopies>,
}

/// Runs blocking filesystem work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
}

impl Engine {
    pub fn new(
        config: EngineConfig,
        store: Store,
        backends: Vec<Arc<dyn Backend>>,
        mounter: Arc<dyn Mounter>,
    ) -> Engine {
        Engine {
            config,
            store,
            backends: backends.into_iter().map(|b| (b.name(), b)).collect(),
            mounter,
            in_flight: Arc::new(InFlight::default()),
            probes: Arc::new(Probes::default()),
            copies: Arc::default(),
        }
    }

    /// Stops the snapshot copies running in the background, keeping their snapshots for the
    /// next start (see [`copies`]); called at shutdown.
    pub fn stop_background_copies(&self) {
        self.copies.stop_all();
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Deleted storage waiting for background removal over all backends, and of that what
    /// was given up on until restart.
    pub fn trash_backlog(&self) -> (usize, usize) {
        self.backends
            .values()
            .map(|b| b.trash_backlog())
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
    }

    /// The bounded-call registry: which volume and target paths hang.
    pub fn probes(&self) -> &Arc<Probes> {
        &self.probes
    }

    /// Runs `work` (which touches `path`) off the async threads, waiting at most the mount
    /// timeout; a call on a path that is still hung from before is not started again.
    async fn bounded<T: Send + 'static>(
        &self,
        op: &'static str,
        path: PathBuf,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::result::Result<T, MountError>> {
        let (probes, timeout) = (self.probes.clone(), self.config.mount_timeout);
        blocking(move || {
            let key = path.to_string_lossy().into_owned();
            Ok(probes
                .run(&key, timeout, work)
                .map_err(|hung| hung.error(op, path, timeout)))
        })
        .await
    }

    /// The backend a StorageClass names.
    fn backend_named(&self, name: &str) -> Result<Arc<dyn Backend>> {
        self.backends.get(name).cloned().ok_or_else(|| {
            Error::invalid(
                "parameters",
                format!(
                    "type {name:?} is not served by this node (configured: {})",
                    self.backends.keys().copied().collect::<Vec<_>>().join(", ")
                ),
            )
        })
    }

    /// The backend holding a volume; IDs of backends this process does not serve are unknown.
    fn backend_of(&self, id: &VolumeId) -> Result<Arc<dyn Backend>> {
        self.backends
            .get(id.backend())
            .cloned()
            .ok_or_else(|| Error::VolumeNotFound(id.to_string()))
    }

    fn lock(&self, keys: Vec<String>) -> Result<InFlightGuard> {
        self.in_flight.try_acquire(keys).map_err(Error::InProgress)
    }

    /// This node's topology segment.
    pub fn topology(&self) -> Segment {
        BTreeMap::from([(
            self.config.topology_key.clone(),
            self.config.node_id.clone(),
        )])
    }

    /// Whether a segment names this node (keys we do not know do not disqualify it: the CO may
    /// add its own, such as the standard hostname label).
    fn segment_is_local(&self, segment: &Segment) -> bool {
        segment.get(&self.config.topology_key) == Some(&self.config.node_id)
    }

    /// Whether the store and every backend's data directory are usable.
    pub fn ready(&self) -> bool {
        self.store.next_sequence().is_ok() && self.backends.values().all(|b| b.capacity().is_ok())
    }

    fn volume_from_record(&self, record: &VolumeRecord) -> Result<Volume> {
        let id = VolumeId::parse(&record.id)
            .map_err(|e| Error::Internal(format!("stored volume ID: {e}")))?;
        let enforcement = match record.enforcement.as_str() {
            "" => "none",
            other => other,
        };
        let mut context =
            BTreeMap::from([(CONTEXT_ENFORCEMENT.to_string(), enforcement.to_string())]);
        if let Some(share) = crate::backend::shared::SharedBackend::describe(&id) {
            context.insert(CONTEXT_SHARE.to_string(), share);
        }
        let node_local = self.backend_of(&id).map_or(true, |b| b.node_local());
        Ok(Volume {
            id,
            capacity_bytes: record.capacity_bytes,
            context,
            // Storage every node reaches has no topology: CSI reads that as "equally accessible
            // from all nodes".
            accessible_topology: if node_local {
                vec![BTreeMap::from([(
                    self.config.topology_key.clone(),
                    record.accessible_node.clone(),
                )])]
            } else {
                vec![]
            },
            content_source: if !record.source_snapshot_id.is_empty() {
                Some(VolumeSource::Snapshot(record.source_snapshot_id.clone()))
            } else if !record.source_volume_id.is_empty() {
                Some(VolumeSource::Volume(record.source_volume_id.clone()))
            } else {
                None
            },
        })
    }

    /// Parses a volume ID from a request's `volume_id`. Malformed IDs (oversized, control
    /// characters) are refused; well-formed IDs we could never have issued are "not found".
    fn parse_id(raw: &str) -> Result<Option<VolumeId>> {
        Self::parse_id_in("volume_id", raw)
    }

    /// [`Engine::parse_id`] of a volume ID carried in the request field `field` (named in
    /// INVALID_ARGUMENT), e.g. `source_volume_id`.
    fn parse_id_in(field: &'static str, raw: &str) -> Result<Option<VolumeId>> {
        if raw.is_empty() {
            return Err(Error::Missing(field));
        }
        match VolumeId::parse(raw) {
            Ok(id) => Ok(Some(id)),
            Err(IdError::Foreign(_)) => Ok(None),
            Err(IdError::Malformed(reason)) => Err(Error::invalid(field, reason)),
        }
    }

    /// Parses an ID that must refer to an existing volume.
    fn existing_id(raw: &str) -> Result<VolumeId> {
        Self::parse_id(raw)?.ok_or_else(|| Error::VolumeNotFound(raw.to_string()))
    }

    // ----- Controller -----

    /// CreateVolume.
    pub async fn create_volume(&self, request: CreateVolume) -> Result<Volume> {
        ids::check_name(&request.name).map_err(|reason| Error::invalid("name", reason))?;
        if request.capabilities.is_empty() {
            return Err(Error::Missing("volume_capabilities"));
        }
        let params = params::parse(&request.parameters)?;
        let backend = self.backend_named(&params.backend)?;
        for capability in &request.capabilities {
            backend
                .check_capability(capability)
                .map_err(|reason| Error::invalid("volume_capabilities", reason))?;
        }
        let mut capacity = resolve_capacity(request.capacity)?;
        // A repeat for a volume that exists is answered from its record: its content source
        // may be gone by now (a snapshot deleted after the restore), and only has to be the
        // recorded one (compared below). Only a new volume needs its source resolved.
        let exists = self.store.volume_id_for_name(&request.name)?.is_some();
        let source = match &request.content_source {
            Some(source) if !exists => {
                let resolved = self
                    .resolve_source(source, &params.backend, request.capacity.limit_bytes)
                    .await?;
                // A restored volume is at least as large as its source, grown when asked for
                // more (OUT_OF_RANGE when the limit is smaller, in resolve_source).
                capacity = capacity.max(resolved.size_bytes);
                Some(resolved)
            }
            _ => None,
        };
        if capacity == 0 {
            // No size asked for (no range, or a restore of a source without one): the size
            // the backend gives such a volume (a loop image's 1 GiB), so that the record, the
            // answer, snapshots, restores and expansion all know the real size. A range with
            // only a limit took the limit above, never more than the CO allows.
            capacity = backend.default_volume_bytes();
        }
        // A volume may be larger than required, never larger than the limit: a request below
        // the smallest volume of its kind grows to it, or is out of range.
        let options = volume_options(&request, &params)?;
        let smallest = backend.smallest_volume_bytes(&options);
        if capacity < smallest {
            let limit = request.capacity.limit_bytes;
            if limit > 0 && limit < smallest {
                return Err(Error::CapacityOutOfRange(format!(
                    "the smallest volume of this kind is {smallest} bytes, above limit_bytes \
                     {limit}"
                )));
            }
            capacity = smallest;
        }
        // Refused only for a new volume (below): a repeat is answered from the record, which
        // may predate rounding.
        let rounded = round_to_unit(capacity, backend.size_unit(), request.capacity.limit_bytes);
        let mount_flags = mount_flags_of(&request.capabilities);
        if let Some(topology) = &request.topology
            && backend.node_local()
        {
            let local_ok = if topology.requisite.is_empty() {
                // Only preferences: any node is acceptable, and ours is the only one we have.
                true
            } else {
                topology.requisite.iter().any(|s| self.segment_is_local(s))
            };
            if !local_ok {
                return Err(Error::Exhausted(format!(
                    "cannot provision in the requested topology: this controller only provisions \
                     on node {:?} ({}={})",
                    self.config.node_id, self.config.topology_key, self.config.node_id
                )));
            }
        }

        let name = request.name.clone();
        let new_id = backend.volume_id(&name, &params.defining, &mount_flags)?;
        let mut keys = vec![format!("name:{name}"), format!("vol:{new_id}")];
        if let Some(source) = &source {
            keys.push(source.lock_key.clone());
        }
        let _guard = self.lock(keys)?;

        if let Some(existing_id) = self.store.volume_id_for_name(&name)? {
            let record = self
                .store
                .volume(&existing_id)?
                .ok_or_else(|| Error::Internal(format!("name {name:?} maps to missing record")))?;
            check_compatible(&record, &params.defining, &request)?;
            if self.volume_from_record(&record)?.content_source != request.content_source {
                return Err(Error::AlreadyExists {
                    name: record.name.clone(),
                    what: "content source".into(),
                });
            }
            // The share's mount flags are part of a shared volume's ID (the parameters were
            // compared above): other flags would be another volume.
            if record.id != new_id.as_str() {
                return Err(Error::AlreadyExists {
                    name: record.name.clone(),
                    what: "set of mount flags".into(),
                });
            }
            let id = VolumeId::parse(&record.id)
                .map_err(|e| Error::Internal(format!("stored volume ID: {e}")))?;
            let backend = self.backend_of(&id)?;
            // Block or filesystem, and which filesystem, as the volume's storage says.
            if let Err(reason) = self
                .check_volume_capabilities(&backend, &id, &request.capabilities)
                .await?
            {
                return Err(Error::AlreadyExists {
                    name: record.name.clone(),
                    what: format!("volume capability ({reason})"),
                });
            }
            // Bounded: a retry must not block a request thread on a hung filesystem over the
            // volume's storage (it answers UNAVAILABLE, and the CO retries).
            if !self.storage_exists(&backend, &id).await? {
                // A DeleteVolume was interrupted after removing the storage; the volume still
                // exists as far as the CO knows, so give it back its (empty) storage.
                tracing::warn!(volume_id = %id, "recreating missing storage of an existing volume");
                let sync_dirs = backend.sync_dirs();
                let id2 = id.clone();
                let options = VolumeOptions {
                    capacity_bytes: record.capacity_bytes,
                    require_enforcement: record.enforcement != "none"
                        && !record.enforcement.is_empty(),
                    ..options
                };
                blocking(move || Ok(backend.create(&id2, &options)?)).await?;
                self.store.commit(vec![], sync_dirs).await?;
            }
            return self.volume_from_record(&record);
        }
        if exists && request.content_source.is_some() {
            // Deleted between the look-up above and the lock, so its source was not resolved
            // (nor locked): the CO's retry creates it anew.
            return Err(Error::InProgress(format!("name:{name}")));
        }
        let capacity = rounded?;

        let sync_dirs = backend.sync_dirs();
        let id = new_id.clone();
        let options = VolumeOptions {
            capacity_bytes: capacity,
            ..options
        };
        let (mut source_snapshot_id, mut source_volume_id, mut populated_by) =
            (String::new(), String::new(), String::new());
        let enforcement = match &source {
            None => {
                let intent = self.store.intent();
                let inline = backend.creates_inline();
                let (p, f) = (params.defining.clone(), mount_flags.clone());
                // One trip to the blocking pool for the space check and the creation: a
                // share's space is only known after mounting it.
                let create = move || {
                    check_room(capacity, &backend.capacity_for(&p, &f)?)?;
                    Ok(backend.create(&id, &options)?)
                };
                // A plain directory is made right here: a trip to a worker thread and back
                // costs more than the mkdir.
                let enforcement = if inline {
                    create()?
                } else {
                    blocking(create).await?
                };
                (Some(intent), enforcement)
            }
            Some(source) => {
                let started = std::time::Instant::now();
                let snapshot = source.snapshot.clone();
                let volume = source.volume.clone();
                let b = backend.clone();
                let (p, f) = (params.defining.clone(), mount_flags.clone());
                let (enforcement, mechanism) = blocking(move || {
                    check_room(capacity, &b.capacity_for(&p, &f)?)?;
                    // Storage without a record is from an attempt that never answered and may
                    // be partly copied: start over (whatever the volume's retention policy:
                    // nobody has used it).
                    if b.exists(&id)? {
                        b.discard(&id)?;
                    }
                    let content = match (&snapshot, &volume) {
                        (Some(s), _) => crate::backend::ContentSource::Snapshot(s),
                        (None, Some(v)) => crate::backend::ContentSource::Volume(v),
                        (None, None) => unreachable!("resolved sources name one"),
                    };
                    Ok(b.create_from(&id, content, &options)?)
                })
                .await?;
                tracing::info!(volume_id = %new_id, source = ?source.content(),
                    mechanism = mechanism.name(), duration_ms = started.elapsed().as_millis() as u64,
                    "volume populated from its content source");
                source_snapshot_id = source
                    .snapshot
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                source_volume_id = source
                    .volume
                    .as_ref()
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                populated_by = mechanism.name().to_string();
                (None, enforcement)
            }
        };
        let (intent, enforcement) = enforcement;
        if enforcement == crate::backend::Enforcement::None {
            // The StorageClass asked for this (enforceCapacity: "false") and start-up already
            // warned that this node cannot enforce sizes: a warning per volume would only bury
            // other warnings under thousands of identical lines.
            tracing::debug!(volume_id = %new_id, capacity, "volume size is recorded but not enforced");
        }
        let record = VolumeRecord {
            id: new_id.to_string(),
            name,
            seq: 0,
            backend: params.backend.clone(),
            capacity_bytes: capacity,
            parameters: params.defining,
            access_modes: request
                .capabilities
                .iter()
                .map(|c| c.access_mode.name().to_string())
                .collect(),
            accessible_node: self.config.node_id.clone(),
            enforcement: enforcement.name().to_string(),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
            metadata: params.metadata,
            source_snapshot_id,
            source_volume_id,
            populated_by,
        };
        // The directory entry and the record become durable in the same group commit.
        let mutations = vec![Mutation::PutVolume(record.clone())];
        match intent {
            Some(intent) => intent.commit(mutations, sync_dirs).await?,
            None => self.store.commit(mutations, sync_dirs).await?,
        }
        self.volume_from_record(&record)
    }

    /// ControllerExpandVolume: grows the volume to the range's required (else limit) bytes and
    /// returns the new capacity. Shrinking is refused. A capability, when given, must be what
    /// the volume is (INVALID_ARGUMENT, "exceeds capabilities", otherwise).
    pub async fn expand_volume(
        &self,
        raw_id: &str,
        range: CapacityRange,
        capability: Option<Capability>,
    ) -> Result<(u64, bool)> {
        let id = Self::existing_id(raw_id)?;
        let requested = resolve_capacity(range)?;
        if requested == 0 {
            return Err(Error::Missing("capacity_range"));
        }
        let backend = self.backend_of(&id)?;
        if let Some(capability) = &capability {
            backend
                .check_capability(capability)
                .map_err(|reason| Error::invalid("volume_capability", reason))?;
        }
        // In the backend's unit, as at creation; a repeat asking for the same size finds it
        // equal to the record.
        let rounded = round_to_unit(requested, backend.size_unit(), range.limit_bytes);
        let _guard = self.lock(vec![format!("vol:{id}")])?;
        let mut record = self
            .store
            .volume(id.as_str())?
            .ok_or_else(|| Error::VolumeNotFound(raw_id.to_string()))?;
        // A record from before sizes were rounded may hold exactly the size asked for: that is
        // the same expansion again, whatever the rounding says.
        let requested = if requested == record.capacity_bytes {
            requested
        } else {
            rounded?
        };
        // Already at least the size asked for: the spec's "SHOULD reply 0 OK", with the size it
        // has. Only a limit below that size cannot be met, since volumes never shrink.
        if range.limit_bytes > 0 && range.limit_bytes < record.capacity_bytes {
            return Err(Error::CapacityOutOfRange(format!(
                "volume {id} is {} bytes, above limit_bytes {}; shrinking is not supported",
                record.capacity_bytes, range.limit_bytes
            )));
        }
        let requested = requested.max(record.capacity_bytes);
        // Block or filesystem, and which filesystem, as the volume's storage says: a volume
        // the CO takes for another kind is not to be grown as if it were.
        if let Some(capability) = &capability {
            self.require_volume_capability(&backend, &id, capability)
                .await?;
        }
        let node_required = backend.node_expansion_required();
        if requested == record.capacity_bytes {
            // A repeated expansion that already happened.
            return Ok((requested, node_required));
        }
        let fs = {
            let (b, i) = (backend.clone(), id.clone());
            blocking(move || Ok(b.capacity_of(&i)?)).await?
        };
        // Larger than the whole filesystem can never fit, as for CreateVolume: the CO must fix
        // the range (OUT_OF_RANGE), where RESOURCE_EXHAUSTED would have it retry for ever.
        if requested > fs.total_bytes {
            return Err(Error::CapacityOutOfRange(format!(
                "requested {requested} bytes for volume {id} is larger than the whole \
                 filesystem it grows in ({} bytes)",
                fs.total_bytes
            )));
        }
        let growth = requested - record.capacity_bytes;
        if growth > fs.available_bytes {
            return Err(Error::Exhausted(format!(
                "growing volume {id} by {growth} bytes but only {} bytes are available",
                fs.available_bytes
            )));
        }
        let id2 = id.clone();
        blocking(move || Ok(backend.expand(&id2, requested)?)).await?;
        record.capacity_bytes = requested;
        self.store
            .commit(vec![Mutation::PutVolume(record)], vec![])
            .await?;
        Ok((requested, node_required))
    }

    /// DeleteVolume. Deleting what does not exist succeeds.
    pub async fn delete_volume(&self, raw_id: &str) -> Result<()> {
        let Some(id) = Self::parse_id(raw_id)? else {
            return Ok(());
        };
        // A volume of a backend this process does not serve cannot exist here.
        let Some(backend) = self.backends.get(id.backend()).cloned() else {
            return Ok(());
        };
        let _guard = self.lock(vec![format!("vol:{id}")])?;
        let publications = self.store.publications(id.as_str())?;
        if let Some(path) = publications.keys().next() {
            return Err(Error::Precondition(format!(
                "volume {id} is still published at {path}; unpublish it first"
            )));
        }
        let record = self.store.volume(id.as_str())?;
        let intent = self.store.intent();
        let sync_dirs = backend.sync_dirs();
        let id2 = id.clone();
        // Storage first, record second: a crash in between leaves a record whose storage is
        // gone, and the retried DeleteVolume finishes the job.
        let path = backend.volume_path(&id);
        match backend.delete_inline(&id) {
            // Where the backend can, one rename moves the storage out of the way on this
            // thread (it never looks inside the volume, so it cannot hang on it).
            Some(result) => result?,
            // Removing a tree on a dead filesystem blocks for ever: bounded (with room for a
            // backend's own mount timeout), keyed like every other look at the volume's
            // storage. An abandoned removal goes on in the background; retries answer
            // UNAVAILABLE at once until it returns, then finish the job like the retry after a
            // crash.
            None => {
                let (probes, timeout) = (self.probes.clone(), self.config.mount_timeout * 2);
                blocking(move || {
                    let key = path.to_string_lossy().into_owned();
                    match probes.run(&key, timeout, move || backend.delete(&id2)) {
                        Ok(result) => Ok(result?),
                        Err(hung) => Err(hung.error("remove", path, timeout).into()),
                    }
                })
                .await?;
            }
        }
        let mutations = match record {
            Some(_) => vec![Mutation::DeleteVolume { id: id.to_string() }],
            None => vec![],
        };
        intent.commit(mutations, sync_dirs).await?;
        Ok(())
    }

    /// Whether the storage of each record exists, each check bounded by the mount timeout on
    /// one worker thread (a hung volume costs one timeout once, then is skipped while its
    /// check stays blocked), so one dead filesystem cannot stall a whole ListVolumes.
    fn check_storage(&self, records: &[VolumeRecord]) -> Result<Vec<StorageCheck>> {
        let mut items = Vec::with_capacity(records.len());
        for record in records {
            let id = VolumeId::parse(&record.id)
                .map_err(|e| Error::Internal(format!("stored volume ID: {e}")))?;
            let backend = self.backend_of(&id)?;
            let key = backend.volume_path(&id).to_string_lossy().into_owned();
            items.push((key, (backend, id)));
        }
        Ok(self.probes.run_each(
            items,
            self.config.mount_timeout,
            Arc::new(|(backend, id): (Arc<dyn Backend>, VolumeId)| {
                backend.exists(&id).map_err(|e| e.to_string())
            }),
        ))
    }

    fn status_of(&self, record: &VolumeRecord, exists: StorageCheck) -> Result<VolumeStatus> {
        let id = VolumeId::parse(&record.id)
            .map_err(|e| Error::Internal(format!("stored volume ID: {e}")))?;
        let published = !self.store.publications(&record.id)?.is_empty();
        let backend = self.backend_of(&id)?;
        let timeout = self.config.mount_timeout;
        let exists = match exists {
            Ok(result) => result,
            Err(Hung::TimedOut) => Err(format!(
                "{} did not answer within {timeout:?} (hung filesystem?)",
                backend.volume_path(&id).display()
            )),
            Err(Hung::Still) => Err(format!(
                "{} has not answered for over {timeout:?} (hung filesystem?)",
                backend.volume_path(&id).display()
            )),
        };
        let condition = match exists {
            Ok(true) if !backend.can_enforce_capacity() && !backend.node_local() => Condition {
                abnormal: false,
                message: "volume is healthy; its capacity is recorded, not enforced (shared \
                          filesystem)"
                    .to_string(),
            },
            Ok(true) => Condition::healthy(),
            Ok(false) => Condition::abnormal(format!(
                "backing storage {} is missing",
                backend.volume_path(&id).display()
            )),
            // One unreachable share must not fail a whole ListVolumes.
            Err(e) => Condition::abnormal(format!("cannot check the backing storage: {e}")),
        };
        Ok(VolumeStatus {
            published_node_ids: if published {
                vec![self.config.node_id.clone()]
            } else {
                vec![]
            },
            condition,
        })
    }

    /// ControllerGetVolume.
    pub fn get_volume(&self, raw_id: &str) -> Result<(Volume, VolumeStatus)> {
        let id = Self::existing_id(raw_id)?;
        let record = self
            .store
            .volume(id.as_str())?
            .ok_or_else(|| Error::VolumeNotFound(raw_id.to_string()))?;
        let exists = self
            .check_storage(std::slice::from_ref(&record))?
            .pop()
            .unwrap_or(Err(Hung::TimedOut));
        Ok((
            self.volume_from_record(&record)?,
            self.status_of(&record, exists)?,
        ))
    }

    /// ListVolumes. Tokens are creation sequence numbers, so they survive concurrent creates
    /// (new volumes sort last) and deletes (a missing number is simply skipped).
    pub fn list_volumes(&self, max_entries: usize, starting_token: &str) -> Result<VolumePage> {
        let from = if starting_token.is_empty() {
            0
        } else {
            let next = self.store.next_sequence()?;
            match starting_token.parse::<u64>() {
                Ok(seq) if seq >= 1 && seq < next => seq,
                _ => return Err(Error::BadToken(starting_token.to_string())),
            }
        };
        let max = if max_entries == 0 {
            usize::MAX
        } else {
            max_entries
        };
        let (records, next) = self.store.list_volumes(from, max)?;
        let mut entries = Vec::with_capacity(records.len());
        let checked = self.check_storage(&records)?;
        for (record, exists) in records.iter().zip(checked) {
            entries.push((
                self.volume_from_record(record)?,
                self.status_of(record, exists)?,
            ));
        }
        Ok(VolumePage {
            entries,
            next_token: next.map(|n| n.to_string()),
        })
    }

    /// Whether the existing volume `id` is what each capability asks for (see
    /// [`Backend::check_volume_capability`]); `Ok(Err(reason))` when not. Bounded: it looks
    /// at the volume's storage.
    async fn check_volume_capabilities(
        &self,
        backend: &Arc<dyn Backend>,
        id: &VolumeId,
        capabilities: &[Capability],
    ) -> Result<std::result::Result<(), String>> {
        let (b, i, caps) = (backend.clone(), id.clone(), capabilities.to_vec());
        Ok(self
            .bounded("inspect", backend.volume_path(id), move || {
                caps.iter()
                    .try_for_each(|c| b.check_volume_capability(&i, c))
            })
            .await??)
    }

    /// [`Engine::check_volume_capabilities`] for the one `capability` of a node call or an
    /// expansion: INVALID_ARGUMENT naming `volume_capability` when it is not what the volume
    /// is. Backends whose volumes are all alike have nothing to look at, and skip the trip to
    /// a blocking thread.
    async fn require_volume_capability(
        &self,
        backend: &Arc<dyn Backend>,
        id: &VolumeId,
        capability: &Capability,
    ) -> Result<()> {
        if !backend.volumes_differ() {
            return Ok(());
        }
        self.check_volume_capabilities(backend, id, std::slice::from_ref(capability))
            .await?
            .map_err(|reason| Error::invalid("volume_capability", reason))
    }

    /// ValidateVolumeCapabilities: `Ok(Ok(()))` when every capability (and the parameters) fit
    /// the volume, `Ok(Err(reason))` when not.
    pub async fn validate_capabilities(
        &self,
        raw_id: &str,
        capabilities: &[Capability],
        parameters: &BTreeMap<String, String>,
    ) -> Result<std::result::Result<(), String>> {
        let id = Self::existing_id(raw_id)?;
        if capabilities.is_empty() {
            return Err(Error::Missing("volume_capabilities"));
        }
        let record = self
            .store
            .volume(id.as_str())?
            .ok_or_else(|| Error::VolumeNotFound(raw_id.to_string()))?;
        let backend = self.backend_of(&id)?;
        for capability in capabilities {
            if let Err(reason) = backend.check_capability(capability) {
                return Ok(Err(reason));
            }
        }
        if let Err(reason) = self
            .check_volume_capabilities(&backend, &id, capabilities)
            .await?
        {
            return Ok(Err(reason));
        }
        if !parameters.is_empty() {
            let params = params::parse(parameters)?;
            if params::without_defaults(&params.defining)
                != params::without_defaults(&record.parameters)
            {
                return Ok(Err("parameters differ from the volume's".into()));
            }
        }
        Ok(Ok(()))
    }

    /// GetCapacity: the free space volumes can be allocated from, zero where the request's
    /// topology or capabilities exclude this node.
    pub fn capacity(
        &self,
        capabilities: &[Capability],
        parameters: &BTreeMap<String, String>,
        topology: Option<&Segment>,
    ) -> Result<CapacityReport> {
        let params = params::parse(parameters)?;
        let backend = self.backend_named(&params.backend)?;
        // Zero where this node cannot take the volume, so capacity-aware scheduling skips it.
        let excluded = (backend.node_local()
            && topology.is_some_and(|s| !self.segment_is_local(s)))
            || capabilities
                .iter()
                .any(|c| backend.check_capability(c).is_err())
            || (params.enforce_capacity && !backend.can_enforce_capacity());
        if excluded {
            return Ok(CapacityReport {
                available_bytes: 0,
                maximum_volume_size: 0,
                minimum_volume_size: 0,
            });
        }
        let fs = backend.capacity_for(&params.defining, &mount_flags_of(capabilities))?;
        // The smallest limit_bytes a CreateVolume with these capabilities may use: the kind
        // they ask for may need more than the backend's smallest volume (an xfs loop image
        // needs 300 MiB; CreateVolume answers OUT_OF_RANGE below that).
        let (block, fs_types) = access_kind(capabilities);
        let kind = VolumeOptions {
            block,
            fs_type: fs_types.first().copied().unwrap_or_default().to_string(),
            ..VolumeOptions::default()
        };
        Ok(CapacityReport {
            available_bytes: fs.available_bytes,
            maximum_volume_size: fs.available_bytes,
            minimum_volume_size: backend
                .minimum_volume_bytes()
                .max(backend.smallest_volume_bytes(&kind)),
        })
    }
}

/// Whether a volume's storage exists (or why that is unknown), or that the check hung.
type StorageCheck = std::result::Result<std::result::Result<bool, String>, Hung>;

/// The mount flags of the first mount capability (Kubernetes puts the StorageClass
/// `mountOptions` there).
fn mount_flags_of(capabilities: &[Capability]) -> Vec<String> {
    capabilities
        .iter()
        .find_map(|c| match &c.access_type {
            AccessType::Mount { mount_flags, .. } => Some(mount_flags.clone()),
            AccessType::Block => None,
        })
        .unwrap_or_default()
}

/// Whether `capabilities` ask for block access, and the filesystem types their mount
/// capabilities name, in order.
fn access_kind(capabilities: &[Capability]) -> (bool, Vec<&str>) {
    let block = capabilities
        .iter()
        .any(|c| c.access_type == AccessType::Block);
    let fs_types = capabilities
        .iter()
        .filter_map(|c| match &c.access_type {
            AccessType::Mount { fs_type, .. } => Some(fs_type.as_str()),
            AccessType::Block => None,
        })
        .collect();
    (block, fs_types)
}

/// What the backend needs to know from a CreateVolume beyond its size.
fn volume_options(request: &CreateVolume, params: &params::Parameters) -> Result<VolumeOptions> {
    let (block, fs_types) = access_kind(&request.capabilities);
    if block && !fs_types.is_empty() {
        return Err(Error::invalid(
            "volume_capabilities",
            "asks for both block and mount access; a volume is one or the other",
        ));
    }
    if fs_types.windows(2).any(|w| w[0] != w[1]) {
        return Err(Error::invalid(
            "volume_capabilities",
            "asks for different filesystem types",
        ));
    }
    Ok(VolumeOptions {
        capacity_bytes: 0,
        require_enforcement: params.enforce_capacity,
        block,
        fs_type: fs_types.first().copied().unwrap_or_default().to_string(),
        preallocate: params.preallocate,
        name: request.name.clone(),
        parameters: params.defining.clone(),
        metadata: params.metadata.clone(),
    })
}

/// Whether a volume of `capacity` bytes fits the filesystem it is allocated from: larger than
/// the whole filesystem can never fit (OUT_OF_RANGE), larger than its free space not now
/// (RESOURCE_EXHAUSTED).
fn check_room(capacity: u64, fs: &crate::backend::FsCapacity) -> Result<()> {
    if capacity > fs.total_bytes {
        return Err(Error::CapacityOutOfRange(format!(
            "requested {capacity} bytes is larger than the whole data filesystem \
             ({} bytes)",
            fs.total_bytes
        )));
    }
    if capacity > fs.available_bytes {
        return Err(Error::Exhausted(format!(
            "requested {capacity} bytes but only {} bytes are available",
            fs.available_bytes
        )));
    }
    Ok(())
}

/// The capacity to record: required if set, else the limit, else 0 (unspecified).
fn resolve_capacity(range: CapacityRange) -> Result<u64> {
    if range.limit_bytes > 0 && range.required_bytes > range.limit_bytes {
        return Err(Error::CapacityOutOfRange(format!(
            "required_bytes {} exceeds limit_bytes {}",
            range.required_bytes, range.limit_bytes
        )));
    }
    Ok(if range.required_bytes > 0 {
        range.required_bytes
    } else {
        range.limit_bytes
    })
}

/// `bytes` rounded up to a multiple of `unit` (see [`Backend::size_unit`]): OUT_OF_RANGE when
/// that passes `limit` (0: none), since no size of whole units lies in the range then.
fn round_to_unit(bytes: u64, unit: u64, limit: u64) -> Result<u64> {
    let rounded = bytes.checked_next_multiple_of(unit.max(1)).unwrap_or(bytes);
    if limit > 0 && rounded > limit {
        return Err(Error::CapacityOutOfRange(format!(
            "volumes of this kind are whole multiples of {unit} bytes; none lies between \
             {bytes} bytes and limit_bytes {limit}"
        )));
    }
    Ok(rounded)
}

/// Whether an existing volume satisfies a repeated CreateVolume with the same name.
fn check_compatible(
    record: &VolumeRecord,
    defining: &BTreeMap<String, String>,
    request: &CreateVolume,
) -> Result<()> {
    let conflict = |what: &str| Error::AlreadyExists {
        name: record.name.clone(),
        what: what.to_string(),
    };
    let range = request.capacity;
    let fits = (range.required_bytes == 0 || record.capacity_bytes >= range.required_bytes)
        && (range.limit_bytes == 0 || record.capacity_bytes <= range.limit_bytes);
    if !fits {
        return Err(conflict("capacity"));
    }
    if params::without_defaults(&record.parameters) != params::without_defaults(defining) {
        return Err(conflict("set of parameters"));
    }
    let modes: Vec<&str> = request
        .capabilities
        .iter()
        .map(|c| c.access_mode.name())
        .collect();
    if modes
        .iter()
        .any(|m| !record.access_modes.iter().any(|r| r == m))
    {
        return Err(conflict("access mode"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
