//! A VM's status from what the node has after the round (pure).

use crate::api::condition::{self, Time, set_condition};
use crate::api::kvm_node::KvmNode;
use crate::api::virtual_machine::{
    ConsoleStatus, ObservedDiskStatus, ObservedDomain, ObservedNicStatus, PowerState, RunStrategy,
    VirtualMachine, VirtualMachineStatus,
};
use crate::hypervisor::domain_spec::ObservedVm;
use kube::ResourceExt;

use super::observe::Observed;
use super::plan::{Blocked, Plan, Resolved};

/// Condition type: a change waits for the next restart of the guest.
pub const RESTART_REQUIRED: &str = "RestartRequired";

/// What the round ended with.
pub struct Round<'a> {
    pub resolved: &'a Resolved,
    pub observed: &'a Observed,
    /// The last plan (after execution, what is still to do).
    pub plan: &'a Plan,
    pub failure: Option<(&'static str, &'static str, String)>,
    pub restarted: bool,
}

fn power(domain: Option<&super::observe::DomainObs>) -> PowerState {
    match domain {
        None => PowerState::Pending,
        Some(d) => super::super::kvm_node::plan::power_state(d.state.state),
    }
}

/// Blocked reasons that mean the domain of the VM's name is not the VM's (another object's,
/// or nobody's): it is not described as the VM's own, nor copied as its definition.
const NOT_ITS_DOMAIN: [&str; 2] = ["DomainOwnedElsewhere", "DomainExists"];

/// What the failure of the first read of a round is called (`Round::failure.0`).
pub const READING_THE_DOMAIN: &str = "reading the domain";

/// True when the power state is what the run strategy asks.
fn settled(strategy: RunStrategy, p: PowerState, guest_shutdown: bool) -> bool {
    match strategy {
        RunStrategy::Running => p == PowerState::Running,
        RunStrategy::Stopped => p == PowerState::Stopped,
        RunStrategy::Paused => p == PowerState::Paused,
        RunStrategy::RerunOnFailure => {
            p == PowerState::Running || (p == PowerState::Stopped && guest_shutdown)
        }
    }
}

/// The definition as status reports it.
pub fn observed_domain(o: &ObservedVm) -> ObservedDomain {
    use crate::hypervisor::domain_spec::{DiskBacking, NicSource};
    let mut disks: Vec<ObservedDiskStatus> = o
        .disks
        .iter()
        .map(|(name, d)| ObservedDiskStatus {
            name: name.clone(),
            target: d.target.clone(),
            bus: d.bus.clone(),
            source: d.backing.as_ref().map(|b| match b {
                DiskBacking::File(p) | DiskBacking::Block(p) => p.clone(),
                DiskBacking::Network { protocol, name, .. } => format!("{protocol}:{name}"),
            }),
            cdrom: d.cdrom,
        })
        .collect();
    disks.sort_by(|a, b| a.target.cmp(&b.target));
    ObservedDomain {
        vcpus: o.vcpus,
        memory: o
            .memory_kib
            .map(|k| crate::api::ByteQuantity::from_bytes(k.saturating_mul(1024))),
        disks,
        nics: o
            .nics
            .iter()
            .map(|(name, n)| ObservedNicStatus {
                name: name.clone(),
                mac: n.mac.clone(),
                bridge: match &n.source {
                    Some(NicSource::Bridge(b)) => Some(b.clone()),
                    _ => None,
                },
                network: match &n.source {
                    Some(NicSource::Network(w)) => Some(w.clone()),
                    _ => None,
                },
                model: n.model.clone(),
            })
            .collect(),
    }
}

/// The status after a round on the VM's node.
pub fn status(
    vm: &VirtualMachine,
    node: Option<&KvmNode>,
    round: &Round<'_>,
    now: Time,
) -> VirtualMachineStatus {
    let gen_ = vm.metadata.generation;
    let mut st = vm.status.clone().unwrap_or_default();
    st.observed_generation = gen_;
    st.node = Some(round.resolved.node.clone());
    st.domain_name = Some(round.resolved.domain.clone());
    let domain = round.observed.domain.as_ref().filter(|_| {
        !round
            .plan
            .blocked
            .as_ref()
            .is_some_and(|b| NOT_ITS_DOMAIN.contains(&b.reason))
    });
    // a node that could not be read says nothing about the guest: Unknown, not Pending
    let unread = round.observed.domain.is_none()
        && round
            .failure
            .as_ref()
            .is_some_and(|f| f.0 == READING_THE_DOMAIN);
    let p = if unread {
        PowerState::Unknown
    } else {
        power(domain)
    };
    st.power_state = Some(p);
    if let Some(d) = domain {
        st.domain_uuid = d.uuid.clone();
        let obs = ObservedVm::from_xml(&d.persistent);
        st.observed = Some(observed_domain(&obs));
        // the digest follows the host; the backup fields stay until the copy is rewritten
        let mut def = st.definition.take().unwrap_or_default();
        def.sha256 = d.persistent_sha256.clone();
        st.definition = Some(def);
        st.macs = obs
            .nics
            .iter()
            .filter_map(|(k, v)| v.mac.clone().map(|m| (k.clone(), m)))
            .collect();
        let ends = d.live.as_ref().map(|l| l.console()).unwrap_or_default();
        st.console = node.map(|n| {
            let name = vm.name_any();
            let ns = vm.namespace().unwrap_or_else(|| "default".into());
            ConsoleStatus {
                command: ends
                    .vnc
                    .as_ref()
                    .map(|_| format!("kvm-operator console {name} -n {ns}")),
                vnc: ends.vnc.clone(),
                serial_command: ends.serial.as_ref().map(|_| {
                    format!(
                        "virsh -c 'qemu+ssh://{}@{}:{}/system' console {}",
                        n.spec.user, n.spec.address, n.spec.port, round.resolved.domain
                    )
                }),
                serial: ends.serial.clone(),
            }
        });
    }
    if round.restarted {
        st.restart_count = Some(st.restart_count.unwrap_or(0).saturating_add(1));
        st.last_restart_time = Some(now.clone());
    }
    let was_migrating = condition::is_true(&st.conditions, condition::MIGRATING);
    let mut set = |t: &str, ok: bool, reason: &'static str, msg: String| {
        set_condition(
            &mut st.conditions,
            condition::condition(t, ok, reason, msg, gen_, now.clone()),
        );
    };
    let problem: Option<(&'static str, String)> = match (&round.failure, &round.plan.blocked) {
        (Some((_, reason, msg)), _) => Some((reason, msg.clone())),
        (
            None,
            Some(Blocked {
                reason, message, ..
            }),
        ) => Some((reason, message.clone())),
        (None, None) => None,
    };
    let provisioned = round.observed.domain.is_some() && round.plan.blocked.is_none();
    match (&problem, provisioned) {
        (_, true) => set(
            condition::PROVISIONED,
            true,
            "Provisioned",
            format!(
                "domain {} is defined on KvmNode {}",
                round.resolved.domain, round.resolved.node
            ),
        ),
        (Some((reason, msg)), false) => set(condition::PROVISIONED, false, reason, msg.clone()),
        (None, false) => set(
            condition::PROVISIONED,
            false,
            "Provisioning",
            "creating volumes and defining the domain".into(),
        ),
    }
    if round.plan.restart_pending.is_empty() {
        set(
            RESTART_REQUIRED,
            false,
            "UpToDate",
            "the running guest matches the spec".into(),
        );
    } else {
        set(
            RESTART_REQUIRED,
            true,
            "RestartRequired",
            format!(
                "{}: saved in the definition, applies at the next restart of the guest",
                round.plan.restart_pending.join(", ")
            ),
        );
    }
    if was_migrating {
        set(
            condition::MIGRATING,
            false,
            "NotMigrating",
            "no migration holds the VM".into(),
        );
    }
    let guest_shutdown = round
        .observed
        .domain
        .as_ref()
        .is_some_and(|d| d.state.guest_shutdown);
    match problem {
        Some((reason, msg)) => set(condition::READY, false, reason, msg),
        None if settled(vm.spec.run_strategy, p, guest_shutdown) => set(
            condition::READY,
            true,
            "Ready",
            format!(
                "{:?} on KvmNode {} as spec.runStrategy {:?} asks",
                p, round.resolved.node, vm.spec.run_strategy
            ),
        ),
        None => set(
            condition::READY,
            false,
            "Reconciling",
            format!("{:?}; spec.runStrategy is {:?}", p, vm.spec.run_strategy),
        ),
    }
    st
}
