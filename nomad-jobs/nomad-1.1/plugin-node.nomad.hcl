# virtdisk-csi node plugin for Nomad 1.1.0-1.2.x: ../plugin-node.nomad.hcl (Nomad >= 1.3.3)
# written for the older client, which differs in three ways:
#
# - no stage_publish_base_dir: Nomad < 1.3 sends staging and target paths under mount_dir and
#   keeps the socket in the plugin's directory, so under raw_exec (no container) mount_dir is
#   that host directory itself, <client state_dir>/csi/node/virtdisk;
# - no CSI_ENDPOINT before 1.1.13/1.2.7: the socket path is given, <that directory>/csi.sock;
# - no health_timeout before 1.1.15/1.2.9 (the 30 s default is plenty for this plugin), and
#   datacenters = ["*"] is not a wildcard before 1.5 (the default here is ["dc1"]).
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
  description = "The node plugin's TOML configuration; empty: the defaults"
  default     = ""
}

variable "nomad_data_dir" {
  type    = string
  default = "/opt/nomad/data"
}

variable "nomad_state_dir" {
  type        = string
  description = "The client's state_dir, when its config sets one (default: <nomad_data_dir>/client)"
  default     = ""
}

variable "datacenters" {
  type    = list(string)
  default = ["dc1"]
}

locals {
  state_dir = var.nomad_state_dir != "" ? var.nomad_state_dir : "${var.nomad_data_dir}/client"
  plugin_dir = "${local.state_dir}/csi/node/virtdisk"
}

job "plugin-virtdisk-node" {
  datacenters = var.datacenters
  type        = "system"

  constraint {
    attribute = "${attr.kernel.name}"
    value     = "linux"
  }

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
      driver       = "raw_exec"
      kill_timeout = "15s"

      dynamic "artifact" {
        for_each = var.artifact_url == "" ? [] : [var.artifact_url]
        content {
          source      = artifact.value
          destination = "local/bin"
        }
      }

      template {
        destination = "local/config.toml"
        data        = "# virtdisk-csi configuration (nothing below: the defaults)\n${var.config}\n"
      }

      config {
        command = var.artifact_url == "" ? var.binary : "local/bin/virtdisk-csi"
        args = [
          "serve",
          "--mode", "node",
          "--endpoint", "unix://${local.plugin_dir}/csi.sock",
          "--config", "local/config.toml",
          "--allowed-path-root", local.plugin_dir,
          "--log-format", "json",
        ]
      }

      csi_plugin {
        id        = "virtdisk"
        type      = "node"
        mount_dir = local.plugin_dir
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
