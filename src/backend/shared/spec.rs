//! What a shared volume is made of, as plain validated data: the share it lives on
//! ([`ShareRef`]), how that share is mounted (the exact `mount` argument vector), the
//! subdirectory a StorageClass template renders to, and the volume ID that carries the share.
//!
//! Everything here is pure so that every rule is unit-tested without root or a server. Every
//! string from a StorageClass or a volume ID passes a strict validator before it can reach a
//! command line or a path; nothing is ever escaped, only accepted or refused.
//!
//! Volume IDs are `shared-<20 hex>-<share>`: 80 bits of SHA-256 of the volume name (the same
//! crash-retry idempotency as the other backends), and the share reference (filesystem type,
//! source and mount options) in unpadded base64url. A controller that restarts anywhere, even on
//! an empty state directory, can mount the share from the ID alone and find the volume's marker
//! there. IDs stay within CSI's 128 bytes, which bounds the share reference to
//! [`MAX_REF_BYTES`] bytes; a longer one is refused at CreateVolume with that reason.

use std::collections::BTreeMap;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::engine::ids::MAX_NAME_BYTES;
use crate::engine::params::{PV_NAME, PVC_NAME, PVC_NAMESPACE};

/// The backend's name and ID prefix.
pub const BACKEND: &str = "shared";
/// Hex digits of the name hash in an ID.
const HASH_DIGITS: usize = 20;
/// Hex digits of the name hash in a snapshot ID (`snap-shared-<hash>-<share>`): five fewer,
/// because the `snap-` prefix must fit in the same 128 bytes as the longest share reference.
const SNAPSHOT_HASH_DIGITS: usize = HASH_DIGITS - 5;
/// The prefix the engine puts before a backend's snapshot ID.
const SNAPSHOT_PREFIX: &str = "snap-";
const _: () = assert!(
    SNAPSHOT_PREFIX.len() + BACKEND.len() + 1 + SNAPSHOT_HASH_DIGITS + 1 + MAX_REF_BYTES * 4 / 3
        <= MAX_NAME_BYTES
);
/// Raw bytes of share reference an ID can carry: what base64url fits after the prefix.
pub const MAX_REF_BYTES: usize = (MAX_NAME_BYTES - BACKEND.len() - 1 - HASH_DIGITS - 1) * 3 / 4;

/// StorageClass parameters of the shared backend.
pub const SERVER: &str = "server";
pub const SHARE: &str = "share";
pub const SOURCE: &str = "source";
pub const FS_TYPE: &str = "fsType";
pub const SUB_DIR: &str = "subDir";
pub const ON_DELETE: &str = "onDelete";
pub const MOUNT_PERMISSIONS: &str = "mountPermissions";
/// Every key the shared backend understands.
pub const KEYS: &[&str] = &[
    SERVER,
    SHARE,
    SOURCE,
    FS_TYPE,
    SUB_DIR,
    ON_DELETE,
    MOUNT_PERMISSIONS,
];

/// Filesystem types a share may be. `none` bind-mounts a local directory (single node, or a
/// directory the node already mounted from elsewhere).
const FS_TYPES: &[&str] = &[
    "nfs",
    "nfs4",
    "cephfs",
    "cifs",
    "smb3",
    "glusterfs",
    "ext4",
    "xfs",
    "btrfs",
    "none",
];

/// Mount options accepted without a value.
const FLAG_OPTIONS: &[&str] = &[
    "ro",
    "rw",
    "noatime",
    "relatime",
    "nodiratime",
    "lazytime",
    "sync",
    "async",
    "noexec",
    "hard",
    "soft",
    "softerr",
    "intr",
    "nointr",
    "ac",
    "noac",
    "cto",
    "nocto",
    "lock",
    "nolock",
    "acl",
    "noacl",
    "fsc",
    "nofsc",
    "resvport",
    "noresvport",
    "sharecache",
    "nosharecache",
    "nobrl",
    "mfsymlinks",
    "seal",
    "nosuid",
    "nodev",
];

/// Mount options accepted as `key=value`. Deliberately absent: anything that changes what is
/// mounted or how (`bind`, `remount`, `loop`, `offset`, `x-*`, `helper`, `context`), and
/// credentials, which belong in secrets, never in IDs.
const VALUE_OPTIONS: &[&str] = &[
    "nfsvers",
    "vers",
    "minorversion",
    "proto",
    "port",
    "timeo",
    "retrans",
    "retry",
    "rsize",
    "wsize",
    "nconnect",
    "max_connect",
    "sec",
    "actimeo",
    "acregmin",
    "acregmax",
    "acdirmin",
    "acdirmax",
    "lookupcache",
    "local_lock",
    "mountport",
    "mountproto",
    "mountvers",
    "namlen",
    "xprtsec",
    "cache",
    "uid",
    "gid",
    "file_mode",
    "dir_mode",
    "fs",
    "mds_namespace",
    "recover_session",
];

/// Why a share parameter, template or ID was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

fn err<T>(message: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError(message.into()))
}

/// Where a shared volume's share is and how it is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareRef {
    /// Filesystem type (`nfs`, `ext4`, `none`, ...).
    pub fs_type: String,
    /// What is mounted: `server:/export`, a device, `//server/share`, a local directory.
    pub source: String,
    /// Mount options, validated one by one.
    pub options: Vec<String>,
}

/// Characters a share source may contain. No spaces, quotes, commas-free is not required
/// (CephFS monitor lists use commas) because the source is its own argument, never part of
/// `-o`.
fn source_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "._-:/@=,[]".contains(c)
}

/// Checks an absolute, normalised path (`/a/b`, no `.`/`..`/empty components).
fn check_absolute(what: &str, path: &str) -> Result<(), SpecError> {
    let Some(rest) = path.strip_prefix('/') else {
        return err(format!("{what} {path:?} must be an absolute path"));
    };
    if rest.is_empty() {
        return Ok(());
    }
    if rest
        .split('/')
        .any(|p| p.is_empty() || p == "." || p == "..")
    {
        return err(format!(
            "{what} {path:?} must be normalised (no '.', '..', '//' or trailing '/')"
        ));
    }
    Ok(())
}

fn check_host(host: &str) -> Result<(), SpecError> {
    let ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        !inner.is_empty() && inner.chars().all(|c| c.is_ascii_hexdigit() || c == ':')
    } else {
        !host.is_empty()
            && host.len() <= 253
            && !host.starts_with(['-', '.'])
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
    };
    if ok {
        Ok(())
    } else {
        err(format!(
            "server {host:?} must be a host name, an IPv4 address or a bracketed IPv6 address"
        ))
    }
}

/// Checks one mount option and returns it trimmed.
pub fn check_option(option: &str) -> Result<&str, SpecError> {
    let option = option.trim();
    let (key, value) = match option.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (option, None),
    };
    match value {
        None if FLAG_OPTIONS.contains(&key) => Ok(option),
        Some(v)
            if VALUE_OPTIONS.contains(&key)
                && !v.is_empty()
                && v.len() <= 64
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".:_-".contains(c)) =>
        {
            Ok(option)
        }
        _ => err(format!(
            "mount option {option:?} is not supported for shared volumes (see the README for \
             the accepted options)"
        )),
    }
}

/// Validates mount flags from a volume capability (Kubernetes passes StorageClass
/// `mountOptions` there). A flag holding a comma list is split and each piece judged, so
/// `nfsvers=4.1,bind` is refused for its `bind`.
pub fn check_options(flags: &[String]) -> Result<Vec<String>, SpecError> {
    let mut out: Vec<String> = Vec::new();
    for flag in flags {
        for piece in flag.split(',') {
            if piece.trim().is_empty() {
                continue;
            }
            let piece = check_option(piece)?.to_string();
            if !out.contains(&piece) {
                out.push(piece);
            }
        }
    }
    Ok(out)
}

impl ShareRef {
    /// The share named by StorageClass parameters: `server` + `share` (NFS), or `source` +
    /// `fsType`.
    pub fn from_parameters(
        params: &BTreeMap<String, String>,
        mount_flags: &[String],
    ) -> Result<ShareRef, SpecError> {
        let get = |k: &str| params.get(k).map(String::as_str);
        let (fs_type, source) = match (get(SERVER), get(SHARE), get(SOURCE)) {
            (Some(server), Some(share), None) => {
                let fs = get(FS_TYPE).unwrap_or("nfs");
                if fs != "nfs" && fs != "nfs4" {
                    return err(format!(
                        "server and share describe an NFS export; fsType must be nfs or nfs4, \
                         not {fs:?}"
                    ));
                }
                check_host(server)?;
                check_absolute("share", share)?;
                (fs.to_string(), format!("{server}:{share}"))
            }
            (None, None, Some(source)) => {
                let Some(fs) = get(FS_TYPE) else {
                    return err("source needs fsType (nfs, cephfs, cifs, ext4, none, ...)");
                };
                (fs.to_string(), source.to_string())
            }
            (None, None, None) => {
                return err("a shared volume needs server + share (NFS) or source + fsType");
            }
            _ => return err("give either server + share or source + fsType, not both"),
        };
        let share = ShareRef {
            fs_type,
            source,
            options: check_options(mount_flags)?,
        };
        share.validate()?;
        Ok(share)
    }

    /// Checks every field; used for parameters and again for every decoded ID.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !FS_TYPES.contains(&self.fs_type.as_str()) {
            return err(format!(
                "fsType {:?} is not supported for shared volumes (supported: {})",
                self.fs_type,
                FS_TYPES.join(", ")
            ));
        }
        let source = self.source.as_str();
        if source.is_empty() || source.len() > 512 {
            return err("source must be 1-512 bytes");
        }
        if source.starts_with('-') || !source.chars().all(source_char) {
            return err(format!(
                "source {source:?} may contain only letters, digits and ._-:/@=,[] and must not \
                 start with '-'"
            ));
        }
        match self.fs_type.as_str() {
            "nfs" | "nfs4" => {
                let Some((host, path)) = source.rsplit_once(":/") else {
                    return err(format!("NFS source {source:?} must be server:/export"));
                };
                check_host(host)?;
                check_absolute("share", &format!("/{path}"))?;
            }
            "cifs" | "smb3" => {
                let Some(rest) = source.strip_prefix("//") else {
                    return err(format!("CIFS source {source:?} must be //server/share"));
                };
                check_absolute("share", &format!("/{rest}"))?;
            }
            "cephfs" | "glusterfs" => {
                if source.split(['/', ',', ':']).any(|p| p == "..") {
                    return err(format!("source {source:?} must not contain '..'"));
                }
            }
            _ => check_absolute("source", source)?,
        }
        for option in &self.options {
            // Parameters are trimmed on the way in (`check_options`); a decoded ID must hold
            // the trimmed spelling too, or whitespace would reach the `-o` argument and one
            // share would have several IDs (found by the `snapshot_id` fuzz target).
            if check_option(option)? != option {
                return err(format!(
                    "mount option {option:?} has surrounding whitespace"
                ));
            }
        }
        Ok(())
    }

    /// The compact form carried in volume IDs: `fsType`, source and options separated by
    /// newlines (which no validated field contains).
    fn serialize(&self) -> String {
        format!(
            "{}\n{}\n{}",
            self.fs_type,
            self.source,
            self.options.join(",")
        )
    }

    fn deserialize(raw: &str) -> Result<ShareRef, SpecError> {
        let mut parts = raw.split('\n');
        let (Some(fs_type), Some(source), Some(options), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return err("share reference is malformed");
        };
        let share = ShareRef {
            fs_type: fs_type.to_string(),
            source: source.to_string(),
            options: if options.is_empty() {
                vec![]
            } else {
                options.split(',').map(str::to_string).collect()
            },
        };
        share.validate()?;
        Ok(share)
    }

    /// A short stable name for this share (mount directory names, logs).
    pub fn key(&self) -> String {
        hex(&Sha256::digest(self.serialize().as_bytes())[..8])
    }

    /// How the share is described to people and in the volume context.
    pub fn display(&self) -> String {
        format!("{} {}", self.fs_type, self.source)
    }

    /// The exact `mount` argument vector (without the program) that mounts the share at
    /// `target`. `nosuid,nodev` always come first: nothing on a share may become a setuid
    /// binary or a device node on the node.
    pub fn mount_args(&self, target: &Path) -> Vec<String> {
        let target = target.to_string_lossy().into_owned();
        if self.fs_type == "none" {
            return vec!["--bind".into(), "--".into(), self.source.clone(), target];
        }
        let mut options = vec!["nosuid".to_string(), "nodev".to_string()];
        options.extend(
            self.options
                .iter()
                .filter(|o| !matches!(o.as_str(), "nosuid" | "nodev"))
                .cloned(),
        );
        vec![
            "-t".into(),
            self.fs_type.clone(),
            "-o".into(),
            options.join(","),
            "--".into(),
            self.source.clone(),
            target,
        ]
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Unpadded base64url (RFC 4648 §5). Public so the fuzz checks (`crate::fuzzing`) can wrap
/// arbitrary share-reference text into the ID shape the parser expects.
pub fn b64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Decodes unpadded base64url; only the canonical encoding is accepted, so one share has
/// exactly one ID spelling.
fn b64_decode(text: &str) -> Option<Vec<u8>> {
    if text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.as_bytes().chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            let v = B64.iter().position(|b| b == c)? as u32;
            n |= v << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    (b64_encode(&out) == text).then_some(out)
}

/// The volume ID of the volume `name` on `share`, or why it cannot have one.
pub fn volume_id(name: &str, share: &ShareRef) -> Result<String, SpecError> {
    let serialized = share.serialize();
    if serialized.len() > MAX_REF_BYTES {
        return err(format!(
            "the share reference ({} bytes: fsType, source and mount options) does not fit in a \
             128-byte CSI volume ID (at most {MAX_REF_BYTES} bytes); shorten the server name, \
             export path or mount options",
            serialized.len()
        ));
    }
    let digest = Sha256::digest(name.as_bytes());
    Ok(format!(
        "{BACKEND}-{}-{}",
        &hex(&digest)[..HASH_DIGITS],
        b64_encode(serialized.as_bytes())
    ))
}

/// Checks the part of a shared volume ID after `shared-` and returns the share it names.
pub fn parse_id_tail(tail: &str) -> Result<ShareRef, SpecError> {
    parse_tail(tail, HASH_DIGITS)
}

/// The ID (without the engine's `snap-` prefix) of the snapshot named `name` of the shared
/// volume `volume_id`: `shared-<15 hex digits of the name's SHA-256>-<the volume's share>`.
/// The snapshot lives on that share, so a controller on any node, with any state directory,
/// finds it from the ID alone. `None` when `volume_id` is not a valid shared volume ID.
pub fn snapshot_id(name: &str, volume_id: &str) -> Option<String> {
    let tail = volume_id.strip_prefix(BACKEND)?.strip_prefix('-')?;
    parse_id_tail(tail).ok()?;
    let (_, encoded) = tail.split_once('-')?;
    let digest = Sha256::digest(name.as_bytes());
    Some(format!(
        "{BACKEND}-{}-{encoded}",
        &hex(&digest)[..SNAPSHOT_HASH_DIGITS]
    ))
}

/// Checks the part of a shared snapshot ID after `snap-shared-` and returns its share.
pub fn parse_snapshot_id_tail(tail: &str) -> Result<ShareRef, SpecError> {
    parse_tail(tail, SNAPSHOT_HASH_DIGITS)
}

fn parse_tail(tail: &str, digits: usize) -> Result<ShareRef, SpecError> {
    let Some((hash, encoded)) = tail.split_once('-') else {
        return err("no share reference");
    };
    if hash.len() != digits || !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return err("bad name hash");
    }
    let bytes = b64_decode(encoded).ok_or_else(|| SpecError("bad share encoding".into()))?;
    let text = String::from_utf8(bytes).map_err(|_| SpecError("share is not UTF-8".into()))?;
    ShareRef::deserialize(&text)
}

/// What DeleteVolume does with a volume's directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDelete {
    /// Remove the directory and everything in it.
    Delete,
    /// Leave the directory as it is.
    Retain,
    /// Rename it to `archived-<name>-<unix time>` next to where it was (a `<name>` too long for
    /// that to fit in 255 bytes is shortened: `SharedBackend::archive_name`).
    Archive,
}

impl OnDelete {
    pub fn parse(raw: Option<&str>) -> Result<OnDelete, SpecError> {
        match raw {
            None | Some("delete") => Ok(OnDelete::Delete),
            Some("retain") => Ok(OnDelete::Retain),
            Some("archive") => Ok(OnDelete::Archive),
            Some(other) => err(format!(
                "onDelete must be delete, retain or archive, not {other:?}"
            )),
        }
    }
}

/// `mountPermissions`: octal mode for the new directory; `None` leaves the mode the directory
/// was created with (0755 under the usual umask). Setuid and setgid bits are refused.
pub fn parse_permissions(raw: Option<&str>) -> Result<Option<u32>, SpecError> {
    let Some(raw) = raw else { return Ok(None) };
    let mode = u32::from_str_radix(raw, 8)
        .ok()
        .filter(|_| !raw.is_empty() && raw.len() <= 5)
        .ok_or_else(|| SpecError(format!("mountPermissions {raw:?} is not an octal mode")))?;
    if mode > 0o1777 {
        return err(format!(
            "mountPermissions {raw:?} may not set setuid or setgid bits (at most 01777)"
        ));
    }
    Ok(if mode == 0 { None } else { Some(mode) })
}

/// Whether `s` may be one path component of a volume's directory: no separators, nothing
/// hidden (so `.`, `..` and our own `.k8scsi` can never be produced), a safe alphabet.
fn is_component(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// Template variables and the provisioner metadata key each one reads.
const VARIABLES: &[(&str, &str)] = &[
    ("pvc.metadata.namespace", PVC_NAMESPACE),
    ("pvc.metadata.name", PVC_NAME),
    ("pv.metadata.name", PV_NAME),
];

/// Deepest directory a template may produce.
const MAX_DEPTH: usize = 16;

/// Checks a `subDir` template without rendering it (unknown variables, bad literals).
pub fn check_template(template: &str) -> Result<(), SpecError> {
    let fake: BTreeMap<String, String> = VARIABLES
        .iter()
        .map(|(_, key)| (key.to_string(), "x".to_string()))
        .collect();
    render_subdir(Some(template), &fake, "x").map(|_| ())
}

/// Renders the volume's directory below the share root: the `subDir` template with the
/// provisioner's metadata substituted, or by default the volume name when it is a safe
/// component (else `fallback`, the ID's name hash). The result is a list of components that
/// each pass [`is_component`]; whatever the template or the metadata say, it cannot climb out
/// of the share or name our metadata directory.
pub fn render_subdir(
    template: Option<&str>,
    metadata: &BTreeMap<String, String>,
    name: &str,
) -> Result<Vec<String>, SpecError> {
    let Some(template) = template else {
        let component = if is_component(name) {
            name.to_string()
        } else {
            format!("pv-{}", hex(&Sha256::digest(name.as_bytes())[..10]))
        };
        return Ok(vec![component]);
    };
    if template.is_empty() || template.len() > 1024 {
        return err("subDir must be 1-1024 bytes");
    }
    if template.starts_with('/') {
        return err(format!(
            "subDir {template:?} must be relative to the share root"
        ));
    }
    let mut rendered = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        rendered.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return err(format!("subDir {template:?} has an unterminated ${{"));
        };
        let variable = &after[..end];
        let Some((_, key)) = VARIABLES.iter().find(|(v, _)| *v == variable) else {
            return err(format!(
                "subDir variable ${{{variable}}} is unknown (known: ${{pvc.metadata.namespace}}, \
                 ${{pvc.metadata.name}}, ${{pv.metadata.name}})"
            ));
        };
        let Some(value) = metadata.get(*key) else {
            return err(format!(
                "subDir uses ${{{variable}}} but the request has no {key} (run the \
                 external-provisioner with --extra-create-metadata)"
            ));
        };
        if !is_component(value) {
            return err(format!(
                "{key} {value:?} cannot be part of a directory name"
            ));
        }
        rendered.push_str(value);
        rest = &after[end + 1..];
    }
    rendered.push_str(rest);
    if rendered.contains('$') {
        return err(format!("subDir {template:?} has a stray '$'"));
    }
    let components: Vec<String> = rendered.split('/').map(str::to_string).collect();
    if components.len() > MAX_DEPTH {
        return err(format!(
            "subDir {template:?} is deeper than {MAX_DEPTH} directories"
        ));
    }
    if let Some(bad) = components.iter().find(|c| !is_component(c)) {
        return err(format!(
            "subDir {template:?} renders to {rendered:?}, whose component {bad:?} is not \
             allowed (empty, hidden, '.', '..' or a character outside A-Z a-z 0-9 . _ -)"
        ));
    }
    Ok(components)
}

/// Re-checks components read back from a marker on the share (which someone with access to
/// the share could have edited).
pub fn check_components(components: &[String]) -> Result<(), SpecError> {
    if components.is_empty()
        || components.len() > MAX_DEPTH
        || components.iter().any(|c| !is_component(c))
    {
        return err(format!(
            "directory {components:?} is not a valid volume directory"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn nfs() -> ShareRef {
        ShareRef::from_parameters(
            &params(&[("server", "nfs.example.com"), ("share", "/exports/k8s")]),
            &["nfsvers=4.1".into(), "hard".into()],
        )
        .unwrap()
    }

    #[test]
    fn nfs_mount_command_line_is_exact() {
        let share = nfs();
        assert_eq!(share.source, "nfs.example.com:/exports/k8s");
        assert_eq!(
            share.mount_args(Path::new("/var/lib/k8scsi/shares/abc")),
            [
                "-t",
                "nfs",
                "-o",
                "nosuid,nodev,nfsvers=4.1,hard",
                "--",
                "nfs.example.com:/exports/k8s",
                "/var/lib/k8scsi/shares/abc"
            ]
        );
        let v6 = ShareRef::from_parameters(
            &params(&[("server", "[fd00::1]"), ("share", "/"), ("fsType", "nfs4")]),
            &[],
        )
        .unwrap();
        assert_eq!(
            v6.mount_args(Path::new("/m")),
            [
                "-t",
                "nfs4",
                "-o",
                "nosuid,nodev",
                "--",
                "[fd00::1]:/",
                "/m"
            ]
        );
        let local = ShareRef::from_parameters(
            &params(&[("source", "/srv/share"), ("fsType", "none")]),
            &[],
        )
        .unwrap();
        assert_eq!(
            local.mount_args(Path::new("/m")),
            ["--bind", "--", "/srv/share", "/m"]
        );
    }

    #[test]
    fn option_injection_is_refused() {
        for bad in [
            "nfsvers=4.1,bind",
            "bind",
            "remount",
            "loop",
            "offset=0",
            "x-mount.mkdir",
            "helper=evil",
            "nfsvers=4.1 hard",
            "nfsvers=4=1",
            "uid=0,suid",
            "suid",
            "dev",
            "context=system_u:object_r:etc_t:s0",
            "nfsvers=",
            "username=admin",
        ] {
            assert!(check_options(&[bad.to_string()]).is_err(), "{bad}");
        }
        assert_eq!(
            check_options(&["nfsvers=4.1,hard".into(), " noatime ".into(), "hard".into()]).unwrap(),
            ["nfsvers=4.1", "hard", "noatime"]
        );
    }

    #[test]
    fn share_parameters_are_validated() {
        for bad in [
            params(&[("server", "nfs;rm -rf"), ("share", "/x")]),
            params(&[("server", "-oevil"), ("share", "/x")]),
            params(&[("server", "s"), ("share", "x")]),
            params(&[("server", "s"), ("share", "/x/../etc")]),
            params(&[("server", "s"), ("share", "/x"), ("fsType", "ext4")]),
            params(&[("server", "s"), ("share", "/x"), ("source", "/y")]),
            params(&[("source", "/srv")]),
            params(&[("source", "srv"), ("fsType", "none")]),
            params(&[("source", "/srv/../etc"), ("fsType", "none")]),
            params(&[("source", "-o/x"), ("fsType", "ext4")]),
            params(&[("source", "/dev/sda1"), ("fsType", "proc")]),
            params(&[("source", "/a b"), ("fsType", "none")]),
            params(&[("source", "server:/x"), ("fsType", "nfs"), ("share", "/y")]),
            params(&[("source", "//srv/../x"), ("fsType", "cifs")]),
            params(&[("source", "mon1:6789:.."), ("fsType", "cephfs")]),
            params(&[("source", "srv:..,x"), ("fsType", "glusterfs")]),
            params(&[]),
        ] {
            assert!(ShareRef::from_parameters(&bad, &[]).is_err(), "{bad:?}");
        }
        assert!(
            ShareRef::from_parameters(
                &params(&[("source", "srv:/export/a"), ("fsType", "nfs")]),
                &[]
            )
            .is_ok()
        );
    }

    #[test]
    fn ids_carry_the_share_and_stay_within_128_bytes() {
        let share = nfs();
        let id = volume_id("pvc-1", &share).unwrap();
        assert!(id.len() <= 128, "{id}");
        assert!(id.starts_with("shared-"));
        assert_eq!(
            parse_id_tail(id.strip_prefix("shared-").unwrap()).unwrap(),
            share
        );
        assert_ne!(id, volume_id("pvc-2", &share).unwrap());
        let long = ShareRef {
            fs_type: "nfs".into(),
            source: format!("{}.example.com:/exports", "a".repeat(60)),
            options: vec![],
        };
        assert!(volume_id("pvc-1", &long).is_err());
        let just_fits = ShareRef {
            fs_type: "none".into(),
            source: format!("/{}", "a".repeat(MAX_REF_BYTES - 7)),
            options: vec![],
        };
        assert_eq!(volume_id("n", &just_fits).unwrap().len(), 128);
    }

    #[test]
    fn snapshot_ids_carry_the_volume_share_within_128_bytes() {
        let just_fits = ShareRef {
            fs_type: "none".into(),
            source: format!("/{}", "a".repeat(MAX_REF_BYTES - 7)),
            options: vec![],
        };
        for share in [nfs(), just_fits] {
            let volume = volume_id("pvc-1", &share).unwrap();
            let snap = snapshot_id("snap-1", &volume).unwrap();
            assert!(
                SNAPSHOT_PREFIX.len() + snap.len() <= MAX_NAME_BYTES,
                "{snap}"
            );
            let tail = snap.strip_prefix("shared-").unwrap();
            assert_eq!(parse_snapshot_id_tail(tail).unwrap(), share);
            // A snapshot ID is never a volume ID and the reverse.
            assert!(parse_id_tail(tail).is_err());
            assert!(parse_snapshot_id_tail(volume.strip_prefix("shared-").unwrap()).is_err());
            assert_eq!(snapshot_id("snap-1", &volume).unwrap(), snap);
            assert_ne!(snapshot_id("snap-2", &volume).unwrap(), snap);
        }
        assert_eq!(
            snapshot_id("s", "dir-0123456789abcdef0123456789abcdef"),
            None
        );
        assert_eq!(snapshot_id("s", "shared-0123-AAAA"), None);
        let volume = volume_id("pvc-1", &nfs()).unwrap();
        let snap = snapshot_id("snap-1", &volume).unwrap();
        let (hash, encoded) = snap
            .strip_prefix("shared-")
            .unwrap()
            .split_once('-')
            .unwrap();
        for bad in [
            format!("{}-{encoded}", &hash[1..]),
            format!("{}-{encoded}", hash.to_uppercase()),
            format!("{hash}-{encoded}="),
            format!("{hash}-{}", b64_encode(b"none\n/etc/../root\n")),
            format!("{hash}/../x-{encoded}"),
        ] {
            assert!(parse_snapshot_id_tail(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hostile_id_tails_are_refused() {
        let good = volume_id("pvc-1", &nfs()).unwrap();
        let tail = good.strip_prefix("shared-").unwrap();
        let (hash, encoded) = tail.split_once('-').unwrap();
        let evil = ShareRef {
            fs_type: "nfs".into(),
            source: "s:/x".into(),
            options: vec!["bind".into()],
        };
        let evil_encoded = b64_encode(evil.serialize().as_bytes());
        for bad in [
            String::new(),
            hash.to_string(),
            format!("{}-{encoded}", &hash[1..]),
            format!("{}-{encoded}", hash.to_uppercase()),
            format!("{hash}-{encoded}="),
            format!("{hash}-{encoded}+"),
            format!("{hash}-{evil_encoded}"),
            format!("{hash}-{}", b64_encode(b"none\n/etc/../root\n")),
            format!("{hash}-{}", b64_encode(b"none\n/srv")),
            format!("{hash}-{}", b64_encode(b"proc\n/proc\n")),
            format!("{hash}-{}", b64_encode(b"ext4\n/dev/loop7\nnoatime\t ")),
            format!("{hash}-{}", b64_encode(b"nfs\ns:/x\n hard")),
        ] {
            assert!(parse_id_tail(&bad).is_err(), "{bad}");
        }
        // Only the canonical spelling: trailing bits must be zero.
        let text = b64_encode(b"none\n/s\n");
        let mut altered = text.clone().into_bytes();
        let last = altered.pop().unwrap();
        let idx = B64.iter().position(|b| *b == last).unwrap();
        altered.push(B64[idx ^ 1]);
        assert!(b64_decode(std::str::from_utf8(&altered).unwrap()).is_none());
    }

    #[test]
    fn base64url_round_trips() {
        for data in [&b""[..], b"a", b"ab", b"abc", b"abcd", b"\xff\xfe\xfd\x00"] {
            assert_eq!(b64_decode(&b64_encode(data)).unwrap(), data);
        }
        assert_eq!(b64_encode(b"hello"), "aGVsbG8");
    }

    #[test]
    fn templates_render_with_metadata() {
        let meta = params(&[
            (PVC_NAMESPACE, "shop"),
            (PVC_NAME, "data-web-0"),
            (PV_NAME, "pvc-1234"),
        ]);
        assert_eq!(
            render_subdir(
                Some("${pvc.metadata.namespace}/${pvc.metadata.name}-x"),
                &meta,
                "n"
            )
            .unwrap(),
            ["shop", "data-web-0-x"]
        );
        assert_eq!(
            render_subdir(Some("vols/${pv.metadata.name}"), &meta, "n").unwrap(),
            ["vols", "pvc-1234"]
        );
        assert_eq!(render_subdir(None, &meta, "pvc-9").unwrap(), ["pvc-9"]);
        let fallback = render_subdir(None, &meta, "../weird name").unwrap();
        assert!(fallback[0].starts_with("pv-") && fallback[0].len() == 23);
    }

    #[test]
    fn template_escapes_are_refused() {
        let meta = params(&[(PVC_NAMESPACE, "shop"), (PVC_NAME, ".."), (PV_NAME, "a/b")]);
        for bad in [
            "../x",
            "a/../../x",
            "/etc",
            "a//b",
            "a/",
            ".k8scsi/volumes",
            "${pvc.metadata.name}",
            "${pv.metadata.name}",
            "${env.HOME}",
            "${pvc.metadata.namespace",
            "$x",
            "a\0b",
            "a b",
            "",
        ] {
            assert!(render_subdir(Some(bad), &meta, "n").is_err(), "{bad:?}");
        }
        assert!(render_subdir(Some("${pvc.metadata.name}"), &BTreeMap::new(), "n").is_err());
        assert!(check_template("${pvc.metadata.namespace}/${pv.metadata.name}").is_ok());
        assert!(check_template("${unknown}").is_err());
        assert!(check_components(&["a".into(), "..".into()]).is_err());
        assert!(check_components(&[]).is_err());
    }

    #[test]
    fn on_delete_and_permissions_parse_strictly() {
        assert_eq!(OnDelete::parse(None).unwrap(), OnDelete::Delete);
        assert_eq!(OnDelete::parse(Some("archive")).unwrap(), OnDelete::Archive);
        assert!(OnDelete::parse(Some("Delete")).is_err());
        assert_eq!(parse_permissions(Some("0777")).unwrap(), Some(0o777));
        assert_eq!(parse_permissions(Some("0")).unwrap(), None);
        assert_eq!(parse_permissions(None).unwrap(), None);
        for bad in ["4777", "0o777", "999", "", "-1", "077777"] {
            assert!(parse_permissions(Some(bad)).is_err(), "{bad}");
        }
    }
}
