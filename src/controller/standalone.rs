//! Standalone mode: the same controllers with no cluster. Objects come from the YAML files users
//! would `kubectl apply` (plus v1 Secrets for node keys and cloud-init user data); statuses go
//! to a state file and a table on the terminal.
//!
//! Only the source of objects and the sink of status differ from the Kubernetes glue: each
//! round calls the very cores the controllers call (`kvm_node::reconcile_core`,
//! `storage_pool::reconcile_core`, `virtual_machine::reconcile_core`,
//! `migration::reconcile_core`) on a [`World`] built from the files, resolves Secrets through
//! the same [`SecretSource`](super::SecretSource) interface, and stores what they return.
//!
//! Restart safety: `state_dir/status.yaml` keeps each object's UID (the ownership stamp on its
//! domain), generation and status; a restarted run reads it back, so a VM binds to the domain it
//! created instead of creating a second one (and a lost state file is survivable too: the VM
//! controller looks for a domain stamped with the VM's UID before placing it, and refuses a
//! foreign domain of the same name). An object removed from the files is forgotten, never
//! deleted: its domain keeps running, as it would if the operator were uninstalled.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

/// VM reconciles run side by side in one round (each node also limits its own calls).
const VM_CONCURRENCY: usize = 16;

/// Bound VMs are reconciled and applied this many at a time in a round.
const VM_CHUNK: usize = 512;

/// How often each event follower checks that its subscription's connection is still the node's
/// (as in a cluster).
const EVENT_CHECK: Duration = Duration::from_secs(5);

/// While rounds follow one another at once (what moved is looked at again without waiting), the
/// state file is written when they settle, and at least this often while they last.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// "Not on a timer": an object with no periodic look waits this long unless something marks it
/// due (an event, a node pass's hint, a change of its own).
const UNTIL_MARKED: Duration = Duration::from_secs(365 * 86_400);

use super::{Config, World, condition_of, kvm_node, migration, storage_pool, virtual_machine};
use crate::api::condition::{self, READY};
use crate::api::migration::Migration;
use crate::api::storage_pool::PoolState;
use crate::api::virtual_machine::VirtualMachine;
use crate::api::{KvmNode, MigrationPhase};
use crate::controller::object_span;
use crate::hypervisor::cache::NodePool;
use crate::hypervisor::ffi::{DomainEvent, LifecycleKind};
use crate::manifest::{self, ManifestError, Object};

/// How a standalone run is set up.
#[derive(Clone, Debug)]
pub struct Options {
    /// Manifest files and directories.
    pub files: Vec<PathBuf>,
    /// libvirt URI of the embedded default node (used when the files declare no KvmNode).
    pub default_uri: String,
    /// Where `status.yaml` (and the hypervisor layer's private files) live.
    pub state_dir: PathBuf,
    /// Reconcile until everything has converged or failed, then return.
    pub once: bool,
    /// `once` gives up after this long.
    pub timeout: Duration,
    /// How often each node is read when nothing is pending (files are checked every second).
    /// Pools and VMs follow the configuration's own resync periods, and are looked at at once
    /// when their node's pass finds them changed or unreadable, as in a cluster.
    pub resync: Duration,
}

/// Why a standalone run stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(
        "state file {path}: {cause}; fix or move it aside (a fresh run finds its domains again by their ownership stamp)"
    )]
    State { path: String, cause: String },
    #[error("converged with failures:\n{0}")]
    Failed(String),
    #[error("not converged after {secs}s; still pending:\n{pending}")]
    Timeout { secs: u64, pending: String },
}

/// What the state file remembers of one object. Statuses are not kept here: the objects in
/// the [`World`] hold them (typed), and [`Standalone::save`] writes them from there.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(from = "SavedIn")]
struct Saved {
    uid: String,
    generation: i64,
    /// SHA-256 of the spec as canonical JSON (the file holds the spec itself; memory only its
    /// digest): a change bumps the generation.
    spec_sha256: String,
    /// The status read from the file, until the object is loaded from the manifests (then
    /// its status lives in the object).
    status: Option<serde_json::Value>,
    /// The whole object, for objects the operator created (evacuation Migrations).
    created: Option<serde_json::Value>,
}

/// [`Saved`] as the file has it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SavedIn {
    uid: String,
    generation: i64,
    #[serde(default)]
    spec: Option<serde_json::Value>,
    #[serde(default)]
    status: Option<serde_json::Value>,
    #[serde(default)]
    created: Option<serde_json::Value>,
}

impl From<SavedIn> for Saved {
    fn from(s: SavedIn) -> Self {
        let spec_sha256 = s
            .spec
            .as_ref()
            .map(spec_digest_of_value)
            .unwrap_or_default();
        Saved {
            uid: s.uid,
            generation: s.generation,
            spec_sha256,
            status: s.status,
            created: s.created,
        }
    }
}

fn spec_digest_of_value(v: &serde_json::Value) -> String {
    // serde_json's maps are ordered: the same spec always gives the same text
    super::backup::sha256_hex(&serde_json::to_vec(v).unwrap_or_default())
}

/// The digest a spec is compared by (canonical JSON, so map order never counts as a change).
fn spec_digest<S: Serialize>(spec: &S) -> Result<String, serde_json::Error> {
    Ok(spec_digest_of_value(&serde_json::to_value(spec)?))
}

#[derive(Debug, Default, Deserialize)]
struct StateFile {
    /// By `Kind/namespace/name` (`KvmNode/name` for nodes).
    objects: BTreeMap<String, Saved>,
}

/// A spec or status as [`Standalone::save`] writes it: borrowed from the object that holds it.
#[derive(Clone, Copy)]
enum Part<'a> {
    NodeSpec(&'a crate::api::kvm_node::KvmNodeSpec),
    NodeStatus(&'a crate::api::kvm_node::KvmNodeStatus),
    PoolSpec(&'a crate::api::storage_pool::StoragePoolSpec),
    PoolStatus(&'a crate::api::storage_pool::StoragePoolStatus),
    VmSpec(&'a crate::api::virtual_machine::VirtualMachineSpec),
    VmStatus(&'a crate::api::virtual_machine::VirtualMachineStatus),
    MigrationSpec(&'a crate::api::migration::MigrationSpec),
    MigrationStatus(&'a crate::api::migration::MigrationStatus),
    /// Read from the file and not loaded since (kept as it was).
    Raw(&'a serde_json::Value),
}

impl Serialize for Part<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Part::NodeSpec(x) => x.serialize(s),
            Part::NodeStatus(x) => x.serialize(s),
            Part::PoolSpec(x) => x.serialize(s),
            Part::PoolStatus(x) => x.serialize(s),
            Part::VmSpec(x) => x.serialize(s),
            Part::VmStatus(x) => x.serialize(s),
            Part::MigrationSpec(x) => x.serialize(s),
            Part::MigrationStatus(x) => x.serialize(s),
            Part::Raw(x) => x.serialize(s),
        }
    }
}

/// One object of the state file as written.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SavedOut<'a> {
    uid: &'a str,
    generation: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    spec: Option<Part<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<Part<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<&'a serde_json::Value>,
}

/// The state file as written, serialized straight from the objects into the file: by key,
/// the object's spec and status.
struct StateOut<'a> {
    saved: &'a BTreeMap<String, Saved>,
    held: std::collections::HashMap<String, (Part<'a>, Option<Part<'a>>)>,
}

impl Serialize for StateOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeStruct};
        struct Objects<'b, 'a>(&'b StateOut<'a>);
        impl Serialize for Objects<'_, '_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut m = s.serialize_map(Some(self.0.saved.len()))?;
                for (k, saved) in self.0.saved {
                    let held = self.0.held.get(k);
                    m.serialize_entry(
                        k,
                        &SavedOut {
                            uid: &saved.uid,
                            generation: saved.generation,
                            spec: held.map(|h| h.0),
                            status: held
                                .and_then(|h| h.1)
                                .or(saved.status.as_ref().map(Part::Raw)),
                            created: saved.created.as_ref(),
                        },
                    )?;
                }
                m.end()
            }
        }
        let mut st = s.serialize_struct("StateFile", 1)?;
        st.serialize_field("objects", &Objects(self))?;
        st.end()
    }
}

/// How one object stands after a round.
#[derive(Clone, Debug, PartialEq)]
enum Standing {
    Done,
    Pending(String),
    Failed(String),
}

/// The standalone runner.
pub struct Standalone {
    opts: Options,
    config: Config,
    hv: Arc<NodePool>,
    jobs: migration::execute::Jobs,
    world: World,
    secrets: Vec<Secret>,
    state: StateFile,
    /// Files and their modification times when last loaded.
    seen: BTreeMap<PathBuf, SystemTime>,
    standing: BTreeMap<String, Standing>,
    /// When each object is reconciled next (absent: at once).
    due: BTreeMap<String, Instant>,
    out: Box<dyn Write + Send>,
    last_table: String,
    metrics: Arc<crate::metrics::Metrics>,
    /// Domain events of the followed nodes (a long-running run follows each node whose access
    /// loaded, as the cluster does; `once` follows none: it ends when things converged).
    events: (
        tokio::sync::mpsc::UnboundedSender<DomainEvent>,
        tokio::sync::mpsc::UnboundedReceiver<DomainEvent>,
    ),
    /// The event follower of each node, by node name.
    followers: BTreeMap<String, tokio::task::JoinHandle<()>>,
    /// The objects after the last round, for `/metrics`; kept only while a [`Self::metrics`]
    /// renderer holds it (a second copy of every changed object would otherwise stay alive
    /// through the next round for nobody: a few MiB at 2,000 VMs).
    snapshot: Arc<std::sync::Mutex<World>>,
    /// The state file lacks a UID that a host may come to carry (a new object's, stamped on
    /// its domain; an evacuation Migration's): it is written before the next round runs.
    must_save: bool,
    /// When the state file was last written.
    saved_at: Option<Instant>,
    /// A round's statuses are not in the state file yet (its write waits for the rounds to
    /// settle).
    unsaved: bool,
    /// Bound VMs reconciled and applied at a time ([`VM_CHUNK`]).
    vm_chunk: usize,
}

fn key_of(kind: &str, ns: Option<&str>, name: &str) -> String {
    match ns {
        Some(ns) => format!("{kind}/{ns}/{name}"),
        None => format!("{kind}/{name}"),
    }
}

/// A random RFC 4122 version 4 UUID (the ownership stamp of a new object).
fn new_uid() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    // the kernel's random source (getrandom), without a file opened per UID
    let filled = ring::rand::SystemRandom::new().fill(&mut b).is_ok();
    if !filled {
        // no random source: time and process id are unique enough for one host's objects
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        b[..16].copy_from_slice(&(t ^ (u128::from(std::process::id()) << 64)).to_le_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl Drop for Standalone {
    fn drop(&mut self) {
        // the followers hold the node pool and a libvirt subscription each
        for (_, f) in std::mem::take(&mut self.followers) {
            f.abort();
        }
    }
}

impl Standalone {
    /// Reads the state file and the manifests; `out` receives the status table.
    pub fn new(
        opts: Options,
        mut config: Config,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, StandaloneError> {
        let run_dir = opts.state_dir.join("run");
        std::fs::create_dir_all(&run_dir).map_err(|e| StandaloneError::State {
            path: run_dir.display().to_string(),
            cause: e.to_string(),
        })?;
        config.state_dir = run_dir;
        // no operator namespace here: a Secret reference without a namespace means the
        // manifests' default namespace, as a Secret without one does
        config.namespace = "default".into();
        let state = read_state(&opts.state_dir.join("status.yaml"))?;
        let mut me = Self {
            hv: Arc::new(NodePool::new(
                Duration::from_secs(60).max(config.shutdown_grace + Duration::from_secs(15)),
            )),
            opts,
            config,
            jobs: migration::execute::Jobs::default(),
            world: World::default(),
            secrets: vec![],
            state,
            seen: BTreeMap::new(),
            standing: BTreeMap::new(),
            due: BTreeMap::new(),
            out,
            last_table: String::new(),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            events: tokio::sync::mpsc::unbounded_channel(),
            followers: BTreeMap::new(),
            snapshot: Arc::default(),
            must_save: false,
            saved_at: None,
            unsaved: false,
            vm_chunk: VM_CHUNK,
        };
        me.load()?;
        Ok(me)
    }

    /// What `/metrics` serves: the same metrics as in a cluster, from the last round's objects.
    pub fn metrics(&self) -> crate::http::Render {
        // from now on every round leaves its objects here
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = self.world.clone();
        let (m, snap, w) = (
            self.metrics.clone(),
            self.snapshot.clone(),
            self.config.weights,
        );
        Arc::new(move || {
            let world = snap.lock().unwrap_or_else(|p| p.into_inner()).clone();
            m.render(&world, &w)
        })
    }

    /// The objects as they stand (for tests and the caller's summary).
    pub fn world(&self) -> &World {
        &self.world
    }

    /// The Secrets the manifests hold (node keys, cloud-init user data).
    pub fn secrets(&self) -> &[Secret] {
        &self.secrets
    }

    /// The configuration in effect (its `namespace` is the manifests' default namespace).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Runs until converged (`once`) or until Ctrl-C.
    pub async fn run(&mut self) -> Result<(), StandaloneError> {
        let started = Instant::now();
        loop {
            if self.files_changed() {
                match self.load() {
                    Ok(()) => {}
                    // a half-saved edit: keep going on what was loaded, say why
                    Err(e) => {
                        let _ = writeln!(self.out, "manifests not reloaded: {e}");
                    }
                }
            }
            // a UID is in the file before any host can carry it: a run that crashed would
            // otherwise give the object a new one, and its domain would look foreign
            if self.must_save {
                self.save()?;
            }
            let before = self.standing.clone();
            let reconciled = self.round().await;
            if reconciled > 0 {
                // statuses carry timestamps; what matters is whether any object moved
                let changed = self.standing != before;
                // rounds that follow one another at once are written (and the table printed)
                // when they settle, and every SAVE_EVERY while they last: a status a crash
                // loses meanwhile is read again from the hosts, as after a lost state file
                if !changed
                    || self.must_save
                    || self.saved_at.is_none_or(|t| t.elapsed() >= SAVE_EVERY)
                {
                    self.save()?;
                    self.print_table();
                } else {
                    self.unsaved = true;
                }
                let pending: Vec<String> = self.list(|s| matches!(s, Standing::Pending(_)));
                if self.opts.once && pending.is_empty() && !changed {
                    let failed = self.list(|s| matches!(s, Standing::Failed(_)));
                    return if failed.is_empty() {
                        Ok(())
                    } else {
                        Err(StandaloneError::Failed(failed.join("\n")))
                    };
                }
                if self.opts.once && started.elapsed() > self.opts.timeout {
                    self.save()?;
                    return Err(StandaloneError::Timeout {
                        secs: self.opts.timeout.as_secs(),
                        pending: pending.join("\n"),
                    });
                }
                // what moved is due at once: look again without waiting
                if changed {
                    continue;
                }
            } else if self.unsaved {
                // the rounds settled with nothing left to look at
                self.save()?;
                self.print_table();
            }
            let event = tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => None,
                _ = self.jobs.ended() => None,
                ev = self.events.1.recv() => ev,
                _ = tokio::signal::ctrl_c() => {
                    self.save()?;
                    let _ = writeln!(self.out, "stopped; the VMs keep running; state in {}", self.opts.state_dir.display());
                    return Ok(());
                }
            };
            if let Some(ev) = event {
                self.on_event(&ev);
                // what else arrived meanwhile goes into the same round
                while let Ok(ev) = self.events.1.try_recv() {
                    self.on_event(&ev);
                }
            }
        }
    }

    /// A domain event (or a node's resync marker after it subscribed again): the VMs it concerns
    /// are due at once, as the cluster's VM controller is triggered by it.
    fn on_event(&mut self, ev: &DomainEvent) {
        if matches!(ev.kind, LifecycleKind::Defined | LifecycleKind::Undefined) {
            // a definition changed (ours or someone else's): placement's stamp index of that
            // node reads it again before it answers
            self.hv.domain_definition_changed(&ev.node, &ev.uuid);
        }
        for r in virtual_machine::refs_for_event(ev, &self.world.vms) {
            self.due
                .remove(&key_of("VirtualMachine", r.namespace.as_deref(), &r.name));
        }
    }

    /// Follows `node`'s domain events from now on (once; never in a `once` run).
    fn follow(&mut self, node: &str) {
        if self.opts.once || self.followers.get(node).is_some_and(|h| !h.is_finished()) {
            return;
        }
        let task = tokio::spawn(crate::hypervisor::events::follow(
            self.hv.clone(),
            node.to_string(),
            self.events.0.clone(),
            EVENT_CHECK,
        ));
        self.followers.insert(node.to_string(), task);
    }

    /// True while domain events are followed: the VMs' periodic resync is then the
    /// configuration's own (none by default), as in a cluster.
    fn follows_events(&self) -> bool {
        !self.opts.once
    }

    fn list(&self, f: impl Fn(&Standing) -> bool) -> Vec<String> {
        self.standing
            .iter()
            .filter(|(_, s)| f(s))
            .map(|(k, s)| match s {
                Standing::Done => k.clone(),
                Standing::Pending(m) | Standing::Failed(m) => format!("  {k}: {m}"),
            })
            .collect()
    }

    fn files_changed(&self) -> bool {
        let mut now = BTreeMap::new();
        for f in &self.opts.files {
            stamp(f, &mut now);
        }
        now != self.seen
    }

    /// (Re)loads the manifests, keeping UIDs and statuses of objects already known.
    fn load(&mut self) -> Result<(), StandaloneError> {
        let mut seen = BTreeMap::new();
        for f in &self.opts.files {
            stamp(f, &mut seen);
        }
        let loaded = manifest::load_paths(&self.opts.files)?;
        self.seen = seen;
        let mut world = World {
            weights: self.config.weights,
            ..World::default()
        };
        let mut secrets = vec![];
        // on a reload, the statuses this run holds (newer than the file's)
        let old = self.world.clone();
        fn by_key<K: kube::Resource>(
            v: &[Arc<K>],
            kind: &str,
        ) -> std::collections::HashMap<String, usize> {
            v.iter()
                .enumerate()
                .map(|(i, o)| {
                    let m = o.meta();
                    let key = key_of(
                        kind,
                        m.namespace.as_deref(),
                        m.name.as_deref().unwrap_or(""),
                    );
                    (key, i)
                })
                .collect()
        }
        let (old_nodes, old_pools, old_vms, old_migs) = (
            by_key(&old.nodes, "KvmNode"),
            by_key(&old.pools, "StoragePool"),
            by_key(&old.vms, "VirtualMachine"),
            by_key(&old.migrations, "Migration"),
        );
        for l in loaded {
            match l.object {
                Object::KvmNode(mut o) => {
                    self.restore("KvmNode", &mut o.metadata, &o.spec, &mut o.status, |k| {
                        old_nodes.get(k).and_then(|i| old.nodes[*i].status.clone())
                    })?;
                    world.nodes.push(Arc::new(o));
                }
                Object::StoragePool(mut o) => {
                    self.restore(
                        "StoragePool",
                        &mut o.metadata,
                        &o.spec,
                        &mut o.status,
                        |k| old_pools.get(k).and_then(|i| old.pools[*i].status.clone()),
                    )?;
                    world.pools.push(Arc::new(o));
                }
                Object::VirtualMachine(mut o) => {
                    self.restore(
                        "VirtualMachine",
                        &mut o.metadata,
                        &o.spec,
                        &mut o.status,
                        |k| old_vms.get(k).and_then(|i| old.vms[*i].status.clone()),
                    )?;
                    world.vms.push(Arc::new(o));
                }
                Object::Migration(mut o) => {
                    self.restore("Migration", &mut o.metadata, &o.spec, &mut o.status, |k| {
                        old_migs
                            .get(k)
                            .and_then(|i| old.migrations[*i].status.clone())
                    })?;
                    world.migrations.push(Arc::new(o));
                }
                Object::Secret(mut s) => {
                    s.metadata.namespace.get_or_insert_with(|| "default".into());
                    secrets.push(s);
                }
            }
        }
        if world.nodes.is_empty() {
            let mut node: KvmNode = serde_json::from_value(serde_json::json!({
                "apiVersion": "kvm-operator.io/v1alpha1", "kind": "KvmNode",
                "metadata": {"name": "default"},
                "spec": {"address": "localhost", "libvirtUri": self.opts.default_uri},
            }))
            .map_err(|e| StandaloneError::State {
                path: "--default-uri".into(),
                cause: e.to_string(),
            })?;
            self.restore(
                "KvmNode",
                &mut node.metadata,
                &node.spec,
                &mut node.status,
                |k| old_nodes.get(k).and_then(|i| old.nodes[*i].status.clone()),
            )?;
            world.nodes.push(Arc::new(node));
        }
        // Migrations the operator created (evacuations) live only in the state file
        for (k, saved) in &mut self.state.objects {
            let Some(obj) = &saved.created else { continue };
            if world
                .migrations
                .iter()
                .any(|m| key_of("Migration", m.namespace().as_deref(), &m.name_any()) == *k)
            {
                continue;
            }
            if let Ok(mut m) = serde_json::from_value::<Migration>(obj.clone()) {
                let from_file = saved
                    .status
                    .take()
                    .and_then(|s| serde_json::from_value(s).ok());
                m.status = old_migs
                    .get(k)
                    .and_then(|i| old.migrations[*i].status.clone())
                    .or(from_file);
                world.migrations.push(Arc::new(m));
            }
        }
        // objects gone from the files are forgotten: their domains stay as they are
        let keep: std::collections::BTreeSet<String> = keys(&world).into_iter().collect();
        let gone: Vec<String> = self
            .state
            .objects
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            let _ = writeln!(
                self.out,
                "{k} is no longer in the manifests: forgotten, not deleted (its domain and volumes stay on the host)"
            );
            self.state.objects.remove(&k);
            self.standing.remove(&k);
            self.due.remove(&k);
            if let Some(f) = k
                .strip_prefix("KvmNode/")
                .and_then(|n| self.followers.remove(n))
            {
                f.abort();
            }
        }
        self.world = world;
        self.secrets = secrets;
        Ok(())
    }

    /// Gives a loaded object its UID and generation from the state file (or new ones), and its
    /// status: `current` (what this run knows, on a reload), else the one the file held.
    fn restore<S: Serialize, St: serde::de::DeserializeOwned>(
        &mut self,
        kind: &'static str,
        meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        spec: &S,
        status: &mut Option<St>,
        current: impl FnOnce(&str) -> Option<St>,
    ) -> Result<(), StandaloneError> {
        // KvmNode is the one cluster-scoped kind
        if kind != "KvmNode" {
            meta.namespace.get_or_insert_with(|| "default".into());
        } else {
            meta.namespace = None;
        }
        let key = key_of(
            kind,
            meta.namespace.as_deref(),
            meta.name.as_deref().unwrap_or(""),
        );
        let digest = spec_digest(spec).map_err(|e| StandaloneError::State {
            path: key.clone(),
            cause: e.to_string(),
        })?;
        if !self.state.objects.contains_key(&key) {
            self.must_save = true;
        }
        let saved = self
            .state
            .objects
            .entry(key.clone())
            .or_insert_with(|| Saved {
                uid: new_uid(),
                generation: 1,
                spec_sha256: digest.clone(),
                status: None,
                created: None,
            });
        if saved.spec_sha256 != digest {
            saved.generation += 1;
            saved.spec_sha256 = digest;
            // a changed spec is acted on at once
            self.due.remove(&key);
        }
        meta.uid = Some(saved.uid.clone());
        meta.generation = Some(saved.generation);
        // the file's copy is needed only until the object holds it
        let from_file = saved
            .status
            .take()
            .and_then(|s| serde_json::from_value(s).ok());
        *status = current(&key).or(from_file);
        Ok(())
    }

    /// True when `key` is due: never reconciled, its spec changed, its time came, or something
    /// it depends on moved.
    fn is_due(&self, key: &str, now: Instant) -> bool {
        self.due.get(key).is_none_or(|t| *t <= now)
    }

    /// How often a VM is looked at without a change (`None`: only on changes, events, node
    /// passes' hints and its own requeues). A `once` run follows no domain events, so there a
    /// VM is reconciled periodically even when the configuration asks for none.
    fn vm_period(&self) -> Option<Duration> {
        if self.follows_events() {
            self.config.vm_resync
        } else {
            Some(
                self.config
                    .vm_resync
                    .unwrap_or(super::config::STANDALONE_VM_RESYNC),
            )
        }
    }

    /// When `key` is looked at next: at once while it is pending or just moved, else after its
    /// requeue, at most `period` (the cluster's resync for its kind; `None`: no periodic look,
    /// only what marks it due again).
    fn schedule(
        &mut self,
        key: &str,
        moved: bool,
        requeue: Option<Duration>,
        period: impl Into<Option<Duration>>,
    ) {
        let pending = matches!(self.standing.get(key), Some(Standing::Pending(_)));
        let wait = if moved || pending {
            Some(Duration::ZERO)
        } else {
            match (requeue, period.into()) {
                (Some(r), Some(p)) => Some(r.min(p)),
                (r, p) => r.or(p),
            }
        };
        let now = Instant::now();
        let at = wait
            .and_then(|w| now.checked_add(w))
            .unwrap_or_else(|| now + UNTIL_MARKED);
        self.due.insert(key.to_string(), at);
    }

    /// One pass over the objects that are due, kind by kind in the order the cluster would
    /// converge them: nodes, pools, VMs, migrations. Within a kind, objects are reconciled side
    /// by side as the cluster's controllers do, so a host that stops answering delays only its
    /// own objects; VMs still to be placed go one after another, each seeing the placements
    /// before it. Returns how many objects were reconciled.
    async fn round(&mut self) -> usize {
        let now = Instant::now();
        let mut done = 0;
        // nodes
        let due: Vec<usize> = (0..self.world.nodes.len())
            .filter(|i| {
                let n = &self.world.nodes[*i];
                self.is_due(&key_of("KvmNode", None, &n.name_any()), now)
            })
            .collect();
        let results = {
            let (world, hv, config, secrets) = (&self.world, &self.hv, &self.config, &self.secrets);
            futures::future::join_all(due.iter().map(|&i| async move {
                let started = Instant::now();
                let node = world.nodes[i].clone();
                let span = object_span(node.as_ref());
                // the node's access loaded: its domain events can be followed
                let work = async {
                    let mut loaded = false;
                    if node.spec.validate().is_ok() {
                        match kvm_node::load_access(&node, secrets.as_slice(), config).await {
                            Err((reason, msg)) => {
                                return (
                                    kvm_node::not_ready(&node, reason, msg),
                                    kvm_node::Side::default(),
                                    false,
                                );
                            }
                            Ok(access) => {
                                hv.upsert(access);
                                loaded = true;
                            }
                        }
                    }
                    let (out, side) =
                        kvm_node::reconcile_core(&node, world, hv.as_ref(), config).await;
                    (out, side, loaded)
                };
                let (out, side, loaded) = work.instrument(span).await;
                (i, out.summarized(), side, loaded, started.elapsed())
            }))
            .await
        };
        let mut moved_nodes = Vec::new();
        for (i, out, side, loaded, took) in results {
            done += 1;
            let node = self.world.nodes[i].clone();
            let name = node.name_any();
            if loaded {
                self.follow(&name);
            }
            for (ns, vm) in side.evacuate {
                self.evacuate(&name, &ns, &vm);
            }
            if !side.stats.is_empty() {
                self.metrics.node_stats(&name, side.stats);
            }
            // the VMs the node pass found changed (or can no longer read) are looked at now
            for h in &side.hints {
                self.due.remove(&format!("VirtualMachine/{}", h.domain));
            }
            let standing = match condition_of(&out.status.conditions, READY) {
                Some((true, _, _)) => Standing::Done,
                Some((false, reason, msg)) => Standing::Failed(format!("{reason}: {msg}")),
                None => Standing::Pending("not observed yet".into()),
            };
            let reason = condition_of(&out.status.conditions, READY).map(|(_, r, _)| r.to_string());
            let key = key_of("KvmNode", None, &name);
            let moved = self.standing.get(&key) != Some(&standing);
            if moved {
                moved_nodes.push(name.clone());
            }
            let mut n = (*node).clone();
            n.status = Some(out.status);
            self.note(
                "KvmNode",
                key.clone(),
                standing,
                &out.notes,
                took,
                reason.as_deref(),
            );
            self.schedule(&key, moved, out.requeue, self.opts.resync);
            self.world.nodes[i] = Arc::new(n);
        }
        // what depends on a node that moved (readiness, a failure) is looked at again: its pools
        // and its VMs, as the cluster's watches would
        if !moved_nodes.is_empty() {
            for p in &self.world.pools {
                self.due.remove(&key_of(
                    "StoragePool",
                    p.namespace().as_deref(),
                    &p.name_any(),
                ));
            }
            for v in &self.world.vms {
                if v.status
                    .as_ref()
                    .and_then(|s| s.node.as_ref())
                    .is_some_and(|n| moved_nodes.contains(n))
                {
                    self.due.remove(&key_of(
                        "VirtualMachine",
                        v.namespace().as_deref(),
                        &v.name_any(),
                    ));
                }
            }
        }
        // pools
        let due: Vec<usize> = (0..self.world.pools.len())
            .filter(|i| {
                let p = &self.world.pools[*i];
                self.is_due(
                    &key_of("StoragePool", p.namespace().as_deref(), &p.name_any()),
                    now,
                )
            })
            .collect();
        let results = {
            let out = shared(&mut *self.out);
            let (world, hv, config, out) = (&self.world, &self.hv, &self.config, &out);
            futures::future::join_all(due.iter().map(|&i| async move {
                let started = Instant::now();
                let pool = world.pools[i].clone();
                let key = key_of("StoragePool", pool.namespace().as_deref(), &pool.name_any());
                let work = storage_pool::reconcile_core(&pool, world, hv.as_ref(), config)
                    .instrument(object_span(pool.as_ref()));
                let o = with_progress(out, &key, work).await.summarized();
                (i, o, started.elapsed())
            }))
            .await
        };
        for (i, out, took) in results {
            done += 1;
            let pool = self.world.pools[i].clone();
            let key = key_of("StoragePool", pool.namespace().as_deref(), &pool.name_any());
            let states: Vec<(String, PoolState)> = out
                .status
                .nodes
                .iter()
                .map(|n| (n.node.clone(), n.state))
                .collect();
            let standing = if states.is_empty() {
                match condition_of(&out.status.conditions, READY) {
                    Some((false, reason, msg)) => Standing::Failed(format!("{reason}: {msg}")),
                    _ => Standing::Pending("no node has the pool yet".into()),
                }
            } else if let Some((n, s)) = states
                .iter()
                .find(|(_, s)| matches!(s, PoolState::Conflict | PoolState::Failed))
            {
                Standing::Failed(format!("{s:?} on {n}"))
            } else if states.iter().all(|(_, s)| *s == PoolState::Running) {
                Standing::Done
            } else {
                Standing::Pending(format!("{states:?}"))
            };
            let reason = condition_of(&out.status.conditions, READY).map(|(_, r, _)| r.to_string());
            let moved = self.standing.get(&key) != Some(&standing);
            let mut p = (*pool).clone();
            p.status = Some(out.status);
            self.note(
                "StoragePool",
                key.clone(),
                standing,
                &out.notes,
                took,
                reason.as_deref(),
            );
            self.schedule(&key, moved, out.requeue, self.config.pool_resync);
            self.world.pools[i] = Arc::new(p);
        }
        // VMs: those bound to a node side by side; those to be placed one after another
        let due: Vec<usize> = (0..self.world.vms.len())
            .filter(|i| {
                let v = &self.world.vms[*i];
                self.is_due(
                    &key_of("VirtualMachine", v.namespace().as_deref(), &v.name_any()),
                    now,
                )
            })
            .collect();
        let unplaced = |v: &VirtualMachine| {
            v.status.as_ref().and_then(|s| s.node.as_ref()).is_none() && v.spec.adopt.is_none()
        };
        let (mut placing, bound): (Vec<usize>, Vec<usize>) =
            due.into_iter().partition(|&i| unplaced(&self.world.vms[i]));
        // the bound ones go in chunks, each applied as it ends: a VM's previous object is let go
        // then, not held with every other one until the whole round ends (thousands of VMs
        // would hold two versions of each at the round's peak); the placements go beside the
        // first chunk
        let mut chunks = bound
            .chunks(self.vm_chunk.max(1))
            .map(<[usize]>::to_vec)
            .collect::<Vec<_>>();
        if chunks.is_empty() {
            chunks.push(vec![]);
        }
        for bound in chunks {
            done += self.vm_chunk(std::mem::take(&mut placing), bound).await;
        }
        // migrations, one after another: each decides against the limits the ones before it
        // took (they are few, and their long work runs in jobs of its own)
        for i in 0..self.world.migrations.len() {
            let m = self.world.migrations[i].clone();
            let key = key_of("Migration", m.namespace().as_deref(), &m.name_any());
            // a job that ended is looked at at once, not when its requeue comes
            let job_ended = self.jobs.has_ended(&m.uid().unwrap_or_default());
            if !self.is_due(&key, now) && !job_ended {
                continue;
            }
            done += 1;
            let started = Instant::now();
            let work =
                migration::reconcile_core(&m, &self.world, &self.hv, &self.jobs, &self.config)
                    .instrument(object_span(m.as_ref()));
            let out = {
                let out = shared(&mut *self.out);
                with_progress(&out, &key, work).await.summarized()
            };
            let standing = match out.status.phase {
                Some(MigrationPhase::Succeeded) => Standing::Done,
                Some(p @ (MigrationPhase::Failed | MigrationPhase::Cancelled)) => Standing::Failed(
                    format!("{p:?}: {}", out.status.message.clone().unwrap_or_default()),
                ),
                p => Standing::Pending(format!(
                    "{:?} {}",
                    p.unwrap_or(MigrationPhase::Pending),
                    out.status
                        .progress
                        .as_ref()
                        .map(|x| x.percent.clone())
                        .unwrap_or_default()
                )),
            };
            let reason = condition_of(&out.status.conditions, READY).map(|(_, r, _)| r.to_string());
            let moved = self.standing.get(&key) != Some(&standing)
                || m.status.as_ref().and_then(|s| s.phase) != out.status.phase;
            if moved {
                // the VM follows its Migration (held, released, bound to the target)
                self.due.remove(&key_of(
                    "VirtualMachine",
                    m.namespace().as_deref(),
                    &m.spec.vm_name,
                ));
            }
            let mut x = (*m).clone();
            x.status = Some(out.status);
            self.note(
                "Migration",
                key.clone(),
                standing,
                &out.notes,
                started.elapsed(),
                reason.as_deref(),
            );
            self.schedule(
                &key,
                moved,
                out.requeue,
                self.vm_period()
                    .unwrap_or(super::config::STANDALONE_VM_RESYNC),
            );
            self.world.migrations[i] = Arc::new(x);
        }
        if done > 0 && Arc::strong_count(&self.snapshot) > 1 {
            *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = self.world.clone();
        }
        done
    }

    /// Reconciles the VMs `placing` (one after another, each seeing the ones placed before it)
    /// and `bound` (side by side), makes the round's definition copies durable, and applies the
    /// outcomes; returns how many were reconciled.
    async fn vm_chunk(&mut self, placing: Vec<usize>, bound: Vec<usize>) -> usize {
        let results = {
            let out = shared(&mut *self.out);
            let (world, hv, config, secrets, out) =
                (&self.world, &self.hv, &self.config, &self.secrets, &out);
            let backups = self
                .config
                .definition_backup
                .then(|| super::backup::Files::new(self.opts.state_dir.join("definitions")));
            let backups = &backups;
            let one = async move |i: usize, world: &World| {
                let started = Instant::now();
                let vm = world.vms[i].clone();
                let key = key_of("VirtualMachine", vm.namespace().as_deref(), &vm.name_any());
                let span = object_span(vm.as_ref());
                let work = async {
                    let r = match virtual_machine::user_data(&vm, secrets.as_slice()).await {
                        Ok(ud) => {
                            virtual_machine::reconcile_read(
                                &vm,
                                world,
                                hv.as_ref(),
                                config,
                                ud.as_deref(),
                            )
                            .await
                        }
                        Err((reason, msg)) => virtual_machine::problem(
                            &vm,
                            reason,
                            msg,
                            Some(Duration::from_secs(60)),
                        )
                        .into(),
                    };
                    let mut out = r.outcome.summarized();
                    if let Some(sink) = backups
                        && let Some(n) = super::backup::keep(
                            &vm,
                            &mut out.status,
                            hv.as_ref(),
                            sink,
                            r.definition.as_deref(),
                        )
                        .await
                    {
                        out.notes.push(n);
                    }
                    out
                }
                .instrument(span);
                // volume clones and guest shutdowns take long: say so while they run
                let o = with_progress(out, &key, work).await;
                (i, o, started.elapsed())
            };
            let bound_work = futures::stream::iter(bound)
                .map(|i| one(i, world))
                .buffer_unordered(VM_CONCURRENCY)
                .collect::<Vec<_>>();
            let placing_work = async {
                if placing.is_empty() {
                    return Vec::new();
                }
                // each placement sees the ones decided before it in this round
                let mut w = world.clone();
                let mut results = Vec::new();
                for i in placing {
                    let r = one(i, &w).await;
                    if let Some(node) = r.1.status.node.as_deref() {
                        let (cpus, bytes) =
                            super::kvm_node::status::vm_request(&world.vms[i], &Default::default());
                        // one running sum per node: each placement reads them all
                        match w.inflight.iter_mut().find(|x| x.0 == node) {
                            Some(x) => {
                                x.1 = x.1.saturating_add(cpus);
                                x.2 = x.2.saturating_add(bytes);
                            }
                            None => w.inflight.push((node.to_string(), cpus, bytes)),
                        }
                    }
                    results.push(r);
                }
                results
            };
            let (mut a, b) = futures::future::join(bound_work, placing_work).await;
            a.extend(b);
            a.sort_unstable_by_key(|r| r.0);
            // the chunk's copies become durable together, before the state that records them
            let unkept: BTreeMap<(String, String), String> = match backups {
                Some(b) => b.commit().await.into_iter().collect(),
                None => BTreeMap::new(),
            };
            (a, unkept)
        };
        let (results, unkept) = results;
        let mut done = 0;
        for (i, mut out, took) in results {
            done += 1;
            let vm = self.world.vms[i].clone();
            let key = key_of("VirtualMachine", vm.namespace().as_deref(), &vm.name_any());
            let id = (vm.namespace().unwrap_or_default(), vm.name_any());
            if let Some(cause) = unkept.get(&id) {
                super::backup::not_kept(&vm, &mut out.status, &mut out.notes, cause);
            }
            let ready = condition_of(&out.status.conditions, READY);
            let standing = match (ready, out.requeue) {
                (Some((true, _, _)), _) => Standing::Done,
                (_, Some(r)) if r < Duration::from_secs(15) => {
                    Standing::Pending(ready.map(|(_, _, m)| m.to_string()).unwrap_or_default())
                }
                (Some((false, reason, msg)), _) => Standing::Failed(format!("{reason}: {msg}")),
                (None, _) => Standing::Pending("not observed yet".into()),
            };
            let reason = condition_of(&out.status.conditions, READY).map(|(_, r, _)| r.to_string());
            let ready = standing == Standing::Done;
            let moved = self.standing.get(&key) != Some(&standing)
                || vm.status.as_ref().map(|s| (s.power_state, s.node.as_ref()))
                    != Some((out.status.power_state, out.status.node.as_ref()));
            if moved && let Some(node) = &out.status.node {
                // the node's figures (allocation, VMs by state, their statistics) follow
                self.due.remove(&key_of("KvmNode", None, node));
            }
            let mut v = (*vm).clone();
            v.status = Some(out.status);
            self.note(
                "VirtualMachine",
                key.clone(),
                standing,
                &out.notes,
                took,
                reason.as_deref(),
            );
            // a VM that became Ready was observed after its last step: what depends on it moves
            // now, the VM itself is looked at again when its requeue comes
            self.schedule(&key, moved && !ready, out.requeue, self.vm_period());
            self.world.vms[i] = Arc::new(v);
        }
        done
    }

    /// Records an object's standing (and the reconcile in the metrics) and prints its Events.
    fn note(
        &mut self,
        kind: &str,
        key: String,
        standing: Standing,
        notes: &[super::Note],
        took: Duration,
        failed_reason: Option<&str>,
    ) {
        self.metrics.reconciled(
            &kind.to_ascii_lowercase(),
            took,
            failed_reason.filter(|_| matches!(standing, Standing::Failed(_))),
        );
        for n in notes {
            let _ = writeln!(
                self.out,
                "{} {key} {}: {}",
                if n.warning { "Warning" } else { "Normal " },
                n.reason,
                n.message
            );
        }
        self.standing.insert(key, standing);
    }

    /// Creates the evacuation Migration of `ns/vm` off `node` unless it exists.
    fn evacuate(&mut self, node: &str, ns: &str, vm: &str) {
        let name = kvm_node::plan::evacuation_name(node, vm);
        if self
            .world
            .migrations
            .iter()
            .any(|m| m.name_any() == name && m.namespace().as_deref() == Some(ns))
        {
            return;
        }
        let Ok(mut m) = serde_json::from_value::<Migration>(serde_json::json!({
            "apiVersion": "kvm-operator.io/v1alpha1", "kind": "Migration",
            "metadata": {"name": name, "namespace": ns, "uid": new_uid(), "generation": 1,
                         "labels": {migration::EVACUATION_LABEL: node}},
            "spec": {"vmName": vm},
        })) else {
            return;
        };
        let key = key_of("Migration", Some(ns), &name);
        let saved = Saved {
            uid: m.uid().unwrap_or_default(),
            generation: 1,
            spec_sha256: spec_digest(&m.spec).unwrap_or_default(),
            status: None,
            created: serde_json::to_value(&m).ok(),
        };
        self.state.objects.insert(key, saved);
        self.must_save = true;
        m.status = None;
        self.world.migrations.push(Arc::new(m));
    }

    /// Writes every object's UID, generation and status (atomically: a temporary file renamed).
    fn save(&mut self) -> Result<(), StandaloneError> {
        // the statuses are written from the objects that hold them, straight into the file:
        // neither a copy of every status nor the whole text is built in memory
        let mut held = std::collections::HashMap::with_capacity(self.state.objects.len());
        for n in &self.world.nodes {
            held.insert(
                key_of("KvmNode", None, &n.name_any()),
                (
                    Part::NodeSpec(&n.spec),
                    n.status.as_ref().map(Part::NodeStatus),
                ),
            );
        }
        for p in &self.world.pools {
            held.insert(
                key_of("StoragePool", p.namespace().as_deref(), &p.name_any()),
                (
                    Part::PoolSpec(&p.spec),
                    p.status.as_ref().map(Part::PoolStatus),
                ),
            );
        }
        for v in &self.world.vms {
            held.insert(
                key_of("VirtualMachine", v.namespace().as_deref(), &v.name_any()),
                (Part::VmSpec(&v.spec), v.status.as_ref().map(Part::VmStatus)),
            );
        }
        for m in &self.world.migrations {
            held.insert(
                key_of("Migration", m.namespace().as_deref(), &m.name_any()),
                (
                    Part::MigrationSpec(&m.spec),
                    m.status.as_ref().map(Part::MigrationStatus),
                ),
            );
        }
        let path = self.opts.state_dir.join("status.yaml");
        write_state(
            &path,
            &StateOut {
                saved: &self.state.objects,
                held,
            },
        )
        .map_err(|e| StandaloneError::State {
            path: path.display().to_string(),
            cause: e,
        })?;
        self.must_save = false;
        self.unsaved = false;
        self.saved_at = Some(Instant::now());
        Ok(())
    }

    /// The status table: nodes, pools, VMs and migrations.
    pub fn table(&self) -> String {
        let mut rows: Vec<[String; 6]> = vec![[
            "KIND/NAME".into(),
            "NODE".into(),
            "STATE".into(),
            "READY".into(),
            "IP".into(),
            "MESSAGE".into(),
        ]];
        let msg = |k: &str| match self.standing.get(k) {
            Some(Standing::Done) | None => String::new(),
            Some(Standing::Pending(m)) => format!("… {m}"),
            Some(Standing::Failed(m)) => m.clone(),
        };
        let ready = |c: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]| {
            condition::find(c, READY)
                .map(|c| c.status.clone())
                .unwrap_or_else(|| "-".into())
        };
        for n in &self.world.nodes {
            let st = n.status.clone().unwrap_or_default();
            let key = key_of("KvmNode", None, &n.name_any());
            rows.push([
                format!("node/{}", n.name_any()),
                "-".into(),
                st.load
                    .as_ref()
                    .map(|l| format!("load {}", l.load1))
                    .unwrap_or_else(|| "-".into()),
                ready(&st.conditions),
                "-".into(),
                msg(&key),
            ]);
        }
        for p in &self.world.pools {
            let st = p.status.clone().unwrap_or_default();
            let key = key_of("StoragePool", p.namespace().as_deref(), &p.name_any());
            rows.push([
                format!("pool/{}", p.name_any()),
                st.nodes
                    .iter()
                    .map(|n| n.node.clone())
                    .collect::<Vec<_>>()
                    .join(","),
                st.nodes
                    .first()
                    .map(|n| format!("{:?}", n.state))
                    .unwrap_or_else(|| "-".into()),
                ready(&st.conditions),
                "-".into(),
                msg(&key),
            ]);
        }
        for v in &self.world.vms {
            let st = v.status.clone().unwrap_or_default();
            let key = key_of("VirtualMachine", v.namespace().as_deref(), &v.name_any());
            rows.push([
                format!("vm/{}", v.name_any()),
                st.node.clone().unwrap_or_else(|| "-".into()),
                st.power_state
                    .map(|p| format!("{p:?}"))
                    .unwrap_or_else(|| "-".into()),
                ready(&st.conditions),
                // as `kubectl get vm` shows it: the first address
                st.ips.first().cloned().unwrap_or_else(|| "-".into()),
                msg(&key),
            ]);
        }
        for m in &self.world.migrations {
            let st = m.status.clone().unwrap_or_default();
            let key = key_of("Migration", m.namespace().as_deref(), &m.name_any());
            rows.push([
                format!("migration/{}", m.name_any()),
                format!(
                    "{}→{}",
                    st.source_node.clone().unwrap_or_default(),
                    st.target_node.clone().unwrap_or_default()
                ),
                st.phase
                    .map(|p| format!("{p:?}"))
                    .unwrap_or_else(|| "Pending".into()),
                ready(&st.conditions),
                "-".into(),
                msg(&key),
            ]);
        }
        let width = |i: usize| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0);
        let w: Vec<usize> = (0..5).map(width).collect();
        let mut s = String::new();
        for r in &rows {
            let mut line = String::new();
            for (i, cell) in r.iter().enumerate().take(5) {
                line.push_str(&format!("{cell:<width$}  ", width = w[i]));
            }
            let m: String = r[5].chars().take(100).collect();
            line.push_str(&m);
            s.push_str(line.trim_end());
            s.push('\n');
        }
        s
    }

    fn print_table(&mut self) {
        let t = self.table();
        if t != self.last_table {
            let _ = write!(self.out, "\n{t}");
            let _ = self.out.flush();
            self.last_table = t;
        }
    }
}

/// The terminal, shared by the reconciles running side by side.
fn shared(out: &mut (dyn Write + Send)) -> std::sync::Mutex<&mut (dyn Write + Send)> {
    std::sync::Mutex::new(out)
}

/// Awaits `work`, printing a line every few seconds while it runs (a long volume clone, a
/// graceful shutdown) so a long step is never silent.
async fn with_progress<F: std::future::Future>(
    out: &std::sync::Mutex<&mut (dyn Write + Send)>,
    key: &str,
    work: F,
) -> F::Output {
    const EVERY: Duration = Duration::from_secs(5);
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval_at(started + EVERY, EVERY);
    tokio::pin!(work);
    loop {
        tokio::select! {
            r = &mut work => return r,
            _ = tick.tick() => {
                let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
                let _ = writeln!(out, "… {key}: still working ({}s)", started.elapsed().as_secs());
                let _ = out.flush();
            }
        }
    }
}

fn keys(world: &World) -> Vec<String> {
    let mut k = Vec::new();
    k.extend(
        world
            .nodes
            .iter()
            .map(|n| key_of("KvmNode", None, &n.name_any())),
    );
    k.extend(
        world
            .pools
            .iter()
            .map(|p| key_of("StoragePool", p.namespace().as_deref(), &p.name_any())),
    );
    k.extend(
        world
            .vms
            .iter()
            .map(|v| key_of("VirtualMachine", v.namespace().as_deref(), &v.name_any())),
    );
    k.extend(
        world
            .migrations
            .iter()
            .map(|m| key_of("Migration", m.namespace().as_deref(), &m.name_any())),
    );
    k
}

/// Modification times of `p` (a file, or the manifests in a directory).
fn stamp(p: &Path, into: &mut BTreeMap<PathBuf, SystemTime>) {
    if p.is_dir() {
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                let path = e.path();
                if manifest::is_hidden(&path) {
                    continue;
                }
                let yaml = path.extension().is_some_and(|x| x == "yaml" || x == "yml");
                if path.is_dir() || yaml {
                    stamp(&path, into);
                }
            }
        }
    } else if let Ok(m) = std::fs::metadata(p).and_then(|m| m.modified()) {
        into.insert(p.to_path_buf(), m);
    }
}

/// Writes the state file atomically (a temporary file renamed over it), streaming the YAML.
fn write_state(path: &Path, state: &StateOut<'_>) -> Result<(), String> {
    let tmp = path.with_extension("yaml.tmp");
    let write = || -> Result<(), String> {
        let f = std::fs::File::create(&tmp).map_err(|e| e.to_string())?;
        let mut w = std::io::BufWriter::with_capacity(64 * 1024, f);
        w.write_all(
            b"# Written by `kvm-operator standalone`: each object's UID (the ownership stamp on its\n# domain), generation and status. Keep it to resume without duplicating anything.\n",
        )
        .map_err(|e| e.to_string())?;
        serde_saphyr::to_io_writer(&mut w, state).map_err(|e| e.to_string())?;
        w.flush().map_err(|e| e.to_string())?;
        // the UIDs in it are the domains' ownership stamps: a state lost in a crash would
        // have the next run create every VM anew
        w.get_ref().sync_all().map_err(|e| e.to_string())
    };
    write()?;
    std::fs::rename(&tmp, path).map_err(|e| e.to_string())?;
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("cannot sync {}: {e}", dir.display()))?;
    }
    Ok(())
}

fn read_state(path: &Path) -> Result<StateFile, StandaloneError> {
    let err = |cause: String| StandaloneError::State {
        path: path.display().to_string(),
        cause,
    };
    match std::fs::read_to_string(path) {
        // the reader's budgets grow with the file: any number of objects reads back
        Ok(text) => serde_saphyr::from_str_with_options(&text, manifest::yaml_options(text.len()))
            .map_err(|e| err(manifest::yaml_message(&e))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StateFile::default()),
        Err(e) => Err(err(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn long_work_is_never_silent() {
        let mut out: Vec<u8> = vec![];
        let shared = std::sync::Mutex::new(&mut out as &mut (dyn Write + Send));
        let r = with_progress(&shared, "VirtualMachine/ns/vm", async {
            tokio::time::sleep(Duration::from_secs(12)).await;
            7
        })
        .await;
        assert_eq!(r, 7);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "… VirtualMachine/ns/vm: still working (5s)",
                "… VirtualMachine/ns/vm: still working (10s)"
            ]
        );
        // quick work prints nothing
        let mut out: Vec<u8> = vec![];
        let shared = std::sync::Mutex::new(&mut out as &mut (dyn Write + Send));
        with_progress(&shared, "k", async {}).await;
        assert!(out.is_empty());
    }

    /// Bound VMs go in chunks, each applied as it ends: every VM of every chunk gets its
    /// outcome, and the placements of a round go beside its first chunk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vms_in_chunks_all_reach_running() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("node.xml");
        std::fs::write(
            &node,
            "<node><cpu><mhz>2000</mhz><model>t</model><active>64</active><nodes>1</nodes><sockets>1</sockets><cores>64</cores><threads>1</threads></cpu><memory>67108864</memory></node>",
        )
        .unwrap();
        let files = dir.path().join("m");
        std::fs::create_dir(&files).unwrap();
        let vm = |i: usize| {
            format!(
                "apiVersion: kvm-operator.io/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: c{i}}}\nspec: {{vcpus: 1, memory: 64Mi}}\n"
            )
        };
        let node_doc = format!(
            "apiVersion: kvm-operator.io/v1alpha1\nkind: KvmNode\nmetadata: {{name: n0}}\nspec: {{address: localhost, libvirtUri: \"test://{}\"}}\n",
            node.display()
        );
        let write = |n: usize| {
            let docs: Vec<String> = std::iter::once(node_doc.clone())
                .chain((0..n).map(vm))
                .collect();
            std::fs::write(files.join("all.yaml"), docs.join("---\n")).unwrap();
        };
        write(7);
        let mut s = Standalone::new(
            Options {
                files: vec![files.clone()],
                default_uri: "test:///default".into(),
                state_dir: dir.path().join("state"),
                once: true,
                timeout: Duration::from_secs(60),
                resync: Duration::from_secs(30),
            },
            Config::default(),
            Box::new(std::io::sink()),
        )
        .unwrap();
        s.vm_chunk = 3;
        let running = |s: &Standalone| {
            s.world()
                .vms
                .iter()
                .filter(|v| {
                    v.status.as_ref().and_then(|st| st.power_state)
                        == Some(crate::api::virtual_machine::PowerState::Running)
                })
                .count()
        };
        s.run().await.unwrap();
        assert_eq!(running(&s), 7);
        // three more: placed beside the first chunk of a round, then bound in chunks too
        std::thread::sleep(Duration::from_millis(20));
        write(10);
        s.run().await.unwrap();
        assert_eq!(running(&s), 10);
        let uuids: std::collections::BTreeSet<_> = s
            .world()
            .vms
            .iter()
            .filter_map(|v| v.status.as_ref().and_then(|st| st.domain_uuid.clone()))
            .collect();
        assert_eq!(uuids.len(), 10, "one domain each");
    }

    #[test]
    fn uids_are_version_4_and_distinct() {
        let a = new_uid();
        let b = new_uid();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "{a}");
    }

    #[test]
    fn a_state_file_of_many_thousand_objects_reads_back() {
        // ~125 YAML nodes per object, as a VM's status has: 3,000 objects are far beyond the
        // YAML reader's default budget of 250,000 nodes, which refused restarts past ~2,000 VMs
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("status.yaml");
        let status: serde_json::Value = (0..60)
            .map(|i| (format!("field{i}"), serde_json::json!(format!("value {i}"))))
            .collect::<serde_json::Map<_, _>>()
            .into();
        let saved: BTreeMap<String, Saved> = (0..3000)
            .map(|i| {
                (
                    format!("VirtualMachine/default/vm-{i:05}"),
                    Saved {
                        uid: format!("uid-{i}"),
                        generation: 1,
                        spec_sha256: String::new(),
                        status: Some(status.clone()),
                        created: None,
                    },
                )
            })
            .collect();
        let spec: crate::api::virtual_machine::VirtualMachineSpec =
            serde_json::from_value(serde_json::json!({"vcpus": 1, "memory": "64Mi"})).unwrap();
        let held = [(
            "VirtualMachine/default/vm-00007".to_string(),
            (Part::VmSpec(&spec), None),
        )]
        .into_iter()
        .collect();
        write_state(
            &p,
            &StateOut {
                saved: &saved,
                held,
            },
        )
        .unwrap();
        let back = read_state(&p).unwrap();
        assert_eq!(back.objects.len(), 3000);
        let one = &back.objects["VirtualMachine/default/vm-02999"];
        assert_eq!(one.uid, "uid-2999");
        assert_eq!(one.status.as_ref(), Some(&status));
        // the spec is written from the object, and read back as the digest it is compared by
        let seven = &back.objects["VirtualMachine/default/vm-00007"];
        assert_eq!(seven.spec_sha256, spec_digest(&spec).unwrap());
    }

    #[test]
    fn a_state_file_that_is_not_ours_is_refused_with_its_path() {
        let dir = std::env::temp_dir().join(format!("kvm-op-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("status.yaml");
        std::fs::write(&p, "objects: [1, 2]").unwrap();
        let e = read_state(&p).unwrap_err().to_string();
        assert!(
            e.contains("status.yaml") && e.contains("move it aside"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            read_state(&dir.join("none.yaml"))
                .unwrap()
                .objects
                .is_empty()
        );
    }
}
