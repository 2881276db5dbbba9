//! Loop-device backed volumes: the building blocks.
//!
//! A loop volume is an image file in the data directory, attached to a `/dev/loopN` block
//! device, formatted with ext4 or xfs (filesystem volumes) or handed to the pod raw (block
//! volumes). Its size is enforced by construction: the filesystem cannot grow past the image.
//!
//! Like [`super::btrfs`], the work is done by the well-known tools operators use to inspect the
//! result: `losetup` (util-linux), `blkid`, `mkfs.ext4`/`resize2fs` (e2fsprogs) and
//! `mkfs.xfs`/`xfs_growfs` (xfsprogs). Every argument we pass is an option we wrote, a number or
//! a path; paths are always passed as separate arguments, never through a shell. Loop devices
//! are found through sysfs (`/sys/block/loopN/loop/backing_file`) rather than by parsing
//! `losetup` output.
//!
//! What is and is not set on the devices we attach:
//! - **Direct I/O** is requested (`losetup --direct-io=on`) so the image's pages are not cached
//!   twice (once for the loop device, once for the backing file). The kernel silently falls back
//!   to buffered I/O when the backing filesystem or the block sizes do not allow it; the state
//!   is visible in `/sys/block/loopN/loop/dio` and logged by [`attach`].
//! - **Autoclear is not set.** `losetup` has no option for `LO_FLAGS_AUTOCLEAR` and setting it
//!   ourselves needs the `LOOP_SET_STATUS64` ioctl, which is `unsafe` in rustix (the crate
//!   forbids unsafe code). Devices therefore stay attached until [`detach`] is called, across
//!   driver restarts, and [`attach`] adopts them. That is what block volumes need anyway: with
//!   autoclear, a pod closing its raw device would tear the device down under the bind mount.
//!   The kernel does set autoclear in one case: [`detach`] of a device that is still open (e.g.
//!   mounted) marks it to be torn down on last close; [`detach`] reports that as an error.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::fs::{FallocateFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::BackendError;

/// Where the kernel lists block devices.
const SYS_BLOCK: &str = "/sys/block";

/// The suffix `d_path` appends to the name of an unlinked backing file.
const DELETED_SUFFIX: &[u8] = b" (deleted)";

/// Mode of image files we create.
const IMAGE_MODE: u32 = 0o600;

/// How long [`detach`] waits for the kernel to release a device it was asked to detach (a
/// short-lived opener such as udev's blkid delays the release).
const DETACH_WAIT: Duration = Duration::from_secs(2);

/// Serialises attaches (and the detach calls themselves) within this process, so two concurrent
/// attaches of the same image cannot both find it unattached and create two devices.
static LOOP_LOCK: Mutex<()> = Mutex::new(());

fn loop_lock() -> std::sync::MutexGuard<'static, ()> {
    LOOP_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The filesystem of a loop volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    /// Parses the CSI `fs_type` (`""` means the default, ext4).
    pub fn parse(s: &str) -> Result<FsType, String> {
        match s {
            "" | "ext4" => Ok(FsType::Ext4),
            "xfs" => Ok(FsType::Xfs),
            other => Err(format!(
                "unsupported filesystem type {other:?}: expected ext4 or xfs"
            )),
        }
    }

    /// The name used by the CSI spec, `mount -t` and `blkid` (`ext4`, `xfs`).
    pub fn name(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }

    /// The smallest image [`format`] accepts: mkfs.xfs refuses filesystems below 300 MiB, and
    /// mkfs.ext4 (4 KiB blocks) silently leaves out the journal below 8 MiB.
    pub fn min_bytes(self) -> u64 {
        match self {
            FsType::Ext4 => 8 << 20,
            FsType::Xfs => 300 << 20,
        }
    }
}

impl std::fmt::Display for FsType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Runs `program args... path` and returns its stdout, or its stderr as the error.
/// Where `setpriv` (util-linux, like `losetup`) is looked for.
const SETPRIV: &str = "/usr/bin/setpriv";

/// A command for `program` that dies with the thread that started it.
///
/// Without this, a tool still running when the driver is SIGKILLed keeps going as an orphan:
/// a `losetup` finishing after the restarted driver retried the same attach leaves the image on
/// two loop devices, and an `mkfs` racing a retried create's `mkfs` writes one image twice.
/// `setpriv --pdeathsig KILL` makes the kernel kill the tool when the driver goes (found by
/// tests/crash_mixed.rs). Without `setpriv` the tool runs directly, as before.
pub(crate) fn tool(program: &str) -> Command {
    if Path::new(SETPRIV).exists() {
        let mut cmd = Command::new(SETPRIV);
        cmd.args(["--pdeathsig", "KILL", "--", program]);
        cmd
    } else {
        Command::new(program)
    }
}

fn run(program: &str, args: &[&str], path: &Path) -> Result<String, BackendError> {
    let output = tool(program)
        .args(args)
        .arg(path)
        .output()
        .map_err(|e| BackendError::io(spawn_op(program), path, e))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(command_error(program, args, path, &output))
    }
}

fn command_error(
    program: &str,
    args: &[&str],
    path: &Path,
    output: &std::process::Output,
) -> BackendError {
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    let stderr = if stderr.is_empty() {
        format!(
            "{} ({})",
            String::from_utf8_lossy(&output.stdout).trim(),
            output.status
        )
    } else {
        stderr
    };
    BackendError::Command {
        command: std::iter::once(program)
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join(" "),
        path: path.to_path_buf(),
        stderr,
    }
}

/// The `op` of a failure to start a tool (the `&'static str` [`BackendError::Io`] wants).
fn spawn_op(program: &str) -> &'static str {
    match program {
        "losetup" => "run losetup",
        "blkid" => "run blkid",
        "mkfs.ext4" => "run mkfs.ext4",
        "mkfs.xfs" => "run mkfs.xfs",
        "resize2fs" => "run resize2fs",
        "xfs_growfs" => "run xfs_growfs",
        _ => "run",
    }
}

fn errno_io(op: &'static str, path: &Path, errno: Errno) -> BackendError {
    BackendError::io(op, path, errno.into())
}

/// Opens an existing image for writing without following a symlink at `path`, and checks that
/// it is a regular file. `O_NONBLOCK` keeps a FIFO planted at `path` from blocking the open.
fn open_image(path: &Path) -> Result<File, BackendError> {
    let fd = rustix::fs::open(
        path,
        OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::LOOP => symlink_refused(path),
        other => errno_io("open", path, other),
    })?;
    let file = File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| BackendError::io("stat", path, e))?;
    if !meta.file_type().is_file() {
        return Err(BackendError::Unsupported(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    Ok(file)
}

fn symlink_refused(path: &Path) -> BackendError {
    BackendError::Unsupported(format!(
        "{} is a symlink; refusing to use it as an image",
        path.display()
    ))
}

/// Allocates `[offset, offset + len)` of `file`, extending its size.
fn allocate(file: &File, path: &Path, offset: u64, len: u64) -> Result<(), BackendError> {
    rustix::fs::fallocate(file, FallocateFlags::empty(), offset, len).map_err(|e| match e {
        Errno::OPNOTSUPP | Errno::NOSYS => BackendError::Unsupported(format!(
            "the filesystem holding {} cannot preallocate space (fallocate: {e})",
            path.display()
        )),
        other => errno_io("fallocate", path, other),
    })
}

/// Creates the image file `path` of `bytes` bytes, mode 0600.
///
/// Sparse (`ftruncate`) unless `preallocate`, in which case every block is allocated up front
/// (`fallocate`), so the volume cannot later fail with ENOSPC on the node's disk; ENOSPC now
/// is reported through [`BackendError::is_out_of_space`].
///
/// Idempotent: an existing regular file at `path` is adopted and extended to `bytes` if it is
/// smaller (a retry after a crash); with `preallocate` its first `bytes` are (re)allocated,
/// which is cheap where they already are. A file we created is removed again when sizing it
/// fails. A symlink at `path` is refused ([`BackendError::Unsupported`]), never followed.
pub fn create_image(path: &Path, bytes: u64, preallocate: bool) -> Result<(), BackendError> {
    let created = rustix::fs::open(
        path,
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(IMAGE_MODE),
    );
    let (file, created) = match created {
        Ok(fd) => (File::from(fd), true),
        // O_CREAT|O_EXCL fails with EEXIST on any existing name, symlinks included.
        Err(Errno::EXIST) => (open_image(path)?, false),
        Err(e) => return Err(errno_io("create", path, e)),
    };
    let result = size_image(&file, path, bytes, preallocate);
    if result.is_err() && created {
        drop(file);
        let _ = std::fs::remove_file(path);
    }
    result
}

fn size_image(file: &File, path: &Path, bytes: u64, preallocate: bool) -> Result<(), BackendError> {
    let len = file
        .metadata()
        .map_err(|e| BackendError::io("stat", path, e))?
        .len();
    if preallocate {
        if bytes > 0 {
            allocate(file, path, 0, bytes)?;
        }
    } else if len < bytes {
        file.set_len(bytes)
            .map_err(|e| BackendError::io("truncate", path, e))?;
    } else {
        return Ok(());
    }
    file.sync_all()
        .map_err(|e| BackendError::io("fsync", path, e))
}

/// Size in bytes of an image file or block device.
fn size_of(path: &Path) -> Result<u64, BackendError> {
    let meta = std::fs::metadata(path).map_err(|e| BackendError::io("stat", path, e))?;
    if meta.file_type().is_file() {
        Ok(meta.len())
    } else {
        device_size(path)
    }
}

/// What `blkid -p` found on an image or device.
#[derive(Debug, PartialEq, Eq)]
enum Probe {
    /// No signature at all.
    Empty,
    /// A filesystem (`TYPE`).
    Filesystem(String),
    /// Something else: a partition table, RAID member, ... (description for the error).
    Other(String),
}

/// Parses `blkid -p -o export` output (`KEY=value` lines).
fn parse_blkid_export(out: &str) -> Probe {
    let value = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_string)
    };
    match (value("TYPE"), value("PTTYPE")) {
        (Some(fs), _) => Probe::Filesystem(fs),
        (None, Some(pt)) => Probe::Other(format!("a {pt} partition table")),
        (None, None) if out.trim().is_empty() => Probe::Empty,
        (None, None) => Probe::Other(format!(
            "an unknown signature ({})",
            out.lines().collect::<Vec<_>>().join(", ")
        )),
    }
}

/// Low-level probe (`blkid -p`: no cache, reads the superblocks itself).
fn probe(path: &Path) -> Result<Probe, BackendError> {
    let args = ["-p", "-o", "export"];
    let output = tool("blkid")
        .args(args)
        .arg(path)
        .output()
        .map_err(|e| BackendError::io("run blkid", path, e))?;
    match output.status.code() {
        Some(0) => Ok(parse_blkid_export(&String::from_utf8_lossy(&output.stdout))),
        // 2: nothing detected.
        Some(2) => Ok(Probe::Empty),
        // 8: ambivalent (several signatures); 4: usage or I/O error.
        _ => Err(command_error("blkid", &args, path, &output)),
    }
}

/// Formats an image file or block device with `fs`.
///
/// Skips the work when it already holds a filesystem of that type (a retry, or a volume being
/// staged again). Refuses ([`BackendError::Unsupported`]) to overwrite any other signature -
/// another filesystem, a partition table - so user data is never destroyed, and refuses sizes
/// below [`FsType::min_bytes`].
///
/// ext4 is made with `-m 0` (no blocks reserved for root: the user gets the size they asked
/// for) and 4 KiB blocks regardless of size (mke2fs would pick 1 KiB blocks for small images,
/// which a volume that is later expanded keeps forever). Neither mkfs discards (`-E nodiscard`,
/// `-K`): discarding through a loop device or on a file punches holes, which would undo a
/// preallocated image, and a fresh sparse image reads as zeros already.
pub fn format(image_or_device: &Path, fs: FsType) -> Result<(), BackendError> {
    let path = image_or_device;
    let size = size_of(path)?;
    if size < fs.min_bytes() {
        return Err(BackendError::Unsupported(format!(
            "{} has {size} bytes; {fs} needs at least {} bytes",
            path.display(),
            fs.min_bytes()
        )));
    }
    match probe(path)? {
        Probe::Empty => {}
        Probe::Filesystem(found) if found == fs.name() => return Ok(()),
        Probe::Filesystem(found) => {
            return Err(BackendError::Unsupported(format!(
                "{} already holds a {found} filesystem; refusing to format it as {fs}",
                path.display()
            )));
        }
        Probe::Other(what) => {
            return Err(BackendError::Unsupported(format!(
                "{} holds {what}; refusing to format it as {fs}",
                path.display()
            )));
        }
    }
    match fs {
        FsType::Ext4 => run(
            "mkfs.ext4",
            &["-F", "-q", "-m", "0", "-b", "4096", "-E", "nodiscard"],
            path,
        ),
        FsType::Xfs => run("mkfs.xfs", &["-f", "-q", "-K"], path),
    }
    .map(|_| ())
}

/// One attached loop device, as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Attachment {
    /// `/dev/loopN`.
    device: PathBuf,
    /// The backing file's path as the kernel prints it, without the deleted suffix.
    backing: PathBuf,
    /// Whether the backing file has been unlinked.
    deleted: bool,
    /// Whether the device was attached read-only (`/sys/block/loopN/ro`).
    read_only: bool,
}

/// Parses the contents of `/sys/block/loopN/loop/backing_file`.
fn parse_backing_file(contents: &[u8]) -> (PathBuf, bool) {
    let contents = contents.strip_suffix(b"\n").unwrap_or(contents);
    match contents.strip_suffix(DELETED_SUFFIX) {
        Some(path) => (PathBuf::from(OsStr::from_bytes(path)), true),
        None => (PathBuf::from(OsStr::from_bytes(contents)), false),
    }
}

/// `N` of a `loopN` name.
fn loop_index(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("loop")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Every attached loop device under `sys_block`, lowest number first.
fn attachments(sys_block: &Path) -> Result<Vec<Attachment>, BackendError> {
    let entries =
        std::fs::read_dir(sys_block).map_err(|e| BackendError::io("read_dir", sys_block, e))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| BackendError::io("read_dir", sys_block, e))?;
        let name = entry.file_name();
        let Some(index) = name.to_str().and_then(loop_index) else {
            continue;
        };
        let attr = entry.path().join("loop/backing_file");
        let contents = match std::fs::read(&attr) {
            Ok(c) => c,
            // Not attached (the `loop` directory exists only while attached), or detached
            // while we looked.
            Err(e)
                if e.kind() == ErrorKind::NotFound
                    || matches!(e.raw_os_error(), Some(6) | Some(19)) =>
            {
                continue;
            }
            Err(e) => return Err(BackendError::io("read", &attr, e)),
        };
        let (backing, deleted) = parse_backing_file(&contents);
        let read_only = std::fs::read(entry.path().join("ro")).is_ok_and(|v| v.starts_with(b"1"));
        found.push((
            index,
            Attachment {
                device: Path::new("/dev").join(&name),
                backing,
                deleted,
                read_only,
            },
        ));
    }
    found.sort_by_key(|(index, _)| *index);
    Ok(found.into_iter().map(|(_, a)| a).collect())
}

/// The path the kernel shows for `image` once attached, and whether the image exists. For an
/// image that no longer exists, the canonical parent joined with the file name (the kernel
/// shows the path it had, with ` (deleted)`).
fn resolve(image: &Path) -> Result<(PathBuf, bool), BackendError> {
    match std::fs::canonicalize(image) {
        Ok(path) => Ok((path, true)),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let absolute = if image.is_absolute() {
                image.to_path_buf()
            } else {
                std::env::current_dir()
                    .map_err(|e| BackendError::io("getcwd", image, e))?
                    .join(image)
            };
            match (absolute.parent(), absolute.file_name()) {
                (Some(parent), Some(name)) => {
                    let parent =
                        std::fs::canonicalize(parent).unwrap_or_else(|_| parent.to_path_buf());
                    Ok((parent.join(name), false))
                }
                _ => Ok((absolute, false)),
            }
        }
        Err(e) => Err(BackendError::io("canonicalize", image, e)),
    }
}

fn find_in(sys_block: &Path, image: &Path) -> Result<Option<PathBuf>, BackendError> {
    find_in_mode(sys_block, image, false)
}

/// The writable (`read_only` false) or read-only attachment of `image`.
fn find_in_mode(
    sys_block: &Path,
    image: &Path,
    read_only: bool,
) -> Result<Option<PathBuf>, BackendError> {
    let (target, exists) = resolve(image)?;
    Ok(attachments(sys_block)?
        .into_iter()
        // While the image exists, a deleted file that had its name is an older image, not it.
        .find(|a| a.backing == target && a.deleted != exists && a.read_only == read_only)
        .map(|a| a.device))
}

/// The read-only loop device backed by `image`, if any (see [`attach_read_only`]).
pub fn find_attached_read_only(image: &Path) -> Result<Option<PathBuf>, BackendError> {
    find_in_mode(Path::new(SYS_BLOCK), image, true)
}

/// The writable loop device backed by `image`, if any (the lowest-numbered one if several).
///
/// Matches the canonical path of `image` against `/sys/block/loop*/loop/backing_file`. When
/// `image` no longer exists, a device whose backing file was unlinked from that path
/// (` (deleted)`) is returned, so a volume whose image was removed while attached can still be
/// found and detached.
pub fn find_attached(image: &Path) -> Result<Option<PathBuf>, BackendError> {
    find_in(Path::new(SYS_BLOCK), image)
}

/// Whether the kernel does direct I/O on `device` (`None` when sysfs does not say).
fn direct_io(device: &Path) -> Option<bool> {
    let name = device.file_name()?;
    let dio = std::fs::read_to_string(Path::new(SYS_BLOCK).join(name).join("loop/dio")).ok()?;
    Some(dio.trim() == "1")
}

/// Attaches `image` to a free loop device and returns the device (`/dev/loopN`).
///
/// Idempotent: an existing attachment of the same image is returned instead (by this module's
/// lookup first, then by `losetup --nooverlap`, which also compares inode numbers). Attaches and
/// detaches are serialised within the process; another process attaching the same image at the
/// same moment is not excluded.
///
/// Direct I/O is requested; if `losetup` fails with it, the attach is retried without it. The
/// kernel may also fall back to buffered I/O silently; either way the result is logged.
///
/// Autoclear is **not** set (see the module documentation): the device stays attached until
/// [`detach`], also across driver restarts.
pub fn attach(image: &Path) -> Result<PathBuf, BackendError> {
    attach_in_mode(image, false)
}

/// Attaches `image` a second time, read-only, for read-only publications of a raw block
/// volume: a read-only bind mount of a device node does not stop writes through it (the mount
/// flag guards the filesystem holding the node, not the device), but the kernel refuses every
/// write to a read-only loop device. Idempotent like [`attach`]; [`detach`] detaches it with the
/// writable one.
pub fn attach_read_only(image: &Path) -> Result<PathBuf, BackendError> {
    attach_in_mode(image, true)
}

fn attach_in_mode(image: &Path, read_only: bool) -> Result<PathBuf, BackendError> {
    let _lock = loop_lock();
    let (device, fresh) = attach_locked(image, read_only)?;
    if read_only {
        return Ok(device);
    }
    if is_fully_allocated(image)? {
        // Before anything mounts or opens the device.
        if let Err(e) = refuse_discards(&device) {
            tracing::warn!(image = %image.display(), device = %device.display(), error = %e,
                "could not turn discards off for a preallocated image: fstrim or a discard \
                 mount inside it would give its space back");
        }
        return Ok(device);
    }
    if !fresh || !refuses_discards(&device) {
        return Ok(device);
    }
    // A sparse image on a device that a preallocated one left refusing discards (the kernel
    // keeps the setting after a detach and will not raise it again): trade the device for a
    // fresh one, or freed space inside this volume would never go back to the data filesystem.
    run("losetup", &["-d"], &device)?;
    retire_if_discards_refused(&device);
    let (device, _) = attach_locked(image, read_only)?;
    if refuses_discards(&device) {
        tracing::warn!(image = %image.display(), device = %device.display(),
            "loop device refuses discards: space freed inside this volume stays allocated");
    }
    Ok(device)
}

/// [`attach_in_mode`] under the loop lock: the device, and whether this call attached it.
fn attach_locked(image: &Path, read_only: bool) -> Result<(PathBuf, bool), BackendError> {
    let find = |image: &Path| find_in_mode(Path::new(SYS_BLOCK), image, read_only);
    if let Some(device) = find(image)? {
        return Ok((device, false));
    }
    let (path, exists) = resolve(image)?;
    if !exists {
        return Err(BackendError::io(
            "attach",
            image,
            std::io::Error::from(ErrorKind::NotFound),
        ));
    }
    // 512-byte logical sectors always: with direct I/O the kernel would otherwise take the
    // backing file's direct I/O alignment, which becomes the filesystem block size once the
    // image shares extents with a snapshot (reflink), and a filesystem made with 512-byte
    // sectors then no longer mounts. The kernel falls back to buffered I/O where the fixed
    // size does not fit the file's alignment.
    // `--nooverlap` would hand back the writable device for a read-only attach.
    let base: &[&str] = if read_only {
        &["--find", "--show", "--read-only", "--sector-size", "512"]
    } else {
        &["--find", "--show", "--nooverlap", "--sector-size", "512"]
    };
    let stdout = match run("losetup", &[base, &["--direct-io=on"]].concat(), &path) {
        Ok(out) => out,
        Err(dio_error) => {
            // Older losetup sets direct I/O after attaching; if that step failed the device
            // may be attached already.
            if let Some(device) = find(image)? {
                tracing::warn!(image = %path.display(), device = %device.display(),
                    error = %dio_error, "loop device attached without direct I/O");
                return Ok((device, true));
            }
            let out = run("losetup", base, &path)?;
            tracing::warn!(image = %path.display(), error = %dio_error,
                "losetup refused direct I/O; attached with buffered I/O");
            out
        }
    };
    let device = PathBuf::from(stdout.trim());
    if device.as_os_str().is_empty() {
        return Err(BackendError::Command {
            command: "losetup --find --show".into(),
            path,
            stderr: "no device printed".into(),
        });
    }
    match direct_io(&device) {
        Some(true) => {
            tracing::debug!(image = %path.display(), device = %device.display(), "attached")
        }
        _ => tracing::info!(image = %path.display(), device = %device.display(),
            "attached with buffered I/O: the backing filesystem does not allow direct I/O"),
    }
    Ok((device, true))
}

/// Detaches every loop device backed by `image`, including devices whose backing file was
/// unlinked from that path. No device is success.
///
/// Fails when a device is still in use (mounted, or held open) after [`DETACH_WAIT`]: the kernel
/// then only marks it autoclear, to be torn down when its last user closes it, and the caller
/// should unmount first and retry.
pub fn detach(image: &Path) -> Result<(), BackendError> {
    let sys_block = Path::new(SYS_BLOCK);
    let (target, _) = resolve(image)?;
    let backed_by_image = |a: &Attachment| a.backing == target;
    let devices: Vec<PathBuf> = {
        let _lock = loop_lock();
        let devices: Vec<PathBuf> = attachments(sys_block)?
            .into_iter()
            .filter(backed_by_image)
            .map(|a| a.device)
            .collect();
        for device in &devices {
            match run("losetup", &["-d"], device) {
                Ok(_) => {}
                // Detached since we looked (ENXIO).
                Err(BackendError::Command { stderr, .. }) if stderr.contains("No such device") => {}
                Err(e) => return Err(e),
            }
        }
        devices
    };
    // Waiting without the lock: a busy device must not hold up other volumes' attaches.
    let deadline = Instant::now() + DETACH_WAIT;
    loop {
        let remaining: Vec<PathBuf> = attachments(sys_block)?
            .into_iter()
            .filter(|a| backed_by_image(a) && devices.contains(&a.device))
            .map(|a| a.device)
            .collect();
        let Some(device) = remaining.into_iter().next() else {
            devices.iter().for_each(|d| retire_if_discards_refused(d));
            return Ok(());
        };
        if Instant::now() >= deadline {
            return Err(BackendError::Command {
                command: "losetup -d".into(),
                path: device,
                stderr: format!(
                    "still attached to {}: in use (mounted or open); the kernel will detach it \
                     when its last user closes it",
                    target.display()
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sets autoclear on a device that is in use (its filesystem is mounted): asking the kernel to
/// detach a busy loop device marks it to be detached when its last user goes, which is what
/// `LO_FLAGS_AUTOCLEAR` means. After this, unmounting the filesystem frees the device even if
/// nobody calls [`detach`] (an operator's `umount`, a node plugin that died).
pub fn mark_autoclear(device: &Path) -> Result<(), BackendError> {
    let _lock = loop_lock();
    run("losetup", &["-d"], device).map(|_| ())
}

/// Whether the kernel will detach `device` when its last user closes it.
pub fn is_autoclear(device: &Path) -> bool {
    device
        .file_name()
        .and_then(|name| {
            std::fs::read_to_string(Path::new(SYS_BLOCK).join(name).join("loop/autoclear")).ok()
        })
        .is_some_and(|v| v.trim() == "1")
}

/// Whether every byte of `image` has a block behind it: a preallocated image (or one whose
/// every block was written, which then counts as preallocated too).
pub fn is_fully_allocated(image: &Path) -> Result<bool, BackendError> {
    let meta = std::fs::metadata(image).map_err(|e| BackendError::io("stat", image, e))?;
    Ok(fully_allocated(&meta))
}

fn fully_allocated(meta: &std::fs::Metadata) -> bool {
    meta.len() > 0 && meta.blocks().saturating_mul(512) >= meta.len()
}

/// Stops the loop `device` from accepting discards, so nothing above it (`fstrim`, a
/// filesystem mounted with `discard`, `blkdiscard` on a raw block volume) can punch holes into
/// a preallocated image: the loop driver turns a discard into a hole in the backing file, and
/// the space the volume was promised would go back to the data filesystem for anyone to take.
/// Discards then fail with EOPNOTSUPP, which filesystems and `fstrim` treat as "not supported".
/// The setting lives with the attachment; every attach of a preallocated image sets it again.
pub fn refuse_discards(device: &Path) -> Result<(), BackendError> {
    let attr = sys_dir(device)
        .ok_or_else(|| {
            BackendError::io(
                "refuse discards",
                device,
                std::io::Error::other("not a loop device"),
            )
        })?
        .join("queue/discard_max_bytes");
    std::fs::write(&attr, b"0").map_err(|e| BackendError::io("write", &attr, e))
}

/// `/sys/block/loopN` of the loop `device` (`/dev/loopN`); `None` for anything else.
fn sys_dir(device: &Path) -> Option<PathBuf> {
    let name = device.file_name()?.to_str()?;
    loop_index(name)?;
    Some(Path::new(SYS_BLOCK).join(name))
}

/// Whether `device` refuses discards although its backing could take them: what
/// [`refuse_discards`] leaves, on the device and (the kernel keeps it) after a detach too.
fn refuses_discards(device: &Path) -> bool {
    let Some(queue) = sys_dir(device).map(|dir| dir.join("queue")) else {
        return false;
    };
    let read = |attr: &str| {
        std::fs::read_to_string(queue.join(attr))
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    read("discard_max_bytes") == Some(0) && read("discard_max_hw_bytes").is_some_and(|hw| hw > 0)
}

/// Removes the loop `device` if it is free and refuses discards, so no later attachment (a
/// sparse image, or anyone else's use of loop devices on the node) inherits that: a zero
/// `discard_max_bytes` cannot be raised again while the device has no discard granularity,
/// which a detached one has not. The next attach makes a fresh device. Best effort: a device
/// attached again in the meantime is busy and stays.
pub fn retire_if_discards_refused(device: &Path) {
    let (Some(dir), Some(index)) = (
        sys_dir(device),
        device
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(loop_index),
    ) else {
        return;
    };
    // The `loop` directory exists only while the device is attached.
    if dir.join("loop").exists() || !refuses_discards(device) {
        return;
    }
    match super::loopctl::remove_device(index) {
        Ok(()) => {
            tracing::debug!(device = %device.display(), "removed a loop device left refusing discards")
        }
        Err(e) => tracing::info!(device = %device.display(), error = %e,
            "could not remove a loop device left refusing discards"),
    }
}

/// Grows the image file to `bytes`; never shrinks ([`BackendError::Unsupported`]). The same
/// size is success. An attached device sees the new size after [`refresh_capacity`].
///
/// A fully allocated image (preallocated) has the new range allocated too, so it stays
/// preallocated; a sparse one grows sparse. (An image whose every block was written counts as
/// fully allocated.)
pub fn grow_image(image: &Path, bytes: u64) -> Result<(), BackendError> {
    let file = open_image(image)?;
    let meta = file
        .metadata()
        .map_err(|e| BackendError::io("stat", image, e))?;
    let len = meta.len();
    if bytes < len {
        return Err(BackendError::Unsupported(format!(
            "cannot shrink {} from {len} to {bytes} bytes",
            image.display()
        )));
    }
    if bytes == len {
        return Ok(());
    }
    if fully_allocated(&meta) {
        if let Err(e) = allocate(&file, image, len, bytes - len) {
            // Allocation that ran out of space half-way keeps what it took (the whole data
            // filesystem, at worst) while the volume keeps its old size: give it back.
            if let Err(undo) = file.set_len(len).and_then(|()| file.sync_all()) {
                tracing::warn!(image = %image.display(), error = %undo,
                    "could not give back the space of a failed growth");
            }
            return Err(e);
        }
    } else {
        file.set_len(bytes)
            .map_err(|e| BackendError::io("truncate", image, e))?;
    }
    file.sync_all()
        .map_err(|e| BackendError::io("fsync", image, e))
}

/// Makes the loop `device` pick up the current size of its backing file (`losetup -c`).
pub fn refresh_capacity(device: &Path) -> Result<(), BackendError> {
    run("losetup", &["-c"], device).map(|_| ())
}

/// Grows the filesystem on `device`, mounted at `mount_point`, to the size of the device,
/// online: `resize2fs <device>` for ext4, `xfs_growfs -d <mount point>` for xfs (xfs can only
/// grow mounted; ext4 unmounted would need an fsck first, so this is for mounted filesystems).
/// Growing to the current size is success.
///
/// Online ext4 resizing needs `CAP_SYS_RESOURCE` (the kernel checks it in
/// `EXT4_IOC_RESIZE_FS`); without it this fails with [`BackendError::Unsupported`] saying so.
pub fn grow_filesystem(device: &Path, mount_point: &Path, fs: FsType) -> Result<(), BackendError> {
    match fs {
        FsType::Ext4 => run("resize2fs", &[], device).map_err(|e| match e {
            BackendError::Command { ref stderr, .. }
                if stderr.contains("Permission denied")
                    && has_capability(CAP_SYS_RESOURCE) == Some(false) =>
            {
                BackendError::Unsupported(format!(
                    "cannot grow the ext4 filesystem on {} online: the driver lacks \
                     CAP_SYS_RESOURCE ({e})",
                    device.display()
                ))
            }
            other => other,
        }),
        FsType::Xfs => run("xfs_growfs", &["-d"], mount_point),
    }
    .map(|_| ())
}

/// `CAP_SYS_RESOURCE` from `linux/capability.h`.
const CAP_SYS_RESOURCE: u32 = 24;

/// Whether this process has capability `cap` in its effective set (`None` if unknown).
fn has_capability(cap: u32) -> Option<bool> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&status).map(|eff| eff & (1u64 << cap) != 0)
}

/// The `CapEff:` mask of `/proc/<pid>/status`.
fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Size in bytes of the block device `device`, from `/sys/dev/block/MAJ:MIN/size` (always in
/// 512-byte sectors).
pub fn device_size(device: &Path) -> Result<u64, BackendError> {
    let st = rustix::fs::stat(device).map_err(|e| errno_io("stat", device, e))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::BlockDevice {
        return Err(BackendError::Unsupported(format!(
            "{} is not a block device",
            device.display()
        )));
    }
    let rdev = st.st_rdev;
    let attr = PathBuf::from(format!(
        "/sys/dev/block/{}:{}/size",
        rustix::fs::major(rdev),
        rustix::fs::minor(rdev)
    ));
    let mut contents = String::new();
    File::open(&attr)
        .and_then(|mut f| f.read_to_string(&mut contents))
        .map_err(|e| BackendError::io("read", &attr, e))?;
    let sectors: u64 = contents.trim().parse().map_err(|_| {
        BackendError::io(
            "parse",
            &attr,
            std::io::Error::new(ErrorKind::InvalidData, contents.trim().to_string()),
        )
    })?;
    Ok(sectors * 512)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn parses_fs_types() {
        assert_eq!(FsType::parse(""), Ok(FsType::Ext4));
        assert_eq!(FsType::parse("ext4"), Ok(FsType::Ext4));
        assert_eq!(FsType::parse("xfs"), Ok(FsType::Xfs));
        for bad in ["ext3", "btrfs", "XFS", " ext4", "ext4 "] {
            let err = FsType::parse(bad).unwrap_err();
            assert!(err.contains("ext4 or xfs"), "{err}");
        }
        assert_eq!(FsType::Ext4.name(), "ext4");
        assert_eq!(FsType::Xfs.to_string(), "xfs");
        for fs in [FsType::Ext4, FsType::Xfs] {
            assert_eq!(FsType::parse(fs.name()), Ok(fs));
        }
        assert_eq!(FsType::Xfs.min_bytes(), 300 * MIB);
    }

    #[test]
    fn parses_backing_files() {
        assert_eq!(
            parse_backing_file(b"/data/vol-1.img\n"),
            (PathBuf::from("/data/vol-1.img"), false)
        );
        assert_eq!(
            parse_backing_file(b"/data/vol-1.img (deleted)\n"),
            (PathBuf::from("/data/vol-1.img"), true)
        );
        assert_eq!(
            parse_backing_file(b"/data/with space.img"),
            (PathBuf::from("/data/with space.img"), false)
        );
        assert_eq!(
            parse_backing_file(b"/data/\xff.img\n"),
            (PathBuf::from(OsStr::from_bytes(b"/data/\xff.img")), false)
        );
    }

    #[test]
    fn parses_capabilities() {
        let status = "Name:\tcat\nCapInh:\t0000000000000000\nCapEff:\t000001fffeffffff\n";
        let eff = parse_cap_eff(status).unwrap();
        assert_eq!(eff & (1 << CAP_SYS_RESOURCE), 0);
        assert_ne!(eff & (1 << 21), 0); // CAP_SYS_ADMIN
        assert_eq!(parse_cap_eff("Name:\tcat\n"), None);
    }

    #[test]
    fn parses_loop_names() {
        assert_eq!(loop_index("loop0"), Some(0));
        assert_eq!(loop_index("loop12"), Some(12));
        for bad in ["loop", "loop-control", "loopa", "sda", "nvme0n1", "loop1p1"] {
            assert_eq!(loop_index(bad), None, "{bad}");
        }
    }

    #[test]
    fn parses_blkid_export() {
        let ext4 = "DEVNAME=/x.img\nUUID=5335eb73\nVERSION=1.0\nBLOCK_SIZE=1024\nTYPE=ext4\n\
                    USAGE=filesystem\n";
        assert_eq!(
            parse_blkid_export(ext4),
            Probe::Filesystem("ext4".to_string())
        );
        let gpt = "DEVNAME=/dev/loop0\nPTUUID=abc\nPTTYPE=gpt\n";
        assert_eq!(
            parse_blkid_export(gpt),
            Probe::Other("a gpt partition table".to_string())
        );
        assert_eq!(parse_blkid_export(""), Probe::Empty);
        assert!(matches!(
            parse_blkid_export("DEVNAME=/x\nUSAGE=raid\n"),
            Probe::Other(_)
        ));
    }

    /// A fake `/sys/block` with the given `(name, backing_file contents)`; `None` is a device
    /// that is not attached.
    fn fake_sysfs(root: &Path, devices: &[(&str, Option<&[u8]>)]) -> PathBuf {
        let sys = root.join("sys-block");
        std::fs::create_dir(&sys).unwrap();
        for (name, backing) in devices {
            std::fs::create_dir(sys.join(name)).unwrap();
            if let Some(backing) = backing {
                std::fs::create_dir(sys.join(name).join("loop")).unwrap();
                std::fs::write(sys.join(name).join("loop/backing_file"), backing).unwrap();
            }
        }
        sys
    }

    #[test]
    fn finds_attachments_in_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let image = root.join("a.img");
        std::fs::write(&image, b"").unwrap();
        let gone = root.join("gone.img");
        let line = |p: &Path, suffix: &str| format!("{}{suffix}\n", p.display()).into_bytes();
        let (a, a_deleted, b) = (
            line(&image, ""),
            line(&image, " (deleted)"),
            line(&gone, " (deleted)"),
        );
        let sys = fake_sysfs(
            &root,
            &[
                ("loop10", Some(&a)),
                ("loop2", Some(&a)),
                ("loop3", Some(&a_deleted)),
                ("loop4", Some(&b)),
                ("loop5", None),
                ("sda", Some(&a)),
            ],
        );
        let all = attachments(&sys).unwrap();
        let names: Vec<_> = all.iter().map(|a| a.device.clone()).collect();
        assert_eq!(
            names,
            ["/dev/loop2", "/dev/loop3", "/dev/loop4", "/dev/loop10"].map(PathBuf::from)
        );
        // The lowest-numbered live attachment; the deleted older image is not it.
        assert_eq!(
            find_in(&sys, &image).unwrap(),
            Some(PathBuf::from("/dev/loop2"))
        );
        // Found through a relative spelling and a symlink too.
        let link = root.join("link.img");
        std::os::unix::fs::symlink(&image, &link).unwrap();
        assert_eq!(
            find_in(&sys, &link).unwrap(),
            Some(PathBuf::from("/dev/loop2"))
        );
        let dotted = root.join(".").join("a.img");
        assert_eq!(
            find_in(&sys, &dotted).unwrap(),
            Some(PathBuf::from("/dev/loop2"))
        );
        // An image that no longer exists is found by its deleted backing file.
        assert_eq!(
            find_in(&sys, &gone).unwrap(),
            Some(PathBuf::from("/dev/loop4"))
        );
        assert_eq!(find_in(&sys, &root.join("other.img")).unwrap(), None);
    }

    #[test]
    fn creates_images_idempotently_and_refuses_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("v.img");
        create_image(&image, 64 * MIB, false).unwrap();
        let meta = std::fs::metadata(&image).unwrap();
        assert_eq!(meta.len(), 64 * MIB);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(
            meta.blocks() * 512 < MIB,
            "sparse: {} blocks",
            meta.blocks()
        );

        // Adopted as is when big enough; extended when smaller (an interrupted earlier try).
        create_image(&image, 32 * MIB, false).unwrap();
        assert_eq!(std::fs::metadata(&image).unwrap().len(), 64 * MIB);
        create_image(&image, 80 * MIB, false).unwrap();
        assert_eq!(std::fs::metadata(&image).unwrap().len(), 80 * MIB);

        // Symlinks are refused, dangling or not, and the target is untouched.
        let target = dir.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        for (name, to) in [("link", &target), ("dangling", &dir.path().join("nope"))] {
            let link = dir.path().join(name);
            std::os::unix::fs::symlink(to, &link).unwrap();
            let err = create_image(&link, MIB, false).unwrap_err();
            assert!(matches!(err, BackendError::Unsupported(_)), "{err}");
            assert!(err.to_string().contains("symlink"), "{err}");
            let err = grow_image(&link, 2 * MIB).unwrap_err();
            assert!(matches!(err, BackendError::Unsupported(_)), "{err}");
        }
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert!(!dir.path().join("nope").exists());

        // Not a regular file.
        let err = create_image(dir.path(), MIB, false).unwrap_err();
        assert!(matches!(err, BackendError::Io { .. }), "{err}");
        let fifo = dir.path().join("fifo");
        assert!(
            Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let err = create_image(&fifo, MIB, false).unwrap_err();
        assert!(matches!(err, BackendError::Unsupported(_)), "{err}");
    }

    #[test]
    fn grows_images_and_refuses_shrinking() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("v.img");
        create_image(&image, 16 * MIB, false).unwrap();
        grow_image(&image, 32 * MIB).unwrap();
        grow_image(&image, 32 * MIB).unwrap();
        let meta = std::fs::metadata(&image).unwrap();
        assert_eq!(meta.len(), 32 * MIB);
        assert!(meta.blocks() * 512 < MIB, "still sparse");
        let err = grow_image(&image, 16 * MIB).unwrap_err();
        assert!(matches!(err, BackendError::Unsupported(_)), "{err}");
        assert_eq!(std::fs::metadata(&image).unwrap().len(), 32 * MIB);
        let err = grow_image(&dir.path().join("missing.img"), MIB).unwrap_err();
        assert!(matches!(err, BackendError::Io { .. }), "{err}");
    }

    #[test]
    fn preallocated_images_have_their_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("v.img");
        match create_image(&image, 64 * MIB, true) {
            Err(BackendError::Unsupported(e)) => {
                eprintln!("SKIPPED: {e}");
                return;
            }
            other => other.unwrap(),
        }
        let allocated = |p: &Path| {
            let m = std::fs::metadata(p).unwrap();
            (m.len(), m.blocks() * 512)
        };
        let (len, bytes) = allocated(&image);
        assert_eq!(len, 64 * MIB);
        assert!(bytes >= 64 * MIB, "{bytes} bytes allocated");
        create_image(&image, 64 * MIB, true).unwrap();
        // Growth keeps a preallocated image preallocated.
        grow_image(&image, 96 * MIB).unwrap();
        let (len, bytes) = allocated(&image);
        assert_eq!(len, 96 * MIB);
        assert!(bytes >= 96 * MIB, "{bytes} bytes allocated after growth");
    }

    // ---- Real loop devices, filesystems and mounts (root and the tools) ----

    fn on_path(tool: &str) -> bool {
        std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|dir| {
                std::fs::metadata(dir.join(tool))
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
        })
    }

    /// Whether the test can run: root, `/dev/loop-control` and `tools` present. Prints why not;
    /// with `K8SCSI_REQUIRE_TOOLS=1` as root a missing tool fails the test instead.
    fn ready(tools: &[&str]) -> bool {
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIPPED: needs root (loop devices, mounts)");
            return false;
        }
        let mut missing: Vec<&str> = tools.iter().copied().filter(|t| !on_path(t)).collect();
        if !Path::new("/dev/loop-control").exists() {
            missing.push("/dev/loop-control");
        }
        if missing.is_empty() {
            return true;
        }
        assert!(
            std::env::var("K8SCSI_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "required tools missing (K8SCSI_REQUIRE_TOOLS=1): {missing:?}"
        );
        eprintln!("SKIPPED: missing {missing:?}");
        false
    }

    /// Unmounts what a test mounted and detaches what it attached, also when it panics.
    #[derive(Default)]
    struct Cleanup {
        mounts: Vec<PathBuf>,
        images: Vec<PathBuf>,
    }

    impl Cleanup {
        fn attach(&mut self, image: &Path) -> PathBuf {
            self.images.push(image.to_path_buf());
            attach(image).unwrap()
        }

        fn mount(&mut self, device: &Path, fs: FsType, dir: &Path) {
            std::fs::create_dir_all(dir).unwrap();
            let out = Command::new("mount")
                .args(["-t", fs.name()])
                .arg(device)
                .arg(dir)
                .output()
                .unwrap();
            assert!(out.status.success(), "mount: {out:?}");
            self.mounts.push(dir.to_path_buf());
        }

        fn umount(&mut self, dir: &Path) {
            let out = Command::new("umount").arg(dir).output().unwrap();
            assert!(out.status.success(), "umount: {out:?}");
            self.mounts.retain(|m| m != dir);
        }
    }

    impl Drop for Cleanup {
        fn drop(&mut self) {
            for dir in self.mounts.drain(..).rev() {
                let ok = Command::new("umount")
                    .arg(&dir)
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    let _ = Command::new("umount").arg("-l").arg(&dir).status();
                }
            }
            for image in self.images.drain(..) {
                if let Err(e) = detach(&image) {
                    eprintln!("cleanup: detach {}: {e}", image.display());
                }
            }
        }
    }

    /// Runs `body` in a fresh temporary directory with a [`Cleanup`], then checks that no loop
    /// device is left backed by a file in that directory.
    fn with_cleanup(name: &str, body: impl FnOnce(&Path, &mut Cleanup)) {
        let started = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        {
            let mut cleanup = Cleanup::default();
            body(&root, &mut cleanup);
        }
        let leaked: Vec<_> = attachments(Path::new(SYS_BLOCK))
            .unwrap()
            .into_iter()
            .filter(|a| a.backing.starts_with(&root))
            .collect();
        assert!(leaked.is_empty(), "leaked loop devices: {leaked:?}");
        eprintln!("{name}: {:?}", started.elapsed());
    }

    fn total_bytes(mount_point: &Path) -> u64 {
        let st = rustix::fs::statvfs(mount_point).unwrap();
        st.f_blocks * st.f_frsize
    }

    fn filesystem_lifecycle(fs: FsType, tools: &[&str], size: u64, grown: u64) {
        if !ready(tools) {
            return;
        }
        with_cleanup(&format!("{fs} lifecycle"), |root, cleanup| {
            let image = root.join("vol.img");
            let mnt = root.join("mnt");
            create_image(&image, size, false).unwrap();
            format(&image, fs).unwrap();
            // Already formatted with this type: skipped; another type: refused.
            format(&image, fs).unwrap();
            let other = match fs {
                FsType::Ext4 => FsType::Xfs,
                FsType::Xfs => FsType::Ext4,
            };
            let err = format(&image, other).unwrap_err();
            assert!(matches!(err, BackendError::Unsupported(_)), "{err}");

            let device = cleanup.attach(&image);
            assert_eq!(attach(&image).unwrap(), device, "attach is idempotent");
            assert_eq!(find_attached(&image).unwrap(), Some(device.clone()));
            assert_eq!(device_size(&device).unwrap(), size);
            eprintln!(
                "{fs}: {} direct I/O: {:?}",
                device.display(),
                direct_io(&device)
            );
            // Formatting the attached device is skipped too (same filesystem).
            format(&device, fs).unwrap();

            cleanup.mount(&device, fs, &mnt);
            std::fs::write(mnt.join("hello"), b"world").unwrap();
            let before = total_bytes(&mnt);

            grow_image(&image, grown).unwrap();
            assert_eq!(device_size(&device).unwrap(), size, "before refresh");
            refresh_capacity(&device).unwrap();
            assert_eq!(device_size(&device).unwrap(), grown);
            match grow_filesystem(&device, &mnt, fs) {
                Err(BackendError::Unsupported(e))
                    if fs == FsType::Ext4 && has_capability(CAP_SYS_RESOURCE) == Some(false) =>
                {
                    eprintln!("SKIPPED: online ext4 growth: {e}");
                    // Grow it offline instead, so the rest of the lifecycle still runs.
                    cleanup.umount(&mnt);
                    for tool in [&["e2fsck", "-f", "-p"][..], &["resize2fs"]] {
                        let out = Command::new(tool[0])
                            .args(&tool[1..])
                            .arg(&device)
                            .output()
                            .unwrap();
                        assert!(out.status.success(), "{tool:?}: {out:?}");
                    }
                    cleanup.mount(&device, fs, &mnt);
                }
                other => {
                    other.unwrap();
                    // Growing to the current size is success.
                    grow_filesystem(&device, &mnt, fs).unwrap();
                }
            }
            let after = total_bytes(&mnt);
            assert!(
                after > before + (grown - size) / 2,
                "{fs} total {before} -> {after}"
            );
            assert_eq!(std::fs::read(mnt.join("hello")).unwrap(), b"world");

            cleanup.umount(&mnt);
            detach(&image).unwrap();
            assert_eq!(find_attached(&image).unwrap(), None);
            detach(&image).unwrap();
            // The data survived: attach and mount again.
            let device = cleanup.attach(&image);
            cleanup.mount(&device, fs, &mnt);
            assert_eq!(std::fs::read(mnt.join("hello")).unwrap(), b"world");
            assert_eq!(total_bytes(&mnt), after);
        });
    }

    #[test]
    fn ext4_volume_lifecycle() {
        filesystem_lifecycle(
            FsType::Ext4,
            &[
                "losetup",
                "blkid",
                "mkfs.ext4",
                "resize2fs",
                "mount",
                "umount",
            ],
            64 * MIB,
            128 * MIB,
        );
    }

    #[test]
    fn xfs_volume_lifecycle() {
        filesystem_lifecycle(
            FsType::Xfs,
            &[
                "losetup",
                "blkid",
                "mkfs.xfs",
                "xfs_growfs",
                "mount",
                "umount",
            ],
            320 * MIB,
            512 * MIB,
        );
    }

    #[test]
    fn format_refuses_images_too_small() {
        if !ready(&["blkid", "mkfs.xfs"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("small.img");
        create_image(&image, 64 * MIB, false).unwrap();
        let err = format(&image, FsType::Xfs).unwrap_err();
        assert!(matches!(err, BackendError::Unsupported(_)), "{err}");
    }

    #[test]
    fn block_volume_device_size() {
        if !ready(&["losetup"]) {
            return;
        }
        with_cleanup("block device size", |root, cleanup| {
            let image = root.join("raw.img");
            create_image(&image, 64 * MIB, false).unwrap();
            let device = cleanup.attach(&image);
            assert_eq!(device_size(&device).unwrap(), 64 * MIB);
            grow_image(&image, 96 * MIB).unwrap();
            refresh_capacity(&device).unwrap();
            assert_eq!(device_size(&device).unwrap(), 96 * MIB);
            let err = device_size(&image).unwrap_err();
            assert!(matches!(err, BackendError::Unsupported(_)), "{err}");
            detach(&image).unwrap();
            assert_eq!(find_attached(&image).unwrap(), None);
        });
    }

    #[test]
    fn concurrent_attaches_share_one_device() {
        if !ready(&["losetup"]) {
            return;
        }
        with_cleanup("concurrent attaches", |root, cleanup| {
            let image = root.join("v.img");
            create_image(&image, 16 * MIB, false).unwrap();
            cleanup.images.push(image.clone());
            let devices: Vec<PathBuf> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..8).map(|_| s.spawn(|| attach(&image))).collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap().unwrap())
                    .collect()
            });
            assert!(devices.iter().all(|d| *d == devices[0]), "{devices:?}");
            let (target, _) = resolve(&image).unwrap();
            let count = attachments(Path::new(SYS_BLOCK))
                .unwrap()
                .into_iter()
                .filter(|a| a.backing == target)
                .count();
            assert_eq!(count, 1);
        });
    }

    #[test]
    fn detaches_images_deleted_while_attached() {
        if !ready(&["losetup"]) {
            return;
        }
        with_cleanup("deleted image", |root, cleanup| {
            let image = root.join("v.img");
            create_image(&image, 16 * MIB, false).unwrap();
            let device = cleanup.attach(&image);
            std::fs::remove_file(&image).unwrap();
            assert_eq!(find_attached(&image).unwrap(), Some(device.clone()));
            // A new image at the same path is not the old device.
            create_image(&image, 16 * MIB, false).unwrap();
            assert_eq!(find_attached(&image).unwrap(), None);
            let fresh = attach(&image).unwrap();
            assert_ne!(fresh, device);
            // Detach takes both: the image's device and its deleted predecessor.
            detach(&image).unwrap();
            std::fs::remove_file(&image).unwrap();
            assert_eq!(find_attached(&image).unwrap(), None);
        });
    }

    #[test]
    fn detach_of_a_mounted_device_fails_then_autoclears() {
        if !ready(&["losetup", "blkid", "mkfs.ext4", "mount", "umount"]) {
            return;
        }
        with_cleanup("busy detach", |root, cleanup| {
            let image = root.join("v.img");
            let mnt = root.join("mnt");
            create_image(&image, 16 * MIB, false).unwrap();
            format(&image, FsType::Ext4).unwrap();
            let device = cleanup.attach(&image);
            cleanup.mount(&device, FsType::Ext4, &mnt);
            let err = detach(&image).unwrap_err();
            assert!(err.to_string().contains("in use"), "{err}");
            assert_eq!(find_attached(&image).unwrap(), Some(device.clone()));
            // The kernel marked it autoclear: unmounting releases it without another detach.
            cleanup.umount(&mnt);
            let deadline = Instant::now() + Duration::from_secs(5);
            while find_attached(&image).unwrap().is_some() {
                assert!(Instant::now() < deadline, "not released after umount");
                std::thread::sleep(Duration::from_millis(20));
            }
        });
    }

    #[test]
    fn preallocated_images_stay_allocated_through_format_and_growth() {
        if !ready(&["losetup", "blkid", "mkfs.ext4", "mkfs.xfs"]) {
            return;
        }
        with_cleanup("preallocated format", |root, cleanup| {
            for fs in [FsType::Ext4, FsType::Xfs] {
                let image = root.join(format!("{fs}.img"));
                let size = fs.min_bytes().max(64 * MIB);
                match create_image(&image, size, true) {
                    Err(BackendError::Unsupported(e)) => {
                        eprintln!("SKIPPED: {e}");
                        return;
                    }
                    other => other.unwrap(),
                }
                // Formatted through the loop device, as block-first flows do.
                let device = cleanup.attach(&image);
                format(&device, fs).unwrap();
                let blocks = std::fs::metadata(&image).unwrap().blocks() * 512;
                assert!(blocks >= size, "{fs}: {blocks} of {size} bytes allocated");
                detach(&image).unwrap();
            }
        });
    }
}
