//! Staging and target paths from the CO, confined to the kubelet directory.
//!
//! A [`ConfinedPath`] can only be built from a string that is absolute, already normalised (no
//! `.`, `..`, empty components or trailing slash), free of NUL bytes, within `PATH_MAX`, and
//! strictly inside the configured root. It keeps the root and the components below it apart so
//! the mount layer can resolve them one directory file descriptor at a time, beneath the root
//! and without following symlinks.

use std::fmt;
use std::path::{Path, PathBuf};

/// Longest path accepted, as the kernel's `PATH_MAX`.
pub const MAX_PATH_BYTES: usize = 4096;

/// Why a path from a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("must not be empty")]
    Empty,
    #[error("must not contain NUL bytes")]
    Nul,
    #[error("is longer than {MAX_PATH_BYTES} bytes")]
    TooLong,
    #[error("must be an absolute path")]
    Relative,
    #[error("must be normalised (no '.', '..', '//' or trailing '/'), got {0:?}")]
    NotNormalised(String),
    #[error("{path:?} is outside the kubelet directory {root}")]
    OutsideRoot { path: String, root: String },
}

/// An absolute path inside a trusted root directory, validated component by component.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ConfinedPath {
    root: PathBuf,
    components: Vec<String>,
}

impl ConfinedPath {
    /// Validates `raw` against `root` (an absolute, normalised directory the operator chose).
    pub fn new(root: &Path, raw: &str) -> Result<ConfinedPath, PathError> {
        if raw.is_empty() {
            return Err(PathError::Empty);
        }
        if raw.contains('\0') {
            return Err(PathError::Nul);
        }
        if raw.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong);
        }
        let Some(rest) = raw.strip_prefix('/') else {
            return Err(PathError::Relative);
        };
        let parts: Vec<&str> = rest.split('/').collect();
        if parts
            .iter()
            .any(|p| p.is_empty() || *p == "." || *p == "..")
        {
            return Err(PathError::NotNormalised(raw.to_string()));
        }
        let root_parts: Vec<&str> = root
            .to_str()
            .unwrap_or_default()
            .split('/')
            .filter(|p| !p.is_empty())
            .collect();
        let outside = || PathError::OutsideRoot {
            path: raw.to_string(),
            root: root.display().to_string(),
        };
        if parts.len() <= root_parts.len() || parts[..root_parts.len()] != root_parts[..] {
            return Err(outside());
        }
        Ok(ConfinedPath {
            root: root.to_path_buf(),
            components: parts[root_parts.len()..]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        })
    }

    /// The trusted root the path is confined to.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Components between the root and the last one (may be empty).
    pub fn parent_components(&self) -> &[String] {
        &self.components[..self.components.len() - 1]
    }

    /// The last component: the name the mount lands on.
    pub fn leaf(&self) -> &str {
        self.components.last().expect("at least one component")
    }

    /// The parent directory relative to the root, `.` for the root itself.
    pub fn parent_relative(&self) -> String {
        if self.components.len() == 1 {
            ".".to_string()
        } else {
            self.parent_components().join("/")
        }
    }

    /// The full absolute path.
    pub fn absolute(&self) -> PathBuf {
        let mut p = self.root.clone();
        p.extend(&self.components);
        p
    }

    /// The full absolute path as a string (always valid UTF-8: it came from a request string).
    pub fn as_string(&self) -> String {
        self.absolute().to_string_lossy().into_owned()
    }
}

impl fmt::Debug for ConfinedPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.absolute())
    }
}

impl fmt::Display for ConfinedPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.absolute().display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        PathBuf::from("/var/lib/kubelet")
    }

    #[test]
    fn accepts_paths_inside_root() {
        let p = ConfinedPath::new(&root(), "/var/lib/kubelet/pods/abc/volumes/x/mount").unwrap();
        assert_eq!(p.leaf(), "mount");
        assert_eq!(p.parent_relative(), "pods/abc/volumes/x");
        assert_eq!(
            p.absolute(),
            PathBuf::from("/var/lib/kubelet/pods/abc/volumes/x/mount")
        );
        let direct = ConfinedPath::new(&root(), "/var/lib/kubelet/t").unwrap();
        assert_eq!(direct.parent_relative(), ".");
    }

    #[test]
    fn rejects_hostile_paths() {
        let cases = [
            ("", PathError::Empty),
            ("/var/lib/kubelet/a\0b", PathError::Nul),
            ("var/lib/kubelet/a", PathError::Relative),
            (
                "/var/lib/kubelet/../../etc",
                PathError::NotNormalised("/var/lib/kubelet/../../etc".into()),
            ),
            (
                "/var/lib/kubelet/./a",
                PathError::NotNormalised("/var/lib/kubelet/./a".into()),
            ),
            (
                "/var/lib/kubelet//a",
                PathError::NotNormalised("/var/lib/kubelet//a".into()),
            ),
            (
                "/var/lib/kubelet/a/",
                PathError::NotNormalised("/var/lib/kubelet/a/".into()),
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(
                ConfinedPath::new(&root(), raw).unwrap_err(),
                want,
                "{raw:?}"
            );
        }
        for outside in [
            "/etc/passwd",
            "/var/lib/kubelet",
            "/var/lib/kubeletx/a",
            "/var/lib",
        ] {
            assert!(
                matches!(
                    ConfinedPath::new(&root(), outside),
                    Err(PathError::OutsideRoot { .. })
                ),
                "{outside}"
            );
        }
        let long = format!("/var/lib/kubelet/{}", "a".repeat(MAX_PATH_BYTES));
        assert_eq!(
            ConfinedPath::new(&root(), &long).unwrap_err(),
            PathError::TooLong
        );
    }
}
