//! libvirtd going away and coming back must not break the plugin: calls fail UNAVAILABLE and
//! Probe says "not ready" while it is away, and everything works again once it is back,
//! without restarting the plugin.
//!
//! The shared libvirtd is not killed (other tests and engineers use it). The plugin instead
//! talks to libvirtd through a unix-socket relay this test owns: taking the relay down closes
//! the plugin's connection exactly as a libvirtd exit does (the socket reaches EOF, new
//! connections are refused), and bringing it up is libvirtd coming back.

// Needs the libvirt backend; a --no-default-features build has none.
#![cfg(feature = "libvirt")]

use std::path::{Path, PathBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;
use virtdisk_test_support::prelude::*;

const LIBVIRT_SOCK: &str = "/run/libvirt/libvirt-sock";

/// A relay from `path` to libvirtd's socket that can be taken down and brought back.
struct Relay {
    path: PathBuf,
    tasks: Option<JoinSet<()>>,
}

impl Relay {
    fn new(path: &Path) -> Relay {
        let mut r = Relay {
            path: path.to_path_buf(),
            tasks: None,
        };
        r.up();
        r
    }

    fn up(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let listener = UnixListener::bind(&self.path).expect("bind relay socket");
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            // Connections live in this inner set, so aborting the accept loop closes them.
            let mut conns = JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut daemon) = UnixStream::connect(LIBVIRT_SOCK).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut daemon).await;
                    }
                });
            }
        });
        self.tasks = Some(tasks);
    }

    /// libvirtd "exits": open connections are closed and new ones refused.
    async fn down(&mut self) {
        if let Some(mut tasks) = self.tasks.take() {
            tasks.shutdown().await;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn probe(p: &Plugin) -> Result<(), Status> {
    let ready = p.identity().ready().await?;
    assert_eq!(ready, Some(true));
    Ok(())
}

async fn publish(p: &Plugin, volume: &str, node: &str) -> Result<(), Status> {
    let req = publish_req(volume, node);
    p.controller().publish(req).await.map(drop)
}

async fn unpublish(p: &Plugin, volume: &str, node: &str) -> Result<(), Status> {
    p.controller().unpublish(unpublish_req(volume, node)).await
}

async fn create_with(p: &Plugin, name: &str, kv: &[(&str, &str)]) -> String {
    let req = csi::CreateVolumeRequest {
        parameters: params(kv),
        ..create_req(name, 64 * MIB)
    };
    p.controller().create(req).await.expect("create").volume_id
}

async fn create(p: &Plugin, name: &str) -> String {
    create_with(p, name, &[]).await
}

/// A relay to libvirtd, and a controller that reaches libvirtd through it.
async fn controller_behind_relay(detach_timeout_secs: u64) -> (Relay, Plugin, tempfile::TempDir) {
    let relay_dir = tempfile::tempdir().unwrap();
    let sock = relay_dir.path().join("libvirt-sock");
    let relay = Relay::new(&sock);
    let config = format!(
        "[libvirt]\nuri = \"qemu+unix:///system?socket={}\"\ndetach_timeout_secs = {detach_timeout_secs}\n",
        sock.display()
    );
    let launch = Plugin::launch("controller").config(&config);
    (relay, launch.readable_by_qemu().start().await, relay_dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirtd_going_away_and_back_does_not_break_the_plugin() {
    let dom = TestDomain::start("reconnect", 3);
    let (mut relay, p, _relay_dir) = controller_behind_relay(5).await;
    let one = create(&p, "reconnect-one").await;
    let two = create(&p, "reconnect-two").await;
    probe(&p).await.expect("ready");
    publish(&p, &one, &dom.uuid).await.expect("publish");

    // Restarted between two calls: the next calls just work.
    relay.down().await;
    relay.up();
    probe(&p).await.expect("ready right after a restart");
    publish(&p, &two, &dom.uuid)
        .await
        .expect("publish after a restart");
    assert!(dom.live_disk(&serial_of(&two)).is_some());

    // Away: retryable errors and "not ready", never a false OK.
    relay.down().await;
    let err = probe(&p).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("libvirt"), "{}", err.message());
    let err = unpublish(&p, &two, &dom.uuid).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        dom.live_disk(&serial_of(&two)).is_some(),
        "nothing was detached"
    );
    // Listings still answer, from the attach ledger: the last known nodes, marked unconfirmed.
    for e in &p.controller().all_volumes().await {
        let st = e.status.as_ref().unwrap();
        assert_eq!(st.published_node_ids, vec![dom.uuid.clone()], "{e:?}");
        let c = st.volume_condition.as_ref().unwrap();
        assert!(c.abnormal && c.message.contains("not confirmed"), "{c:?}");
    }
    let err = p.controller().delete(&one).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::Unavailable,
        "cannot tell whether it is attached: {err:?}"
    );

    // Back: the same plugin process recovers.
    relay.up();
    probe(&p).await.expect("ready again");
    for vol in [&one, &two] {
        unpublish(&p, vol, &dom.uuid).await.expect("unpublish");
        assert!(dom.live_disk(&serial_of(vol)).is_none());
    }
    for line in p.log().lines().filter(|l| l.contains("hypervisor::conn")) {
        eprintln!("{line}");
    }
    relay.down().await;
}

/// libvirtd goes away in the middle of an RPC: an unpublish waiting for a virtio-blk disk to
/// leave (a guest-less domain never lets go). The call answers UNAVAILABLE, never OK; every
/// decision meanwhile is UNAVAILABLE (reads answer from the attach ledger) and Probe not
/// ready; once libvirtd is back the same plugin process works again, and the disk never left
/// behind the plugin's back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirtd_going_away_during_an_unpublish_is_unavailable_never_ok() {
    let dom = TestDomain::start("reconnect-mid", 3);
    let (mut relay, p, _relay_dir) = controller_behind_relay(120).await;
    let stuck = create_with(&p, "reconnect-virtio", &[("bus", "virtio")]).await;
    let other = create(&p, "reconnect-scsi").await;
    publish(&p, &stuck, &dom.uuid).await.expect("publish");

    // The unpublish waits for the guest; libvirtd leaves while it waits.
    let waiting = {
        let (ch, vol, node) = (p.channel.clone(), stuck.clone(), dom.uuid.clone());
        tokio::spawn(async move {
            let mut c = csi::controller_client::ControllerClient::new(ch);
            c.unpublish(unpublish_req(&vol, &node)).await
        })
    };
    // libvirt holds a guest-less virtio-blk detach request ~5 s, and the plugin then waits up
    // to 120 s: going down a moment after the call started lands inside it. (Whenever it
    // lands, the answer must be UNAVAILABLE.)
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(!waiting.is_finished(), "the unpublish did not wait");
    relay.down().await;
    let err = waiting
        .await
        .unwrap()
        .expect_err("never OK while the disk is attached");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("libvirt"), "{}", err.message());

    // Down: clear, retryable errors everywhere, Probe not ready.
    let err = probe(&p).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = publish(&p, &other, &dom.uuid).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("libvirtd"), "{}", err.message());
    let st = p
        .controller()
        .volume(&stuck)
        .await
        .expect("ControllerGetVolume answers from the ledger")
        .status
        .unwrap();
    assert_eq!(st.published_node_ids, vec![dom.uuid.clone()]);
    assert!(st.volume_condition.unwrap().abnormal);

    // Back, same process: the disk is still there and reported; publishing works again.
    relay.up();
    probe(&p).await.expect("ready again");
    assert!(dom.live_disk(&serial_of(&stuck)).is_some());
    let nodes = p.controller().published_nodes(&stuck).await;
    assert_eq!(nodes, vec![dom.uuid.clone()]);
    publish(&p, &other, &dom.uuid)
        .await
        .expect("publish after recovery");
    unpublish(&p, &other, &dom.uuid)
        .await
        .expect("unpublish after recovery");
    assert!(dom.live_disk(&serial_of(&other)).is_none());
    relay.down().await;
}
