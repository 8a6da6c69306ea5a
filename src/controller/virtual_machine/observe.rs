//! A VM's domain and volumes as its node has them, read in one blocking call.

use std::collections::BTreeMap;

use crate::hypervisor::domain_xml::DomainXml;
use crate::hypervisor::storage::VolumeInfo;
use crate::hypervisor::{Connection, DiskHolder, HvError, Hypervisor, StateDetail};

use super::plan::{Resolved, Source};

/// A volume by `(libvirt pool, volume)`.
type VolumeKey = (String, String);

/// How long another domain's use of a volume matters to a VM.
enum Until {
    /// Until its domain has the disk of that name (attached, or built on as an overlay).
    Disk(String),
    /// Until this volume (a clone made from it) exists.
    Volume(VolumeKey),
}

/// The domain as the host has it.
#[derive(Clone, Debug, PartialEq)]
pub struct DomainObs {
    pub uuid: Option<String>,
    pub state: StateDetail,
    /// The persistent definition (what the next start runs).
    pub persistent: DomainXml,
    /// SHA-256 (hex) of the persistent definition's text as libvirt gave it.
    pub persistent_sha256: String,
    /// That text (what the definition backup keeps, without reading it again).
    pub persistent_text: std::sync::Arc<str>,
    /// The running guest's definition, when it runs (or is paused).
    pub live: Option<DomainXml>,
    /// The running guest's addresses; `None`: not known from this reading (no NIC, not
    /// running, or no source answered).
    pub ips: Option<Vec<String>>,
}

/// What the node has of this VM.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    pub domain: Option<DomainObs>,
    /// Volumes by `(pool, volume)` (libvirt names); `None` when missing.
    pub volumes: BTreeMap<(String, String), Option<VolumeInfo>>,
    /// The node's domains that have, as a writable disk, a volume the VM is about to attach
    /// (`existing`) or build an overlay on (while its domain does not have that disk), or to
    /// copy (a `clone` template, while the copy is not made), by `(pool, volume)`.
    pub holders: BTreeMap<(String, String), Vec<DiskHolder>>,
    /// The volumes whose holders were read, `(pool, volume, path)`: the ones on a shared pool
    /// are read on the other nodes too ([`holders_elsewhere`]).
    pub checked: Vec<(String, String, String)>,
}

/// Reads the domain and every volume the VM uses.
pub async fn observe(hv: &impl Hypervisor, r: &Resolved) -> Result<Observed, HvError> {
    let read = reader(r);
    hv.call(&r.node, "observe VM", read).await
}

/// The blocking read [`observe`] makes, for a call that reads the VM right after changing it
/// (one call on the connection instead of two).
pub fn reader(
    r: &Resolved,
) -> impl FnOnce(&Connection) -> Result<Observed, HvError> + Send + 'static {
    let domain = r.domain.clone();
    let vols: Vec<(String, String)> = r
        .disks
        .iter()
        .map(|d| (d.pool.clone(), d.volume.clone()))
        .chain(r.seed.iter().map(|s| (s.pool.clone(), s.volume.clone())))
        .collect();
    // the volumes whose other users matter, and when: a volume attached or built on, until the
    // domain has that disk; a clone's template, until the copy exists
    let shared: Vec<(VolumeKey, Until)> = r
        .disks
        .iter()
        .filter_map(|d| match &d.source {
            Source::Existing => Some((
                (d.pool.clone(), d.volume.clone()),
                Until::Disk(d.name.clone()),
            )),
            Source::Overlay { base, .. } => {
                Some(((d.pool.clone(), base.clone()), Until::Disk(d.name.clone())))
            }
            Source::Clone { template, .. } => Some((
                (d.pool.clone(), template.clone()),
                Until::Volume((d.pool.clone(), d.volume.clone())),
            )),
            _ => None,
        })
        .collect();
    move |c| {
        // one lookup: the persistent definition, the state, the live definition when it runs
        let domain = match c.read_domain(&domain)? {
            Some(r) => {
                let persistent = DomainXml::parse(&r.persistent_text)?;
                let persistent_sha256 =
                    crate::controller::backup::sha256_hex(r.persistent_text.as_bytes());
                Some(DomainObs {
                    uuid: persistent.uuid.clone(),
                    state: r.state,
                    persistent,
                    persistent_sha256,
                    persistent_text: r.persistent_text.into(),
                    live: r.live,
                    ips: r.ips,
                })
            }
            None => None,
        };
        let mut volumes = BTreeMap::new();
        for (pool, vol) in vols {
            let info = match c.volume_info(&pool, &vol) {
                Ok(i) => Some(i),
                Err(HvError::NotFound { .. }) => None,
                Err(e) => return Err(e),
            };
            volumes.insert((pool, vol), info);
        }
        let mut holders = BTreeMap::new();
        let mut paths = Vec::new();
        for (key, until) in shared {
            let done = match &until {
                Until::Disk(name) => domain.as_ref().is_some_and(|d| {
                    crate::hypervisor::domain_spec::device_named(&d.persistent, name).is_some()
                }),
                Until::Volume(made) => volumes.get(made).is_some_and(Option::is_some),
            };
            if !done {
                let path = match volumes.get(&key) {
                    Some(Some(v)) => v.path.clone(),
                    Some(None) => continue,
                    None => match c.volume_info(&key.0, &key.1) {
                        Ok(v) => v.path,
                        Err(HvError::NotFound { .. }) => continue,
                        Err(e) => return Err(e),
                    },
                };
                paths.push((key.0, key.1, path));
            }
        }
        for ((pool, vol, _), found) in paths.iter().zip(c.disk_holders(&paths)?) {
            if !found.is_empty() {
                holders.insert((pool.clone(), vol.clone()), found);
            }
        }
        Ok(Observed {
            domain,
            volumes,
            holders,
            checked: paths,
        })
    }
}

/// Adds to `observed.holders` the domains of the other nodes that hold one of the checked
/// volumes on a shared pool (every node sees the same volume, and a guest on another host
/// writing it is as much a second writer; no file lock spans hosts on most shared storage). A
/// node that cannot be read is a holder that cannot be ruled out; a node declared fenced
/// (`spec.outOfService`) runs nothing and is skipped.
pub async fn holders_elsewhere(
    hv: &impl Hypervisor,
    r: &Resolved,
    nodes: &[std::sync::Arc<crate::api::KvmNode>],
    observed: &mut Observed,
) {
    let shared: Vec<(String, String, String)> = observed
        .checked
        .iter()
        .filter(|(pool, _, _)| r.disks.iter().any(|d| d.shared && &d.pool == pool))
        .cloned()
        .collect();
    if shared.is_empty() {
        return;
    }
    let reads = nodes
        .iter()
        .filter(|n| !n.spec.out_of_service)
        .map(|n| kube::ResourceExt::name_any(n.as_ref()))
        .filter(|n| n != &r.node)
        .map(|node| {
            let paths = shared.clone();
            async move {
                let found = hv
                    .call(&node, "read domain disks", move |c| c.disk_holders(&paths))
                    .await;
                (node, found)
            }
        });
    for (node, found) in futures::future::join_all(reads).await {
        match found {
            Ok(found) => {
                for ((pool, vol, _), f) in shared.iter().zip(found) {
                    if !f.is_empty() {
                        observed
                            .holders
                            .entry((pool.clone(), vol.clone()))
                            .or_default()
                            .extend(f);
                    }
                }
            }
            Err(_) => {
                for (pool, vol, _) in &shared {
                    observed
                        .holders
                        .entry((pool.clone(), vol.clone()))
                        .or_default()
                        .push(DiskHolder {
                            node: node.clone(),
                            domain: String::new(),
                            active: true,
                            owner: None,
                            unreadable: true,
                        });
                }
            }
        }
    }
}
