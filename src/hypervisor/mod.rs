//! The only code that talks to libvirt and SSH.
//!
//! - [`ssh`]: host-key pinning, authenticated sessions and the fixed remote commands (`ssh2`).
//! - [`host_facts`]: CPUs, memory, load, CPU use, KVM and versions, read over SSH.
//! - [`uri`]: libvirt URIs built from a KvmNode's spec.
//! - [`connection`]: a libvirt connection to one node and the domain operations on it.
//! - [`cache`]: one cached connection per node; calls on `spawn_blocking` with timeouts, reconnect with backoff.
//! - [`domain_xml`]: the typed domain XML model.
//! - [`domain_spec`]: a resolved VM spec to domain XML, the host's XML back to an observed spec, drift.
//! - [`storage`]: pools and volumes (typed XML and operations).
//! - [`migration`]: live and cold migration, job progress, abort.
//! - [`cloud_init`]: NoCloud seed ISO images built in Rust.
//! - [`tunnel`]: local sockets forwarded through our own SSH session (libvirt RPC, VNC).
//! - [`events`]: domain lifecycle events of a node, re-subscribed after reconnects.
//! - [`ffi`]: the only `unsafe` code: libvirt's event loop, domain events, bulk stats, and
//!   glibc's arena limit for what libvirt's calls allocate.
//! - [`stats`]: typed per-domain stats from one call per node.

pub mod cache;
pub mod cloud_init;
pub mod connection;
pub mod console;
pub mod domain_spec;
pub mod domain_xml;
pub mod events;
pub mod ffi;
pub mod host_facts;
pub mod migration;
pub mod ssh;
pub mod stats;
pub mod storage;
pub mod tunnel;
pub mod uri;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use connection::{
    BulkListing, Connection, DeviceScope, DiskHolder, DomainInfo, DomainReading, DomainState,
    DomainSummary, ShutdownOutcome, StateDetail,
};

use crate::api::kvm_node::KvmNodeSpec;
use ssh::HostKeyPolicy;
use uri::{NodeTarget, Transport};

/// What the controllers use of the hypervisors: operations addressed by node name, run with the
/// connection cache's timeouts, backoff and concurrency limits. The closure receives a
/// [`Connection`], whose methods are the typed operations of this module (controllers never build
/// XML, URIs or commands). [`cache::NodePool`] is the implementation; a KvmNode whose
/// `libvirtUri` is `test:///default` makes it a cheap real backend for controller tests.
pub trait Hypervisor: Send + Sync + 'static {
    /// Runs `f` on `node`'s connection.
    fn call<T, F>(
        &self,
        node: &str,
        op: &'static str,
        f: F,
    ) -> impl std::future::Future<Output = Result<T, HvError>> + Send
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, HvError> + Send + 'static;

    /// Runs `f` on the connection `node`'s domain events are followed on (the same one as
    /// long as it works). By default the same as [`Hypervisor::call`].
    fn call_events<T, F>(
        &self,
        node: &str,
        op: &'static str,
        f: F,
    ) -> impl std::future::Future<Output = Result<T, HvError>> + Send
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, HvError> + Send + 'static,
    {
        self.call(node, op, f)
    }

    /// Runs `f` on the connections of two nodes (migration).
    fn call_pair<T, F>(
        &self,
        a: &str,
        b: &str,
        op: &'static str,
        f: F,
    ) -> impl std::future::Future<Output = Result<T, HvError>> + Send
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Connection) -> Result<T, HvError> + Send + 'static;

    /// CPUs, memory, load, CPU use over `interval`, KVM and versions of `node`.
    fn host_facts(
        &self,
        node: &str,
        interval: Duration,
    ) -> impl std::future::Future<Output = Result<(host_facts::HostFacts, Option<u32>), HvError>> + Send;

    /// Names of the domains on `node` that carry the ownership stamp `uid`, from the node's
    /// stamp index while it is fresh (see [`cache::NodePool::stamped`]).
    fn stamped(
        &self,
        node: &str,
        uid: &str,
    ) -> impl std::future::Future<Output = Result<Vec<String>, HvError>> + Send;
}

impl Hypervisor for cache::NodePool {
    fn call<T, F>(
        &self,
        node: &str,
        op: &'static str,
        f: F,
    ) -> impl std::future::Future<Output = Result<T, HvError>> + Send
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, HvError> + Send + 'static,
    {
        cache::NodePool::call(self, node, op, f)
    }

    fn call_events<T, F>(
        &self,
        node: &str,
        op: &'static str,
        f: F,
    ) -> impl std::future::Future<Output = Result<T, HvError>> + Send
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, HvError> + Send + 'static,
    {
        cache::NodePool::call_events(self, node, op, f)
    }

    fn call_pair<T, F>(
        &self,
        a: &str,
        b: &str,
        op: &'static str,
        f: F,
    ) -> impl std::future::Future<Output = Result<T, HvError>> + Send
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Connection) -> Result<T, HvError> + Send + 'static,
    {
        cache::NodePool::call_pair(self, a, b, op, f)
    }

    fn host_facts(
        &self,
        node: &str,
        interval: Duration,
    ) -> impl std::future::Future<Output = Result<(host_facts::HostFacts, Option<u32>), HvError>> + Send
    {
        cache::NodePool::host_facts(self, node, interval)
    }

    fn stamped(
        &self,
        node: &str,
        uid: &str,
    ) -> impl std::future::Future<Output = Result<Vec<String>, HvError>> + Send {
        cache::NodePool::stamped(self, node, uid)
    }
}

/// Errors of the hypervisor layer. Every message names the host (or object) and the cause.
#[derive(Debug, thiserror::Error)]
pub enum HvError {
    #[error("{target} is unreachable: {cause}; check the address, port and firewall")]
    Unreachable { target: String, cause: String },
    #[error("SSH to {target} failed: {cause}")]
    Ssh { target: String, cause: String },
    #[error("SSH to {target} was refused: {cause}")]
    AuthFailed { target: String, cause: String },
    #[error(
        "host key of {target} does not match: expected {expected}, the host presented {actual}; if the host was reinstalled, update spec.hostKeyFingerprint, otherwise someone may be intercepting the connection"
    )]
    HostKeyMismatch {
        target: String,
        expected: String,
        actual: String,
    },
    #[error("libvirt {op} on {target} failed: {cause}")]
    Libvirt {
        op: &'static str,
        target: String,
        cause: String,
        /// libvirt's error code (virErrorNumber), 0 when none.
        code: i32,
    },
    #[error("{what} is not valid domain XML: {cause}")]
    Xml { what: String, cause: String },
    #[error("{field} is invalid: {cause}")]
    InvalidTarget { field: &'static str, cause: String },
    #[error("{cause}")]
    Local { cause: String },
    #[error("{what} was not found on {target}")]
    NotFound { what: String, target: String },
    #[error("{op} on {target} did not finish within {secs}s")]
    Timeout {
        op: &'static str,
        target: String,
        secs: u64,
    },
}

/// Longest libvirt message kept (QEMU's log can be quoted whole into one).
const MESSAGE_MAX_CHARS: usize = 2000;

/// A libvirt message as it may go into status, Events and logs: line breaks kept, every other
/// control character (escape sequences, NUL, carriage returns from a guest's serial output in
/// QEMU's log) shown as U+FFFD, and at most [`MESSAGE_MAX_CHARS`] characters.
pub fn clean_message(msg: &str) -> String {
    let mut out: String = msg
        .chars()
        .take(MESSAGE_MAX_CHARS)
        .map(|c| {
            if c.is_control() && c != '\n' {
                '\u{FFFD}'
            } else {
                c
            }
        })
        .collect();
    if msg.chars().nth(MESSAGE_MAX_CHARS).is_some() {
        out.push('…');
    }
    out
}

impl HvError {
    /// A libvirt error from `op` on `target` (a node name, or `a -> b` for migrations).
    pub fn libvirt(op: &'static str, target: impl Into<String>, e: &virt::error::Error) -> Self {
        HvError::Libvirt {
            op,
            target: target.into(),
            cause: clean_message(e.message()),
            code: e.code().to_raw() as i32,
        }
    }

    /// libvirt refused because another job holds the domain for now (a migration job still
    /// winding down on either host, the domain's state change lock): nothing was done, and the
    /// same call can be tried again shortly.
    pub fn is_busy(&self) -> bool {
        match self {
            HvError::Libvirt { code, cause, .. } => {
                (*code == virt::sys::VIR_ERR_OPERATION_INVALID as i32
                    && cause.contains("job is already running"))
                    || (*code == virt::sys::VIR_ERR_OPERATION_TIMEOUT as i32
                        && cause.contains("cannot acquire state change lock"))
            }
            _ => false,
        }
    }

    /// Static CamelCase reason: the Event reason, condition reason and metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            HvError::Unreachable { .. } => "HostUnreachable",
            HvError::Ssh { .. } => "SshFailed",
            HvError::AuthFailed { .. } => "AuthFailed",
            HvError::HostKeyMismatch { .. } => "HostKeyMismatch",
            HvError::Libvirt { .. } => "LibvirtError",
            HvError::Xml { .. } => "InvalidXml",
            HvError::InvalidTarget { .. } => "InvalidSpec",
            HvError::Local { .. } => "LocalError",
            HvError::NotFound { .. } => "NotFound",
            HvError::Timeout { .. } => "Timeout",
        }
    }

    /// True when retrying later may succeed (network, daemon restarts); false for errors that
    /// need a spec change or a human (host key mismatch, invalid spec).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            HvError::Unreachable { .. }
                | HvError::Ssh { .. }
                | HvError::Libvirt { .. }
                | HvError::Timeout { .. }
                | HvError::Local { .. }
        )
    }
}

/// TLS client material for qemu+tls (PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct TlsMaterial {
    /// CA certificate that signed the host's libvirtd certificate.
    pub ca_cert: Vec<u8>,
    pub client_cert: Vec<u8>,
    pub client_key: Vec<u8>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsMaterial { <redacted> }")
    }
}

/// How to reach one node: its spec and where its private files live.
#[derive(Clone)]
pub struct NodeAccess {
    /// KvmNode name (for messages and file names).
    pub name: String,
    pub spec: KvmNodeSpec,
    /// Private key (PEM/OpenSSH) from the node's Secret; never logged.
    pub private_key: Option<Vec<u8>>,
    /// Directory for the node's key and pinned known_hosts (created 0700).
    pub state_dir: PathBuf,
    /// TLS client material from the node's TLS Secret (qemu+tls).
    pub tls: Option<TlsMaterial>,
    /// Timeout for connecting and for the SSH handshake.
    pub timeout: Duration,
}

// Keys never reach a log: Debug shows whether they are present, not what they are.
impl std::fmt::Debug for NodeAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeAccess")
            .field("name", &self.name)
            .field("spec", &self.spec)
            .field(
                "private_key",
                &self.private_key.as_ref().map(|_| "<redacted>"),
            )
            .field("tls", &self.tls.as_ref().map(|_| "<redacted>"))
            .field("state_dir", &self.state_dir)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Connects to a node: checks the pinned host key over SSH, writes the key material into the
/// node's private directory, and opens libvirt with a URI that pins the same host key.
pub fn connect_node(access: &NodeAccess) -> Result<Connection, HvError> {
    connect_node_as(access, "main")
}

/// [`connect_node`] for one of several connections to the same node open at once: `label`
/// (a short fixed word or number) keeps their local tunnel sockets apart.
pub fn connect_node_as(access: &NodeAccess, label: &str) -> Result<Connection, HvError> {
    let mut target = NodeTarget::from_spec(&access.spec)?;
    if target.transport.uses_ssh() {
        let (policy, pem) = ssh_credentials(access)?;
        let name_ssh = |e: HvError| match e {
            HvError::Ssh { target, cause } => HvError::Ssh {
                target: format!("KvmNode {} ({target})", access.name),
                cause,
            },
            HvError::AuthFailed { target, cause } => HvError::AuthFailed {
                target: format!("KvmNode {} ({target})", access.name),
                cause,
            },
            other => other,
        };
        if target.transport == Transport::SshTunnel {
            // host key checked and key used in memory, on the session that carries libvirt
            let session = ssh_session(access, &target).map_err(name_ssh)?;
            let out = session
                .run(ssh::RemoteCommand::LibvirtSocket)
                .map_err(name_ssh)?;
            let remote = out.stdout.trim().to_string();
            if out.status != 0 || !remote.starts_with("/var/run/libvirt/") {
                return Err(HvError::Ssh {
                    target: format!("KvmNode {} ({})", access.name, session.target()),
                    cause: "no libvirt socket on the host (/var/run/libvirt/virtqemud-sock or libvirt-sock): is libvirt installed and running?".into(),
                });
            }
            let dir = node_dir(&access.state_dir, &access.name)?;
            let local = dir.join(format!("libvirt-{label}.sock"));
            let t = tunnel::Tunnel::start(session, tunnel::Remote::UnixSocket(remote), &local)?;
            let uri = format!("qemu+unix:///system?socket={}", local.display());
            return Connection::open(&uri, &access.name).map(|c| c.with_tunnel(t));
        }
        ssh::verify_host_key(&target.address, target.port, &policy, access.timeout)
            .map_err(name_ssh)
            .and_then(|key| {
                let dir = node_dir(&access.state_dir, &access.name)?;
                let kh = dir.join("known_hosts");
                ssh::write_private_file(
                    &kh,
                    ssh::known_hosts_line(&target.address, target.port, &key).as_bytes(),
                )?;
                let keyfile = dir.join("id");
                ssh::write_private_file(&keyfile, pem)?;
                target.keyfile = Some(keyfile);
                if target.transport == Transport::LibSsh {
                    target.known_hosts = Some(kh);
                }
                Ok(())
            })?;
    }
    if target.transport == Transport::Tls {
        let tls = access.tls.as_ref().ok_or_else(|| HvError::InvalidTarget {
            field: "spec.tlsSecretRef",
            cause: format!("KvmNode {:?}: qemu+tls needs ca.crt, tls.crt and tls.key from the referenced Secret", access.name),
        })?;
        // libvirt reads these three names from the directory named by pkipath
        let dir = node_dir(&access.state_dir, &access.name)?;
        ssh::write_private_file(&dir.join("cacert.pem"), &tls.ca_cert)?;
        ssh::write_private_file(&dir.join("clientcert.pem"), &tls.client_cert)?;
        ssh::write_private_file(&dir.join("clientkey.pem"), &tls.client_key)?;
        target.pkipath = Some(dir);
    }
    Connection::open(&target.uri(), &access.name)
}

/// The host key policy and private key an SSH connection to this node uses; an error names the
/// spec field to fix.
pub(crate) fn ssh_credentials(access: &NodeAccess) -> Result<(HostKeyPolicy, &[u8]), HvError> {
    let policy = match (
        &access.spec.host_key_fingerprint,
        access.spec.insecure_skip_host_key_verification,
    ) {
        (Some(fp), _) => HostKeyPolicy::Pinned(fp.clone()),
        (None, true) => HostKeyPolicy::AcceptAny,
        (None, false) => {
            return Err(HvError::InvalidTarget {
                field: "spec.hostKeyFingerprint",
                cause: format!(
                    "KvmNode {:?} has no pinned host key; set spec.hostKeyFingerprint (or spec.insecureSkipHostKeyVerification: true)",
                    access.name
                ),
            });
        }
    };
    let pem = access
        .private_key
        .as_deref()
        .ok_or_else(|| HvError::InvalidTarget {
            field: "spec.sshKeySecretRef",
            cause: format!(
                "KvmNode {:?}: no private key was found in the referenced Secret",
                access.name
            ),
        })?;
    Ok((policy, pem))
}

/// An SSH session to the node at `target`, with the node's pinned host key and private key.
pub(crate) fn ssh_session(
    access: &NodeAccess,
    target: &NodeTarget,
) -> Result<ssh::SshSession, HvError> {
    let (policy, pem) = ssh_credentials(access)?;
    ssh::SshSession::connect(
        &target.address,
        target.port,
        &target.user,
        pem,
        &policy,
        access.timeout,
    )
}

fn node_dir(state_dir: &Path, node: &str) -> Result<PathBuf, HvError> {
    use std::os::unix::fs::DirBuilderExt;
    if !crate::api::validation::is_dns_label(node)
        && !node.split('.').all(crate::api::validation::is_dns_label)
    {
        return Err(HvError::InvalidTarget {
            field: "metadata.name",
            cause: format!("{node:?} cannot name a directory"),
        });
    }
    let dir = state_dir.join(node);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| HvError::Local {
            cause: format!("cannot create {}: {e}", dir.display()),
        })?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::HvError;

    #[test]
    fn libvirt_messages_lose_control_characters_and_length_but_keep_lines() {
        let raw = "internal error: qemu unexpectedly closed the monitor:\n\u{1b}[31mboot\u{1b}[0m\r\u{0}done";
        let clean = super::clean_message(raw);
        assert_eq!(
            clean,
            "internal error: qemu unexpectedly closed the monitor:\n\u{FFFD}[31mboot\u{FFFD}[0m\u{FFFD}\u{FFFD}done"
        );
        assert!(!clean.chars().any(|c| c.is_control() && c != '\n'));
        let long = "x".repeat(10_000);
        let cut = super::clean_message(&long);
        assert_eq!(cut.chars().count(), super::MESSAGE_MAX_CHARS + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(super::clean_message("short"), "short");
    }

    fn libvirt(code: u32, cause: &str) -> HvError {
        HvError::Libvirt {
            op: "migrate",
            target: "a -> b".into(),
            cause: cause.into(),
            code: code as i32,
        }
    }

    #[test]
    fn only_a_domain_held_by_another_job_is_busy() {
        use virt::sys::{
            VIR_ERR_OPERATION_FAILED, VIR_ERR_OPERATION_INVALID, VIR_ERR_OPERATION_TIMEOUT,
        };
        assert!(libvirt(VIR_ERR_OPERATION_INVALID, "Requested operation is not valid: another migration job is already running for domain 'x'").is_busy());
        assert!(libvirt(VIR_ERR_OPERATION_TIMEOUT, "Timed out during operation: cannot acquire state change lock (held by monitor=remoteDispatchDomainMigratePerform3Params)").is_busy());
        // the same codes for other causes are real failures
        assert!(
            !libvirt(
                VIR_ERR_OPERATION_INVALID,
                "Requested operation is not valid: domain is not running"
            )
            .is_busy()
        );
        assert!(
            !libvirt(
                VIR_ERR_OPERATION_FAILED,
                "another migration job is already running"
            )
            .is_busy()
        );
        assert!(
            !HvError::Local {
                cause: "job is already running".into()
            }
            .is_busy()
        );
    }
}
