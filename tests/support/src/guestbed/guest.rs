//! One test guest: a transient-named, persistently defined libvirt domain booted from the test
//! bed, with its node plugin reachable from the host over a user-mode networking port forward.
//!
//! Transport: the guest's NIC is libvirt `<interface type='user'>` (QEMU's slirp, needs no
//! bridge, no root-only network setup and no vhost module); the test adds a forward from
//! `127.0.0.1:<free port>` on the host to the plugin's `tcp://0.0.0.0:10000` in the guest
//! with the monitor command `hostfwd_add` once the domain runs (libvirt has no port-forward
//! element for slirp). vsock needs `vhost_vsock` on the host (absent here); a virtio-serial
//! channel is a single byte stream without connection boundaries, which gRPC over HTTP/2
//! cannot reconnect over.

use super::bed::Testbed;
use super::report::{show, Timeline};
use super::xml::{self, Bus, DomainSpec};
use crate::domain::{destroy_and_undefine, sweep_stale, unique_name};
use crate::virsh::virsh_async as virsh;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};
use virtdisk_csi::csi::proto as csi;
use virtdisk_csi::csi::proto::{identity_client::IdentityClient, node_client::NodeClient};

/// Every test guest's domain name starts with this (then `<pid>-<n>-<name>`).
pub const DOMAIN_PREFIX: &str = "vdt-guest-";
/// The node plugin's TCP port inside the guest.
pub const GUEST_NODE_PORT: u16 = 10000;
/// The test command channel's TCP port inside the guest (`exec.sh`).
pub const GUEST_EXEC_PORT: u16 = 10022;

#[derive(Debug, Clone)]
pub struct GuestOptions {
    pub memory_mib: u32,
    /// PCIe root ports free for virtio-blk hot-plug (one per attached virtio disk).
    pub hotplug_ports: u32,
    /// RUST_LOG of the node plugin in the guest.
    pub rust_log: String,
    /// Kernel start → node plugin answering.
    pub boot_timeout: Duration,
    /// SMBIOS OEM strings (type 11) the domain hands the guest, e.g. the node topology
    /// `topology.virtdisk.csi.io/host=hv1`.
    pub oem_strings: Vec<String>,
}

impl Default for GuestOptions {
    fn default() -> Self {
        GuestOptions {
            memory_mib: 512,
            hotplug_ports: 6,
            rust_log: "info".to_string(),
            boot_timeout: Duration::from_secs(180),
            oem_strings: Vec::new(),
        }
    }
}

pub struct Guest {
    name: String,
    uuid: String,
    /// The libvirt connection the domain runs on now.
    uri: String,
    /// Every connection it ran on (a live migration leaves its definition behind).
    seen: Vec<String>,
    dir: tempfile::TempDir,
    console: PathBuf,
    /// The tests' serial port (`vdt:` and `vdt-block` lines only; see `xml::DomainSpec`).
    events: PathBuf,
    port: u16,
    exec_port: u16,
    channel: Channel,
    /// Where the current boot began.
    boot_mark: Mark,
    pub timeline: Timeline,
}

/// What a command run in the guest returned.
#[derive(Debug, Clone)]
pub struct Exec {
    pub status: i32,
    pub output: Vec<u8>,
}

impl Guest {
    /// Defines and starts `vdt-guest-…-<name>`, waits until its node plugin answers, and
    /// returns it. Panics (showing the console) when it does not come up.
    pub async fn boot(bed: &Testbed, name: &str) -> Guest {
        Self::boot_with(bed, name, GuestOptions::default()).await
    }

    pub async fn boot_with(bed: &Testbed, name: &str, opts: GuestOptions) -> Guest {
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "guest name {name:?}: use letters, digits and '-'"
        );
        // Guests of test processes that are gone (a killed run).
        sweep_stale(&bed.uri, DOMAIN_PREFIX);
        let full = unique_name(DOMAIN_PREFIX, name);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{full}."))
            .tempdir()
            .expect("guest scratch dir");
        // QEMU (another user) writes the console log and opens disk images in here.
        crate::open_for_qemu(dir.path());
        let console = dir.path().join("console.log");
        let events = dir.path().join("events.log");
        let domain_xml = xml::domain(&DomainSpec {
            name: &full,
            memory_mib: opts.memory_mib,
            kernel: &bed.kernel,
            initrd: &bed.initrd,
            cmdline: &format!("VDT_RUST_LOG={}", opts.rust_log),
            console_log: &console,
            events_log: &events,
            hotplug_ports: opts.hotplug_ports,
            oem_strings: &opts.oem_strings,
        });
        let xml_path = dir.path().join("domain.xml");
        std::fs::write(&xml_path, &domain_xml).unwrap();
        virsh(&bed.uri, &["define", xml_path.to_str().unwrap()])
            .await
            .unwrap_or_else(|e| panic!("defining {full}: {e}\n{domain_xml}"));
        let uuid = virsh(&bed.uri, &["domuuid", &full])
            .await
            .expect("domuuid")
            .trim()
            .to_ascii_lowercase();
        let mut guest = Guest {
            name: full.clone(),
            uuid,
            uri: bed.uri.clone(),
            seen: vec![bed.uri.clone()],
            dir,
            console,
            events,
            port: 0,
            exec_port: 0,
            boot_mark: Mark::default(),
            // Replaced once the port forward exists.
            channel: Endpoint::from_static("http://127.0.0.1:9").connect_lazy(),
            timeline: Timeline::new(format!("guest {full}")),
        };
        guest.start(&opts).await;
        guest
    }

    /// `virsh start`, port forward, wait for the node plugin.
    async fn start(&mut self, opts: &GuestOptions) {
        let mark = self.mark();
        self.timeline.mark("virsh start");
        self.virsh(&["start", &self.name])
            .await
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.name));
        self.timeline.mark("domain running (QEMU started)");
        self.forward().await;
        self.wait_for_plugin(mark, opts.boot_timeout).await;
    }

    /// Port forwards to the plugin and the command channel on the running QEMU, and a lazy
    /// channel through the first.
    async fn forward(&mut self) {
        self.port = self.forward_port(GUEST_NODE_PORT).await;
        self.exec_port = self.forward_port(GUEST_EXEC_PORT).await;
        self.channel = Endpoint::from_shared(format!("http://127.0.0.1:{}", self.port))
            .unwrap()
            .connect_timeout(Duration::from_secs(3))
            .connect_lazy();
    }

    /// The libvirt URI of the host the guest runs on now.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// `virsh migrate --live` to the libvirtd at `to` (`--unsafe`: the test's images lie on a
    /// filesystem libvirt cannot know both hosts share), then the port forwards again on the
    /// new QEMU (they are not migrated) and the node plugin probed through them. Returns how
    /// long the migration itself took.
    pub async fn migrate_live(&mut self, to: &str) -> Duration {
        let started = Instant::now();
        self.virsh(&["migrate", "--live", "--unsafe", &self.name, to])
            .await
            .unwrap_or_else(|e| self.fail(&format!("migrating to {to}: {e}")));
        let took = started.elapsed();
        self.uri = to.to_string();
        if !self.seen.iter().any(|u| u == to) {
            self.seen.push(to.to_string());
        }
        self.timeline
            .mark(format!("live-migrated to {to} ({} ms)", took.as_millis()));
        self.forward().await;
        let mut identity = IdentityClient::new(self.channel.clone());
        let probe = tokio::time::timeout(
            Duration::from_secs(30),
            identity.probe(csi::ProbeRequest {}),
        )
        .await;
        if !matches!(probe, Ok(Ok(_))) {
            self.fail(&format!(
                "the node plugin does not answer after the migration: {probe:?}"
            ));
        }
        self.timeline.mark("node plugin answers on the new host");
        took
    }

    /// The persistent definition of the domain on `uri` (e.g. the one a migration left).
    pub async fn inactive_xml_at(&self, uri: &str) -> String {
        virsh(uri, &["dumpxml", "--inactive", &self.name])
            .await
            .unwrap_or_else(|e| self.fail(&format!("dumpxml --inactive on {uri}: {e}")))
    }

    /// Adds a host → guest TCP forward on a free loopback port (retrying if another process
    /// took the port in between).
    async fn forward_port(&self, guest_port: u16) -> u16 {
        let mut last = String::new();
        for _ in 0..10 {
            let port = free_port();
            let rule = format!("hostfwd_add hostnet0 tcp:127.0.0.1:{port}-:{guest_port}");
            match self
                .virsh(&["qemu-monitor-command", &self.name, "--hmp", &rule])
                .await
            {
                // HMP prints nothing on success and a message on failure.
                Ok(out) if out.trim().is_empty() => return port,
                Ok(out) => last = out,
                Err(e) => last = e,
            }
        }
        panic!("{}: cannot add the port forward: {last}", self.name)
    }

    /// Marks the boot milestones /init prints, then probes the plugin until it answers.
    async fn wait_for_plugin(&mut self, since: Mark, timeout: Duration) {
        self.boot_mark = since;
        let deadline = Instant::now() + timeout;
        let milestones = [
            ("vdt: init started", "kernel booted, /init started"),
            ("vdt: modules loaded", "modules loaded"),
            ("vdt: starting node plugin", "node plugin starting"),
        ];
        let mut next = 0;
        let mut last_state_check = Instant::now();
        loop {
            let events = self.events_since(since);
            while let Some(line) = milestones.get(next).and_then(|(prefix, _)| {
                events
                    .lines()
                    .map(str::trim_end)
                    .find(|l| l.starts_with(prefix))
            }) {
                let uptime = line
                    .rsplit_once("(uptime ")
                    .map(|(_, u)| u.trim_end_matches(')'))
                    .unwrap_or("?");
                self.timeline
                    .mark(format!("{} (guest uptime {uptime} s)", milestones[next].1));
                next += 1;
            }
            if self.console_since(since).contains("Kernel panic") {
                self.fail("the guest kernel panicked");
            }
            if Instant::now() > deadline {
                // Tell a hung guest from a stalled console (QEMU writes it through virtlogd):
                // the command channel answers only if the guest runs.
                let inside = match self
                    .exec_within(
                        "cat /proc/uptime; dmesg | tail -n 30; ps",
                        Duration::from_secs(10),
                    )
                    .await
                {
                    Ok(r) => format!(
                        "the guest's command channel answers:\n{}",
                        String::from_utf8_lossy(&r.output)
                    ),
                    Err(e) => format!("the guest's command channel does not answer either: {e}"),
                };
                self.fail(&format!(
                    "the node plugin did not answer within {timeout:?}; {inside}"
                ));
            }
            if last_state_check.elapsed() > Duration::from_secs(1) {
                if !self.is_running().await {
                    self.fail("the domain stopped while booting");
                }
                last_state_check = Instant::now();
            }
            // Probing before the plugin starts would only delay noticing the milestones.
            if next == milestones.len() {
                let mut identity = IdentityClient::new(self.channel.clone());
                let probe = tokio::time::timeout(
                    Duration::from_secs(3),
                    identity.probe(csi::ProbeRequest {}),
                )
                .await;
                if let Ok(Ok(_)) = probe {
                    self.timeline
                        .mark("node plugin answers Probe (over the port forward)");
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The libvirt domain name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The domain UUID (lower case), which the guest sees as its DMI product_uuid.
    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    /// A gRPC channel to the node plugin in the guest.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }

    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    /// The host port forwarded to the guest's node plugin.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A scratch directory QEMU can read (for disk images); removed with the guest.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn console_path(&self) -> &Path {
        &self.console
    }

    /// The serial console so far (kernel log, /init, node plugin logs, `vdt-block` events).
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    /// The current ends of the console and of the tests' event lines: pass it to the `wait_*`
    /// methods to see only what comes after an action.
    pub fn mark(&self) -> Mark {
        let end = |path: &Path| std::fs::metadata(path).map_or(0, |m| m.len() as usize);
        Mark {
            console: end(&self.console),
            events: end(&self.events),
        }
    }

    /// The console after `mark`.
    pub fn console_since(&self, mark: Mark) -> String {
        tail_of(&self.console, mark.console)
    }

    /// The `vdt:` and `vdt-block` lines after `mark`.
    pub fn events_since(&self, mark: Mark) -> String {
        tail_of(&self.events, mark.events)
    }

    /// Every `vdt:` and `vdt-block` line so far (all boots).
    pub fn events(&self) -> String {
        self.events_since(Mark::default())
    }

    pub fn console_tail(&self, lines: usize) -> String {
        let text = self.console();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits for a `vdt:` or `vdt-block` line after `mark` that satisfies `matches`; returns it
    /// (without its line end).
    pub async fn wait_event(
        &self,
        mark: Mark,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.events_since(mark);
            if let Some(line) = events.lines().map(str::trim_end).find(|l| matches(l)) {
                return line.to_string();
            }
            if Instant::now() > deadline {
                self.fail(&format!("no event line for {what} within {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the guest kernel reports a disk with `serial` (after `mark`): hot-plugged,
    /// or present at boot. Returns its kernel name (`vdb`, `sda`, …).
    pub async fn wait_disk_added(&self, mark: Mark, serial: &str) -> String {
        let needle = format!(" serial={serial} ");
        let line = self
            .wait_event(
                mark,
                &format!("disk {serial} added"),
                Duration::from_secs(60),
                |l| {
                    (l.starts_with("vdt-block add ") || l.starts_with("vdt-block present "))
                        && l.contains(&needle)
                },
            )
            .await;
        line.split_whitespace()
            .nth(2)
            .expect("vdt-block add <disk>")
            .to_string()
    }

    /// Waits until the guest kernel reports that `disk` (a kernel name) went away.
    pub async fn wait_disk_removed(&self, mark: Mark, disk: &str) {
        let expected = format!("vdt-block remove {disk}");
        self.wait_event(
            mark,
            &format!("disk {disk} removed"),
            Duration::from_secs(60),
            |l| l == expected,
        )
        .await;
    }

    /// Runs `script` with `sh` in the guest (stdin /dev/null) over the test command channel;
    /// returns its exit status and output (stdout and stderr together).
    pub async fn exec(&self, script: &str) -> Exec {
        self.exec_within(script, Duration::from_secs(300))
            .await
            .unwrap_or_else(|e| self.fail(&e))
    }

    /// `exec` that reports a dead channel or a timeout as an error instead of failing.
    pub async fn exec_within(&self, script: &str, timeout: Duration) -> Result<Exec, String> {
        use base64::Engine;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let encoded = base64::engine::general_purpose::STANDARD.encode(script);
        let run = async {
            let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", self.exec_port)).await?;
            conn.write_all(format!("{encoded}\n").as_bytes()).await?;
            conn.shutdown().await?;
            let mut out = Vec::new();
            conn.read_to_end(&mut out).await?;
            Ok::<_, std::io::Error>(out)
        };
        let out = match tokio::time::timeout(timeout, run).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Err(format!("exec {script:?}: {e}")),
            Err(_) => return Err(format!("exec {script:?}: no answer within {timeout:?}")),
        };
        let marker = b"__vdt_rc=";
        let Some(at) = out.windows(marker.len()).rposition(|w| w == marker) else {
            return Err(format!(
                "exec {script:?}: the guest sent no exit status (is /init's nc running?): {}",
                String::from_utf8_lossy(&out)
            ));
        };
        let rc = String::from_utf8_lossy(&out[at + marker.len()..])
            .trim()
            .parse()
            .map_err(|e| format!("exec {script:?}: exit status: {e}"))?;
        Ok(Exec {
            status: rc,
            output: out[..at].to_vec(),
        })
    }

    /// Like `exec`, but the script must succeed; returns its output as text.
    pub async fn sh(&self, script: &str) -> String {
        let result = self.exec(script).await;
        let text = String::from_utf8_lossy(&result.output).into_owned();
        if result.status != 0 {
            self.fail(&format!(
                "in the guest, `{script}` exited with {}:\n{text}",
                result.status
            ));
        }
        text
    }

    /// Waits for /init's check that every packed tool finds its shared libraries in the guest.
    pub async fn assert_tools_load(&self) {
        let line = self
            .wait_event(
                self.boot_mark,
                "the tools check",
                Duration::from_secs(60),
                |l| l.starts_with("vdt: tools "),
            )
            .await;
        if !line.starts_with("vdt: tools ok") {
            self.fail(&line);
        }
    }

    /// `virsh -c <uri> <args>` → stdout.
    pub async fn virsh(&self, args: &[&str]) -> Result<String, String> {
        virsh(&self.uri, args).await
    }

    pub async fn live_xml(&self) -> String {
        self.virsh(&["dumpxml", &self.name]).await.expect("dumpxml")
    }

    /// Waits until the guest's qemu-guest-agent is connected: its channel reads
    /// `state='connected'` in the live XML (what the controller checks before a freeze).
    pub async fn wait_guest_agent(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let live = self.live_xml().await;
            let connected = live.lines().any(|l| {
                l.contains("name='org.qemu.guest_agent.0'") && l.contains("state='connected'")
            });
            if connected {
                return;
            }
            if Instant::now() > deadline {
                self.fail("qemu-guest-agent did not connect");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// qemu-guest-agent's log in the guest (verbose: every command it received).
    pub async fn guest_agent_log(&self) -> String {
        self.sh(&format!(
            "cat {} 2>/dev/null || true",
            super::initramfs::GUEST_AGENT_LOG
        ))
        .await
    }

    pub async fn is_running(&self) -> bool {
        self.virsh(&["domstate", &self.name])
            .await
            .is_ok_and(|s| s.trim() == "running")
    }

    /// Whether the live XML has a disk with this serial.
    pub async fn has_disk(&self, serial: &str) -> bool {
        self.live_xml()
            .await
            .contains(&format!("<serial>{}</serial>", xml::escape(serial)))
    }

    /// Hot-plugs `image` (qcow2) with `serial` on `bus` (`virsh attach-device --live`), as the
    /// controller does, and returns the disk XML (for `detach_disk`).
    pub async fn attach_disk(&self, image: &Path, serial: &str, bus: Bus) -> String {
        self.attach_disk_with(image, serial, bus, false).await
    }

    /// `attach_disk`; with `persist` also into the persistent definition (`--config`), so
    /// the disk is there again after `power_cycle`.
    pub async fn attach_disk_with(
        &self,
        image: &Path,
        serial: &str,
        bus: Bus,
        persist: bool,
    ) -> String {
        let live = self.live_xml().await;
        let disk = xml::disk(image, &xml::free_target(&live, bus), bus, serial);
        let file = self.dir.path().join(format!("disk-{serial}.xml"));
        std::fs::write(&file, &disk).unwrap();
        let mut args = vec![
            "attach-device",
            &self.name,
            file.to_str().unwrap(),
            "--live",
        ];
        if persist {
            args.push("--config");
        }
        self.virsh(&args)
            .await
            .unwrap_or_else(|e| panic!("attach-device {serial} on {}: {e}", bus.as_str()));
        disk
    }

    /// `virsh detach-device --live` with the XML `attach_disk` returned. For virtio-blk this
    /// only asks the guest: confirm with `wait_disk_gone`.
    pub async fn detach_disk(&self, disk_xml: &str) {
        let file = self.dir.path().join("detach.xml");
        std::fs::write(&file, disk_xml).unwrap();
        self.virsh(&[
            "detach-device",
            &self.name,
            file.to_str().unwrap(),
            "--live",
        ])
        .await
        .unwrap_or_else(|e| panic!("detach-device on {}: {e}", self.name));
    }

    /// Waits until the live XML no longer lists a disk with `serial`.
    pub async fn wait_disk_gone(&self, serial: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.has_disk(serial).await {
            if Instant::now() > deadline {
                self.fail(&format!(
                    "disk {serial} still in the live XML after {timeout:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Hard reset (same QEMU process: live-attached disks and the port forward stay); waits
    /// for the node plugin again.
    pub async fn reset(&mut self) {
        let mark = self.mark();
        self.timeline.mark("virsh reset");
        self.virsh(&["reset", &self.name])
            .await
            .expect("virsh reset");
        self.wait_for_plugin(mark, GuestOptions::default().boot_timeout)
            .await;
    }

    /// Reboot from inside: the guest kernel resets the machine (`reboot -f`, after a `sync`);
    /// QEMU keeps running (`on_reboot=restart`), so live disks and the port forwards stay, but
    /// everything in the guest's RAM (its root, `/var/lib`, the mounts) is gone. Waits for the
    /// node plugin again.
    pub async fn reboot(&mut self) {
        let boot_id = "cat /proc/sys/kernel/random/boot_id";
        let before = self.sh(boot_id).await;
        let mark = self.mark();
        self.timeline.mark("reboot -f in the guest");
        // In the background, so the command channel answers before the machine resets.
        self.sh("sync; (sleep 0.2; reboot -f) </dev/null >/dev/null 2>&1 &")
            .await;
        self.wait_for_plugin(mark, GuestOptions::default().boot_timeout)
            .await;
        let after = self.sh(boot_id).await;
        if before == after {
            self.fail("the guest did not reboot (same boot_id)");
        }
    }

    /// The persistent definition (`dumpxml --inactive`): what the next power-on starts from.
    pub async fn inactive_xml(&self) -> String {
        self.virsh(&["dumpxml", "--inactive", &self.name])
            .await
            .expect("dumpxml --inactive")
    }

    /// Whether the persistent definition has a disk with this serial.
    pub async fn has_persistent_disk(&self, serial: &str) -> bool {
        self.inactive_xml()
            .await
            .contains(&format!("<serial>{}</serial>", xml::escape(serial)))
    }

    /// Power off and start again from the persistent definition (disks attached without
    /// `--config` are gone; the port forward is added anew).
    pub async fn power_cycle(&mut self) {
        self.virsh(&["destroy", &self.name])
            .await
            .expect("virsh destroy");
        self.start(&GuestOptions::default()).await;
    }

    /// Panics with `why`, the console's tail and the console log's path.
    pub fn fail(&self, why: &str) -> ! {
        panic!(
            "{}: {why}\n--- console (last 60 lines of {}) ---\n{}\n---",
            self.name,
            self.console.display(),
            self.console_tail(60)
        )
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if std::env::var("VIRTDISK_GUEST_SHOW_CONSOLE").is_ok_and(|v| v == "1") {
            show(&format!(
                "--- {}: console ---\n{}\n---",
                self.name,
                self.console()
            ));
        } else if std::thread::panicking() {
            // The scratch dir goes with the guest: keep the whole console for the post-mortem.
            let kept = std::env::temp_dir().join(format!("{}.console.log", self.name));
            let kept = match std::fs::copy(&self.console, &kept) {
                Ok(_) => format!("whole console kept in {}", kept.display()),
                Err(e) => format!("could not keep the console: {e}"),
            };
            show(&format!(
                "--- {}: console (last 40 lines; {kept}) ---\n{}\n---",
                self.name,
                self.console_tail(40)
            ));
        }
        for uri in &self.seen {
            destroy_and_undefine(uri, &self.name);
        }
    }
}

/// Where a guest's output stood at a moment (byte offsets into its logs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Mark {
    console: usize,
    events: usize,
}

/// `path` from byte `from` on (empty if it is not there yet).
fn tail_of(path: &Path, from: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(bytes.get(from..).unwrap_or_default()).into_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}
