#!/bin/busybox sh
# /init of the virtdisk-csi test guest. Runs from the initramfs (no root disk) and never exits.
# Lines starting with "vdt:" and "vdt-block" are read by tests/guestbed from the second serial
# port (/dev/ttyS1), which only user space writes to; they are copied to the console for people.
/bin/busybox mkdir -p /dev /proc /sys /run /tmp
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/null >/dev/console 2>&1
/bin/busybox --install -s /bin
# The real util-linux/e2fsprogs/xfsprogs tools (/usr/sbin, /usr/bin) come before busybox's.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts

# One line for the tests: each copy is one write(2), so lines from several processes never mix.
event() {
    echo "$*" >/dev/console
    echo "$*" >/dev/ttyS1
}
say() { event "vdt: $* (uptime $(cut -d' ' -f1 /proc/uptime))"; }
say "init started"

# Report whole-disk add/remove events; started before the drivers load so the
# disks present at boot are reported as well.
uevent /sbin/vdt-block-event &
while read -r module; do
    insmod "/lib/modules/$module.ko" || say "insmod $module failed"
done </etc/vdt/modules
say "modules loaded"
for disk in /sys/block/*; do
    [ -e "$disk/device" ] &&
        event "vdt-block present ${disk##*/} serial=$(/sbin/vdt-disk-serial "${disk##*/}") size=$(cat "$disk/size")"
done

# qemu-guest-agent on the virtio-serial port libvirt names org.qemu.guest_agent.0 (no udev, so
# no /dev/virtio-ports/ links: the port is found by its name in sysfs). In the background, since
# the port may appear a moment after the driver loads.
(
    port=""
    for _ in $(seq 50); do
        for p in /sys/class/virtio-ports/*; do
            [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
        done
        [ -n "$port" ] && [ -e "$port" ] && break
        port=""
        sleep 0.1
    done
    if [ -z "$port" ]; then
        say "no guest agent port"
        exit 0
    fi
    say "guest agent on $port"
    while true; do
        qemu-ga -m virtio-serial -p "$port" -t /run -f /run/qemu-ga.pid -l /run/qemu-ga.log -v
        say "qemu-ga exited with status $?"
        sleep 1
    done
) &

# User-mode networking: the host reaches the node plugin through a port forward to this address.
ip link set lo up
nic=$(ls /sys/class/net | grep -v '^lo$' | head -n 1)
if [ -n "$nic" ] && ip link set "$nic" up && ip addr add 10.0.2.15/24 dev "$nic" &&
    ip route add default via 10.0.2.2; then
    say "network up on $nic"
else
    say "network setup failed (nic '$nic')"
fi

# A command channel for the tests (a second port forward): the host checks and prepares things
# inside the guest with it, never the node plugin.
nc -ll -p 10022 -e /sbin/vdt-exec &

say "dmi uuid $(cat /sys/class/dmi/id/product_uuid 2>/dev/null)"
# No --node-id: NodeGetInfo must report the DMI product UUID (= the libvirt domain UUID).
# VDT_RUST_LOG comes from the kernel command line (unknown key=value parameters become init's
# environment).
(
    while true; do
        say "starting node plugin"
        NO_COLOR=1 RUST_LOG="${VDT_RUST_LOG:-info}" virtdisk-csi serve --mode node \
            --endpoint tcp://0.0.0.0:10000
        say "node plugin exited with status $?"
        sleep 1
    done
) &

# Every packed tool must find its shared libraries (the loader lists them without running the
# tool); in the background, so the plugin's start does not wait for it.
(
    broken=""
    while read -r tool; do
        out=$(/lib64/ld-linux-x86-64.so.2 --list "$tool" 2>&1)
        case "$?:$out" in 0:*"not found"* | [1-9]*) broken="$broken $tool" ;; esac
    done </etc/vdt/elf-tools
    if [ -z "$broken" ]; then say "tools ok"; else say "tools broken:$broken"; fi
) &

while true; do sleep 3600; done
