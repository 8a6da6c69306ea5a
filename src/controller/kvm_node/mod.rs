//! KvmNode: connect with the node's credentials, report capacity, allocation, load, versions
//! and the domains we do not manage; cordon on maintenance; refuse deletion while VMs are on it.

pub mod execute;
pub mod observe;
pub mod plan;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Resource, ResourceExt};

use super::{Config, Context, Error, FINALIZER, Note, Outcome, World, apply_status, describe};
use crate::api::condition::{self, set_condition};
use crate::api::kvm_node::{KvmNode, KvmNodeStatus};
use crate::api::virtual_machine::VirtualMachine;
use crate::hypervisor::ffi::DomainEvent;
use crate::hypervisor::{Hypervisor, NodeAccess, TlsMaterial};

/// Field manager of this controller's status writes.
pub const MANAGER: &str = "kvm-operator-kvmnode";

/// How long CPU use is sampled per resync.
const CPU_SAMPLE: Duration = Duration::from_millis(500);

/// The VirtualMachines bound to `node` (placed there, or adopting a domain there).
pub fn vms_on<'a>(world: &'a World, node: &str) -> Vec<&'a VirtualMachine> {
    world
        .vms
        .iter()
        .filter(|vm| {
            vm.status.as_ref().and_then(|s| s.node.as_deref()) == Some(node)
                || vm.spec.adopt.as_ref().is_some_and(|a| a.node_name == node)
        })
        .map(|vm| vm.as_ref())
        .collect()
}

/// The status of a node whose spec is invalid or whose credentials cannot be read.
pub fn not_ready(node: &KvmNode, reason: &'static str, message: String) -> Outcome<KvmNodeStatus> {
    let mut st = node.status.clone().unwrap_or_default();
    st.observed_generation = node.metadata.generation;
    let now = super::now();
    let was_ready = condition::is_true(&st.conditions, condition::READY);
    let prior_reason = condition::find(&st.conditions, condition::READY).map(|c| c.reason.clone());
    set_condition(
        &mut st.conditions,
        condition::condition(
            condition::READY,
            false,
            reason,
            message.clone(),
            node.metadata.generation,
            now,
        ),
    );
    let notes = if was_ready || prior_reason.as_deref() != Some(reason) {
        vec![Note::warning(reason, "Validate", message)]
    } else {
        vec![]
    };
    Outcome {
        status: st,
        notes,
        // an invalid spec waits for a change; a missing Secret is looked for again
        requeue: (reason != "InvalidSpec").then_some(Duration::from_secs(60)),
    }
}

/// What one node reconcile decided besides its status.
#[derive(Debug, Default)]
pub struct Side {
    /// Resync hints for the VM controller.
    pub hints: Vec<DomainEvent>,
    /// VMs (namespace, name) to evacuate: a Migration named by
    /// [`plan::evacuation_name`] is created for each.
    pub evacuate: Vec<(String, String)>,
    /// The batched per-domain statistics this resync read (for metrics).
    pub stats: Vec<crate::hypervisor::stats::DomainStats>,
}

/// The core: observe the (already registered) node, compute status and plan.
pub async fn reconcile_core<H: Hypervisor>(
    node: &KvmNode,
    world: &World,
    hv: &H,
    config: &Config,
) -> (Outcome<KvmNodeStatus>, Side) {
    let name = node.name_any();
    if let Err(e) = node.spec.validate() {
        return (
            not_ready(
                node,
                "InvalidSpec",
                format!("KvmNode {name}: {e}; fix the spec and apply it again"),
            ),
            Side::default(),
        );
    }
    // a pass within the resync period of a full reading (one a VM's change asked for, e.g.
    // after a burst of starts) reads the domains' states only. The timed pass comes a whole
    // period after the last pass ended, so it always reads every figure; the tenth spared is
    // a margin, not a choice
    let figures_fresh = config.node_resync.mul_f64(0.9);
    let observed = observe::observe(hv, &name, CPU_SAMPLE, figures_fresh).await;
    let vms = vms_on(world, &name);
    let (mut status, readiness) =
        status::status(node, &observed, &vms, super::now(), config.node_grace);
    let plan = plan::plan(node, &observed, &vms, &readiness, &world.migrations);
    let hints = plan
        .resync
        .iter()
        .map(|(ns, n)| execute::resync_hint(&name, ns, n))
        .collect();
    let mut notes = plan.notes;
    if node.spec.maintenance {
        let (_, failed) = plan::evacuation(node, &vms, &world.migrations);
        let (empty, reason, msg) = if vms.is_empty() {
            (
                true,
                "Evacuated",
                "no VM of ours is left on the node".to_string(),
            )
        } else if !failed.is_empty() {
            (
                false,
                "EvacuationFailed",
                format!(
                    "{} VM(s) left; evacuation failed for {}; move or delete them by hand",
                    vms.len(),
                    failed.join(", ")
                ),
            )
        } else {
            (
                false,
                "Evacuating",
                format!("{} VM(s) left, each moved by a Migration", vms.len()),
            )
        };
        let was = crate::api::condition::find(&status.conditions, status::EVACUATED)
            .map(|c| c.reason.clone());
        if was.as_deref() != Some(reason) {
            notes.push(if empty || reason == "Evacuating" {
                Note::normal(reason, "Evacuate", format!("KvmNode {name}: {msg}"))
            } else {
                Note::warning(reason, "Evacuate", format!("KvmNode {name}: {msg}"))
            });
        }
        set_condition(
            &mut status.conditions,
            condition::condition(
                status::EVACUATED,
                empty,
                reason,
                msg,
                node.metadata.generation,
                super::now(),
            ),
        );
    } else {
        status.conditions.retain(|c| c.type_ != status::EVACUATED);
    }
    let requeue = if plan.evacuate.is_empty() {
        config.node_resync
    } else {
        Duration::from_secs(5).min(config.node_resync)
    };
    // a node in its grace period is looked at again when the grace ends
    let requeue = status::grace_left(&status, &super::now(), config.node_grace)
        .map_or(requeue, |g| g.min(requeue));
    (
        Outcome {
            status,
            notes,
            requeue: Some(requeue),
        },
        Side {
            hints,
            evacuate: plan.evacuate,
            // figures that were not read now would show as counters reset in the metrics
            stats: if observed.fresh {
                observed.stats
            } else {
                Vec::new()
            },
        },
    )
}

/// Deletion: allowed once no VirtualMachine is bound to the node.
pub fn cleanup_core(node: &KvmNode, world: &World) -> Result<(), Box<(KvmNodeStatus, Error)>> {
    let name = node.name_any();
    let mut bound: Vec<String> = vms_on(world, &name)
        .iter()
        .map(|vm| format!("{}/{}", vm.namespace().unwrap_or_default(), vm.name_any()))
        .collect();
    if bound.is_empty() {
        return Ok(());
    }
    bound.sort();
    let cause = format!(
        "{} VirtualMachine(s) are on it ({}); delete them or move them with a Migration first",
        bound.len(),
        bound.join(", ")
    );
    let mut st = node.status.clone().unwrap_or_default();
    set_condition(
        &mut st.conditions,
        condition::condition(
            status::DELETING,
            false,
            "DeletionBlocked",
            cause.clone(),
            node.metadata.generation,
            super::now(),
        ),
    );
    Err(Box::new((
        st,
        Error::DeletionBlocked {
            object: format!("KvmNode {name}"),
            cause,
        },
    )))
}

/// Reads the node's SSH key and TLS Secrets into its access record.
pub async fn load_access(
    node: &KvmNode,
    secrets: &(impl super::SecretSource + ?Sized),
    config: &Config,
) -> Result<NodeAccess, (&'static str, String)> {
    let name = node.name_any();
    let read = |ns: Option<&String>, secret: &str| {
        let ns = ns.cloned().unwrap_or_else(|| config.namespace.clone());
        let secret = secret.to_string();
        let name = name.clone();
        async move {
            match secrets.secret(&ns, &secret).await {
                Ok(Some(s)) => Ok(s),
                Ok(None) => Err((
                    "SecretNotFound",
                    format!(
                        "KvmNode {name}: Secret {ns}/{secret} does not exist; create it (see spec.sshKeySecretRef / spec.tlsSecretRef)"
                    ),
                )),
                Err(e) => Err((
                    "SecretNotReadable",
                    format!(
                        "KvmNode {name}: cannot read Secret {ns}/{secret}: {e}; the operator needs get on secrets in {ns}"
                    ),
                )),
            }
        }
    };
    let field = |s: &Secret, key: &str| -> Option<Vec<u8>> {
        s.data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.clone())
    };
    let mut private_key = None;
    if let Some(r) = &node.spec.ssh_key_secret_ref {
        let s = read(r.namespace.as_ref(), &r.name).await?;
        private_key = Some(field(&s, &r.key).ok_or_else(|| {
            (
                "SecretKeyMissing",
                format!(
                    "KvmNode {}: Secret {} has no key {:?}; put the SSH private key there or set spec.sshKeySecretRef.key",
                    node.name_any(),
                    r.name,
                    r.key
                ),
            )
        })?);
    }
    let mut tls = None;
    if let Some(r) = &node.spec.tls_secret_ref {
        let s = read(r.namespace.as_ref(), &r.name).await?;
        let get = |k: &str| {
            field(&s, k).ok_or_else(|| {
                (
                    "SecretKeyMissing",
                    format!(
                        "KvmNode {}: Secret {} has no key {k:?} (qemu+tls needs ca.crt, tls.crt and tls.key)",
                        node.name_any(),
                        r.name
                    ),
                )
            })
        };
        tls = Some(TlsMaterial {
            ca_cert: get("ca.crt")?,
            client_cert: get("tls.crt")?,
            client_key: get("tls.key")?,
        });
    }
    Ok(NodeAccess {
        name: node.name_any(),
        spec: node.spec.clone(),
        private_key,
        state_dir: config.state_dir.clone(),
        tls,
        timeout: config.connect_timeout,
    })
}

/// The controller's reconcile: finalizer, credentials, core, status, Events.
/// One reconcile, every log line in it carrying the object's kind, namespace, name and node.
pub async fn reconcile(node: Arc<KvmNode>, ctx: Arc<Context>) -> Result<Action, Error> {
    use tracing::Instrument;
    let span = super::object_span(node.as_ref());
    reconcile_in_span(node, ctx).instrument(span).await
}

async fn reconcile_in_span(node: Arc<KvmNode>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<KvmNode> = Api::all(ctx.client.clone());
    let object = describe(node.as_ref());
    let r = finalizer(&api, FINALIZER, node, |event| async {
        match event {
            Finalizer::Apply(n) => apply(&n, &ctx, &api).await,
            Finalizer::Cleanup(n) => cleanup(&n, &ctx, &api).await,
        }
    })
    .await
    .map_err(|e| super::from_finalizer(object.clone(), e));
    if r.is_ok() {
        ctx.succeeded(&object);
    }
    r
}

async fn apply(node: &KvmNode, ctx: &Context, api: &Api<KvmNode>) -> Result<Action, Error> {
    let name = node.name_any();
    let (outcome, side) = match node.spec.validate() {
        Err(_) => reconcile_core(node, &ctx.world(), ctx.hv.as_ref(), &ctx.config).await,
        Ok(()) => match load_access(node, &ctx.client, &ctx.config).await {
            Err((reason, msg)) => (not_ready(node, reason, msg), Side::default()),
            Ok(access) => {
                ctx.hv.upsert(access);
                ctx.follow(&name);
                reconcile_core(node, &ctx.world(), ctx.hv.as_ref(), &ctx.config).await
            }
        },
    };
    for h in side.hints {
        let _ = ctx.events.send(h);
    }
    if !side.stats.is_empty() {
        ctx.metrics.node_stats(&name, side.stats);
    }
    for (ns, vm) in side.evacuate {
        create_evacuation(ctx, &name, &ns, &vm).await?;
    }
    apply_status(api, node, MANAGER, &outcome.status).await?;
    ctx.publish(&node.object_ref(&()), &outcome.notes).await;
    Ok(outcome.action())
}

/// Creates the Migration that moves `ns/vm` off `node` (an existing one is left as it is).
async fn create_evacuation(ctx: &Context, node: &str, ns: &str, vm: &str) -> Result<(), Error> {
    use crate::api::migration::{Migration, MigrationSpec};
    let api: Api<Migration> = Api::namespaced(ctx.client.clone(), ns);
    let spec: MigrationSpec =
        serde_json::from_value(serde_json::json!({ "vmName": vm })).map_err(|e| {
            Error::Finalizer {
                object: format!("Migration for {ns}/{vm}"),
                cause: e.to_string(),
            }
        })?;
    let mut m = Migration::new(&plan::evacuation_name(node, vm), spec);
    m.metadata.namespace = Some(ns.to_string());
    m.metadata.labels = Some(
        [(
            super::migration::EVACUATION_LABEL.to_string(),
            node.to_string(),
        )]
        .into(),
    );
    match api.create(&kube::api::PostParams::default(), &m).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(Error::kube(format!("Migration {ns}/{}", m.name_any()), e)),
    }
}

async fn cleanup(node: &KvmNode, ctx: &Context, api: &Api<KvmNode>) -> Result<Action, Error> {
    match cleanup_core(node, &ctx.world()) {
        Ok(()) => {
            ctx.unfollow(&node.name_any());
            ctx.hv.remove(&node.name_any());
            Ok(Action::await_change())
        }
        Err(blocked) => {
            let (status, err) = *blocked;
            apply_status(api, node, MANAGER, &status).await?;
            ctx.publish(
                &node.object_ref(&()),
                &[Note::warning("DeletionBlocked", "Delete", err.to_string())],
            )
            .await;
            Err(err)
        }
    }
}
