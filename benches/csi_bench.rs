//! virtdisk-csi benchmarks: latency, throughput, scale and footprint of a running plugin,
//! driven over its gRPC socket, on the real libvirt, KVM, qemu-img, loop devices and mounts.
//!
//! `scripts/bench.sh` runs it and writes the results into BENCHMARKS.md. By hand:
//! `cargo bench --bench csi_bench -- [--quick] [--only a,b] [--scales 1000,100000]
//! [--update BENCHMARKS.md]`
//! with sections hostpath (side by side with the reference driver), filesystems (create and
//! delete with the pools on other file systems), footprint, controller,
//! snapshots, groups, node, concurrency, scale. `--quick` uses
//! small sizes (for development). Needs root, libvirtd, /dev/kvm, /dev/fuse, loop devices,
//! qemu-img/qemu-io/qemu-storage-daemon, mkfs.ext4/xfs, and ~2 GiB free in $TMPDIR.
//!
//! Not a test: `cargo test --all-targets` runs this main without `--bench`, which only checks
//! the statistics code and returns.

#[path = "csi_bench/concurrency.rs"]
mod concurrency;
#[path = "csi_bench/controller.rs"]
mod controller;
#[path = "csi_bench/floors.rs"]
mod floors;
#[path = "csi_bench/footprint.rs"]
mod footprint;
#[path = "csi_bench/groups.rs"]
mod groups;
#[path = "csi_bench/machine.rs"]
mod machine;
#[path = "csi_bench/node.rs"]
mod node;
#[path = "csi_bench/peer.rs"]
mod peer;
#[path = "csi_bench/plugin.rs"]
mod plugin;
#[path = "csi_bench/pool_fs.rs"]
mod pool_fs;
#[path = "csi_bench/report.rs"]
mod report;
#[path = "csi_bench/scale.rs"]
mod scale;
#[path = "csi_bench/snapshots.rs"]
mod snapshots;
#[path = "csi_bench/stats.rs"]
mod stats;

use std::time::Instant;
use virtdisk_test_support::TestDomain;

/// `n` running KVM domains without an OS, the nodes (`vdt-bench-<pid>-<n>`). libvirt puts 7
/// SCSI disks on a virtio-scsi controller and hot-adds another for the next 7: three are
/// defined up front, as on a VM prepared for hot-plug (21 disks), so no measurement includes a
/// one-off controller hot-add; two spare PCIe ports.
fn start_domains(n: usize) -> Vec<TestDomain> {
    let node = TestDomain::builder("").prefix("vdt-bench-");
    let node = node.root_ports(5).scsi_controllers(3);
    (0..n).map(|_| node.clone().start()).collect()
}

/// Sizes of one run.
pub struct Settings {
    pub quick: bool,
    pub domains: usize,
    pub creates: usize,
    pub publishes: usize,
    pub publish_rounds: usize,
    pub snapshot_rounds: usize,
    pub snapshot_data: u64,
    pub node_rounds: usize,
    pub list_scales: Vec<usize>,
    pub list_page: i32,
    pub clients: Vec<usize>,
    pub concurrent_volumes: usize,
}

impl Settings {
    fn full() -> Settings {
        Settings {
            quick: false,
            domains: 8,
            creates: 200,
            publishes: 64,
            publish_rounds: 2,
            snapshot_rounds: 10,
            snapshot_data: 256 << 20,
            node_rounds: 10,
            list_scales: vec![1000, 10_000, 100_000],
            list_page: 100,
            clients: vec![1, 8, 64],
            concurrent_volumes: 128,
        }
    }

    fn quick() -> Settings {
        Settings {
            quick: true,
            domains: 2,
            creates: 10,
            publishes: 4,
            publish_rounds: 1,
            snapshot_rounds: 2,
            snapshot_data: 16 << 20,
            node_rounds: 2,
            list_scales: vec![200, 1000],
            list_page: 100,
            clients: vec![1, 8],
            concurrent_volumes: 16,
        }
    }
}

const SECTIONS: &[&str] = &[
    "hostpath",
    "filesystems",
    "footprint",
    "controller",
    "snapshots",
    "groups",
    "node",
    "concurrency",
    "scale",
];

struct Args {
    quick: bool,
    /// `--scales 1000,100000`: the pool sizes of the scale section.
    scales: Option<Vec<usize>>,
    only: Vec<String>,
    update: Option<std::path::PathBuf>,
}

fn parse_args() -> Option<Args> {
    let mut args = std::env::args().skip(1);
    let mut bench = false;
    let mut out = Args {
        quick: false,
        scales: None,
        only: SECTIONS.iter().map(|s| s.to_string()).collect(),
        update: None,
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bench" => bench = true,
            "--quick" => out.quick = true,
            "--only" => {
                out.only = args
                    .next()
                    .expect("--only needs a list")
                    .split(',')
                    .map(str::to_string)
                    .collect();
                for s in &out.only {
                    assert!(
                        SECTIONS.contains(&s.as_str()),
                        "unknown section {s}; sections: {SECTIONS:?}"
                    );
                }
            }
            "--scales" => {
                out.scales = Some(
                    args.next()
                        .expect("--scales needs a list")
                        .split(',')
                        .map(|n| n.parse().expect("--scales takes numbers"))
                        .collect(),
                )
            }
            "--update" => out.update = Some(args.next().expect("--update needs a file").into()),
            _ => {}
        }
    }
    bench.then_some(out)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Some(args) = parse_args() else {
        stats::self_check();
        println!("csi_bench: run it with `cargo bench --bench csi_bench` or scripts/bench.sh");
        return;
    };
    let mut s = if args.quick {
        Settings::quick()
    } else {
        Settings::full()
    };
    if let Some(scales) = &args.scales {
        s.list_scales = scales.clone();
    }
    let on = |name: &str| args.only.iter().any(|o| o == name);
    let started = Instant::now();
    let load_before = machine::load_average();
    let mut r = report::Report {
        machine: machine::describe(),
        ..Default::default()
    };

    if on("hostpath") {
        r.peer = peer::run(&s).await;
    }
    if on("filesystems") {
        r.filesystems = pool_fs::run(&s).await;
    }
    if on("footprint") {
        eprintln!("footprint: idle plugins");
        r.values.extend(footprint::run().await);
    }
    // ListVolumes reads every domain, so the scale figures are taken with the domains up too.
    let need_domains = on("controller") || on("concurrency") || on("scale");
    let doms = if need_domains {
        eprintln!("starting {} KVM domains (vdt-bench-*)", s.domains);
        start_domains(s.domains)
    } else if on("groups") {
        start_domains(1)
    } else {
        Vec::new()
    };
    if on("controller") || on("snapshots") || on("groups") {
        // A generous chain limit: background flattening would copy data while we time.
        let p = plugin::start("controller", "[snapshots]\nmax_chain_depth = 64\n", &[]).await;
        if on("controller") {
            r.latency.extend(controller::run(&s, &p, &doms).await);
        }
        if on("snapshots") {
            r.latency.extend(snapshots::run(&s, &p).await);
        }
        if on("groups") {
            let (latency, values) = groups::run(&s, &p, &doms[0]).await;
            r.latency.extend(latency);
            r.values.extend(values);
        }
    }
    if on("node") {
        r.latency.extend(node::run(&s).await);
    }
    if on("concurrency") {
        let p = plugin::start("controller", "", &[]).await;
        r.concurrency = concurrency::run(&p, &doms, &s.clients, s.concurrent_volumes).await;
    }
    if on("scale") {
        let sc = scale::run(&s).await;
        r.latency.extend(sc.latency);
        r.values.extend(sc.values);
    }
    drop(doms);

    let commit = match std::env::var_os(plugin::BIN_ENV) {
        Some(bin) => format!("the plugin binary `{}`", bin.to_string_lossy()),
        None => format!(
            "commit `{}`",
            floors::run_ok("git", &["rev-parse", "--short", "HEAD"]).trim()
        ),
    };
    r.header = vec![format!(
        "Measured {} with {}{}, in {:.0} s. Load average (1, 5, 15 min) before: {}; \
             after: {}.",
        floors::run_ok("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).trim(),
        commit,
        if s.quick { ", --quick sizes" } else { "" },
        started.elapsed().as_secs_f64(),
        load_before,
        machine::load_average(),
    )];
    let md = r.markdown();
    println!("{md}");
    if let Some(file) = args.update {
        match report::splice(&file, &md) {
            Ok(()) => eprintln!("results written into {}", file.display()),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
    }
}
