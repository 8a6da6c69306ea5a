//! `StoragePool`: a libvirt storage pool on one node or on every node matching a selector.
// kube's `printcolumn(...)` arguments repeat `type_ = "string"` by design; clippy reads them
// as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::Condition;
use super::quantity::ByteQuantity;
use super::validation::{
    FieldErrors, check_abs_path, check_host, check_labels, check_libvirt_name, check_object_name,
    check_word,
};

/// A libvirt storage pool on one node, or on every node whose labels match `nodeSelector`.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kvm-operator.io",
    version = "v1alpha1",
    kind = "StoragePool",
    plural = "storagepools",
    shortname = "kvmpool",
    category = "kvm",
    namespaced,
    status = "StoragePoolStatus",
    doc = "A libvirt storage pool (dir, logical, netfs, iscsi, rbd) on one or more KvmNodes.",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Nodes Ready",
        type_ = "string",
        json_path = ".status.readyNodes"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.nodeName) != has(self.nodeSelector)").message("set exactly one of spec.nodeName (one node) or spec.nodeSelector (every matching node)").field_path(".nodeName"))]
#[x_kube(validation = Rule::new("self.type != 'dir' || has(self.targetPath)").message("spec.targetPath is required for a dir pool (the directory that holds the volumes)").field_path(".targetPath"))]
#[x_kube(validation = Rule::new("self.type != 'netfs' || (has(self.source) && has(self.source.host) && has(self.source.dir) && has(self.targetPath))").message("a netfs pool needs spec.source.host, spec.source.dir (the export) and spec.targetPath (the mount point)").field_path(".source"))]
#[x_kube(validation = Rule::new("self.type != 'logical' || (has(self.source) && has(self.source.name))").message("a logical pool needs spec.source.name (the LVM volume group)").field_path(".source"))]
#[x_kube(validation = Rule::new("self.type != 'iscsi' || (has(self.source) && has(self.source.host) && has(self.source.target))").message("an iscsi pool needs spec.source.host and spec.source.target (the target IQN)").field_path(".source"))]
#[x_kube(validation = Rule::new("self.type != 'rbd' || (has(self.source) && has(self.source.host) && has(self.source.name))").message("an rbd pool needs spec.source.host (a Ceph monitor) and spec.source.name (the RADOS pool)").field_path(".source"))]
pub struct StoragePoolSpec {
    /// The node this pool lives on. Exactly one of nodeName and nodeSelector is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub node_name: Option<String>,

    /// Create the pool on every KvmNode whose labels contain all of these (e.g. shared NFS on a
    /// group of hosts). Exactly one of nodeName and nodeSelector is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Pool type: `dir` (a directory), `logical` (an LVM volume group), `netfs` (an NFS/CIFS/Gluster
    /// mount), `iscsi` (LUNs of an iSCSI target) or `rbd` (a Ceph RADOS pool).
    #[serde(rename = "type")]
    pub type_: PoolType,

    /// Name of the pool in libvirt. Default: the object's name. Must be unique on each node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    )]
    pub pool_name: Option<String>,

    /// Where the pool's data comes from; which fields apply depends on `type`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PoolSource>,

    /// Local path of the pool: the directory (dir), the mount point (netfs), `/dev/VG` (logical,
    /// default) or `/dev/disk/by-path` (iscsi, default). Not used by rbd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096), regex(pattern = r"^/"))]
    pub target_path: Option<String>,

    /// Start the pool when libvirtd starts. Default true.
    #[serde(default = "default_true")]
    pub autostart: bool,

    /// What happens on the hosts when this object is deleted: `Retain` (default) stops managing the
    /// pool and leaves it defined with its volumes; `Delete` stops and undefines the pool in
    /// libvirt. Volumes and data are never deleted by either policy.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// Whether every node the pool runs on sees the same volumes (NFS, Ceph, iSCSI, or a
    /// cluster file system under a dir pool). Default: true for netfs, rbd and iscsi, false for
    /// dir and logical. Only a VM whose volumes are all on shared pools can be started on another
    /// node after its host failed (see KvmNode spec.outOfService).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<bool>,

    /// When a pool with the same name already exists on a node with a different definition, the
    /// operator reports it and leaves it alone; set this to true to replace its definition
    /// (the pool is stopped and redefined; its volumes stay). Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub overwrite_existing: bool,
}

fn default_true() -> bool {
    true
}

impl StoragePoolSpec {
    /// True when every node the pool runs on sees the same volumes.
    pub fn is_shared(&self) -> bool {
        self.shared.unwrap_or(matches!(
            self.type_,
            PoolType::Netfs | PoolType::Rbd | PoolType::Iscsi
        ))
    }
}

/// libvirt pool types the operator manages.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum PoolType {
    /// A directory on the host.
    Dir,
    /// An LVM volume group; volumes are logical volumes.
    Logical,
    /// A network file system mounted by libvirt (NFS by default).
    Netfs,
    /// LUNs of an iSCSI target.
    Iscsi,
    /// A Ceph RADOS block device pool.
    Rbd,
}

impl PoolType {
    /// The libvirt name of the type.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolType::Dir => "dir",
            PoolType::Logical => "logical",
            PoolType::Netfs => "netfs",
            PoolType::Iscsi => "iscsi",
            PoolType::Rbd => "rbd",
        }
    }
}

/// Retain or delete external state when the object is deleted.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeletionPolicy {
    /// Leave it on the host.
    #[default]
    Retain,
    /// Remove it from the host.
    Delete,
}

/// Source of a pool.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolSource {
    /// Server: the NFS server (netfs), the iSCSI portal (iscsi) or a Ceph monitor (rbd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub host: Option<String>,
    /// Server port, when not the protocol's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// Exported directory on the server (netfs), e.g. `/exports/vms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub dir: Option<String>,
    /// Block devices that make up the volume group (logical), e.g. `/dev/sdb`. When empty, the
    /// volume group must already exist.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub devices: Vec<String>,
    /// Volume group name (logical) or RADOS pool name (rbd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub name: Option<String>,
    /// Source format: `nfs`, `cifs` or `glusterfs` (netfs, default nfs); `lvm2` (logical).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<SourceFormat>,
    /// iSCSI target IQN (iscsi), e.g. `iqn.2024-01.org.example:storage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 223))]
    pub target: Option<String>,
    /// iSCSI initiator IQN to use (iscsi). Default: the host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 223))]
    pub initiator: Option<String>,
    /// Authentication for iscsi (CHAP) or rbd (Ceph): a libvirt secret already defined on the hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<PoolAuth>,
}

/// Formats of a pool source.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    /// NFS export (netfs).
    Nfs,
    /// CIFS/SMB share (netfs).
    Cifs,
    /// GlusterFS volume (netfs).
    Glusterfs,
    /// LVM2 volume group (logical).
    Lvm2,
}

/// Credentials kept in a libvirt secret on each host.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolAuth {
    /// `chap` (iscsi) or `ceph` (rbd).
    #[serde(rename = "type")]
    pub type_: PoolAuthType,
    /// User name (CHAP user or Ceph client, e.g. `libvirt`).
    #[schemars(length(min = 1, max = 253))]
    pub username: String,
    /// Usage name of the libvirt secret that holds the password or key.
    #[schemars(length(min = 1, max = 253))]
    pub secret_usage: String,
}

/// Authentication schemes of pools.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PoolAuthType {
    /// iSCSI CHAP.
    Chap,
    /// Ceph cephx.
    Ceph,
}

/// Pool state on each node.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StoragePoolStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready nodes out of selected nodes, e.g. `2/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_nodes: Option<String>,
    /// One entry per selected node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["node".into()]))]
    pub nodes: Vec<PoolNodeStatus>,
    /// `Ready` is true when the pool runs on every selected node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// The pool on one node.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolNodeStatus {
    /// KvmNode name.
    pub node: String,
    /// Pool state on that node.
    pub state: PoolState,
    /// Total size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<ByteQuantity>,
    /// Space used by volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<ByteQuantity>,
    /// Free space.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available: Option<ByteQuantity>,
    /// Why the pool is not running, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Pool state on a node.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolState {
    /// Not yet defined on the node.
    Pending,
    /// Defined and started.
    Running,
    /// Defined but not started (e.g. the NFS server is unreachable).
    Inactive,
    /// A pool of that name exists with another definition; left alone (see overwriteExisting).
    Conflict,
    /// Defining, building or starting failed; see message.
    Failed,
    /// The node is unreachable; the pool's state is not known.
    Unknown,
}

impl StoragePoolSpec {
    /// Checks the spec; see [`crate::api::validation`].
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut e = FieldErrors::default();
        match (&self.node_name, &self.node_selector) {
            (Some(_), Some(_)) | (None, None) => e.push(
                "spec.nodeName",
                "set exactly one of spec.nodeName (one node) or spec.nodeSelector (every matching node)",
            ),
            (_, Some(sel)) => check_labels(&mut e, "spec.nodeSelector", sel),
            (Some(n), None) => check_object_name(&mut e, "spec.nodeName", "KvmNode", n),
        }
        if let Some(n) = &self.pool_name {
            check_libvirt_name(&mut e, "spec.poolName", n);
            if n.starts_with(|c: char| !c.is_ascii_alphanumeric()) {
                e.push("spec.poolName", "must start with a letter or digit");
            }
        }
        if let Some(p) = &self.target_path {
            check_abs_path(&mut e, "spec.targetPath", p);
        }
        let src = self.source.clone().unwrap_or_default();
        if let Some(h) = &src.host {
            check_host(&mut e, "spec.source.host", h);
        }
        if let Some(d) = &src.dir {
            check_abs_path(&mut e, "spec.source.dir", d);
        }
        for (i, d) in src.devices.iter().enumerate() {
            check_abs_path(&mut e, &format!("spec.source.devices[{i}]"), d);
        }
        if let Some(n) = &src.name {
            // a volume group or RADOS pool: libvirt passes it to vgchange, rbd and the like
            let before = e.0.len();
            check_libvirt_name(&mut e, "spec.source.name", n);
            if e.0.len() == before {
                check_word(&mut e, "spec.source.name", n, 128);
            }
        }
        if let Some(t) = &src.target {
            check_word(&mut e, "spec.source.target", t, 223);
        }
        if let Some(i) = &src.initiator {
            check_word(&mut e, "spec.source.initiator", i, 223);
        }
        if let Some(a) = &src.auth {
            check_word(&mut e, "spec.source.auth.username", &a.username, 253);
            check_word(&mut e, "spec.source.auth.secretUsage", &a.secret_usage, 253);
        }
        let need = |e: &mut FieldErrors, ok: bool, field: &str, why: &str| {
            if !ok {
                e.push(
                    field,
                    format!("is required for a {} pool: {why}", self.type_.as_str()),
                );
            }
        };
        match self.type_ {
            PoolType::Dir => need(
                &mut e,
                self.target_path.is_some(),
                "spec.targetPath",
                "the directory that holds the volumes",
            ),
            PoolType::Netfs => {
                need(
                    &mut e,
                    src.host.is_some(),
                    "spec.source.host",
                    "the file server",
                );
                need(
                    &mut e,
                    src.dir.is_some(),
                    "spec.source.dir",
                    "the exported directory",
                );
                need(
                    &mut e,
                    self.target_path.is_some(),
                    "spec.targetPath",
                    "the local mount point",
                );
                if matches!(src.format, Some(SourceFormat::Lvm2)) {
                    e.push(
                        "spec.source.format",
                        "lvm2 is for logical pools: use nfs, cifs or glusterfs",
                    );
                }
            }
            PoolType::Logical => {
                need(
                    &mut e,
                    src.name.is_some(),
                    "spec.source.name",
                    "the LVM volume group",
                );
                if matches!(src.format, Some(f) if f != SourceFormat::Lvm2) {
                    e.push("spec.source.format", "a logical pool's format is lvm2");
                }
            }
            PoolType::Iscsi => {
                need(
                    &mut e,
                    src.host.is_some(),
                    "spec.source.host",
                    "the iSCSI portal",
                );
                need(
                    &mut e,
                    src.target.is_some(),
                    "spec.source.target",
                    "the target IQN",
                );
            }
            PoolType::Rbd => {
                need(
                    &mut e,
                    src.host.is_some(),
                    "spec.source.host",
                    "a Ceph monitor",
                );
                need(
                    &mut e,
                    src.name.is_some(),
                    "spec.source.name",
                    "the RADOS pool",
                );
            }
        }
        if let Some(a) = &src.auth {
            let fits = matches!(
                (self.type_, a.type_),
                (PoolType::Iscsi, PoolAuthType::Chap) | (PoolType::Rbd, PoolAuthType::Ceph)
            );
            if !fits {
                e.push(
                    "spec.source.auth.type",
                    format!("{:?} authentication does not apply to a {} pool (chap is for iscsi, ceph for rbd)", a.type_, self.type_.as_str()),
                );
            }
        }
        e.into_result()
    }
}
