//! Per-object operation guard within one process: a second concurrent operation on the same
//! object is rejected with ABORTED (CSI "operation pending"), as the spec allows. The node
//! service uses it; the controller's volumes and snapshots are guarded by locks in their pool
//! (`pool::store`), which also exclude other processes.

use crate::error::{Error, Result};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
