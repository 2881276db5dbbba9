//! `volumes list|show`, `snapshots list` and `usage`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::{NodeDirs, Output, format_unix, open_store, print_table};
use crate::backend::dir::DirBackend;
use crate::backend::{Backend, Usage};
use crate::engine::ids::VolumeId;
use crate::engine::params::{PV_NAME, PVC_NAME, PVC_NAMESPACE};
use crate::mount::{Probes, mountinfo};
use crate::store::{PublicationRecord, VolumeRecord};
use crate::units::format_size;

/// How long one look at a volume's storage may take: a dead filesystem mounted over a volume
/// blocks the call for ever, and an operator's command must still answer about the others.
const LOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// `namespace/pvc` when the provisioner told us, else `-`.
fn claim(record: &VolumeRecord) -> String {
    match (
        record.metadata.get(PVC_NAMESPACE),
        record.metadata.get(PVC_NAME),
    ) {
        (Some(ns), Some(pvc)) => format!("{ns}/{pvc}"),
        (None, Some(pvc)) => pvc.clone(),
        _ => "-".to_string(),
    }
}

fn print_json(value: &impl Serialize) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    out!("{text}");
    Ok(())
}

/// `k8scsi volumes list`.
pub fn list(dirs: &NodeDirs, output: Output) -> Result<(), String> {
    let store = open_store(dirs)?;
    let publications = store.publications_by_volume();
    let volumes = store.volumes;
    if output == Output::Json {
        #[derive(Serialize)]
        struct Entry<'a> {
            #[serde(flatten)]
            record: &'a VolumeRecord,
            publications: &'a [PublicationRecord],
        }
        let entries: Vec<Entry> = volumes
            .iter()
            .map(|record| Entry {
                record,
                publications: publications
                    .get(&record.id)
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
            })
            .collect();
        return print_json(&entries);
    }
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            vec![
                v.id.clone(),
                v.name.clone(),
                format_size(v.capacity_bytes),
                claim(v),
                publications.get(&v.id).map_or(0, Vec::len).to_string(),
                format_unix(v.created_unix),
            ]
        })
        .collect();
    print_table(
        &[
            "VOLUME ID",
            "NAME",
            "CAPACITY",
            "PVC",
            "PUBLISHED",
            "CREATED",
        ],
        &rows,
    );
    let published = volumes
        .iter()
        .filter(|v| publications.contains_key(&v.id))
        .count();
    out!(
        "{} volume{}, {published} published",
        volumes.len(),
        if volumes.len() == 1 { "" } else { "s" }
    );
    Ok(())
}

/// What `volumes show` reports beyond the record.
#[derive(Debug, Serialize)]
struct VolumeDetails {
    #[serde(flatten)]
    record: VolumeRecord,
    /// `None` for volumes of backends this command does not inspect.
    storage_path: Option<String>,
    storage_present: bool,
    used_bytes: Option<u64>,
    used_inodes: Option<u64>,
    publications: Vec<PublicationDetails>,
}

#[derive(Debug, Serialize)]
struct PublicationDetails {
    #[serde(flatten)]
    record: PublicationRecord,
    /// Whether the mount table shows the volume at the path.
    mounted: bool,
}

/// `k8scsi volumes show VOLUME`.
pub fn show(dirs: &NodeDirs, wanted: &str, output: Output) -> Result<(), String> {
    let store = open_store(dirs)?;
    let record = store.find_volume(wanted).cloned().ok_or_else(|| {
        format!(
            "no volume with ID or name {wanted:?} in the store in {}",
            dirs.state_dir.display()
        )
    })?;
    let publications = store
        .publications_by_volume()
        .remove(&record.id)
        .unwrap_or_default();
    let backend = DirBackend::at(&dirs.data_dir);
    let id = VolumeId::parse(&record.id).map_err(|e| format!("stored volume ID: {e}"))?;
    // Only directory volumes are inspected here; other backends keep their storage elsewhere.
    let inspectable = id.backend() == backend.name();
    let storage = backend.volume_path(&id);
    let (present, usage) = if inspectable {
        let (b, i) = (backend.clone(), id.clone());
        let key = storage.to_string_lossy().into_owned();
        let look = Arc::new(Probes::default()).run(&key, LOOK_TIMEOUT, move || {
            let present = b.exists(&i).unwrap_or(false);
            (present, present.then(|| b.usage(&i).ok()).flatten())
        });
        look.unwrap_or_else(|_| {
            eprintln!(
                "k8scsi: {} does not answer within {LOOK_TIMEOUT:?} (hung filesystem?)",
                storage.display()
            );
            (false, None)
        })
    } else {
        (false, None)
    };
    let table = mountinfo::read().unwrap_or_default();
    let mounts: Vec<String> = mountinfo::bind_mounts_of(&table, &storage)
        .into_iter()
        .map(|e| e.mount_point.to_string_lossy().into_owned())
        .collect();
    let details = VolumeDetails {
        storage_path: inspectable.then(|| storage.display().to_string()),
        storage_present: present,
        used_bytes: usage.map(|u| u.used_bytes),
        used_inodes: usage.map(|u| u.used_inodes),
        publications: publications
            .into_iter()
            .map(|p| PublicationDetails {
                mounted: mounts.contains(&p.path),
                record: p,
            })
            .collect(),
        record,
    };
    if output == Output::Json {
        return print_json(&details);
    }
    let r = &details.record;
    let field = |name: &str, value: &str| out!("{:<12} {value}", format!("{name}:"));
    field("ID", &r.id);
    field("Name", &r.name);
    field("Backend", &r.backend);
    field(
        "Capacity",
        &format!(
            "{} ({} bytes)",
            format_size(r.capacity_bytes),
            r.capacity_bytes
        ),
    );
    field("Access", &r.access_modes.join(", "));
    field("Node", &r.accessible_node);
    field("Created", &format_unix(r.created_unix));
    if let Some(pv) = r.metadata.get(PV_NAME) {
        field("PV", pv);
    }
    if r.metadata.contains_key(PVC_NAME) {
        field("PVC", &claim(r));
    }
    let parameters: Vec<String> = r
        .parameters
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    field(
        "Parameters",
        &if parameters.is_empty() {
            "-".to_string()
        } else {
            parameters.join(" ")
        },
    );
    field(
        "Storage",
        &match &details.storage_path {
            Some(path) if details.storage_present => format!("{path} (present)"),
            Some(path) => format!("{path} (MISSING)"),
            None => format!("kept by the {:?} backend (not inspected here)", r.backend),
        },
    );
    if let (Some(bytes), Some(inodes)) = (details.used_bytes, details.used_inodes) {
        field(
            "Used",
            &format!("{} ({bytes} bytes), {inodes} inodes", format_size(bytes)),
        );
    }
    if details.publications.is_empty() {
        field("Published", "-");
    }
    for (i, p) in details.publications.iter().enumerate() {
        let line = format!(
            "{} ({}, {}{}) {}",
            p.record.path,
            if p.record.readonly { "ro" } else { "rw" },
            p.record.access_mode,
            if p.record.mount_flags.is_empty() {
                String::new()
            } else {
                format!(", {}", p.record.mount_flags.join(","))
            },
            if p.mounted { "mounted" } else { "NOT MOUNTED" }
        );
        if i == 0 {
            field("Published", &line);
        } else {
            out!("{:<12} {line}", "");
        }
    }
    // Mounts of the volume that no publication explains.
    for mount in mounts
        .iter()
        .filter(|m| !details.publications.iter().any(|p| &&p.record.path == m))
    {
        field(
            "Leftover",
            &format!("{mount} (mounted, no publication record)"),
        );
    }
    Ok(())
}

/// Sort orders of `k8scsi usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SortKey {
    /// Bytes used.
    Used,
    /// Used bytes as a share of capacity.
    Percent,
    /// Inodes used.
    Inodes,
    /// Capacity.
    Capacity,
    /// Volume name.
    Name,
}

#[derive(Debug, Serialize)]
struct UsageRow {
    volume_id: String,
    name: String,
    pvc: String,
    capacity_bytes: u64,
    used_bytes: Option<u64>,
    used_inodes: Option<u64>,
    /// Used bytes as a percentage of capacity (None when capacity is unset or unmeasured).
    used_percent: Option<f64>,
}

/// Usage of each volume's storage (`None` where it cannot be measured), each look bounded by
/// [`LOOK_TIMEOUT`] and run on a few worker threads, so hung volumes cost about one timeout
/// per few of them and are named on stderr.
fn measure_all(backend: &DirBackend, records: &[VolumeRecord]) -> Vec<Option<Usage>> {
    let items: Vec<(String, Option<VolumeId>)> = records
        .iter()
        .map(|r| {
            let id = VolumeId::parse(&r.id).ok();
            let key = match &id {
                Some(id) => backend.volume_path(id).to_string_lossy().into_owned(),
                None => r.id.clone(),
            };
            (key, id)
        })
        .collect();
    let b = backend.clone();
    let measured = Arc::new(Probes::default()).run_each(
        items,
        LOOK_TIMEOUT,
        Arc::new(move |id: Option<VolumeId>| id.and_then(|id| b.usage(&id).ok())),
    );
    records
        .iter()
        .zip(measured)
        .map(|(record, result)| {
            result.unwrap_or_else(|_| {
                eprintln!(
                    "k8scsi: the storage of {} does not answer within {LOOK_TIMEOUT:?} (hung filesystem?)",
                    record.id
                );
                None
            })
        })
        .collect()
}

/// `k8scsi usage`.
pub fn usage(dirs: &NodeDirs, sort: SortKey, output: Output) -> Result<(), String> {
    let volumes = open_store(dirs)?.volumes;
    check_data_dir(&dirs.data_dir)?;
    let backend = DirBackend::at(&dirs.data_dir);
    let measured = measure_all(&backend, &volumes);
    let mut rows: Vec<UsageRow> = volumes
        .iter()
        .zip(measured)
        .map(|(v, used)| UsageRow {
            volume_id: v.id.clone(),
            name: v.name.clone(),
            pvc: claim(v),
            capacity_bytes: v.capacity_bytes,
            used_bytes: used.map(|u| u.used_bytes),
            used_inodes: used.map(|u| u.used_inodes),
            used_percent: used
                .filter(|_| v.capacity_bytes > 0)
                .map(|u| u.used_bytes as f64 * 100.0 / v.capacity_bytes as f64),
        })
        .collect();
    match sort {
        SortKey::Used => rows.sort_by_key(|r| std::cmp::Reverse(r.used_bytes)),
        SortKey::Inodes => rows.sort_by_key(|r| std::cmp::Reverse(r.used_inodes)),
        SortKey::Capacity => rows.sort_by_key(|r| std::cmp::Reverse(r.capacity_bytes)),
        SortKey::Percent => rows.sort_by(|a, b| {
            b.used_percent
                .unwrap_or(-1.0)
                .total_cmp(&a.used_percent.unwrap_or(-1.0))
        }),
        SortKey::Name => rows.sort_by(|a, b| a.name.cmp(&b.name)),
    }
    if output == Output::Json {
        return print_json(&rows);
    }
    let dash = || "-".to_string();
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.volume_id.clone(),
                r.pvc.clone(),
                format_size(r.capacity_bytes),
                r.used_bytes.map(format_size).unwrap_or_else(dash),
                r.used_percent
                    .map(|p| format!("{p:.1}%"))
                    .unwrap_or_else(dash),
                r.used_inodes.map(|i| i.to_string()).unwrap_or_else(dash),
            ]
        })
        .collect();
    print_table(
        &["VOLUME ID", "PVC", "CAPACITY", "USED", "USE%", "INODES"],
        &table,
    );
    let used: u64 = rows.iter().filter_map(|r| r.used_bytes).sum();
    let capacity: u64 = rows.iter().map(|r| r.capacity_bytes).sum();
    let unmeasured = rows.iter().filter(|r| r.used_bytes.is_none()).count();
    out!(
        "{} volumes: {} used of {} promised{}",
        rows.len(),
        format_size(used),
        format_size(capacity),
        if unmeasured > 0 {
            format!("; {unmeasured} could not be measured (storage missing?)")
        } else {
            String::new()
        }
    );
    Ok(())
}

fn check_data_dir(data_dir: &Path) -> Result<(), String> {
    if data_dir.join("volumes").is_dir() {
        Ok(())
    } else {
        Err(format!(
            "{} has no volumes directory: is --data-dir (K8SCSI_DATA_DIR) the server's?",
            data_dir.display()
        ))
    }
}

/// Field names a snapshot record may use for each column, most likely first.
const SNAPSHOT_COLUMNS: [(&str, &[&str]); 4] = [
    (
        "SOURCE VOLUME",
        &["source_volume_id", "source_volume", "volume_id"],
    ),
    ("SIZE", &["size_bytes", "size"]),
    ("CREATED", &["created_unix", "creation_time"]),
    ("READY", &["ready_to_use", "ready"]),
];

/// `k8scsi snapshots list`. Snapshot records are read generically (JSON), so this command
/// lists them whatever fields the store's snapshot records carry.
pub fn snapshots(dirs: &NodeDirs, output: Output) -> Result<(), String> {
    let Some(snapshots) = open_store(dirs)?.snapshots else {
        if output == Output::Json {
            return print_json(&BTreeMap::<String, serde_json::Value>::new());
        }
        out!(
            "0 snapshots (this store has no snapshot records: the server that wrote it does not \
             take snapshots)"
        );
        return Ok(());
    };
    if output == Output::Json {
        let map: BTreeMap<String, serde_json::Value> = snapshots.into_iter().collect();
        return print_json(&map);
    }
    if snapshots.is_empty() {
        out!("0 snapshots");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = snapshots
        .iter()
        .map(|(id, value)| {
            let mut row = vec![id.clone()];
            for (column, keys) in SNAPSHOT_COLUMNS {
                let cell = keys.iter().find_map(|k| value.get(*k)).map(|v| match v {
                    serde_json::Value::Number(n) if column == "SIZE" => {
                        n.as_u64().map(format_size).unwrap_or_else(|| n.to_string())
                    }
                    serde_json::Value::Number(n) if column == "CREATED" => {
                        n.as_u64().map(format_unix).unwrap_or_else(|| n.to_string())
                    }
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
                row.push(cell.unwrap_or_else(|| "-".to_string()));
            }
            row
        })
        .collect();
    let mut header = vec!["SNAPSHOT ID"];
    header.extend(SNAPSHOT_COLUMNS.iter().map(|(c, _)| *c));
    print_table(&header, &rows);
    out!("{} snapshots", rows.len());
    Ok(())
}
