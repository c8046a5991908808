//! Bounded shutdown (issue 17 §4, defect 5): SIGTERM ends the plugin within its grace period
//! even while a libvirt call hangs, background tasks are joined rather than waited out, and
//! `doctor` ends within its own check timeout against a libvirtd that never answers.

use std::process::Command;
use std::time::{Duration, Instant};
use virtdisk_test_support::metrics::{http_get, metrics_addr};
use virtdisk_test_support::plugin::bin;
use virtdisk_test_support::prelude::*;
use virtdisk_test_support::virsh::MuteLibvirtd;

/// Generous room over the grace period for a loaded machine: the plugin must exit within the
/// grace period plus this. Without a bound it would never exit (the test would time out).
const MARGIN: Duration = Duration::from_secs(15);

fn sigterm(p: &Plugin) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(p.pid().expect("running") as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

/// Creates volume `name` and publishes it to a node the plugin must look up in libvirt, whose
/// call never comes back: returns the volume id and the publish, still in flight.
async fn hung_publish(
    p: &Plugin,
    mute: &MuteLibvirtd,
    name: &str,
) -> (String, tokio::task::JoinHandle<Result<Map, tonic::Status>>) {
    let vol = p
        .controller()
        .create(create_req(name, 8 * MIB))
        .await
        .unwrap();
    let mut ctl = p.controller();
    let req = publish_req(&vol.volume_id, "0b6c1e52-6a4f-4c3e-9d64-1f2a3b4c5d6e");
    let publish = tokio::spawn(async move { ctl.publish(req).await });
    mute.wait_connected(Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!publish.is_finished(), "the publish should hang in libvirt");
    (vol.volume_id, publish)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_exits_within_the_grace_period_while_a_libvirt_call_hangs() {
    let mute = MuteLibvirtd::start();
    let grace = Duration::from_secs(2);
    let mut p = Plugin::start(
        "controller",
        &[
            "--libvirt-uri",
            &mute.uri,
            "--shutdown-grace",
            "2",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
    )
    .await;
    let addr = metrics_addr(&p).await;
    let (volume_id, publish) = hung_publish(&p, &mute, "vdt-shutdown-hang").await;

    let asked = Instant::now();
    sigterm(&p);
    let status = p.wait_exit(grace + MARGIN).await;
    let took = asked.elapsed();
    let log = p.log();
    let status = status.unwrap_or_else(|| panic!("still running {took:?} after SIGTERM:\n{log}"));
    assert!(status.success(), "exit status {status:?}:\n{log}");
    assert!(
        took >= grace,
        "the in-flight RPC had its grace period ({took:?})"
    );
    assert!(!p.socket.exists(), "socket removed");
    // The hung call is named, in the span of its RPC.
    let abandoned = log
        .lines()
        .find(|l| l.contains("abandoned"))
        .unwrap_or_else(|| panic!("no abandoned work in the log:\n{log}"));
    assert!(
        abandoned.contains("ControllerPublishVolume") && abandoned.contains(&volume_id),
        "{abandoned}"
    );
    // And so is the publish's change (object and operation), which the shutdown waited for.
    let given_up = log
        .lines()
        .find(|l| l.contains("given up"))
        .unwrap_or_else(|| panic!("no change given up in the log:\n{log}"));
    assert!(
        given_up.contains(&format!("vol:{volume_id} publish")),
        "{given_up}"
    );
    // Named, not dumped: the request's arguments stay out of it.
    assert!(
        !given_up.contains("capability") && !given_up.contains("readonly"),
        "{given_up}"
    );
    // The client saw its call end (the connection closed), not hang forever.
    let ended = tokio::time::timeout(Duration::from_secs(10), publish).await;
    assert!(
        matches!(ended, Ok(Ok(Err(_)))),
        "publish after exit: {ended:?}"
    );
    // The metrics server is gone with the process.
    assert!(std::net::TcpStream::connect(&addr).is_err());
    eprintln!("SIGTERM → exit with a hung libvirt call: {took:?} (grace {grace:?})");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_joins_background_tasks_without_waiting_out_the_grace_period() {
    // A long grace period: an exit well before it shows that the flattener and the metrics
    // server stopped when told, not when time ran out.
    let mut p = Plugin::start(
        "controller",
        &["--shutdown-grace", "120", "--metrics-addr", "127.0.0.1:0"],
    )
    .await;
    let addr = metrics_addr(&p).await;
    let (status, _) = http_get(&addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    p.controller()
        .create(create_req("vdt-shutdown-idle", 8 * MIB))
        .await
        .unwrap();
    let asked = Instant::now();
    sigterm(&p);
    let status = p.wait_exit(Duration::from_secs(60)).await;
    let took = asked.elapsed();
    let log = p.log();
    let status = status.unwrap_or_else(|| panic!("still running {took:?} after SIGTERM:\n{log}"));
    assert!(status.success(), "exit status {status:?}:\n{log}");
    assert!(took < Duration::from_secs(60), "{took:?}");
    assert!(!log.contains("given up"), "{log}");
    assert!(!log.contains("abandoned"), "{log}");
    assert!(!p.socket.exists(), "socket removed");
    eprintln!("SIGTERM → exit, nothing in flight: {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_ends_the_grace_period() {
    let mute = MuteLibvirtd::start();
    let mut p = Plugin::start(
        "controller",
        &["--libvirt-uri", &mute.uri, "--shutdown-grace", "300"],
    )
    .await;
    let _publish = hung_publish(&p, &mute, "vdt-shutdown-twice").await;
    sigterm(&p);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        p.wait_exit(Duration::ZERO).await.is_none(),
        "in its grace period"
    );
    sigterm(&p);
    let status = p.wait_exit(MARGIN).await;
    let log = p.log();
    let status = status.unwrap_or_else(|| panic!("a second SIGTERM did not end it:\n{log}"));
    assert!(status.success(), "{status:?}:\n{log}");
}

#[test]
fn doctor_ends_within_its_check_timeout_when_libvirtd_never_answers() {
    let mute = MuteLibvirtd::start();
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = Command::new(bin())
        .args([
            "doctor",
            "--mode",
            "controller",
            "--check-timeout",
            "3",
            "-o",
            "json",
        ])
        .args(["--libvirt-uri", &mute.uri, "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let took = started.elapsed();
    let text = output_text(&out);
    assert!(
        took < Duration::from_secs(3) + MARGIN,
        "doctor took {took:?}:\n{text}"
    );
    assert!(mute.accepted() > 0, "doctor never reached the socket");
    assert!(!out.status.success(), "a FAIL exits non-zero:\n{text}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect(&text);
    let libvirt = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "libvirt")
        .unwrap_or_else(|| panic!("no libvirt check: {report:#}"));
    assert_eq!(libvirt["status"], "FAIL", "{libvirt}");
    assert!(
        libvirt["detail"].as_str().unwrap().contains("within 3 s"),
        "{libvirt}"
    );
    // The other checks still ran and answered.
    assert!(
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "qemu-img" && c["status"] == "OK"),
        "{report:#}"
    );
    eprintln!("doctor with a mute libvirtd: {took:?} (check timeout 3 s)");
}

/// At SIGTERM the server asks each client to close its connection (HTTP/2 GOAWAY, then a PING
/// to answer). A client that answers, as kubelet and Nomad do (here the test's own channel),
/// is let go at once: the plugin exits long before its grace period ends. One that never
/// answers holds the exit until the grace period ends, and the log says that, not that RPCs
/// were still running.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_answering_clients_go_at_once_and_names_a_silent_one() {
    let grace = Duration::from_secs(20);
    let mut p = Plugin::start("controller", &["--shutdown-grace", "20"]).await;
    p.identity().probe(csi::ProbeRequest {}).await.unwrap();
    let asked = Instant::now();
    sigterm(&p);
    let status = p.wait_exit(grace + MARGIN).await;
    let took = asked.elapsed();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(
        took < grace,
        "an idle, answering client held the exit for {took:?}:\n{}",
        p.log()
    );

    let grace = Duration::from_secs(2);
    let mut p = Plugin::start("controller", &["--shutdown-grace", "2"]).await;
    // A client that opens its HTTP/2 connection (preface and an empty SETTINGS frame) and then
    // reads nothing and answers nothing.
    let mut silent = std::os::unix::net::UnixStream::connect(&p.socket).unwrap();
    {
        use std::io::Write;
        silent
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .unwrap();
    }
    p.identity().probe(csi::ProbeRequest {}).await.unwrap();
    let asked = Instant::now();
    sigterm(&p);
    let status = p.wait_exit(grace + MARGIN).await;
    let took = asked.elapsed();
    let log = p.log();
    assert!(status.is_some_and(|s| s.success()), "{status:?}:\n{log}");
    assert!(took >= grace, "{took:?}");
    assert!(
        log.contains("no RPC in flight, but a client did not close its connection"),
        "{log}"
    );
    assert!(!log.contains("RPCs still running"), "{log}");
    drop(silent);
}
