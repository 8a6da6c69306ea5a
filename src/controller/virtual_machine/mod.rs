//! VirtualMachine: place it, provision its volumes and seed, define the domain with our stamp,
//! drive its run strategy, correct drift, hot-plug disks and NICs, adopt existing domains, and
//! clean up by policy. A VM is bound to one node from placement on: it is only ever started
//! there, so it never runs on two nodes.

pub mod execute;
pub mod observe;
pub mod plan;
pub mod status;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};

use super::kvm_node::status::{SCHEDULABLE, vm_request};
use super::{Config, Context, Error, FINALIZER, Note, Outcome, World, apply_status, describe};
use crate::api::condition::{self, set_condition};
use crate::api::storage_pool::PoolState;
use crate::api::virtual_machine::{
    FilteredNode, PlacementStatus, VirtualMachine, VirtualMachineStatus, disk_pool, domain_name,
};
use crate::hypervisor::ffi::DomainEvent;
use crate::hypervisor::{HvError, Hypervisor};
use crate::placement::{self, Candidate, Decision, Request};

/// Field manager of this controller's status writes.
pub const MANAGER: &str = "kvm-operator-virtualmachine";

/// Provisioned=False reasons that count as a failure of the node (placement penalises it).
const FAILURE_REASONS: &[&str] = &[
    "LibvirtError",
    "Timeout",
    "HostUnreachable",
    "SshFailed",
    "LocalError",
];

/// At most this many observe → plan → execute rounds per reconcile (volumes, then the domain,
/// then power).
const MAX_ROUNDS: usize = 4;

fn with_condition(
    vm: &VirtualMachine,
    type_: &str,
    ok: bool,
    reason: &'static str,
    message: String,
) -> VirtualMachineStatus {
    let mut st = vm.status.clone().unwrap_or_default();
    st.observed_generation = vm.metadata.generation;
    set_condition(
        &mut st.conditions,
        condition::condition(
            type_,
            ok,
            reason,
            message,
            vm.metadata.generation,
            super::now(),
        ),
    );
    st
}

/// An outcome that only reports a problem: Ready=False with reason and message; an Event when
/// the reason or message is new.
pub fn problem(
    vm: &VirtualMachine,
    reason: &'static str,
    message: String,
    retry: Option<Duration>,
) -> Outcome<VirtualMachineStatus> {
    let same = vm
        .status
        .as_ref()
        .and_then(|s| condition::find(&s.conditions, condition::READY))
        .is_some_and(|c| c.reason == reason && c.message == message);
    Outcome {
        status: with_condition(vm, condition::READY, false, reason, message.clone()),
        notes: if same {
            vec![]
        } else {
            vec![Note::warning(reason, "Reconcile", message)]
        },
        requeue: retry,
    }
}

/// Nodes as placement sees them, for `vm` (its own binding and in-flight placement excluded).
/// One pass over the VMs, pools and in-flight placements, then one per node: O(nodes + VMs).
pub fn candidates(world: &World, vm: &VirtualMachine) -> Vec<Candidate> {
    candidates_for(
        world,
        vm.metadata.uid.as_deref(),
        &vm.namespace().unwrap_or_default(),
        &request(vm),
    )
}

/// The nodes as a VM with request `req` in namespace `ns` sees them; the VM whose UID is `me`
/// (if any) is left out of the allocations.
pub fn candidates_for(world: &World, me: Option<&str>, ns: &str, req: &Request) -> Vec<Candidate> {
    use std::collections::HashMap;
    let no_stats = Default::default();
    // one pass over the VMs: what each node has allocated and how many peers it holds
    let mut bound: HashMap<&str, ((u32, u64), placement::Peers)> =
        HashMap::with_capacity(world.nodes.len());
    for v in &world.vms {
        if v.metadata.uid.as_deref() == me {
            continue;
        }
        let node = v
            .status
            .as_ref()
            .and_then(|s| s.node.as_deref())
            .or_else(|| v.spec.adopt.as_ref().map(|a| a.node_name.as_str()));
        if let Some(n) = node {
            let ((c, m), peers) = bound.entry(n).or_default();
            let (vc, vm_) = vm_request(v, &no_stats);
            *c = c.saturating_add(vc);
            *m = m.saturating_add(vm_);
            peers.add(req, v.labels());
        }
    }
    let mut pools: HashMap<&str, BTreeSet<String>> = HashMap::new();
    for p in world
        .pools
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(ns))
    {
        for x in p.status.iter().flat_map(|s| s.nodes.iter()) {
            if x.state == PoolState::Running {
                pools
                    .entry(x.node.as_str())
                    .or_default()
                    .insert(p.name_any());
            }
        }
    }
    let mut inflight: HashMap<&str, (u32, u64)> = HashMap::new();
    for (node, c, m) in &world.inflight {
        let e = inflight.entry(node.as_str()).or_default();
        *e = (e.0.saturating_add(*c), e.1.saturating_add(*m));
    }
    world
        .nodes
        .iter()
        .map(|n| {
            let name = n.name_any();
            let st = n.status.as_ref();
            let (mut allocated, peers) = bound.get(name.as_str()).copied().unwrap_or_default();
            if let Some((c, m)) = inflight.get(name.as_str()) {
                allocated = (
                    allocated.0.saturating_add(*c),
                    allocated.1.saturating_add(*m),
                );
            }
            let load_per_cpu = match (
                st.and_then(|s| s.load.as_ref()),
                st.and_then(|s| s.capacity.as_ref()),
            ) {
                (Some(l), Some(c)) if c.cpus > 0 => {
                    l.load1.parse::<f64>().ok().map(|x| x / f64::from(c.cpus))
                }
                _ => None,
            };
            let conditions = st.map(|s| s.conditions.as_slice()).unwrap_or(&[]);
            Candidate {
                // node labels matter only to a nodeSelector
                labels: if req.node_selector.is_some() {
                    n.labels().clone()
                } else {
                    Default::default()
                },
                ready: condition::is_true(conditions, condition::READY),
                maintenance: n.spec.maintenance
                    || condition::find(conditions, SCHEDULABLE)
                        .is_some_and(|c| c.reason == "Maintenance"),
                allocatable: st
                    .and_then(|s| s.allocatable.as_ref())
                    .map(|a| (a.cpus, a.memory.bytes())),
                allocated,
                load_per_cpu,
                cpu_usage_percent: st
                    .and_then(|s| s.load.as_ref())
                    .map(|l| l.cpu_usage_percent),
                pools: pools.get(name.as_str()).cloned().unwrap_or_default(),
                vm_labels: vec![],
                peers: Some(peers),
                recent_failures: world.recent_failures.get(&name).copied().unwrap_or(0),
                name,
            }
        })
        .collect()
}

/// The placement request of a VM.
pub fn request(vm: &VirtualMachine) -> Request {
    let mut pools: BTreeSet<String> = vm
        .spec
        .disks
        .iter()
        .filter_map(disk_pool)
        .map(str::to_string)
        .collect();
    if let Some(p) = vm.spec.cloud_init.as_ref().and_then(|c| c.pool.clone()) {
        pools.insert(p);
    }
    let terms = |ts: &[crate::api::virtual_machine::VmAffinityTerm]| -> Vec<placement::Term> {
        ts.iter()
            .map(|t| placement::Term {
                match_labels: t.match_labels.clone(),
                required: t.mode == crate::api::virtual_machine::AffinityMode::Required,
                weight: t.weight,
            })
            .collect()
    };
    let p = vm.spec.placement.clone().unwrap_or_default();
    Request {
        affinity: terms(&p.affinity),
        anti_affinity: terms(&p.anti_affinity),
        spread: p
            .spread_by_label
            .as_ref()
            .and_then(|k| vm.labels().get(k).map(|v| (k.clone(), v.clone()))),
        cpus: vm.spec.vcpus.unwrap_or(0),
        memory: vm.spec.memory.as_ref().map_or(0, |m| m.bytes()),
        pools,
        node_name: vm.spec.placement.as_ref().and_then(|p| p.node_name.clone()),
        node_selector: vm
            .spec
            .placement
            .as_ref()
            .and_then(|p| p.node_selector.clone()),
    }
}

/// The request for moving a placed VM: its own pin (nodeName) does not apply, its size comes
/// from the domain when the spec leaves it to an adopted domain.
pub fn request_for_move(vm: &VirtualMachine) -> Request {
    let mut r = request(vm);
    r.node_name = None;
    let seen = vm.status.as_ref().and_then(|s| s.observed.as_ref());
    if vm.spec.vcpus.is_none() {
        r.cpus = seen.map_or(0, |o| o.vcpus);
    }
    if vm.spec.memory.is_none() {
        r.memory = seen
            .and_then(|o| o.memory.as_ref())
            .map_or(0, |m| m.bytes());
    }
    r
}

/// The domains stamped with `vm`'s UID on every node but `except`, as `(node, domain)`, and the
/// nodes that could not be read. Each node's stamp index is listed at most once per burst and
/// kept current by the operator's own defines and by libvirt's definition events.
async fn stamped_on_nodes<H: Hypervisor>(
    vm: &VirtualMachine,
    world: &World,
    hv: &H,
    except: Option<&str>,
) -> (Vec<(String, String)>, Vec<String>) {
    let uid = vm.uid().unwrap_or_default();
    let scans = world
        .nodes
        .iter()
        .map(|n| n.name_any())
        .filter(|n| Some(n.as_str()) != except)
        .map(|node| {
            let uid = uid.as_str();
            async move {
                let r = hv.stamped(&node, uid).await;
                (node, r)
            }
        });
    let (mut found, mut unread) = (Vec::new(), Vec::new());
    for (node, r) in futures::future::join_all(scans).await {
        match r {
            Ok(domains) => found.extend(domains.into_iter().map(|d| (node.clone(), d))),
            Err(_) => unread.push(node),
        }
    }
    (found, unread)
}

/// `found` as a list for a message: "domain on node, ...".
fn found_list(found: &[(String, String)]) -> String {
    let list: Vec<String> = found.iter().map(|(n, d)| format!("{d} on {n}")).collect();
    list.join(", ")
}

/// `vm`'s status bound to the stamped `domain` found on `node` (Scheduled=True, `Recovered`).
fn bound_to_found(
    vm: &VirtualMachine,
    node: String,
    domain: String,
    why: String,
    placement: String,
) -> VirtualMachineStatus {
    let mut st = with_condition(vm, condition::SCHEDULED, true, "Recovered", why);
    st.node = Some(node.clone());
    st.domain_name = Some(domain);
    st.placement = Some(PlacementStatus {
        node,
        score: None,
        runner_up: None,
        message: placement,
        filtered: vec![],
        time: Some(super::now()),
    });
    st
}

/// A VM whose domain `gone` is no longer on its node under that name but was defined before:
/// when a domain stamped with its UID is on another node (moved outside this operator, or by a
/// Migration deleted after its switch-over), or on its own node under another name (renamed
/// while shut off, `virsh domrename`), the VM is bound to it rather than defined again, which
/// would give the same volumes a second domain and could run the guest twice. `None`: no node
/// has it, and it may be defined again.
async fn found_elsewhere<H: Hypervisor>(
    vm: &VirtualMachine,
    node: &str,
    gone: &str,
    world: &World,
    hv: &H,
) -> Option<Outcome<VirtualMachineStatus>> {
    let (mut found, mut unread) = stamped_on_nodes(vm, world, hv, Some(node)).await;
    // its own node is listed afresh: a rename made there within the stamp index's freshness
    // would still show the old name, which was just seen missing
    let uid = vm.uid().unwrap_or_default();
    let own = hv
        .call(node, "list domains", move |c| {
            c.refresh_index()?;
            Ok(c.stamped_from_index(&uid, Duration::MAX)
                .unwrap_or_default())
        })
        .await;
    match own {
        Ok(names) => found.extend(
            names
                .into_iter()
                .filter(|d| d != gone)
                .map(|d| (node.to_string(), d)),
        ),
        Err(_) => unread.push(node.to_string()),
    }
    if found.len() > 1 {
        return Some(problem(
            vm,
            "DuplicateDomains",
            format!(
                "its domain {gone} is gone from KvmNode {node} and several domains stamped for this VM exist ({}); nothing is defined or started until only one remains: remove the extra ones by hand",
                found_list(&found)
            ),
            Some(Duration::from_secs(60)),
        ));
    }
    let Some((to, domain)) = found.pop() else {
        if unread.is_empty() {
            return None;
        }
        return Some(problem(
            vm,
            "DomainWhereaboutsUnknown",
            format!(
                "its domain is gone from KvmNode {node}, and KvmNode {} cannot be read to rule out that it runs there; it is not defined again until every node answers",
                unread.join(", ")
            ),
            Some(Duration::from_secs(30)),
        ));
    };
    let msg = if to == node {
        format!(
            "its domain {gone} on KvmNode {node} is now named {domain} (renamed outside this operator); bound to it instead of defining a second domain on the same volumes"
        )
    } else {
        format!(
            "its domain {domain} is on KvmNode {to}, no longer on {node} (moved outside this operator, or by a Migration deleted after its switch-over); bound to it instead of defining it again"
        )
    };
    Some(Outcome {
        status: bound_to_found(vm, to, domain, msg.clone(), msg.clone()),
        notes: vec![Note::normal("Recovered", "Reconcile", msg)],
        requeue: Some(Duration::from_secs(1)),
    })
}

/// First phase of a new VM: find a domain already stamped with its UID (a placement whose
/// status write was lost), else choose a node. Only status changes; nothing is created.
async fn schedule<H: Hypervisor>(
    vm: &VirtualMachine,
    world: &World,
    hv: &H,
) -> Outcome<VirtualMachineStatus> {
    let ns = vm.namespace().unwrap_or_default();
    let name = vm.name_any();
    let (mut found, _) = stamped_on_nodes(vm, world, hv, None).await;
    if found.len() > 1 {
        return problem(
            vm,
            "DuplicateDomains",
            format!(
                "domains stamped for this VM exist on several nodes ({}); nothing is started until only one remains: remove the extra ones by hand",
                found_list(&found)
            ),
            Some(Duration::from_secs(60)),
        );
    }
    let now = super::now();
    if let Some((node, domain)) = found.pop() {
        let why = format!("found its domain {domain} on KvmNode {node}; bound to it");
        return Outcome {
            status: bound_to_found(
                vm,
                node,
                domain,
                why,
                "recovered: its domain already existed there".into(),
            ),
            notes: vec![],
            requeue: Some(Duration::from_secs(1)),
        };
    }
    match placement::place(&request(vm), &candidates(world, vm), &world.weights) {
        Decision::Placed {
            node,
            score,
            runner_up,
            message,
            filtered,
        } => {
            let mut st =
                with_condition(vm, condition::SCHEDULED, true, "Scheduled", message.clone());
            st.node = Some(node.clone());
            st.domain_name = Some(domain_name(&ns, &name));
            st.power_state = Some(crate::api::virtual_machine::PowerState::Pending);
            st.placement = Some(PlacementStatus {
                node: node.clone(),
                score: Some(score),
                runner_up: runner_up.map(|r| r.0),
                message: message.clone(),
                filtered: filtered
                    .into_iter()
                    .map(|(node, reason)| FilteredNode { node, reason })
                    .collect(),
                time: Some(now),
            });
            Outcome {
                status: st,
                notes: vec![Note::normal(
                    "Scheduled",
                    "Schedule",
                    format!("placed on KvmNode {node}: {message}"),
                )],
                requeue: Some(Duration::from_secs(1)),
            }
        }
        Decision::Unschedulable { message, filtered } => {
            let mut out = problem(
                vm,
                "Unschedulable",
                message.clone(),
                Some(Duration::from_secs(30)),
            );
            set_condition(
                &mut out.status.conditions,
                condition::condition(
                    condition::SCHEDULED,
                    false,
                    "Unschedulable",
                    message.clone(),
                    vm.metadata.generation,
                    super::now(),
                ),
            );
            out.status.placement = Some(PlacementStatus {
                node: String::new(),
                score: None,
                runner_up: None,
                message,
                filtered: filtered
                    .into_iter()
                    .map(|(node, reason)| FilteredNode { node, reason })
                    .collect(),
                time: None,
            });
            out
        }
    }
}

fn failure(what: &'static str, node: &str, e: &HvError) -> (&'static str, &'static str, String) {
    (
        what,
        e.reason(),
        format!("{what} on KvmNode {node} failed: {e}"),
    )
}

/// A spec that cannot be resolved on the node right now (its pool is not running there, a
/// volume is missing) stops every change, but not the truth about a domain that already
/// exists: its power state is read again, and a node that cannot be read makes it `Unknown`
/// with Ready naming the node (the pool is usually "not ready" only because its node is not).
async fn blocked_but_observed<H: Hypervisor>(
    vm: &VirtualMachine,
    node: &str,
    hv: &H,
    b: plan::Blocked,
) -> Outcome<VirtualMachineStatus> {
    let Some(domain) = vm.status.as_ref().and_then(|s| s.domain_name.clone()) else {
        return problem(vm, b.reason, b.message, b.retry);
    };
    let d = domain.clone();
    match hv.call(node, "domain state", move |c| c.state(&d)).await {
        Ok(s) => {
            let mut out = problem(vm, b.reason, b.message, b.retry);
            out.status.power_state = Some(super::kvm_node::plan::power_state(s));
            out
        }
        Err(HvError::NotFound { .. }) => {
            let mut out = problem(vm, b.reason, b.message, b.retry);
            out.status.power_state = Some(crate::api::virtual_machine::PowerState::Pending);
            out
        }
        Err(e) => {
            let (_, reason, msg) = failure(status::READING_THE_DOMAIN, node, &e);
            let mut out = problem(vm, reason, msg, b.retry);
            out.status.power_state = Some(crate::api::virtual_machine::PowerState::Unknown);
            out
        }
    }
}

/// Observe → plan → execute rounds on the VM's node, then its status.
async fn converge<H: Hypervisor>(
    vm: &VirtualMachine,
    node: &str,
    world: &World,
    hv: &H,
    config: &Config,
    user_data: Option<&str>,
) -> Reconciled {
    let resolved = match plan::resolve(vm, node, world, user_data) {
        Ok(r) => r,
        Err(b) => return blocked_but_observed(vm, node, hv, b).await.into(),
    };
    let now = super::now();
    let mut notes = Vec::new();
    let mut restarted = false;
    let mut fail = None;
    let mut transient = true;
    let mut last = (observe::Observed::default(), plan::Plan::default());
    // what the last round's final call read right after its steps, when it did
    let mut read_after = None;
    for _ in 0..MAX_ROUNDS {
        let read = match read_after.take() {
            Some(o) => Ok(o),
            None => observe::observe(hv, &resolved).await,
        };
        let mut observed = match read {
            Ok(o) => o,
            Err(e) => {
                transient = e.is_transient();
                fail = Some(failure(status::READING_THE_DOMAIN, node, &e));
                break;
            }
        };
        observe::holders_elsewhere(hv, &resolved, &world.nodes, &mut observed).await;
        let p = plan::plan(vm, &resolved, &observed, &now);
        // a domain it had is gone from the node: before anything is made again, the other nodes
        // are asked whether they have it
        let had_domain = vm.status.as_ref().is_some_and(|s| s.domain_uuid.is_some());
        if observed.domain.is_none()
            && had_domain
            && !p.steps.is_empty()
            && let Some(out) = found_elsewhere(vm, node, &resolved.domain, world, hv).await
        {
            return out.into();
        }
        let done = p.steps.is_empty() || p.blocked.is_some() || restarted;
        if !p.drift.is_empty() {
            notes.push(Note::normal(
                "DriftCorrected",
                "Update",
                format!(
                    "domain {} on KvmNode {node} differed from the spec ({}); correcting it",
                    resolved.domain,
                    plan::drift_text(&p.drift)
                ),
            ));
        }
        if done {
            last = (observed, p);
            break;
        }
        let ex = execute::execute(hv, &resolved, p.steps.clone(), config.shutdown_grace).await;
        notes.extend(ex.notes);
        restarted |= ex.restarted;
        read_after = ex.observed;
        last = (observed, p);
        if let Some((what, e)) = ex.failed {
            transient = e.is_transient();
            fail = Some(failure(what, node, &e));
            if let Ok(o) = observe::observe(hv, &resolved).await {
                last.0 = o;
            }
            break;
        }
    }
    // the last round may have run steps: describe the node as it is now
    let now_read = if !last.1.steps.is_empty() && fail.is_none() {
        match read_after.take() {
            Some(o) => Some(o),
            None => observe::observe(hv, &resolved).await.ok(),
        }
    } else {
        None
    };
    if let Some(o) = now_read {
        last.1 = plan::plan(vm, &resolved, &o, &now);
        last.0 = o;
    }
    if let Some((_, reason, msg)) = &fail {
        notes.push(Note::warning(reason, "Reconcile", msg.clone()));
    }
    let (observed, p) = last;
    let mut st = status::status(
        vm,
        world.node(node),
        &status::Round {
            resolved: &resolved,
            observed: &observed,
            plan: &p,
            failure: fail.clone(),
            restarted,
        },
        now.clone(),
    );
    if resolved.adopted && !condition::is_true(&st.conditions, condition::SCHEDULED) {
        set_condition(
            &mut st.conditions,
            condition::condition(
                condition::SCHEDULED,
                true,
                "Adopted",
                format!(
                    "adopted where it runs: domain {} on KvmNode {node}",
                    resolved.domain
                ),
                vm.metadata.generation,
                now.clone(),
            ),
        );
        st.placement = Some(PlacementStatus {
            node: node.to_string(),
            score: None,
            runner_up: None,
            message: "adopted: an existing domain stays on its node".into(),
            filtered: vec![],
            time: Some(now),
        });
    }
    let requeue = match (&fail, &p.blocked, p.wait) {
        // a host that may come back is retried soon; an error that needs a person, slowly
        (Some(_), _, _) if transient => Some(Duration::from_secs(15)),
        (Some(_), _, _) => Some(Duration::from_secs(300)),
        // what blocks it may be another object's doing (a pool, a volume): looked at again
        (None, Some(b), _) => Some(b.retry.or(config.vm_resync).unwrap_or(BLOCKED_RETRY)),
        (None, None, Some(w)) => Some(w),
        (None, None, None) if !p.steps.is_empty() => Some(Duration::from_secs(2)),
        // a guest that just started has no address yet: looked at again for a while
        _ if status::awaits_address(&st, &observed, &super::now()) => Some(
            config
                .vm_resync
                .map_or(status::ADDRESS_POLL, |r| r.min(status::ADDRESS_POLL)),
        ),
        // converged: looked at again on a change, an event or a node pass's hint (and
        // periodically only when configured)
        _ => config.vm_resync,
    };
    Reconciled {
        outcome: Outcome {
            status: st,
            notes,
            requeue,
        },
        definition: observed.domain.map(|d| d.persistent_text),
    }
}

/// After a Migration succeeded, the VM is bound to its target (once: the binding time moves
/// past the migration's end).
fn rebind_after_migration(
    vm: &VirtualMachine,
    world: &World,
) -> Option<Outcome<VirtualMachineStatus>> {
    use crate::api::migration::MigrationPhase;
    let st = vm.status.as_ref()?;
    let node = st.node.as_deref()?;
    let bound_at = st.placement.as_ref().and_then(|p| p.time.clone());
    let m = super::migration::of_vm(world, vm)
        .filter(|m| {
            let ms = m.status.as_ref();
            ms.and_then(|s| s.phase) == Some(MigrationPhase::Succeeded)
                && ms
                    .and_then(|s| s.target_node.as_deref())
                    .is_some_and(|t| t != node)
                && ms.and_then(|s| s.end_time.clone()) > bound_at
        })
        .max_by_key(|m| m.status.as_ref().and_then(|s| s.end_time.clone()))?;
    let ms = m.status.clone().unwrap_or_default();
    let target = ms.target_node.clone()?;
    let msg = format!(
        "moved from {node} to {target} by Migration {}",
        m.name_any()
    );
    let mut out = with_condition(vm, condition::MIGRATING, false, "Migrated", msg.clone());
    set_condition(
        &mut out.conditions,
        condition::condition(
            condition::SCHEDULED,
            true,
            "Migrated",
            msg.clone(),
            vm.metadata.generation,
            super::now(),
        ),
    );
    out.node = Some(target.clone());
    out.placement = Some(PlacementStatus {
        node: target,
        score: None,
        runner_up: None,
        message: msg.clone(),
        filtered: vec![],
        time: ms.end_time,
    });
    Some(Outcome {
        status: out,
        notes: vec![Note::normal("Migrated", "Migrate", msg)],
        requeue: Some(Duration::from_secs(1)),
    })
}

/// The core reconcile of a VM. `user_data` is the cloud-init user data read from the Secret
/// the spec references (the glue reads it).
pub async fn reconcile_core<H: Hypervisor>(
    vm: &VirtualMachine,
    world: &World,
    hv: &H,
    config: &Config,
    user_data: Option<&str>,
) -> Outcome<VirtualMachineStatus> {
    reconcile_read(vm, world, hv, config, user_data)
        .await
        .outcome
}

/// A VM's reconcile: its outcome, and the domain's persistent definition as the reconcile last
/// read it (what the definition backup keeps, so that it is not read a second time).
pub struct Reconciled {
    pub outcome: Outcome<VirtualMachineStatus>,
    pub definition: Option<std::sync::Arc<str>>,
}

impl From<Outcome<VirtualMachineStatus>> for Reconciled {
    fn from(outcome: Outcome<VirtualMachineStatus>) -> Self {
        Reconciled {
            outcome,
            definition: None,
        }
    }
}

/// [`reconcile_core`] with the definition it read.
pub async fn reconcile_read<H: Hypervisor>(
    vm: &VirtualMachine,
    world: &World,
    hv: &H,
    config: &Config,
    user_data: Option<&str>,
) -> Reconciled {
    if let Err(e) = vm.spec.validate() {
        let mut out = problem(
            vm,
            "InvalidSpec",
            format!("{}: {e}; fix the spec and apply it again", describe(vm)),
            None,
        );
        out.status.observed_generation = vm.metadata.generation;
        return out.into();
    }
    // during a migration only the Migration controller acts on the VM
    if let Some(m) = super::migration::of_vm(world, vm).find(|m| super::migration::holds_vm(m)) {
        let mut st = with_condition(
            vm,
            condition::MIGRATING,
            true,
            "Migrating",
            format!(
                "Migration {} moves it; nothing else is done to it until it ends",
                m.name_any()
            ),
        );
        // a source node that does not answer leaves the state unknown, migration or not
        let silent = vm
            .status
            .as_ref()
            .and_then(|s| s.node.as_deref())
            .and_then(|n| world.node(n))
            .and_then(|n| n.status.as_ref())
            .and_then(|s| condition::find(&s.conditions, condition::READY))
            .is_some_and(|c| {
                c.status == condition::FALSE || c.reason == super::kvm_node::status::UNRESPONSIVE
            });
        st.power_state = Some(if silent {
            crate::api::virtual_machine::PowerState::Unknown
        } else {
            crate::api::virtual_machine::PowerState::Migrating
        });
        return Outcome {
            status: st,
            notes: vec![],
            requeue: Some(Duration::from_secs(10)),
        }
        .into();
    }
    // bound to a Migration's target, the VM is observed there in the same reconcile
    let rebound = rebind_after_migration(vm, world).map(|out| {
        let mut moved = vm.clone();
        moved.status = Some(out.status);
        (moved, out.notes)
    });
    let (vm, mut notes) = match &rebound {
        Some((moved, notes)) => (moved, notes.clone()),
        None => (vm, Vec::new()),
    };
    let mut r = reconcile_bound(vm, world, hv, config, user_data).await;
    notes.append(&mut r.outcome.notes);
    r.outcome.notes = notes;
    r
}

/// How soon a VM blocked by something outside it (a pool, a volume) is looked at again when the
/// blocker names no time and no periodic VM reconcile is configured.
const BLOCKED_RETRY: Duration = Duration::from_secs(300);

/// The reconcile of a VM no Migration holds.
async fn reconcile_bound<H: Hypervisor>(
    vm: &VirtualMachine,
    world: &World,
    hv: &H,
    config: &Config,
    user_data: Option<&str>,
) -> Reconciled {
    let node = vm
        .status
        .as_ref()
        .and_then(|s| s.node.clone())
        .or_else(|| vm.spec.adopt.as_ref().map(|a| a.node_name.clone()));
    let Some(node) = node else {
        return schedule(vm, world, hv).await.into();
    };
    if let Some(out) = failover(vm, &node, world, hv).await {
        return out.into();
    }
    let stale = remove_stale(vm, world, hv).await;
    let Reconciled {
        outcome: mut out,
        definition,
    } = converge(vm, &node, world, hv, config, user_data).await;
    if let Some((done, note)) = stale {
        if let Some(f) = out.status.failover.as_mut() {
            f.stale_removed |= done;
        }
        out.notes.extend(note);
    }
    if world.node(&node).is_some_and(node_failed) {
        // say why it is not started elsewhere (or that it could not be)
        let fenced = world.node(&node).is_some_and(|n| n.spec.out_of_service);
        let (reason, msg) = plan::failover_blocker(vm, world, &node).unwrap_or_else(|| {
            if fenced {
                ("NoTarget", "no other node can take it now".into())
            } else {
                (
                    "NotFenced",
                    format!(
                        "KvmNode {node} may still run it: once the host is powered off or cut off from the storage, set its spec.outOfService to true (a domain its libvirt shows stopped is moved without that)"
                    ),
                )
            }
        });
        set_condition(
            &mut out.status.conditions,
            condition::condition(
                condition::RECOVERY,
                false,
                reason,
                format!("not started on another node: {msg}"),
                vm.metadata.generation,
                super::now(),
            ),
        );
    } else if out.status.failover.is_none() {
        // the node answers again: nothing to recover (after a failover, Recovery=True stays)
        out.status
            .conditions
            .retain(|c| c.type_ != condition::RECOVERY);
    }
    Reconciled {
        outcome: out,
        definition,
    }
}

/// True when the node has been observed and is not Ready (past its grace period).
fn node_failed(n: &crate::api::KvmNode) -> bool {
    n.status.as_ref().is_some_and(|s| {
        condition::find(&s.conditions, condition::READY).is_some_and(|c| c.status == "False")
    })
}

/// Starts the VM on another node when its node failed, and only when that cannot run it twice:
/// the VM asks for it (RerunOnFailure), every volume it uses is on shared storage, and either the
/// administrator declared the old host fenced (`spec.outOfService`) or the old host's libvirt
/// shows the domain stopped (its definition there is removed first, so nothing can start it
/// again). `None`: nothing to do here, converge as usual (a node that cannot be read makes the VM
/// Unknown).
async fn failover<H: Hypervisor>(
    vm: &VirtualMachine,
    node: &str,
    world: &World,
    hv: &H,
) -> Option<Outcome<VirtualMachineStatus>> {
    let n = world.node(node)?;
    if !node_failed(n) || plan::failover_blocker(vm, world, node).is_some() {
        return None;
    }
    let domain = vm.status.as_ref()?.domain_name.clone()?;
    let uid = vm.uid().unwrap_or_default();
    let (why, removed) = if n.spec.out_of_service {
        ("OutOfService", false)
    } else {
        // proven stopped: libvirt on the old host answers and the domain is not running there;
        // its definition is removed so that nothing starts it there again
        let d = domain.clone();
        let proven = hv
            .call(node, "remove stopped domain", move |c| {
                let x = match c.persistent_xml(&d) {
                    Ok(x) => x,
                    Err(HvError::NotFound { .. }) => return Ok(true),
                    Err(e) => return Err(e),
                };
                if x.owner().is_none_or(|o| o.uid != uid) {
                    return Ok(false);
                }
                if c.state(&d)? != crate::hypervisor::DomainState::Shutoff {
                    return Ok(false);
                }
                c.undefine(&d)?;
                Ok(true)
            })
            .await;
        if !matches!(proven, Ok(true)) {
            return None;
        }
        ("DomainStopped", true)
    };
    let cands: Vec<Candidate> = candidates(world, vm)
        .into_iter()
        .filter(|c| c.name != node)
        .collect();
    let (target, message) = match placement::place(&request_for_move(vm), &cands, &world.weights) {
        Decision::Placed { node, message, .. } => (node, message),
        Decision::Unschedulable { .. } => return None,
    };
    let now = super::now();
    let text = format!(
        "KvmNode {node} failed ({}): started again on KvmNode {target} from the same volumes on shared storage",
        if why == "OutOfService" {
            "not Ready, and declared fenced by spec.outOfService"
        } else {
            "not Ready, and its libvirt showed the domain stopped; that definition was removed"
        }
    );
    let mut st = with_condition(vm, condition::SCHEDULED, true, "FailedOver", text.clone());
    set_condition(
        &mut st.conditions,
        condition::condition(
            condition::RECOVERY,
            true,
            "FailedOver",
            text.clone(),
            vm.metadata.generation,
            now.clone(),
        ),
    );
    st.node = Some(target.clone());
    st.power_state = Some(crate::api::virtual_machine::PowerState::Pending);
    st.domain_uuid = None;
    st.console = None;
    st.placement = Some(PlacementStatus {
        node: target.clone(),
        score: None,
        runner_up: None,
        message: format!("failover from {node}: {message}"),
        filtered: vec![],
        time: Some(now.clone()),
    });
    st.failover = Some(crate::api::virtual_machine::FailoverStatus {
        from: node.to_string(),
        to: target,
        reason: why.into(),
        time: Some(now),
        stale_removed: removed,
    });
    Some(Outcome {
        status: st,
        notes: vec![Note::warning("FailedOver", "Failover", text)],
        requeue: Some(Duration::from_secs(1)),
    })
}

/// After a failover, the definition left on the failed node once it answers again: removed
/// (destroyed first if it somehow runs: two guests on the same volumes would corrupt them, and
/// the one the operator started is the one the VM is bound to). Only a domain carrying this VM's
/// stamp is touched; volumes are never deleted (they are the ones the VM uses now).
async fn remove_stale<H: Hypervisor>(
    vm: &VirtualMachine,
    world: &World,
    hv: &H,
) -> Option<(bool, Option<Note>)> {
    let f = vm.status.as_ref()?.failover.as_ref()?;
    if f.stale_removed || world.node(&f.from).is_none_or(node_failed) {
        return None;
    }
    let domain = vm.status.as_ref()?.domain_name.clone()?;
    let uid = vm.uid().unwrap_or_default();
    let d = domain.clone();
    let r = hv
        .call(&f.from, "remove stale domain", move |c| {
            let x = match c.persistent_xml(&d) {
                Ok(x) => x,
                Err(HvError::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            if x.owner().is_none_or(|o| o.uid != uid) {
                return Ok(None);
            }
            let was_running = c.state(&d)? != crate::hypervisor::DomainState::Shutoff;
            if was_running {
                c.destroy(&d)?;
            }
            c.undefine(&d)?;
            Ok(Some(was_running))
        })
        .await;
    match r {
        Ok(None) => Some((true, None)),
        Ok(Some(false)) => Some((
            true,
            Some(Note::normal(
                "StaleDomainRemoved",
                "Failover",
                format!(
                    "the stopped definition of {domain} left on KvmNode {} after the failover was removed (volumes kept)",
                    f.from
                ),
            )),
        )),
        Ok(Some(true)) => Some((
            true,
            Some(Note::warning(
                "StaleDomainRemoved",
                "Failover",
                format!(
                    "{domain} was RUNNING on KvmNode {} although the node was declared out of service: it was destroyed and undefined (the VM runs on {}); check its volumes, and fence a host before setting spec.outOfService",
                    f.from, f.to
                ),
            )),
        )),
        Err(_) => None,
    }
}

/// Deletion: destroy and undefine our domain, delete the volumes we created when the policy
/// says Delete, except one another VM attaches or builds an overlay on (kept, with a Warning).
/// Idempotent; a domain that is not ours is never touched.
pub async fn cleanup_core<H: Hypervisor>(
    vm: &VirtualMachine,
    world: &World,
    hv: &H,
) -> Result<Vec<Note>, Error> {
    let object = describe(vm);
    let Some(node) = vm
        .status
        .as_ref()
        .and_then(|s| s.node.clone())
        .or_else(|| vm.spec.adopt.as_ref().map(|a| a.node_name.clone()))
    else {
        // never placed: nothing was created anywhere (placement is written before any creation)
        return Ok(vec![]);
    };
    let ns = vm.namespace().unwrap_or_default();
    let name = vm.name_any();
    let uid = vm.uid().unwrap_or_default();
    let domain = vm
        .status
        .as_ref()
        .and_then(|s| s.domain_name.clone())
        .or_else(|| vm.spec.adopt.as_ref().map(|a| a.domain.clone()))
        .unwrap_or_else(|| domain_name(&ns, &name));
    let hv_err = |e: HvError| Error::Hypervisor {
        object: object.clone(),
        reason: e.reason(),
        cause: format!(
            "cleanup on KvmNode {node} failed: {e}; it is retried (remove the finalizer {FINALIZER} by hand only if the node is gone for good)"
        ),
    };
    let d = domain.clone();
    let u = uid.clone();
    let removed = hv
        .call(&node, "remove domain", move |c| {
            let x = match c.persistent_xml(&d) {
                Ok(x) => x,
                Err(HvError::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            if x.owner().is_none_or(|o| o.uid != u) {
                return Ok(Some(false));
            }
            c.destroy(&d)?;
            c.undefine(&d)?;
            Ok(Some(true))
        })
        .await
        .map_err(hv_err)?;
    let mut notes = Vec::new();
    match removed {
        Some(true) => notes.push(Note::normal(
            "Deleted",
            "Delete",
            format!("domain {domain} destroyed and undefined on KvmNode {node}"),
        )),
        Some(false) => notes.push(Note::warning(
            "DomainNotOurs",
            "Delete",
            format!("domain {domain} on KvmNode {node} does not carry this VM's stamp; it was left alone"),
        )),
        None => {}
    }
    let policy = vm.spec.volume_deletion_policy;
    if policy == crate::api::storage_pool::DeletionPolicy::Delete && vm.spec.adopt.is_none() {
        let mut vols = Vec::new();
        for d in &vm.spec.disks {
            if let (Some(obj), Some(volume)) = (disk_pool(d), plan::created_volume(&ns, &name, d)) {
                vols.push((obj.to_string(), volume));
            }
        }
        if let Some(ci) = &vm.spec.cloud_init
            && let Some(obj) = ci
                .pool
                .as_deref()
                .or_else(|| vm.spec.disks.iter().find_map(disk_pool))
        {
            vols.push((obj.to_string(), format!("{ns}-{name}-cidata.iso")));
        }
        for (obj, volume) in vols {
            if let Some((other, its)) = plan::volume_used_by(vm, world, &node, &obj, &volume) {
                notes.push(Note::warning(
                    "VolumeKept",
                    "Delete",
                    format!("volume {volume} on KvmNode {node} was kept although volumeDeletionPolicy is Delete: {other} uses it ({its}); delete it by hand once that VM no longer does"),
                ));
                continue;
            }
            let Some(pool) = world.pool(&ns, &obj) else {
                notes.push(Note::warning(
                    "VolumeKept",
                    "Delete",
                    format!("volume {volume} was kept: StoragePool {ns}/{obj} no longer exists, so its node pool is unknown"),
                ));
                continue;
            };
            let lv = super::storage_pool::plan::libvirt_name(pool);
            let v = volume.clone();
            let deleted = hv
                .call(&node, "delete volume", move |c| {
                    match c.volume_info(&lv, &v) {
                        Err(HvError::NotFound { .. }) => Ok(false),
                        Err(e) => Err(e),
                        Ok(_) => c.delete_volume(&lv, &v).map(|()| true),
                    }
                })
                .await
                .map_err(hv_err)?;
            if deleted {
                notes.push(Note::normal(
                    "VolumeDeleted",
                    "Delete",
                    format!(
                        "volume {volume} deleted on KvmNode {node} (volumeDeletionPolicy: Delete)"
                    ),
                ));
            }
        }
    }
    Ok(notes)
}

/// The VMs to reconcile for a domain event, a node's resync marker or a node's resync hint.
pub fn refs_for_event(
    ev: &DomainEvent,
    vms: &[Arc<VirtualMachine>],
) -> Vec<ObjectRef<VirtualMachine>> {
    if ev.detail == super::kvm_node::execute::RESYNC_HINT
        && let Some((ns, name)) = ev.domain.split_once('/')
    {
        return vec![ObjectRef::new(name).within(ns)];
    }
    let on_node = |vm: &VirtualMachine| {
        vm.status.as_ref().and_then(|s| s.node.as_deref()) == Some(ev.node.as_str())
    };
    let resync = crate::hypervisor::events::is_resync(ev);
    vms.iter()
        .filter(|vm| on_node(vm))
        .filter(|vm| {
            resync
                || vm.status.as_ref().is_some_and(|s| {
                    s.domain_name.as_deref() == Some(ev.domain.as_str())
                        || (!ev.uuid.is_empty()
                            && s.domain_uuid.as_deref() == Some(ev.uuid.as_str()))
                })
        })
        .map(|vm| ObjectRef::from_obj(vm.as_ref()))
        .collect()
}

/// Reads the cloud-init user data Secret the spec references.
pub async fn user_data(
    vm: &VirtualMachine,
    secrets: &(impl super::SecretSource + ?Sized),
) -> Result<Option<String>, (&'static str, String)> {
    let Some(r) = vm
        .spec
        .cloud_init
        .as_ref()
        .and_then(|c| c.user_data_secret_ref.clone())
    else {
        return Ok(None);
    };
    let ns = vm.namespace().unwrap_or_default();
    let s = match secrets.secret(&ns, &r.name).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Err((
                "SecretNotFound",
                format!(
                    "spec.cloudInit.userDataSecretRef: Secret {ns}/{} does not exist; create it",
                    r.name
                ),
            ));
        }
        Err(e) => {
            return Err((
                "SecretNotReadable",
                format!(
                    "spec.cloudInit.userDataSecretRef: cannot read Secret {ns}/{}: {e}",
                    r.name
                ),
            ));
        }
    };
    let bytes = s
        .data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .map(|b| b.0.clone())
        .ok_or_else(|| {
            (
                "SecretKeyMissing",
                format!(
                    "spec.cloudInit.userDataSecretRef: Secret {ns}/{} has no key {:?}",
                    r.name, r.key
                ),
            )
        })?;
    String::from_utf8(bytes).map(Some).map_err(|_| {
        (
            "InvalidSpec",
            format!(
                "spec.cloudInit.userDataSecretRef: key {:?} of Secret {ns}/{} is not UTF-8 text",
                r.key, r.name
            ),
        )
    })
}

/// The controller's reconcile.
/// One reconcile, every log line in it carrying the object's kind, namespace, name and node.
pub async fn reconcile(vm: Arc<VirtualMachine>, ctx: Arc<Context>) -> Result<Action, Error> {
    use tracing::Instrument;
    let span = super::object_span(vm.as_ref());
    reconcile_in_span(vm, ctx).instrument(span).await
}

async fn reconcile_in_span(vm: Arc<VirtualMachine>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = vm.namespace().unwrap_or_default();
    let api: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
    let object = describe(vm.as_ref());
    let r = finalizer(&api, FINALIZER, vm, |event| async {
        match event {
            Finalizer::Apply(vm) => {
                // placements are decided one at a time, each seeing the ones before it
                let unplaced = vm.status.as_ref().and_then(|s| s.node.as_ref()).is_none()
                    && vm.spec.adopt.is_none();
                let guard = if unplaced {
                    Some(ctx.placement_lock.lock().await)
                } else {
                    None
                };
                let Reconciled {
                    mut outcome,
                    definition,
                } = match user_data(&vm, &ctx.client).await {
                    Ok(ud) => {
                        reconcile_read(
                            &vm,
                            &ctx.world(),
                            ctx.hv.as_ref(),
                            &ctx.config,
                            ud.as_deref(),
                        )
                        .await
                    }
                    Err((reason, msg)) => {
                        problem(&vm, reason, msg, Some(Duration::from_secs(60))).into()
                    }
                };
                if ctx.config.definition_backup
                    && let Some(n) = super::backup::keep(
                        &vm,
                        &mut outcome.status,
                        ctx.hv.as_ref(),
                        &ctx.client,
                        definition.as_deref(),
                    )
                    .await
                {
                    outcome.notes.push(n);
                }
                if let Some(node) = outcome.status.node.as_deref() {
                    // placed just now: the rest of this reconcile's lines name the node
                    tracing::Span::current().record("node", node);
                }
                if let (true, Some(node)) = (unplaced, outcome.status.node.as_deref()) {
                    let (cpus, bytes) = vm_request(&vm, &Default::default());
                    ctx.placed(&vm.uid().unwrap_or_default(), node, cpus, bytes);
                }
                drop(guard);
                if let (Some(node), Some(p)) = (
                    outcome.status.node.as_deref(),
                    condition::find(&outcome.status.conditions, condition::PROVISIONED),
                ) && p.status == condition::FALSE
                    && FAILURE_REASONS.contains(&p.reason.as_str())
                {
                    ctx.provisioning_failed(node);
                }
                apply_status(&api, vm.as_ref(), MANAGER, &outcome.status).await?;
                ctx.publish(&vm.object_ref(&()), &outcome.notes).await;
                Ok(outcome.action())
            }
            Finalizer::Cleanup(vm) => {
                match cleanup_core(&vm, &ctx.world(), ctx.hv.as_ref()).await {
                    Ok(notes) => {
                        ctx.publish(&vm.object_ref(&()), &notes).await;
                        Ok(Action::await_change())
                    }
                    Err(e) => {
                        ctx.publish(
                            &vm.object_ref(&()),
                            &[Note::warning(e.reason(), "Delete", e.to_string())],
                        )
                        .await;
                        Err(e)
                    }
                }
            }
        }
    })
    .await
    .map_err(|e| super::from_finalizer(object.clone(), e));
    if r.is_ok() {
        ctx.succeeded(&object);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::ffi::LifecycleKind;

    fn vm(ns: &str, name: &str, node: Option<&str>, domain: &str) -> Arc<VirtualMachine> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"vcpus": 1, "memory": "64Mi"},
                "status": {"node": node, "domainName": domain, "domainUuid": format!("uuid-{name}")},
            }))
            .unwrap_or_else(|e| panic!("{e}")),
        )
    }

    fn ev(node: &str, domain: &str, uuid: &str) -> DomainEvent {
        DomainEvent {
            node: node.into(),
            domain: domain.into(),
            uuid: uuid.into(),
            kind: LifecycleKind::Stopped,
            detail: 0,
        }
    }

    fn names(refs: Vec<ObjectRef<VirtualMachine>>) -> Vec<String> {
        let mut v: Vec<String> = refs.iter().map(|r| r.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn events_markers_and_hints_map_to_the_vms_they_concern() {
        let vms = [
            vm("a", "web", Some("n1"), "a_web"),
            vm("a", "db", Some("n1"), "a_db"),
            vm("b", "web", Some("n2"), "b_web"),
            vm("c", "new", None, "c_new"),
        ];
        // a libvirt event: by domain name on that node, or by UUID
        assert_eq!(
            names(refs_for_event(&ev("n1", "a_db", ""), &vms)),
            ["VirtualMachine.v1alpha1.kvm-operator.io/db.a"]
        );
        assert_eq!(
            names(refs_for_event(&ev("n2", "renamed", "uuid-web"), &vms)).len(),
            1
        );
        // the same domain name on another node is someone else's
        assert!(refs_for_event(&ev("n2", "a_db", ""), &vms).is_empty());
        // a resync marker: every VM on the node
        assert_eq!(
            refs_for_event(&crate::hypervisor::events::resync("n1"), &vms).len(),
            2
        );
        // a node's hint names the VM
        let hint = super::super::kvm_node::execute::resync_hint("n1", "c", "new");
        assert_eq!(names(refs_for_event(&hint, &vms)).len(), 1);
    }
}
