//! The test bed's ingredients, built once and cached OUTSIDE the repository:
//! - Debian's cloud kernel (`apt-get download linux-image-<version>-cloud-amd64`, `dpkg-deb -x`),
//! - busybox from `busybox-static` (downloaded the same way, nothing installed on the host),
//! - qemu-guest-agent from `qemu-guest-agent` (the same way; its libraries are QEMU's own,
//!   which the host has),
//! - the node plugin built without libvirt (`cargo build --no-default-features`, own target dir),
//! - the host's filesystem tools and the shared libraries `ldd` says they need,
//!   packed with the modules into an initramfs (see `initramfs.rs`).
//!
//! The cache (`$VIRTDISK_TESTBED_CACHE`, default `/var/cache/virtdisk-testbed`) is guarded by a
//! `flock`, so parallel tests and test binaries share one download.

use super::initramfs;
use super::report::Skip;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const DEFAULT_CACHE: &str = "/var/cache/virtdisk-testbed";
/// The meta package that names the current cloud kernel.
const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";
const BUSYBOX_PACKAGE: &str = "busybox-static";
const GUEST_AGENT_PACKAGE: &str = "qemu-guest-agent";

/// Everything a guest boots from.
#[derive(Debug, Clone)]
pub struct Testbed {
    pub uri: String,
    pub cache: PathBuf,
    pub kernel: PathBuf,
    pub kernel_version: String,
    pub initrd: PathBuf,
    /// The node plugin binary packed into the initramfs.
    pub node_binary: PathBuf,
    /// How long each preparation step took (downloads appear only on a cold cache).
    pub steps: Vec<(String, Duration)>,
}

static BED: tokio::sync::OnceCell<Result<Testbed, Skip>> = tokio::sync::OnceCell::const_new();

impl Testbed {
    /// Builds or reuses the test bed once per process. `Err(Skip)` when this host cannot run it
    /// (no libvirt, no TCG, no Debian packages): the caller reports SKIPPED.
    pub async fn prepare() -> Result<Testbed, Skip> {
        BED.get_or_init(|| async {
            tokio::task::spawn_blocking(prepare_blocking)
                .await
                .expect("test bed preparation panicked")
        })
        .await
        .clone()
    }
}

pub fn libvirt_uri() -> String {
    std::env::var("VIRTDISK_TESTBED_URI").unwrap_or_else(|_| "qemu:///system".to_string())
}

fn prepare_blocking() -> Result<Testbed, Skip> {
    let uri = libvirt_uri();
    let mut steps = Vec::new();
    let t = Instant::now();
    preflight(&uri)?;
    steps.push(("preflight (libvirt, TCG)".to_string(), t.elapsed()));

    let t = Instant::now();
    let node_binary = node_binary()?;
    steps.push((
        "node plugin build (--no-default-features)".to_string(),
        t.elapsed(),
    ));

    let cache = cache_dir()?;
    let _lock = lock(&cache)?;
    let t = Instant::now();
    let kernel = ensure_kernel(&cache)?;
    steps.push((
        format!("kernel {} (cached or downloaded)", kernel.version),
        t.elapsed(),
    ));
    let t = Instant::now();
    let busybox = ensure_busybox(&cache)?;
    steps.push((
        "busybox-static (cached or downloaded)".to_string(),
        t.elapsed(),
    ));

    let t = Instant::now();
    let guest_agent = ensure_guest_agent(&cache)?;
    steps.push((
        "qemu-guest-agent (cached or downloaded)".to_string(),
        t.elapsed(),
    ));

    let t = Instant::now();
    let initrd = initramfs::build(&cache, &kernel, &busybox, &guest_agent, &node_binary)?;
    steps.push((
        "initramfs (cached unless an input changed)".to_string(),
        t.elapsed(),
    ));
    Ok(Testbed {
        uri,
        cache,
        kernel: kernel.vmlinuz.clone(),
        kernel_version: kernel.version.clone(),
        initrd,
        node_binary,
        steps,
    })
}

/// libvirt answers and can run a `<domain type='qemu'>` (TCG) x86_64 guest.
fn preflight(uri: &str) -> Result<(), Skip> {
    let caps = run("virsh", &["-c", uri, "capabilities"])
        .map_err(|e| Skip(format!("libvirt is not usable at {uri}: {e}")))?;
    if !caps.contains("<arch name='x86_64'>") || !caps.contains("<domain type='qemu'") {
        return Err(Skip(format!(
            "libvirt at {uri} offers no x86_64 <domain type='qemu'> (install qemu-system-x86)"
        )));
    }
    Ok(())
}

fn cache_dir() -> Result<PathBuf, Skip> {
    let dir = PathBuf::from(
        std::env::var("VIRTDISK_TESTBED_CACHE").unwrap_or_else(|_| DEFAULT_CACHE.to_string()),
    );
    std::fs::create_dir_all(&dir)
        .map_err(|e| Skip(format!("cannot create the cache {}: {e}", dir.display())))?;
    // QEMU runs as another user and reads the kernel and initramfs from here.
    world_readable_dir(&dir);
    Ok(dir)
}

pub fn world_readable_dir(dir: &Path) {
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
}

fn lock(cache: &Path) -> Result<nix::fcntl::Flock<File>, Skip> {
    let path = cache.join("lock");
    let file =
        File::create(&path).map_err(|e| Skip(format!("cannot create {}: {e}", path.display())))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| Skip(format!("cannot lock {}: {e}", path.display())))
}

/// An extracted kernel package.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub version: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<version>` of the extracted package.
    pub modules: PathBuf,
}

/// The cached kernel, else the one `linux-image-cloud-amd64` names now (or
/// `$VIRTDISK_TESTBED_KERNEL_PACKAGE`), downloaded and extracted. A cached kernel is used as is,
/// so a new Debian point release does not force a download.
fn ensure_kernel(cache: &Path) -> Result<Kernel, Skip> {
    let dir = cache.join("kernel");
    std::fs::create_dir_all(&dir).map_err(|e| Skip(format!("{}: {e}", dir.display())))?;
    world_readable_dir(&dir);
    let wanted = std::env::var("VIRTDISK_TESTBED_KERNEL_PACKAGE").ok();
    let package = match wanted {
        Some(p) => p,
        None => match newest_ready(&dir) {
            Some(p) => p,
            None => resolve_kernel_package()?,
        },
    };
    let root = dir.join(&package);
    if !dir.join(format!("{package}.ready")).exists() {
        download_extract(&package, &root)?;
        std::fs::write(dir.join(format!("{package}.ready")), "")
            .map_err(|e| Skip(format!("writing the cache marker: {e}")))?;
    }
    let modules_dir = root.join("lib/modules");
    let version = std::fs::read_dir(&modules_dir)
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .ok_or_else(|| Skip(format!("{package} has no lib/modules/<version>")))?;
    let vmlinuz = root.join(format!("boot/vmlinuz-{version}"));
    if !vmlinuz.exists() {
        return Err(Skip(format!("{package} has no {}", vmlinuz.display())));
    }
    Ok(Kernel {
        modules: modules_dir.join(&version),
        version,
        vmlinuz,
    })
}

fn newest_ready(dir: &Path) -> Option<String> {
    let mut ready: Vec<(std::time::SystemTime, String)> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let package = name.strip_suffix(".ready")?.to_string();
            Some((e.metadata().ok()?.modified().ok()?, package))
        })
        .collect();
    ready.sort();
    ready.pop().map(|(_, p)| p)
}

/// `linux-image-cloud-amd64` depends on the concrete `linux-image-<abi>-cloud-amd64`.
fn resolve_kernel_package() -> Result<String, Skip> {
    let out = run("apt-cache", &["depends", KERNEL_META_PACKAGE]).map_err(|e| {
        Skip(format!(
            "the kernel package cannot be had ({KERNEL_META_PACKAGE}; run apt-get update?): {e}"
        ))
    })?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64"))
        .map(str::to_string)
        .ok_or_else(|| {
            Skip(format!(
                "{KERNEL_META_PACKAGE} names no concrete kernel: {out}"
            ))
        })
}

/// `apt-get download <package>` into a scratch dir, `dpkg-deb -x` into `root` (atomically).
fn download_extract(package: &str, root: &Path) -> Result<(), Skip> {
    let parent = root.parent().expect("root has a parent");
    let scratch = parent.join(format!(".download-{package}"));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(|e| Skip(format!("{}: {e}", scratch.display())))?;
    let mut cmd = Command::new("apt-get");
    // As root apt would drop to the _apt user, which cannot write into the cache.
    cmd.args(["-q", "-o", "APT::Sandbox::User=root", "download", package])
        .current_dir(&scratch);
    output(cmd).map_err(|e| {
        Skip(format!(
            "apt-get download {package} failed (a Debian host with apt sources is needed): {e}"
        ))
    })?;
    let deb = std::fs::read_dir(&scratch)
        .ok()
        .and_then(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "deb"))
        })
        .ok_or_else(|| Skip(format!("apt-get download {package} produced no .deb")))?;
    let extracted = scratch.join("root");
    run(
        "dpkg-deb",
        &["-x", deb.to_str().unwrap(), extracted.to_str().unwrap()],
    )
    .map_err(|e| Skip(format!("dpkg-deb -x {}: {e}", deb.display())))?;
    let _ = std::fs::remove_dir_all(root);
    std::fs::rename(&extracted, root).map_err(|e| Skip(format!("{}: {e}", root.display())))?;
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

/// The static busybox from `busybox-static`, cached as `<cache>/busybox/busybox`.
fn ensure_busybox(cache: &Path) -> Result<PathBuf, Skip> {
    ensure_binary(cache, BUSYBOX_PACKAGE, "bin/busybox", "busybox")
}

/// `qemu-ga` from Debian's `qemu-guest-agent`, cached as `<cache>/qemu-ga/qemu-ga`.
fn ensure_guest_agent(cache: &Path) -> Result<PathBuf, Skip> {
    ensure_binary(cache, GUEST_AGENT_PACKAGE, "usr/sbin/qemu-ga", "qemu-ga")
}

/// One binary (`path` in Debian package `package`) cached as `<cache>/<name>/<name>`; the
/// package is downloaded and extracted the first time (and put in place atomically).
fn ensure_binary(cache: &Path, package: &str, path: &str, name: &str) -> Result<PathBuf, Skip> {
    let dir = cache.join(name);
    let binary = dir.join(name);
    if binary.exists() {
        return Ok(binary);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Skip(format!("{}: {e}", dir.display())))?;
    let root = dir.join("package");
    download_extract(package, &root)?;
    let extracted = root.join(path);
    let part = dir.join(format!("{name}.part"));
    std::fs::copy(&extracted, &part).map_err(|e| Skip(format!("{}: {e}", extracted.display())))?;
    std::fs::rename(&part, &binary).map_err(|e| Skip(format!("{}: {e}", binary.display())))?;
    let _ = std::fs::remove_dir_all(&root);
    Ok(binary)
}

/// `$VIRTDISK_GUEST_NODE_BIN`, else `cargo build --no-default-features` into
/// `<target>/guestbed` (its own target dir: the default-feature binary other tests run is
/// never overwritten, and cargo's lock on the running build is not contended).
fn node_binary() -> Result<PathBuf, Skip> {
    if let Ok(path) = std::env::var("VIRTDISK_GUEST_NODE_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.exists(),
            "VIRTDISK_GUEST_NODE_BIN={} does not exist",
            path.display()
        );
        return Ok(path);
    }
    let target = target_dir().join("guestbed");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--no-default-features",
        "--bin",
        "virtdisk-csi",
        "--target-dir",
    ])
    .arg(&target)
    .current_dir(repo_root())
    // Small and quick to link: the guest needs no debug info.
    .env("CARGO_PROFILE_DEV_DEBUG", "false")
    .env("CARGO_PROFILE_DEV_STRIP", "symbols");
    output(cmd).unwrap_or_else(|e| {
        panic!(
            "the node plugin must build without libvirt (cargo build --no-default-features): {e}"
        )
    });
    Ok(target.join("debug/virtdisk-csi"))
}

/// The target dir this test binary was built into (`<target>/debug/deps/<test>`).
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
        .filter(|t| t.join("debug").exists())
        .unwrap_or_else(|| repo_root().join("target"))
}

/// The plugin's checkout (this crate lives in its `tests/support`).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `program args`, returning stdout or a message with stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    output(cmd)
}

pub fn output(mut cmd: Command) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| format!("{shown}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{shown}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
