# A job that uses the volume created from volume.hcl.
#
#   nomad volume create volume.hcl
#   nomad job run example-job.nomad.hcl
#
# On start Nomad calls ControllerPublishVolume (hot-plug into this VM), NodeStageVolume
# (format if blank, mount) and NodePublishVolume (bind into the allocation); on stop the same
# in reverse.

job "virtdisk-example" {
  datacenters = ["*"]
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
        args    = ["-c", "date >> /data/starts.log; cat /data/starts.log; exec sleep 3600"]
      }

      resources {
        cpu    = 50
        memory = 32
      }
    }
  }
}
