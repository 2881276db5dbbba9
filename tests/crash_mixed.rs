//! Fault harness: a mixed node and controller workload under SIGKILL.
//!
//! N workers drive volumes of several kinds (plain directories, ext4 loop images, raw block loop
//! images) through their whole life: create, expand, stage, publish, write data through the real
//! mount (fsynced), unpublish, unstage, delete. The test SIGKILLs the server at random points,
//! restarts it, and after each round checks that
//! - every acknowledged operation holds: created volumes are listed and have storage, deleted
//!   ones have neither, published volumes are still mounted and show the last data written;
//! - no volume is listed twice and every listed volume belongs to a name we used;
//! - retrying each interrupted call succeeds, after which the listed volumes, the storage on
//!   disk, the mounts under this test's directory and the loop devices backing this test's
//!   images are exactly what the acknowledged states say.
//!
//! At the end every volume is staged and published once more, its data checked, and then
//! everything is torn down; nothing may remain (storage, mounts, loop devices).
//!
//! Knobs: `K8SCSI_CRASH_SEED` (replays the choices of operations and kill delays; timing still
//! varies), `K8SCSI_CRASH_ROUNDS`, `K8SCSI_CRASH_WORKERS`. Adding a kind (snapshot restore,
//! shared volumes) means adding a [`Kind`] variant with its parameters, capability and the
//! storage/mount/device it is expected to leave at each [`At`] position.
//!
//! Needs root, losetup and mkfs.ext4; skips with a printed reason otherwise (fails in CI).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::Driver;
use common::fault::{Rng, env_u64};
use k8scsi::client::mount_capability;
use k8scsi::csi::proto::controller_client::ControllerClient;
use k8scsi::csi::proto::node_client::NodeClient;
use k8scsi::csi::proto::volume_capability::access_mode::Mode;
use k8scsi::csi::proto::volume_capability::{AccessMode, AccessType, BlockVolume};
use k8scsi::csi::proto::{self, VolumeCapability};
use k8scsi::engine::ids::VolumeId;
use tonic::transport::Channel;
use tonic::{Code, Status};

const DEFAULT_ROUNDS: u64 = 12;
const DEFAULT_WORKERS: usize = 4;
/// Volumes each worker keeps in play at once.
const SLOTS: usize = 3;
const MIB: i64 = 1 << 20;
/// Generous: the box is loaded and mkfs/losetup are slow there.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// What a volume is. Each kind knows how it is created and what it leaves on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    Ext4,
    Block,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Dir, Kind::Ext4, Kind::Block];

    fn tag(self) -> &'static str {
        match self {
            Kind::Dir => "dir",
            Kind::Ext4 => "ext4",
            Kind::Block => "block",
        }
    }

    fn backend(self) -> &'static str {
        match self {
            Kind::Dir => "dir",
            Kind::Ext4 | Kind::Block => "loop",
        }
    }

    fn initial_bytes(self) -> i64 {
        match self {
            Kind::Dir => MIB,
            Kind::Ext4 => 8 * MIB,
            Kind::Block => 4 * MIB,
        }
    }

    fn expand_step(self) -> i64 {
        match self {
            Kind::Dir => MIB,
            Kind::Ext4 | Kind::Block => 4 * MIB,
        }
    }

    fn parameters(self) -> std::collections::HashMap<String, String> {
        match self {
            Kind::Dir => common::unenforced(),
            Kind::Ext4 | Kind::Block => [("type".to_string(), "loop".to_string())].into(),
        }
    }

    fn capability(self) -> VolumeCapability {
        match self {
            Kind::Dir => mount_capability(Mode::SingleNodeWriter, vec![]),
            Kind::Ext4 => {
                let mut cap = mount_capability(Mode::SingleNodeWriter, vec![]);
                if let Some(AccessType::Mount(m)) = cap.access_type.as_mut() {
                    m.fs_type = "ext4".to_string();
                }
                cap
            }
            Kind::Block => VolumeCapability {
                access_type: Some(AccessType::Block(BlockVolume {})),
                access_mode: Some(AccessMode {
                    mode: Mode::SingleNodeWriter as i32,
                }),
            },
        }
    }

    /// Whether staging mounts something at the staging path.
    fn stage_mounts(self) -> bool {
        self == Kind::Ext4
    }

    /// Whether a staged volume holds a loop device.
    fn stage_attaches(self) -> bool {
        matches!(self, Kind::Ext4 | Kind::Block)
    }
}

/// Where a volume's acknowledged life stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum At {
    Absent,
    Created,
    Staged,
    Published,
}

/// Calls the workload sends (writes are done by the test itself and cannot be interrupted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Create,
    Expand(i64),
    Stage,
    Publish,
    Unpublish,
    Unstage,
    Delete,
}

impl Op {
    /// Where an acknowledged call leaves the volume.
    fn lands_at(self, before: At) -> At {
        match self {
            Op::Create | Op::Unstage => At::Created,
            Op::Expand(_) => before,
            Op::Stage | Op::Unpublish => At::Staged,
            Op::Publish => At::Published,
            Op::Delete => At::Absent,
        }
    }
}

#[derive(Debug, Clone)]
struct Vol {
    name: String,
    kind: Kind,
    at: At,
    /// Acknowledged capacity.
    bytes: i64,
    /// The last token written and fsynced through an acknowledged publication.
    data: Option<u64>,
    in_flight: Option<Op>,
}

impl Vol {
    fn id(&self) -> String {
        VolumeId::for_name(self.kind.backend(), &self.name).to_string()
    }
}

/// One worker's volumes: every name it ever used, and which of them are in play.
#[derive(Debug, Clone, Default)]
struct Owned {
    vols: Vec<Vol>,
    slots: Vec<usize>,
    fresh: u64,
}

/// Paths the kubelet would use for a volume.
#[derive(Clone)]
struct Paths {
    pods: PathBuf,
}

impl Paths {
    fn staging(&self, name: &str) -> PathBuf {
        self.pods.join(name).join("staging")
    }

    fn target(&self, name: &str) -> PathBuf {
        self.pods.join(name).join("mount")
    }

    fn prepare(&self, name: &str) {
        std::fs::create_dir_all(self.pods.join(name)).unwrap();
    }
}

fn is_transport_error(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled)
}

struct Clients {
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
}

impl Clients {
    async fn new(driver: &Driver) -> Clients {
        let channel = driver.channel().await;
        Clients {
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        }
    }
}

/// Sends one call for `vol`.
async fn call(c: &mut Clients, paths: &Paths, vol: &Vol, op: Op) -> Result<(), Status> {
    let id = vol.id();
    let staging = paths.staging(&vol.name).to_string_lossy().into_owned();
    let target = paths.target(&vol.name).to_string_lossy().into_owned();
    match op {
        Op::Create => {
            let volume = c
                .controller
                .create_volume(proto::CreateVolumeRequest {
                    name: vol.name.clone(),
                    capacity_range: Some(proto::CapacityRange {
                        required_bytes: vol.kind.initial_bytes(),
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![vol.kind.capability()],
                    parameters: vol.kind.parameters(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .volume
                .expect("CreateVolume answered without a volume");
            assert_eq!(volume.volume_id, id, "{}: CreateVolume's ID", vol.name);
        }
        Op::Expand(bytes) => {
            let got = c
                .controller
                .controller_expand_volume(proto::ControllerExpandVolumeRequest {
                    volume_id: id,
                    capacity_range: Some(proto::CapacityRange {
                        required_bytes: bytes,
                        limit_bytes: 0,
                    }),
                    volume_capability: Some(vol.kind.capability()),
                    ..Default::default()
                })
                .await?
                .into_inner();
            assert!(
                got.capacity_bytes >= bytes,
                "{}: expanded to {} < {bytes}",
                vol.name,
                got.capacity_bytes
            );
        }
        Op::Stage => {
            c.node
                .node_stage_volume(proto::NodeStageVolumeRequest {
                    volume_id: id,
                    staging_target_path: staging,
                    volume_capability: Some(vol.kind.capability()),
                    ..Default::default()
                })
                .await?;
        }
        Op::Publish => {
            c.node
                .node_publish_volume(proto::NodePublishVolumeRequest {
                    volume_id: id,
                    staging_target_path: staging,
                    target_path: target,
                    volume_capability: Some(vol.kind.capability()),
                    ..Default::default()
                })
                .await?;
        }
        Op::Unpublish => {
            c.node
                .node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
                    volume_id: id,
                    target_path: target,
                })
                .await?;
        }
        Op::Unstage => {
            c.node
                .node_unstage_volume(proto::NodeUnstageVolumeRequest {
                    volume_id: id,
                    staging_target_path: staging,
                })
                .await?;
        }
        Op::Delete => {
            c.controller
                .delete_volume(proto::DeleteVolumeRequest {
                    volume_id: id,
                    ..Default::default()
                })
                .await?;
        }
    }
    Ok(())
}

/// Where a volume's data lives for the test: a file in the mounted filesystem, or the first
/// block of the published device.
fn data_path(paths: &Paths, vol: &Vol) -> PathBuf {
    let target = paths.target(&vol.name);
    match vol.kind {
        Kind::Block => target,
        Kind::Dir | Kind::Ext4 => target.join("data"),
    }
}

/// Writes `token` through the publication and fsyncs it.
fn write_token(path: &Path, token: u64) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for writing: {e}", path.display()));
    let mut block = [0u8; 512];
    block[..8].copy_from_slice(&token.to_le_bytes());
    block[8..16].copy_from_slice(b"k8scsi!!");
    f.write_all(&block)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    f.sync_all()
        .unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
}

/// The token last written at `path`, if any.
fn read_token(path: &Path) -> Option<u64> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut block = [0u8; 16];
    f.read_exact(&mut block).ok()?;
    (&block[8..16] == b"k8scsi!!").then(|| u64::from_le_bytes(block[..8].try_into().unwrap()))
}

fn check_data(context: &str, paths: &Paths, vol: &Vol) {
    if vol.data.is_none() {
        return;
    }
    let path = data_path(paths, vol);
    assert_eq!(
        read_token(&path),
        vol.data,
        "{context}: {} ({}): data written and fsynced through an acknowledged publication is \
         not there at {}",
        vol.name,
        vol.id(),
        path.display()
    );
}

struct WorkerResult {
    owned: Owned,
    acked: u64,
    writes: u64,
    error_code: Option<String>,
}

/// Picks a call for a slot's volume given its acknowledged position.
fn choose(rng: &mut Rng, vol: &Vol) -> Option<Op> {
    let op = match vol.at {
        At::Absent => Op::Create,
        At::Created => match rng.below(10) {
            0..=4 => Op::Stage,
            5..=6 => Op::Expand(vol.bytes + vol.kind.expand_step()),
            _ => Op::Delete,
        },
        At::Staged => match rng.below(10) {
            0..=6 => Op::Publish,
            _ => Op::Unstage,
        },
        // A write (None) or an unpublish.
        At::Published => match rng.below(10) {
            0..=5 => return None,
            _ => Op::Unpublish,
        },
    };
    Some(op)
}

async fn worker(
    mut clients: Clients,
    paths: Paths,
    mut owned: Owned,
    mut rng: Rng,
    index: usize,
    killed: Arc<AtomicBool>,
) -> WorkerResult {
    let mut result = WorkerResult {
        owned: Owned::default(),
        acked: 0,
        writes: 0,
        error_code: None,
    };
    while owned.slots.len() < SLOTS {
        owned.slots.push(usize::MAX);
    }
    while !killed.load(Ordering::SeqCst) {
        let slot = rng.below(SLOTS as u64) as usize;
        // An empty slot, or one whose volume is gone, gets a new name half of the time (the
        // other half re-creates the deleted name).
        let fresh_needed = owned.slots[slot] == usize::MAX
            || (owned.vols[owned.slots[slot]].at == At::Absent && rng.below(2) == 0);
        if fresh_needed {
            let kind = Kind::ALL[rng.below(Kind::ALL.len() as u64) as usize];
            let name = format!("mx-w{index}-{}-{}", owned.fresh, kind.tag());
            owned.fresh += 1;
            paths.prepare(&name);
            owned.vols.push(Vol {
                name,
                kind,
                at: At::Absent,
                bytes: kind.initial_bytes(),
                data: None,
                in_flight: None,
            });
            owned.slots[slot] = owned.vols.len() - 1;
        }
        let vol = &mut owned.vols[owned.slots[slot]];
        assert!(vol.in_flight.is_none(), "{}: two calls in flight", vol.name);
        let Some(op) = choose(&mut rng, vol) else {
            // Write through the acknowledged publication: first the last data must be there.
            let token = rng.next();
            let path = data_path(&paths, vol);
            let expected = vol.data;
            let name = vol.name.clone();
            tokio::task::spawn_blocking(move || {
                if expected.is_some() {
                    assert_eq!(
                        read_token(&path),
                        expected,
                        "{name}: data lost while published"
                    );
                }
                write_token(&path, token);
            })
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            vol.data = Some(token);
            result.writes += 1;
            continue;
        };
        vol.in_flight = Some(op);
        let snapshot = vol.clone();
        match call(&mut clients, &paths, &snapshot, op).await {
            Ok(()) => {
                let vol = &mut owned.vols[owned.slots[slot]];
                vol.at = op.lands_at(vol.at);
                if let Op::Expand(bytes) = op {
                    vol.bytes = bytes;
                }
                if op == Op::Create {
                    // A re-created name is a new, empty volume.
                    vol.data = None;
                    vol.bytes = vol.kind.initial_bytes();
                }
                vol.in_flight = None;
                result.acked += 1;
            }
            Err(status) => {
                let dying = killed.load(Ordering::SeqCst);
                assert!(
                    dying && is_transport_error(status.code()),
                    "{}: {op:?} failed {} the kill: {status:?}",
                    snapshot.name,
                    if dying { "after" } else { "before" }
                );
                result.error_code = Some(format!("{:?}", status.code()));
                break;
            }
        }
    }
    result.owned = owned;
    result
}

/// Every volume ID ListVolumes reports; no ID may appear twice.
async fn listed(c: &mut Clients, context: &str) -> BTreeSet<String> {
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = tokio::time::timeout(
            CALL_TIMEOUT,
            c.controller.list_volumes(proto::ListVolumesRequest {
                max_entries: 5,
                starting_token: token.clone(),
            }),
        )
        .await
        .expect("ListVolumes hangs")
        .expect("ListVolumes")
        .into_inner();
        ids.extend(
            page.entries
                .into_iter()
                .map(|e| e.volume.unwrap().volume_id),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    let set: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(
        set.len(),
        ids.len(),
        "{context}: ListVolumes lists a volume twice: {ids:?}"
    );
    set
}

/// Volume IDs with storage on disk (directories and images), each once.
fn storage(driver: &Driver, context: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (sub, strip_ext) in [("volumes", false), ("images", true)] {
        let dir = driver.data_dir().join(sub);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let name = entry.unwrap().file_name().into_string().unwrap();
            let id = if strip_ext {
                name.rsplit_once('.')
                    .map_or(name.clone(), |(i, _)| i.to_string())
            } else {
                name.clone()
            };
            assert!(
                out.insert(id.clone()),
                "{context}: {id} has storage twice ({name})"
            );
        }
    }
    out
}

/// Mount points under this test's directory.
fn our_mounts(driver: &Driver) -> BTreeSet<PathBuf> {
    k8scsi::mount::mountinfo::read()
        .unwrap()
        .into_iter()
        .map(|e| e.mount_point)
        .filter(|p| p.starts_with(driver.dir.path()))
        .collect()
}

/// Volume IDs whose image is attached to a loop device (one line per device).
fn attached(driver: &Driver) -> Vec<String> {
    let images = driver.data_dir().join("images");
    let out = std::process::Command::new("losetup")
        .args(["-n", "-O", "BACK-FILE", "-l"])
        .output()
        .expect("losetup");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix(&*images.to_string_lossy()))
        .map(|rest| {
            let file = rest.trim_start_matches('/');
            file.split('.').next().unwrap_or(file).to_string()
        })
        .collect()
}

/// Checks right after a restart, before any retry.
fn check_after_crash(
    context: &str,
    driver: &Driver,
    paths: &Paths,
    vols: &[&Vol],
    listed: &BTreeSet<String>,
) {
    let on_disk = storage(driver, context);
    let known: BTreeSet<String> = vols.iter().map(|v| v.id()).collect();
    for id in listed {
        assert!(
            known.contains(id),
            "{context}: listed volume {id} belongs to no name we used"
        );
    }
    for id in &on_disk {
        assert!(
            known.contains(id),
            "{context}: storage {id} belongs to no name we used"
        );
    }
    for vol in vols {
        if vol.in_flight.is_some() {
            continue;
        }
        let id = vol.id();
        let what = format!("{context}: {} ({id}) acked {:?}", vol.name, vol.at);
        if vol.at == At::Absent {
            assert!(!listed.contains(&id), "{what}: deleted volume is listed");
            assert!(!on_disk.contains(&id), "{what}: deleted volume has storage");
        } else {
            assert!(listed.contains(&id), "{what}: volume is not listed");
            assert!(on_disk.contains(&id), "{what}: volume has no storage");
        }
        if vol.at == At::Published {
            assert!(
                common::is_mounted(&paths.target(&vol.name)),
                "{what}: publication is not mounted"
            );
            check_data(context, paths, vol);
        }
    }
}

/// After retries: volumes, storage, mounts and loop devices are exactly what the acknowledged
/// states say.
fn check_converged(
    context: &str,
    driver: &Driver,
    paths: &Paths,
    vols: &[&Vol],
    listed: &BTreeSet<String>,
) {
    let live: BTreeSet<String> = vols
        .iter()
        .filter(|v| v.at != At::Absent)
        .map(|v| v.id())
        .collect();
    assert_eq!(
        *listed, live,
        "{context}: listed volumes differ from the acknowledged ones"
    );
    assert_eq!(
        storage(driver, context),
        live,
        "{context}: storage on disk differs from the acknowledged volumes"
    );
    let mut mounts = BTreeSet::new();
    let mut devices = Vec::new();
    for vol in vols {
        if vol.at >= At::Staged && vol.kind.stage_mounts() {
            mounts.insert(paths.staging(&vol.name));
        }
        if vol.at >= At::Staged && vol.kind.stage_attaches() {
            devices.push(vol.id());
        }
        if vol.at == At::Published {
            mounts.insert(paths.target(&vol.name));
            check_data(context, paths, vol);
        }
    }
    assert_eq!(
        our_mounts(driver),
        mounts,
        "{context}: mounts differ from the acknowledged stagings and publications"
    );
    devices.sort();
    // The kernel releases an autoclear device (ext4 volumes, freed when their filesystem is
    // unmounted) asynchronously, so a device of a volume just unstaged may linger briefly.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut got = attached(driver);
        got.sort();
        if got == devices {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{context}: loop devices differ from the acknowledged stagings\n  got: \
             {got:?}\n want: {devices:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn with_timeout<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {CALL_TIMEOUT:?}"))
}

/// Sends `op` and records its acknowledgement; any failure is a test failure.
async fn must(c: &mut Clients, paths: &Paths, vol: &mut Vol, op: Op, context: &str) {
    with_timeout(&format!("{context}: {op:?} of {}", vol.name), async {
        call(c, paths, vol, op)
            .await
            .unwrap_or_else(|e| panic!("{context}: {op:?} of {} ({}): {e:?}", vol.name, vol.id()))
    })
    .await;
    vol.at = op.lands_at(vol.at);
    if let Op::Expand(bytes) = op {
        vol.bytes = bytes;
    }
    if op == Op::Create {
        vol.data = None;
        vol.bytes = vol.kind.initial_bytes();
    }
}

/// Prints the server's log when the test fails, before the temporary directory goes.
struct LogOnPanic(PathBuf);

impl Drop for LogOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.0).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("server log (last lines):");
            for line in tail.into_iter().rev() {
                eprintln!("  {line}");
            }
        }
    }
}

fn skip_reason() -> Option<String> {
    if !common::is_root() {
        return Some("needs root (mounts, loop devices)".into());
    }
    for tool in ["losetup", "mkfs.ext4"] {
        if std::process::Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_mixed_node_and_controller_work_loses_nothing() {
    skip_unless_ready!(skip_reason());
    let seed = env_u64("K8SCSI_CRASH_SEED").unwrap_or_else(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        Rng(nanos ^ (u64::from(std::process::id()) << 32)).next()
    });
    let rounds = env_u64("K8SCSI_CRASH_ROUNDS").unwrap_or(DEFAULT_ROUNDS);
    let workers = env_u64("K8SCSI_CRASH_WORKERS").map_or(DEFAULT_WORKERS, |w| w as usize);
    assert!(workers > 0);
    eprintln!(
        "mixed crash test: seed {seed:#x} (replay with K8SCSI_CRASH_SEED={seed:#x}), {rounds} \
         rounds, {workers} workers"
    );
    let started = Instant::now();
    let mut rng = Rng(seed);
    let mut driver = tokio::task::block_in_place(Driver::start);
    let _log = LogOnPanic(driver.log_path());
    let paths = Paths {
        pods: driver.kubelet_dir().join("pods"),
    };
    let mut owned: Vec<Owned> = vec![Owned::default(); workers];
    let (mut acked, mut writes, mut retried) = (0u64, 0u64, 0u64);
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();

    for round in 0..rounds {
        let killed = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (index, mine) in owned.iter_mut().enumerate() {
            tasks.push(tokio::spawn(worker(
                Clients::new(&driver).await,
                paths.clone(),
                std::mem::take(mine),
                Rng(rng.next()),
                index,
                killed.clone(),
            )));
        }
        let delay = Duration::from_millis(20 + rng.below(600));
        tokio::time::sleep(delay).await;
        killed.store(true, Ordering::SeqCst);
        tokio::task::block_in_place(|| driver.kill());
        let mut round_acked = 0;
        for (index, task) in tasks.into_iter().enumerate() {
            let result = tokio::time::timeout(CALL_TIMEOUT, task)
                .await
                .unwrap_or_else(|_| panic!("round {round}: worker {index} hangs after the kill"))
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            round_acked += result.acked;
            writes += result.writes;
            if let Some(code) = result.error_code {
                *codes.entry(code).or_default() += 1;
            }
            owned[index] = result.owned;
        }
        acked += round_acked;

        tokio::task::block_in_place(|| driver.restart());
        let context = format!("seed {seed:#x} round {round} (kill after {delay:?})");
        let mut c = Clients::new(&driver).await;
        let list = listed(&mut c, &context).await;
        {
            let all: Vec<&Vol> = owned.iter().flat_map(|o| o.vols.iter()).collect();
            tokio::task::block_in_place(|| {
                check_after_crash(&context, &driver, &paths, &all, &list)
            });
        }
        let mut in_flight = Vec::new();
        for o in owned.iter_mut() {
            for vol in o.vols.iter_mut() {
                if let Some(op) = vol.in_flight.take() {
                    in_flight.push(format!("{}:{op:?}", vol.name));
                    must(&mut c, &paths, vol, op, &format!("{context}: retry")).await;
                    retried += 1;
                }
            }
        }
        let list = listed(&mut c, &context).await;
        let all: Vec<&Vol> = owned.iter().flat_map(|o| o.vols.iter()).collect();
        tokio::task::block_in_place(|| check_converged(&context, &driver, &paths, &all, &list));
        eprintln!(
            "round {round}: kill after {delay:?}, {round_acked} calls acked, retried \
             {in_flight:?}, {} volumes live",
            list.len()
        );
    }

    // Final pass: every live volume is staged and published once more, its data checked, then
    // torn down completely.
    let context = format!("seed {seed:#x} final cleanup");
    let mut c = Clients::new(&driver).await;
    let mut checked = 0;
    for o in owned.iter_mut() {
        for vol in o.vols.iter_mut().filter(|v| v.at != At::Absent) {
            if vol.at == At::Created {
                must(&mut c, &paths, vol, Op::Stage, &context).await;
            }
            if vol.at == At::Staged {
                must(&mut c, &paths, vol, Op::Publish, &context).await;
            }
            if vol.data.is_some() {
                checked += 1;
            }
            tokio::task::block_in_place(|| check_data(&context, &paths, vol));
            for op in [Op::Unpublish, Op::Unstage, Op::Delete] {
                must(&mut c, &paths, vol, op, &context).await;
            }
        }
    }
    let list = listed(&mut c, &context).await;
    assert!(list.is_empty(), "{context}: volumes left: {list:?}");
    tokio::task::block_in_place(|| {
        assert!(
            storage(&driver, &context).is_empty(),
            "{context}: storage left behind"
        );
        assert!(
            our_mounts(&driver).is_empty(),
            "{context}: mounts left: {:?}",
            our_mounts(&driver)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !attached(&driver).is_empty() {
            assert!(
                Instant::now() < deadline,
                "{context}: loop devices left: {:?}",
                attached(&driver)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let names: usize = owned.iter().map(|o| o.vols.len()).sum();
    eprintln!(
        "mixed crash summary: seed {seed:#x}, {rounds} rounds in {:.1?}: {acked} calls acked, \
         {writes} fsynced writes, {retried} interrupted calls retried, {names} names used, \
         {checked} volumes' data re-read after the last restart; unanswered calls failed with \
         {codes:?}",
        started.elapsed()
    );
    assert!(acked > 0, "no call was ever acknowledged");
}
