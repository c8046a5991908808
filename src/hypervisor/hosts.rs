//! The hypervisor hosts, and on which one a node's domain runs.
//!
//! Every `[[host]]` has its own [`Libvirt`] connection (opened, lost and reopened on its own)
//! and the pools it can attach. A node id (domain UUID or name) is looked up on every host at
//! once ([`Hosts::placement`]); the host of its running domain is remembered, and the memory is
//! checked with one lookup on that host before each use ([`Hosts::locate`]), so a domain that
//! migrated (`virsh migrate --live`) is looked for everywhere again and found on its new host.
//!
//! What the copies found decide ([`decide`]): one running copy is the node, wherever the others
//! (a persistent definition a migration left behind, shut off) are. Two running copies are a
//! live migration in progress (one of them paused: ABORTED, retry) or two domains sharing one
//! UUID (FAILED_PRECONDITION, naming both hosts). A host that cannot be reached only matters
//! when no reachable host runs the node: then the node may be running there, and the answer is
//! UNAVAILABLE naming that host, never a guess.

use super::conn::Libvirt;
use super::view::{self, PoolImages};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument;
use virt::connect::Connect;
use virt::sys;

/// How long one host may take to say whether it has a domain: a host that does not answer in
/// time counts as unreachable for this lookup (its own calls keep running on its own permits).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(15);

/// One hypervisor host (`[[host]]`): where its libvirtd is and which pools it reaches.
#[derive(Debug, Clone)]
pub struct HostSpec {
    /// The host's name (its topology segment value).
    pub name: String,
    /// Its libvirt URI.
    pub uri: String,
    /// The pools whose images its domains can attach.
    pub pools: Vec<PoolImages>,
}

/// A host with its connection.
pub(crate) struct Host {
    pub(crate) name: String,
    pub(crate) lv: Libvirt,
    pools: Vec<PoolImages>,
}

impl Host {
    /// Whether this host's domains can attach volumes of pool `pool`.
    pub(crate) fn attaches(&self, pool: &str) -> bool {
        self.pools.iter().any(|p| p.pool == pool)
    }

    /// The names of the pools this host attaches.
    pub(crate) fn pool_names(&self) -> Vec<String> {
        self.pools.iter().map(|p| p.pool.clone()).collect()
    }
}

/// Whether a copy of a domain runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Run {
    /// Active and not paused.
    Running,
    /// Active but paused: during a live migration, the copy that is not running the guest.
    Paused,
    /// Defined only (shut off).
    Off,
}

impl Run {
    fn active(self) -> bool {
        self != Run::Off
    }
}

/// One copy of a node's domain, as found on one host.
#[derive(Debug, Clone)]
pub(crate) struct Copy {
    /// Index of the host in [`Hosts`].
    pub(crate) host: usize,
    /// The domain UUID, lower case.
    pub(crate) uuid: String,
    /// The domain name.
    pub(crate) name: String,
    pub(crate) run: Run,
}

impl Copy {
    pub(crate) fn active(&self) -> bool {
        self.run.active()
    }
}

/// Where a node is: the copy operations act on, and the other copies.
#[derive(Debug, Clone, Default)]
pub(crate) struct Placement {
    /// The running copy; else the only copy there is (shut off). None when the node has no
    /// copy, or only shut-off copies on several hosts.
    pub(crate) primary: Option<Copy>,
    /// Every other copy (shut-off definitions on other hosts).
    pub(crate) others: Vec<Copy>,
    /// Hosts that could not be asked (names), when the node runs on a reachable one.
    pub(crate) unreachable: Vec<String>,
}

/// A located node: the host of the copy to act on, and that copy.
#[derive(Clone)]
pub(crate) struct Located {
    pub(crate) host: Arc<Host>,
    pub(crate) copy: Copy,
}

/// Blocking: the domain `node_id` names on this connection (UUID, else name), if any.
fn lookup(conn: &Connect, lv: &Libvirt, node_id: &str, host: usize) -> Result<Option<Copy>> {
    let Some(dom) = view::find_domain(conn, lv, node_id)? else {
        return Ok(None);
    };
    let uuid = dom
        .uuid_string()
        .map_err(|e| lv.error("reading the domain UUID", e))?
        .to_ascii_lowercase();
    let name = dom
        .name()
        .map_err(|e| lv.error("reading the domain name", e))?;
    let run = match dom.state() {
        Ok((state, _)) if state.to_raw() == sys::VIR_DOMAIN_SHUTOFF => Run::Off,
        Ok((state, _)) if state.to_raw() == sys::VIR_DOMAIN_PAUSED => Run::Paused,
        Ok(_) => Run::Running,
        // Undefined between the lookup and this call: as good as not found.
        Err(e) if e.code().to_raw() == sys::VIR_ERR_NO_DOMAIN => return Ok(None),
        Err(e) => return Err(lv.error(&format!("reading the state of domain {name}"), e)),
    };
    Ok(Some(Copy {
        host,
        uuid,
        name,
        run,
    }))
}

/// What each host said about one node id: the copies found, and the hosts that could not
/// answer (host index, why).
#[derive(Debug, Default)]
pub(crate) struct Findings {
    pub(crate) copies: Vec<Copy>,
    pub(crate) down: Vec<(usize, Error)>,
}

/// Decides where `node_id` is from what the hosts said (see the module documentation).
/// `names` are the host names by index.
pub(crate) fn decide(node_id: &str, names: &[String], found: Findings) -> Result<Placement> {
    let host = |c: &Copy| names.get(c.host).cloned().unwrap_or_default();
    let list = |cs: &[&Copy]| cs.iter().map(|c| host(c)).collect::<Vec<_>>().join(" and ");
    let Findings { copies, down } = found;
    if let Some(other) = copies.iter().find(|c| c.uuid != copies[0].uuid) {
        return Err(Error::FailedPrecondition(format!(
            "node id {node_id} names two different domains: {} on host {} and {} on host {}; \
             use the domain UUID as node id",
            copies[0].uuid,
            host(&copies[0]),
            other.uuid,
            host(other)
        )));
    }
    let running: Vec<&Copy> = copies.iter().filter(|c| c.active()).collect();
    if running.len() > 1 {
        return Err(if running.iter().any(|c| c.run == Run::Paused) {
            Error::Aborted(format!(
                "node {node_id} is active on hosts {} at once, one of them paused: a live \
                 migration is in progress; retry when it has ended",
                list(&running)
            ))
        } else {
            Error::FailedPrecondition(format!(
                "node {node_id} runs on hosts {}: two domains share UUID {}; give one of them \
                 another UUID (a cloned VM keeps its source's UUID), unless those hosts' uris \
                 reach one and the same libvirtd (each [[host]] needs its own hypervisor's \
                 uri; `virtdisk-csi doctor --mode controller --config FILE` tells)",
                list(&running),
                running[0].uuid
            ))
        });
    }
    let down_names: Vec<String> = down
        .iter()
        .map(|(i, _)| names.get(*i).cloned().unwrap_or_default())
        .collect();
    if running.is_empty() && !down.is_empty() {
        let why: Vec<String> = down
            .iter()
            .map(|(i, e)| format!("host {}: {e}", names.get(*i).cloned().unwrap_or_default()))
            .collect();
        return Err(Error::Unavailable(format!(
            "node {node_id} runs on none of the reachable hosts{}, and host(s) {} cannot be \
             asked, so it may run there; retry once they answer ({})",
            if copies.is_empty() {
                String::new()
            } else {
                format!(
                    " (it is defined, shut off, on {})",
                    list(&copies.iter().collect::<Vec<_>>())
                )
            },
            down_names.join(", "),
            why.join("; ")
        )));
    }
    let primary_at = match running.first() {
        Some(r) => copies.iter().position(|c| std::ptr::eq(c, *r)),
        None if copies.len() == 1 => Some(0),
        None => None,
    };
    let mut others = copies;
    let primary = primary_at.map(|i| others.remove(i));
    Ok(Placement {
        primary,
        others,
        unreachable: down_names,
    })
}

/// Every host, and the memory of which host runs which node.
pub(crate) struct Hosts {
    hosts: Vec<Arc<Host>>,
    /// node id → index of the host that ran it when last looked up.
    seen: Mutex<HashMap<String, usize>>,
}

impl Hosts {
    pub(crate) fn new(specs: &[HostSpec]) -> Hosts {
        Hosts {
            hosts: specs
                .iter()
                .map(|s| {
                    crate::metrics::register_host(&s.name);
                    Arc::new(Host {
                        name: s.name.clone(),
                        lv: Libvirt::for_host(&s.name, &s.uri),
                        pools: s.pools.clone(),
                    })
                })
                .collect(),
            seen: Mutex::default(),
        }
    }

    pub(crate) fn all(&self) -> &[Arc<Host>] {
        &self.hosts
    }

    fn names(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.name.clone()).collect()
    }

    /// The names of the hosts that attach pool `pool`.
    pub(crate) fn attaching(&self, pool: &str) -> Vec<&Arc<Host>> {
        self.hosts.iter().filter(|h| h.attaches(pool)).collect()
    }

    /// Asks every host for `node_id` at once.
    async fn find(&self, node_id: &str) -> Findings {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, h) in self.hosts.iter().enumerate() {
            let (lv, node) = (h.lv.clone(), node_id.to_string());
            tasks.spawn(
                async move {
                    let asked = lv.read(move |c, l| lookup(c, l, &node, i));
                    (i, lv.bounded(LOOKUP_TIMEOUT, asked).await)
                }
                // The RPC's span (volume, node) follows the lookup into its task.
                .in_current_span(),
            );
        }
        let mut found = Findings::default();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((_, Ok(Some(copy)))) => found.copies.push(copy),
                Ok((_, Ok(None))) => {}
                Ok((i, Err(e))) => found.down.push((i, e)),
                Err(e) => tracing::warn!(error = %e, "a host lookup task failed"),
            }
        }
        found.copies.sort_by_key(|c| c.host);
        found.down.sort_by_key(|(i, _)| *i);
        found
    }

    /// Where `node_id` is, asking every host now; remembers the host of a running copy.
    pub(crate) async fn placement(&self, node_id: &str) -> Result<Placement> {
        let found = self.find(node_id).await;
        for (i, e) in &found.down {
            tracing::debug!(node = %node_id, host = %self.hosts[*i].name, error = %e,
                "host not asked");
        }
        let placement = decide(node_id, &self.names(), found)?;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match &placement.primary {
            Some(c) if c.active() => {
                seen.insert(node_id.to_string(), c.host);
            }
            _ => {
                seen.remove(node_id);
            }
        }
        Ok(placement)
    }

    /// The copy of `node_id` to act on: the remembered host if the node still runs there (one
    /// lookup), else where [`Hosts::placement`] finds it. None when no host has the node;
    /// FAILED_PRECONDITION when it is shut off on several hosts.
    pub(crate) async fn locate(&self, node_id: &str) -> Result<Option<Located>> {
        let remembered = self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node_id)
            .copied();
        if let Some(i) = remembered {
            let host = self.hosts[i].clone();
            let node = node_id.to_string();
            match host.lv.read(move |c, l| lookup(c, l, &node, i)).await {
                Ok(Some(copy)) if copy.run == Run::Running => {
                    return Ok(Some(Located { host, copy }));
                }
                outcome => {
                    tracing::info!(node = %node_id, host = %host.name,
                        found = ?outcome.as_ref().map(|c| c.as_ref().map(|c| c.run)),
                        "node no longer runs on its remembered host; looking on every host");
                    self.forget(node_id);
                }
            }
        }
        let placement = self.placement(node_id).await?;
        match placement.primary {
            Some(copy) => Ok(Some(Located {
                host: self.hosts[copy.host].clone(),
                copy,
            })),
            None if placement.others.is_empty() => Ok(None),
            None => Err(Error::FailedPrecondition(format!(
                "node {node_id} is defined on hosts {} and runs on none of them; start it (or \
                 undefine the stale definitions)",
                placement
                    .others
                    .iter()
                    .map(|c| self.hosts[c.host].name.clone())
                    .collect::<Vec<_>>()
                    .join(" and ")
            ))),
        }
    }

    /// Forgets where `node_id` ran (after an operation on it failed): the next use looks
    /// on every host again.
    pub(crate) fn forget(&self, node_id: &str) {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node_id);
    }

    pub(crate) fn host(&self, index: usize) -> &Arc<Host> {
        &self.hosts[index]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn copy(host: usize, uuid: &str, run: Run) -> Copy {
        Copy {
            host,
            uuid: uuid.into(),
            name: "vm".into(),
            run,
        }
    }

    fn names() -> Vec<String> {
        vec!["hv1".into(), "hv2".into(), "hv3".into()]
    }

    fn down(host: usize) -> (usize, Error) {
        (host, Error::Unavailable("connection refused".into()))
    }

    fn decided(copies: Vec<Copy>, down: Vec<(usize, Error)>) -> Result<Placement> {
        decide("n1", &names(), Findings { copies, down })
    }

    #[test]
    fn the_running_copy_is_the_node_wherever_stale_definitions_are() {
        let p = decided(
            vec![copy(0, "u", Run::Off), copy(1, "u", Run::Running)],
            vec![down(2)],
        )
        .unwrap();
        assert_eq!(p.primary.unwrap().host, 1);
        assert_eq!(p.others.len(), 1);
        assert_eq!(p.unreachable, ["hv3"]);
        // A single shut-off copy is the node too; none at all is no node.
        let p = decided(vec![copy(2, "u", Run::Off)], vec![]).unwrap();
        assert_eq!(p.primary.unwrap().host, 2);
        let p = decided(vec![], vec![]).unwrap();
        assert!(p.primary.is_none() && p.others.is_empty());
        // Shut off on two hosts: no primary, both are "others".
        let p = decided(vec![copy(0, "u", Run::Off), copy(1, "u", Run::Off)], vec![]).unwrap();
        assert!(p.primary.is_none());
        assert_eq!(p.others.len(), 2);
    }

    #[test]
    fn two_active_copies_are_a_migration_or_a_duplicate_uuid() {
        let e = decided(
            vec![copy(0, "u", Run::Running), copy(1, "u", Run::Paused)],
            vec![],
        )
        .unwrap_err();
        assert_eq!(e.code(), Code::Aborted, "{e}");
        assert!(e.to_string().contains("hv1 and hv2"), "{e}");
        let e = decided(
            vec![copy(0, "u", Run::Running), copy(2, "u", Run::Running)],
            vec![],
        )
        .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
        assert!(
            e.to_string().contains("hv1 and hv3") && e.to_string().contains("share UUID u"),
            "{e}"
        );
        // A name that means different domains on two hosts.
        let e = decided(
            vec![copy(0, "u1", Run::Off), copy(1, "u2", Run::Running)],
            vec![],
        )
        .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
        assert!(e.to_string().contains("use the domain UUID"), "{e}");
    }

    #[test]
    fn a_host_that_is_down_matters_only_when_no_reachable_host_runs_the_node() {
        let e = decided(vec![], vec![down(1)]).unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e}");
        assert!(e.to_string().contains("host(s) hv2 cannot be asked"), "{e}");
        let e = decided(vec![copy(0, "u", Run::Off)], vec![down(1)]).unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e}");
        assert!(e.to_string().contains("shut off, on hv1"), "{e}");
        assert!(decided(vec![copy(0, "u", Run::Running)], vec![down(1)]).is_ok());
    }

    /// A libvirt test-driver host (in process, no libvirtd) holding `domains`:
    /// (name, uuid, runstate: 1 running, 3 paused, 5 shut off).
    fn test_host(dir: &std::path::Path, name: &str, domains: &[(&str, &str, u8)]) -> HostSpec {
        let mut xml = String::from("<node>");
        for (dom, uuid, state) in domains {
            xml.push_str(&format!(
                "<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\
                 <name>{dom}</name><uuid>{uuid}</uuid><memory>65536</memory>\
                 <os><type>hvm</type></os><test:runstate>{state}</test:runstate></domain>"
            ));
        }
        xml.push_str("</node>");
        let file = dir.join(format!("{name}.xml"));
        std::fs::write(&file, xml).unwrap();
        HostSpec {
            name: name.into(),
            uri: format!("test://{}", file.display()),
            pools: vec![],
        }
    }

    const U: &str = "5dad5d3c-6e12-466e-9b43-47a61f27de97";

    /// Stops the domain on one host and starts it on another, as a live migration leaves them.
    async fn migrate(hosts: &Hosts, from: usize, to: usize) {
        let lv = hosts.host(from).lv.clone();
        lv.write(|c, l| {
            let d = c.lookup_domain_by_uuid_string(U).unwrap();
            d.destroy().map_err(|e| l.error("destroy", e))
        })
        .await
        .unwrap();
        let lv = hosts.host(to).lv.clone();
        lv.write(|c, l| {
            let d = c.lookup_domain_by_uuid_string(U).unwrap();
            d.create().map_err(|e| l.error("start", e))
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_is_found_on_its_host_and_again_after_it_moved() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = Hosts::new(&[
            test_host(
                dir.path(),
                "hv1",
                &[("other", "11111111-2222-3333-4444-555555555555", 1)],
            ),
            test_host(dir.path(), "hv2", &[("vm", U, 1)]),
            test_host(dir.path(), "hv3", &[("vm", U, 5)]),
        ]);
        for id in [U, "vm"] {
            let at = hosts.locate(id).await.unwrap().unwrap();
            assert_eq!(at.host.name, "hv2", "{id}");
            assert_eq!(at.copy.uuid, U);
        }
        let p = hosts.placement("vm").await.unwrap();
        assert_eq!(p.others.len(), 1, "the shut-off copy on hv3");
        assert!(hosts.locate("nowhere").await.unwrap().is_none());

        migrate(&hosts, 1, 2).await;
        let at = hosts.locate(U).await.unwrap().unwrap();
        assert_eq!(at.host.name, "hv3", "found on its new host");
        migrate(&hosts, 2, 1).await;
        assert_eq!(hosts.locate(U).await.unwrap().unwrap().host.name, "hv2");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_down_host_fails_only_the_nodes_that_may_run_there() {
        let dir = tempfile::tempdir().unwrap();
        let mut down = test_host(dir.path(), "hv2", &[]);
        down.uri = format!(
            "qemu+unix:///system?socket={}/nothing/libvirt-sock",
            dir.path().display()
        );
        let hosts = Hosts::new(&[test_host(dir.path(), "hv1", &[("vm", U, 1)]), down]);
        assert_eq!(hosts.locate(U).await.unwrap().unwrap().host.name, "hv1");
        let e = hosts.locate("elsewhere").await.err().unwrap();
        assert_eq!(e.code(), Code::Unavailable, "{e}");
        assert!(e.to_string().contains("host(s) hv2 cannot be asked"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_uuid_running_on_two_hosts_is_an_error_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = Hosts::new(&[
            test_host(dir.path(), "hv1", &[("vm", U, 1)]),
            test_host(dir.path(), "hv2", &[("vm-clone", U, 1)]),
        ]);
        let e = hosts.locate(U).await.err().unwrap();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
        assert!(e.to_string().contains("hv1 and hv2"), "{e}");
        // Paused on one of them: a live migration in progress, retry later.
        let dir = tempfile::tempdir().unwrap();
        let hosts = Hosts::new(&[
            test_host(dir.path(), "hv1", &[("vm", U, 1)]),
            test_host(dir.path(), "hv2", &[("vm", U, 3)]),
        ]);
        assert_eq!(hosts.locate(U).await.err().unwrap().code(), Code::Aborted);
    }
}
