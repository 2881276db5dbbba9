//! A real filesystem standing in for a network share: ext4 on a loop device of the test's
//! own, plus the test's own mount of it to look at what the drivers did (this kernel has no
//! NFS client; every driver mounts the device itself, as nodes would mount one export).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

pub fn skip_reason() -> Option<String> {
    if !super::is_root() {
        return Some("needs root (loop devices, mounts)".into());
    }
    for tool in ["losetup", "mkfs.ext4"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

/// An ext4 filesystem on a loop device of our own, plus the test's own mount of it to look at
/// what the drivers did.
pub struct Share {
    dir: tempfile::TempDir,
    pub device: String,
    pub fs_type: String,
}

impl Share {
    pub fn new() -> Share {
        Share::formatted("ext4")
    }

    /// A share formatted with `fs_type` (`ext4`, `btrfs`, `xfs`).
    pub fn formatted(fs_type: &str) -> Share {
        let dir = tempfile::Builder::new()
            .prefix("k8scsi-share-")
            .tempdir()
            .unwrap();
        let image = dir.path().join("share.img");
        std::fs::File::create(&image)
            .unwrap()
            // Sparse; big enough for csi-sanity's 1 GiB expansion (growth is checked against
            // the share's free space).
            .set_len(2 << 30)
            .unwrap();
        let force = if fs_type == "ext4" { "-F" } else { "-f" };
        let mkfs = Command::new(format!("mkfs.{fs_type}"))
            .args(["-q", force])
            .arg(&image)
            .output()
            .unwrap();
        assert!(mkfs.status.success(), "mkfs.{fs_type}: {mkfs:?}");
        // Other tests attach loop devices concurrently; losetup can lose the race for a free
        // device, so try again a few times.
        let mut attempts = 0;
        let losetup = loop {
            let out = Command::new("losetup")
                .args(["--find", "--show"])
                .arg(&image)
                .output()
                .unwrap();
            attempts += 1;
            if out.status.success() || attempts == 5 {
                break out;
            }
            std::thread::sleep(std::time::Duration::from_millis(200 * attempts));
        };
        assert!(losetup.status.success(), "losetup: {losetup:?}");
        let device = String::from_utf8(losetup.stdout)
            .unwrap()
            .trim()
            .to_string();
        let share = Share {
            dir,
            device,
            fs_type: fs_type.to_string(),
        };
        std::fs::create_dir(share.view()).unwrap();
        let mount = Command::new("mount")
            .args(["-t", fs_type, &share.device])
            .arg(share.view())
            .output()
            .unwrap();
        assert!(mount.status.success(), "mount: {mount:?}");
        share
    }

    /// The test's own view of the share's root.
    pub fn view(&self) -> PathBuf {
        self.dir.path().join("view")
    }

    /// What is at the share root, apart from ext4's lost+found.
    pub fn root_entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.view())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "lost+found")
            .collect();
        names.sort();
        names
    }

    pub fn params(&self, extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut p: HashMap<String, String> = [
            ("type", "shared"),
            ("source", self.device.as_str()),
            ("fsType", self.fs_type.as_str()),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            p.insert(k.to_string(), v.to_string());
        }
        p
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(self.view(), rustix::mount::UnmountFlags::DETACH);
        // Busy (a driver's mount left by a failed test): the kernel frees it once unmounted.
        let _ = Command::new("losetup").args(["-d", &self.device]).output();
    }
}
