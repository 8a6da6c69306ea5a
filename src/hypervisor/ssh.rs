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

/// Handshakes with the host's sshd and checks its key against `policy`. No authentication is
/// attempted. Returns the key so it can be pinned for libvirt's own connection.
pub fn verify_host_key(
    host: &str,
    port: u16,
    policy: &HostKeyPolicy,
    timeout: Duration,
) -> Result<HostKey, HvError> {
    let target = format!("{host}:{port}");
    let tcp = connect_tcp(host, port, timeout)?;
    let mut sess = Session::new().map_err(|e| HvError::Ssh {
        target: target.clone(),
        cause: e.to_string(),
    })?;
    sess.set_tcp_stream(tcp);
    sess.set_timeout(u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX));
    sess.handshake().map_err(|e| HvError::Ssh {
        target: target.clone(),
        cause: format!("SSH handshake failed: {e}"),
    })?;
    let (blob, kind) = sess.host_key().ok_or_else(|| HvError::Ssh {
        target: target.clone(),
        cause: "the server presented no host key".into(),
    })?;
    let blob = blob.to_vec();
    let sha = sess
        .host_key_hash(HashType::Sha256)
        .ok_or_else(|| HvError::Ssh {
            target: target.clone(),
            cause: "libssh2 cannot compute a SHA256 host key hash".into(),
        })?;
    let key = HostKey {
        algorithm: algorithm(kind),
        blob,
        fingerprint: format_fingerprint(sha),
    };
    sess.disconnect(None, "host key checked", None).ok();
    match policy {
        HostKeyPolicy::AcceptAny => Ok(key),
        HostKeyPolicy::Pinned(want) if *want == key.fingerprint => Ok(key),
        HostKeyPolicy::Pinned(want) => Err(HvError::HostKeyMismatch {
            target,
            expected: want.clone(),
            actual: key.fingerprint,
        }),
    }
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
    let tmp = path.with_extension("tmp");
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
