//! Test harness: runs the real `k8scsi` binary on temporary directories and talks to it over its
//! real unix socket with the generated tonic clients.

#![allow(dead_code)]

pub mod fault;
pub mod share;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8scsi::client::{connect, mount_capability};
use k8scsi::csi::proto::controller_client::ControllerClient;
use k8scsi::csi::proto::identity_client::IdentityClient;
use k8scsi::csi::proto::node_client::NodeClient;
use k8scsi::csi::proto::volume_capability::access_mode::Mode;
use k8scsi::csi::proto::{self, CreateVolumeRequest};
use k8scsi::server::Endpoint;
use tonic::transport::Channel;

pub const BINARY: &str = env!("CARGO_BIN_EXE_k8scsi");

/// Whether this process is root; privileged tests print why they skip otherwise.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Skips the calling test (returning early) with a printed reason unless running as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::common::is_root() {
            eprintln!("SKIPPED: this test needs root (bind mounts); CI runs it as root");
            return;
        }
    };
}

/// Skips the calling test (returning early) with a printed reason when `$reason` (an
/// `Option<impl Display>`) is `Some`. As root with `K8SCSI_REQUIRE_TOOLS=1` (CI), a missing tool
/// fails the test instead, so CI cannot silently skip what it is meant to run.
#[macro_export]
macro_rules! skip_unless_ready {
    ($reason:expr) => {
        if let Some(reason) = $reason {
            assert!(
                std::env::var("K8SCSI_REQUIRE_TOOLS").as_deref() != Ok("1")
                    || !$crate::common::is_root(),
                "required tools missing: {reason}"
            );
            eprintln!("SKIPPED: {reason}");
            return;
        }
    };
}

/// A k8scsi server process with its own directories.
pub struct Driver {
    pub dir: tempfile::TempDir,
    pub node_id: String,
    child: Option<Child>,
    extra_args: Vec<String>,
}

impl Driver {
    /// Starts a server in a fresh temporary directory.
    pub fn start() -> Driver {
        Self::start_with(&[])
    }

    /// Starts a server after `prepare` has set up its (still empty) data directory, e.g. by
    /// mounting a filesystem there.
    pub fn start_on(prepare: impl FnOnce(&Path)) -> Driver {
        let dir = tempfile::Builder::new()
            .prefix("k8scsi-test-")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir_all(dir.path().join("kubelet/pods")).unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        prepare(&dir.path().join("data"));
        let mut driver = Driver {
            dir,
            node_id: "node-1".to_string(),
            child: None,
            extra_args: vec![],
        };
        driver.spawn();
        driver
    }

    /// Starts a server with extra `serve` arguments.
    pub fn start_with(extra: &[&str]) -> Driver {
        let dir = tempfile::Builder::new()
            .prefix("k8scsi-test-")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir_all(dir.path().join("kubelet/pods")).unwrap();
        let mut driver = Driver {
            dir,
            node_id: "node-1".to_string(),
            child: None,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
        };
        driver.spawn();
        driver
    }

    /// Starts a server with node ID `node_id` and extra `serve` arguments (e.g. a second
    /// node plugin with `--mode node`).
    pub fn start_as(node_id: &str, extra: &[&str]) -> Driver {
        let dir = tempfile::Builder::new()
            .prefix("k8scsi-test-")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir_all(dir.path().join("kubelet/pods")).unwrap();
        let mut driver = Driver {
            dir,
            node_id: node_id.to_string(),
            child: None,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
        };
        driver.spawn();
        driver
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("csi.sock")
    }

    pub fn kubelet_dir(&self) -> PathBuf {
        self.dir.path().join("kubelet")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `--state-dir .. --data-dir .. --kubelet-dir ..` of this driver.
    fn dir_args(&self) -> [std::ffi::OsString; 6] {
        [
            "--state-dir".into(),
            self.state_dir().into(),
            "--data-dir".into(),
            self.data_dir().into(),
            "--kubelet-dir".into(),
            self.kubelet_dir().into(),
        ]
    }

    /// `k8scsi ARGS --state-dir .. --data-dir .. --kubelet-dir ..`: an operator command on this
    /// driver's node (no endpoint from the environment, no stdin).
    pub fn ops_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BINARY);
        cmd.args(args)
            .args(self.dir_args())
            .env_remove("K8SCSI_ENDPOINT")
            .stdin(std::process::Stdio::null());
        cmd
    }

    /// The command line that starts this driver (for tests that start a second one).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(BINARY);
        cmd.arg("serve")
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket().display()))
            .arg("--node-id")
            .arg(&self.node_id)
            .args(self.dir_args())
            .args(&self.extra_args);
        cmd
    }

    fn spawn(&mut self) {
        self.spawn_adjusted(|_| {});
    }

    /// Starts the server again on the same directories with its command changed by `adjust`
    /// (e.g. another PATH, to run it with a tool missing or wrapped).
    pub fn restart_with(&mut self, adjust: impl FnOnce(&mut Command)) {
        self.kill();
        self.spawn_adjusted(adjust);
    }

    fn spawn_adjusted(&mut self, adjust: impl FnOnce(&mut Command)) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut command = self.command();
        adjust(&mut command);
        let child = command
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start k8scsi");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("k8scsi exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "k8scsi did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILLs the server (no cleanup, like a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERMs the server and waits for it to exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        child.wait().unwrap()
    }

    /// Starts the server again on the same directories.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub async fn channel(&self) -> Channel {
        connect(&Endpoint::Unix(self.socket()))
            .await
            .expect("connect")
    }

    pub async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel().await)
    }

    pub async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().await)
    }

    pub async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel().await)
    }

    /// A target path inside the kubelet dir whose parent exists, as the kubelet prepares it.
    pub fn target(&self, pod: &str) -> String {
        let parent = self.kubelet_dir().join("pods").join(pod);
        std::fs::create_dir_all(&parent).unwrap();
        parent.join("mount").to_string_lossy().into_owned()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.kill();
        // Unmount anything a failed test left under the kubelet dir so the temp dir can go.
        if let Ok(table) = k8scsi::mount::mountinfo::read() {
            let mut points: Vec<PathBuf> = table
                .into_iter()
                .map(|e| e.mount_point)
                .filter(|p| p.starts_with(self.dir.path()))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
            for p in points {
                let _ = rustix::mount::unmount(&p, rustix::mount::UnmountFlags::DETACH);
            }
        }
    }
}

/// StorageClass parameters for tests that run on whatever filesystem holds the temp dir: most
/// are not about capacity enforcement, which needs btrfs (see tests/capacity.rs).
pub fn unenforced() -> std::collections::HashMap<String, String> {
    [("enforceCapacity".to_string(), "false".to_string())].into()
}

/// A CreateVolume request for a single-node-writer mount volume of `bytes`, unenforced.
pub fn create_request(name: &str, bytes: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: Some(proto::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_capability(Mode::SingleNodeWriter, vec![])],
        parameters: unenforced(),
        ..Default::default()
    }
}

/// A NodePublishVolume request.
pub fn publish_request(
    volume_id: &str,
    target: &str,
    readonly: bool,
) -> proto::NodePublishVolumeRequest {
    proto::NodePublishVolumeRequest {
        volume_id: volume_id.to_string(),
        target_path: target.to_string(),
        volume_capability: Some(mount_capability(Mode::SingleNodeWriter, vec![])),
        readonly,
        ..Default::default()
    }
}

/// Formats a sparse image of `mib` MiB next to `data` with `mkfs` and mounts it at `data`
/// (mount(8) attaches an autoclear loop device, freed at unmount).
pub fn mount_image(data: &Path, mib: u64, mkfs: &[&str]) {
    let image = data.parent().unwrap().join("data.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    let out = Command::new(mkfs[0])
        .args(&mkfs[1..])
        .arg(&image)
        .output()
        .unwrap();
    assert!(out.status.success(), "{mkfs:?}: {out:?}");
    let out = Command::new("mount")
        .args(["-o", "loop"])
        .arg(&image)
        .arg(data)
        .output()
        .unwrap();
    assert!(out.status.success(), "mount: {out:?}");
}

/// Whether `path` is a mount point according to the kernel's mount table.
pub fn is_mounted(path: &Path) -> bool {
    k8scsi::mount::mountinfo::read()
        .unwrap()
        .iter()
        .any(|e| e.mount_point == path)
}

/// Mount points under `dir` according to the kernel's mount table (never stat'ed, so a hung
/// mount cannot block the test), deepest first so they can be unmounted in order.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = k8scsi::mount::mountinfo::read()
        .unwrap()
        .into_iter()
        .map(|e| e.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points
}

/// Loop devices (their `/dev/loopN` names) whose backing file lives under `dir`: a test looks
/// only at its own devices, never at the machine's.
pub fn loop_devices_under(dir: &Path) -> Vec<String> {
    let out = Command::new("losetup")
        .args(["-n", "-O", "NAME,BACK-FILE", "-l"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&*dir.to_string_lossy()))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// CreateVolume that must succeed: the new volume; the test fails naming the request's volume
/// otherwise.
pub async fn create_ok(
    controller: &mut ControllerClient<Channel>,
    request: CreateVolumeRequest,
) -> proto::Volume {
    let name = request.name.clone();
    controller
        .create_volume(request)
        .await
        .unwrap_or_else(|s| panic!("CreateVolume {name:?}: {s:?}"))
        .into_inner()
        .volume
        .expect("volume in response")
}
