//! What to do with a VM (pure): resolve its spec to host terms, then compare with what the
//! node has and list the steps, in order.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kube::ResourceExt;

use crate::api::condition::Time;
use crate::api::storage_pool::PoolType;
use crate::api::virtual_machine::{
    Disk, RunStrategy, VirtualMachine, VolumeFormat, disk_pool, domain_name,
};
use crate::controller::World;
use crate::hypervisor::DomainState;
use crate::hypervisor::cloud_init::Seed;
use crate::hypervisor::domain_spec::{
    self, DesiredVm, DiskBacking, DomainPlan, Drift, NicSource, ObservedVm, PlannedDisk, PlannedNic,
};
use crate::hypervisor::domain_xml::{Device, Owner};
use crate::hypervisor::storage::VolumeInfo;

use super::observe::{DomainObs, Observed};

/// Why a VM on a failed node cannot be started on another node, or `None` when it may be (the
/// node still has to be fenced or show the domain stopped, and another node has to fit it).
pub fn failover_blocker(
    vm: &VirtualMachine,
    world: &World,
    node: &str,
) -> Option<(&'static str, String)> {
    if vm.spec.run_strategy != RunStrategy::RerunOnFailure {
        return Some((
            "NotRerunOnFailure",
            format!(
                "spec.runStrategy is {:?}; only RerunOnFailure VMs are started elsewhere after a host failure",
                vm.spec.run_strategy
            ),
        ));
    }
    if vm.spec.adopt.is_some() {
        return Some((
            "Adopted",
            "an adopted domain's definition belongs to its host; it is never recreated elsewhere"
                .into(),
        ));
    }
    if let Some(pin) = vm
        .spec
        .placement
        .as_ref()
        .and_then(|p| p.node_name.as_deref())
    {
        return Some((
            "Pinned",
            format!("spec.placement.nodeName pins it to {pin}"),
        ));
    }
    if vm
        .status
        .as_ref()
        .and_then(|s| s.domain_name.as_ref())
        .is_none()
    {
        return Some(("NotProvisioned", "it was never defined on the node".into()));
    }
    let ns = vm.namespace().unwrap_or_default();
    let req = super::request(vm);
    let mut pools: BTreeSet<String> = req.pools;
    if let Some(ci) = &vm.spec.cloud_init
        && let Some(p) = vm.spec.disks.iter().find_map(disk_pool)
        && ci.pool.is_none()
    {
        pools.insert(p.to_string());
    }
    for p in &pools {
        match world.pool(&ns, p) {
            None => {
                return Some((
                    "StorageNotShared",
                    format!("StoragePool {ns}/{p} is unknown"),
                ));
            }
            Some(pool) if !pool.spec.is_shared() => {
                return Some((
                    "StorageNotShared",
                    format!(
                        "its volumes in StoragePool {ns}/{p} ({}) exist only on {node}; set the pool's spec.shared only if every node sees the same volumes",
                        pool.spec.type_.as_str()
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    None
}

/// Spec name of the cloud-init seed device.
pub const SEED_DEVICE: &str = "cidata";

/// How a disk's volume comes to be.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    New {
        capacity: u64,
        format: VolumeFormat,
    },
    Clone {
        template: String,
        capacity: Option<u64>,
        format: VolumeFormat,
        /// Why the template cannot be copied now (another VM's guest writes to it): the copy
        /// waits, with this message naming that VM. Nothing to wait for once the copy exists.
        in_use: Option<String>,
    },
    Overlay {
        base: String,
        capacity: Option<u64>,
    },
    /// Must exist; never created or deleted by us.
    Existing,
    Cdrom,
}

impl Source {
    /// True for volumes the operator creates (and may delete by policy).
    pub fn created_by_us(&self) -> bool {
        matches!(
            self,
            Source::New { .. } | Source::Clone { .. } | Source::Overlay { .. }
        )
    }
}

/// An rbd pool's Ceph monitors `(host, port)` and its RADOS pool name.
pub type RbdSource = (Vec<(String, Option<u16>)>, String);

/// A spec disk in host terms.
#[derive(Clone, Debug, PartialEq)]
pub struct DiskRef {
    pub name: String,
    /// libvirt pool name and type.
    pub pool: String,
    pub pool_type: PoolType,
    /// Every node sees the pool's volumes (netfs, rbd, iscsi, or declared shared).
    pub shared: bool,
    /// Ceph monitors of an rbd pool, and its RADOS pool name.
    pub rbd: Option<RbdSource>,
    pub volume: String,
    pub source: Source,
    pub bus: crate::api::virtual_machine::DiskBus,
}

/// The cloud-init seed volume.
#[derive(Clone, Debug, PartialEq)]
pub struct SeedRef {
    pub pool: String,
    pub pool_type: PoolType,
    pub volume: String,
    pub seed: Seed,
}

/// A VM resolved against its node and pools.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub node: String,
    pub domain: String,
    pub adopted: bool,
    pub owner: Owner,
    pub disks: Vec<DiskRef>,
    pub seed: Option<SeedRef>,
    /// `kvm`, `qemu` (no /dev/kvm) or `test` (libvirt's test driver).
    pub domain_type: String,
}

/// Why the VM cannot progress now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    /// Stable CamelCase reason.
    pub reason: &'static str,
    pub message: String,
    /// When to look again; None waits for a change of the object.
    pub retry: Option<Duration>,
}

fn blocked(reason: &'static str, message: String, retry: Option<Duration>) -> Blocked {
    Blocked {
        reason,
        message,
        retry,
    }
}

/// Whether `a` keeps a volume that `b` wants too (attached, or as an overlay's base): a VM whose
/// domain is defined (it may be running on the volume) goes before one whose is not, then the
/// older object, then the namespace and name (objects read from files have no creation time).
fn goes_before(a: &VirtualMachine, b: &VirtualMachine) -> bool {
    let key = |v: &VirtualMachine| {
        let t = v.metadata.creation_timestamp.as_ref().map(|t| t.0);
        (
            v.status.as_ref().is_none_or(|s| s.domain_uuid.is_none()),
            t.is_none(),
            t,
            v.namespace(),
            v.name_any(),
        )
    };
    key(a) < key(b)
}

/// Where the volumes of the StoragePool object `pool` of namespace `ns` are: its libvirt pool's
/// name (objects of two namespaces can name the same one) and whether every node sees the same
/// volumes. `None` for an object not known (nothing can be in it).
fn pool_place(world: &World, ns: &str, pool: &str) -> Option<(String, bool)> {
    world.pool(ns, pool).map(|p| {
        (
            super::super::storage_pool::plan::libvirt_name(p),
            p.spec.is_shared(),
        )
    })
}

/// The disks of the other VMs, of any namespace, that name the volume `volume` (as the volume
/// the operator creates for them, an `existing` volume, an overlay's base or a clone's template)
/// in the same libvirt pool as `vm`'s StoragePool object `pool` on `node`: those on that node, or
/// anywhere when the pool is shared (a node-local pool's volume of a name elsewhere is another
/// volume). As (VM, index, disk). Names are compared first: pools are looked up only for the
/// few disks that name the volume, so a pass over every VM stays cheap.
fn disks_beside<'a>(
    vm: &VirtualMachine,
    world: &'a World,
    node: &str,
    pool: &str,
    volume: &str,
) -> Vec<(&'a VirtualMachine, usize, &'a Disk)> {
    let mut out = Vec::new();
    let ns = vm.metadata.namespace.as_deref().unwrap_or_default();
    let mut place = None;
    for w in &world.vms {
        if w.metadata.uid == vm.metadata.uid {
            continue;
        }
        let w_ns = w.metadata.namespace.as_deref().unwrap_or_default();
        let w_name = w.metadata.name.as_deref().unwrap_or_default();
        for (j, d) in w.spec.disks.iter().enumerate() {
            let names = is_created_volume(w_ns, w_name, d, volume)
                || d.existing.as_ref().is_some_and(|e| e.volume == volume)
                || d.overlay.as_ref().is_some_and(|o| o.base == volume)
                || d.clone.as_ref().is_some_and(|c| c.template == volume);
            if !names {
                continue;
            }
            let Some((lv, shared)) = place.get_or_insert_with(|| pool_place(world, ns, pool))
            else {
                return out;
            };
            let w_node = w.status.as_ref().and_then(|s| s.node.as_deref()).or(w
                .spec
                .adopt
                .as_ref()
                .map(|a| a.node_name.as_str()));
            let same_pool = disk_pool(d)
                .and_then(|o| pool_place(world, w_ns, o))
                .is_some_and(|p| p.0 == *lv);
            if same_pool && (*shared || w_node == Some(node)) {
                out.push((w.as_ref(), j, d));
            }
        }
    }
    out
}

/// Whether `volume` is the name of the volume the operator creates for disk `d` of VM
/// `namespace/vm` ([`created_volume`]), without building that name.
fn is_created_volume(namespace: &str, vm: &str, d: &Disk, volume: &str) -> bool {
    let ext = if let Some(n) = &d.new {
        n.format
    } else if let Some(c) = &d.clone {
        c.format
    } else if d.overlay.is_some() {
        VolumeFormat::Qcow2
    } else {
        return false;
    };
    let ext = match ext {
        VolumeFormat::Qcow2 => "qcow2",
        VolumeFormat::Raw => "img",
    };
    volume
        .strip_prefix(namespace)
        .and_then(|v| v.strip_prefix('-'))
        .and_then(|v| v.strip_prefix(vm))
        .and_then(|v| v.strip_prefix('-'))
        .and_then(|v| v.strip_prefix(d.name.as_str()))
        .and_then(|v| v.strip_prefix('.'))
        == Some(ext)
}

/// Another VM that attaches the volume `volume` of `vm`'s StoragePool object `pool`, or has it
/// as an overlay's base, where `vm` on `node` sees it: `("VirtualMachine namespace/name", its field)`. Such a
/// volume is not deleted with `vm` even when `vm` created it.
pub fn volume_used_by(
    vm: &VirtualMachine,
    world: &World,
    node: &str,
    pool: &str,
    volume: &str,
) -> Option<(String, String)> {
    disks_beside(vm, world, node, pool, volume)
        .into_iter()
        .find(|(_, _, d)| {
            d.existing.as_ref().is_some_and(|e| e.volume == volume)
                || d.overlay.as_ref().is_some_and(|o| o.base == volume)
        })
        .map(|(w, j, d)| {
            (
                crate::controller::describe(w),
                format!("spec.disks[{j}].{}", disk_kind(d)),
            )
        })
}

/// What a VM does with a volume it did not create.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Use {
    /// Attaches it as an `existing` disk: writes to it.
    Attach,
    /// Builds an overlay on it: needs it never to change.
    Base,
    /// Copies it (a `clone` template): needs it still while the copy is made.
    Copy,
}

/// Another VM whose use of the volume `volume` of the StoragePool object `pool` rules out `vm`'s
/// `want` of it on `node`. A volume another VM creates is that VM's: it is neither attached nor
/// built on by a second one, and copied only while that VM's guest is not running (a copy of a
/// disk being written is torn). A volume attached by one VM cannot be attached, or built on, by
/// another, nor attached while another builds on it; between two such VMs the one that
/// [`goes_before`] keeps it. The VMs that count are those of [`disks_beside`]: any namespace's,
/// on the same libvirt pool, and on the same node unless the pool is shared. Returns that VM
/// (as [`crate::controller::describe`] names it), its field, and what it does with the volume.
fn volume_taken_by(
    vm: &VirtualMachine,
    want: Use,
    world: &World,
    node: &str,
    pool: &str,
    volume: &str,
) -> Option<(String, String, &'static str)> {
    for (w, j, d) in disks_beside(vm, world, node, pool, volume) {
        // a copy is whole only of a disk no guest writes: its VM is stopped and meant to stay so
        let running = || {
            use crate::api::virtual_machine::PowerState;
            w.spec.run_strategy != RunStrategy::Stopped
                || w.status
                    .as_ref()
                    .and_then(|s| s.power_state)
                    .is_none_or(|p| !matches!(p, PowerState::Stopped | PowerState::Pending))
        };
        let attaches = d.existing.as_ref().is_some_and(|e| e.volume == volume);
        let bases = d.overlay.as_ref().is_some_and(|o| o.base == volume);
        let created = is_created_volume(
            w.metadata.namespace.as_deref().unwrap_or_default(),
            w.metadata.name.as_deref().unwrap_or_default(),
            d,
            volume,
        );
        let how = if created {
            if want == Use::Copy && !running() {
                continue;
            }
            if want == Use::Copy {
                "creates it, and its guest runs or is meant to (a copy of a disk being written is torn: set that VM's runStrategy to Stopped until the copy is made, or clone from a template)"
            } else {
                "creates and uses it"
            }
        } else if attaches && want == Use::Copy {
            // an attacher whose domain is not defined (refused the volume, or not made yet)
            // does not write it
            if !running() || w.status.as_ref().is_none_or(|s| s.domain_uuid.is_none()) {
                continue;
            }
            "attaches it, and its guest runs or is meant to (a copy of a disk being written is torn: set that VM's runStrategy to Stopped until the copy is made, or clone from a template)"
        } else if attaches && goes_before(w, vm) {
            "attaches it"
        } else if bases && want == Use::Attach && goes_before(w, vm) {
            "has it as the base of an overlay (writing to a base corrupts its overlays)"
        } else {
            continue;
        };
        return Some((
            crate::controller::describe(w),
            format!("spec.disks[{j}].{}", disk_kind(d)),
            how,
        ));
    }
    None
}

/// The name of the volume the operator creates for disk `d` of VM `namespace/vm` (a `new`,
/// `clone` or `overlay` disk); `None` for a disk whose volume it does not create.
pub fn created_volume(namespace: &str, vm: &str, d: &Disk) -> Option<String> {
    let format = if let Some(n) = &d.new {
        n.format
    } else if let Some(c) = &d.clone {
        c.format
    } else if d.overlay.is_some() {
        VolumeFormat::Qcow2
    } else {
        return None;
    };
    Some(volume_name(namespace, vm, &d.name, format))
}

/// Volume name the operator gives a disk it creates: `<namespace>-<vm>-<disk>.<ext>`.
pub fn volume_name(namespace: &str, vm: &str, disk: &str, format: VolumeFormat) -> String {
    let ext = match format {
        VolumeFormat::Qcow2 => "qcow2",
        VolumeFormat::Raw => "img",
    };
    format!("{namespace}-{vm}-{disk}.{ext}")
}

fn disk_kind(d: &Disk) -> &'static str {
    if d.new.is_some() {
        "new"
    } else if d.clone.is_some() {
        "clone"
    } else if d.overlay.is_some() {
        "overlay"
    } else if d.existing.is_some() {
        "existing"
    } else {
        "cdrom"
    }
}

/// Resolves the VM on `node` (its status.node or the adopted domain's node).
pub fn resolve(
    vm: &VirtualMachine,
    node: &str,
    world: &World,
    user_data: Option<&str>,
) -> Result<Resolved, Blocked> {
    let ns = vm.namespace().unwrap_or_default();
    let name = vm.name_any();
    let uid = vm.uid().unwrap_or_default();
    let adopted = vm.spec.adopt.is_some();
    let domain = vm
        .status
        .as_ref()
        .and_then(|s| s.domain_name.clone())
        .or_else(|| vm.spec.adopt.as_ref().map(|a| a.domain.clone()))
        .unwrap_or_else(|| domain_name(&ns, &name));
    let pool_on_node = |field: &str,
                        obj: &str|
     -> Result<(String, PoolType, Option<RbdSource>, bool), Blocked> {
        let Some(p) = world.pool(&ns, obj) else {
            return Err(blocked(
                "PoolNotFound",
                format!("{field}: there is no StoragePool {ns}/{obj}; create it or fix the name"),
                Some(Duration::from_secs(30)),
            ));
        };
        let running = p.status.as_ref().is_some_and(|s| {
            s.nodes
                .iter()
                .any(|n| n.node == node && n.state == crate::api::storage_pool::PoolState::Running)
        });
        if !running {
            return Err(blocked(
                "PoolNotReady",
                format!("{field}: StoragePool {ns}/{obj} is not running on KvmNode {node} yet"),
                Some(Duration::from_secs(15)),
            ));
        }
        let rbd = (p.spec.type_ == PoolType::Rbd).then(|| {
            let src = p.spec.source.clone().unwrap_or_default();
            (
                src.host.iter().map(|h| (h.clone(), src.port)).collect(),
                src.name.clone().unwrap_or_default(),
            )
        });
        Ok((
            super::super::storage_pool::plan::libvirt_name(p),
            p.spec.type_,
            rbd,
            p.spec.is_shared(),
        ))
    };
    let mut disks = Vec::new();
    for (i, d) in vm.spec.disks.iter().enumerate() {
        let Some(obj) = disk_pool(d) else { continue };
        let field = format!("spec.disks[{i}].{}.pool", disk_kind(d));
        let (pool, pool_type, rbd, shared) = pool_on_node(&field, obj)?;
        let (source, volume) = if let Some(n) = &d.new {
            (
                Source::New {
                    capacity: n.size.bytes(),
                    format: n.format,
                },
                volume_name(&ns, &name, &d.name, n.format),
            )
        } else if let Some(c) = &d.clone {
            let in_use = volume_taken_by(vm, Use::Copy, world, node, obj, &c.template).map(
                |(other, its, how)| {
                    format!(
                        "spec.disks[{i}].clone: template {:?} of StoragePool {ns}/{obj} cannot be copied now: {other} {how} ({its})",
                        c.template
                    )
                },
            );
            (
                Source::Clone {
                    template: c.template.clone(),
                    capacity: c.size.as_ref().map(|s| s.bytes()),
                    format: c.format,
                    in_use,
                },
                volume_name(&ns, &name, &d.name, c.format),
            )
        } else if let Some(o) = &d.overlay {
            if let Some((other, its, how)) =
                volume_taken_by(vm, Use::Base, world, node, obj, &o.base)
            {
                return Err(blocked(
                    "VolumeInUse",
                    format!(
                        "spec.disks[{i}].overlay: base {:?} of StoragePool {ns}/{obj} is written by another guest: {other} {how} ({its}); an overlay needs a base that never changes. Build it on a template no VM writes, or clone the volume instead",
                        o.base
                    ),
                    Some(Duration::from_secs(60)),
                ));
            }
            (
                Source::Overlay {
                    base: o.base.clone(),
                    capacity: o.size.as_ref().map(|s| s.bytes()),
                },
                volume_name(&ns, &name, &d.name, VolumeFormat::Qcow2),
            )
        } else if let Some(e) = &d.existing {
            if let Some((other, its, how)) =
                volume_taken_by(vm, Use::Attach, world, node, obj, &e.volume)
            {
                return Err(blocked(
                    "VolumeInUse",
                    format!(
                        "spec.disks[{i}].existing: volume {:?} of StoragePool {ns}/{obj} is taken: {other} {how} ({its}); two guests writing to one volume corrupt it. Give this VM a volume of its own (new, or clone/overlay to start from a copy), or remove the volume from {other} first",
                        e.volume
                    ),
                    Some(Duration::from_secs(60)),
                ));
            }
            (Source::Existing, e.volume.clone())
        } else if let Some(c) = &d.cdrom {
            (Source::Cdrom, c.volume.clone())
        } else {
            continue;
        };
        if volume.len() > 255 {
            return Err(blocked(
                "InvalidSpec",
                format!(
                    "spec.disks[{i}]: the volume name {volume:?} would be longer than 255 characters; use a shorter VM, namespace or disk name"
                ),
                None,
            ));
        }
        // `<namespace>-<vm>-<disk>` can come out the same for two VMs ("web" + "data-1" and
        // "web-data" + "1"): the second would find the first one's volume made and use it
        if source.created_by_us()
            && let Some((w, j, _)) = disks_beside(vm, world, node, obj, &volume)
                .into_iter()
                .find(|(w, _, x)| {
                    is_created_volume(
                        w.metadata.namespace.as_deref().unwrap_or_default(),
                        w.metadata.name.as_deref().unwrap_or_default(),
                        x,
                        &volume,
                    ) && goes_before(w, vm)
                })
        {
            return Err(blocked(
                "VolumeNameClash",
                format!(
                    "spec.disks[{i}].{}: its volume would be named {volume:?} (<namespace>-<vm>-<disk>), the name of {}'s spec.disks[{j}] volume; rename this disk (or the VM) so the two do not share one volume",
                    disk_kind(d),
                    crate::controller::describe(w)
                ),
                None,
            ));
        }
        let bus = d.bus.unwrap_or(if d.cdrom.is_some() {
            crate::api::virtual_machine::DiskBus::Sata
        } else {
            crate::api::virtual_machine::DiskBus::Virtio
        });
        disks.push(DiskRef {
            name: d.name.clone(),
            pool,
            pool_type,
            shared,
            rbd,
            volume,
            source,
            bus,
        });
    }
    let mut seed = None;
    if let Some(ci) = &vm.spec.cloud_init {
        if vm.spec.disks.iter().any(|d| d.name == SEED_DEVICE) {
            return Err(blocked(
                "InvalidSpec",
                format!(
                    "spec.disks: the name {SEED_DEVICE:?} is taken by the cloud-init seed; rename that disk"
                ),
                None,
            ));
        }
        let obj = ci
            .pool
            .as_deref()
            .or_else(|| vm.spec.disks.iter().find_map(disk_pool));
        let Some(obj) = obj else {
            return Err(blocked(
                "InvalidSpec",
                "spec.cloudInit.pool: is required when the VM has no disk in a pool".into(),
                None,
            ));
        };
        let (pool, pool_type, _, _) = pool_on_node("spec.cloudInit.pool", obj)?;
        if matches!(pool_type, PoolType::Rbd | PoolType::Iscsi) {
            return Err(blocked(
                "InvalidSpec",
                format!(
                    "spec.cloudInit.pool: StoragePool {obj} is {} and cannot hold the seed image; name a dir, netfs or logical pool",
                    pool_type.as_str()
                ),
                None,
            ));
        }
        let ud = user_data
            .map(str::to_string)
            .or_else(|| ci.user_data.clone())
            .unwrap_or_else(|| "#cloud-config\n".into());
        seed = Some(SeedRef {
            pool,
            pool_type,
            volume: format!("{ns}-{name}-cidata.iso"),
            seed: Seed::new(&uid, &name, &ud, ci.network_data.as_deref()),
        });
    }
    let domain_type = world
        .node(node)
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.hypervisor.as_deref())
        .map(|h| {
            if h.starts_with("kvm") {
                "kvm"
            } else if h == "test" {
                "test"
            } else {
                "qemu"
            }
        })
        .unwrap_or("kvm")
        .to_string();
    Ok(Resolved {
        node: node.to_string(),
        domain,
        adopted,
        owner: Owner::new(&uid, &ns, &name),
        disks,
        seed,
        domain_type,
    })
}

/// One step, in the order they run.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    CreateVolume {
        pool: String,
        name: String,
        capacity: u64,
        format: VolumeFormat,
    },
    CloneVolume {
        pool: String,
        template: String,
        name: String,
        capacity: Option<u64>,
        format: VolumeFormat,
    },
    OverlayVolume {
        pool: String,
        base: String,
        name: String,
        capacity: Option<u64>,
    },
    WriteSeed {
        pool: String,
        name: String,
        seed: Seed,
    },
    /// Define or redefine the domain (persistent definition; a running guest keeps running).
    /// A redefinition keeps the domain's UUID.
    Define {
        plan: Box<DomainPlan>,
        uuid: Option<String>,
    },
    /// Stamp an existing domain as ours (adoption; no restart).
    Stamp(Owner),
    /// Persistent vCPUs / memory of an adopted domain.
    SetConfigResources {
        vcpus: Option<u32>,
        memory_kib: Option<u64>,
    },
    AttachConfig(Device),
    DetachConfig(Device),
    AttachLive(Device),
    DetachLive(Device),
    Start,
    /// Start again after a crash (counted in status.restartCount).
    Restart,
    Shutdown,
    Suspend,
    Resume,
}

impl Step {
    pub fn is_provisioning(&self) -> bool {
        matches!(
            self,
            Step::CreateVolume { .. }
                | Step::CloneVolume { .. }
                | Step::OverlayVolume { .. }
                | Step::WriteSeed { .. }
        )
    }
}

/// The plan for one round.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Differences found (and corrected by the steps, or waiting for a restart).
    pub drift: Vec<Drift>,
    /// Changes that apply at the next restart, described.
    pub restart_pending: Vec<String>,
    pub blocked: Option<Blocked>,
    /// Look again after this long (restart backoff, a guest shutting down).
    pub wait: Option<Duration>,
}

fn backing(d: &DiskRef, info: &VolumeInfo) -> DiskBacking {
    match d.pool_type {
        PoolType::Dir | PoolType::Netfs => DiskBacking::File(info.path.clone()),
        PoolType::Logical | PoolType::Iscsi => DiskBacking::Block(info.path.clone()),
        PoolType::Rbd => {
            let (hosts, rados) = d.rbd.clone().unwrap_or_default();
            DiskBacking::Network {
                protocol: "rbd".into(),
                name: format!("{rados}/{}", d.volume),
                hosts,
            }
        }
    }
}

/// Restart backoff after a crash: 10 s doubling per restart, at most 5 minutes.
pub fn restart_backoff(restarts: u32) -> Duration {
    Duration::from_secs((10u64 << restarts.min(5)).min(300))
}

/// The domain plan for a managed (not adopted) VM, once every volume exists.
pub fn domain_plan(vm: &VirtualMachine, r: &Resolved, observed: &Observed) -> Option<DomainPlan> {
    let mut disks = Vec::new();
    for d in &r.disks {
        let info = observed
            .volumes
            .get(&(d.pool.clone(), d.volume.clone()))
            .cloned()
            .flatten()?;
        let format = match &d.source {
            Source::New { format, .. } | Source::Clone { format, .. } => match format {
                VolumeFormat::Qcow2 => "qcow2",
                VolumeFormat::Raw => "raw",
            },
            Source::Overlay { .. } => "qcow2",
            // existing volumes: qcow2 by extension, raw otherwise (libvirt does not probe)
            Source::Existing | Source::Cdrom => {
                if d.volume.ends_with(".qcow2") {
                    "qcow2"
                } else {
                    "raw"
                }
            }
        };
        disks.push(PlannedDisk {
            name: d.name.clone(),
            bus: d.bus,
            cdrom: d.source == Source::Cdrom,
            backing: backing(d, &info),
            format: format.into(),
            readonly: d.source == Source::Cdrom,
        });
    }
    if let Some(s) = &r.seed {
        let info = observed
            .volumes
            .get(&(s.pool.clone(), s.volume.clone()))
            .cloned()
            .flatten()?;
        let d = DiskRef {
            name: SEED_DEVICE.into(),
            pool: s.pool.clone(),
            pool_type: s.pool_type,
            shared: false,
            rbd: None,
            volume: s.volume.clone(),
            source: Source::Cdrom,
            bus: crate::api::virtual_machine::DiskBus::Sata,
        };
        disks.push(PlannedDisk {
            name: SEED_DEVICE.into(),
            bus: d.bus,
            cdrom: true,
            backing: backing(&d, &info),
            format: "raw".into(),
            readonly: true,
        });
    }
    // NICs without a MAC in the spec keep the one libvirt gave them
    let have: BTreeMap<String, Option<String>> = observed
        .domain
        .as_ref()
        .map(|o| {
            ObservedVm::from_xml(&o.persistent)
                .nics
                .into_iter()
                .map(|(k, v)| (k, v.mac))
                .collect()
        })
        .unwrap_or_default();
    let nics = vm
        .spec
        .nics
        .iter()
        .map(|n| PlannedNic {
            name: n.name.clone(),
            source: match (&n.bridge, &n.network) {
                (Some(b), _) => NicSource::Bridge(b.clone()),
                (None, Some(w)) => NicSource::Network(w.clone()),
                (None, None) => NicSource::Network("default".into()),
            },
            model: n.model,
            mac: n
                .mac
                .clone()
                .map(|m| m.to_ascii_lowercase())
                .or_else(|| have.get(&n.name).cloned().flatten())
                // a domain defined again (after a failover, or lost) keeps the MACs it had
                .or_else(|| {
                    vm.status
                        .as_ref()
                        .and_then(|s| s.macs.get(&n.name).cloned())
                }),
        })
        .collect();
    let vcpus = vm.spec.vcpus.unwrap_or(1);
    Some(DomainPlan {
        name: r.domain.clone(),
        owner: r.owner.clone(),
        domain_type: r.domain_type.clone(),
        vcpus,
        memory_kib: vm.spec.memory.as_ref().map_or(0, |m| m.bytes() / 1024),
        topology: vm
            .spec
            .topology
            .as_ref()
            .map(|t| (t.sockets, t.cores, t.threads)),
        cpu_mode: vm.spec.cpu_mode,
        disks,
        nics,
        boot_order: vm.spec.boot_order.clone(),
        vnc: vm.spec.console.vnc,
        serial: vm.spec.console.serial,
    })
}

/// What the user set, for an adopted domain (unset fields follow the domain).
fn adopted_desired(vm: &VirtualMachine, plan: Option<&DomainPlan>) -> DesiredVm {
    let full = plan.map(DesiredVm::from).unwrap_or_default();
    DesiredVm {
        vcpus: vm.spec.vcpus,
        memory_kib: vm.spec.memory.as_ref().map(|m| m.bytes() / 1024),
        disks: if vm.spec.disks.is_empty() {
            None
        } else {
            full.disks
        },
        nics: if vm.spec.nics.is_empty() {
            None
        } else {
            full.nics
        },
    }
}

fn describe_drift(d: &Drift) -> String {
    match d {
        Drift::Vcpus { want, have } => format!("vCPUs {have} → {want}"),
        Drift::Memory { want_kib, have_kib } => format!(
            "memory {} → {} MiB",
            have_kib.map_or("?".into(), |k| (k / 1024).to_string()),
            want_kib / 1024
        ),
        Drift::MissingDisk(n) => format!("disk {n} missing"),
        Drift::ExtraDisk(n) => format!("disk {n} not in the spec"),
        Drift::DiskBacking { name } => format!("disk {name} has another volume"),
        Drift::MissingNic(n) => format!("NIC {n} missing"),
        Drift::ExtraNic(n) => format!("NIC {n} not in the spec"),
        Drift::NicSource { name } => format!("NIC {name} is on another bridge or network"),
        Drift::NicMac { name, want, have } => {
            format!("NIC {name} MAC {} → {want}", have.as_deref().unwrap_or("?"))
        }
    }
}

/// Describes drift items for conditions and Events.
pub fn drift_text(d: &[Drift]) -> String {
    d.iter().map(describe_drift).collect::<Vec<_>>().join(", ")
}

/// Steps that bring the running guest to `desired` (hot-plug), and what must wait for a restart.
fn live_steps(
    desired: &DesiredVm,
    plan: Option<&DomainPlan>,
    live: &crate::hypervisor::domain_xml::DomainXml,
    out: &mut Plan,
) {
    let observed = ObservedVm::from_xml(live);
    let mut used: BTreeSet<String> = observed.disks.values().map(|d| d.target.clone()).collect();
    for d in domain_spec::drift(desired, &observed) {
        match &d {
            Drift::MissingDisk(n) => {
                if let Some(pd) = plan.and_then(|p| p.disks.iter().find(|x| &x.name == n)) {
                    let dev = domain_spec::hotplug_disk(pd, &used);
                    if let Device::Disk(x) = &dev {
                        used.insert(x.target.dev.clone());
                    }
                    out.steps.push(Step::AttachLive(dev));
                }
            }
            Drift::MissingNic(n) => {
                if let Some(pn) = plan.and_then(|p| p.nics.iter().find(|x| &x.name == n)) {
                    out.steps
                        .push(Step::AttachLive(domain_spec::hotplug_nic(pn)));
                }
            }
            Drift::ExtraDisk(n) | Drift::ExtraNic(n) => {
                if let Some(dev) = domain_spec::device_named(live, n) {
                    out.steps.push(Step::DetachLive(dev));
                }
            }
            _ => out.restart_pending.push(describe_drift(&d)),
        }
    }
}

/// The first of `holders` (the node's domains with a volume as a writable disk) that is not
/// this VM's own, and running when `running_only`, described for a message.
fn held_by(
    holders: Option<&Vec<crate::hypervisor::DiskHolder>>,
    r: &Resolved,
    running_only: bool,
) -> Option<String> {
    let h = holders?.iter().find(|h| {
        h.owner.as_ref().is_none_or(|o| o.uid != r.owner.uid)
            && (h.active || h.unreadable || !running_only)
    })?;
    if h.domain.is_empty() {
        return Some(format!(
            "a domain of KvmNode {} as far as can be told (that node sees the same pool and cannot be read to rule it out)",
            h.node
        ));
    }
    let state = if h.unreadable {
        "its definition could not be read to rule it out"
    } else if h.active {
        "running"
    } else {
        "defined, not running"
    };
    let whose = h.owner.as_ref().map_or_else(
        || ", not managed by this operator".to_string(),
        |o| format!(", managed by VirtualMachine {}/{}", o.namespace, o.name),
    );
    Some(format!(
        "domain {:?} on KvmNode {} ({state}{whose})",
        h.domain, h.node
    ))
}

/// `spec.disks[i].<kind>` of the spec disk named `name`.
fn disk_field(vm: &VirtualMachine, name: &str) -> String {
    vm.spec
        .disks
        .iter()
        .position(|d| d.name == name)
        .map_or_else(
            || format!("disk {name}"),
            |i| format!("spec.disks[{i}].{}", disk_kind(&vm.spec.disks[i])),
        )
}

/// The steps for one round. `restarts` and `last_restart` come from status; `now` is the clock.
pub fn plan(vm: &VirtualMachine, r: &Resolved, observed: &Observed, now: &Time) -> Plan {
    let mut p = Plan::default();
    // 0. a volume it is about to attach, or build an overlay on, must not be another domain's
    // disk (observe reads the node's domains only for such volumes: before the domain is
    // defined, or for a disk it does not have yet)
    for d in &r.disks {
        let (what, key, hint) = match &d.source {
            Source::Existing => (
                format!("volume {:?}", d.volume),
                (d.pool.clone(), d.volume.clone()),
                "two guests writing to one volume corrupt it. Adopt that domain instead (spec.adopt), or give this VM a volume of its own",
            ),
            Source::Overlay { base, .. } => (
                format!("base {base:?}"),
                (d.pool.clone(), base.clone()),
                "an overlay needs a base that never changes. Build it on a template no guest writes, or clone the volume instead",
            ),
            _ => continue,
        };
        if let Some(who) = held_by(observed.holders.get(&key), r, false) {
            p.blocked = Some(blocked(
                "VolumeInUse",
                format!(
                    "{}: {what} in pool {:?} is a writable disk of {who}; {hint}",
                    disk_field(vm, &d.name),
                    d.pool
                ),
                Some(Duration::from_secs(60)),
            ));
            return p;
        }
    }
    // 1. volumes and seed
    for d in &r.disks {
        let present = observed
            .volumes
            .get(&(d.pool.clone(), d.volume.clone()))
            .is_some_and(Option::is_some);
        if present {
            continue;
        }
        match &d.source {
            Source::New { capacity, format } => p.steps.push(Step::CreateVolume {
                pool: d.pool.clone(),
                name: d.volume.clone(),
                capacity: *capacity,
                format: *format,
            }),
            Source::Clone {
                in_use: Some(why), ..
            } => {
                p.blocked = Some(blocked(
                    "VolumeInUse",
                    why.clone(),
                    Some(Duration::from_secs(30)),
                ));
                return p;
            }
            Source::Clone { template, .. }
                if let Some(who) = held_by(
                    observed.holders.get(&(d.pool.clone(), template.clone())),
                    r,
                    true,
                ) =>
            {
                p.blocked = Some(blocked(
                    "VolumeInUse",
                    format!(
                        "{}: template {template:?} in pool {:?} is a disk of {who}: a copy of a disk being written is torn. Stop that guest until the copy is made, or clone from a template no guest runs on",
                        disk_field(vm, &d.name),
                        d.pool
                    ),
                    Some(Duration::from_secs(30)),
                ));
                return p;
            }
            Source::Clone {
                template,
                capacity,
                format,
                in_use: None,
            } => p.steps.push(Step::CloneVolume {
                pool: d.pool.clone(),
                template: template.clone(),
                name: d.volume.clone(),
                capacity: *capacity,
                format: *format,
            }),
            Source::Overlay { base, capacity } => p.steps.push(Step::OverlayVolume {
                pool: d.pool.clone(),
                base: base.clone(),
                name: d.volume.clone(),
                capacity: *capacity,
            }),
            Source::Existing | Source::Cdrom => {
                p.blocked = Some(blocked(
                    "VolumeNotFound",
                    format!(
                        "disk {}: volume {:?} does not exist in pool {:?} on KvmNode {}; create it or fix the spec",
                        d.name, d.volume, d.pool, r.node
                    ),
                    Some(Duration::from_secs(60)),
                ));
                return p;
            }
        }
    }
    if let Some(s) = &r.seed {
        let present = observed
            .volumes
            .get(&(s.pool.clone(), s.volume.clone()))
            .is_some_and(Option::is_some);
        if !present {
            p.steps.push(Step::WriteSeed {
                pool: s.pool.clone(),
                name: s.volume.clone(),
                seed: s.seed.clone(),
            });
        }
    }
    if !p.steps.is_empty() {
        // the domain needs the volumes' paths: define it in the next round
        return p;
    }
    let plan = domain_plan(vm, r, observed);
    // 2. the domain
    let Some(dom) = &observed.domain else {
        if r.adopted {
            p.blocked = Some(blocked(
                "DomainNotFound",
                format!(
                    "spec.adopt.domain: there is no domain {:?} on KvmNode {}; check the name in the node's status.unmanagedDomains",
                    r.domain, r.node
                ),
                Some(Duration::from_secs(60)),
            ));
            return p;
        }
        let Some(plan) = plan else { return p };
        p.steps.push(Step::Define {
            plan: Box::new(plan),
            uuid: None,
        });
        power(vm, None, &mut p, now);
        return p;
    };
    match dom.persistent.owner() {
        Some(o) if o.uid == r.owner.uid => {}
        Some(o) => {
            p.blocked = Some(blocked(
                "DomainOwnedElsewhere",
                format!(
                    "domain {:?} on KvmNode {} belongs to VirtualMachine {}/{} (uid {}); it is left alone. Pick another name or delete the other object",
                    r.domain, r.node, o.namespace, o.name, o.uid
                ),
                Some(Duration::from_secs(60)),
            ));
            return p;
        }
        None if r.adopted => p.steps.push(Step::Stamp(r.owner.clone())),
        None => {
            p.blocked = Some(blocked(
                "DomainExists",
                format!(
                    "a domain named {:?} already exists on KvmNode {} and is not managed by the operator; it is left alone. To take it over, use spec.adopt",
                    r.domain, r.node
                ),
                Some(Duration::from_secs(60)),
            ));
            return p;
        }
    }
    // 3. drift of the persistent definition
    let persistent = ObservedVm::from_xml(&dom.persistent);
    let desired = if r.adopted {
        adopted_desired(vm, plan.as_ref())
    } else {
        plan.as_ref().map(DesiredVm::from).unwrap_or_default()
    };
    let drift = domain_spec::drift(&desired, &persistent);
    if !drift.is_empty() {
        if r.adopted {
            let vcpus = drift.iter().find_map(|d| match d {
                Drift::Vcpus { want, .. } => Some(*want),
                _ => None,
            });
            let memory_kib = drift.iter().find_map(|d| match d {
                Drift::Memory { want_kib, .. } => Some(*want_kib),
                _ => None,
            });
            if vcpus.is_some() || memory_kib.is_some() {
                p.steps.push(Step::SetConfigResources { vcpus, memory_kib });
            }
            let mut used: BTreeSet<String> = persistent
                .disks
                .values()
                .map(|d| d.target.clone())
                .collect();
            for d in &drift {
                match d {
                    Drift::MissingDisk(n) => {
                        if let Some(pd) = plan
                            .as_ref()
                            .and_then(|x| x.disks.iter().find(|y| &y.name == n))
                        {
                            let dev = domain_spec::hotplug_disk(pd, &used);
                            if let Device::Disk(x) = &dev {
                                used.insert(x.target.dev.clone());
                            }
                            p.steps.push(Step::AttachConfig(dev));
                        }
                    }
                    Drift::MissingNic(n) => {
                        if let Some(pn) = plan
                            .as_ref()
                            .and_then(|x| x.nics.iter().find(|y| &y.name == n))
                        {
                            p.steps
                                .push(Step::AttachConfig(domain_spec::hotplug_nic(pn)));
                        }
                    }
                    Drift::ExtraDisk(n) | Drift::ExtraNic(n) => {
                        if let Some(dev) = domain_spec::device_named(&dom.persistent, n) {
                            p.steps.push(Step::DetachConfig(dev));
                        }
                    }
                    _ => {}
                }
            }
        } else if let Some(plan) = &plan {
            let mut plan = plan.clone();
            plan.name = r.domain.clone();
            p.steps.push(Step::Define {
                plan: Box::new(plan),
                uuid: dom.uuid.clone(),
            });
        }
        p.drift = drift;
    }
    // 4. the running guest: hot-plug what can be, report what waits for a restart. After a
    // redefinition, the next round does this against the new definition (so a hot-plugged NIC
    // gets the MAC address the definition gave it).
    let redefining = p.steps.iter().any(|s| matches!(s, Step::Define { .. }));
    if let Some(live) = &dom.live
        && !redefining
    {
        let mut desired = desired.clone();
        if let Some(nics) = desired.nics.as_mut() {
            for (name, n) in nics.iter_mut() {
                if n.mac.is_none() {
                    n.mac = persistent.nics.get(name).and_then(|o| o.mac.clone());
                }
            }
        }
        live_steps(&desired, plan.as_ref(), live, &mut p);
    }
    // 5. power
    power(vm, Some(dom), &mut p, now);
    p
}

/// Steps that drive the domain to the run strategy.
fn power(vm: &VirtualMachine, dom: Option<&DomainObs>, p: &mut Plan, now: &Time) {
    let strategy = vm.spec.run_strategy;
    let Some(dom) = dom else {
        // just defined: it is off
        match strategy {
            RunStrategy::Running | RunStrategy::RerunOnFailure => p.steps.push(Step::Start),
            RunStrategy::Paused => {
                p.steps.push(Step::Start);
                p.steps.push(Step::Suspend);
            }
            RunStrategy::Stopped => {}
        }
        return;
    };
    let st = dom.state;
    let restarts = vm
        .status
        .as_ref()
        .and_then(|s| s.restart_count)
        .unwrap_or(0);
    let last = vm.status.as_ref().and_then(|s| s.last_restart_time.clone());
    let restart = |p: &mut Plan| {
        let wait = restart_backoff(restarts);
        let since = last
            .as_ref()
            .map(|t| now.0.duration_since(t.0))
            .and_then(|d| Duration::try_from(d).ok());
        match since {
            Some(s) if s < wait => p.wait = Some(wait - s),
            _ => p.steps.push(Step::Restart),
        }
    };
    match (strategy, st.state) {
        (
            RunStrategy::Stopped,
            DomainState::Running | DomainState::Paused | DomainState::ShuttingDown,
        ) => p.steps.push(Step::Shutdown),
        (RunStrategy::Stopped, _) => {}
        (_, DomainState::ShuttingDown) => p.wait = Some(Duration::from_secs(5)),
        (RunStrategy::Paused, DomainState::Running) => p.steps.push(Step::Suspend),
        (RunStrategy::Paused, DomainState::Paused) => {}
        (RunStrategy::Running | RunStrategy::RerunOnFailure, DomainState::Paused) => {
            p.steps.push(Step::Resume)
        }
        (_, DomainState::Running) => {}
        (_, DomainState::Crashed) => restart(p),
        (_, DomainState::Shutoff) if st.crashed => restart(p),
        (RunStrategy::RerunOnFailure, DomainState::Shutoff) if !st.never_started => {
            // the guest shut itself down (or someone stopped it): leave it off
        }
        (RunStrategy::Paused, _) => {
            p.steps.push(Step::Start);
            p.steps.push(Step::Suspend);
        }
        (_, _) => p.steps.push(Step::Start),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::api::StoragePool;
    use crate::hypervisor::StateDetail;
    use crate::hypervisor::storage::VolumeInfo;

    fn vm(spec: serde_json::Value) -> VirtualMachine {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": "web", "namespace": "prod", "uid": "uid-1", "generation": 1},
            "spec": spec,
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn world() -> World {
        let pool: StoragePool = serde_json::from_value(serde_json::json!({
            "apiVersion": "kvm-operator.io/v1alpha1", "kind": "StoragePool",
            "metadata": {"name": "images", "namespace": "prod"},
            "spec": {"nodeName": "n1", "type": "dir", "targetPath": "/var/lib/libvirt/images"},
            "status": {"nodes": [{"node": "n1", "state": "Running"}]},
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        World {
            pools: vec![Arc::new(pool)],
            ..World::default()
        }
    }

    fn basic(extra: serde_json::Value) -> VirtualMachine {
        let mut spec = serde_json::json!({
            "vcpus": 2, "memory": "1Gi",
            "disks": [{"name": "root", "new": {"pool": "images", "size": "10Gi"}}],
            "nics": [{"name": "net0", "bridge": "br0"}],
        });
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                s.insert(k.clone(), v.clone());
            }
        }
        vm(spec)
    }

    fn resolved(v: &VirtualMachine) -> Resolved {
        resolve(v, "n1", &world(), None).unwrap_or_else(|b| panic!("{b:?}"))
    }

    fn now() -> Time {
        crate::controller::now()
    }

    fn vol(pool: &str, name: &str) -> ((String, String), Option<VolumeInfo>) {
        (
            (pool.into(), name.into()),
            Some(VolumeInfo {
                name: name.into(),
                path: format!("/var/lib/libvirt/images/{name}"),
                capacity: 1 << 30,
                allocation: 0,
            }),
        )
    }

    /// What the node has once the VM is provisioned exactly as planned, in `state`.
    fn provisioned(v: &VirtualMachine, r: &Resolved, state: DomainState) -> Observed {
        let mut o = Observed::default();
        for d in &r.disks {
            o.volumes.extend([vol(&d.pool, &d.volume)]);
        }
        if let Some(s) = &r.seed {
            o.volumes.extend([vol(&s.pool, &s.volume)]);
        }
        let mut x = domain_plan(v, r, &o)
            .unwrap_or_else(|| panic!("volumes present"))
            .to_xml();
        x.uuid = Some("u-1".into());
        for (i, n) in x.devices.interface.iter_mut().enumerate() {
            n.mac.get_or_insert(crate::hypervisor::domain_xml::Mac {
                address: format!("52:54:00:00:00:0{i}"),
            });
        }
        o.domain = Some(DomainObs {
            uuid: Some("u-1".into()),
            state: StateDetail {
                state,
                crashed: false,
                never_started: false,
                guest_shutdown: false,
            },
            live: (state != DomainState::Shutoff).then(|| x.clone()),
            persistent: x,
            persistent_sha256: "d1".into(),
            persistent_text: "<domain/>".into(),
            ips: None,
        });
        o
    }

    fn kinds(p: &Plan) -> Vec<&'static str> {
        p.steps
            .iter()
            .map(|s| match s {
                Step::CreateVolume { .. } => "CreateVolume",
                Step::CloneVolume { .. } => "CloneVolume",
                Step::OverlayVolume { .. } => "OverlayVolume",
                Step::WriteSeed { .. } => "WriteSeed",
                Step::Define { .. } => "Define",
                Step::Stamp(_) => "Stamp",
                Step::SetConfigResources { .. } => "SetConfigResources",
                Step::AttachConfig(_) => "AttachConfig",
                Step::DetachConfig(_) => "DetachConfig",
                Step::AttachLive(_) => "AttachLive",
                Step::DetachLive(_) => "DetachLive",
                Step::Start => "Start",
                Step::Restart => "Restart",
                Step::Shutdown => "Shutdown",
                Step::Suspend => "Suspend",
                Step::Resume => "Resume",
            })
            .collect()
    }

    #[test]
    fn volumes_and_seed_come_first_and_the_domain_waits_for_their_paths() {
        let v = vm(serde_json::json!({
            "vcpus": 1, "memory": "512Mi",
            "disks": [
                {"name": "root", "clone": {"pool": "images", "template": "debian.qcow2"}},
                {"name": "data", "new": {"pool": "images", "size": "1Gi", "format": "raw"}},
                {"name": "scratch", "overlay": {"pool": "images", "base": "base.qcow2"}},
            ],
            "cloudInit": {"userData": "#cloud-config\n"},
        }));
        let r = resolved(&v);
        assert_eq!(r.domain, "prod_web");
        assert_eq!(r.disks[1].volume, "prod-web-data.img");
        let p = plan(&v, &r, &Observed::default(), &now());
        assert_eq!(
            kinds(&p),
            ["CloneVolume", "CreateVolume", "OverlayVolume", "WriteSeed"]
        );
        // once they exist: define, then start
        let mut o = Observed::default();
        for d in &r.disks {
            o.volumes.extend([vol(&d.pool, &d.volume)]);
        }
        o.volumes.extend([vol("images", "prod-web-cidata.iso")]);
        let p = plan(&v, &r, &o, &now());
        assert_eq!(kinds(&p), ["Define", "Start"]);
        let Step::Define { plan: dp, uuid } = &p.steps[0] else {
            panic!()
        };
        assert_eq!(uuid, &None);
        assert_eq!(dp.disks.len(), 4, "three disks and the seed");
        assert_eq!(dp.disks[3].name, SEED_DEVICE);
        assert_eq!(dp.owner.uid, "uid-1");
    }

    #[test]
    fn missing_pools_and_volumes_block_with_the_field_and_the_fix() {
        let v = basic(
            serde_json::json!({"disks": [{"name": "root", "new": {"pool": "nope", "size": "1Gi"}}]}),
        );
        let b = resolve(&v, "n1", &world(), None).unwrap_err();
        assert_eq!(b.reason, "PoolNotFound");
        assert!(
            b.message.starts_with("spec.disks[0].new.pool"),
            "{}",
            b.message
        );
        let b = resolve(&basic(serde_json::json!({})), "n2", &world(), None).unwrap_err();
        assert_eq!(b.reason, "PoolNotReady");
        let v = basic(
            serde_json::json!({"disks": [{"name": "iso", "cdrom": {"pool": "images", "volume": "debian.iso"}}]}),
        );
        let p = plan(&v, &resolved(&v), &Observed::default(), &now());
        let b = p.blocked.unwrap_or_else(|| panic!("blocked"));
        assert_eq!(b.reason, "VolumeNotFound");
        assert!(b.message.contains("debian.iso") && b.message.contains("n1"));
        assert!(p.steps.is_empty());
        let v = basic(
            serde_json::json!({"cloudInit": {}, "disks": [{"name": "cidata", "new": {"pool": "images", "size": "1Gi"}}]}),
        );
        assert_eq!(
            resolve(&v, "n1", &world(), None).unwrap_err().reason,
            "InvalidSpec"
        );
    }

    /// A VM named `name` in `ns`, with `disks`, on `node` (None: not placed), its domain
    /// defined when `defined`.
    fn other(
        ns: &str,
        name: &str,
        disks: serde_json::Value,
        node: Option<&str>,
        defined: bool,
    ) -> Arc<VirtualMachine> {
        let mut status = serde_json::json!({});
        if let Some(n) = node {
            status["node"] = n.into();
        }
        if defined {
            status["domainUuid"] = format!("uuid-{name}").into();
        }
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
                "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "generation": 1},
                "spec": {"vcpus": 1, "memory": "1Gi", "disks": disks},
                "status": status,
            }))
            .unwrap_or_else(|e| panic!("{e}")),
        )
    }

    #[test]
    fn the_created_volume_name_is_recognised_without_being_built() {
        let disks: Vec<Disk> = serde_json::from_value(serde_json::json!([
            {"name": "root", "new": {"pool": "p", "size": "1Gi"}},
            {"name": "raw", "new": {"pool": "p", "size": "1Gi", "format": "raw"}},
            {"name": "c", "clone": {"pool": "p", "template": "t.qcow2", "format": "raw"}},
            {"name": "o", "overlay": {"pool": "p", "base": "b.qcow2"}},
            {"name": "x", "existing": {"pool": "p", "volume": "prod-web-x.qcow2"}},
        ]))
        .unwrap_or_else(|e| panic!("{e}"));
        for d in &disks {
            for (ns, vm) in [("prod", "web"), ("prod-web", "data"), ("a", "b-c")] {
                match created_volume(ns, vm, d) {
                    Some(v) => {
                        assert!(is_created_volume(ns, vm, d, &v), "{v}");
                        for other in [format!("{v}x"), format!("x{v}"), v.replace('.', "-")] {
                            assert!(!is_created_volume(ns, vm, d, &other), "{other}");
                        }
                    }
                    None => assert!(!is_created_volume(ns, vm, d, "prod-web-x.qcow2")),
                }
            }
        }
    }

    #[test]
    fn a_volume_another_domain_of_the_node_writes_is_not_attached_built_on_or_copied_while_it_runs()
    {
        use crate::hypervisor::DiskHolder;
        let holder = |domain: &str, active: bool, uid: Option<&str>| DiskHolder {
            node: "n1".into(),
            domain: domain.into(),
            active,
            owner: uid.map(|u| Owner {
                xmlns: crate::hypervisor::domain_xml::OWNER_NS.into(),
                uid: u.into(),
                namespace: "prod".into(),
                name: "other".into(),
            }),
            unreadable: false,
        };
        let held = |r: &Resolved, pool_vol: (&str, &str), h: Vec<DiskHolder>| Observed {
            volumes: r
                .disks
                .iter()
                .filter(|d| !matches!(d.source, Source::Clone { .. }))
                .map(|d| vol(&d.pool, &d.volume))
                .collect(),
            holders: [((pool_vol.0.to_string(), pool_vol.1.to_string()), h)]
                .into_iter()
                .collect(),
            ..Observed::default()
        };
        let attach = basic(serde_json::json!({"disks": [
            {"name": "root", "new": {"pool": "images", "size": "1Gi"}},
            {"name": "data", "existing": {"pool": "images", "volume": "db.qcow2"}},
        ]}));
        let r = resolved(&attach);
        let pool = r.disks[1].pool.clone();
        // an unmanaged domain, even stopped, has it: nothing is made, and the message says
        // which domain and how to take it over instead
        let p = plan(
            &attach,
            &r,
            &held(
                &r,
                (&pool, "db.qcow2"),
                vec![holder("legacy-db", false, None)],
            ),
            &now(),
        );
        let b = p.blocked.clone().unwrap_or_else(|| panic!("blocked"));
        assert_eq!(b.reason, "VolumeInUse");
        for part in [
            "spec.disks[1].existing",
            "\"legacy-db\"",
            "defined, not running",
            "not managed by this operator",
            "spec.adopt",
        ] {
            assert!(b.message.contains(part), "{part}: {}", b.message);
        }
        assert!(p.steps.is_empty(), "{:?}", kinds(&p));
        // ... before any of its volumes is made
        let bare = Observed {
            holders: held(
                &r,
                (&pool, "db.qcow2"),
                vec![holder("legacy-db", false, None)],
            )
            .holders,
            ..Observed::default()
        };
        let p = plan(&attach, &r, &bare, &now());
        assert_eq!(p.blocked.as_ref().map(|b| b.reason), Some("VolumeInUse"));
        assert!(p.steps.is_empty(), "{:?}", kinds(&p));
        // a node that sees the same shared pool and cannot be read cannot be ruled out
        let unread = crate::hypervisor::DiskHolder {
            node: "n2".into(),
            domain: String::new(),
            active: true,
            owner: None,
            unreadable: true,
        };
        let p = plan(
            &attach,
            &r,
            &held(&r, (&pool, "db.qcow2"), vec![unread]),
            &now(),
        );
        let b = p.blocked.unwrap_or_else(|| panic!("blocked"));
        assert!(
            b.message
                .contains("a domain of KvmNode n2 as far as can be told"),
            "{}",
            b.message
        );
        // a domain of another VM of ours is named as that VM
        let p = plan(
            &attach,
            &r,
            &held(
                &r,
                (&pool, "db.qcow2"),
                vec![holder("prod_other", true, Some("uid-9"))],
            ),
            &now(),
        );
        let b = p.blocked.unwrap_or_else(|| panic!("blocked"));
        assert!(
            b.message
                .contains("running, managed by VirtualMachine prod/other"),
            "{}",
            b.message
        );
        // its own stamp (a domain of this VM found under another name) is not a conflict
        let p = plan(
            &attach,
            &r,
            &held(
                &r,
                (&pool, "db.qcow2"),
                vec![holder("renamed", false, Some("uid-1"))],
            ),
            &now(),
        );
        assert!(p.blocked.is_none(), "{:?}", p.blocked);
        assert!(kinds(&p).contains(&"Define"));
        // an overlay's base
        let overlay = basic(serde_json::json!({"disks": [
            {"name": "root", "overlay": {"pool": "images", "base": "golden.qcow2"}},
        ]}));
        let r = resolved(&overlay);
        let p = plan(
            &overlay,
            &r,
            &held(
                &r,
                (&pool, "golden.qcow2"),
                vec![holder("builder", false, None)],
            ),
            &now(),
        );
        let b = p.blocked.unwrap_or_else(|| panic!("blocked"));
        assert!(
            b.message
                .starts_with("spec.disks[0].overlay: base \"golden.qcow2\""),
            "{}",
            b.message
        );
        // a clone's template: only a running holder stops the copy
        let copy = basic(serde_json::json!({"disks": [
            {"name": "root", "clone": {"pool": "images", "template": "golden.qcow2"}},
        ]}));
        let r = resolved(&copy);
        let p = plan(
            &copy,
            &r,
            &held(
                &r,
                (&pool, "golden.qcow2"),
                vec![holder("builder", false, None)],
            ),
            &now(),
        );
        assert!(p.blocked.is_none(), "{:?}", p.blocked);
        assert_eq!(kinds(&p).first(), Some(&"CloneVolume"));
        let p = plan(
            &copy,
            &r,
            &held(
                &r,
                (&pool, "golden.qcow2"),
                vec![holder("builder", true, None)],
            ),
            &now(),
        );
        let b = p.blocked.unwrap_or_else(|| panic!("blocked"));
        assert!(
            b.message
                .starts_with("spec.disks[0].clone: template \"golden.qcow2\""),
            "{}",
            b.message
        );
        assert!(b.message.contains("running"), "{}", b.message);
    }

    #[test]
    fn a_volume_another_vm_writes_is_not_attached_built_on_or_copied_while_written() {
        let attach = |volume: &str| {
            basic(serde_json::json!({"disks": [
                {"name": "root", "new": {"pool": "images", "size": "1Gi"}},
                {"name": "data", "existing": {"pool": "images", "volume": volume}},
            ]}))
        };
        let with = |vms: Vec<Arc<VirtualMachine>>| World { vms, ..world() };
        // another VM created it (new, clone or overlay): it is that VM's
        let creator = other(
            "prod",
            "db",
            serde_json::json!([{"name": "data", "new": {"pool": "images", "size": "1Gi"}}]),
            Some("n1"),
            false,
        );
        let b = resolve(
            &attach("prod-db-data.qcow2"),
            "n1",
            &with(vec![creator.clone()]),
            None,
        )
        .unwrap_err();
        assert_eq!(b.reason, "VolumeInUse");
        for part in [
            "spec.disks[1].existing",
            "prod-db-data.qcow2",
            "VirtualMachine prod/db",
            "spec.disks[0].new",
            "creates",
        ] {
            assert!(b.message.contains(part), "{part}: {}", b.message);
        }
        // a node-local pool's volume of that name on another node is another volume
        assert!(
            resolve(
                &attach("prod-db-data.qcow2"),
                "n1",
                &with(vec![other(
                    "prod",
                    "db",
                    serde_json::json!([{"name": "data", "new": {"pool": "images", "size": "1Gi"}}]),
                    Some("n2"),
                    false,
                )]),
                None
            )
            .is_ok()
        );
        // a StoragePool object of another namespace on the same libvirt pool holds the same
        // volumes; one whose libvirt pool is another (poolName) does not
        let dev_pool = |pool_name: Option<&str>| -> Arc<crate::api::StoragePool> {
            let mut p = (*world().pools[0]).clone();
            p.metadata.namespace = Some("dev".into());
            p.spec.pool_name = pool_name.map(Into::into);
            Arc::new(p)
        };
        let dev_db = other(
            "dev",
            "db",
            serde_json::json!([{"name": "data", "new": {"pool": "images", "size": "1Gi"}}]),
            Some("n1"),
            false,
        );
        let mut w = with(vec![dev_db.clone()]);
        w.pools.push(dev_pool(None));
        let b = resolve(&attach("dev-db-data.qcow2"), "n1", &w, None).unwrap_err();
        assert!(
            b.message
                .contains("VirtualMachine dev/db creates and uses it"),
            "{}",
            b.message
        );
        let mut w = with(vec![dev_db]);
        w.pools.push(dev_pool(Some("dev-images")));
        assert!(resolve(&attach("dev-db-data.qcow2"), "n1", &w, None).is_ok());
        // ... and so is one in another namespace, or a VM not placed yet
        for w in [
            other(
                "dev",
                "db",
                serde_json::json!([{"name": "data", "new": {"pool": "images", "size": "1Gi"}}]),
                Some("n1"),
                false,
            ),
            other(
                "prod",
                "db",
                serde_json::json!([{"name": "data", "new": {"pool": "images", "size": "1Gi"}}]),
                None,
                false,
            ),
        ] {
            assert!(resolve(&attach("prod-db-data.qcow2"), "n1", &with(vec![w]), None).is_ok());
        }
        // the base of another VM's overlay
        let overlay = other(
            "prod",
            "app",
            serde_json::json!([{"name": "root", "overlay": {"pool": "images", "base": "golden.qcow2"}}]),
            Some("n1"),
            true,
        );
        let b = resolve(&attach("golden.qcow2"), "n1", &with(vec![overlay]), None).unwrap_err();
        assert!(b.message.contains("base of an overlay"), "{}", b.message);
        // two VMs attaching one existing volume: the one whose domain was defined keeps it,
        // whichever is reconciled; the other is refused
        let holder = other(
            "prod",
            "old",
            serde_json::json!([{"name": "data", "existing": {"pool": "images", "volume": "shared.qcow2"}}]),
            Some("n1"),
            true,
        );
        let b = resolve(
            &attach("shared.qcow2"),
            "n1",
            &with(vec![holder.clone()]),
            None,
        )
        .unwrap_err();
        assert!(
            b.message.contains("VirtualMachine prod/old attaches it"),
            "{}",
            b.message
        );
        let mut newcomer = attach("shared.qcow2");
        newcomer.status = None;
        let w = with(vec![Arc::new(newcomer.clone()), holder.clone()]);
        assert!(
            resolve(&holder, "n1", &w, None).is_ok(),
            "the holder keeps it"
        );
        // neither defined: a deterministic order (here by name), never both
        let (a, z) = (
            other(
                "prod",
                "a",
                serde_json::json!([{"name": "d", "existing": {"pool": "images", "volume": "v.img"}}]),
                Some("n1"),
                false,
            ),
            other(
                "prod",
                "z",
                serde_json::json!([{"name": "d", "existing": {"pool": "images", "volume": "v.img"}}]),
                Some("n1"),
                false,
            ),
        );
        let w = with(vec![a.clone(), z.clone()]);
        assert!(resolve(&a, "n1", &w, None).is_ok());
        assert_eq!(
            resolve(&z, "n1", &w, None).unwrap_err().reason,
            "VolumeInUse"
        );
        // an overlay on another VM's disk, or on a volume another VM attached first
        let overlay_on = |base: &str| {
            basic(serde_json::json!({"disks": [
                {"name": "root", "overlay": {"pool": "images", "base": base}},
            ]}))
        };
        let b = resolve(
            &overlay_on("prod-db-data.qcow2"),
            "n1",
            &with(vec![creator.clone()]),
            None,
        )
        .unwrap_err();
        assert_eq!(b.reason, "VolumeInUse");
        assert!(
            b.message.starts_with("spec.disks[0].overlay"),
            "{}",
            b.message
        );
        assert!(
            resolve(
                &overlay_on("shared.qcow2"),
                "n1",
                &with(vec![holder.clone()]),
                None
            )
            .is_err()
        );
        // ... but an overlay already defined keeps its base against a newcomer attaching it
        let mut built = overlay_on("shared.qcow2");
        built.status = Some(crate::api::VirtualMachineStatus {
            node: Some("n1".into()),
            domain_uuid: Some("uuid-web".into()),
            ..Default::default()
        });
        let mut late = (*holder).clone();
        late.status = Some(crate::api::VirtualMachineStatus {
            node: Some("n1".into()),
            ..Default::default()
        });
        let w = with(vec![Arc::new(built.clone()), Arc::new(late.clone())]);
        assert!(resolve(&built, "n1", &w, None).is_ok());
        let b = resolve(&late, "n1", &w, None).unwrap_err();
        assert!(b.message.contains("base of an overlay"), "{}", b.message);
        // a clone of another VM's disk waits while that guest runs or is meant to, and only
        // until the copy exists
        let copy = basic(serde_json::json!({"disks": [
            {"name": "root", "clone": {"pool": "images", "template": "prod-db-data.qcow2"}},
        ]}));
        let r = resolve(&copy, "n1", &with(vec![creator.clone()]), None)
            .unwrap_or_else(|b| panic!("{b:?}"));
        let p = plan(&copy, &r, &Observed::default(), &now());
        let b = p.blocked.unwrap_or_else(|| panic!("blocked"));
        assert_eq!(b.reason, "VolumeInUse");
        assert!(
            b.message.starts_with("spec.disks[0].clone")
                && b.message.contains("runStrategy to Stopped"),
            "{}",
            b.message
        );
        let made = Observed {
            volumes: [vol(&r.disks[0].pool, &r.disks[0].volume)]
                .into_iter()
                .collect(),
            ..Observed::default()
        };
        assert!(
            plan(&copy, &r, &made, &now()).blocked.is_none(),
            "the copy exists"
        );
        let mut stopped = (*creator).clone();
        stopped.spec.run_strategy = RunStrategy::Stopped;
        if let Some(st) = stopped.status.as_mut() {
            st.power_state = Some(crate::api::virtual_machine::PowerState::Stopped);
        }
        // a VM that would attach it, with no domain defined (refused it), writes nothing
        let refused = other(
            "prod",
            "borrower",
            serde_json::json!([{"name": "d", "existing": {"pool": "images", "volume": "prod-db-data.qcow2"}}]),
            Some("n1"),
            false,
        );
        let r = resolve(&copy, "n1", &with(vec![Arc::new(stopped), refused]), None)
            .unwrap_or_else(|b| panic!("{b:?}"));
        let p = plan(&copy, &r, &Observed::default(), &now());
        assert!(p.blocked.is_none(), "{:?}", p.blocked);
        assert_eq!(kinds(&p).first(), Some(&"CloneVolume"));
        // two VMs whose created volumes come out with the same name: the second is refused
        let (web, web_data) = (
            other(
                "prod",
                "web",
                serde_json::json!([{"name": "data-1", "new": {"pool": "images", "size": "1Gi"}}]),
                Some("n1"),
                true,
            ),
            other(
                "prod",
                "web-data",
                serde_json::json!([{"name": "1", "new": {"pool": "images", "size": "1Gi"}}]),
                Some("n1"),
                false,
            ),
        );
        let w = with(vec![web.clone(), web_data.clone()]);
        assert!(resolve(&web, "n1", &w, None).is_ok());
        let b = resolve(&web_data, "n1", &w, None).unwrap_err();
        assert_eq!(b.reason, "VolumeNameClash");
        for part in [
            "spec.disks[0].new",
            "prod-web-data-1.qcow2",
            "VirtualMachine prod/web's spec.disks[0]",
            "rename",
        ] {
            assert!(b.message.contains(part), "{part}: {}", b.message);
        }
        // the same VM's own disks are not a conflict with itself
        let own = other(
            "prod",
            "solo",
            serde_json::json!([{"name": "d", "existing": {"pool": "images", "volume": "v.img"}}]),
            Some("n1"),
            true,
        );
        assert!(resolve(&own, "n1", &with(vec![own.clone()]), None).is_ok());
    }

    #[test]
    fn run_strategies_drive_the_power_state() {
        use DomainState::*;
        let cases: &[(&str, DomainState, &[&str])] = &[
            ("Running", Running, &[]),
            ("Running", Shutoff, &["Start"]),
            ("Running", Paused, &["Resume"]),
            ("Stopped", Running, &["Shutdown"]),
            ("Stopped", Paused, &["Shutdown"]),
            ("Stopped", Shutoff, &[]),
            ("Paused", Running, &["Suspend"]),
            ("Paused", Shutoff, &["Start", "Suspend"]),
            ("Paused", Paused, &[]),
            ("RerunOnFailure", Running, &[]),
            ("RerunOnFailure", Paused, &["Resume"]),
        ];
        for (strategy, state, want) in cases {
            let v = basic(serde_json::json!({"runStrategy": strategy}));
            let r = resolved(&v);
            let p = plan(&v, &r, &provisioned(&v, &r, *state), &now());
            assert_eq!(kinds(&p), *want, "{strategy} from {state:?}");
            assert!(p.drift.is_empty(), "{:?}", p.drift);
        }
        // a guest shutting down is waited for
        let v = basic(serde_json::json!({}));
        let r = resolved(&v);
        let p = plan(&v, &r, &provisioned(&v, &r, ShuttingDown), &now());
        assert!(p.steps.is_empty() && p.wait.is_some());
    }

    #[test]
    fn rerun_on_failure_restarts_after_crashes_with_backoff_not_after_a_guest_shutdown() {
        let mut v = basic(serde_json::json!({"runStrategy": "RerunOnFailure"}));
        let r = resolved(&v);
        let mut o = provisioned(&v, &r, DomainState::Shutoff);
        let set = |o: &mut Observed, crashed: bool, shutdown: bool| {
            if let Some(d) = o.domain.as_mut() {
                d.state.crashed = crashed;
                d.state.guest_shutdown = shutdown;
            }
        };
        set(&mut o, false, true);
        assert!(plan(&v, &r, &o, &now()).steps.is_empty(), "left off");
        set(&mut o, true, false);
        assert_eq!(kinds(&plan(&v, &r, &o, &now())), ["Restart"]);
        // two restarts already, the last 10 s ago: wait out the backoff (40 s)
        let t = now();
        let ten_ago = Time(t.0 - k8s_openapi::jiff::SignedDuration::from_secs(10));
        v.status = Some(crate::api::VirtualMachineStatus {
            restart_count: Some(2),
            last_restart_time: Some(ten_ago),
            ..Default::default()
        });
        let p = plan(&v, &r, &o, &t);
        assert!(p.steps.is_empty());
        assert_eq!(p.wait, Some(Duration::from_secs(30)));
        assert_eq!(restart_backoff(0), Duration::from_secs(10));
        assert_eq!(restart_backoff(9), Duration::from_secs(300));
        // Running restarts after a crash too, and after any stop
        let v = basic(serde_json::json!({}));
        assert_eq!(kinds(&plan(&v, &r, &o, &now())), ["Restart"]);
        set(&mut o, false, true);
        assert_eq!(kinds(&plan(&v, &r, &o, &now())), ["Start"]);
    }

    #[test]
    fn only_domains_with_our_stamp_are_touched_unless_adopting() {
        let v = basic(serde_json::json!({}));
        let r = resolved(&v);
        let mut o = provisioned(&v, &r, DomainState::Running);
        if let Some(d) = o.domain.as_mut() {
            d.persistent.metadata = None;
        }
        let p = plan(&v, &r, &o, &now());
        assert_eq!(p.blocked.map(|b| b.reason), Some("DomainExists"));
        assert!(p.steps.is_empty());
        if let Some(d) = o.domain.as_mut() {
            d.persistent.metadata = Some(crate::hypervisor::domain_xml::Metadata {
                owner: Some(Owner::new("uid-2", "other", "web")),
            });
        }
        let p = plan(&v, &r, &o, &now());
        assert_eq!(p.blocked.map(|b| b.reason), Some("DomainOwnedElsewhere"));
        // adopting an unstamped domain: stamp it, nothing else (no restart)
        let a = vm(serde_json::json!({"adopt": {"nodeName": "n1", "domain": "legacy"}}));
        let ra = resolved(&a);
        assert_eq!(ra.domain, "legacy");
        if let Some(d) = o.domain.as_mut() {
            d.persistent.metadata = None;
        }
        assert_eq!(kinds(&plan(&a, &ra, &o, &now())), ["Stamp"]);
        // an adopted domain that is gone is reported, never created
        let p = plan(&a, &ra, &Observed::default(), &now());
        assert_eq!(p.blocked.map(|b| b.reason), Some("DomainNotFound"));
    }

    #[test]
    fn drift_is_corrected_in_the_definition_and_hot_plugged_or_left_for_a_restart() {
        let v = basic(serde_json::json!({}));
        let r = resolved(&v);
        // a hand edit removed net0 from the definition: redefine, keeping the UUID
        let mut o = provisioned(&v, &r, DomainState::Running);
        if let Some(d) = o.domain.as_mut() {
            d.persistent.devices.interface.clear();
            d.persistent.memory = crate::hypervisor::domain_xml::Memory::kib(512 * 1024);
        }
        let p = plan(&v, &r, &o, &now());
        assert_eq!(
            kinds(&p),
            ["Define"],
            "hot-plug waits for the new definition"
        );
        let Step::Define { uuid, .. } = &p.steps[0] else {
            panic!()
        };
        assert_eq!(uuid.as_deref(), Some("u-1"));
        assert!(p.drift.contains(&Drift::MissingNic("net0".into())));
        // the spec gained a disk and the memory changed; the definition is up to date
        let mut v2 = basic(serde_json::json!({"memory": "2Gi"}));
        v2.spec.disks.push(
            serde_json::from_value(
                serde_json::json!({"name": "extra", "new": {"pool": "images", "size": "1Gi"}}),
            )
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let r2 = resolved(&v2);
        let mut o2 = provisioned(&v2, &r2, DomainState::Running);
        // the running guest still has the old shape
        let old = provisioned(&v, &r, DomainState::Running);
        if let (Some(d), Some(old)) = (o2.domain.as_mut(), old.domain) {
            d.live = old.live;
        }
        let p = plan(&v2, &r2, &o2, &now());
        assert_eq!(kinds(&p), ["AttachLive"]);
        assert_eq!(p.restart_pending.len(), 1, "{:?}", p.restart_pending);
        assert!(p.restart_pending[0].starts_with("memory"));
        // a disk that is not in the spec any more is unplugged from the running guest
        if let Some(d) = o2.domain.as_mut() {
            d.live = d.live.clone().map(|mut l| {
                l.devices.disk.extend(d.persistent.devices.disk.clone());
                l
            });
        }
        let o3 = provisioned(&v, &r, DomainState::Running);
        let mut o3 = o3;
        if let (Some(d), Some(src)) = (o3.domain.as_mut(), o2.domain.as_ref()) {
            d.live = src.live.clone();
        }
        let p = plan(&v, &r, &o3, &now());
        assert!(kinds(&p).contains(&"DetachLive"), "{:?}", kinds(&p));
    }

    #[test]
    fn adopted_domains_change_only_what_the_spec_sets_through_config_calls() {
        let a =
            vm(serde_json::json!({"adopt": {"nodeName": "n1", "domain": "legacy"}, "vcpus": 4}));
        let ra = resolved(&a);
        let plain = basic(serde_json::json!({}));
        let mut o = provisioned(&plain, &resolved(&plain), DomainState::Running);
        if let Some(d) = o.domain.as_mut() {
            d.persistent.metadata = Some(crate::hypervisor::domain_xml::Metadata {
                owner: Some(ra.owner.clone()),
            });
        }
        let p = plan(&a, &ra, &o, &now());
        assert_eq!(kinds(&p), ["SetConfigResources"]);
        assert_eq!(
            p.steps[0],
            Step::SetConfigResources {
                vcpus: Some(4),
                memory_kib: None
            }
        );
        assert_eq!(p.restart_pending, ["vCPUs 2 → 4"]);
    }

    #[test]
    fn only_a_provisioned_rerun_on_failure_vm_on_shared_storage_may_fail_over() {
        let provisioned = |mut v: VirtualMachine| {
            v.status = Some(crate::api::virtual_machine::VirtualMachineStatus {
                node: Some("n1".into()),
                domain_name: Some("prod_web".into()),
                ..Default::default()
            });
            v
        };
        let shared_world = |shared: Option<bool>, type_: &str| {
            let mut spec = serde_json::json!({"nodeSelector": {}, "type": type_,
                "targetPath": "/srv/vms"});
            if type_ == "netfs" {
                spec["source"] = serde_json::json!({"host": "nas", "dir": "/export"});
            }
            if let Some(s) = shared {
                spec["shared"] = serde_json::json!(s);
            }
            let pool: StoragePool = serde_json::from_value(serde_json::json!({
                "apiVersion": "kvm-operator.io/v1alpha1", "kind": "StoragePool",
                "metadata": {"name": "images", "namespace": "prod"}, "spec": spec,
            }))
            .unwrap_or_else(|e| panic!("{e}"));
            World {
                pools: vec![Arc::new(pool)],
                ..World::default()
            }
        };
        let reason = |v: &VirtualMachine, w: &World| failover_blocker(v, w, "n1").map(|b| b.0);
        let rerun = || basic(serde_json::json!({"runStrategy": "RerunOnFailure"}));
        // a dir pool is the node's own unless declared shared; netfs is shared by nature
        assert_eq!(
            reason(&provisioned(rerun()), &world()),
            Some("StorageNotShared")
        );
        assert_eq!(
            reason(&provisioned(rerun()), &shared_world(Some(true), "dir")),
            None
        );
        assert_eq!(
            reason(&provisioned(rerun()), &shared_world(None, "netfs")),
            None
        );
        assert_eq!(
            reason(&provisioned(rerun()), &shared_world(Some(false), "netfs")),
            Some("StorageNotShared")
        );
        // the message names the pool and the fix
        let (_, msg) = failover_blocker(&provisioned(rerun()), &world(), "n1")
            .unwrap_or_else(|| panic!("blocked"));
        assert!(
            msg.contains("prod/images") && msg.contains("spec.shared"),
            "{msg}"
        );
        let w = shared_world(Some(true), "dir");
        // what the VM asks for
        assert_eq!(
            reason(&provisioned(basic(serde_json::json!({}))), &w),
            Some("NotRerunOnFailure")
        );
        assert_eq!(
            reason(
                &provisioned(basic(serde_json::json!({"runStrategy": "RerunOnFailure",
                    "placement": {"nodeName": "n1"}}))),
                &w
            ),
            Some("Pinned")
        );
        assert_eq!(reason(&rerun(), &w), Some("NotProvisioned"));
        // a pool that does not exist is not known to be shared
        assert_eq!(
            reason(&provisioned(rerun()), &World::default()),
            Some("StorageNotShared")
        );
    }
}
