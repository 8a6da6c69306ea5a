//! The libvirt connections of every node, shared by every reconcile.
//!
//! - Every call runs on `spawn_blocking` under a timeout, so a hung host costs the caller at most
//!   the timeout and never blocks the async runtime or other nodes.
//! - One call at a time per libvirt connection: a node has up to [`MAX_CALLS_PER_NODE`]
//!   connections ("lanes", opened as calls need them) and a call holds one lane until its
//!   blocking work really ends, plus one lane of its own for domain events. libvirt's RPC client
//!   (9.0, Debian 12) leaves a poll source pointing into a finished call's stack when a second
//!   thread wakes the thread that owns the socket; when that socket later turns readable (a host
//!   answering again after its link came back) the client writes into that stack and crashed
//!   the operator in the fault suite. One thread per connection never takes that path.
//! - A call that fails because the connection broke (or timed out) drops its lane's connection;
//!   the next call on it reconnects, no sooner than the node's backoff allows (1 s doubling to
//!   60 s), and until then fails fast with the last error.
//! - The node's lanes share one stamp index (what each domain's ownership stamp says).
//! - A node on a file of libvirt's test driver (`test:///<path>`) has one connection, which its
//!   calls and its events take in turn: the test driver gives every connection opened on a file
//!   a private hypervisor, so a second lane would be another host.
//! - Changing a node's access (spec or key) replaces its connections.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::connection::{Connection, STAMP_INDEX_FRESH, SharedIndex};
use super::{HvError, NodeAccess, connect_node_as};

/// Concurrent calls allowed on one node: each on a libvirt connection of its own.
pub const MAX_CALLS_PER_NODE: usize = 4;
/// The lane that carries domain events (after the call lanes).
const EVENTS_LANE: usize = MAX_CALLS_PER_NODE;
const LANE_LABELS: [&str; MAX_CALLS_PER_NODE + 1] = ["0", "1", "2", "3", "events"];
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Calls run on a connection by every pool of this process (`call` and `call_pair`).
static CALLS: AtomicU64 = AtomicU64::new(0);

/// How many calls every pool of this process has run on a libvirt connection so far (one per
/// `call` or `call_pair`, whatever libvirt work the closure does): what the idle-cost benchmark
/// counts.
pub fn calls_made() -> u64 {
    CALLS.load(Ordering::Relaxed)
}

/// One libvirt connection of a node, used by one call at a time.
#[derive(Default)]
struct Lane {
    conn: Option<Arc<Connection>>,
    /// Bumped whenever the connection is replaced, so a late failure of an old connection does
    /// not drop a new one.
    generation: u64,
}

/// Why and until when a node is not connected to again.
#[derive(Default)]
struct Backoff {
    /// When the next connection attempt is allowed, and why the last one failed.
    retry_at: Option<(Instant, String, &'static str)>,
    backoff: Option<Duration>,
}

struct Node {
    access: NodeAccess,
    /// [`MAX_CALLS_PER_NODE`] call lanes, then the events lane.
    lanes: Vec<Mutex<Lane>>,
    /// Which call lanes a call holds right now.
    busy: Mutex<[bool; MAX_CALLS_PER_NODE]>,
    /// One permit per call lane.
    slots: Arc<Semaphore>,
    /// The events lane's one permit (the call lane's when the node has one connection).
    events: Arc<Semaphore>,
    /// One connection for calls and events (see [`one_connection`]).
    single: bool,
    backoff: Mutex<Backoff>,
    index: SharedIndex,
    /// The host's CPU counters at the last host-facts reading: the next one measures CPU use
    /// since then instead of sampling twice with a wait in between.
    /// With the CPU use last computed.
    cpu: Mutex<Option<(Instant, super::host_facts::CpuTimes, Option<u32>)>>,
    /// The SSH session host facts were last read on, kept for the next reading (a new session
    /// is a key exchange and an authentication: hundreds of milliseconds on a busy host). Taken
    /// out while in use, so a session stuck on a dead host is never waited for by another.
    /// With the versions read on it and when (see [`VERSIONS_MAX_AGE`]).
    facts_ssh: Mutex<Option<KeptSession>>,
    /// The last host facts read over SSH, and when: a node pass within [`FACTS_FRESH`] of it
    /// (a burst of VM changes) takes them instead of asking the host again.
    last_facts: Mutex<Option<(Instant, super::host_facts::HostFacts, Option<u32>)>>,
}

/// How long host facts read over SSH stand for the next node pass. A command over SSH costs a
/// host-side session (about 0.2 s on the lab's hosts) while the figures change slowly; the
/// periodic node resync (30 s by default) always reads them anew.
const FACTS_FRESH: Duration = Duration::from_secs(10);

/// The SSH session a node's host facts are read on, with the libvirt and QEMU versions read on
/// it and when.
type KeptSession = (super::ssh::SshSession, super::host_facts::Versions, Instant);

/// How long the libvirt and QEMU versions read on a kept session stand before they are read
/// again (an upgrade that restarts sshd or the host is seen at once: a new session reads them).
const VERSIONS_MAX_AGE: Duration = Duration::from_secs(600);

impl Drop for Node {
    fn drop(&mut self) {
        // closing a session can wait on the network: not on the async runtime
        let ssh = self
            .facts_ssh
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let (Some(ssh), Ok(rt)) = (ssh, tokio::runtime::Handle::try_current()) {
            drop(rt.spawn_blocking(move || drop(ssh)));
        }
    }
}

/// True when every connection to the node would be a host of its own: libvirt's test driver on
/// a file (`test:///default` is one hypervisor per process, so it takes lanes like a real host).
fn one_connection(access: &NodeAccess) -> bool {
    super::uri::NodeTarget::from_spec(&access.spec)
        .is_ok_and(|t| t.transport == super::uri::Transport::Test && t.path != "/default")
}

impl Node {
    fn new(access: NodeAccess) -> Self {
        let single = one_connection(&access);
        let slots = Arc::new(Semaphore::new(if single { 1 } else { MAX_CALLS_PER_NODE }));
        let events = if single {
            slots.clone()
        } else {
            Arc::new(Semaphore::new(1))
        };
        Self {
            access,
            lanes: (0..=MAX_CALLS_PER_NODE)
                .map(|_| Mutex::new(Lane::default()))
                .collect(),
            busy: Mutex::new([false; MAX_CALLS_PER_NODE]),
            slots,
            events,
            single,
            backoff: Mutex::new(Backoff::default()),
            index: SharedIndex::default(),
            cpu: Mutex::new(None),
            facts_ssh: Mutex::new(None),
            last_facts: Mutex::new(None),
        }
    }

    fn lane(&self, i: usize) -> std::sync::MutexGuard<'_, Lane> {
        self.lanes[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Any open connection of the node.
    fn any_connection(&self) -> Option<Arc<Connection>> {
        (0..self.lanes.len()).find_map(|i| self.lane(i).conn.clone())
    }
}

/// A lane held by one call: given back (after its permit) when dropped, which is when the
/// blocking work that used it has really ended.
struct Lease {
    node: Arc<Node>,
    lane: usize,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.lane < MAX_CALLS_PER_NODE {
            self.node.busy.lock().unwrap_or_else(|p| p.into_inner())[self.lane] = false;
        }
    }
}

/// Closes a connection off the async runtime (closing is an RPC to the host).
fn close_later(conn: Option<Arc<Connection>>) {
    if let Some(c) = conn {
        drop(tokio::task::spawn_blocking(move || drop(c)));
    }
}

/// The connections of every known node.
pub struct NodePool {
    nodes: Mutex<HashMap<String, Arc<Node>>>,
    /// Timeout of one call (connecting included).
    pub call_timeout: Duration,
}

impl std::fmt::Debug for NodePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.lock_nodes().keys().cloned().collect();
        f.debug_struct("NodePool").field("nodes", &names).finish()
    }
}

/// libvirt error codes that mean the connection itself is gone.
fn connection_broken(e: &HvError) -> bool {
    match e {
        HvError::Libvirt { code, .. } => {
            let c = u32::try_from(*code).unwrap_or(0);
            c == virt::sys::VIR_ERR_SYSTEM_ERROR
                || c == virt::sys::VIR_ERR_RPC
                || c == virt::sys::VIR_ERR_NO_CONNECT
                || c == virt::sys::VIR_ERR_INVALID_CONN
                || c == virt::sys::VIR_ERR_AUTH_FAILED
        }
        HvError::Timeout { .. } | HvError::Unreachable { .. } | HvError::Ssh { .. } => true,
        _ => false,
    }
}

impl NodePool {
    pub fn new(call_timeout: Duration) -> Self {
        Self {
            nodes: Mutex::new(HashMap::new()),
            call_timeout,
        }
    }

    fn lock_nodes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Node>>> {
        // a panic while holding the lock cannot leave the map inconsistent: recover it
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a node or updates how to reach it. A change of spec or key closes the old connection.
    pub fn upsert(&self, access: NodeAccess) {
        let mut nodes = self.lock_nodes();
        if let Some(n) = nodes.get(&access.name)
            && n.access.spec == access.spec
            && n.access.private_key == access.private_key
        {
            return;
        }
        nodes.insert(access.name.clone(), Arc::new(Node::new(access)));
    }

    /// Forgets a node and closes its connection (once running calls finish).
    pub fn remove(&self, name: &str) {
        self.lock_nodes().remove(name);
    }

    fn node(&self, name: &str) -> Result<Arc<Node>, HvError> {
        self.lock_nodes()
            .get(name)
            .cloned()
            .ok_or_else(|| HvError::NotFound {
                what: format!("KvmNode {name:?}"),
                target: "the operator's node list".into(),
            })
    }

    /// Names of the known nodes.
    pub fn nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock_nodes().keys().cloned().collect();
        v.sort();
        v
    }

    /// True when the node has an open connection right now.
    pub fn is_connected(&self, name: &str) -> bool {
        let n = self.lock_nodes().get(name).cloned();
        n.is_some_and(|n| n.any_connection().is_some())
    }

    /// Runs `f` with one of the node's connections (one no other call uses meanwhile),
    /// connecting first when needed.
    pub async fn call<T, F>(&self, node: &str, op: &'static str, f: F) -> Result<T, HvError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, HvError> + Send + 'static,
    {
        let n = self.node(node)?;
        let lease = self.lease(&n, node, op, false).await?;
        self.run(n, lease, node, op, f).await
    }

    /// [`NodePool::call`] on the node's events lane: the connection domain events are followed
    /// on, which stays the same as long as it works.
    pub async fn call_events<T, F>(&self, node: &str, op: &'static str, f: F) -> Result<T, HvError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, HvError> + Send + 'static,
    {
        let n = self.node(node)?;
        let lease = self.lease(&n, node, op, true).await?;
        self.run(n, lease, node, op, f).await
    }

    /// A free lane of `n` (the events lane when `events`), waiting at most the call timeout.
    async fn lease(
        &self,
        n: &Arc<Node>,
        node: &str,
        op: &'static str,
        events: bool,
    ) -> Result<Lease, HvError> {
        let timeout = self.call_timeout;
        let timeout_err = || HvError::Timeout {
            op,
            target: node.to_string(),
            secs: timeout.as_secs(),
        };
        let sem = if events { &n.events } else { &n.slots };
        let permit = tokio::time::timeout(timeout, sem.clone().acquire_owned())
            .await
            .map_err(|_| timeout_err())?
            .map_err(|_| timeout_err())?;
        let lane = if events && !n.single {
            EVENTS_LANE
        } else {
            let mut busy = n.busy.lock().unwrap_or_else(|p| p.into_inner());
            // a permit means a lane is free; the lowest first, so few connections serve a quiet node
            let i = busy.iter().position(|b| !b).ok_or_else(|| HvError::Local {
                cause: format!("{op} on {node}: no free connection although a slot was granted"),
            })?;
            busy[i] = true;
            i
        };
        Ok(Lease {
            node: n.clone(),
            lane,
            _permit: permit,
        })
    }

    /// Runs `f` on the leased lane's connection.
    async fn run<T, F>(
        &self,
        n: Arc<Node>,
        lease: Lease,
        node: &str,
        op: &'static str,
        f: F,
    ) -> Result<T, HvError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, HvError> + Send + 'static,
    {
        let timeout = self.call_timeout;
        let lane = lease.lane;
        let (conn, generation) = self.connection(&n, lane, timeout).await?;
        CALLS.fetch_add(1, Ordering::Relaxed);
        let began = std::time::Instant::now();
        let task = tokio::task::spawn_blocking(move || {
            let r = f(&conn);
            let alive = r.is_ok() || conn.is_alive();
            // the connection and then the lane go back only when the blocking work has ended
            drop(conn);
            drop(lease);
            (r, alive)
        });
        let (result, alive) = match tokio::time::timeout(timeout, task).await {
            Ok(Ok((r, alive))) => (r, alive),
            Ok(Err(join)) => (
                Err(HvError::Local {
                    cause: format!("{op} on {node} panicked: {join}"),
                }),
                true,
            ),
            Err(_) => (
                Err(HvError::Timeout {
                    op,
                    target: node.to_string(),
                    secs: timeout.as_secs(),
                }),
                false,
            ),
        };
        tracing::debug!(
            node,
            op,
            lane,
            ms = began.elapsed().as_secs_f64() * 1e3,
            ok = result.is_ok(),
            "libvirt call"
        );
        if let Err(e) = &result
            && (connection_broken(e) || !alive)
        {
            let old = {
                let mut l = n.lane(lane);
                if l.generation == generation {
                    l.conn.take()
                } else {
                    None
                }
            };
            if old.is_some() {
                tracing::warn!(
                    node,
                    op,
                    reason = e.reason(),
                    "dropping the libvirt connection; the next call reconnects"
                );
                // what the node holds may have changed unseen while it did not answer
                n.index
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .mark_stale();
            }
            close_later(old);
        }
        result
    }

    async fn connection(
        &self,
        n: &Arc<Node>,
        lane: usize,
        timeout: Duration,
    ) -> Result<(Arc<Connection>, u64), HvError> {
        {
            let l = n.lane(lane);
            if let Some(c) = &l.conn {
                return Ok((c.clone(), l.generation));
            }
        }
        {
            let b = n.backoff.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, why, reason)) = &b.retry_at
                && Instant::now() < *at
            {
                return Err(HvError::Unreachable {
                    target: n.access.name.clone(),
                    cause: format!(
                        "not retrying for {}s after the last failure ({reason}: {why})",
                        at.saturating_duration_since(Instant::now()).as_secs() + 1
                    ),
                });
            }
        }
        let access = n.access.clone();
        let name = access.name.clone();
        let index = n.index.clone();
        let attempt = tokio::time::timeout(
            timeout,
            tokio::task::spawn_blocking(move || {
                connect_node_as(&access, LANE_LABELS[lane]).map(|c| c.with_index(index))
            }),
        )
        .await;
        let result = match attempt {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => Err(HvError::Local {
                cause: format!("connecting to {name} panicked: {join}"),
            }),
            Err(_) => Err(HvError::Timeout {
                op: "connect",
                target: name.clone(),
                secs: timeout.as_secs(),
            }),
        };
        match result {
            Ok(c) => {
                let c = Arc::new(c);
                let generation = {
                    let mut l = n.lane(lane);
                    // only this lane's holder connects it: nothing open is replaced
                    let old = l.conn.replace(c.clone());
                    l.generation += 1;
                    close_later(old);
                    l.generation
                };
                let mut b = n.backoff.lock().unwrap_or_else(|p| p.into_inner());
                b.retry_at = None;
                b.backoff = None;
                tracing::info!(node = %name, lane = LANE_LABELS[lane], "libvirt connection open");
                Ok((c, generation))
            }
            Err(e) => {
                let mut b = n.backoff.lock().unwrap_or_else(|p| p.into_inner());
                // a host key mismatch or a bad spec will not fix itself soon: wait the longest
                let wait = if e.is_transient() {
                    b.backoff
                        .map_or(BACKOFF_START, |w| (w * 2).min(BACKOFF_MAX))
                } else {
                    BACKOFF_MAX
                };
                b.backoff = Some(wait);
                b.retry_at = Some((Instant::now() + wait, e.to_string(), e.reason()));
                Err(e)
            }
        }
    }

    /// One of the node's open connections, if any (without connecting): they share the
    /// node's stamp index.
    fn open_connection(&self, name: &str) -> Option<Arc<Connection>> {
        let n = self.lock_nodes().get(name).cloned()?;
        n.any_connection()
    }

    /// Names of the domains on `node` stamped with `uid`: from the connection's stamp index
    /// when the node was listed within [`STAMP_INDEX_FRESH`] (no call at all), else after
    /// listing the node (one call). Placing many VMs in a row lists each node once, not once
    /// per VM.
    pub async fn stamped(&self, node: &str, uid: &str) -> Result<Vec<String>, HvError> {
        if let Some(found) = self
            .open_connection(node)
            .and_then(|c| c.stamped_from_index(uid, STAMP_INDEX_FRESH))
        {
            return Ok(found);
        }
        let uid = uid.to_string();
        self.call(node, "list domains", move |c| {
            c.refresh_index()?;
            Ok(c.stamped_from_index(&uid, Duration::MAX)
                .unwrap_or_default())
        })
        .await
    }

    /// libvirt reported that a domain of `node` was defined or undefined (`uuid`; empty: any):
    /// the node's stamp index forgets it and lists the node again before it answers.
    pub fn domain_definition_changed(&self, node: &str, uuid: &str) {
        if let Some(c) = self.open_connection(node) {
            c.index_changed(uuid);
        }
    }

    /// Runs `f` with the connections of two nodes (a migration's source and destination).
    pub async fn call_pair<T, F>(
        &self,
        a: &str,
        b: &str,
        op: &'static str,
        f: F,
    ) -> Result<T, HvError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Connection) -> Result<T, HvError> + Send + 'static,
    {
        if a == b {
            return Err(HvError::Local {
                cause: format!("{op}: both ends are {a}"),
            });
        }
        let (na, nb) = (self.node(a)?, self.node(b)?);
        let la = self.lease(&na, a, op, false).await?;
        let lb = self.lease(&nb, b, op, false).await?;
        let (ca, _) = self.connection(&na, la.lane, self.call_timeout).await?;
        let (cb, _) = self.connection(&nb, lb.lane, self.call_timeout).await?;
        // no overall timeout here: a migration runs as long as its own completion timeout says;
        // callers watch and abort it through `call` on the source (another lane)
        CALLS.fetch_add(1, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || {
            let r = f(&ca, &cb);
            drop((ca, cb));
            drop((la, lb));
            r
        })
        .await
        .map_err(|join| HvError::Local {
            cause: format!("{op} between {a} and {b} panicked: {join}"),
        })?
    }

    /// Host facts: over SSH for SSH transports, from libvirt otherwise. CPU use is measured
    /// since the node's previous reading when that is at least `interval` old (one command, no
    /// wait: the figure is the average over the resync period); otherwise sampled over
    /// `interval`.
    pub async fn host_facts(
        &self,
        node: &str,
        interval: Duration,
    ) -> Result<(super::host_facts::HostFacts, Option<u32>), HvError> {
        let n = self.node(node)?;
        let target = super::uri::NodeTarget::from_spec(&n.access.spec)?;
        if !target.transport.uses_ssh() {
            return self
                .call(node, "host facts", |c| c.libvirt_facts().map(|f| (f, None)))
                .await;
        }
        if let Some((at, facts, usage)) = &*n.last_facts.lock().unwrap_or_else(|p| p.into_inner())
            && at.elapsed() < FACTS_FRESH
        {
            return Ok((facts.clone(), *usage));
        }
        let access = n.access.clone();
        let timeout = self.call_timeout + interval;
        let previous = *n.cpu.lock().unwrap_or_else(|p| p.into_inner());
        let node_ref = n.clone();
        let task = tokio::task::spawn_blocking(move || {
            let read = |ssh: &super::ssh::SshSession,
                        known: Option<&super::host_facts::Versions>| {
                match previous {
                    // read again soon after the last time (a burst of changes): one command,
                    // and the last figure stands until enough time has passed to measure anew
                    Some((at, _, usage)) if at.elapsed() < interval => {
                        let (facts, _) = super::host_facts::collect(ssh, None, known)?;
                        Ok((facts, usage))
                    }
                    _ => {
                        let r = super::host_facts::collect_since(
                            ssh,
                            previous.map(|(_, t, _)| t),
                            interval,
                            known,
                        )?;
                        if let Some(t) = r.0.cpu_times {
                            *node_ref.cpu.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some((Instant::now(), t, r.1));
                        }
                        Ok(r)
                    }
                }
            };
            let kept = node_ref
                .facts_ssh
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            // a kept session the host closed since (sshd restarted, idle timeout) is replaced
            let kept = kept.and_then(|(ssh, versions, at)| {
                let known = (at.elapsed() < VERSIONS_MAX_AGE).then_some(&versions);
                let r: Result<_, HvError> = read(&ssh, known);
                let at = if known.is_some() { at } else { Instant::now() };
                r.ok().map(|r| (ssh, at, r))
            });
            let (ssh, at, r) = match kept {
                Some(k) => k,
                None => {
                    let ssh = super::ssh_session(&access, &target)?;
                    let r = read(&ssh, None)?;
                    (ssh, Instant::now(), r)
                }
            };
            *node_ref.facts_ssh.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((ssh, super::host_facts::Versions::of(&r.0), at));
            *node_ref
                .last_facts
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), r.0.clone(), r.1));
            Ok(r)
        });
        match tokio::time::timeout(timeout, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => Err(HvError::Local {
                cause: format!("host facts of {node} panicked: {join}"),
            }),
            Err(_) => Err(HvError::Timeout {
                op: "host facts",
                target: node.to_string(),
                secs: timeout.as_secs(),
            }),
        }
    }

    /// Lets the next call try to connect at once (e.g. after the node's spec was fixed or the
    /// operator was told the host is back).
    pub fn reset_backoff(&self, name: &str) {
        if let Some(n) = self.lock_nodes().get(name) {
            let mut b = n.backoff.lock().unwrap_or_else(|p| p.into_inner());
            b.retry_at = None;
            b.backoff = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_node(name: &str, dir: &std::path::Path, uri: &str) -> NodeAccess {
        NodeAccess {
            name: name.into(),
            spec: serde_json::from_value(
                serde_json::json!({"address": "localhost", "libvirtUri": uri}),
            )
            .unwrap_or_else(|e| panic!("{e}")),
            private_key: None,
            state_dir: dir.to_path_buf(),
            tls: None,
            timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn upsert_keeps_or_replaces_connections_and_remove_forgets_the_node() {
        let dir = std::env::temp_dir();
        let pool = NodePool::new(Duration::from_secs(5));
        pool.upsert(test_node("a", &dir, "test:///default"));
        pool.upsert(test_node("b", &dir, "test:///default"));
        assert_eq!(pool.nodes(), ["a", "b"]);
        assert!(!pool.is_connected("a"), "connections open on first use");
        let n = pool
            .call("a", "list", |c| c.list_domains().map(|d| d.len()))
            .await;
        assert!(n.is_ok_and(|n| n >= 1));
        assert!(pool.is_connected("a"));
        // the same access again keeps the open connection
        pool.upsert(test_node("a", &dir, "test:///default"));
        assert!(pool.is_connected("a"));
        // a changed spec replaces it
        let mut changed = test_node("a", &dir, "test:///default");
        changed.spec.maintenance = true;
        pool.upsert(changed);
        assert!(!pool.is_connected("a"));
        pool.remove("a");
        assert_eq!(pool.nodes(), ["b"]);
        let gone = pool.call("a", "list", |c| c.list_domains()).await;
        assert!(matches!(gone, Err(HvError::NotFound { .. })), "{gone:?}");
    }

    #[tokio::test]
    async fn placement_finds_stamped_domains_through_the_index() {
        use crate::hypervisor::domain_xml::{DomainXml, Metadata, Owner};
        let dir = std::env::temp_dir();
        let pool = NodePool::new(Duration::from_secs(5));
        pool.upsert(test_node("a", &dir, "test:///default"));
        let uid = format!("uid-index-{}", std::process::id());
        let stamped = |name: &str| {
            let mut x = DomainXml::minimal(name, "test", 32 * 1024, 1);
            x.metadata = Some(Metadata {
                owner: Some(Owner::new(&uid, "ns", name)),
            });
            x
        };
        // first question: the node is listed
        let before = calls_made();
        let none = pool.stamped("a", &uid).await;
        assert_eq!(none.ok(), Some(vec![]));
        assert!(calls_made() > before);
        // a domain the pool's own connection defines is known at once, without a call
        let mine = format!("idx-mine-{}", std::process::id());
        let x = stamped(&mine);
        let r = pool.call("a", "define", move |c| c.define(&x)).await;
        assert!(r.is_ok(), "{r:?}");
        let before = calls_made();
        assert_eq!(pool.stamped("a", &uid).await.ok(), Some(vec![mine.clone()]));
        assert_eq!(calls_made(), before, "answered from the index");
        // one defined elsewhere (test:///default is one hypervisor for the whole process) is
        // found once libvirt reports the definition, or once the index is older than its bound
        let other = Connection::open("test:///default", "other").unwrap_or_else(|e| panic!("{e}"));
        let theirs = format!("idx-theirs-{}", std::process::id());
        let r = other.define(&stamped(&theirs));
        assert!(r.is_ok(), "{r:?}");
        pool.domain_definition_changed("a", "");
        let mut want = vec![mine.clone(), theirs.clone()];
        want.sort();
        assert_eq!(pool.stamped("a", &uid).await.ok(), Some(want.clone()));
        let late = format!("idx-late-{}", std::process::id());
        let r = other.define(&stamped(&late));
        assert!(r.is_ok(), "{r:?}");
        tokio::time::sleep(STAMP_INDEX_FRESH + Duration::from_millis(100)).await;
        want.push(late.clone());
        want.sort();
        assert_eq!(pool.stamped("a", &uid).await.ok(), Some(want));
        // undefined (the test driver refuses our NVRAM flag: raw calls), and reported: gone
        for d in [&mine, &theirs, &late] {
            let r = other
                .raw()
                .lookup_domain_by_name(d)
                .and_then(|d| d.undefine());
            assert!(r.is_ok(), "{r:?}");
        }
        pool.domain_definition_changed("a", "");
        assert_eq!(pool.stamped("a", &uid).await.ok(), Some(vec![]));
    }

    #[tokio::test]
    async fn calls_on_a_connection_are_counted() {
        let dir = std::env::temp_dir();
        let pool = NodePool::new(Duration::from_secs(5));
        pool.upsert(test_node("a", &dir, "test:///default"));
        pool.upsert(test_node("b", &dir, "test:///default"));
        let before = calls_made();
        for _ in 0..3 {
            let r = pool.call("a", "id", |c| Ok(c.id())).await;
            assert!(r.is_ok(), "{r:?}");
        }
        let r = pool
            .call_pair("a", "b", "ids", |x, y| Ok((x.id(), y.id())))
            .await;
        assert!(r.is_ok(), "{r:?}");
        // other tests of this process count too: at least ours
        assert!(calls_made() - before >= 4);
    }

    /// libvirt's RPC client must never be entered by two threads on one connection (see the
    /// module's comment): concurrent calls on a node each get a connection of their own, at
    /// most MAX_CALLS_PER_NODE of them, and the events lane is none of those.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_calls_never_share_a_connection() {
        use std::collections::HashSet;
        let dir = std::env::temp_dir();
        let pool = Arc::new(NodePool::new(Duration::from_secs(10)));
        pool.upsert(test_node("lanes", &dir, "test:///default"));
        let in_use: Arc<Mutex<HashSet<u64>>> = Arc::default();
        let shared = Arc::new(AtomicU64::new(0));
        let calls = (0..24).map(|_| {
            let (pool, in_use, shared) = (pool.clone(), in_use.clone(), shared.clone());
            async move {
                pool.call("lanes", "hold", move |c| {
                    if !in_use
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(c.id())
                    {
                        shared.fetch_add(1, Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    let _ = c.list_domains();
                    in_use
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&c.id());
                    Ok(c.id())
                })
                .await
            }
        });
        let ids: Vec<u64> = futures::future::join_all(calls)
            .await
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("{e}")))
            .collect();
        assert_eq!(
            shared.load(Ordering::SeqCst),
            0,
            "a connection was used by two calls at once"
        );
        let distinct: HashSet<u64> = ids.iter().copied().collect();
        assert!(
            distinct.len() > 1 && distinct.len() <= MAX_CALLS_PER_NODE,
            "{} connections",
            distinct.len()
        );
        let events = pool
            .call_events("lanes", "event check", |c| Ok(c.id()))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!distinct.contains(&events), "events share a call lane");
        let again = pool
            .call_events("lanes", "event check", |c| Ok(c.id()))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(events, again, "the events connection stays the same");
    }

    /// libvirt's test driver on a file makes every connection a host of its own: the node's
    /// calls and events then share one connection, so what one call defines the next one sees.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_test_driver_file_is_one_host_whatever_the_concurrency() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("node.xml");
        std::fs::write(
            &file,
            "<node><cpu><mhz>2000</mhz><model>t</model><active>4</active><nodes>1</nodes>\
             <sockets>1</sockets><cores>4</cores><threads>1</threads></cpu>\
             <memory>8388608</memory></node>",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let pool = Arc::new(NodePool::new(Duration::from_secs(10)));
        pool.upsert(test_node(
            "file",
            dir.path(),
            &format!("test://{}", file.display()),
        ));
        let calls = (0..8).map(|i| {
            let pool = pool.clone();
            async move {
                pool.call("file", "define", move |c| {
                    let xml = format!(
                        "<domain type='test'><name>d{i}</name><memory>65536</memory>\
                         <os><type>hvm</type></os></domain>"
                    );
                    c.raw()
                        .define_domain_xml(&xml)
                        .map_err(|e| HvError::Local {
                            cause: e.to_string(),
                        })?;
                    std::thread::sleep(Duration::from_millis(10));
                    Ok(c.id())
                })
                .await
            }
        });
        let ids: std::collections::HashSet<u64> = futures::future::join_all(calls)
            .await
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("{e}")))
            .collect();
        assert_eq!(ids.len(), 1, "one connection serves every call");
        let names = pool
            .call_events("file", "list", |c| {
                Ok(c.raw()
                    .list_all_domains(0)
                    .map_err(|e| HvError::Local {
                        cause: e.to_string(),
                    })?
                    .iter()
                    .filter_map(|d| d.name().ok())
                    .collect::<Vec<_>>())
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(names.len(), 8, "every define is on the one host: {names:?}");
    }
}
