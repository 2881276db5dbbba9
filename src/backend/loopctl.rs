//! `LOOP_CTL_REMOVE` on `/dev/loop-control`: removes a free loop device, so the next attach
//! makes a fresh one. One of the two `unsafe` calls in k8scsi (with `mount::setattr`): neither
//! rustix nor libc wraps this request, and `losetup` cannot remove a device.
//!
//! Used for devices that a preallocated image left refusing discards (see
//! `loopdev::refuse_discards`): the kernel keeps that setting on the device after the image is
//! detached and offers no way back, so the device is retired instead of handed to the next user.

#![allow(unsafe_code)]

use std::os::fd::AsRawFd;

const LOOP_CONTROL: &str = "/dev/loop-control";

/// `LOOP_CTL_REMOVE` from `<linux/loop.h>`.
const LOOP_CTL_REMOVE: libc::c_ulong = 0x4C81;

/// Removes `/dev/loop<index>`. The kernel refuses (EBUSY) a device that is attached or open, so
/// this never takes a device from a user.
pub fn remove_device(index: u32) -> std::io::Result<()> {
    let control = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(LOOP_CONTROL)?;
    // SAFETY: `ioctl(int fd, unsigned long request, ...)` with LOOP_CTL_REMOVE takes the device
    // number as a plain integer argument, passed by value (no pointer, nothing for the kernel to
    // read or write in our memory). `fd` is the raw number of `control`, which stays open for
    // the whole call.
    let ret = unsafe {
        libc::ioctl(
            control.as_raw_fd(),
            LOOP_CTL_REMOVE as _,
            libc::c_ulong::from(index),
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}
