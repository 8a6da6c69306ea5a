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
    /// VMs (namespace, name) whose domain state differs from their status: reconcile them.
    pub resync: Vec<(String, String)>,
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
) -> Plan {
    let mut p = Plan::default();
    if let Ok(domains) = &observed.domains {
        let by_uid: BTreeMap<&str, DomainState> = domains
            .iter()
            .filter_map(|d| d.owner.as_ref().map(|o| (o.uid.as_str(), d.state)))
            .collect();
        for vm in vms {
            let Some(st) = &vm.status else { continue };
            if st.domain_name.is_none() {
                continue; // not provisioned yet: its own reconcile is under way
            }
            let uid = vm.uid().unwrap_or_default();
            let want = by_uid.get(uid.as_str()).map(|s| power_state(*s));
            let stale = match want {
                Some(w) => st.power_state != Some(w),
                // the domain is gone from the host
                None => true,
            };
            if stale {
                p.resync
                    .push((vm.namespace().unwrap_or_default(), vm.name_any()));
            }
        }
    }
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
