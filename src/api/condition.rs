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
        None => conditions.push(new),
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
}
