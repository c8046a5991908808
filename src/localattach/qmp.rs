//! A minimal QMP client: one connection per use (negotiate, execute, close).

use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

const TIMEOUT: Duration = Duration::from_secs(30);

/// A negotiated QMP connection, for several commands in a row.
pub(super) struct Session {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    write: tokio::net::unix::OwnedWriteHalf,
    /// The pid of the process serving the socket (SO_PEERCRED).
    peer_pid: Option<i32>,
}

/// Runs `command` with `arguments` on the QMP socket; returns its `return` value.
pub(super) async fn execute(socket: &Path, command: &str, arguments: Value) -> Result<Value> {
    bounded(socket, command, TIMEOUT, async {
        let mut s = Session::connect(socket).await?;
        s.execute(command, arguments).await
    })
    .await
}

/// What the daemon behind `socket` serves, read through QMP, and which process it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Served {
    /// The pid of the process that answered (SO_PEERCRED on the socket).
    pub(super) pid: Option<i32>,
    /// `(id, node-name, type)` of each block export.
    pub(super) exports: Vec<(String, String, String)>,
    /// Each named block node.
    pub(super) nodes: Vec<Node>,
}

/// A named block node, as `query-named-block-nodes` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct Node {
    pub(super) name: String,
    /// The file name (a `json:` description for a format node whose backing was set after it
    /// was opened; the protocol node under it names the plain path).
    pub(super) file: String,
    /// The image's virtual size in bytes.
    pub(super) virtual_size: u64,
    /// The backing file name the image's header names (as written there), if any.
    pub(super) backing_filename: Option<String>,
}

/// How long a daemon may take to say what it serves: a healthy one answers in milliseconds,
/// and a plugin that adopts daemons at start must not wait long for a stuck one.
pub(super) const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the daemon what it serves (`query-block-exports`, `query-named-block-nodes`).
pub(super) async fn served(socket: &Path) -> Result<Served> {
    bounded(socket, "query-block-exports", QUERY_TIMEOUT, async {
        Session::connect(socket).await?.served().await
    })
    .await
}

/// Bounds `f`, a QMP exchange named `what` on `socket`, by `limit`: DEADLINE_EXCEEDED after.
pub(super) async fn bounded<T>(
    socket: &Path,
    what: &str,
    limit: Duration,
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(limit, f).await.map_err(|_| {
        Error::Timeout(format!(
            "QMP {what} on {} did not answer within {}s",
            socket.display(),
            limit.as_secs()
        ))
    })?
}

impl Session {
    /// Connects and negotiates; UNAVAILABLE when nothing answers at `socket`.
    pub(super) async fn connect(socket: &Path) -> Result<Session> {
        let stream = UnixStream::connect(socket).await.map_err(|e| {
            Error::Unavailable(format!(
                "cannot reach the storage daemon at {}: {e}",
                socket.display()
            ))
        })?;
        let peer_pid = stream.peer_cred().ok().and_then(|c| c.pid());
        let (read, write) = stream.into_split();
        let mut s = Session {
            lines: BufReader::new(read).lines(),
            write,
            peer_pid,
        };
        s.next_reply().await?; // greeting
        s.execute("qmp_capabilities", json!({})).await?;
        Ok(s)
    }

    /// The next reply, skipping the asynchronous events that interleave with replies.
    async fn next_reply(&mut self) -> Result<Value> {
        loop {
            let line = self
                .lines
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

    /// What the daemon serves, on this connection.
    pub(super) async fn served(&mut self) -> Result<Served> {
        let exports = self.execute("query-block-exports", json!({})).await?;
        let nodes = self
            .execute("query-named-block-nodes", json!({"flat": true}))
            .await?;
        let field = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        Ok(Served {
            pid: self.peer_pid,
            exports: exports
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| (field(e, "id"), field(e, "node-name"), field(e, "type")))
                .collect(),
            nodes: nodes
                .as_array()
                .into_iter()
                .flatten()
                .map(|n| {
                    let image = n.get("image");
                    Node {
                        name: field(n, "node-name"),
                        file: field(n, "file"),
                        virtual_size: image
                            .and_then(|i| i.get("virtual-size"))
                            .and_then(Value::as_u64)
                            .unwrap_or(0),
                        backing_filename: image
                            .and_then(|i| i.get("backing-filename"))
                            .and_then(Value::as_str)
                            .map(str::to_string),
                    }
                })
                .collect(),
        })
    }

    /// Runs `command`; its `return` value, or an INTERNAL error with QEMU's description when
    /// QEMU refused it (then it did nothing).
    pub(super) async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let mut line = json!({"execute": command, "arguments": arguments}).to_string();
        line.push('\n');
        self.write
            .write_all(line.as_bytes())
            .await
            .map_err(|e| Error::io("writing to QMP", e))?;
        let reply = self.next_reply().await?;
        if let Some(err) = reply.get("error") {
            return Err(Error::internal(format!(
                "QMP {command} failed: {}",
                err.get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error")
            )));
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }
}
