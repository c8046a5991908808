//! Issue 2: socket handling, signals and the CLI.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use virtdisk_test_support::plugin::bin;
use virtdisk_test_support::prelude::*;

#[tokio::test(flavor = "multi_thread")]
async fn socket_is_private_stale_socket_replaced_and_sigterm_exits_cleanly() {
    let mut p = Plugin::start("controller", &[]).await;
    let mode = std::fs::metadata(&p.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A crash leaves the socket file behind; the next start must replace it.
    p.kill();
    assert!(p.socket.exists());
    p.restart().await;
    p.identity().ready().await.unwrap();
    let status = p.stop();
    assert!(status.success(), "exit status {status:?}");
    assert!(!p.socket.exists(), "socket removed on shutdown");
}

#[tokio::test]
async fn socket_group_gets_0660_and_the_bind_leaves_nothing_behind() {
    use std::os::unix::fs::MetadataExt;
    let group = nix::unistd::Group::from_name("daemon")
        .unwrap()
        .expect("group daemon (Debian's base system has it)");
    let p = Plugin::start("controller", &["--socket-group", "daemon"]).await;
    let meta = std::fs::metadata(&p.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), group.gid.as_raw());
    // The socket was made in a private directory and moved into place: nothing else is left.
    let names: Vec<String> = std::fs::read_dir(p.socket.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with(".virtdisk-csi-bind")),
        "{names:?}"
    );
    p.identity().ready().await.unwrap();
}

#[tokio::test]
async fn csi_endpoint_environment_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("env.sock");
    let mut child = Command::new(bin())
        .args(["serve", "--mode", "controller", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("CSI_ENDPOINT", format!("unix://{}", sock.display()))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !sock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no socket from CSI_ENDPOINT"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let ch = virtdisk_csi::csi::channel::connect(&sock).await.unwrap();
    let info = csi::identity_client::IdentityClient::new(ch).info().await;
    assert_eq!(info.name, "virtdisk.csi.io");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn version_and_bad_config_are_reported() {
    let out = Command::new(bin()).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[[pool]]\nname = 'x'\npath = 'relative'\n").unwrap();
    let out = Command::new(bin())
        .args(["serve", "--mode", "controller", "--endpoint"])
        .arg(format!("unix://{}/s.sock", dir.path().display()))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be absolute"));
}

/// Two pools on one directory (spelled alike, through `..`, or through a symlink) or one
/// inside the other: `serve` exits at start naming both pools and the path, before any pool
/// directory is made (every CreateVolume would otherwise be ABORTED forever).
#[test]
fn pools_sharing_a_directory_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().display().to_string();
    std::fs::create_dir(dir.path().join("real")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("link")).unwrap();
    let cfg = dir.path().join("pools.toml");
    for (a, b, how) in [
        ("a", "a", "the same directory"),
        ("a", "x/../a", "the same directory"),
        ("real/p", "link/p", "the same directory"),
        ("a", "a/b", "nested"),
    ] {
        std::fs::write(
            &cfg,
            format!(
                "[[pool]]\nname = 'a'\npath = '{s}/{a}'\n[[pool]]\nname = 'b'\npath = '{s}/{b}'\n"
            ),
        )
        .unwrap();
        let out = Command::new(bin())
            .args(["serve", "--mode", "controller", "--endpoint"])
            .arg(format!("unix://{s}/s.sock"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{a} {b}: {stderr}");
        for want in [
            how,
            &format!("pool \"a\" at {s}/{a}"),
            &format!("pool \"b\" at {s}/{b}"),
        ] {
            assert!(stderr.contains(want), "{a} {b}: no {want:?} in {stderr}");
        }
        assert!(!dir.path().join("a").exists(), "a pool directory was made");
    }
}

#[tokio::test]
async fn driver_name_flag_is_used() {
    let p = Plugin::start("controller", &["--driver-name", "disks.example.org"]).await;
    assert_eq!(p.identity().info().await.name, "disks.example.org");
}

/// `serve --help` says every flag's default, `--driver-name`'s too.
#[test]
fn help_names_the_driver_name_default() {
    let out = Command::new(bin())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let entry: String = help
        .split("--driver-name")
        .nth(1)
        .expect("--driver-name in the help")
        .split("\n  -")
        .next()
        .unwrap()
        .to_string();
    assert!(entry.contains("virtdisk.csi.io"), "{entry}");
}

/// Text logs written to a file (as Nomad, systemd and docker keep them) carry no terminal
/// colour codes; the launcher's plugin writes its stderr to a file.
#[tokio::test]
async fn logs_to_a_file_have_no_colour_codes() {
    let p = Plugin::start("controller", &[]).await;
    p.identity().ready().await.unwrap();
    let log = p.log();
    assert!(log.contains("serving"), "{log}");
    assert!(!log.contains('\u{1b}'), "escape sequences in {log:?}");
}

/// Two instances of one role on one data directory would share its attach ledger (controller)
/// or mount records (node): the second is refused at start with a message naming the fix; a
/// node beside a controller on the same directory is fine.
#[tokio::test]
async fn a_second_instance_of_a_role_on_one_data_dir_is_refused() {
    let p = Plugin::start("controller", &[]).await;
    let second = |mode: &str| {
        Command::new(bin())
            .args(["serve", "--mode", mode, "--endpoint"])
            .arg(format!("unix://{}/second.sock", p.dir.path().display()))
            .arg("--data-dir")
            .arg(p.data_dir())
            .output()
            .unwrap()
    };
    for mode in ["controller", "monolith"] {
        let out = second(mode);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{mode}: {stderr}");
        assert!(
            stderr.contains("another virtdisk-csi controller") && stderr.contains("--data-dir"),
            "{mode}: {stderr}"
        );
    }
    p.identity().ready().await.unwrap();
}

/// Device and inode of the file at `path` (not following a symlink).
fn file_id(path: &std::path::Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).unwrap();
    (meta.dev(), meta.ino())
}

/// A second plugin on the socket of a plugin that serves on it (another data dir, so only the
/// socket collides) is refused with a message naming the path: it neither takes the first
/// one's clients nor, at its exit, removes the socket the first one serves on.
#[tokio::test]
async fn a_second_plugin_on_a_live_plugins_socket_is_refused() {
    let mut p = Plugin::start("controller", &[]).await;
    let before = file_id(&p.socket);
    let other = tempfile::tempdir().unwrap();
    let log = other.path().join("second.log");
    let mut second = Command::new(bin())
        .args(["serve", "--mode", "controller", "--endpoint", &p.endpoint()])
        .arg("--data-dir")
        .arg(other.path().join("data"))
        .env_remove("CSI_ENDPOINT")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Bounded: a second plugin that serves would never exit by itself.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            second.kill().unwrap();
            second.wait().unwrap();
            panic!(
                "the second plugin still runs:\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "another process serves on the socket {}",
            p.socket.display()
        )) && stderr.contains("--endpoint"),
        "{stderr}"
    );
    assert_eq!(file_id(&p.socket), before, "the socket was replaced");
    assert_eq!(p.identity().ready().await.unwrap(), Some(true));
    // A fresh connection reaches the first plugin too.
    let ch = virtdisk_test_support::plugin::connect(&p.socket)
        .await
        .unwrap();
    assert_eq!(
        csi::identity_client::IdentityClient::new(ch)
            .ready()
            .await
            .unwrap(),
        Some(true)
    );
    assert!(p.stop().success());
    assert!(!p.socket.exists(), "socket removed on shutdown");
}

/// A socket file nobody accepts on (its listener was closed, as a crashed process leaves it)
/// is replaced and served on.
#[tokio::test]
async fn a_stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let stale = file_id(&path);
    let mut p = Plugin::launch("controller").socket(&path).start().await;
    assert_eq!(p.identity().ready().await.unwrap(), Some(true));
    assert_ne!(file_id(&path), stale);
    assert!(p.log().contains("replacing a stale socket"), "{}", p.log());
    assert!(p.stop().success());
    assert!(!path.exists(), "socket removed on shutdown");
}

/// A plugin whose socket path holds another file by the time it stops (another instance
/// replaced it) leaves that file alone.
#[tokio::test]
async fn a_plugin_leaves_a_socket_path_another_file_replaced() {
    let mut p = Plugin::start("controller", &[]).await;
    // Another socket moved over the path, as a plugin's bind does.
    let elsewhere = tempfile::tempdir().unwrap();
    let fresh = elsewhere.path().join("new.sock");
    let listener = std::os::unix::net::UnixListener::bind(&fresh).unwrap();
    std::fs::rename(&fresh, &p.socket).unwrap();
    let theirs = file_id(&p.socket);
    assert!(p.stop().success());
    assert_eq!(file_id(&p.socket), theirs, "the other socket was removed");
    std::os::unix::net::UnixStream::connect(&p.socket).expect("the other socket still serves");
    drop(listener);
}

/// A mistyped `--endpoint` naming a file that is not a socket (here a config file) is refused,
/// naming it; the file is left as it was. Only a stale socket is replaced.
#[test]
fn an_endpoint_that_is_not_a_socket_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plugin.toml");
    std::fs::write(&file, "precious").unwrap();
    let out = Command::new(bin())
        .args(["serve", "--mode", "controller", "--endpoint"])
        .arg(format!("unix://{}", file.display()))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("is not a socket") && stderr.contains(&file.display().to_string()),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
}
