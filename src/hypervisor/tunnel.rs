//! Forwarding a local Unix socket through the operator's own SSH session (ssh2) to a socket or
//! TCP port on the host: libvirt's RPC socket (the host key and the private key never leave the
//! operator's hands) or a guest's VNC port (the console).
//!
//! One thread per tunnel owns the libssh2 session in non-blocking mode and moves bytes between
//! each local connection and its SSH channel, sleeping in poll(2) on the SSH socket and the local
//! sockets when nothing moves.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use ssh2::{BlockDirections, Channel};

use super::HvError;
use super::ssh::SshSession;

/// Where the tunnel leads on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Remote {
    /// A Unix socket, e.g. `/run/libvirt/libvirt-sock`.
    UnixSocket(String),
    /// A TCP port on the host's loopback, e.g. a guest's VNC display.
    Tcp(String, u16),
}

/// The listening end on this machine.
enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> std::io::Result<Stream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }
}

/// One local connection.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn set_nonblocking(&self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(true),
            Stream::Tcp(s) => s.set_nonblocking(true).and_then(|()| s.set_nodelay(true)),
        }
    }

    fn shutdown_write(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
        };
    }

    fn fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A running tunnel; dropping it stops the thread and removes the socket.
pub struct Tunnel {
    /// The Unix socket (removed on drop), if it listens on one.
    path: Option<PathBuf>,
    /// The TCP address, if it listens on one.
    addr: Option<SocketAddr>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel").field("path", &self.path).finish()
    }
}

const BUF: usize = 256 * 1024;

struct Pair {
    sock: Stream,
    ch: Channel,
    to_ch: Vec<u8>,
    to_sock: Vec<u8>,
    sock_eof: bool,
    ch_eof: bool,
    eof_sent: bool,
    /// The far end closed and everything it sent was delivered: the local side was told (EOF).
    sock_shut: bool,
    broken: bool,
}

fn would_block(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::WouldBlock
}

impl Pair {
    /// Moves what can move without blocking; true if anything moved.
    fn pump(&mut self, buf: &mut [u8]) -> bool {
        let mut moved = false;
        if !self.sock_eof && self.to_ch.len() < BUF {
            match self.sock.read(buf) {
                Ok(0) => {
                    self.sock_eof = true;
                    moved = true;
                }
                Ok(n) => {
                    self.to_ch.extend_from_slice(&buf[..n]);
                    moved = true;
                }
                Err(e) if would_block(&e) => {}
                Err(_) => self.broken = true,
            }
        }
        while !self.to_ch.is_empty() {
            match self.ch.write(&self.to_ch) {
                Ok(0) => break,
                Ok(n) => {
                    self.to_ch.drain(..n);
                    moved = true;
                }
                Err(e) if would_block(&e) => break,
                Err(_) => {
                    self.broken = true;
                    break;
                }
            }
        }
        if self.sock_eof && self.to_ch.is_empty() && !self.eof_sent {
            match self.ch.send_eof() {
                Ok(()) => {
                    self.eof_sent = true;
                    moved = true;
                }
                Err(e) if e.code() == ssh2::ErrorCode::Session(-37) => {}
                Err(_) => self.broken = true,
            }
        }
        if !self.ch_eof && self.to_sock.len() < BUF {
            match self.ch.read(buf) {
                Ok(0) if self.ch.eof() => {
                    self.ch_eof = true;
                    moved = true;
                }
                Ok(0) => {}
                Ok(n) => {
                    self.to_sock.extend_from_slice(&buf[..n]);
                    moved = true;
                }
                Err(e) if would_block(&e) => {}
                Err(_) => self.broken = true,
            }
        }
        while !self.to_sock.is_empty() {
            match self.sock.write(&self.to_sock) {
                Ok(0) => break,
                Ok(n) => {
                    self.to_sock.drain(..n);
                    moved = true;
                }
                Err(e) if would_block(&e) => break,
                Err(_) => {
                    self.broken = true;
                    break;
                }
            }
        }
        // the host closed (e.g. libvirtd died): pass the EOF on at once, so the local client sees
        // it now rather than after its keepalive gives up
        if self.ch_eof && self.to_sock.is_empty() && !self.sock_shut {
            self.sock.shutdown_write();
            self.sock_shut = true;
            moved = true;
        }
        moved
    }

    fn done(&self) -> bool {
        self.broken
            || (self.sock_eof && self.ch_eof && self.to_ch.is_empty() && self.to_sock.is_empty())
    }
}

impl Tunnel {
    /// Listens on `local` (created 0600 in a directory the caller keeps private) and forwards
    /// every connection to `remote` through `ssh`.
    pub fn start(ssh: SshSession, remote: Remote, local: &Path) -> Result<Self, HvError> {
        let io = |what: &str, e: std::io::Error| HvError::Local {
            cause: format!("tunnel {}: {what}: {e}", local.display()),
        };
        let _ = std::fs::remove_file(local);
        let listener = UnixListener::bind(local).map_err(|e| io("bind", e))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(local, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| io("chmod", e))?;
        }
        listener
            .set_nonblocking(true)
            .map_err(|e| io("nonblocking", e))?;
        let mut t = Self::spawn(ssh, remote, Listener::Unix(listener))?;
        t.path = Some(local.to_path_buf());
        Ok(t)
    }

    /// Listens on the TCP address `local` (port 0: any free port, see [`Tunnel::local_addr`])
    /// and forwards every connection to `remote` through `ssh`: how a VNC viewer on a
    /// workstation reaches a guest's display on the host's loopback. Bind it to a loopback
    /// address: anyone who can connect to it reaches the console.
    pub fn listen_tcp(ssh: SshSession, remote: Remote, local: SocketAddr) -> Result<Self, HvError> {
        let io = |what: &str, e: std::io::Error| HvError::Local {
            cause: format!("tunnel {local}: {what}: {e}"),
        };
        let listener = TcpListener::bind(local).map_err(|e| io("bind", e))?;
        let addr = listener.local_addr().map_err(|e| io("address", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| io("nonblocking", e))?;
        let mut t = Self::spawn(ssh, remote, Listener::Tcp(listener))?;
        t.addr = Some(addr);
        Ok(t)
    }

    fn spawn(ssh: SshSession, remote: Remote, listener: Listener) -> Result<Self, HvError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ssh-tunnel".into())
            .spawn(move || run(ssh, remote, listener, flag))
            .map_err(|e| HvError::Local {
                cause: format!("tunnel thread: {e}"),
            })?;
        Ok(Tunnel {
            path: None,
            addr: None,
            stop,
            thread: Some(thread),
        })
    }

    /// The local socket (a tunnel started with [`Tunnel::start`]).
    pub fn socket(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    /// The local TCP address (a tunnel started with [`Tunnel::listen_tcp`]).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// True while the forwarding thread runs (it ends when the SSH session dies).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn open_channel(ssh: &SshSession, remote: &Remote) -> Result<Option<Channel>, ssh2::Error> {
    let (sess, _) = ssh.parts();
    let r = match remote {
        Remote::UnixSocket(p) => sess.channel_direct_streamlocal(p, None),
        Remote::Tcp(h, port) => sess.channel_direct_tcpip(h, *port, None),
    };
    match r {
        Ok(ch) => Ok(Some(ch)),
        Err(e) if e.code() == ssh2::ErrorCode::Session(-37) => Ok(None), // EAGAIN
        Err(e) => Err(e),
    }
}

fn run(ssh: SshSession, remote: Remote, listener: Listener, stop: Arc<AtomicBool>) {
    let (sess, tcp) = ssh.parts();
    // SSH keepalives find a dead host (or a dropped NAT mapping) even when libvirt is idle
    sess.set_keepalive(true, 15);
    sess.set_blocking(false);
    let mut next_keepalive = std::time::Instant::now();
    let tcp_fd = tcp.as_raw_fd();
    let mut pending: Vec<Stream> = Vec::new();
    let mut pairs: Vec<Pair> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::SeqCst) {
        let mut moved = false;
        while let Ok(s) = listener.accept() {
            if s.set_nonblocking().is_ok() {
                pending.push(s);
                moved = true;
            }
        }
        let mut still = Vec::new();
        for s in pending.drain(..) {
            match open_channel(&ssh, &remote) {
                Ok(Some(ch)) => {
                    pairs.push(Pair {
                        sock: s,
                        ch,
                        to_ch: Vec::new(),
                        to_sock: Vec::new(),
                        sock_eof: false,
                        ch_eof: false,
                        eof_sent: false,
                        sock_shut: false,
                        broken: false,
                    });
                    moved = true;
                }
                Ok(None) => still.push(s),
                Err(e) => {
                    tracing::warn!(target = ssh.target(), error = %e, "tunnel: cannot open a channel");
                    // dropping s tells the local client
                }
            }
        }
        pending = still;
        for p in pairs.iter_mut() {
            moved |= p.pump(&mut buf);
        }
        pairs.retain(|p| !p.done());
        if !moved {
            // wait for the SSH socket (in the direction libssh2 needs), a local socket or a new
            // connection; wake every 100 ms to notice stop
            let dirs = sess.block_directions();
            let mut fds = vec![(
                tcp_fd,
                true,
                matches!(dirs, BlockDirections::Outbound | BlockDirections::Both),
            )];
            fds.push((listener.fd(), true, false));
            for p in &pairs {
                fds.push((
                    p.sock.fd(),
                    !p.sock_eof && p.to_ch.len() < BUF,
                    !p.to_sock.is_empty(),
                ));
            }
            super::ffi::poll_ready(&fds, 100);
        }
        if std::time::Instant::now() >= next_keepalive {
            match sess.keepalive_send() {
                Ok(secs) => {
                    next_keepalive = std::time::Instant::now()
                        + std::time::Duration::from_secs(u64::from(secs.max(1)))
                }
                Err(e) if e.code() == ssh2::ErrorCode::Session(-37) => {}
                Err(e) => {
                    // the session is gone: ending closes every local connection, and libvirt's
                    // client reports the broken connection
                    tracing::warn!(target = ssh.target(), error = %e, "tunnel: SSH session lost");
                    break;
                }
            }
        }
    }
}
