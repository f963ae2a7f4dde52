//! What the daemon keeps per instance, VM or container, while it works on it or it runs: the
//! per-name operation locks and the handle of each running instance. `Daemon` and `Cts` keep a
//! table of each.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, OwnedMutexGuard};

/// One lock per instance name, held across a whole verb.
pub(crate) type OpLocks = Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>;

/// The instances whose main process runs, by name.
pub(crate) type Running = Mutex<HashMap<String, RunHandle>>;

/// A running instance: the pid of its main process (the VMM, or a container's init, as in
/// `Pids::vmm_pid`) and a flag that turns true once the watcher has recorded its end.
#[derive(Debug, Clone)]
pub(crate) struct RunHandle {
    pub(crate) vmm_pid: i32,
    pub(crate) done: watch::Receiver<bool>,
}

/// The lock every verb on `name` holds, so two verbs on one instance never interleave.
pub(crate) async fn op_lock(locks: &OpLocks, name: &str) -> OwnedMutexGuard<()> {
    let m = {
        let mut locks = locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(name.to_string()).or_default().clone()
    };
    m.lock_owned().await
}

/// Drops the lock of a deleted instance, unless another verb is queued on it.
pub(crate) fn forget_lock(locks: &OpLocks, name: &str) {
    let mut locks = locks.lock().unwrap_or_else(|p| p.into_inner());
    if locks.get(name).is_some_and(|m| Arc::strong_count(m) <= 2) {
        locks.remove(name);
    }
}

pub(crate) fn handle(running: &Running, name: &str) -> Option<RunHandle> {
    running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(name)
        .cloned()
}

/// Records `name` as running with main process `pid`; the watcher sends `true` on the returned
/// sender once it has recorded the end.
pub(crate) fn track(running: &Running, name: &str, pid: i32) -> watch::Sender<bool> {
    let (tx, rx) = watch::channel(false);
    running.lock().unwrap_or_else(|p| p.into_inner()).insert(
        name.to_string(),
        RunHandle {
            vmm_pid: pid,
            done: rx,
        },
    );
    tx
}

pub(crate) fn untrack(running: &Running, name: &str) {
    running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(name);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn locks_are_per_name_and_forgotten_when_idle() {
        let locks = OpLocks::default();
        let g = op_lock(&locks, "a").await;
        // Another name is not blocked by "a".
        drop(op_lock(&locks, "b").await);
        // A verb queued on "a" holds the mutex too: the entry stays for it.
        let queued = locks.lock().unwrap()["a"].clone();
        forget_lock(&locks, "a");
        assert!(locks.lock().unwrap().contains_key("a"), "queued: kept");
        drop((g, queued));
        forget_lock(&locks, "a");
        assert!(!locks.lock().unwrap().contains_key("a"));
    }

    #[test]
    fn tracked_handles_see_the_end() {
        let running = Running::default();
        let tx = track(&running, "vm", 42);
        let h = handle(&running, "vm").unwrap();
        assert_eq!(h.vmm_pid, 42);
        tx.send(true).unwrap();
        assert!(*h.done.borrow());
        untrack(&running, "vm");
        assert!(handle(&running, "vm").is_none());
    }
}
