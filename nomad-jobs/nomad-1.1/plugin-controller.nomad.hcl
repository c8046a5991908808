# virtdisk-csi controller for Nomad 1.1.0-1.2.x: ../plugin-controller.nomad.hcl (Nomad >= 1.3.2)
# written for the older client, which differs in three ways:
#
# - Nomad < 1.3 keeps a plugin's socket in <client state_dir>/csi/controller/<plugin id>/ and
#   binds that directory at mount_dir; raw_exec has no container, so mount_dir is that host
#   directory itself and the plugin listens on <that directory>/csi.sock (no CSI_ENDPOINT
#   before 1.1.13/1.2.7);
# - no health_timeout before 1.1.15/1.2.9 (the 30 s default is plenty for this plugin);
# - datacenters = ["*"] is not a wildcard before 1.5 (the default here is ["dc1"]).
#
#   nomad job run -var nomad_data_dir=/opt/nomad/data plugin-controller.nomad.hcl

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
  description = "The plugin's TOML configuration, the same on every host; empty: the embedded default"
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

variable "controller_count" {
  type    = number
  default = 2
}

variable "metrics_port" {
  type    = number
  default = 9808
}

variable "datacenters" {
  type    = list(string)
  default = ["dc1"]
}

locals {
  state_dir = var.nomad_state_dir != "" ? var.nomad_state_dir : "${var.nomad_data_dir}/client"
  plugin_dir = "${local.state_dir}/csi/controller/virtdisk"
}

job "plugin-virtdisk-controller" {
  datacenters = var.datacenters
  type        = "service"

  constraint {
    attribute = "${attr.kernel.name}"
    value     = "linux"
  }

  constraint {
    attribute = "${meta.virtdisk_hypervisor}"
    value     = "true"
  }

  group "controller" {
    count = var.controller_count

    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }

    spread {
      attribute = "${node.unique.id}"
    }

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
          "--mode", "controller",
          "--endpoint", "unix://${local.plugin_dir}/csi.sock",
          "--config", "local/config.toml",
          "--data-dir", var.data_dir,
          "--log-format", "json",
          "--metrics-addr", "${NOMAD_ADDR_metrics}",
        ]
      }

      csi_plugin {
        id        = "virtdisk"
        type      = "controller"
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
