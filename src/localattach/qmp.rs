//! A minimal QMP client: one connection per command (negotiate, execute, close).

use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `command` with `arguments` on the QMP socket; returns its `return` value.
pub(super) async fn execute(socket: &Path, command: &str, arguments: Value) -> Result<Value> {
    tokio::time::timeout(TIMEOUT, execute_inner(socket, command, arguments))
        .await
        .map_err(|_| {
            Error::Timeout(format!(
                "QMP {command} on {} did not answer within {}s",
                socket.display(),
                TIMEOUT.as_secs()
            ))
        })?
}

/// The next reply, skipping the asynchronous events that interleave with replies.
async fn next_reply(
    lines: &mut tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
) -> Result<Value> {
    loop {
        let line = lines
            .next_line()
            .await
            .map_err(|e| Error::io("reading from QMP", e))?
            .ok_or_else(|| Error::Unavailable("the storage daemon closed QMP".into()))?;
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| Error::internal(format!("bad QMP message {line:?}: {e}")))?;
        if v.get("event").is_none() {
            return Ok(v);
        }
    }
}

async fn execute_inner(socket: &Path, command: &str, arguments: Value) -> Result<Value> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        Error::Unavailable(format!(
            "cannot reach the storage daemon at {}: {e}",
            socket.display()
        ))
    })?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    next_reply(&mut lines).await?; // greeting
    let mut result = Value::Null;
    for (cmd, args) in [("qmp_capabilities", json!({})), (command, arguments)] {
        let mut line = json!({"execute": cmd, "arguments": args}).to_string();
        line.push('\n');
        write
            .write_all(line.as_bytes())
            .await
            .map_err(|e| Error::io("writing to QMP", e))?;
        let reply = next_reply(&mut lines).await?;
        if let Some(err) = reply.get("error") {
            return Err(Error::internal(format!(
                "QMP {cmd} failed: {}",
                err.get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error")
            )));
        }
        result = reply.get("return").cloned().unwrap_or(Value::Null);
    }
    Ok(result)
}
