//! Thin async wrappers around `qemu-img`, for what changes images holding data (resize,
//! flatten, rebase). New images are written by `qcow2` without a process.

use crate::error::{Error, Result};
use crate::exec;
use crate::model::ImageFormat;
use std::path::Path;

/// What `qemu-img info` reports (only what the plugin reads). Only the hypervisor backend uses it.
#[cfg(feature = "libvirt")]
#[derive(Debug, Clone, serde::Deserialize)]
pub(crate) struct ImageInfo {
    #[serde(rename = "virtual-size")]
    pub(crate) virtual_size: u64,
}

fn path_arg(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::internal(format!("path {} is not UTF-8", p.display())))
}

pub(crate) async fn resize(path: &Path, format: ImageFormat, size: u64) -> Result<()> {
    exec::run(
        "qemu-img",
        [
            "resize",
            "-q",
            "-f",
            format.as_str(),
            path_arg(path)?,
            &size.to_string(),
        ],
    )
    .await
    .map(drop)
}

/// `-U` (force share) so info works while a domain holds the image open.
#[cfg(feature = "libvirt")]
pub(crate) async fn info(path: &Path) -> Result<ImageInfo> {
    let out = exec::run("qemu-img", ["info", "-U", "--output=json", path_arg(path)?]).await?;
    serde_json::from_str(&out.stdout)
        .map_err(|e| Error::internal(format!("parsing qemu-img info of {}: {e}", path.display())))
}

/// Copies what `src` shows (its whole backing chain) into a new standalone qcow2 image.
pub(crate) async fn convert_flat(src: &Path, dst: &Path) -> Result<()> {
    exec::run(
        "qemu-img",
        [
            "convert",
            "-q",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            path_arg(src)?,
            path_arg(dst)?,
        ],
    )
    .await
    .map(drop)
}

/// Points `image`'s header at `backing` without touching data: right exactly when the old
/// and the new backing show the same content. Blocking (pool recovery runs it while the pool
/// opens): call through `exec::blocking`.
pub(crate) fn rebase_unsafe_blocking(image: &Path, backing: &str) -> Result<()> {
    exec::run_blocking(
        "qemu-img",
        [
            "rebase",
            "-q",
            "-u",
            "-f",
            "qcow2",
            "-b",
            backing,
            "-F",
            "qcow2",
            path_arg(image)?,
        ],
    )
    .map(drop)
}
