//! btrfs subvolumes with qgroup limits: how the `dir` backend enforces capacity when its data
//! directory is on btrfs.
//!
//! Each volume is a subvolume with a referenced-bytes qgroup limit, so writing past the size
//! fails with EDQUOT inside the pod. The `btrfs` tool (btrfs-progs) does the work: its commands
//! are stable, it is what operators use to inspect the result, and every argument we pass is a
//! path we built from a validated volume ID or a number.

use std::path::Path;
use std::process::Command;

use super::BackendError;

/// `f_type` of a btrfs filesystem in `statfs`.
const BTRFS_SUPER_MAGIC: u64 = 0x9123_683E;

/// The inode number of every subvolume's root directory on btrfs.
const SUBVOLUME_ROOT_INODE: u64 = 256;

/// Whether `path` is on btrfs.
pub fn is_btrfs(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|st| st.f_type as u64 == BTRFS_SUPER_MAGIC)
}

/// Whether `path` is the root of a btrfs subvolume.
pub fn is_subvolume(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    is_btrfs(path)
        && std::fs::symlink_metadata(path)
            .is_ok_and(|m| m.is_dir() && m.ino() == SUBVOLUME_ROOT_INODE)
}

fn run(path: &Path, args: &[&str]) -> Result<String, BackendError> {
    let output = Command::new("btrfs")
        .args(args)
        .arg(path)
        .output()
        .map_err(|e| BackendError::io("btrfs", path, e))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(BackendError::Command {
            command: format!("btrfs {}", args.join(" ")),
            path: path.to_path_buf(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// Turns on quota accounting for the filesystem holding `path` (idempotent).
pub fn enable_quota(path: &Path) -> Result<(), BackendError> {
    run(path, &["quota", "enable"]).map(|_| ())
}

/// Creates a subvolume at `path`.
pub fn create_subvolume(path: &Path) -> Result<(), BackendError> {
    run(path, &["subvolume", "create"]).map(|_| ())
}

/// Makes `dst` a snapshot of the subvolume `src` (read-only when `readonly`): O(1), and
/// atomic (the snapshot is the subvolume as of one transaction).
pub fn snapshot_subvolume(src: &Path, dst: &Path, readonly: bool) -> Result<(), BackendError> {
    let mut args = vec!["subvolume", "snapshot"];
    if readonly {
        args.push("-r");
    }
    let output = Command::new("btrfs")
        .args(&args)
        .arg(src)
        .arg(dst)
        .output()
        .map_err(|e| BackendError::io("btrfs", src, e))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(BackendError::Command {
            command: format!("btrfs {} {}", args.join(" "), src.display()),
            path: dst.to_path_buf(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// Deletes the subvolume at `path` and its qgroup, committing before returning so the deletion
/// survives a crash.
pub fn delete_subvolume(path: &Path) -> Result<(), BackendError> {
    let qgroup = qgroup_of(path).ok();
    run(path, &["subvolume", "delete", "--commit-after"])?;
    if let (Some(id), Some(parent)) = (qgroup, path.parent()) {
        // A deleted subvolume's qgroup lingers until removed; it holds no limit of ours.
        let _ = Command::new("btrfs")
            .args(["qgroup", "destroy", &id])
            .arg(parent)
            .output();
    }
    Ok(())
}

/// Sets the referenced-bytes limit of the subvolume at `path`.
pub fn set_limit(path: &Path, bytes: u64) -> Result<(), BackendError> {
    run(path, &["qgroup", "limit", &bytes.to_string()]).map(|_| ())
}

/// The level-0 qgroup ID (`0/<subvolume id>`) of the subvolume at `path`.
fn qgroup_of(path: &Path) -> Result<String, BackendError> {
    let out = run(path, &["inspect-internal", "rootid"])?;
    Ok(format!("0/{}", out.trim()))
}

/// Bytes referenced by the subvolume at `path`, and its limit (`None` when unlimited).
pub fn usage(path: &Path) -> Result<(u64, Option<u64>), BackendError> {
    let qgroup = qgroup_of(path)?;
    let out = run(path, &["qgroup", "show", "-rf", "--raw"])?;
    parse_qgroup_show(&out, &qgroup).ok_or_else(|| BackendError::Command {
        command: "btrfs qgroup show".into(),
        path: path.to_path_buf(),
        stderr: format!("no line for qgroup {qgroup} in: {out}"),
    })
}

/// Parses `btrfs qgroup show -rf --raw` output: `qgroupid referenced exclusive max_rfer ...`.
fn parse_qgroup_show(out: &str, qgroup: &str) -> Option<(u64, Option<u64>)> {
    let fields: Vec<&str> = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.first() == Some(&qgroup))?
        .into_iter()
        .collect();
    let referenced = fields.get(1)?.parse().ok()?;
    let limit = fields.get(3).and_then(|v| v.parse().ok());
    Some((referenced, limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qgroup_show() {
        let out = "Qgroupid    Referenced    Exclusive  Max referenced  Path \n\
                   --------    ----------    ---------  --------------  ---- \n\
                   0/256         10469376     10469376        10485760  v1\n\
                   0/257            16384        16384            none  v2\n";
        assert_eq!(
            parse_qgroup_show(out, "0/256"),
            Some((10469376, Some(10485760)))
        );
        assert_eq!(parse_qgroup_show(out, "0/257"), Some((16384, None)));
        assert_eq!(parse_qgroup_show(out, "0/258"), None);
    }
}
