#!/bin/sh
# Reproduces BENCHMARKS.md: builds the plugin (release), runs every benchmark against the real
# libvirt, KVM, qemu-img, loop devices and mounts, and writes the results between the markers
# of BENCHMARKS.md. Run it as root on a host prepared by scripts/setup-host.sh (libvirtd
# running, /dev/kvm, /dev/fuse, loop devices, qemu-utils, xfsprogs), ideally an idle one: the
# figures are latencies. A few minutes after the build; needs ~2 GiB free in $TMPDIR.
#
# Extra arguments go to the benchmark: --quick (small sizes) or --only <sections> print the
# results without touching BENCHMARKS.md. Sections: footprint, controller, snapshots, groups, node,
# concurrency, scale.
set -eu
cd "$(dirname "$0")/.."

# The node plugin as it runs inside the VMs (no libvirt, profile guest), for its footprint.
cargo build --profile guest --no-default-features --bin virtdisk-csi --target-dir target/guest
VIRTDISK_BENCH_NODE_BIN="$PWD/target/guest/guest/virtdisk-csi"
export VIRTDISK_BENCH_NODE_BIN

case " $* " in
*" --quick "* | *" --only "*) exec cargo bench --bench csi_bench -- "$@" ;;
*) exec cargo bench --bench csi_bench -- --update BENCHMARKS.md "$@" ;;
esac
