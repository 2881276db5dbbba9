//! Bounded calls on paths that may hang.
//!
//! A system call on a filesystem whose server is dead (NFS, FUSE) can block for ever and
//! cannot be cancelled. [`Probes`] runs such calls on plain worker threads and waits for each
//! at most a timeout. A call that overruns is abandoned (its thread stays blocked in the
//! kernel) and its key (the path it touched) is remembered as hung: until that thread returns,
//! further calls on the key answer [`Hung::Still`] at once instead of starting yet another
//! thread that would block the same way. So one dead mount costs at most one blocked thread,
//! however often the kubelet, the metrics sampler or reconciliation ask about it, and calls on
//! other keys never wait for it. The bookkeeping mutex is never held across I/O.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a bounded call has no result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hung {
    /// The call did not return within the timeout; it was abandoned.
    TimedOut,
    /// An earlier call on the same key is still blocked; nothing was started.
    Still,
}

/// Threads blocked on hung keys.
#[derive(Debug, Default)]
pub struct Probes {
    state: Mutex<State>,
    /// Worker threads waiting for their next job, one sender each. Bounded calls sit on the
    /// node's hot paths (every publish looks at its target and storage), so a worker that is
    /// done waits here to be reused instead of a thread being spawned for each call.
    idle: Arc<Mutex<Vec<mpsc::Sender<Job>>>>,
}

/// What a worker thread runs: one [`Probes::run_each`] worker loop.
type Job = Box<dyn FnOnce() + Send>;

/// At most this many finished workers wait for reuse; more exit.
const MAX_IDLE: usize = 2 * WORKERS;

#[derive(Debug, Default)]
struct State {
    /// Abandoned, still blocked calls per key.
    stuck: HashMap<String, usize>,
    /// Abandoned calls whose key was [`Probes::forget`]ten (the hung mount was detached).
    orphaned: usize,
}

/// What a worker thread and its waiter share about the item in hand.
#[derive(Debug, Default)]
struct Worker {
    /// Index of the item the worker is running, and when it started.
    current: Option<(usize, Instant)>,
    /// The waiter gave up on the current item; the worker must stop after it.
    abandoned: bool,
}

impl Probes {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether an abandoned call on `key` is still blocked.
    pub fn is_hung(&self, key: &str) -> bool {
        self.lock().stuck.contains_key(key)
    }

    /// Calls abandoned and still blocked, over all keys (for logs and metrics).
    pub fn blocked_threads(&self) -> usize {
        let state = self.lock();
        state.stuck.values().sum::<usize>() + state.orphaned
    }

    /// Stops treating `key` as hung although its abandoned calls are still blocked: what hung
    /// there was detached, so the path now leads somewhere else and may be probed again.
    pub fn forget(&self, key: &str) {
        let mut state = self.lock();
        if let Some(n) = state.stuck.remove(key) {
            state.orphaned += n;
        }
    }

    /// An abandoned call on `key` returned.
    fn release(&self, key: &str) {
        let mut state = self.lock();
        match state.stuck.get_mut(key) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                state.stuck.remove(key);
            }
            None => state.orphaned = state.orphaned.saturating_sub(1),
        }
    }

    /// Runs `job` on an idle worker thread, or on a new one; `false` if no thread could be
    /// started. A worker blocked in a hung call is never idle, so it is never handed a job.
    fn execute(&self, job: Job) -> bool {
        let mut job = job;
        loop {
            let Some(worker) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
                break;
            };
            match worker.send(job) {
                Ok(()) => return true,
                // That worker is gone; try the next one.
                Err(mpsc::SendError(returned)) => job = returned,
            }
        }
        let idle = Arc::downgrade(&self.idle);
        std::thread::Builder::new()
            .name("k8scsi-probe".into())
            .spawn(move || {
                let mut job = job;
                loop {
                    job();
                    // Offer this thread for the next job; exit when the probes are gone or
                    // enough threads already wait. Only the sender is kept in the list, so
                    // dropping the probes ends every waiting worker.
                    let (sender, next) = mpsc::channel();
                    {
                        let Some(idle) = idle.upgrade() else { return };
                        let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
                        if idle.len() >= MAX_IDLE {
                            return;
                        }
                        idle.push(sender);
                    }
                    match next.recv() {
                        Ok(next) => job = next,
                        Err(_) => return,
                    }
                }
            })
            .is_ok()
    }

    /// Runs `work` on a worker thread and waits at most `timeout` for it.
    pub fn run<T: Send + 'static>(
        self: &Arc<Self>,
        key: &str,
        timeout: Duration,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Hung> {
        let work = Mutex::new(Some(work));
        let mut results = self.run_each(
            vec![(key.to_string(), ())],
            timeout,
            Arc::new(move |()| {
                let work = work
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .expect("run_each calls the work once per item");
                work()
            }),
        );
        results.pop().unwrap_or(Err(Hung::TimedOut))
    }

    /// Runs `work` on every item, on up to [`WORKERS`] worker threads, giving each item at
    /// most `timeout`. An item that overruns is abandoned with its thread and a fresh worker
    /// takes that one's place, so hung items cost about one timeout per [`WORKERS`] of them,
    /// not one each; items whose key is already hung are not run. Results are in the order of
    /// `items`.
    pub fn run_each<I, T>(
        self: &Arc<Self>,
        items: Vec<(String, I)>,
        timeout: Duration,
        work: Arc<dyn Fn(I) -> T + Send + Sync>,
    ) -> Vec<Result<T, Hung>>
    where
        I: Send + 'static,
        T: Send + 'static,
    {
        let count = items.len();
        let keys: Arc<Vec<String>> = Arc::new(items.iter().map(|(k, _)| k.clone()).collect());
        let mut results: Vec<Option<Result<T, Hung>>> = (0..count).map(|_| None).collect();
        let mut filled = 0;
        let mut pending: Vec<(usize, I)> = Vec::with_capacity(count);
        {
            let state = self.lock();
            for (index, (key, item)) in items.into_iter().enumerate() {
                if state.stuck.contains_key(&key) {
                    results[index] = Some(Err(Hung::Still));
                    filled += 1;
                } else {
                    pending.push((index, item));
                }
            }
        }
        let wanted = pending.len().min(WORKERS);
        // The queue is shared, so what an abandoned worker had not reached is there for the
        // others and for its replacement.
        let queue = Arc::new(Mutex::new(VecDeque::from(pending)));
        let (tx, rx) = mpsc::channel::<(usize, T)>();
        let mut workers: Vec<Arc<Mutex<Worker>>> = Vec::new();
        let spawn = |workers: &mut Vec<Arc<Mutex<Worker>>>| -> bool {
            let worker = Arc::new(Mutex::new(Worker::default()));
            let (probes, w, work, keys, q, tx) = (
                self.clone(),
                worker.clone(),
                work.clone(),
                keys.clone(),
                queue.clone(),
                tx.clone(),
            );
            let spawned = self.execute(Box::new(move || {
                loop {
                    // Taken and marked current in one step, so a waiter never abandons an
                    // item this worker has not started.
                    let (index, item) = {
                        let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
                        let Some((index, item)) =
                            q.lock().unwrap_or_else(|p| p.into_inner()).pop_front()
                        else {
                            return;
                        };
                        w.current = Some((index, Instant::now()));
                        (index, item)
                    };
                    let result = work(item);
                    let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
                    if w.abandoned {
                        // The waiter counted this call as stuck; it no longer is.
                        probes.release(&keys[index]);
                        return;
                    }
                    // Sent and cleared while holding the worker lock: a waiter that takes
                    // the lock sees either the item in hand or its result on the way.
                    if tx.send((index, result)).is_err() {
                        return;
                    }
                    w.current = None;
                }
            }));
            if spawned {
                workers.push(worker);
            }
            spawned
        };
        for _ in 0..wanted {
            spawn(&mut workers);
        }
        if workers.is_empty() && wanted > 0 {
            // No thread at all: report the rest as timed out rather than run it here and risk
            // blocking the caller.
            for (index, _) in queue.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
                results[index] = Some(Err(Hung::TimedOut));
                filled += 1;
            }
        }
        while filled < count {
            // Wake at the earliest moment an item in hand overruns.
            let now = Instant::now();
            let wake = workers
                .iter()
                .filter_map(|w| w.lock().unwrap_or_else(|p| p.into_inner()).current)
                .map(|(_, started)| started + timeout)
                .min()
                .unwrap_or(now + timeout);
            match rx.recv_timeout(wake.saturating_duration_since(now)) {
                Ok((index, result)) => {
                    results[index] = Some(Ok(result));
                    filled += 1;
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                // Not while this function holds a sender.
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            let mut replacements = 0;
            workers.retain(|w| {
                let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
                match w.current {
                    Some((index, started)) if started.elapsed() >= timeout => {
                        w.abandoned = true;
                        // Counted while the worker lock is held, so the worker's release when
                        // it returns always finds the count.
                        *self.lock().stuck.entry(keys[index].clone()).or_insert(0) += 1;
                        results[index] = Some(Err(Hung::TimedOut));
                        filled += 1;
                        replacements += 1;
                        false
                    }
                    _ => true,
                }
            });
            for _ in 0..replacements {
                if !queue.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
                    && !spawn(&mut workers)
                    && workers.is_empty()
                {
                    for (index, _) in queue.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
                        results[index] = Some(Err(Hung::TimedOut));
                        filled += 1;
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(Hung::TimedOut)))
            .collect()
    }
}

/// Worker threads of one [`Probes::run_each`] (a ListVolumes page, a usage sample).
pub const WORKERS: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::Receiver;

    /// A call that blocks until its gate is opened (dropping the sender opens it too).
    fn gate() -> (mpsc::Sender<()>, Arc<Mutex<Receiver<()>>>) {
        let (tx, rx) = mpsc::channel();
        (tx, Arc::new(Mutex::new(rx)))
    }

    #[test]
    fn a_hung_key_costs_one_thread_and_other_keys_still_answer() {
        let probes = Arc::new(Probes::default());
        let (open, shut) = gate();
        let s = shut.clone();
        let first = probes.run("a", Duration::from_millis(100), move || {
            let _ = s.lock().unwrap().recv();
            1
        });
        assert_eq!(first, Err(Hung::TimedOut));
        assert!(probes.is_hung("a"));
        assert_eq!(probes.blocked_threads(), 1);
        // Asked again while the first call is blocked: refused at once, nothing started.
        let started = std::time::Instant::now();
        assert_eq!(
            probes.run("a", Duration::from_secs(30), || 2),
            Err(Hung::Still)
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(probes.blocked_threads(), 1);
        assert_eq!(probes.run("b", Duration::from_secs(30), || 3), Ok(3));
        // The blocked call returns: the key is usable again.
        open.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while probes.is_hung("a") {
            assert!(std::time::Instant::now() < deadline, "release not seen");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(probes.blocked_threads(), 0);
        assert_eq!(probes.run("a", Duration::from_secs(30), || 4), Ok(4));
    }

    #[test]
    fn run_each_skips_past_a_hung_item_and_keeps_order() {
        let probes = Arc::new(Probes::default());
        let (open, shut) = gate();
        let items: Vec<(String, u32)> = (0..5).map(|i| (format!("k{i}"), i)).collect();
        let s = shut.clone();
        let results = probes.run_each(
            items.clone(),
            Duration::from_millis(200),
            Arc::new(move |i: u32| {
                if i == 2 {
                    let _ = s.lock().unwrap().recv();
                }
                i * 10
            }),
        );
        assert_eq!(
            results,
            vec![Ok(0), Ok(10), Err(Hung::TimedOut), Ok(30), Ok(40)]
        );
        // The next pass does not wait for item 2 again.
        let again = probes.run_each(items, Duration::from_secs(30), Arc::new(|i: u32| i));
        assert_eq!(again, vec![Ok(0), Ok(1), Err(Hung::Still), Ok(3), Ok(4)]);
        // Forgetting the key (its mount was detached) lets it be probed again at once.
        probes.forget("k2");
        assert!(!probes.is_hung("k2"));
        assert_eq!(probes.blocked_threads(), 1);
        assert_eq!(probes.run("k2", Duration::from_secs(30), || 7), Ok(7));
        drop(open);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while probes.blocked_threads() > 0 {
            assert!(std::time::Instant::now() < deadline, "release not seen");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    #[test]
    fn a_finished_worker_thread_is_reused_and_dropping_the_probes_ends_it() {
        let probes = Arc::new(Probes::default());
        let first = probes
            .run("a", Duration::from_secs(30), || std::thread::current().id())
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while probes.idle.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the worker never became idle");
            std::thread::sleep(Duration::from_millis(5));
        }
        let second = probes
            .run("b", Duration::from_secs(30), || std::thread::current().id())
            .unwrap();
        assert_eq!(first, second, "the idle worker ran the second call");
        // The waiting worker holds no reference to the probes: they can go, and it ends.
        let idle = Arc::downgrade(&probes.idle);
        drop(probes);
        // (A worker may hold the list for a moment while it offers itself.)
        while idle.upgrade().is_some() {
            assert!(
                Instant::now() < deadline,
                "the idle list outlived the probes"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn more_hung_items_than_workers_are_all_abandoned_and_the_rest_answered() {
        let probes = Arc::new(Probes::default());
        let (open, shut) = gate();
        let hung = |i: u32| i.is_multiple_of(2) && i < 12; // 6 hung items, more than WORKERS
        let items: Vec<(String, u32)> = (0..16).map(|i| (format!("k{i}"), i)).collect();
        let s = shut.clone();
        let results = probes.run_each(
            items,
            Duration::from_millis(200),
            Arc::new(move |i: u32| {
                if hung(i) {
                    let _ = s.lock().unwrap().recv();
                }
                i
            }),
        );
        for (i, result) in results.iter().enumerate() {
            let i = i as u32;
            if hung(i) {
                assert_eq!(*result, Err(Hung::TimedOut), "item {i}");
            } else {
                assert_eq!(*result, Ok(i), "item {i}");
            }
        }
        assert_eq!(probes.blocked_threads(), 6);
        drop(open);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while probes.blocked_threads() > 0 {
            assert!(std::time::Instant::now() < deadline, "release not seen");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
