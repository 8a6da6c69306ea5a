//! One libvirt connection to one node, and the domain operations the operator needs.
//!
//! Calls are blocking (libvirt's API is); async callers run them on `spawn_blocking`.

use std::sync::Once;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

use std::time::{Duration, Instant};

use super::HvError;
use super::domain_xml::{ConsoleEndpoints, Device, DomainXml, Owner};
use super::ffi;

/// How a shutdown ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// It was not running.
    AlreadyOff,
    /// The guest shut down within the grace period.
    Graceful,
    /// The guest ignored the request; it was forced off after the grace period.
    Forced,
}

/// Runtime figures of a domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DomainInfo {
    pub state: DomainState,
    pub max_memory_kib: u64,
    pub memory_kib: u64,
    pub vcpus: u32,
    pub cpu_time_ns: u64,
}

/// Where a device change applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceScope {
    /// The persistent definition, and the running guest when it runs.
    LiveAndConfig,
    /// The persistent definition only (applies at the next start).
    Config,
    /// The running guest only (the definition already has the change).
    Live,
}

/// A libvirt domain's state, as the operator distinguishes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainState {
    Running,
    Paused,
    ShuttingDown,
    Shutoff,
    Crashed,
    Other,
}

impl DomainState {
    pub(crate) fn from_virt(s: virt::domain::DomainStateEnum) -> Self {
        use virt::domain::DomainState as V;
        use virt::enumutil::Enum;
        match s {
            Enum::Known(V::Running | V::Blocked) => DomainState::Running,
            Enum::Known(V::Paused | V::PMSuspended) => DomainState::Paused,
            Enum::Known(V::Shutdown) => DomainState::ShuttingDown,
            Enum::Known(V::Shutoff) => DomainState::Shutoff,
            Enum::Known(V::Crashed) => DomainState::Crashed,
            _ => DomainState::Other,
        }
    }

    /// Lower-case name, as `virsh list` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            DomainState::Running => "running",
            DomainState::Paused => "paused",
            DomainState::ShuttingDown => "in shutdown",
            DomainState::Shutoff => "shut off",
            DomainState::Crashed => "crashed",
            DomainState::Other => "other",
        }
    }
}

/// A domain's state with the reason it is off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateDetail {
    pub state: DomainState,
    /// It crashed (or failed to run) and is off or crashed.
    pub crashed: bool,
    /// Defined and never started (libvirt reports no reason).
    pub never_started: bool,
    /// The guest shut itself down.
    pub guest_shutdown: bool,
}

/// How long a node's stamp index answers "which domains carry this UID" without listing the
/// node again. Domains this connection defines, undefines, adopts or migrates are recorded at
/// once; the bound covers domains someone else defined (and libvirt's Defined/Undefined events
/// mark the index stale sooner where they are followed).
pub const STAMP_INDEX_FRESH: Duration = Duration::from_secs(2);

/// A node's [`StampIndex`], shared by its connections.
pub type SharedIndex = std::sync::Arc<std::sync::Mutex<StampIndex>>;

impl StampIndex {
    /// The next question lists the node again (stamps of UUIDs already seen are kept).
    pub fn mark_stale(&mut self) {
        self.listed_at = None;
    }
}

/// What a read of a domain's ownership stamp found.
#[derive(Clone, Debug, PartialEq)]
enum StampRead {
    /// The domain's stamp, or `None`: it carries none of ours.
    Found(Option<Owner>),
    /// The domain is gone since it was listed (undefined, or an incoming migration that was
    /// aborted): no answer, and nothing to keep.
    Gone,
}

impl StampRead {
    /// The answer, if there is one: `Some(stamp or None)`; `None` for a domain gone.
    fn found(self) -> Option<Option<Owner>> {
        match self {
            StampRead::Found(o) => Some(o),
            StampRead::Gone => None,
        }
    }
}

/// What the operator knows of a node's domains and their ownership stamps: filled by every
/// listing (a stamp is read only for a UUID not seen before), kept current by the writes of the
/// connections that share it ([`Connection::with_index`]: all of one node's connections in the
/// pool). A connection opened on its own starts from an empty index.
#[derive(Debug, Default)]
pub struct StampIndex {
    /// By UUID: the domain's name and our stamp (None: not ours).
    by_uuid: std::collections::HashMap<String, (String, Option<Owner>)>,
    /// When the node was last listed in full; None: never, or marked stale.
    listed_at: Option<Instant>,
    /// By UUID: each domain's make-up and size at the last full bulk stats reading.
    figures: std::collections::HashMap<String, Figures>,
    /// When the figures were last read in full; None: never.
    figures_at: Option<Instant>,
}

/// What the index keeps of a domain's last full bulk reading: enough to describe the domain's
/// size and notice a change of make-up without reading every stats group again.
#[derive(Clone, Copy, Debug)]
struct Figures {
    shape: u64,
    vcpus: Option<u64>,
    balloon_maximum_kib: Option<u64>,
}

/// Every domain of a node from one bulk stats call ([`Connection::domains_with_stats`]).
#[derive(Debug)]
pub struct BulkListing {
    pub domains: Vec<DomainSummary>,
    /// Per-domain figures. When `fresh` is false only the state was read now: vCPUs, memory
    /// ceiling and make-up are those of the last full reading (None for a domain it did not
    /// see) and the counters are zero, so they are not for metrics.
    pub stats: Vec<super::stats::DomainStats>,
    /// Every stats group was read now.
    pub fresh: bool,
}

/// A domain of the node that has a volume as a writable disk ([`Connection::disk_holders`]).
#[derive(Clone, Debug, PartialEq)]
pub struct DiskHolder {
    /// The node it is on.
    pub node: String,
    /// The domain's name; empty when the node itself could not be read.
    pub domain: String,
    /// Running or paused: its guest may be writing the volume now.
    pub active: bool,
    /// Our ownership stamp on it, if it carries one.
    pub owner: Option<Owner>,
    /// Its definition could not be parsed, so it could not be ruled out.
    pub unreadable: bool,
}

/// One observation of a domain ([`Connection::read_domain`]).
#[derive(Clone, Debug, PartialEq)]
pub struct DomainReading {
    /// The persistent definition exactly as libvirt writes it.
    pub persistent_text: String,
    pub state: StateDetail,
    /// The running guest's definition, when it runs (or is paused).
    pub live: Option<DomainXml>,
    /// The guest's IP addresses ([`guest_ips`]) when it runs with NICs; `None` when it has none,
    /// does not run, or no source could be read (the last known addresses stand).
    pub ips: Option<Vec<String>>,
}

/// The addresses of a guest's own NICs (those of `live`, matched by MAC) from what the address
/// sources reported: NIC by NIC in the definition's order, IPv4 before IPv6, without loopback,
/// link-local or unspecified addresses, each once. Interfaces the host does not know of (a
/// container bridge inside the guest, say) are left out.
pub fn guest_ips(live: &DomainXml, found: &[ffi::RawInterface]) -> Vec<String> {
    use std::net::IpAddr;
    let usable = |a: &IpAddr| match a {
        IpAddr::V4(v) => !(v.is_loopback() || v.is_link_local() || v.is_unspecified()),
        IpAddr::V6(v) => {
            !(v.is_loopback() || v.is_unspecified() || (v.segments()[0] & 0xffc0) == 0xfe80)
        }
    };
    let mut out: Vec<String> = Vec::new();
    for nic in &live.devices.interface {
        let Some(mac) = nic.mac.as_ref().map(|m| m.address.to_ascii_lowercase()) else {
            continue;
        };
        let mut addrs: Vec<IpAddr> = found
            .iter()
            .filter(|i| {
                i.mac
                    .as_deref()
                    .is_some_and(|m| m.eq_ignore_ascii_case(&mac))
            })
            .flat_map(|i| i.addrs.iter())
            .filter_map(|(a, _)| a.parse::<IpAddr>().ok())
            .filter(usable)
            .collect();
        // stable: the sources' own order within each family
        addrs.sort_by_key(|a| a.is_ipv6());
        for a in addrs {
            let a = a.to_string();
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

/// A domain as listed.
#[derive(Clone, Debug, PartialEq)]
pub struct DomainSummary {
    pub name: String,
    pub uuid: String,
    pub state: DomainState,
    /// Our ownership stamp, when present.
    pub owner: Option<Owner>,
    /// The domain's make-up ([`super::stats::shape`]) differs from the previous bulk reading of
    /// this node: someone changed it (the operator or not). False on first sight and for plain
    /// listings.
    pub reshaped: bool,
}

static QUIET: Once = Once::new();
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// An open libvirt connection to one node.
pub struct Connection {
    conn: Connect,
    /// Node name, for messages.
    node: String,
    /// The SSH tunnel libvirt talks through, when there is one; declared after `conn` so the
    /// connection closes before the tunnel does.
    tunnel: Option<super::tunnel::Tunnel>,
    /// Unique per opened connection: tells a reconnect apart from the same connection.
    id: u64,
    /// The node's domains and their stamps, as far as this connection knows them (shared with
    /// the node's other connections in the pool).
    stamps: SharedIndex,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("node", &self.node)
            .finish()
    }
}

impl Connection {
    /// Opens `uri`; `node` names the node in errors. The URI may carry key paths: it is never
    /// logged or put in an error.
    pub fn open(uri: &str, node: &str) -> Result<Self, HvError> {
        // libvirt prints every error to stderr unless told not to; ours go through HvError.
        QUIET.call_once(virt::error::clear_error_callback);
        // events and keepalive need the event loop running before the connection opens
        super::ffi::ensure_event_loop();
        let conn = Connect::open(Some(uri)).map_err(|e| {
            // only the first line: for a file it cannot parse (a `test:///FILE` URI naming
            // any file the operator can read), libxml2 quotes the offending line of the file
            // on the next ones, and that would put the file's content into status and Events
            match HvError::libvirt("connect", node.to_string(), &e) {
                HvError::Libvirt {
                    op,
                    target,
                    cause,
                    code,
                } => HvError::Libvirt {
                    op,
                    target,
                    cause: cause.lines().next().unwrap_or_default().to_string(),
                    code,
                },
                other => other,
            }
        })?;
        // Remote connections: a probe every 5 s, dead after 3 unanswered (about 20 s). Local and
        // test connections do not support keepalive; that is fine.
        let _ = conn.set_keep_alive(5, 3);
        Ok(Self {
            conn,
            node: node.to_string(),
            tunnel: None,
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            stamps: Default::default(),
        })
    }

    /// The underlying libvirt connection: for the other modules of `hypervisor/`, and for
    /// benchmarks that compare this layer with raw libvirt calls on the same connection.
    /// Controllers never use it.
    pub fn raw(&self) -> &Connect {
        &self.conn
    }

    pub(crate) fn err(&self, op: &'static str, e: virt::error::Error) -> HvError {
        HvError::libvirt(op, self.node.clone(), &e)
    }

    /// Shares `index` with the node's other connections: what one of them defines, lists or
    /// learns from an event, every one of them knows.
    pub(crate) fn with_index(mut self, index: SharedIndex) -> Self {
        self.stamps = index;
        self
    }

    /// Keeps `tunnel` alive as long as this connection (libvirt talks through it).
    pub(crate) fn with_tunnel(mut self, tunnel: super::tunnel::Tunnel) -> Self {
        self.tunnel = Some(tunnel);
        self
    }

    /// Unique id of this connection (a reconnect gets a new one).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Node name this connection belongs to.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The host's name as libvirt reports it.
    pub fn hostname(&self) -> Result<String, HvError> {
        self.conn.hostname().map_err(|e| self.err("hostname", e))
    }

    /// `(libvirt daemon version, hypervisor version)` as `major.minor.release`.
    pub fn versions(&self) -> Result<(String, String), HvError> {
        let fmt = |v: u32| format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000);
        let lib = self
            .conn
            .lib_version()
            .map_err(|e| self.err("version", e))?;
        let hv = self
            .conn
            .hyp_version()
            .map_err(|e| self.err("version", e))?;
        Ok((fmt(lib), fmt(hv)))
    }

    /// libvirt's driver name: `QEMU`, `Test`, ...
    pub fn driver(&self) -> Result<String, HvError> {
        self.conn
            .driver_type()
            .map_err(|e| self.err("driver type", e))
    }

    /// The libvirt domain, for the other modules of `hypervisor/`.
    pub(crate) fn domain(&self, name: &str) -> Result<Domain, HvError> {
        self.lookup(name)
    }

    fn lookup(&self, name: &str) -> Result<Domain, HvError> {
        self.conn.lookup_domain_by_name(name).map_err(|e| {
            if Self::is_gone(&e) {
                HvError::NotFound {
                    what: format!("domain {name:?}"),
                    target: self.node.clone(),
                }
            } else {
                self.err("lookup domain", e)
            }
        })
    }

    fn index(&self) -> std::sync::MutexGuard<'_, StampIndex> {
        // a panic while holding the lock leaves at worst a stale index: recover it
        self.stamps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Our stamp on `d`, read with `virDomainGetMetadata` (only our element travels, not the
    /// whole domain XML). `Found(None)` when the domain carries none (libvirt's "no such
    /// metadata", or an element that is not a stamp of ours).
    fn read_owner(&self, d: &Domain) -> Result<StampRead, HvError> {
        use virt::error::{ErrorNumber, ErrorNumberEnum};
        match d.metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(super::domain_xml::OWNER_NS),
            0,
        ) {
            Ok(xml) => Ok(StampRead::Found(Owner::from_metadata_element(&xml))),
            Err(e) if e.code() == ErrorNumberEnum::Known(ErrorNumber::NoDomainMetadata) => {
                Ok(StampRead::Found(None))
            }
            Err(e) if Self::is_gone(&e) => Ok(StampRead::Gone),
            Err(e) => Err(self.err("read ownership stamp", e)),
        }
    }

    /// Replaces the index with the domains just listed (`(name, uuid)`), reading the stamp of
    /// each UUID not seen before with `stamp_of` (see [`Connection::read_owner`]); returns each
    /// listed domain's stamp, in order.
    ///
    /// Only an answer is kept: a domain gone since the listing is left out of the index, so
    /// that its UUID is read again when it comes back (a migration aborted and started again
    /// brings the same UUID); had "no stamp" been kept for it, the domain would look foreign
    /// to this index for as long as it stays, stamped as it is. A read that fails otherwise
    /// fails the listing: a domain whose owner is not known is not reported as nobody's.
    fn reindex(
        &self,
        listed: &[(String, String)],
        mut stamp_of: impl FnMut(usize) -> Result<StampRead, HvError>,
    ) -> Result<Vec<StampRead>, HvError> {
        let known: std::collections::HashMap<String, Option<Owner>> = {
            let ix = self.index();
            listed
                .iter()
                .filter_map(|(_, u)| ix.by_uuid.get(u).map(|(_, o)| (u.clone(), o.clone())))
                .collect()
        };
        // the reads of new stamps happen without the lock: they are RPCs
        let owners = listed
            .iter()
            .enumerate()
            .map(|(i, (_, u))| match known.get(u) {
                Some(o) => Ok(StampRead::Found(o.clone())),
                None => stamp_of(i),
            })
            .collect::<Result<Vec<_>, HvError>>()?;
        let mut ix = self.index();
        ix.by_uuid = listed
            .iter()
            .zip(&owners)
            .filter_map(|((n, u), o)| Some((u.clone(), (n.clone(), o.clone().found()?))))
            .collect();
        ix.listed_at = Some(Instant::now());
        Ok(owners)
    }

    /// Every domain on the host, running or defined, with our stamp when present. A stamp is
    /// read only for a domain this connection has not seen before (it changes only when the
    /// operator adopts the domain, which goes through this connection).
    pub fn list_domains(&self) -> Result<Vec<DomainSummary>, HvError> {
        let doms = self
            .conn
            .list_all_domains(0)
            .map_err(|e| self.err("list domains", e))?;
        let mut listed = Vec::with_capacity(doms.len());
        let mut states = Vec::with_capacity(doms.len());
        for d in &doms {
            let name = d.name().map_err(|e| self.err("domain name", e))?;
            let uuid = d.uuid_string().map_err(|e| self.err("domain uuid", e))?;
            // gone since the listing: left out, as a listing a moment later would
            let st = match d.state() {
                Ok((st, _)) => Some(DomainState::from_virt(st)),
                Err(e) if Self::is_gone(&e) => None,
                Err(e) => return Err(self.err("domain state", e)),
            };
            listed.push((name, uuid));
            states.push(st);
        }
        let owners = self.reindex(&listed, |i| {
            if states[i].is_none() {
                return Ok(StampRead::Gone);
            }
            self.read_owner(&doms[i])
        })?;
        Ok(listed
            .into_iter()
            .zip(states)
            .zip(owners)
            .filter_map(|(((name, uuid), state), read)| {
                Some(DomainSummary {
                    name,
                    uuid,
                    state: state?,
                    owner: read.found()?,
                    reshaped: false,
                })
            })
            .collect())
    }

    /// libvirt's answer for a domain that no longer exists.
    fn is_gone(e: &virt::error::Error) -> bool {
        e.code() == virt::error::ErrorNumberEnum::Known(virt::error::ErrorNumber::NoDomain)
    }

    /// Every domain on the host with its state and our stamp, and the per-domain figures, from
    /// one bulk stats call (`virConnectGetAllDomainStats`); a stamp is read only for a domain
    /// this connection has not seen before. What the node resync reads: its cost does not grow
    /// with the number of domains in steady state.
    ///
    /// Within `figures_fresh` of the node's last full reading only the state group is read
    /// (the other groups ask each running QEMU through its monitor: measured on the lab while
    /// 20 guests booted, 0.3 s for states against 4-6 s for every group); sizes and make-up are
    /// then the last full reading's and no domain is flagged `reshaped` until the next one.
    pub fn domains_with_stats(&self, figures_fresh: Duration) -> Result<BulkListing, HvError> {
        let fresh = self
            .index()
            .figures_at
            .is_none_or(|t| t.elapsed() >= figures_fresh);
        let started = Instant::now();
        let groups = if fresh {
            super::stats::GROUPS
        } else {
            sys::VIR_DOMAIN_STATS_STATE
        };
        let mut stats: Vec<super::stats::DomainStats> =
            super::ffi::all_domain_stats(&self.conn, &self.node, groups)?
                .iter()
                .map(super::stats::DomainStats::from)
                .collect();
        let listed: Vec<(String, String)> = stats
            .iter()
            .map(|s| (s.domain.clone(), s.uuid.clone()))
            .collect();
        let owners = self.reindex(&listed, |i| {
            match self.conn.lookup_domain_by_uuid_string(&listed[i].1) {
                Ok(d) => self.read_owner(&d),
                // gone since the stats were taken
                Err(e) if Self::is_gone(&e) => Ok(StampRead::Gone),
                Err(e) => Err(self.err("lookup domain", e)),
            }
        })?;
        // a domain gone since the stats were taken is left out, its figures with it
        let mut kept = owners.iter().map(|r| matches!(r, StampRead::Found(_)));
        stats.retain(|_| kept.next().unwrap_or(false));
        let owners: Vec<Option<Owner>> = owners.into_iter().filter_map(StampRead::found).collect();
        let reshaped: Vec<bool> = {
            let mut ix = self.index();
            if fresh {
                let flags = stats
                    .iter()
                    .map(|s| ix.figures.get(&s.uuid).is_some_and(|f| f.shape != s.shape))
                    .collect();
                ix.figures = stats
                    .iter()
                    .map(|s| {
                        let f = Figures {
                            shape: s.shape,
                            vcpus: s.vcpus,
                            balloon_maximum_kib: s.balloon_maximum_kib,
                        };
                        (s.uuid.clone(), f)
                    })
                    .collect();
                ix.figures_at = Some(started);
                flags
            } else {
                for s in &mut stats {
                    let known = ix.figures.get(&s.uuid);
                    s.shape = known.map_or(0, |f| f.shape);
                    s.vcpus = known.and_then(|f| f.vcpus);
                    s.balloon_maximum_kib = known.and_then(|f| f.balloon_maximum_kib);
                }
                vec![false; stats.len()]
            }
        };
        let domains = stats
            .iter()
            .zip(owners)
            .zip(reshaped)
            .map(|((s, owner), reshaped)| DomainSummary {
                name: s.domain.clone(),
                uuid: s.uuid.clone(),
                state: s.state.map_or(DomainState::Other, |x| {
                    DomainState::from_virt(virt::domain::DomainStateEnum::from_raw(
                        u32::try_from(x).unwrap_or(u32::MAX),
                    ))
                }),
                owner,
                reshaped,
            })
            .collect();
        Ok(BulkListing {
            domains,
            stats,
            fresh,
        })
    }

    /// Names of the domains stamped with `uid`, from the index when the node was listed within
    /// `fresh`; `None` when the index is older (list the node first, e.g. with
    /// [`Connection::refresh_index`]).
    pub fn stamped_from_index(&self, uid: &str, fresh: Duration) -> Option<Vec<String>> {
        let ix = self.index();
        if ix.listed_at.is_none_or(|t| t.elapsed() > fresh) {
            return None;
        }
        let mut names: Vec<String> = ix
            .by_uuid
            .values()
            .filter(|(_, o)| o.as_ref().is_some_and(|o| o.uid == uid))
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        Some(names)
    }

    /// Lists the node's domains into the index (names and UUIDs: one RPC, plus a stamp read per
    /// domain not seen before).
    pub fn refresh_index(&self) -> Result<(), HvError> {
        let doms = self
            .conn
            .list_all_domains(0)
            .map_err(|e| self.err("list domains", e))?;
        let mut listed = Vec::with_capacity(doms.len());
        for d in &doms {
            let name = d.name().map_err(|e| self.err("domain name", e))?;
            let uuid = d.uuid_string().map_err(|e| self.err("domain uuid", e))?;
            listed.push((name, uuid));
        }
        self.reindex(&listed, |i| self.read_owner(&doms[i]))?;
        Ok(())
    }

    /// Forgets what the index knows of `uuid` (empty: of every domain) and marks it stale, so
    /// the next question lists the node again: libvirt reported a definition change made
    /// elsewhere.
    pub fn index_changed(&self, uuid: &str) {
        let mut ix = self.index();
        if uuid.is_empty() {
            ix.by_uuid.clear();
        } else {
            ix.by_uuid.remove(uuid);
        }
        ix.listed_at = None;
    }

    /// Records a domain this connection defined, adopted or received.
    fn index_put(&self, name: &str, uuid: &str, owner: Option<Owner>) {
        let mut ix = self.index();
        ix.by_uuid.retain(|_, (n, _)| n != name);
        ix.by_uuid
            .insert(uuid.to_string(), (name.to_string(), owner));
    }

    /// Records that the domain `name` is gone from this node.
    fn index_remove(&self, name: &str) {
        self.index().by_uuid.retain(|_, (n, _)| n != name);
    }

    /// Marks the index stale (domains came or went in a way this connection did not record
    /// one by one, e.g. a migration): the next question lists the node again; stamps of
    /// UUIDs already seen are kept.
    pub(crate) fn index_stale(&self) {
        self.index().listed_at = None;
    }

    /// Defines (or redefines) a persistent domain; returns its UUID.
    pub fn define(&self, xml: &DomainXml) -> Result<String, HvError> {
        let text = xml.render()?;
        let d = self
            .conn
            .define_domain_xml(&text)
            .map_err(|e| self.err("define domain", e))?;
        let uuid = d.uuid_string().map_err(|e| self.err("domain uuid", e))?;
        self.index_put(&xml.name, &uuid, xml.owner().cloned());
        Ok(uuid)
    }

    /// The domain's current state.
    pub fn state(&self, name: &str) -> Result<DomainState, HvError> {
        let d = self.lookup(name)?;
        let (st, _) = d.state().map_err(|e| self.err("domain state", e))?;
        Ok(DomainState::from_virt(st))
    }

    /// The domain's state, and whether it is off because it crashed (libvirt's shutoff reason;
    /// on_crash=destroy leaves crashed guests shut off). `(Shutoff, false)` with `never_started`
    /// true for a domain defined and not yet run.
    pub fn state_detail(&self, name: &str) -> Result<StateDetail, HvError> {
        self.detail_of(&self.lookup(name)?)
    }

    fn detail_of(&self, d: &Domain) -> Result<StateDetail, HvError> {
        let (st, reason) = d.state().map_err(|e| self.err("domain state", e))?;
        let state = DomainState::from_virt(st);
        use virt::domain::{DomainShutoffReason as R, DomainStateReason};
        use virt::enumutil::Enum;
        let off = match reason {
            Enum::Known(DomainStateReason::Shutoff(Enum::Known(r))) => Some(r),
            _ => None,
        };
        Ok(StateDetail {
            state,
            crashed: state == DomainState::Crashed || matches!(off, Some(R::Crashed | R::Failed)),
            never_started: state == DomainState::Shutoff && matches!(off, Some(R::Unknown)),
            guest_shutdown: matches!(off, Some(R::Shutdown)),
        })
    }

    /// What one observation of a domain needs, after one lookup: its persistent definition's
    /// text, its state, and the running guest's definition when it runs (4 RPCs for a running
    /// domain, 3 for one that is off). `None` when the domain does not exist.
    pub fn read_domain(&self, name: &str) -> Result<Option<DomainReading>, HvError> {
        let d = match self.lookup(name) {
            Ok(d) => d,
            Err(HvError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let gone = |e: virt::error::Error| {
            if Self::is_gone(&e) { None } else { Some(e) }
        };
        // undefined between the lookup and the reads: as if the lookup had not found it
        let persistent_text = match d.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE) {
            Ok(x) => x,
            Err(e) => {
                return match gone(e) {
                    None => Ok(None),
                    Some(e) => Err(self.err("get domain XML", e)),
                };
            }
        };
        let state = self.detail_of(&d)?;
        let live = match state.state {
            DomainState::Shutoff => None,
            _ => Some(DomainXml::parse(
                &d.xml_desc(0).map_err(|e| self.err("get domain XML", e))?,
            )?),
        };
        let ips = live
            .as_ref()
            .filter(|_| state.state == DomainState::Running)
            .and_then(|l| self.addresses_of(&d, l));
        Ok(Some(DomainReading {
            persistent_text,
            state,
            live,
            ips,
        }))
    }

    /// For each volume of `vols` (`(libvirt pool, volume, path)`), the domains of the node that
    /// have it as a writable disk (not a cdrom, not read-only), by its path (a file, a block
    /// device, a network disk's name) or by pool and volume: a running domain as it runs, another
    /// as it would start. A definition that cannot be parsed counts as holding every one (it
    /// cannot be ruled out); a domain undefined while the node is read is left out.
    pub fn disk_holders(
        &self,
        vols: &[(String, String, String)],
    ) -> Result<Vec<Vec<DiskHolder>>, HvError> {
        let mut out = vec![Vec::new(); vols.len()];
        if vols.is_empty() {
            return Ok(out);
        }
        let doms = self
            .conn
            .list_all_domains(0)
            .map_err(|e| self.err("list domains", e))?;
        for d in &doms {
            let read = d.name().and_then(|name| {
                let active = d.is_active()?;
                let flags = if active {
                    0
                } else {
                    sys::VIR_DOMAIN_XML_INACTIVE
                };
                Ok((name, active, d.xml_desc(flags)?))
            });
            let (domain, active, text) = match read {
                Ok(r) => r,
                Err(e) if Self::is_gone(&e) => continue,
                Err(e) => return Err(self.err("read domain disks", e)),
            };
            let Ok(x) = DomainXml::parse(&text) else {
                for holders in &mut out {
                    holders.push(DiskHolder {
                        node: self.node.clone(),
                        domain: domain.clone(),
                        active,
                        owner: None,
                        unreadable: true,
                    });
                }
                continue;
            };
            for (i, (pool, vol, path)) in vols.iter().enumerate() {
                let holds = x.devices.disk.iter().any(|k| {
                    k.device != "cdrom"
                        && k.readonly.is_none()
                        && k.source.as_ref().is_some_and(|s| {
                            [&s.file, &s.dev, &s.name]
                                .into_iter()
                                .flatten()
                                .any(|p| p == path)
                                || (s.pool.as_deref() == Some(pool.as_str())
                                    && s.volume.as_deref() == Some(vol.as_str()))
                        })
                });
                if holds {
                    out[i].push(DiskHolder {
                        node: self.node.clone(),
                        domain: domain.clone(),
                        active,
                        owner: x.owner().cloned(),
                        unreadable: false,
                    });
                }
            }
        }
        Ok(out)
    }

    /// A running guest's addresses ([`guest_ips`]), from the sources that can know them: the
    /// guest agent when the definition declares its channel (it knows every NIC, static
    /// addresses too), else the DHCP leases of libvirt networks for NICs on one, then the host's
    /// neighbour table for NICs still without an address (a bridge's guests). A source that
    /// fails (an agent not up yet) is passed over; `None` when the guest has no NIC or no
    /// source answered. No address is ever made up: an empty list is what the host knows.
    fn addresses_of(&self, d: &Domain, live: &DomainXml) -> Option<Vec<String>> {
        use ffi::AddressSource;
        let nics = &live.devices.interface;
        if nics.is_empty() {
            return None;
        }
        let mut answered = false;
        let mut found: Vec<ffi::RawInterface> = Vec::new();
        let mut read = |source: AddressSource, found: &mut Vec<ffi::RawInterface>| {
            match ffi::interface_addresses(d, source) {
                Ok(f) => {
                    answered = true;
                    found.extend(f);
                }
                Err(e) => tracing::debug!(
                    node = %self.node, ?source, error = %e,
                    "guest addresses not read from this source"
                ),
            }
        };
        if live.has_guest_agent() {
            read(AddressSource::Agent, &mut found);
            let ips = guest_ips(live, &found);
            if !ips.is_empty() {
                return Some(ips);
            }
        }
        if nics.iter().any(|n| n.iface_type == "network") {
            read(AddressSource::Lease, &mut found);
        }
        let has_address = |mac: &str| {
            found.iter().any(|i| {
                !i.addrs.is_empty()
                    && i.mac
                        .as_deref()
                        .is_some_and(|x| x.eq_ignore_ascii_case(mac))
            })
        };
        let bare = nics
            .iter()
            .filter_map(|n| n.mac.as_ref())
            .any(|m| !has_address(&m.address));
        if bare {
            read(AddressSource::Arp, &mut found);
        }
        answered.then(|| guest_ips(live, &found))
    }

    /// The domain's live XML, parsed.
    pub fn domain_xml(&self, name: &str) -> Result<DomainXml, HvError> {
        let d = self.lookup(name)?;
        let xml = d.xml_desc(0).map_err(|e| self.err("get domain XML", e))?;
        DomainXml::parse(&xml)
    }

    /// Starts a defined domain. Starting a running domain is success.
    pub fn start(&self, name: &str) -> Result<(), HvError> {
        let d = self.lookup(name)?;
        if d.is_active().map_err(|e| self.err("domain state", e))? {
            return Ok(());
        }
        d.create()
            .map(|_| ())
            .map_err(|e| self.err("start domain", e))
    }

    /// True when the domain has a persistent definition (false: it exists only while it runs,
    /// such as an incoming migration that libvirt has not finished).
    pub fn is_persistent(&self, name: &str) -> Result<bool, HvError> {
        self.lookup(name)?
            .is_persistent()
            .map_err(|e| self.err("domain persistence", e))
    }

    /// Forces the domain off. A stopped domain is success.
    pub fn destroy(&self, name: &str) -> Result<(), HvError> {
        let d = self.lookup(name)?;
        if !d.is_active().map_err(|e| self.err("domain state", e))? {
            return Ok(());
        }
        d.destroy().map_err(|e| self.err("destroy domain", e))
    }

    /// Asks the guest to shut down (ACPI power button), waits up to `grace`, then forces it off.
    pub fn shutdown(&self, name: &str, grace: Duration) -> Result<ShutdownOutcome, HvError> {
        let d = self.lookup(name)?;
        if !d.is_active().map_err(|e| self.err("domain state", e))? {
            return Ok(ShutdownOutcome::AlreadyOff);
        }
        // A guest that is already going down may refuse a second request; that is fine.
        let _ = d.shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !d.is_active().map_err(|e| self.err("domain state", e))? {
                return Ok(ShutdownOutcome::Graceful);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        match d.destroy() {
            Ok(()) => Ok(ShutdownOutcome::Forced),
            // it went down between the last check and the destroy
            Err(_) if !d.is_active().map_err(|e| self.err("domain state", e))? => {
                Ok(ShutdownOutcome::Graceful)
            }
            Err(e) => Err(self.err("destroy domain", e)),
        }
    }

    /// Reboots a running domain (ACPI).
    pub fn reboot(&self, name: &str) -> Result<(), HvError> {
        self.lookup(name)?
            .reboot(sys::VIR_DOMAIN_REBOOT_ACPI_POWER_BTN)
            .map_err(|e| self.err("reboot domain", e))
    }

    /// Pauses a running domain in memory. A paused domain is success.
    pub fn suspend(&self, name: &str) -> Result<(), HvError> {
        let d = self.lookup(name)?;
        let (st, _) = d.state().map_err(|e| self.err("domain state", e))?;
        if DomainState::from_virt(st) == DomainState::Paused {
            return Ok(());
        }
        d.suspend().map_err(|e| self.err("suspend domain", e))
    }

    /// Resumes a paused domain. A running domain is success.
    pub fn resume(&self, name: &str) -> Result<(), HvError> {
        let d = self.lookup(name)?;
        let (st, _) = d.state().map_err(|e| self.err("domain state", e))?;
        if DomainState::from_virt(st) != DomainState::Paused {
            return Ok(());
        }
        d.resume().map_err(|e| self.err("resume domain", e))
    }

    /// State, memory, vCPUs and CPU time.
    pub fn info(&self, name: &str) -> Result<DomainInfo, HvError> {
        let i = self
            .lookup(name)?
            .info()
            .map_err(|e| self.err("domain info", e))?;
        Ok(DomainInfo {
            state: DomainState::from_virt(i.state),
            max_memory_kib: i.max_mem,
            memory_kib: i.memory,
            vcpus: i.nr_virt_cpu,
            cpu_time_ns: i.cpu_time,
        })
    }

    /// Where the running domain's VNC and serial consoles are.
    pub fn console(&self, name: &str) -> Result<ConsoleEndpoints, HvError> {
        Ok(self.domain_xml(name)?.console())
    }

    fn device_flags(&self, d: &Domain, scope: DeviceScope) -> Result<u32, HvError> {
        let live = d.is_active().map_err(|e| self.err("domain state", e))?;
        Ok(match scope {
            DeviceScope::LiveAndConfig if live => {
                sys::VIR_DOMAIN_AFFECT_LIVE | sys::VIR_DOMAIN_AFFECT_CONFIG
            }
            DeviceScope::Live if live => sys::VIR_DOMAIN_AFFECT_LIVE,
            DeviceScope::Live => {
                return Err(HvError::Local {
                    cause: format!(
                        "a live device change needs a running domain; it is off on {}",
                        self.node
                    ),
                });
            }
            _ => sys::VIR_DOMAIN_AFFECT_CONFIG,
        })
    }

    /// Adds a disk or NIC to the definition and, with `LiveAndConfig`, to the running guest.
    pub fn attach(&self, name: &str, device: &Device, scope: DeviceScope) -> Result<(), HvError> {
        let d = self.lookup(name)?;
        let flags = self.device_flags(&d, scope)?;
        d.attach_device_flags(&device.render()?, flags)
            .map_err(|e| self.err("attach device", e))
    }

    /// Removes a disk or NIC. Live removal of PCI devices needs the guest's cooperation (ACPI);
    /// libvirt returns once the request is sent, so callers confirm through the live XML.
    pub fn detach(&self, name: &str, device: &Device, scope: DeviceScope) -> Result<(), HvError> {
        let d = self.lookup(name)?;
        let flags = self.device_flags(&d, scope)?;
        d.detach_device_flags(&device.render()?, flags)
            .map_err(|e| self.err("detach device", e))
    }

    /// The persistent (inactive) definition, which differs from the live XML after config-only
    /// changes.
    pub fn persistent_xml(&self, name: &str) -> Result<DomainXml, HvError> {
        DomainXml::parse(&self.persistent_xml_text(name)?)
    }

    /// The persistent definition exactly as libvirt writes it (every element, not only those
    /// the typed model knows), without secure fields such as VNC passwords: what a backup keeps.
    pub fn persistent_xml_text(&self, name: &str) -> Result<String, HvError> {
        let d = self.lookup(name)?;
        d.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
            .map_err(|e| self.err("get domain XML", e))
    }

    /// Host facts as libvirt reports them, for nodes reached without SSH (test, TLS, TCP): CPUs,
    /// CPU model, memory, free memory, versions and KVM support. Load averages and CPU use need
    /// SSH and stay unset.
    pub fn libvirt_facts(&self) -> Result<super::host_facts::HostFacts, HvError> {
        let ni = self
            .conn
            .node_info()
            .map_err(|e| self.err("node info", e))?;
        // a driver that cannot tell (libvirt's test driver on a node file has no NUMA cells, and
        // libvirt calls its 0 an error) still has CPUs and memory: capacity must not depend on it
        let free = self.conn.free_memory().ok();
        let (lib, hv) = self.versions()?;
        let driver = self.driver()?;
        let kvm = if driver == "QEMU" {
            let caps = self
                .conn
                .capabilities()
                .map_err(|e| self.err("capabilities", e))?;
            Some(caps.contains("<domain type='kvm'"))
        } else {
            None
        };
        Ok(super::host_facts::HostFacts {
            cpus: Some(ni.cpus),
            cpu_model: Some(ni.model),
            memory_total: ni.memory.checked_mul(1024),
            memory_available: free,
            load: None,
            cpu_times: None,
            kvm,
            libvirt_version: Some(lib),
            qemu_version: (driver == "QEMU").then_some(hv),
        })
    }

    /// Sends every domain lifecycle event on this node to `tx` until the subscription is dropped.
    pub fn subscribe_events(
        &self,
        tx: tokio::sync::mpsc::UnboundedSender<super::ffi::DomainEvent>,
    ) -> Result<super::ffi::EventSubscription, HvError> {
        super::ffi::subscribe_lifecycle(&self.conn, &self.node, tx)
    }

    /// Stats of every domain on the node, in one call.
    pub fn domain_stats(&self) -> Result<Vec<super::stats::DomainStats>, HvError> {
        Ok(
            super::ffi::all_domain_stats(&self.conn, &self.node, super::stats::GROUPS)?
                .iter()
                .map(super::stats::DomainStats::from)
                .collect(),
        )
    }

    /// True while libvirt considers the connection alive (keepalive answered) and its SSH
    /// tunnel, if any, still runs.
    pub fn is_alive(&self) -> bool {
        self.conn.is_alive().unwrap_or(false) && self.tunnel.as_ref().is_none_or(|t| t.is_running())
    }

    /// Stamps a domain (running or not) with our ownership metadata, live and in its definition,
    /// without restarting it: how an existing domain is adopted.
    pub fn set_owner(&self, name: &str, owner: &Owner) -> Result<(), HvError> {
        let d = self.lookup(name)?;
        let live = d.is_active().map_err(|e| self.err("domain state", e))?;
        let flags = if live {
            sys::VIR_DOMAIN_AFFECT_LIVE | sys::VIR_DOMAIN_AFFECT_CONFIG
        } else {
            sys::VIR_DOMAIN_AFFECT_CONFIG
        };
        d.set_metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(&owner.to_metadata_element()?),
            Some(super::domain_xml::OWNER_PREFIX),
            Some(super::domain_xml::OWNER_NS),
            flags,
        )
        .map_err(|e| self.err("set domain metadata", e))?;
        let uuid = d.uuid_string().map_err(|e| self.err("domain uuid", e))?;
        self.index_put(name, &uuid, Some(owner.clone()));
        Ok(())
    }

    /// Sets vCPUs and memory in the persistent definition only (they apply at the next start),
    /// for domains whose definition the operator does not rewrite (adopted ones).
    pub fn set_config_resources(
        &self,
        name: &str,
        vcpus: Option<u32>,
        memory_kib: Option<u64>,
    ) -> Result<(), HvError> {
        let d = self.lookup(name)?;
        if let Some(v) = vcpus {
            let cur = self.persistent_xml(name)?.vcpu.count;
            let max = sys::VIR_DOMAIN_VCPU_CONFIG | sys::VIR_DOMAIN_VCPU_MAXIMUM;
            let cfg = sys::VIR_DOMAIN_VCPU_CONFIG;
            // the current count may never exceed the maximum: order the two calls
            let steps = if v >= cur { [max, cfg] } else { [cfg, max] };
            for f in steps {
                d.set_vcpus_flags(v, f)
                    .map_err(|e| self.err("set vcpus", e))?;
            }
        }
        if let Some(m) = memory_kib {
            let cfg = sys::VIR_DOMAIN_MEM_CONFIG;
            d.set_memory_flags(m, cfg | sys::VIR_DOMAIN_MEM_MAXIMUM)
                .map_err(|e| self.err("set memory", e))?;
            d.set_memory_flags(m, cfg)
                .map_err(|e| self.err("set memory", e))?;
        }
        Ok(())
    }

    /// Removes the definition (and NVRAM). A missing domain is success.
    pub fn undefine(&self, name: &str) -> Result<(), HvError> {
        let d = match self.lookup(name) {
            Ok(d) => d,
            Err(HvError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        d.undefine_flags(sys::VIR_DOMAIN_UNDEFINE_NVRAM)
            .map_err(|e| self.err("undefine domain", e))?;
        // a running domain stays, transient: the next question lists the node again
        self.index_remove(name);
        self.index().listed_at = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection to libvirt's test driver on a node file holding `xml`; the directory lives
    /// as long as the returned guard.
    fn test_node(xml: &str) -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("node.xml");
        std::fs::write(&file, xml).unwrap_or_else(|e| panic!("{e}"));
        let c = Connection::open(&format!("test://{}", file.display()), "n")
            .unwrap_or_else(|e| panic!("{e}"));
        (dir, c)
    }

    fn raw(mac: &str, addrs: &[&str]) -> ffi::RawInterface {
        ffi::RawInterface {
            name: "vnet0".into(),
            mac: Some(mac.into()),
            addrs: addrs.iter().map(|a| ((*a).to_string(), 24)).collect(),
        }
    }

    #[test]
    fn guest_ips_follow_the_nics_and_leave_out_what_is_not_the_guests_reach() {
        let live = DomainXml::parse(
            "<domain type='kvm'><name>g</name><memory>65536</memory><vcpu>1</vcpu><os><type>hvm</type></os><devices>\
             <interface type='bridge'><mac address='52:54:00:00:00:01'/><source bridge='br0'/></interface>\
             <interface type='network'><mac address='52:54:00:00:00:02'/><source network='n'/></interface>\
             <interface type='bridge'><source bridge='br0'/></interface>\
             </devices></domain>",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let found = [
            // the second NIC as the agent and a lease both report it, MAC in capitals
            raw("52:54:00:00:00:02", &["10.0.0.7"]),
            raw(
                "52:54:00:00:00:01",
                &["fe80::1", "2001:db8::5", "127.0.0.1", "192.0.2.4"],
            ),
            raw("52:54:00:00:00:02", &["10.0.0.7", "169.254.3.3", "::1"]),
            // inside the guest only (a container bridge): not one of its NICs
            raw("02:42:ac:11:00:01", &["172.17.0.1"]),
            raw("52:54:00:00:00:01", &["0.0.0.0", "not an address"]),
        ];
        assert_eq!(
            guest_ips(&live, &found),
            ["192.0.2.4", "2001:db8::5", "10.0.0.7"]
        );
        let upper = [raw("52:54:00:00:00:0A", &["10.1.1.1"])];
        let live_upper = DomainXml::parse(
            "<domain type='kvm'><name>g</name><memory>65536</memory><vcpu>1</vcpu><os><type>hvm</type></os><devices>\
             <interface type='bridge'><mac address='52:54:00:00:00:0a'/><source bridge='br0'/></interface>\
             </devices></domain>",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(guest_ips(&live_upper, &upper), ["10.1.1.1"]);
        assert!(guest_ips(&live_upper, &[]).is_empty());
    }

    #[test]
    fn a_running_guest_with_nics_is_read_with_its_addresses() {
        let (_dir, c) = test_node(
            "<node><network><name>lan</name><bridge name='virbr9'/><forward/>\
             <ip address='10.7.0.1' netmask='255.255.255.0'><dhcp><range start='10.7.0.10' end='10.7.0.99'/></dhcp></ip>\
             </network></node>",
        );
        // defined as another tool would (the operator's own render has no channel)
        let define = |name: &str, devices: &str| {
            c.raw()
                .define_domain_xml(&format!(
                    "<domain type='test'><name>{name}</name><memory>65536</memory><vcpu>1</vcpu>\
                     <os><type>hvm</type></os><devices>{devices}</devices></domain>"
                ))
                .unwrap_or_else(|e| panic!("{e}"));
        };
        let read = |name: &str| {
            c.read_domain(name)
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|| panic!("{name} is defined"))
        };
        define(
            "two-nics",
            "<interface type='network'><mac address='52:54:00:00:07:01'/><source network='lan'/></interface>\
             <interface type='bridge'><mac address='52:54:00:00:07:02'/><source bridge='br0'/></interface>\
             <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>",
        );
        // off: nothing to ask
        assert_eq!(read("two-nics").ips, None);
        c.start("two-nics").unwrap_or_else(|e| panic!("{e}"));
        let r = read("two-nics");
        assert!(r.live.as_ref().is_some_and(DomainXml::has_guest_agent));
        let ips = r.ips.unwrap_or_else(|| panic!("read"));
        // libvirt's test driver gives a NIC on a network an address in that network's range,
        // one on a bridge an address in 192.168.0.0/24
        assert_eq!(ips.len(), 2, "{ips:?}");
        assert!(ips[0].starts_with("10.7.0."), "{ips:?}");
        assert!(ips[1].starts_with("192.168.0."), "{ips:?}");
        // the operator's own render keeps no channel
        let rendered = r
            .live
            .map(|l| l.render())
            .transpose()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(rendered.is_some_and(|x| !x.contains("channel")));

        // no agent: the network's lease
        define(
            "leased",
            "<interface type='network'><mac address='52:54:00:00:07:04'/><source network='lan'/></interface>",
        );
        c.start("leased").unwrap_or_else(|e| panic!("{e}"));
        let ips = read("leased").ips.unwrap_or_else(|| panic!("read"));
        assert!(ips.len() == 1 && ips[0].starts_with("10.7.0."), "{ips:?}");

        define("no-nic", "");
        c.start("no-nic").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read("no-nic").ips, None, "no NIC: nothing to read");

        // every source fails (the network is not on this host): the reading does not, and says
        // it could not tell
        define(
            "lost-network",
            "<interface type='network'><mac address='52:54:00:00:07:03'/><source network='gone'/></interface>",
        );
        c.start("lost-network").unwrap_or_else(|e| panic!("{e}"));
        let r = read("lost-network");
        assert_eq!(r.state.state, DomainState::Running);
        assert_eq!(r.ips, None);
    }

    #[test]
    fn a_test_node_file_without_numa_cells_reports_cpus_and_memory() {
        let (_dir, c) = test_node(
            "<node><cpu><nodes>1</nodes><sockets>2</sockets><cores>4</cores><threads>2</threads></cpu>\
             <memory>8388608</memory></node>",
        );
        let f = c.libvirt_facts().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.cpus, Some(16));
        assert_eq!(f.memory_total, Some(8 << 30));
        assert_eq!(
            f.memory_available, None,
            "the file has no cells to report it"
        );
    }

    /// A stamp read of a domain that vanished since it was listed (an incoming migration
    /// aborted) is not an answer: the index does not keep "not ours" for its UUID, so the same
    /// UUID arriving again (the migration started again) is read and found stamped.
    #[test]
    fn a_domain_gone_before_its_stamp_was_read_is_read_again_when_it_is_back() {
        let (_dir, c) = test_node("<node/>");
        let stamped = "<domain type='test'><name>default_web</name>\
             <metadata><kvmop:owner xmlns:kvmop='https://kvm-operator.io/xmlns/owner/v1alpha1' \
             uid='u1' namespace='default' name='web'/></metadata>\
             <memory>65536</memory><vcpu>1</vcpu><os><type>hvm</type></os><devices/></domain>";
        let xml = DomainXml::parse(stamped).unwrap_or_else(|e| panic!("{e}"));
        let uuid = c.define(&xml).unwrap_or_else(|e| panic!("{e}"));
        let plain = DomainXml::parse(
            "<domain type='test'><name>theirs</name><memory>65536</memory><vcpu>1</vcpu>\
             <os><type>hvm</type></os><devices/></domain>",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        c.define(&plain).unwrap_or_else(|e| panic!("{e}"));

        // what libvirt answers: a stamp, none, or the domain is gone
        let d = c.domain("default_web").unwrap_or_else(|e| panic!("{e}"));
        let read = c.read_owner(&d).unwrap_or_else(|e| panic!("{e}"));
        let StampRead::Found(Some(o)) = read else {
            panic!("{read:?}")
        };
        assert_eq!(o.uid, "u1");
        let t = c.domain("theirs").unwrap_or_else(|e| panic!("{e}"));
        assert!(
            matches!(c.read_owner(&t), Ok(StampRead::Found(None))),
            "no stamp"
        );
        // (the test driver takes no undefine flags: the plain call)
        t.undefine().unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(c.read_owner(&t), Ok(StampRead::Gone)), "gone");

        // a listing that found default_web gone when it read the stamp: left out of the
        // listing and of the index
        c.index_changed("");
        let listed = vec![("default_web".to_string(), uuid.clone())];
        let owners = c
            .reindex(&listed, |_| Ok(StampRead::Gone))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(owners, vec![StampRead::Gone]);
        let fresh = Duration::from_secs(60);
        assert_eq!(c.stamped_from_index("u1", fresh), Some(vec![]));
        // back with the same UUID: its stamp is read, not remembered as missing
        let all = c.list_domains().unwrap_or_else(|e| panic!("{e}"));
        let web = all.iter().find(|d| d.uuid == uuid);
        assert_eq!(
            web.and_then(|d| d.owner.as_ref()).map(|o| o.uid.as_str()),
            Some("u1"),
            "{all:?}"
        );
        assert_eq!(
            c.stamped_from_index("u1", fresh),
            Some(vec!["default_web".to_string()])
        );
        // a read that fails otherwise fails the listing instead of calling the domain nobody's
        let failed = c.reindex(&listed, |_| {
            Err(HvError::Local {
                cause: "link cut".into(),
            })
        });
        assert!(failed.is_ok(), "a known UUID is not read again");
        c.index_changed("");
        let failed = c.reindex(&listed, |_| {
            Err(HvError::Local {
                cause: "link cut".into(),
            })
        });
        assert!(failed.is_err());
    }

    #[test]
    fn a_reading_soon_after_a_full_one_reads_states_only() {
        // libvirt 9.0's test driver answers the state group only, so this checks which
        // readings are full and that states stay current; the kept sizes and the make-up
        // check are exercised on real KVM (tests/lab.rs)
        let (_dir, c) = test_node(
            "<node><domain type='test'><name>old</name><memory>65536</memory><vcpu>2</vcpu>\
             <os><type>hvm</type></os></domain></node>",
        );
        let hour = Duration::from_secs(3600);
        let states = |l: &BulkListing| -> Vec<(String, DomainState)> {
            l.domains
                .iter()
                .map(|d| (d.name.clone(), d.state))
                .collect()
        };
        let first = c.domains_with_stats(hour).unwrap_or_else(|e| panic!("{e}"));
        assert!(first.fresh, "never read in full: every group");
        let xml = DomainXml::parse(
            "<domain type='test'><name>new</name><memory>65536</memory><vcpu>3</vcpu>\
             <os><type>hvm</type></os><devices/></domain>",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        c.define(&xml).unwrap_or_else(|e| panic!("{e}"));
        c.start("new").unwrap_or_else(|e| panic!("{e}"));
        let soon = c.domains_with_stats(hour).unwrap_or_else(|e| panic!("{e}"));
        assert!(!soon.fresh, "within the window of a full reading");
        assert!(
            states(&soon).contains(&("new".to_string(), DomainState::Running)),
            "{:?}",
            states(&soon)
        );
        assert!(soon.domains.iter().all(|d| !d.reshaped));
        let full = c
            .domains_with_stats(Duration::ZERO)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(full.fresh, "the window has passed");
        assert_eq!(states(&full), states(&soon));
        let again = c.domains_with_stats(hour).unwrap_or_else(|e| panic!("{e}"));
        assert!(!again.fresh, "the full reading opened a new window");
    }
}
