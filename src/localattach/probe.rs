//! Bounded probes of an attachment's loop device. The kernel answers a loop device's status
//! (LOOP_GET_STATUS64) by asking the FUSE export behind it for the file's attributes, so a
//! storage daemon that does not answer (stopped, stuck on its disk) blocks the caller in the
//! kernel without a bound, and a signal cannot interrupt it. Each probe therefore runs on a
//! thread of its own that the caller stops waiting for after `PROBE_TIMEOUT`, leaving it
//! behind. At most one probe per slot is outstanding: a call that finds one in flight waits
//! for it (within its own bound) and then probes; once a probe has not returned in time, later
//! calls answer at once that the daemon is not answering, so hung probes never pile up, and the
//! slot is probed normally again once the daemon answers it.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long the probes of one look at the slots may take together: a healthy daemon answers
/// in microseconds.
pub(super) const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The least wait for one probe, once the others used up `PROBE_TIMEOUT`.
pub(super) const PROBE_MIN_WAIT: Duration = Duration::from_millis(200);

/// The slots with a probe outstanding (and whether a caller gave up waiting for it), shared
/// with the probe threads.
#[derive(Debug, Default, Clone)]
pub(super) struct Probes {
    shared: Arc<(Mutex<BTreeMap<String, bool>>, Condvar)>,
}

impl Probes {
    fn outstanding(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, bool>> {
        // A probe thread cannot panic while holding it; go on with the set anyway.
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` (which may block in the kernel on the slot's daemon) for slot `key`, waiting
    /// at most `timeout` (for an earlier probe still in flight, then for this one). Err says
    /// why there is no answer: the probe did not return in time (left running), or an earlier
    /// one did not and has not returned yet. Blocking.
    pub(super) fn run<T, F>(&self, key: &str, timeout: Duration, f: F) -> Result<T, String>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let deadline = Instant::now() + timeout;
        let late = || format!("it did not answer within {} ms", timeout.as_millis());
        {
            let mut out = self.outstanding();
            loop {
                match out.get(key) {
                    None => break,
                    Some(true) => return Err("an earlier probe of it has not returned yet".into()),
                    Some(false) => {
                        // Another caller's probe, in flight: its answer is near.
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return Err(late());
                        }
                        out = self
                            .shared
                            .1
                            .wait_timeout(out, left)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                }
            }
            out.insert(key.to_string(), false);
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (me, k) = (self.clone(), key.to_string());
        let spawned = std::thread::Builder::new()
            .name("loop-probe".into())
            .spawn(move || {
                let answer = f();
                me.outstanding().remove(&k);
                me.shared.1.notify_all();
                let _ = tx.send(answer);
            });
        if let Err(e) = spawned {
            self.outstanding().remove(key);
            self.shared.1.notify_all();
            return Err(format!("cannot start a probe thread: {e}"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        rx.recv_timeout(left).map_err(|_| {
            if let Some(hung) = self.outstanding().get_mut(key) {
                *hung = true;
            }
            tracing::warn!(slot = %key, timeout_ms = timeout.as_millis() as u64,
                "a loop device probe did not return in time; left running");
            late()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Instant;

    #[test]
    fn answers_in_time_pass_through() {
        let p = Probes::default();
        assert_eq!(p.run("a", Duration::from_secs(5), || 7), Ok(7));
        assert_eq!(p.run("a", Duration::from_secs(5), || 8), Ok(8));
    }

    #[test]
    fn a_hung_probe_is_left_once_and_later_calls_answer_at_once() {
        let p = Probes::default();
        let (release, hold) = mpsc::channel::<()>();
        let started = Instant::now();
        let first = p.run("a", Duration::from_millis(100), move || hold.recv().is_ok());
        assert!(first.unwrap_err().contains("did not answer"));
        // Outstanding: answered at once, nothing new started (the closure would panic).
        let started_again = Instant::now();
        let again = p.run("a", Duration::from_secs(5), || -> bool { unreachable!() });
        assert!(again.unwrap_err().contains("earlier probe"));
        assert!(started_again.elapsed() < Duration::from_secs(1));
        // Another slot is not affected.
        assert_eq!(p.run("b", Duration::from_secs(5), || 1), Ok(1));
        // Once the hung probe returns, the slot is probed again.
        release.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match p.run("a", Duration::from_secs(5), || 2) {
                Ok(v) => {
                    assert_eq!(v, 2);
                    break;
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_probe_in_flight_is_waited_for_not_taken_for_a_hung_one() {
        let p = Probes::default();
        let (release, hold) = mpsc::channel::<()>();
        let q = p.clone();
        let first = std::thread::spawn(move || {
            q.run("a", Duration::from_secs(5), move || hold.recv().is_ok())
        });
        // Wait until the first probe is in flight.
        while p.outstanding().get("a").is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let q = p.clone();
        let second = std::thread::spawn(move || q.run("a", Duration::from_secs(5), || 3));
        std::thread::sleep(Duration::from_millis(50));
        release.send(()).unwrap();
        assert_eq!(first.join().unwrap(), Ok(true));
        assert_eq!(second.join().unwrap(), Ok(3));
    }
}
