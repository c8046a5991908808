# Registers a volume that already exists in a pool, so that jobs can claim it:
#
#   nomad volume register volume-register.hcl
#
# Nomad >= 1.1.1. Nomad 1.1.0's `volume register` fails ("unknown volume attachment mode",
# nomad#10703): register through the API with the same fields and the top-level modes, see
# README.md. Use it for a volume made outside
# Nomad (`virtdisk-csi client volume create --name data --size 10GiB`), for one deregistered
# earlier (`nomad volume deregister pgdata` forgets it in Nomad and keeps the image), or to
# move a volume to another Nomad cluster. Nomad asks the plugin to confirm the capabilities
# (ValidateVolumeCapabilities) and sends nothing else; `nomad volume deregister` sends nothing
# at all, and `nomad volume delete` deletes the image.

id        = "pgdata"
name      = "pgdata"
type      = "csi"
# "virtdisk" (controller + node jobs); with the monolith, "<host>-virtdisk" (e.g.
# "hv1-virtdisk"): the volume is in that host's pools.
plugin_id = "virtdisk"

# The plugin's volume id, <pool>.<16 hex>: `virtdisk-csi client volume list --all`, or the
# External ID of `nomad volume status -verbose` before it was deregistered.
external_id = "default.0123456789abcdef"

capability {
  access_mode     = "single-node-writer"
  attachment_mode = "file-system"
}

# The volume keeps the file system it has; fs_type must name it (or be left out).
mount_options {
  fs_type = "ext4"
}

# Only for a volume that was never formatted: the owner of its fresh file system's root (as
# rootUid/rootGid/rootMode in CreateVolume parameters; a registered volume has none).
# context {
#   rootUid = "65534"
#   rootGid = "65534"
# }
