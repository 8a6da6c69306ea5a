//! `Migration`: move one VirtualMachine to another KvmNode, live or cold.
// kube's `printcolumn(...)` arguments repeat `type_ = "string"` by design; clippy reads them
// as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::{Condition, Time};
use super::validation::{FieldErrors, is_dns_label};

/// A request to move one VirtualMachine to another node. The spec is immutable: to retry or
/// change it, create a new Migration. Deleting a running Migration aborts it.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kvm-operator.io",
    version = "v1alpha1",
    kind = "Migration",
    plural = "migrations",
    shortname = "kvmmig",
    category = "kvm",
    namespaced,
    status = "MigrationStatus",
    doc = "Moves one VirtualMachine to another KvmNode, live or cold; never lets it run on two hosts.",
    printcolumn(name = "VM", type_ = "string", json_path = ".spec.vmName"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Source", type_ = "string", json_path = ".status.sourceNode"),
    printcolumn(name = "Target", type_ = "string", json_path = ".status.targetNode"),
    printcolumn(
        name = "Progress",
        type_ = "string",
        json_path = ".status.progress.percent"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("self == oldSelf").message("a Migration's spec cannot change: delete it and create a new one"))]
#[x_kube(validation = Rule::new("!(self.mode == 'Cold' && (self.postCopy || self.autoConverge))").message("postCopy and autoConverge apply to live migration only").field_path(".mode"))]
pub struct MigrationSpec {
    /// Name of the VirtualMachine to move, in this namespace.
    #[schemars(length(min = 1, max = 253))]
    pub vm_name: String,

    /// KvmNode to move it to. Default: the scheduler picks the best node other than the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub target_node: Option<String>,

    /// `Auto` (default): live when the VM runs, cold when it is stopped. `Live`: fail rather than
    /// stop the VM. `Cold`: stop the VM, move its definition (and storage, when copyStorage), start
    /// it on the target as its runStrategy says.
    #[serde(default)]
    pub mode: MigrationMode,

    /// Bandwidth limit for the migration stream, in MiB/s. Default: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
    pub bandwidth_mib_per_second: Option<u64>,

    /// Let QEMU throttle the guest's vCPUs when memory changes faster than it can be copied.
    #[serde(default)]
    pub auto_converge: bool,

    /// Switch to post-copy when pre-copy does not converge: the guest runs on the target at once
    /// and pulls its remaining memory; a network failure then loses the guest. Default false.
    #[serde(default)]
    pub post_copy: bool,

    /// Longest pause allowed for the final switch-over, in milliseconds. Default: libvirt's (300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 600000))]
    pub max_downtime_ms: Option<u64>,

    /// Copy the VM's disks to the target (for pools that are not shared between the two nodes).
    /// Default false: the disks must be on storage both nodes see.
    #[serde(default)]
    pub copy_storage: bool,

    /// Abort (and leave the VM running on the source) when the migration takes longer than this,
    /// in seconds. Default 900.
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    pub completion_timeout_seconds: u64,
}

fn default_timeout() -> u64 {
    900
}

/// How to move the VM.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MigrationMode {
    /// Live if running, cold if stopped.
    #[default]
    Auto,
    /// Live only.
    Live,
    /// Stop, move, start.
    Cold,
}

/// Progress and outcome of a migration.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Where the migration is in its life cycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MigrationPhase>,
    /// Node the VM was on when the migration started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,
    /// Node the VM is moving to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// `Live` or `Cold`, once decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_mode: Option<MigrationMode>,
    /// Data moved so far (libvirt's job info).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<MigrationProgress>,
    /// When the migration job started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When it succeeded, failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<Time>,
    /// Guest pause at switch-over, in milliseconds (live migration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Why it failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `Migrating` and `Ready` (true once Succeeded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// Phases of a Migration. Pending → Scheduling → Running → Succeeded | Failed | Cancelled.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MigrationPhase {
    /// Accepted; waiting for the VM to be migratable and for a migration slot.
    Pending,
    /// Choosing and checking the target node.
    Scheduling,
    /// The migration job runs on the source host.
    Running,
    /// The VM runs (or is defined) on the target only.
    Succeeded,
    /// The migration failed; the VM is still on the source.
    Failed,
    /// Aborted by deleting the Migration or by its timeout; the VM is still on the source.
    Cancelled,
}

impl MigrationPhase {
    /// True for the three phases a Migration never leaves.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// Amounts of a migration job.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MigrationProgress {
    /// Bytes to transfer in all (memory, and disks when copying storage).
    pub data_total: u64,
    /// Bytes transferred.
    pub data_processed: u64,
    /// Bytes left.
    pub data_remaining: u64,
    /// Percent done, as text for the printer column (e.g. `42%`).
    pub percent: String,
}

impl MigrationSpec {
    /// Checks the spec; see [`crate::api::validation`].
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut e = FieldErrors::default();
        if self.vm_name.is_empty()
            || self.vm_name.len() > 253
            || !self.vm_name.split('.').all(is_dns_label)
        {
            e.push(
                "spec.vmName",
                format!("{:?} is not the name of a VirtualMachine", self.vm_name),
            );
        }
        if let Some(t) = &self.target_node
            && (t.is_empty() || t.len() > 253 || !t.split('.').all(is_dns_label))
        {
            e.push(
                "spec.targetNode",
                format!("{t:?} is not the name of a KvmNode"),
            );
        }
        if self.mode == MigrationMode::Cold && (self.post_copy || self.auto_converge) {
            e.push("spec.mode", "postCopy and autoConverge apply to live migration only: remove them or use mode Live/Auto");
        }
        if self.bandwidth_mib_per_second == Some(0) {
            e.push(
                "spec.bandwidthMibPerSecond",
                "must be at least 1 (omit it for no limit)",
            );
        }
        if self.max_downtime_ms == Some(0) {
            e.push("spec.maxDowntimeMs", "must be at least 1");
        }
        if !(1..=86400).contains(&self.completion_timeout_seconds) {
            e.push(
                "spec.completionTimeoutSeconds",
                "must be between 1 and 86400",
            );
        }
        e.into_result()
    }
}
