//! The node half of the engine: publishing volumes at kubelet paths, unpublishing them, and
//! reporting their usage and health.

use std::path::PathBuf;

use crate::backend::PublishSource;
use crate::mount::{ConfinedPath, MountError, PathState};
use crate::store::{Mutation, PublicationRecord};

use super::error::{Error, Result};
use super::ids::VolumeId;
use super::types::*;
use super::{Engine, blocking};

impl Engine {
    fn confine(&self, field: &'static str, raw: &str) -> Result<ConfinedPath> {
        if raw.is_empty() {
            return Err(Error::Missing(field));
        }
        ConfinedPath::new(&self.config.kubelet_dir, raw)
            .map_err(|e| Error::invalid(field, e.to_string()))
    }

    /// Where the volume is staged on this node, per the store.
    fn staging_of(&self, id: &VolumeId) -> Result<Option<ConfinedPath>> {
        Ok(self
            .store
            .publications(id.as_str())?
            .values()
            .find(|p| p.staging)
            .and_then(|p| ConfinedPath::new(&self.config.kubelet_dir, &p.path).ok()))
    }

    /// What the volume is published from (its directory, staging path or device; a raw block
    /// volume has a second, read-only device for read-only publications), as far as known.
    fn sources_of(&self, id: &VolumeId) -> Vec<PathBuf> {
        let Ok(backend) = self.backend_of(id) else {
            return vec![];
        };
        let staging = self.staging_of(id).ok().flatten();
        let mut sources: Vec<PathBuf> = [false, true]
            .into_iter()
            .filter_map(|readonly| backend.publish_source(id, staging.as_ref(), readonly).ok())
            .map(|source| source.path().to_path_buf())
            .collect();
        sources.dedup();
        sources
    }

    /// Whether `state` shows the volume (a bind mount of what it publishes). The source is
    /// stat'ed, which blocks when its filesystem hangs: bounded by the mount timeout.
    pub(super) fn shows_volume(
        &self,
        id: &VolumeId,
        state: &PathState,
    ) -> std::result::Result<bool, MountError> {
        let timeout = self.config.mount_timeout;
        for source in self.sources_of(id) {
            let (m, p) = (self.mounter.clone(), source.clone());
            let found = self
                .probes
                .run(&source.to_string_lossy(), timeout, move || {
                    m.identity(&p).ok()
                })
                .map_err(|hung| hung.error("stat", source, timeout))?;
            if found.is_some_and(|(dev, ino)| state.dev == dev && state.ino == ino) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// [`Engine::shows_volume`] off the async threads.
    async fn shows_volume_async(
        &self,
        id: &VolumeId,
        state: &PathState,
    ) -> Result<std::result::Result<bool, MountError>> {
        for source in self.sources_of(id) {
            let (m, p) = (self.mounter.clone(), source.clone());
            match self
                .bounded("stat", source, move || m.identity(&p).ok())
                .await?
            {
                Ok(Some((dev, ino))) if state.dev == dev && state.ino == ino => {
                    return Ok(Ok(true));
                }
                Ok(_) => {}
                Err(hung) => return Ok(Err(hung)),
            }
        }
        Ok(Ok(false))
    }

    /// Whether the mount found at a staging path is this volume's staged mount, off the async
    /// threads and bounded by the mount timeout (the backend may look at a remote share).
    async fn shows_staged_async(
        &self,
        id: &VolumeId,
        staging: &ConfinedPath,
        state: &PathState,
    ) -> Result<bool> {
        let backend = self.backend_of(id)?;
        let (i, s, state) = (id.clone(), staging.clone(), *state);
        Ok(self
            .bounded("stat", staging.absolute(), move || {
                backend.shows_staged(&i, &s, &state)
            })
            .await???)
    }

    /// Whether the volume's storage exists; a stat of it blocks when a dead filesystem is
    /// mounted there, so it is bounded by the mount timeout (UNAVAILABLE when it hangs).
    pub(super) async fn storage_exists(
        &self,
        backend: &std::sync::Arc<dyn crate::backend::Backend>,
        id: &VolumeId,
    ) -> Result<bool> {
        let (b, i) = (backend.clone(), id.clone());
        Ok(self
            .bounded("stat", backend.volume_path(id), move || b.exists(&i))
            .await???)
    }

    /// What is at `path`, bounded by the mount timeout (the outer error says it hung).
    async fn inspect_bounded(
        &self,
        path: &ConfinedPath,
    ) -> Result<std::result::Result<std::result::Result<Option<PathState>, MountError>, MountError>>
    {
        let (m, p) = (self.mounter.clone(), path.clone());
        self.bounded("statx", path.absolute(), move || m.inspect(&p))
            .await
    }

    /// Takes down the mounts at a recorded `path` of ours whose filesystem hangs: each hung
    /// layer is detached lazily (`MNT_DETACH`: gone from the namespace at once, released by
    /// the kernel once the blocked calls return), layers that answer are unmounted normally.
    /// Leaves the path unmounted but in place.
    async fn take_down_hung(&self, path: &ConfinedPath, volume: &str) -> Result<()> {
        let key = path.absolute().to_string_lossy().into_owned();
        let mut top_hung = true;
        // A few layers at most in practice (a bind under a dead mount); the bound only stops a
        // pathological stack from looping for ever.
        for _ in 0..8 {
            if top_hung {
                tracing::warn!(path = %path, volume, timeout = ?self.config.mount_timeout,
                    "the filesystem at this path does not answer; detaching it lazily (MNT_DETACH)");
                // The blocked call stays blocked, but what it is stuck in is about to leave the
                // path: stop refusing calls on the path because of it.
                self.probes.forget(&key);
                let (m, p) = (self.mounter.clone(), path.clone());
                // Bounded too: reaching the path walks its parents, which would block if the
                // dead filesystem were mounted above it rather than on it.
                self.bounded("umount -l", path.absolute(), move || m.detach(&p))
                    .await???;
            }
            // The mount table, not a stat of the path: it never touches the filesystems.
            if !listed_as_mount_point(&path.absolute())? {
                return Ok(());
            }
            let (m, p) = (self.mounter.clone(), path.clone());
            match self
                .bounded("umount", path.absolute(), move || m.unmount(&p))
                .await?
            {
                Ok(result) => {
                    result?;
                    top_hung = false;
                }
                Err(_hung) => top_hung = true,
            }
        }
        Err(Error::Precondition(format!(
            "{path} still holds mounts after taking down 8 layers; leaving it"
        )))
    }

    /// NodeStageVolume: prepares the volume at the staging path (for loop volumes: attach the
    /// image and mount its filesystem there). Idempotent.
    pub async fn stage(
        &self,
        raw_id: &str,
        raw_staging: &str,
        capability: Capability,
    ) -> Result<()> {
        if raw_id.is_empty() {
            return Err(Error::Missing("volume_id"));
        }
        let staging = self.confine("staging_target_path", raw_staging)?;
        let id = Self::existing_id(raw_id)?;
        let backend = self.backend_of(&id)?;
        backend
            .check_capability(&capability)
            .map_err(|reason| Error::invalid("volume_capability", reason))?;
        // The path is locked too: two volumes staged at one path at once would stack mounts.
        let _guard = self.lock(vec![format!("vol:{id}"), format!("path:{staging}")])?;
        if !self.storage_exists(&backend, &id).await? {
            return Err(Error::VolumeNotFound(id.to_string()));
        }
        // What the volume holds, as its storage says: an ext4 volume staged as xfs was mounted
        // as ext4 without a word.
        self.require_volume_capability(&backend, &id, &capability)
            .await?;
        let publications = self.store.publications(id.as_str())?;
        if let Some(other) = publications
            .values()
            .find(|p| p.staging && p.path != staging.as_string())
        {
            return Err(Error::Precondition(format!(
                "volume {id} is already staged at {}",
                other.path
            )));
        }
        let wanted = PublicationRecord {
            volume_id: id.to_string(),
            path: staging.as_string(),
            node_id: self.config.node_id.clone(),
            readonly: false,
            access_mode: capability.access_mode.name().to_string(),
            mount_flags: match &capability.access_type {
                AccessType::Mount { mount_flags, .. } => mount_flags.clone(),
                AccessType::Block => vec![],
            },
            staging: true,
        };
        if backend.stages_mounts() {
            // A mount already there is this volume's only if it shows the volume (a repeated
            // stage, or one that crashed before its record was written); anything else
            // (another volume, a kubelet tmpfs) must not be taken for it.
            let mounted = match self.inspect_bounded(&staging).await??.ok().flatten() {
                Some(state) if state.is_mount_point => {
                    if !self.shows_staged_async(&id, &staging, &state).await? {
                        return Err(Error::Precondition(format!(
                            "something other than volume {id} is mounted at {staging}"
                        )));
                    }
                    true
                }
                _ => false,
            };
            // Staged now (its mount, or a raw block volume's device) with another capability
            // is a conflict. A record left from before a reboot, with nothing staged any more,
            // is not: the volume is staged again as asked (the PV's mount options may have
            // been edited meanwhile) and the record rewritten.
            let staged_now = mounted
                || backend
                    .publish_source(&id, Some(&staging), false)
                    .is_ok_and(|source| matches!(source, PublishSource::Device(_)));
            if let Some(existing) = publications.get(&wanted.path)
                && existing != &wanted
                && staged_now
            {
                return Err(Error::PublishedDifferently(format!(
                    "volume {id} is already staged at {staging} with a different capability \
                     (mode={}, flags={:?})",
                    existing.access_mode, existing.mount_flags
                )));
            }
        }
        let intent = self.store.intent();
        let (mounter, access, s, i) = (
            self.mounter.clone(),
            capability.access_type.clone(),
            staging.clone(),
            id.clone(),
        );
        blocking(move || Ok(backend.stage(&i, &access, &s, mounter.as_ref())?)).await?;
        if publications.get(&wanted.path) != Some(&wanted) {
            intent
                .commit(vec![Mutation::PutPublication(wanted)], vec![])
                .await?;
        }
        Ok(())
    }

    /// NodeUnstageVolume: undoes [`Engine::stage`]; unstaging what is not staged succeeds.
    pub async fn unstage(&self, raw_id: &str, raw_staging: &str) -> Result<()> {
        if raw_id.is_empty() {
            return Err(Error::Missing("volume_id"));
        }
        let staging = self.confine("staging_target_path", raw_staging)?;
        let Some(id) = Self::parse_id(raw_id)? else {
            return Ok(());
        };
        let Ok(backend) = self.backend_of(&id) else {
            return Ok(());
        };
        let _guard = self.lock(vec![format!("vol:{id}"), format!("path:{staging}")])?;
        let publications = self.store.publications(id.as_str())?;
        if let Some(target) = publications.values().find(|p| !p.staging) {
            return Err(Error::Precondition(format!(
                "volume {id} is still published at {}; unpublish it first",
                target.path
            )));
        }
        let recorded = publications
            .get(&staging.as_string())
            .is_some_and(|p| p.staging);
        if !recorded && publications.values().any(|p| p.staging) {
            // Staged at another path, so not staged here: nothing at this path is ours.
            return Ok(());
        }
        if backend.stages_mounts() {
            // The backend inspects and unmounts the staging path, which blocks for as long as
            // a dead filesystem there does not answer: look first, within the timeout.
            match self.inspect_bounded(&staging).await? {
                // An unrecorded mount is unmounted only if it shows this volume (a stage that
                // crashed before its record); never another volume's or the kubelet's mount.
                Ok(Ok(Some(state)))
                    if state.is_mount_point
                        && !recorded
                        && !self.shows_staged_async(&id, &staging, &state).await? =>
                {
                    return Err(Error::Precondition(format!(
                        "{staging} holds a mount that is not volume {id}; leaving it alone"
                    )));
                }
                Ok(Err(MountError::ParentMissing { .. })) | Ok(_) => {}
                Err(hung) if !recorded => return Err(hung.into()),
                Err(_hung) => self.take_down_hung(&staging, id.as_str()).await?,
            }
        }
        let (mounter, s, i) = (self.mounter.clone(), staging.clone(), id.clone());
        // Backends bound their own unmounts (the shared backend detaches after the timeout):
        // give them room for that, but never wait for ever.
        let (probes, timeout) = (self.probes.clone(), self.config.mount_timeout * 2);
        let key = staging.absolute().to_string_lossy().into_owned();
        let abs = staging.absolute();
        blocking(move || {
            match probes.run(&key, timeout, move || {
                backend.unstage(&i, &s, mounter.as_ref())
            }) {
                Ok(result) => Ok(result?),
                Err(hung) => Err(hung.error("unstage", abs, timeout).into()),
            }
        })
        .await?;
        if recorded {
            self.forget_publication(&id, &staging).await?;
        }
        Ok(())
    }

    /// Durably removes the record of a publication (or staging) at `path`.
    async fn forget_publication(&self, id: &VolumeId, path: &ConfinedPath) -> Result<()> {
        self.store
            .commit(
                vec![Mutation::DeletePublication {
                    volume_id: id.to_string(),
                    path: path.as_string(),
                }],
                vec![],
            )
            .await?;
        Ok(())
    }

    /// NodeExpandVolume: grows the device and filesystem the node sees; returns the size now
    /// visible (the recorded capacity when the node has nothing to grow). A capability, when
    /// given, must be what the volume is (INVALID_ARGUMENT, "exceeds capabilities", otherwise).
    pub async fn node_expand(
        &self,
        raw_id: &str,
        raw_path: &str,
        capability: Option<Capability>,
    ) -> Result<u64> {
        let id = Self::existing_id(raw_id)?;
        if raw_path.is_empty() {
            return Err(Error::Missing("volume_path"));
        }
        self.confine("volume_path", raw_path)?;
        let backend = self.backend_of(&id)?;
        if let Some(capability) = &capability {
            backend
                .check_capability(capability)
                .map_err(|reason| Error::invalid("volume_capability", reason))?;
        }
        let _guard = self.lock(vec![format!("vol:{id}")])?;
        let record = self
            .store
            .volume(id.as_str())?
            .ok_or_else(|| Error::VolumeNotFound(id.to_string()))?;
        // Block or filesystem, and which filesystem, as the volume's storage says: the
        // filesystem of a volume the CO takes for a raw block device is not to be grown.
        if let Some(capability) = &capability {
            self.require_volume_capability(&backend, &id, capability)
                .await?;
        }
        let staging = self.staging_of(&id)?;
        // Bounded like every look at the volume: growing a filesystem that hangs (a dead layer
        // over the staging path) answers UNAVAILABLE instead of holding a thread per kubelet
        // retry; a resize that outlasts the timeout finishes in the background, and the retry
        // after it finds the filesystem grown.
        let key = match &staging {
            Some(path) => path.absolute(),
            None => backend.volume_path(&id),
        };
        let grown = self
            .bounded("resize", key, move || {
                backend.node_expand(&id, staging.as_ref())
            })
            .await???;
        Ok(grown.unwrap_or(record.capacity_bytes))
    }

    /// NodeGetInfo.
    pub fn node_info(&self) -> NodeInfo {
        NodeInfo {
            node_id: self.config.node_id.clone(),
            max_volumes_per_node: self.config.max_volumes_per_node,
            topology: self.topology(),
        }
    }

    /// NodePublishVolume: bind-mounts the volume at the target path.
    pub async fn publish(&self, request: Publish) -> Result<()> {
        if request.volume_id.is_empty() {
            return Err(Error::Missing("volume_id"));
        }
        let target = self.confine("target_path", &request.target_path)?;
        let staging = match request.staging_target_path.as_str() {
            "" => None,
            raw => Some(self.confine("staging_target_path", raw)?),
        };
        let capability = request.capability;
        let flags = match &capability.access_type {
            AccessType::Mount { mount_flags, .. } => mount_flags.clone(),
            AccessType::Block => vec![],
        };
        let readonly = request.readonly || capability.access_mode.is_read_only();
        let id = Self::existing_id(&request.volume_id)?;
        let backend = self.backend_of(&id)?;
        let options = backend
            .publish_options(&flags, readonly)
            .map_err(|reason| Error::invalid("volume_capability", reason))?;
        backend
            .check_capability(&capability)
            .map_err(|reason| Error::invalid("volume_capability", reason))?;

        // The target is locked too: two volumes published at one target at once would stack.
        let _guard = self.lock(vec![format!("vol:{id}"), format!("path:{target}")])?;
        if !self.storage_exists(&backend, &id).await? {
            return Err(Error::VolumeNotFound(id.to_string()));
        }
        self.require_volume_capability(&backend, &id, &capability)
            .await?;
        if backend.stages_mounts() && staging.is_none() {
            return Err(Error::Missing("staging_target_path"));
        }
        let wanted = PublicationRecord {
            volume_id: id.to_string(),
            path: target.as_string(),
            node_id: self.config.node_id.clone(),
            readonly: options.readonly,
            access_mode: capability.access_mode.name().to_string(),
            mount_flags: flags,
            staging: false,
        };
        let publications = self.store.publications(id.as_str())?;
        if let Some(existing) = publications.get(&wanted.path)
            && existing != &wanted
        {
            return Err(Error::PublishedDifferently(format!(
                "volume {id} is already published at {target} with different options \
                 (readonly={}, mode={}, flags={:?})",
                existing.readonly, existing.access_mode, existing.mount_flags
            )));
        }
        let single_writer = AccessMode::SingleNodeSingleWriter.name();
        if let Some(other) = publications.values().find(|p| {
            !p.staging
                && p.path != wanted.path
                && (p.access_mode == single_writer || wanted.access_mode == single_writer)
        }) {
            return Err(Error::Precondition(format!(
                "volume {id} is published at {} and SINGLE_NODE_SINGLE_WRITER allows one \
                 publication",
                other.path
            )));
        }

        if backend.stages_mounts()
            && let Some(staging) = &staging
            && !publications
                .get(&staging.as_string())
                .is_some_and(|p| p.staging)
        {
            // The bind source is the staging path: only where this volume was staged, never a
            // path the request names (another volume's staging, any kubelet directory).
            return Err(Error::Precondition(format!(
                "volume {id} is not staged at {staging}; NodeStageVolume comes first"
            )));
        }
        let mounter = self.mounter.clone();
        if options.readonly {
            let (b, i) = (backend.clone(), id.clone());
            blocking(move || Ok(b.prepare_publish(&i, true)?)).await?;
        }
        let source = backend.publish_source(&id, staging.as_ref(), options.readonly)?;
        if let (PublishSource::Directory(_), Some(staging)) = (&source, &staging)
            && backend.stages_mounts()
        {
            // And what is mounted there must still be the volume's staged mount.
            let state = self.inspect_bounded(staging).await???;
            let staged = match &state {
                Some(state) if state.is_mount_point => {
                    self.shows_staged_async(&id, staging, state).await?
                }
                _ => false,
            };
            if !staged {
                return Err(Error::Precondition(format!(
                    "{staging} no longer holds volume {id}'s staged mount; stage it again"
                )));
            }
        }
        let state = self.inspect_bounded(&target).await???;
        let shown = match &state {
            Some(state) if state.is_mount_point => self.shows_volume_async(&id, state).await??,
            _ => false,
        };
        match state {
            Some(_) if shown => {
                // Already mounted (a repeated call, or a crash before the record was written).
            }
            Some(state) if state.is_mount_point => {
                return Err(Error::Precondition(format!(
                    "something other than volume {id} is mounted at {target}"
                )));
            }
            Some(state) if state.is_dir != matches!(source, PublishSource::Directory(_)) => {
                return Err(Error::invalid(
                    "target_path",
                    format!("{target} exists and is the wrong kind of file for this volume"),
                ));
            }
            _ => {
                let t = target.clone();
                self.bounded("bind", target.absolute(), move || {
                    mounter.bind(source.path(), &t, &options)
                })
                .await???;
            }
        }
        if publications.get(&wanted.path) != Some(&wanted) {
            self.store
                .commit(vec![Mutation::PutPublication(wanted)], vec![])
                .await?;
        }
        Ok(())
    }

    /// NodeUnpublishVolume: unmounts the target and removes the directory. Unpublishing what is
    /// not published succeeds.
    pub async fn unpublish(&self, raw_id: &str, raw_target: &str) -> Result<()> {
        if raw_id.is_empty() {
            return Err(Error::Missing("volume_id"));
        }
        let target = self.confine("target_path", raw_target)?;
        let id = Self::parse_id(raw_id)?;
        let _guard = self.lock(vec![format!("vol:{raw_id}"), format!("path:{target}")])?;
        let record = match &id {
            Some(id) => self
                .store
                .publications(id.as_str())?
                .remove(&target.as_string()),
            None => None,
        };
        if record.as_ref().is_some_and(|r| r.staging) {
            // The volume's staging path, not a publication: NodeUnstageVolume undoes it.
            return Ok(());
        }
        let recorded = record.is_some();
        // Both the inspection (a statx of the target) and the unmount block for as long as a
        // dead server behind the target does not answer: each gets the mount timeout, on a
        // worker thread of its own, and a target still hung from an earlier call is not
        // touched again.
        let state = match self.inspect_bounded(&target).await? {
            // The kubelet may already have removed the pod directory: nothing to undo.
            Ok(Err(MountError::ParentMissing { .. })) => None,
            // A mount whose server is gone (a dead FUSE daemon, a stale NFS handle) answers at
            // once with an error instead of hanging; a recorded one is taken down the same way.
            Ok(Err(e)) if recorded && is_dead_mount(&e) => {
                tracing::warn!(path = %target, volume = raw_id, error = %e,
                    "the mount at this path is dead; detaching it");
                let id = id.as_ref().expect("recorded implies a parsed ID");
                self.take_down_hung(&target, id.as_str()).await?;
                self.remove_target(&target).await?;
                self.forget_publication(id, &target).await?;
                return Ok(());
            }
            Ok(other) => other?,
            Err(hung) => {
                let Some(id) = id.as_ref().filter(|_| recorded) else {
                    // Not known to be ours: never detach a stranger's mount on a guess.
                    return Err(hung.into());
                };
                self.take_down_hung(&target, id.as_str()).await?;
                self.remove_target(&target).await?;
                self.forget_publication(id, &target).await?;
                return Ok(());
            }
        };
        if let Some(state) = state {
            if state.is_mount_point {
                // A recorded publication is ours without looking at its source (which may sit
                // on the same dead server).
                let ours = recorded
                    || match &id {
                        Some(id) => self.shows_volume_async(id, &state).await??,
                        None => false,
                    };
                if !ours {
                    return Err(Error::Precondition(format!(
                        "{target} holds a mount that is not volume {raw_id}; leaving it alone"
                    )));
                }
                let (m, t) = (self.mounter.clone(), target.clone());
                match self
                    .bounded("umount", target.absolute(), move || m.unmount(&t))
                    .await?
                {
                    Ok(result) => result?,
                    Err(_hung) => self.take_down_hung(&target, raw_id).await?,
                }
                self.remove_target(&target).await?;
            } else if recorded {
                self.remove_target(&target).await?;
            }
            // Neither mounted nor recorded: not ours to remove. A request naming an unknown
            // volume must not delete files or directories under the kubelet's tree.
        }
        if recorded && let Some(id) = id {
            self.forget_publication(&id, &target).await?;
        }
        Ok(())
    }

    /// Removes an unmounted target (an rmdir or unlink in its parent, which is not on the
    /// volume's filesystem).
    async fn remove_target(&self, target: &ConfinedPath) -> Result<()> {
        let (m, t) = (self.mounter.clone(), target.clone());
        blocking(move || Ok(m.remove_target(&t)?)).await
    }

    /// NodeGetVolumeStats. Every look at the volume (its storage, the path, the publish
    /// source, statvfs and the usage walk) is bounded by the mount timeout; a volume whose
    /// filesystem does not answer is reported with an abnormal condition saying so (and no
    /// usage) instead of holding the call.
    pub async fn stats(&self, raw_id: &str, raw_path: &str) -> Result<VolumeStats> {
        let id = Self::existing_id(raw_id)?;
        if raw_path.is_empty() {
            return Err(Error::Missing("volume_path"));
        }
        let path = match ConfinedPath::new(&self.config.kubelet_dir, raw_path) {
            Ok(p) => p,
            // A path outside the kubelet tree cannot be one where we published anything.
            Err(_) => {
                return Err(Error::NotFound(format!(
                    "volume {id} is not published at {raw_path:?}"
                )));
            }
        };
        let record = self.store.volume(id.as_str())?;
        let backend = self.backend_of(&id)?;
        let capacity = record.as_ref().map_or(0, |r| r.capacity_bytes);
        let hung = |what: String, e: MountError| VolumeStats {
            total_bytes: capacity,
            used_bytes: 0,
            available_bytes: 0,
            total_inodes: 0,
            used_inodes: 0,
            available_inodes: 0,
            condition: Condition::abnormal(format!("{what} is not answering: {e}")),
        };
        let (b, i) = (backend.clone(), id.clone());
        let volume_path = backend.volume_path(&id);
        let backing = match self
            .bounded("stat", volume_path.clone(), move || b.exists(&i))
            .await?
        {
            Ok(exists) => exists?,
            Err(e) => {
                return Ok(hung(
                    format!("the backing storage {}", volume_path.display()),
                    e,
                ));
            }
        };
        if record.is_none() && !backing {
            return Err(Error::VolumeNotFound(id.to_string()));
        }
        let publications = self.store.publications(id.as_str())?;
        let recorded = publications.contains_key(&path.as_string());
        let state = match self.inspect_bounded(&path).await? {
            Ok(Err(e)) if is_dead_mount(&e) => {
                return Ok(VolumeStats {
                    condition: Condition::abnormal(format!("the mount at {path} is dead: {e}")),
                    ..hung(String::new(), e)
                });
            }
            Ok(state) => state?,
            Err(e) => return Ok(hung(format!("{path}"), e)),
        };
        let shows = match &state {
            Some(state) => match self.shows_volume_async(&id, state).await? {
                Ok(shows) => shows,
                Err(e) => return Ok(hung("the volume's source".to_string(), e)),
            },
            None => false,
        };
        if !shows && !recorded {
            return Err(Error::NotFound(format!(
                "volume {id} is not published at {path}"
            )));
        }
        let published_readonly = publications
            .get(&path.as_string())
            .is_some_and(|p| p.readonly);
        let (at, i) = (path.absolute(), id.clone());
        let measured = self
            .bounded("statvfs", path.absolute(), move || {
                // A filesystem that turned read-only by itself (errors=remount-ro after an I/O
                // error) while it was published writable is the failure operators most need
                // to hear about.
                let went_readonly = shows
                    && !published_readonly
                    && rustix::fs::statvfs(&at)
                        .is_ok_and(|st| st.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY));
                // The filesystem the publication shows; one that no longer shows the volume
                // (reported abnormal below) is not the volume's.
                let fs = if shows {
                    backend.capacity_at(&i, &at)?
                } else {
                    backend.capacity()?
                };
                let usage = if backing {
                    Some(backend.usage_at(&i, &at)?)
                } else {
                    None
                };
                Ok::<_, crate::backend::BackendError>((went_readonly, fs, usage))
            })
            .await?;
        let (went_readonly, fs, usage) = match measured {
            Ok(result) => result?,
            Err(e) => return Ok(hung(format!("{path}"), e)),
        };
        let condition = if !backing {
            Condition::abnormal(format!(
                "backing storage {} is missing",
                volume_path.display()
            ))
        } else if !shows {
            Condition::abnormal(format!(
                "{path} no longer shows the volume: its mount is gone or was replaced"
            ))
        } else if went_readonly {
            Condition::abnormal(format!(
                "the filesystem at {path} is read-only although the volume was published \
                 writable (remounted read-only after errors?)"
            ))
        } else {
            Condition::healthy()
        };
        let used_bytes = usage.map(|u| u.used_bytes).unwrap_or(0);
        let used_inodes = usage.map(|u| u.used_inodes).unwrap_or(0);
        let total_bytes = match record.map(|r| r.capacity_bytes) {
            Some(c) if c > 0 => c,
            _ => fs.total_bytes,
        };
        Ok(VolumeStats {
            total_bytes,
            used_bytes,
            available_bytes: total_bytes
                .saturating_sub(used_bytes)
                .min(fs.available_bytes),
            total_inodes: fs.total_inodes,
            used_inodes,
            available_inodes: fs.free_inodes,
            condition,
        })
    }
}

/// Whether `error` says the filesystem mounted there is gone rather than the path being bad:
/// a FUSE daemon that exited (`ENOTCONN`), a stale NFS handle (`ESTALE`), a server that is
/// down (`EHOSTDOWN`) or a device that fails (`EIO`).
fn is_dead_mount(error: &MountError) -> bool {
    use rustix::io::Errno;
    let MountError::Io { source, .. } = error else {
        return false;
    };
    source.raw_os_error().is_some_and(|code| {
        [Errno::NOTCONN, Errno::STALE, Errno::HOSTDOWN, Errno::IO]
            .iter()
            .any(|e| e.raw_os_error() == code)
    })
}

/// Whether the mount table lists something mounted at `path`.
fn listed_as_mount_point(path: &std::path::Path) -> Result<bool> {
    let table = crate::mount::mountinfo::read()
        .map_err(|e| Error::Internal(format!("reading the mount table: {e}")))?;
    Ok(table.iter().any(|e| e.mount_point == path))
}
