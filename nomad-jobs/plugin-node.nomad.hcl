# virtdisk-csi node plugin: runs inside every VM that is a Nomad client. It finds the disk the
# controller hot-plugged (by serial, through sysfs), formats a blank one, mounts it and binds
# it into the allocations. The node id is the VM's DMI product_uuid, which equals its libvirt
# domain UUID, so the controller finds the domain without any configuration.
#
#   nomad job run -var 'nomad_data_dir=/opt/nomad/data' plugin-node.nomad.hcl

variable "binary" {
  type    = string
  default = "/usr/local/bin/virtdisk-csi"
}

variable "artifact_url" {
  type    = string
  default = ""
}

variable "nomad_data_dir" {
  type        = string
  description = "The Nomad client's data_dir (raw_exec sees host paths: see README.md)"
  default     = "/opt/nomad/data"
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

job "plugin-virtdisk-node" {
  datacenters = var.datacenters
  type        = "system"

  constraint {
    attribute = "${attr.kernel.name}"
    value     = "linux"
  }

  # The VMs carry `meta { virtdisk_node = "true" }` in their client config.
  constraint {
    attribute = "${meta.virtdisk_node}"
    value     = "true"
  }

  group "node" {
    restart {
      attempts = 10
      interval = "5m"
      delay    = "5s"
      mode     = "delay"
    }

    task "plugin" {
      # raw_exec: root in the host's mount namespace with the real /dev and /sys, so mounts
      # are visible to Nomad without propagation settings (a privileged node plugin).
      driver = "raw_exec"

      dynamic "artifact" {
        for_each = var.artifact_url == "" ? [] : [var.artifact_url]
        content {
          source      = artifact.value
          destination = "local/bin"
        }
      }

      config {
        command = var.artifact_url == "" ? var.binary : "local/bin/virtdisk-csi"
        args = [
          "serve",
          "--mode", "node",
          "--endpoint", "${CSI_ENDPOINT}",
          "--log-format", "json",
          "--config", "local/node.toml",
        ]
      }

      # Staging and target paths must lead below this plugin's base dir (after symlinks), so a
      # request can never mount, unmount or grow anything elsewhere on the node.
      template {
        destination = "local/node.toml"
        data        = <<-EOT
          [node]
          allowed_path_roots = ["${var.nomad_data_dir}/csi/node/virtdisk"]
        EOT
      }

      csi_plugin {
        id        = "virtdisk"
        type      = "node"
        mount_dir = "/csi"
        # raw_exec has no container: the staging and target paths Nomad sends must be host
        # paths, so the base dir is the host directory Nomad keeps for this plugin.
        stage_publish_base_dir = "${var.nomad_data_dir}/csi/node/virtdisk"
        health_timeout         = "1m"
      }

      env {
        RUST_LOG = "info"
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
