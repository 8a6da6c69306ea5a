//! The one file with `unsafe`: the libvirt calls the `virt` crate does not wrap safely.
//!
//! - the default event loop (libvirt needs it for domain events and for keepalive),
//! - domain lifecycle events (`virConnectDomainEventRegisterAny`),
//! - bulk domain stats (`virConnectGetAllDomainStats`), decoded and freed here (the `virt`
//!   wrapper leaks the records),
//! - a guest's interface addresses (`virDomainInterfaceAddresses`; the `virt` wrapper frees the
//!   array but leaks every interface in it),
//! - glibc's arena limit (`mallopt`), for the memory libvirt's calls allocate on the blocking
//!   threads.
//!
//! Every pointer handed to libvirt stays valid for as long as libvirt may use it; every record
//! libvirt returns is freed exactly once.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::ffi::{CStr, c_int, c_void};
use std::sync::Once;

use tokio::sync::mpsc::UnboundedSender;
use virt::connect::Connect;
use virt::sys;

use super::HvError;

static EVENT_LOOP: Once = Once::new();

/// Registers libvirt's default event loop and runs it on a dedicated thread. Must happen before
/// connections that want events or keepalive are opened; later calls do nothing.
pub fn ensure_event_loop() {
    EVENT_LOOP.call_once(|| {
        if virt::event::event_register_default_impl().is_err() {
            tracing::error!(
                "libvirt event loop could not be registered: no domain events, no keepalive"
            );
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| {
                loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        tracing::error!(error = %e, "libvirt event loop iteration failed");
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the libvirt event thread");
        }
    });
}

/// glibc arenas the operator allows unless its environment says otherwise.
pub const MALLOC_ARENAS: i32 = 2;

/// Whether the process should set its own arena limit: not when the environment already sets
/// one (`MALLOC_ARENA_MAX`, or `glibc.malloc.arena_max` in `GLIBC_TUNABLES`), which glibc has
/// read at start-up and which the user's choice wins over.
pub fn arena_limit_wanted(env: impl Fn(&str) -> Option<String>) -> bool {
    env("MALLOC_ARENA_MAX").is_none()
        && !env("GLIBC_TUNABLES").is_some_and(|t| t.contains("glibc.malloc.arena_max"))
}

/// Limits glibc's malloc to [`MALLOC_ARENAS`] arenas. glibc gives each thread that allocates an
/// arena of its own, up to eight per core, and every libvirt call runs on one of the blocking
/// pool's threads, which a burst of node passes makes many of: the domain definitions libvirt
/// parses (and, on the test driver, keeps) end up spread over 16 arenas on two cores, each with
/// its own free space. Two arenas took 0.8-1.7 MiB off the peak of 100 nodes and 2,000 VMs
/// across runs, with no change in the time to Running (BENCHMARKS.md, scenario 5).
///
/// Call it first in `main`, before any thread allocates: glibc fixes its limit once the ninth
/// arena is asked for. Returns whether the limit was set (not when the environment sets one, or
/// off glibc).
pub fn limit_malloc_arenas() -> bool {
    if !arena_limit_wanted(|k| std::env::var(k).ok()) {
        return false;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only stores the parameter; it is called before the operator starts
        // any thread of its own.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Lifecycle event kinds (`virDomainEventType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LifecycleKind {
    Defined,
    Undefined,
    Started,
    Suspended,
    Resumed,
    Stopped,
    Shutdown,
    PmSuspended,
    Crashed,
    Other,
}

impl LifecycleKind {
    fn from_raw(v: c_int) -> Self {
        match u32::try_from(v).unwrap_or(u32::MAX) {
            sys::VIR_DOMAIN_EVENT_DEFINED => Self::Defined,
            sys::VIR_DOMAIN_EVENT_UNDEFINED => Self::Undefined,
            sys::VIR_DOMAIN_EVENT_STARTED => Self::Started,
            sys::VIR_DOMAIN_EVENT_SUSPENDED => Self::Suspended,
            sys::VIR_DOMAIN_EVENT_RESUMED => Self::Resumed,
            sys::VIR_DOMAIN_EVENT_STOPPED => Self::Stopped,
            sys::VIR_DOMAIN_EVENT_SHUTDOWN => Self::Shutdown,
            sys::VIR_DOMAIN_EVENT_PMSUSPENDED => Self::PmSuspended,
            sys::VIR_DOMAIN_EVENT_CRASHED => Self::Crashed,
            _ => Self::Other,
        }
    }
}

/// One lifecycle event of one domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainEvent {
    /// Node the event came from.
    pub node: String,
    pub domain: String,
    pub uuid: String,
    pub kind: LifecycleKind,
    /// libvirt's detail code (e.g. why it stopped).
    pub detail: i32,
}

struct Sink {
    node: String,
    tx: UnboundedSender<DomainEvent>,
}

fn domain_name_uuid(dom: sys::virDomainPtr) -> (String, String) {
    // SAFETY: libvirt passes a valid domain for the duration of the callback; the name is owned
    // by the domain object and copied before returning.
    let name = unsafe {
        let p = sys::virDomainGetName(dom);
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    let mut buf = [0 as std::ffi::c_char; sys::VIR_UUID_STRING_BUFLEN as usize];
    // SAFETY: the buffer has the size libvirt documents for UUID strings.
    let uuid = unsafe {
        if sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) == 0 {
            CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
        } else {
            String::new()
        }
    };
    (name, uuid)
}

unsafe extern "C" fn lifecycle_cb(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: opaque is the Box<Sink> registered below; libvirt keeps it alive until free_cb.
    let sink = unsafe { &*(opaque as *const Sink) };
    let (domain, uuid) = domain_name_uuid(dom);
    // a closed receiver only means nobody listens any more
    let _ = sink.tx.send(DomainEvent {
        node: sink.node.clone(),
        domain,
        uuid,
        kind: LifecycleKind::from_raw(event),
        detail,
    });
    0
}

unsafe extern "C" fn free_cb(opaque: *mut c_void) {
    // SAFETY: called once by libvirt when the callback is deregistered.
    drop(unsafe { Box::from_raw(opaque as *mut Sink) });
}

/// A lifecycle event subscription; dropping it deregisters the callback.
pub struct EventSubscription {
    conn: Connect,
    id: c_int,
}

impl std::fmt::Debug for EventSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSubscription")
            .field("id", &self.id)
            .finish()
    }
}

impl Drop for EventSubscription {
    fn drop(&mut self) {
        // SAFETY: id came from a successful registration on this connection.
        unsafe {
            sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), self.id);
        }
    }
}

/// Sends every lifecycle event of every domain on `conn` to `tx`, until the returned
/// subscription is dropped. [`ensure_event_loop`] must have run before `conn` was opened.
pub fn subscribe_lifecycle(
    conn: &Connect,
    node: &str,
    tx: UnboundedSender<DomainEvent>,
) -> Result<EventSubscription, HvError> {
    let opaque = Box::into_raw(Box::new(Sink {
        node: node.to_string(),
        tx,
    })) as *mut c_void;
    // SAFETY: libvirt calls lifecycle callbacks with the lifecycle signature; the generic type
    // in the registration API is only a carrier (libvirt's documented VIR_DOMAIN_EVENT_CALLBACK).
    let cb: sys::virConnectDomainEventGenericCallback = unsafe {
        Some(std::mem::transmute::<
            unsafe extern "C" fn(
                sys::virConnectPtr,
                sys::virDomainPtr,
                c_int,
                c_int,
                *mut c_void,
            ) -> c_int,
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
        >(lifecycle_cb))
    };
    // SAFETY: conn is open; opaque is freed by free_cb when deregistered (or below on failure).
    let id = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
            cb,
            opaque,
            Some(free_cb),
        )
    };
    if id < 0 {
        // SAFETY: libvirt did not take ownership on failure.
        drop(unsafe { Box::from_raw(opaque as *mut Sink) });
        let e = virt::error::Error::last_error();
        return Err(HvError::libvirt(
            "subscribe to domain events",
            node.to_string(),
            &e,
        ));
    }
    Ok(EventSubscription {
        conn: conn.clone(),
        id,
    })
}

/// A typed parameter value from libvirt.
#[derive(Clone, Debug, PartialEq)]
pub enum StatValue {
    Int(i64),
    UInt(u64),
    Double(f64),
    Bool(bool),
    Text(String),
}

impl StatValue {
    /// The value as an unsigned integer, when it is one.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            StatValue::UInt(v) => Some(*v),
            StatValue::Int(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }
}

/// Stats of one domain, as libvirt names them (`cpu.time`, `balloon.current`, `block.0.rd.bytes`…).
#[derive(Clone, Debug, PartialEq)]
pub struct RawDomainStats {
    pub domain: String,
    pub uuid: String,
    pub params: BTreeMap<String, StatValue>,
}

/// Decodes libvirt typed parameters.
///
/// # Safety
/// `params` must point to `n` valid `virTypedParameter`s (or be null).
unsafe fn decode_params(
    params: sys::virTypedParameterPtr,
    n: c_int,
) -> BTreeMap<String, StatValue> {
    let mut out = BTreeMap::new();
    if params.is_null() {
        return out;
    }
    for j in 0..usize::try_from(n).unwrap_or(0) {
        // SAFETY: j < n per the caller; the union member read matches type_.
        let p = unsafe { &*params.add(j) };
        let field = unsafe { CStr::from_ptr(p.field.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let v = unsafe {
            match u32::try_from(p.type_).unwrap_or(0) {
                sys::VIR_TYPED_PARAM_INT => StatValue::Int(i64::from(p.value.i)),
                sys::VIR_TYPED_PARAM_UINT => StatValue::UInt(u64::from(p.value.ui)),
                sys::VIR_TYPED_PARAM_LLONG => StatValue::Int(p.value.l),
                sys::VIR_TYPED_PARAM_ULLONG => StatValue::UInt(p.value.ul),
                sys::VIR_TYPED_PARAM_DOUBLE => StatValue::Double(p.value.d),
                sys::VIR_TYPED_PARAM_BOOLEAN => StatValue::Bool(p.value.b != 0),
                sys::VIR_TYPED_PARAM_STRING if !p.value.s.is_null() => {
                    StatValue::Text(CStr::from_ptr(p.value.s).to_string_lossy().into_owned())
                }
                _ => continue,
            }
        };
        out.insert(field, v);
    }
    out
}

/// Stats of every domain on the host in one call (`virConnectGetAllDomainStats`).
pub fn all_domain_stats(
    conn: &Connect,
    node: &str,
    stats: u32,
) -> Result<Vec<RawDomainStats>, HvError> {
    let mut recs: *mut sys::virDomainStatsRecordPtr = std::ptr::null_mut();
    // SAFETY: conn is open; recs receives a NULL-terminated array we free below.
    let n = unsafe { sys::virConnectGetAllDomainStats(conn.as_ptr(), stats, &mut recs, 0) };
    if n < 0 {
        let e = virt::error::Error::last_error();
        return Err(HvError::libvirt("get domain stats", node.to_string(), &e));
    }
    let mut out = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    if !recs.is_null() {
        for i in 0..usize::try_from(n).unwrap_or(0) {
            // SAFETY: i < n, and each record is valid until the list is freed.
            let rec = unsafe { &**recs.add(i) };
            let (domain, uuid) = domain_name_uuid(rec.dom);
            // SAFETY: the record's params are valid until the list is freed.
            let params = unsafe { decode_params(rec.params, rec.nparams) };
            out.push(RawDomainStats {
                domain,
                uuid,
                params,
            });
        }
        // SAFETY: frees the records (and their domain references) exactly once.
        unsafe { sys::virDomainStatsRecordListFree(recs) };
    }
    Ok(out)
}

/// The domain's job: its type (`VIR_DOMAIN_JOB_*`) and statistics (`data_total`,
/// `time_elapsed`, `downtime`, ...). `virt` 0.5's `job_stats` builds a slice from a null pointer
/// when no job runs; this does not.
pub fn job_stats(
    dom: &virt::domain::Domain,
    flags: u32,
) -> Result<(i32, BTreeMap<String, StatValue>), virt::error::Error> {
    let mut typ: c_int = 0;
    let mut params: sys::virTypedParameterPtr = std::ptr::null_mut();
    let mut n: c_int = 0;
    // SAFETY: out-pointers are valid; params is freed below with virTypedParamsFree.
    let r =
        unsafe { sys::virDomainGetJobStats(dom.as_ptr(), &mut typ, &mut params, &mut n, flags) };
    if r < 0 {
        return Err(virt::error::Error::last_error());
    }
    // SAFETY: libvirt returned n params at params (or null).
    let decoded = unsafe { decode_params(params, n) };
    if !params.is_null() {
        // SAFETY: frees what libvirt allocated, once.
        unsafe { sys::virTypedParamsFree(params, n) };
    }
    Ok((typ, decoded))
}

/// Where a guest's addresses are read from (`virDomainInterfaceAddressesSource`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressSource {
    /// The DHCP leases of the libvirt network the NIC is on.
    Lease,
    /// The QEMU guest agent inside the guest.
    Agent,
    /// The host's neighbour (ARP) table.
    Arp,
}

/// One guest interface as libvirt reports it: its name, MAC and addresses (`addr`, prefix).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawInterface {
    pub name: String,
    pub mac: Option<String>,
    pub addrs: Vec<(String, u32)>,
}

fn owned(p: *const std::ffi::c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: libvirt hands out NUL-terminated strings that live until the interface is freed.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// The guest's interfaces and their addresses, from `source`.
pub fn interface_addresses(
    dom: &virt::domain::Domain,
    source: AddressSource,
) -> Result<Vec<RawInterface>, virt::error::Error> {
    let src = match source {
        AddressSource::Lease => sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
        AddressSource::Agent => sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
        AddressSource::Arp => sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP,
    };
    let mut ifaces: *mut sys::virDomainInterfacePtr = std::ptr::null_mut();
    // SAFETY: dom is valid for the call; ifaces receives an array of n interfaces freed below.
    let n = unsafe { sys::virDomainInterfaceAddresses(dom.as_ptr(), &mut ifaces, src, 0) };
    if n < 0 {
        return Err(virt::error::Error::last_error());
    }
    let n = usize::try_from(n).unwrap_or(0);
    let mut out = Vec::with_capacity(n);
    if !ifaces.is_null() {
        for i in 0..n {
            // SAFETY: i < n; each entry is a valid interface until freed.
            let p = unsafe { *ifaces.add(i) };
            if p.is_null() {
                continue;
            }
            // SAFETY: p is valid until virDomainInterfaceFree below.
            let iface = unsafe { &*p };
            let mut addrs = Vec::with_capacity(iface.naddrs as usize);
            if !iface.addrs.is_null() {
                for k in 0..iface.naddrs as usize {
                    // SAFETY: k < naddrs, within the interface's address array.
                    let a = unsafe { &*iface.addrs.add(k) };
                    if let Some(addr) = owned(a.addr) {
                        addrs.push((addr, a.prefix));
                    }
                }
            }
            out.push(RawInterface {
                name: owned(iface.name).unwrap_or_default(),
                mac: owned(iface.hwaddr),
                addrs,
            });
            // SAFETY: frees this interface (its strings and addresses) exactly once.
            unsafe { sys::virDomainInterfaceFree(p) };
        }
        // SAFETY: the array itself, allocated by libvirt, freed once after its entries.
        unsafe { libc::free(ifaces.cast::<c_void>()) };
    }
    Ok(out)
}

/// Aborts the domain's current job (a migration, say). `virt` 0.5 does not wrap it.
pub fn abort_job(dom: &virt::domain::Domain) -> Result<(), virt::error::Error> {
    // SAFETY: dom is a valid domain for the duration of the call.
    if unsafe { sys::virDomainAbortJob(dom.as_ptr()) } < 0 {
        return Err(virt::error::Error::last_error());
    }
    Ok(())
}

/// Switches a running migration started with post-copy allowed into post-copy mode.
pub fn start_post_copy(dom: &virt::domain::Domain) -> Result<(), virt::error::Error> {
    // SAFETY: dom is a valid domain for the duration of the call.
    if unsafe { sys::virDomainMigrateStartPostCopy(dom.as_ptr(), 0) } < 0 {
        return Err(virt::error::Error::last_error());
    }
    Ok(())
}

/// Waits until one of `fds` is ready: each entry is `(fd, want_read, want_write)`; returns, per
/// entry, whether it became readable or writable (or hung up). `timeout_ms` bounds the wait.
pub fn poll_ready(fds: &[(std::os::fd::RawFd, bool, bool)], timeout_ms: i32) -> Vec<bool> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, r, w)| libc::pollfd {
            fd,
            events: (if r { libc::POLLIN } else { 0 }) | (if w { libc::POLLOUT } else { 0 }),
            revents: 0,
        })
        .collect();
    // SAFETY: pfds is a valid array of pollfd of the given length for the duration of the call.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    if n <= 0 {
        return vec![false; fds.len()];
    }
    pfds.iter().map(|p| p.revents != 0).collect()
}

#[cfg(test)]
mod tests {
    use super::arena_limit_wanted;

    #[test]
    fn the_arena_limit_gives_way_to_one_the_environment_sets() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert!(arena_limit_wanted(env(&[])));
        assert!(arena_limit_wanted(env(&[(
            "GLIBC_TUNABLES",
            "glibc.malloc.tcache_count=0"
        )])));
        assert!(!arena_limit_wanted(env(&[("MALLOC_ARENA_MAX", "4")])));
        assert!(!arena_limit_wanted(env(&[(
            "GLIBC_TUNABLES",
            "glibc.malloc.check=0:glibc.malloc.arena_max=8"
        )])));
    }
}
