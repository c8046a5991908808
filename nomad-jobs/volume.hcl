# A virtdisk-csi volume:  nomad volume create volume.hcl
#
# For the controller and node plugins (plugin id "virtdisk"); volume-local.hcl is the same for
# the monolith. Every Nomad version the jobs support (1.1.0 and later; Nomad < 1.3 ignores
# topology_request, Nomad 1.1.0 sends no mount_options at creation: see README.md).
#
# Nomad sends CreateVolume{name, capacity_range, capabilities, parameters, topology}; the
# plugin answers with the volume id (<pool>.<16 hex>) Nomad stores as the external id.
# `name` is the idempotency key: re-running the command returns the same volume.

id        = "pgdata"
name      = "pgdata"
type      = "csi"
plugin_id = "virtdisk"

# "10GiB" is 10 * 2^30 bytes, "20G" is 20 * 10^9. The image is thin: it takes space as data
# is written. Re-running `volume create` with a larger capacity_min expands the volume (Nomad
# >= 1.6.3). Nomad 1.1 needs capacity_max whenever capacity_min is set.
capacity_min = "10GiB"
capacity_max = "20GiB"

capability {
  access_mode     = "single-node-writer"
  attachment_mode = "file-system"
}

capability {
  access_mode     = "single-node-reader-only"
  attachment_mode = "file-system"
}

# Used when the node formats the blank disk (first stage) and on every mount.
mount_options {
  fs_type     = "ext4"
  mount_flags = ["noatime"]
}

# CreateVolume parameters (all optional; unknown keys are rejected). They are fixed at
# creation except the QoS keys, which ControllerModifyVolume may change.
parameters {
  pool    = "default"  # a pool of the controller's config
  format  = "qcow2"    # qcow2 (thin, snapshots) | raw (needed for multi-node writers)
  bus     = "scsi"     # scsi (virtio-scsi, default) | virtio (virtio-blk) | sata
  cache   = "none"     # none | writethrough | writeback | directsync | unsafe
  io      = "native"   # native (needs cache none/directsync) | threads | io_uring
  discard = "unmap"    # unmap (trim frees pool space) | ignore
  persist = "true"     # true: the attachment survives a guest reboot; false: live only

  # The owner of the fresh file system's root: the exec driver runs tasks as nobody (65534),
  # who could not write into a root-owned 0755 root. rootMode = "2770" (with rootGid) gives
  # a group instead.
  rootUid = "65534"
  rootGid = "65534"

  # QoS as libvirt <iotune>; total* cannot be combined with read*/write* of the same kind.
  totalIopsSec  = "2000"
  readBytesSec  = "104857600"
  writeBytesSec = "52428800"
}

# Only for pools that declare topology (e.g. the hypervisor host; Nomad >= 1.3): the volume is
# created in a pool whose segments match, and Nomad places allocations on nodes whose
# NodeGetInfo reports the same segments (set [node] topology in the VMs' config). Remove this
# block when the pools have no topology.
topology_request {
  required {
    topology {
      # An object, because the key is not an identifier.
      segments = { "topology.virtdisk.csi.io/host" = "hv1" }
    }
  }
}
