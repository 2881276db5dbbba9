//! Directory work on a mounted share, done through file descriptors.
//!
//! A share is writable by every pod that uses any of its volumes, so anything below its root may
//! be a symlink, or be replaced by one while we work. Every lookup here goes through
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)` or an `*at` call with
//! `AT_SYMLINK_NOFOLLOW` on a directory descriptor we already hold, so nothing outside the
//! directory we mean is ever read, written or removed. Recursive removal and copying do not
//! cross into other filesystems mounted inside the tree.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, SeekFrom};
use rustix::io::Errno;

use crate::backend::Usage;

fn resolve() -> ResolveFlags {
    ResolveFlags::BENEATH
        | ResolveFlags::NO_SYMLINKS
        | ResolveFlags::NO_MAGICLINKS
        | ResolveFlags::NO_XDEV
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// Opens the directory `components` below `root`, never leaving it.
pub fn open_dir(root: BorrowedFd<'_>, components: &[String]) -> io::Result<OwnedFd> {
    let path = if components.is_empty() {
        ".".to_string()
    } else {
        components.join("/")
    };
    Ok(rustix::fs::openat2(
        root,
        path.as_str(),
        dir_flags(),
        Mode::empty(),
        resolve(),
    )?)
}

/// Opens the directory `name` directly inside `dir` without following a symlink.
pub fn open_child_dir(dir: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat2(
        dir,
        name,
        dir_flags(),
        Mode::empty(),
        resolve(),
    )?)
}

/// Creates (if needed) every directory of `components` below `root` and returns the last one
/// and whether this call created it. Parents get mode 0755; the last directory `mode`.
pub fn make_dirs(
    root: BorrowedFd<'_>,
    components: &[String],
    mode: u32,
) -> io::Result<(OwnedFd, bool)> {
    let mut current = rustix::fs::openat2(root, ".", dir_flags(), Mode::empty(), resolve())?;
    let mut created = false;
    for (i, name) in components.iter().enumerate() {
        let last = i + 1 == components.len();
        let m = if last { mode } else { 0o755 };
        created = match rustix::fs::mkdirat(&current, name.as_str(), Mode::from_raw_mode(m)) {
            Ok(()) => true,
            Err(Errno::EXIST) => false,
            Err(e) => return Err(e.into()),
        };
        let next = open_child_dir(current.as_fd(), name)?;
        if created {
            rustix::fs::fsync(&current)?;
        }
        current = next;
    }
    Ok((current, created))
}

fn name_str(name: &CStr) -> Option<&str> {
    match name.to_bytes() {
        b"." | b".." => None,
        _ => name.to_str().ok(),
    }
}

/// Names in a directory (except `.` and `..`), as raw C strings.
fn entries(dir: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    let mut out = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if matches!(name.to_bytes(), b"." | b"..") {
            continue;
        }
        out.push(name.to_owned());
    }
    Ok(out)
}

/// Removes `name` in `parent` and everything below it. Symlinks are removed, never followed;
/// a directory on another filesystem (a mount inside the tree) stops the removal with an error
/// instead of being emptied.
pub fn remove_tree(parent: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let parent_dev = rustix::fs::fstat(parent)?.st_dev;
    let dir = match open_child_dir(parent, name) {
        Ok(d) => d,
        Err(e) if e.raw_os_error() == Some(Errno::NOENT.raw_os_error()) => return Ok(()),
        Err(e) => return Err(e),
    };
    empty_dir(dir.as_fd(), parent_dev)?;
    drop(dir);
    rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)?;
    Ok(())
}

fn empty_dir(dir: BorrowedFd<'_>, dev: u64) -> io::Result<()> {
    for name in entries(dir)? {
        let st = rustix::fs::statat(dir, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            if st.st_dev != dev {
                return Err(io::Error::other(format!(
                    "{name:?} is a different filesystem mounted inside the volume; not removing it"
                )));
            }
            let child = rustix::fs::openat(dir, name.as_c_str(), dir_flags(), Mode::empty())?;
            empty_dir(child.as_fd(), dev)?;
            rustix::fs::unlinkat(dir, name.as_c_str(), AtFlags::REMOVEDIR)?;
        } else {
            rustix::fs::unlinkat(dir, name.as_c_str(), AtFlags::empty())?;
        }
    }
    Ok(())
}

/// Bytes allocated and inodes used below `dir` (counted once per inode, not crossing mounts).
pub fn usage(dir: BorrowedFd<'_>) -> io::Result<Usage> {
    let st = rustix::fs::fstat(dir)?;
    let mut usage = Usage {
        used_bytes: st.st_blocks as u64 * 512,
        used_inodes: 1,
    };
    let mut seen = std::collections::HashSet::new();
    walk(dir, st.st_dev, &mut usage, &mut seen)?;
    Ok(usage)
}

fn walk(
    dir: BorrowedFd<'_>,
    dev: u64,
    usage: &mut Usage,
    seen: &mut std::collections::HashSet<u64>,
) -> io::Result<()> {
    for name in entries(dir)? {
        let Ok(st) = rustix::fs::statat(dir, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW) else {
            continue; // removed meanwhile
        };
        if st.st_dev != dev || (st.st_nlink > 1 && !seen.insert(st.st_ino)) {
            continue;
        }
        usage.used_bytes += st.st_blocks as u64 * 512;
        usage.used_inodes += 1;
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory
            && let Ok(child) = rustix::fs::openat(dir, name.as_c_str(), dir_flags(), Mode::empty())
        {
            walk(child.as_fd(), dev, usage, seen)?;
        }
    }
    Ok(())
}

/// What [`copy_tree`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    /// Regular files copied.
    pub files: u64,
    /// Of those, files cloned by reflink (sharing blocks, no data copied).
    pub reflinked: u64,
    /// Directories created.
    pub dirs: u64,
    /// Symlinks recreated (pointing where the originals point, never followed).
    pub symlinks: u64,
    /// Sockets, devices and entries on other filesystems, which are not copied.
    pub skipped: u64,
    /// Data bytes written by copying (0 for reflinked files; holes are not written).
    pub bytes_copied: u64,
}

/// Copies everything inside the directory `src` into the (normally empty) directory `dst`,
/// both on the same share: regular files by reflink (`FICLONE`) when the filesystem supports
/// it, otherwise by copying only their data extents so sparse files stay sparse; directories,
/// symlinks and FIFOs recreated. Modes, owners (when running as root) and modification times
/// are preserved. Hard links become separate files. Used for clones and snapshots of shared
/// volumes.
pub fn copy_tree(src: BorrowedFd<'_>, dst: BorrowedFd<'_>) -> io::Result<CopyStats> {
    let mut stats = CopyStats::default();
    let dev = rustix::fs::fstat(src)?.st_dev;
    copy_dir(src, dst, dev, &mut stats)?;
    let st = rustix::fs::fstat(src)?;
    set_attributes(dst, &st)?;
    Ok(stats)
}

fn owner_of(st: &rustix::fs::Stat) -> (rustix::fs::Uid, rustix::fs::Gid) {
    (
        rustix::fs::Uid::from_raw(st.st_uid),
        rustix::fs::Gid::from_raw(st.st_gid),
    )
}

/// Owner, mode and times of `st` onto an open file or directory. Changing the owner needs
/// privilege; without it the copy keeps the copier's owner (EPERM is not an error).
fn set_attributes(fd: BorrowedFd<'_>, st: &rustix::fs::Stat) -> io::Result<()> {
    let (uid, gid) = owner_of(st);
    match rustix::fs::fchown(fd, Some(uid), Some(gid)) {
        Ok(()) | Err(Errno::PERM) => {}
        Err(e) => return Err(e.into()),
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(st.st_mode & 0o7777))?;
    let times = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec as _,
        },
    };
    rustix::fs::futimens(fd, &times)?;
    Ok(())
}

fn copy_dir(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    dev: u64,
    stats: &mut CopyStats,
) -> io::Result<()> {
    for name in entries(src)? {
        let name = name.as_c_str();
        let st = rustix::fs::statat(src, name, AtFlags::SYMLINK_NOFOLLOW)?;
        if st.st_dev != dev {
            stats.skipped += 1;
            continue;
        }
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                rustix::fs::mkdirat(dst, name, Mode::from_raw_mode(0o700))?;
                let s = rustix::fs::openat(src, name, dir_flags(), Mode::empty())?;
                let d = rustix::fs::openat(dst, name, dir_flags(), Mode::empty())?;
                copy_dir(s.as_fd(), d.as_fd(), dev, stats)?;
                set_attributes(d.as_fd(), &st)?;
                stats.dirs += 1;
            }
            FileType::RegularFile => {
                let s = rustix::fs::openat(
                    src,
                    name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                let d = rustix::fs::openat(
                    dst,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )?;
                match rustix::fs::ioctl_ficlone(&d, &s) {
                    Ok(()) => stats.reflinked += 1,
                    Err(_) => {
                        stats.bytes_copied += copy_data(s.as_fd(), d.as_fd(), st.st_size as u64)?
                    }
                }
                set_attributes(d.as_fd(), &st)?;
                stats.files += 1;
            }
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(src, name, Vec::new())?;
                rustix::fs::symlinkat(target.as_c_str(), dst, name)?;
                let (uid, gid) = owner_of(&st);
                match rustix::fs::chownat(
                    dst,
                    name,
                    Some(uid),
                    Some(gid),
                    AtFlags::SYMLINK_NOFOLLOW,
                ) {
                    Ok(()) | Err(Errno::PERM) => {}
                    Err(e) => return Err(e.into()),
                }
                stats.symlinks += 1;
            }
            FileType::Fifo => {
                rustix::fs::mknodat(
                    dst,
                    name,
                    FileType::Fifo,
                    Mode::from_raw_mode(st.st_mode & 0o7777),
                    0,
                )?;
                let (uid, gid) = owner_of(&st);
                match rustix::fs::chownat(
                    dst,
                    name,
                    Some(uid),
                    Some(gid),
                    AtFlags::SYMLINK_NOFOLLOW,
                ) {
                    Ok(()) | Err(Errno::PERM) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            _ => {
                tracing::warn!(name = ?name, "not copying a socket or device node");
                stats.skipped += 1;
            }
        }
    }
    Ok(())
}

/// Copies the data extents of `src` into `dst` (holes stay holes) and sets the length.
fn copy_data(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, size: u64) -> io::Result<u64> {
    let mut copied = 0u64;
    let mut offset = 0u64;
    while offset < size {
        let data = match rustix::fs::seek(src, SeekFrom::Data(offset)) {
            Ok(d) => d,
            Err(Errno::NXIO) => break, // only a hole remains
            Err(e) => return Err(e.into()),
        };
        let hole = rustix::fs::seek(src, SeekFrom::Hole(data))?.min(size);
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            let len = usize::try_from(hole - off_in)
                .unwrap_or(usize::MAX)
                .min(1 << 30);
            let n =
                rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), len)?;
            if n == 0 {
                break; // the file shrank while we copied
            }
            copied += n as u64;
        }
        offset = hole;
    }
    rustix::fs::ftruncate(dst, size)?;
    Ok(copied)
}

/// The names directly inside `dir` that are valid UTF-8 (for listing markers).
pub fn names(dir: BorrowedFd<'_>) -> io::Result<Vec<String>> {
    Ok(entries(dir)?
        .iter()
        .filter_map(|n| name_str(n.as_c_str()).map(str::to_string))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, Write};
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    fn open(path: &std::path::Path) -> OwnedFd {
        rustix::fs::open(path, dir_flags(), Mode::empty()).unwrap()
    }

    #[test]
    fn make_dirs_stays_beneath_and_refuses_symlinks() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let fd = open(root.path());
        let comps = vec!["a".to_string(), "b".to_string()];
        let (_, created) = make_dirs(fd.as_fd(), &comps, 0o700).unwrap();
        assert!(created);
        let (_, again) = make_dirs(fd.as_fd(), &comps, 0o700).unwrap();
        assert!(!again);
        assert_eq!(
            std::fs::metadata(root.path().join("a/b"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        std::os::unix::fs::symlink(outside.path(), root.path().join("link")).unwrap();
        assert!(make_dirs(fd.as_fd(), &["link".into(), "x".into()], 0o755).is_err());
        assert!(open_dir(fd.as_fd(), &["link".into()]).is_err());
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    }

    #[test]
    fn remove_tree_removes_links_not_their_targets() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("precious"), b"keep").unwrap();
        let vol = root.path().join("vol");
        std::fs::create_dir_all(vol.join("d/e")).unwrap();
        std::fs::write(vol.join("d/e/f"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path(), vol.join("escape")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("precious"), vol.join("d/file-link"))
            .unwrap();
        let fd = open(root.path());
        remove_tree(fd.as_fd(), "vol").unwrap();
        assert!(!vol.exists());
        assert_eq!(
            std::fs::read(outside.path().join("precious")).unwrap(),
            b"keep"
        );
        remove_tree(fd.as_fd(), "vol").unwrap(); // already gone: fine
        std::os::unix::fs::symlink(outside.path(), root.path().join("vol2")).unwrap();
        assert!(
            remove_tree(fd.as_fd(), "vol2").is_err(),
            "a symlinked volume is not followed"
        );
        assert!(outside.path().join("precious").exists());
    }

    #[test]
    fn copy_tree_preserves_modes_links_and_sparseness() {
        let root = tempfile::tempdir().unwrap();
        let src = root.path().join("src");
        let dst = root.path().join("dst");
        std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
        std::fs::create_dir(&dst).unwrap();
        std::fs::write(src.join("sub/deeper/small"), b"hello").unwrap();
        std::fs::set_permissions(
            src.join("sub/deeper/small"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        std::fs::set_permissions(src.join("sub"), std::fs::Permissions::from_mode(0o711)).unwrap();
        let mut sparse = std::fs::File::create(src.join("sparse")).unwrap();
        sparse.seek(std::io::SeekFrom::Start(64 << 20)).unwrap();
        sparse.write_all(b"tail").unwrap();
        drop(sparse);
        std::os::unix::fs::symlink("../elsewhere", src.join("sub/link")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            src.join("fifo").as_path(),
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();

        let (s, d) = (open(&src), open(&dst));
        let stats = copy_tree(s.as_fd(), d.as_fd()).unwrap();
        assert_eq!(stats.files, 2);
        assert_eq!(stats.dirs, 2);
        assert_eq!(stats.symlinks, 1);
        assert_eq!(
            std::fs::read(dst.join("sub/deeper/small")).unwrap(),
            b"hello"
        );
        let meta = std::fs::metadata(dst.join("sub/deeper/small")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        assert_eq!(
            meta.mtime(),
            std::fs::metadata(src.join("sub/deeper/small"))
                .unwrap()
                .mtime()
        );
        assert_eq!(
            std::fs::metadata(dst.join("sub"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o711
        );
        assert_eq!(
            std::fs::read_link(dst.join("sub/link")).unwrap(),
            std::path::PathBuf::from("../elsewhere")
        );
        assert!(
            std::fs::symlink_metadata(dst.join("fifo"))
                .unwrap()
                .file_type()
                .is_fifo()
        );
        let copied = std::fs::metadata(dst.join("sparse")).unwrap();
        assert_eq!(copied.len(), (64 << 20) + 4);
        if stats.reflinked == 0 {
            // Copied extent by extent: the 64 MiB hole is not written.
            assert!(
                copied.blocks() * 512 < 1 << 20,
                "{} blocks",
                copied.blocks()
            );
        }
        let mut tail = vec![0u8; 4];
        use std::os::unix::fs::FileExt;
        std::fs::File::open(dst.join("sparse"))
            .unwrap()
            .read_exact_at(&mut tail, 64 << 20)
            .unwrap();
        assert_eq!(tail, b"tail");
    }

    #[test]
    fn usage_counts_files_once() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("a"), vec![1u8; 8192]).unwrap();
        std::fs::hard_link(root.path().join("a"), root.path().join("b")).unwrap();
        let u = usage(open(root.path()).as_fd()).unwrap();
        assert_eq!(u.used_inodes, 2);
        assert!(u.used_bytes >= 8192);
    }
}
