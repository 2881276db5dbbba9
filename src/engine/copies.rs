//! Background snapshot copies under way, by snapshot ID, so DeleteSnapshot can cancel one.
//!
//! A copy task registers itself for as long as it runs. DeleteSnapshot of a snapshot still being
//! copied sets the copy's [`Cancel`] flag and waits (bounded) for the task to end: a cancelled
//! copy removes what it made and the snapshot's record, and releases the keys it held, after
//! which DeleteSnapshot finds nothing left and succeeds. Without this, DeleteSnapshot got
//! ABORTED until a copy of possibly hundreds of gigabytes had finished.
//!
//! At shutdown every copy is stopped the same way but keeps its snapshot: the record stays not
//! ready and the next start copies it again, as after a crash. Otherwise the server would not
//! exit before the longest copy had finished.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::backend::Cancel;

/// The copies that are running.
#[derive(Debug, Default)]
pub struct BackgroundCopies {
    running: Mutex<HashMap<String, Running>>,
    /// Set at shutdown: stopped copies keep their snapshot.
    stopping: AtomicBool,
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

    /// Whether the copy was stopped because the server shuts down (keep the snapshot) rather
    /// than by DeleteSnapshot (remove it).
    pub fn stopped_for_shutdown(&self) -> bool {
        self.copies.stopping.load(Ordering::Acquire)
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
        if self.stopping.load(Ordering::Acquire) {
            cancel.set();
        }
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

    /// Stops every copy for shutdown; copies registered later stop at their first look.
    pub fn stop_all(&self) {
        self.stopping.store(true, Ordering::Release);
        let running = self.lock();
        for copy in running.values() {
            copy.cancel.set();
        }
        if !running.is_empty() {
            tracing::info!(
                copies = running.len(),
                "stopping background snapshot copies; the next start copies them again"
            );
        }
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

    #[test]
    fn stopping_for_shutdown_cancels_every_copy_and_says_why() {
        let copies = Arc::new(BackgroundCopies::default());
        let a = copies.register("snap-a");
        assert!(!a.stopped_for_shutdown());
        copies.stop_all();
        assert!(a.cancel().is_set() && a.stopped_for_shutdown());
        let late = copies.register("snap-b");
        assert!(
            late.cancel().is_set(),
            "a copy started after the stop stops at once"
        );
    }
}
