#!/bin/sh
# Reproduces BENCHMARKS.md: builds the plugin (release), runs every benchmark against the real
# libvirt, KVM, qemu-img, loop devices and mounts, and writes the results between the markers
# of BENCHMARKS.md. Run it as root on a host prepared by scripts/setup-host.sh (libvirtd
# running, /dev/kvm, /dev/fuse, loop devices, qemu-utils, xfsprogs), ideally an idle one: the
# figures are latencies. About ten minutes after the build; needs ~2 GiB free in $TMPDIR.
#
# The reference driver (csi-driver-host-path's hostpathplugin) runs side by side with the
# plugin when it is found: $VIRTDISK_BENCH_HOSTPATH, on PATH, or in shared/tools/ beside a
# parent of this checkout (see shared/tools/README.md); without it that section and the
# filesystems one (create and delete on ext4 with journal and XFS, made on loop devices of 4 GiB
# sparse files in $TMPDIR) are skipped.
#
# Extra arguments go to the benchmark: --quick (small sizes), --only <sections> or --scales
# <n,n,…> (pool sizes of the scale section) print the results without touching
# BENCHMARKS.md. Sections: hostpath, filesystems, footprint, controller, snapshots, groups, node, concurrency,
# scale.
set -eu
cd "$(dirname "$0")/.."

# The node plugin as it runs inside the VMs (no libvirt, profile guest), for its footprint.
cargo build --profile guest --no-default-features --bin virtdisk-csi --target-dir target/guest
VIRTDISK_BENCH_NODE_BIN="$PWD/target/guest/guest/virtdisk-csi"
export VIRTDISK_BENCH_NODE_BIN

case " $* " in
*" --quick "* | *" --only "* | *" --scales "*) exec cargo bench --bench csi_bench -- "$@" ;;
*) exec cargo bench --bench csi_bench -- --update BENCHMARKS.md "$@" ;;
esac
