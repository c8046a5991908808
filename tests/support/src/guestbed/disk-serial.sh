#!/bin/sh
# Prints a disk's serial: virtio-blk has sysfs `serial`; a SCSI disk has the unit serial
# number VPD page (0x80), a binary page whose first 4 bytes are a header.
disk=/sys/block/$1
if [ -r "$disk/serial" ]; then
    cat "$disk/serial"
elif [ -r "$disk/device/vpd_pg80" ]; then
    tail -c +5 "$disk/device/vpd_pg80" | tr -d '\0'
fi
