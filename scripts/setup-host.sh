#!/usr/bin/env bash
# Prepares a fresh Debian 12 machine (as root) to build, run and test virtdisk-csi:
# packages, the libvirt daemons (no systemd needed) and the Python tools the tests use (manifest
# validators, a gRPC client).
# Idempotent: safe to run before every test run.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

need_root() { [ "$(id -u)" = 0 ] || { echo "run as root (sudo $0)" >&2; exit 1; }; }
need_root

packages=(
  libvirt-daemon-system libvirt-dev qemu-system-x86 protobuf-compiler libprotobuf-dev
  xfsprogs e2fsprogs util-linux fuse3 busybox-static cpio kmod ca-certificates
  # A non-English host (German messages from glibc, e2fsprogs, util-linux): the tests check
  # that tool failures get the same gRPC codes there (src/node/fs.rs locale test).
  locales e2fsprogs-l10n util-linux-locales
)
missing=()
for p in "${packages[@]}" qemu-utils; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# qemu-system-x86 and qemu-utils must come from the same QEMU release: pin qemu-utils to the
# candidate of qemu-system-x86 (a newer preinstalled qemu-utils would otherwise block the install).
qemu_sys_installed=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
qemu_utils_installed=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
if [ ${#missing[@]} -gt 0 ] || [ "$qemu_sys_installed" != "$qemu_utils_installed" ]; then
  apt-get update -qq
  qemu_version=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  apt-get install -y -qq --allow-downgrades -o Dpkg::Options::=--force-confold \
    "${packages[@]}" "qemu-utils=${qemu_version}" >/dev/null
fi

# The German locale those tests run the plugin's tools under.
locale -a 2>/dev/null | grep -qix 'de_DE.utf8' || localedef -i de_DE -c -f UTF-8 de_DE.UTF-8

# Kernel modules the tests use (best effort: they may be built in).
for m in loop fuse; do modprobe "$m" 2>/dev/null || true; done

# libvirt without systemd.
pgrep -x virtlogd >/dev/null || virtlogd -d
pgrep -x libvirtd >/dev/null || libvirtd -d
for _ in $(seq 1 50); do
  virsh -c qemu:///system version >/dev/null 2>&1 && break
  sleep 0.2
done
virsh -c qemu:///system version >/dev/null

# Manifest validation (HCL and Kubernetes schemas, offline).
python3 -c 'import hcl2, kubernetes_validate' 2>/dev/null ||
  python3 -m pip install -q python-hcl2==8.1.4 kubernetes-validate==1.37.0

# The Python gRPC client of tests/grpc_clients.rs (stubs generated from proto/csi.proto at test time).
python3 -c 'import grpc, grpc_tools' 2>/dev/null ||
  python3 -m pip install -q grpcio==1.85.1 grpcio-tools==1.85.1

echo "host ready: $(virsh -c qemu:///system version | awk '/hypervisor/ {print $3, $4}'), $(qemu-img --version | head -1)"
