# A volume restored from a snapshot:  nomad volume create volume-from-snapshot.hcl
#
# Take the snapshot first:
#   nomad volume snapshot create pgdata pgdata-before-upgrade
#   nomad volume snapshot list -plugin virtdisk      # shows the snapshot id
#
# The restore is a new qcow2 overlay on the snapshot's layer: constant time at any size.
# capacity_min must be at least the snapshot's size; a larger value grows the new volume.

id        = "pgdata-restored"
name      = "pgdata-restored"
type      = "csi"
plugin_id = "virtdisk"

snapshot_id = "default.s0123456789abcdef" # from `nomad volume snapshot list`

capacity_min = "10GiB"

capability {
  access_mode     = "single-node-writer"
  attachment_mode = "file-system"
}

mount_options {
  fs_type = "ext4"
}

parameters {
  pool = "default"
  bus  = "scsi"
}
