#!/bin/sh
# Run by busybox `uevent` for every kernel uevent: reports whole-disk add/change/remove as
# "vdt-block <action> <disk> serial=<serial> size=<512-byte sectors>" on the tests' serial port
# (/dev/ttyS1, see /init) and on the console.
[ "$SUBSYSTEM" = block ] && [ "$DEVTYPE" = disk ] || exit 0
case "$DEVNAME" in loop* | ram*) exit 0 ;; esac
event() {
    echo "$*" >/dev/console
    echo "$*" >/dev/ttyS1
}
case "$ACTION" in
add | change)
    event "vdt-block $ACTION $DEVNAME serial=$(/sbin/vdt-disk-serial "$DEVNAME") size=$(cat "/sys/block/$DEVNAME/size")"
    ;;
remove)
    event "vdt-block remove $DEVNAME"
    ;;
esac
