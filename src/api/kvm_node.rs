//! `KvmNode`: one hypervisor host the operator reaches over SSH and libvirt.
// kube's `printcolumn(...)` arguments repeat `type_ = "string"` by design; clippy reads them
// as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::condition::{Condition, Time};
use super::quantity::ByteQuantity;
use super::validation::{
    FieldErrors, check_host, check_object_name, check_secret_key, is_dns_label,
};

/// A KVM hypervisor host managed agentlessly over SSH and libvirt.
///
/// Nodes are grouped and selected by their `metadata.labels` (for example
/// `kvm-operator.io/group: rack-1`); `VirtualMachine.spec.placement.nodeSelector` and
/// `StoragePool.spec.nodeSelector` match those labels.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kvm-operator.io",
    version = "v1alpha1",
    kind = "KvmNode",
    plural = "kvmnodes",
    shortname = "kvmnode",
    shortname = "kn",
    category = "kvm",
    status = "KvmNodeStatus",
    doc = "A KVM hypervisor host that the operator manages over SSH and libvirt.",
    printcolumn(name = "Address", type_ = "string", json_path = ".spec.address"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Maintenance",
        type_ = "boolean",
        json_path = ".spec.maintenance"
    ),
    printcolumn(name = "VMs", type_ = "integer", json_path = ".status.vms.running"),
    printcolumn(name = "Load", type_ = "string", json_path = ".status.load.load1"),
    printcolumn(
        name = "Mem Free",
        type_ = "string",
        json_path = ".status.load.memoryFree"
    ),
    printcolumn(
        name = "Libvirt",
        type_ = "string",
        json_path = ".status.libvirtVersion",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.hostKeyFingerprint) || (has(self.insecureSkipHostKeyVerification) && self.insecureSkipHostKeyVerification) || (has(self.libvirtUri) && (self.libvirtUri.startsWith('test:') || self.libvirtUri.startsWith('qemu+tls:') || self.libvirtUri.startsWith('qemu+tcp:')))").message("spec.hostKeyFingerprint is required for SSH transports: set it to the host's SHA256 key fingerprint (ssh-keyscan HOST | ssh-keygen -lf -), or set spec.insecureSkipHostKeyVerification: true to trust any key").field_path(".hostKeyFingerprint"))]
#[x_kube(validation = Rule::new("!has(self.libvirtUri) || !self.libvirtUri.startsWith('qemu+tls:') || has(self.tlsSecretRef)").message("spec.tlsSecretRef is required for qemu+tls: name a Secret with ca.crt, tls.crt and tls.key").field_path(".tlsSecretRef"))]
#[x_kube(validation = Rule::new("has(self.sshKeySecretRef) || (has(self.libvirtUri) && (self.libvirtUri.startsWith('test:') || self.libvirtUri.startsWith('qemu+tls:') || self.libvirtUri.startsWith('qemu+tcp:')))").message("spec.sshKeySecretRef is required for SSH transports: name a Secret holding the private key").field_path(".sshKeySecretRef"))]
pub struct KvmNodeSpec {
    /// Host name or IP address of the host's SSH server (and of libvirt, for qemu+tls and qemu+tcp).
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[A-Za-z0-9.:][A-Za-z0-9.:-]*$")
    )]
    pub address: String,

    /// SSH port on the host. Default 22.
    #[serde(default = "default_ssh_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,

    /// SSH user that may run libvirt on the host (root, or a member of the `libvirt` group). Default `root`.
    #[serde(default = "default_user")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z_][a-z0-9_.-]*\$?$"))]
    pub user: String,

    /// Secret that holds the SSH private key (type `kubernetes.io/ssh-auth` works as is).
    /// Required for the SSH transports; ignored for `test:///` URIs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_key_secret_ref: Option<SecretKeyRef>,

    /// Secret with the operator's TLS client certificate for `qemu+tls` URIs: keys `ca.crt` (the
    /// CA that signed the host's libvirtd certificate), `tls.crt` and `tls.key` (a
    /// `kubernetes.io/tls` Secret with `ca.crt` added). Required for qemu+tls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_ref: Option<SecretRef>,

    /// The host's SSH key fingerprint, `SHA256:` followed by 43 base64 characters, as printed by
    /// `ssh-keygen -lf`. The operator refuses to talk to a host whose key does not match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^SHA256:[A-Za-z0-9+/]{43}$"))]
    pub host_key_fingerprint: Option<String>,

    /// Trust whatever host key the host presents. Only for labs: it allows a man in the middle to
    /// take the SSH key and control the host's VMs. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_host_key_verification: bool,

    /// How libvirt is reached. Default (unset): libvirt's RPC carried through the operator's own
    /// SSH session to address:port as user, with the host key checked on that session and the
    /// private key kept in memory. Set it to use one of libvirt's transports instead: `qemu+libssh`,
    /// `qemu+ssh` (the `ssh` program; its own known_hosts applies), `qemu+tls` (client certificates
    /// from tlsSecretRef), `qemu+tcp` (no authentication: trusted networks only) or `test`
    /// (libvirt's built-in test driver, to try the operator without a host), e.g.
    /// `qemu+tls://hv1.example.org/system` or `test:///default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 1024),
        regex(
            pattern = r"^(qemu\+ssh|qemu\+libssh|qemu\+tls|qemu\+tcp)://[^\s]*$|^test:///[^\s]*$"
        )
    )]
    pub libvirt_uri: Option<String>,

    /// Cordon the node: no new VM is placed on it, and the operator migrates its VMs to other
    /// nodes (evacuation). Set back to false to return the node to service.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub maintenance: bool,

    /// The administrator's word that this host is down for good and fenced: powered off, or cut
    /// off from every shared storage pool, so none of its guests can still be running or writing
    /// (like Kubernetes' `node.kubernetes.io/out-of-service` taint). While it is true and the
    /// node is not Ready, VMs with `runStrategy: RerunOnFailure` whose volumes are all on shared
    /// StoragePools are started again on another node. The operator never infers this: a host
    /// that merely does not answer may still run its guests, and starting them elsewhere would
    /// run them twice. Set it back to false when the host returns; stale definitions it still
    /// holds of VMs that moved are removed then.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub out_of_service: bool,

    /// How far vCPUs and memory may be overcommitted on this node.
    #[serde(default)]
    pub overcommit: Overcommit,

    /// Resources kept for the host itself (and anything not managed by the operator); they are
    /// subtracted from capacity before overcommit.
    #[serde(default)]
    pub reserved: Reserved,
}

fn default_ssh_port() -> u16 {
    22
}

fn default_user() -> String {
    "root".to_string()
}

/// A key in a Secret.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Namespace of the Secret. Default: the namespace the operator runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
    /// Key within the Secret. Default `ssh-privatekey` (the key of `kubernetes.io/ssh-auth` Secrets).
    #[serde(default = "default_ssh_key_field")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_ssh_key_field() -> String {
    "ssh-privatekey".to_string()
}

/// A Secret by name.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Namespace of the Secret. Default: the namespace the operator runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
}

/// Overcommit ratios: allocatable = (capacity - reserved) × ratio.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Overcommit {
    /// vCPUs per physical CPU thread, from 0.1 to 64. Default 4.
    #[serde(default = "default_cpu_ratio")]
    #[schemars(range(min = 0.1, max = 64.0))]
    pub cpu: f64,
    /// Guest memory per byte of host memory, from 0.1 to 4. Default 1 (no memory overcommit).
    #[serde(default = "default_memory_ratio")]
    #[schemars(range(min = 0.1, max = 4.0))]
    pub memory: f64,
}

impl Default for Overcommit {
    fn default() -> Self {
        Self {
            cpu: default_cpu_ratio(),
            memory: default_memory_ratio(),
        }
    }
}

fn default_cpu_ratio() -> f64 {
    4.0
}

fn default_memory_ratio() -> f64 {
    1.0
}

/// Resources reserved for the host.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Reserved {
    /// CPU threads kept for the host. Default 0.
    #[serde(default)]
    #[schemars(range(max = 4096))]
    pub cpus: u32,
    /// Memory kept for the host, e.g. `2Gi`. Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteQuantity>,
}

/// What the operator observed on the host.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KvmNodeStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Physical resources of the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<NodeResources>,
    /// What VMs may use: (capacity - reserved) × overcommit ratio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocatable: Option<NodeResources>,
    /// Sum of the vCPUs and memory of the operator's VMs on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<NodeResources>,
    /// Live load of the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<NodeLoad>,
    /// libvirt daemon version on the host, e.g. `9.0.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_version: Option<String>,
    /// QEMU version on the host, e.g. `7.2.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_version: Option<String>,
    /// `kvm` when the host has hardware virtualisation (`/dev/kvm`), `qemu` when guests run under
    /// software emulation (much slower), `test` for libvirt's test driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor: Option<String>,
    /// Counts of domains on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<VmCounts>,
    /// Domains on the host that the operator does not manage (at most 100 are listed). Adopt one
    /// with a VirtualMachine whose `spec.adopt` names it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unmanaged_domains: Vec<UnmanagedDomain>,
    /// When the operator last heard from the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<Time>,
    /// `Reachable` (libvirt connection works) and `Ready` (the node can take VMs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// CPU threads and memory.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeResources {
    /// CPU threads (or vCPUs, for allocatable and allocated).
    pub cpus: u32,
    /// Memory.
    pub memory: ByteQuantity,
}

/// Live load of a host.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeLoad {
    /// 1-minute load average, as text (e.g. `0.42`).
    pub load1: String,
    /// 5-minute load average.
    pub load5: String,
    /// 15-minute load average.
    pub load15: String,
    /// CPU use over the last sampling interval, in percent of all threads (0-100).
    pub cpu_usage_percent: u32,
    /// Memory the host reports as available.
    pub memory_free: ByteQuantity,
}

/// Domains on the host, by kind.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VmCounts {
    /// All domains defined or running on the host.
    pub total: u32,
    /// Running domains (ours or not).
    pub running: u32,
    /// Domains carrying the operator's ownership stamp.
    pub managed: u32,
    /// Domains without the stamp.
    pub unmanaged: u32,
}

/// A domain the operator found on the host but does not manage.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UnmanagedDomain {
    /// Domain name.
    pub name: String,
    /// Domain UUID.
    pub uuid: String,
    /// Power state as libvirt reports it (running, shutoff, paused, ...).
    pub state: String,
}

impl KvmNodeSpec {
    /// Checks what the schema cannot express and repeats what it does, for specs that did not pass
    /// an apiserver. `name` is the object's name, used in messages.
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut e = FieldErrors::default();
        check_host(&mut e, "spec.address", &self.address);
        if self.port == 0 {
            e.push("spec.port", "must be between 1 and 65535");
        }
        if !valid_user(&self.user) {
            e.push(
                "spec.user",
                format!(
                    "{:?} is not a valid user name (lower-case letters, digits, '_', '.', '-')",
                    self.user
                ),
            );
        }
        let is_test = self
            .libvirt_uri
            .as_deref()
            .is_some_and(|u| u.starts_with("test:"));
        // qemu+tls authenticates the host with certificates, qemu+tcp not at all: no SSH key
        let no_ssh = is_test
            || self
                .libvirt_uri
                .as_deref()
                .is_some_and(|u| u.starts_with("qemu+tls://") || u.starts_with("qemu+tcp://"));
        if let Some(uri) = &self.libvirt_uri {
            const SCHEMES: [&str; 5] = [
                "qemu+ssh://",
                "qemu+libssh://",
                "qemu+tls://",
                "qemu+tcp://",
                "test:///",
            ];
            if !SCHEMES.iter().any(|s| uri.starts_with(s))
                || uri.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                e.push(
                    "spec.libvirtUri",
                    format!("{uri:?} is not supported: use one of qemu+ssh://, qemu+libssh://, qemu+tls://, qemu+tcp:// or test:///"),
                );
            } else if uri.contains(['?', '#']) {
                e.push(
                    "spec.libvirtUri",
                    format!("{uri:?}: query parameters are set by the operator (keys, known_hosts); remove them"),
                );
            } else if let Some((user, _)) = uri
                .split_once("://")
                .and_then(|(_, rest)| rest.split('/').next())
                .and_then(|authority| authority.rsplit_once('@'))
                && !valid_user(user)
            {
                e.push(
                    "spec.libvirtUri",
                    format!("{uri:?}: the user {user:?} is not a valid user name (lower-case letters, digits, '_', '.', '-')"),
                );
            }
        }
        for (field, r) in [
            (
                "spec.sshKeySecretRef",
                self.ssh_key_secret_ref
                    .as_ref()
                    .map(|r| (&r.name, &r.namespace, Some(&r.key))),
            ),
            (
                "spec.tlsSecretRef",
                self.tls_secret_ref
                    .as_ref()
                    .map(|r| (&r.name, &r.namespace, None)),
            ),
        ] {
            let Some((name, namespace, key)) = r else {
                continue;
            };
            check_object_name(&mut e, &format!("{field}.name"), "Secret", name);
            if let Some(ns) = namespace
                && !is_dns_label(ns)
            {
                e.push(
                    format!("{field}.namespace"),
                    format!("{ns:?} is not a namespace name (lower-case letters, digits, '-', at most 63)"),
                );
            }
            if let Some(k) = key {
                check_secret_key(&mut e, &format!("{field}.key"), k);
            }
        }
        match &self.host_key_fingerprint {
            Some(fp) => {
                let ok = fp.strip_prefix("SHA256:").is_some_and(|b| {
                    b.len() == 43
                        && b.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
                });
                if !ok {
                    e.push(
                        "spec.hostKeyFingerprint",
                        format!("{fp:?} is not a SHA256 fingerprint: expected SHA256: and 43 base64 characters, as printed by `ssh-keygen -lf`"),
                    );
                }
            }
            None if !self.insecure_skip_host_key_verification && !no_ssh => e.push(
                "spec.hostKeyFingerprint",
                "is required: set it to the host's SHA256 key fingerprint (ssh-keyscan HOST | ssh-keygen -lf -), or set spec.insecureSkipHostKeyVerification: true to trust any key",
            ),
            None => {}
        }
        let tls = self
            .libvirt_uri
            .as_deref()
            .is_some_and(|u| u.starts_with("qemu+tls://"));
        if tls && self.tls_secret_ref.is_none() {
            e.push(
                "spec.tlsSecretRef",
                "is required for qemu+tls: name a Secret with ca.crt (the CA of the host's certificate), tls.crt and tls.key (the operator's client certificate)",
            );
        }
        if !no_ssh && self.ssh_key_secret_ref.is_none() {
            e.push(
                "spec.sshKeySecretRef",
                "is required for SSH transports: name a Secret holding the private key (kubectl create secret generic NAME --type=kubernetes.io/ssh-auth --from-file=ssh-privatekey=KEYFILE)",
            );
        }
        if !(0.1..=64.0).contains(&self.overcommit.cpu) || self.overcommit.cpu.is_nan() {
            e.push("spec.overcommit.cpu", "must be between 0.1 and 64");
        }
        if !(0.1..=4.0).contains(&self.overcommit.memory) || self.overcommit.memory.is_nan() {
            e.push("spec.overcommit.memory", "must be between 0.1 and 4");
        }
        if self.reserved.cpus > 4096 {
            e.push("spec.reserved.cpus", "must be at most 4096");
        }
        e.into_result()
    }
}

/// A Unix user name as the schema's pattern allows it: a lower-case letter or '_', then
/// lower-case letters, digits, '_', '.', '-', and an optional trailing '$'; at most 64 bytes.
fn valid_user(user: &str) -> bool {
    let body = user.strip_suffix('$').unwrap_or(user);
    user.len() <= 64
        && body.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && body.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        })
}
