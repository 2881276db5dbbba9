//! `k8scsi bench`: a load client that measures a k8scsi server over its real socket.
//!
//! By default it starts its own server (this same binary, `serve`) on temporary directories so
//! the numbers are reproducible with one command; `--endpoint` points it at a running server
//! instead. It runs CreateVolume+DeleteVolume cycles and (as root) NodePublish+NodeUnpublish
//! cycles at each requested concurrency and prints cycles/s, p50/p99 cycle latency and the
//! server's resident memory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use crate::client::{connect, mount_capability};
use crate::csi::proto::controller_client::ControllerClient;
use crate::csi::proto::node_client::NodeClient;
use crate::csi::proto::volume_capability::access_mode::Mode;
use crate::csi::proto::{self};
use crate::server::Endpoint;

/// Options of the bench run.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Measure an already running server instead of starting one.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// PID of that server, to report its memory.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Concurrency levels to run, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub concurrency: Vec<usize>,
    /// Seconds each workload runs at each concurrency.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Workloads to run, comma separated: create-delete, publish-unpublish, rpc-pair (two
    /// ControllerGetCapabilities calls per cycle: the gRPC transport alone, a floor for the
    /// others).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "create-delete,publish-unpublish"
    )]
    pub workloads: Vec<String>,
    /// StorageClass parameters for created volumes, `key=value`, repeatable (default:
    /// `enforceCapacity=false`), e.g. `--param type=shared --param source=/srv --param
    /// fsType=none`.
    #[arg(long = "param", value_parser = parse_param)]
    pub params: Vec<(String, String)>,
    /// Log level of the spawned server (its log goes to a file in the temp directory).
    #[arg(long, default_value = "info")]
    pub server_log_level: String,
}

struct Spawned {
    child: std::process::Child,
    _dir: tempfile_dir::TempDir,
}

/// A tiny temp-dir guard (the bench ships in the binary, so it cannot use dev-dependencies).
mod tempfile_dir {
    use std::path::{Path, PathBuf};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new() -> std::io::Result<TempDir> {
            let path = std::env::temp_dir().join(format!(
                "k8scsi-bench-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or_default()
            ));
            std::fs::create_dir_all(&path)?;
            Ok(TempDir(path))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Spawned {
    /// Stops the server with SIGTERM and returns its closing statistics line, if any.
    fn stop(mut self) -> Option<String> {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32)?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).ok()?;
        self.child.wait().ok()?;
        let log = std::fs::read_to_string(self._dir.path().join("server.log")).ok()?;
        log.lines()
            .rev()
            .find(|l| l.contains("group-commit"))
            .map(str::to_string)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of a process in KiB: (current, peak).
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The bench's temp directory is rarely on btrfs: measure unenforced directory volumes, the
/// same work minus the qgroup call.
fn bench_parameters() -> std::collections::HashMap<String, String> {
    match PARAMETERS.get() {
        Some(p) if !p.is_empty() => p.clone(),
        _ => [("enforceCapacity".to_string(), "false".to_string())].into(),
    }
}

/// The `--param` values of this run (set once at its start).
static PARAMETERS: std::sync::OnceLock<std::collections::HashMap<String, String>> =
    std::sync::OnceLock::new();

fn parse_param(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{raw:?} is not key=value"))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

#[derive(Default)]
struct Outcome {
    cycles: usize,
    errors: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Outcome {
    /// Counts one cycle that began at `started`.
    fn record(&mut self, started: Instant, ok: bool) {
        if ok {
            self.cycles += 1;
            self.latencies.push(started.elapsed());
        } else {
            self.errors += 1;
        }
    }
}

fn report(label: &str, concurrency: usize, outcome: &mut Outcome) {
    outcome.latencies.sort();
    println!(
        "{label:<22} c={concurrency:<3} cycles={:<7} errors={:<4} {:>8.0} cycles/s  p50={:>7.2}ms  p99={:>7.2}ms",
        outcome.cycles,
        outcome.errors,
        outcome.cycles as f64 / outcome.elapsed.as_secs_f64(),
        percentile(&outcome.latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&outcome.latencies, 0.99).as_secs_f64() * 1e3,
    );
}

async fn create_delete(channel: Channel, worker: usize, until: Instant) -> Outcome {
    let mut client = ControllerClient::new(channel);
    let mut outcome = Outcome::default();
    let mut i = 0u64;
    while Instant::now() < until {
        let started = Instant::now();
        let name = format!("bench-{worker}-{i}");
        i += 1;
        let created = client
            .create_volume(proto::CreateVolumeRequest {
                name,
                capacity_range: Some(proto::CapacityRange {
                    required_bytes: 1 << 20,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![mount_capability(Mode::SingleNodeWriter, vec![])],
                parameters: bench_parameters(),
                ..Default::default()
            })
            .await;
        let ok = match created {
            Ok(r) => {
                let id = r
                    .into_inner()
                    .volume
                    .map(|v| v.volume_id)
                    .unwrap_or_default();
                client
                    .delete_volume(proto::DeleteVolumeRequest {
                        volume_id: id,
                        secrets: Default::default(),
                    })
                    .await
                    .is_ok()
            }
            Err(_) => false,
        };
        outcome.record(started, ok);
    }
    outcome
}

/// One HTTP/2 connection per worker, as independent sidecars would use.
async fn connect_each(endpoint: &Endpoint, workers: usize) -> Result<Vec<Channel>, String> {
    let mut channels = Vec::with_capacity(workers);
    for _ in 0..workers {
        channels.push(connect(endpoint).await.map_err(|e| e.to_string())?);
    }
    Ok(channels)
}

/// Two cheap calls per cycle: what the transport costs without any storage work.
async fn rpc_pair(channel: Channel, until: Instant) -> Outcome {
    let mut client = ControllerClient::new(channel);
    let mut outcome = Outcome::default();
    while Instant::now() < until {
        let started = Instant::now();
        let ok = client
            .controller_get_capabilities(proto::ControllerGetCapabilitiesRequest {})
            .await
            .is_ok()
            && client
                .controller_get_capabilities(proto::ControllerGetCapabilitiesRequest {})
                .await
                .is_ok();
        outcome.record(started, ok);
    }
    outcome
}

async fn publish_unpublish(
    channel: Channel,
    volume_id: String,
    target: String,
    until: Instant,
) -> Outcome {
    let mut client = NodeClient::new(channel);
    let mut outcome = Outcome::default();
    while Instant::now() < until {
        let started = Instant::now();
        let published = client
            .node_publish_volume(proto::NodePublishVolumeRequest {
                volume_id: volume_id.clone(),
                target_path: target.clone(),
                volume_capability: Some(mount_capability(Mode::SingleNodeWriter, vec![])),
                ..Default::default()
            })
            .await;
        let ok = published.is_ok()
            && client
                .node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
                    volume_id: volume_id.clone(),
                    target_path: target.clone(),
                })
                .await
                .is_ok();
        outcome.record(started, ok);
    }
    outcome
}

async fn run_workload<F, Fut>(concurrency: usize, seconds: u64, make: F) -> Outcome
where
    F: Fn(usize, Instant) -> Fut,
    Fut: std::future::Future<Output = Outcome> + Send + 'static,
{
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..concurrency)
        .map(|w| tokio::spawn(make(w, until)))
        .collect();
    let mut total = Outcome {
        cycles: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
    };
    for t in tasks {
        if let Ok(o) = t.await {
            total.cycles += o.cycles;
            total.errors += o.errors;
            total.latencies.extend(o.latencies);
        }
    }
    total.elapsed = started.elapsed();
    total
}

fn spawn_server(dir: &Path, log_level: &str) -> Result<(std::process::Child, PathBuf), String> {
    spawn_server_on(dir, &dir.join("data"), log_level)
}

fn spawn_server_on(
    dir: &Path,
    data_dir: &Path,
    log_level: &str,
) -> Result<(std::process::Child, PathBuf), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let socket = dir.join("csi.sock");
    let log = std::fs::File::create(dir.join("server.log")).map_err(|e| e.to_string())?;
    let child = std::process::Command::new(exe)
        .arg("serve")
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .arg("--node-id")
        .arg("bench-node")
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--kubelet-dir")
        .arg(dir.join("kubelet"))
        .arg("--log-level")
        .arg(log_level)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting server: {e}"))?;
    Ok((child, socket))
}

/// Runs the benchmark and prints its numbers.
pub async fn run(args: BenchArgs) -> Result<(), String> {
    let _ = PARAMETERS.set(args.params.iter().cloned().collect());
    let mut spawned = None;
    let (endpoint, pid, kubelet_dir) = match &args.endpoint {
        Some(raw) => (Endpoint::parse(raw)?, args.server_pid, None),
        None => {
            let dir = tempfile_dir::TempDir::new().map_err(|e| e.to_string())?;
            let (child, socket) = spawn_server(dir.path(), &args.server_log_level)?;
            let pid = child.id();
            let kubelet = dir.path().join("kubelet");
            spawned = Some(Spawned { child, _dir: dir });
            let deadline = Instant::now() + Duration::from_secs(10);
            while !socket.exists() {
                if Instant::now() > deadline {
                    return Err("server did not create its socket within 10s".into());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (Endpoint::Unix(socket), Some(pid), Some(kubelet))
        }
    };
    let channel = connect(&endpoint).await.map_err(|e| e.to_string())?;
    println!(
        "k8scsi bench {} on {} cores, {}s per workload",
        env!("CARGO_PKG_VERSION"),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        args.seconds
    );
    let show_rss = |label: &str| {
        if let Some((rss, peak)) = pid.and_then(rss_kib) {
            println!(
                "server RSS {label:<24} {:>6.1} MiB (peak {:.1} MiB)",
                rss as f64 / 1024.0,
                peak as f64 / 1024.0
            );
        }
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    show_rss("idle after start");

    let wants = |w: &str| args.workloads.iter().any(|x| x == w);
    for &c in args.concurrency.iter().filter(|_| wants("create-delete")) {
        let channels = connect_each(&endpoint, c).await?;
        let mut outcome = run_workload(c, args.seconds, |w, until| {
            create_delete(channels[w].clone(), w, until)
        })
        .await;
        report("create+delete", c, &mut outcome);
    }
    show_rss("after create+delete");
    for &c in args.concurrency.iter().filter(|_| wants("rpc-pair")) {
        let channels = connect_each(&endpoint, c).await?;
        let mut outcome = run_workload(c, args.seconds, |w, until| {
            rpc_pair(channels[w].clone(), until)
        })
        .await;
        report("rpc pair", c, &mut outcome);
    }

    let is_root = rustix::process::geteuid().is_root();
    match (&kubelet_dir, is_root) {
        _ if !wants("publish-unpublish") => {}
        (Some(kubelet), true) => {
            let mut controller = ControllerClient::new(channel.clone());
            let max_c = args.concurrency.iter().copied().max().unwrap_or(1);
            let mut volumes = Vec::new();
            for w in 0..max_c {
                let v = controller
                    .create_volume(proto::CreateVolumeRequest {
                        name: format!("bench-publish-{w}"),
                        volume_capabilities: vec![mount_capability(Mode::SingleNodeWriter, vec![])],
                        parameters: bench_parameters(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner()
                    .volume
                    .map(|v| v.volume_id)
                    .unwrap_or_default();
                let parent = kubelet.join(format!("pods/bench-{w}"));
                std::fs::create_dir_all(&parent).map_err(|e| e.to_string())?;
                volumes.push((v, parent.join("mount").to_string_lossy().into_owned()));
            }
            for &c in &args.concurrency {
                let channels = connect_each(&endpoint, c).await?;
                let mut outcome = run_workload(c, args.seconds, |w, until| {
                    publish_unpublish(
                        channels[w].clone(),
                        volumes[w].0.clone(),
                        volumes[w].1.clone(),
                        until,
                    )
                })
                .await;
                report("publish+unpublish", c, &mut outcome);
            }
            show_rss("after publish+unpublish");
        }
        (None, _) => {
            println!("publish+unpublish skipped: only measured on a server the bench starts")
        }
        (_, false) => println!("publish+unpublish skipped: bind mounts need root"),
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    show_rss("idle at end");
    if let Some(line) = spawned.and_then(Spawned::stop) {
        println!("server: {line}");
    }
    Ok(())
}

/// Options of `k8scsi bench-snapshots`.
#[derive(Debug, Clone, clap::Args)]
pub struct SnapshotBenchArgs {
    /// Data directory of the spawned server: put it on the filesystem to measure (XFS with
    /// reflink=1, btrfs, ext4). Volumes and snapshots made here are deleted at the end.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Backend to measure: `loop` (raw block image volumes), `dir`, or `shared` (the share is
    /// `<data-dir>/bench-share`, a directory on the same filesystem, bind-mounted as
    /// `fsType: none`).
    #[arg(long, default_value = "loop")]
    pub backend: String,
    /// Volume sizes in GiB, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,10")]
    pub sizes_gib: Vec<u64>,
    /// MiB of data written into each volume before it is snapshotted (at most its size; 0
    /// fills it).
    #[arg(long, default_value_t = 1024)]
    pub fill_mib: u64,
    /// Snapshot + restore rounds per size.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Log level of the spawned server.
    #[arg(long, default_value = "info")]
    pub server_log_level: String,
}

/// Writes `mib` MiB of non-zero data to the start of `path` (created if missing) and syncs it.
fn fill(path: &Path, mib: u64) -> Result<(), String> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut chunk = vec![0u8; 1 << 20];
    for (i, b) in chunk.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2654435761) >> 7) as u8 | 1;
    }
    for _ in 0..mib {
        file.write_all(&chunk)
            .map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    file.sync_all()
        .map_err(|e| format!("fsync {}: {e}", path.display()))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    percentile(&v, 0.5)
}

/// `k8scsi bench-snapshots`: for each size, creates a volume, writes data into it, then times
/// CreateSnapshot and CreateVolume-from-snapshot (restore) over the real socket, and prints the
/// medians with the mechanism the server reported in its log.
pub async fn run_snapshots(args: SnapshotBenchArgs) -> Result<(), String> {
    let dir = tempfile_dir::TempDir::new().map_err(|e| e.to_string())?;
    let (child, socket) = spawn_server_on(dir.path(), &args.data_dir, &args.server_log_level)?;
    let spawned = Spawned { child, _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            return Err("server did not create its socket within 10s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let channel = connect(&Endpoint::Unix(socket))
        .await
        .map_err(|e| e.to_string())?;
    let mut c = ControllerClient::new(channel);
    let log_path = spawned._dir.path().join("server.log");
    let (capability, mut parameters) = match args.backend.as_str() {
        "loop" => (
            proto::VolumeCapability {
                access_type: Some(proto::volume_capability::AccessType::Block(
                    proto::volume_capability::BlockVolume {},
                )),
                access_mode: Some(proto::volume_capability::AccessMode {
                    mode: Mode::SingleNodeWriter as i32,
                }),
            },
            std::collections::HashMap::from([("type".to_string(), "loop".to_string())]),
        ),
        "dir" => (
            mount_capability(Mode::SingleNodeWriter, vec![]),
            std::collections::HashMap::new(),
        ),
        "shared" => {
            let share = args.data_dir.join("bench-share");
            std::fs::create_dir_all(&share)
                .map_err(|e| format!("mkdir {}: {e}", share.display()))?;
            (
                mount_capability(Mode::MultiNodeMultiWriter, vec![]),
                std::collections::HashMap::from([
                    ("type".to_string(), "shared".to_string()),
                    ("source".to_string(), share.to_string_lossy().into_owned()),
                    ("fsType".to_string(), "none".to_string()),
                ]),
            )
        }
        other => return Err(format!("unknown backend {other:?} (loop, dir or shared)")),
    };
    if args.backend == "dir" && !crate::backend::btrfs::is_btrfs(&args.data_dir) {
        // Sizes are enforced only on btrfs here: measure unenforced directories elsewhere.
        parameters.insert("enforceCapacity".into(), "false".into());
    }
    let fs = rustix::fs::statfs(&args.data_dir)
        .map(|st| format!("{:#x}", st.f_type))
        .unwrap_or_default();
    println!(
        "data dir {} (fs type {fs}), backend {}",
        args.data_dir.display(),
        args.backend
    );
    let status = |e: tonic::Status| format!("{}: {}", e.code(), e.message());
    for &gib in &args.sizes_gib {
        let bytes = gib << 30;
        let create =
            |name: String, source: Option<proto::VolumeContentSource>| proto::CreateVolumeRequest {
                name,
                capacity_range: Some(proto::CapacityRange {
                    required_bytes: bytes as i64,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![capability.clone()],
                parameters: parameters.clone(),
                volume_content_source: source,
                ..Default::default()
            };
        let volume = c
            .create_volume(create(format!("bench-snap-src-{gib}"), None))
            .await
            .map_err(status)?
            .into_inner()
            .volume
            .unwrap_or_default();
        let target = match args.backend.as_str() {
            "loop" => args
                .data_dir
                .join("images")
                .join(format!("{}.block", volume.volume_id)),
            // A shared volume's directory is named after the volume (no subDir template).
            "shared" => args
                .data_dir
                .join("bench-share")
                .join(format!("bench-snap-src-{gib}"))
                .join("data"),
            _ => args
                .data_dir
                .join("volumes")
                .join(&volume.volume_id)
                .join("data"),
        };
        // 0 fills the whole volume; a directory keeps 10% free for the filesystem's own use
        // (a btrfs qgroup counts metadata too).
        let room = if args.backend != "loop" {
            (gib << 10) * 9 / 10
        } else {
            gib << 10
        };
        let fill_mib = match args.fill_mib {
            0 => room,
            n => n.min(room),
        };
        fill(&target, fill_mib)?;
        let (mut snaps, mut readies, mut restores) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..args.rounds {
            let started = Instant::now();
            let snapshot = c
                .create_snapshot(proto::CreateSnapshotRequest {
                    source_volume_id: volume.volume_id.clone(),
                    name: format!("bench-snap-{gib}-{round}"),
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner()
                .snapshot
                .unwrap_or_default();
            snaps.push(started.elapsed());
            // A full copy of an unstaged volume finishes in the background: poll until ready
            // (a restore before that is ABORTED).
            let mut ready_to_use = snapshot.ready_to_use;
            while !ready_to_use {
                tokio::time::sleep(Duration::from_millis(20)).await;
                ready_to_use = c
                    .get_snapshot(proto::GetSnapshotRequest {
                        snapshot_id: snapshot.snapshot_id.clone(),
                        secrets: Default::default(),
                    })
                    .await
                    .map_err(status)?
                    .into_inner()
                    .snapshot
                    .is_some_and(|s| s.ready_to_use);
            }
            readies.push(started.elapsed());
            let source = proto::VolumeContentSource {
                r#type: Some(proto::volume_content_source::Type::Snapshot(
                    proto::volume_content_source::SnapshotSource {
                        snapshot_id: snapshot.snapshot_id.clone(),
                    },
                )),
            };
            let started = Instant::now();
            let restored = c
                .create_volume(create(format!("bench-restore-{gib}-{round}"), Some(source)))
                .await
                .map_err(status)?
                .into_inner()
                .volume
                .unwrap_or_default();
            restores.push(started.elapsed());
            c.delete_volume(proto::DeleteVolumeRequest {
                volume_id: restored.volume_id,
                secrets: Default::default(),
            })
            .await
            .map_err(status)?;
            c.delete_snapshot(proto::DeleteSnapshotRequest {
                snapshot_id: snapshot.snapshot_id,
                secrets: Default::default(),
            })
            .await
            .map_err(status)?;
        }
        c.delete_volume(proto::DeleteVolumeRequest {
            volume_id: volume.volume_id,
            secrets: Default::default(),
        })
        .await
        .map_err(status)?;
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let mechanism = log
            .lines()
            .rev()
            .find(|l| l.contains("snapshot taken"))
            .and_then(|l| l.split("mechanism=").nth(1))
            .and_then(|m| m.split_whitespace().next())
            .unwrap_or("?")
            .trim_matches('"')
            .to_string();
        println!(
            "{:>3} GiB volume, {fill_mib:>5} MiB written  mechanism={mechanism:<15} snapshot answer p50={:>9.1}ms max={:>9.1}ms  ready p50={:>9.1}ms max={:>9.1}ms  restore p50={:>9.1}ms max={:>9.1}ms  ({} rounds)",
            gib,
            median(snaps.clone()).as_secs_f64() * 1e3,
            snaps
                .iter()
                .max()
                .copied()
                .unwrap_or_default()
                .as_secs_f64()
                * 1e3,
            median(readies.clone()).as_secs_f64() * 1e3,
            readies
                .iter()
                .max()
                .copied()
                .unwrap_or_default()
                .as_secs_f64()
                * 1e3,
            median(restores.clone()).as_secs_f64() * 1e3,
            restores
                .iter()
                .max()
                .copied()
                .unwrap_or_default()
                .as_secs_f64()
                * 1e3,
            args.rounds,
        );
    }
    spawned.stop();
    Ok(())
}
