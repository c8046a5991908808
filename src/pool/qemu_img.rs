//! Thin async wrappers around `qemu-img`, for what changes images holding data (resize,
//! flatten, rebase). New images are written by `qcow2` without a process.

use crate::error::{Error, Result};
use crate::exec;
use crate::model::ImageFormat;
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Deserialize)]
pub struct ImageInfo {
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    pub actual_size: u64,
    pub format: String,
    #[serde(rename = "backing-filename", default)]
    pub backing_filename: Option<String>,
}

fn path_arg(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::internal(format!("path {} is not UTF-8", p.display())))
}

pub async fn resize(path: &Path, format: ImageFormat, size: u64) -> Result<()> {
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
pub async fn info(path: &Path) -> Result<ImageInfo> {
    let out = exec::run("qemu-img", ["info", "-U", "--output=json", path_arg(path)?]).await?;
    serde_json::from_str(&out.stdout)
        .map_err(|e| Error::internal(format!("parsing qemu-img info of {}: {e}", path.display())))
}

/// `qemu-img check` (qcow2 only; raw has nothing to check).
pub async fn check(path: &Path, format: ImageFormat) -> Result<()> {
    if format == ImageFormat::Raw {
        return Ok(());
    }
    exec::run(
        "qemu-img",
        ["check", "-q", "-U", "-f", "qcow2", path_arg(path)?],
    )
    .await
    .map(drop)
}

/// Copies what `src` shows (its whole backing chain) into a new standalone qcow2 image.
pub async fn convert_flat(src: &Path, dst: &Path) -> Result<()> {
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
pub fn rebase_unsafe_blocking(image: &Path, backing: &str) -> Result<()> {
    let out = std::process::Command::new("qemu-img")
        .args([
            "rebase", "-q", "-u", "-f", "qcow2", "-b", backing, "-F", "qcow2",
        ])
        .arg(image)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::io("starting qemu-img rebase", e))?;
    if !out.status.success() {
        return Err(Error::internal(format!(
            "qemu-img rebase of {} onto {backing} failed ({}): {}",
            image.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
