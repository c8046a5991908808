#!/bin/sh
# Run by busybox `uevent` for every kernel uevent: reports whole-disk add/remove on the console
# as "vdt-block <action> <disk> serial=<serial> size=<512-byte sectors>".
[ "$SUBSYSTEM" = block ] && [ "$DEVTYPE" = disk ] || exit 0
case "$DEVNAME" in loop* | ram*) exit 0 ;; esac
case "$ACTION" in
add | change)
    echo "vdt-block $ACTION $DEVNAME serial=$(/sbin/vdt-disk-serial "$DEVNAME") size=$(cat "/sys/block/$DEVNAME/size")" >/dev/console
    ;;
remove)
    echo "vdt-block remove $DEVNAME" >/dev/console
    ;;
esac
