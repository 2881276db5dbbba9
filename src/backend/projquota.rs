//! Project quotas: how the `dir` backend enforces capacity on ext4 and XFS filesystems mounted
//! with project quota support (`prjquota`).
//!
//! Each volume directory gets a project ID (derived from its volume ID) and a hard block limit
//! for that project, so writing past the size fails with EDQUOT. The standard tools do the work
//! (`xfs_quota` from xfsprogs; `chattr` from e2fsprogs and `setquota` from quota for ext4),
//! called with argument vectors built only from numbers and paths of our own.
//!
//! The kernel this was developed on has no project quota support (`CONFIG_QUOTA` is off and XFS
//! refuses `prjquota`), so only the command construction and detection are tested here; the
//! real round trip in tests/capacity.rs skips with that reason and runs where the kernel
//! allows it.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::BackendError;
use crate::engine::ids::VolumeId;
use crate::mount::mountinfo::{self, MountEntry};

/// Filesystems whose project quotas we drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaFs {
    Ext4,
    Xfs,
}

/// Project quota enforcement on the filesystem holding the data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectQuota {
    pub fs: QuotaFs,
    /// Mount point of that filesystem (the tools address the filesystem by it).
    pub mount_point: PathBuf,
}

/// Project IDs we hand out start here, above the small IDs administrators assign by hand.
const FIRST_PROJECT_ID: u32 = 1 << 20;

/// The project ID of a volume: stable, derived from the volume ID, never below
/// [`FIRST_PROJECT_ID`].
pub fn project_id(id: &VolumeId) -> u32 {
    let digits = id.as_str().rsplit('-').next().unwrap_or_default();
    let hash = u32::from_str_radix(&digits[..8.min(digits.len())], 16).unwrap_or(0);
    FIRST_PROJECT_ID + hash % (u32::MAX / 2 - FIRST_PROJECT_ID)
}

/// Whether the mount entry enforces project quotas.
fn enforcing(entry: &MountEntry) -> Option<QuotaFs> {
    let has = |o: &str| entry.super_options.iter().any(|s| s == o);
    match entry.fs_type.as_str() {
        "ext4" if has("prjquota") => Some(QuotaFs::Ext4),
        // `pqnoenforce` only accounts; it would not stop a pod from writing past its size.
        "xfs" if has("prjquota") || has("pquota") => Some(QuotaFs::Xfs),
        _ => None,
    }
}

/// Detects project quota enforcement for `path` from the mount table.
pub fn detect(path: &Path) -> Option<ProjectQuota> {
    let table = mountinfo::read().ok()?;
    let entry = mountinfo::containing(&table, path)?;
    Some(ProjectQuota {
        fs: enforcing(entry)?,
        mount_point: entry.mount_point.clone(),
    })
}

/// The commands that give `dir` project `project` with a hard limit of `bytes`.
fn limit_commands(quota: &ProjectQuota, dir: &Path, project: u32, bytes: u64) -> Vec<Vec<String>> {
    let mount = quota.mount_point.to_string_lossy().into_owned();
    let dir = dir.to_string_lossy().into_owned();
    match quota.fs {
        QuotaFs::Xfs => vec![
            vec![
                "xfs_quota".into(),
                "-x".into(),
                "-c".into(),
                format!("project -s -p {dir} {project}"),
                mount.clone(),
            ],
            vec![
                "xfs_quota".into(),
                "-x".into(),
                "-c".into(),
                format!("limit -p bhard={bytes} {project}"),
                mount,
            ],
        ],
        QuotaFs::Ext4 => vec![
            // +P: files created inside inherit the project.
            vec![
                "chattr".into(),
                "-p".into(),
                project.to_string(),
                "+P".into(),
                dir,
            ],
            // setquota counts 1 KiB blocks: round the size up.
            vec![
                "setquota".into(),
                "-P".into(),
                project.to_string(),
                "0".into(),
                bytes.div_ceil(1024).to_string(),
                "0".into(),
                "0".into(),
                mount,
            ],
        ],
    }
}

fn run(argv: &[String], path: &Path) -> Result<(), BackendError> {
    let output = Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|e| BackendError::io("project quota", path, e))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(BackendError::Command {
            command: argv.join(" "),
            path: path.to_path_buf(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// Assigns `dir` (an empty, new volume directory) its project and hard limit.
pub fn set_limit(
    quota: &ProjectQuota,
    id: &VolumeId,
    dir: &Path,
    bytes: u64,
) -> Result<(), BackendError> {
    let project = project_id(id);
    for argv in limit_commands(quota, dir, project, bytes) {
        run(&argv, dir)?;
    }
    Ok(())
}

/// Lifts the limit of a volume's project (before its directory is removed).
pub fn clear_limit(quota: &ProjectQuota, id: &VolumeId, dir: &Path) -> Result<(), BackendError> {
    let project = project_id(id);
    // The last command of each pair sets the limit; a zero limit means none.
    let commands = limit_commands(quota, dir, project, 0);
    run(commands.last().expect("two commands"), dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fs: &str, options: &[&str]) -> MountEntry {
        MountEntry {
            mount_point: "/data".into(),
            root: "/".into(),
            major_minor: "8:1".into(),
            fs_type: fs.into(),
            super_options: options.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn detects_enforcing_mounts_only() {
        assert_eq!(
            enforcing(&entry("ext4", &["rw", "prjquota"])),
            Some(QuotaFs::Ext4)
        );
        assert_eq!(enforcing(&entry("xfs", &["pquota"])), Some(QuotaFs::Xfs));
        assert_eq!(enforcing(&entry("xfs", &["prjquota"])), Some(QuotaFs::Xfs));
        assert_eq!(enforcing(&entry("xfs", &["pqnoenforce"])), None);
        assert_eq!(enforcing(&entry("ext4", &["rw"])), None);
        assert_eq!(enforcing(&entry("btrfs", &["prjquota"])), None);
    }

    #[test]
    fn project_ids_are_stable_and_out_of_the_admin_range() {
        let a = VolumeId::for_name("dir", "pvc-1");
        assert_eq!(project_id(&a), project_id(&a));
        assert_ne!(
            project_id(&a),
            project_id(&VolumeId::for_name("dir", "pvc-2"))
        );
        assert!(project_id(&a) >= FIRST_PROJECT_ID);
        assert!(project_id(&a) < u32::MAX / 2);
    }

    #[test]
    fn builds_the_tool_commands() {
        let xfs = ProjectQuota {
            fs: QuotaFs::Xfs,
            mount_point: "/data".into(),
        };
        let dir = Path::new("/data/volumes/dir-x");
        assert_eq!(
            limit_commands(&xfs, dir, 1048577, 16 << 20),
            vec![
                vec![
                    "xfs_quota",
                    "-x",
                    "-c",
                    "project -s -p /data/volumes/dir-x 1048577",
                    "/data"
                ],
                vec![
                    "xfs_quota",
                    "-x",
                    "-c",
                    "limit -p bhard=16777216 1048577",
                    "/data"
                ],
            ]
        );
        let ext4 = ProjectQuota {
            fs: QuotaFs::Ext4,
            mount_point: "/data".into(),
        };
        assert_eq!(
            limit_commands(&ext4, dir, 1048577, 1000),
            vec![
                vec!["chattr", "-p", "1048577", "+P", "/data/volumes/dir-x"],
                vec!["setquota", "-P", "1048577", "0", "1", "0", "0", "/data"],
            ]
        );
    }
}
