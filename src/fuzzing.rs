//! Invariant checks over the request validation that stands between a CSI request and the
//! filesystem: volume ID parsing, name checks, StorageClass parameters, mount flags and kubelet
//! path confinement. Each check takes arbitrary bytes, runs the real validator on them and
//! panics if an accepted input breaks what the rest of the driver relies on (an ID usable as a
//! file name, a path that stays under its root, only allow-listed mount options).
//!
//! The cargo-fuzz targets in `fuzz/` call these, and tests/fuzz_regressions.rs replays the
//! kept corpus through them in every `cargo test`, so a case the fuzzer once found stays fixed.

use std::collections::BTreeMap;
use std::path::Path;

use crate::engine::ids::{self, KNOWN_BACKENDS, MAX_NAME_BYTES, VolumeId};
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
            ] {
                check(input);
            }
        }
    }
}
