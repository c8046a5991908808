# virtdisk-csi monolith on ONE host, for Nomad 1.1.0-1.2.x: ../plugin-monolith.nomad.hcl
# (Nomad >= 1.3.3) written for the older client, which differs in three ways:
#
# - no stage_publish_base_dir: Nomad < 1.3 sends staging and target paths under mount_dir and
#   keeps the socket in the plugin's directory, so under raw_exec (no container) mount_dir is
#   that host directory itself, <client state_dir>/csi/monolith/<plugin id>;
# - no CSI_ENDPOINT before 1.1.13/1.2.7: the socket path is given, <that directory>/csi.sock;
# - no health_timeout before 1.1.15/1.2.9 (the 30 s default is plenty for this plugin), and
#   datacenters = ["*"] is not a wildcard before 1.5 (the default here is ["dc1"]).
#
#   nomad job run -var host=hv1 -var nomad_data_dir=/opt/nomad/data plugin-monolith.nomad.hcl
#
# Volumes for it name plugin_id = "hv1-virtdisk" (../volume-local.hcl).

variable "host" {
  type        = string
  description = "Nomad node name of the host (node.unique.name)"
}

# The host comes first: Nomad 1.1.0-1.1.12 and 1.2.0-1.2.6 find a plugin by id prefix, so an
# id that starts with another plugin's id (virtdisk-…) would take that plugin's RPCs.
variable "plugin_id" {
  type        = string
  description = "CSI plugin id (empty: <host>-virtdisk); never one that starts with another plugin's id"
  default     = ""
}

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
  description = "The plugin's TOML configuration; empty: the embedded default"
  default     = ""
}

variable "data_dir" {
  type    = string
  default = "/var/lib/virtdisk"
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

variable "metrics_port" {
  type    = number
  default = 9809
}

variable "datacenters" {
  type    = list(string)
  default = ["dc1"]
}

locals {
  state_dir = var.nomad_state_dir != "" ? var.nomad_state_dir : "${var.nomad_data_dir}/client"
  plugin_id  = var.plugin_id != "" ? var.plugin_id : "${var.host}-virtdisk"
  plugin_dir = "${local.state_dir}/csi/monolith/${local.plugin_id}"
}

job "plugin-virtdisk-local" {
  # One job per host, so the job's id follows the plugin id (plugin-hv1-virtdisk, …): a second
  # `nomad job run -var host=hv2` adds a job instead of replacing hv1's.
  id          = "plugin-${local.plugin_id}"
  name        = "plugin-${local.plugin_id}"
  datacenters = var.datacenters
  type        = "system"

  constraint {
    attribute = "${node.unique.name}"
    value     = var.host
  }

  group "monolith" {
    restart {
      attempts = 10
      interval = "5m"
      delay    = "5s"
      mode     = "delay"
    }

    network {
      port "metrics" {
        static = var.metrics_port
      }
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
        data        = "# virtdisk-csi configuration (nothing below: the embedded default)\n${var.config}\n"
      }

      config {
        command = var.artifact_url == "" ? var.binary : "local/bin/virtdisk-csi"
        args = [
          "serve",
          "--mode", "monolith",
          "--endpoint", "unix://${local.plugin_dir}/csi.sock",
          "--config", "local/config.toml",
          "--data-dir", var.data_dir,
          "--allowed-path-root", local.plugin_dir,
          "--log-format", "json",
          "--metrics-addr", "${NOMAD_ADDR_metrics}",
        ]
      }

      csi_plugin {
        id        = local.plugin_id
        type      = "monolith"
        mount_dir = local.plugin_dir
      }

      env {
        RUST_LOG = "info"
      }

      resources {
        cpu    = 200
        memory = 128
      }
    }
  }
}
