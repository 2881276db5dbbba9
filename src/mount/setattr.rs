//! `mount_setattr(2)` (Linux 5.12+) on a mount descriptor: one of the two `unsafe` calls in
//! k8scsi (with `backend::loopctl`).
//!
//! A bind mount's per-mount flags (read-only, nosuid, nodev, noexec, access times) must be set
//! on the detached tree from `open_tree(OPEN_TREE_CLONE)` *before* it is attached: the copies
//! that mount propagation makes when the tree is attached (the host's and the pod's view of the
//! kubelet directory under Bidirectional propagation) take the flags the tree has at that moment,
//! and a remount afterwards changes only our own copy. rustix has no wrapper for this system
//! call, so this module makes it through `libc::syscall`, with libc's `struct mount_attr` and
//! constants.

#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};

use rustix::io::Errno;

/// Per-mount attributes to set and to clear, as `MOUNT_ATTR_*` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountAttr {
    /// Bits of `attr_set`.
    pub set: u64,
    /// Bits of `attr_clr`; must hold all of `MOUNT_ATTR__ATIME` when `set` picks an atime mode.
    pub clear: u64,
}

/// Changes the attributes of exactly the mount `mount` refers to (a descriptor from
/// `open_tree`, attached or not; not recursively). No propagation type or id mapping is
/// changed. `Errno::NOSYS` means the kernel is older than 5.12.
pub fn mount_setattr(mount: BorrowedFd<'_>, attr: MountAttr) -> Result<(), Errno> {
    let arg = libc::mount_attr {
        attr_set: attr.set,
        attr_clr: attr.clear,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: the kernel's signature is `mount_setattr(int dfd, const char *path, unsigned int
    // flags, struct mount_attr *uattr, size_t usize)`, and each argument matches it:
    // - `dfd` is the raw number of a descriptor borrowed for this whole call, so it is open;
    // - `path` points to a NUL-terminated empty string (`c""` is a static CStr), which with
    //   AT_EMPTY_PATH makes the call act on `dfd` itself; the kernel only reads it;
    // - `uattr` points to `arg`, a live, initialised `libc::mount_attr`, which is `#[repr(C)]`
    //   with the four u64 fields of the kernel's `struct mount_attr` (attr_set, attr_clr,
    //   propagation, userns_fd; MOUNT_ATTR_SIZE_VER0 = 32 bytes); the kernel only reads it;
    // - `usize` is exactly the size of that struct, so the kernel reads no more than `arg`.
    // Nothing is retained by the kernel after the call returns, and the call touches no memory
    // of ours beyond these reads.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mount.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &arg as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_matches_the_kernel_abi() {
        assert_eq!(
            std::mem::size_of::<libc::mount_attr>(),
            libc::MOUNT_ATTR_SIZE_VER0 as usize
        );
    }

    #[test]
    fn refuses_a_descriptor_that_is_not_a_mount_root() {
        // Any caller may ask; the kernel checks the descriptor before privileges. A plain file
        // is not the root of a mount: EINVAL (or ENOSYS on kernels before 5.12), never success.
        let file = tempfile::tempfile().unwrap();
        let attr = MountAttr {
            set: libc::MOUNT_ATTR_RDONLY,
            clear: 0,
        };
        let error = mount_setattr(std::os::fd::AsFd::as_fd(&file), attr).unwrap_err();
        assert!(
            matches!(error, Errno::INVAL | Errno::NOSYS | Errno::PERM),
            "{error}"
        );
    }
}
