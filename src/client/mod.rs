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
    /// Deadline of each RPC, in seconds.
    #[arg(long, default_value_t = 120, global = true)]
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
    let report = match args.group {
        Group::Identity(cmd) => identity::run(cmd, &ctx).await?,
        Group::Volume(cmd) => volume::run(cmd, &ctx).await?,
        Group::Node(cmd) => node::run(cmd, &ctx).await?,
        Group::Snapshot(cmd) => snapshot::run(cmd, &ctx).await?,
    };
    print!("{}", render::render(&report, args.output));
    if report.ok {
        Ok(())
    } else {
        Err(ClientError::Failed(
            "the plugin's answer is a failure (see above)".into(),
        ))
    }
}
