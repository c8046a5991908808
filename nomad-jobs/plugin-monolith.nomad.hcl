# virtdisk-csi monolith on ONE host: controller and node in one process, for allocations that
# run on that host itself (local attach: the qcow2 image becomes a loop device on the host).
# Its plugin id is per host, because Nomad sends a controller RPC to any instance of a plugin
# id and local attach only works on the host that holds the volume.
#
# Nomad >= 1.3.3 (stage_publish_base_dir, CSI_ENDPOINT; the default datacenters = ["*"] needs
# >= 1.5: on 1.3.3-1.4 add -var 'datacenters=["dc1"]'). Nomad 1.1.0-1.2.x:
# nomad-1.1/plugin-monolith.nomad.hcl. See README.md.
#
#   nomad job run -var host=hv1 -var nomad_data_dir=/opt/nomad/data plugin-monolith.nomad.hcl
#
# Volumes for it name plugin_id = "hv1-virtdisk" (volume-local.hcl).

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
  type        = string
  description = "Path of the virtdisk-csi binary on the host (ignored when artifact_url is set)"
  default     = "/usr/local/bin/virtdisk-csi"
}

variable "artifact_url" {
  type        = string
  description = "Optional: download the released binary (a .tar.gz holding virtdisk-csi) instead"
  default     = ""
}

variable "config" {
  type        = string
  description = "The plugin's TOML configuration (pools, [node], [snapshots]); empty: the embedded default, one pool `default` under <data_dir>/pools/default"
  default     = ""
}

variable "data_dir" {
  type        = string
  description = "The plugin's own state: the embedded default pool and the local-attach state"
  default     = "/var/lib/virtdisk"
}

variable "nomad_data_dir" {
  type        = string
  description = "The Nomad client's data_dir"
  default     = "/opt/nomad/data"
}

variable "nomad_state_dir" {
  type        = string
  description = "The Nomad client's state_dir, when its config sets one (default: <nomad_data_dir>/client)"
  default     = ""
}

variable "metrics_port" {
  type    = number
  default = 9809
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

locals {
  state_dir = var.nomad_state_dir != "" ? var.nomad_state_dir : "${var.nomad_data_dir}/client"
  plugin_id = var.plugin_id != "" ? var.plugin_id : "${var.host}-virtdisk"
  # The host directory where Nomad keeps this plugin's staging and per-alloc mount points:
  # <client state_dir>/csi/<plugin type>/<plugin id>, the state_dir being <data_dir>/client
  # unless the client config sets client.state_dir.
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
      # raw_exec: root in the host's mount namespace with the real /dev and /sys, so its
      # mounts are the host's and Nomad binds them into the allocations.
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

      # Always present, so the plugin starts on a fresh host; empty means the defaults.
      template {
        destination = "local/config.toml"
        data        = "# virtdisk-csi configuration (nothing below: the embedded default)\n${var.config}\n"
      }

      config {
        command = var.artifact_url == "" ? var.binary : "local/bin/virtdisk-csi"
        args = [
          "serve",
          "--mode", "monolith",
          "--endpoint", "${CSI_ENDPOINT}",
          "--config", "local/config.toml",
          "--data-dir", var.data_dir,
          # Staging and target paths must lead below this plugin's directory (after
          # symlinks): a request can never mount, unmount or grow anything elsewhere.
          "--allowed-path-root", local.plugin_dir,
          "--log-format", "json",
          "--metrics-addr", "${NOMAD_ADDR_metrics}",
        ]
      }

      csi_plugin {
        id        = local.plugin_id
        type      = "monolith"
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
        cpu    = 200
        memory = 128
      }
    }
  }
}
