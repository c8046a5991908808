# virtdisk-csi node plugin: runs inside every VM that is a Nomad client. It finds the disk the
# controller hot-plugged (by serial, through sysfs), formats a blank one, mounts it and binds
# it into the allocations. The node id is the VM's DMI product_uuid, which equals its libvirt
# domain UUID, so the controller finds the domain without any configuration.
#
# Nomad >= 1.3.3 (stage_publish_base_dir, CSI_ENDPOINT; the default datacenters = ["*"] needs
# >= 1.5: on 1.3.3-1.4 add -var 'datacenters=["dc1"]'). Nomad 1.1.0-1.2.x:
# nomad-1.1/plugin-node.nomad.hcl. See README.md.
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

variable "config" {
  type        = string
  description = "The node plugin's TOML configuration ([node] max_volumes_per_node, topology); empty: the defaults"
  default     = ""
}

variable "nomad_data_dir" {
  type        = string
  description = "The Nomad client's data_dir (raw_exec sees host paths: see README.md)"
  default     = "/opt/nomad/data"
}

variable "nomad_state_dir" {
  type        = string
  description = "The Nomad client's state_dir, when its config sets one (default: <nomad_data_dir>/client)"
  default     = ""
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

locals {
  state_dir = var.nomad_state_dir != "" ? var.nomad_state_dir : "${var.nomad_data_dir}/client"
  # The host directory where Nomad keeps this plugin's staging and per-alloc mount points:
  # <client state_dir>/csi/<plugin type>/<plugin id>, the state_dir being <data_dir>/client
  # unless the client config sets client.state_dir.
  plugin_dir = "${local.state_dir}/csi/node/virtdisk"
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

      # Longer than the plugin's own 10 s grace for in-flight RPCs at SIGTERM.
      kill_timeout = "15s"

      dynamic "artifact" {
        for_each = var.artifact_url == "" ? [] : [var.artifact_url]
        content {
          source      = artifact.value
          destination = "local/bin"
        }
      }

      # Always present, so the plugin starts on a fresh VM; empty means the defaults.
      template {
        destination = "local/config.toml"
        data        = "# virtdisk-csi configuration (nothing below: the defaults)\n${var.config}\n"
      }

      config {
        command = var.artifact_url == "" ? var.binary : "local/bin/virtdisk-csi"
        args = [
          "serve",
          "--mode", "node",
          "--endpoint", "${CSI_ENDPOINT}",
          "--config", "local/config.toml",
          # Staging and target paths must lead below this plugin's directory (after
          # symlinks): a request can never mount, unmount or grow anything elsewhere.
          "--allowed-path-root", local.plugin_dir,
          "--log-format", "json",
        ]
      }

      csi_plugin {
        id        = "virtdisk"
        type      = "node"
        mount_dir = "/csi"
        # raw_exec has no container: the staging and target paths Nomad sends must be host
        # paths, so the base dir is the host directory Nomad keeps for this plugin.
        stage_publish_base_dir = local.plugin_dir
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
