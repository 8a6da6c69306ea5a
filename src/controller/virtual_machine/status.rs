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

/// How often a running guest whose NICs have no address yet is looked at again, and for how
/// long after it became Ready: an address comes a moment after the start (its DHCP lease, its
/// agent), and no domain event says so. After that, only changes, events and a configured VM
/// resync read it again: the idle cost stays with the nodes.
pub const ADDRESS_POLL: std::time::Duration = std::time::Duration::from_secs(15);
pub const ADDRESS_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Whether the VM is looked at again in [`ADDRESS_POLL`] for its addresses: it runs, is Ready
/// since less than [`ADDRESS_WAIT`], has NICs and no address known.
pub fn awaits_address(st: &VirtualMachineStatus, observed: &Observed, now: &Time) -> bool {
    let has_nics = observed
        .domain
        .as_ref()
        .and_then(|d| d.live.as_ref())
        .is_some_and(|l| !l.devices.interface.is_empty());
    let ready_for = condition::find(&st.conditions, condition::READY)
        .filter(|c| c.status == "True")
        .and_then(|c| {
            std::time::Duration::try_from(now.0.duration_since(c.last_transition_time.0)).ok()
        });
    st.power_state == Some(PowerState::Running)
        && has_nics
        && st.ips.is_empty()
        && ready_for.is_some_and(|d| d < ADDRESS_WAIT)
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
    if domain.is_none() && !unread {
        st.ips.clear();
    }
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
        // the addresses of a guest that runs; a reading that could not tell keeps the last ones
        match (&d.live, &d.ips) {
            (None, _) => st.ips.clear(),
            (Some(_), Some(ips)) => st.ips.clone_from(ips),
            (Some(l), None) if l.devices.interface.is_empty() => st.ips.clear(),
            (Some(_), None) => {}
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::domain_xml::DomainXml;
    use crate::hypervisor::{DomainState, StateDetail};

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap_or_else(|e| panic!("{e}")))
    }

    fn observed(nics: usize, ips: Option<Vec<String>>) -> Observed {
        let devices: String = (0..nics)
            .map(|i| format!("<interface type='bridge'><mac address='52:54:00:00:00:0{i}'/><source bridge='br0'/></interface>"))
            .collect();
        let x = DomainXml::parse(&format!(
            "<domain type='kvm'><name>d</name><memory>65536</memory><vcpu>1</vcpu><os><type>hvm</type></os><devices>{devices}</devices></domain>"
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        Observed {
            domain: Some(super::super::observe::DomainObs {
                uuid: None,
                state: StateDetail {
                    state: DomainState::Running,
                    crashed: false,
                    never_started: false,
                    guest_shutdown: false,
                },
                live: Some(x.clone()),
                persistent: x,
                persistent_sha256: String::new(),
                persistent_text: "<domain/>".into(),
                ips,
            }),
            ..Observed::default()
        }
    }

    fn ready_since(secs: i64) -> VirtualMachineStatus {
        let mut st = VirtualMachineStatus {
            power_state: Some(PowerState::Running),
            ..Default::default()
        };
        set_condition(
            &mut st.conditions,
            condition::condition(
                condition::READY,
                true,
                "Ready",
                String::new(),
                Some(1),
                at(secs),
            ),
        );
        st
    }

    #[test]
    fn a_guest_without_an_address_is_looked_at_again_only_for_a_while_after_it_became_ready() {
        let o = observed(1, Some(vec![]));
        let now = at(10_000);
        assert!(awaits_address(&ready_since(10_000 - 30), &o, &now));
        // long Ready: the address is read on the next event, change or configured resync
        assert!(!awaits_address(&ready_since(10_000 - 601), &o, &now));
        // no NIC, an address known, not running, not Ready: nothing to wait for
        assert!(!awaits_address(
            &ready_since(10_000 - 30),
            &observed(0, None),
            &now
        ));
        let mut known = ready_since(10_000 - 30);
        known.ips = vec!["192.0.2.1".into()];
        assert!(!awaits_address(&known, &o, &now));
        let mut off = ready_since(10_000 - 30);
        off.power_state = Some(PowerState::Stopped);
        assert!(!awaits_address(&off, &o, &now));
        let mut not_ready = ready_since(10_000 - 30);
        not_ready.conditions[0].status = "False".into();
        assert!(!awaits_address(&not_ready, &o, &now));
    }
}
