//! The gRPC glue: one file per CSI service. Each RPC validates its request, calls the domain
//! modules and maps their errors; no storage logic lives here.

pub mod channel;
pub mod controller;
pub mod convert;
pub mod identity;
pub mod node;

#[allow(clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("csi.v1");
}
