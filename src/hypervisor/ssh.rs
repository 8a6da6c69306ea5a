//! SSH to hypervisor hosts with `ssh2`: pinned host keys first, then everything else.
//!
//! The operator never trusts a host key it was not told about. [`verify_host_key`] performs the
//! SSH handshake only (no authentication, so no credential is offered to an impostor), computes
//! the key's SHA256 fingerprint in the format `ssh-keygen -lf` prints, and compares it with the pin.
//! The verified key is then written into a private known_hosts file that libvirt's libssh
//! transport checks strictly, so the libvirt connection is pinned to the same key.

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use ssh2::{HashType, HostKeyType, Session};

use super::HvError;

/// A host key the host presented.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostKey {
    /// Algorithm name as in known_hosts, e.g. `ssh-ed25519`.
    pub algorithm: &'static str,
    /// The public key blob.
    pub blob: Vec<u8>,
    /// `SHA256:` + unpadded base64 of the SHA-256 of the blob.
    pub fingerprint: String,
}

/// What the operator accepts as the host's key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostKeyPolicy {
    /// Only the key with this SHA256 fingerprint.
    Pinned(String),
    /// Any key (spec.insecureSkipHostKeyVerification): only for labs.
    AcceptAny,
}

fn algorithm(t: HostKeyType) -> &'static str {
    match t {
        HostKeyType::Rsa => "ssh-rsa",
        HostKeyType::Dss => "ssh-dss",
        HostKeyType::Ecdsa256 => "ecdsa-sha2-nistp256",
        HostKeyType::Ecdsa384 => "ecdsa-sha2-nistp384",
        HostKeyType::Ecdsa521 => "ecdsa-sha2-nistp521",
        HostKeyType::Ed25519 => "ssh-ed25519",
        HostKeyType::Unknown => "unknown",
    }
}

/// `SHA256:<base64>` of raw SHA-256 bytes, as OpenSSH prints fingerprints.
pub fn format_fingerprint(sha256: &[u8]) -> String {
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(sha256)
    )
}

/// Opens a TCP connection with a connect timeout, trying every resolved address.
pub fn connect_tcp(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, HvError> {
    let target = format!("{host}:{port}");
    let addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| HvError::Unreachable {
            target: target.clone(),
            cause: format!("cannot resolve: {e}"),
        })?;
    let mut last = String::from("no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                s.set_read_timeout(Some(timeout)).ok();
                s.set_write_timeout(Some(timeout)).ok();
                return Ok(s);
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(HvError::Unreachable {
        target,
        cause: last,
    })
}

/// TCP connect and SSH handshake, then the host key checked against `policy`. Nothing is sent
/// that authenticates us before this returns.
fn handshake(
    host: &str,
    port: u16,
    policy: &HostKeyPolicy,
    timeout: Duration,
) -> Result<(Session, HostKey, TcpStream), HvError> {
    let target = format!("{host}:{port}");
    let ssh_err = |cause: String| HvError::Ssh {
        target: target.clone(),
        cause,
    };
    let tcp = connect_tcp(host, port, timeout)?;
    // a second handle on the same socket, to wait for it with poll(2) when tunnelling
    let watch = tcp
        .try_clone()
        .map_err(|e| ssh_err(format!("cannot clone the socket: {e}")))?;
    let mut sess = Session::new().map_err(|e| ssh_err(e.to_string()))?;
    sess.set_tcp_stream(tcp);
    sess.set_timeout(u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX));
    sess.handshake()
        .map_err(|e| ssh_err(format!("SSH handshake failed: {e}")))?;
    let (blob, kind) = sess
        .host_key()
        .ok_or_else(|| ssh_err("the server presented no host key".into()))?;
    let blob = blob.to_vec();
    let sha = sess
        .host_key_hash(HashType::Sha256)
        .ok_or_else(|| ssh_err("libssh2 cannot compute a SHA256 host key hash".into()))?;
    let key = HostKey {
        algorithm: algorithm(kind),
        blob,
        fingerprint: format_fingerprint(sha),
    };
    match policy {
        HostKeyPolicy::Pinned(want) if *want != key.fingerprint => Err(HvError::HostKeyMismatch {
            target,
            expected: want.clone(),
            actual: key.fingerprint,
        }),
        _ => Ok((sess, key, watch)),
    }
}

/// Handshakes with the host's sshd and checks its key against `policy`. No authentication is
/// attempted. Returns the key so it can be pinned for libvirt's own connection.
pub fn verify_host_key(
    host: &str,
    port: u16,
    policy: &HostKeyPolicy,
    timeout: Duration,
) -> Result<HostKey, HvError> {
    let (sess, key, _) = handshake(host, port, policy, timeout)?;
    sess.disconnect(None, "host key checked", None).ok();
    Ok(key)
}

/// One known_hosts line for `key` at `host:port` (`[host]:port` form when the port is not 22).
pub fn known_hosts_line(host: &str, port: u16, key: &HostKey) -> String {
    let h = if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    };
    format!(
        "{h} {} {}\n",
        key.algorithm,
        base64::engine::general_purpose::STANDARD.encode(&key.blob)
    )
}

/// Writes a file readable by the owner only (keys, known_hosts), replacing it atomically.
pub fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), HvError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e: std::io::Error| HvError::Local {
        cause: format!("cannot write {}: {e}", path.display()),
    };
    // a name of its own: two connections to one node may write the same file at once
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(contents).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Commands the operator runs on hosts. Each renders to a fixed string: no value from a spec or
/// from the host ever reaches a remote shell line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteCommand {
    /// Everything [`super::host_facts::HostFacts`] needs, in one round trip, with markers.
    HostFacts,
    /// [`RemoteCommand::HostFacts`] without the versions: the `/proc` files and `/dev/kvm`
    /// only (starting the libvirt and QEMU binaries for their versions is most of the cost).
    HostLoad,
    /// Restart the libvirt daemon through systemd.
    RestartDaemon(LibvirtDaemon),
    /// Print the path of the libvirt socket that serves qemu:///system (modular virtqemud
    /// first, then the monolithic libvirtd).
    LibvirtSocket,
}

/// libvirt daemons a host may run: the monolithic one or the modular QEMU driver daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LibvirtDaemon {
    Libvirtd,
    Virtqemud,
}

/// Marker printed before each section of the facts script.
pub const SECTION: &str = "==> ";

impl RemoteCommand {
    /// The exact line sent to the host.
    pub fn line(self) -> &'static str {
        match self {
            RemoteCommand::HostFacts => concat!(
                "LC_ALL=C; export LC_ALL; ",
                "for f in /proc/loadavg /proc/meminfo /proc/stat /proc/cpuinfo; do echo \"==> $f\"; cat \"$f\" 2>/dev/null; done; ",
                "echo '==> kvm'; if [ -c /dev/kvm ]; then echo yes; else echo no; fi; ",
                "echo '==> libvirtd'; (libvirtd --version || virtqemud --version) 2>/dev/null | head -n 1; ",
                "echo '==> qemu'; (qemu-system-x86_64 --version || /usr/libexec/qemu-kvm --version) 2>/dev/null | head -n 1"
            ),
            RemoteCommand::HostLoad => concat!(
                "LC_ALL=C; export LC_ALL; ",
                "for f in /proc/loadavg /proc/meminfo /proc/stat /proc/cpuinfo; do echo \"==> $f\"; cat \"$f\" 2>/dev/null; done; ",
                "echo '==> kvm'; if [ -c /dev/kvm ]; then echo yes; else echo no; fi"
            ),
            RemoteCommand::LibvirtSocket => concat!(
                "for s in /var/run/libvirt/virtqemud-sock /var/run/libvirt/libvirt-sock; do ",
                "if [ -S \"$s\" ]; then echo \"$s\"; exit 0; fi; done; exit 1"
            ),
            RemoteCommand::RestartDaemon(LibvirtDaemon::Libvirtd) => {
                "systemctl restart libvirtd.service"
            }
            RemoteCommand::RestartDaemon(LibvirtDaemon::Virtqemud) => {
                "systemctl restart virtqemud.service"
            }
        }
    }
}

/// What a remote command printed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CmdOutput {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

/// An authenticated SSH session to one host, pinned to its host key.
pub struct SshSession {
    sess: Session,
    target: String,
    /// The session's socket, for poll(2).
    tcp: TcpStream,
}

impl std::fmt::Debug for SshSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshSession")
            .field("target", &self.target)
            .finish()
    }
}

/// Largest output the operator reads from one command (a hostile host cannot exhaust memory).
const MAX_OUTPUT: u64 = 4 << 20;

impl SshSession {
    /// Connects, checks the host key against `policy` before authenticating, then authenticates
    /// with the private key held in memory (never written to disk by this path).
    pub fn connect(
        host: &str,
        port: u16,
        user: &str,
        private_key_pem: &[u8],
        policy: &HostKeyPolicy,
        timeout: Duration,
    ) -> Result<Self, HvError> {
        let target = format!("{user}@{host}:{port}");
        let ssh_err = |cause: String| HvError::Ssh {
            target: target.clone(),
            cause,
        };
        let (sess, _key, tcp) = handshake(host, port, policy, timeout)?;
        let pem = std::str::from_utf8(private_key_pem).map_err(|_| {
            ssh_err("the private key is not text (PEM or OpenSSH format expected)".into())
        })?;
        sess.userauth_pubkey_memory(user, None, pem, None)
            .map_err(|e| HvError::AuthFailed {
                target: target.clone(),
                cause: format!("public key authentication failed ({}); check that the key in the Secret is in the user's authorized_keys", e.message()),
            })?;
        if !sess.authenticated() {
            return Err(HvError::AuthFailed {
                target: target.clone(),
                cause: "the server did not accept the key".into(),
            });
        }
        Ok(Self { sess, target, tcp })
    }

    /// Runs one of the operator's fixed commands.
    pub fn run(&self, cmd: RemoteCommand) -> Result<CmdOutput, HvError> {
        use std::io::Read;
        let err = |what: &str, e: ssh2::Error| HvError::Ssh {
            target: self.target.clone(),
            cause: format!("{what}: {e}"),
        };
        let mut ch = self
            .sess
            .channel_session()
            .map_err(|e| err("open channel", e))?;
        ch.exec(cmd.line()).map_err(|e| err("exec", e))?;
        let mut stdout = Vec::new();
        (&mut ch)
            .take(MAX_OUTPUT)
            .read_to_end(&mut stdout)
            .map_err(|e| HvError::Ssh {
                target: self.target.clone(),
                cause: format!("read output: {e}"),
            })?;
        let mut stderr = Vec::new();
        ch.stderr()
            .take(MAX_OUTPUT)
            .read_to_end(&mut stderr)
            .map_err(|e| HvError::Ssh {
                target: self.target.clone(),
                cause: format!("read errors: {e}"),
            })?;
        ch.wait_close().map_err(|e| err("close channel", e))?;
        let status = ch.exit_status().map_err(|e| err("exit status", e))?;
        Ok(CmdOutput {
            status,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    }

    /// The libssh2 session and its socket, for the tunnel.
    pub(crate) fn parts(&self) -> (&Session, &TcpStream) {
        (&self.sess, &self.tcp)
    }

    /// `user@host:port`.
    pub fn target(&self) -> &str {
        &self.target
    }
}

impl Drop for SshSession {
    fn drop(&mut self) {
        let _ = self.sess.disconnect(None, "bye", None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_match_openssh_format() {
        // SHA-256 of nothing, as OpenSSH would print it.
        let sha = [
            0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f,
            0xb9, 0x24, 0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b,
            0x78, 0x52, 0xb8, 0x55,
        ];
        assert_eq!(
            format_fingerprint(&sha),
            "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"
        );
    }

    #[test]
    fn known_hosts_lines_bracket_non_default_ports() {
        let k = HostKey {
            algorithm: "ssh-ed25519",
            blob: vec![1, 2, 3],
            fingerprint: String::new(),
        };
        assert_eq!(
            known_hosts_line("10.0.0.1", 22, &k),
            "10.0.0.1 ssh-ed25519 AQID\n"
        );
        assert_eq!(
            known_hosts_line("127.0.0.1", 2222, &k),
            "[127.0.0.1]:2222 ssh-ed25519 AQID\n"
        );
    }

    #[test]
    fn remote_commands_are_fixed_strings() {
        // No variant takes a string: nothing from a spec can reach the remote shell.
        assert!(RemoteCommand::HostFacts.line().contains("/proc/loadavg"));
        assert_eq!(
            RemoteCommand::RestartDaemon(LibvirtDaemon::Virtqemud).line(),
            "systemctl restart virtqemud.service"
        );
    }

    #[test]
    fn unreachable_address_fails_within_the_timeout() {
        // Port 1 on loopback: nothing listens there, the refusal is immediate.
        let t0 = std::time::Instant::now();
        let r = verify_host_key(
            "127.0.0.1",
            1,
            &HostKeyPolicy::AcceptAny,
            Duration::from_secs(2),
        );
        assert!(matches!(r, Err(HvError::Unreachable { .. })), "{r:?}");
        assert!(t0.elapsed() < Duration::from_secs(3));
    }
}
