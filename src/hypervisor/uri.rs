//! libvirt connection URIs, built from a node's spec, never from strings pasted together.

use std::fmt::Write as _;
use std::path::PathBuf;

use super::HvError;
use crate::api::kvm_node::KvmNodeSpec;

/// How libvirt reaches the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// The default: libvirt's RPC through the operator's own SSH session (ssh2), forwarded to the
    /// host's libvirt socket. The host key is checked on the session that carries the traffic
    /// and the private key stays in memory.
    SshTunnel,
    /// `qemu+libssh`: libvirt's built-in SSH client, which checks our pinned known_hosts file.
    LibSsh,
    /// `qemu+ssh`: the `ssh` program; host keys are checked by its own configuration.
    Ssh,
    /// `qemu+tls`: libvirtd's TLS port with client certificates.
    Tls,
    /// `qemu+tcp`: libvirtd's plain TCP port (SASL or no auth): only on trusted networks.
    Tcp,
    /// `test`: libvirt's built-in test driver, in memory.
    Test,
}

impl Transport {
    /// URI scheme.
    pub fn scheme(self) -> &'static str {
        match self {
            Transport::SshTunnel => "ssh-tunnel",
            Transport::LibSsh => "qemu+libssh",
            Transport::Ssh => "qemu+ssh",
            Transport::Tls => "qemu+tls",
            Transport::Tcp => "qemu+tcp",
            Transport::Test => "test",
        }
    }

    /// The port libvirt uses when the URI names none.
    pub fn default_port(self) -> u16 {
        match self {
            Transport::SshTunnel | Transport::LibSsh | Transport::Ssh => 22,
            Transport::Tls => 16514,
            Transport::Tcp => 16509,
            Transport::Test => 0,
        }
    }

    /// True for the transports that go through the host's sshd.
    pub fn uses_ssh(self) -> bool {
        matches!(
            self,
            Transport::SshTunnel | Transport::LibSsh | Transport::Ssh
        )
    }
}

/// Everything needed to build the URI of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeTarget {
    pub transport: Transport,
    pub address: String,
    pub port: u16,
    pub user: String,
    /// `/system` for qemu, `/default` (or a file) for test.
    pub path: String,
    /// Private key file (SSH transports).
    pub keyfile: Option<PathBuf>,
    /// known_hosts file holding the pinned key (libssh transport).
    pub known_hosts: Option<PathBuf>,
    /// Directory with cacert.pem, clientcert.pem and clientkey.pem (tls transport).
    pub pkipath: Option<PathBuf>,
}

impl NodeTarget {
    /// The target described by a KvmNode spec. `spec.libvirtUri`, when set, chooses the
    /// transport and path; address, port and user come from the spec unless the URI names them.
    pub fn from_spec(spec: &KvmNodeSpec) -> Result<Self, HvError> {
        let mut t = NodeTarget {
            transport: Transport::SshTunnel,
            address: spec.address.clone(),
            port: spec.port,
            user: spec.user.clone(),
            path: "/system".into(),
            keyfile: None,
            known_hosts: None,
            pkipath: None,
        };
        if let Some(uri) = &spec.libvirt_uri {
            let bad = |why: &str| HvError::InvalidTarget {
                field: "spec.libvirtUri",
                cause: format!("{uri:?}: {why}"),
            };
            let (scheme, rest) = uri
                .split_once("://")
                .ok_or_else(|| bad("expected scheme://[user@]host[:port]/path"))?;
            t.transport = match scheme {
                "qemu+libssh" => Transport::LibSsh,
                "qemu+ssh" => Transport::Ssh,
                "qemu+tls" => Transport::Tls,
                "qemu+tcp" => Transport::Tcp,
                "test" => Transport::Test,
                _ => {
                    return Err(bad(
                        "unsupported scheme (qemu+libssh, qemu+ssh, qemu+tls, qemu+tcp, test)",
                    ));
                }
            };
            if rest.contains('?') || rest.contains('#') {
                return Err(bad(
                    "query parameters are set by the operator (keys, known_hosts); remove them",
                ));
            }
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, "/system"),
            };
            t.path = path.to_string();
            let mut port_from_uri = None;
            if t.transport == Transport::Test {
                if !authority.is_empty() {
                    return Err(bad("test URIs have no host: use test:///default"));
                }
            } else if !authority.is_empty() {
                let hostport = match authority.rsplit_once('@') {
                    Some((u, h)) => {
                        t.user = u.to_string();
                        h
                    }
                    None => authority,
                };
                let (host, port) =
                    split_host_port(hostport).ok_or_else(|| bad("bad host or port"))?;
                t.address = host.to_string();
                if let Some(p) = port {
                    t.port = p;
                    port_from_uri = Some(p);
                }
            }
            // spec.port is the SSH port: TLS and TCP use libvirtd's own ports unless the URI
            // names one
            if !t.transport.uses_ssh() && port_from_uri.is_none() {
                t.port = t.transport.default_port();
            }
            if t.path != "/system" && t.transport != Transport::Test {
                return Err(bad(
                    "the operator manages system instances: use the path /system",
                ));
            }
        }
        let mut errs = crate::api::FieldErrors::default();
        crate::api::validation::check_host(&mut errs, "spec.address", &t.address);
        if let Some(e) = errs.0.into_iter().next() {
            return Err(HvError::InvalidTarget {
                field: "spec.address",
                cause: e.message,
            });
        }
        Ok(t)
    }

    /// The URI libvirt opens. Query values are percent-encoded. For [`Transport::SshTunnel`]
    /// this is the remote endpoint as a user would write it; libvirt itself opens the local
    /// socket of the tunnel.
    pub fn uri(&self) -> String {
        if self.transport == Transport::Test {
            return format!("test://{}", self.path);
        }
        let host = if self.address.contains(':') {
            format!("[{}]", self.address)
        } else {
            self.address.clone()
        };
        let mut uri = format!("{}://", self.transport.scheme());
        if self.transport.uses_ssh() {
            let _ = write!(uri, "{}@", encode(&self.user));
        }
        uri.push_str(&host);
        if self.port != self.transport.default_port() {
            let _ = write!(uri, ":{}", self.port);
        }
        uri.push_str(&self.path);
        let mut q: Vec<(&str, String)> = Vec::new();
        if let Some(k) = &self.keyfile {
            q.push(("keyfile", k.display().to_string()));
        }
        if self.transport == Transport::LibSsh {
            q.push(("sshauth", "privkey".into()));
            if let Some(kh) = &self.known_hosts {
                q.push(("known_hosts", kh.display().to_string()));
                q.push(("known_hosts_verify", "normal".into()));
            }
        }
        if self.transport == Transport::Tls
            && let Some(p) = &self.pkipath
        {
            q.push(("pkipath", p.display().to_string()));
        }
        if self.transport == Transport::Ssh {
            // never prompt: a hung password prompt would stall the connection forever
            q.push(("no_tty", "1".into()));
        }
        for (i, (k, v)) in q.iter().enumerate() {
            uri.push(if i == 0 { '?' } else { '&' });
            let _ = write!(uri, "{k}={}", encode(v));
        }
        uri
    }
}

fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((h, port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h, Some(p.parse().ok()?))),
        _ => Some((s, None)),
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters and '/'.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(uri: Option<&str>) -> KvmNodeSpec {
        serde_json::from_value(serde_json::json!({
            "address": "10.0.0.5", "port": 2222, "user": "root",
            "hostKeyFingerprint": format!("SHA256:{}", "A".repeat(43)),
            "libvirtUri": uri,
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_ssh_tunnel_is_the_default() {
        let t = NodeTarget::from_spec(&spec(None)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.transport, Transport::SshTunnel);
        assert_eq!(
            (t.address.as_str(), t.port, t.user.as_str()),
            ("10.0.0.5", 2222, "root")
        );
    }

    #[test]
    fn libssh_carries_pinned_files() {
        let mut t = NodeTarget::from_spec(&spec(Some("qemu+libssh://10.0.0.5:2222/system")))
            .unwrap_or_else(|e| panic!("{e}"));
        t.keyfile = Some("/run/kvm op/key&x".into());
        t.known_hosts = Some("/run/kvm-op/kh".into());
        assert_eq!(
            t.uri(),
            "qemu+libssh://root@10.0.0.5:2222/system?keyfile=/run/kvm%20op/key%26x&sshauth=privkey&known_hosts=/run/kvm-op/kh&known_hosts_verify=normal"
        );
    }

    #[test]
    fn overrides_choose_transport_host_and_port() {
        let t = NodeTarget::from_spec(&spec(Some("qemu+tls://hv1.example.org/system")))
            .unwrap_or_else(|e| panic!("{e}"));
        // spec.port (2222) is the SSH port: TLS keeps libvirtd's port
        assert_eq!(t.uri(), "qemu+tls://hv1.example.org/system");
        let t = NodeTarget::from_spec(&spec(Some("qemu+tcp://hv1.example.org:16600/system")))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.uri(), "qemu+tcp://hv1.example.org:16600/system");
        let t = NodeTarget::from_spec(&spec(Some("qemu+ssh://admin@[fe80::1]:22/system")))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.uri(), "qemu+ssh://admin@[fe80::1]/system?no_tty=1");
        let t =
            NodeTarget::from_spec(&spec(Some("test:///default"))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.uri(), "test:///default");
    }

    #[test]
    fn hostile_overrides_are_refused() {
        for bad in [
            "qemu+ssh://h/system?command=rm",
            "qemu+ssh://h/session",
            "qemu+ext://h/system",
            "qemu+ssh://-oProxyCommand=x/system",
            "test://host/default",
            "qemu+ssh://h:99999/system",
        ] {
            let r = NodeTarget::from_spec(&spec(Some(bad)));
            assert!(r.is_err(), "{bad} accepted: {r:?}");
            assert!(
                r.err()
                    .map(|e| e.to_string())
                    .unwrap_or_default()
                    .contains("spec.")
            );
        }
    }
}
