//! Background snapshot copies under way, by snapshot ID, so DeleteSnapshot can cancel one.
//!
//! A copy task registers itself for as long as it runs. DeleteSnapshot of a snapshot still being
//! copied sets the copy's [`Cancel`] flag and waits (bounded) for the task to end: a cancelled
//! copy removes what it made and the snapshot's record, and releases the keys it held, after
//! which DeleteSnapshot finds nothing left and succeeds. Without this, DeleteSnapshot got
//! ABORTED until a copy of possibly hundreds of gigabytes had finished.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::backend::Cancel;

/// The copies that are running.
#[derive(Debug, Default)]
pub struct BackgroundCopies {
    running: Mutex<HashMap<String, Running>>,
}

#[derive(Debug)]
struct Running {
    cancel: Arc<Cancel>,
    /// Closed when the copy task has ended (its sender dropped).
    ended: watch::Receiver<()>,
}

/// A copy's registration, held by its task; dropping it ends the registration and wakes
/// whoever waits for the copy to end. Drop it after the task has released its keys.
#[derive(Debug)]
pub struct Registration {
    copies: Arc<BackgroundCopies>,
    snapshot_id: String,
    cancel: Arc<Cancel>,
    _ended: watch::Sender<()>,
}

impl Registration {
    /// The flag the copy looks at.
    pub fn cancel(&self) -> Arc<Cancel> {
        self.cancel.clone()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.copies.lock().remove(&self.snapshot_id);
    }
}

impl BackgroundCopies {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers the copy of `snapshot_id` (the caller holds the snapshot's key, so there is
    /// at most one).
    pub fn register(self: &Arc<Self>, snapshot_id: &str) -> Registration {
        let cancel = Arc::new(Cancel::default());
        let (sender, ended) = watch::channel(());
        self.lock().insert(
            snapshot_id.to_string(),
            Running {
                cancel: cancel.clone(),
                ended,
            },
        );
        Registration {
            copies: self.clone(),
            snapshot_id: snapshot_id.to_string(),
            cancel,
            _ended: sender,
        }
    }

    /// Asks the copy of `snapshot_id` to stop; `None` if none runs. The receiver's `changed()`
    /// returns (with an error) once the copy task has ended.
    pub fn cancel(&self, snapshot_id: &str) -> Option<watch::Receiver<()>> {
        let running = self.lock();
        let copy = running.get(snapshot_id)?;
        copy.cancel.set();
        Some(copy.ended.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cancelling_sets_the_flag_and_the_waiter_wakes_when_the_task_ends() {
        let copies = Arc::new(BackgroundCopies::default());
        assert!(copies.cancel("snap-a").is_none());
        let registration = copies.register("snap-a");
        let flag = registration.cancel();
        assert!(!flag.is_set());
        let mut ended = copies.cancel("snap-a").expect("registered");
        assert!(flag.is_set());
        let waiter = tokio::spawn(async move { ended.changed().await.is_err() });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "woke before the copy ended");
        drop(registration);
        assert!(waiter.await.unwrap(), "woken by the end of the copy");
        assert!(copies.cancel("snap-a").is_none(), "still registered");
    }
}
