# A volume on the shared pool of a two-host cluster (deploy/config.two-hosts.toml):
#   nomad volume create volume-shared.hcl
#
# The shared pool is mounted at the same path on hv1 and hv2, so the volume is accessible from
# VMs on either host (CreateVolume reports both topologies), and a VM that is live-migrated
# between them keeps it attached. For a volume on one host's local pool, require that host's
# topology only (or name its pool).

id        = "shared-data"
name      = "shared-data"
type      = "csi"
plugin_id = "virtdisk"

capacity_min = "10GiB"

capability {
  access_mode     = "single-node-writer"
  attachment_mode = "file-system"
}

mount_options {
  fs_type = "ext4"
}

parameters {
  pool  = "shared"
  bus   = "scsi"
  cache = "none"
}

# Either host will do: each topology is one host's segment, which its VMs report from the
# SMBIOS OEM string their domain XML carries.
topology_request {
  required {
    topology {
      segments = { "topology.virtdisk.csi.io/host" = "hv1" }
    }
    topology {
      segments = { "topology.virtdisk.csi.io/host" = "hv2" }
    }
  }
}
