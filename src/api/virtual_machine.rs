//! `VirtualMachine`: a KVM guest placed on a KvmNode, or an existing domain adopted as is.
// kube's `printcolumn(...)` arguments repeat `type_ = "string"` by design; clippy reads them
// as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::{BTreeMap, BTreeSet};

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::{Condition, Time};
use super::quantity::ByteQuantity;
use super::validation::{
    FieldErrors, check_labels, check_libvirt_name, check_object_name, check_secret_key,
    is_dns_label, is_object_name,
};

/// Most vCPUs a VM may ask for (QEMU's limit for the q35 machine type).
pub const MAX_VCPUS: u32 = 4096;
/// Least memory a VM may ask for.
pub const MIN_MEMORY_BYTES: u64 = 16 << 20;
/// Longest cloud-init user-data or network-config (the CRD schema's limit).
pub const MAX_CLOUD_INIT_BYTES: usize = 65536;

/// A KVM virtual machine.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kvm-operator.io",
    version = "v1alpha1",
    kind = "VirtualMachine",
    plural = "virtualmachines",
    shortname = "kvmvm",
    category = "kvm",
    namespaced,
    status = "VirtualMachineStatus",
    doc = "A KVM virtual machine on a KvmNode: created from volumes, or an existing domain adopted without a restart.",
    printcolumn(name = "Node", type_ = "string", json_path = ".status.node"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.powerState"),
    printcolumn(name = "CPUs", type_ = "integer", json_path = ".spec.vcpus"),
    printcolumn(name = "Memory", type_ = "string", json_path = ".spec.memory"),
    printcolumn(name = "IP", type_ = "string", json_path = ".status.ips[0]"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.adopt) || (has(self.vcpus) && has(self.memory))").message("spec.vcpus and spec.memory are required unless spec.adopt names an existing domain").field_path(".vcpus"))]
#[x_kube(validation = Rule::new("!has(self.topology) || !has(self.vcpus) || self.topology.sockets * self.topology.cores * self.topology.threads == self.vcpus").message("spec.topology: sockets × cores × threads must equal spec.vcpus").field_path(".topology"))]
#[x_kube(validation = Rule::new("!has(self.adopt) || !has(self.placement) || !has(self.placement.nodeName) || self.placement.nodeName == self.adopt.nodeName").message("spec.placement.nodeName must equal spec.adopt.nodeName when adopting (the domain is where it is)").field_path(".placement.nodeName"))]
#[x_kube(validation = Rule::new("!has(self.disks) || self.disks.all(a, !has(a.existing) || self.disks.exists_one(d, has(d.existing) && d.existing.volume == a.existing.volume && d.existing.pool == a.existing.pool))").message("spec.disks: an existing volume is attached once (two disks name the same existing pool and volume)").field_path(".disks"))]
#[x_kube(validation = Rule::new("!has(self.disks) || self.disks.all(a, !has(a.existing) || !self.disks.exists(d, has(d.overlay) && d.overlay.base == a.existing.volume && d.overlay.pool == a.existing.pool))").message("spec.disks: an existing volume that is the base of an overlay of this VM cannot be attached (writing to it would corrupt the overlay); attach a clone instead").field_path(".disks"))]
#[x_kube(validation = Rule::new("!has(self.disks) || !has(self.bootOrder) || self.bootOrder.all(b, self.disks.exists(d, d.name == b) || (has(self.nics) && self.nics.exists(n, n.name == b)))").message("every name in spec.bootOrder must be a disk or NIC of this VM").field_path(".bootOrder"))]
pub struct VirtualMachineSpec {
    /// Number of virtual CPUs, 1 to 4096. Required unless adopting (then the domain's count is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub vcpus: Option<u32>,

    /// CPU topology presented to the guest; sockets × cores × threads must equal vcpus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<CpuTopology>,

    /// How the guest CPU is modelled: `HostPassthrough` (fastest; migrates only between identical
    /// CPUs) or `HostModel` (close to the host, migratable between similar hosts). Default: the
    /// hypervisor's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_mode: Option<CpuMode>,

    /// Guest memory, e.g. `2Gi`; at least 16Mi. Required unless adopting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteQuantity>,

    /// Disks, in the order the guest sees them (vda, vdb, ...). Names are unique within the VM.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub disks: Vec<Disk>,

    /// Network interfaces. Names are unique within the VM.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub nics: Vec<Nic>,

    /// Boot order by device name (disks and NICs), first tried first, e.g. `[root, net0]`.
    /// Default: the first disk, then the first cdrom.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub boot_order: Vec<String>,

    /// cloud-init NoCloud data; the operator builds a seed ISO volume and attaches it as a cdrom.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,

    /// Consoles. Default: a serial console and VNC on the host's loopback address (reach it with
    /// `kvm-operator console`, through the node's SSH connection).
    #[serde(default)]
    pub console: Console,

    /// Desired power state: `Running` (default; start it, and start it again whenever it stops),
    /// `Stopped` (shut it down gracefully, then force off), `Paused` (suspend it in memory),
    /// `RerunOnFailure` (start it; restart it after a crash, with backoff, but leave it off when the
    /// guest shuts itself down).
    #[serde(default)]
    pub run_strategy: RunStrategy,

    /// Where the VM may run. Without constraints, the operator picks the node with the best load
    /// score and explains the choice in status.placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,

    /// Take over an existing domain on a node instead of creating one. It keeps running; fields left
    /// unset above are taken from the domain, fields set are enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopt: Option<Adopt>,

    /// What happens to volumes the operator created for this VM (new, clone, overlay, cloud-init
    /// seed) when the VM is deleted: `Retain` (default: keep them in their pools) or `Delete`.
    /// Volumes the VM only used (existing, cdrom) and volumes of adopted domains are never deleted.
    #[serde(default)]
    pub volume_deletion_policy: super::storage_pool::DeletionPolicy,
}

/// Guest CPU topology.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CpuTopology {
    /// CPU sockets.
    #[schemars(range(min = 1, max = 256))]
    pub sockets: u32,
    /// Cores per socket.
    #[schemars(range(min = 1, max = 1024))]
    pub cores: u32,
    /// Threads per core.
    #[schemars(range(min = 1, max = 8))]
    pub threads: u32,
}

/// Guest CPU model.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMode {
    /// The host CPU as is.
    HostPassthrough,
    /// A named model close to the host CPU.
    HostModel,
}

/// One disk of a VM. Exactly one of new, clone, overlay, existing or cdrom is set.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("[has(self.new), has(self.clone), has(self.overlay), has(self.existing), has(self.cdrom)].filter(x, x).size() == 1").message("set exactly one of new, clone, overlay, existing or cdrom"))]
pub struct Disk {
    /// Disk name, unique within the VM (a DNS label, e.g. `root`, `data`). Volumes the operator
    /// creates are named `<namespace>-<vm>-<disk>`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Bus: `virtio` (default), `sata`, `scsi` or `ide`. A cdrom uses sata unless told otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<DiskBus>,
    /// A new, empty volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<NewVolume>,
    /// A full copy of a template volume (independent of the template afterwards). A volume that
    /// another VM or domain writes is copied only while its guest is stopped (`VolumeInUse`
    /// until then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<CloneVolume>,
    /// A qcow2 overlay whose backing file is a base volume (fast; the base must stay unchanged,
    /// so a volume another VM creates or attaches, or another domain has as a disk, is refused:
    /// `VolumeInUse`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<OverlayVolume>,
    /// A volume that already exists; the operator never deletes it. It is written to, so it
    /// belongs to this VM alone: a volume another VM creates, attaches first, or has as an
    /// overlay's base, or that another domain of the node has as a disk, is refused
    /// (`VolumeInUse`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub existing: Option<VolumeRef>,
    /// A read-only ISO image attached as a cdrom; the operator never deletes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdrom: Option<VolumeRef>,
}

/// Disk buses.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    /// Paravirtualised block device (vdX).
    Virtio,
    /// SATA (sdX).
    Sata,
    /// SCSI through a virtio-scsi controller (sdX).
    Scsi,
    /// IDE (hdX), for old guests.
    Ide,
}

/// Volume formats.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum VolumeFormat {
    /// qcow2: thin, snapshots, backing files.
    #[default]
    Qcow2,
    /// raw: fastest, what logical and rbd pools hold.
    Raw,
}

/// A new, empty volume.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewVolume {
    /// StoragePool object (in the VM's namespace) that holds the volume.
    #[schemars(length(min = 1, max = 253))]
    pub pool: String,
    /// Size, e.g. `20Gi`.
    pub size: ByteQuantity,
    /// `qcow2` (default) or `raw`.
    #[serde(default)]
    pub format: VolumeFormat,
}

/// A copy of a template volume.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloneVolume {
    /// StoragePool object (in the VM's namespace) that holds the template and the copy.
    #[schemars(length(min = 1, max = 253))]
    pub pool: String,
    /// Name of the template volume in that pool, e.g. `debian-12-genericcloud.qcow2`.
    #[schemars(length(min = 1, max = 255))]
    pub template: String,
    /// Grow the copy to this size (never shrinks). Default: the template's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteQuantity>,
    /// Format of the copy. Default qcow2.
    #[serde(default)]
    pub format: VolumeFormat,
}

/// A qcow2 overlay on a base volume.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OverlayVolume {
    /// StoragePool object (in the VM's namespace) that holds the base and the overlay.
    #[schemars(length(min = 1, max = 253))]
    pub pool: String,
    /// Name of the base volume in that pool.
    #[schemars(length(min = 1, max = 255))]
    pub base: String,
    /// Virtual size of the overlay. Default: the base's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteQuantity>,
}

/// A volume by pool and name.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeRef {
    /// StoragePool object (in the VM's namespace).
    #[schemars(length(min = 1, max = 253))]
    pub pool: String,
    /// Volume name in that pool.
    #[schemars(length(min = 1, max = 255))]
    pub volume: String,
}

/// A network interface. Exactly one of bridge or network is set.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.bridge) != has(self.network)").message("set exactly one of bridge (a host bridge) or network (a libvirt network)"))]
pub struct Nic {
    /// NIC name, unique within the VM (a DNS label, e.g. `net0`).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// A Linux bridge on the host, e.g. `br0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 15), regex(pattern = r"^[A-Za-z0-9_.-]+$"))]
    pub bridge: Option<String>,
    /// A libvirt network on the host, e.g. `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9_.-]+$"))]
    pub network: Option<String>,
    /// Device model: `virtio` (default), `e1000` or `rtl8139`.
    #[serde(default)]
    pub model: NicModel,
    /// MAC address, e.g. `52:54:00:12:34:56`. Default: libvirt picks one, and status records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$"))]
    pub mac: Option<String>,
}

/// NIC models.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum NicModel {
    /// Paravirtualised NIC.
    #[default]
    Virtio,
    /// Emulated Intel e1000.
    E1000,
    /// Emulated Realtek 8139.
    Rtl8139,
}

/// cloud-init NoCloud data.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("!(has(self.userData) && has(self.userDataSecretRef))").message("set userData or userDataSecretRef, not both"))]
pub struct CloudInit {
    /// user-data, e.g. a `#cloud-config` document. Anything secret belongs in userDataSecretRef.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub user_data: Option<String>,
    /// A Secret in the VM's namespace holding the user-data (for data that must not sit in
    /// the VM object, like passwords). Secrets of other namespaces cannot be referenced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data_secret_ref: Option<UserDataSecretRef>,
    /// network-config (version 2), if the guest should not use DHCP on its first NIC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub network_data: Option<String>,
    /// StoragePool object that holds the seed ISO. Default: the pool of the first disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub pool: Option<String>,
}

/// Console devices.
/// A key of a Secret in the VM's own namespace.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserDataSecretRef {
    /// Name of the Secret (in the VM's namespace).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret. Default `userdata` (the key KubeVirt's cloud-init Secrets use).
    #[serde(default = "default_userdata_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_userdata_key() -> String {
    "userdata".into()
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Console {
    /// A VNC display listening on the host's loopback address only. Default true.
    #[serde(default = "default_true")]
    pub vnc: bool,
    /// A serial console (pty). Default true.
    #[serde(default = "default_true")]
    pub serial: bool,
}

impl Default for Console {
    fn default() -> Self {
        Self {
            vnc: true,
            serial: true,
        }
    }
}

fn default_true() -> bool {
    true
}

/// Desired power state of a VM.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RunStrategy {
    /// Keep it running: start it whenever it is not.
    #[default]
    Running,
    /// Keep it off.
    Stopped,
    /// Keep it suspended in memory.
    Paused,
    /// Start it; restart it after a crash (with backoff), not after a guest-initiated shutdown.
    RerunOnFailure,
}

/// Where a VM may run.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("!(has(self.nodeName) && has(self.nodeSelector))").message("set spec.placement.nodeName or spec.placement.nodeSelector, not both").field_path(".nodeName"))]
pub struct Placement {
    /// Run on this KvmNode, bypassing scoring (capacity is still checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub node_name: Option<String>,
    /// Run only on KvmNodes whose labels contain all of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Prefer or require nodes that run VMs with these labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub affinity: Vec<VmAffinityTerm>,
    /// Prefer or require nodes that do not run VMs with these labels (e.g. keep replicas apart).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub anti_affinity: Vec<VmAffinityTerm>,
    /// Spread VMs that share this label's value evenly across nodes (soft), e.g. `app`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 317))]
    pub spread_by_label: Option<String>,
}

/// An (anti-)affinity term over other VMs in the same namespace.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmAffinityTerm {
    /// Labels the other VMs must all carry.
    pub match_labels: BTreeMap<String, String>,
    /// `Required` filters nodes; `Preferred` (default) adds `weight` to a node's score.
    #[serde(default)]
    pub mode: AffinityMode,
    /// Weight for Preferred terms, 1-100. Default 50.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 1, max = 100))]
    pub weight: u32,
}

fn default_weight() -> u32 {
    50
}

/// Hard or soft constraint.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AffinityMode {
    /// Nodes that break the term are filtered out.
    Required,
    /// Nodes that satisfy the term score higher.
    #[default]
    Preferred,
}

/// An existing domain to take over.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Adopt {
    /// KvmNode the domain is on.
    #[schemars(length(min = 1, max = 253))]
    pub node_name: String,
    /// libvirt domain name, as listed in the node's status.unmanagedDomains.
    #[schemars(length(min = 1, max = 255))]
    pub domain: String,
}

/// Observed state of a VM.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// KvmNode the VM is placed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// libvirt domain name on that node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_name: Option<String>,
    /// libvirt domain UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_uuid: Option<String>,
    /// Power state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_state: Option<PowerState>,
    /// Addresses of the running guest's NICs, when known: from its QEMU guest agent (when the
    /// domain declares one), the DHCP lease of the libvirt network a NIC is on, or the node's
    /// neighbour (ARP) table. NIC by NIC, IPv4 first; no loopback or link-local addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    /// MAC addresses of the NICs, by NIC name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub macs: BTreeMap<String, String>,
    /// How to reach the consoles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<ConsoleStatus>,
    /// Why the VM runs where it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementStatus>,
    /// What the domain's definition on the host has: for an adopted domain, the spec it came
    /// with (fields left unset in spec follow it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<ObservedDomain>,
    /// The domain's definition on its node, and the copy the operator keeps of it (so a lost
    /// host can be rebuilt; see README "Backup of domain definitions").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<DefinitionStatus>,
    /// Restarts after crashes (RerunOnFailure and Running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_count: Option<u32>,
    /// The last time the VM was started on another node because its node failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverStatus>,
    /// When the operator last restarted the VM after a crash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart_time: Option<Time>,
    /// `Scheduled`, `Provisioned`, `Running` and `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// A restart on another node after a host failure.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FailoverStatus {
    /// The failed node.
    pub from: String,
    /// The node it was started on.
    pub to: String,
    /// `OutOfService` (the administrator fenced the host) or `DomainStopped` (the old host's
    /// libvirt showed the domain stopped, and its definition there was removed).
    pub reason: String,
    pub time: Option<Time>,
    /// True once no definition of it is left on the failed node (removed when the node answers
    /// again).
    #[serde(default)]
    pub stale_removed: bool,
}

/// Power state of a VM as the operator last saw it.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerState {
    /// Not yet placed or not yet defined.
    Pending,
    /// Defined and running.
    Running,
    /// Defined and not running.
    Stopped,
    /// Suspended in memory.
    Paused,
    /// The guest is shutting down.
    ShuttingDown,
    /// The guest crashed.
    Crashed,
    /// A Migration is moving it.
    Migrating,
    /// The node is unreachable: the state is not known.
    Unknown,
}

/// Console endpoints, on the node.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConsoleStatus {
    /// VNC `address:port` on the node (loopback; tunnel through SSH).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnc: Option<String>,
    /// Serial console pty on the node, e.g. `/dev/pts/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The command that opens the VNC console from a workstation (`kvm-operator console`: a
    /// local port tunnelled through the node's SSH connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// The command that attaches to the serial console (virsh over SSH to the node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_command: Option<String>,
}

/// The domain's persistent definition and its backup.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DefinitionStatus {
    /// SHA-256 of the persistent domain XML as last read from the node.
    pub sha256: String,
    /// Where the copy is: `ConfigMap <namespace>/<name>` (key `domain.xml`) in a cluster, a file
    /// in standalone mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// SHA-256 of the copy kept there; equal to `sha256` when the backup is current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_sha256: Option<String>,
    /// When the copy was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_time: Option<Time>,
}

/// A domain's definition as read from its host.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ObservedDomain {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory (the maximum the guest may have).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteQuantity>,
    /// Disks and CD-ROMs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<ObservedDiskStatus>,
    /// Network interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<ObservedNicStatus>,
}

/// A disk of the domain.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObservedDiskStatus {
    /// The spec's disk name, or the target device for disks the operator did not create.
    pub name: String,
    /// Target device in the guest, e.g. `vda`.
    pub target: String,
    /// Bus: virtio, sata, scsi or ide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<String>,
    /// File, block device or `protocol:name` it reads from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// True for a CD-ROM.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cdrom: bool,
}

/// A network interface of the domain.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObservedNicStatus {
    /// The spec's NIC name, or the MAC address for NICs the operator did not create.
    pub name: String,
    /// MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Host bridge it is plugged into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// libvirt network it is plugged into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Device model, e.g. `virtio`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// The placement decision.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlacementStatus {
    /// The chosen node.
    pub node: String,
    /// Its score (higher is better).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<i64>,
    /// The second-best node and its score, e.g. `hv2 (score 712)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_up: Option<String>,
    /// One sentence a human can read.
    pub message: String,
    /// Nodes that were filtered out and why (at most 20 listed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filtered: Vec<FilteredNode>,
    /// When the decision was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}

/// A node placement ruled out.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FilteredNode {
    /// Node name.
    pub node: String,
    /// Why, e.g. `needs 4Gi memory, 1Gi allocatable left`.
    pub reason: String,
}

impl VirtualMachineSpec {
    /// Checks the spec; see [`crate::api::validation`].
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut e = FieldErrors::default();
        let adopting = self.adopt.is_some();
        match self.vcpus {
            None if !adopting => e.push(
                "spec.vcpus",
                "is required (1 to 4096) unless spec.adopt names an existing domain",
            ),
            Some(v) if v == 0 || v > MAX_VCPUS => e.push(
                "spec.vcpus",
                format!("{v} is out of range: use 1 to {MAX_VCPUS}"),
            ),
            _ => {}
        }
        match &self.memory {
            None if !adopting => e.push(
                "spec.memory",
                "is required (e.g. 2Gi) unless spec.adopt names an existing domain",
            ),
            Some(m) if m.bytes() < MIN_MEMORY_BYTES => e.push(
                "spec.memory",
                format!("{m} is too small: use at least 16Mi"),
            ),
            _ => {}
        }
        if let Some(t) = &self.topology {
            let product = u64::from(t.sockets) * u64::from(t.cores) * u64::from(t.threads);
            if t.sockets == 0 || t.cores == 0 || t.threads == 0 {
                e.push(
                    "spec.topology",
                    "sockets, cores and threads must each be at least 1",
                );
            } else if let Some(v) = self.vcpus
                && product != u64::from(v)
            {
                e.push(
                    "spec.topology",
                    format!("sockets × cores × threads = {product} but spec.vcpus is {v}: make them equal"),
                );
            }
        }
        let mut names = BTreeSet::new();
        for (i, d) in self.disks.iter().enumerate() {
            let f = format!("spec.disks[{i}]");
            if !is_dns_label(&d.name) {
                e.push(
                    format!("{f}.name"),
                    format!(
                        "{:?} must be a DNS label (a-z, 0-9, '-', at most 63)",
                        d.name
                    ),
                );
            }
            if !names.insert(d.name.clone()) {
                e.push(
                    format!("{f}.name"),
                    format!(
                        "{:?} is used twice: disk and NIC names must be unique",
                        d.name
                    ),
                );
            }
            let sources = [
                d.new.is_some(),
                d.clone.is_some(),
                d.overlay.is_some(),
                d.existing.is_some(),
                d.cdrom.is_some(),
            ];
            if sources.iter().filter(|x| **x).count() != 1 {
                e.push(
                    f.clone(),
                    "set exactly one of new, clone, overlay, existing or cdrom",
                );
            }
            if let Some(n) = &d.new {
                check_pool_ref(&mut e, &format!("{f}.new.pool"), &n.pool);
                if n.size.bytes() == 0 {
                    e.push(format!("{f}.new.size"), "must be larger than 0");
                }
            }
            if let Some(c) = &d.clone {
                check_pool_ref(&mut e, &format!("{f}.clone.pool"), &c.pool);
                check_libvirt_name(&mut e, &format!("{f}.clone.template"), &c.template);
            }
            if let Some(o) = &d.overlay {
                check_pool_ref(&mut e, &format!("{f}.overlay.pool"), &o.pool);
                check_libvirt_name(&mut e, &format!("{f}.overlay.base"), &o.base);
            }
            for (kind, r) in [("existing", &d.existing), ("cdrom", &d.cdrom)] {
                if let Some(r) = r {
                    check_pool_ref(&mut e, &format!("{f}.{kind}.pool"), &r.pool);
                    check_libvirt_name(&mut e, &format!("{f}.{kind}.volume"), &r.volume);
                }
            }
        }
        // a writable volume is attached once, and never written under one of its own overlays
        for (i, d) in self.disks.iter().enumerate() {
            let Some(x) = &d.existing else { continue };
            let twice = self.disks[..i]
                .iter()
                .position(|o| o.existing.as_ref().is_some_and(|y| y == x));
            let base = self.disks.iter().position(|o| {
                o.overlay
                    .as_ref()
                    .is_some_and(|y| y.pool == x.pool && y.base == x.volume)
            });
            if let Some(j) = twice {
                e.push(
                    format!("spec.disks[{i}].existing"),
                    format!(
                        "volume {:?} of StoragePool {} is already spec.disks[{j}]: a volume is attached once",
                        x.volume, x.pool
                    ),
                );
            } else if let Some(j) = base {
                e.push(
                    format!("spec.disks[{i}].existing"),
                    format!(
                        "volume {:?} of StoragePool {} is the base of spec.disks[{j}].overlay: writing to it would corrupt the overlay; attach a copy (clone) instead",
                        x.volume, x.pool
                    ),
                );
            }
        }
        for (i, n) in self.nics.iter().enumerate() {
            let f = format!("spec.nics[{i}]");
            if !is_dns_label(&n.name) {
                e.push(
                    format!("{f}.name"),
                    format!(
                        "{:?} must be a DNS label (a-z, 0-9, '-', at most 63)",
                        n.name
                    ),
                );
            }
            if !names.insert(n.name.clone()) {
                e.push(
                    format!("{f}.name"),
                    format!(
                        "{:?} is used twice: disk and NIC names must be unique",
                        n.name
                    ),
                );
            }
            let iface_ok = |s: &str, max: usize| {
                !s.is_empty()
                    && s.len() <= max
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            };
            match (&n.bridge, &n.network) {
                (Some(b), None) if !iface_ok(b, 15) => e.push(
                    format!("{f}.bridge"),
                    format!(
                        "{b:?} is not a bridge name (letters, digits, '_', '.', '-', at most 15)"
                    ),
                ),
                (None, Some(w)) if !iface_ok(w, 128) => e.push(
                    format!("{f}.network"),
                    format!("{w:?} is not a libvirt network name"),
                ),
                (Some(_), None) | (None, Some(_)) => {}
                _ => e.push(
                    f.clone(),
                    "set exactly one of bridge (a host bridge) or network (a libvirt network)",
                ),
            }
            if let Some(m) = &n.mac {
                let parts: Vec<&str> = m.split(':').collect();
                let ok = parts.len() == 6
                    && parts
                        .iter()
                        .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
                if !ok {
                    e.push(
                        format!("{f}.mac"),
                        format!(
                            "{m:?} is not a MAC address (six hex pairs, e.g. 52:54:00:12:34:56)"
                        ),
                    );
                } else if u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 1) {
                    e.push(format!("{f}.mac"), format!("{m:?} is a multicast address: the first byte must be even (e.g. 52:54:00:...)"));
                }
            }
        }
        for (i, b) in self.boot_order.iter().enumerate() {
            if !names.contains(b) {
                e.push(
                    format!("spec.bootOrder[{i}]"),
                    format!("{b:?} is not the name of a disk or NIC of this VM"),
                );
            }
        }
        if let Some(ci) = &self.cloud_init {
            if ci.user_data.is_some() && ci.user_data_secret_ref.is_some() {
                e.push(
                    "spec.cloudInit",
                    "set userData or userDataSecretRef, not both",
                );
            }
            if let Some(r) = &ci.user_data_secret_ref {
                check_object_name(
                    &mut e,
                    "spec.cloudInit.userDataSecretRef.name",
                    "Secret",
                    &r.name,
                );
                check_secret_key(&mut e, "spec.cloudInit.userDataSecretRef.key", &r.key);
            }
            for (field, text) in [
                ("spec.cloudInit.userData", &ci.user_data),
                ("spec.cloudInit.networkData", &ci.network_data),
            ] {
                if text
                    .as_ref()
                    .is_some_and(|t| t.len() > MAX_CLOUD_INIT_BYTES)
                {
                    e.push(
                        field,
                        format!(
                            "must be at most {MAX_CLOUD_INIT_BYTES} bytes (the schema's limit)"
                        ),
                    );
                }
            }
            if let Some(p) = &ci.pool {
                check_pool_ref(&mut e, "spec.cloudInit.pool", p);
            } else if !self.disks.iter().any(|d| disk_pool(d).is_some()) {
                e.push(
                    "spec.cloudInit.pool",
                    "is required when the VM has no disk in a pool (the seed ISO needs a pool)",
                );
            }
        }
        if let Some(p) = &self.placement {
            if p.node_name.is_some() && p.node_selector.is_some() {
                e.push(
                    "spec.placement.nodeName",
                    "set spec.placement.nodeName or spec.placement.nodeSelector, not both",
                );
            }
            if let Some(n) = &p.node_name {
                check_object_name(&mut e, "spec.placement.nodeName", "KvmNode", n);
            }
            if let Some(sel) = &p.node_selector {
                check_labels(&mut e, "spec.placement.nodeSelector", sel);
            }
            if let Some(k) = &p.spread_by_label {
                // a label key, checked as one with an empty value
                let one = BTreeMap::from([(k.clone(), String::new())]);
                check_labels(&mut e, "spec.placement.spreadByLabel", &one);
            }
            for (kind, terms) in [
                ("affinity", &p.affinity),
                ("antiAffinity", &p.anti_affinity),
            ] {
                for (i, t) in terms.iter().enumerate() {
                    if t.match_labels.is_empty() {
                        e.push(
                            format!("spec.placement.{kind}[{i}].matchLabels"),
                            "must name at least one label",
                        );
                    }
                    check_labels(
                        &mut e,
                        &format!("spec.placement.{kind}[{i}].matchLabels"),
                        &t.match_labels,
                    );
                    if !(1..=100).contains(&t.weight) {
                        e.push(
                            format!("spec.placement.{kind}[{i}].weight"),
                            "must be between 1 and 100",
                        );
                    }
                }
            }
            if let (Some(a), Some(n)) = (&self.adopt, &p.node_name)
                && a.node_name != *n
            {
                e.push(
                    "spec.placement.nodeName",
                    format!("is {n:?} but spec.adopt.nodeName is {:?}: an adopted domain stays on its node (use a Migration to move it)", a.node_name),
                );
            }
        }
        if let Some(a) = &self.adopt {
            check_object_name(&mut e, "spec.adopt.nodeName", "KvmNode", &a.node_name);
            check_libvirt_name(&mut e, "spec.adopt.domain", &a.domain);
        }
        e.into_result()
    }

    /// Node the spec pins the VM to, from placement.nodeName or adopt.nodeName.
    pub fn pinned_node(&self) -> Option<&str> {
        self.adopt
            .as_ref()
            .map(|a| a.node_name.as_str())
            .or_else(|| self.placement.as_ref().and_then(|p| p.node_name.as_deref()))
    }
}

/// The StoragePool object a disk lives in.
pub fn disk_pool(d: &Disk) -> Option<&str> {
    d.new
        .as_ref()
        .map(|v| v.pool.as_str())
        .or(d.clone.as_ref().map(|v| v.pool.as_str()))
        .or(d.overlay.as_ref().map(|v| v.pool.as_str()))
        .or(d.existing.as_ref().map(|v| v.pool.as_str()))
        .or(d.cdrom.as_ref().map(|v| v.pool.as_str()))
}

fn check_pool_ref(e: &mut FieldErrors, field: &str, pool: &str) {
    if !is_object_name(pool) {
        e.push(field, format!("{pool:?} is not the name of a StoragePool object (lower-case letters, digits, '-', '.')"));
    }
}

/// The libvirt domain name of a VM the operator creates: `<namespace>_<name>`. Neither part can
/// contain '_', so the name maps back to exactly one object.
pub fn domain_name(namespace: &str, name: &str) -> String {
    format!("{namespace}_{name}")
}
