//! Per-volume and per-name in-flight guards. A second operation on a key that is already busy
//! fails at once (the adapter answers ABORTED, as the CSI spec asks) instead of queueing behind
//! a long operation; operations on different keys never wait for each other.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// The set of keys with an operation under way.
#[derive(Debug, Default)]
pub struct InFlight {
    keys: Mutex<HashSet<String>>,
}

/// Holds keys until dropped.
#[derive(Debug)]
pub struct InFlightGuard {
    owner: Arc<InFlight>,
    keys: Vec<String>,
}

impl InFlight {
    /// Takes every key in `keys`, or none of them if any is busy (returning the busy one).
    pub fn try_acquire(self: &Arc<Self>, keys: Vec<String>) -> Result<InFlightGuard, String> {
        let mut held = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(busy) = keys.iter().find(|k| held.contains(*k)) {
            return Err(busy.clone());
        }
        held.extend(keys.iter().cloned());
        Ok(InFlightGuard {
            owner: self.clone(),
            keys,
        })
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut held = self.owner.keys.lock().unwrap_or_else(|p| p.into_inner());
        for k in &self.keys {
            held.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_exclusive_until_released() {
        let set = Arc::new(InFlight::default());
        let a = set
            .try_acquire(vec!["name:x".into(), "vol:1".into()])
            .unwrap();
        assert_eq!(set.try_acquire(vec!["vol:1".into()]).unwrap_err(), "vol:1");
        // All-or-nothing: the free key must not stay taken after a failed attempt.
        assert!(
            set.try_acquire(vec!["vol:2".into(), "name:x".into()])
                .is_err()
        );
        let b = set.try_acquire(vec!["vol:2".into()]).unwrap();
        drop(a);
        assert!(set.try_acquire(vec!["name:x".into()]).is_ok());
        drop(b);
    }
}
