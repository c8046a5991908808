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

/// A libvirtd that never answers: a unix socket that accepts connections and keeps them open
/// without a word, as a stuck or SIGSTOPped daemon does. A libvirt client pointed at
/// [`MuteLibvirtd::uri`] blocks in its first call (`virConnectOpen`) for good.
///
/// ```ignore
/// let mute = MuteLibvirtd::start();
/// let p = Plugin::start("controller", &["--libvirt-uri", &mute.uri]).await;
/// // … a call that reaches libvirt hangs; mute.accepted() says it got there
/// ```
pub struct MuteLibvirtd {
    /// `qemu+unix:///system?socket=<the socket>`.
    pub uri: String,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    _dir: tempfile::TempDir,
}

impl MuteLibvirtd {
    /// Listens on a socket in a fresh temp dir, accepting on a thread until dropped.
    pub fn start() -> MuteLibvirtd {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let dir = tempfile::Builder::new()
            .prefix("vdt-mute-libvirtd-")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().join("libvirt-sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped) = (accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        held.push(conn);
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        MuteLibvirtd {
            uri: format!("qemu+unix:///system?socket={}", path.display()),
            accepted,
            stop,
            _dir: dir,
        }
    }

    /// How many connections were accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until a client connected (the call is in flight), at most `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.accepted() == 0 {
            assert!(
                Instant::now() < deadline,
                "nothing connected to {}",
                self.uri
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for MuteLibvirtd {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
