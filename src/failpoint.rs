//! Crash injection for the reliability tests. `failpoint!("create.record-written")` placed
//! right after a durable step kills the process with SIGKILL when the environment variable
//! `VIRTDISK_FAILPOINT` names that point: no destructor runs, no buffer is flushed, no reply
//! is sent, exactly as after `kill -9`, the OOM killer or a power cut of the process.
//!
//! Why an environment variable and `debug_assertions`: the integration tests drive the real
//! binary that a plain `cargo test --all-targets` builds, and cargo builds that binary without
//! the test crate's features, so points hidden behind a cargo feature (e.g. the `fail` crate's
//! `failpoints`) would never be armed there. Points are compiled into debug builds only (what
//! `cargo test` builds); in a release build every `failpoint!` expands to nothing. In a debug
//! build an unarmed point costs one comparison with a value read once.

/// The environment variable that arms one point by name.
pub const ENV: &str = "VIRTDISK_FAILPOINT";
/// With this set to a number of milliseconds, the armed point pauses the calling thread that
/// long instead of killing the process (each time it is reached): the tests of several
/// processes sharing a pool use it to hold a lock while another process tries to take it.
/// Arm points in blocking code (`exec::blocking`) only with it.
pub const PAUSE_ENV: &str = "VIRTDISK_FAILPOINT_PAUSE_MS";
/// With this set to a path as well, the pause ends as soon as that file exists (and at the
/// latest after the milliseconds of [`PAUSE_ENV`]): a test checks what it must while the
/// point is held, then releases it by creating the file, however slow the machine is.
pub const RELEASE_ENV: &str = "VIRTDISK_FAILPOINT_RELEASE";

/// Every point, in the order an operation reaches them. `tests/reliability_crash.rs` crashes
/// at each of them; the unit test below keeps this list and the call sites in step.
pub const POINTS: &[&str] = &[
    // Every commit of a record (`pool::store`): temp file durable (with the files the record
    // names); change logged under the pool lock; record renamed (or removed), directory synced.
    "store.temp-synced",
    "store.change-logged",
    "store.committed",
    // A new record's journaled commit (`Store::put_new_with`): temp file written (not
    // durable); its line in the change log fdatasynced; renamed into place (not durable).
    "store.temp-written",
    "store.journaled",
    "store.renamed",
    // The checkpoint of journaled creates (`store::journal`), before their files are fsynced.
    "store.checkpoint",
    // Layer files no record names any more, removed after a commit.
    "gc.layer-removed",
    // CreateVolume (and the volume half of a restore or clone): `materialize` (the image
    // written, not yet durable; then the commit; then the answer).
    "create.image-made",
    "create.committed",
    // CreateSnapshot (and the source half of a clone): freezing the active layer.
    "freeze.overlay-made",
    "freeze.intent",
    // Local attach's live switch (`localattach::snapshot`): the overlay node added to the
    // storage daemon; the export switched to it, the slot's record not yet updated.
    "localattach.overlay-added",
    "localattach.switched",
    "freeze.switched",
    "snapshot.recorded",
    // DeleteSnapshot.
    "snapshot.deleted",
    // CreateVolumeGroupSnapshot: the group named Creating, its members recorded, Ready.
    "group.intent",
    "group.members-recorded",
    "group.ready",
    // DeleteVolumeGroupSnapshot: the members removed (the group record still there).
    "group.members-deleted",
    // ControllerExpandVolume (offline).
    "expand.resized",
    // ControllerPublish / Unpublish / ModifyVolume, libvirt hot-plug.
    "libvirt.attached",
    "libvirt.iotune-set",
    "libvirt.detach-requested",
    "libvirt.live-detached",
    // ControllerPublish, any backend: attached, reply not sent.
    "publish.attached",
    // ControllerPublish / Unpublish, local attach.
    "localattach.recorded",
    "localattach.daemon-started",
    "localattach.loop-attached",
    "localattach.loop-detached",
    "localattach.daemon-stopped",
    // NodeStage / NodeUnstage / NodePublish / NodeUnpublish.
    "stage.formatted",
    "stage.mounted",
    "stage.block-bound",
    "unstage.unmounted",
    "node-publish.bound",
    "node-unpublish.unmounted",
    // Background chain flattening.
    "flatten.job-written",
    "flatten.converted",
    "flatten.switching",
    "flatten.rebased",
    "flatten.recorded",
];

/// Kills the process if `name` is the armed point (debug builds only).
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {{
        #[cfg(debug_assertions)]
        $crate::failpoint::hit($name);
    }};
}

/// The armed point, read once.
#[cfg(debug_assertions)]
fn armed() -> Option<&'static str> {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var(ENV).ok().filter(|v| !v.is_empty()))
        .as_deref()
}

/// The pause instead of the kill, read once.
#[cfg(debug_assertions)]
fn pause_ms() -> Option<u64> {
    static PAUSE: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *PAUSE.get_or_init(|| std::env::var(PAUSE_ENV).ok().and_then(|v| v.parse().ok()))
}

/// The file whose existence ends a pause, read once.
#[cfg(debug_assertions)]
fn release_file() -> Option<&'static std::path::Path> {
    static RELEASE: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    RELEASE
        .get_or_init(|| {
            std::env::var_os(RELEASE_ENV)
                .filter(|v| !v.is_empty())
                .map(Into::into)
        })
        .as_deref()
}

/// Holds the calling thread at point `name`: `ms` milliseconds, or until the release file
/// exists if one is named (at most `ms`).
#[cfg(debug_assertions)]
fn pause(name: &str, ms: u64) {
    let limit = std::time::Duration::from_millis(ms);
    let Some(release) = release_file() else {
        eprintln!("failpoint {name}: pausing {ms} ms");
        std::thread::sleep(limit);
        return;
    };
    eprintln!(
        "failpoint {name}: pausing until {} exists (at most {ms} ms)",
        release.display()
    );
    let started = std::time::Instant::now();
    while !release.exists() && started.elapsed() < limit {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    eprintln!("failpoint {name}: released");
}

#[cfg(debug_assertions)]
#[doc(hidden)]
pub(crate) fn hit(name: &'static str) {
    debug_assert!(
        POINTS.contains(&name),
        "failpoint {name} is missing from failpoint::POINTS"
    );
    if armed() == Some(name) {
        if let Some(ms) = pause_ms() {
            pause(name, ms);
            return;
        }
        // Straight to stderr (the plugin's log): the tests check which point fired.
        eprintln!("failpoint {name}: killing the process");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::path::Path;

    fn scan(dir: &Path, found: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                scan(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("failpoint.rs")
            {
                let text = std::fs::read_to_string(&path).unwrap();
                for part in text.split("failpoint!(\"").skip(1) {
                    found.push(part.split('"').next().unwrap().to_string());
                }
            }
        }
    }

    /// Every call site is listed, every listed point has exactly one call site.
    #[test]
    fn points_and_call_sites_match() {
        let mut found = Vec::new();
        scan(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut found,
        );
        let unique: BTreeSet<&str> = found.iter().map(String::as_str).collect();
        assert_eq!(
            unique.len(),
            found.len(),
            "a point is used twice: {found:?}"
        );
        let listed: BTreeSet<&str> = POINTS.iter().copied().collect();
        assert_eq!(listed.len(), POINTS.len(), "a point is listed twice");
        assert_eq!(unique, listed);
    }
}
