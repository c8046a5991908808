//! virtdisk-csi: a CSI plugin whose volumes are qcow2 images in pool directories, hot-plugged
//! into the libvirt domain that is the node.
//!
//! The binary is [`cli::main`]. The other public modules are public for the integration tests
//! and benchmarks (`tests/`, `benches/`) only; see `ARCHITECTURE.md` for how the modules fit.

// The public surface is what tests and benches use; everything else is `pub(crate)`, so the
// compiler sees dead code. `cargo clippy -- -D warnings` (in `.ci/run`) makes these errors.
#![warn(missing_docs, unreachable_pub)]

pub mod attach;
pub mod cli;
mod client;
pub mod config;
pub mod csi;
mod doctor;
pub mod error;
mod exec;
pub mod failpoint;
pub mod fsutil;
pub mod guard;
#[cfg(feature = "libvirt")]
pub mod hypervisor;
pub mod ids;
mod localattach;
mod metrics;
pub mod model;
pub mod node;
mod nodeid;
mod nodetopo;
pub mod params;
pub mod pool;
mod server;
mod shutdown;
