//! What a power loss can do to the volume directories under a path, judged from the filesystem
//! that holds it.
//!
//! A volume directory's creation and removal are made durable by fsyncing the directory that
//! holds it, in the same group commit as the volume's record. On a journaling filesystem (ext3 or
//! ext4 with its journal, XFS, btrfs) that fsync commits the journal transaction that made the
//! directory, so the whole change survives a power loss. Without a journal (ext2, ext4 made with
//! `-O ^has_journal`, FAT) the fsync writes the parent's blocks and inode but not the new
//! directory's own inode: after a power loss the filesystem needs fsck, and a volume created
//! just before can be missing or damaged. Its record survives, and start-up reconciliation
//! reports the mismatch. On tmpfs every volume is gone after a reboot, and a state store there
//! forgets every volume. The server warns about each at start, and `k8scsi doctor` reports them.

use std::path::Path;

/// The filesystem under a path, and whether directory changes there survive a power loss.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durability {
    /// As the mount table names it (`ext4`, `xfs`, `tmpfs`, ...).
    pub fs_type: String,
    /// Why a power loss or reboot can lose volume directories; `None` when it cannot.
    pub weakness: Option<String>,
}

/// Assesses the filesystem holding `path`. `None` when it cannot be identified (the path or
/// the mount table is unreadable).
pub fn assess(path: &Path) -> Option<Durability> {
    let canonical = std::fs::canonicalize(path).ok()?;
    let table = super::mountinfo::read().ok()?;
    let entry = super::mountinfo::containing(&table, &canonical)?;
    let ext4_options = match entry.fs_type.as_str() {
        "ext3" | "ext4" => device_name(&entry.major_minor).and_then(|device| {
            std::fs::read_to_string(format!("/proc/fs/ext4/{device}/options")).ok()
        }),
        _ => None,
    };
    Some(Durability {
        weakness: weakness(&entry.fs_type, ext4_options.as_deref()),
        fs_type: entry.fs_type.clone(),
    })
}

/// Why the state store under `state_dir` would be forgotten at reboot, if it would. Only an
/// in-memory filesystem is a problem there: redb makes its own commits durable with fdatasync
/// of its one file, which needs no journal.
pub fn state_store_weakness(state_dir: &Path) -> Option<String> {
    let fs_type = assess(state_dir)?.fs_type;
    is_in_memory(&fs_type).then(|| {
        format!(
            "the state store is on {fs_type}: after a reboot every volume has lost its record, \
             and reconciliation reports their directories as orphans (it never deletes them); \
             put the state directory on a disk"
        )
    })
}

/// Whether a filesystem of this type lives in memory, so nothing on it survives a reboot.
fn is_in_memory(fs_type: &str) -> bool {
    matches!(fs_type, "tmpfs" | "ramfs")
}

/// The kernel's name of the block device `major:minor` (`vda`, `dm-0`, `loop3`): the name ext4
/// uses under `/proc/fs/ext4`.
fn device_name(major_minor: &str) -> Option<String> {
    let link = std::fs::read_link(Path::new("/sys/dev/block").join(major_minor)).ok()?;
    link.file_name()?.to_str().map(str::to_string)
}

/// `ext4_options` is `/proc/fs/ext4/<device>/options` for ext3 and ext4. It lists `data=ordered`,
/// `data=writeback` or `data=journal` exactly when the filesystem has a journal; when it cannot
/// be read, nothing is claimed.
fn weakness(fs_type: &str, ext4_options: Option<&str>) -> Option<String> {
    const ADVICE: &str = "put the data directory on a journaling filesystem (ext4 with its \
                          journal, XFS or btrfs)";
    let unjournaled = || {
        format!(
            "{fs_type} without a journal: fsync does not make a new volume directory's own \
             inode durable, so after a power loss the filesystem needs fsck and volumes created \
             just before can be missing or damaged (their records survive and start-up \
             reconciliation reports them); {ADVICE}"
        )
    };
    match fs_type {
        _ if is_in_memory(fs_type) => Some(format!(
            "{fs_type} keeps volumes in memory: every volume is lost when the node reboots; \
             {ADVICE}"
        )),
        "ext2" | "vfat" | "msdos" | "exfat" => Some(unjournaled()),
        "ext3" | "ext4" => {
            let journaled = ext4_options?
                .split([',', '\n', ' '])
                .any(|option| option.starts_with("data="));
            (!journaled).then(unjournaled)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Option lists as this machine's kernel printed them (trimmed) for a root ext4 made
    /// without a journal and for a default `mkfs.ext4` image.
    const NO_JOURNAL: &str = "rw\nbsddf\nnogrpid\nblock_validity\ndiscard\ndelalloc\n\
                              nojournal_checksum\nbarrier\nerrors=continue\ncommit=5\n";
    const JOURNALED: &str = "rw\nbsddf\nnogrpid\nblock_validity\nnodiscard\ndelalloc\n\
                             journal_checksum\nbarrier\nerrors=continue\ncommit=5\n\
                             data=ordered\ninode_readahead_blks=32\n";

    #[test]
    fn ext4_is_weak_exactly_when_its_options_name_no_data_mode() {
        let weak = weakness("ext4", Some(NO_JOURNAL)).expect("no journal");
        assert!(weak.starts_with("ext4 without a journal"), "{weak}");
        assert!(weak.contains("XFS or btrfs"), "{weak}");
        assert_eq!(weakness("ext4", Some(JOURNALED)), None);
        assert_eq!(weakness("ext4", Some("rw,data=writeback")), None);
        assert_eq!(weakness("ext3", Some("rw\ndata=journal\n")), None);
        // "nojournal_checksum" is not a data mode.
        assert!(weakness("ext3", Some("nojournal_checksum\n")).is_some());
    }

    #[test]
    fn unreadable_ext4_options_claim_nothing() {
        assert_eq!(weakness("ext4", None), None);
    }

    #[test]
    fn memory_and_journal_less_filesystems_are_weak_and_the_rest_are_not() {
        let tmpfs = weakness("tmpfs", None).unwrap();
        assert!(tmpfs.contains("lost when the node reboots"), "{tmpfs}");
        assert!(weakness("ramfs", None).is_some());
        assert!(is_in_memory("tmpfs") && is_in_memory("ramfs"));
        assert!(!is_in_memory("ext4") && !is_in_memory("xfs"));
        for fs_type in ["ext2", "vfat", "exfat"] {
            let weak = weakness(fs_type, None).unwrap();
            assert!(
                weak.starts_with(&format!("{fs_type} without a journal")),
                "{weak}"
            );
        }
        for fs_type in ["xfs", "btrfs", "zfs", "f2fs", "overlay"] {
            assert_eq!(weakness(fs_type, None), None, "{fs_type}");
        }
    }

    #[test]
    fn assesses_the_filesystem_this_test_runs_on() {
        let here = assess(Path::new(env!("CARGO_MANIFEST_DIR"))).expect("a mounted filesystem");
        assert!(!here.fs_type.is_empty());
        assert_eq!(assess(Path::new("/nonexistent/k8scsi")), None);
    }
}
