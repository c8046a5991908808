//! One shutdown for the whole process, bounded in time.
//!
//! [`Shutdown`] holds one cancellation token. The first SIGTERM or SIGINT (or a failed start)
//! cancels it, and the grace period starts: the gRPC server stops accepting and lets in-flight
//! RPCs finish, every background task started with [`Shutdown::spawn`] (the chain flattener,
//! the metrics server) is stopped and joined, and the work started with
//! [`Shutdown::spawn_to_end`] (the controller's changes, `guard::InFlight`, which outlive a
//! client that gave up) is joined as it runs to its end. All are joined by one
//! [`Shutdown::join`], within the same grace period as the RPCs. When the grace period is over
//! (or at a second signal), whatever still runs is given up: tasks are aborted and named in the
//! log. Work on the blocking pool cannot be interrupted (a libvirt call that never answers);
//! `cli::main` gives it [`ABANDON_WAIT`] more, logs what it leaves behind
//! (`exec::log_unfinished`) and exits anyway.
//!
//! Work started after the shutdown began (by an RPC accepted before it) is still started and
//! joined the same way, as long as the join has not returned; a task leaves the list when it
//! ends, so the list holds only what runs now.
//!
//! A dropped future stops at its next `.await`: the child process it waited for is killed
//! (`exec::run`), its locks and permits held inside blocking closures stay held until those
//! closures return, and the pool records it wrote are whole (written atomically). So stopping
//! a task is what a crash at that point would be, which the pools and the attachments recover
//! from at the next start.

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long blocking work may still run after the grace period before the process exits
/// without it.
pub(crate) const ABANDON_WAIT: Duration = Duration::from_secs(1);

/// The shutdown of one process (cheap to clone: every clone is the same shutdown).
#[derive(Clone)]
pub(crate) struct Shutdown {
    inner: Arc<Inner>,
}

struct Inner {
    /// Cancelled when the shutdown begins.
    token: CancellationToken,
    /// Cancelled by a second signal: the grace period ends at once.
    hurry: CancellationToken,
    grace: Duration,
    /// When the grace period ends (set when the shutdown begins).
    deadline: Mutex<Option<Instant>>,
    /// The background tasks running now, joined by [`Shutdown::join`].
    tasks: Mutex<Tasks>,
}

/// The background tasks running now, by the order they were started in; each removes its own
/// entry when it ends ([`Leave`]).
#[derive(Default)]
struct Tasks {
    next: u64,
    running: BTreeMap<u64, Task>,
}

struct Task {
    /// What the task does, for the log (`chain flattener`, `vol:<id> unpublish "n1"`).
    name: String,
    handle: JoinHandle<()>,
}

/// Removes a task's entry from [`Tasks`] when the task ends (its future is dropped: finished,
/// panicked or aborted).
struct Leave {
    inner: Weak<Inner>,
    id: u64,
}

impl Drop for Leave {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            let mut tasks = inner.tasks.lock().unwrap_or_else(|p| p.into_inner());
            tasks.running.remove(&self.id);
        }
    }
}

impl Shutdown {
    /// A shutdown whose grace period is `grace`; nothing begins it yet.
    pub(crate) fn new(grace: Duration) -> Shutdown {
        Shutdown {
            inner: Arc::new(Inner {
                token: CancellationToken::new(),
                hurry: CancellationToken::new(),
                grace,
                deadline: Mutex::new(None),
                tasks: Mutex::new(Tasks::default()),
            }),
        }
    }

    /// Begins the shutdown at the first SIGTERM/SIGINT and ends its grace period at the second.
    /// The handlers are installed now, so no signal is lost once this returns.
    pub(crate) fn on_signals(&self) -> Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let handler = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| Error::io(format!("installing the {name} handler"), e))
        };
        let mut term = handler(SignalKind::terminate(), "SIGTERM")?;
        let mut int = handler(SignalKind::interrupt(), "SIGINT")?;
        let this = self.clone();
        // Not a tracked task: it must outlive the join to see a second signal.
        tokio::spawn(async move {
            let first = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            this.begin(first);
            let second = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::warn!(
                signal = second,
                "second signal: ending the grace period now"
            );
            this.inner.hurry.cancel();
        });
        Ok(())
    }

    /// Begins the shutdown (once; later calls do nothing): the token is cancelled and the
    /// grace period starts now.
    pub(crate) fn begin(&self, why: &str) {
        {
            let mut deadline = self
                .inner
                .deadline
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if deadline.is_some() {
                return;
            }
            *deadline = Some(Instant::now() + self.inner.grace);
        }
        tracing::info!(
            reason = why,
            grace_secs = self.inner.grace.as_secs_f64(),
            "shutting down"
        );
        self.inner.token.cancel();
    }

    /// Completes when the shutdown begins.
    pub(crate) async fn begun(&self) {
        self.inner.token.cancelled().await;
    }

    /// Completes when the grace period is over (or a second signal came); pending until the
    /// shutdown begins.
    pub(crate) async fn grace_over(&self) {
        self.begun().await;
        let deadline = self
            .inner
            .deadline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .expect("a begun shutdown has a deadline");
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {}
            _ = self.inner.hurry.cancelled() => {}
        }
    }

    /// Runs `task` in the background until it ends or the shutdown begins; then it is dropped
    /// at its next `.await` (see the module doc for what that means) and [`Shutdown::join`]
    /// waits for it.
    pub(crate) fn spawn<F>(&self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let token = self.inner.token.clone();
        self.track(name.to_string(), async move {
            tokio::select! {
                _ = token.cancelled() => tracing::debug!(task = name, "stopping"),
                _ = task => {}
            }
        });
    }

    /// Runs `task` in the background to its end: the shutdown does not stop it, but
    /// [`Shutdown::join`] waits for it within the grace period and aborts it after (logged as
    /// `name`). Started after the shutdown began, it still runs and is joined the same way.
    pub(crate) fn spawn_to_end<F>(&self, name: String, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.track(name, task);
    }

    /// Spawns `task` and lists it until it ends.
    fn track<F>(&self, name: String, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        // Listed before the task can end: it waits for this lock to remove its entry.
        let mut tasks = self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let id = tasks.next;
        tasks.next += 1;
        let inner = Arc::downgrade(&self.inner);
        let handle = tokio::spawn(async move {
            // Made inside the task: a future dropped unspawned must not take the lock.
            let _leave = Leave { inner, id };
            task.await
        });
        tasks.running.insert(id, Task { name, handle });
    }

    /// The names of the background tasks listed now (those running, and any that are ending).
    #[cfg(test)]
    pub(crate) fn tracked(&self) -> Vec<String> {
        let tasks = self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        tasks.running.values().map(|t| t.name.clone()).collect()
    }

    /// Begins the shutdown if nothing did yet, then waits for every background task (those
    /// started meanwhile too) until the grace period is over; those still running then are
    /// aborted and named in the log. Returns the names of the tasks given up.
    pub(crate) async fn join(&self, why: &str) -> Vec<String> {
        self.begin(why);
        let mut given_up = Vec::new();
        let grace_over = self.grace_over();
        tokio::pin!(grace_over);
        let mut late = false;
        loop {
            let tasks = std::mem::take(
                &mut self
                    .inner
                    .tasks
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .running,
            );
            if tasks.is_empty() {
                return given_up;
            }
            for Task { name, mut handle } in tasks.into_values() {
                if !late {
                    tokio::select! {
                        joined = &mut handle => {
                            if let Err(e) = joined {
                                tracing::warn!(task = %name, error = %e, "background task failed");
                            }
                            continue;
                        }
                        _ = &mut grace_over => late = true,
                    }
                }
                if handle.is_finished() {
                    continue;
                }
                handle.abort();
                tracing::warn!(
                    task = %name,
                    "background task still running after the grace period: given up"
                );
                given_up.push(name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_stop_when_the_shutdown_begins_and_are_joined() {
        let s = Shutdown::new(Duration::from_secs(30));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        s.spawn("forever", async move {
            // Dropped (not finished) at the shutdown: the sender goes with it.
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        s.spawn("quick", async {});
        assert!(!s.inner.token.is_cancelled());
        let started = std::time::Instant::now();
        assert!(s.join("test").await.is_empty());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "joined without waiting out the grace"
        );
        assert!(rx.await.is_err(), "the task was dropped");
        assert!(s.inner.token.is_cancelled());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_that_ignores_the_shutdown_is_given_up_after_the_grace_period() {
        let s = Shutdown::new(Duration::from_millis(200));
        // A task that cannot be dropped at an await: it blocks its worker thread.
        s.spawn("stuck", async {
            std::thread::sleep(Duration::from_millis(1500));
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        assert_eq!(s.join("test").await, ["stuck"]);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(150), "{took:?}");
        assert!(
            took < Duration::from_millis(1400),
            "did not wait for the stuck task: {took:?}"
        );
    }

    /// Work started to its end is not stopped by the shutdown, and work it starts while the
    /// join waits is joined too.
    #[tokio::test(start_paused = true)]
    async fn work_started_while_joining_is_joined_too() {
        let s = Shutdown::new(Duration::from_secs(30));
        let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
        let starts = s.clone();
        s.spawn_to_end("first".into(), async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            starts.spawn_to_end("second".into(), async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                done_tx.send(()).unwrap();
            });
        });
        let started = Instant::now();
        assert!(s.join("test").await.is_empty());
        assert_eq!(done_rx.try_recv(), Ok(()), "the second finished first");
        assert!(started.elapsed() >= Duration::from_secs(2));
        assert!(s.tracked().is_empty());
    }

    #[tokio::test]
    async fn grace_begins_once_and_a_hurry_ends_it() {
        let s = Shutdown::new(Duration::from_secs(3600));
        s.begin("first");
        let deadline = s.inner.deadline.lock().unwrap().unwrap();
        s.begin("second");
        assert_eq!(*s.inner.deadline.lock().unwrap(), Some(deadline));
        s.inner.hurry.cancel();
        tokio::time::timeout(Duration::from_secs(5), s.grace_over())
            .await
            .expect("a second signal ends the grace period");
    }
}
