//! The controllers: one module per kind, each `observe → plan (pure) → execute → status`, with
//! the same file names.
//!
//! Each controller has two layers:
//! - a core (`mod.rs`'s `reconcile_core` / `cleanup_core`) that takes the object, a [`World`]
//!   snapshot of the other objects and the hypervisors, and returns an [`Outcome`]: the status
//!   to write, the Events to publish and when to look again. It never talks to the Kubernetes
//!   API, so lab tests (and standalone mode) drive it against real libvirt directly.
//! - the Kubernetes glue (`reconcile`): finalizer, Secrets, server-side-apply status patch on the
//!   status subresource with one field manager per controller, Events through kube's Recorder.
//!   tower-test scenarios pin its API calls.

pub mod backup;
pub mod config;
pub mod kvm_node;
pub mod leader;
pub mod migration;
pub mod rebalance;
pub mod standalone;
pub mod storage_pool;
pub mod virtual_machine;

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedSender;

pub use config::Config;

use crate::api::{KvmNode, StoragePool, VirtualMachine};
use crate::hypervisor::cache::NodePool;
use crate::hypervisor::ffi::DomainEvent;

/// Where Secrets come from: the API server in a cluster, the loaded manifests in standalone
/// mode. The cores never read Secrets; the glue of each mode resolves node credentials and
/// cloud-init user data through this before calling them.
pub trait SecretSource: Sync {
    /// The Secret `ns/name`: `Ok(None)` when it does not exist, `Err(cause)` when it cannot be
    /// read.
    fn secret(
        &self,
        ns: &str,
        name: &str,
    ) -> impl std::future::Future<
        Output = Result<Option<k8s_openapi::api::core::v1::Secret>, String>,
    > + Send;
}

impl SecretSource for Client {
    async fn secret(
        &self,
        ns: &str,
        name: &str,
    ) -> Result<Option<k8s_openapi::api::core::v1::Secret>, String> {
        let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(self.clone(), ns);
        api.get_opt(name).await.map_err(|e| e.to_string())
    }
}

impl SecretSource for [k8s_openapi::api::core::v1::Secret] {
    async fn secret(
        &self,
        ns: &str,
        name: &str,
    ) -> Result<Option<k8s_openapi::api::core::v1::Secret>, String> {
        Ok(self
            .iter()
            .find(|s| {
                s.metadata.namespace.as_deref().unwrap_or("default") == ns
                    && s.metadata.name.as_deref() == Some(name)
            })
            .cloned())
    }
}

/// The one finalizer of every kind: it guards state outside Kubernetes (domains, volumes,
/// pools, the node's VMs).
pub const FINALIZER: &str = "kvm-operator.io/cleanup";

/// Name Events are reported under.
pub const REPORTER: &str = "kvm-operator";

/// A snapshot of the objects a reconcile looks at besides its own.
#[derive(Clone, Debug, Default)]
pub struct World {
    pub nodes: Vec<Arc<KvmNode>>,
    pub pools: Vec<Arc<StoragePool>>,
    pub vms: Vec<Arc<VirtualMachine>>,
    pub migrations: Vec<Arc<crate::api::Migration>>,
    /// Placements decided but not yet visible in the VMs' status (node, CPUs, bytes).
    pub inflight: Vec<(String, u32, u64)>,
    /// Provisioning failures per node in the recent past.
    pub recent_failures: std::collections::BTreeMap<String, u32>,
    /// Placement score weights.
    pub weights: crate::placement::Weights,
}

impl World {
    pub fn node(&self, name: &str) -> Option<&KvmNode> {
        self.nodes
            .iter()
            .find(|n| n.name_any() == name)
            .map(|n| n.as_ref())
    }

    /// The StoragePool object `name` in `namespace`.
    pub fn pool(&self, namespace: &str, name: &str) -> Option<&StoragePool> {
        self.pools
            .iter()
            .find(|p| p.name_any() == name && p.namespace().as_deref() == Some(namespace))
            .map(|p| p.as_ref())
    }
}

/// A Kubernetes Event to publish about the reconciled object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    /// Stable CamelCase reason (also the condition reason where one applies).
    pub reason: &'static str,
    /// What was done, CamelCase.
    pub action: &'static str,
    pub message: String,
}

impl Note {
    pub fn normal(reason: &'static str, action: &'static str, message: impl Into<String>) -> Self {
        Self {
            warning: false,
            reason,
            action,
            message: message.into(),
        }
    }

    pub fn warning(reason: &'static str, action: &'static str, message: impl Into<String>) -> Self {
        Self {
            warning: true,
            reason,
            action,
            message: message.into(),
        }
    }
}

/// What a core reconcile decided: the status to write, Events, and when to look again.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome<S> {
    pub status: S,
    pub notes: Vec<Note>,
    /// `None`: wait for a change of the object (invalid spec, nothing to do).
    pub requeue: Option<Duration>,
}

impl<S> Outcome<S> {
    pub fn action(&self) -> Action {
        self.requeue
            .map_or_else(Action::await_change, Action::requeue)
    }
}

impl<S: crate::api::condition::Summarized> Outcome<S> {
    /// With kstatus's Reconciling and Stalled conditions set from the status (every sink
    /// writes statuses through this).
    pub fn summarized(mut self) -> Self {
        crate::api::condition::summarize(&mut self.status, now());
        self
    }
}

/// Errors that reach the controller runtime (the Kubernetes API failed, or a deletion must
/// wait). Everything that happens on a host is folded into status by the cores instead.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call failed for {object}: {source}")]
    Kube {
        object: String,
        #[source]
        source: kube::Error,
    },
    #[error("{object}: finalizer update failed: {cause}")]
    Finalizer { object: String, cause: String },
    #[error("{object} cannot be deleted yet: {cause}")]
    DeletionBlocked { object: String, cause: String },
    #[error("{object}: {cause}")]
    Hypervisor {
        object: String,
        cause: String,
        reason: &'static str,
    },
}

impl Error {
    /// Stable CamelCase reason (Event reason, metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "KubeApiError",
            Error::Finalizer { .. } => "FinalizerError",
            Error::DeletionBlocked { .. } => "DeletionBlocked",
            Error::Hypervisor { reason, .. } => reason,
        }
    }

    pub fn kube(object: impl Into<String>, source: kube::Error) -> Self {
        Error::Kube {
            object: object.into(),
            source,
        }
    }
}

/// Everything the controllers share.
pub struct Context {
    pub client: Client,
    pub hv: Arc<NodePool>,
    pub nodes: Store<KvmNode>,
    pub pools: Store<StoragePool>,
    pub vms: Store<VirtualMachine>,
    pub recorder: Recorder,
    pub config: Config,
    /// Domain events of every followed node (feeds VM reconciles).
    pub events: UnboundedSender<DomainEvent>,
    pub migrations: Store<crate::api::Migration>,
    followers: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    failures: Mutex<HashMap<String, u32>>,
    /// Placements decided and not yet seen in the cache: VM uid → (node, CPUs, bytes, when).
    inflight: Mutex<HashMap<String, (String, u32, u64, std::time::Instant)>>,
    /// Provisioning failures per node, for the placement penalty.
    node_failures: Mutex<HashMap<String, Vec<std::time::Instant>>>,
    /// Held while a VM is placed, so concurrent reconciles see each other's choices.
    pub placement_lock: tokio::sync::Mutex<()>,
    /// Migration jobs running in this process.
    pub jobs: migration::execute::Jobs,
    /// Prometheus metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Context {
    pub fn new(
        client: Client,
        hv: Arc<NodePool>,
        stores: (
            Store<KvmNode>,
            Store<StoragePool>,
            Store<VirtualMachine>,
            Store<crate::api::Migration>,
        ),
        config: Config,
        events: UnboundedSender<DomainEvent>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: REPORTER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        Self {
            client,
            hv,
            nodes: stores.0,
            pools: stores.1,
            vms: stores.2,
            migrations: stores.3,
            recorder,
            config,
            events,
            followers: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            node_failures: Mutex::new(HashMap::new()),
            placement_lock: tokio::sync::Mutex::new(()),
            jobs: migration::execute::Jobs::default(),
            metrics: Arc::new(crate::metrics::Metrics::new()),
        }
    }

    pub fn world(&self) -> World {
        let vms = self.vms.state();
        let now = std::time::Instant::now();
        let inflight = {
            let mut m = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            // an in-flight placement ends when the cache shows the VM bound, or after 2 minutes
            m.retain(|uid, (_, _, _, at)| {
                now.duration_since(*at) < Duration::from_secs(120)
                    && !vms.iter().any(|v| {
                        v.uid().as_deref() == Some(uid.as_str())
                            && v.status.as_ref().is_some_and(|s| s.node.is_some())
                    })
            });
            m.values().map(|(n, c, b, _)| (n.clone(), *c, *b)).collect()
        };
        let recent_failures = {
            let mut m = self.node_failures.lock().unwrap_or_else(|p| p.into_inner());
            for v in m.values_mut() {
                v.retain(|t| now.duration_since(*t) < Duration::from_secs(600));
            }
            m.retain(|_, v| !v.is_empty());
            m.iter().map(|(k, v)| (k.clone(), v.len() as u32)).collect()
        };
        World {
            nodes: self.nodes.state(),
            pools: self.pools.state(),
            vms,
            migrations: self.migrations.state(),
            inflight,
            recent_failures,
            weights: self.config.weights,
        }
    }

    /// Starts following `node`'s domain events (once).
    pub fn follow(&self, node: &str) {
        let mut f = self.followers.lock().unwrap_or_else(|p| p.into_inner());
        if f.get(node).is_some_and(|h| !h.is_finished()) {
            return;
        }
        let task = tokio::spawn(crate::hypervisor::events::follow(
            self.hv.clone(),
            node.to_string(),
            self.events.clone(),
            Duration::from_secs(5),
        ));
        f.insert(node.to_string(), task);
    }

    /// Stops following `node`'s events.
    pub fn unfollow(&self, node: &str) {
        let mut f = self.followers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = f.remove(node) {
            h.abort();
        }
    }

    /// Publishes `notes` about `obj`; a failure to publish is logged, never fatal.
    pub async fn publish(&self, reference: &ObjectReference, notes: &[Note]) {
        for n in notes {
            // the Event, in the log too (inside the object's span: kind, namespace, name, node)
            if n.warning {
                tracing::warn!(reason = n.reason, action = n.action, "{}", n.message);
            } else {
                tracing::info!(reason = n.reason, action = n.action, "{}", n.message);
            }
            let ev = Event {
                type_: if n.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: n.reason.into(),
                note: Some(truncate(&n.message, 1000)),
                action: n.action.into(),
                secondary: None,
            };
            if let Err(e) = self.recorder.publish(&ev, reference).await {
                tracing::warn!(reason = n.reason, error = %e, "cannot publish an Event");
            }
        }
    }

    /// Backoff for an object whose reconcile failed: 5 s doubling to 5 min; a deletion that
    /// must wait is retried every 30 s.
    pub fn error_action(&self, key: &str, err: &Error) -> Action {
        if matches!(err, Error::DeletionBlocked { .. }) {
            return Action::requeue(Duration::from_secs(30));
        }
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = f.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        Action::requeue(backoff(*n))
    }

    /// Remembers that `uid` was just placed on `node`, until the cache shows it.
    pub fn placed(&self, uid: &str, node: &str, cpus: u32, bytes: u64) {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                uid.to_string(),
                (node.to_string(), cpus, bytes, std::time::Instant::now()),
            );
    }

    /// Records a provisioning failure on `node` (penalised by placement for 10 minutes).
    pub fn provisioning_failed(&self, node: &str) {
        self.node_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(node.to_string())
            .or_default()
            .push(std::time::Instant::now());
    }

    /// Forgets an object's failures after a successful reconcile.
    pub fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

/// 5 s doubling per failure, at most 5 minutes.
pub fn backoff(failures: u32) -> Duration {
    let secs = 5u64.saturating_mul(1u64 << failures.saturating_sub(1).min(16));
    Duration::from_secs(secs.min(300))
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// `Kind namespace/name` or `Kind name`, for messages.
pub fn describe<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    match obj.meta().namespace.as_deref() {
        Some(ns) => format!("{} {ns}/{}", K::kind(&()), obj.name_any()),
        None => format!("{} {}", K::kind(&()), obj.name_any()),
    }
}

/// An object the controllers reconcile, and the node its work happens on.
pub trait Subject: Resource<DynamicType = ()> {
    fn node(&self) -> Option<&str>;
}

impl Subject for KvmNode {
    fn node(&self) -> Option<&str> {
        self.metadata.name.as_deref()
    }
}

impl Subject for crate::api::VirtualMachine {
    fn node(&self) -> Option<&str> {
        self.status.as_ref().and_then(|s| s.node.as_deref()).or(self
            .spec
            .adopt
            .as_ref()
            .map(|a| a.node_name.as_str()))
    }
}

impl Subject for crate::api::StoragePool {
    fn node(&self) -> Option<&str> {
        self.spec.node_name.as_deref()
    }
}

impl Subject for crate::api::Migration {
    /// The source: where the VM is while it moves.
    fn node(&self) -> Option<&str> {
        self.status.as_ref().and_then(|s| s.source_node.as_deref())
    }
}

/// The span of one reconcile: `kind`, `namespace`, `name` and `node` on every log line in it
/// (text: `reconcile{kind=… name=…}:`; JSON: top-level keys). `node` may be recorded later,
/// once placement chose one.
pub fn object_span<K: Subject>(obj: &K) -> tracing::Span {
    let span = tracing::info_span!(
        "reconcile",
        kind = %K::kind(&()),
        namespace = tracing::field::Empty,
        name = %obj.name_any(),
        node = tracing::field::Empty,
    );
    if let Some(ns) = obj.meta().namespace.as_deref() {
        span.record("namespace", ns);
    }
    if let Some(n) = obj.node() {
        span.record("node", n);
    }
    span
}

/// Writes `status` by server-side apply on the status subresource, as `manager`, with
/// kstatus's Reconciling and Stalled conditions derived from it.
pub async fn apply_status<K, S>(
    api: &Api<K>,
    obj: &K,
    manager: &str,
    status: &S,
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize + Clone + crate::api::condition::Summarized,
{
    let mut status = status.clone();
    crate::api::condition::summarize(&mut status, now());
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(manager).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
    .map_err(|e| Error::kube(describe(obj), e))
}

/// Maps kube's finalizer helper errors onto ours.
pub fn from_finalizer(object: String, e: kube::runtime::finalizer::Error<Error>) -> Error {
    use kube::runtime::finalizer::Error as F;
    match e {
        F::ApplyFailed(e) | F::CleanupFailed(e) => e,
        F::AddFinalizer(e) | F::RemoveFinalizer(e) => Error::Finalizer {
            object,
            cause: e.to_string(),
        },
        other => Error::Finalizer {
            object,
            cause: other.to_string(),
        },
    }
}

fn error_policy<K: Subject>(obj: Arc<K>, err: &Error, ctx: Arc<Context>) -> Action {
    let object = describe(obj.as_ref());
    let _in = object_span(obj.as_ref()).entered();
    tracing::warn!(reason = err.reason(), error = %err, "reconcile failed");
    ctx.error_action(&object, err)
}

fn log_result<K: Resource<DynamicType = ()>, E: std::fmt::Display>(
    r: Result<(kube::runtime::reflector::ObjectRef<K>, Action), E>,
) -> std::future::Ready<()> {
    match r {
        Ok((o, _)) => tracing::debug!(object = %o, "reconciled"),
        Err(e) => tracing::debug!(error = %e, "reconcile request failed"),
    }
    std::future::ready(())
}

/// Runs the four controllers until a stop signal. `ready` is called once every cache has
/// been filled from the API (the readiness probe turns green then).
pub async fn run_all(
    client: Client,
    config: Config,
    call_timeout: Duration,
    ready: impl FnOnce() + Send + 'static,
    expose: impl FnOnce(Arc<Context>),
) {
    use futures::StreamExt;
    use kube::runtime::reflector::ObjectRef;
    use kube::runtime::{Controller, watcher};
    let wc = watcher::Config::default().any_semantic();
    // a graceful shutdown runs inside one call: the call timeout must outlast the grace period
    let hv = Arc::new(NodePool::new(
        call_timeout.max(config.shutdown_grace + Duration::from_secs(15)),
    ));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let node_ctl = Controller::new(Api::<KvmNode>::all(client.clone()), wc.clone());
    let pool_ctl = Controller::new(Api::<StoragePool>::all(client.clone()), wc.clone());
    let vm_ctl = Controller::new(Api::<VirtualMachine>::all(client.clone()), wc.clone());
    let mig_ctl = Controller::new(
        Api::<crate::api::Migration>::all(client.clone()),
        wc.clone(),
    );
    let ctx = Arc::new(Context::new(
        client.clone(),
        hv,
        (
            node_ctl.store(),
            pool_ctl.store(),
            vm_ctl.store(),
            mig_ctl.store(),
        ),
        config,
        tx,
    ));
    expose(ctx.clone());
    // libvirt events, node resync markers and hints → the VMs they concern
    let vm_store = ctx.vms.clone();
    let event_hv = ctx.hv.clone();
    let triggers = futures::stream::unfold(rx, move |mut rx| {
        let store = vm_store.clone();
        let hv = event_hv.clone();
        async move {
            let ev = rx.recv().await?;
            if matches!(
                ev.kind,
                crate::hypervisor::ffi::LifecycleKind::Defined
                    | crate::hypervisor::ffi::LifecycleKind::Undefined
            ) {
                // a definition changed (ours or someone else's): placement's stamp index of
                // that node reads it again before it answers
                hv.domain_definition_changed(&ev.node, &ev.uuid);
            }
            Some((virtual_machine::refs_for_event(&ev, &store.state()), rx))
        }
    })
    .flat_map(futures::stream::iter);
    // a node that appears, changes labels or becomes ready may now match a pool's selector
    let pool_store = ctx.pools.clone();
    let pool_ctl = pool_ctl.watches(
        Api::<KvmNode>::all(client.clone()),
        wc.clone(),
        move |_node: KvmNode| {
            pool_store
                .state()
                .iter()
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        },
    );
    // a Migration's progress concerns its VM (it stands aside, then is rebound)
    let vm_ctl = vm_ctl.watches(
        Api::<crate::api::Migration>::all(client.clone()),
        wc.clone(),
        |m: crate::api::Migration| {
            m.namespace()
                .map(|ns| ObjectRef::<VirtualMachine>::new(&m.spec.vm_name).within(&ns))
        },
    );
    let stores = (ctx.nodes.clone(), ctx.pools.clone(), ctx.vms.clone());
    tokio::spawn(async move {
        let ok = stores.0.wait_until_ready().await.is_ok()
            && stores.1.wait_until_ready().await.is_ok()
            && stores.2.wait_until_ready().await.is_ok();
        if ok {
            ready();
        }
    });
    // every reconcile is counted and timed, errors by their static reason
    macro_rules! timed {
        ($name:literal, $f:path) => {
            |o, ctx: Arc<Context>| async move {
                let started = std::time::Instant::now();
                let m = ctx.metrics.clone();
                let r = $f(o, ctx).await;
                m.reconciled(
                    $name,
                    started.elapsed(),
                    r.as_ref().err().map(Error::reason),
                );
                r
            }
        };
    }
    let nodes = node_ctl
        .shutdown_on_signal()
        .run(
            timed!("kvmnode", kvm_node::reconcile),
            error_policy,
            ctx.clone(),
        )
        .for_each(log_result);
    let pools = pool_ctl
        .shutdown_on_signal()
        .run(
            timed!("storagepool", storage_pool::reconcile),
            error_policy,
            ctx.clone(),
        )
        .for_each(log_result);
    let vms = vm_ctl
        .reconcile_on(triggers)
        .shutdown_on_signal()
        .run(
            timed!("virtualmachine", virtual_machine::reconcile),
            error_policy,
            ctx.clone(),
        )
        .for_each(log_result);
    // a migration job that ends has its Migration looked at at once, not at its requeue
    let job_ends = futures::stream::unfold(ctx.clone(), |ctx| async move {
        ctx.jobs.ended().await;
        let uids = ctx.jobs.ended_uids();
        let refs: Vec<ObjectRef<crate::api::Migration>> = ctx
            .migrations
            .state()
            .iter()
            .filter(|m| m.uid().is_some_and(|u| uids.contains(&u)))
            .map(|m| ObjectRef::from_obj(m.as_ref()))
            .collect();
        Some((refs, ctx))
    })
    .flat_map(futures::stream::iter);
    let migrations = mig_ctl
        .reconcile_on(job_ends)
        .shutdown_on_signal()
        .run(
            timed!("migration", migration::reconcile),
            error_policy,
            ctx.clone(),
        )
        .for_each(log_result);
    let rebalance = tokio::spawn(rebalance::run(ctx.clone()));
    tokio::join!(nodes, pools, vms, migrations);
    rebalance.abort();
}

/// A condition's status, reason and message, by type.
pub fn condition_of<'a>(
    conditions: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<(bool, &'a str, &'a str)> {
    crate::api::condition::find(conditions, type_)
        .map(|c| (c.status == "True", c.reason.as_str(), c.message.as_str()))
}

/// Now, as a condition timestamp.
pub fn now() -> crate::api::condition::Time {
    crate::api::condition::Time(k8s_openapi::jiff::Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_five_seconds_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(4), Duration::from_secs(40));
        assert_eq!(backoff(7), Duration::from_secs(300));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn event_messages_are_cut_on_a_character_boundary() {
        let s = "é".repeat(600);
        let t = truncate(&s, 1000);
        assert!(t.len() <= 1004);
        assert!(t.ends_with('…'));
        assert_eq!(truncate("short", 1000), "short");
    }
}
