//! The real mounter: Linux system calls through rustix.
//!
//! Every path from a request is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS)` starting at a fresh descriptor of the kubelet directory. The bind
//! mount is made with `open_tree(OPEN_TREE_CLONE)` and attached with `move_mount` onto the
//! target's descriptor, so nothing is re-resolved by name between the check and the mount. Its
//! flags (read-only, nosuid, ...) are set with `mount_setattr` on the detached tree, before it is
//! attached, so that the copies mount propagation makes of it have them too.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, CWD, Mode, OFlags, ResolveFlags, StatxFlags, makedev};
use rustix::io::Errno;
use rustix::mount::{
    MountFlags, MoveMountFlags, OpenTreeFlags, UnmountFlags, mount_remount, move_mount, open_tree,
    unmount,
};

use super::setattr::{MountAttr, mount_setattr};
use super::{AtimeMode, ConfinedPath, MountError, MountOptions, Mounter, PathState};

/// Mode of target directories we create (the kubelet creates their parents).
const TARGET_DIR_MODE: u32 = 0o750;

/// How long an unmount refused with EBUSY is retried (see `LinuxMounter::unmount`), and the
/// first pause between tries (doubled each time).
const UNMOUNT_BUSY_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);
const UNMOUNT_BUSY_FIRST_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// The production [`Mounter`].
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxMounter;

fn io(op: &'static str, path: impl Into<PathBuf>, errno: Errno) -> MountError {
    let path = path.into();
    match errno {
        Errno::LOOP | Errno::XDEV => MountError::Symlink { path },
        Errno::NOTDIR => MountError::NotADirectory { path },
        other => MountError::Io {
            op,
            path,
            source: other.into(),
        },
    }
}

/// Refines ENOTDIR from opening `name` in `dir` with `O_DIRECTORY | O_NOFOLLOW`: when `name` is
/// a symlink, say so rather than "not a directory".
fn not_a_directory(dir: &OwnedFd, name: &str, path: PathBuf) -> MountError {
    let is_symlink = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Symlink)
        .unwrap_or(false);
    if is_symlink {
        MountError::Symlink { path }
    } else {
        MountError::NotADirectory { path }
    }
}

fn resolve_flags() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

/// Opens the parent directory of `path` without following any symlink below the root.
fn open_parent(path: &ConfinedPath) -> Result<OwnedFd, MountError> {
    let root = rustix::fs::open(
        path.root(),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io("open", path.root(), e))?;
    rustix::fs::openat2(
        &root,
        path.parent_relative(),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        resolve_flags(),
    )
    .map_err(|e| match e {
        Errno::NOENT => MountError::ParentMissing {
            path: path.absolute(),
        },
        Errno::NOTDIR => {
            // The last parent component exists but is not a directory: find out whether it is
            // a symlink by looking at it from its own parent.
            let (up, name) = match path.parent_components().split_last() {
                Some((name, up)) => (up.join("/"), name.as_str()),
                None => {
                    return MountError::NotADirectory {
                        path: path.absolute(),
                    };
                }
            };
            let up = if up.is_empty() { ".".to_string() } else { up };
            match rustix::fs::openat2(
                &root,
                up,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                resolve_flags(),
            ) {
                Ok(dir) => not_a_directory(&dir, name, path.absolute()),
                Err(_) => MountError::NotADirectory {
                    path: path.absolute(),
                },
            }
        }
        other => io("open", path.absolute(), other),
    })
}

/// The path of `leaf` inside the directory `fd` refers to, via procfs: lets calls that only take
/// a path (umount) reach exactly the directory we resolved, without re-walking its parents.
fn fd_path(fd: &OwnedFd, leaf: &str) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}/{leaf}", fd.as_raw_fd()))
}

fn remount_flags(options: &MountOptions) -> MountFlags {
    let mut flags = MountFlags::BIND;
    for (set, flag) in [
        (options.readonly, MountFlags::RDONLY),
        (options.nosuid, MountFlags::NOSUID),
        (options.nodev, MountFlags::NODEV),
        (options.noexec, MountFlags::NOEXEC),
        (options.nodiratime, MountFlags::NODIRATIME),
        (options.sync, MountFlags::SYNCHRONOUS),
        (options.dirsync, MountFlags::DIRSYNC),
    ] {
        if set {
            flags |= flag;
        }
    }
    flags |= match options.atime {
        Some(AtimeMode::NoAtime) => MountFlags::NOATIME,
        Some(AtimeMode::StrictAtime) => MountFlags::STRICTATIME,
        Some(AtimeMode::RelAtime) | None => MountFlags::RELATIME,
    };
    flags
}

/// The `mount_setattr` equivalent of a bind remount with [`remount_flags`]: every per-mount
/// flag the options name is set and every other one cleared, and the access-time mode is always
/// chosen (relatime unless the options say otherwise). `sync` and `dirsync` are filesystem-wide
/// flags, which neither a bind remount nor `mount_setattr` changes.
fn mount_attr(options: &MountOptions) -> MountAttr {
    let mut attr = MountAttr {
        set: 0,
        clear: libc::MOUNT_ATTR__ATIME,
    };
    for (wanted, bit) in [
        (options.readonly, libc::MOUNT_ATTR_RDONLY),
        (options.nosuid, libc::MOUNT_ATTR_NOSUID),
        (options.nodev, libc::MOUNT_ATTR_NODEV),
        (options.noexec, libc::MOUNT_ATTR_NOEXEC),
        (options.nodiratime, libc::MOUNT_ATTR_NODIRATIME),
    ] {
        if wanted {
            attr.set |= bit;
        } else {
            attr.clear |= bit;
        }
    }
    attr.set |= match options.atime {
        Some(AtimeMode::NoAtime) => libc::MOUNT_ATTR_NOATIME,
        Some(AtimeMode::StrictAtime) => libc::MOUNT_ATTR_STRICTATIME,
        Some(AtimeMode::RelAtime) | None => libc::MOUNT_ATTR_RELATIME,
    };
    attr
}

/// Sets the flags of `options` on the detached `tree` before it is attached. `Ok(false)` when
/// the kernel has no `mount_setattr` (before 5.12): the caller must remount once attached, and
/// copies made by mount propagation then keep the source's flags (warned about once).
fn set_tree_flags(tree: &OwnedFd, options: &MountOptions) -> Result<bool, Errno> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    match mount_setattr(tree.as_fd(), mount_attr(options)) {
        Ok(()) => Ok(true),
        Err(Errno::NOSYS) => {
            WARNED.call_once(|| {
                tracing::warn!(
                    "this kernel has no mount_setattr (Linux 5.12+): bind mount flags such as \
                     read-only are set by a remount after attaching, which copies of the mount \
                     made by mount propagation (the host's and pods' views of the kubelet \
                     directory) do not get"
                )
            });
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Creates (if needed) and opens the target: a directory, or an empty file for a device node.
/// Never follows a symlink at the target.
fn create_target(
    parent: &OwnedFd,
    target: &ConfinedPath,
    directory: bool,
) -> Result<OwnedFd, MountError> {
    if directory {
        match rustix::fs::mkdirat(parent, target.leaf(), Mode::from_raw_mode(TARGET_DIR_MODE)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(io("mkdir", target.absolute(), e)),
        }
    } else {
        match rustix::fs::openat(
            parent,
            target.leaf(),
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o640),
        ) {
            Ok(_) | Err(Errno::EXIST) => {}
            Err(e) => return Err(io("create", target.absolute(), e)),
        }
    }
    let kind = if directory {
        OFlags::DIRECTORY
    } else {
        OFlags::empty()
    };
    let fd = rustix::fs::openat2(
        parent,
        target.leaf(),
        OFlags::PATH | kind | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        resolve_flags(),
    )
    .map_err(|e| match e {
        Errno::NOTDIR => not_a_directory(parent, target.leaf(), target.absolute()),
        other => io("open", target.absolute(), other),
    })?;
    if !directory {
        // O_PATH without O_DIRECTORY also opens a symlink itself: make sure it is a plain file.
        let st = rustix::fs::fstat(&fd).map_err(|e| io("stat", target.absolute(), e))?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(MountError::Symlink {
                path: target.absolute(),
            });
        }
    }
    Ok(fd)
}

impl Mounter for LinuxMounter {
    fn mount_device(
        &self,
        device: &Path,
        fs_type: &str,
        target: &ConfinedPath,
        options: &MountOptions,
    ) -> Result<(), MountError> {
        let parent = open_parent(target)?;
        let target_fd = create_target(&parent, target, true)?;
        // mount(2) through the descriptor's procfs link lands on exactly the directory we
        // resolved, whatever happens to the path meanwhile.
        let at = format!("/proc/self/fd/{}", target_fd.as_raw_fd());
        let flags = remount_flags(options) - MountFlags::BIND;
        // Snapshots and clones copy a filesystem with its UUID, and XFS refuses to mount a
        // second filesystem whose UUID is already mounted: tell it not to check (k8scsi never
        // relies on UUIDs to find its filesystems).
        let data = (fs_type == "xfs").then_some(c"nouuid");
        rustix::mount::mount(device, at.as_str(), fs_type, flags, data)
            .map_err(|e| io("mount", target.absolute(), e))
    }

    fn inspect(&self, path: &ConfinedPath) -> Result<Option<PathState>, MountError> {
        let parent = open_parent(path)?;
        let parent_stat = rustix::fs::statx(
            &parent,
            "",
            AtFlags::EMPTY_PATH,
            StatxFlags::BASIC_STATS | StatxFlags::MNT_ID,
        )
        .map_err(|e| io("statx", path.absolute(), e))?;
        let stat = match rustix::fs::statx(
            &parent,
            path.leaf(),
            AtFlags::SYMLINK_NOFOLLOW,
            StatxFlags::BASIC_STATS | StatxFlags::MNT_ID,
        ) {
            Ok(s) => s,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(io("statx", path.absolute(), e)),
        };
        let file_type = rustix::fs::FileType::from_raw_mode(stat.stx_mode.into());
        if file_type == rustix::fs::FileType::Symlink {
            return Err(MountError::Symlink {
                path: path.absolute(),
            });
        }
        let mount_root = stat
            .stx_attributes
            .contains(rustix::fs::StatxAttributes::MOUNT_ROOT);
        Ok(Some(PathState {
            dev: makedev(stat.stx_dev_major, stat.stx_dev_minor),
            ino: stat.stx_ino,
            is_mount_point: mount_root || stat.stx_mnt_id != parent_stat.stx_mnt_id,
            is_dir: file_type == rustix::fs::FileType::Directory,
        }))
    }

    fn bind(
        &self,
        source: &Path,
        target: &ConfinedPath,
        options: &MountOptions,
    ) -> Result<(), MountError> {
        let parent = open_parent(target)?;
        // A directory is bound onto a directory; a block device node onto a file, as CSI asks
        // for raw block volumes.
        let source_is_dir = std::fs::metadata(source)
            .map_err(|e| MountError::Io {
                op: "stat",
                path: source.to_path_buf(),
                source: e,
            })?
            .is_dir();
        let target_fd = create_target(&parent, target, source_is_dir)?;
        let tree = open_tree(
            CWD,
            source,
            OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
        )
        .map_err(|e| io("open_tree", source, e))?;
        // Flags go on the tree before it is attached: attaching under a shared mount copies it
        // to the peers as it is then, and a later remount would reach only this copy.
        let remount_after = options.needs_remount()
            && !set_tree_flags(&tree, options)
                .map_err(|e| io("mount_setattr", target.absolute(), e))?;
        move_mount(
            tree.as_fd(),
            "",
            target_fd.as_fd(),
            "",
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
        )
        .map_err(|e| io("move_mount", target.absolute(), e))?;
        if remount_after {
            // The tree descriptor now names the attached mount; remounting through its procfs
            // link changes exactly that mount's flags.
            let mount_path = format!("/proc/self/fd/{}", tree.as_raw_fd());
            if let Err(e) = mount_remount(mount_path.as_str(), remount_flags(options), "") {
                let _ = unmount(fd_path(&parent, target.leaf()), UnmountFlags::NOFOLLOW);
                return Err(io("remount", target.absolute(), e));
            }
        }
        Ok(())
    }

    fn unmount(&self, target: &ConfinedPath) -> Result<(), MountError> {
        let parent = open_parent(target)?;
        // EBUSY is usually short-lived: a process of the pod still exiting, a scanner or a
        // `du` with a directory open in the volume, or a killed driver whose last thread is
        // still leaving the kernel. Try again for a moment before the kubelet has to retry.
        let mut pause = UNMOUNT_BUSY_FIRST_PAUSE;
        let deadline = std::time::Instant::now() + UNMOUNT_BUSY_PATIENCE;
        loop {
            match unmount(fd_path(&parent, target.leaf()), UnmountFlags::NOFOLLOW) {
                Err(Errno::BUSY) if std::time::Instant::now() + pause < deadline => {
                    std::thread::sleep(pause);
                    pause *= 2;
                }
                other => return other.map_err(|e| io("umount", target.absolute(), e)),
            }
        }
    }

    fn detach(&self, target: &ConfinedPath) -> Result<(), MountError> {
        let parent = open_parent(target)?;
        unmount(
            fd_path(&parent, target.leaf()),
            UnmountFlags::NOFOLLOW | UnmountFlags::DETACH,
        )
        .map_err(|e| io("umount -l", target.absolute(), e))
    }

    fn remove_target(&self, target: &ConfinedPath) -> Result<(), MountError> {
        let parent = match open_parent(target) {
            Ok(p) => p,
            Err(MountError::ParentMissing { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        match rustix::fs::unlinkat(&parent, target.leaf(), AtFlags::REMOVEDIR) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(Errno::NOTEMPTY) => Err(MountError::NotEmpty {
                path: target.absolute(),
            }),
            Err(Errno::NOTDIR) => {
                // A plain file (block-volume targets are files): remove it the same way.
                rustix::fs::unlinkat(&parent, target.leaf(), AtFlags::empty())
                    .map_err(|e| io("unlink", target.absolute(), e))
            }
            Err(e) => Err(io("rmdir", target.absolute(), e)),
        }
    }

    fn identity(&self, dir: &Path) -> std::io::Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(dir)?;
        Ok((meta.dev(), meta.ino()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary directory with a kubelet dir, a bind source and the confined target
    /// `<kubelet>/pod/mount` (returned raw and confined); the directory lives as long as the
    /// returned guard.
    fn bind_fixture() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf, ConfinedPath) {
        let dir = tempfile::tempdir().unwrap();
        let (kubelet, source) = (dir.path().join("kubelet"), dir.path().join("source"));
        std::fs::create_dir_all(kubelet.join("pod")).unwrap();
        std::fs::create_dir_all(&source).unwrap();
        let raw = kubelet.join("pod/mount");
        let target = ConfinedPath::new(&kubelet, raw.to_str().unwrap()).unwrap();
        (dir, kubelet, source, raw, target)
    }

    /// Mounts a test made, detached (`MNT_DETACH`) last first when dropped, so that they go
    /// away even when an assertion fails halfway; ones already gone are skipped.
    struct DetachOnDrop(Vec<PathBuf>);

    impl Drop for DetachOnDrop {
        fn drop(&mut self) {
            for path in self.0.iter().rev() {
                let _ = unmount(path, UnmountFlags::NOFOLLOW | UnmountFlags::DETACH);
            }
        }
    }

    /// The per-mount options `/proc/self/mountinfo` shows for the topmost mount at `path`.
    fn mount_options_at(path: &Path) -> Option<Vec<String>> {
        let infos = procfs::process::Process::myself()
            .unwrap()
            .mountinfo()
            .unwrap();
        infos
            .into_iter()
            .rfind(|m| m.mount_point == path)
            .map(|m| m.mount_options.into_keys().collect())
    }

    #[test]
    fn mount_attr_sets_what_the_remount_would_and_clears_the_rest() {
        let per_mount = [
            (MountFlags::RDONLY, libc::MOUNT_ATTR_RDONLY),
            (MountFlags::NOSUID, libc::MOUNT_ATTR_NOSUID),
            (MountFlags::NODEV, libc::MOUNT_ATTR_NODEV),
            (MountFlags::NOEXEC, libc::MOUNT_ATTR_NOEXEC),
            (MountFlags::NODIRATIME, libc::MOUNT_ATTR_NODIRATIME),
        ];
        let atime = [
            (MountFlags::NOATIME, libc::MOUNT_ATTR_NOATIME),
            (MountFlags::STRICTATIME, libc::MOUNT_ATTR_STRICTATIME),
            (MountFlags::RELATIME, libc::MOUNT_ATTR_RELATIME),
        ];
        let all = MountOptions {
            readonly: true,
            nosuid: true,
            nodev: true,
            noexec: true,
            atime: Some(AtimeMode::NoAtime),
            nodiratime: true,
            sync: true,
            dirsync: true,
        };
        let strict = MountOptions {
            readonly: true,
            atime: Some(AtimeMode::StrictAtime),
            ..Default::default()
        };
        let sync_only = MountOptions {
            sync: true,
            ..Default::default()
        };
        for options in [all, strict, sync_only, MountOptions::default()] {
            let (flags, attr) = (remount_flags(&options), mount_attr(&options));
            for (flag, bit) in per_mount {
                assert_eq!(flags.contains(flag), attr.set & bit != 0, "{options:?}");
                assert_eq!(attr.set & bit == 0, attr.clear & bit != 0, "{options:?}");
            }
            // The access-time mode is always chosen, the same one as the remount chooses.
            assert_eq!(
                attr.clear & libc::MOUNT_ATTR__ATIME,
                libc::MOUNT_ATTR__ATIME
            );
            let chosen = atime
                .iter()
                .find(|(flag, _)| flags.contains(*flag))
                .unwrap();
            assert_eq!(attr.set & libc::MOUNT_ATTR__ATIME, chosen.1, "{options:?}");
        }
    }

    /// Under a shared kubelet directory (Bidirectional propagation), the copy of a publish
    /// mount that propagation makes in a peer (the host's or a pod's view) must be as read-only,
    /// nosuid, nodev and noexec as ours; a remount after attaching reaches only our copy.
    #[test]
    fn bind_flags_reach_the_copies_mount_propagation_makes() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIPPED: needs root for mount(2)");
            return;
        }
        let (dir, kubelet, source, raw, target) = bind_fixture();
        let peer = dir.path().join("peer");
        std::fs::create_dir(&peer).unwrap();
        let mut mounts = DetachOnDrop(Vec::new());
        // The kubelet directory as its own shared mount, with a peer at `peer`.
        rustix::mount::mount_bind(&kubelet, &kubelet).unwrap();
        mounts.0.push(kubelet.clone());
        rustix::mount::mount_change(&kubelet, rustix::mount::MountPropagationFlags::SHARED)
            .unwrap();
        rustix::mount::mount_bind(&kubelet, &peer).unwrap();
        mounts.0.push(peer.clone());
        let peer_copy = peer.join("pod/mount");
        mounts.0.push(peer_copy.clone());
        mounts.0.push(raw.clone());
        let options = MountOptions {
            readonly: true,
            nosuid: true,
            nodev: true,
            noexec: true,
            atime: Some(AtimeMode::NoAtime),
            nodiratime: true,
            ..Default::default()
        };
        LinuxMounter.bind(&source, &target, &options).unwrap();
        for path in [&raw, &peer_copy] {
            let shown = mount_options_at(path)
                .unwrap_or_else(|| panic!("nothing is mounted at {}", path.display()));
            for flag in ["ro", "nosuid", "nodev", "noexec", "noatime", "nodiratime"] {
                assert!(
                    shown.iter().any(|o| o == flag),
                    "{} shows {shown:?}, without {flag}",
                    path.display()
                );
            }
        }
        for path in [&raw, &peer_copy] {
            let error = std::fs::File::create(path.join("written")).unwrap_err();
            assert_eq!(
                error.raw_os_error(),
                Some(libc::EROFS),
                "{}: {error}",
                path.display()
            );
        }
        // The source itself stays writable.
        std::fs::write(source.join("written"), b"").unwrap();
        // Unmounting our copy takes the propagated one with it.
        LinuxMounter.unmount(&target).unwrap();
        assert!(mount_options_at(&peer_copy).is_none());
        drop(mounts);
    }

    #[test]
    fn detach_removes_a_bind_mount_without_following_symlinks() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIPPED: needs root for mount(2)");
            return;
        }
        let (_dir, kubelet, source, raw, target) = bind_fixture();
        let m = LinuxMounter;
        m.bind(&source, &target, &MountOptions::default()).unwrap();
        assert!(m.inspect(&target).unwrap().unwrap().is_mount_point);
        m.detach(&target).unwrap();
        assert!(!m.inspect(&target).unwrap().unwrap().is_mount_point);
        // Nothing mounted any more: reported, not silently accepted.
        assert!(m.detach(&target).is_err());
        m.remove_target(&target).unwrap();
        // A symlink planted at the target is refused, not followed to the mount it points at.
        let other =
            ConfinedPath::new(&kubelet, kubelet.join("pod/other").to_str().unwrap()).unwrap();
        m.bind(&source, &other, &MountOptions::default()).unwrap();
        std::os::unix::fs::symlink(kubelet.join("pod/other"), &raw).unwrap();
        assert!(m.detach(&target).is_err());
        assert!(m.inspect(&other).unwrap().unwrap().is_mount_point);
        m.unmount(&other).unwrap();
        m.remove_target(&other).unwrap();
    }

    #[test]
    fn unmount_waits_out_a_short_lived_busy_mount() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIPPED: needs root for mount(2)");
            return;
        }
        let (_dir, _, source, raw, target) = bind_fixture();
        let m = LinuxMounter;
        m.bind(&source, &target, &MountOptions::default()).unwrap();
        // A directory opened through the mount keeps it busy until it is closed.
        let held = std::fs::File::open(&raw).unwrap();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(held);
        });
        m.unmount(&target).unwrap();
        closer.join().unwrap();
        assert!(!m.inspect(&target).unwrap().unwrap().is_mount_point);
        // Busy for longer than the patience: the error is reported and the mount stays.
        m.bind(&source, &target, &MountOptions::default()).unwrap();
        let held = std::fs::File::open(&raw).unwrap();
        let error = m.unmount(&target).unwrap_err();
        assert!(error.to_string().contains("busy"), "{error}");
        assert!(m.inspect(&target).unwrap().unwrap().is_mount_point);
        drop(held);
        m.unmount(&target).unwrap();
        m.remove_target(&target).unwrap();
    }
}
