# A volume restored from a snapshot:  nomad volume create volume-from-snapshot.hcl
#
# Every Nomad version the jobs support (1.1.0 and later). Take the snapshot first:
#   nomad volume snapshot create pgdata pgdata-before-upgrade
#   nomad volume snapshot list -plugin virtdisk -verbose  # the full snapshot id
# (a monolith: -plugin <host>-virtdisk, e.g. hv1-virtdisk; with a wrong id Nomad lists nothing)
# (without -verbose, Nomad 1.1 cuts the id to 12 characters, which the plugin does not know.)
#
# The restore is a new qcow2 overlay on the snapshot's layer: constant time at any size.
# capacity_min must be at least the snapshot's size; a larger value grows the new volume.

id        = "pgdata-restored"
name      = "pgdata-restored"
type      = "csi"
# The plugin that holds the snapshot: "virtdisk" (controller + node jobs); with the monolith,
# "<host>-virtdisk" (e.g. "hv1-virtdisk"), in the snapshot commands above too.
plugin_id = "virtdisk"

snapshot_id = "default.s0123456789abcdef" # from `nomad volume snapshot list -verbose`

# Nomad 1.1 refuses capacity_min alone ("LimitBytes cannot be less than RequiredBytes").
capacity_min = "10GiB"
capacity_max = "20GiB"

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
