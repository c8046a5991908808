//! What virtdisk-csi's integration tests (`tests/*.rs`) and its benchmark (`benches/`) share:
//! one tree of helpers that drive the real things (the plugin binary, libvirtd, KVM, qemu-img,
//! loop devices, mounts, Linux guests), so that each test says only what it checks.
//!
//! | module | what |
//! |---|---|
//! | [`plugin`] | [`Plugin`]: the real binary on a temp socket and data dir, started, crashed, restarted |
//! | [`rpc`] | CSI request builders with sensible defaults, and short calls on the gRPC clients |
//! | [`calls`] | one-line controller calls by name and id, for scenario tests |
//! | [`virsh`] | `virsh` on `qemu:///system`, libvirtd started if it is not running, and a mute one |
//! | [`domain`] | [`TestDomain`]: a throwaway KVM domain (no OS) to hot-plug into, on any libvirtd, following live migrations |
//! | [`failpoint`] | [`failpoint::Hold`]: a debug build's failpoint that pauses until the test releases it |
//! | [`second_libvirtd`] | [`second_libvirtd::SecondLibvirtd`]: a second, independent libvirtd (a second hypervisor host) in its own mount namespace |
//! | [`qemu`] | qemu-img and qemu-io on images: info, check, create, data patterns |
//! | [`pool`] | a pool directory's on-disk truth (records, layers) and its invariants |
//! | [`local_attach`] | a monolith with local attach on this host, and proof that nothing leaks |
//! | [`sequence`] | a write stream across volumes whose order any snapshot of them shows |
//! | [`metrics`] | the plugin's metrics endpoint: its address from the log, HTTP GET, samples |
//! | [`guestbed`] | Linux guests run by libvirt with the node plugin inside |
//! | [`nomad_agent`] | a real Nomad agent (`../shared/tools/nomad`) driven by its CLI and HTTP API |
//!
//! A test starts with `use virtdisk_test_support::prelude::*;` and names the rest by module:
//!
//! ```ignore
//! use virtdisk_test_support::prelude::*;
//!
//! #[tokio::test]
//! async fn example() {
//!     let dom = TestDomain::start("example", 3);
//!     let p = Plugin::launch("controller").readable_by_qemu().start().await;
//!     let vol = p.controller().create(create_req("a", 64 * MIB)).await.unwrap();
//!     p.controller().publish(publish_req(&vol.volume_id, &dom.uuid)).await.unwrap();
//!     assert!(dom.live_disk(&serial_of(&vol.volume_id)).is_some());
//! }
//! ```
//!
//! Every libvirt domain, temp dir and socket a helper makes has a unique name (process id and
//! a counter), so tests and helpers of other checkouts can share one libvirtd; what a crashed
//! run left behind is swept once its process is gone.

pub mod calls;
pub mod domain;
pub mod failpoint;
pub mod guestbed;
pub mod local_attach;
pub mod metrics;
pub mod nomad_agent;
pub mod plugin;
pub mod pool;
pub mod qemu;
pub mod rpc;
pub mod second_libvirtd;
pub mod sequence;
pub mod virsh;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

pub use domain::TestDomain;
pub use plugin::Plugin;
/// The CSI messages and clients, as the plugin's library generates them.
pub use virtdisk_csi::csi::proto as csi;

/// One mebibyte, in the `i64` the CSI messages use for sizes.
pub const MIB: i64 = 1 << 20;
/// One gibibyte.
pub const GIB: i64 = 1 << 30;

/// What most tests use: the launcher, the domain, the request builders and short calls, the
/// size constants and the qemu helpers.
pub mod prelude {
    pub use crate::csi;
    pub use crate::domain::TestDomain;
    pub use crate::plugin::Plugin;
    pub use crate::qemu::{
        assert_pattern, has_pattern, qemu_img_check, qemu_img_info, write_pattern,
    };
    pub use crate::rpc::*;
    pub use crate::{
        eventually, key_of, ms, open_for_qemu, output_text, run_ok, serial_of, GIB, MIB,
    };
}

/// The key of a volume or snapshot id (`<pool>.<key>`): the part that names its files.
pub fn key_of(id: &str) -> &str {
    id.rsplit_once('.').expect("an id <pool>.<key>").1
}

/// The serial the plugin gives a volume's disk (`vd-<key>`).
pub fn serial_of(volume_id: &str) -> String {
    format!("vd-{}", key_of(volume_id))
}

/// Makes `dir` searchable and readable by everyone (0755), so that libvirt's QEMU (user
/// libvirt-qemu) reaches images below a test temp dir (those are 0700).
pub fn open_for_qemu(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A tool of `shared/tools/` (csi-sanity, nomad, hostpathplugin): `$var` when set, else
/// `shared/tools/<name>` beside the project root or one of its parents (`../shared/tools` from
/// a checkout; worktrees sit deeper), else `<name>` on PATH.
pub fn shared_tool(name: &str, var: &str) -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        return Some(p.into());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    root.ancestors()
        .map(|d| d.join("shared/tools").join(name))
        .find(|p| p.is_file())
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
}

/// Milliseconds since `t`, for the latency lines tests print.
pub fn ms(t: Instant) -> u128 {
    t.elapsed().as_millis()
}

/// Calls `check` every 200 ms until it answers `Ok`, for `timeout` at most; then panics with
/// its last `Err` (what is still not so).
pub async fn eventually<T, F, Fut>(timeout: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(why) => assert!(Instant::now() < deadline, "after {timeout:?}: {why}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Every path below `dir` with its metadata, symlinks not followed (depth first).
pub fn walk(dir: &Path) -> Vec<(std::path::PathBuf, std::fs::Metadata)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for path in rd.filter_map(|e| e.ok()).map(|e| e.path()) {
            let Ok(m) = path.symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                todo.push(path.clone());
            }
            out.push((path, m));
        }
    }
    out
}

/// A finished command's stdout and stderr, one after the other.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `program args`, asserts it succeeded (showing its stderr) and returns its stdout.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    run_cmd(Command::new(program).args(args))
}

/// Runs a prepared command like [`run_ok`].
pub fn run_cmd(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{:?}: {e}", cmd.get_program()));
    assert!(
        out.status.success(),
        "{cmd:?}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
