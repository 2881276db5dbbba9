//! StorageClass parameters. Unknown keys are refused by name so a typo in a StorageClass fails
//! loudly at provisioning time instead of silently provisioning something else.

use std::collections::BTreeMap;

use super::error::{Error, Result};
use crate::backend::shared::spec as shared;

/// Keys the external-provisioner adds with `--extra-create-metadata`.
pub const PV_NAME: &str = "csi.storage.k8s.io/pv/name";
pub const PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
pub const PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
const METADATA_KEYS: &[&str] = &[PV_NAME, PVC_NAME, PVC_NAMESPACE];
/// Prefix Kubernetes reserves for parameters its sidecars interpret (`.../fstype`,
/// `.../provisioner-secret-name`, ...). The external-provisioner strips them from CreateVolume
/// but passes the StorageClass parameters unchanged to GetCapacity (seen in tests/e2e.rs), so
/// they are skipped rather than refused.
const RESERVED_PREFIX: &str = "csi.storage.k8s.io/";

/// The `type` parameter choosing the backend.
pub const TYPE: &str = "type";
/// `preallocate` allocates loop images up front; `sparse` (default) allocates as written.
pub const ALLOCATION: &str = "allocation";
/// `"false"` accepts volumes whose size cannot be enforced on this node (default `"true"`).
pub const ENFORCE_CAPACITY: &str = "enforceCapacity";

/// CSI's limit on a map's total size.
pub const MAX_MAP_BYTES: usize = 4096;

/// Parameters split into what defines the volume and what only describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parameters {
    /// Backend name (`dir`).
    pub backend: String,
    /// Whether creation must fail when the size cannot be enforced.
    pub enforce_capacity: bool,
    /// Whether storage is allocated up front.
    pub preallocate: bool,
    /// Parameters that define the volume; compared for CreateVolume idempotency.
    pub defining: BTreeMap<String, String>,
    /// Provisioner metadata (PV/PVC names); recorded, never compared.
    pub metadata: BTreeMap<String, String>,
}

/// Checks a string map against CSI's size limit and for NUL bytes.
pub fn check_map(field: &'static str, map: &BTreeMap<String, String>) -> Result<()> {
    let size: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_MAP_BYTES {
        return Err(Error::invalid(
            field,
            format!("is {size} bytes; the limit is {MAX_MAP_BYTES}"),
        ));
    }
    if map
        .iter()
        .any(|(k, v)| k.contains('\0') || v.contains('\0'))
    {
        return Err(Error::invalid(field, "must not contain NUL bytes"));
    }
    Ok(())
}

/// The defining parameters without the entries that only spell out a default (`type: dir`,
/// `allocation: sparse`, `enforceCapacity: "true"`, or `"false"` for shared volumes, which
/// never enforce; `onDelete: delete`; `fsType: nfs` for `server` + `share`), so that a
/// parameter given explicitly and one left out compare equal.
pub fn without_defaults(defining: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let shared_volume = defining.get(TYPE).is_some_and(|t| t == shared::BACKEND);
    defining
        .iter()
        .filter(|(key, value)| {
            let default = match key.as_str() {
                TYPE => Some("dir"),
                ALLOCATION => Some("sparse"),
                ENFORCE_CAPACITY if shared_volume => Some("false"),
                ENFORCE_CAPACITY => Some("true"),
                shared::ON_DELETE => Some("delete"),
                shared::FS_TYPE if defining.contains_key(shared::SERVER) => Some("nfs"),
                _ => None,
            };
            default != Some(value.as_str())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Parses CreateVolume / GetCapacity parameters.
pub fn parse(raw: &BTreeMap<String, String>) -> Result<Parameters> {
    check_map("parameters", raw)?;
    let mut out = Parameters {
        backend: "dir".to_string(),
        enforce_capacity: true,
        ..Default::default()
    };
    for (key, value) in raw {
        if METADATA_KEYS.contains(&key.as_str()) {
            out.metadata.insert(key.clone(), value.clone());
            continue;
        }
        if key.starts_with(RESERVED_PREFIX) {
            continue;
        }
        match key.as_str() {
            TYPE => match value.as_str() {
                "dir" | "loop" | "shared" => {
                    out.backend = value.clone();
                    out.defining.insert(key.clone(), value.clone());
                }
                other => {
                    return Err(Error::invalid(
                        "parameters",
                        format!("type {other:?} is not supported (supported: dir, loop, shared)"),
                    ));
                }
            },
            ALLOCATION => {
                out.preallocate = match value.as_str() {
                    "sparse" => false,
                    "preallocate" => true,
                    other => {
                        return Err(Error::invalid(
                            "parameters",
                            format!("allocation must be sparse or preallocate, not {other:?}"),
                        ));
                    }
                };
                out.defining.insert(key.clone(), value.clone());
            }
            ENFORCE_CAPACITY => {
                out.enforce_capacity = match value.as_str() {
                    "true" => true,
                    "false" => false,
                    other => {
                        return Err(Error::invalid(
                            "parameters",
                            format!("enforceCapacity must be \"true\" or \"false\", not {other:?}"),
                        ));
                    }
                };
                out.defining.insert(key.clone(), value.clone());
            }
            k if shared::KEYS.contains(&k) => {
                out.defining.insert(key.clone(), value.clone());
            }
            _ => return Err(Error::UnknownParameter(key.clone())),
        }
    }
    let shared_keys: BTreeMap<String, String> = out
        .defining
        .iter()
        .filter(|(k, _)| shared::KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if out.backend == shared::BACKEND {
        check_shared(
            &shared_keys,
            raw.contains_key(ENFORCE_CAPACITY) && out.enforce_capacity,
        )?;
        out.enforce_capacity = false;
    } else if let Some(key) = shared_keys.keys().next() {
        return Err(Error::invalid(
            "parameters",
            format!(
                "{key} is a parameter of type: shared, not of type: {}",
                out.backend
            ),
        ));
    }
    Ok(out)
}

/// Checks the shared backend's parameters before anything touches a share: where the share
/// is, the subDir template, onDelete and mountPermissions.
fn check_shared(params: &BTreeMap<String, String>, enforce_requested: bool) -> Result<()> {
    let bad = |e: shared::SpecError| Error::invalid("parameters", e.0);
    if enforce_requested {
        return Err(Error::invalid(
            "parameters",
            "shared volumes cannot enforce capacity (it is recorded only); remove \
             enforceCapacity: \"true\"",
        ));
    }
    shared::ShareRef::from_parameters(params, &[]).map_err(bad)?;
    if let Some(template) = params.get(shared::SUB_DIR) {
        shared::check_template(template).map_err(bad)?;
    }
    shared::OnDelete::parse(params.get(shared::ON_DELETE).map(String::as_str)).map_err(bad)?;
    shared::parse_permissions(params.get(shared::MOUNT_PERMISSIONS).map(String::as_str))
        .map_err(bad)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn skips_keys_reserved_for_the_kubernetes_sidecars() {
        let p = parse(&map(&[
            ("type", "loop"),
            ("csi.storage.k8s.io/fstype", "xfs"),
        ]))
        .unwrap();
        assert_eq!(p.backend, "loop");
        assert_eq!(p.defining, map(&[("type", "loop")]));
        assert!(p.metadata.is_empty());
        // Only the exact prefix: a look-alike key is still a typo.
        assert!(matches!(
            parse(&map(&[("csi.storage.k8s.io-fstype", "xfs")])),
            Err(Error::UnknownParameter(_))
        ));
    }

    #[test]
    fn splits_metadata_from_defining_parameters() {
        let p = parse(&map(&[
            ("type", "dir"),
            (PVC_NAME, "data"),
            (PVC_NAMESPACE, "ns"),
        ]))
        .unwrap();
        assert_eq!(p.backend, "dir");
        assert_eq!(p.defining, map(&[("type", "dir")]));
        assert_eq!(p.metadata.len(), 2);
        assert_eq!(parse(&BTreeMap::new()).unwrap().backend, "dir");
    }

    #[test]
    fn refuses_unknown_and_oversized() {
        match parse(&map(&[("tpye", "dir")])) {
            Err(Error::UnknownParameter(k)) => assert_eq!(k, "tpye"),
            other => panic!("{other:?}"),
        }
        assert!(parse(&map(&[("type", "../../etc")])).is_err());
        assert!(parse(&map(&[("server", "nfs"), ("share", "/x")])).is_err());
        assert!(
            parse(&map(&[
                ("type", "shared"),
                ("source", "/srv/../etc"),
                ("fsType", "none")
            ]))
            .is_err()
        );
        assert!(
            parse(&map(&[
                ("type", "shared"),
                ("source", "/srv"),
                ("fsType", "none"),
                ("enforceCapacity", "true")
            ]))
            .is_err()
        );
        let shared = parse(&map(&[
            ("type", "shared"),
            ("server", "nfs.example.com"),
            ("share", "/exports"),
            ("subDir", "${pvc.metadata.namespace}/${pvc.metadata.name}"),
            ("onDelete", "archive"),
        ]))
        .unwrap();
        assert!(!shared.enforce_capacity);
        assert_eq!(shared.defining.len(), 5);
        let big = "x".repeat(5000);
        assert!(parse(&map(&[("type", &big)])).is_err());
    }
}
