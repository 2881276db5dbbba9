//! Readiness of a running server, shared by the CSI Probe (and so the livenessprobe sidecar) and
//! the plain HTTP `/healthz` beside `/metrics`.
//!
//! Ready means the server can do its job right now: the state store answers reads, the data
//! directory's filesystem answers `statvfs`, and neither the data nor the state filesystem has
//! gone read-only (ext4 `errors=remount-ro` after an I/O error, a full-disk emergency remount).
//! A full filesystem is not unreadiness: volumes can still be published and deleted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::engine::Engine;

/// How long a check may take before it counts as failed (a hung filesystem).
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The result of one readiness check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    /// Why the server is not ready; empty when it is.
    pub problems: Vec<String>,
}

impl HealthReport {
    pub fn ready(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks a running server's readiness.
#[derive(Clone)]
pub struct Health {
    engine: Arc<Engine>,
    data_dir: PathBuf,
    state_dir: PathBuf,
}

impl Health {
    pub fn new(engine: Arc<Engine>, data_dir: PathBuf, state_dir: PathBuf) -> Health {
        Health {
            engine,
            data_dir,
            state_dir,
        }
    }

    /// Runs the checks (blocking filesystem calls).
    pub fn check_blocking(&self) -> HealthReport {
        let mut problems = Vec::new();
        if let Err(e) = self.engine.store().next_sequence() {
            problems.push(format!("state store does not answer reads: {e}"));
        }
        if !self.engine.ready() {
            problems.push("the volume engine reports it is not ready".to_string());
        }
        for (what, dir) in [("data", &self.data_dir), ("state", &self.state_dir)] {
            if let Some(problem) = filesystem_problem(what, dir) {
                problems.push(problem);
            }
        }
        HealthReport { problems }
    }

    /// Runs the checks off the async threads, failing them if they take longer than
    /// [`CHECK_TIMEOUT`].
    pub async fn check(&self) -> HealthReport {
        let health = self.clone();
        let work = tokio::task::spawn_blocking(move || health.check_blocking());
        match tokio::time::timeout(CHECK_TIMEOUT, work).await {
            Ok(Ok(report)) => report,
            Ok(Err(e)) => HealthReport {
                problems: vec![format!("health check task failed: {e}")],
            },
            Err(_) => HealthReport {
                problems: vec![format!(
                    "health check did not finish within {}s (hung filesystem?)",
                    CHECK_TIMEOUT.as_secs()
                )],
            },
        }
    }
}

/// Why the filesystem holding `dir` is unusable, if it is.
pub(crate) fn filesystem_problem(what: &str, dir: &Path) -> Option<String> {
    match rustix::fs::statvfs(dir) {
        Err(e) => Some(format!(
            "{what} directory {}: statvfs failed: {e}",
            dir.display()
        )),
        Ok(st) if st.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY) => Some(format!(
            "{what} directory {} is on a read-only filesystem",
            dir.display()
        )),
        Ok(_) => None,
    }
}
