//! Background measurements the metrics expose: volume usage (walked every `--usage-interval`),
//! readiness and backend health (every [`HEALTH_INTERVAL`]) and reconciliation findings (every
//! `--reconcile-interval`). Each runs in its own task, does its filesystem work on the blocking
//! pool, and replaces a snapshot that scrapes read; a scrape never waits for a measurement.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::task::JoinHandle;

use crate::backend::{Backend, FsCapacity, Usage};
use crate::engine::ids::VolumeId;
use crate::engine::params::{PV_NAME, PVC_NAME, PVC_NAMESPACE};
use crate::engine::{Engine, ReconcileReport};
use crate::health::Health;

/// How often readiness and the backend's filesystem are checked for the metrics.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(10);

/// One volume in a usage sample.
#[derive(Debug, Clone)]
pub struct VolumeSample {
    pub id: String,
    pub pv: Option<String>,
    pub pvc: Option<String>,
    pub namespace: Option<String>,
    pub capacity_bytes: u64,
    /// `None` when the volume could not be measured (its storage is missing, say).
    pub used: Option<Usage>,
}

impl VolumeSample {
    /// The metric labels: the volume ID, then what the provisioner told us, named as the
    /// kubelet's `kubelet_volume_stats_*` metrics name them.
    pub fn labels(&self) -> Vec<(&'static str, &str)> {
        let mut labels = vec![("volume_id", self.id.as_str())];
        if let Some(pv) = &self.pv {
            labels.push(("persistentvolume", pv));
        }
        if let Some(pvc) = &self.pvc {
            labels.push(("persistentvolumeclaim", pvc));
        }
        if let Some(ns) = &self.namespace {
            labels.push(("namespace", ns));
        }
        labels
    }
}

/// The result of one pass over every volume.
#[derive(Debug, Clone, Default)]
pub struct UsageSnapshot {
    pub volumes: Vec<VolumeSample>,
    pub publications: u64,
    pub duration: Duration,
    /// Unix time the sample finished; 0 before the first.
    pub finished_unix: f64,
    /// Volumes whose usage could not be measured.
    pub errors: u64,
    /// Deleted volume directories not yet removed, and of those the ones given up on.
    pub trash_entries: u64,
    pub trash_stuck: u64,
}

/// Readiness and backend health.
#[derive(Debug, Clone, Default)]
pub struct HealthSnapshot {
    pub ready: bool,
    pub backends: Vec<BackendHealth>,
}

/// One backend's filesystem.
#[derive(Debug, Clone)]
pub struct BackendHealth {
    pub name: &'static str,
    /// The filesystem answered statvfs and the data directory is writable.
    pub up: bool,
    pub filesystem: Option<FsCapacity>,
}

/// The last reconciliation.
#[derive(Debug, Clone)]
pub struct ReconcileSnapshot {
    pub report: ReconcileReport,
    pub finished_unix: f64,
}

/// The latest measurements, shared by the sampler tasks (writers) and scrapes (readers).
#[derive(Debug, Default)]
pub struct Sampled {
    usage: RwLock<Arc<UsageSnapshot>>,
    health: RwLock<HealthSnapshot>,
    reconcile: RwLock<Option<Arc<ReconcileSnapshot>>>,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

impl Sampled {
    pub fn usage(&self) -> Arc<UsageSnapshot> {
        self.usage.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn health(&self) -> HealthSnapshot {
        self.health
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn reconcile(&self) -> Option<Arc<ReconcileSnapshot>> {
        self.reconcile
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records a reconciliation report (the server's start-up one, or a periodic one).
    pub fn set_reconcile(&self, report: ReconcileReport) {
        *self.reconcile.write().unwrap_or_else(|p| p.into_inner()) =
            Some(Arc::new(ReconcileSnapshot {
                report,
                finished_unix: unix_now(),
            }));
    }
}

/// A volume with the backend holding it.
type VolumeOf = (Arc<dyn Backend>, VolumeId);

/// Walks every recorded volume once, each with the backend its ID names.
pub fn sample_usage(
    engine: &Engine,
    backends: &[Arc<dyn Backend>],
) -> Result<UsageSnapshot, String> {
    let started = Instant::now();
    let store = engine.store();
    let records = store
        .all_volumes()
        .map_err(|e| format!("reading volumes: {e}"))?;
    let publications = store
        .all_publications()
        .map_err(|e| format!("reading publications: {e}"))?
        .len() as u64;
    // Each volume's walk is bounded by the mount timeout on a worker thread: a volume whose
    // filesystem hangs costs one timeout, then is skipped (counted as an error) for as long as
    // that walk stays blocked, so it neither stalls the other volumes' samples nor piles up a
    // blocked thread every interval.
    let items: Vec<(String, VolumeOf)> = records
        .iter()
        .filter_map(|record| {
            let id = VolumeId::parse(&record.id).ok()?;
            let backend = backends.iter().find(|b| b.name() == id.backend())?.clone();
            let key = backend.volume_path(&id).to_string_lossy().into_owned();
            Some((key, (backend, id)))
        })
        .collect();
    let ids: Vec<String> = items.iter().map(|(_, (_, id))| id.to_string()).collect();
    let measured = engine.probes().run_each(
        items,
        engine.config().mount_timeout,
        Arc::new(|(backend, id): VolumeOf| backend.usage(&id).ok()),
    );
    let mut used_of: std::collections::HashMap<String, Usage> = Default::default();
    let mut hung = 0u64;
    for (id, result) in ids.into_iter().zip(measured) {
        match result {
            Ok(Some(usage)) => {
                used_of.insert(id, usage);
            }
            Ok(None) => {}
            Err(_) => hung += 1,
        }
    }
    if hung > 0 {
        tracing::warn!(
            hung,
            blocked_threads = engine.probes().blocked_threads(),
            "usage sample: volumes whose filesystem does not answer were skipped"
        );
    }
    let mut errors = 0;
    let mut volumes = Vec::with_capacity(records.len());
    for record in records {
        let used = used_of.remove(&record.id);
        errors += u64::from(used.is_none());
        let mut metadata = record.metadata;
        volumes.push(VolumeSample {
            pv: metadata.remove(PV_NAME),
            pvc: metadata.remove(PVC_NAME),
            namespace: metadata.remove(PVC_NAMESPACE),
            id: record.id,
            capacity_bytes: record.capacity_bytes,
            used,
        });
    }
    let (trash_entries, trash_stuck) = engine.trash_backlog();
    Ok(UsageSnapshot {
        volumes,
        publications,
        duration: started.elapsed(),
        finished_unix: unix_now(),
        errors,
        trash_entries: trash_entries as u64,
        trash_stuck: trash_stuck as u64,
    })
}

/// What the sampler tasks need.
#[derive(Clone)]
pub struct Sampler {
    pub engine: Arc<Engine>,
    pub backends: Vec<Arc<dyn Backend>>,
    pub health: Health,
    pub data_dir: PathBuf,
    pub sampled: Arc<Sampled>,
    pub usage_interval: Duration,
    /// Zero: only the start-up reconciliation.
    pub reconcile_interval: Duration,
}

/// The running sampler tasks; dropping this stops them.
pub struct SamplerTasks(Vec<JoinHandle<()>>);

impl Drop for SamplerTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

impl Sampler {
    /// Starts the tasks. The first usage sample and health check run at once.
    pub fn spawn(self) -> SamplerTasks {
        let mut tasks = Vec::new();
        let this = self.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(this.usage_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                this.refresh_usage().await;
            }
        }));
        let this = self.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEALTH_INTERVAL.min(this.usage_interval));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                this.refresh_health().await;
            }
        }));
        if !self.reconcile_interval.is_zero() {
            let this = self;
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(this.reconcile_interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await; // the server reconciled at start
                loop {
                    tick.tick().await;
                    this.refresh_reconcile().await;
                }
            }));
        }
        SamplerTasks(tasks)
    }

    /// Takes a usage sample now.
    pub async fn refresh_usage(&self) {
        let (engine, backends) = (self.engine.clone(), self.backends.clone());
        match tokio::task::spawn_blocking(move || sample_usage(&engine, &backends)).await {
            Ok(Ok(snapshot)) => {
                tracing::debug!(
                    volumes = snapshot.volumes.len(),
                    errors = snapshot.errors,
                    duration_ms = snapshot.duration.as_millis() as u64,
                    "usage sampled"
                );
                *self
                    .sampled
                    .usage
                    .write()
                    .unwrap_or_else(|p| p.into_inner()) = Arc::new(snapshot);
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "usage sample failed"),
            Err(e) => tracing::warn!(error = %e, "usage sample task failed"),
        }
    }

    /// Checks readiness and the backend's filesystem now.
    pub async fn refresh_health(&self) {
        let report = self.health.check().await;
        let (backends, data_dir) = (self.backends.clone(), self.data_dir.clone());
        let names: Vec<&'static str> = backends.iter().map(|b| b.name()).collect();
        let probes = self.engine.probes().clone();
        // Bounded through the probes, so a hung data directory keeps one check blocked, not
        // one more every interval.
        let checked = tokio::task::spawn_blocking(move || {
            let key = format!("health:{}", data_dir.display());
            probes.run(&key, crate::health::CHECK_TIMEOUT, move || {
                let writable = crate::health::filesystem_problem("data", &data_dir).is_none();
                backends
                    .iter()
                    .map(|b| {
                        let filesystem = b.capacity().ok();
                        BackendHealth {
                            name: b.name(),
                            up: writable && filesystem.is_some(),
                            filesystem,
                        }
                    })
                    .collect::<Vec<_>>()
            })
        })
        .await;
        let backends = match checked {
            Ok(Ok(result)) => result,
            // A hung filesystem: every backend is down.
            _ => names
                .into_iter()
                .map(|name| BackendHealth {
                    name,
                    up: false,
                    filesystem: None,
                })
                .collect(),
        };
        let snapshot = HealthSnapshot {
            ready: report.ready(),
            backends,
        };
        *self
            .sampled
            .health
            .write()
            .unwrap_or_else(|p| p.into_inner()) = snapshot;
    }

    /// Reconciles now (the engine logs each finding).
    pub async fn refresh_reconcile(&self) {
        let engine = self.engine.clone();
        match tokio::task::spawn_blocking(move || engine.reconcile()).await {
            Ok(Ok(report)) => self.sampled.set_reconcile(report),
            Ok(Err(e)) => tracing::warn!(error = %e, "periodic reconcile failed"),
            Err(e) => tracing::warn!(error = %e, "periodic reconcile task failed"),
        }
    }
}
