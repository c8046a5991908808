//! Bounded chains. Every snapshot or clone adds a layer under a volume; once a volume's chain
//! is deeper than `max_chain_depth`, a background task copies what the backing chain shows
//! into one new standalone layer (`qemu-img convert`, without the volume's lock: backing
//! layers never change) and then, briefly under the volume's lock, points the active layer at
//! it (`qemu-img rebase -u`: the content is the same) and switches the record. Snapshot layers
//! are left as they are; the old layers go when nothing references them.
//!
//! Progress is recorded in `flatten/<volume key>.json` (Converting → Switching), and the job's
//! own lock is held for the whole run, so the flatteners of several processes sharing a pool
//! never work on one volume at once. After a crash a Converting job is undone and a Switching
//! job finished. Attached volumes wait until they are unpublished (a live block-stream belongs
//! to the hypervisor backend).

use super::layers::{sync_file, MaintenanceMark};
use super::record::{now_secs, FlattenJob, FlattenState, RecordState, SCHEMA};
use super::store::{ObjectLock, Slot};
use super::{qemu_img, Pool, Pools};
use crate::error::{Kind, Result};
use crate::exec;
use crate::fsutil;
use crate::model::ImageFormat;
use std::sync::Arc;
use std::time::Duration;

/// How soon to look again after a volume's lock was busy.
const BUSY_RETRY: Duration = Duration::from_secs(2);
/// How soon to look again at attached volumes or after a failure.
const SLOW_RETRY: Duration = Duration::from_secs(30);
/// A pass now and then even without a wake-up (e.g. a volume was unpublished).
const IDLE_PASS: Duration = Duration::from_secs(300);
/// How long the switch waits for an RPC on the volume to finish before giving up this round.
const SWITCH_WAIT: Duration = Duration::from_secs(60);

/// How long to wait after `failures` failed passes in a row: `SLOW_RETRY`, doubling, at most
/// `IDLE_PASS`.
fn failure_backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(8);
    (SLOW_RETRY * 2u32.pow(doublings)).min(IDLE_PASS)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// Flattened, or nothing to do any more.
    Done,
    /// An RPC (or another process) held the volume: try again soon.
    Busy,
    /// Attached to a node: try again later.
    Attached,
}

impl Pool {
    /// Points the volume's active layer at the flat layer and records it, then drops the job;
    /// idempotent, so a crash anywhere in here is finished by running it again. The caller
    /// holds the job's and the volume's locks. Blocking.
    pub(super) fn finish_flatten_switch(&self, key: u64, job: &FlattenJob) -> Result<()> {
        if let Some(mut rec) = self.read_volume(key)? {
            if rec.state == RecordState::Ready
                && rec.image == job.image
                && rec.chain.backing == job.source
            {
                let image = self.image_path(&rec.image);
                qemu_img::rebase_unsafe_blocking(&image, &job.layer)?;
                sync_file(&image)?;
                crate::failpoint!("flatten.rebased");
                rec.chain.backing = vec![job.layer.clone()];
                self.store.put(&rec, |_| Ok(()))?;
                crate::failpoint!("flatten.recorded");
            }
        }
        self.store.remove::<FlattenJob>(key, |_| Ok(())).map(drop)
    }
}

/// Another process (qemu-io, a backup tool) holding the image open for a moment makes the
/// switch fail on qemu's image lock (`Kind::Locked`, decided where qemu-img failed): the
/// Switching job stays and a later round finishes it. Any other failure is a real one.
fn busy_if_locked(volume_id: &str, result: Result<()>) -> Result<Option<Outcome>> {
    match result {
        Ok(()) => Ok(None),
        Err(e) if e.kind() == Some(Kind::Locked) => {
            tracing::info!(volume = %volume_id, error = %e,
                "image busy; finishing the flattening later");
            Ok(Some(Outcome::Busy))
        }
        Err(e) => Err(e),
    }
}

/// Takes an object lock without waiting (`None`: busy).
async fn try_lock(pool: &Arc<Pool>, slot: Slot) -> Result<Option<ObjectLock>> {
    let p = pool.clone();
    exec::blocking(move || p.store.try_lock(slot)).await
}

impl Pools {
    /// Starts the background flattener; it runs until the shutdown begins (a pass in progress
    /// stops like a crash would: its job record says how to finish or undo it).
    pub(crate) fn start_flattener(&self, shutdown: &crate::shutdown::Shutdown) {
        let pools = self.clone();
        shutdown.spawn("chain flattener", async move { pools.flatten_loop().await });
    }

    async fn flatten_loop(self) {
        let mut failures: u32 = 0;
        loop {
            let wait = match self.flatten_pass().await {
                Ok(outcome) => {
                    failures = 0;
                    match outcome {
                        None | Some(Outcome::Done) => IDLE_PASS,
                        Some(Outcome::Busy) => BUSY_RETRY,
                        Some(Outcome::Attached) => SLOW_RETRY,
                    }
                }
                Err(e) => {
                    // A real failure (not a busy image): back off, and say so louder when it
                    // keeps failing.
                    failures = failures.saturating_add(1);
                    let wait = failure_backoff(failures);
                    if failures >= 3 {
                        tracing::error!(error = %e, failures, retry_in_secs = wait.as_secs(),
                            "chain flattening keeps failing");
                    } else {
                        tracing::warn!(error = %e, failures, retry_in_secs = wait.as_secs(),
                            "chain flattening failed; retrying later");
                    }
                    wait
                }
            };
            tokio::select! {
                _ = self.layers.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One pass over every pool. Returns the most urgent reason to come back, if any.
    async fn flatten_pass(&self) -> Result<Option<Outcome>> {
        let max = self.layers.max_chain_depth;
        let mut again: Option<Outcome> = None;
        let mut failure = None;
        for pool in self.all().to_vec() {
            let p = pool.clone();
            // Deep chains, plus volumes whose job a failed round left behind (from the index:
            // no record is read).
            let todo: Vec<u64> = exec::blocking(move || {
                let index = p.store.index()?;
                let mut keys: Vec<u64> = index
                    .volumes_from(0)
                    .filter(|(_, v)| v.state == RecordState::Ready && v.depth() > max)
                    .map(|(k, _)| k)
                    .collect();
                keys.extend(index.jobs().map(|(k, _)| k));
                keys.sort_unstable();
                keys.dedup();
                Ok(keys)
            })
            .await?;
            for key in todo {
                match self.flatten_volume(&pool, key).await {
                    Ok(Outcome::Done) => {}
                    Ok(o) => again = Some(again.map_or(o, |a| a.min(o))),
                    Err(e) => {
                        tracing::warn!(volume = %pool.volume_id(key), error = %e,
                            "could not flatten the chain");
                        failure = Some(e);
                    }
                }
            }
        }
        match (failure, again) {
            (_, Some(Outcome::Busy)) => Ok(Some(Outcome::Busy)),
            (Some(e), _) => Err(e),
            (None, again) => Ok(again),
        }
    }

    /// Flattens one volume's chain, step by step, holding the job's lock throughout.
    async fn flatten_volume(&self, pool: &Arc<Pool>, key: u64) -> Result<Outcome> {
        let Some(_job_lock) = try_lock(pool, Slot::Flatten(key)).await? else {
            return Ok(Outcome::Busy);
        };
        if let Some(outcome) = self.settle_leftover_job(pool, key).await? {
            return Ok(outcome);
        }
        let mut job = match self.start_job(pool, key).await? {
            Ok(job) => job,
            Err(outcome) => return Ok(outcome),
        };
        if let Err(e) = self.convert(pool, &job).await {
            self.abandon_flatten(pool, key).await;
            return Err(e);
        }
        self.switch(pool, key, &mut job).await
    }

    /// Takes the volume's lock without waiting (`None`: busy), marked as background
    /// maintenance from before the try until the mark is dropped (after the lock): a request
    /// finding the lock busy meanwhile waits for the step instead of answering ABORTED.
    async fn try_lock_volume(
        &self,
        pool: &Arc<Pool>,
        key: u64,
    ) -> Result<Option<(ObjectLock, MaintenanceMark)>> {
        let mark = self.layers.maintenance.mark(pool.volume_id(key));
        Ok(try_lock(pool, Slot::Volume(key))
            .await?
            .map(|held| (held, mark)))
    }

    /// Step 1: a job an earlier round left half-way is finished or undone first.
    async fn settle_leftover_job(&self, pool: &Arc<Pool>, key: u64) -> Result<Option<Outcome>> {
        let p = pool.clone();
        let leftover = exec::blocking(move || Ok(p.store.index()?.job(key).is_some())).await?;
        if !leftover {
            return Ok(None);
        }
        let Some((held, _mark)) = self.try_lock_volume(pool, key).await? else {
            return Ok(Some(Outcome::Busy));
        };
        let p = pool.clone();
        let settled = exec::blocking(move || {
            let _held = held;
            p.settle_job(key)
        })
        .await;
        busy_if_locked(&pool.volume_id(key), settled)
    }

    /// Step 2: under the volume's lock, whether the chain still needs flattening, and if so
    /// the job that names the new layer, committed before the layer is made.
    async fn start_job(
        &self,
        pool: &Arc<Pool>,
        key: u64,
    ) -> Result<std::result::Result<FlattenJob, Outcome>> {
        let Some((held, _mark)) = self.try_lock_volume(pool, key).await? else {
            return Ok(Err(Outcome::Busy));
        };
        let p = pool.clone();
        let Some(rec) = exec::blocking(move || p.ready_volume(key)).await? else {
            return Ok(Err(Outcome::Done));
        };
        if rec.depth() <= self.layers.max_chain_depth || rec.chain.freezing.is_some() {
            return Ok(Err(Outcome::Done));
        }
        if !self.layers.attachments.nodes_of(&rec.id).await?.is_empty() {
            tracing::debug!(volume = %rec.id, "chain flattening waits until the volume is unpublished");
            return Ok(Err(Outcome::Attached));
        }
        let p = pool.clone();
        let job = exec::blocking(move || {
            let _held = held;
            let now = now_secs();
            let job = FlattenJob {
                schema: SCHEMA,
                volume_id: rec.id.clone(),
                image: rec.image.clone(),
                source: rec.chain.backing.clone(),
                layer: p.new_layer_name(key, ImageFormat::Qcow2)?,
                state: FlattenState::Converting,
                started_at: now,
                updated_at: now,
            };
            p.store.put(&job, |_| Ok(()))?;
            crate::failpoint!("flatten.job-written");
            Ok(job)
        })
        .await?;
        tracing::info!(volume = %job.volume_id, depth = 1 + job.source.len(), into = %job.layer,
            "flattening the backing chain");
        Ok(Ok(job))
    }

    /// Step 3: the copy, without the volume's lock (the backing layers never change).
    async fn convert(&self, pool: &Arc<Pool>, job: &FlattenJob) -> Result<()> {
        let (src, dst) = (pool.image_path(&job.source[0]), pool.image_path(&job.layer));
        qemu_img::convert_flat(&src, &dst).await?;
        let p = pool.clone();
        exec::blocking(move || {
            sync_file(&dst)?;
            fsutil::sync_dir(&p.images_dir())
        })
        .await?;
        crate::failpoint!("flatten.converted");
        Ok(())
    }

    /// Step 4: the switch, briefly under the volume's lock, and only if the volume did not
    /// change meanwhile.
    async fn switch(&self, pool: &Arc<Pool>, key: u64, job: &mut FlattenJob) -> Result<Outcome> {
        let deadline = tokio::time::Instant::now() + SWITCH_WAIT;
        let (held, _mark) = loop {
            match self.try_lock_volume(pool, key).await? {
                Some(held) => break held,
                None if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                None => {
                    self.abandon_flatten(pool, key).await;
                    return Ok(Outcome::Busy);
                }
            }
        };
        let p = pool.clone();
        let current = exec::blocking(move || p.ready_volume(key)).await?;
        let unchanged = current.as_ref().is_some_and(|r| {
            r.image == job.image && r.chain.backing == job.source && r.chain.freezing.is_none()
        });
        if !unchanged {
            self.abandon_flatten(pool, key).await;
            return Ok(if current.is_some() {
                Outcome::Busy
            } else {
                Outcome::Done
            });
        }
        if !self
            .layers
            .attachments
            .nodes_of(&job.volume_id)
            .await?
            .is_empty()
        {
            self.abandon_flatten(pool, key).await;
            return Ok(Outcome::Attached);
        }
        job.state = FlattenState::Switching;
        job.updated_at = now_secs();
        let (p, j) = (pool.clone(), job.clone());
        let switched = exec::blocking(move || {
            let _held = held;
            p.store.put(&j, |_| Ok(()))?;
            crate::failpoint!("flatten.switching");
            p.finish_flatten_switch(key, &j)
        })
        .await;
        if let Some(outcome) = busy_if_locked(&job.volume_id, switched)? {
            return Ok(outcome);
        }
        tracing::info!(volume = %job.volume_id, "backing chain flattened");
        Ok(Outcome::Done)
    }

    /// Drops a job that did not finish; its copy goes with the commit that stops naming it.
    async fn abandon_flatten(&self, pool: &Arc<Pool>, key: u64) {
        let p = pool.clone();
        let undone =
            exec::blocking(move || p.store.remove::<FlattenJob>(key, |_| Ok(())).map(drop)).await;
        if let Err(e) = undone {
            tracing::warn!(pool = %pool.name(), error = %e,
                "could not drop a flattening job; the next start will");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    fn qemu_img_failure(stderr: &str) -> Error {
        crate::exec::tool_error(
            "qemu-img",
            &crate::exec::Finished {
                code: Some(1),
                stdout: String::new(),
                stderr: stderr.into(),
            },
        )
    }

    #[test]
    fn only_qemus_image_lock_is_a_busy_image() {
        let locked = qemu_img_failure(
            "qemu-img: Could not open '/srv/pool/images/a.qcow2': Failed to get \"write\" lock\n\
             Is another process using the image [/srv/pool/images/a.qcow2]?",
        );
        assert_eq!(
            busy_if_locked("p.a", Err(locked)).unwrap(),
            Some(Outcome::Busy)
        );
        // A real failure in a pool whose path says "block" (and "lock") surfaces.
        let real = qemu_img_failure(
            "qemu-img: Could not open '/srv/blockpool/images/a.qcow2': Could not open backing \
             file: No such file or directory",
        );
        assert!(busy_if_locked("p.a", Err(real)).is_err());
        let io = Error::io(
            "syncing /srv/blockpool/images/a.qcow2",
            std::io::Error::from_raw_os_error(libc::EIO),
        );
        assert!(busy_if_locked("p.a", Err(io)).is_err());
        assert_eq!(busy_if_locked("p.a", Ok(())).unwrap(), None);
    }

    #[test]
    fn failures_back_off_up_to_the_idle_pass() {
        assert_eq!(failure_backoff(1), SLOW_RETRY);
        assert_eq!(failure_backoff(2), SLOW_RETRY * 2);
        assert_eq!(failure_backoff(3), SLOW_RETRY * 4);
        assert_eq!(failure_backoff(50), IDLE_PASS);
    }
}
