//! `k8scsi doctor`: checks this node for what k8scsi needs and reports each finding on one
//! `PASS` / `WARN` / `FAIL` line.
//!
//! `FAIL` is something that breaks the driver as configured (a missing kubelet directory, an
//! unreadable store, a server that answers Probe with not-ready); the exit code is then 1.
//! `WARN` is something to know: a missing optional capability (loop devices, btrfs, XFS reflink,
//! project quotas: needed by backends and capacity enforcement, not by `dir` volumes) or
//! findings such as orphaned storage. `--require` turns chosen optional capabilities into
//! requirements. The capability checks are real probes: scratch images in the temporary
//! directory, attached to loop devices, formatted, mounted and torn down again.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use super::NodeDirs;
use crate::backend::Backend;
use crate::backend::dir::DirBackend;
use crate::engine::ids::VolumeId;
use crate::mount::durability::{self, Durability};
use crate::mount::mountinfo;
use crate::server::Endpoint;
use crate::store::StateDump;

/// Optional capabilities `--require` can make mandatory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Feature {
    /// Loop devices (image-backed volumes).
    Loop,
    /// btrfs with qgroups (enforced capacity, snapshots).
    Btrfs,
    /// XFS with reflink (cheap clones).
    XfsReflink,
    /// ext4 or XFS project quotas (enforced capacity of directory volumes).
    ProjectQuota,
    /// An NFS client: the kernel's nfs filesystem and mount.nfs (`type: shared` on NFS).
    Nfs,
}

/// Options of `k8scsi doctor`.
#[derive(Debug, Clone, clap::Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub dirs: NodeDirs,
    /// The server's endpoint, to check that it answers Probe.
    #[arg(
        long,
        env = "K8SCSI_ENDPOINT",
        default_value = "unix:///run/k8scsi/csi.sock"
    )]
    pub endpoint: String,
    /// Treat these optional capabilities as required (comma separated): a missing one FAILs.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub require: Vec<Feature>,
    /// Skip the filesystem probes (loop devices, mkfs, mount).
    #[arg(long)]
    pub no_probes: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Warn,
    Fail,
}

struct Report {
    failed: usize,
    warned: usize,
    passed: usize,
    require: BTreeSet<Feature>,
}

impl Report {
    fn line(&mut self, verdict: Verdict, check: &str, detail: impl AsRef<str>) {
        let word = match verdict {
            Verdict::Pass => {
                self.passed += 1;
                "PASS"
            }
            Verdict::Warn => {
                self.warned += 1;
                "WARN"
            }
            Verdict::Fail => {
                self.failed += 1;
                "FAIL"
            }
        };
        out!("{word}  {check:<20} {}", detail.as_ref());
    }

    fn pass(&mut self, check: &str, detail: impl AsRef<str>) {
        self.line(Verdict::Pass, check, detail);
    }

    fn warn(&mut self, check: &str, detail: impl AsRef<str>) {
        self.line(Verdict::Warn, check, detail);
    }

    fn fail(&mut self, check: &str, detail: impl AsRef<str>) {
        self.line(Verdict::Fail, check, detail);
    }

    /// A missing optional capability: WARN, or FAIL when `--require`d.
    fn missing(&mut self, feature: Feature, check: &str, detail: impl AsRef<str>) {
        if self.require.contains(&feature) {
            self.fail(check, detail);
        } else {
            self.warn(check, detail);
        }
    }
}

/// Runs every check; exit code 1 when one failed.
pub fn run(args: &DoctorArgs) -> ExitCode {
    let mut report = Report {
        failed: 0,
        warned: 0,
        passed: 0,
        require: args.require.iter().copied().collect(),
    };
    let root = rustix::process::geteuid().is_root();
    let uname = rustix::system::uname();
    report.pass(
        "kernel",
        format!(
            "{} {} {}",
            uname.sysname().to_string_lossy(),
            uname.release().to_string_lossy(),
            uname.machine().to_string_lossy()
        ),
    );
    if root {
        report.pass(
            "privileges",
            "running as root (mounts and loop devices allowed)",
        );
    } else {
        report.warn(
            "privileges",
            "not root: the node plugin runs as root; mount and loop probes are skipped",
        );
    }

    let store = check_store(&mut report, &args.dirs.state_dir);
    check_data_dir(&mut report, &args.dirs.data_dir);
    check_crash_safety(&mut report, &args.dirs);
    check_kubelet_dir(&mut report, &args.dirs.kubelet_dir);
    check_propagation(&mut report, &args.dirs.kubelet_dir);
    check_server(&mut report, &args.endpoint);
    check_nfs_client(&mut report);
    if let Some(store) = &store {
        check_consistency(&mut report, store, &args.dirs);
    }

    if args.no_probes || !root {
        report.warn(
            "filesystem probes",
            if args.no_probes {
                "skipped (--no-probes)"
            } else {
                "skipped: they need root"
            },
        );
    } else {
        match Scratch::new() {
            Ok(scratch) => probe_filesystems(&mut report, &scratch),
            Err(e) => report.fail("filesystem probes", format!("scratch directory: {e}")),
        }
    }

    out!(
        "summary: {} passed, {} warnings, {} failed",
        report.passed,
        report.warned,
        report.failed
    );
    if report.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn check_store(report: &mut Report, state_dir: &Path) -> Option<StateDump> {
    let file = state_dir.join(crate::store::STORE_FILE);
    if !file.exists() {
        report.warn(
            "state store",
            format!(
                "{} does not exist yet (the server creates it on first start)",
                file.display()
            ),
        );
        return None;
    }
    match super::load_state(state_dir) {
        Ok((dump, source)) => {
            let how = match source {
                super::Source::File => "read from the file",
                super::Source::RecoveredCopy => {
                    "not closed cleanly; read from a repaired copy (the server repairs the file \
                     at start)"
                }
                super::Source::Server => "read through the running server's admin socket",
            };
            report.pass(
                "state store",
                format!(
                    "{}: {}, {}, schema {} ({how})",
                    file.display(),
                    plural(dump.volumes.len(), "volume"),
                    plural(dump.publications.len(), "publication"),
                    dump.schema_version.unwrap_or(crate::store::SCHEMA_VERSION),
                ),
            );
            Some(dump)
        }
        Err(e) => {
            report.fail("state store", e);
            None
        }
    }
}

/// `1 volume`, `2 volumes`.
fn plural(n: usize, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

/// Type and space of the filesystem holding `path`.
fn describe_fs(path: &Path) -> String {
    let fs_type = mountinfo::read()
        .ok()
        .and_then(|t| mountinfo::containing(&t, path).map(|e| e.fs_type.clone()))
        .unwrap_or_else(|| "?".to_string());
    match rustix::fs::statvfs(path) {
        Ok(st) => format!(
            "{fs_type}, {} free of {}",
            crate::units::format_size(st.f_bavail.saturating_mul(st.f_frsize)),
            crate::units::format_size(st.f_blocks.saturating_mul(st.f_frsize))
        ),
        Err(_) => fs_type,
    }
}

/// `Some(reason)` when `dir` cannot be written.
fn unwritable(dir: &Path) -> Option<String> {
    if let Some(problem) = crate::health::filesystem_problem("the", dir) {
        return Some(problem);
    }
    rustix::fs::access(dir, rustix::fs::Access::WRITE_OK)
        .err()
        .map(|e| format!("{} is not writable: {e}", dir.display()))
}

fn check_data_dir(report: &mut Report, data_dir: &Path) {
    let volumes = data_dir.join("volumes");
    if !data_dir.exists() {
        report.warn(
            "data directory",
            format!(
                "{} does not exist yet (the server creates it on first start)",
                data_dir.display()
            ),
        );
    } else if let Some(problem) = unwritable(data_dir) {
        report.fail("data directory", problem);
    } else if !volumes.is_dir() {
        report.warn(
            "data directory",
            format!(
                "{} has no volumes directory yet ({})",
                data_dir.display(),
                describe_fs(data_dir)
            ),
        );
    } else {
        report.pass(
            "data directory",
            format!("{} ({})", data_dir.display(), describe_fs(data_dir)),
        );
    }
}

/// What a power loss or a reboot could take: the data directory's volumes, the state store.
fn check_crash_safety(report: &mut Report, dirs: &NodeDirs) {
    let data_dir = &dirs.data_dir;
    if data_dir.exists() {
        match durability::assess(data_dir) {
            Some(Durability {
                weakness: Some(weakness),
                ..
            }) => report.warn("crash safety", weakness),
            Some(Durability { fs_type, .. }) => report.pass(
                "crash safety",
                format!("{fs_type}: an fsync makes volume directory changes durable"),
            ),
            None => report.warn(
                "crash safety",
                format!("cannot tell which filesystem holds {}", data_dir.display()),
            ),
        }
    }
    if let Some(weakness) = durability::state_store_weakness(&dirs.state_dir) {
        report.warn("crash safety", weakness);
    }
}

fn check_kubelet_dir(report: &mut Report, kubelet_dir: &Path) {
    match std::fs::metadata(kubelet_dir) {
        Err(e) => report.fail(
            "kubelet directory",
            format!(
                "{}: {e} (is --kubelet-dir / K8SCSI_KUBELET_DIR the kubelet's root directory?)",
                kubelet_dir.display()
            ),
        ),
        Ok(meta) if !meta.is_dir() => report.fail(
            "kubelet directory",
            format!("{} is not a directory", kubelet_dir.display()),
        ),
        Ok(_) => match unwritable(kubelet_dir) {
            Some(problem) => report.fail("kubelet directory", problem),
            None => report.pass(
                "kubelet directory",
                format!("{} ({})", kubelet_dir.display(), describe_fs(kubelet_dir)),
            ),
        },
    }
}

/// Whether mounts made under the kubelet directory propagate to other mount namespaces (the
/// kubelet's and the pods'), which needs a shared mount.
fn check_propagation(report: &mut Report, kubelet_dir: &Path) {
    use procfs::process::MountOptFields;
    let Ok(dir) = kubelet_dir.canonicalize() else {
        return; // reported by the kubelet directory check
    };
    let table = match procfs::process::Process::myself().and_then(|p| p.mountinfo()) {
        Ok(table) => table,
        Err(e) => {
            report.fail("mount propagation", format!("reading the mount table: {e}"));
            return;
        }
    };
    let Some(mount) = table
        .into_iter()
        .filter(|m| dir.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count())
    else {
        report.fail(
            "mount propagation",
            "no mount contains the kubelet directory",
        );
        return;
    };
    let shared = mount.opt_fields.iter().find_map(|f| match f {
        MountOptFields::Shared(group) => Some(*group),
        _ => None,
    });
    let master = mount
        .opt_fields
        .iter()
        .any(|f| matches!(f, MountOptFields::Master(_)));
    let at = mount.mount_point.display();
    match (shared, master) {
        (Some(group), _) => report.pass(
            "mount propagation",
            format!("{at} is a shared mount (peer group {group}): publications reach the kubelet and pods"),
        ),
        (None, true) => report.warn(
            "mount propagation",
            format!(
                "{at} is a slave mount: mounts made here do not propagate back; in Kubernetes \
                 mount the kubelet directory with mountPropagation: Bidirectional"
            ),
        ),
        (None, false) => report.warn(
            "mount propagation",
            format!(
                "{at} is a private mount: mounts made here are seen only in this mount \
                 namespace; fine on the host, but in a container mount the kubelet directory \
                 with mountPropagation: Bidirectional"
            ),
        ),
    }
}

/// Whether this node could mount NFS exports for `type: shared` volumes: the kernel knows the
/// nfs filesystem (registered, or as a module it can load) and the mount.nfs helper exists.
fn check_nfs_client(report: &mut Report) {
    let registered = std::fs::read_to_string("/proc/filesystems").is_ok_and(|t| {
        t.lines()
            .any(|l| matches!(l.split_whitespace().last(), Some("nfs" | "nfs4")))
    });
    let release = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    let module = std::fs::read_to_string(format!("/lib/modules/{release}/modules.dep"))
        .is_ok_and(|deps| deps.lines().any(|l| l.contains("kernel/fs/nfs/nfs.ko")));
    let helper = [
        "/sbin/mount.nfs",
        "/usr/sbin/mount.nfs",
        "/bin/mount.nfs",
        "/usr/bin/mount.nfs",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists());
    let kernel = if registered {
        "the kernel has the nfs filesystem"
    } else if module {
        "the kernel has the nfs module (not loaded yet)"
    } else {
        ""
    };
    match (kernel, helper) {
        ("", _) => report.missing(
            Feature::Nfs,
            "nfs client",
            "the kernel has no nfs filesystem (not built in, no module): type: shared \
             volumes on NFS exports cannot be mounted on this node",
        ),
        (_, None) => report.missing(
            Feature::Nfs,
            "nfs client",
            format!(
                "{kernel}, but mount.nfs is missing: install nfs-common (Debian, Ubuntu) or \
                 nfs-utils for type: shared volumes on NFS exports"
            ),
        ),
        (_, Some(helper)) => report.pass("nfs client", format!("{kernel} and {helper}")),
    }
}

fn check_server(report: &mut Report, raw: &str) {
    let endpoint = match Endpoint::parse(raw) {
        Ok(e) => e,
        Err(e) => {
            report.fail("server", e);
            return;
        }
    };
    if let Endpoint::Unix(path) = &endpoint
        && !path.exists()
    {
        report.warn(
            "server",
            format!(
                "nothing listens at {} (pass --endpoint or K8SCSI_ENDPOINT if the server uses \
                 another socket)",
                path.display()
            ),
        );
        return;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            report.fail("server", format!("starting a runtime: {e}"));
            return;
        }
    };
    let answer = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), async {
            use crate::csi::proto::identity_client::IdentityClient;
            let channel = crate::client::connect(&endpoint)
                .await
                .map_err(|e| format!("connecting: {e}"))?;
            let mut identity = IdentityClient::new(channel);
            let info = identity
                .get_plugin_info(crate::csi::proto::GetPluginInfoRequest {})
                .await
                .map_err(|s| format!("GetPluginInfo: {}", s.message()))?
                .into_inner();
            let ready = identity
                .probe(crate::csi::proto::ProbeRequest {})
                .await
                .map_err(|s| format!("Probe: {}", s.message()))?
                .into_inner()
                .ready
                .unwrap_or(true);
            Ok::<_, String>((info, ready))
        })
        .await
        .unwrap_or_else(|_| Err("no answer within 5s".to_string()))
    });
    match answer {
        Ok((info, true)) => report.pass(
            "server",
            format!(
                "{} {} answers at {raw} and is ready",
                info.name, info.vendor_version
            ),
        ),
        Ok((info, false)) => report.fail(
            "server",
            format!(
                "{} at {raw} answers Probe with ready=false (its log says why)",
                info.name
            ),
        ),
        Err(e) => report.fail("server", format!("{raw}: {e}")),
    }
}

/// Orphans and leftover mounts, as the server's start-up reconciliation finds them.
fn check_consistency(report: &mut Report, store: &StateDump, dirs: &NodeDirs) {
    let records = &store.volumes;
    let publications = store.publications_by_volume();
    let backend = DirBackend::at(&dirs.data_dir);
    // Only directory volumes live in the volumes directory; other backends keep their own.
    let recorded: BTreeSet<String> = records
        .iter()
        .filter(|r| VolumeId::parse(&r.id).is_ok_and(|id| id.backend() == backend.name()))
        .map(|r| r.id.clone())
        .collect();
    let on_disk: BTreeSet<String> = match backend.list() {
        Ok(ids) => ids.into_iter().map(|id| id.to_string()).collect(),
        Err(_) if !dirs.data_dir.join("volumes").exists() => BTreeSet::new(),
        Err(e) => {
            report.fail("orphans", e.to_string());
            return;
        }
    };
    let orphaned: Vec<&String> = on_disk.difference(&recorded).collect();
    let missing: Vec<&String> = recorded.difference(&on_disk).collect();
    let list = |ids: &[&String]| {
        let shown: Vec<&str> = ids.iter().take(5).map(|s| s.as_str()).collect();
        let more = ids.len().saturating_sub(shown.len());
        if more > 0 {
            format!("{} and {more} more", shown.join(", "))
        } else {
            shown.join(", ")
        }
    };
    if orphaned.is_empty() && missing.is_empty() {
        report.pass(
            "orphans",
            format!(
                "every volume directory has a record and every record a directory ({})",
                plural(recorded.len(), "volume")
            ),
        );
    }
    if !orphaned.is_empty() {
        report.warn(
            "orphans",
            format!(
                "{} volume directories without a record (left alone; DeleteVolume by ID removes \
                 one): {}",
                orphaned.len(),
                list(&orphaned)
            ),
        );
    }
    if !missing.is_empty() {
        report.warn(
            "orphans",
            format!(
                "{} records whose directory is missing: {}",
                missing.len(),
                list(&missing)
            ),
        );
    }

    let table = match mountinfo::read() {
        Ok(t) => t,
        Err(e) => {
            report.fail("leftover mounts", format!("reading the mount table: {e}"));
            return;
        }
    };
    let mut leftover = Vec::new();
    let mut lost = Vec::new();
    for id in &on_disk {
        let Ok(vid) = VolumeId::parse(id) else {
            continue;
        };
        let mounted: BTreeSet<String> =
            mountinfo::bind_mounts_of(&table, &backend.volume_path(&vid))
                .into_iter()
                .map(|e| e.mount_point.to_string_lossy().into_owned())
                .collect();
        let recorded: BTreeSet<String> = publications
            .get(id)
            .map(|ps| ps.iter().map(|p| p.path.clone()).collect())
            .unwrap_or_default();
        leftover.extend(mounted.difference(&recorded).cloned());
        lost.extend(recorded.difference(&mounted).cloned());
    }
    let total: usize = publications.values().map(Vec::len).sum();
    if leftover.is_empty() && lost.is_empty() {
        report.pass(
            "leftover mounts",
            format!(
                "every mount of a volume has a publication record and every record its mount ({})",
                plural(total, "publication")
            ),
        );
    }
    if !leftover.is_empty() {
        let shown: Vec<&String> = leftover.iter().collect();
        report.warn(
            "leftover mounts",
            format!(
                "{} mounts of volumes that no publication explains: {}",
                leftover.len(),
                list(&shown)
            ),
        );
    }
    if !lost.is_empty() {
        let shown: Vec<&String> = lost.iter().collect();
        report.warn(
            "leftover mounts",
            format!(
                "{} recorded publications are not mounted (reboot?; the kubelet's next \
                 NodePublishVolume restores them): {}",
                lost.len(),
                list(&shown)
            ),
        );
    }
}

/// A scratch directory for probe images, removed on drop.
///
/// Doctor runs as root, so the directory must not be one another user can predict or prepare:
/// it gets a random name and mode 0700, and creating it fails if the name exists. Files and mount
/// points inside it are created exclusively, never following a symlink, so that nothing planted
/// there can redirect `set_len`, `mkfs`, `losetup` or `mount` onto another file.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> std::io::Result<Scratch> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("k8scsi-doctor-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()?;
        Ok(Scratch { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A new sparse image file of `bytes` (fails if `name` exists, even as a symlink).
    fn image(&self, name: &str, bytes: u64) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.path().join(name);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o600)
            .open(&path)?;
        file.set_len(bytes)?;
        Ok(path)
    }

    /// A new, empty directory to mount on (fails if `name` exists, even as a symlink).
    fn mount_point(&self, name: &str) -> std::io::Result<PathBuf> {
        let path = self.path().join(name);
        std::fs::create_dir(&path)?;
        Ok(path)
    }
}

/// A loop device attached to an image; detached on drop.
struct Loop {
    device: String,
}

impl Loop {
    fn attach(image: &Path) -> Result<Loop, String> {
        let output = Command::new("losetup")
            .arg("--find")
            .arg("--show")
            .arg(image)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running losetup: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "losetup: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(Loop {
            device: String::from_utf8_lossy(&output.stdout).trim().to_string(),
        })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup")
            .arg("--detach")
            .arg(&self.device)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A mount; unmounted on drop.
struct Mounted {
    target: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.target, rustix::mount::UnmountFlags::DETACH);
    }
}

/// New kernel log lines, to quote the kernel's reason when it refuses a mount.
struct KernelLog {
    fd: Option<rustix::fd::OwnedFd>,
}

impl KernelLog {
    /// Starts following the kernel log from now (silently nothing when it cannot be read).
    fn follow() -> KernelLog {
        use rustix::fs::{Mode, OFlags};
        let fd = rustix::fs::open(
            "/dev/kmsg",
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()
        .filter(|fd| rustix::fs::seek(fd, rustix::fs::SeekFrom::End(0)).is_ok());
        KernelLog { fd }
    }

    /// Messages logged since `follow` (or the last call) that mention `device`.
    fn lines_about(&mut self, device: &str) -> Vec<String> {
        let Some(fd) = &self.fd else {
            return Vec::new();
        };
        let name = device.trim_start_matches("/dev/");
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        // Each read returns one record: "prio,seq,time,flags;message\n".
        while let Ok(n) = rustix::io::read(fd, &mut buf) {
            if n == 0 {
                break;
            }
            let record = String::from_utf8_lossy(&buf[..n]);
            if let Some((_, message)) = record.split_once(';') {
                let message = message.lines().next().unwrap_or("").trim();
                if message.contains(name) {
                    out.push(message.to_string());
                }
            }
        }
        out
    }
}

/// Mounts `device` at `target`; on refusal, the error with the kernel's explanation.
fn mount(device: &str, target: &Path, fs_type: &str, data: &str) -> Result<Mounted, String> {
    let mut log = KernelLog::follow();
    let data = std::ffi::CString::new(data).map_err(|e| e.to_string())?;
    match rustix::mount::mount(
        device,
        target,
        fs_type,
        rustix::mount::MountFlags::empty(),
        Some(data.as_c_str()),
    ) {
        Ok(()) => Ok(Mounted {
            target: target.to_path_buf(),
        }),
        Err(e) => {
            let said = log.lines_about(device);
            Err(if said.is_empty() {
                format!("mount refused: {e}")
            } else {
                format!("mount refused: {e}; kernel: {}", said.join(" / "))
            })
        }
    }
}

/// Runs a tool; `Err` carries its stderr.
fn tool(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                format!("{program} is not installed")
            } else {
                format!("running {program}: {e}")
            }
        })?;
    if output.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let first = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        Err(format!("{program} failed: {}", first.trim()))
    }
}

fn kernel_supports(fs_type: &str) -> bool {
    std::fs::read_to_string("/proc/filesystems")
        .map(|s| {
            s.lines()
                .any(|l| l.split_whitespace().last() == Some(fs_type))
        })
        .unwrap_or(false)
}

fn probe_filesystems(report: &mut Report, scratch: &Scratch) {
    // Loop devices: everything below formats an image on one.
    let loop_ok = match scratch
        .image("loop.img", 16 << 20)
        .map_err(|e| e.to_string())
        .and_then(|img| Loop::attach(&img))
    {
        Ok(dev) => {
            report.pass(
                "loop devices",
                format!("attached and detached {}", dev.device),
            );
            true
        }
        Err(e) => {
            let control = if Path::new("/dev/loop-control").exists() {
                "/dev/loop-control exists"
            } else {
                "/dev/loop-control is missing"
            };
            report.missing(Feature::Loop, "loop devices", format!("{e} ({control})"));
            false
        }
    };
    if !loop_ok {
        for (feature, check) in [
            (Feature::Btrfs, "btrfs"),
            (Feature::XfsReflink, "xfs reflink"),
            (Feature::ProjectQuota, "ext4 project quota"),
            (Feature::ProjectQuota, "xfs project quota"),
        ] {
            report.missing(feature, check, "not probed: needs loop devices");
        }
        return;
    }
    probe_btrfs(report, scratch);
    probe_xfs(report, scratch);
    probe_ext4_quota(report, scratch);
}

/// Formats an image with `mkfs` and attaches it; `Err` explains what is missing.
fn formatted(
    scratch: &Scratch,
    fs_type: &str,
    bytes: u64,
    mkfs: &str,
    mkfs_args: &[&str],
) -> Result<Loop, String> {
    if !kernel_supports(fs_type) {
        return Err(format!(
            "the kernel does not list {fs_type} in /proc/filesystems (module not loaded or not built)"
        ));
    }
    let image = scratch
        .image(&format!("{fs_type}.img"), bytes)
        .map_err(|e| e.to_string())?;
    let image_str = image.to_string_lossy().into_owned();
    let mut args: Vec<&str> = mkfs_args.to_vec();
    args.push(&image_str);
    tool(mkfs, &args)?;
    Loop::attach(&image)
}

fn probe_btrfs(report: &mut Report, scratch: &Scratch) {
    let result =
        formatted(scratch, "btrfs", 128 << 20, "mkfs.btrfs", &["-q", "-f"]).and_then(|dev| {
            let target = scratch.mount_point("btrfs").map_err(|e| e.to_string())?;
            let mounted = mount(&dev.device, &target, "btrfs", "")?;
            let qgroups = tool("btrfs", &["quota", "enable", &target.to_string_lossy()]);
            drop(mounted);
            Ok(qgroups)
        });
    match result {
        Ok(Ok(())) => report.pass(
            "btrfs",
            "formatted, mounted and enabled qgroups on a test filesystem",
        ),
        Ok(Err(e)) => report.missing(
            Feature::Btrfs,
            "btrfs",
            format!("mounts, but qgroups cannot be enabled: {e}"),
        ),
        Err(e) => report.missing(Feature::Btrfs, "btrfs", e),
    }
}

fn probe_xfs(report: &mut Report, scratch: &Scratch) {
    // mkfs.xfs refuses filesystems under 300 MiB; the image is sparse.
    let dev = match formatted(
        scratch,
        "xfs",
        320 << 20,
        "mkfs.xfs",
        &["-q", "-f", "-m", "reflink=1"],
    ) {
        Ok(dev) => dev,
        Err(e) => {
            report.missing(Feature::XfsReflink, "xfs reflink", &e);
            report.missing(Feature::ProjectQuota, "xfs project quota", e);
            return;
        }
    };
    let target = match scratch.mount_point("xfs") {
        Ok(t) => t,
        Err(e) => {
            report.fail("xfs reflink", e.to_string());
            return;
        }
    };
    match mount(&dev.device, &target, "xfs", "") {
        Ok(mounted) => {
            let a = target.join("a");
            let b = target.join("b");
            let cloned = std::fs::write(&a, b"k8scsi doctor\n")
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    tool(
                        "cp",
                        &[
                            "--reflink=always",
                            &a.to_string_lossy(),
                            &b.to_string_lossy(),
                        ],
                    )
                });
            drop(mounted);
            match cloned {
                Ok(()) => report.pass(
                    "xfs reflink",
                    "formatted with reflink=1, mounted and cloned a file",
                ),
                Err(e) => report.missing(
                    Feature::XfsReflink,
                    "xfs reflink",
                    format!("mounts, but cloning failed: {e}"),
                ),
            }
        }
        Err(e) => report.missing(Feature::XfsReflink, "xfs reflink", e),
    }
    match mount(&dev.device, &target, "xfs", "prjquota") {
        Ok(mounted) => {
            drop(mounted);
            report.pass(
                "xfs project quota",
                "mounted a test filesystem with -o prjquota",
            );
        }
        Err(e) => report.missing(Feature::ProjectQuota, "xfs project quota", e),
    }
}

fn probe_ext4_quota(report: &mut Report, scratch: &Scratch) {
    let result = formatted(
        scratch,
        "ext4",
        64 << 20,
        "mkfs.ext4",
        &["-q", "-F", "-O", "quota,project"],
    )
    .and_then(|dev| {
        let target = scratch.mount_point("ext4").map_err(|e| e.to_string())?;
        mount(&dev.device, &target, "ext4", "prjquota").map(drop)
    });
    match result {
        Ok(()) => report.pass(
            "ext4 project quota",
            "formatted with quota,project and mounted with -o prjquota",
        ),
        Err(e) => report.missing(Feature::ProjectQuota, "ext4 project quota", e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn scratch_is_private_random_and_new() {
        let a = Scratch::new().unwrap();
        let b = Scratch::new().unwrap();
        assert_ne!(a.path(), b.path());
        let name = a.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("k8scsi-doctor-"), "{name}");
        assert_ne!(name, format!("k8scsi-doctor-{}", std::process::id()));
        let meta = std::fs::symlink_metadata(a.path()).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
        assert_eq!(meta.uid(), rustix::process::geteuid().as_raw());

        let path = a.path().to_path_buf();
        drop(a);
        assert!(!path.exists(), "removed on drop");
    }

    /// Symlinks planted at the names doctor uses are refused, and their targets untouched.
    #[test]
    fn scratch_never_follows_a_planted_symlink() {
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let victim_dir = outside.path().join("victim-dir");
        std::fs::create_dir(&victim_dir).unwrap();

        let scratch = Scratch::new().unwrap();
        std::os::unix::fs::symlink(&victim, scratch.path().join("loop.img")).unwrap();
        std::os::unix::fs::symlink(&victim_dir, scratch.path().join("ext4")).unwrap();
        assert!(scratch.image("loop.img", 16 << 20).is_err());
        assert!(scratch.mount_point("ext4").is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");

        // An existing regular file is not reused (nor truncated) either.
        std::fs::write(scratch.path().join("xfs.img"), b"x").unwrap();
        assert!(scratch.image("xfs.img", 1 << 20).is_err());
        assert_eq!(std::fs::read(scratch.path().join("xfs.img")).unwrap(), b"x");

        // What doctor itself asks for works.
        let img = scratch.image("btrfs.img", 1 << 20).unwrap();
        assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 20);
        assert!(scratch.mount_point("btrfs").unwrap().is_dir());

        drop(scratch);
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(victim_dir.is_dir());
    }

    /// The attack that worked against the old `/tmp/k8scsi-doctor-<pid>`: another user prepares
    /// that directory with a symlink at `loop.img`; doctor must not write through it.
    #[test]
    fn scratch_ignores_a_prepared_predictable_directory() {
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let predictable =
            std::env::temp_dir().join(format!("k8scsi-doctor-{}", std::process::id()));
        std::fs::create_dir_all(&predictable).unwrap();
        let planted = predictable.join("loop.img");
        let _ = std::fs::remove_file(&planted);
        std::os::unix::fs::symlink(&victim, &planted).unwrap();

        let result = Scratch::new().and_then(|s| s.image("loop.img", 16 << 20).map(|_| s));
        let _ = std::fs::remove_dir_all(&predictable);
        let scratch = result.unwrap();
        assert_ne!(scratch.path(), predictable);
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }
}
