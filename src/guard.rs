//! Per-object operation guard within one process: a second concurrent operation on the same
//! object is rejected with ABORTED (CSI "operation pending"), as the spec allows. The node
//! service uses it; the controller's volumes and snapshots are guarded by locks in their pool
//! (`pool::store`), which also exclude other processes.
//!
//! [`InFlight`] runs the controller's changes: each as a task of its own that owns its locks
//! and its work, so a cancelled RPC (deadline, disconnect) neither releases a lock while the
//! work goes on nor stops the work half way; and a request identical to one in flight waits
//! for that one's result instead of being refused.
//!
//! Those tasks belong to the process's shutdown ([`Shutdown::spawn_to_end`]): work whose
//! client gave up (a detach an impatient client abandoned) is joined at SIGTERM within the
//! grace period, like the RPCs in flight, and aborted and named in the log (object and
//! operation) when the grace period is over. The shutdown does not stop it before: stopping a
//! change half way is what a crash would be, and the grace period exists to avoid that. After
//! the shutdown began, the server accepts no new RPC, but one accepted before may still start
//! its change here: it runs and is joined the same way, so the RPC gets its answer if the grace
//! period allows.

use crate::error::{Error, Result};
use crate::shutdown::Shutdown;
use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use tracing::Instrument;

/// The set of objects (volumes, snapshots) with an operation in flight, shared by the services of one process.
#[derive(Clone, Default)]
pub struct OpGuards {
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Held while an operation runs; releases its keys on drop.
pub(crate) struct OpGuard {
    busy: Arc<Mutex<HashSet<String>>>,
    keys: Vec<String>,
}

impl OpGuards {
    /// Takes every key or none. Keys are like `vol:<id>`, `snap:<id>`.
    pub(crate) fn try_acquire(&self, keys: &[String]) -> Result<OpGuard> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = keys.iter().find(|k| busy.contains(*k)) {
            return Err(Error::Aborted(format!(
                "an operation on {} is already in progress; retry later",
                describe(k)
            )));
        }
        for k in keys {
            busy.insert(k.clone());
        }
        Ok(OpGuard {
            busy: self.busy.clone(),
            keys: keys.to_vec(),
        })
    }
}

fn describe(key: &str) -> String {
    match key.split_once(':') {
        Some(("vol", id)) => format!("volume {id}"),
        Some(("snap", id)) => format!("snapshot {id}"),
        Some(("group", id)) => format!("group snapshot {id}"),
        _ => key.to_string(),
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        for k in &self.keys {
            busy.remove(k);
        }
    }
}

/// The operations in flight on objects (`vol:<id>`, `volname:<name>`, …), each run by a task
/// of its own that the process's shutdown joins; shared by the clones of one service.
#[derive(Clone)]
pub(crate) struct InFlight {
    running: Arc<Mutex<HashMap<String, Running>>>,
    next: Arc<AtomicU64>,
    shutdown: Shutdown,
}

/// One operation in flight: what it is, and where its result will appear (a
/// `watch::Receiver<Option<V>>` of the operation's result type).
struct Running {
    op: String,
    id: u64,
    result: Box<dyn Any + Send + Sync>,
}

impl InFlight {
    /// No operation in flight yet; their tasks are joined by `shutdown`.
    pub(crate) fn new(shutdown: &Shutdown) -> InFlight {
        InFlight {
            running: Arc::default(),
            next: Arc::default(),
            shutdown: shutdown.clone(),
        }
    }

    /// Runs `work` on `object` as a task of its own and waits for its result (`op`: the
    /// operation's name, then its arguments, e.g. `publish <request>`); a caller that
    /// gives up (its future is dropped) leaves the task running to its end, with whatever
    /// locks `work` took. While it runs, a call with the same `object` and `op` (the whole
    /// request, as the caller describes it: an identical retry) does not start `work` again
    /// but waits for the running one's result. A call with another `op` starts its own `work`,
    /// whose locks decide (ABORTED while the first holds them). The task is joined by the
    /// shutdown (see the module doc). Errs (INTERNAL) only when the task died without a result
    /// (a panic, or aborted when the grace period was over).
    pub(crate) async fn run<V, F>(&self, object: String, op: String, work: F) -> Result<V>
    where
        V: Clone + Send + Sync + 'static,
        F: Future<Output = V> + Send + 'static,
    {
        let mut rx = self.join_or_start(object, op, work);
        let got = rx.wait_for(Option::is_some).await;
        match got {
            Ok(v) => Ok(v.clone().expect("waited for a result")),
            Err(_) => Err(Error::internal(
                "the task running the operation ended without a result; see the log",
            )),
        }
    }

    fn join_or_start<V, F>(&self, object: String, op: String, work: F) -> watch::Receiver<Option<V>>
    where
        V: Clone + Send + Sync + 'static,
        F: Future<Output = V> + Send + 'static,
    {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let same = running
            .get(&object)
            .filter(|r| r.op == op)
            .and_then(|r| r.result.downcast_ref::<watch::Receiver<Option<V>>>());
        if let Some(rx) = same {
            tracing::info!(object = %object, "an identical request is in flight: waiting for its result");
            return rx.clone();
        }
        let (tx, rx) = watch::channel(None);
        // How the shutdown names the task, should it have to give it up: the object and the
        // operation (the first word of `op`; the rest is the request's arguments).
        let verb = op.split_whitespace().next().unwrap_or_default();
        let name = format!("{object} {verb}");
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        // Another operation in flight keeps its entry: this one's locks will refuse it.
        let registered = !running.contains_key(&object);
        if registered {
            running.insert(
                object.clone(),
                Running {
                    op,
                    id,
                    result: Box::new(rx.clone()),
                },
            );
        }
        drop(running);
        let all = self.running.clone();
        self.shutdown.spawn_to_end(
            name,
            async move {
                let v = work.await;
                // The result first, then the entry goes: a caller that joined in between
                // finds it.
                tx.send_replace(Some(v));
                if registered {
                    let mut running = all.lock().unwrap_or_else(|p| p.into_inner());
                    if running.get(&object).is_some_and(|r| r.id == id) {
                        running.remove(&object);
                    }
                }
            }
            .in_current_span(),
        );
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

    #[test]
    fn second_acquire_is_aborted_until_release() {
        let g = OpGuards::default();
        let a = g.try_acquire(&["vol:a".into(), "name:x".into()]).unwrap();
        let err = g.try_acquire(&["name:x".into()]).err().unwrap();
        assert!(matches!(err, Error::Aborted(_)));
        // All-or-nothing: "vol:b" must not stay taken by the failed attempt.
        assert!(g.try_acquire(&["vol:b".into(), "vol:a".into()]).is_err());
        drop(a);
        g.try_acquire(&["vol:b".into(), "vol:a".into()]).unwrap();
    }

    /// A caller that gives up does not stop the work; an identical request joins it and gets
    /// its result; another request on the same object runs its own work.
    #[tokio::test]
    async fn work_outlives_its_caller_and_identical_requests_share_it() {
        let f = InFlight::new(&Shutdown::new(Duration::from_secs(30)));
        let runs = Arc::new(AtomicU64::new(0));
        let (release_tx, release_rx) = watch::channel(false);
        let slow = |runs: Arc<AtomicU64>, mut release: watch::Receiver<bool>| async move {
            runs.fetch_add(1, Ordering::SeqCst);
            release.wait_for(|r| *r).await.unwrap();
            "done"
        };
        let first = f.run(
            "vol:a".into(),
            "unpublish n1".into(),
            slow(runs.clone(), release_rx.clone()),
        );
        // Started, then abandoned by its caller.
        let gave_up = tokio::time::timeout(std::time::Duration::from_millis(50), first).await;
        assert!(gave_up.is_err());
        let joined = tokio::spawn({
            let (f, runs, rx) = (f.clone(), runs.clone(), release_rx.clone());
            async move {
                f.run("vol:a".into(), "unpublish n1".into(), slow(runs, rx))
                    .await
            }
        });
        let other = f.run("vol:a".into(), "unpublish n2".into(), async { "other" });
        assert_eq!(other.await.unwrap(), "other");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!joined.is_finished());
        release_tx.send_replace(true);
        assert_eq!(joined.await.unwrap().unwrap(), "done");
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "the identical request ran no work"
        );
        // Finished: the same request runs anew.
        let again = f.run("vol:a".into(), "unpublish n1".into(), async { "again" });
        assert_eq!(again.await.unwrap(), "again");
    }

    /// Starts `work` as `vol:a unpublish "n1"` and gives up waiting for it, as an impatient
    /// client does.
    async fn abandon<F>(f: &InFlight, work: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let run = f.run("vol:a".into(), format!("unpublish {:?}", "n1"), work);
        let gave_up = tokio::time::timeout(Duration::from_millis(10), run).await;
        assert!(gave_up.is_err(), "the work is still running");
    }

    /// The shutdown waits for work whose caller gave up, until it has finished.
    #[tokio::test(start_paused = true)]
    async fn the_shutdown_joins_abandoned_work_that_ends_within_the_grace_period() {
        let s = Shutdown::new(Duration::from_secs(30));
        let f = InFlight::new(&s);
        let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
        abandon(&f, async move {
            // Not stopped by the shutdown: it runs to its end.
            tokio::time::sleep(Duration::from_secs(5)).await;
            done_tx.send("detached").unwrap();
        })
        .await;
        assert_eq!(s.tracked(), ["vol:a unpublish"]);
        let started = Instant::now();
        assert!(s.join("test").await.is_empty(), "nothing given up");
        let took = started.elapsed();
        assert_eq!(
            done_rx.try_recv(),
            Ok("detached"),
            "finished before the join returned"
        );
        assert!(
            took >= Duration::from_secs(4),
            "waited for the work: {took:?}"
        );
        assert!(
            took < Duration::from_secs(30),
            "not the whole grace: {took:?}"
        );
    }

    /// Work still running when the grace period is over is aborted and named.
    #[tokio::test(start_paused = true)]
    async fn the_shutdown_gives_up_work_that_outlasts_the_grace_period() {
        let s = Shutdown::new(Duration::from_secs(2));
        let f = InFlight::new(&s);
        let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
        abandon(&f, async move {
            let _dropped = dropped_tx;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        })
        .await;
        let started = Instant::now();
        assert_eq!(s.join("test").await, ["vol:a unpublish"]);
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(2), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert!(dropped_rx.await.is_err(), "the work was aborted");
        assert!(s.tracked().is_empty());
    }

    /// Work started after the shutdown began (by an RPC in flight) still runs, and is joined.
    #[tokio::test(start_paused = true)]
    async fn work_started_during_the_shutdown_runs_and_is_joined() {
        let s = Shutdown::new(Duration::from_secs(30));
        let f = InFlight::new(&s);
        s.begin("test");
        let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
        abandon(&f, async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            done_tx.send(()).unwrap();
        })
        .await;
        assert!(s.join("test").await.is_empty());
        assert_eq!(done_rx.try_recv(), Ok(()));
        let answered = f.run("vol:b".into(), "delete".into(), async { "deleted" });
        assert_eq!(answered.await.unwrap(), "deleted");
    }

    /// Finished work leaves the shutdown's list: a long-running process does not accumulate it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finished_work_leaves_the_shutdown_list() {
        let s = Shutdown::new(Duration::from_secs(30));
        let f = InFlight::new(&s);
        for round in 0..50 {
            let runs = (0..20).map(|i| {
                let f = f.clone();
                tokio::spawn(async move {
                    f.run(
                        format!("vol:{round}-{i}"),
                        "delete".into(),
                        async move { i },
                    )
                    .await
                    .unwrap()
                })
            });
            for (i, run) in runs.enumerate() {
                assert_eq!(run.await.unwrap(), i);
            }
            // A task ends just after its result is sent: at most this round's are left, and
            // a few of the last round's whose threads were preempted in between.
            assert!(s.tracked().len() <= 40, "round {round}: {:?}", s.tracked());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !s.tracked().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(
            s.tracked(),
            Vec::<String>::new(),
            "every finished task left"
        );
        assert!(s.join("test").await.is_empty());
    }
}
