//! Start-up reconciliation: compares the store with what is on disk and in the mount table,
//! and reports every difference. Nothing is deleted: an orphaned directory may hold someone's
//! data, so the operator decides.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use crate::mount::{ConfinedPath, mountinfo};

use super::Engine;
use super::error::Result;
use super::ids::VolumeId;
use crate::store::VolumeRecord;

/// What reconciliation found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Storage with no record (e.g. a crash between creating storage and committing).
    pub orphaned_storage: Vec<String>,
    /// Records whose storage is missing.
    pub missing_storage: Vec<String>,
    /// Publications recorded whose mount is gone (e.g. after a reboot).
    pub lost_publications: Vec<String>,
    /// Bind mounts of our volumes that no publication record explains.
    pub leftover_mounts: Vec<String>,
    /// Recorded staging and publish paths (or their volumes' sources) whose filesystem did not
    /// answer within the mount timeout (a dead server): neither lost nor confirmed.
    pub unresponsive: Vec<String>,
    /// Volumes whose size limit the filesystem had lost (btrfs quota turned off and on again)
    /// and that got it back.
    pub limits_restored: Vec<String>,
    /// Volumes recorded as size-enforced whose limit is gone and could not be put back (btrfs
    /// quota cannot be enabled): their size is not enforced.
    pub unenforced: Vec<String>,
}

impl ReconcileReport {
    pub fn is_clean(&self) -> bool {
        *self == ReconcileReport::default()
    }
}

impl Engine {
    /// Compares records, storage and mounts, logs each finding and returns them.
    pub fn reconcile(&self) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        let records = self.store.all_volumes()?;
        self.restore_limits(&records, &mut report);
        let recorded: BTreeSet<String> = records.into_iter().map(|v| v.id).collect();
        let mut on_disk: BTreeMap<String, PathBuf> = BTreeMap::new();
        for backend in self.backends.values() {
            for id in backend.list()? {
                on_disk.insert(id.to_string(), backend.volume_path(&id));
            }
        }
        for (id, path) in &on_disk {
            if !recorded.contains(id) {
                tracing::warn!(volume_id = %id, path = %path.display(),
                    "reconcile: storage without a record (left alone; delete it by volume ID to remove it)");
                report.orphaned_storage.push(id.clone());
            }
        }
        for id in &recorded {
            // Backends that cannot list their storage (shares named only by volume IDs) never
            // call a record "missing".
            let served = VolumeId::parse(id).is_ok_and(|v| {
                self.backends
                    .get(v.backend())
                    .is_some_and(|b| b.enumerable())
            });
            if served && !on_disk.contains_key(id) {
                tracing::warn!(volume_id = %id, "reconcile: record whose storage is missing");
                report.missing_storage.push(id.clone());
            }
        }

        let publications = self.store.all_publications()?;
        if self.config.serves_node {
            for publication in &publications {
                let Ok(id) = VolumeId::parse(&publication.volume_id) else {
                    continue;
                };
                let Ok(backend) = self.backend_of(&id) else {
                    continue;
                };
                let Ok(path) = ConfinedPath::new(&self.config.kubelet_dir, &publication.path)
                else {
                    continue;
                };
                // Staging mounts something only for some backends.
                if publication.staging && !backend.stages_mounts() {
                    continue;
                }
                // A dead filesystem at the path blocks the look: bounded, and a path still
                // hung from the previous pass is not probed again.
                let (m, p) = (self.mounter.clone(), path.clone());
                let state = match self.probes.run(
                    &path.absolute().to_string_lossy(),
                    self.config.mount_timeout,
                    move || m.inspect(&p),
                ) {
                    Ok(state) => state.ok().flatten(),
                    Err(hung) => {
                        let e = hung.error("statx", path.absolute(), self.config.mount_timeout);
                        tracing::warn!(volume_id = %id, path = %publication.path, error = %e,
                            "reconcile: the recorded path does not answer (hung filesystem?)");
                        report.unresponsive.push(publication.path.clone());
                        continue;
                    }
                };
                if publication.staging {
                    if !state.is_some_and(|s| s.is_mount_point) {
                        tracing::warn!(volume_id = %id, path = %publication.path,
                            "reconcile: recorded staging is not mounted (reboot?); the next NodeStageVolume restores it");
                        report.lost_publications.push(publication.path.clone());
                    }
                    continue;
                }
                let shown = match state {
                    Some(s) if s.is_mount_point => match self.shows_volume(&id, &s) {
                        Ok(shown) => shown,
                        Err(e) => {
                            tracing::warn!(volume_id = %id, path = %publication.path, error = %e,
                                "reconcile: the volume's source does not answer (hung filesystem?)");
                            report.unresponsive.push(publication.path.clone());
                            continue;
                        }
                    },
                    _ => false,
                };
                if !shown {
                    tracing::warn!(volume_id = %id, path = %publication.path,
                        "reconcile: recorded publication is not mounted (reboot?); the next NodePublishVolume restores it");
                    report.lost_publications.push(publication.path.clone());
                }
            }
        }

        match mountinfo::read() {
            Ok(table) => {
                let published: BTreeSet<&str> =
                    publications.iter().map(|p| p.path.as_str()).collect();
                for (id, dir) in &on_disk {
                    for entry in mountinfo::bind_mounts_of(&table, dir) {
                        let point = entry.mount_point.to_string_lossy();
                        if !published.contains(point.as_ref()) {
                            tracing::warn!(volume_id = %id, mount_point = %point,
                                "reconcile: mount of a volume that no publication explains");
                            report.leftover_mounts.push(point.into_owned());
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "reconcile: cannot read the mount table"),
        }
        tracing::info!(
            volumes = recorded.len(),
            publications = publications.len(),
            orphaned = report.orphaned_storage.len(),
            missing = report.missing_storage.len(),
            lost_publications = report.lost_publications.len(),
            leftover_mounts = report.leftover_mounts.len(),
            unresponsive = report.unresponsive.len(),
            limits_restored = report.limits_restored.len(),
            unenforced = report.unenforced.len(),
            "reconcile finished"
        );
        Ok(report)
    }

    /// Puts back size limits the filesystem lost while the server was down: `btrfs quota
    /// disable` drops every qgroup limit, and this server's start enables quota again, but
    /// with no limits the volumes' sizes would go unenforced without a word.
    fn restore_limits(&self, records: &[VolumeRecord], report: &mut ReconcileReport) {
        for record in records {
            let Ok(id) = VolumeId::parse(&record.id) else {
                continue;
            };
            let Ok(backend) = self.backend_of(&id) else {
                continue;
            };
            match backend.restore_limit(&id, &record.enforcement, record.capacity_bytes) {
                Ok(false) => {}
                Ok(true) => {
                    tracing::warn!(volume_id = %id, capacity_bytes = record.capacity_bytes,
                        enforcement = %record.enforcement,
                        "reconcile: the volume's size limit was gone (quota turned off and on?); set again");
                    report.limits_restored.push(record.id.clone());
                }
                Err(e) => {
                    tracing::error!(volume_id = %id, enforcement = %record.enforcement,
                        error = %e, "reconcile: the volume's size is not enforced");
                    report.unenforced.push(record.id.clone());
                }
            }
        }
    }
}
