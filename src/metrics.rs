//! Prometheus metrics (text format on `/metrics`, with the `prometheus-client` crate).
//!
//! Two kinds:
//! - event metrics, counted as they happen: reconciles and their duration per controller, errors
//!   by controller and static reason (never an error string);
//! - object metrics, rendered at scrape time from the objects the operator holds (its caches in a
//!   cluster, the manifests in standalone mode) and the last batched statistics of each node:
//!   per node capacity, allocatable, allocation, load, placement score, VMs by state, reachable;
//!   per VM CPU time, memory and block/network I/O; migrations by phase with duration and
//!   downtime.
//!
//! Label values are object names, node names, power states, phases and static reasons: bounded
//! by what exists, never by what happens.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use kube::ResourceExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::api::condition::{self, READY};
use crate::controller::World;
use crate::hypervisor::stats::DomainStats;
use crate::placement::{Request, Weights, rebalance};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Ctl {
    controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CtlReason {
    controller: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Node {
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeResource {
    node: String,
    resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeState {
    node: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Vm {
    namespace: String,
    name: String,
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmDir {
    namespace: String,
    name: String,
    node: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Phase {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Mig {
    namespace: String,
    name: String,
}

type FGauge = Gauge<f64, AtomicU64>;

/// The operator's metrics.
/// What `/metrics` serves before this replica leads: scrapes succeed (no false `up == 0` for
/// standbys) and say it is not the leader.
pub const STANDBY: &str = "# HELP kvm_operator_leader 1 on the replica that runs the controllers, 0 on a standby.\n# TYPE kvm_operator_leader gauge\nkvm_operator_leader 0\n# EOF\n";

pub struct Metrics {
    registry: Registry,
    reconciles: Family<Ctl, Counter>,
    errors: Family<CtlReason, Counter>,
    duration: Family<Ctl, Histogram>,
    node_capacity: Family<NodeResource, FGauge>,
    node_allocatable: Family<NodeResource, FGauge>,
    node_allocated: Family<NodeResource, FGauge>,
    node_load1: Family<Node, FGauge>,
    node_cpu_usage: Family<Node, FGauge>,
    node_score: Family<Node, FGauge>,
    node_ready: Family<Node, FGauge>,
    node_vms: Family<NodeState, FGauge>,
    vm_cpu_seconds: Family<Vm, FGauge>,
    vm_memory_bytes: Family<Vm, FGauge>,
    vm_block_bytes: Family<VmDir, FGauge>,
    vm_network_bytes: Family<VmDir, FGauge>,
    migrations: Family<Phase, FGauge>,
    migration_duration: Family<Mig, FGauge>,
    migration_downtime: Family<Mig, FGauge>,
    /// The last batched statistics of each node's domains, by node then domain.
    stats: Mutex<BTreeMap<String, Vec<DomainStats>>>,
    /// Object metrics are cleared and refilled per scrape: one scrape at a time, so two never
    /// see each other's half-filled families.
    rendering: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("kvm_operator");
        let reconciles = Family::<Ctl, Counter>::default();
        r.register(
            "reconciles",
            "Reconciles run, by controller",
            reconciles.clone(),
        );
        let errors = Family::<CtlReason, Counter>::default();
        r.register(
            "reconcile_errors",
            "Reconciles that ended in an error, by controller and reason",
            errors.clone(),
        );
        // 5 ms to ~40 s
        let duration: Family<Ctl, Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.005, 2.0, 14)));
        r.register(
            "reconcile_duration_seconds",
            "Reconcile duration, by controller",
            duration.clone(),
        );
        // rendered only where the controllers run; a standby serves STANDBY instead
        let leader = Gauge::<i64>::default();
        leader.set(1);
        r.register(
            "leader",
            "1 on the replica that runs the controllers, 0 on a standby",
            leader.clone(),
        );
        macro_rules! gauge {
            ($name:literal, $help:literal) => {{
                let f = Family::default();
                r.register($name, $help, f.clone());
                f
            }};
        }
        Self {
            reconciles,
            errors,
            duration,
            node_capacity: gauge!("node_capacity", "Host capacity (cpus, memory bytes)"),
            node_allocatable: gauge!(
                "node_allocatable",
                "Capacity after reservations and overcommit (cpus, memory bytes)"
            ),
            node_allocated: gauge!(
                "node_allocated",
                "Allocated to the operator's VMs (cpus, memory bytes)"
            ),
            node_load1: gauge!("node_load1", "1-minute load average of the host"),
            node_cpu_usage: gauge!("node_cpu_usage_ratio", "Host CPU use, 0 to 1"),
            node_score: gauge!(
                "node_score",
                "Placement load score of the node for an empty request (higher is quieter)"
            ),
            node_ready: gauge!("node_ready", "1 when the node is Ready"),
            node_vms: gauge!("node_vms", "The operator's VMs on the node, by power state"),
            vm_cpu_seconds: gauge!("vm_cpu_seconds", "Guest CPU time, seconds"),
            vm_memory_bytes: gauge!("vm_memory_bytes", "Guest memory (balloon current), bytes"),
            vm_block_bytes: gauge!("vm_block_bytes", "Guest disk I/O, bytes, by direction"),
            vm_network_bytes: gauge!("vm_network_bytes", "Guest network I/O, bytes, by direction"),
            migrations: gauge!("migrations", "Migrations, by phase"),
            migration_duration: gauge!(
                "migration_duration_seconds",
                "Duration of a finished migration"
            ),
            migration_downtime: gauge!(
                "migration_downtime_seconds",
                "Guest downtime of a finished migration"
            ),
            stats: Mutex::new(BTreeMap::new()),
            rendering: Mutex::new(()),
            registry: r,
        }
    }

    /// Counts one reconcile of `controller` (`kvmnode`, `storagepool`, `virtualmachine`,
    /// `migration`), its duration, and its error reason if it failed (a static CamelCase reason:
    /// an error enum's `reason()` or a condition reason, never a message).
    pub fn reconciled(&self, controller: &str, took: Duration, error: Option<&str>) {
        let c = Ctl {
            controller: controller.to_string(),
        };
        self.reconciles.get_or_create(&c).inc();
        self.duration.get_or_create(&c).observe(took.as_secs_f64());
        if let Some(reason) = error {
            self.errors
                .get_or_create(&CtlReason {
                    controller: controller.to_string(),
                    reason: reason.to_string(),
                })
                .inc();
        }
    }

    /// Keeps the batched statistics a node resync read.
    pub fn node_stats(&self, node: &str, stats: Vec<DomainStats>) {
        let mut m = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(node.to_string(), stats);
    }

    /// The text exposition, with object metrics computed from `world`.
    pub fn render(&self, world: &World, weights: &Weights) -> String {
        let _one = self.rendering.lock().unwrap_or_else(|p| p.into_inner());
        self.fill(world, weights);
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    fn fill(&self, world: &World, weights: &Weights) {
        for f in [
            &self.node_capacity,
            &self.node_allocatable,
            &self.node_allocated,
        ] {
            f.clear();
        }
        for f in [
            &self.node_load1,
            &self.node_cpu_usage,
            &self.node_score,
            &self.node_ready,
        ] {
            f.clear();
        }
        self.node_vms.clear();
        self.vm_cpu_seconds.clear();
        self.vm_memory_bytes.clear();
        self.vm_block_bytes.clear();
        self.vm_network_bytes.clear();
        self.migrations.clear();
        self.migration_duration.clear();
        self.migration_downtime.clear();
        let res = |node: &str, r: &str| NodeResource {
            node: node.to_string(),
            resource: r.to_string(),
        };
        let scores: BTreeMap<String, f64> = crate::controller::virtual_machine::candidates_for(
            world,
            None,
            "",
            &Request::default(),
        )
        .iter()
        .filter(|c| c.allocatable.is_some())
        .map(|c| (c.name.clone(), rebalance::node_score(c, weights)))
        .collect();
        for n in &world.nodes {
            let name = n.name_any();
            let node = Node { node: name.clone() };
            let st = n.status.clone().unwrap_or_default();
            for (family, r) in [
                (&self.node_capacity, &st.capacity),
                (&self.node_allocatable, &st.allocatable),
                (&self.node_allocated, &st.allocated),
            ] {
                if let Some(r) = r {
                    family
                        .get_or_create(&res(&name, "cpus"))
                        .set(f64::from(r.cpus));
                    family
                        .get_or_create(&res(&name, "memory_bytes"))
                        .set(r.memory.bytes() as f64);
                }
            }
            if let Some(l) = &st.load {
                if let Ok(x) = l.load1.parse::<f64>() {
                    self.node_load1.get_or_create(&node).set(x);
                }
                self.node_cpu_usage
                    .get_or_create(&node)
                    .set(f64::from(l.cpu_usage_percent) / 100.0);
            }
            if let Some(s) = scores.get(&name) {
                self.node_score.get_or_create(&node).set(*s);
            }
            let ready = condition::is_true(&st.conditions, READY);
            self.node_ready
                .get_or_create(&node)
                .set(if ready { 1.0 } else { 0.0 });
        }
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        for v in &world.vms {
            let st = v.status.clone().unwrap_or_default();
            let Some(node) = st.node.clone() else {
                continue;
            };
            let state = st
                .power_state
                .map(|p| format!("{p:?}"))
                .unwrap_or_else(|| "Pending".into());
            self.node_vms
                .get_or_create(&NodeState {
                    node: node.clone(),
                    state,
                })
                .inc_by(1.0);
            let Some(s) = st.domain_name.as_deref().and_then(|d| {
                stats
                    .get(&node)
                    .and_then(|v| v.iter().find(|s| s.domain == d))
            }) else {
                continue;
            };
            let vm = Vm {
                namespace: v.namespace().unwrap_or_default(),
                name: v.name_any(),
                node: node.clone(),
            };
            let dir = |d: &str| VmDir {
                namespace: vm.namespace.clone(),
                name: vm.name.clone(),
                node: node.clone(),
                direction: d.to_string(),
            };
            if let Some(ns) = s.cpu_time_ns {
                self.vm_cpu_seconds.get_or_create(&vm).set(ns as f64 / 1e9);
            }
            if let Some(kib) = s.balloon_current_kib {
                self.vm_memory_bytes
                    .get_or_create(&vm)
                    .set(kib as f64 * 1024.0);
            }
            self.vm_block_bytes
                .get_or_create(&dir("read"))
                .set(s.block_read_bytes as f64);
            self.vm_block_bytes
                .get_or_create(&dir("write"))
                .set(s.block_write_bytes as f64);
            self.vm_network_bytes
                .get_or_create(&dir("rx"))
                .set(s.net_rx_bytes as f64);
            self.vm_network_bytes
                .get_or_create(&dir("tx"))
                .set(s.net_tx_bytes as f64);
        }
        for m in &world.migrations {
            let st = m.status.clone().unwrap_or_default();
            let phase = st
                .phase
                .map(|p| format!("{p:?}"))
                .unwrap_or_else(|| "Pending".into());
            self.migrations.get_or_create(&Phase { phase }).inc_by(1.0);
            let id = Mig {
                namespace: m.namespace().unwrap_or_default(),
                name: m.name_any(),
            };
            if let (Some(a), Some(b)) = (&st.start_time, &st.end_time) {
                let secs = b.0.duration_since(a.0).as_secs_f64();
                self.migration_duration
                    .get_or_create(&id)
                    .set(secs.max(0.0));
            }
            if let Some(ms) = st.downtime_ms {
                self.migration_downtime
                    .get_or_create(&id)
                    .set(ms as f64 / 1000.0);
            }
        }
    }
}

/// Parses the text exposition into `(name{labels}, value)` pairs (for tests and tools).
pub fn parse(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_leader_says_1_and_a_standby_the_same_metric_at_0() {
        let text = Metrics::new().render(&World::default(), &Default::default());
        assert_eq!(
            parse(&text).get("kvm_operator_leader"),
            Some(&1.0),
            "{text}"
        );
        assert_eq!(parse(STANDBY).get("kvm_operator_leader"), Some(&0.0));
        // the same family as the leader renders it (HELP and TYPE lines equal)
        for l in STANDBY
            .lines()
            .filter(|l| l.starts_with("# ") && *l != "# EOF")
        {
            assert!(text.lines().any(|t| t == l), "{l} not in\n{text}");
        }
    }

    #[test]
    fn reconciles_errors_and_objects_are_exposed_with_bounded_labels() {
        let m = Metrics::new();
        m.reconciled("virtualmachine", Duration::from_millis(20), None);
        m.reconciled(
            "virtualmachine",
            Duration::from_millis(30),
            Some("HostUnreachable"),
        );
        let node: crate::api::KvmNode = serde_json::from_value(serde_json::json!({
            "apiVersion": "kvm-operator.io/v1alpha1", "kind": "KvmNode",
            "metadata": {"name": "hv1"},
            "spec": {"address": "10.0.0.1"},
            "status": {
                "capacity": {"cpus": 8, "memory": "32Gi"},
                "allocatable": {"cpus": 16, "memory": "32Gi"},
                "allocated": {"cpus": 2, "memory": "4Gi"},
                "load": {"load1": "1.50", "load5": "1", "load15": "1", "cpuUsagePercent": 25, "memoryFree": "20Gi"},
                "conditions": [{"type": "Ready", "status": "True", "reason": "Ready", "message": "",
                                "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            }
        }))
        .unwrap();
        let vm: crate::api::VirtualMachine = serde_json::from_value(serde_json::json!({
            "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": "web", "namespace": "team"},
            "spec": {"vcpus": 2, "memory": "4Gi"},
            "status": {"node": "hv1", "domainName": "team_web", "powerState": "Running"},
        }))
        .unwrap();
        m.node_stats(
            "hv1",
            vec![DomainStats {
                domain: "team_web".into(),
                cpu_time_ns: Some(2_500_000_000),
                balloon_current_kib: Some(4 * 1024 * 1024),
                block_read_bytes: 100,
                net_tx_bytes: 7,
                ..Default::default()
            }],
        );
        let world = World {
            nodes: vec![Arc::new(node)],
            vms: vec![Arc::new(vm)],
            ..World::default()
        };
        let text = m.render(&world, &Weights::default());
        let p = parse(&text);
        let get = |k: &str| *p.get(k).unwrap_or_else(|| panic!("no {k} in\n{text}"));
        assert_eq!(
            get("kvm_operator_reconciles_total{controller=\"virtualmachine\"}"),
            2.0
        );
        assert_eq!(
            get(
                "kvm_operator_reconcile_errors_total{controller=\"virtualmachine\",reason=\"HostUnreachable\"}"
            ),
            1.0
        );
        assert_eq!(
            get("kvm_operator_reconcile_duration_seconds_count{controller=\"virtualmachine\"}"),
            2.0
        );
        assert_eq!(
            get("kvm_operator_node_allocatable{node=\"hv1\",resource=\"cpus\"}"),
            16.0
        );
        assert_eq!(get("kvm_operator_node_load1{node=\"hv1\"}"), 1.5);
        assert_eq!(get("kvm_operator_node_cpu_usage_ratio{node=\"hv1\"}"), 0.25);
        assert_eq!(get("kvm_operator_node_ready{node=\"hv1\"}"), 1.0);
        assert!(get("kvm_operator_node_score{node=\"hv1\"}") > 0.0);
        assert_eq!(
            get("kvm_operator_node_vms{node=\"hv1\",state=\"Running\"}"),
            1.0
        );
        assert_eq!(
            get("kvm_operator_vm_cpu_seconds{namespace=\"team\",name=\"web\",node=\"hv1\"}"),
            2.5
        );
        assert_eq!(
            get(
                "kvm_operator_vm_block_bytes{namespace=\"team\",name=\"web\",node=\"hv1\",direction=\"read\"}"
            ),
            100.0
        );
        // no label carries free text: every label value is a name, a state or a static reason
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(
                !line.contains(' ') || line.matches(' ').count() == 1,
                "{line}"
            );
        }
        // a VM that is gone is gone from the next scrape
        let empty = World {
            nodes: world.nodes.clone(),
            ..World::default()
        };
        let text = m.render(&empty, &Weights::default());
        assert!(!text.contains("name=\"web\""), "{text}");
    }
}
