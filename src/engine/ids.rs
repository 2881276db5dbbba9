//! Volume IDs and names.
//!
//! A volume ID is `<backend>-<32 hex digits>`, where the digits are the first 128 bits of the
//! SHA-256 of the volume name. Deriving the ID from the name makes a CreateVolume retried after a
//! crash land on the same storage instead of leaking a second copy, and the fixed shape lets
//! every call check an ID before it is used anywhere near a path. Shared volumes' IDs also carry
//! their share (see `backend::shared::spec`) and are validated field by field.

use std::fmt;

use sha2::{Digest, Sha256};

/// CSI's size limit for names and IDs.
pub const MAX_NAME_BYTES: usize = 128;

/// Backends whose IDs this build understands.
pub const KNOWN_BACKENDS: &[&str] = &["dir", "loop", "shared"];

const HEX_DIGITS: usize = 32;

/// A syntactically valid volume ID of ours.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId(String);

/// Why a string is not one of our volume IDs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Not something we could ever have issued (unknown backend, wrong length, bad digits).
    #[error("{0:?} is not a k8scsi volume ID")]
    Foreign(String),
    /// Malformed in a way no CO should ever send: oversized, NUL or control characters.
    #[error("volume ID is malformed: {0}")]
    Malformed(&'static str),
}

impl VolumeId {
    /// The ID a volume named `name` gets on `backend`.
    pub fn for_name(backend: &str, name: &str) -> VolumeId {
        let digest = Sha256::digest(name.as_bytes());
        let mut id = String::with_capacity(backend.len() + 1 + HEX_DIGITS);
        id.push_str(backend);
        id.push('-');
        for byte in &digest[..HEX_DIGITS / 2] {
            id.push_str(&format!("{byte:02x}"));
        }
        VolumeId(id)
    }

    /// Parses a request's volume ID.
    pub fn parse(raw: &str) -> Result<VolumeId, IdError> {
        if raw.len() > MAX_NAME_BYTES {
            return Err(IdError::Malformed("longer than 128 bytes"));
        }
        if raw.chars().any(char::is_control) {
            return Err(IdError::Malformed("contains NUL or control characters"));
        }
        let foreign = || IdError::Foreign(raw.to_string());
        let (backend, digits) = raw.split_once('-').ok_or_else(foreign)?;
        if backend == crate::backend::shared::spec::BACKEND {
            // `shared-<hash>-<share>`: the share part is decoded and validated in full.
            return crate::backend::shared::spec::parse_id_tail(digits)
                .map(|_| VolumeId(raw.to_string()))
                .map_err(|_| foreign());
        }
        if !KNOWN_BACKENDS.contains(&backend)
            || digits.len() != HEX_DIGITS
            || !digits
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(foreign());
        }
        Ok(VolumeId(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The backend part of the ID.
    pub fn backend(&self) -> &str {
        self.0.split_once('-').map(|(b, _)| b).unwrap_or_default()
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A syntactically valid snapshot ID of ours: `snap-<backend>-<32 hex digits>`, the digits
/// derived from the snapshot name as volume IDs are from volume names, so a CreateSnapshot
/// retried after a crash lands on the same storage. The backend is the source volume's: a
/// snapshot lives next to the volumes it can be restored into. Snapshots of shared volumes live
/// on the volume's share and their IDs carry it: `snap-shared-<15 hex digits>-<share>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotId(String);

const SNAPSHOT_PREFIX: &str = "snap-";

impl SnapshotId {
    /// The ID a snapshot named `name` of a volume on `backend` gets.
    pub fn for_name(backend: &str, name: &str) -> SnapshotId {
        SnapshotId(format!(
            "{SNAPSHOT_PREFIX}{}",
            VolumeId::for_name(backend, name)
        ))
    }

    /// The ID a snapshot named `name` of volume `source` gets. A shared volume's snapshot
    /// lives on the volume's share, so its ID carries the share the way the volume ID does
    /// (see `backend::shared::spec::snapshot_id`); other backends' IDs derive from the name.
    pub fn for_source(source: &VolumeId, name: &str) -> SnapshotId {
        if source.backend() == crate::backend::shared::spec::BACKEND
            && let Some(id) = crate::backend::shared::spec::snapshot_id(name, source.as_str())
        {
            return SnapshotId(format!("{SNAPSHOT_PREFIX}{id}"));
        }
        SnapshotId::for_name(source.backend(), name)
    }

    /// Parses a request's snapshot ID, with the same rules as [`VolumeId::parse`].
    pub fn parse(raw: &str) -> Result<SnapshotId, IdError> {
        if raw.len() > MAX_NAME_BYTES {
            return Err(IdError::Malformed("longer than 128 bytes"));
        }
        if raw.chars().any(char::is_control) {
            return Err(IdError::Malformed("contains NUL or control characters"));
        }
        let rest = raw
            .strip_prefix(SNAPSHOT_PREFIX)
            .ok_or_else(|| IdError::Foreign(raw.to_string()))?;
        let foreign = || IdError::Foreign(raw.to_string());
        match rest.split_once('-') {
            // `shared-<hash>-<share>`, with the share decoded and validated in full.
            Some((backend, tail)) if backend == crate::backend::shared::spec::BACKEND => {
                crate::backend::shared::spec::parse_snapshot_id_tail(tail)
                    .map_err(|_| foreign())?;
            }
            _ => {
                VolumeId::parse(rest).map_err(|_| foreign())?;
            }
        }
        Ok(SnapshotId(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The backend holding the snapshot.
    pub fn backend(&self) -> &str {
        self.0[SNAPSHOT_PREFIX.len()..]
            .split_once('-')
            .map(|(b, _)| b)
            .unwrap_or_default()
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Checks a CO-supplied name: non-empty, within CSI's 128-byte limit, no NUL or control
/// characters. Names are never used in paths, so any other character is fine.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("must not be empty");
    }
    if name.len() > MAX_NAME_BYTES {
        return Err("is longer than 128 bytes");
    }
    if name.chars().any(char::is_control) {
        return Err("contains NUL or control characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_derived_from_names_and_round_trip() {
        let a = VolumeId::for_name("dir", "pvc-1");
        assert_eq!(a, VolumeId::for_name("dir", "pvc-1"));
        assert_ne!(a, VolumeId::for_name("dir", "pvc-2"));
        assert_eq!(a.as_str().len(), 4 + 32);
        assert_eq!(VolumeId::parse(a.as_str()).unwrap(), a);
        assert_eq!(a.backend(), "dir");
    }

    #[test]
    fn hostile_ids_are_refused() {
        for raw in [
            "",
            "../../etc",
            "dir-../../../../etc/passwd",
            "dir-0123456789ABCDEF0123456789abcdef",
            "zzz-0123456789abcdef0123456789abcdef",
            "dir-0123456789abcdef0123456789abcde",
            "/dir-0123456789abcdef0123456789abcdef",
        ] {
            assert!(
                matches!(VolumeId::parse(raw), Err(IdError::Foreign(_))),
                "{raw}"
            );
        }
        assert!(matches!(
            VolumeId::parse("a\0b"),
            Err(IdError::Malformed(_))
        ));
        assert!(matches!(
            VolumeId::parse(&"a".repeat(129)),
            Err(IdError::Malformed(_))
        ));
    }

    #[test]
    fn snapshot_ids_have_their_own_shape() {
        let s = SnapshotId::for_name("loop", "snap-1");
        assert_eq!(s, SnapshotId::for_name("loop", "snap-1"));
        assert_eq!(s.backend(), "loop");
        assert_eq!(SnapshotId::parse(s.as_str()).unwrap(), s);
        let v = VolumeId::for_name("loop", "snap-1");
        assert!(matches!(
            SnapshotId::parse(v.as_str()),
            Err(IdError::Foreign(_))
        ));
        assert!(matches!(
            VolumeId::parse(s.as_str()),
            Err(IdError::Foreign(_))
        ));
        for raw in [
            "snap-",
            "snap-../x",
            "snap-zzz-0123456789abcdef0123456789abcdef",
        ] {
            assert!(
                matches!(SnapshotId::parse(raw), Err(IdError::Foreign(_))),
                "{raw}"
            );
        }
        assert!(matches!(
            SnapshotId::parse("snap-\0"),
            Err(IdError::Malformed(_))
        ));
    }

    #[test]
    fn shared_snapshot_ids_carry_the_share_and_parse_strictly() {
        use crate::backend::shared::spec::{ShareRef, volume_id};
        let share = ShareRef {
            fs_type: "nfs".into(),
            source: "nfs.example.com:/exports/k8s".into(),
            options: vec!["hard".into()],
        };
        let volume = VolumeId::parse(&volume_id("pvc-1", &share).unwrap()).unwrap();
        let s = SnapshotId::for_source(&volume, "snap-1");
        assert_eq!(s, SnapshotId::for_source(&volume, "snap-1"));
        assert_ne!(s, SnapshotId::for_source(&volume, "snap-2"));
        assert!(s.as_str().starts_with("snap-shared-"), "{s}");
        assert_eq!(s.backend(), "shared");
        assert_eq!(SnapshotId::parse(s.as_str()).unwrap(), s);
        // A shared volume ID behind `snap-` is not a snapshot ID (the hash is shorter).
        assert!(matches!(
            SnapshotId::parse(&format!("snap-{volume}")),
            Err(IdError::Foreign(_))
        ));
        assert!(matches!(
            SnapshotId::parse("snap-shared-0123456789abcde-Li4vZXRj"),
            Err(IdError::Foreign(_))
        ));
        // Other backends keep their shape.
        let dir = VolumeId::for_name("dir", "pvc-1");
        assert_eq!(
            SnapshotId::for_source(&dir, "snap-1"),
            SnapshotId::for_name("dir", "snap-1")
        );
    }

    #[test]
    fn names_follow_csi_limits() {
        assert!(check_name("pvc-123").is_ok());
        assert!(check_name(&"x".repeat(128)).is_ok());
        assert!(check_name(&"x".repeat(129)).is_err());
        assert!(check_name("").is_err());
        assert!(check_name("a\0b").is_err());
        assert!(check_name("../../etc").is_ok(), "names never touch paths");
    }
}
