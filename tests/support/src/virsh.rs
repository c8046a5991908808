//! `virsh` against the machine's libvirtd (`qemu:///system`, or the URI given), as a test
//! checks and arranges what the plugin does to domains.
//!
//! ```ignore
//! let xml = virsh_ok(&["dumpxml", &dom.name]);          // must succeed: stdout
//! let out = virsh(&["detach-disk", &dom.name, "sdq"]);  // the raw Output
//! let uuid = virsh_async(uri, &["domuuid", name]).await?;  // from async code that must not block
//! ```
//!
//! [`ensure_libvirtd`] starts virtlogd and libvirtd when they are not running (once per test
//! binary); it never restarts a running daemon.

use std::process::{Command, Output};
use std::sync::Once;
use std::time::{Duration, Instant};

/// The libvirt connection of the tests (and of the plugin's default config).
pub const URI: &str = "qemu:///system";

/// `virsh -q -c qemu:///system <args>`.
pub fn virsh(args: &[&str]) -> Output {
    virsh_at(URI, args)
}

/// `virsh -q -c <uri> <args>`.
pub fn virsh_at(uri: &str, args: &[&str]) -> Output {
    Command::new("virsh")
        .args(["-q", "-c", uri])
        .args(args)
        .output()
        .expect("run virsh")
}

/// [`virsh`] that must succeed; returns its stdout.
pub fn virsh_ok(args: &[&str]) -> String {
    virsh_ok_at(URI, args)
}

/// [`virsh_at`] that must succeed; returns its stdout.
pub fn virsh_ok_at(uri: &str, args: &[&str]) -> String {
    let out = virsh_at(uri, args);
    assert!(
        out.status.success(),
        "virsh {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `virsh -c <uri> <args>` without blocking the runtime, bounded by 120 s: stdout, or a
/// message with stderr.
pub async fn virsh_async(uri: &str, args: &[&str]) -> Result<String, String> {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("virsh")
            .args(["-c", uri])
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| format!("virsh {args:?} timed out"))?
    .map_err(|e| format!("virsh {args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "virsh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Starts virtlogd and libvirtd if libvirt does not answer, once per test binary, and waits
/// (30 s at most) until it does.
pub fn ensure_libvirtd() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if virsh(&["version"]).status.success() {
            return;
        }
        for daemon in ["virtlogd", "libvirtd"] {
            let _ = Command::new(daemon).arg("-d").status();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !virsh(&["version"]).status.success() {
            assert!(Instant::now() < deadline, "libvirtd did not come up");
            std::thread::sleep(Duration::from_millis(200));
        }
    });
}
