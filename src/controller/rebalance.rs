//! Rebalancing (opt-in, `rebalance.enabled` in the configuration): every `interval`, when the
//! busiest and quietest nodes' load scores are further apart than `threshold`, one VM is moved
//! from the busiest node toward the others: proposed as an Event on the busiest KvmNode
//! (`Propose`, the first mode to try), or done by creating a Migration (`Migrate`).
//!
//! The rate limit is read from the cluster, so a restarted operator keeps it: no move while any
//! Migration is unfinished, and none sooner than `interval` after the last rebalancing Migration
//! was created. Only running VMs placed by the operator move; adopted VMs stay where their owner
//! put them, and so do VMs being deleted. The decision itself is
//! [`crate::placement::rebalance`], pure.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, PostParams};
use kube::{Resource, ResourceExt};

use super::config::{Rebalance, RebalanceMode};
use super::virtual_machine::{candidates, candidates_for, request};
use super::{Context, Note, World};
use crate::api::VirtualMachine;
use crate::api::migration::{Migration, MigrationSpec};
use crate::api::storage_pool::PoolType;
use crate::api::virtual_machine::{PowerState, disk_pool};
use crate::placement::rebalance::{Imbalance, Move, Resident, best_move, imbalance};
use crate::placement::{Request, Weights};

/// Label on the Migrations rebalancing creates.
pub const REBALANCE_LABEL: &str = "kvm-operator.io/rebalance";

/// Why no move is made this round.
#[derive(Clone, Debug, PartialEq)]
pub enum Hold {
    /// A Migration is unfinished: one move at a time, and never on top of an evacuation.
    MigrationsRunning(usize),
    /// The last rebalancing move is more recent than the interval.
    TooSoon { wait: Duration },
    /// The nodes are within the threshold of each other.
    Balanced { spread: f64 },
    /// No VM on the busiest node can move to a node where the spread gets smaller.
    NoMove { spread: f64 },
}

/// The move to make now, with the imbalance it answers, or why none is made.
///
/// `last` is how long ago the last rebalancing move was made (None: never).
pub fn plan(
    world: &World,
    cfg: &Rebalance,
    weights: &Weights,
    last: Option<Duration>,
) -> Result<(Imbalance, Move), Hold> {
    let running = world
        .migrations
        .iter()
        .filter(|m| {
            !m.status
                .as_ref()
                .and_then(|s| s.phase)
                .is_some_and(|p| p.is_terminal())
        })
        .count();
    if running > 0 {
        return Err(Hold::MigrationsRunning(running));
    }
    if let Some(ago) = last
        && ago < cfg.interval
    {
        return Err(Hold::TooSoon {
            wait: cfg.interval - ago,
        });
    }
    let nodes = candidates_for(world, None, "", &Request::default());
    let im =
        imbalance(&nodes, weights, cfg.threshold).map_err(|spread| Hold::Balanced { spread })?;
    let residents: Vec<Resident> = world
        .vms
        .iter()
        .filter(|v| movable(v, &im.busiest))
        .map(|v| Resident {
            key: format!("{}/{}", v.namespace().unwrap_or_default(), v.name_any()),
            request: request(v),
            view: candidates(world, v),
        })
        .collect();
    let spread = im.spread;
    let m = best_move(&nodes, &im, &residents, weights).ok_or(Hold::NoMove { spread })?;
    Ok((im, m))
}

/// A VM rebalancing may move off `node`.
fn movable(v: &VirtualMachine, node: &str) -> bool {
    let st = v.status.as_ref();
    v.metadata.deletion_timestamp.is_none()
        && v.spec.adopt.is_none()
        && st.and_then(|s| s.node.as_deref()) == Some(node)
        && st.and_then(|s| s.power_state) == Some(PowerState::Running)
}

/// Whether moving `vm` must copy its disks: any disk (or the seed) in a pool local to the node
/// (`dir`, `logical`); shared pools (`netfs`, `iscsi`, `rbd`) are seen by both nodes.
pub fn needs_storage_copy(world: &World, vm: &VirtualMachine) -> bool {
    let ns = vm.namespace();
    let mut pools: Vec<&str> = vm.spec.disks.iter().filter_map(disk_pool).collect();
    if let Some(p) = vm.spec.cloud_init.as_ref().and_then(|c| c.pool.as_deref()) {
        pools.push(p);
    }
    pools.iter().any(|name| {
        world
            .pools
            .iter()
            .find(|p| p.namespace() == ns && p.name_any() == *name)
            .is_none_or(|p| matches!(p.spec.type_, PoolType::Dir | PoolType::Logical))
    })
}

/// Runs rounds every `interval` until the process ends (only when enabled).
pub async fn run(ctx: Arc<Context>) {
    let cfg = ctx.config.rebalance;
    if !cfg.enabled {
        return;
    }
    // let the caches fill before the first look
    let _ = ctx.vms.wait_until_ready().await;
    let _ = ctx.nodes.wait_until_ready().await;
    let mut last_proposal: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(cfg.interval.min(Duration::from_secs(60)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match round(&ctx, last_proposal.map(|t| t.elapsed())).await {
            Ok(Ok(_)) => last_proposal = Some(tokio::time::Instant::now()),
            Ok(Err(hold)) => tracing::debug!(?hold, "rebalance: no move"),
            Err(e) => tracing::warn!(error = %e, "rebalance: the move could not be made"),
        }
    }
}

/// One round: look, and make (or propose) at most one move. `last_proposal` is how long ago
/// the last proposal was published (Propose mode keeps it in memory).
pub async fn round(
    ctx: &Context,
    last_proposal: Option<Duration>,
) -> Result<Result<Move, Hold>, kube::Error> {
    let cfg = ctx.config.rebalance;
    let world = ctx.world();
    let last = match cfg.mode {
        RebalanceMode::Propose => last_proposal,
        RebalanceMode::Migrate => last_migration_age(&world),
    };
    match plan(&world, &cfg, &ctx.config.weights, last) {
        Err(hold) => Ok(Err(hold)),
        Ok((im, m)) => {
            act(ctx, &world, &cfg, &im, &m).await?;
            Ok(Ok(m))
        }
    }
}

/// How long ago the newest rebalancing Migration was created.
fn last_migration_age(world: &World) -> Option<Duration> {
    let now = k8s_openapi::jiff::Timestamp::now();
    world
        .migrations
        .iter()
        .filter(|m| m.labels().contains_key(REBALANCE_LABEL))
        .filter_map(|m| m.metadata.creation_timestamp.as_ref())
        .map(|t| Duration::try_from(now.duration_since(t.0)).unwrap_or(Duration::ZERO))
        .min()
}

async fn act(
    ctx: &Context,
    world: &World,
    cfg: &Rebalance,
    im: &Imbalance,
    m: &Move,
) -> Result<(), kube::Error> {
    let why = m.explain(im);
    // the busiest node comes from the same snapshot
    let Some(node_ref) = world
        .nodes
        .iter()
        .find(|n| n.name_any() == m.from)
        .map(|n| n.object_ref(&()))
    else {
        return Ok(());
    };
    match cfg.mode {
        RebalanceMode::Propose => {
            tracing::info!(vm = %m.vm, from = %m.from, to = %m.to, "rebalance proposed: {why}");
            ctx.publish(
                &node_ref,
                &[Note::normal(
                    "RebalanceProposed",
                    "Rebalance",
                    format!(
                        "{why}; apply a Migration of that VM to do it, or set rebalance.mode: Migrate"
                    ),
                )],
            )
            .await;
        }
        RebalanceMode::Migrate => {
            let Some((ns, name)) = m.vm.split_once('/') else {
                return Ok(());
            };
            let Some(vm) = world
                .vms
                .iter()
                .find(|v| v.namespace().as_deref() == Some(ns) && v.name_any() == name)
            else {
                return Ok(());
            };
            let mig = migration_for(m, vm, needs_storage_copy(world, vm))
                .map_err(kube::Error::SerdeError)?;
            let api: Api<Migration> = Api::namespaced(ctx.client.clone(), ns);
            let created = api.create(&PostParams::default(), &mig).await?;
            tracing::info!(vm = %m.vm, migration = %created.name_any(), "rebalance: {why}");
            ctx.publish(
                &node_ref,
                &[Note::normal(
                    "RebalanceStarted",
                    "Rebalance",
                    format!("{why}: Migration {ns}/{} created", created.name_any()),
                )],
            )
            .await;
        }
    }
    Ok(())
}

/// The Migration that makes move `m` of `vm`.
pub fn migration_for(
    m: &Move,
    vm: &VirtualMachine,
    copy_storage: bool,
) -> Result<Migration, serde_json::Error> {
    let name = vm.name_any();
    // generateName: a moved VM may be moved again later; the API server adds 5 characters
    let stem: String = name.chars().take(40).collect();
    let spec: MigrationSpec = serde_json::from_value(serde_json::json!({
        "vmName": name,
        "targetNode": m.to,
        "copyStorage": copy_storage,
    }))?;
    let mut mig = Migration::new("", spec);
    mig.metadata.name = None;
    mig.metadata.generate_name = Some(format!("rebalance-{}-", stem.trim_end_matches('-')));
    mig.metadata.namespace = vm.namespace();
    mig.metadata.labels = Some(
        [
            (REBALANCE_LABEL.to_string(), "true".to_string()),
            ("kvm-operator.io/from-node".to_string(), m.from.clone()),
        ]
        .into(),
    );
    Ok(mig)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::KvmNode;

    fn node(name: &str) -> Arc<KvmNode> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "kvm-operator.io/v1alpha1", "kind": "KvmNode",
                "metadata": {"name": name},
                "spec": {"address": "10.0.0.1"},
                "status": {
                    "capacity": {"cpus": 16, "memory": "64Gi"},
                    "allocatable": {"cpus": 16, "memory": "64Gi"},
                    "load": {"load1": "0", "load5": "0", "load15": "0", "cpuUsagePercent": 0, "memoryFree": "60Gi"},
                    "conditions": [{"type": "Ready", "status": "True", "reason": "Ready", "message": "",
                                    "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                }
            }))
            .unwrap(),
        )
    }

    fn vm(name: &str, node: &str, cpus: u32, extra: serde_json::Value) -> Arc<VirtualMachine> {
        let mut v = serde_json::json!({
            "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}")},
            "spec": {"vcpus": cpus, "memory": format!("{}Gi", cpus * 4)},
            "status": {"node": node, "powerState": "Running"},
        });
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            for (k, x) in e {
                o.insert(k.clone(), x.clone());
            }
        }
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn world(vms: Vec<Arc<VirtualMachine>>) -> World {
        World {
            nodes: vec![node("a"), node("b")],
            vms,
            ..World::default()
        }
    }

    fn cfg() -> Rebalance {
        Rebalance {
            enabled: true,
            mode: RebalanceMode::Migrate,
            threshold: 100.0,
            interval: Duration::from_secs(600),
        }
    }

    #[test]
    fn a_crowded_node_sheds_the_vm_that_levels_the_nodes() {
        let w = world(vec![
            vm("small", "a", 1, serde_json::json!({})),
            vm("half", "a", 6, serde_json::json!({})),
            vm("rest", "a", 6, serde_json::json!({})),
        ]);
        let (im, m) = plan(&w, &cfg(), &Weights::default(), None).unwrap();
        assert_eq!(im.busiest, "a");
        assert_eq!((m.from.as_str(), m.to.as_str()), ("a", "b"));
        assert_eq!(
            m.vm, "ns/half",
            "6 of 13 levels best; ties go to the name first"
        );
        let mig = migration_for(&m, &w.vms[1], false).unwrap();
        assert_eq!(mig.spec.vm_name, "half");
        assert_eq!(mig.spec.target_node.as_deref(), Some("b"));
        assert_eq!(
            mig.metadata.generate_name.as_deref(),
            Some("rebalance-half-")
        );
        assert_eq!(mig.metadata.namespace.as_deref(), Some("ns"));
        assert!(mig.labels().contains_key(REBALANCE_LABEL));
    }

    #[test]
    fn rate_limit_running_migrations_and_who_may_move() {
        let w0 = world(vec![
            vm("one", "a", 8, serde_json::json!({})),
            vm("two", "a", 6, serde_json::json!({})),
        ]);
        let wt = Weights::default();
        assert!(matches!(
            plan(&w0, &cfg(), &wt, Some(Duration::from_secs(60))),
            Err(Hold::TooSoon { wait }) if wait == Duration::from_secs(540)
        ));
        assert!(plan(&w0, &cfg(), &wt, Some(Duration::from_secs(601))).is_ok());
        // an unfinished Migration (of anything) holds every move
        let mut w = w0.clone();
        w.migrations = vec![Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "kvm-operator.io/v1alpha1", "kind": "Migration",
                "metadata": {"name": "m", "namespace": "ns"},
                "spec": {"vmName": "other"},
                "status": {"phase": "Running"},
            }))
            .unwrap(),
        )];
        assert_eq!(plan(&w, &cfg(), &wt, None), Err(Hold::MigrationsRunning(1)));
        // a finished one does not
        let mut done = (*w.migrations[0]).clone();
        done.status.as_mut().unwrap().phase = Some(crate::api::MigrationPhase::Succeeded);
        w.migrations = vec![Arc::new(done)];
        assert!(plan(&w, &cfg(), &wt, None).is_ok());
        // adopted, stopped or deleting VMs never move
        let w = world(vec![
            vm(
                "adopted",
                "a",
                8,
                serde_json::json!({"spec": {"vcpus": 8, "memory": "32Gi", "adopt": {"nodeName": "a", "domain": "legacy"}}}),
            ),
            vm(
                "stopped",
                "a",
                6,
                serde_json::json!({"status": {"node": "a", "powerState": "Stopped"}}),
            ),
        ]);
        assert!(matches!(
            plan(&w, &cfg(), &wt, None),
            Err(Hold::NoMove { .. })
        ));
        // balanced nodes stay as they are
        let w = world(vec![
            vm("x", "a", 4, serde_json::json!({})),
            vm("y", "b", 4, serde_json::json!({})),
        ]);
        assert!(matches!(
            plan(&w, &cfg(), &wt, None),
            Err(Hold::Balanced { .. })
        ));
    }

    #[test]
    fn local_pools_need_their_disks_copied_and_shared_ones_do_not() {
        let pool = |name: &str, ty: &str| -> Arc<crate::api::StoragePool> {
            Arc::new(
                serde_json::from_value(serde_json::json!({
                    "apiVersion": "kvm-operator.io/v1alpha1", "kind": "StoragePool",
                    "metadata": {"name": name, "namespace": "ns"},
                    "spec": {"nodeSelector": {"storage": "x"}, "type": ty, "targetPath": "/p",
                             "source": {"host": "nfs", "dir": "/x", "format": "nfs"}},
                }))
                .unwrap_or_else(|e| panic!("{e}")),
            )
        };
        let with_disk = |p: &str| {
            vm(
                "d",
                "a",
                1,
                serde_json::json!({"spec": {"vcpus": 1, "memory": "1Gi",
                "disks": [{"name": "root", "new": {"pool": p, "size": "1Gi"}}]}}),
            )
        };
        let mut w = world(vec![]);
        w.pools = vec![pool("local", "dir"), pool("shared", "netfs")];
        assert!(needs_storage_copy(&w, &with_disk("local")));
        assert!(!needs_storage_copy(&w, &with_disk("shared")));
        // a pool we do not know: copy (the safe way)
        assert!(needs_storage_copy(&w, &with_disk("unknown")));
    }
}
