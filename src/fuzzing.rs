//! Invariant checks over the request validation that stands between a CSI request and the
//! filesystem: volume and snapshot ID parsing, name checks, StorageClass parameters, mount
//! flags, kubelet path confinement, and the shared backend's share references (carried in its
//! IDs) and subDir templates. Each check takes arbitrary bytes, runs the real validator on them and
//! panics if an accepted input breaks what the rest of the driver relies on (an ID usable as a
//! file name, a path that stays under its root, only allow-listed mount options).
//!
//! The cargo-fuzz targets in `fuzz/` call these, and tests/fuzz_regressions.rs replays the
//! kept corpus through them in every `cargo test`, so a case the fuzzer once found stays fixed.

use std::collections::BTreeMap;
use std::path::Path;

use crate::backend::shared::spec::{self, OnDelete, ShareRef};
use crate::engine::ids::{self, KNOWN_BACKENDS, MAX_NAME_BYTES, SnapshotId, VolumeId};
use crate::engine::params;
use crate::mount::MountOptions;
use crate::mount::paths::ConfinedPath;

/// The kubelet root the path checks confine to.
pub const FUZZ_ROOT: &str = "/var/lib/kubelet";

/// One invariant check over arbitrary bytes.
pub type Check = fn(&[u8]);

/// The checks, by the name of their fuzz target and corpus directory.
pub const TARGETS: &[(&str, Check)] = &[
    ("volume_id", check_volume_id),
    ("name", check_name),
    ("parameters", check_parameters),
    ("mount_flags", check_mount_flags),
    ("confined_path", check_confined_path),
    ("snapshot_id", check_snapshot_id),
    ("shared_id", check_shared_id),
    ("shared_parameters", check_shared_parameters),
];

fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

/// Whether `s` is safe as one file name: what IDs become under the data directory.
fn is_safe_file_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && !s.contains('/')
        && !s.chars().any(char::is_control)
        && s.len() <= MAX_NAME_BYTES
}

/// A parsed volume ID is a safe file name of a known backend and prints as it was given.
pub fn check_volume_id(data: &[u8]) {
    let raw = text(data);
    if let Ok(id) = VolumeId::parse(&raw) {
        assert_eq!(id.as_str(), raw, "a parsed ID must not be rewritten");
        assert!(
            is_safe_file_name(id.as_str()),
            "unsafe ID accepted: {raw:?}"
        );
        assert!(KNOWN_BACKENDS.contains(&id.backend()), "{raw:?}");
    }
}

/// Any accepted name yields IDs that parse back and are safe file names.
pub fn check_name(data: &[u8]) {
    let name = text(data);
    if ids::check_name(&name).is_ok() {
        assert!(!name.is_empty() && name.len() <= MAX_NAME_BYTES && !name.contains('\0'));
        // Shared volume IDs also carry their share, so the backend builds them (its own
        // checks live in `backend::shared::spec`); the others derive from the name alone.
        for backend in KNOWN_BACKENDS.iter().filter(|b| **b != "shared") {
            let id = VolumeId::for_name(backend, &name);
            assert_eq!(
                VolumeId::parse(id.as_str()).as_ref(),
                Ok(&id),
                "{name:?}: its ID does not parse back"
            );
            assert!(is_safe_file_name(id.as_str()));
        }
    }
}

/// Parameters as `key=value` lines: accepted ones name a known backend, carry no NUL and stay
/// within CSI's map size.
pub fn check_parameters(data: &[u8]) {
    let raw = text(data);
    let map: BTreeMap<String, String> = raw
        .split('\n')
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if let Ok(parsed) = params::parse(&map) {
        assert!(
            KNOWN_BACKENDS.contains(&parsed.backend.as_str()),
            "{:?}",
            parsed.backend
        );
        assert!(
            map.iter()
                .all(|(k, v)| !k.contains('\0') && !v.contains('\0'))
        );
        assert!(map.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() <= params::MAX_MAP_BYTES);
    }
}

/// Options that may reach a mount call.
const ALLOWED_FLAGS: &[&str] = &[
    "",
    "defaults",
    "bind",
    "rw",
    "ro",
    "nosuid",
    "nodev",
    "noexec",
    "noatime",
    "relatime",
    "strictatime",
    "nodiratime",
    "sync",
    "dirsync",
];

/// Mount flags, one per line: accepted lists consist of allow-listed options only (no
/// `source=`, `remount`, `dev`, `exec` or anything else smuggled through a comma).
pub fn check_mount_flags(data: &[u8]) {
    let raw = text(data);
    let flags: Vec<String> = raw.split('\n').map(str::to_string).collect();
    if MountOptions::from_flags(&flags, false).is_ok() {
        for piece in flags.iter().flat_map(|f| f.split(',')) {
            assert!(
                ALLOWED_FLAGS.contains(&piece.trim()),
                "mount option {piece:?} accepted"
            );
        }
    }
}

/// An accepted path is the normalised spelling of a path strictly below the root, and every
/// component is a plain name.
pub fn check_confined_path(data: &[u8]) {
    let raw = text(data);
    let root = Path::new(FUZZ_ROOT);
    if let Ok(path) = ConfinedPath::new(root, &raw) {
        let absolute = path.absolute();
        assert!(
            absolute.starts_with(root) && absolute != root,
            "{raw:?} escapes"
        );
        assert_eq!(path.as_string(), raw, "accepted path is not normalised");
        for c in path
            .parent_components()
            .iter()
            .chain([&path.leaf().to_string()])
        {
            assert!(
                !c.is_empty() && c != "." && c != ".." && !c.contains('/') && !c.contains('\0'),
                "{raw:?}: component {c:?}"
            );
        }
    }
}

/// Mount options that would change what is mounted or how, or weaken the node: never allowed
/// on a share's command line whatever the allow-list says (an oracle independent of it).
const NEVER_SHARE_OPTIONS: &[&str] = &[
    "bind",
    "rbind",
    "remount",
    "move",
    "loop",
    "offset",
    "sizelimit",
    "suid",
    "dev",
    "exec",
    "helper",
    "context",
    "fscontext",
    "defcontext",
    "rootcontext",
    "username",
    "password",
    "credentials",
    "user",
    "users",
    "owner",
    "group",
];

/// What every accepted share reference guarantees: it validates again, it is mounted with
/// `nosuid,nodev` and allow-listed options only, the source is one argument after `--` that
/// cannot be read as an option and does not climb with `..`, and it survives the trip through a
/// volume ID unchanged.
fn check_share(share: &ShareRef) {
    assert_eq!(share.validate(), Ok(()), "{share:?}");
    let source = share.source.as_str();
    assert!(
        !source.is_empty()
            && !source.starts_with('-')
            && !source.chars().any(|c| c.is_whitespace() || c.is_control()),
        "{share:?}: source"
    );
    // Where `..` would climb depends on how the filesystem reads its source: local paths and
    // CIFS shares are split at `/` only (`/:..` is a plain directory name); an NFS export is
    // the path after the host (`host:` or `[v6]:`), split at `/` (`/..:x` is a plain name);
    // CephFS and GlusterFS sources also at colons and monitor-list commas.
    let (path, separators): (&str, &[char]) = match share.fs_type.as_str() {
        "nfs" | "nfs4" => {
            let path = match source.strip_prefix('[') {
                Some(v6) => v6.split_once("]:").map(|(_, p)| p),
                None => source.split_once(':').map(|(_, p)| p),
            };
            let path = path.unwrap_or_else(|| panic!("{share:?}: NFS source without a host"));
            (path, &['/'])
        }
        "cephfs" | "glusterfs" => (source, &['/', ',', ':']),
        _ => (source, &['/']),
    };
    assert!(
        !path.split(separators).any(|p| p == ".."),
        "{share:?}: source climbs with '..'"
    );
    let target = Path::new("/k8scsi-fuzz-target");
    let args = share.mount_args(target);
    let n = args.len();
    assert!(n >= 4, "{args:?}");
    assert_eq!(
        args[n - 3..],
        [
            "--".to_string(),
            share.source.clone(),
            target.display().to_string()
        ],
        "{args:?}"
    );
    if share.fs_type == "none" {
        assert_eq!(args[0], "--bind", "{args:?}");
        assert_eq!(n, 4, "{args:?}");
        assert!(
            source.starts_with('/'),
            "{share:?}: bind source is not absolute"
        );
    } else {
        assert_eq!(args[..3], ["-t", share.fs_type.as_str(), "-o"], "{args:?}");
        assert_eq!(n, 7, "{args:?}");
        let options: Vec<&str> = args[3].split(',').collect();
        assert_eq!(options[..2], ["nosuid", "nodev"], "{args:?}");
        for option in options {
            let (key, value) = option.split_once('=').unwrap_or((option, ""));
            assert!(
                !key.is_empty()
                    && key
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c == '_' || c == '-')
                    && !key.starts_with("x-")
                    && !NEVER_SHARE_OPTIONS.contains(&key),
                "{args:?}: option {option:?}"
            );
            assert!(
                value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".:_-".contains(c)),
                "{args:?}: option {option:?}"
            );
        }
    }
    assert!(
        share.key().len() == 16 && share.key().bytes().all(|b| b.is_ascii_hexdigit()),
        "{share:?}: key"
    );
    if let Ok(raw) = spec::volume_id("fuzz", share) {
        assert!(raw.len() <= MAX_NAME_BYTES, "{raw:?}");
        let id = VolumeId::parse(&raw).unwrap_or_else(|e| panic!("{raw:?}: {e}"));
        let tail = &id.as_str()[spec::BACKEND.len() + 1..];
        assert_eq!(
            spec::parse_id_tail(tail).as_ref(),
            Ok(share),
            "{raw:?} does not carry its share"
        );
        let snapshot = SnapshotId::for_source(&id, "fuzz-snapshot");
        assert_eq!(SnapshotId::parse(snapshot.as_str()).as_ref(), Ok(&snapshot));
        assert_eq!(snapshot.backend(), spec::BACKEND, "{snapshot:?}");
    }
}

/// The encoded share part of a shared ID (after `<backend>-<hash>-`).
fn encoded_share(tail: &str) -> &str {
    tail.split_once('-').map(|(_, e)| e).unwrap_or_default()
}

/// `raw` as a snapshot ID: if accepted it is printed as given, a safe file name of a known
/// backend, never also a volume ID; a shared one carries a share that passes [`check_share`]
/// and is not a volume ID tail.
fn check_snapshot_id_str(raw: &str) {
    let Ok(id) = SnapshotId::parse(raw) else {
        return;
    };
    assert_eq!(id.as_str(), raw, "a parsed ID must not be rewritten");
    assert!(
        is_safe_file_name(raw),
        "unsafe snapshot ID accepted: {raw:?}"
    );
    assert!(KNOWN_BACKENDS.contains(&id.backend()), "{raw:?}");
    assert!(
        VolumeId::parse(raw).is_err(),
        "{raw:?} is both a snapshot and a volume ID"
    );
    if id.backend() == spec::BACKEND {
        let tail = &raw["snap-shared-".len()..];
        let share = spec::parse_snapshot_id_tail(tail)
            .unwrap_or_else(|e| panic!("{raw:?} parsed, its share does not: {e}"));
        assert!(spec::parse_id_tail(tail).is_err(), "{raw:?}");
        check_share(&share);
    }
}

/// Snapshot IDs: the bytes as an ID, and as the share reference text inside a shared snapshot
/// ID (so the fuzzer reaches the share validation without having to find base64 itself).
pub fn check_snapshot_id(data: &[u8]) {
    check_snapshot_id_str(&text(data));
    check_snapshot_id_str(&format!(
        "snap-shared-{}-{}",
        "0".repeat(15),
        spec::b64_encode(data)
    ));
}

/// `raw` as a volume ID, with the shared backend's extra guarantees: the share it carries
/// passes [`check_share`] and is spelt in its one canonical encoding.
fn check_shared_id_str(raw: &str) {
    let Ok(id) = VolumeId::parse(raw) else {
        return;
    };
    check_volume_id(raw.as_bytes());
    if id.backend() != spec::BACKEND {
        return;
    }
    let tail = &raw[spec::BACKEND.len() + 1..];
    let share = spec::parse_id_tail(tail)
        .unwrap_or_else(|e| panic!("{raw:?} parsed, its share does not: {e}"));
    check_share(&share);
    let rebuilt = spec::volume_id("fuzz", &share)
        .unwrap_or_else(|e| panic!("{raw:?} carries a share no ID can carry: {e}"));
    assert_eq!(
        encoded_share(&rebuilt[spec::BACKEND.len() + 1..]),
        encoded_share(tail),
        "{raw:?}: the share has a second spelling"
    );
}

/// Shared volume IDs: the bytes as an ID, and as the share reference text inside one.
pub fn check_shared_id(data: &[u8]) {
    check_shared_id_str(&text(data));
    check_shared_id_str(&format!(
        "shared-{}-{}",
        "0".repeat(20),
        spec::b64_encode(data)
    ));
}

/// Whether `c` is a directory component a volume may be created under: no separator, not
/// hidden (so never `.`, `..` or the backend's `.k8scsi`), no NUL.
fn is_plain_component(c: &str) -> bool {
    !c.is_empty() && !c.starts_with('.') && !c.contains(['/', '\0']) && c.len() <= 255
}

/// Shared-volume StorageClass parameters as lines: `key=value` (provisioner metadata keys
/// included), `-o<flags>` for a mountOptions entry, `@<name>` for the volume name. Whatever
/// the parameter check accepts, the backend's later steps accept too (no half-created volume
/// over a value only the backend refuses), the share passes [`check_share`], and the rendered
/// directory is a plain relative path of at most 16 components that stays below the share root.
pub fn check_shared_parameters(data: &[u8]) {
    let raw = text(data);
    let mut map = BTreeMap::new();
    let mut flags = Vec::new();
    let mut name = "pvc-fuzz".to_string();
    for line in raw.split('\n') {
        if let Some(f) = line.strip_prefix("-o") {
            flags.push(f.to_string());
        } else if let Some(n) = line.strip_prefix('@') {
            name = n.to_string();
        } else if let Some((k, v)) = line.split_once('=') {
            map.insert(k.to_string(), v.to_string());
        }
    }
    let Ok(parsed) = params::parse(&map) else {
        return;
    };
    if parsed.backend != spec::BACKEND {
        return;
    }
    let defining = &parsed.defining;
    let get = |k: &str| defining.get(k).map(String::as_str);
    assert!(
        OnDelete::parse(get(spec::ON_DELETE)).is_ok(),
        "{map:?}: onDelete passed the parameter check only"
    );
    let permissions = spec::parse_permissions(get(spec::MOUNT_PERMISSIONS))
        .unwrap_or_else(|e| panic!("{map:?}: mountPermissions passed the parameter check: {e}"));
    if let Some(mode) = permissions {
        assert!(
            mode & 0o6000 == 0 && mode <= 0o1777,
            "{map:?}: mode {mode:o}"
        );
    }
    ShareRef::from_parameters(defining, &[])
        .unwrap_or_else(|e| panic!("{map:?}: share passed the parameter check only: {e}"));
    if let Ok(share) = ShareRef::from_parameters(defining, &flags) {
        check_share(&share);
    }
    if ids::check_name(&name).is_err() {
        return;
    }
    let Ok(components) = spec::render_subdir(get(spec::SUB_DIR), &parsed.metadata, &name) else {
        return;
    };
    assert!(
        !components.is_empty() && components.len() <= 16,
        "{map:?}: {components:?}"
    );
    for c in &components {
        assert!(is_plain_component(c), "{map:?}: component {c:?}");
    }
    let root = Path::new("/share");
    let dir = components.iter().fold(root.to_path_buf(), |p, c| p.join(c));
    assert!(
        dir.starts_with(root)
            && dir != root
            && dir.components().all(|c| matches!(
                c,
                std::path::Component::RootDir | std::path::Component::Normal(_)
            )),
        "{map:?}: {} leaves the share",
        dir.display()
    );
    assert_eq!(
        spec::check_components(&components),
        Ok(()),
        "{map:?}: a rendered directory fails the marker check"
    );
}

/// Runs the check named `target` (a fuzz target's name) on `data`.
pub fn run(target: &str, data: &[u8]) {
    let (_, check) = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap_or_else(|| panic!("no fuzz target {target:?}"));
    check(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_accept_ordinary_and_hostile_inputs() {
        for (_, check) in TARGETS {
            for input in [
                &b""[..],
                b"dir-0123456789abcdef0123456789abcdef",
                b"../../etc",
                b"/var/lib/kubelet/pods/a/mount",
                b"/var/lib/kubelet/../etc",
                b"type=loop\nallocation=preallocate",
                b"ro,nosuid\nsource=/etc",
                b"\xff\xfe\0",
                b"snap-shared-0123456789abcde-bm9uZQovc3J2Cg",
                b"none\n/srv\nro",
                b"nfs\nnfs.example.com:/exports/k8s\nhard,nfsvers=4.1",
                b"type=shared\nsource=/srv\nfsType=none\nsubDir=${pvc.metadata.name}\n\
                  csi.storage.k8s.io/pvc/name=../x",
                b"type=shared\nserver=nfs.example.com\nshare=/exports\n-ohard,bind",
            ] {
                check(input);
            }
        }
    }
}
