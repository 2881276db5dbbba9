//! Copying volume data for snapshots and clones, without following anything a pod planted.
//!
//! Two primitives serve every backend that is not a btrfs subvolume:
//! - [`clone_file`]: a reflink (`FICLONE`) where the filesystem shares extents (XFS with
//!   `reflink=1`, btrfs), which is O(extents) and needs no space; otherwise a copy that skips
//!   holes (`SEEK_DATA`/`SEEK_HOLE`), so a sparse image stays sparse.
//! - [`copy_tree`]: a directory tree walked through directory file descriptors (`openat` with
//!   `O_NOFOLLOW`, never a path a pod could swap for a symlink) without recursion, so its depth
//!   is bounded by neither the stack nor the descriptor table, each regular file cloned as
//!   above, keeping hard links, symlinks (as links), special files, owners, modes, extended
//!   attributes and timestamps (directories' after their contents, so creating entries does not
//!   disturb them).
//!
//! Both report the [`Mechanism`] they ended up using: `reflink` only when every file was
//! reflinked. Both stop early, with an error of kind `Interrupted`, once their [`Cancel`] is set:
//! a snapshot copy running in the background is cancelled by DeleteSnapshot. The flag is read
//! between files and between chunks of a file, never inside a system call, so a copy stuck in
//! the kernel (a hung filesystem) cannot be cancelled by it.

use std::collections::HashMap;
use std::ffi::{CStr, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{self as rfs, AtFlags, CWD, FileType, Mode, OFlags, SeekFrom, Stat, Timestamps};
use rustix::io::Errno;

use super::shared::tree::Walker;
use super::{BackendError, Mechanism};

/// Largest single `copy_file_range` request; also how much is copied between two looks at the
/// [`Cancel`] flag (64 MiB takes well under a second on any disk a volume lives on).
const CHUNK: usize = 64 << 20;

/// A request to stop a copy early, set from another thread.
#[derive(Debug, Default)]
pub struct Cancel(AtomicBool);

impl Cancel {
    /// For copies nothing cancels: the caller waits for them.
    pub fn never() -> &'static Cancel {
        static NEVER: Cancel = Cancel(AtomicBool::new(false));
        &NEVER
    }

    /// Asks the copy to stop at its next look at the flag.
    pub fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// `Err` (kind `Interrupted`) once the copy was asked to stop.
    fn check(&self) -> std::io::Result<()> {
        if self.is_set() {
            Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "copy cancelled",
            ))
        } else {
            Ok(())
        }
    }
}

/// Whether a `FICLONE` failure means "this filesystem (pair) cannot reflink", as opposed to a
/// real I/O error.
fn reflink_unsupported(e: Errno) -> bool {
    matches!(
        e,
        Errno::OPNOTSUPP | Errno::XDEV | Errno::INVAL | Errno::NOSYS | Errno::NOTTY | Errno::PERM
    )
}

/// Copies the contents of `src` into the empty file `dst`: a reflink when `try_reflink` and
/// the filesystem allows, else a hole-preserving copy. Clears `try_reflink` when reflinking
/// turned out impossible, so a tree copy does not ask again for every file.
pub fn clone_file(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    try_reflink: &mut bool,
    cancel: &Cancel,
) -> std::io::Result<Mechanism> {
    cancel.check()?;
    if *try_reflink {
        match rfs::ioctl_ficlone(dst, src) {
            Ok(()) => return Ok(Mechanism::Reflink),
            Err(e) if reflink_unsupported(e) => *try_reflink = false,
            Err(e) => return Err(e.into()),
        }
    }
    let len = rfs::fstat(src)?.st_size as u64;
    copy_sparse(src, dst, len, cancel)?;
    Ok(Mechanism::Copy)
}

/// Copies the data ranges of `src` (up to `len`) to the same offsets of `dst` and sizes `dst`
/// to `len`; holes stay holes.
fn copy_sparse(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    len: u64,
    cancel: &Cancel,
) -> std::io::Result<()> {
    let mut pos = 0;
    let mut in_kernel = true;
    while pos < len {
        let data = match rfs::seek(src, SeekFrom::Data(pos)) {
            Ok(offset) => offset,
            Err(Errno::NXIO) => break, // no data after pos: the rest is a hole
            Err(e) => return Err(e.into()),
        };
        if data >= len {
            break;
        }
        let end = rfs::seek(src, SeekFrom::Hole(data))?.min(len);
        copy_range(src, dst, data, end, &mut in_kernel, cancel)?;
        pos = end;
    }
    rfs::ftruncate(dst, len)?;
    Ok(())
}

/// Copies bytes `[from, to)` of `src` to the same offsets of `dst`, in the kernel where it can.
fn copy_range(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    from: u64,
    to: u64,
    in_kernel: &mut bool,
    cancel: &Cancel,
) -> std::io::Result<()> {
    let mut off_in = from;
    let mut off_out = from;
    while *in_kernel && off_in < to {
        cancel.check()?;
        let want = usize::try_from(to - off_in).unwrap_or(CHUNK).min(CHUNK);
        match rfs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want) {
            Ok(0) => return Ok(()), // the source shrank under us
            Ok(_) => {}
            Err(Errno::XDEV | Errno::NOSYS | Errno::OPNOTSUPP | Errno::INVAL) => {
                *in_kernel = false;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let mut buf = vec![0u8; 1 << 20];
    while off_in < to {
        cancel.check()?;
        let want = usize::try_from(to - off_in)
            .unwrap_or(buf.len())
            .min(buf.len());
        let n = rustix::io::pread(src, &mut buf[..want], off_in)?;
        if n == 0 {
            return Ok(());
        }
        let mut written = 0;
        while written < n {
            written += rustix::io::pwrite(dst, &buf[written..n], off_out + written as u64)?;
        }
        off_in += n as u64;
        off_out += n as u64;
    }
    Ok(())
}

/// Opens a file for [`clone_file`]'s source without following a symlink.
pub fn open_source(path: &Path) -> std::io::Result<OwnedFd> {
    Ok(rfs::open(
        path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Creates `path` (which must not exist) for [`clone_file`]'s destination.
pub fn create_destination(path: &Path) -> std::io::Result<OwnedFd> {
    Ok(rfs::open(
        path,
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?)
}

/// Clones or copies the file `src` to the new file `dst`, durably (fsync'd), keeping `src`'s
/// mode. Returns the mechanism used.
pub fn clone_path(
    src: &Path,
    dst: &Path,
    try_reflink: bool,
    cancel: &Cancel,
) -> Result<Mechanism, BackendError> {
    let s = open_source(src).map_err(|e| BackendError::io("open", src, e))?;
    let d = create_destination(dst).map_err(|e| BackendError::io("create", dst, e))?;
    let mut reflink = try_reflink;
    let mechanism = clone_file(s.as_fd(), d.as_fd(), &mut reflink, cancel)
        .map_err(|e| BackendError::io("copy", src, e))?;
    let st = rfs::fstat(&s).map_err(|e| BackendError::io("stat", src, e.into()))?;
    rfs::fchmod(&d, Mode::from_raw_mode(st.st_mode & 0o7777))
        .map_err(|e| BackendError::io("chmod", dst, e.into()))?;
    rfs::fsync(&d).map_err(|e| BackendError::io("fsync", dst, e.into()))?;
    Ok(mechanism)
}

/// Copies everything inside the directory `src` into the existing, empty directory `dst`, and
/// `src`'s own owner, mode, extended attributes and timestamps onto `dst`. Entries on other
/// filesystems (mounts, nested btrfs subvolumes) are skipped with a warning. The copy is made
/// durable with one `syncfs` of the destination filesystem.
pub fn copy_tree(src: &Path, dst: &Path, cancel: &Cancel) -> Result<Mechanism, BackendError> {
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let s = rfs::open(src, dir_flags, Mode::empty())
        .map_err(|e| BackendError::io("open", src, e.into()))?;
    let d = rfs::open(dst, dir_flags, Mode::empty())
        .map_err(|e| BackendError::io("open", dst, e.into()))?;
    let root = rfs::fstat(&s).map_err(|e| BackendError::io("stat", src, e.into()))?;
    let mut copy = TreeCopy {
        src_root: src.to_path_buf(),
        dst_root: d.try_clone().map_err(|e| BackendError::io("dup", dst, e))?,
        device: root.st_dev,
        try_reflink: true,
        copied: false,
        reflinked: false,
        links: HashMap::new(),
        cancel,
    };
    copy.tree(&s, &d)?;
    copy_metadata(s.as_fd(), d.as_fd(), &root)
        .map_err(|e| BackendError::io("copy metadata", src, e))?;
    rfs::syncfs(&d).map_err(|e| BackendError::io("syncfs", dst, e.into()))?;
    Ok(if copy.copied || !copy.reflinked {
        Mechanism::Copy
    } else {
        Mechanism::Reflink
    })
}

struct TreeCopy<'c> {
    src_root: PathBuf,
    dst_root: OwnedFd,
    device: u64,
    try_reflink: bool,
    /// Whether any file was copied rather than reflinked.
    copied: bool,
    reflinked: bool,
    /// (device, inode) of multiply-linked files already copied → their path under `dst_root`.
    links: HashMap<(u64, u64), PathBuf>,
    cancel: &'c Cancel,
}

impl TreeCopy<'_> {
    fn fail(&self, op: &'static str, rel: &Path, e: impl Into<std::io::Error>) -> BackendError {
        BackendError::io(op, &self.src_root.join(rel), e.into())
    }

    /// Copies the tree below `src` into `dst` without recursion: the levels being copied are
    /// kept on the heap by two [`Walker`]s, each holding a bounded number of descriptors, so a
    /// pod nesting directories tens of thousands deep can neither overflow the worker thread's
    /// stack (which aborts the whole server, and again at every start while the interrupted
    /// background copy is resumed) nor exhaust the descriptor table.
    fn tree(&mut self, src: &OwnedFd, dst: &OwnedFd) -> Result<(), BackendError> {
        let mut rel = PathBuf::new();
        let mut from = Walker::new(src.as_fd()).map_err(|e| self.fail("open", &rel, e))?;
        let mut to = Walker::new(dst.as_fd()).map_err(|e| self.fail("open copy of", &rel, e))?;
        let dst_dev = rfs::fstat(dst)
            .map_err(|e| self.fail("stat copy of", &rel, e))?
            .st_dev;
        // The source attributes of the directories being copied, one per level below the root.
        let mut attributes: Vec<Stat> = Vec::new();
        loop {
            let Some(name) = from
                .next_name()
                .map_err(|e| self.fail("readdir", &rel, e))?
            else {
                if from.depth() == 0 {
                    return Ok(());
                }
                let left = from
                    .ascend()
                    .map_err(|e| self.fail("walk up from", &rel, e))?;
                let made = to
                    .ascend()
                    .map_err(|e| self.fail("walk up from copy of", &rel, e))?;
                let st = attributes.pop().expect("one per level below the root");
                // After its contents: creating entries does not disturb its times.
                copy_metadata(left.fd(), made.fd(), &st)
                    .map_err(|e| self.fail("copy metadata", &rel, e))?;
                rel.pop();
                continue;
            };
            let child = rel.join(OsStr::from_bytes(name.to_bytes()));
            self.cancel
                .check()
                .map_err(|e| self.fail("copy", &child, e))?;
            let st = match rfs::statat(from.fd(), &name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(Errno::NOENT) => continue, // removed while we copy: not part of the copy
                Err(e) => return Err(self.fail("stat", &child, e)),
            };
            if st.st_dev != self.device {
                tracing::warn!(path = %self.src_root.join(&child).display(),
                    "not copying another filesystem mounted inside the volume");
                continue;
            }
            if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                rfs::mkdirat(to.fd(), &name, Mode::from_raw_mode(0o700))
                    .map_err(|e| self.fail("mkdir", &child, e))?;
                // Opened without following a symlink, and refused if now on another device.
                if let Err(e) = from.descend(&name, self.device) {
                    if !gone(&e) {
                        return Err(self.fail("open", &child, e));
                    }
                    // Removed (or replaced by a file or symlink) since the look at its name.
                    rfs::unlinkat(to.fd(), &name, AtFlags::REMOVEDIR)
                        .map_err(|e| self.fail("remove copy of", &child, e))?;
                    continue;
                }
                to.descend(&name, dst_dev)
                    .map_err(|e| self.fail("open copy of", &child, e))?;
                attributes.push(st);
                rel = child;
                continue;
            }
            self.entry(from.fd(), to.fd(), &name, &st, &child)?;
        }
    }

    /// Copies the entry `name` (anything but a directory) of `src` into `dst`.
    fn entry(
        &mut self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        name: &CStr,
        st: &Stat,
        child: &Path,
    ) -> Result<(), BackendError> {
        let mode = Mode::from_raw_mode(st.st_mode & 0o7777);
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => unreachable!("directories are walked into by `tree`"),
            FileType::RegularFile => {
                let key = (st.st_dev, st.st_ino);
                if st.st_nlink > 1
                    && let Some(first) = self.links.get(&key)
                {
                    match rfs::linkat(&self.dst_root, first, dst, name, AtFlags::empty()) {
                        Ok(()) => {}
                        // Deeper than PATH_MAX below the copy's root: link from the first copy's
                        // own directory, reached one level at a time.
                        Err(Errno::NAMETOOLONG) => {
                            let (parent, leaf) = (
                                first.parent().unwrap_or(Path::new("")),
                                first.file_name().unwrap_or_default(),
                            );
                            let dir = open_below(self.dst_root.as_fd(), parent)
                                .map_err(|e| self.fail("open copy of", parent, e))?;
                            rfs::linkat(&dir, leaf, dst, name, AtFlags::empty())
                                .map_err(|e| self.fail("link", child, e))?;
                        }
                        Err(e) => return Err(self.fail("link", child, e)),
                    }
                    return Ok(());
                }
                // NONBLOCK: should the entry be swapped for a FIFO, opening must not hang.
                let s = match rfs::openat(
                    src,
                    name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                    Mode::empty(),
                ) {
                    Ok(fd) => fd,
                    // Removed, or replaced by a symlink or a socket, since the look at its name.
                    Err(Errno::NOENT | Errno::LOOP | Errno::NXIO) => return Ok(()),
                    Err(e) => return Err(self.fail("open", child, e)),
                };
                let opened = rfs::fstat(&s).map_err(|e| self.fail("stat", child, e))?;
                if (opened.st_dev, opened.st_ino) != key
                    && (FileType::from_raw_mode(opened.st_mode) != FileType::RegularFile
                        || opened.st_dev != self.device)
                {
                    // Replaced by something that is not a file of the volume (a FIFO, a
                    // device): never read. Another regular file in its place (a write by
                    // rename) is copied as what the name holds now.
                    tracing::warn!(path = %self.src_root.join(child).display(),
                        "not copying a file replaced by a special file while copying");
                    return Ok(());
                }
                let d = rfs::openat(
                    dst,
                    name,
                    OFlags::RDWR
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| self.fail("create copy of", child, e))?;
                match clone_file(s.as_fd(), d.as_fd(), &mut self.try_reflink, self.cancel)
                    .map_err(|e| self.fail("copy", child, e))?
                {
                    Mechanism::Reflink => self.reflinked = true,
                    _ => self.copied = true,
                }
                copy_metadata(s.as_fd(), d.as_fd(), &opened)
                    .map_err(|e| self.fail("copy metadata", child, e))?;
                if opened.st_nlink > 1 {
                    self.links
                        .insert((opened.st_dev, opened.st_ino), child.to_path_buf());
                }
            }
            FileType::Symlink => {
                let target = match rfs::readlinkat(src, name, Vec::new()) {
                    Ok(target) => target,
                    // Removed, or replaced by something else, since the look at its name.
                    Err(Errno::NOENT | Errno::INVAL) => return Ok(()),
                    Err(e) => return Err(self.fail("readlink", child, e)),
                };
                rfs::symlinkat(target.as_c_str(), dst, name)
                    .map_err(|e| self.fail("symlink", child, e))?;
                self.finish_at(dst, name, st, None, child)?;
            }
            kind @ (FileType::Fifo
            | FileType::Socket
            | FileType::CharacterDevice
            | FileType::BlockDevice) => {
                rfs::mknodat(dst, name, kind, mode, st.st_rdev)
                    .map_err(|e| self.fail("mknod", child, e))?;
                self.finish_at(dst, name, st, Some(mode), child)?;
            }
            FileType::Unknown => {
                tracing::warn!(path = %self.src_root.join(child).display(),
                    "not copying a file of unknown type");
            }
        }
        Ok(())
    }

    /// Owner, mode (not for symlinks) and timestamps of an entry we cannot open.
    fn finish_at(
        &self,
        dst: BorrowedFd<'_>,
        name: &CStr,
        st: &Stat,
        mode: Option<Mode>,
        child: &Path,
    ) -> Result<(), BackendError> {
        rfs::chownat(
            dst,
            name,
            Some(rfs::Uid::from_raw(st.st_uid)),
            Some(rfs::Gid::from_raw(st.st_gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.fail("chown", child, e))?;
        if let Some(mode) = mode {
            rfs::chmodat(dst, name, mode, AtFlags::empty())
                .map_err(|e| self.fail("chmod", child, e))?;
        }
        rfs::utimensat(dst, name, &timestamps(st), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.fail("set times of", child, e))?;
        Ok(())
    }
}

/// Opens the directory `rel` below `root` one component at a time (so `rel` may be longer than
/// PATH_MAX), never following a symlink, holding one descriptor at a time.
fn open_below(root: BorrowedFd<'_>, rel: &Path) -> std::io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut dir = rfs::openat(root, c".", flags, Mode::empty())?;
    for component in rel.components() {
        dir = rfs::openat(&dir, component.as_os_str(), flags, Mode::empty())?;
    }
    Ok(dir)
}

/// Whether opening a directory failed because its name no longer holds one: a pod removed
/// it, or put a file or symlink in its place, after the copy looked at the name.
fn gone(e: &std::io::Error) -> bool {
    [Errno::NOENT, Errno::NOTDIR, Errno::LOOP]
        .iter()
        .any(|errno| e.raw_os_error() == Some(errno.raw_os_error()))
}

fn timestamps(st: &Stat) -> Timestamps {
    Timestamps {
        last_access: rfs::Timespec {
            tv_sec: st.st_atime as _,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: rfs::Timespec {
            tv_sec: st.st_mtime as _,
            tv_nsec: st.st_mtime_nsec as _,
        },
    }
}

/// Extended attributes, owner, mode and timestamps of `src` onto `dst` (in that order: chown
/// clears set-ID bits, and every change but the last would touch the times).
fn copy_metadata(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, st: &Stat) -> std::io::Result<()> {
    copy_xattrs(src, dst)?;
    rfs::fchown(
        dst,
        Some(rfs::Uid::from_raw(st.st_uid)),
        Some(rfs::Gid::from_raw(st.st_gid)),
    )?;
    rfs::fchmod(dst, Mode::from_raw_mode(st.st_mode & 0o7777))?;
    rfs::futimens(dst, &timestamps(st))?;
    Ok(())
}

fn copy_xattrs(src: BorrowedFd<'_>, dst: BorrowedFd<'_>) -> std::io::Result<()> {
    let size = match rfs::flistxattr_query(src) {
        Ok(0) => return Ok(()),
        Ok(n) => n,
        Err(Errno::OPNOTSUPP) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    // The list may grow between the two calls; leave room.
    let mut names = vec![0u8; size + 1024];
    let len = rfs::flistxattr(src, &mut names[..])?;
    for name in names[..len].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = OsStr::from_bytes(name);
        let value_len = match rfs::fgetxattr_query(src, name) {
            Ok(n) => n,
            Err(Errno::NODATA) => continue, // removed meanwhile
            Err(e) => return Err(e.into()),
        };
        let mut value = vec![0u8; value_len + 1024];
        let n = match rfs::fgetxattr(src, name, &mut value[..]) {
            Ok(n) => n,
            Err(Errno::NODATA) => continue,
            Err(e) => return Err(e.into()),
        };
        match rfs::fsetxattr(dst, name, &value[..n], rfs::XattrFlags::empty()) {
            Ok(()) => {}
            // Security labels are the LSM's to set; the copy inherits its own.
            Err(Errno::PERM | Errno::OPNOTSUPP) if name.as_bytes().starts_with(b"security.") => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Removes a tree left by an interrupted copy, or a copied snapshot (absent is success); never
/// follows symlinks, and walks without recursion like [`copy_tree`], so whatever depth a copy
/// made can be removed again.
pub fn remove_tree(path: &Path) -> Result<(), BackendError> {
    super::shared::tree::remove_path(path).map_err(|e| BackendError::io("remove", path, e))
}

/// Whether files in the directory `dir` can be reflinked to each other: probes with two
/// unnamed temporary files (`O_TMPFILE`, nothing left behind). Any failure counts as "no", which
/// only means a snapshot is treated as a full copy.
pub fn can_reflink(dir: &Path) -> bool {
    let probe = || -> std::io::Result<bool> {
        let flags = OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC;
        let src = rfs::open(dir, flags, Mode::from_raw_mode(0o600))?;
        rustix::io::write(&src, &[0u8; 4096])?;
        let dst = rfs::open(dir, flags, Mode::from_raw_mode(0o600))?;
        match rfs::ioctl_ficlone(&dst, &src) {
            Ok(()) => Ok(true),
            Err(e) if reflink_unsupported(e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    };
    probe().unwrap_or(false)
}

/// Flushes the filesystem holding `path`.
pub fn sync_filesystem(path: &Path) -> Result<(), BackendError> {
    let fd = rfs::openat(CWD, path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| BackendError::io("open", path, e.into()))?;
    rfs::syncfs(&fd).map_err(|e| BackendError::io("syncfs", path, e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_cancelled_copy_stops_with_interrupted_and_copies_nothing_more() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        for i in 0..10 {
            std::fs::write(src.join(format!("f{i}")), vec![7u8; 8192]).unwrap();
        }
        let cancel = Cancel::default();
        let whole = tmp.path().join("whole");
        std::fs::create_dir(&whole).unwrap();
        copy_tree(&src, &whole, &cancel).unwrap();
        assert_eq!(std::fs::read_dir(&whole).unwrap().count(), 10);

        cancel.set();
        let stopped = tmp.path().join("stopped");
        std::fs::create_dir(&stopped).unwrap();
        let BackendError::Io { source, .. } = copy_tree(&src, &stopped, &cancel).unwrap_err()
        else {
            panic!("not an I/O error");
        };
        assert_eq!(source.kind(), std::io::ErrorKind::Interrupted, "{source}");
        assert_eq!(std::fs::read_dir(&stopped).unwrap().count(), 0);

        // A single file (a loop image) stops the same way, before its first chunk.
        let file = tmp.path().join("image.copy");
        let err = clone_path(&src.join("f0"), &file, false, &cancel).unwrap_err();
        let BackendError::Io { source, .. } = err else {
            panic!("not an I/O error");
        };
        assert_eq!(source.kind(), std::io::ErrorKind::Interrupted, "{source}");
        assert!(!Cancel::never().is_set());
    }

    #[test]
    fn copy_keeps_holes_links_symlinks_modes_and_xattrs() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let dst = tmp.path().join("dst");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::create_dir(&dst).unwrap();
        // A sparse file: 4 KiB of data at 64 MiB.
        let f = std::fs::File::create(src.join("sparse")).unwrap();
        f.set_len(64 << 20).unwrap();
        std::os::unix::fs::FileExt::write_at(&f, &[9u8; 4096], 32 << 20).unwrap();
        drop(f);
        std::fs::write(src.join("sub/a"), b"hello").unwrap();
        std::fs::hard_link(src.join("sub/a"), src.join("b")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.join("link")).unwrap();
        std::fs::set_permissions(
            src.join("sub/a"),
            std::os::unix::fs::PermissionsExt::from_mode(0o640),
        )
        .unwrap();
        let xattr_ok = rfs::setxattr(
            src.join("b"),
            "user.k8scsi",
            b"v1",
            rfs::XattrFlags::empty(),
        )
        .is_ok();

        copy_tree(&src, &dst, Cancel::never()).unwrap();

        let sparse = std::fs::metadata(dst.join("sparse")).unwrap();
        assert_eq!(sparse.len(), 64 << 20);
        assert!(
            sparse.blocks() * 512 < 1 << 20,
            "holes kept: {} blocks",
            sparse.blocks()
        );
        let data = std::fs::read(dst.join("sparse")).unwrap();
        assert_eq!(&data[(32 << 20)..(32 << 20) + 4096], &[9u8; 4096][..]);
        assert_eq!(std::fs::read(dst.join("sub/a")).unwrap(), b"hello");
        let a = std::fs::metadata(dst.join("sub/a")).unwrap();
        let b = std::fs::metadata(dst.join("b")).unwrap();
        assert_eq!(a.ino(), b.ino(), "hard link kept");
        assert_eq!(a.mode() & 0o777, 0o640);
        assert_eq!(
            std::fs::read_link(dst.join("link")).unwrap(),
            PathBuf::from("/etc/passwd")
        );
        let src_mtime = std::fs::metadata(src.join("sub")).unwrap().mtime();
        assert_eq!(
            std::fs::metadata(dst.join("sub")).unwrap().mtime(),
            src_mtime
        );
        if xattr_ok {
            let mut buf = [0u8; 16];
            let n = rfs::getxattr(dst.join("sub/a"), "user.k8scsi", &mut buf[..]).unwrap();
            assert_eq!(&buf[..n], b"v1");
        }
    }
}
