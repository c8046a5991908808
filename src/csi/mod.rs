//! The gRPC glue: one file per CSI service. Each RPC validates its request, calls the domain
//! modules and maps their errors; no storage logic lives here.

pub mod channel;
pub(crate) mod controller;
pub(crate) mod convert;
pub(crate) mod group_controller;
pub(crate) mod identity;
pub(crate) mod node;

#[allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
pub mod proto {
    tonic::include_proto!("csi.v1");
}
