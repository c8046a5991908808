# virtdisk-csi monolith on ONE hypervisor host: controller and node in one process, for
# allocations that run on the hypervisor host itself (local attach: the qcow2 is exported as a
# block device on the host). Its plugin id is per host, because a controller RPC goes to any
# instance of a plugin id and local attach only works on the host that holds the volume.
#
#   nomad job run -var 'host=hv1' -var 'nomad_data_dir=/opt/nomad/data' plugin-monolith.nomad.hcl
#
# Volumes for it use plugin_id = "virtdisk-local-hv1".

variable "host" {
  type        = string
  description = "Nomad node name of the hypervisor host (node.unique.name)"
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
  type    = string
  default = "/etc/virtdisk-csi/config.toml"
}

variable "nomad_data_dir" {
  type    = string
  default = "/opt/nomad/data"
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

job "plugin-virtdisk-local" {
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
        static = 9809
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
          "--mode", "monolith",
          "--endpoint", "${CSI_ENDPOINT}",
          "--config", var.config,
          "--log-format", "json",
          "--metrics-addr", "${NOMAD_ADDR_metrics}",
        ]
      }

      csi_plugin {
        id                     = "virtdisk-local-${var.host}"
        type                   = "monolith"
        mount_dir              = "/csi"
        stage_publish_base_dir = "${var.nomad_data_dir}/csi/monolith/virtdisk-local-${var.host}"
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
