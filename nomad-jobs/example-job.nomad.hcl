# A job that uses the volume created from volume.hcl (or volume-local.hcl: the same id).
#
#   nomad volume create volume.hcl
#   nomad job run example-job.nomad.hcl                        # Nomad >= 1.5
#   nomad job run -var 'datacenters=["dc1"]' example-job.nomad.hcl   # Nomad 1.1.0-1.4
#
# On start Nomad calls ControllerPublishVolume (hot-plug into this VM, or a loop device on the
# monolith's host), NodeStageVolume (format if blank, mount) and NodePublishVolume (bind into
# the allocation); on stop the same in reverse. The exec driver runs the task as nobody.

variable "datacenters" {
  type        = list(string)
  description = "[\"*\"] needs Nomad >= 1.5; on older versions: -var 'datacenters=[\"dc1\"]'"
  default     = ["*"]
}

job "virtdisk-example" {
  datacenters = var.datacenters
  type        = "service"

  group "app" {
    # A single-node-writer volume can be claimed by one allocation at a time.
    count = 1

    volume "data" {
      type            = "csi"
      source          = "pgdata"
      access_mode     = "single-node-writer"
      attachment_mode = "file-system"
      read_only       = false

      # Overrides the volume's mount_options for this job (fs_type must match the disk).
      mount_options {
        mount_flags = ["noatime", "nodiratime"]
      }
    }

    task "app" {
      driver = "exec"

      volume_mount {
        volume      = "data"
        destination = "/data"
        read_only   = false
      }

      config {
        command = "/bin/sh"
        # The shell is pid 1 of the task: without a handler it would ignore the stop signal
        # and Nomad would wait kill_timeout (5 s) before it releases the volume.
        args = ["-c", "date >> /data/starts.log; cat /data/starts.log; trap 'exit 0' INT TERM; sleep 3600 & wait"]
      }

      resources {
        cpu    = 50
        memory = 32
      }
    }
  }
}
