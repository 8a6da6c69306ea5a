//! A node's status from what was observed (pure).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::api::ByteQuantity;
use crate::api::condition::{self, Time, set_condition};
use crate::api::kvm_node::{
    KvmNode, KvmNodeStatus, NodeLoad, NodeResources, UnmanagedDomain, VmCounts,
};
use crate::api::virtual_machine::VirtualMachine;
use crate::hypervisor::DomainState;
use crate::hypervisor::host_facts::HostFacts;

use super::observe::Observed;

/// Condition type: the node accepts new VMs (Ready and not in maintenance).
pub const SCHEDULABLE: &str = "Schedulable";
/// Condition type: in maintenance, whether the node is empty of our VMs.
pub const EVACUATED: &str = "Evacuated";
/// Condition type: deletion waits for the node's VMs.
pub const DELETING: &str = "Deleting";

/// CPUs and bytes a VM takes on its node: from its spec, or, when the spec leaves them to an
/// adopted domain, from the node's figures of the domain, else from the domain as the VM's own
/// last reading described it (`status.observed`).
pub fn vm_request(vm: &VirtualMachine, stats: &BTreeMap<&str, (u64, u64)>) -> (u32, u64) {
    let status = vm.status.as_ref();
    let figures = status
        .and_then(|s| s.domain_name.as_deref())
        .and_then(|d| stats.get(d).copied());
    let described = status.and_then(|s| s.observed.as_ref());
    let cpus = vm
        .spec
        .vcpus
        .or_else(|| figures.and_then(|(c, _)| u32::try_from(c).ok().filter(|&c| c > 0)))
        .or_else(|| described.map(|d| d.vcpus))
        .unwrap_or(0);
    let mem = vm
        .spec
        .memory
        .as_ref()
        .map(|m| m.bytes())
        .or_else(|| {
            figures
                .map(|(_, kib)| kib.saturating_mul(1024))
                .filter(|&b| b > 0)
        })
        .or_else(|| described.and_then(|d| d.memory.as_ref()).map(|m| m.bytes()))
        .unwrap_or(0);
    (cpus, mem)
}

/// `(capacity - reserved) × overcommit`, rounded down.
pub fn allocatable(node: &KvmNode, cpus: u32, memory: u64) -> NodeResources {
    let r = &node.spec.reserved;
    let o = &node.spec.overcommit;
    let c = f64::from(cpus.saturating_sub(r.cpus)) * o.cpu;
    let m = memory.saturating_sub(r.memory.as_ref().map_or(0, |q| q.bytes())) as f64 * o.memory;
    NodeResources {
        cpus: c.floor().clamp(0.0, f64::from(u32::MAX)) as u32,
        memory: ByteQuantity::from_bytes(m.floor().max(0.0) as u64),
    }
}

fn load(facts: &HostFacts, cpu: Option<u32>) -> Option<NodeLoad> {
    let l = facts.load?;
    Some(NodeLoad {
        load1: format!("{:.2}", l[0]),
        load5: format!("{:.2}", l[1]),
        load15: format!("{:.2}", l[2]),
        cpu_usage_percent: cpu.unwrap_or(0),
        memory_free: ByteQuantity::from_bytes(facts.memory_available.unwrap_or(0)),
    })
}

/// Whether the node is Ready, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    pub reason: &'static str,
    pub message: String,
}

/// Ready reason of a node that stopped answering less than the grace period ago.
pub const UNRESPONSIVE: &str = "Unresponsive";

/// How long a node that was Ready has not answered, when that is less than `grace`.
fn within_grace(prior: &KvmNodeStatus, now: &Time, grace: Duration) -> Option<Duration> {
    let was_ready = condition::is_true(&prior.conditions, condition::READY);
    let last = prior.last_heartbeat.as_ref()?;
    let silent = Duration::try_from(now.0.duration_since(last.0)).unwrap_or_default();
    (was_ready && silent < grace).then_some(silent)
}

/// When a node within its grace period must be looked at again for Ready to turn False on time.
pub fn grace_left(status: &KvmNodeStatus, now: &Time, grace: Duration) -> Option<Duration> {
    let r = condition::find(&status.conditions, condition::READY)?;
    if r.reason != UNRESPONSIVE {
        return None;
    }
    let last = status.last_heartbeat.as_ref()?;
    let silent = Duration::try_from(now.0.duration_since(last.0)).unwrap_or_default();
    Some(grace.saturating_sub(silent) + Duration::from_millis(100))
}

/// The node's status. `vms` are the VirtualMachines bound to this node.
pub fn status(
    node: &KvmNode,
    observed: &Observed,
    vms: &[&VirtualMachine],
    now: Time,
    grace: Duration,
) -> (KvmNodeStatus, Readiness) {
    let gen_ = node.metadata.generation;
    let prior = node.status.clone().unwrap_or_default();
    let mut st = KvmNodeStatus {
        observed_generation: gen_,
        conditions: prior.conditions.clone(),
        last_heartbeat: prior.last_heartbeat.clone(),
        ..Default::default()
    };
    let stats: BTreeMap<&str, (u64, u64)> = observed
        .stats
        .iter()
        .map(|s| {
            (
                s.domain.as_str(),
                (s.vcpus.unwrap_or(0), s.balloon_maximum_kib.unwrap_or(0)),
            )
        })
        .collect();
    if let Ok((facts, cpu)) = &observed.facts {
        if let (Some(c), Some(m)) = (facts.cpus, facts.memory_total) {
            st.capacity = Some(NodeResources {
                cpus: c,
                memory: ByteQuantity::from_bytes(m),
            });
            st.allocatable = Some(allocatable(node, c, m));
        }
        st.load = load(facts, *cpu);
        st.libvirt_version = facts.libvirt_version.clone();
        st.qemu_version = facts.qemu_version.clone();
        st.hypervisor = Some(match facts.kvm {
            Some(true) => "kvm".into(),
            Some(false) => "qemu (software emulation: /dev/kvm is missing)".into(),
            None => "test".into(),
        });
    }
    let (cpus, mem) = vms.iter().fold((0u32, 0u64), |(c, m), vm| {
        let (vc, vm_) = vm_request(vm, &stats);
        (c.saturating_add(vc), m.saturating_add(vm_))
    });
    st.allocated = Some(NodeResources {
        cpus,
        memory: ByteQuantity::from_bytes(mem),
    });
    if let Ok(domains) = &observed.domains {
        let managed = domains.iter().filter(|d| d.owner.is_some()).count();
        st.vms = Some(VmCounts {
            total: domains.len() as u32,
            running: domains
                .iter()
                .filter(|d| d.state == DomainState::Running)
                .count() as u32,
            managed: managed as u32,
            unmanaged: (domains.len() - managed) as u32,
        });
        st.unmanaged_domains = domains
            .iter()
            .filter(|d| d.owner.is_none())
            .map(|d| UnmanagedDomain {
                name: d.name.clone(),
                uuid: d.uuid.clone(),
                state: d.state.as_str().into(),
            })
            .collect();
        st.unmanaged_domains.sort_by(|a, b| a.name.cmp(&b.name));
        st.last_heartbeat = Some(now.clone());
    }
    let (reachable, r_reason, r_msg) = match (&observed.facts, &observed.domains) {
        (_, Ok(_)) | (Ok(_), _) => (true, "Reachable", "the host answers".to_string()),
        (Err(e), Err(_)) => (false, e.reason(), e.to_string()),
    };
    let (ready, reason, msg): (bool, &'static str, String) = match (&observed.facts, &observed.domains) {
        (Ok((f, _)), Ok(_)) if f.kvm == Some(false) => (
            true,
            "SoftwareEmulation",
            "libvirt works but /dev/kvm is missing: VMs run with QEMU software emulation (slow); enable virtualisation in the host's firmware".into(),
        ),
        (_, Ok(_)) => (true, "Ready", "libvirt answers".into()),
        (Ok(_), Err(e)) => (
            false,
            "LibvirtUnavailable",
            format!("the host answers over SSH but libvirt does not: {e}; check that libvirtd (or virtqemud) runs on the host"),
        ),
        (Err(_), Err(e)) => (false, e.reason(), e.to_string()),
    };
    // A node that was Ready and stopped answering only now stays Ready for the grace period
    // (hostFailure.graceSeconds): a blip is not a failure. Reachable and Schedulable say the
    // truth at once, so nothing new is placed on it meanwhile.
    let (ready, reason, msg) = match (ready, within_grace(&prior, &now, grace)) {
        (false, Some(silent)) => (
            true,
            UNRESPONSIVE,
            format!(
                "not answering for {}s ({msg}); Ready turns False once {}s pass without an answer (hostFailure.graceSeconds)",
                silent.as_secs(),
                grace.as_secs()
            ),
        ),
        _ => (ready, reason, msg),
    };
    set_condition(
        &mut st.conditions,
        condition::condition(
            condition::REACHABLE,
            reachable,
            r_reason,
            r_msg,
            gen_,
            now.clone(),
        ),
    );
    set_condition(
        &mut st.conditions,
        condition::condition(
            condition::READY,
            ready,
            reason,
            msg.clone(),
            gen_,
            now.clone(),
        ),
    );
    let (sched, s_reason, s_msg) = if reason == UNRESPONSIVE {
        (false, UNRESPONSIVE, "the node is not answering".to_string())
    } else if node.spec.maintenance {
        (false, "Maintenance", "spec.maintenance is true: no new VM is placed here; evacuation of running VMs arrives with the Migration controller".to_string())
    } else if !ready {
        (false, "NotReady", "the node is not Ready".to_string())
    } else {
        (
            true,
            "Schedulable",
            "new VMs may be placed here".to_string(),
        )
    };
    set_condition(
        &mut st.conditions,
        condition::condition(SCHEDULABLE, sched, s_reason, s_msg, gen_, now),
    );
    st.conditions.retain(|c| c.type_ != DELETING);
    (
        st,
        Readiness {
            ready,
            reason,
            message: msg,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::{DomainSummary, HvError};

    fn node(spec: serde_json::Value) -> KvmNode {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kvm-operator.io/v1alpha1", "kind": "KvmNode",
            "metadata": {"name": "n1", "generation": 3}, "spec": spec,
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn facts(kvm: Option<bool>) -> HostFacts {
        HostFacts {
            cpus: Some(16),
            memory_total: Some(64 << 30),
            memory_available: Some(40 << 30),
            load: Some([1.5, 1.0, 0.5]),
            kvm,
            libvirt_version: Some("9.0.0".into()),
            qemu_version: Some("7.2.0".into()),
            ..Default::default()
        }
    }

    fn unreachable() -> HvError {
        HvError::Unreachable {
            target: "n1".into(),
            cause: "connection refused".into(),
        }
    }

    fn ready_reason(o: &Observed) -> (bool, &'static str) {
        let n = node(serde_json::json!({"address": "h"}));
        let (st, r) = status(&n, o, &[], crate::controller::now(), Duration::ZERO);
        assert_eq!(
            condition::is_true(&st.conditions, condition::READY),
            r.ready
        );
        (r.ready, r.reason)
    }

    #[test]
    fn allocatable_subtracts_reservations_then_applies_overcommit() {
        let n = node(
            serde_json::json!({"address": "h", "overcommit": {"cpu": 2.0, "memory": 1.5},
            "reserved": {"cpus": 2, "memory": "4Gi"}}),
        );
        let a = allocatable(&n, 16, 64 << 30);
        assert_eq!(a.cpus, 28);
        assert_eq!(a.memory.bytes(), 90 << 30);
        // more reserved than present: zero, never an underflow
        let n = node(serde_json::json!({"address": "h", "reserved": {"cpus": 64}}));
        assert_eq!(allocatable(&n, 16, 1 << 30).cpus, 0);
    }

    #[test]
    fn readiness_names_the_cause() {
        let ok = || Ok(vec![]);
        let cases = [
            (Ok((facts(Some(true)), Some(5))), ok(), (true, "Ready")),
            (
                Ok((facts(Some(false)), None)),
                ok(),
                (true, "SoftwareEmulation"),
            ),
            (
                Ok((facts(Some(true)), None)),
                Err(unreachable()),
                (false, "LibvirtUnavailable"),
            ),
            (
                Err(unreachable()),
                Err(unreachable()),
                (false, "HostUnreachable"),
            ),
            (
                Err(HvError::HostKeyMismatch {
                    target: "n1".into(),
                    expected: "a".into(),
                    actual: "b".into(),
                }),
                Err(HvError::HostKeyMismatch {
                    target: "n1".into(),
                    expected: "a".into(),
                    actual: "b".into(),
                }),
                (false, "HostKeyMismatch"),
            ),
            (
                Err(HvError::AuthFailed {
                    target: "n1".into(),
                    cause: "no".into(),
                }),
                Err(HvError::AuthFailed {
                    target: "n1".into(),
                    cause: "no".into(),
                }),
                (false, "AuthFailed"),
            ),
        ];
        for (facts, domains, want) in cases {
            let o = Observed {
                facts,
                domains,
                stats: vec![],
                fresh: true,
            };
            assert_eq!(ready_reason(&o), want);
        }
    }

    #[test]
    fn an_adopted_vm_without_sizes_takes_the_node_figures_else_its_own_reading() {
        let vm = |status: serde_json::Value| -> VirtualMachine {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
                "metadata": {"name": "old", "namespace": "ns"},
                "spec": {"adopt": {"nodeName": "n1", "domain": "legacy"}},
                "status": status,
            }))
            .unwrap_or_else(|e| panic!("{e}"))
        };
        let described = vm(serde_json::json!({
            "domainName": "legacy",
            "observed": {"vcpus": 3, "memory": "2Gi"},
        }));
        let figures = BTreeMap::from([("legacy", (4, 1024 * 1024))]);
        assert_eq!(
            vm_request(&described, &figures),
            (4, 1 << 30),
            "node figures first"
        );
        // a states-only node pass has no figures for a domain it never read in full
        let unknown = BTreeMap::from([("legacy", (0, 0))]);
        assert_eq!(vm_request(&described, &unknown), (3, 2 << 30));
        assert_eq!(vm_request(&described, &BTreeMap::new()), (3, 2 << 30));
        let unread = vm(serde_json::json!({"domainName": "legacy"}));
        assert_eq!(vm_request(&unread, &BTreeMap::new()), (0, 0));
        let sized: VirtualMachine = serde_json::from_value(serde_json::json!({
            "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": "new", "namespace": "ns"},
            "spec": {"vcpus": 2, "memory": "1Gi"},
            "status": {"domainName": "legacy", "observed": {"vcpus": 3, "memory": "2Gi"}},
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(vm_request(&sized, &figures), (2, 1 << 30), "the spec first");
    }

    #[test]
    fn figures_counts_unmanaged_domains_and_maintenance() {
        let n = node(serde_json::json!({"address": "h", "maintenance": true}));
        let owner = crate::hypervisor::domain_xml::Owner::new("u", "ns", "vm");
        let o = Observed {
            facts: Ok((facts(Some(true)), Some(12))),
            domains: Ok(vec![
                DomainSummary {
                    name: "ns_vm".into(),
                    uuid: "1".into(),
                    state: DomainState::Running,
                    owner: Some(owner),
                    reshaped: false,
                },
                DomainSummary {
                    name: "zeta".into(),
                    uuid: "2".into(),
                    state: DomainState::Shutoff,
                    owner: None,
                    reshaped: false,
                },
                DomainSummary {
                    name: "alpha".into(),
                    uuid: "3".into(),
                    state: DomainState::Running,
                    owner: None,
                    reshaped: false,
                },
            ]),
            stats: vec![],
            fresh: true,
        };
        let vm: VirtualMachine = serde_json::from_value(serde_json::json!({
            "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": "vm", "namespace": "ns"},
            "spec": {"vcpus": 4, "memory": "8Gi"}, "status": {"node": "n1"},
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let (st, r) = status(&n, &o, &[&vm], crate::controller::now(), Duration::ZERO);
        assert!(r.ready);
        assert_eq!(st.observed_generation, Some(3));
        assert_eq!(st.capacity.as_ref().map(|c| c.cpus), Some(16));
        assert_eq!(
            st.allocated.as_ref().map(|a| (a.cpus, a.memory.bytes())),
            Some((4, 8 << 30))
        );
        let c = st.vms.clone().unwrap_or_default();
        assert_eq!((c.total, c.running, c.managed, c.unmanaged), (3, 2, 1, 2));
        let names: Vec<&str> = st
            .unmanaged_domains
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        assert_eq!(names, ["alpha", "zeta"]);
        let load = st.load.clone().unwrap_or_else(|| panic!("load"));
        assert_eq!((load.load1.as_str(), load.cpu_usage_percent), ("1.50", 12));
        let s = condition::find(&st.conditions, SCHEDULABLE).unwrap_or_else(|| panic!("cond"));
        assert_eq!(
            (s.status.as_str(), s.reason.as_str()),
            ("False", "Maintenance")
        );
        assert_eq!(st.hypervisor.as_deref(), Some("kvm"));
    }

    #[test]
    fn a_ready_node_that_stops_answering_stays_ready_for_the_grace_period_only() {
        let mut n = node(serde_json::json!({"address": "h"}));
        let up = Observed {
            facts: Ok((facts(Some(true)), None)),
            domains: Ok(vec![]),
            stats: vec![],
            fresh: true,
        };
        let down = || Observed {
            facts: Err(unreachable()),
            domains: Err(unreachable()),
            stats: vec![],
            fresh: true,
        };
        let t0 = crate::controller::now();
        let grace = Duration::from_secs(40);
        let (st, r) = status(&n, &up, &[], t0.clone(), grace);
        assert!(r.ready);
        n.status = Some(st);
        // 10 s of silence: still Ready (a blip), but not Schedulable nor Reachable
        let at = |secs: i64| Time(t0.0 + k8s_openapi::jiff::SignedDuration::from_secs(secs));
        let (st, r) = status(&n, &down(), &[], at(10), grace);
        assert!(r.ready);
        assert_eq!(r.reason, UNRESPONSIVE);
        assert!(r.message.contains("40s"), "{}", r.message);
        assert!(!condition::is_true(&st.conditions, SCHEDULABLE));
        assert!(!condition::is_true(&st.conditions, condition::REACHABLE));
        let left = grace_left(&st, &at(10), grace).unwrap_or_else(|| panic!("grace left"));
        assert!(
            left > Duration::from_secs(29) && left < Duration::from_secs(31),
            "{left:?}"
        );
        n.status = Some(st);
        // past the grace period: Ready=False with the host's own reason
        let (st, r) = status(&n, &down(), &[], at(41), grace);
        assert!(!r.ready);
        assert_eq!(r.reason, "HostUnreachable");
        assert_eq!(grace_left(&st, &at(41), grace), None);
        n.status = Some(st);
        // a node that was not Ready gets no grace when it fails again
        let (_, r) = status(&n, &down(), &[], at(42), grace);
        assert!(!r.ready);
        // a grace of zero: Ready=False at once
        let mut fresh = node(serde_json::json!({"address": "h"}));
        fresh.status = Some(status(&fresh, &up, &[], t0.clone(), Duration::ZERO).0);
        assert!(!status(&fresh, &down(), &[], at(1), Duration::ZERO).1.ready);
    }
}
