//! Domain and disk XML for the test guests, every value escaped.

use std::fmt::Write;
use std::path::Path;

/// The bus a hot-plugged disk sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bus {
    /// virtio-blk, one PCIe root port per disk; detach needs the guest's ack.
    Virtio,
    /// A LUN on the domain's virtio-scsi controller.
    Scsi,
}

impl Bus {
    pub fn as_str(self) -> &'static str {
        match self {
            Bus::Virtio => "virtio",
            Bus::Scsi => "scsi",
        }
    }

    /// Kernel-style target name prefix libvirt expects for the bus.
    pub fn dev_prefix(self) -> &'static str {
        match self {
            Bus::Virtio => "vd",
            Bus::Scsi => "sd",
        }
    }
}

pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

fn path(p: &Path) -> String {
    escape(p.to_str().expect("utf-8 path"))
}

pub struct DomainSpec<'a> {
    pub name: &'a str,
    pub memory_mib: u32,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    /// Extra kernel parameters (`key=value` without a dot reach /init's environment).
    pub cmdline: &'a str,
    pub console_log: &'a Path,
    /// What /init and its helpers print for the tests to read (`vdt:` and `vdt-block` lines),
    /// on a second serial port (`ttyS1`) that the kernel never writes to: on the console, a
    /// kernel message can land in the middle of a line.
    pub events_log: &'a Path,
    /// PCIe root ports left free for virtio-blk hot-plug.
    pub hotplug_ports: u32,
    /// SMBIOS OEM strings (type 11), e.g. `topology.virtdisk.csi.io/host=hv1`.
    pub oem_strings: &'a [String],
}

/// A TCG (`type='qemu'`) q35 guest booting the kernel and initramfs directly.
pub fn domain(spec: &DomainSpec) -> String {
    let mut ports = String::new();
    // libvirt places the cold-plugged PCIe devices (virtio-scsi, NIC, RNG, the virtio-serial
    // controller of the guest agent's channel) on the first ports.
    for _ in 0..spec.hotplug_ports + 4 {
        ports.push_str("    <controller type='pci' model='pcie-root-port'/>\n");
    }
    let (smbios, sysinfo) = if spec.oem_strings.is_empty() {
        (String::new(), String::new())
    } else {
        let entries: String = spec
            .oem_strings
            .iter()
            .map(|e| format!("<entry>{}</entry>", escape(e)))
            .collect();
        (
            "    <smbios mode='sysinfo'/>\n".to_string(),
            format!("  <sysinfo type='smbios'><oemStrings>{entries}</oemStrings></sysinfo>\n"),
        )
    };
    let mut xml = String::new();
    write!(
        xml,
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 rdinit=/init {cmdline}</cmdline>
{smbios}  </os>
{sysinfo}  <features><acpi/><apic/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <controller type='pci' model='pcie-root'/>
{ports}    <controller type='scsi' model='virtio-scsi' index='0'/>
    <interface type='user'><model type='virtio'/></interface>
    <serial type='file'><source path='{console}' append='on'/><target port='0'/></serial>
    <serial type='file'><source path='{events}' append='on'/><target port='1'/></serial>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='none'/>
  </devices>
</domain>
",
        name = escape(spec.name),
        memory = spec.memory_mib,
        kernel = path(spec.kernel),
        initrd = path(spec.initrd),
        cmdline = escape(spec.cmdline),
        console = path(spec.console_log),
        events = path(spec.events_log),
    )
    .unwrap();
    xml
}

/// A qcow2 file disk with a serial, as a hot-plug would add it.
pub fn disk(image: &Path, target_dev: &str, bus: Bus, serial: &str) -> String {
    format!(
        "<disk type='file' device='disk'>
  <driver name='qemu' type='qcow2'/>
  <source file='{image}'/>
  <target dev='{dev}' bus='{bus}'/>
  <serial>{serial}</serial>
</disk>
",
        image = path(image),
        dev = escape(target_dev),
        bus = bus.as_str(),
        serial = escape(serial),
    )
}

/// The first `<prefix>[a-z]` target name the live XML does not use. Only a name in the XML:
/// the guest kernel names disks in the order it finds them.
pub fn free_target(live_xml: &str, bus: Bus) -> String {
    let prefix = bus.dev_prefix();
    ('a'..='z')
        .map(|c| format!("{prefix}{c}"))
        .find(|dev| !live_xml.contains(&format!("dev='{dev}'")))
        .expect("a free disk target name")
}
