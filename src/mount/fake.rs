//! An in-memory [`Mounter`] for unit tests: it keeps a table of "mounted" targets and the calls
//! made, so engine logic (idempotency, conflicts, cleanup order) is testable without root.
//! [`FakeMounter::hang`] makes calls on a path block like they do on a dead NFS server.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

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
    Detach(PathBuf),
    RemoveTarget(PathBuf),
}

/// A call that [`FakeMounter::hang`] can make block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    Inspect,
    Unmount,
}

/// State of the fake: which targets exist, and which of those have a source mounted.
#[derive(Debug, Default)]
pub struct FakeMounter {
    inner: Mutex<FakeState>,
    /// Calls on paths that block until [`FakeMounter::release`]d.
    hung: Mutex<BTreeSet<(Op, PathBuf)>>,
    released: Condvar,
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

    /// From now on, `op` on `path` blocks (as on a dead server) until
    /// [`FakeMounter::release`] is called for the path.
    pub fn hang(&self, op: Op, path: &Path) {
        self.hung.lock().unwrap().insert((op, path.to_path_buf()));
    }

    /// Lets every call blocked on `path` continue.
    pub fn release(&self, path: &Path) {
        self.hung.lock().unwrap().retain(|(_, p)| p != path);
        self.released.notify_all();
    }

    /// Blocks while `op` on `path` is hung. Called without holding the state lock, so other
    /// paths keep working meanwhile.
    fn wait_if_hung(&self, op: Op, path: &Path) {
        let key = (op, path.to_path_buf());
        let mut hung = self.hung.lock().unwrap();
        while hung.contains(&key) {
            hung = self.released.wait(hung).unwrap();
        }
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
        self.wait_if_hung(Op::Inspect, &path.absolute());
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
        self.inner
            .lock()
            .unwrap()
            .calls
            .push(Call::Unmount(target.absolute()));
        self.wait_if_hung(Op::Unmount, &target.absolute());
        let mut state = self.inner.lock().unwrap();
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

    fn detach(&self, target: &ConfinedPath) -> Result<(), MountError> {
        // Like MNT_DETACH: never waits, even on a hung path.
        let mut state = self.inner.lock().unwrap();
        state.calls.push(Call::Detach(target.absolute()));
        match state.targets.get_mut(&target.absolute()) {
            Some(slot @ Some(_)) => {
                *slot = None;
                Ok(())
            }
            _ => Err(MountError::Io {
                op: "umount -l",
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
