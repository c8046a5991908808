//! N parallel clients (each its own connection) creating and publishing volumes across the
//! bench domains, then unpublishing and deleting them, at several N. Every error counts,
//! ABORTED included; the first message of each code is kept to say why.

use super::stats::{ConcurrencyRow, Samples};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use virtdisk_test_support::prelude::*;

pub async fn run(
    p: &Plugin,
    domains: &[TestDomain],
    clients: &[usize],
    volumes: usize,
) -> Vec<ConcurrencyRow> {
    let nodes: Arc<Vec<String>> = Arc::new(domains.iter().map(|d| d.uuid.clone()).collect());
    let mut rows = Vec::new();
    for &n in clients {
        eprintln!(
            "concurrency: {n} clients, {volumes} volumes over {} domains",
            nodes.len()
        );
        let next = Arc::new(AtomicUsize::new(0));
        let t = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..n {
            let (socket, next, nodes) = (p.socket.clone(), next.clone(), nodes.clone());
            tasks.push(tokio::spawn(async move {
                let ch = virtdisk_csi::csi::channel::connect(&socket).await.unwrap();
                let mut c = virtdisk_csi::csi::proto::controller_client::ControllerClient::new(ch);
                let (mut create, mut publish) = (Samples::default(), Samples::default());
                let mut made = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= volumes {
                        break;
                    }
                    let node = &nodes[i % nodes.len()];
                    let r = super::stats::timed(
                        &mut create,
                        c.create_volume(create_req(&format!("bench-cc{n}-{i}"), GIB)),
                    )
                    .await;
                    let Ok(r) = r else { continue };
                    let id = r.into_inner().volume.unwrap().volume_id;
                    let _ = super::stats::timed(
                        &mut publish,
                        c.controller_publish_volume(publish_req(&id, node)),
                    )
                    .await;
                    made.push((id, node.clone()));
                }
                (create, publish, made)
            }));
        }
        let mut row = ConcurrencyRow {
            clients: n,
            domains: nodes.len(),
            volumes,
            create: Samples::default(),
            publish: Samples::default(),
            unpublish: Samples::default(),
            delete: Samples::default(),
            wall: Default::default(),
            teardown_wall: Default::default(),
        };
        let mut made = Vec::new();
        for task in tasks {
            let (c, pb, m) = task.await.unwrap();
            row.create.merge(c);
            row.publish.merge(pb);
            made.extend(m);
        }
        row.wall = t.elapsed();

        // Teardown with the same number of clients.
        let work = Arc::new(std::sync::Mutex::new(made));
        let t = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..n {
            let (socket, work) = (p.socket.clone(), work.clone());
            tasks.push(tokio::spawn(async move {
                let ch = virtdisk_csi::csi::channel::connect(&socket).await.unwrap();
                let mut c = virtdisk_csi::csi::proto::controller_client::ControllerClient::new(ch);
                let (mut unpublish, mut delete) = (Samples::default(), Samples::default());
                loop {
                    let Some((id, node)) = work.lock().unwrap().pop() else {
                        break;
                    };
                    let _ = super::stats::timed(
                        &mut unpublish,
                        c.controller_unpublish_volume(unpublish_req(&id, &node)),
                    )
                    .await;
                    let _ =
                        super::stats::timed(&mut delete, c.delete_volume(delete_req(&id))).await;
                }
                (unpublish, delete)
            }));
        }
        for task in tasks {
            let (u, d) = task.await.unwrap();
            row.unpublish.merge(u);
            row.delete.merge(d);
        }
        row.teardown_wall = t.elapsed();
        for (what, s) in [
            ("create", &row.create),
            ("publish", &row.publish),
            ("unpublish", &row.unpublish),
            ("delete", &row.delete),
        ] {
            for (code, msg) in &s.first_error {
                eprintln!("concurrency {n}: {what} {code}: {msg}");
            }
        }
        rows.push(row);
    }
    rows
}
