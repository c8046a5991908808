//! Thin async wrappers around `qemu-img`.

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

/// Creates an image; with `backing`, a copy-on-write overlay on that file (relative names are
/// resolved against the overlay's directory by QEMU).
pub(crate) async fn create(
    path: &Path,
    format: ImageFormat,
    size: u64,
    backing: Option<(&str, ImageFormat)>,
) -> Result<()> {
    let mut args: Vec<String> = vec![
        "create".into(),
        "-q".into(),
        "-f".into(),
        format.as_str().into(),
    ];
    if let Some((file, bfmt)) = backing {
        args.extend(["-b".into(), file.into(), "-F".into(), bfmt.as_str().into()]);
    }
    args.push(path_arg(path)?.into());
    args.push(size.to_string());
    exec::run("qemu-img", &args).await.map(drop)
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
