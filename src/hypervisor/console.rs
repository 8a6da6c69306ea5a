//! A guest's VNC console, brought to this machine: the display's port is read from the running
//! domain's live XML at the moment the tunnel opens (a port from an older status could by now
//! belong to another guest), and a local TCP listener forwards to it through the operator's own
//! SSH session to the node (the pinned host key, the key from the node's Secret).

use std::net::SocketAddr;

use super::tunnel::{Remote, Tunnel};
use super::{HvError, NodeAccess, connect_node_as};

/// An open console tunnel.
#[derive(Debug)]
pub struct Console {
    /// Forwards every local connection; closes on drop.
    pub tunnel: Tunnel,
    /// The display on the node, `address:port` as libvirt reports it.
    pub vnc_on_node: String,
}

impl Console {
    /// Where a VNC viewer on this machine connects.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.tunnel.local_addr()
    }
}

/// `address:port` of a VNC listener as libvirt reports it → where to connect from the node
/// itself. A display listening on every address is reached on the node's loopback.
pub fn vnc_target(vnc: &str) -> Result<(String, u16), HvError> {
    let bad = || HvError::Local {
        cause: format!("libvirt reported the VNC display as {vnc:?}, which is not address:port"),
    };
    let (host, port) = vnc.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    let host = match host {
        "0.0.0.0" => "127.0.0.1",
        "::" => "::1",
        h => h,
    };
    Ok((host.to_string(), port))
}

/// Opens a tunnel from `listen` on this machine to the VNC display of the running domain
/// `domain` on the node. Fails, saying why, when the node is not reached over SSH, the domain
/// does not exist or is not running, or it has no VNC display.
pub fn open(access: &NodeAccess, domain: &str, listen: SocketAddr) -> Result<Console, HvError> {
    let target = super::uri::NodeTarget::from_spec(&access.spec)?;
    if !target.transport.uses_ssh() {
        return Err(HvError::InvalidTarget {
            field: "spec.transport",
            cause: format!(
                "KvmNode {} is reached over {:?}, not SSH; the console is tunnelled through SSH, so give the node an SSH transport (the default) to use it",
                access.name, target.transport
            ),
        });
    }
    let conn = connect_node_as(access, "console")?;
    let ends = conn.console(domain)?;
    let vnc = ends.vnc.ok_or_else(|| HvError::NotFound {
        what: format!(
            "a VNC display of domain {domain} (is it running, with spec.console.vnc true?)"
        ),
        target: format!("KvmNode {}", access.name),
    })?;
    let (host, port) = vnc_target(&vnc)?;
    drop(conn);
    let session = super::ssh_session(access, &target)?;
    let tunnel = Tunnel::listen_tcp(session, Remote::Tcp(host, port), listen)?;
    Ok(Console {
        tunnel,
        vnc_on_node: vnc,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vnc_addresses_map_to_where_the_node_connects() {
        assert_eq!(
            vnc_target("127.0.0.1:5901").ok(),
            Some(("127.0.0.1".into(), 5901))
        );
        assert_eq!(
            vnc_target("0.0.0.0:5900").ok(),
            Some(("127.0.0.1".into(), 5900))
        );
        assert_eq!(vnc_target("[::]:5902").ok(), Some(("::1".into(), 5902)));
        assert_eq!(vnc_target("[::1]:5903").ok(), Some(("::1".into(), 5903)));
        for bad in [
            "",
            "5900",
            ":5900",
            "127.0.0.1:",
            "127.0.0.1:0",
            "h:99999",
            "h:-1",
        ] {
            assert!(vnc_target(bad).is_err(), "{bad:?}");
        }
    }
}
