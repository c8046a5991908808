//! The one door for blocking and external work: child processes run on tokio's process
//! reactor, blocking syscalls on the blocking pool. Nothing here blocks the async runtime.

use crate::error::{Error, Result};
use std::ffi::OsStr;
use std::process::Stdio;

/// Runs blocking code (file I/O with fsync, statvfs, FFI) off the async runtime.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    // Keep the caller's span (volume id…) on logs written inside the closure.
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(|e| Error::internal(format!("blocking task failed: {e}")))?
}

/// Output of a finished command.
pub(crate) struct CmdOutput {
    pub stdout: String,
    pub stderr: String,
}

/// Runs `program args…` and fails with its stderr when it exits non-zero.
pub(crate) async fn run<I, S>(program: &str, args: I) -> Result<CmdOutput>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = run_unchecked(program, args).await?;
    if out.code != Some(0) {
        let msg = out.stderr.trim();
        let msg = if msg.is_empty() {
            out.stdout.trim()
        } else {
            msg
        };
        let lower = msg.to_ascii_lowercase();
        if lower.contains("no space left") || lower.contains("disk quota exceeded") {
            return Err(Error::ResourceExhausted(format!(
                "{program}: no space left: {msg}"
            )));
        }
        // E.g. a raw image past the filesystem's largest file (EFBIG).
        if lower.contains("file too large") || lower.contains("too large for file format") {
            return Err(Error::OutOfRange(format!("{program}: too large: {msg}")));
        }
        let status = out.code.map_or_else(
            || "killed by a signal".to_string(),
            |c| format!("exit status {c}"),
        );
        return Err(Error::internal(format!(
            "{program} failed ({status}): {msg}"
        )));
    }
    Ok(CmdOutput {
        stdout: out.stdout,
        stderr: out.stderr,
    })
}

/// A finished command, whatever its exit status.
pub(crate) struct Finished {
    /// None when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `program args…` and returns its exit code and output without judging them, for tools
/// whose exit codes carry meaning (e.g. `blkid` exits 2 when it finds nothing).
pub(crate) async fn run_unchecked<I, S>(program: &str, args: I) -> Result<Finished>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::Unavailable(format!(
                    "{program} is not installed; install it (see `virtdisk-csi doctor`)"
                ))
            } else {
                Error::io(format!("starting {program}"), e)
            }
        })?;
    Ok(Finished {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
