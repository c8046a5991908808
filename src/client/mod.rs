//! `virtdisk-csi client`: a CSI client for operators, like `csc`, built into the plugin.
//! It talks to any CSI plugin socket (`--endpoint unix:///…`), prints tables for people and
//! JSON for programs (`--output json`), and exits non-zero with the gRPC code on failure.

mod args;
mod identity;
mod node;
mod render;
pub(crate) mod size;
mod snapshot;
mod view;
mod volume;

pub(crate) use render::OutputFormat;

use crate::csi::proto::{
    controller_client::ControllerClient, identity_client::IdentityClient, node_client::NodeClient,
};
use std::time::Duration;
use tonic::transport::Channel;

#[derive(Debug, clap::Args)]
pub(crate) struct ClientArgs {
    /// The plugin's socket: unix:///path/to/csi.sock
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///csi/csi.sock",
        global = true
    )]
    pub endpoint: String,
    /// table (for people) or json (for programs).
    #[arg(long, short = 'o', value_enum, default_value_t, global = true)]
    pub output: OutputFormat,
    /// Deadline of each RPC, in seconds (at least 1).
    #[arg(long, default_value_t = 120, global = true, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    #[command(subcommand)]
    pub group: Group,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Group {
    /// Identity service: info, caps, probe.
    #[command(subcommand)]
    Identity(identity::IdentityCmd),
    /// Controller service: volumes.
    #[command(subcommand)]
    Volume(volume::VolumeCmd),
    /// Node service (on the node's own socket).
    #[command(subcommand)]
    Node(node::NodeCmd),
    /// Controller service: snapshots.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCmd),
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// The plugin answered with an error status.
    #[error("{}: {}", crate::metrics::layer::code_name(.0.code()), .0.message())]
    Rpc(#[from] tonic::Status),
    /// Could not connect, or the answer itself means failure (already printed).
    #[error("{0}")]
    Failed(String),
}

/// Connection and per-RPC settings shared by the verbs.
pub(crate) struct Ctx {
    channel: Channel,
    timeout: Duration,
}

impl Ctx {
    pub(crate) fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.timeout);
        r
    }

    pub(crate) fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    pub(crate) fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    pub(crate) fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }
}

/// A listing RPC's pages from `start`: one page, or every page when `all` (following
/// `next_token`, and stopping with an error if the plugin repeats one). `page` asks for one
/// page at a token and returns its entries and next token. Returns the entries and the last
/// next token.
pub(crate) async fn pages<E, F, Fut>(
    start: String,
    all: bool,
    mut page: F,
) -> Result<(Vec<E>, String), ClientError>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<E>, String), ClientError>>,
{
    let mut token = start;
    let mut entries = Vec::new();
    loop {
        let (more, next) = page(token.clone()).await?;
        entries.extend(more);
        if !all || next.is_empty() {
            return Ok((entries, next));
        }
        if next == token {
            return Err(ClientError::Failed(format!(
                "the plugin returned next_token {token:?} again; stopping to avoid a loop"
            )));
        }
        token = next;
    }
}

/// The error to show for `e`. tonic answers a call whose deadline (`--timeout`) passed with
/// CANCELLED (the server's, or the channel's own timer): after the deadline that is the
/// deadline, said as such, with what it means for a change.
fn deadline_passed(e: ClientError, elapsed: Duration, timeout: Duration) -> ClientError {
    match e {
        ClientError::Rpc(s) if s.code() == tonic::Code::Cancelled && elapsed >= timeout => {
            ClientError::Failed(format!(
                "DeadlineExceeded: no answer within {}s (--timeout); a change the plugin \
                 started still runs to its end: look with `volume get`, or run the same \
                 command again (it answers once that change is done)",
                timeout.as_secs()
            ))
        }
        e => e,
    }
}

/// Runs one command; prints its report to stdout. Errors are for the caller to print.
pub(crate) async fn run(args: ClientArgs) -> Result<(), ClientError> {
    let socket = crate::server::socket_path(&args.endpoint)
        .map_err(|e| ClientError::Failed(e.to_string()))?;
    let channel = tokio::time::timeout(
        Duration::from_secs(args.timeout.max(1)),
        crate::csi::channel::connect(&socket),
    )
    .await
    .map_err(|_| {
        ClientError::Failed(format!(
            "Unavailable: no answer from {} within {}s",
            socket.display(),
            args.timeout
        ))
    })?
    .map_err(|e| {
        ClientError::Failed(format!(
            "Unavailable: {} ({e}); is the plugin running there?",
            socket.display()
        ))
    })?;
    let ctx = Ctx {
        channel,
        timeout: Duration::from_secs(args.timeout.max(1)),
    };
    let started = std::time::Instant::now();
    let report = match args.group {
        Group::Identity(cmd) => identity::run(cmd, &ctx).await,
        Group::Volume(cmd) => volume::run(cmd, &ctx).await,
        Group::Node(cmd) => node::run(cmd, &ctx).await,
        Group::Snapshot(cmd) => snapshot::run(cmd, &ctx).await,
    }
    .map_err(|e| deadline_passed(e, started.elapsed(), ctx.timeout))?;
    print!("{}", render::render(&report, args.output));
    if report.ok {
        Ok(())
    } else {
        Err(ClientError::Failed(
            "the plugin's answer is a failure (see above)".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancelled_after_the_deadline_is_the_deadline() {
        let t = Duration::from_secs(1);
        let cancelled = || ClientError::Rpc(tonic::Status::cancelled("Timeout expired"));
        let shown = deadline_passed(cancelled(), Duration::from_millis(1003), t).to_string();
        assert!(
            shown.starts_with("DeadlineExceeded: no answer within 1s"),
            "{shown}"
        );
        // Before the deadline a cancellation stays what it is, and so does any other code.
        let early = deadline_passed(cancelled(), Duration::from_millis(10), t).to_string();
        assert!(early.starts_with("Canceled:"), "{early}");
        let other = ClientError::Rpc(tonic::Status::aborted("busy"));
        let other = deadline_passed(other, Duration::from_secs(5), t).to_string();
        assert!(other.starts_with("Aborted:"), "{other}");
    }
}
