//! A hung filesystem under one volume (issue #6): a FUSE mount whose server never answers is put
//! where a dead server would be (over a publish target, over a volume's backing directory, over
//! a staging path). Calls on those volumes must come back within the mount timeout (plus
//! slack) with an error or an abnormal condition; every other volume keeps working meanwhile;
//! the server stops on SIGTERM; once the FUSE connection is aborted everything is cleaned up.
//!
//! The "server" is nothing: the test opens `/dev/fuse`, mounts with that descriptor and never
//! reads it, so the kernel's INIT request stays unanswered and every access to the mount
//! blocks. Closing the descriptor aborts the connection (blocked calls fail with ENOTCONN);
//! [`HungMounts`] does that on drop, so a failing test never leaves a hung mount behind.

mod common;

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Driver, create_request, publish_request};
use k8scsi::client::mount_capability;
use k8scsi::csi::proto;
use k8scsi::csi::proto::volume_capability::access_mode::Mode;
use rustix::fs::{Mode as FileMode, OFlags};
use rustix::mount::{MountFlags, UnmountFlags};

/// The driver's `--share-timeout` (the mount timeout) in this test.
const TIMEOUT: Duration = Duration::from_secs(15);
/// What a bounded call may take beyond the timeout on a loaded machine.
const SLACK: Duration = Duration::from_secs(30);
/// Calls on healthy volumes must finish well before the hung calls' timeout.
const HEALTHY_BOUND: Duration = Duration::from_secs(7);
const FSTYPE: &str = "fuse.k8scsi-hung";

fn skip_reason() -> Option<String> {
    if !common::is_root() {
        return Some("needs root (FUSE and bind mounts, loop devices)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing (no FUSE support in this kernel)".into());
    }
    for tool in ["losetup", "mkfs.ext4"] {
        if std::process::Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

/// FUSE mounts nobody serves. Dropping this aborts every connection (by closing its device
/// descriptor, and through fusectl where that is mounted) and detaches the mounts.
struct HungMounts {
    /// The test's directory: FUSE mounts of ours anywhere below it are swept up.
    root: PathBuf,
    mounts: Vec<(PathBuf, Option<OwnedFd>)>,
}

impl HungMounts {
    fn new(root: &Path) -> HungMounts {
        HungMounts {
            root: root.to_path_buf(),
            mounts: Vec::new(),
        }
    }

    /// Mounts a FUSE filesystem at `dir` whose INIT is never answered.
    fn mount(&mut self, dir: &Path) {
        let fd = rustix::fs::open(
            "/dev/fuse",
            OFlags::RDWR | OFlags::CLOEXEC,
            FileMode::empty(),
        )
        .expect("open /dev/fuse");
        let data = CString::new(format!(
            "fd={},rootmode=40000,user_id=0,group_id=0",
            fd.as_raw_fd()
        ))
        .unwrap();
        rustix::mount::mount(
            "k8scsi-hung",
            dir,
            FSTYPE,
            MountFlags::NOSUID | MountFlags::NODEV,
            Some(data.as_c_str()),
        )
        .unwrap_or_else(|e| panic!("mounting FUSE at {}: {e}", dir.display()));
        self.mounts.push((dir.to_path_buf(), Some(fd)));
    }

    /// Aborts every connection: blocked calls fail with ENOTCONN and new ones fail at once.
    fn abort(&mut self) {
        for (dir, fd) in &mut self.mounts {
            // fusectl's abort file first (when mounted), then the descriptor: either one ends
            // the connection.
            if let Some(conn) = connection_of(dir) {
                let _ = std::fs::write(format!("/sys/fs/fuse/connections/{conn}/abort"), "1");
            }
            drop(fd.take());
        }
    }

    /// Detaches the FUSE mounts (they answer ENOTCONN after [`HungMounts::abort`]).
    fn detach(&mut self) {
        for (dir, _) in &self.mounts {
            let _ = rustix::mount::unmount(dir, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW);
        }
        // Copies made by mount propagation (when the test directory's mount is shared, a FUSE
        // mount over a bind of a volume also appears over the volume's directory).
        if let Ok(table) = k8scsi::mount::mountinfo::read() {
            for e in table {
                let ours = self
                    .mounts
                    .iter()
                    .any(|(d, _)| d == &e.mount_point || e.mount_point.starts_with(&self.root));
                if ours && e.fs_type == FSTYPE {
                    let _ = rustix::mount::unmount(&e.mount_point, UnmountFlags::DETACH);
                }
            }
        }
    }
}

impl Drop for HungMounts {
    fn drop(&mut self) {
        self.abort();
        self.detach();
    }
}

/// The fusectl connection number of the FUSE mount at `dir` (its anonymous device number),
/// read from the mount table: a stat of the mount would block.
fn connection_of(dir: &Path) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    table.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let (dev, point) = (fields.get(2)?, fields.get(4)?);
        let fstype = fields
            .iter()
            .position(|f| *f == "-")
            .and_then(|i| fields.get(i + 1))?;
        if Path::new(point) != dir || *fstype != FSTYPE {
            return None;
        }
        let (major, minor) = dev.split_once(':')?;
        Some((major.parse::<u64>().ok()? << 20) | minor.parse::<u64>().ok()?)
    })
}

/// Runs `call`, failing the test if it does not return within `bound`; returns the result and
/// how long it took.
async fn timed<T>(
    what: &str,
    bound: Duration,
    call: impl std::future::Future<Output = T>,
) -> (T, Duration) {
    let started = Instant::now();
    match tokio::time::timeout(bound, call).await {
        Ok(result) => (result, started.elapsed()),
        Err(_) => panic!("{what} did not return within {bound:?}"),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Polls the driver's log for `needle`.
fn wait_for_log(d: &Driver, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !d.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "the driver never logged {needle:?}:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn loop_capability() -> proto::VolumeCapability {
    let mut cap = mount_capability(Mode::SingleNodeWriter, vec![]);
    if let Some(proto::volume_capability::AccessType::Mount(m)) = cap.access_type.as_mut() {
        m.fs_type = "ext4".into();
    }
    cap
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_filesystem_under_one_volume_times_out_and_others_keep_working() {
    skip_unless_ready!(skip_reason());
    let timeout_arg = format!("{}s", TIMEOUT.as_secs());
    let d = Driver::start_with(&[
        "--share-timeout",
        &timeout_arg,
        "--metrics-address",
        "127.0.0.1:0",
        "--usage-interval",
        "1s",
        "--reconcile-interval",
        "2s",
    ]);
    // Declared after the driver so it drops first: the connections are aborted before the
    // driver's directories are unmounted and removed.
    let mut hung = HungMounts::new(d.dir.path());
    let mut c = d.controller().await;
    let mut n = d.node().await;

    // Three volumes, each with a dead server in a different place.
    let create = |name: &str| create_request(name, 1 << 20);
    let at_target = common::create_ok(&mut c, create("hung-target"))
        .await
        .volume_id;
    let at_backing = common::create_ok(&mut c, create("hung-backing"))
        .await
        .volume_id;
    let at_deleted = common::create_ok(&mut c, create("hung-deleted"))
        .await
        .volume_id;
    let mut loop_request = create("hung-staging");
    loop_request.capacity_range = Some(proto::CapacityRange {
        required_bytes: 64 << 20,
        limit_bytes: 0,
    });
    loop_request.volume_capabilities = vec![loop_capability()];
    loop_request.parameters = HashMap::from([("type".to_string(), "loop".to_string())]);
    let at_staging = common::create_ok(&mut c, loop_request.clone())
        .await
        .volume_id;
    loop_request.name = "hung-expand".into();
    let at_expand = common::create_ok(&mut c, loop_request).await.volume_id;
    let (target1, target2) = (d.target("hung-target"), d.target("hung-backing"));
    for (id, target) in [(&at_target, &target1), (&at_backing, &target2)] {
        n.node_publish_volume(publish_request(id, target, false))
            .await
            .unwrap();
    }
    let (staging, expand_staging) = (d.target("hung-staging"), d.target("hung-expand"));
    for (id, path) in [(&at_staging, &staging), (&at_expand, &expand_staging)] {
        n.node_stage_volume(proto::NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: path.clone(),
            volume_capability: Some(loop_capability()),
            ..Default::default()
        })
        .await
        .unwrap();
    }

    hung.mount(Path::new(&target1));
    hung.mount(&d.data_dir().join("volumes").join(&at_backing));
    hung.mount(Path::new(&staging));
    hung.mount(Path::new(&expand_staging));
    hung.mount(&d.data_dir().join("volumes").join(&at_deleted));

    // The calls on the hung volumes, all at once, each on its own connection.
    let bound = TIMEOUT + SLACK;
    let unpublish = {
        let (mut n, id, t) = (d.node().await, at_target.clone(), target1.clone());
        tokio::spawn(async move {
            timed("NodeUnpublishVolume over a hung target", bound, async {
                n.node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
                    volume_id: id,
                    target_path: t,
                })
                .await
            })
            .await
        })
    };
    let stats = {
        let (mut n, id, t) = (d.node().await, at_backing.clone(), target2.clone());
        tokio::spawn(async move {
            timed(
                "NodeGetVolumeStats over a hung backing directory",
                bound,
                async {
                    n.node_get_volume_stats(proto::NodeGetVolumeStatsRequest {
                        volume_id: id,
                        volume_path: t,
                        staging_target_path: String::new(),
                    })
                    .await
                },
            )
            .await
        })
    };
    let unstage = {
        let (mut n, id, s) = (d.node().await, at_staging.clone(), staging.clone());
        tokio::spawn(async move {
            timed("NodeUnstageVolume over a hung staging path", bound, async {
                n.node_unstage_volume(proto::NodeUnstageVolumeRequest {
                    volume_id: id,
                    staging_target_path: s,
                })
                .await
            })
            .await
        })
    };
    let delete = {
        let (mut c, id) = (d.controller().await, at_deleted.clone());
        // The removal gets twice the mount timeout (room for a backend's own mount).
        tokio::spawn(async move {
            timed(
                "DeleteVolume of a hung backing directory",
                bound + TIMEOUT,
                async {
                    c.delete_volume(proto::DeleteVolumeRequest {
                        volume_id: id,
                        secrets: Default::default(),
                    })
                    .await
                },
            )
            .await
        })
    };
    let expand_request = proto::NodeExpandVolumeRequest {
        volume_id: at_expand.clone(),
        volume_path: expand_staging.clone(),
        staging_target_path: expand_staging.clone(),
        volume_capability: Some(loop_capability()),
        ..Default::default()
    };
    let expand = {
        let (mut n, request) = (d.node().await, expand_request.clone());
        tokio::spawn(async move {
            timed(
                "NodeExpandVolume over a hung staging path",
                bound,
                n.node_expand_volume(request),
            )
            .await
        })
    };
    let recreate = {
        let (mut c, request) = (d.controller().await, create("hung-backing"));
        tokio::spawn(async move {
            timed(
                "CreateVolume retried for a volume whose backing directory hangs",
                bound,
                c.create_volume(request),
            )
            .await
        })
    };
    let list = {
        let mut c = d.controller().await;
        tokio::spawn(async move {
            timed("ListVolumes with a hung volume", bound, async {
                c.list_volumes(proto::ListVolumesRequest::default()).await
            })
            .await
        })
    };

    // Meanwhile, other volumes go through their whole life, each call timed.
    let mut latencies: Vec<(String, Duration)> = Vec::new();
    let others_started = Instant::now();
    for i in 0..3 {
        let name = format!("healthy-{i}");
        let (volume, took) = timed(
            "CreateVolume",
            HEALTHY_BOUND,
            c.create_volume(create(&name)),
        )
        .await;
        latencies.push((format!("{name} CreateVolume"), took));
        let id = volume.unwrap().into_inner().volume.unwrap().volume_id;
        let target = d.target(&name);
        let (r, took) = timed(
            "NodePublishVolume",
            HEALTHY_BOUND,
            n.node_publish_volume(publish_request(&id, &target, false)),
        )
        .await;
        r.unwrap();
        latencies.push((format!("{name} NodePublishVolume"), took));
        std::fs::write(Path::new(&target).join("data"), b"still working").unwrap();
        let (r, took) = timed(
            "NodeGetVolumeStats",
            HEALTHY_BOUND,
            n.node_get_volume_stats(proto::NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                volume_path: target.clone(),
                staging_target_path: String::new(),
            }),
        )
        .await;
        let condition = r.unwrap().into_inner().volume_condition.unwrap();
        assert!(!condition.abnormal, "{name}: {}", condition.message);
        latencies.push((format!("{name} NodeGetVolumeStats"), took));
        let (r, took) = timed(
            "ControllerGetVolume",
            HEALTHY_BOUND,
            c.controller_get_volume(proto::ControllerGetVolumeRequest {
                volume_id: id.clone(),
            }),
        )
        .await;
        r.unwrap();
        latencies.push((format!("{name} ControllerGetVolume"), took));
        let (r, took) = timed(
            "NodeUnpublishVolume",
            HEALTHY_BOUND,
            n.node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: target.clone(),
            }),
        )
        .await;
        r.unwrap();
        latencies.push((format!("{name} NodeUnpublishVolume"), took));
        let (r, took) = timed(
            "DeleteVolume",
            HEALTHY_BOUND,
            c.delete_volume(proto::DeleteVolumeRequest {
                volume_id: id,
                secrets: Default::default(),
            }),
        )
        .await;
        r.unwrap();
        latencies.push((format!("{name} DeleteVolume"), took));
    }
    let others_took = others_started.elapsed();
    for (what, took) in &latencies {
        println!("healthy volume while another hangs: {what}: {}", ms(*took));
    }
    let slowest = latencies.iter().map(|(_, t)| *t).max().unwrap();
    println!(
        "18 calls on healthy volumes took {} in all (slowest {}), mount timeout {TIMEOUT:?}",
        ms(others_took),
        ms(slowest)
    );

    // The hung calls come back within the timeout plus slack, saying what hangs.
    let (result, took) = unpublish.await.unwrap();
    println!("NodeUnpublishVolume over a hung target: {}", ms(took));
    // The hung FUSE layer was detached lazily and the volume's bind unmounted under it.
    result.expect("a recorded target whose filesystem hangs is detached");
    assert!(!common::mounts_under(&d.kubelet_dir()).contains(&PathBuf::from(&target1)));

    let (result, took) = stats.await.unwrap();
    println!(
        "NodeGetVolumeStats over a hung backing directory: {}",
        ms(took)
    );
    let condition = result.unwrap().into_inner().volume_condition.unwrap();
    assert!(condition.abnormal, "{}", condition.message);
    assert!(
        condition.message.contains("not answering"),
        "{}",
        condition.message
    );
    // It really hung (the mount above is not vacuous): only the timeout ended it.
    assert!(took >= TIMEOUT / 2, "answered after {took:?}");

    let (result, took) = unstage.await.unwrap();
    println!("NodeUnstageVolume over a hung staging path: {}", ms(took));
    result.expect("a recorded staging whose filesystem hangs is detached and unstaged");
    assert!(!common::mounts_under(&d.kubelet_dir()).contains(&PathBuf::from(&staging)));
    // Only the volume staged for the expand below keeps a loop device.
    assert_eq!(
        common::loop_devices_under(d.dir.path()).len(),
        1,
        "{:?}",
        common::loop_devices_under(d.dir.path())
    );

    // Growing a filesystem that hangs: bounded, and not started again while it is blocked.
    let (result, took) = expand.await.unwrap();
    println!("NodeExpandVolume over a hung staging path: {}", ms(took));
    let status = result.expect_err("a resize that hangs is reported");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(took >= TIMEOUT / 2, "answered after {took:?}");
    let (result, took) = timed(
        "NodeExpandVolume again",
        bound,
        n.node_expand_volume(expand_request.clone()),
    )
    .await;
    println!(
        "NodeExpandVolume again while the resize is blocked: {}",
        ms(took)
    );
    assert_eq!(result.unwrap_err().code(), tonic::Code::Unavailable);
    assert!(
        took < TIMEOUT,
        "the hung resize was started again: {took:?}"
    );

    // A retried CreateVolume checks that the storage is still there: bounded like every look.
    let (result, took) = recreate.await.unwrap();
    println!(
        "CreateVolume retried for a volume whose backing directory hangs: {}",
        ms(took)
    );
    let status = result.expect_err("a storage check that hangs is reported");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    // So do a snapshot and a clone of it, which would read its tree: UNAVAILABLE, not a thread
    // blocked for good per retry of the snapshotter or the provisioner.
    let (result, took) = timed(
        "CreateSnapshot of a volume whose backing directory hangs",
        bound,
        c.create_snapshot(proto::CreateSnapshotRequest {
            source_volume_id: at_backing.clone(),
            name: "snap-of-hung".into(),
            ..Default::default()
        }),
    )
    .await;
    println!(
        "CreateSnapshot of a volume whose backing directory hangs: {}",
        ms(took)
    );
    assert_eq!(result.unwrap_err().code(), tonic::Code::Unavailable);
    let mut clone = create("clone-of-hung");
    clone.volume_content_source = Some(proto::VolumeContentSource {
        r#type: Some(proto::volume_content_source::Type::Volume(
            proto::volume_content_source::VolumeSource {
                volume_id: at_backing.clone(),
            },
        )),
    });
    let (result, took) = timed(
        "CreateVolume cloning a volume whose backing directory hangs",
        bound,
        c.create_volume(clone),
    )
    .await;
    println!(
        "CreateVolume cloning a volume whose backing directory hangs: {}",
        ms(took)
    );
    assert_eq!(result.unwrap_err().code(), tonic::Code::Unavailable);

    // The operator's commands answer too, naming what does not answer.
    for args in [&["usage"][..], &["volumes", "show", "hung-backing"][..]] {
        let mut command = d.ops_command(args);
        let (output, took) = timed(
            &format!("k8scsi {}", args.join(" ")),
            Duration::from_secs(10) + SLACK,
            tokio::task::spawn_blocking(move || command.output().unwrap()),
        )
        .await;
        let output = output.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        println!("k8scsi {} with a hung volume: {}", args.join(" "), ms(took));
        assert!(output.status.success(), "{stderr}");
        assert!(stderr.contains("does not answer"), "{stderr}");
    }
    // doctor reads the volumes directory and the mount table but never looks inside a volume,
    // so a hung one neither stops it nor hides the other findings.
    let endpoint = format!("unix://{}", d.socket().display());
    let mut command = d.ops_command(&["doctor", "--no-probes", "--endpoint", &endpoint]);
    let (output, took) = timed(
        "k8scsi doctor",
        Duration::from_secs(10) + SLACK,
        tokio::task::spawn_blocking(move || command.output().unwrap()),
    )
    .await;
    let output = output.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("k8scsi doctor with a hung volume: {}", ms(took));
    assert!(stdout.contains("summary:"), "{stdout}");
    let verdict = |check: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(check))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_string)
    };
    assert_eq!(verdict("server").as_deref(), Some("PASS"), "{stdout}");
    assert!(verdict("orphans").is_some(), "{stdout}");

    let (result, took) = list.await.unwrap();
    println!("ListVolumes with a hung volume: {}", ms(took));
    let entries = result.unwrap().into_inner().entries;
    let backing_entry = entries
        .iter()
        .find(|e| e.volume.as_ref().unwrap().volume_id == at_backing)
        .expect("the hung volume is still listed");
    let condition = backing_entry
        .status
        .as_ref()
        .unwrap()
        .volume_condition
        .as_ref()
        .unwrap();
    assert!(condition.abnormal, "{}", condition.message);

    let (result, took) = delete.await.unwrap();
    println!("DeleteVolume of a hung backing directory: {}", ms(took));
    let status = result.expect_err("a removal that hangs is reported");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(took >= TIMEOUT, "answered after {took:?}");
    // Retried while the removal is still blocked: refused at once, the record kept.
    let (result, took) = timed(
        "DeleteVolume again",
        bound,
        c.delete_volume(proto::DeleteVolumeRequest {
            volume_id: at_deleted.clone(),
            secrets: Default::default(),
        }),
    )
    .await;
    println!(
        "DeleteVolume again while the removal is blocked: {}",
        ms(took)
    );
    assert_eq!(result.unwrap_err().code(), tonic::Code::Unavailable);
    assert!(
        took < TIMEOUT,
        "the still-hung removal was started again: {took:?}"
    );

    // Asked again while the first look is still blocked: answered at once, no new thread.
    let (result, took) = timed(
        "NodeGetVolumeStats again",
        bound,
        n.node_get_volume_stats(proto::NodeGetVolumeStatsRequest {
            volume_id: at_backing.clone(),
            volume_path: target2.clone(),
            staging_target_path: String::new(),
        }),
    )
    .await;
    println!(
        "NodeGetVolumeStats again while the first look is blocked: {}",
        ms(took)
    );
    let condition = result.unwrap().into_inner().volume_condition.unwrap();
    assert!(condition.abnormal, "{}", condition.message);
    assert!(
        took < TIMEOUT,
        "the still-hung volume was probed again: {took:?}"
    );

    // The usage sampler and the periodic reconciliation skip the hung volume and say so.
    wait_for_log(&d, "volumes whose filesystem does not answer were skipped");
    wait_for_log(&d, "does not answer (hung filesystem?)");

    // SIGTERM with calls still blocked in the kernel: the server exits anyway.
    let stopping = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let stopper = std::thread::spawn(move || {
        let mut d = d;
        let status = d.stop();
        let _ = tx.send(status);
        d
    });
    let status = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the server did not exit within 60 s of SIGTERM");
    let mut d = stopper.join().unwrap();
    println!(
        "SIGTERM to exit with calls blocked: {}",
        ms(stopping.elapsed())
    );
    assert!(status.success(), "exit status {status}: {}", d.log());

    // The dead servers go away; a restarted driver cleans up the rest.
    hung.abort();
    hung.detach();
    d.restart();
    let mut c = d.controller().await;
    let mut n = d.node().await;
    n.node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
        volume_id: at_backing.clone(),
        target_path: target2.clone(),
    })
    .await
    .unwrap();
    n.node_unstage_volume(proto::NodeUnstageVolumeRequest {
        volume_id: at_expand.clone(),
        staging_target_path: expand_staging.clone(),
    })
    .await
    .unwrap();
    for id in [
        &at_target,
        &at_backing,
        &at_staging,
        &at_deleted,
        &at_expand,
    ] {
        c.delete_volume(proto::DeleteVolumeRequest {
            volume_id: id.clone(),
            secrets: Default::default(),
        })
        .await
        .unwrap();
    }
    let listed = c
        .list_volumes(proto::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(listed.is_empty(), "{listed:?}");
    assert_eq!(common::mounts_under(d.dir.path()), Vec::<PathBuf>::new());
    assert_eq!(
        common::loop_devices_under(d.dir.path()),
        Vec::<String>::new()
    );
}
