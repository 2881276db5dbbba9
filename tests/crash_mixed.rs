//! Fault harness: a mixed node and controller workload, snapshots and restores included, under
//! SIGKILL.
//!
//! N workers drive volumes of several kinds (plain directories, ext4 loop images, preallocated
//! raw block loop images, and shared-filesystem volumes on a bind-mounted "share" directory, with
//! `onDelete` delete or archive) through their whole life: create, expand, stage, publish, write
//! data through the real mount (fsynced), unpublish, unstage, delete. Next to that they take
//! snapshots of their volumes in any state (unstaged, staged, published: each snapshot remembers
//! the data token the volume held then), delete them, restore them into new volumes
//! (CreateVolume with a snapshot content source) and clone live volumes (a volume content
//! source). Block volumes are 16 MiB, preallocated and filled once, so a snapshot of an unstaged
//! one is a background copy (`ready_to_use = false` until done); calls that meet such a copy get
//! ABORTED, which changes nothing and is simply tried again later. The test SIGKILLs the server
//! at random points (one round in three right after a CreateSnapshot answered "not ready", while
//! its copy runs), restarts it, and after each round checks that
//! - every acknowledged operation holds: created volumes are listed and have storage, deleted
//!   ones have neither, published volumes are still mounted and show the last data written;
//!   acknowledged snapshots are listed and, once ready, their storage holds the data token they
//!   were taken with; deleted snapshots are neither listed nor stored;
//! - no volume or snapshot is listed twice and each belongs to a name we used;
//! - retrying each interrupted call succeeds (a retried CreateSnapshot lands on the same ID),
//!   and once every snapshot is ready the listed volumes and snapshots, the storage on disk and
//!   on the share (markers, directories, one archived directory per acknowledged archiving
//!   deletion, snapshot copies, no partial copies or temporary markers), the mounts under this
//!   test's directory (no controller share mount left) and the loop devices backing this
//!   test's images are exactly what the acknowledged states say.
//!
//! At the end every snapshot is restored once more and every volume (restores included) is
//! staged and published, its data checked, and then everything is torn down; nothing may remain
//! (volumes, snapshots, storage, share contents, mounts, loop devices).
//!
//! Knobs: `K8SCSI_CRASH_SEED` (replays the choices of operations and kill delays; timing still
//! varies), `K8SCSI_CRASH_ROUNDS`, `K8SCSI_CRASH_WORKERS`. Adding a kind means adding a [`Kind`]
//! variant with its parameters, capability, storage and the mount/device it is expected to leave
//! at each [`At`] position.
//!
//! Needs root, losetup, mkfs.ext4 and debugfs (reads ext4 snapshot images); skips with a printed
//! reason otherwise (fails in CI).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::Driver;
use common::fault::{Rng, env_u64};
use k8scsi::backend::shared::spec::{ShareRef, volume_id as shared_volume_id};
use k8scsi::client::mount_capability;
use k8scsi::csi::proto::controller_client::ControllerClient;
use k8scsi::csi::proto::node_client::NodeClient;
use k8scsi::csi::proto::volume_capability::access_mode::Mode;
use k8scsi::csi::proto::volume_capability::{AccessMode, AccessType, BlockVolume};
use k8scsi::csi::proto::volume_content_source::{SnapshotSource, Type, VolumeSource};
use k8scsi::csi::proto::{self, VolumeCapability, VolumeContentSource};
use k8scsi::engine::ids::{SnapshotId, VolumeId};
use tonic::transport::Channel;
use tonic::{Code, Status};

const DEFAULT_ROUNDS: u64 = 12;
const DEFAULT_WORKERS: usize = 4;
/// Volumes each worker keeps in play at once.
const SLOTS: usize = 3;
/// Snapshots each worker keeps in play at once.
const SNAP_SLOTS: usize = 2;
const MIB: i64 = 1 << 20;
/// Generous: the box is loaded and mkfs/losetup are slow there.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a call may keep getting ABORTED (a background snapshot copy holds its volume or
/// snapshot) before the test fails; copies here are 16 MiB at most.
const ABORTED_DEADLINE: Duration = Duration::from_secs(120);

/// What a volume is. Each kind knows how it is created and what it leaves on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    Ext4,
    Block,
    Shared,
    /// A shared volume whose StorageClass says `onDelete: archive`: DeleteVolume renames its
    /// directory to `archived-<name>-<time>` on the share.
    Archived,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Dir,
        Kind::Ext4,
        Kind::Block,
        Kind::Shared,
        Kind::Archived,
    ];

    fn shared(self) -> bool {
        matches!(self, Kind::Shared | Kind::Archived)
    }

    fn tag(self) -> &'static str {
        match self {
            Kind::Dir => "dir",
            Kind::Ext4 => "ext4",
            Kind::Block => "block",
            Kind::Shared => "shared",
            Kind::Archived => "archived",
        }
    }

    fn initial_bytes(self) -> i64 {
        match self {
            Kind::Dir | Kind::Shared | Kind::Archived => MIB,
            Kind::Ext4 => 8 * MIB,
            // Preallocated, so the image occupies 16 MiB and a snapshot of it while unstaged is
            // a background copy (the engine's threshold), yet copies in milliseconds.
            Kind::Block => 16 * MIB,
        }
    }

    fn expand_step(self) -> i64 {
        match self {
            Kind::Dir | Kind::Shared | Kind::Archived => MIB,
            Kind::Ext4 | Kind::Block => 4 * MIB,
        }
    }

    fn parameters(self, share: &Path) -> HashMap<String, String> {
        let pairs: Vec<(&str, String)> = match self {
            Kind::Dir => return common::unenforced(),
            Kind::Ext4 => vec![("type", "loop".into())],
            Kind::Block => vec![
                ("type", "loop".into()),
                ("allocation", "preallocate".into()),
            ],
            Kind::Shared => vec![
                ("type", "shared".into()),
                ("source", share.to_string_lossy().into_owned()),
                ("fsType", "none".into()),
            ],
            Kind::Archived => vec![
                ("type", "shared".into()),
                ("source", share.to_string_lossy().into_owned()),
                ("fsType", "none".into()),
                ("onDelete", "archive".into()),
            ],
        };
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    /// The volume ID the driver must answer for `name` (derived from the name, and for shared
    /// volumes from the share too).
    fn volume_id(self, name: &str, share: &Path) -> String {
        match self {
            Kind::Dir => VolumeId::for_name("dir", name).to_string(),
            Kind::Ext4 | Kind::Block => VolumeId::for_name("loop", name).to_string(),
            Kind::Shared | Kind::Archived => {
                let params: BTreeMap<String, String> = self.parameters(share).into_iter().collect();
                let share = ShareRef::from_parameters(&params, &[]).expect("share parameters");
                shared_volume_id(name, &share).expect("shared volume ID")
            }
        }
    }

    fn capability(self) -> VolumeCapability {
        match self {
            Kind::Dir => mount_capability(Mode::SingleNodeWriter, vec![]),
            Kind::Shared | Kind::Archived => mount_capability(Mode::MultiNodeMultiWriter, vec![]),
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
        matches!(self, Kind::Ext4 | Kind::Shared | Kind::Archived)
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

/// Volume calls the workload sends (writes are done by the test itself and cannot be
/// interrupted).
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

/// Snapshot calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SnapOp {
    Create,
    Delete,
}

/// Where a new volume's content comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    Snapshot(String),
    Volume(String),
}

impl Origin {
    fn proto(&self) -> VolumeContentSource {
        VolumeContentSource {
            r#type: Some(match self {
                Origin::Snapshot(id) => Type::Snapshot(SnapshotSource {
                    snapshot_id: id.clone(),
                }),
                Origin::Volume(id) => Type::Volume(VolumeSource {
                    volume_id: id.clone(),
                }),
            }),
        }
    }
}

#[derive(Debug, Clone)]
struct Vol {
    name: String,
    id: String,
    kind: Kind,
    at: At,
    /// Acknowledged capacity.
    bytes: i64,
    /// The last token written and fsynced through an acknowledged publication (for a restore
    /// or clone: its source's token until the first write).
    data: Option<u64>,
    /// The content source of the current incarnation of the name, with the token and size it
    /// brings.
    origin: Option<(Origin, Option<u64>)>,
    /// Whether this incarnation of a block volume has had its filler written (see
    /// [`write_filler`]).
    filled: bool,
    /// Acknowledged deletions of this name with `onDelete: archive` (each leaves one archived
    /// directory on the share).
    archived: usize,
    in_flight: Option<Op>,
}

impl Vol {
    fn new(name: String, kind: Kind, share: &Path) -> Vol {
        Vol {
            id: kind.volume_id(&name, share),
            name,
            kind,
            at: At::Absent,
            bytes: kind.initial_bytes(),
            data: None,
            origin: None,
            filled: false,
            archived: 0,
            in_flight: None,
        }
    }

    /// Whether the test knows what the volume's data area must hold: something was written,
    /// or it was populated from a source (possibly with nothing).
    fn data_known(&self) -> bool {
        self.data.is_some() || self.origin.is_some()
    }

    /// Records an acknowledged call.
    fn acked(&mut self, op: Op) {
        self.at = op.lands_at(self.at);
        if let Op::Expand(bytes) = op {
            self.bytes = bytes;
        }
        if op == Op::Delete && self.kind == Kind::Archived {
            self.archived += 1;
        }
        if op == Op::Create {
            // A (re-)created name holds its source's data, or nothing.
            self.data = self.origin.as_ref().and_then(|(_, token)| *token);
            self.filled = false;
        }
        self.in_flight = None;
    }
}

#[derive(Debug, Clone)]
struct Snap {
    name: String,
    id: String,
    /// Index of the source volume in its worker's `vols`.
    source: usize,
    source_id: String,
    kind: Kind,
    /// Whether the snapshot exists as far as acknowledged calls say.
    present: bool,
    /// The source's data token and capacity when the snapshot was taken.
    data: Option<u64>,
    bytes: i64,
    in_flight: Option<SnapOp>,
}

/// One worker's volumes and snapshots: every name it ever used, and which are in play.
#[derive(Debug, Clone, Default)]
struct Owned {
    vols: Vec<Vol>,
    slots: Vec<usize>,
    fresh: u64,
    snaps: Vec<Snap>,
    snap_slots: Vec<usize>,
}

/// Paths the kubelet would use for a volume, and the share directory.
#[derive(Clone)]
struct Paths {
    pods: PathBuf,
    share: PathBuf,
    data: PathBuf,
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
    channel: Channel,
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
}

/// Connections to a freshly restarted server that failed and were made again (see
/// [`Clients::new`]).
static RECONNECTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How the server process ended, if it did: peeked at with `waitid(WNOWAIT)`, so the
/// [`Driver`] can still reap it.
fn server_exit(driver: &Driver) -> Option<String> {
    use rustix::process::{Pid, WaitId, WaitIdOptions, waitid};
    let pid = Pid::from_raw(driver.pid() as i32)?;
    let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
    let status = waitid(WaitId::Pid(pid), options).ok()??;
    Some(match (status.exit_status(), status.terminating_signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (_, Some(9)) => "was killed by SIGKILL".to_string(),
        (_, Some(signal)) => format!("was killed by signal {signal}"),
        _ => "ended".to_string(),
    })
}

/// Restarted servers that were gone by SIGKILL before the test's first call, which the test
/// did not send (see [`settle`]).
static OUTSIDE_KILLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Connects to a server just (re)started and waits until it answers Probe. A few times in a
/// thousand connections on the loaded 2-core machine a new connection was reset (ECONNRESET
/// in the HTTP/2 handshake or the first call), the server's log normal; once the process was
/// checked, it was alive (cause unknown). This tells the cases apart: a server that is alive
/// is asked again (a few times); one that was SIGKILLed by
/// something other than this test (the test kills only while the workload runs) is restarted,
/// which is one more crash at a point where nothing is in flight, and counted; one that exited
/// or died by any other signal fails the test with its log.
async fn settle(driver: &mut Driver, context: &str) -> Clients {
    let mut failures = 0;
    loop {
        let error = match Clients::connect(driver).await {
            Ok(c) => {
                let probe = tokio::time::timeout(
                    CALL_TIMEOUT,
                    proto::identity_client::IdentityClient::new(c.channel.clone())
                        .probe(proto::ProbeRequest {}),
                )
                .await;
                match probe {
                    Ok(Ok(_)) => return c,
                    Ok(Err(status)) => format!("Probe: {status:?}"),
                    Err(_) => format!("Probe: no answer within {CALL_TIMEOUT:?}"),
                }
            }
            Err(e) => e,
        };
        failures += 1;
        match server_exit(driver) {
            Some(how) if how.contains("SIGKILL") && failures < 5 => {
                eprintln!(
                    "{context}: the restarted server {how} before the test's first call \
                     ({error}); restarting it"
                );
                OUTSIDE_KILLS.fetch_add(1, Ordering::SeqCst);
                tokio::task::block_in_place(|| driver.restart());
            }
            Some(how) => panic!(
                "{context}: the restarted server {how} ({error}):\n{}",
                driver.log()
            ),
            None if failures < 5 => {
                eprintln!("{context}: Probe failed with the server alive ({error}); again");
                RECONNECTS.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            None => panic!(
                "{context}: Probe failed {failures} times with the server alive: {error}\n{}",
                driver.log()
            ),
        }
    }
}

impl Clients {
    /// Connects to the server; a failed connection is tried again a few times while the
    /// server process is alive (see [`settle`]), and is an error once it is not.
    async fn connect(driver: &Driver) -> Result<Clients, String> {
        let endpoint = k8scsi::server::Endpoint::Unix(driver.socket());
        let mut attempt = 0;
        let channel = loop {
            match k8scsi::client::connect(&endpoint).await {
                Ok(channel) => break channel,
                Err(e) => {
                    attempt += 1;
                    if let Some(how) = server_exit(driver) {
                        return Err(format!("the server {how} ({e:?})"));
                    }
                    if attempt == 5 {
                        return Err(format!("{attempt} connections failed: {e:?}"));
                    }
                    eprintln!(
                        "connection to the server (pid {}, alive) failed, trying again: {e:?}",
                        driver.pid()
                    );
                    RECONNECTS.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        Ok(Clients {
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel.clone()),
            channel,
        })
    }

    async fn new(driver: &Driver) -> Clients {
        Clients::connect(driver)
            .await
            .unwrap_or_else(|e| panic!("connecting to the server: {e}\n{}", driver.log()))
    }
}

/// Sends one call for `vol`.
async fn call(c: &mut Clients, paths: &Paths, vol: &Vol, op: Op) -> Result<(), Status> {
    let id = vol.id.clone();
    let staging = paths.staging(&vol.name).to_string_lossy().into_owned();
    let target = paths.target(&vol.name).to_string_lossy().into_owned();
    match op {
        Op::Create => {
            let volume = c
                .controller
                .create_volume(proto::CreateVolumeRequest {
                    name: vol.name.clone(),
                    capacity_range: Some(proto::CapacityRange {
                        required_bytes: vol.bytes,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![vol.kind.capability()],
                    parameters: vol.kind.parameters(&paths.share),
                    volume_content_source: vol.origin.as_ref().map(|(o, _)| o.proto()),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .volume
                .expect("CreateVolume answered without a volume");
            assert_eq!(volume.volume_id, id, "{}: CreateVolume's ID", vol.name);
            assert_eq!(
                volume.capacity_bytes, vol.bytes,
                "{}: CreateVolume's capacity",
                vol.name
            );
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

/// Sends one snapshot call; a CreateSnapshot answer says whether the snapshot is ready.
async fn call_snap(c: &mut Clients, snap: &Snap, op: SnapOp) -> Result<bool, Status> {
    match op {
        SnapOp::Create => {
            let got = c
                .controller
                .create_snapshot(proto::CreateSnapshotRequest {
                    source_volume_id: snap.source_id.clone(),
                    name: snap.name.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .snapshot
                .expect("CreateSnapshot answered without a snapshot");
            assert_eq!(
                got.snapshot_id, snap.id,
                "{}: CreateSnapshot's ID (derived from the name)",
                snap.name
            );
            assert_eq!(got.source_volume_id, snap.source_id, "{}", snap.name);
            assert_eq!(
                got.size_bytes, snap.bytes,
                "{}: size is the source's capacity",
                snap.name
            );
            Ok(got.ready_to_use)
        }
        SnapOp::Delete => {
            c.controller
                .delete_snapshot(proto::DeleteSnapshotRequest {
                    snapshot_id: snap.id.clone(),
                    ..Default::default()
                })
                .await?;
            Ok(true)
        }
    }
}

/// Where a volume's data lives for the test: a file in the mounted filesystem, or the first
/// block of the published device.
fn data_path(paths: &Paths, vol: &Vol) -> PathBuf {
    let target = paths.target(&vol.name);
    match vol.kind {
        Kind::Block => target,
        Kind::Dir | Kind::Ext4 | Kind::Shared | Kind::Archived => target.join("data"),
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

fn parse_token(block: &[u8]) -> Option<u64> {
    (block.len() >= 16 && &block[8..16] == b"k8scsi!!")
        .then(|| u64::from_le_bytes(block[..8].try_into().unwrap()))
}

/// Size of the filler written once into each block volume.
const FILLER_BYTES: usize = 15 << 20;

/// Fills a published block device after its first block with 15 MiB of data (fsynced), so that
/// a snapshot of the unstaged volume is a background copy that really copies (a preallocated
/// image is all unwritten extents, which a hole-keeping copy skips in microseconds) and a kill
/// can land while it runs.
fn write_filler(path: &Path) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for writing: {e}", path.display()));
    let chunk = vec![0xa5u8; 1 << 20];
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(512)).unwrap();
    for _ in 0..FILLER_BYTES / chunk.len() {
        f.write_all(&chunk)
            .unwrap_or_else(|e| panic!("fill {}: {e}", path.display()));
    }
    f.sync_all()
        .unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
}

/// The token last written at `path`, if any.
fn read_token(path: &Path) -> Option<u64> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut block = [0u8; 16];
    f.read_exact(&mut block).ok()?;
    parse_token(&block)
}

fn check_data(context: &str, paths: &Paths, vol: &Vol) {
    if !vol.data_known() {
        return;
    }
    let path = data_path(paths, vol);
    assert_eq!(
        read_token(&path),
        vol.data,
        "{context}: {} ({}, from {:?}): data written and fsynced through an acknowledged \
         publication (or brought by its content source) is not there at {}",
        vol.name,
        vol.id,
        vol.origin,
        path.display()
    );
}

/// The token a snapshot's own storage holds: read from the copied directory or image (an ext4
/// image through debugfs, without mounting it).
fn snapshot_token(paths: &Paths, snap: &Snap) -> Option<u64> {
    let local = paths.data.join("snapshots");
    match snap.kind {
        Kind::Dir => read_token(&local.join(&snap.id).join("data")),
        Kind::Block => read_token(&local.join(format!("{}.block", snap.id))),
        Kind::Shared | Kind::Archived => read_token(
            &paths
                .share
                .join(".k8scsi/snapshots")
                .join(&snap.id)
                .join("data/data"),
        ),
        Kind::Ext4 => {
            let image = local.join(format!("{}.ext4", snap.id));
            let out = std::process::Command::new("debugfs")
                .args(["-R", "cat /data"])
                .arg(&image)
                .output()
                .expect("debugfs");
            assert!(out.status.success(), "debugfs {}: {out:?}", image.display());
            parse_token(&out.stdout)
        }
    }
}

struct WorkerResult {
    owned: Owned,
    acked: u64,
    writes: u64,
    aborted: u64,
    not_ready: u64,
    /// Acknowledged CreateSnapshot, DeleteSnapshot, restores and clones.
    snapshot_calls: [u64; 4],
    error_code: Option<String>,
}

/// Picks a call for a volume given its acknowledged position.
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

/// What a worker does next.
enum Plan {
    Write(usize),
    Vol(usize, Op),
    Snap(usize, SnapOp),
    /// Nothing fits right now (e.g. no live volume to snapshot).
    Skip,
}

impl Owned {
    fn live_slots(&self) -> Vec<usize> {
        (0..SLOTS)
            .filter(|&s| self.slots[s] != usize::MAX && self.vols[self.slots[s]].at != At::Absent)
            .collect()
    }

    fn free_slots(&self) -> Vec<usize> {
        (0..SLOTS)
            .filter(|&s| self.slots[s] == usize::MAX || self.vols[self.slots[s]].at == At::Absent)
            .collect()
    }

    /// Puts a new volume name into `slot`.
    fn new_vol(
        &mut self,
        slot: usize,
        index: usize,
        kind: Kind,
        how: &str,
        paths: &Paths,
    ) -> usize {
        let name = format!("mx-w{index}-{}-{}{how}", self.fresh, kind.tag());
        self.fresh += 1;
        paths.prepare(&name);
        self.vols.push(Vol::new(name, kind, &paths.share));
        self.slots[slot] = self.vols.len() - 1;
        self.vols.len() - 1
    }

    /// A volume call or a write.
    fn plan_volume(&mut self, rng: &mut Rng, index: usize, paths: &Paths) -> Plan {
        let slot = rng.below(SLOTS as u64) as usize;
        // An empty slot, or one whose volume is gone, gets a new name half of the time (the
        // other half re-creates the deleted name, as an empty volume).
        let fresh_needed = self.slots[slot] == usize::MAX
            || (self.vols[self.slots[slot]].at == At::Absent && rng.below(2) == 0);
        if fresh_needed {
            let live: Vec<usize> = self.live_slots();
            if !live.is_empty() && rng.below(5) == 0 {
                // A clone of a live volume of another slot.
                let src = self.vols[self.slots[*rng.pick(&live).unwrap()]].clone();
                let v = self.new_vol(slot, index, src.kind, "-clone", paths);
                let vol = &mut self.vols[v];
                vol.bytes = src.bytes;
                vol.origin = Some((Origin::Volume(src.id.clone()), src.data));
                return Plan::Vol(v, Op::Create);
            }
            let kind = Kind::ALL[rng.below(Kind::ALL.len() as u64) as usize];
            self.new_vol(slot, index, kind, "", paths);
        }
        let v = self.slots[slot];
        let vol = &mut self.vols[v];
        assert!(vol.in_flight.is_none(), "{}: two calls in flight", vol.name);
        if vol.at == At::Absent {
            vol.origin = None;
            vol.bytes = vol.kind.initial_bytes();
        }
        match choose(rng, vol) {
            Some(op) => Plan::Vol(v, op),
            None => Plan::Write(v),
        }
    }

    /// A snapshot call, or a restore (a CreateVolume from a snapshot).
    fn plan_snapshot(&mut self, rng: &mut Rng, index: usize, paths: &Paths) -> Plan {
        while self.snap_slots.len() < SNAP_SLOTS {
            self.snap_slots.push(usize::MAX);
        }
        let sslot = rng.below(SNAP_SLOTS as u64) as usize;
        let current = self.snap_slots[sslot];
        if current != usize::MAX && self.snaps[current].present {
            if rng.below(3) == 0 {
                return Plan::Snap(current, SnapOp::Delete);
            }
            let free = self.free_slots();
            let Some(&slot) = rng.pick(&free) else {
                return Plan::Skip;
            };
            let snap = self.snaps[current].clone();
            let v = self.new_vol(slot, index, snap.kind, "-restore", paths);
            let vol = &mut self.vols[v];
            vol.bytes = snap.bytes;
            vol.origin = Some((Origin::Snapshot(snap.id.clone()), snap.data));
            return Plan::Vol(v, Op::Create);
        }
        // Take the slot's snapshot again (same name, its source's data of now) half of the
        // time when its source lives; otherwise a new snapshot of a live volume.
        if current != usize::MAX && rng.below(2) == 0 {
            let source = &self.vols[self.snaps[current].source];
            if source.at != At::Absent {
                let (data, bytes) = (source.data, source.bytes);
                let snap = &mut self.snaps[current];
                snap.data = data;
                snap.bytes = bytes;
                return Plan::Snap(current, SnapOp::Create);
            }
        }
        let live = self.live_slots();
        let Some(&slot) = rng.pick(&live) else {
            return Plan::Skip;
        };
        let v = self.slots[slot];
        let source = &self.vols[v];
        let name = format!("sx-w{index}-{}", self.fresh);
        self.fresh += 1;
        let id = SnapshotId::for_source(&VolumeId::parse(&source.id).unwrap(), &name).to_string();
        self.snaps.push(Snap {
            name,
            id,
            source: v,
            source_id: source.id.clone(),
            kind: source.kind,
            present: false,
            data: source.data,
            bytes: source.bytes,
            in_flight: None,
        });
        self.snap_slots[sslot] = self.snaps.len() - 1;
        Plan::Snap(self.snaps.len() - 1, SnapOp::Create)
    }
}

async fn worker(
    mut clients: Clients,
    paths: Paths,
    mut owned: Owned,
    mut rng: Rng,
    index: usize,
    killed: Arc<AtomicBool>,
    copying: Arc<tokio::sync::Notify>,
) -> WorkerResult {
    let mut result = WorkerResult {
        owned: Owned::default(),
        acked: 0,
        writes: 0,
        aborted: 0,
        not_ready: 0,
        snapshot_calls: [0; 4],
        error_code: None,
    };
    while owned.slots.len() < SLOTS {
        owned.slots.push(usize::MAX);
    }
    while !killed.load(Ordering::SeqCst) {
        let plan = if rng.below(10) < 3 {
            owned.plan_snapshot(&mut rng, index, &paths)
        } else {
            owned.plan_volume(&mut rng, index, &paths)
        };
        let failure: Option<(String, Status)> = match plan {
            Plan::Skip => {
                tokio::task::yield_now().await;
                continue;
            }
            Plan::Write(v) => {
                // Write through the acknowledged publication: first the last data must be there.
                let vol = &mut owned.vols[v];
                let token = rng.next();
                let path = data_path(&paths, vol);
                let expected = vol.data;
                let known = vol.data_known();
                let name = vol.name.clone();
                let fill = vol.kind == Kind::Block && !vol.filled;
                vol.filled = true;
                tokio::task::spawn_blocking(move || {
                    if known {
                        assert_eq!(
                            read_token(&path),
                            expected,
                            "{name}: data lost while published"
                        );
                    }
                    write_token(&path, token);
                    if fill {
                        write_filler(&path);
                    }
                })
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
                vol.data = Some(token);
                result.writes += 1;
                continue;
            }
            Plan::Vol(v, op) => {
                owned.vols[v].in_flight = Some(op);
                let vol = owned.vols[v].clone();
                match call(&mut clients, &paths, &vol, op).await {
                    Ok(()) => {
                        match (&vol.origin, op) {
                            (Some((Origin::Snapshot(_), _)), Op::Create) => {
                                result.snapshot_calls[2] += 1
                            }
                            (Some((Origin::Volume(_), _)), Op::Create) => {
                                result.snapshot_calls[3] += 1
                            }
                            _ => {}
                        }
                        owned.vols[v].acked(op);
                        None
                    }
                    Err(status) if status.code() == Code::Aborted => {
                        // A background snapshot copy holds the volume (or the snapshot to
                        // restore): nothing happened; try something else meanwhile.
                        owned.vols[v].in_flight = None;
                        result.aborted += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    Err(status) => Some((format!("{}: {op:?}", vol.name), status)),
                }
            }
            Plan::Snap(s, op) => {
                owned.snaps[s].in_flight = Some(op);
                let snap = owned.snaps[s].clone();
                match call_snap(&mut clients, &snap, op).await {
                    Ok(ready) => {
                        result.snapshot_calls[usize::from(op == SnapOp::Delete)] += 1;
                        let snap = &mut owned.snaps[s];
                        snap.present = op == SnapOp::Create;
                        snap.in_flight = None;
                        if !ready {
                            result.not_ready += 1;
                            copying.notify_one();
                        }
                        None
                    }
                    Err(status) if status.code() == Code::Aborted => {
                        owned.snaps[s].in_flight = None;
                        result.aborted += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    Err(status) => Some((format!("{}: {op:?}", snap.name), status)),
                }
            }
        };
        match failure {
            None => result.acked += 1,
            Some((what, status)) => {
                let dying = killed.load(Ordering::SeqCst);
                assert!(
                    dying && is_transport_error(status.code()),
                    "{what} failed {} the kill: {status:?}",
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

/// Every snapshot ListSnapshots reports, with whether it is ready; no ID may appear twice.
async fn listed_snapshots(c: &mut Clients, context: &str) -> BTreeMap<String, bool> {
    let mut entries = Vec::new();
    let mut token = String::new();
    loop {
        let page = tokio::time::timeout(
            CALL_TIMEOUT,
            c.controller.list_snapshots(proto::ListSnapshotsRequest {
                max_entries: 5,
                starting_token: token.clone(),
                ..Default::default()
            }),
        )
        .await
        .expect("ListSnapshots hangs")
        .expect("ListSnapshots")
        .into_inner();
        entries.extend(page.entries.into_iter().map(|e| {
            let s = e.snapshot.unwrap();
            (s.snapshot_id, s.ready_to_use)
        }));
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    let map: BTreeMap<String, bool> = entries.iter().cloned().collect();
    assert_eq!(
        map.len(),
        entries.len(),
        "{context}: ListSnapshots lists a snapshot twice: {entries:?}"
    );
    map
}

/// ListSnapshots once every listed snapshot is ready (background copies done), within a
/// generous deadline.
async fn all_ready(c: &mut Clients, context: &str) -> (BTreeMap<String, bool>, Duration) {
    let started = Instant::now();
    loop {
        let snaps = listed_snapshots(c, context).await;
        if snaps.values().all(|&ready| ready) {
            return (snaps, started.elapsed());
        }
        assert!(
            started.elapsed() < ABORTED_DEADLINE,
            "{context}: snapshots still not ready after {ABORTED_DEADLINE:?}: {snaps:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn entries_of(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect(),
        Err(_) => vec![],
    }
}

/// Volume IDs with storage (directories, images, markers on the share), each once.
fn storage(paths: &Paths, context: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let markers = paths.share.join(".k8scsi/volumes");
    for (dir, strip_ext) in [
        (paths.data.join("volumes"), false),
        (paths.data.join("images"), true),
        (markers, false),
    ] {
        for name in entries_of(&dir) {
            if name.starts_with(".tmp-") {
                continue; // a marker being written; see `share_leftovers`
            }
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

/// Volume directories at the share root (by name), and how many archived directories each
/// name has there.
fn share_dirs(paths: &Paths) -> (BTreeSet<String>, BTreeMap<String, usize>) {
    let mut live = BTreeSet::new();
    let mut archived = BTreeMap::new();
    for name in entries_of(&paths.share) {
        if name == ".k8scsi" {
            continue;
        }
        // `archived-<name>-<time>`: the volume name is everything up to the last dash.
        match name
            .strip_prefix("archived-")
            .and_then(|rest| rest.rsplit_once('-'))
        {
            Some((volume, _)) => *archived.entry(volume.to_string()).or_default() += 1,
            None => {
                live.insert(name);
            }
        }
    }
    (live, archived)
}

/// Temporary markers left on the share.
fn share_leftovers(paths: &Paths) -> Vec<String> {
    entries_of(&paths.share.join(".k8scsi/volumes"))
        .into_iter()
        .filter(|n| n.starts_with(".tmp-"))
        .collect()
}

/// Snapshot IDs with complete storage (local copies and images; share directories with their
/// marker), and partial copies (anything else).
fn snapshot_storage(paths: &Paths, context: &str) -> (BTreeSet<String>, Vec<String>) {
    let mut complete = BTreeSet::new();
    let mut partial = Vec::new();
    for name in entries_of(&paths.data.join("snapshots")) {
        if name.ends_with(".partial") {
            partial.push(name);
            continue;
        }
        let id = name.split('.').next().unwrap().to_string();
        assert!(
            complete.insert(id.clone()),
            "{context}: snapshot {id} stored twice ({name})"
        );
    }
    let shared = paths.share.join(".k8scsi/snapshots");
    for name in entries_of(&shared) {
        if shared.join(&name).join("snapshot.json").is_file() {
            assert!(
                complete.insert(name.clone()),
                "{context}: snapshot {name} stored twice"
            );
        } else {
            partial.push(format!("share:{name}"));
        }
    }
    (complete, partial)
}

/// Mount points under this test's directory (stagings, publications, and any controller share
/// mount under the data directory).
fn our_mounts(driver: &Driver) -> BTreeSet<PathBuf> {
    k8scsi::mount::mountinfo::read()
        .unwrap()
        .into_iter()
        .map(|e| e.mount_point)
        .filter(|p| p.starts_with(driver.dir.path()))
        .collect()
}

/// Volume IDs whose image is attached to a loop device (one line per device).
fn attached(paths: &Paths) -> Vec<String> {
    let images = paths.data.join("images");
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

/// What the driver lists right after a restart.
struct Listed {
    volumes: BTreeSet<String>,
    snapshots: BTreeMap<String, bool>,
}

/// Checks right after a restart, before any retry.
fn check_after_crash(context: &str, paths: &Paths, vols: &[&Vol], snaps: &[&Snap], got: &Listed) {
    let on_disk = storage(paths, context);
    let known: BTreeSet<String> = vols.iter().map(|v| v.id.clone()).collect();
    for id in got.volumes.iter().chain(&on_disk) {
        assert!(
            known.contains(id),
            "{context}: listed or stored volume {id} belongs to no name we used"
        );
    }
    for vol in vols {
        if vol.in_flight.is_some() {
            continue;
        }
        let id = &vol.id;
        let what = format!("{context}: {} ({id}) acked {:?}", vol.name, vol.at);
        if vol.at == At::Absent {
            assert!(
                !got.volumes.contains(id),
                "{what}: deleted volume is listed"
            );
            assert!(!on_disk.contains(id), "{what}: deleted volume has storage");
        } else {
            assert!(got.volumes.contains(id), "{what}: volume is not listed");
            assert!(on_disk.contains(id), "{what}: volume has no storage");
        }
        if vol.at == At::Published {
            assert!(
                common::is_mounted(&paths.target(&vol.name)),
                "{what}: publication is not mounted"
            );
            check_data(context, paths, vol);
        }
    }

    let (stored, _partial) = snapshot_storage(paths, context);
    let known: BTreeSet<String> = snaps.iter().map(|s| s.id.clone()).collect();
    for id in got.snapshots.keys().chain(&stored) {
        assert!(
            known.contains(id),
            "{context}: listed or stored snapshot {id} belongs to no name we used"
        );
    }
    for snap in snaps {
        if snap.in_flight.is_some() {
            continue;
        }
        let what = format!(
            "{context}: snapshot {} ({}) of {} acked {}",
            snap.name,
            snap.id,
            snap.source_id,
            if snap.present { "taken" } else { "deleted" }
        );
        match (snap.present, got.snapshots.get(&snap.id)) {
            (true, None) => panic!("{what}: it is not listed"),
            (true, Some(true)) => {
                assert!(stored.contains(&snap.id), "{what}: ready but not stored");
                assert_eq!(
                    snapshot_token(paths, snap),
                    snap.data,
                    "{what}: its storage does not hold the data of its point in time"
                );
            }
            // A background copy the restart resumed: checked once ready.
            (true, Some(false)) => {}
            (false, Some(_)) => panic!("{what}: a deleted snapshot is listed"),
            (false, None) => {
                assert!(!stored.contains(&snap.id), "{what}: it still has storage");
            }
        }
    }
}

/// After retries (and background copies): volumes, snapshots, storage on disk and on the
/// share, mounts and loop devices are exactly what the acknowledged states say.
fn check_converged(
    context: &str,
    driver: &Driver,
    paths: &Paths,
    vols: &[&Vol],
    snaps: &[&Snap],
    got: &Listed,
) {
    let live: BTreeSet<String> = vols
        .iter()
        .filter(|v| v.at != At::Absent)
        .map(|v| v.id.clone())
        .collect();
    assert_eq!(
        got.volumes, live,
        "{context}: listed volumes differ from the acknowledged ones"
    );
    assert_eq!(
        storage(paths, context),
        live,
        "{context}: storage on disk and on the share differs from the acknowledged volumes"
    );
    let live_shared: BTreeSet<String> = vols
        .iter()
        .filter(|v| v.at != At::Absent && v.kind.shared())
        .map(|v| v.name.clone())
        .collect();
    let archived: BTreeMap<String, usize> = vols
        .iter()
        .filter(|v| v.archived > 0)
        .map(|v| (v.name.clone(), v.archived))
        .collect();
    assert_eq!(
        share_dirs(paths),
        (live_shared, archived),
        "{context}: volume directories (live, archived per name) on the share differ from the \
         acknowledged volumes and deletions"
    );
    assert_eq!(
        share_leftovers(paths),
        Vec::<String>::new(),
        "{context}: temporary markers left on the share"
    );

    let present: BTreeMap<String, &Snap> = snaps
        .iter()
        .filter(|s| s.present)
        .map(|s| (s.id.clone(), *s))
        .collect();
    let listed: BTreeSet<&String> = got.snapshots.keys().collect();
    assert_eq!(
        listed,
        present.keys().collect(),
        "{context}: listed snapshots differ from the acknowledged ones"
    );
    let (stored, partial) = snapshot_storage(paths, context);
    assert_eq!(
        stored.iter().collect::<BTreeSet<_>>(),
        present.keys().collect(),
        "{context}: snapshot storage differs from the acknowledged snapshots"
    );
    assert!(
        partial.is_empty(),
        "{context}: partial snapshot copies left: {partial:?}"
    );
    for snap in present.values() {
        assert_eq!(
            snapshot_token(paths, snap),
            snap.data,
            "{context}: snapshot {} ({}) of {} does not hold the data of its point in time",
            snap.name,
            snap.id,
            snap.source_id
        );
    }

    let mut mounts = BTreeSet::new();
    let mut devices = Vec::new();
    for vol in vols {
        if vol.at >= At::Staged && vol.kind.stage_mounts() {
            mounts.insert(paths.staging(&vol.name));
        }
        if vol.at >= At::Staged && vol.kind.stage_attaches() {
            devices.push(vol.id.clone());
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
        let mut got = attached(paths);
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

/// Retries `attempt` while it is ABORTED (a background copy holds what it needs); any other
/// failure, or no answer, fails the test.
async fn until_not_aborted<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let started = Instant::now();
    loop {
        let answer = tokio::time::timeout(CALL_TIMEOUT, attempt())
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer within {CALL_TIMEOUT:?}"));
        match answer {
            Ok(value) => return value,
            Err(status)
                if status.code() == Code::Aborted && started.elapsed() < ABORTED_DEADLINE =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{what}: {status:?}"),
        }
    }
}

/// Sends `op` until it is acknowledged and records that.
async fn must(c: &mut Clients, paths: &Paths, vol: &mut Vol, op: Op, context: &str) {
    let what = format!("{context}: {op:?} of {} ({})", vol.name, vol.id);
    let v: &Vol = vol;
    until_not_aborted(&what, || {
        let mut c = Clients {
            channel: c.channel.clone(),
            controller: c.controller.clone(),
            node: c.node.clone(),
        };
        let v = v.clone();
        let paths = paths.clone();
        async move { call(&mut c, &paths, &v, op).await }
    })
    .await;
    vol.acked(op);
}

/// Sends `op` for a snapshot until it is acknowledged and records that.
async fn must_snap(c: &mut Clients, snap: &mut Snap, op: SnapOp, context: &str) {
    let what = format!("{context}: {op:?} of snapshot {} ({})", snap.name, snap.id);
    let s: &Snap = snap;
    until_not_aborted(&what, || {
        let mut c = Clients {
            channel: c.channel.clone(),
            controller: c.controller.clone(),
            node: c.node.clone(),
        };
        let s = s.clone();
        async move { call_snap(&mut c, &s, op).await }
    })
    .await;
    snap.present = op == SnapOp::Create;
    snap.in_flight = None;
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
    for tool in ["losetup", "mkfs.ext4", "debugfs"] {
        if std::process::Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

/// Snapshots of every worker in one list (for the checks).
fn all_snaps(owned: &[Owned]) -> Vec<&Snap> {
    owned.iter().flat_map(|o| o.snaps.iter()).collect()
}

fn all_vols(owned: &[Owned]) -> Vec<&Vol> {
    owned.iter().flat_map(|o| o.vols.iter()).collect()
}

/// Totals over the run.
#[derive(Default)]
struct Totals {
    acked: u64,
    writes: u64,
    retried: u64,
    aborted: u64,
    not_ready: u64,
    resumed: u64,
    targeted: u64,
    snapshot_calls: [u64; 4],
    longest_wait: Duration,
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
    // The "share": a local directory every driver process bind-mounts (fsType none), with the
    // volumes' directories, markers and snapshots on it.
    let paths = Paths {
        pods: driver.kubelet_dir().join("pods"),
        share: driver.dir.path().join("share"),
        data: driver.data_dir(),
    };
    std::fs::create_dir(&paths.share).unwrap();
    let mut owned: Vec<Owned> = vec![Owned::default(); workers];
    let mut totals = Totals::default();
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();

    for round in 0..rounds {
        let killed = Arc::new(AtomicBool::new(false));
        let copying = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for (index, mine) in owned.iter_mut().enumerate() {
            tasks.push(tokio::spawn(worker(
                Clients::new(&driver).await,
                paths.clone(),
                std::mem::take(mine),
                Rng(rng.next()),
                index,
                killed.clone(),
                copying.clone(),
            )));
        }
        let delay = Duration::from_millis(20 + rng.below(600));
        // One round in three is cut short right after a CreateSnapshot answered "not ready",
        // while (or just after) its background copy runs.
        let targeted = rng.below(3) == 0;
        let after_copy = Duration::from_millis(rng.below(4));
        let when = if targeted {
            tokio::select! {
                _ = tokio::time::sleep(delay) => format!("{delay:?}"),
                _ = copying.notified() => {
                    tokio::time::sleep(after_copy).await;
                    totals.targeted += 1;
                    format!("{after_copy:?} after a not-ready snapshot answer")
                }
            }
        } else {
            tokio::time::sleep(delay).await;
            format!("{delay:?}")
        };
        killed.store(true, Ordering::SeqCst);
        tokio::task::block_in_place(|| driver.kill());
        let mut round_acked = 0;
        for (index, task) in tasks.into_iter().enumerate() {
            let result = tokio::time::timeout(CALL_TIMEOUT, task)
                .await
                .unwrap_or_else(|_| panic!("round {round}: worker {index} hangs after the kill"))
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            round_acked += result.acked;
            totals.writes += result.writes;
            totals.aborted += result.aborted;
            totals.not_ready += result.not_ready;
            for (total, n) in totals.snapshot_calls.iter_mut().zip(result.snapshot_calls) {
                *total += n;
            }
            if let Some(code) = result.error_code {
                *codes.entry(code).or_default() += 1;
            }
            owned[index] = result.owned;
        }
        totals.acked += round_acked;

        tokio::task::block_in_place(|| driver.restart());
        let context = format!("seed {seed:#x} round {round} (kill after {when})");
        let mut c = settle(&mut driver, &context).await;
        let got = Listed {
            volumes: listed(&mut c, &context).await,
            snapshots: listed_snapshots(&mut c, &context).await,
        };
        {
            let (vols, snaps) = (all_vols(&owned), all_snaps(&owned));
            tokio::task::block_in_place(|| {
                check_after_crash(&context, &paths, &vols, &snaps, &got)
            });
        }
        let mut in_flight = Vec::new();
        let retry = format!("{context}: retry");
        for o in owned.iter_mut() {
            for vol in o.vols.iter_mut() {
                if let Some(op) = vol.in_flight.take() {
                    in_flight.push(format!("{}:{op:?}", vol.name));
                    must(&mut c, &paths, vol, op, &retry).await;
                    totals.retried += 1;
                }
            }
            for snap in o.snaps.iter_mut() {
                if let Some(op) = snap.in_flight.take() {
                    in_flight.push(format!("{}:{op:?}", snap.name));
                    must_snap(&mut c, snap, op, &retry).await;
                    totals.retried += 1;
                }
            }
        }
        let (snapshots, waited) = all_ready(&mut c, &context).await;
        totals.longest_wait = totals.longest_wait.max(waited);
        let got = Listed {
            volumes: listed(&mut c, &context).await,
            snapshots,
        };
        let (vols, snaps) = (all_vols(&owned), all_snaps(&owned));
        tokio::task::block_in_place(|| {
            check_converged(&context, &driver, &paths, &vols, &snaps, &got)
        });
        eprintln!(
            "round {round}: kill after {when}, {round_acked} calls acked, retried \
             {in_flight:?}, {} volumes and {} snapshots live",
            got.volumes.len(),
            got.snapshots.len()
        );
    }

    // Final pass: every snapshot is restored once more; every volume (those restores included)
    // is staged and published, its data checked, then torn down; every snapshot is deleted.
    let context = format!("seed {seed:#x} final cleanup");
    let mut c = Clients::new(&driver).await;
    let mut checked = 0;
    let mut restored = 0;
    for (index, o) in owned.iter_mut().enumerate() {
        for s in 0..o.snaps.len() {
            if !o.snaps[s].present {
                continue;
            }
            let snap = o.snaps[s].clone();
            let name = format!("mx-w{index}-{}-{}-final", o.fresh, snap.kind.tag());
            o.fresh += 1;
            paths.prepare(&name);
            let mut vol = Vol::new(name, snap.kind, &paths.share);
            vol.bytes = snap.bytes;
            vol.origin = Some((Origin::Snapshot(snap.id.clone()), snap.data));
            must(&mut c, &paths, &mut vol, Op::Create, &context).await;
            o.vols.push(vol);
            restored += 1;
        }
        for vol in o.vols.iter_mut().filter(|v| v.at != At::Absent) {
            if vol.at == At::Created {
                must(&mut c, &paths, vol, Op::Stage, &context).await;
            }
            if vol.at == At::Staged {
                must(&mut c, &paths, vol, Op::Publish, &context).await;
            }
            if vol.data_known() {
                checked += 1;
            }
            tokio::task::block_in_place(|| check_data(&context, &paths, vol));
            for op in [Op::Unpublish, Op::Unstage, Op::Delete] {
                must(&mut c, &paths, vol, op, &context).await;
            }
        }
        for snap in o.snaps.iter_mut().filter(|s| s.present) {
            must_snap(&mut c, snap, SnapOp::Delete, &context).await;
        }
    }
    let list = listed(&mut c, &context).await;
    assert!(list.is_empty(), "{context}: volumes left: {list:?}");
    let snaps = listed_snapshots(&mut c, &context).await;
    assert!(snaps.is_empty(), "{context}: snapshots left: {snaps:?}");
    tokio::task::block_in_place(|| {
        assert!(
            storage(&paths, &context).is_empty(),
            "{context}: storage left behind"
        );
        assert_eq!(
            snapshot_storage(&paths, &context),
            (BTreeSet::new(), vec![]),
            "{context}: snapshot storage left behind"
        );
        let (live, archived) = share_dirs(&paths);
        assert!(
            live.is_empty() && share_leftovers(&paths).is_empty(),
            "{context}: left on the share: {:?}",
            entries_of(&paths.share)
        );
        let deletions: BTreeMap<String, usize> = all_vols(&owned)
            .into_iter()
            .filter(|v| v.archived > 0)
            .map(|v| (v.name.clone(), v.archived))
            .collect();
        assert_eq!(
            archived, deletions,
            "{context}: one archived directory per acknowledged deletion with onDelete: archive"
        );
        assert!(
            our_mounts(&driver).is_empty(),
            "{context}: mounts left: {:?}",
            our_mounts(&driver)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !attached(&paths).is_empty() {
            assert!(
                Instant::now() < deadline,
                "{context}: loop devices left: {:?}",
                attached(&paths)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    // The server logs each interrupted background copy it starts again (often done before
    // the first ListSnapshots after the restart).
    totals.resumed = driver.log().matches("copying a snapshot again").count() as u64;
    // A restarted server waits for a `fsfreeze -f` its killed predecessor left running before
    // it thaws that filesystem (otherwise it could end up frozen for good).
    let waited_for_freezes = driver.log().matches("waiting for a fsfreeze left").count();
    let names: usize = owned.iter().map(|o| o.vols.len()).sum();
    let snapshot_names: usize = owned.iter().map(|o| o.snaps.len()).sum();
    let Totals {
        acked,
        writes,
        retried,
        aborted,
        not_ready,
        resumed,
        targeted,
        snapshot_calls: [snapshots_taken, snapshots_deleted, restores, clones],
        longest_wait,
    } = totals;
    eprintln!(
        "mixed crash summary: seed {seed:#x}, {rounds} rounds in {:.1?}: {acked} calls acked, \
         {writes} fsynced writes, {retried} interrupted calls retried, {names} volume names and \
         {snapshot_names} snapshot names used (of the acked calls: {snapshots_taken} \
         CreateSnapshot, {snapshots_deleted} DeleteSnapshot, {restores} restores, {clones} \
         clones), {not_ready} snapshots answered not ready (background copy), {targeted} kills \
         right after such an answer, {resumed} background copies resumed after a restart \
         (longest wait for ready {longest_wait:.1?}), {aborted} calls ABORTED by a running \
         copy, {restored} snapshots restored again at the end and {checked} volumes' data \
         re-read after the last restart; unanswered calls failed with {codes:?}; {} \
         connections or Probes made again after a reset, {} restarted servers found killed \
         from outside, {waited_for_freezes} leftover fsfreeze waited for at start-up",
        started.elapsed(),
        RECONNECTS.load(Ordering::SeqCst),
        OUTSIDE_KILLS.load(Ordering::SeqCst)
    );
    assert!(acked > 0, "no call was ever acknowledged");
}
