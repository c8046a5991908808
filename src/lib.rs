//! virtdisk-csi: a CSI plugin whose volumes are qcow2 images in pool directories, hot-plugged
//! into the libvirt domain that is the node.

pub mod attach;
pub mod client;
pub mod config;
pub mod csi;
pub mod doctor;
pub mod error;
pub mod exec;
pub mod failpoint;
pub mod fsutil;
pub mod guard;
#[cfg(feature = "libvirt")]
pub mod hypervisor;
pub mod ids;
pub mod localattach;
pub mod metrics;
pub mod model;
pub mod node;
pub mod nodeid;
pub mod params;
pub mod pool;
pub mod server;
