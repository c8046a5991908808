//! Pool capacity gauges, read from the pools' indexes and file systems on every scrape (no
//! background task: a scrape sees the state of that moment, and an idle plugin does no work).

use super::registry;
use crate::pool::{Pool, Pools};
use std::sync::Mutex;

static WATCHED: Mutex<Option<Pools>> = Mutex::new(None);

pub(super) fn watch(pools: Pools) {
    *WATCHED.lock().unwrap_or_else(|e| e.into_inner()) = Some(pools);
}

/// Blocking (statvfs and record reads): call from a blocking thread.
pub(super) fn refresh() {
    let Some(pools) = WATCHED.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
        return;
    };
    for pool in pools.all() {
        let up = match refresh_one(pool) {
            Ok(()) => 1,
            Err(e) => {
                tracing::warn!(pool = %pool.name(), error = %e, "pool metrics unavailable");
                0
            }
        };
        registry::get()
            .pool_up
            .with_label_values(&[pool.name()])
            .set(up);
    }
}

fn refresh_one(pool: &Pool) -> crate::error::Result<()> {
    let m = registry::get();
    let name = [pool.name()];
    let st = nix::sys::statvfs::statvfs(pool.dir()).map_err(|e| {
        crate::error::Error::io(
            format!("statvfs {}", pool.dir().display()),
            std::io::Error::from(e),
        )
    })?;
    let fragment = st.fragment_size() as f64;
    m.pool_size_bytes
        .with_label_values(&name)
        .set(st.blocks() as f64 * fragment);
    m.pool_free_bytes
        .with_label_values(&name)
        .set(st.blocks_available() as f64 * fragment);
    let (volumes, provisioned) = pool.usage()?;
    m.pool_volumes.with_label_values(&name).set(volumes as i64);
    for (kind, count) in pool.unreadable_records()? {
        m.pool_unreadable_records
            .with_label_values(&[pool.name(), kind])
            .set(count as i64);
    }
    m.pool_provisioned_bytes
        .with_label_values(&name)
        .set(provisioned as f64);
    if let Some(limit) = pool.config().capacity_bytes {
        m.pool_limit_bytes
            .with_label_values(&name)
            .set(limit as f64);
    }
    Ok(())
}
