//! A second, independent libvirtd on this machine: a second hypervisor host for the
//! multi-host tests.
//!
//! It runs in a mount namespace of its own (`unshare -m --propagation private`): a tmpfs on
//! `/run/libvirt`, private directories bind-mounted over `/var/lib/libvirt`,
//! `/var/cache/libvirt`, `/var/log/libvirt` and `/etc/libvirt` (a copy of the machine's
//! configuration with `unix_sock_dir` outside the namespace, a `host_uuid` of its own, and
//! migration ports apart from the main daemon's), then its own `virtlogd` and `libvirtd`. It
//! answers at `qemu:///system?socket=<dir>/sock/libvirt-sock`, runs KVM domains the main
//! libvirtd does not see, and `virsh migrate --live` moves domains between the two. A
//! `sleep` process holds the namespace, so the daemon can be stopped and started again
//! ([`SecondLibvirtd::stop_daemon`], [`SecondLibvirtd::start_daemon`]) while its domains run.
//!
//! The main libvirtd is never touched: every process this helper signals is first proven to
//! be inside the instance's namespace (it sees the instance's marker file under
//! `/proc/<pid>/root/etc/libvirt/`). Dropping the instance destroys its domains and stops
//! every process of the namespace. An instance whose test process died (a crashed or killed
//! run) is torn down the same way by the next [`SecondLibvirtd::start`].
//!
//! ```ignore
//! let b = SecondLibvirtd::start();     // ~1 s (8 s the first time: QEMU capabilities)
//! let mut dom = TestDomain::builder("x").on(b.uri()).start();
//! b.stop_daemon(); /* … */ b.start_daemon();
//! dom.migrate_live(virsh::URI);        // to the machine's libvirtd
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Where instances live: `<PARENT>/<pid>-<n>/`.
const PARENT: &str = "/tmp/vdt-libvirtd";
/// QEMU capabilities probed by an earlier instance: the next one starts in ~1 s instead of
/// ~8 s (libvirtd re-probes every emulator when its cache does not match its own binary).
const CAPS_CACHE: &str = "/tmp/vdt-libvirtd/capabilities";
/// The file in the instance's `/etc/libvirt` that tells its processes apart.
const MARKER: &str = "vdt-second-libvirtd.id";

/// Runs inside the new mount namespace: `sh start.sh <dir> <id> <host uuid>`.
const SCRIPT: &str = r#"set -eu
DIR=$1; ID=$2; HOST_UUID=$3
R=$DIR/root
mount -t tmpfs -o mode=0755 tmpfs /run/libvirt
mkdir -p "$R/lib/qemu" "$R/cache/qemu/capabilities" "$R/log/qemu" "$R/etc/qemu" "$R/etc/hooks" "$DIR/sock"
for d in channel/target snapshot dump checkpoint nvram save ram; do mkdir -p "$R/lib/qemu/$d"; done
chown -R libvirt-qemu:libvirt-qemu "$R/lib/qemu"
chmod 0750 "$R/lib/qemu"
for f in libvirtd.conf qemu.conf virtlogd.conf libvirt.conf libvirt-admin.conf; do
  [ -e "/etc/libvirt/$f" ] && cp -a "/etc/libvirt/$f" "$R/etc/"
done
[ -d /etc/libvirt/nwfilter ] && cp -a /etc/libvirt/nwfilter "$R/etc/"
cp -a "$DIR/caps/." "$R/cache/qemu/capabilities/" 2>/dev/null || true
cat >> "$R/etc/libvirtd.conf" <<EOC
unix_sock_dir = "$DIR/sock"
host_uuid = "$HOST_UUID"
EOC
cat >> "$R/etc/qemu.conf" <<EOC
migration_port_min = 49700
migration_port_max = 49999
EOC
echo "$ID" > "$R/etc/$MARKER_NAME"
mount --bind "$R/lib" /var/lib/libvirt
mount --bind "$R/cache" /var/cache/libvirt
mount --bind "$R/log" /var/log/libvirt
mount --bind "$R/etc" /etc/libvirt
sleep 2147483647 </dev/null >/dev/null 2>&1 &
echo $! > "$DIR/holder.pid"
virtlogd -d -p "$DIR/virtlogd.pid"
libvirtd -d -p "$DIR/libvirtd.pid"
"#;

/// A second libvirtd, stopped (with everything in its namespace) when dropped.
pub struct SecondLibvirtd {
    id: String,
    dir: PathBuf,
    uri: String,
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The processes of instance `id`: those that see its marker in their `/etc/libvirt`.
fn members(id: &str) -> Vec<i32> {
    let own = std::fs::read_link("/proc/self/ns/mnt").ok();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let ns = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
            ns.is_some() && ns != own
        })
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/root/etc/libvirt/{MARKER}"))
                .is_ok_and(|m| m.trim() == id)
        })
        .collect()
}

/// Sends `signal` to `pid` if it belongs to instance `id`.
fn signal_member(id: &str, pid: i32, signal: nix::sys::signal::Signal) {
    if members(id).contains(&pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
}

fn wait_gone(pids: &[i32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while pids.iter().any(|p| alive(*p)) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

fn virsh_with_timeout(uri: &str, secs: u32, args: &[&str]) -> Option<Output> {
    Command::new("timeout")
        .arg(secs.to_string())
        .args(["virsh", "-q", "-c", uri])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
}

fn uri_of(dir: &Path) -> String {
    format!(
        "qemu:///system?socket={}",
        dir.join("sock/libvirt-sock").display()
    )
}

/// Stops instance `id` in `dir`: its domains destroyed through its libvirtd (so it cleans up
/// after them), the daemons asked to exit, then anything left in its namespace killed, and
/// `dir` removed.
fn teardown(id: &str, dir: &Path) {
    let uri = uri_of(dir);
    if read_pid(&dir.join("libvirtd.pid")).is_some_and(alive) {
        if let Some(out) = virsh_with_timeout(&uri, 20, &["list", "--all", "--name"]) {
            for name in String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::trim)
                .filter(|n| !n.is_empty())
            {
                let _ = virsh_with_timeout(&uri, 30, &["destroy", name]);
                let _ = virsh_with_timeout(&uri, 20, &["undefine", name]);
            }
        }
    }
    let daemons: Vec<i32> = ["libvirtd.pid", "virtlogd.pid", "holder.pid"]
        .iter()
        .filter_map(|f| read_pid(&dir.join(f)))
        .collect();
    for pid in &daemons {
        signal_member(id, *pid, nix::sys::signal::Signal::SIGTERM);
    }
    wait_gone(&daemons, Duration::from_secs(10));
    let left = members(id);
    for pid in &left {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    if !wait_gone(&left, Duration::from_secs(10)) {
        eprintln!("second libvirtd {id}: processes {left:?} did not exit");
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        eprintln!("second libvirtd {id}: removing {}: {e}", dir.display());
    }
}

/// Tears down the instances whose test process is gone.
fn sweep_leftovers() {
    let Ok(entries) = std::fs::read_dir(PARENT) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let dir = entry.path();
        let Some(owner) = read_pid(&dir.join("owner")) else {
            continue;
        };
        if alive(owner) {
            continue;
        }
        let id = std::fs::read_to_string(dir.join("id")).unwrap_or_default();
        eprintln!(
            "second libvirtd: tearing down {} (its test process {owner} is gone)",
            dir.display()
        );
        teardown(id.trim(), &dir);
    }
}

impl SecondLibvirtd {
    /// Starts a new instance and waits until it answers. Panics with its log if it does not.
    pub fn start() -> SecondLibvirtd {
        sweep_leftovers();
        static N: AtomicUsize = AtomicUsize::new(0);
        let id = format!(
            "{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let dir = Path::new(PARENT).join(&id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("caps")).unwrap();
        std::fs::write(dir.join("owner"), std::process::id().to_string()).unwrap();
        std::fs::write(dir.join("id"), &id).unwrap();
        // An earlier instance's probe, else the main daemon's (which may be stale).
        for src in [CAPS_CACHE, "/var/cache/libvirt/qemu/capabilities"] {
            if copy_files(Path::new(src), &dir.join("caps")) > 0 {
                break;
            }
        }
        let script = dir.join("start.sh");
        std::fs::write(&script, SCRIPT.replace("$MARKER_NAME", MARKER)).unwrap();
        let host_uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
            .unwrap()
            .trim()
            .to_string();
        let b = SecondLibvirtd {
            uri: uri_of(&dir),
            id,
            dir,
        };
        let out = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh"])
            .arg(&script)
            .arg(&b.dir)
            .arg(&b.id)
            .arg(&host_uuid)
            .stdin(Stdio::null())
            .output()
            .expect("run unshare");
        assert!(
            out.status.success(),
            "starting the second libvirtd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        b.wait_answering(Duration::from_secs(90));
        let probed = b.dir.join("root/cache/qemu/capabilities");
        if copy_files(&probed, Path::new(CAPS_CACHE)) == 0 {
            eprintln!("second libvirtd: no capabilities cache to keep");
        }
        b
    }

    /// Its libvirt URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Its directory (sockets, pid files, private libvirt trees under `root/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `virsh -q -c <its uri> <args>`.
    pub fn virsh(&self, args: &[&str]) -> Output {
        Command::new("virsh")
            .args(["-q", "-c", &self.uri])
            .args(args)
            .output()
            .expect("run virsh")
    }

    /// The QEMU log of its domain `name` (QEMU's stdout and stderr, through its virtlogd).
    pub fn domain_log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("root/log/qemu/{name}.log"))
    }

    /// The pid of its libvirtd, if it runs.
    pub fn libvirtd_pid(&self) -> Option<i32> {
        read_pid(&self.dir.join("libvirtd.pid")).filter(|p| alive(*p))
    }

    /// Stops its libvirtd (SIGTERM, by pid, after checking it is this instance's); its
    /// domains keep running, as when a host's libvirtd goes down.
    pub fn stop_daemon(&self) {
        let pid = self.libvirtd_pid().expect("the second libvirtd runs");
        signal_member(&self.id, pid, nix::sys::signal::Signal::SIGTERM);
        assert!(
            wait_gone(&[pid], Duration::from_secs(30)),
            "the second libvirtd ({pid}) did not exit"
        );
    }

    /// Starts its libvirtd again, in its namespace, and waits until it answers.
    pub fn start_daemon(&self) {
        let holder = read_pid(&self.dir.join("holder.pid")).expect("holder pid");
        assert!(
            members(&self.id).contains(&holder),
            "the namespace holder is gone"
        );
        let status = Command::new("nsenter")
            .args(["-t", &holder.to_string(), "-m", "libvirtd", "-d", "-p"])
            .arg(self.dir.join("libvirtd.pid"))
            .status()
            .expect("run nsenter");
        assert!(status.success(), "nsenter libvirtd: {status}");
        self.wait_answering(Duration::from_secs(60));
    }

    fn wait_answering(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.virsh(&["version"]).status.success() {
                return;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.join("root/log/libvirtd.log"))
                    .unwrap_or_default();
                panic!(
                    "the second libvirtd at {} did not answer within {timeout:?}; its log:\n{log}",
                    self.uri
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for SecondLibvirtd {
    fn drop(&mut self) {
        teardown(&self.id, &self.dir);
    }
}

/// Copies the regular files of `from` into `to` (created), each through a temp file and a
/// rename; returns how many.
fn copy_files(from: &Path, to: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(from) else {
        return 0;
    };
    let _ = std::fs::create_dir_all(to);
    let mut n = 0;
    for e in entries.filter_map(|e| e.ok()) {
        let path = e.path();
        if !path.is_file() {
            continue;
        }
        let tmp = to.join(format!(
            ".{}.tmp-{}",
            e.file_name().to_string_lossy(),
            std::process::id()
        ));
        if std::fs::copy(&path, &tmp).is_ok()
            && std::fs::rename(&tmp, to.join(e.file_name())).is_ok()
        {
            n += 1;
        }
    }
    n
}
