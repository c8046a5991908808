//! The one door for blocking and external work: child processes run on tokio's process
//! reactor, blocking syscalls on the blocking pool. Nothing here blocks the async runtime.
//!
//! Every child process is made by [`std_command`] (async callers get it wrapped by
//! [`run`] / [`run_unchecked`], blocking callers by [`run_blocking`]): stdin closed, and the
//! C locale (`LC_ALL=C`, `LANG=C`, no `LANGUAGE`), so what a tool prints does not depend on
//! the host's language. A tool that fails becomes an [`Error::Tool`] whose [`Kind`] is
//! decided once, here, by [`tool_kind`].

use crate::error::{Error, Kind, Result};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Instant;

/// Runs blocking code (file I/O with fsync, statvfs, FFI) off the async runtime.
///
/// The closure runs to its end even when the caller stops waiting (a cancelled RPC, the
/// shutdown): whatever it holds (a permit, a lock) is held until then. At exit,
/// [`log_unfinished`] names the closures that still run.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    // Keep the caller's span (volume id…) on logs written inside the closure.
    let span = tracing::Span::current();
    let running = Running::enter(span.clone(), std::any::type_name::<F>());
    tokio::task::spawn_blocking(move || {
        let _running = running;
        span.in_scope(f)
    })
    .await
    .map_err(|e| Error::internal(format!("blocking task failed: {e}")))?
}

/// A blocking closure running now: its caller's span, what it is (the closure's type name:
/// module and function) and since when.
type RunningNow = (tracing::Span, &'static str, Instant);

/// Every blocking closure running now, by a sequence number.
static RUNNING: LazyLock<Mutex<BTreeMap<u64, RunningNow>>> = LazyLock::new(Mutex::default);

/// One entry of [`RUNNING`], removed when the closure ends (or is dropped unrun).
struct Running(u64);

impl Running {
    fn enter(span: tracing::Span, what: &'static str) -> Running {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        running().insert(id, (span, what, Instant::now()));
        Running(id)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        running().remove(&self.0);
    }
}

fn running() -> std::sync::MutexGuard<'static, BTreeMap<u64, RunningNow>> {
    // A panic while the map is held cannot leave it half-changed: go on with it.
    RUNNING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Logs every blocking closure still running (a warning in its caller's span: the RPC, the
/// volume) as abandoned; called at exit, before the runtime stops waiting for them. Returns
/// how many there were.
pub(crate) fn log_unfinished() -> usize {
    let now: Vec<_> = running()
        .values()
        .map(|(span, what, since)| (span.clone(), *what, since.elapsed()))
        .collect();
    for (span, what, running_for) in &now {
        span.in_scope(|| {
            tracing::warn!(work = %what, running_ms = running_for.as_millis() as u64,
                "blocking call still running at exit: abandoned");
        });
    }
    now.len()
}

/// Output of a finished command.
#[derive(Debug)]
pub(crate) struct CmdOutput {
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// A finished command, whatever its exit status.
#[derive(Debug)]
pub(crate) struct Finished {
    /// None when killed by a signal.
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// The one place a child process is made: `program` with stdin closed and the C locale.
pub(crate) fn std_command(program: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(program);
    cmd.stdin(Stdio::null())
        .env("LC_ALL", "C")
        .env("LANG", "C")
        .env_remove("LANGUAGE");
    cmd
}

/// Runs `program args…` and fails with an [`Error::Tool`] when it exits non-zero.
pub(crate) async fn run<I, S>(program: &str, args: I) -> Result<CmdOutput>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    checked(program, run_unchecked(program, args).await?)
}

/// Runs `program args…` and returns its exit code and output without judging them, for tools
/// whose exit codes carry meaning (e.g. `blkid` exits 2 when it finds nothing).
pub(crate) async fn run_unchecked<I, S>(program: &str, args: I) -> Result<Finished>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = std_command(program);
    cmd.args(args);
    output(program, cmd).await
}

/// Runs `cmd` (made by [`std_command`]) to its end with its output captured; the child is
/// killed when the caller stops waiting.
async fn output(program: &str, mut cmd: std::process::Command) -> Result<Finished> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| spawn_error(program, e))?;
    Ok(finished(out))
}

/// [`run`] for a child that must leave the plugin's cgroups before it runs anything of its
/// own (a daemon that outlives the plugin): between fork and exec the child writes `0` (itself)
/// to each of `cgroup_procs`, the `cgroup.procs` files of the cgroups it belongs in. A write
/// that fails leaves the child where it was; the caller reads the cgroups back and reports.
pub(crate) async fn run_in_cgroups<I, S>(
    program: &str,
    args: I,
    cgroup_procs: &[std::fs::File],
) -> Result<CmdOutput>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let mut cmd = std_command(program);
    cmd.args(args);
    let fds: Vec<std::os::fd::RawFd> = cgroup_procs.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: the hook runs in the forked child before exec. It only calls write(2), which is
    // async-signal-safe, on descriptors the caller keeps open until the spawn returns, and it
    // neither allocates nor takes locks.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &fds {
                libc::write(*fd, b"0".as_ptr().cast(), 1);
            }
            Ok(())
        });
    }
    checked(program, output(program, cmd).await?)
}

/// [`run`] for code that is already on a blocking thread (e.g. pool recovery, which runs
/// while the pool opens): the same child setup and the same error mapping.
pub(crate) fn run_blocking<I, S>(program: &str, args: I) -> Result<CmdOutput>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = std_command(program)
        .args(args)
        .output()
        .map_err(|e| spawn_error(program, e))?;
    checked(program, finished(out))
}

fn spawn_error(program: &str, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::Unavailable(format!(
            "{program} is not installed; install it (see `virtdisk-csi doctor`)"
        ))
    } else {
        Error::io(format!("starting {program}"), e)
    }
}

fn finished(out: std::process::Output) -> Finished {
    Finished {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn checked(program: &str, out: Finished) -> Result<CmdOutput> {
    if out.code != Some(0) {
        return Err(tool_error(program, &out));
    }
    Ok(CmdOutput {
        stdout: out.stdout,
        stderr: out.stderr,
    })
}

/// The error of a tool that exited non-zero: what it said (stderr, else stdout) and its kind.
pub(crate) fn tool_error(program: &str, out: &Finished) -> Error {
    let said = match out.stderr.trim() {
        "" => out.stdout.trim(),
        s => s,
    };
    Error::Tool {
        program: program.to_string(),
        status: out.code,
        kind: tool_kind(program, said),
        stderr: said.to_string(),
    }
}

/// What a failed tool's output means. The tools the plugin runs report an errno only as its
/// `strerror` text (mkfs, mount helpers, qemu-img all exit 1 for any failure), so their words
/// are the only source. This is the one place they are read, and it is sound because every
/// child runs under `LC_ALL=C`: glibc's C-locale messages and the tools' untranslated
/// strings are fixed English. QEMU's tools have no translations at all.
pub(crate) fn tool_kind(program: &str, said: &str) -> Kind {
    // QEMU's image locking (`raw_check_lock_bytes`): another process holds the image.
    let qemu = program.starts_with("qemu");
    if qemu
        && (said.contains("Failed to get \"write\" lock")
            || said.contains("Failed to get shared \"write\" lock"))
    {
        return Kind::Locked;
    }
    // resize2fs names the EPERM of the online-resize ioctl in its own words.
    if program == "resize2fs" && said.contains("Permission denied to resize filesystem") {
        return Kind::PermissionDenied;
    }
    // qemu-img create/resize of a raw image past what the file or format can hold.
    if qemu && said.contains("too large for file format") {
        return Kind::TooLarge;
    }
    // glibc's strerror() in the C locale.
    const STRERROR: [(&str, Kind); 6] = [
        ("No space left on device", Kind::NoSpace),
        ("Disk quota exceeded", Kind::NoSpace),
        ("File too large", Kind::TooLarge),
        ("Device or resource busy", Kind::Busy),
        ("Operation not permitted", Kind::PermissionDenied),
        ("Permission denied", Kind::PermissionDenied),
    ];
    STRERROR
        .iter()
        .find(|(text, _)| said.contains(text))
        .map_or(Kind::Other, |(_, kind)| *kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[tokio::test]
    async fn running_blocking_work_is_known_until_it_ends() {
        let mine = |what: &str| what.contains("running_blocking_work_is_known");
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let call = tokio::spawn(blocking(move || {
            rx.recv().ok();
            Ok(())
        }));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(running().values().any(|(_, what, _)| mine(what)));
        assert!(log_unfinished() >= 1);
        tx.send(()).unwrap();
        call.await.unwrap().unwrap();
        assert!(!running().values().any(|(_, what, _)| mine(what)));
    }

    #[tokio::test]
    async fn children_run_in_the_c_locale() {
        let out = run("sh", ["-c", "echo \"$LC_ALL|$LANG|${LANGUAGE-unset}\""])
            .await
            .unwrap();
        assert_eq!(out.stdout.trim(), "C|C|unset");
        let out = run_blocking("sh", ["-c", "echo \"$LC_ALL|$LANG|${LANGUAGE-unset}\""]).unwrap();
        assert_eq!(out.stdout.trim(), "C|C|unset");
    }

    #[tokio::test]
    async fn a_failing_tool_is_a_tool_error_with_its_words_and_status() {
        let err = run(
            "sh",
            ["-c", "echo 'sh: x: No space left on device' >&2; exit 3"],
        )
        .await
        .unwrap_err();
        match &err {
            Error::Tool {
                program,
                status,
                stderr,
                kind,
            } => {
                assert_eq!(program, "sh");
                assert_eq!(*status, Some(3));
                assert_eq!(stderr, "sh: x: No space left on device");
                assert_eq!(*kind, Kind::NoSpace);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(err.code(), Code::ResourceExhausted);
        let err = run_blocking("sh", ["-c", "kill -9 $$"]).unwrap_err();
        assert!(err.to_string().contains("killed by a signal"), "{err}");
        let err = run("virtdisk-no-such-tool", ["x"]).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
    }

    #[test]
    fn tool_words_under_the_c_locale_give_kinds() {
        let k = tool_kind;
        assert_eq!(
            k(
                "mkfs.ext4",
                "mkfs.ext4: No space left on device while writing out and closing file system"
            ),
            Kind::NoSpace
        );
        assert_eq!(
            k("qemu-img", "qemu-img: x: Disk quota exceeded"),
            Kind::NoSpace
        );
        assert_eq!(
            k(
                "qemu-img",
                "qemu-img: /p/x.raw: Could not resize file: File too large"
            ),
            Kind::TooLarge
        );
        assert_eq!(
            k(
                "qemu-img",
                "qemu-img: Image size too large for file format 'raw'"
            ),
            Kind::TooLarge
        );
        assert_eq!(
            k(
                "resize2fs",
                "resize2fs 1.47.0 (5-Feb-2023)\nresize2fs: Permission denied to resize filesystem"
            ),
            Kind::PermissionDenied
        );
        assert_eq!(
            k("umount", "umount: /x: target is busy."),
            Kind::Other,
            "only errno words count"
        );
        // QEMU's image lock, and nothing that merely contains "lock".
        assert_eq!(
            k(
                "qemu-img",
                "qemu-img: Could not open '/p/images/a.qcow2': Failed to get \"write\" lock\nIs another process using the image [/p/images/a.qcow2]?"
            ),
            Kind::Locked
        );
        assert_eq!(
            k("qemu-img", "qemu-img: Could not open '/srv/blockpool/images/a.qcow2': Could not read image: Input/output error"),
            Kind::Other
        );
        assert_eq!(
            k(
                "qemu-img",
                "qemu-img: Could not open '/srv/blockpool/a': block device is locked"
            ),
            Kind::Other
        );
        // Another tool printing QEMU's words is not QEMU's lock.
        assert_eq!(k("mount", "Failed to get \"write\" lock"), Kind::Other);
    }
}
