# A volume for the monolith on host hv1 (plugin-monolith.nomad.hcl run with -var host=hv1):
#
#   nomad volume create volume-local.hcl
#
# Every Nomad version the jobs support (1.1.0 and later). The image lives in the monolith's
# pools on hv1 and is attached there as a loop device, so only allocations on hv1 can claim it;
# the same example-job.nomad.hcl uses it. `name` is the idempotency key: re-running the
# command returns the same volume.

id        = "pgdata"
name      = "pgdata"
type      = "csi"
plugin_id = "hv1-virtdisk"

# Thin: the image takes space as data is written. Nomad 1.1 needs capacity_max whenever
# capacity_min is set (it sends 0 as "at most 0 bytes" otherwise).
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

# The file system the node creates on the blank disk at the first claim, and its mount flags
# (xfs needs a volume of at least 300 MiB).
mount_options {
  fs_type     = "ext4"
  mount_flags = ["noatime"]
}

parameters {
  pool   = "default" # a pool of the monolith's config (the embedded default pool: "default")
  format = "qcow2"   # qcow2 (thin, snapshots) | raw
  # The owner of the fresh file system's root: the exec driver runs tasks as nobody (65534),
  # who could not write into a root-owned 0755 root.
  rootUid = "65534"
  rootGid = "65534"
}
