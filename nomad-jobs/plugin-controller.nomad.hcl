# virtdisk-csi controller: creates qcow2 volumes in the pools and hot-plugs them into the VMs
# (libvirt domains) that run the node plugin. Runs on the hypervisor hosts, where the pools are.
#
# Nomad >= 1.3.2 (health_timeout, CSI_ENDPOINT; the default datacenters = ["*"] needs >= 1.5:
# on older versions add -var 'datacenters=["dc1"]'). Nomad 1.1.0-1.2.x:
# nomad-1.1/plugin-controller.nomad.hcl. See README.md.
#
#   nomad job run -var 'binary=/usr/local/bin/virtdisk-csi' plugin-controller.nomad.hcl
#   nomad job run -var-file=virtdisk.vars plugin-controller.nomad.hcl   # config = <<EOT ... EOT
#
# See README.md for why raw_exec, how libvirt is reached and what the config holds.

variable "binary" {
  type        = string
  description = "Path of the virtdisk-csi binary on the hosts (ignored when artifact_url is set)"
  default     = "/usr/local/bin/virtdisk-csi"
}

variable "artifact_url" {
  type        = string
  description = "Optional: download the released binary (a .tar.gz holding virtdisk-csi) instead"
  default     = ""
}

variable "config" {
  type        = string
  description = "The plugin's TOML configuration (pools, [libvirt], [snapshots]), the same on every host; empty: the embedded default, one pool `default` under <data_dir>/pools/default and qemu:///system"
  default     = ""
}

variable "data_dir" {
  type        = string
  description = "The plugin's own state: home of the embedded default pool"
  default     = "/var/lib/virtdisk"
}

variable "controller_count" {
  type        = number
  description = "Controller instances (>= 2 for high availability, each on another host)"
  default     = 2
}

variable "metrics_port" {
  type    = number
  default = 9808
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

job "plugin-virtdisk-controller" {
  datacenters = var.datacenters
  type        = "service"

  constraint {
    attribute = "${attr.kernel.name}"
    value     = "linux"
  }

  # Hypervisor hosts carry `meta { virtdisk_hypervisor = "true" }` in their client config.
  constraint {
    attribute = "${meta.virtdisk_hypervisor}"
    value     = "true"
  }

  group "controller" {
    count = var.controller_count

    # Two controllers on one host protect against nothing.
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
          "--mode", "controller",
          "--endpoint", "${CSI_ENDPOINT}",
          "--config", "local/config.toml",
          "--data-dir", var.data_dir,
          "--log-format", "json",
          "--metrics-addr", "${NOMAD_ADDR_metrics}",
        ]
      }

      csi_plugin {
        id             = "virtdisk"
        type           = "controller"
        mount_dir      = "/csi"
        health_timeout = "1m"
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
