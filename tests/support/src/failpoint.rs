//! A debug build's failpoint armed to pause until the test releases it
//! (`virtdisk_csi::failpoint::RELEASE_ENV`): what must happen while an operation is held is
//! checked before the release, however slow the machine is, instead of within a fixed pause.
//!
//! ```ignore
//! let hold = Hold::new("libvirt.attached");
//! let p = Plugin::launch("controller").env(&hold.env()).start().await;
//! // ... start the call, p.wait_paused("libvirt.attached", 1).await, check ...
//! hold.release();
//! ```

use std::time::Duration;
use virtdisk_csi::failpoint::{ENV, PAUSE_ENV, RELEASE_ENV};

/// The longest a held point pauses if the test never releases it.
pub const HOLD_LIMIT: Duration = Duration::from_secs(120);

/// One armed point and the file that releases it. Dropping it releases the point.
pub struct Hold {
    point: String,
    dir: tempfile::TempDir,
}

impl Hold {
    pub fn new(point: &str) -> Hold {
        Hold {
            point: point.to_string(),
            dir: tempfile::tempdir().expect("a temp dir for the release file"),
        }
    }

    fn release_file(&self) -> std::path::PathBuf {
        self.dir.path().join("release")
    }

    /// The plugin's environment that arms the point (for `Launch::env`,
    /// `Plugin::restart_with_env`).
    pub fn env(&self) -> [(&'static str, String); 3] {
        [
            (ENV, self.point.clone()),
            (PAUSE_ENV, HOLD_LIMIT.as_millis().to_string()),
            (RELEASE_ENV, self.release_file().display().to_string()),
        ]
    }

    /// Ends the pause of every thread held at the point, and of any that reaches it later.
    pub fn release(&self) {
        std::fs::write(self.release_file(), b"").expect("writing the release file");
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let _ = std::fs::write(self.release_file(), b"");
    }
}
