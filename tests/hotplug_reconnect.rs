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

mod common;
mod hotplug_support;

use common::*;
use hotplug_support::*;
use std::path::{Path, PathBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;
use tonic::Code;
use virtdisk_csi::csi::proto as csi;

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

async fn probe(p: &Plugin) -> Result<(), tonic::Status> {
    p.identity()
        .probe(csi::ProbeRequest {})
        .await
        .map(|r| assert_eq!(r.into_inner().ready, Some(true)))
}

async fn publish(p: &Plugin, volume: &str, node: &str) -> Result<(), tonic::Status> {
    p.controller()
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: volume.into(),
            node_id: node.into(),
            volume_capability: Some(mount_cap("ext4", Mode::SingleNodeWriter)),
            ..Default::default()
        })
        .await
        .map(drop)
}

async fn unpublish(p: &Plugin, volume: &str, node: &str) -> Result<(), tonic::Status> {
    p.controller()
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: volume.into(),
            node_id: node.into(),
            ..Default::default()
        })
        .await
        .map(drop)
}

async fn create(p: &Plugin, name: &str) -> String {
    p.controller()
        .create_volume(create_req(name, 64 * MIB))
        .await
        .expect("create")
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirtd_going_away_and_back_does_not_break_the_plugin() {
    let dom = TestDomain::start("reconnect", 3);
    let relay_dir = tempfile::tempdir().unwrap();
    let sock = relay_dir.path().join("libvirt-sock");
    let mut relay = Relay::new(&sock);
    let config = format!(
        "[libvirt]\nuri = \"qemu+unix:///system?socket={}\"\ndetach_timeout_secs = 5\n",
        sock.display()
    );
    let p = Plugin::start_with_config("controller", &config, &[]).await;
    open_for_qemu(p.dir.path());
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
    let listed = p
        .controller()
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .expect("ListVolumes answers from the ledger")
        .into_inner();
    for e in &listed.entries {
        let st = e.status.as_ref().unwrap();
        assert_eq!(st.published_node_ids, vec![dom.uuid.clone()], "{e:?}");
        let c = st.volume_condition.as_ref().unwrap();
        assert!(c.abnormal && c.message.contains("not confirmed"), "{c:?}");
    }
    let err = p
        .controller()
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: one.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
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
    let relay_dir = tempfile::tempdir().unwrap();
    let sock = relay_dir.path().join("libvirt-sock");
    let mut relay = Relay::new(&sock);
    let config = format!(
        "[libvirt]\nuri = \"qemu+unix:///system?socket={}\"\ndetach_timeout_secs = 120\n",
        sock.display()
    );
    let p = Plugin::start_with_config("controller", &config, &[]).await;
    open_for_qemu(p.dir.path());
    let mut req = create_req("reconnect-virtio", 64 * MIB);
    req.parameters = params(&[("bus", "virtio")]);
    let stuck = p
        .controller()
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let other = create(&p, "reconnect-scsi").await;
    publish(&p, &stuck, &dom.uuid).await.expect("publish");

    // The unpublish waits for the guest; libvirtd leaves while it waits.
    let waiting = {
        let (ch, vol, node) = (p.channel.clone(), stuck.clone(), dom.uuid.clone());
        tokio::spawn(async move {
            csi::controller_client::ControllerClient::new(ch)
                .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                    volume_id: vol,
                    node_id: node,
                    ..Default::default()
                })
                .await
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
    let got = p
        .controller()
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: stuck.clone(),
        })
        .await
        .expect("ControllerGetVolume answers from the ledger")
        .into_inner();
    let st = got.status.unwrap();
    assert_eq!(st.published_node_ids, vec![dom.uuid.clone()]);
    assert!(st.volume_condition.unwrap().abnormal);

    // Back, same process: the disk is still there and reported; publishing works again.
    relay.up();
    probe(&p).await.expect("ready again");
    assert!(dom.live_disk(&serial_of(&stuck)).is_some());
    let got = p
        .controller()
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: stuck.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.status.unwrap().published_node_ids,
        vec![dom.uuid.clone()]
    );
    publish(&p, &other, &dom.uuid)
        .await
        .expect("publish after recovery");
    unpublish(&p, &other, &dom.uuid)
        .await
        .expect("unpublish after recovery");
    assert!(dom.live_disk(&serial_of(&other)).is_none());
    relay.down().await;
}
