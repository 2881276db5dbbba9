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

/// How many directory descriptors one walk keeps open at most. Deeper levels are closed and
/// re-opened through `..` (checked by device and inode) when the walk comes back up to them.
const MAX_OPEN_DIRS: usize = 64;

/// One directory level of a [`Walker`].
pub(crate) struct Frame {
    /// Its name in the parent directory (empty for the root of the walk).
    name: CString,
    dev: u64,
    ino: u64,
    /// The open stream, or `None` while the level is closed to bound the open descriptors.
    dir: Option<rustix::fs::Dir>,
    /// Position after the last entry read, to resume a closed level.
    pos: i64,
    /// Whether anything was found since the stream was last (re)started (for removal).
    found: bool,
}

/// A depth-first walk of a directory tree without recursion: the levels are kept on the heap
/// and at most [`MAX_OPEN_DIRS`] of them hold a descriptor, so neither the stack nor the
/// descriptor table limits the depth. Entries are read as a stream, never collected. Also
/// walks the trees `snapcopy` copies for snapshots and clones of local volumes.
pub(crate) struct Walker {
    frames: Vec<Frame>,
    open: usize,
}

impl Walker {
    /// Starts at (a duplicate of) `dir`.
    pub(crate) fn new(dir: BorrowedFd<'_>) -> io::Result<Walker> {
        let fd = rustix::fs::openat(dir, c".", dir_flags(), Mode::empty())?;
        let st = rustix::fs::fstat(&fd)?;
        Ok(Walker {
            frames: vec![Frame {
                name: CString::default(),
                dev: st.st_dev,
                ino: st.st_ino,
                dir: Some(rustix::fs::Dir::new(fd)?),
                pos: 0,
                found: false,
            }],
            open: 1,
        })
    }

    pub(crate) fn depth(&self) -> usize {
        self.frames.len() - 1
    }

    fn top(&mut self) -> &mut Frame {
        self.frames.last_mut().expect("a walk always has its root")
    }

    /// The directory the walk is in (always open).
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        let frame = self.frames.last().expect("a walk always has its root");
        frame
            .dir
            .as_ref()
            .expect("the current level is open")
            .fd()
            .expect("linux Dir has a descriptor")
    }

    /// The next name in the current directory (except `.` and `..`), `None` at its end.
    pub(crate) fn next_name(&mut self) -> io::Result<Option<CString>> {
        let frame = self.top();
        let dir = frame.dir.as_mut().expect("the current level is open");
        loop {
            match dir.read() {
                None => return Ok(None),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(entry)) => {
                    frame.pos = entry.offset();
                    let name = entry.file_name();
                    if matches!(name.to_bytes(), b"." | b"..") {
                        continue;
                    }
                    frame.found = true;
                    return Ok(Some(name.to_owned()));
                }
            }
        }
    }

    /// Starts the current directory over (for removal: to see what was missed or added).
    fn restart(&mut self) {
        let frame = self.top();
        frame.found = false;
        frame.pos = 0;
        if let Some(dir) = frame.dir.as_mut() {
            dir.rewind();
        }
    }

    /// Enters the directory `name` of the current one, which must be on `dev` (the walk's
    /// filesystem). Symlinks are never followed.
    pub(crate) fn descend(&mut self, name: &CStr, dev: u64) -> io::Result<()> {
        let fd = rustix::fs::openat(self.fd(), name, dir_flags(), Mode::empty())?;
        let st = rustix::fs::fstat(&fd)?;
        if st.st_dev != dev {
            return Err(io::Error::other(format!(
                "{name:?} is a different filesystem mounted inside the volume"
            )));
        }
        self.frames.push(Frame {
            name: name.to_owned(),
            dev: st.st_dev,
            ino: st.st_ino,
            dir: Some(rustix::fs::Dir::new(fd)?),
            pos: 0,
            found: false,
        });
        self.open += 1;
        if self.open > MAX_OPEN_DIRS {
            // Close the shallowest open level except the root; it is re-opened on the way up.
            if let Some(frame) = self.frames[1..].iter_mut().find(|f| f.dir.is_some()) {
                frame.dir = None;
                self.open -= 1;
            }
        }
        Ok(())
    }

    /// Leaves the current directory for its parent, which is re-opened through `..` if it was
    /// closed (and must still be the same directory). Returns the level left, still open, so
    /// the caller can finish with it (set attributes, remove it by name).
    pub(crate) fn ascend(&mut self) -> io::Result<Frame> {
        let child = self.frames.pop().expect("not above the root");
        self.open -= 1;
        let parent = self.frames.last_mut().expect("not above the root");
        if parent.dir.is_none() {
            let child_fd = child
                .dir
                .as_ref()
                .expect("the current level is open")
                .fd()?;
            let fd = rustix::fs::openat(child_fd, c"..", dir_flags(), Mode::empty())?;
            let st = rustix::fs::fstat(&fd)?;
            if (st.st_dev, st.st_ino) != (parent.dev, parent.ino) {
                return Err(io::Error::other(
                    "a directory was moved while the tree was being walked",
                ));
            }
            let mut dir = rustix::fs::Dir::new(fd)?;
            if parent.pos != 0 {
                dir.seek(parent.pos)?;
            }
            parent.dir = Some(dir);
            self.open += 1;
        }
        Ok(child)
    }
}

impl Frame {
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.dir
            .as_ref()
            .expect("a level just left is open")
            .fd()
            .expect("linux Dir has a descriptor")
    }
}

/// Removes the tree at `path` like [`remove_tree`] (absent is success; a file or symlink
/// there is unlinked, never followed). Unlike `std::fs::remove_dir_all`, which recurses once
/// per level, a tree nested tens of thousands of directories deep cannot overflow the stack of
/// the thread that removes it (which aborts the whole server).
pub fn remove_path(path: &std::path::Path) -> io::Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::other("not a path below a directory"));
    };
    let name = name
        .to_str()
        .ok_or_else(|| io::Error::other("not a UTF-8 name"))?;
    let dir = match rustix::fs::open(parent, dir_flags(), Mode::empty()) {
        Ok(dir) => dir,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    match remove_tree(dir.as_fd(), name) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e)
            if [Errno::NOTDIR, Errno::LOOP]
                .iter()
                .any(|errno| e.raw_os_error() == Some(errno.raw_os_error())) =>
        {
            match rustix::fs::unlinkat(&dir, name, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e),
    }
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
    let mut walk = Walker::new(dir)?;
    loop {
        let Some(name) = walk.next_name()? else {
            if walk.top().found {
                // Entries were removed while reading: read again until nothing is left.
                walk.restart();
                continue;
            }
            if walk.depth() == 0 {
                return Ok(());
            }
            let done = walk.ascend()?;
            drop(done.dir);
            rustix::fs::unlinkat(walk.fd(), done.name.as_c_str(), AtFlags::REMOVEDIR)?;
            continue;
        };
        let st = rustix::fs::statat(walk.fd(), name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            if st.st_dev != dev {
                return Err(io::Error::other(format!(
                    "{name:?} is a different filesystem mounted inside the volume; not removing it"
                )));
            }
            walk.descend(name.as_c_str(), dev)?;
        } else {
            rustix::fs::unlinkat(walk.fd(), name.as_c_str(), AtFlags::empty())?;
        }
    }
}

/// Bytes allocated and inodes used below `dir`, `dir` itself included (counted once per inode,
/// not crossing mounts, never following symlinks).
pub fn usage(dir: BorrowedFd<'_>) -> io::Result<Usage> {
    let st = rustix::fs::fstat(dir)?;
    let dev = st.st_dev;
    let mut usage = Usage {
        used_bytes: st.st_blocks as u64 * 512,
        used_inodes: 1,
    };
    let mut seen = std::collections::HashSet::new();
    let mut walk = Walker::new(dir)?;
    loop {
        let Some(name) = walk.next_name()? else {
            if walk.depth() == 0 {
                return Ok(usage);
            }
            walk.ascend()?;
            continue;
        };
        let Ok(st) = rustix::fs::statat(walk.fd(), name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)
        else {
            continue; // removed meanwhile
        };
        let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
        if st.st_dev != dev || (!is_dir && st.st_nlink > 1 && !seen.insert(st.st_ino)) {
            continue;
        }
        usage.used_bytes += st.st_blocks as u64 * 512;
        usage.used_inodes += 1;
        if is_dir {
            // Gone or replaced meanwhile: counted as what it was, not entered.
            let _ = walk.descend(name.as_c_str(), dev);
        }
    }
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
    let dst_dev = rustix::fs::fstat(dst)?.st_dev;
    let mut from = Walker::new(src)?;
    let mut to = Walker::new(dst)?;
    // The source attributes of the directories being copied, one per level below the root.
    let mut attributes: Vec<rustix::fs::Stat> = Vec::new();
    loop {
        let Some(name) = from.next_name()? else {
            if from.depth() == 0 {
                return Ok(());
            }
            from.ascend()?;
            let done = to.ascend()?;
            let st = attributes.pop().expect("one per level");
            set_attributes(done.fd(), &st)?;
            stats.dirs += 1;
            continue;
        };
        let name = name.as_c_str();
        let (src, dst) = (from.fd(), to.fd());
        let st = rustix::fs::statat(src, name, AtFlags::SYMLINK_NOFOLLOW)?;
        if st.st_dev != dev {
            stats.skipped += 1;
            continue;
        }
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                rustix::fs::mkdirat(dst, name, Mode::from_raw_mode(0o700))?;
                from.descend(name, dev)?;
                to.descend(name, dst_dev)?;
                attributes.push(st);
            }
            FileType::RegularFile => {
                let Some(s) = open_regular(src, name, &st)? else {
                    tracing::warn!(name = ?name, "not copying a file replaced while copying");
                    stats.skipped += 1;
                    continue;
                };
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
}

/// Opens `name` in `dir` for reading if it is still the regular file `st` describes. Opened
/// without blocking (a FIFO swapped in after the stat would block a plain open for ever) and
/// without following a symlink; `None` if it was replaced or removed meanwhile.
fn open_regular(
    dir: BorrowedFd<'_>,
    name: &CStr,
    st: &rustix::fs::Stat,
) -> io::Result<Option<OwnedFd>> {
    let fd = match rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT | Errno::LOOP | Errno::NXIO) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let opened = rustix::fs::fstat(&fd)?;
    if FileType::from_raw_mode(opened.st_mode) != FileType::RegularFile
        || (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino)
    {
        return Ok(None);
    }
    Ok(Some(fd))
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
    let mut out = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        if let Some(name) = name_str(entry?.file_name()) {
            out.push(name.to_string());
        }
    }
    Ok(out)
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

    /// Nests `depth` directories named "d" below `root` by descriptor (no PATH_MAX), with a
    /// file at the bottom; returns the bottom directory.
    fn nest(root: &std::path::Path, depth: usize) -> OwnedFd {
        let mut cur = open(root);
        for _ in 0..depth {
            rustix::fs::mkdirat(&cur, "d", Mode::from_raw_mode(0o755)).unwrap();
            cur = rustix::fs::openat(&cur, "d", dir_flags(), Mode::empty()).unwrap();
        }
        let f = rustix::fs::openat(
            &cur,
            "bottom",
            OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .unwrap();
        rustix::io::write(&f, b"deep").unwrap();
        cur
    }

    #[test]
    fn deep_trees_are_measured_copied_and_removed() {
        // Far deeper than a recursive walk survives on a 2 MiB thread, and than 1024 fds.
        const DEPTH: usize = 10_000;
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("src")).unwrap();
        std::fs::create_dir(root.path().join("dst")).unwrap();
        drop(nest(&root.path().join("src"), DEPTH));
        let (s, d) = (
            open(&root.path().join("src")),
            open(&root.path().join("dst")),
        );
        let fds_before = std::fs::read_dir("/proc/self/fd").unwrap().count();
        let (u, stats) = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                let u = usage(s.as_fd()).unwrap();
                let stats = copy_tree(s.as_fd(), d.as_fd()).unwrap();
                (u, stats)
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(u.used_inodes, DEPTH as u64 + 2);
        assert_eq!(stats.dirs, DEPTH as u64);
        assert_eq!(stats.files, 1);
        let copied = open(&root.path().join("dst"));
        assert_eq!(usage(copied.as_fd()).unwrap().used_inodes, DEPTH as u64 + 2);
        let bottom = (0..DEPTH).fold(copied, |fd, _| {
            rustix::fs::openat(&fd, "d", dir_flags(), Mode::empty()).unwrap()
        });
        let f = rustix::fs::openat(&bottom, "bottom", OFlags::RDONLY, Mode::empty()).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(rustix::io::read(&f, &mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], b"deep");
        drop((bottom, f));
        let top = open(root.path());
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                remove_tree(top.as_fd(), "src").unwrap();
                remove_tree(top.as_fd(), "dst").unwrap();
            })
            .unwrap()
            .join()
            .unwrap();
        assert!(std::fs::read_dir(root.path()).unwrap().next().is_none());
        let fds_after = std::fs::read_dir("/proc/self/fd").unwrap().count();
        assert!(fds_after <= fds_before + 2, "{fds_before} -> {fds_after}");
    }

    #[test]
    fn a_fifo_swapped_in_for_a_file_is_not_opened_blockingly() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("file"), b"data").unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.path().join("fifo").as_path(),
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let dir = open(root.path());
        let st = rustix::fs::statat(&dir, "file", AtFlags::SYMLINK_NOFOLLOW).unwrap();
        // What copy_tree sees when a tenant swaps the two names between its stat and its open.
        let (tx, rx) = std::sync::mpsc::channel();
        let path = root.path().to_path_buf();
        std::thread::spawn(move || {
            let dir = open(&path);
            let r = open_regular(dir.as_fd(), c"fifo", &st).map(|fd| fd.is_some());
            tx.send(r.map_err(|e| e.to_string())).unwrap();
        });
        let r = rx.recv_timeout(std::time::Duration::from_secs(5));
        if r.is_err() {
            // Unblock the stuck opener before failing.
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .open(root.path().join("fifo"));
        }
        assert_eq!(r.expect("the open must not block"), Ok(false));
        assert!(open_regular(dir.as_fd(), c"file", &st).unwrap().is_some());
        assert!(open_regular(dir.as_fd(), c"gone", &st).unwrap().is_none());
    }

    #[test]
    fn copy_tree_survives_a_file_and_fifo_swapped_in_a_loop() {
        let root = tempfile::tempdir().unwrap();
        let src = root.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("a"), b"data").unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            src.join("b").as_path(),
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swapper = {
            let (stop, src) = (stop.clone(), open(&src));
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = rustix::fs::renameat_with(
                        &src,
                        "a",
                        &src,
                        "b",
                        rustix::fs::RenameFlags::EXCHANGE,
                    );
                }
            })
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let base = root.path().to_path_buf();
        std::thread::spawn(move || {
            for i in 0..300 {
                let dst = base.join(format!("dst{i}"));
                std::fs::create_dir(&dst).unwrap();
                let r = copy_tree(open(&base.join("src")).as_fd(), open(&dst).as_fd());
                if let Err(e) = r {
                    tx.send(Err(e.to_string())).unwrap();
                    return;
                }
            }
            tx.send(Ok(())).unwrap();
        });
        let r = rx.recv_timeout(std::time::Duration::from_secs(30));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        swapper.join().unwrap();
        if r.is_err() {
            // Unblock a stuck copy before failing.
            for name in ["a", "b"] {
                let _ = rustix::fs::open(
                    src.join(name).as_path(),
                    OFlags::WRONLY | OFlags::NONBLOCK,
                    Mode::empty(),
                );
            }
        }
        assert_eq!(r.expect("the copies must finish"), Ok(()));
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
