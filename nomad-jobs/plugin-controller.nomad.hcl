# virtdisk-csi controller: creates qcow2 volumes in the pools and hot-plugs them into the VMs
# (libvirt domains) that run the node plugin. Runs on the hypervisor hosts, where the pools are.
#
#   nomad job run -var 'binary=/usr/local/bin/virtdisk-csi' plugin-controller.nomad.hcl
#
# See README.md for why raw_exec, how libvirt is reached and what the config file holds.

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
  description = "TOML configuration on the hosts: pools and the libvirt URI"
  default     = "/etc/virtdisk-csi/config.toml"
}

variable "controller_count" {
  type        = number
  description = "Controller instances (>= 2 for high availability, each on another host)"
  default     = 2
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
        static = 9808
      }
    }

    task "plugin" {
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
          "--mode", "controller",
          "--endpoint", "${CSI_ENDPOINT}",
          "--config", var.config,
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
