//! Bounded chains. Every snapshot or clone adds a layer under a volume; once a volume's chain
//! is deeper than `max_chain_depth`, a background task copies what the backing chain shows
//! into one new standalone layer (`qemu-img convert`, no guard held: backing layers never
//! change) and then, briefly under the volume's guard, points the active layer at it
//! (`qemu-img rebase -u`: the content is the same) and switches the record. Snapshot layers
//! are left as they are; the old layers go when nothing references them.
//!
//! Progress is recorded in `flatten/<volume key>.json` (Converting → Switching); after a
//! crash a Converting job is undone and a Switching job finished. Attached volumes wait until
//! they are unpublished (a live block-stream belongs to the hypervisor backend).

use super::layers::{key_of_volume, sync_file};
use super::record::{now_secs, FlattenJob, FlattenState, RecordState, SCHEMA};
use super::{qemu_img, Pool, Pools};
use crate::error::{Error, Kind, Result};
use crate::exec;
use crate::fsutil;
use crate::model::ImageFormat;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How soon to look again after a volume's guard was busy.
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
    /// An RPC held the volume: try again soon.
    Busy,
    /// Attached to a node: try again later.
    Attached,
}

impl Pool {
    fn flatten_job_path(&self, key: &str) -> PathBuf {
        self.flatten_dir().join(format!("{key}.json"))
    }

    fn read_flatten_job(&self, key: &str) -> Result<Option<FlattenJob>> {
        fsutil::read_json(&self.flatten_job_path(key))
    }

    fn write_flatten_job(&self, key: &str, job: &FlattenJob) -> Result<()> {
        fsutil::write_json(&self.flatten_job_path(key), job)
    }

    fn remove_flatten_job(&self, key: &str) -> Result<()> {
        fsutil::remove_durable(&self.flatten_job_path(key))
    }

    /// Every job record of the pool.
    fn all_flatten_jobs(&self) -> Result<Vec<FlattenJob>> {
        let dir = self.flatten_dir();
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
        let mut jobs = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
            let name = entry.file_name();
            let Some(key) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if !key.starts_with('.') {
                jobs.extend(self.read_flatten_job(key)?);
            }
        }
        Ok(jobs)
    }

    /// Pool open: undoes copies in progress, finishes switches in progress.
    pub(super) fn recover_flatten_jobs(&self) -> Result<()> {
        for job in self.all_flatten_jobs()? {
            let key = key_of_volume(&job.volume_id)?;
            let key = key.as_str();
            match job.state {
                FlattenState::Converting => {
                    tracing::info!(pool = %self.name(), volume = %job.volume_id,
                        "undoing an interrupted chain flattening");
                    self.remove_flatten_job(key)?;
                }
                FlattenState::Switching => {
                    tracing::info!(pool = %self.name(), volume = %job.volume_id,
                        "finishing an interrupted chain flattening");
                    self.finish_flatten_switch(key, &job)?;
                }
            }
        }
        Ok(())
    }

    /// Points the volume's active layer at the flat layer and records it; idempotent, so a
    /// crash anywhere in here is finished by running it again. Blocking.
    fn finish_flatten_switch(&self, key: &str, job: &FlattenJob) -> Result<()> {
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
                self.write_volume(&rec)?;
                crate::failpoint!("flatten.recorded");
            }
        }
        self.remove_flatten_job(key)
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
            // Deep chains, plus volumes whose job a failed round left behind.
            let todo: Vec<String> = exec::blocking(move || {
                let mut ids: Vec<String> = p
                    .all_volumes()?
                    .into_iter()
                    .filter(|r| r.state == RecordState::Ready && r.depth() > max)
                    .map(|r| r.id)
                    .collect();
                ids.extend(p.all_flatten_jobs()?.into_iter().map(|j| j.volume_id));
                ids.sort();
                ids.dedup();
                Ok(ids)
            })
            .await?;
            for id in todo {
                match self.flatten_volume(&pool, &id).await {
                    Ok(Outcome::Done) => {}
                    Ok(o) => again = Some(again.map_or(o, |a| a.min(o))),
                    Err(e) => {
                        tracing::warn!(volume = %id, error = %e, "could not flatten the chain");
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

    async fn flatten_volume(&self, pool: &Arc<Pool>, id: &str) -> Result<Outcome> {
        let key = key_of_volume(id)?;
        let guard_key = [crate::guard::volume_key(&key)];
        let Ok(guard) = self.layers.guards.try_acquire(&guard_key) else {
            return Ok(Outcome::Busy);
        };
        let (p, k) = (pool.clone(), key.clone());
        if let Some(job) = exec::blocking(move || p.read_flatten_job(&k)).await? {
            // Left by an earlier round that failed half-way.
            let (p, k) = (pool.clone(), key.clone());
            let finished = exec::blocking(move || {
                match job.state {
                    FlattenState::Switching => p.finish_flatten_switch(&k, &job)?,
                    FlattenState::Converting => p.remove_flatten_job(&k)?,
                }
                p.collect_garbage().map(drop)
            })
            .await;
            if let Some(outcome) = busy_if_locked(id, finished)? {
                return Ok(outcome);
            }
        }
        let Some(rec) = self.volume(id).await? else {
            return Ok(Outcome::Done);
        };
        if rec.depth() <= self.layers.max_chain_depth || rec.chain.freezing.is_some() {
            return Ok(Outcome::Done);
        }
        if !self.layers.attachments.nodes_of(id).await?.is_empty() {
            tracing::debug!(volume = %id, "chain flattening waits until the volume is unpublished");
            return Ok(Outcome::Attached);
        }
        let (p, k) = (pool.clone(), key.clone());
        let layer = exec::blocking(move || p.new_layer_name(&k, ImageFormat::Qcow2)).await?;
        let now = now_secs();
        let mut job = FlattenJob {
            schema: SCHEMA,
            volume_id: rec.id.clone(),
            image: rec.image.clone(),
            source: rec.chain.backing.clone(),
            layer,
            state: FlattenState::Converting,
            started_at: now,
            updated_at: now,
        };
        let (p, k, j) = (pool.clone(), key.clone(), job.clone());
        exec::blocking(move || p.write_flatten_job(&k, &j)).await?;
        crate::failpoint!("flatten.job-written");
        drop(guard);

        tracing::info!(volume = %id, depth = rec.depth(), into = %job.layer, "flattening the backing chain");
        let (src, dst) = (pool.image_path(&job.source[0]), pool.image_path(&job.layer));
        let copied = async {
            qemu_img::convert_flat(&src, &dst).await?;
            let p = pool.clone();
            exec::blocking(move || {
                sync_file(&dst)?;
                fsutil::sync_dir(&p.images_dir())
            })
            .await
        }
        .await;
        if let Err(e) = copied {
            self.abandon_flatten(pool, &key).await;
            return Err(e);
        }
        crate::failpoint!("flatten.converted");

        // The switch: brief, under the volume's guard, and only if nothing changed meanwhile.
        let deadline = tokio::time::Instant::now() + SWITCH_WAIT;
        let guard = loop {
            match self.layers.guards.try_acquire(&guard_key) {
                Ok(g) => break g,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(_) => {
                    self.abandon_flatten(pool, &key).await;
                    return Ok(Outcome::Busy);
                }
            }
        };
        let current = self.volume(id).await?;
        let unchanged = current.as_ref().is_some_and(|r| {
            r.image == job.image && r.chain.backing == job.source && r.chain.freezing.is_none()
        });
        if !unchanged {
            self.abandon_flatten(pool, &key).await;
            return Ok(if current.is_some() {
                Outcome::Busy
            } else {
                Outcome::Done
            });
        }
        if !self.layers.attachments.nodes_of(id).await?.is_empty() {
            self.abandon_flatten(pool, &key).await;
            return Ok(Outcome::Attached);
        }
        job.state = FlattenState::Switching;
        job.updated_at = now_secs();
        let (p, k) = (pool.clone(), key.clone());
        let switched = exec::blocking(move || {
            p.write_flatten_job(&k, &job)?;
            crate::failpoint!("flatten.switching");
            p.finish_flatten_switch(&k, &job)?;
            if let Err(e) = p.collect_garbage() {
                tracing::warn!(pool = %p.name(), error = %e, "layer cleanup deferred");
            }
            Ok(())
        })
        .await;
        drop(guard);
        if let Some(outcome) = busy_if_locked(id, switched)? {
            return Ok(outcome);
        }
        tracing::info!(volume = %id, "backing chain flattened");
        Ok(Outcome::Done)
    }

    /// Drops a job that did not finish; its copy is collected as garbage.
    async fn abandon_flatten(&self, pool: &Arc<Pool>, key: &str) {
        let (p, k) = (pool.clone(), key.to_string());
        let undone = exec::blocking(move || {
            p.remove_flatten_job(&k)?;
            p.collect_garbage().map(drop)
        })
        .await;
        if let Err(e) = undone {
            tracing::warn!(pool = %pool.name(), error = %e, "could not drop a flattening job; the next start will");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
