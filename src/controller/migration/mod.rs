//! Migration: move one VM live (or cold) to a named node or the scheduler's pick. Phases
//! Pending → Scheduling → Running → Succeeded | Failed | Cancelled through one transition
//! function. While it is Scheduling or Running, the VirtualMachine controller does not act on
//! the VM; afterwards exactly one node has the domain (persistent on the target, undefined on
//! the source), and the VM controller rebinds the VM to it.

pub mod execute;
pub mod observe;
pub mod plan;
pub mod status;

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Resource, ResourceExt};

use super::{Config, Context, Error, FINALIZER, Note, Outcome, World, apply_status, describe};
use crate::api::migration::{Migration, MigrationMode, MigrationPhase, MigrationStatus};
use crate::api::virtual_machine::VirtualMachine;
use crate::hypervisor::migration::MigrateOptions;
use crate::hypervisor::{DomainState, Hypervisor};
use crate::placement::{self, Decision};

use execute::Leftover;
use plan::{Event, RunStep, Task};

/// Field manager of this controller's status writes.
pub const MANAGER: &str = "kvm-operator-migration";

/// Label on the Migrations that evacuate a node: the node's name.
pub const EVACUATION_LABEL: &str = "kvm-operator.io/evacuating-node";

/// True while `m` holds its VM (the VM controller stands aside).
pub fn holds_vm(m: &Migration) -> bool {
    matches!(
        m.status.as_ref().and_then(|s| s.phase),
        Some(MigrationPhase::Scheduling | MigrationPhase::Running)
    )
}

/// The Migrations of `vm`.
pub fn of_vm<'a>(world: &'a World, vm: &VirtualMachine) -> impl Iterator<Item = &'a Migration> {
    let ns = vm.namespace();
    let name = vm.name_any();
    world
        .migrations
        .iter()
        .filter(move |m| m.namespace() == ns && m.spec.vm_name == name)
        .map(|m| m.as_ref())
}

fn vm_of<'a>(world: &'a World, m: &Migration) -> Option<&'a VirtualMachine> {
    world
        .vms
        .iter()
        .find(|v| v.namespace() == m.namespace() && v.name_any() == m.spec.vm_name)
        .map(|v| v.as_ref())
}

fn elapsed_since(t: Option<&crate::api::condition::Time>) -> Duration {
    t.map(|t| k8s_openapi::jiff::Timestamp::now().duration_since(t.0))
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or_default()
}

/// The core of one reconcile.
pub async fn reconcile_core<H: Hypervisor>(
    m: &Migration,
    world: &World,
    hv: &Arc<H>,
    jobs: &execute::Jobs,
    config: &Config,
) -> Outcome<MigrationStatus> {
    let uid = m.uid().unwrap_or_default();
    let prior = m.status.clone().unwrap_or_default();
    let mut s = status::Builder::new(m);
    let phase = prior.phase;
    if phase.is_some_and(MigrationPhase::is_terminal) {
        return s.wait(None);
    }
    if let Err(e) = m.spec.validate() {
        return s.go(Event::Fail, "InvalidSpec", format!("{}: {e}", describe(m)));
    }
    // Queued and Scheduling are decisions on what is known: one reconcile takes the Migration
    // through them up to the target's choice, which is written (Running) before the job starts
    if phase.is_none() {
        s = match s.advance(Event::Queue, "Queued", "waiting to be scheduled".into()) {
            ControlFlow::Continue(s) => s,
            ControlFlow::Break(out) => return out,
        };
    }
    if s.status.phase == Some(MigrationPhase::Pending) {
        s = match pending(m, world, s) {
            ControlFlow::Continue(s) => s,
            ControlFlow::Break(out) => return out,
        };
    }
    match s.status.phase {
        Some(MigrationPhase::Scheduling) => schedule(m, world, hv.as_ref(), config, s).await,
        Some(MigrationPhase::Running) => run(m, world, hv, jobs, &uid, s).await,
        _ => s.wait(None),
    }
}

/// Pending: the VM is placed and no older Migration of it is still open, so a target can be
/// chosen.
fn pending(
    m: &Migration,
    world: &World,
    mut s: status::Builder,
) -> ControlFlow<Outcome<MigrationStatus>, status::Builder> {
    let Some(vm) = vm_of(world, m) else {
        return ControlFlow::Break(s.go(
            Event::Fail,
            "VirtualMachineNotFound",
            format!(
                "spec.vmName: there is no VirtualMachine {}/{}",
                m.namespace().unwrap_or_default(),
                m.spec.vm_name
            ),
        ));
    };
    let Some(source) = vm.status.as_ref().and_then(|st| st.node.clone()) else {
        return ControlFlow::Break(
            s.hold("NotPlaced", "the VM is not placed on a node yet".into()),
        );
    };
    let mine = m.metadata.creation_timestamp.clone();
    if let Some(older) = of_vm(world, vm).find(|o| {
        o.uid() != m.uid()
            && !o
                .status
                .as_ref()
                .and_then(|st| st.phase)
                .is_some_and(MigrationPhase::is_terminal)
            && o.metadata.creation_timestamp < mine
    }) {
        return ControlFlow::Break(s.hold(
            "Queued",
            format!("waits for Migration {} of the same VM", older.name_any()),
        ));
    }
    s.status.source_node = Some(source);
    s.advance(Event::Schedule, "Scheduling", "choosing the target".into())
}

async fn schedule<H: Hypervisor>(
    m: &Migration,
    world: &World,
    hv: &H,
    config: &Config,
    mut s: status::Builder,
) -> Outcome<MigrationStatus> {
    let Some(vm) = vm_of(world, m) else {
        return s.go(
            Event::Fail,
            "VirtualMachineNotFound",
            "the VirtualMachine was deleted".into(),
        );
    };
    let Some(source) = s.status.source_node.clone() else {
        return s.go(
            Event::Fail,
            "NotPlaced",
            "no source node was recorded".into(),
        );
    };
    let Some(domain) = vm.status.as_ref().and_then(|st| st.domain_name.clone()) else {
        return s.hold("NotProvisioned", "the VM has no domain yet".into());
    };
    let d = domain.clone();
    let state = match hv.call(&source, "domain state", move |c| c.state(&d)).await {
        Ok(st) => st,
        Err(e) => {
            return s.hold(
                e.reason(),
                format!("cannot read the domain on {source}: {e}"),
            );
        }
    };
    let mode = match plan::effective_mode(m.spec.mode, state) {
        Ok(mode) => mode,
        Err(why) => return s.go(Event::Fail, "ModeNotPossible", why),
    };
    let target = match &m.spec.target_node {
        Some(t) if *t == source => {
            return s.go(
                Event::Fail,
                "AlreadyThere",
                format!("the VM already runs on {t}"),
            );
        }
        Some(t) => {
            let cands = super::virtual_machine::candidates(world, vm);
            match cands.iter().find(|c| c.name == *t) {
                None => {
                    return s.go(
                        Event::Fail,
                        "NodeNotFound",
                        format!("spec.targetNode: there is no KvmNode {t}"),
                    );
                }
                Some(c) => {
                    match placement::filter(&super::virtual_machine::request_for_move(vm), c) {
                        Some(why) => return s.hold("TargetNotReady", format!("target {t}: {why}")),
                        None => t.clone(),
                    }
                }
            }
        }
        None => {
            let cands: Vec<_> = super::virtual_machine::candidates(world, vm)
                .into_iter()
                .filter(|c| c.name != source)
                .collect();
            match placement::place(
                &super::virtual_machine::request_for_move(vm),
                &cands,
                &world.weights,
            ) {
                Decision::Placed { node, message, .. } => {
                    s.note(Note::normal("TargetChosen", "Schedule", message));
                    node
                }
                Decision::Unschedulable { message, .. } => return s.hold("Unschedulable", message),
            }
        }
    };
    // concurrency limits
    let running: Vec<&Migration> = world
        .migrations
        .iter()
        .filter(|o| {
            o.uid() != m.uid()
                && o.status.as_ref().and_then(|st| st.phase) == Some(MigrationPhase::Running)
        })
        .map(|o| o.as_ref())
        .collect();
    let touching = |n: &str| {
        running
            .iter()
            .filter(|o| {
                o.status.as_ref().is_some_and(|st| {
                    st.source_node.as_deref() == Some(n) || st.target_node.as_deref() == Some(n)
                })
            })
            .count()
    };
    if running.len() >= config.max_migrations {
        return s.hold(
            "WaitingForSlot",
            format!(
                "{} migrations run in the cluster (limit {})",
                running.len(),
                config.max_migrations
            ),
        );
    }
    for n in [&source, &target] {
        if touching(n) >= config.max_migrations_per_node {
            return s.hold(
                "WaitingForSlot",
                format!(
                    "{} migrations run on {n} (limit {})",
                    touching(n),
                    config.max_migrations_per_node
                ),
            );
        }
    }
    s.status.target_node = Some(target.clone());
    s.status.effective_mode = Some(mode);
    s.status.start_time = Some(super::now());
    s.go(
        Event::Start,
        "Running",
        format!("{mode:?} migration of {domain} from {source} to {target}"),
    )
}

async fn run<H: Hypervisor>(
    m: &Migration,
    world: &World,
    hv: &Arc<H>,
    jobs: &execute::Jobs,
    uid: &str,
    mut s: status::Builder,
) -> Outcome<MigrationStatus> {
    let (Some(source), Some(target)) = (s.status.source_node.clone(), s.status.target_node.clone())
    else {
        return s.go(
            Event::Fail,
            "Invalid",
            "source or target missing from status".into(),
        );
    };
    let Some(vm) = vm_of(world, m) else {
        return s.go(
            Event::Fail,
            "VirtualMachineNotFound",
            "the VirtualMachine was deleted".into(),
        );
    };
    let vm_uid = vm.uid().unwrap_or_default();
    let Some(domain) = vm.status.as_ref().and_then(|st| st.domain_name.clone()) else {
        return s.go(Event::Fail, "NotProvisioned", "the VM has no domain".into());
    };
    let observed = match observe::observe(hv.as_ref(), &source, Some(&target), &domain).await {
        Ok(o) => o,
        Err(e) => return s.hold(e.reason(), format!("cannot read the nodes: {e}")),
    };
    let task = jobs.state(uid);
    let elapsed = elapsed_since(s.status.start_time.as_ref());
    let step = plan::running_step(m, &vm_uid, &observed, &task, elapsed);
    if let Some(j) = observed.source.as_ref().and_then(|d| d.job) {
        s.progress(&j);
    }
    match step {
        RunStep::StartJob => {
            let live = s.status.effective_mode != Some(MigrationMode::Cold);
            let opts = MigrateOptions {
                live,
                bandwidth_mib: m.spec.bandwidth_mib_per_second,
                auto_converge: m.spec.auto_converge,
                post_copy: m.spec.post_copy,
                max_downtime_ms: m.spec.max_downtime_ms,
                copy_storage: m.spec.copy_storage,
            };
            // a leftover definition on the target (an earlier attempt) would make libvirt refuse.
            // A complete (persistent) paused copy goes only when this look saw it while the
            // source ran without a job; one that appeared since (a switch-over this look did
            // not see) is kept, and the next look decides
            let seen_complete = observed
                .target
                .as_ref()
                .is_some_and(|t| t.state == DomainState::Paused && t.persistent);
            let which = if seen_complete {
                Leftover::Any
            } else {
                Leftover::SpareComplete
            };
            if let Err(e) =
                execute::remove_leftover(hv.as_ref(), &target, &domain, &vm_uid, which).await
            {
                return held_by_removal(
                    s,
                    &e,
                    format!("the copy an earlier attempt left on {target}"),
                );
            }
            jobs.start(uid, hv, &source, &target, &domain, opts);
            s.note(Note::normal(
                "MigrationStarted",
                "Migrate",
                format!("migrating {domain} from {source} to {target}"),
            ));
            s.hold("Running", "the migration job runs".into())
                .requeue_after(Duration::from_secs(2))
        }
        RunStep::Watch => s
            .hold("Running", "the migration job runs".into())
            .requeue_after(Duration::from_secs(2)),
        RunStep::AbortTimeout => {
            let _ = execute::abort(hv.as_ref(), &source, &domain).await;
            s.status.message = Some(format!(
                "aborting: not completed within spec.completionTimeoutSeconds ({}s)",
                m.spec.completion_timeout_seconds
            ));
            s.hold("TimedOut", "aborting the job".into())
                .requeue_after(Duration::from_secs(2))
        }
        RunStep::Complete => {
            // the source's copy goes first: the VM is never bound where another copy could wake
            if let Err(e) =
                execute::remove_leftover(hv.as_ref(), &source, &domain, &vm_uid, Leftover::Any)
                    .await
            {
                return held_by_removal(
                    s,
                    &e,
                    format!("{domain} is on {target}; its copy on {source}"),
                );
            }
            if let Some((downtime, took)) = execute::completed(hv.as_ref(), &target, &domain).await
            {
                s.status.downtime_ms = downtime;
                if took > 0 {
                    s.done_progress();
                }
            }
            s.status.end_time = Some(super::now());
            let secs = elapsed.as_secs_f64();
            let msg = format!(
                "{domain} now runs on {target} only (from {source}, {secs:.1}s{})",
                s.status
                    .downtime_ms
                    .map(|d| format!(", downtime {d} ms"))
                    .unwrap_or_default()
            );
            s.note(Note::normal("Migrated", "Migrate", msg.clone()));
            s.go(Event::Complete, "Succeeded", msg)
        }
        RunStep::RollBack(why) => {
            if let Err(e) =
                execute::remove_leftover(hv.as_ref(), &target, &domain, &vm_uid, Leftover::Any)
                    .await
            {
                return held_by_removal(
                    s,
                    &e,
                    format!("{domain} stays on {source}; the copy on {target}"),
                );
            }
            s.status.end_time = Some(super::now());
            let why = s
                .status
                .message
                .clone()
                .filter(|m| m.starts_with("aborting"))
                .map(|m| m.replace("aborting: ", ""))
                .unwrap_or(why);
            s.go(
                Event::Fail,
                "MigrationFailed",
                format!("{domain} stays on {source}: {why}"),
            )
        }
        RunStep::Stuck(why) => s
            .hold("NeedsAttention", why)
            .requeue_after(Duration::from_secs(60)),
    }
}

/// The Migration waits (and looks again soon) while a copy that must go cannot be removed yet.
fn held_by_removal(
    s: status::Builder,
    e: &crate::hypervisor::HvError,
    copy: String,
) -> Outcome<MigrationStatus> {
    s.hold(e.reason(), format!("{copy} cannot be removed yet: {e}"))
        .requeue_after(Duration::from_secs(5))
}

/// Deleting a Migration that runs aborts its job and waits for the domain to settle on the
/// source; a finished one needs nothing.
pub async fn cleanup_core<H: Hypervisor>(
    m: &Migration,
    world: &World,
    hv: &Arc<H>,
    jobs: &execute::Jobs,
) -> Result<Vec<Note>, Error> {
    if m.status.as_ref().and_then(|s| s.phase) != Some(MigrationPhase::Running) {
        return Ok(vec![]);
    }
    let st = m.status.clone().unwrap_or_default();
    let (Some(source), Some(vm)) = (st.source_node.clone(), vm_of(world, m)) else {
        return Ok(vec![]);
    };
    let Some(domain) = vm.status.as_ref().and_then(|s| s.domain_name.clone()) else {
        return Ok(vec![]);
    };
    let uid = m.uid().unwrap_or_default();
    let object = describe(m);
    let hv_err = |e: crate::hypervisor::HvError| Error::Hypervisor {
        object: object.clone(),
        cause: e.to_string(),
        reason: e.reason(),
    };
    let d = domain.clone();
    let job_active = hv
        .call(&source, "job", move |c| match c.job_progress(&d) {
            Ok(j) => Ok(j.active),
            Err(crate::hypervisor::HvError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        })
        .await
        .map_err(hv_err)?;
    let task = jobs.state(&uid);
    if job_active || task == Task::Running {
        execute::abort(hv.as_ref(), &source, &domain)
            .await
            .map_err(hv_err)?;
        return Err(Error::DeletionBlocked {
            object,
            cause: "aborting the running migration job; the finalizer goes once it has stopped"
                .into(),
        });
    }
    if let Some(target) = &st.target_node {
        let vm_uid = vm.uid().unwrap_or_default();
        let observed = observe::observe(hv.as_ref(), &source, Some(target), &domain)
            .await
            .map_err(hv_err)?;
        let on_source = observed
            .source
            .as_ref()
            .is_some_and(|d| d.owner_uid.as_deref() == Some(vm_uid.as_str()));
        if !on_source {
            // the switch-over happened: the target's copy is the VM; it is never removed here
            return Ok(vec![Note::normal(
                "Cancelled",
                "Delete",
                format!("{object}: deleted after the switch-over; {domain} is on {target}"),
            )]);
        }
        execute::remove_leftover(
            hv.as_ref(),
            target,
            &domain,
            &vm_uid,
            Leftover::SpareComplete,
        )
        .await
        .map_err(hv_err)?;
    }
    Ok(vec![Note::normal(
        "Cancelled",
        "Delete",
        format!("{object}: the migration was aborted; {domain} stays on {source}"),
    )])
}

/// The controller's reconcile.
/// One reconcile, every log line in it carrying the object's kind, namespace, name and node.
pub async fn reconcile(m: Arc<Migration>, ctx: Arc<Context>) -> Result<Action, Error> {
    use tracing::Instrument;
    let span = super::object_span(m.as_ref());
    reconcile_in_span(m, ctx).instrument(span).await
}

async fn reconcile_in_span(m: Arc<Migration>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = m.namespace().unwrap_or_default();
    let api: Api<Migration> = Api::namespaced(ctx.client.clone(), &ns);
    let object = describe(m.as_ref());
    let r = finalizer(&api, FINALIZER, m, |event| async {
        match event {
            Finalizer::Apply(m) => {
                let outcome =
                    reconcile_core(&m, &ctx.world(), &ctx.hv, &ctx.jobs, &ctx.config).await;
                apply_status(&api, m.as_ref(), MANAGER, &outcome.status).await?;
                ctx.publish(&m.object_ref(&()), &outcome.notes).await;
                Ok(outcome.action())
            }
            Finalizer::Cleanup(m) => match cleanup_core(&m, &ctx.world(), &ctx.hv, &ctx.jobs).await
            {
                Ok(notes) => {
                    ctx.publish(&m.object_ref(&()), &notes).await;
                    Ok(Action::await_change())
                }
                Err(e) => Err(e),
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
