//! Prometheus metrics: the registry, the per-call CSI metrics recorded by `csi::handle`, and the
//! collectors that expose what the [`sampler`] measured.
//!
//! A scrape never touches the disk or the store's B-trees: per-volume numbers come from the last
//! usage sample (taken every `--usage-interval`), so a scrape costs one pass over an in-memory
//! list however busy the volumes are. Everything is exposed in the OpenMetrics text format,
//! which Prometheus scrapes natively.

pub mod http;
pub mod sampler;

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tonic::Code;

use crate::store::Store;
use sampler::Sampled;

/// Every metric name starts with this.
pub const PREFIX: &str = "k8scsi";

/// Upper bounds (seconds) of the CSI call latency buckets: from a cached read (~100 µs) to a
/// mount or fsync under load (seconds).
const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Labels of the per-call metrics: CSI method and gRPC status code.
type CallLabels = [(&'static str, &'static str); 2];

/// Counters and latency histograms of CSI calls, by method and gRPC code.
struct CallMetrics {
    calls: Family<CallLabels, Counter>,
    durations: Family<CallLabels, Histogram>,
}

/// Process-wide: `csi::handle` records here; the registry of a serving process exposes it.
static CALLS: LazyLock<CallMetrics> = LazyLock::new(|| CallMetrics {
    calls: Family::default(),
    durations: Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS)),
});

/// The gRPC code's canonical name, as gRPC's own metrics and our logs spell it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Records one finished CSI call.
pub fn record_call(method: &'static str, code: Code, elapsed: Duration) {
    let labels = [("method", method), ("code", code_name(code))];
    CALLS.calls.get_or_create(&labels).inc();
    CALLS
        .durations
        .get_or_create(&labels)
        .observe(elapsed.as_secs_f64());
}

/// The registry of a serving process.
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// Builds the registry over the process's call metrics, the store's commit statistics and
    /// what the sampler measures.
    pub fn new(store: Store, sampled: Arc<Sampled>, backends: &[&'static str]) -> Metrics {
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register(
            "build",
            "k8scsi version and the backends this process serves",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION").to_string()),
                ("backends", backends.join(",")),
            ]),
        );
        registry.register(
            "csi_operations",
            "CSI calls answered, by method and gRPC code",
            CALLS.calls.clone(),
        );
        registry.register_with_unit(
            "csi_operation_duration",
            "Time to answer a CSI call, by method and gRPC code",
            Unit::Seconds,
            CALLS.durations.clone(),
        );
        registry.register_collector(Box::new(StoreCollector { store }));
        registry.register_collector(Box::new(SampledCollector { sampled }));
        Metrics { registry }
    }

    /// The exposition, in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(64 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Encodes one unlabelled gauge.
fn gauge<N: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: N,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, unit, g.metric_type())?)
}

/// Encodes one unlabelled counter.
fn counter<N: prometheus_client::encoding::EncodeCounterValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: N,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(value);
    c.encode(encoder.encode_descriptor(name, help, unit, c.metric_type())?)
}

/// The state store's group-commit counters.
#[derive(Clone)]
struct StoreCollector {
    store: Store,
}

impl std::fmt::Debug for StoreCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreCollector")
    }
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.store.commit_stats();
        counter(
            &mut encoder,
            "store_commits",
            "State store transactions committed (each is one fsync shared by a group of requests).",
            None,
            stats.transactions,
        )?;
        counter(
            &mut encoder,
            "store_mutations",
            "State store mutations committed.",
            None,
            stats.mutations,
        )?;
        counter(
            &mut encoder,
            "store_commit_duration",
            "Time spent committing state store transactions (divide by k8scsi_store_commits_total \
             for the mean commit latency).",
            Some(&Unit::Seconds),
            stats.total_commit_time.as_secs_f64(),
        )
    }
}

/// What the sampler measured: volume usage, backend health, reconcile findings.
#[derive(Debug)]
struct SampledCollector {
    sampled: Arc<Sampled>,
}

impl Collector for SampledCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let usage = self.sampled.usage();
        // Per-volume families. Labels: the volume ID, and the PV, PVC and namespace when the
        // provisioner sent them (named as kubelet_volume_stats_* name them, so queries join).
        type Value = fn(&sampler::VolumeSample) -> Option<u64>;
        let per_volume: [(&str, &str, Option<Unit>, Value); 3] = [
            (
                "volume_capacity",
                "Capacity promised for the volume.",
                Some(Unit::Bytes),
                |v| Some(v.capacity_bytes),
            ),
            (
                "volume_used",
                "Bytes used by the volume's files, as of the last usage sample.",
                Some(Unit::Bytes),
                |v| v.used.map(|u| u.used_bytes),
            ),
            (
                "volume_used_inodes",
                "Inodes used by the volume, as of the last usage sample.",
                None,
                |v| v.used.map(|u| u.used_inodes),
            ),
        ];
        for (name, help, unit, value) in &per_volume {
            let mut family =
                encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
            for volume in &usage.volumes {
                if let Some(v) = value(volume) {
                    family.encode_family(&volume.labels())?.encode_gauge(&v)?;
                }
            }
        }
        gauge(
            &mut encoder,
            "volumes",
            "Volumes recorded in the state store, as of the last usage sample.",
            None,
            usage.volumes.len() as u64,
        )?;
        gauge(
            &mut encoder,
            "publications",
            "Volume publications (bind mounts into pods) recorded, as of the last usage sample.",
            None,
            usage.publications,
        )?;
        gauge(
            &mut encoder,
            "trash_entries",
            "Deleted volume directories not yet removed by the background thread, as of the last usage sample.",
            None,
            usage.trash_entries,
        )?;
        gauge(
            &mut encoder,
            "trash_stuck_entries",
            "Deleted volume directories whose removal failed or hangs, left until restart, as of the last usage sample.",
            None,
            usage.trash_stuck,
        )?;
        gauge(
            &mut encoder,
            "usage_sample_duration",
            "Time the last usage sample took.",
            Some(&Unit::Seconds),
            usage.duration.as_secs_f64(),
        )?;
        gauge(
            &mut encoder,
            "usage_sample_timestamp",
            "When the last usage sample finished (Unix time; 0 before the first).",
            Some(&Unit::Seconds),
            usage.finished_unix,
        )?;
        gauge(
            &mut encoder,
            "usage_sample_errors",
            "Volumes whose usage could not be measured in the last sample.",
            None,
            usage.errors,
        )?;

        let health = self.sampled.health();
        gauge(
            &mut encoder,
            "ready",
            "1 when the last readiness check passed (what CSI Probe and /healthz report).",
            None,
            u64::from(health.ready),
        )?;
        let mut up = encoder.encode_descriptor(
            "backend_up",
            "1 when the backend's filesystem answered statvfs and the data directory is writable.",
            None,
            MetricType::Gauge,
        )?;
        for backend in &health.backends {
            up.encode_family(&[("backend", backend.name)])?
                .encode_gauge(&u64::from(backend.up))?;
        }
        type FsValue = fn(&crate::backend::FsCapacity) -> u64;
        let fs_gauges: [(&str, &str, Option<Unit>, FsValue); 4] = [
            (
                "backend_filesystem_size",
                "Size of the filesystem the backend allocates from.",
                Some(Unit::Bytes),
                |fs| fs.total_bytes,
            ),
            (
                "backend_filesystem_available",
                "Space available to new volumes on the backend's filesystem.",
                Some(Unit::Bytes),
                |fs| fs.available_bytes,
            ),
            (
                "backend_filesystem_inodes",
                "Inodes of the backend's filesystem.",
                None,
                |fs| fs.total_inodes,
            ),
            (
                "backend_filesystem_free_inodes",
                "Free inodes of the backend's filesystem.",
                None,
                |fs| fs.free_inodes,
            ),
        ];
        for (name, help, unit, value) in &fs_gauges {
            let mut family =
                encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
            for backend in &health.backends {
                if let Some(fs) = &backend.filesystem {
                    family
                        .encode_family(&[("backend", backend.name)])?
                        .encode_gauge(&value(fs))?;
                }
            }
        }

        if let Some(reconcile) = self.sampled.reconcile() {
            let mut findings = encoder.encode_descriptor(
                "reconcile_findings",
                "Differences the last reconciliation found between the store, the disk and the \
                 mount table, by kind (nothing is deleted; only size limits the filesystem lost \
                 are set again).",
                None,
                MetricType::Gauge,
            )?;
            for (kind, count) in [
                ("orphaned_storage", reconcile.report.orphaned_storage.len()),
                ("missing_storage", reconcile.report.missing_storage.len()),
                (
                    "lost_publications",
                    reconcile.report.lost_publications.len(),
                ),
                ("leftover_mounts", reconcile.report.leftover_mounts.len()),
                ("unresponsive", reconcile.report.unresponsive.len()),
                ("limits_restored", reconcile.report.limits_restored.len()),
                ("unenforced", reconcile.report.unenforced.len()),
            ] {
                findings
                    .encode_family(&[("kind", kind)])?
                    .encode_gauge(&(count as u64))?;
            }
            gauge(
                &mut encoder,
                "reconcile_timestamp",
                "When the last reconciliation finished (Unix time).",
                Some(&Unit::Seconds),
                reconcile.finished_unix,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_match_grpc() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::FailedPrecondition), "FailedPrecondition");
        // Our logs print codes with Debug; the names must agree so logs and metrics join.
        for code in [Code::NotFound, Code::Aborted, Code::Internal] {
            assert_eq!(code_name(code), format!("{code:?}"));
        }
    }
}
