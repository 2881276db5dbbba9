//! An in-memory [`Mounter`] for unit tests: it keeps a table of "mounted" targets and the calls
//! made, so engine logic (idempotency, conflicts, cleanup order) is testable without root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{ConfinedPath, MountError, MountOptions, Mounter, PathState};

/// A recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Bind {
        source: PathBuf,
        target: PathBuf,
        options: MountOptions,
    },
    Unmount(PathBuf),
    RemoveTarget(PathBuf),
}

/// State of the fake: which targets exist, and which of those have a source mounted.
#[derive(Debug, Default)]
pub struct FakeMounter {
    inner: Mutex<FakeState>,
}

#[derive(Debug, Default)]
struct FakeState {
    /// Target → the source bound there, `None` for an existing unmounted directory.
    targets: BTreeMap<PathBuf, Option<PathBuf>>,
    calls: Vec<Call>,
}

impl FakeMounter {
    /// The calls made so far.
    pub fn calls(&self) -> Vec<Call> {
        self.inner.lock().unwrap().calls.clone()
    }

    /// Simulates a reboot: every mount disappears, directories stay.
    pub fn drop_all_mounts(&self) {
        for v in self.inner.lock().unwrap().targets.values_mut() {
            *v = None;
        }
    }

    fn identity(path: &Path) -> (u64, u64) {
        // A stable fake (dev, ino) derived from the path.
        let mut h: u64 = 1469598103934665603;
        for b in path.as_os_str().as_encoded_bytes() {
            h = (h ^ u64::from(*b)).wrapping_mul(1099511628211);
        }
        (1, h)
    }
}

impl Mounter for FakeMounter {
    fn inspect(&self, path: &ConfinedPath) -> Result<Option<PathState>, MountError> {
        let state = self.inner.lock().unwrap();
        Ok(state.targets.get(&path.absolute()).map(|mounted| {
            let (dev, ino) = match mounted {
                Some(source) => Self::identity(source),
                None => Self::identity(&path.absolute()),
            };
            PathState {
                dev,
                ino,
                is_mount_point: mounted.is_some(),
                is_dir: true,
            }
        }))
    }

    fn bind(
        &self,
        source: &Path,
        target: &ConfinedPath,
        options: &MountOptions,
    ) -> Result<(), MountError> {
        let mut state = self.inner.lock().unwrap();
        state.calls.push(Call::Bind {
            source: source.to_path_buf(),
            target: target.absolute(),
            options: options.clone(),
        });
        state
            .targets
            .insert(target.absolute(), Some(source.to_path_buf()));
        Ok(())
    }

    fn mount_device(
        &self,
        device: &Path,
        _fs_type: &str,
        target: &ConfinedPath,
        options: &MountOptions,
    ) -> Result<(), MountError> {
        self.bind(device, target, options)
    }

    fn unmount(&self, target: &ConfinedPath) -> Result<(), MountError> {
        let mut state = self.inner.lock().unwrap();
        state.calls.push(Call::Unmount(target.absolute()));
        match state.targets.get_mut(&target.absolute()) {
            Some(slot @ Some(_)) => {
                *slot = None;
                Ok(())
            }
            _ => Err(MountError::Io {
                op: "umount",
                path: target.absolute(),
                source: std::io::Error::from_raw_os_error(22),
            }),
        }
    }

    fn remove_target(&self, target: &ConfinedPath) -> Result<(), MountError> {
        let mut state = self.inner.lock().unwrap();
        state.calls.push(Call::RemoveTarget(target.absolute()));
        if let Some(Some(_)) = state.targets.get(&target.absolute()) {
            return Err(MountError::Io {
                op: "rmdir",
                path: target.absolute(),
                source: std::io::Error::from_raw_os_error(16),
            });
        }
        state.targets.remove(&target.absolute());
        Ok(())
    }

    fn identity(&self, dir: &Path) -> std::io::Result<(u64, u64)> {
        Ok(Self::identity(dir))
    }
}
