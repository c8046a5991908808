//! Hypervisor-side checks, for every host: KVM, libvirt reachable with versions, virtio-scsi
//! available to the domains (the default bus), and the running domains' SCSI controllers;
//! across hosts: no domain UUID running on two of them.

use super::Check;
use crate::config::{HostConfig, Mode};

/// `qemu:///system`, `qemu+unix:///system` → local; `qemu+ssh://hv1/system` → remote.
pub(super) fn is_local(uri: &str) -> bool {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return true;
    };
    let transport_local = scheme
        .split_once('+')
        .map(|(_, t)| t == "unix")
        .unwrap_or(true);
    let host = rest.split('/').next().unwrap_or("");
    transport_local && host.is_empty()
}

/// The checks of every host (all asked at once). `named`: the hosts come from `[[host]]`
/// entries, so each check names its host.
pub(super) async fn check(mode: Mode, hosts: &[HostConfig], named: bool) -> Vec<Check> {
    let mut checks = vec![kvm(hosts.iter().any(|h| is_local(&h.uri)))];
    let label = |h: &HostConfig, check: &str| {
        if named {
            format!("{check} ({})", h.name)
        } else {
            check.to_string()
        }
    };
    let mut runs = tokio::task::JoinSet::new();
    for (i, h) in hosts.iter().enumerate() {
        let host = h.clone();
        runs.spawn(async move {
            let local = is_local(&host.uri);
            let (checks, running) = hypervisor(mode, &host.uri, local).await;
            (i, host, checks, running)
        });
    }
    let mut done = Vec::new();
    while let Some(joined) = runs.join_next().await {
        match joined {
            Ok(r) => done.push(r),
            Err(e) => checks.push(Check::fail(
                "libvirt",
                e.to_string(),
                "report this as a bug",
            )),
        }
    }
    done.sort_by_key(|(i, ..)| *i);
    let mut seen: Vec<(String, String, String)> = Vec::new();
    let mut unread: Vec<String> = Vec::new();
    // (libvirtd host UUID, the hosts that reached it)
    let mut daemons: Vec<(String, Vec<String>)> = Vec::new();
    for (_, host, host_checks, running) in done {
        for mut c in host_checks {
            c.name = label(&host, &c.name);
            checks.push(c);
        }
        let Some((host_uuid, running)) = running else {
            unread.push(host.name.clone());
            continue;
        };
        if let Some(u) = host_uuid {
            match daemons.iter_mut().find(|(d, _)| *d == u) {
                // The same libvirtd again: its domains are already counted.
                Some((_, hosts)) => {
                    hosts.push(host.name.clone());
                    continue;
                }
                None => daemons.push((u, vec![host.name.clone()])),
            }
        }
        seen.extend(
            running
                .into_iter()
                .map(|(uuid, name)| (uuid, name, host.name.clone())),
        );
    }
    if named {
        checks.extend(same_daemon_check(&daemons));
        checks.push(duplicates_check(&seen, &unread));
    }
    checks
}

/// FAIL when several `[[host]]` entries reach one libvirtd (`daemons`: each daemon's host
/// UUID and the hosts that reached it): a copied uri, or two names for one machine.
fn same_daemon_check(daemons: &[(String, Vec<String>)]) -> Option<Check> {
    let same: Vec<String> = daemons
        .iter()
        .filter(|(_, hosts)| hosts.len() > 1)
        .map(|(uuid, hosts)| format!("{} (libvirt host UUID {uuid})", hosts.join(" and ")))
        .collect();
    (!same.is_empty()).then(|| {
        Check::fail(
            "hosts",
            format!(
                "several [[host]] entries reach one and the same libvirtd: {}",
                same.join("; ")
            ),
            "give each [[host]] the uri of its own hypervisor's libvirtd (if the uris are \
             right, those machines report one SMBIOS UUID: set host_uuid in each one's \
             libvirtd.conf)",
        )
    })
}

/// FAIL when one domain UUID runs on two hosts: the controller refuses to attach to it.
/// `running`: (UUID, name, host) of the hosts that were read; `unread`: the hosts whose
/// domains could not be listed (WARN: a duplicate there cannot be ruled out).
fn duplicates_check(running: &[(String, String, String)], unread: &[String]) -> Check {
    let mut by_uuid: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for (uuid, name, host) in running {
        by_uuid
            .entry(uuid)
            .or_default()
            .push(format!("{name} on {host}"));
    }
    let dups: Vec<String> = by_uuid
        .iter()
        .filter(|(_, at)| at.len() > 1)
        .map(|(uuid, at)| format!("{uuid}: {}", at.join(", ")))
        .collect();
    if dups.is_empty() && !unread.is_empty() {
        Check::warn(
            "domain UUIDs",
            format!(
                "{} running domain(s) on the hosts read, each UUID on one host; not checked on \
                 host(s) {} (libvirt not reachable, see above)",
                running.len(),
                unread.join(", ")
            ),
            "run the doctor again once every host's libvirtd answers",
        )
    } else if dups.is_empty() {
        Check::ok(
            "domain UUIDs",
            format!("{} running domain(s), each UUID on one host", running.len()),
        )
    } else {
        Check::fail(
            "domain UUIDs",
            format!(
                "running on several hosts at once: {} (the controller cannot tell which is the \
                 node; a live migration in progress shows here too)",
                dups.join("; ")
            ),
            "give cloned VMs their own UUID (virt-clone does), or re-run once the migration ended",
        )
    }
}

fn kvm(local: bool) -> Check {
    if !local {
        return Check::ok("/dev/kvm", "not checked here: libvirt is remote");
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Check::ok("/dev/kvm", "present and usable"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Check::warn(
            "/dev/kvm",
            "missing: domains on this host run without KVM acceleration",
            "enable virtualization in the firmware and modprobe kvm_intel (or kvm_amd)",
        ),
        Err(e) => Check::warn(
            "/dev/kvm",
            format!("present but not usable by this user: {e}"),
            "run as root or add the user to the kvm group",
        ),
    }
}

/// Whether `<emulator> -device help` lists virtio-scsi-pci.
async fn emulator_has_virtio_scsi(emulator: &str) -> Result<bool, String> {
    let run = crate::exec::run(emulator, ["-device", "help"]);
    let out = tokio::time::timeout(std::time::Duration::from_secs(20), run)
        .await
        .map_err(|_| format!("{emulator} -device help did not answer in 20 s"))?
        .map_err(|e| e.to_string())?;
    Ok(out.stdout.contains("\"virtio-scsi-pci\"") || out.stderr.contains("\"virtio-scsi-pci\""))
}

async fn emulator_checks(emulators: &[String]) -> Vec<Check> {
    let mut checks = Vec::new();
    for emulator in emulators {
        checks.push(match emulator_has_virtio_scsi(emulator).await {
            Ok(true) => Check::ok(
                "virtio-scsi",
                format!("{emulator} supports virtio-scsi-pci"),
            ),
            Ok(false) => Check::fail(
                "virtio-scsi",
                format!("{emulator} lacks virtio-scsi-pci: bus=scsi (the default) cannot attach"),
                "install a QEMU with virtio-scsi, or create volumes with the parameter bus=virtio",
            ),
            Err(e) => Check::warn(
                "virtio-scsi",
                format!("could not ask {emulator}: {e}"),
                "check that the emulator runs",
            ),
        });
    }
    checks
}

/// What was read of a host: its libvirtd's host UUID (when it said) and its running domains
/// (UUID, name); `None` when it could not be read.
type Running = Option<(Option<String>, Vec<(String, String)>)>;

#[cfg(not(feature = "libvirt"))]
async fn hypervisor(mode: Mode, _uri: &str, local: bool) -> (Vec<Check>, Running) {
    let mut checks = vec![Check::missing(
        mode == Mode::Controller,
        "libvirt",
        "this build has no libvirt support: volumes cannot be hot-plugged into VMs",
        "use a build with the default features (libvirt)",
    )];
    if local {
        if let super::tools::Found::OnPath(p) = super::tools::find("qemu-system-x86_64") {
            checks.extend(emulator_checks(&[p.display().to_string()]).await);
        }
    }
    (checks, Some((None, Vec::new())))
}

#[cfg(feature = "libvirt")]
async fn hypervisor(mode: Mode, uri: &str, local: bool) -> (Vec<Check>, Running) {
    let owned = uri.to_string();
    let facts = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        crate::exec::blocking(move || Ok(facts::gather(&owned))),
    )
    .await;
    let facts = match facts {
        Ok(Ok(Ok(f))) => f,
        Ok(Ok(Err(e))) => {
            let check = Check::missing(
                mode == Mode::Controller,
                "libvirt",
                format!("cannot use {uri}: {e}"),
                "start libvirtd (systemctl start libvirtd, or libvirtd -d) and check the URI; \
                 qemu+ssh:// needs key-based ssh for the plugin's user, qemu+tls:// its certificates",
            );
            return (vec![check], None);
        }
        Ok(Err(e)) => {
            let check = Check::fail("libvirt", e.to_string(), "report this as a bug");
            return (vec![check], None);
        }
        Err(_) => {
            let check = Check::missing(
                mode == Mode::Controller,
                "libvirt",
                format!("{uri} did not answer within 30 s"),
                "check that libvirtd is running and responsive (virsh -c URI list)",
            );
            return (vec![check], None);
        }
    };
    let mut checks = vec![Check::ok(
        "libvirt",
        format!(
            "{uri} reachable: libvirt {}, {} {}",
            facts.lib_version, facts.driver, facts.hypervisor_version
        ),
    )];
    if local {
        let mut emulators: Vec<String> = facts.default_emulator.iter().cloned().collect();
        for d in &facts.domains {
            if let Some(e) = &d.emulator {
                if !emulators.contains(e) {
                    emulators.push(e.clone());
                }
            }
        }
        checks.extend(emulator_checks(&emulators).await);
    } else if facts.scsi_bus {
        checks.push(Check::ok(
            "virtio-scsi",
            "the remote host's domain capabilities offer the scsi disk bus",
        ));
    } else {
        checks.push(Check::fail(
            "virtio-scsi",
            "the remote host's domain capabilities do not offer the scsi disk bus",
            "install a QEMU with virtio-scsi there, or create volumes with bus=virtio",
        ));
    }
    checks.push(domains_check(&facts.domains));
    let running = Some((
        facts.host_uuid.clone(),
        facts
            .domains
            .iter()
            .map(|d| (d.uuid.clone(), d.name.clone()))
            .collect(),
    ));
    (checks, running)
}

#[cfg(feature = "libvirt")]
fn domains_check(domains: &[facts::DomainFacts]) -> Check {
    if domains.is_empty() {
        return Check::ok("domains", "no running domains");
    }
    let with = domains.iter().filter(|d| d.virtio_scsi).count();
    let mut names: Vec<String> = domains
        .iter()
        .take(8)
        .map(|d| {
            format!(
                "{}{}",
                d.name,
                if d.virtio_scsi {
                    ""
                } else {
                    " (no virtio-scsi controller)"
                }
            )
        })
        .collect();
    if domains.len() > names.len() {
        names.push(format!("… {} more", domains.len() - names.len()));
    }
    Check::ok(
        "domains",
        format!(
            "{} running, {with} with a virtio-scsi controller (one is added on the first scsi \
             attach otherwise, which needs a free PCI slot): {}",
            domains.len(),
            names.join(", ")
        ),
    )
}

#[cfg(feature = "libvirt")]
mod facts {
    //! What libvirt says, gathered on one thread (libvirt errors are per-thread).

    pub(super) struct DomainFacts {
        pub name: String,
        pub uuid: String,
        pub emulator: Option<String>,
        pub virtio_scsi: bool,
    }

    pub(super) struct Facts {
        pub lib_version: String,
        pub driver: String,
        pub hypervisor_version: String,
        pub default_emulator: Option<String>,
        pub scsi_bus: bool,
        pub domains: Vec<DomainFacts>,
        /// The libvirtd's host UUID (`<capabilities><host><uuid>`): one per daemon.
        pub host_uuid: Option<String>,
    }

    fn version(v: u32) -> String {
        format!("{}.{}.{}", v / 1_000_000, v / 1000 % 1000, v % 1000)
    }

    pub(super) fn gather(uri: &str) -> Result<Facts, String> {
        // libvirt's default handler prints every error to stderr; the report says it instead.
        virt::error::clear_error_callback();
        let conn = virt::connect::Connect::open(Some(uri)).map_err(|e| e.message().to_string())?;
        let lib_version = conn.lib_version().map(version).map_err(|e| e.to_string())?;
        let driver = conn.driver_type().unwrap_or_else(|_| "hypervisor".into());
        let hypervisor_version = conn
            .hyp_version()
            .map(version)
            .unwrap_or_else(|_| "?".into());
        let caps = conn
            .domain_capabilities(None, None, None, None, 0)
            .unwrap_or_default();
        let default_emulator = element_text(&caps, "path");
        let scsi_bus = caps.contains("<value>scsi</value>");
        let host_uuid = conn
            .capabilities()
            .ok()
            .and_then(|c| element_text(&c, "uuid"))
            .map(|u| u.to_ascii_lowercase());
        let mut domains = Vec::new();
        let active = conn
            .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            .map_err(|e| e.to_string())?;
        for dom in active {
            let name = dom.name().unwrap_or_else(|_| "?".into());
            let uuid = dom
                .uuid_string()
                .map(|u| u.to_ascii_lowercase())
                .unwrap_or_else(|_| "?".into());
            // A domain may stop between the listing and this call: skip it then.
            let Ok(xml) = dom.xml_desc(0) else { continue };
            domains.push(DomainFacts {
                name,
                uuid,
                emulator: element_text(&xml, "emulator"),
                virtio_scsi: has_virtio_scsi_controller(&xml),
            });
        }
        Ok(Facts {
            lib_version,
            driver,
            hypervisor_version,
            default_emulator,
            scsi_bus,
            domains,
            host_uuid,
        })
    }

    /// Text of the first `<tag>…</tag>` (libvirt's own, well-formed output).
    pub(super) fn element_text(xml: &str, tag: &str) -> Option<String> {
        let open = format!("<{tag}>");
        let start = xml.find(&open)? + open.len();
        let end = xml[start..].find(&format!("</{tag}>"))? + start;
        let text = xml[start..end].trim();
        (!text.is_empty()).then(|| text.to_string())
    }

    /// Whether a `<controller type='scsi' model='virtio-scsi'>` is present.
    pub(super) fn has_virtio_scsi_controller(xml: &str) -> bool {
        xml.split('<')
            .filter(|tag| tag.starts_with("controller "))
            .any(|tag| {
                let head = tag.split('>').next().unwrap_or("");
                let attr = |name: &str| {
                    ['\'', '"'].iter().find_map(|q| {
                        let key = format!("{name}={q}");
                        let start = head.find(&key)? + key.len();
                        let end = head[start..].find(*q)? + start;
                        Some(&head[start..end])
                    })
                };
                attr("type") == Some("scsi") && attr("model") == Some("virtio-scsi")
            })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn reads_domain_xml() {
            let xml = "<domain><devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
                <controller type='usb' index='0' model='piix3-uhci'/>\
                <controller type='scsi' index='0' model='virtio-scsi'><address/></controller>\
                </devices></domain>";
            assert_eq!(
                element_text(xml, "emulator").as_deref(),
                Some("/usr/bin/qemu-system-x86_64")
            );
            assert!(has_virtio_scsi_controller(xml));
            assert!(!has_virtio_scsi_controller(
                "<controller type=\"scsi\" model=\"lsilogic\"/>"
            ));
            assert_eq!(version(9_000_000), "9.0.0");
            assert_eq!(version(7_002_000), "7.2.0");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_uuid_on_two_hosts_fails() {
        let r = |u: &str, n: &str, h: &str| (u.to_string(), n.to_string(), h.to_string());
        let ok = duplicates_check(&[r("a", "vm1", "hv1"), r("b", "vm2", "hv2")], &[]);
        assert_eq!(ok.status, super::super::Status::Ok);
        let dup = duplicates_check(&[r("a", "vm1", "hv1"), r("a", "vm1-clone", "hv2")], &[]);
        assert_eq!(dup.status, super::super::Status::Fail);
        assert!(
            dup.detail.contains("a: vm1 on hv1, vm1-clone on hv2"),
            "{}",
            dup.detail
        );
    }

    #[test]
    fn a_host_that_could_not_be_read_is_no_ok() {
        let r = |u: &str, n: &str, h: &str| (u.to_string(), n.to_string(), h.to_string());
        let partial = duplicates_check(&[r("a", "vm1", "hv1")], &["hv2".to_string()]);
        assert_eq!(partial.status, super::super::Status::Warn);
        assert!(
            partial.detail.contains("not checked on host(s) hv2"),
            "{}",
            partial.detail
        );
        // A duplicate among the hosts read is still a FAIL.
        let dup = duplicates_check(
            &[r("a", "vm1", "hv1"), r("a", "vm1", "hv2")],
            &["hv3".to_string()],
        );
        assert_eq!(dup.status, super::super::Status::Fail);
    }

    #[test]
    fn hosts_that_reach_one_libvirtd_fail() {
        let d = |u: &str, hosts: &[&str]| {
            (
                u.to_string(),
                hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
            )
        };
        assert!(same_daemon_check(&[d("x", &["hv1"]), d("y", &["hv2"])]).is_none());
        let same = same_daemon_check(&[d("x", &["hv1", "hv2"]), d("y", &["hv3"])]).unwrap();
        assert_eq!(same.status, super::super::Status::Fail);
        assert!(
            same.detail.contains("hv1 and hv2 (libvirt host UUID x)"),
            "{}",
            same.detail
        );
    }

    #[test]
    fn local_and_remote_uris() {
        assert!(is_local("qemu:///system"));
        assert!(is_local("qemu+unix:///system"));
        assert!(is_local("qemu:///session"));
        assert!(!is_local("qemu+ssh://root@hv1/system"));
        assert!(!is_local("qemu+tls://hv1.example/system"));
        assert!(!is_local("qemu://hv1/system"));
    }
}
