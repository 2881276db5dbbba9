//! Reading the mount table (`/proc/self/mountinfo`) to find bind mounts of our directories,
//! for start-up reconciliation and operator checks.

use std::path::{Path, PathBuf};

/// One line of the mount table, reduced to what we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    /// The directory of the filesystem that is mounted (not `/` for bind mounts).
    pub root: PathBuf,
    /// `major:minor` of the filesystem.
    pub major_minor: String,
    pub fs_type: String,
    /// Per-superblock options (`prjquota`, `errors=remount-ro`, ...), keys only.
    pub super_options: Vec<String>,
}

/// Reads this process's mount table.
pub fn read() -> std::io::Result<Vec<MountEntry>> {
    let infos = procfs::process::Process::myself()
        .and_then(|p| p.mountinfo())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(infos
        .into_iter()
        .map(|m| MountEntry {
            mount_point: m.mount_point,
            root: PathBuf::from(m.root),
            major_minor: m.majmin,
            fs_type: m.fs_type,
            super_options: m.super_options.into_keys().collect(),
        })
        .collect())
}

/// The mount that contains `path` (the entry with the longest mount point prefix; the last one
/// listed wins among equals, as the kernel stacks later mounts on top).
pub fn containing<'a>(entries: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    entries
        .iter()
        .filter(|e| path.starts_with(&e.mount_point))
        .max_by_key(|e| e.mount_point.components().count())
}

/// Every mount whose mounted tree is exactly the directory `dir` (i.e. bind mounts of it),
/// excluding `dir`'s own location.
pub fn bind_mounts_of<'a>(entries: &'a [MountEntry], dir: &Path) -> Vec<&'a MountEntry> {
    let Some(home) = containing(entries, dir) else {
        return Vec::new();
    };
    let Ok(inside) = dir.strip_prefix(&home.mount_point) else {
        return Vec::new();
    };
    let root = home.root.join(inside);
    entries
        .iter()
        .filter(|e| e.major_minor == home.major_minor && e.root == root && e.mount_point != dir)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(mp: &str, root: &str, mm: &str) -> MountEntry {
        MountEntry {
            mount_point: mp.into(),
            root: root.into(),
            major_minor: mm.into(),
            fs_type: "ext4".into(),
            super_options: vec![],
        }
    }

    #[test]
    fn finds_bind_mounts_of_a_directory() {
        let table = vec![
            entry("/", "/", "8:1"),
            entry("/data", "/", "8:2"),
            entry("/var/lib/kubelet/pods/p/mount", "/volumes/v1", "8:2"),
            entry("/var/lib/kubelet/pods/q/mount", "/volumes/v2", "8:2"),
            entry("/other", "/volumes/v1", "8:1"),
        ];
        let found = bind_mounts_of(&table, Path::new("/data/volumes/v1"));
        assert_eq!(found.len(), 1);
        assert_eq!(
            found[0].mount_point,
            PathBuf::from("/var/lib/kubelet/pods/p/mount")
        );
        assert_eq!(
            containing(&table, Path::new("/data/x"))
                .unwrap()
                .mount_point,
            PathBuf::from("/data")
        );
    }
}
