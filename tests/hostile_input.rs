//! Hostile input: property tests throw every request type at a running monolith with strings
//! built from NUL, `../`, absolute paths, XML metacharacters, unicode and huge lengths, huge
//! maps, negative and overflowing sizes, and staging/target paths outside the allowed roots or
//! through symlinks. Every answer must be a clean gRPC code (never INTERNAL or a dropped
//! connection), INVALID_ARGUMENT whenever an id or path is malformed, the process must stay
//! up, and nothing may change outside the pool: no file, no mount. A libvirt test checks that
//! names and parameters full of XML never change the shape of a domain's XML.

use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use virtdisk_test_support::calls::{create_volume, delete_volume, list_volumes};
use virtdisk_test_support::local_attach as env;
use virtdisk_test_support::pool::{assert_pool_clean, volume_image, wait_flattening_settled};
use virtdisk_test_support::prelude::*;

/// Strings that have broken parsers, paths and XML writers before.
const NASTY: &[&str] = &[
    "",
    " ",
    ".",
    "..",
    "../../../../etc/passwd",
    "/etc/passwd",
    "a/b",
    "a\0b",
    "\0",
    "default.0123456789abcdef",
    "default.s0123456789abcdef",
    "default..0123456789abcdef",
    ".hidden",
    "'/><disk type='file' device='cdrom'><source file='/etc/shadow'/></disk><x a='",
    "\"/><disk type=\"block\"><source dev=\"/dev/vda\"/></disk>",
    "<![CDATA[]]>",
    "&amp;&lt;&#0;&#x0;",
    "]]>",
    "${HOME}$(id)`id`",
    "%s%n%x",
    "\n\r\t",
    "💣\u{202e}\u{feff}ü",
    "\u{7f}\u{1b}[31m",
    "C:\\Windows",
    "virtio'/><disk",
    "18446744073709551616",
    "-1",
    "9223372036854775807",
    "0x10",
    "NaN",
];

const BAD_CODES: &[Code] = &[
    Code::Internal,
    Code::Unknown,
    Code::Unavailable,
    Code::Cancelled,
    Code::DeadlineExceeded,
    Code::DataLoss,
    Code::Unimplemented,
];

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(NASTY).prop_map(str::to_string),
        2 => proptest::collection::vec(any::<char>(), 0..24).prop_map(String::from_iter),
        2 => (select(NASTY), proptest::collection::vec(any::<char>(), 0..6))
            .prop_map(|(a, b)| format!("{a}{}", String::from_iter(b))),
        1 => (select(&["x", "é", "/", "../", "<"][..]), 100usize..5000)
            .prop_map(|(s, n)| s.repeat(n)),
    ]
}

/// Ids: nasty text, or well-formed ids of nothing, or the real volume's id.
fn id(real: String) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => text(),
        1 => Just(real),
        1 => "[a-z]{1,8}\\.[0-9a-f]{16}",
    ]
}

fn size() -> impl Strategy<Value = i64> {
    prop_oneof![
        select(
            &[
                i64::MIN,
                -1,
                0,
                1,
                4095,
                MIB,
                64 * MIB,
                1 << 50,
                1 << 62,
                i64::MAX
            ][..]
        ),
        any::<i64>(),
    ]
}

const PARAM_KEYS: &[&str] = &[
    "pool",
    "format",
    "bus",
    "cache",
    "io",
    "discard",
    "logicalBlockSize",
    "physicalBlockSize",
    "persist",
    "totalBytesSec",
    "readIopsSec",
    "csi.storage.k8s.io/pvc/name",
];

fn map() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop_oneof![
        3 => proptest::collection::btree_map(select(PARAM_KEYS).prop_map(str::to_string), text(), 0..3),
        1 => proptest::collection::btree_map(text(), text(), 0..4),
        // Huge: more entries than allowed, or a key too long.
        1 => (65usize..300).prop_map(|n| (0..n).map(|i| (format!("k{i}"), "v".into())).collect()),
        1 => Just(BTreeMap::from([("k".repeat(300), "v".repeat(5000))])),
    ]
}

/// Paths: nasty text, or paths inside the canary's allowed root, outside it, or through its
/// symlinks.
fn path(canary: PathBuf) -> impl Strategy<Value = String> {
    let c = canary.display().to_string();
    let fixed = vec![
        format!("{c}/csi/staging/x"),
        format!("{c}/csi/target/y"),
        format!("{c}/csi/../outside/z"),
        format!("{c}/csi/./x"),
        format!("{c}/csi/link-out/z"),
        format!("{c}/csi/leaf-link"),
        format!("{c}/outside"),
        format!("{c}/outside/keep.txt"),
        format!("{c}/csi/foreign-mount"),
        "/".into(),
        "//".into(),
        "/proc/self/root/etc".into(),
        "/dev/null".into(),
        "/etc".into(),
        "relative/path".into(),
        format!("{c}/csi/{}", "d/".repeat(2100)),
    ];
    prop_oneof![
        2 => text(),
        3 => select(fixed),
        2 => text().prop_map(move |t| format!("{c}/csi/{t}")),
    ]
}

fn cap() -> impl Strategy<Value = Option<csi::VolumeCapability>> {
    let mount = (text(), proptest::collection::vec(text(), 0..3), 0i32..10).prop_map(
        |(fs, flags, mode)| csi::VolumeCapability {
            access_type: Some(csi::volume_capability::AccessType::Mount(
                csi::volume_capability::MountVolume {
                    fs_type: fs,
                    mount_flags: flags,
                    volume_mount_group: String::new(),
                },
            )),
            access_mode: Some(csi::volume_capability::AccessMode { mode }),
        },
    );
    prop_oneof![
        Just(None),
        Just(Some(mount_cap("ext4", Mode::SingleNodeWriter))),
        Just(Some(block_cap(Mode::MultiNodeMultiWriter))),
        mount.prop_map(Some),
    ]
}

#[derive(Debug, Clone)]
enum Req {
    CreateVolume(csi::CreateVolumeRequest),
    DeleteVolume(csi::DeleteVolumeRequest),
    Publish(csi::ControllerPublishVolumeRequest),
    Unpublish(csi::ControllerUnpublishVolumeRequest),
    Validate(csi::ValidateVolumeCapabilitiesRequest),
    ListVolumes(csi::ListVolumesRequest),
    Capacity(csi::GetCapacityRequest),
    Expand(csi::ControllerExpandVolumeRequest),
    GetVolume(csi::ControllerGetVolumeRequest),
    Modify(csi::ControllerModifyVolumeRequest),
    CreateSnapshot(csi::CreateSnapshotRequest),
    DeleteSnapshot(csi::DeleteSnapshotRequest),
    ListSnapshots(csi::ListSnapshotsRequest),
    GetSnapshot(csi::GetSnapshotRequest),
    Stage(csi::NodeStageVolumeRequest),
    Unstage(csi::NodeUnstageVolumeRequest),
    NodePublish(csi::NodePublishVolumeRequest),
    NodeUnpublish(csi::NodeUnpublishVolumeRequest),
    Stats(csi::NodeGetVolumeStatsRequest),
    NodeExpand(csi::NodeExpandVolumeRequest),
}

fn requests(real: String, node: String, canary: PathBuf) -> impl Strategy<Value = Req> {
    let vid = move || id(real.clone());
    let p = move || path(canary.clone());
    let node_id = prop_oneof![text(), Just(node)];
    let range = || {
        (size(), size()).prop_map(|(r, l)| {
            Some(csi::CapacityRange {
                required_bytes: r,
                limit_bytes: l,
            })
        })
    };
    prop_oneof![
        (
            text(),
            map(),
            range(),
            cap(),
            proptest::option::of(id(String::new())),
            map()
        )
            .prop_map(|(name, parameters, capacity_range, cap, source, secrets)| {
                Req::CreateVolume(csi::CreateVolumeRequest {
                    name,
                    capacity_range,
                    volume_capabilities: cap.into_iter().collect(),
                    parameters,
                    secrets,
                    volume_content_source: source.and_then(|s| content(from_snapshot(&s))),
                    ..Default::default()
                })
            }),
        // Never the real volume: it stays to be published and staged at hostile paths.
        id(String::new()).prop_map(|v| Req::DeleteVolume(delete_req(&v))),
        (vid(), node_id.clone(), cap(), any::<bool>(), map()).prop_map(
            |(v, n, volume_capability, readonly, volume_context)| {
                Req::Publish(csi::ControllerPublishVolumeRequest {
                    volume_capability,
                    readonly,
                    volume_context,
                    ..publish_req(&v, &n)
                })
            }
        ),
        (vid(), node_id).prop_map(|(v, n)| Req::Unpublish(unpublish_req(&v, &n))),
        (vid(), cap(), map()).prop_map(|(volume_id, cap, parameters)| Req::Validate(
            csi::ValidateVolumeCapabilitiesRequest {
                volume_id,
                volume_capabilities: cap.into_iter().collect(),
                parameters,
                ..Default::default()
            }
        )),
        (any::<i32>(), text()).prop_map(|(max_entries, starting_token)| Req::ListVolumes(
            csi::ListVolumesRequest {
                max_entries,
                starting_token,
            }
        )),
        map().prop_map(|parameters| Req::Capacity(csi::GetCapacityRequest {
            parameters,
            ..Default::default()
        })),
        (vid(), range(), cap()).prop_map(|(v, capacity_range, volume_capability)| {
            Req::Expand(csi::ControllerExpandVolumeRequest {
                capacity_range,
                volume_capability,
                ..expand_req(&v, 0)
            })
        }),
        vid().prop_map(|volume_id| Req::GetVolume(csi::ControllerGetVolumeRequest { volume_id })),
        (vid(), map()).prop_map(|(volume_id, mutable_parameters)| Req::Modify(
            csi::ControllerModifyVolumeRequest {
                volume_id,
                mutable_parameters,
                ..Default::default()
            }
        )),
        (text(), vid(), map()).prop_map(|(name, source, parameters)| {
            Req::CreateSnapshot(csi::CreateSnapshotRequest {
                parameters,
                ..snapshot_req(&name, &source)
            })
        }),
        id(String::new()).prop_map(|s| Req::DeleteSnapshot(delete_snapshot_req(&s))),
        (text(), vid(), text(), any::<i32>()).prop_map(
            |(snapshot_id, source_volume_id, starting_token, max_entries)| {
                Req::ListSnapshots(csi::ListSnapshotsRequest {
                    max_entries,
                    starting_token,
                    source_volume_id,
                    snapshot_id,
                    ..Default::default()
                })
            }
        ),
        text().prop_map(|snapshot_id| Req::GetSnapshot(csi::GetSnapshotRequest {
            snapshot_id,
            ..Default::default()
        })),
        (vid(), p(), cap(), map(), map()).prop_map(
            |(v, staging, volume_capability, publish_context, volume_context)| {
                Req::Stage(csi::NodeStageVolumeRequest {
                    publish_context,
                    volume_capability,
                    volume_context,
                    ..stage_req(&v, &staging, ext4_cap())
                })
            }
        ),
        (vid(), p()).prop_map(|(v, staging)| Req::Unstage(unstage_req(&v, &staging))),
        (vid(), p(), p(), cap(), any::<bool>()).prop_map(
            |(v, staging, target, volume_capability, readonly)| {
                Req::NodePublish(csi::NodePublishVolumeRequest {
                    volume_capability,
                    readonly,
                    ..node_publish_req(&v, &staging, &target, ext4_cap())
                })
            }
        ),
        (vid(), p()).prop_map(|(v, target)| Req::NodeUnpublish(node_unpublish_req(&v, &target))),
        (vid(), p(), p()).prop_map(|(v, path, staging)| Req::Stats(stats_req(&v, &path, &staging))),
        (vid(), p(), p(), size()).prop_map(|(v, path, staging, s)| {
            Req::NodeExpand(csi::NodeExpandVolumeRequest {
                staging_target_path: staging,
                ..node_expand_req(&v, &path, s)
            })
        }),
    ]
}

/// Mirrors `ids::check_safe_id`: what must be INVALID_ARGUMENT as an id.
fn bad_id(s: &str) -> bool {
    s.is_empty()
        || s.len() > 128
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        || s.contains("..")
        || s.starts_with('.')
}

/// Mirrors `node::paths::check`: what must be INVALID_ARGUMENT as a path.
fn bad_path(s: &str) -> bool {
    s.is_empty()
        || s.len() > 4000
        || s.contains('\0')
        || !s.starts_with('/')
        || s.split('/').any(|seg| seg == "." || seg == "..")
        || s.split('/').all(|seg| seg.is_empty())
}

/// Whether a well-formed path leads outside the allowed root `<canary>/csi` (or is the root).
fn outside(canary: &Path, s: &str) -> bool {
    let root = format!("{}/csi/", canary.display());
    match s.strip_prefix(&root) {
        None => true,
        Some(rest) => {
            rest.trim_matches('/').is_empty()
                || rest.starts_with("link-out")
                || rest.trim_end_matches('/') == "leaf-link"
        }
    }
}

/// Whether a volume_path must be INVALID_ARGUMENT: unreadable, or well-formed and outside the
/// root.
fn bad_volume_path(canary: &Path, s: &str) -> bool {
    s.is_empty() || s.len() > 4000 || s.contains('\0') || (!bad_path(s) && outside(canary, s))
}

/// Whether a CO path must be INVALID_ARGUMENT: malformed, or leading outside the root.
fn bad_co_path(canary: &Path, s: &str) -> bool {
    bad_path(s) || outside(canary, s)
}

/// Whether the request must be INVALID_ARGUMENT from its ids and paths alone.
fn must_be_invalid(canary: &Path, r: &Req) -> bool {
    let bad = |s: &str| bad_co_path(canary, s);
    let bad_opt = |s: &str| !s.is_empty() && bad_co_path(canary, s);
    match r {
        Req::CreateVolume(c) => c.name.is_empty() || c.name.len() > 128 || c.name.contains('\0'),
        Req::DeleteVolume(c) => bad_id(&c.volume_id),
        Req::Publish(c) => bad_id(&c.volume_id),
        Req::Unpublish(c) => bad_id(&c.volume_id),
        Req::Validate(c) => bad_id(&c.volume_id),
        Req::Expand(c) => bad_id(&c.volume_id),
        Req::GetVolume(c) => bad_id(&c.volume_id),
        Req::Modify(c) => bad_id(&c.volume_id),
        Req::DeleteSnapshot(c) => bad_id(&c.snapshot_id),
        Req::GetSnapshot(c) => bad_id(&c.snapshot_id),
        Req::CreateSnapshot(c) => {
            c.name.is_empty()
                || c.name.len() > 128
                || c.name.contains('\0')
                || bad_id(&c.source_volume_id)
        }
        Req::Stage(c) => bad_id(&c.volume_id) || bad(&c.staging_target_path),
        Req::Unstage(c) => bad_id(&c.volume_id) || bad(&c.staging_target_path),
        Req::NodePublish(c) => {
            bad_id(&c.volume_id) || bad(&c.target_path) || bad_opt(&c.staging_target_path)
        }
        Req::NodeUnpublish(c) => bad_id(&c.volume_id) || bad(&c.target_path),
        // A volume_path where no volume can be (relative, `.`/`..`, `/`) is NOT_FOUND (CSI:
        // the volume does not exist there); unreadable or outside the roots, INVALID_ARGUMENT.
        Req::Stats(c) => {
            bad_id(&c.volume_id)
                || bad_volume_path(canary, &c.volume_path)
                || bad_opt(&c.staging_target_path)
        }
        Req::NodeExpand(c) => {
            bad_id(&c.volume_id)
                || bad_volume_path(canary, &c.volume_path)
                || bad_opt(&c.staging_target_path)
        }
        Req::ListVolumes(_) | Req::Capacity(_) | Req::ListSnapshots(_) => false,
    }
}

async fn send(p: &Plugin, r: Req) -> Result<(), tonic::Status> {
    let (mut c, mut n) = (p.controller(), p.node());
    match r {
        Req::CreateVolume(x) => c.create_volume(x).await.map(drop),
        Req::DeleteVolume(x) => c.delete_volume(x).await.map(drop),
        Req::Publish(x) => c.controller_publish_volume(x).await.map(drop),
        Req::Unpublish(x) => c.controller_unpublish_volume(x).await.map(drop),
        Req::Validate(x) => c.validate_volume_capabilities(x).await.map(drop),
        Req::ListVolumes(x) => c.list_volumes(x).await.map(drop),
        Req::Capacity(x) => c.get_capacity(x).await.map(drop),
        Req::Expand(x) => c.controller_expand_volume(x).await.map(drop),
        Req::GetVolume(x) => c.controller_get_volume(x).await.map(drop),
        Req::Modify(x) => c.controller_modify_volume(x).await.map(drop),
        Req::CreateSnapshot(x) => c.create_snapshot(x).await.map(drop),
        Req::DeleteSnapshot(x) => c.delete_snapshot(x).await.map(drop),
        Req::ListSnapshots(x) => c.list_snapshots(x).await.map(drop),
        Req::GetSnapshot(x) => c.get_snapshot(x).await.map(drop),
        Req::Stage(x) => n.node_stage_volume(x).await.map(drop),
        Req::Unstage(x) => n.node_unstage_volume(x).await.map(drop),
        Req::NodePublish(x) => n.node_publish_volume(x).await.map(drop),
        Req::NodeUnpublish(x) => n.node_unpublish_volume(x).await.map(drop),
        Req::Stats(x) => n.node_get_volume_stats(x).await.map(drop),
        Req::NodeExpand(x) => n.node_expand_volume(x).await.map(drop),
    }
}

/// Every path under `dir` (not following symlinks) with its size and mtime.
fn tree(dir: &Path) -> BTreeMap<PathBuf, (u64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let all = virtdisk_test_support::walk(dir);
    all.into_iter()
        .map(|(path, m)| (path, (m.size(), m.mtime())))
        .collect()
}

/// Mount points under any of `dirs` (tests run in parallel: only their own dirs count).
fn mounts_under(dirs: &[&Path]) -> Vec<String> {
    let t = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    t.lines()
        .map(|l| l.split(' ').nth(4).unwrap_or("").to_string())
        .filter(|m| dirs.iter().any(|d| Path::new(m).starts_with(d)))
        .collect()
}

fn mounts() -> Vec<String> {
    mounts_under(&[Path::new("/")])
}

/// Takes down whatever a test left mounted, attached or running under its dirs.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for d in &self.0 {
            env::cleanup(d);
        }
    }
}

/// The canary: `csi/` is the allowed root; `outside/` must never change; `csi/link-out`
/// leads outside, `csi/leaf-link` is a symlink leaf, `csi/foreign-mount` a mount that no
/// volume of the plugin owns (a tmpfs, mounted by the test that uses it).
fn canary() -> tempfile::TempDir {
    let c = tempfile::tempdir().unwrap();
    let root = c.path();
    std::fs::create_dir_all(root.join("csi/staging")).unwrap();
    std::fs::create_dir_all(root.join("outside/target")).unwrap();
    std::fs::write(root.join("outside/keep.txt"), b"untouched").unwrap();
    std::os::unix::fs::symlink(root.join("outside"), root.join("csi/link-out")).unwrap();
    std::os::unix::fs::symlink(root.join("outside/target"), root.join("csi/leaf-link")).unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_clean_errors_and_touch_nothing() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: the node service needs root");
        return;
    }
    let c = canary();
    let canary_dir = c.path().canonicalize().unwrap();
    let config = format!(
        "[libvirt]\nenabled = false\n[node]\ndevice_wait_secs = 0\nallowed_path_roots = [\"{}/csi\"]\n",
        canary_dir.display()
    );
    let mut p = Plugin::start_with_config("monolith", &config, &[]).await;
    let node = p.node().node_id().await;
    // The target of the generated requests (it gets attached, formatted, staged, published),
    // and a bystander no request names, whose data must survive whatever happens.
    let real = create_volume(&p, "hostile-target", 16 * MIB, &[])
        .await
        .unwrap();
    let bystander = create_volume(&p, "hostile-bystander", 16 * MIB, &[])
        .await
        .unwrap();
    let bystander_image = volume_image(&p.pool_dir(), &bystander);
    write_pattern(&bystander_image, 0x5a, 0, MIB as u64);
    let outside_before = tree(&canary_dir.join("outside"));
    // The foreign mount: a tmpfs no volume owns (its data lives only as long as it is
    // mounted), below the allowed root where requests point.
    let foreign = canary_dir.join("csi/foreign-mount");
    std::fs::create_dir_all(&foreign).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "vdt-foreign"])
        .arg(&foreign)
        .status()
        .unwrap();
    assert!(st.success(), "mounting the foreign tmpfs");
    std::fs::write(foreign.join("keep.txt"), b"untouched").unwrap();
    let foreign_intact =
        || std::fs::read(foreign.join("keep.txt")).ok().as_deref() == Some(&b"untouched"[..]);
    let data_dir = p.data_dir();
    // The real volume may get attached (its export under localattach/) and staged or
    // published below the allowed root: mounts may appear there, and nowhere else.
    let _cleanup = Cleanup(vec![canary_dir.clone(), p.dir.path().to_path_buf()]);
    let allowed = [canary_dir.join("csi"), data_dir.join("localattach")];
    let stray_mounts = || -> Vec<String> {
        mounts_under(&[canary_dir.as_path(), p.dir.path()])
            .into_iter()
            .filter(|m| !allowed.iter().any(|a| Path::new(m).starts_with(a)))
            .collect()
    };

    let cases = std::env::var("VDT_HOSTILE_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = requests(real.clone(), node, canary_dir.clone());
    let rt = tokio::runtime::Handle::current();
    let tally: std::cell::RefCell<BTreeMap<String, usize>> = Default::default();
    let p_ref = &p;
    let result = tokio::task::block_in_place(|| {
        runner
            .run(&strategy, |req| {
                let invalid = must_be_invalid(&canary_dir, &req);
                let what: String = format!("{req:?}").chars().take(600).collect();
                let what = what.as_str();
                let answer = rt.block_on(tokio::time::timeout(
                    Duration::from_secs(60),
                    send(p_ref, req.clone()),
                ));
                let answer = answer
                    .map_err(|_| TestCaseError::fail(format!("no answer in 60 s: {what}")))?;
                let code = answer.as_ref().err().map_or(Code::Ok, |s| s.code());
                let kind = what.split('(').next().unwrap_or("").to_string();
                *tally
                    .borrow_mut()
                    .entry(format!("{kind} {code:?}"))
                    .or_default() += 1;
                if BAD_CODES.contains(&code) {
                    return Err(TestCaseError::fail(format!(
                        "{code:?} for {what}: {answer:?}"
                    )));
                }
                if invalid && code != Code::InvalidArgument {
                    return Err(TestCaseError::fail(format!(
                        "{code:?}, not InvalidArgument, for {what}: {answer:?}"
                    )));
                }
                if !foreign_intact() {
                    return Err(TestCaseError::fail(format!(
                        "the foreign tmpfs was taken down after {what}"
                    )));
                }
                if tree(&canary_dir.join("outside")) != outside_before {
                    return Err(TestCaseError::fail(format!(
                        "outside/ changed after {what}"
                    )));
                }
                let stray = stray_mounts();
                if !stray.is_empty() {
                    return Err(TestCaseError::fail(format!(
                        "mounts {stray:?} appeared after {what}"
                    )));
                }
                Ok(())
            })
            .map_err(|e| e.to_string())
    });
    eprintln!("{:#?}", tally.borrow());
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(
        p.wait_exit(Duration::ZERO).await.is_none(),
        "the plugin died"
    );
    p.identity().ready().await.expect("still ready");
    assert!(!p.log().contains("panicked"), "a handler panicked");
    // Nothing but pools, local-attach state, the node's mount records and the instance's
    // claims in the data dir; the pool is consistent and the volume that was there keeps its
    // data.
    let expected = [
        "pools",
        "localattach",
        "node",
        "controller.lock",
        "node.lock",
    ];
    for entry in std::fs::read_dir(&data_dir).unwrap() {
        let name = entry.unwrap().file_name();
        assert!(
            expected.contains(&name.to_str().unwrap()),
            "unexpected {name:?} in the data dir"
        );
    }
    wait_flattening_settled(&p, virtdisk_csi::pool::DEFAULT_MAX_CHAIN_DEPTH).await;
    assert_pool_clean(&p.pool_dir());
    assert!(list_volumes(&p).await.contains_key(&real));
    assert_pattern(&bystander_image, 0x5a, 0, MIB as u64);
    assert_eq!(
        std::fs::read(canary_dir.join("outside/keep.txt")).unwrap(),
        b"untouched"
    );
}

/// A real, attached volume and paths that lead outside the allowed root, through symlinks, or
/// onto files that are not the plugin's: refused, and nothing outside changes; an unpublish or
/// unstage of a path holding a file (no mount) keeps the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_outside_the_root_or_through_symlinks_are_refused_for_a_real_volume() {
    if !nix::unistd::geteuid().is_root() || !Path::new("/dev/loop-control").exists() {
        eprintln!("SKIPPED: needs root and loop devices");
        return;
    }
    let c = canary();
    let cd = c.path().canonicalize().unwrap();
    let csi_dir = cd.join("csi");
    std::fs::create_dir(csi_dir.join("inner")).unwrap();
    std::os::unix::fs::symlink(csi_dir.join("inner"), csi_dir.join("inner-link")).unwrap();
    std::fs::write(csi_dir.join("notes.txt"), b"the CO's file").unwrap();
    let config = format!(
        "[libvirt]\nenabled = false\n[node]\ndevice_wait_secs = 5\nallowed_path_roots = [\"{}\"]\n",
        csi_dir.display()
    );
    let p = Plugin::start_with_config("monolith", &config, &[]).await;
    let node = p.node().node_id().await;
    let vol = create_volume(&p, "hostile-paths", 32 * MIB, &[])
        .await
        .unwrap();
    let ctx = p.controller().publish(publish_req(&vol, &node)).await;
    let ctx = ctx.unwrap();
    let outside_before = tree(&cd.join("outside"));
    let s = |path: &Path| path.display().to_string();
    let stage = |path: &Path| {
        let req = csi::NodeStageVolumeRequest {
            publish_context: ctx.clone(),
            ..stage_req(&vol, &s(path), ext4_cap())
        };
        let mut n = p.node();
        async move { n.stage(req).await }
    };
    let publish = |staging: &Path, target: &Path| {
        let req = node_publish_req(&vol, &s(staging), &s(target), ext4_cap());
        let mut n = p.node();
        async move { n.publish(req).await }
    };
    for bad in [
        csi_dir.join("link-out/stage"),
        csi_dir.join("leaf-link"),
        cd.join("outside/stage"),
        csi_dir.clone(),
    ] {
        let r = stage(&bad).await;
        assert_eq!(
            code_of(&r),
            Code::InvalidArgument,
            "stage at {}",
            bad.display()
        );
    }
    // Inside the root but a symlink leaf: refused too (mount would follow it).
    assert_eq!(
        code_of(&stage(&csi_dir.join("inner-link")).await),
        Code::InvalidArgument
    );
    let staging = csi_dir.join("staging/ok");
    stage(&staging).await.expect("stage inside the root");
    for bad in [
        csi_dir.join("link-out/target"),
        csi_dir.join("leaf-link"),
        csi_dir.join("inner-link"),
        cd.join("outside/target"),
    ] {
        let r = publish(&staging, &bad).await;
        assert_eq!(
            code_of(&r),
            Code::InvalidArgument,
            "publish at {}",
            bad.display()
        );
    }
    let target = csi_dir.join("target/ok");
    publish(&staging, &target)
        .await
        .expect("publish inside the root");
    std::fs::write(target.join("data.txt"), b"volume data").unwrap();

    // A path that holds a file of the CO, not a mount: OK (nothing of ours is there), and the
    // file stays.
    let mut n = p.node();
    let notes = s(&csi_dir.join("notes.txt"));
    n.unpublish(node_unpublish_req(&vol, &notes)).await.unwrap();
    n.unstage(unstage_req(&vol, &notes)).await.unwrap();
    assert_eq!(
        std::fs::read(csi_dir.join("notes.txt")).unwrap(),
        b"the CO's file"
    );
    assert_eq!(
        tree(&cd.join("outside")),
        outside_before,
        "outside/ changed"
    );
    assert!(
        !mounts()
            .iter()
            .any(|m| m.starts_with(&cd.join("outside").display().to_string())),
        "a mount outside the root"
    );

    n.unpublish(node_unpublish_req(&vol, &s(&target)))
        .await
        .unwrap();
    n.unstage(unstage_req(&vol, &s(&staging))).await.unwrap();
    let r = p.controller().unpublish(unpublish_req(&vol, &node)).await;
    r.unwrap();
    delete_volume(&p, &vol).await.unwrap();
    assert!(!mounts()
        .iter()
        .any(|m| m.starts_with(&cd.display().to_string())));
}

/// Names and parameters full of XML never change the shape of a domain's XML: hostile values
/// of real keys are INVALID_ARGUMENT, names and orchestrator metadata are stored, never
/// written into XML, and the attached disk is exactly the one the plugin means.
#[cfg(feature = "libvirt")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xml_metacharacters_never_reach_the_domain_xml() {
    let dom = TestDomain::start("xml", 3);
    let launch = Plugin::launch("controller").config("[libvirt]\ndetach_timeout_secs = 5\n");
    let p = launch.readable_by_qemu().start().await;
    let evil = "'/><disk type='file' device='cdrom'><source file='/etc/shadow'/><target dev='hdz'/></disk><x a='";
    let before = dom.live_xml();
    for (k, v) in [
        ("bus", "scsi'/><disk"),
        ("cache", "none\"/><disk device=\"cdrom\""),
        ("io", "native]]>"),
        ("discard", "unmap&amp;"),
        ("totalBytesSec", "1</total_bytes_sec><x>"),
        ("totalBytesSec", "18446744073709551615"),
        ("logicalBlockSize", "512'"),
        ("pool", evil),
        ("format", "qcow2'/>"),
    ] {
        let err = create_volume(&p, "xml-bad-param", 16 * MIB, &[(k, v)])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{k}={v:?}: {err:?}");
    }
    let vol = create_volume(
        &p,
        evil,
        16 * MIB,
        &[
            ("csi.storage.k8s.io/pvc/name", evil),
            ("csi.storage.k8s.io/pvc/namespace", "]]><![CDATA[&"),
            ("totalBytesSec", "1000000"),
        ],
    )
    .await
    .expect("a name is any UTF-8; it never reaches XML");
    let mut c = p.controller();
    let err = c.publish(publish_req(&vol, evil)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    c.publish(publish_req(&vol, &dom.uuid))
        .await
        .expect("publish");
    for xml in [dom.live_xml(), dom.inactive_xml()] {
        assert_eq!(xml.matches("<disk ").count(), 1, "{xml}");
        assert!(!xml.contains("cdrom") && !xml.contains("/etc/shadow") && !xml.contains("hdz"));
        assert!(!xml.contains("CDATA"), "{xml}");
    }
    let disk = dom.live_disk(&serial_of(&vol)).expect("the plugin's disk");
    assert_eq!(disk.iotune.total_bytes_sec, Some(1000000));
    assert!(disk
        .source
        .unwrap()
        .starts_with(p.pool_dir().join("images")));
    // QoS changes with hostile values are refused too.
    let err = p
        .controller()
        .controller_modify_volume(csi::ControllerModifyVolumeRequest {
            volume_id: vol.clone(),
            mutable_parameters: params(&[("totalBytesSec", "5</total_bytes_sec>")]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    c.unpublish(unpublish_req(&vol, &dom.uuid))
        .await
        .expect("unpublish");
    let after = dom.live_xml();
    assert_eq!(
        after.matches("<disk ").count(),
        before.matches("<disk ").count()
    );
    delete_volume(&p, &vol).await.unwrap();
}
