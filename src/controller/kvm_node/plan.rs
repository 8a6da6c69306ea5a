//! What a node reconcile does besides writing status (pure): which VMs to look at again (the
//! batched per-node resync) and which Events to publish.

use std::collections::BTreeMap;

use kube::ResourceExt;

use crate::api::condition;
use crate::api::kvm_node::KvmNode;
use crate::api::virtual_machine::{PowerState, VirtualMachine};
use crate::controller::Note;
use crate::hypervisor::DomainState;

use super::observe::Observed;
use super::status::Readiness;

/// A node reconcile's plan.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// VMs (namespace, name) whose domain state differs from their status, or whose domain's
    /// make-up changed since the last pass: reconcile them.
    pub resync: Vec<(String, String)>,
    /// VMs (namespace, name) to move away (maintenance): a Migration is created for each.
    pub evacuate: Vec<(String, String)>,
    pub notes: Vec<Note>,
}

/// The power state a VM's status should show for a domain state.
pub fn power_state(s: DomainState) -> PowerState {
    match s {
        DomainState::Running => PowerState::Running,
        DomainState::Paused => PowerState::Paused,
        DomainState::ShuttingDown => PowerState::ShuttingDown,
        DomainState::Shutoff => PowerState::Stopped,
        DomainState::Crashed => PowerState::Crashed,
        DomainState::Other => PowerState::Unknown,
    }
}

pub fn plan(
    node: &KvmNode,
    observed: &Observed,
    vms: &[&VirtualMachine],
    readiness: &Readiness,
    migrations: &[std::sync::Arc<crate::api::Migration>],
) -> Plan {
    let mut p = Plan {
        evacuate: evacuation(node, vms, migrations).0,
        ..Plan::default()
    };
    if let Ok(domains) = &observed.domains {
        let by_uid: BTreeMap<&str, (DomainState, bool)> = domains
            .iter()
            .filter_map(|d| {
                d.owner
                    .as_ref()
                    .map(|o| (o.uid.as_str(), (d.state, d.reshaped)))
            })
            .collect();
        for vm in vms {
            let Some(st) = &vm.status else { continue };
            if st.domain_name.is_none() {
                continue; // not provisioned yet: its own reconcile is under way
            }
            let uid = vm.uid().unwrap_or_default();
            let stale = match by_uid.get(uid.as_str()) {
                // changed by someone since the last pass (live changes emit no lifecycle event):
                // the VM's own reconcile reads it and corrects what differs from the spec
                Some(&(state, reshaped)) => reshaped || st.power_state != Some(power_state(state)),
                // the domain is gone from the host
                None => true,
            };
            if stale {
                p.resync
                    .push((vm.namespace().unwrap_or_default(), vm.name_any()));
            }
        }
    } else {
        // the node's domains cannot be read: its VMs' power states are not known any more, and
        // each VM's own reconcile says so (Unknown) now rather than at its next resync
        for vm in vms {
            let Some(st) = &vm.status else { continue };
            if st.domain_name.is_some() && st.power_state != Some(PowerState::Unknown) {
                p.resync
                    .push((vm.namespace().unwrap_or_default(), vm.name_any()));
            }
        }
    }
    transitions(node, readiness, p)
}

/// Name of the Migration that evacuates `vm` from `node`.
pub fn evacuation_name(node: &str, vm: &str) -> String {
    let mut n = format!("evacuate-{node}-{vm}");
    n.truncate(253);
    n.trim_end_matches(['-', '.']).to_string()
}

/// In maintenance: the VMs still on the node that no Migration moves yet, and a description of
/// evacuations that failed (left for a person).
pub fn evacuation(
    node: &KvmNode,
    vms: &[&VirtualMachine],
    migrations: &[std::sync::Arc<crate::api::Migration>],
) -> (Vec<(String, String)>, Vec<String>) {
    use crate::api::migration::MigrationPhase;
    let mut todo = Vec::new();
    let mut failed = Vec::new();
    if !node.spec.maintenance {
        return (todo, failed);
    }
    let name = node.name_any();
    for vm in vms {
        let (ns, vname) = (vm.namespace().unwrap_or_default(), vm.name_any());
        let mine: Vec<&crate::api::Migration> = migrations
            .iter()
            .filter(|m| m.namespace().as_deref() == Some(ns.as_str()) && m.spec.vm_name == vname)
            .map(|m| m.as_ref())
            .collect();
        let active = mine.iter().any(|m| {
            !m.status
                .as_ref()
                .and_then(|s| s.phase)
                .is_some_and(MigrationPhase::is_terminal)
        });
        if active {
            continue;
        }
        let ours = evacuation_name(&name, &vname);
        match mine.iter().find(|m| m.name_any() == ours) {
            // it moved and came back, or failed: a person decides
            Some(m) => failed.push(format!(
                "{ns}/{vname} ({}: {})",
                ours,
                m.status
                    .as_ref()
                    .and_then(|s| s.message.clone())
                    .unwrap_or_default()
            )),
            None => todo.push((ns, vname)),
        }
    }
    (todo, failed)
}

fn transitions(node: &KvmNode, readiness: &Readiness, mut p: Plan) -> Plan {
    let was = node
        .status
        .as_ref()
        .and_then(|s| condition::find(&s.conditions, condition::READY))
        .map(|c| c.status == condition::TRUE);
    if was != Some(readiness.ready) {
        let name = node.name_any();
        p.notes.push(if readiness.ready {
            Note::normal(
                readiness.reason,
                "Connect",
                format!("KvmNode {name} is ready: {}", readiness.message),
            )
        } else {
            Note::warning(
                readiness.reason,
                "Connect",
                format!("KvmNode {name} is not ready: {}", readiness.message),
            )
        });
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::domain_xml::Owner;
    use crate::hypervisor::{DomainSummary, HvError};

    fn node() -> KvmNode {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kvm-operator.io/v1alpha1", "kind": "KvmNode",
            "metadata": {"name": "n1"}, "spec": {"address": "h"},
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn vm(name: &str, uid: &str, power: &str, domain: bool) -> VirtualMachine {
        let mut st = serde_json::json!({"node": "n1", "powerState": power});
        if domain {
            st["domainName"] = serde_json::json!(format!("default_{name}"));
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": name, "namespace": "default", "uid": uid},
            "spec": {"vcpus": 1, "memory": "64Mi"}, "status": st,
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn ready() -> Readiness {
        Readiness {
            ready: true,
            reason: "Ready",
            message: String::new(),
        }
    }

    fn names(p: &Plan) -> Vec<&str> {
        p.resync.iter().map(|(_, n)| n.as_str()).collect()
    }

    #[test]
    fn vms_whose_domain_state_differs_are_looked_at_again() {
        let vms = [
            vm("same", "u1", "Running", true),
            vm("stopped-outside", "u2", "Running", true),
            vm("gone", "u3", "Running", true),
            vm("unprovisioned", "u4", "Pending", false),
            vm("was-unknown", "u5", "Unknown", true),
            vm("changed-live", "u6", "Running", true),
        ];
        let refs: Vec<&VirtualMachine> = vms.iter().collect();
        let dom = |uid: &str, state| DomainSummary {
            name: format!("d-{uid}"),
            uuid: format!("uuid-{uid}"),
            state,
            owner: Some(Owner::new(uid, "default", "x")),
            reshaped: uid == "u6",
        };
        let observed = Observed {
            facts: Err(HvError::Local {
                cause: "n/a".into(),
            }),
            domains: Ok(vec![
                dom("u1", DomainState::Running),
                dom("u2", DomainState::Shutoff),
                dom("u5", DomainState::Running),
                dom("u6", DomainState::Running),
            ]),
            stats: vec![],
            fresh: true,
        };
        let p = plan(&node(), &observed, &refs, &ready(), &[]);
        assert_eq!(
            names(&p),
            ["stopped-outside", "gone", "was-unknown", "changed-live"]
        );
    }

    #[test]
    fn an_unreadable_node_sends_its_provisioned_vms_to_say_unknown_once() {
        let vms = [
            vm("running", "u1", "Running", true),
            vm("already-unknown", "u2", "Unknown", true),
            vm("unprovisioned", "u3", "Pending", false),
        ];
        let refs: Vec<&VirtualMachine> = vms.iter().collect();
        let observed = Observed {
            facts: Err(HvError::Local {
                cause: "n/a".into(),
            }),
            domains: Err(HvError::Unreachable {
                target: "n1".into(),
                cause: "no route to host".into(),
            }),
            stats: vec![],
            fresh: true,
        };
        let p = plan(&node(), &observed, &refs, &ready(), &[]);
        assert_eq!(names(&p), ["running"]);
    }
}
