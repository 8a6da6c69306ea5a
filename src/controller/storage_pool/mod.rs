//! StoragePool: define, build, start and autostart a libvirt pool on its node or on every node
//! matching its selector; report capacity per node; never overwrite a different pool of the
//! same name unless asked; on deletion, follow the deletion policy.

pub mod execute;
pub mod observe;
pub mod plan;
pub mod status;

use std::sync::Arc;

use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Resource, ResourceExt};

use super::{Config, Context, Error, FINALIZER, Note, Outcome, World, apply_status, describe};
use crate::api::condition::{self, set_condition};
use crate::api::kvm_node::KvmNode;
use crate::api::storage_pool::{StoragePool, StoragePoolStatus};
use crate::api::virtual_machine::disk_pool;
use crate::hypervisor::Hypervisor;

/// Field manager of this controller's status writes.
pub const MANAGER: &str = "kvm-operator-storagepool";

fn invalid(pool: &StoragePool, message: String) -> Outcome<StoragePoolStatus> {
    let mut st = pool.status.clone().unwrap_or_default();
    st.observed_generation = pool.metadata.generation;
    let already = condition::find(&st.conditions, condition::READY)
        .is_some_and(|c| c.reason == "InvalidSpec" && c.message == message);
    set_condition(
        &mut st.conditions,
        condition::condition(
            condition::READY,
            false,
            "InvalidSpec",
            message.clone(),
            pool.metadata.generation,
            super::now(),
        ),
    );
    Outcome {
        status: st,
        notes: if already {
            vec![]
        } else {
            vec![Note::warning("InvalidSpec", "Validate", message)]
        },
        requeue: None,
    }
}

/// The core: plan against every target node, execute, report.
pub async fn reconcile_core<H: Hypervisor>(
    pool: &StoragePool,
    world: &World,
    hv: &H,
    config: &Config,
) -> Outcome<StoragePoolStatus> {
    if let Err(e) = pool.spec.validate() {
        return invalid(
            pool,
            format!("{}: {e}; fix the spec and apply it again", describe(pool)),
        );
    }
    let known: Vec<&KvmNode> = world.nodes.iter().map(|n| n.as_ref()).collect();
    let known_names: Vec<String> = known.iter().map(|n| n.name_any()).collect();
    let targets: Vec<String> = plan::target_nodes(&pool.spec, &known)
        .into_iter()
        .filter(|n| known_names.contains(n))
        .collect();
    let observed = observe::observe(hv, &plan::libvirt_name(pool), &targets).await;
    let plan = plan::plan(pool, &known, &observed);
    let executed = execute::execute(hv, &plan.steps).await;
    let (status, notes) = status::status(pool, &plan, &executed, super::now());
    let settled = condition::is_true(&status.conditions, condition::READY);
    Outcome {
        status,
        notes,
        // a failing node is retried sooner than a healthy pool is refreshed
        requeue: Some(if settled {
            config.pool_resync
        } else {
            config.pool_resync.min(std::time::Duration::from_secs(30))
        }),
    }
}

/// VirtualMachines (namespace/name) whose disks or seed use this pool.
pub fn users(pool: &StoragePool, world: &World) -> Vec<String> {
    let ns = pool.namespace().unwrap_or_default();
    let name = pool.name_any();
    let mut out: Vec<String> = world
        .vms
        .iter()
        .filter(|vm| vm.namespace().as_deref() == Some(ns.as_str()))
        .filter(|vm| {
            vm.spec
                .disks
                .iter()
                .any(|d| disk_pool(d) == Some(name.as_str()))
                || vm.spec.cloud_init.as_ref().and_then(|c| c.pool.as_deref())
                    == Some(name.as_str())
        })
        .map(|vm| format!("{ns}/{}", vm.name_any()))
        .collect();
    out.sort();
    out
}

/// Deletion: refused while VMs use the pool; then, by policy, the pool is removed from its
/// nodes (its data stays) or left as it is.
pub async fn cleanup_core<H: Hypervisor>(
    pool: &StoragePool,
    world: &World,
    hv: &H,
) -> Result<Vec<Note>, Error> {
    let object = describe(pool);
    let used_by = users(pool, world);
    if !used_by.is_empty() {
        return Err(Error::DeletionBlocked {
            object,
            cause: format!(
                "VirtualMachine(s) {} use it; delete them or move their disks first",
                used_by.join(", ")
            ),
        });
    }
    let known: Vec<&KvmNode> = world.nodes.iter().map(|n| n.as_ref()).collect();
    let steps = plan::cleanup_plan(pool, &known);
    let executed = execute::execute(hv, &steps).await;
    let failed: Vec<String> = executed
        .iter()
        .filter_map(|(node, r)| r.as_ref().err().map(|e| format!("{node}: {e}")))
        .collect();
    if !failed.is_empty() {
        return Err(Error::Hypervisor {
            object,
            cause: format!(
                "cannot remove the pool from {}; it is retried (remove the finalizer {FINALIZER} by hand only if the node is gone for good)",
                failed.join("; ")
            ),
            reason: "PoolRemovalFailed",
        });
    }
    Ok(executed
        .keys()
        .map(|node| {
            Note::normal(
                "PoolRemoved",
                "Delete",
                format!(
                    "{object}: pool stopped and undefined on KvmNode {node}; its data was kept"
                ),
            )
        })
        .collect())
}

/// The controller's reconcile.
/// One reconcile, every log line in it carrying the object's kind, namespace, name and node.
pub async fn reconcile(pool: Arc<StoragePool>, ctx: Arc<Context>) -> Result<Action, Error> {
    use tracing::Instrument;
    let span = super::object_span(pool.as_ref());
    reconcile_in_span(pool, ctx).instrument(span).await
}

async fn reconcile_in_span(pool: Arc<StoragePool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = pool.namespace().unwrap_or_default();
    let api: Api<StoragePool> = Api::namespaced(ctx.client.clone(), &ns);
    let object = describe(pool.as_ref());
    let r = finalizer(&api, FINALIZER, pool, |event| async {
        match event {
            Finalizer::Apply(p) => {
                let outcome = reconcile_core(&p, &ctx.world(), ctx.hv.as_ref(), &ctx.config).await;
                apply_status(&api, p.as_ref(), MANAGER, &outcome.status).await?;
                ctx.publish(&p.object_ref(&()), &outcome.notes).await;
                Ok(outcome.action())
            }
            Finalizer::Cleanup(p) => match cleanup_core(&p, &ctx.world(), ctx.hv.as_ref()).await {
                Ok(notes) => {
                    ctx.publish(&p.object_ref(&()), &notes).await;
                    Ok(Action::await_change())
                }
                Err(e) => {
                    ctx.publish(
                        &p.object_ref(&()),
                        &[Note::warning(e.reason(), "Delete", e.to_string())],
                    )
                    .await;
                    Err(e)
                }
            },
        }
    })
    .await
    .map_err(|e| super::from_finalizer(object.clone(), e));
    if r.is_ok() {
        ctx.succeeded(&object);
    }
    r
}
