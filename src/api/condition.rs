//! Conditions shared by all four kinds, in the standard `metav1.Condition` shape so that
//! `kubectl wait --for=condition=Ready`, Flux's kstatus and Argo CD health checks read them.

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The summary condition every kind reports: `True` when the object is what its spec asks for.
pub const READY: &str = "Ready";
/// KvmNode: the operator holds a working libvirt connection to the host.
pub const REACHABLE: &str = "Reachable";
/// VirtualMachine: a node has been chosen (status.node is set).
pub const SCHEDULED: &str = "Scheduled";
/// VirtualMachine: volumes exist and the domain is defined on its node.
pub const PROVISIONED: &str = "Provisioned";
/// VirtualMachine: the domain is running.
pub const RUNNING: &str = "Running";
/// Migration: the migration job is in progress.
pub const MIGRATING: &str = "Migrating";
/// VirtualMachine: whether it was (True) or why it is not (False) started on another node after
/// its node failed; present only while that node is not Ready and after a failover.
pub const RECOVERY: &str = "Recovery";

/// kstatus: the operator is still working towards the spec (Flux reads `InProgress`).
pub const RECONCILING: &str = "Reconciling";
/// kstatus: the operator cannot get there without a change by someone (Flux reads `Failed`).
pub const STALLED: &str = "Stalled";

/// `Ready=False` reasons that pass on their own: the operator is getting there. Any other
/// `Ready=False` reason needs someone to act (fix the spec, a Secret, a host, capacity), which
/// kstatus calls Stalled and Argo CD Degraded. The Argo CD health script
/// (`charts/kvm-operator/argocd/health.lua`) holds the same list; a test keeps them equal.
pub const PROGRESSING_REASONS: &[&str] = &[
    "Reconciling",
    "Provisioning",
    "Pending",
    "Scheduling",
    "Migrating",
    "Queued",
    "WaitingForSlot",
    "Evacuating",
];

/// `status` values of a condition.
pub const TRUE: &str = "True";
pub const FALSE: &str = "False";
pub const UNKNOWN: &str = "Unknown";

/// Builds a condition. `reason` must be a static CamelCase word (it is also an Event reason and
/// a metric label); `message` is the human explanation.
pub fn condition(
    type_: &str,
    status: bool,
    reason: &'static str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { TRUE } else { FALSE }.to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation,
        last_transition_time: now,
    }
}

/// Inserts or replaces the condition of the same type. `lastTransitionTime` moves only when the
/// status flips, so a reconcile that re-asserts the same state does not churn the object.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) => {
            if old.status == new.status {
                new.last_transition_time = old.last_transition_time.clone();
            }
            *old = new;
        }
        None => {
            // statuses are many and long-lived: no room kept for conditions that never come
            // (a doubling Vec holds 8 for an object's 5 or 6)
            conditions.reserve_exact(1);
            conditions.push(new);
        }
    }
}

/// The condition of `type_`, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// True when the condition of `type_` is present with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == TRUE)
}

/// Where an object stands, as kstatus sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Standing {
    /// What the spec asks for (Flux: Current).
    Settled,
    /// Getting there (Flux: InProgress).
    Progressing { reason: String, message: String },
    /// Stuck until someone acts (Flux: Failed).
    Stalled { reason: String, message: String },
}

/// A status with conditions that kstatus and Argo CD read.
pub trait Summarized {
    fn conditions(&self) -> &[Condition];
    fn conditions_mut(&mut self) -> &mut Vec<Condition>;
    fn observed_generation(&self) -> Option<i64>;

    /// By default from `Ready`: True is settled, a reason in [`PROGRESSING_REASONS`] (or no
    /// Ready yet) is progressing, anything else stalled: the same rule as the Argo CD script.
    fn standing(&self) -> Standing {
        match find(self.conditions(), READY) {
            None => Standing::Progressing {
                reason: "Pending".into(),
                message: "not reconciled yet".into(),
            },
            Some(c) if c.status == TRUE => Standing::Settled,
            Some(c) if PROGRESSING_REASONS.contains(&c.reason.as_str()) => Standing::Progressing {
                reason: c.reason.clone(),
                message: c.message.clone(),
            },
            Some(c) => Standing::Stalled {
                reason: c.reason.clone(),
                message: c.message.clone(),
            },
        }
    }
}

macro_rules! summarized_by_ready {
    ($($t:ty),*) => {$(
        impl Summarized for $t {
            fn conditions(&self) -> &[Condition] {
                &self.conditions
            }
            fn conditions_mut(&mut self) -> &mut Vec<Condition> {
                &mut self.conditions
            }
            fn observed_generation(&self) -> Option<i64> {
                self.observed_generation
            }
        }
    )*};
}

summarized_by_ready!(
    super::kvm_node::KvmNodeStatus,
    super::storage_pool::StoragePoolStatus,
    super::virtual_machine::VirtualMachineStatus
);

/// A Migration stands by its phase: Succeeded is settled, Failed and Cancelled are final (no
/// retry follows), anything else is on its way.
impl Summarized for super::migration::MigrationStatus {
    fn conditions(&self) -> &[Condition] {
        &self.conditions
    }
    fn conditions_mut(&mut self) -> &mut Vec<Condition> {
        &mut self.conditions
    }
    fn observed_generation(&self) -> Option<i64> {
        self.observed_generation
    }
    fn standing(&self) -> Standing {
        use super::migration::MigrationPhase as P;
        let message = self.message.clone().unwrap_or_default();
        match self.phase {
            Some(P::Succeeded) => Standing::Settled,
            Some(p @ (P::Failed | P::Cancelled)) => Standing::Stalled {
                reason: format!("{p:?}"),
                message,
            },
            p => Standing::Progressing {
                reason: format!("{:?}", p.unwrap_or(P::Pending)),
                message,
            },
        }
    }
}

/// Sets kstatus's `Reconciling` and `Stalled` conditions from the object's standing, so Flux
/// (kstatus) reads Current / InProgress / Failed and `kubectl wait --for=condition=Stalled=false`
/// works. Both are always present, `True` only when they apply ("abnormal-true" polarity).
pub fn summarize<S: Summarized>(status: &mut S, now: Time) {
    let generation = status.observed_generation();
    let (reconciling, stalled) = match status.standing() {
        Standing::Settled => (None, None),
        Standing::Progressing { reason, message } => (Some((reason, message)), None),
        Standing::Stalled { reason, message } => (None, Some((reason, message))),
    };
    for (type_, set) in [(RECONCILING, reconciling), (STALLED, stalled)] {
        let (status_, reason, message) = match set {
            Some((r, m)) => (TRUE, r, m),
            None => (FALSE, "Ready".to_string(), String::new()),
        };
        set_condition(
            status.conditions_mut(),
            Condition {
                type_: type_.to_string(),
                status: status_.to_string(),
                reason,
                message,
                observed_generation: generation,
                last_transition_time: now.clone(),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap_or_else(|e| panic!("{e}")))
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let mut conds = vec![];
        set_condition(
            &mut conds,
            condition(READY, false, "Pending", "a", Some(1), at(10)),
        );
        set_condition(
            &mut conds,
            condition(READY, false, "StillPending", "b", Some(2), at(20)),
        );
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].last_transition_time, at(10));
        assert_eq!(conds[0].reason, "StillPending");
        assert_eq!(conds[0].observed_generation, Some(2));
        set_condition(
            &mut conds,
            condition(READY, true, "Running", "c", Some(2), at(30)),
        );
        assert_eq!(conds[0].last_transition_time, at(30));
        assert!(is_true(&conds, READY));
        set_condition(
            &mut conds,
            condition(SCHEDULED, true, "Placed", "d", Some(2), at(40)),
        );
        assert_eq!(conds.len(), 2);
        assert!(!is_true(&conds, RUNNING));
    }

    struct S(Vec<Condition>);
    impl Summarized for S {
        fn conditions(&self) -> &[Condition] {
            &self.0
        }
        fn conditions_mut(&mut self) -> &mut Vec<Condition> {
            &mut self.0
        }
        fn observed_generation(&self) -> Option<i64> {
            Some(4)
        }
    }

    fn kstatus(s: &S) -> (&str, &str, &str) {
        let r = find(&s.0, RECONCILING).unwrap_or_else(|| panic!("no Reconciling"));
        let st = find(&s.0, STALLED).unwrap_or_else(|| panic!("no Stalled"));
        assert_eq!(r.observed_generation, Some(4));
        let reason = if r.status == TRUE {
            &r.reason
        } else {
            &st.reason
        };
        (r.status.as_str(), st.status.as_str(), reason.as_str())
    }

    #[test]
    fn reconciling_and_stalled_follow_ready() {
        let mut s = S(vec![]);
        summarize(&mut s, at(1));
        assert_eq!(kstatus(&s), (TRUE, FALSE, "Pending"));
        for (ok, reason, want) in [
            (false, "Provisioning", (TRUE, FALSE, "Provisioning")),
            (false, "WaitingForSlot", (TRUE, FALSE, "WaitingForSlot")),
            (false, "InvalidSpec", (FALSE, TRUE, "InvalidSpec")),
            (false, "HostKeyMismatch", (FALSE, TRUE, "HostKeyMismatch")),
            (true, "Running", (FALSE, FALSE, "Ready")),
        ] {
            set_condition(&mut s.0, condition(READY, ok, reason, "m", Some(4), at(2)));
            summarize(&mut s, at(3));
            assert_eq!(kstatus(&s), want, "{reason}");
        }
        set_condition(
            &mut s.0,
            condition(READY, false, "Provisioning", "m", Some(4), at(4)),
        );
        summarize(&mut s, at(4));
        // re-summarising the same standing keeps the transition time (no churn)
        let before = find(&s.0, RECONCILING).map(|c| c.last_transition_time.clone());
        summarize(&mut s, at(9));
        assert_eq!(
            find(&s.0, RECONCILING).map(|c| c.last_transition_time.clone()),
            before
        );
    }
}
