//! A Migration's life cycle (pure): the phases, the one transition function, and what to do in
//! each phase given where the domain is.

use std::time::Duration;

use crate::api::migration::{Migration, MigrationMode, MigrationPhase};
use crate::hypervisor::DomainState;

use super::observe::Observed;

/// What moves a Migration from one phase to the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// First seen: queued.
    Queue,
    /// The VM exists, is placed and no older migration of it is active: choose the target.
    Schedule,
    /// Target chosen and a slot free: the job runs.
    Start,
    /// The domain runs (or, cold, is defined) on the target only.
    Complete,
    /// It cannot be done, or the job failed; the domain is where it was.
    Fail,
    /// The Migration was deleted before it finished; the job was aborted.
    Cancel,
}

/// The transition function. An illegal transition is an error, never a silent no-op.
pub fn transition(from: Option<MigrationPhase>, ev: Event) -> Result<MigrationPhase, String> {
    use Event as E;
    use MigrationPhase as P;
    match (from, ev) {
        (None, E::Queue) => Ok(P::Pending),
        (Some(P::Pending), E::Schedule) => Ok(P::Scheduling),
        (Some(P::Scheduling), E::Start) => Ok(P::Running),
        (Some(P::Running), E::Complete) => Ok(P::Succeeded),
        (None | Some(P::Pending | P::Scheduling | P::Running), E::Fail) => Ok(P::Failed),
        (None | Some(P::Pending | P::Scheduling | P::Running), E::Cancel) => Ok(P::Cancelled),
        (from, ev) => Err(format!(
            "illegal Migration transition: {ev:?} in phase {from:?}"
        )),
    }
}

/// The state of the in-process job for this Migration.
#[derive(Clone, Debug, PartialEq)]
pub enum Task {
    /// No job runs in this process (not started yet, or the operator restarted).
    Absent,
    Running,
    /// The job ended: Ok, or libvirt's error.
    Done(Result<(), String>),
}

/// What to do in the Running phase.
#[derive(Clone, Debug, PartialEq)]
pub enum RunStep {
    /// Start (or restart) the libvirt migration job.
    StartJob,
    /// Report progress and look again.
    Watch,
    /// Abort the job: it ran out of time.
    AbortTimeout,
    /// The domain is on the target only: done (remove any inactive leftover on the source).
    Complete,
    /// It failed and the domain is on the source: remove any leftover on the target.
    RollBack(String),
    /// Stop: the domain is in a state the operator must not touch (reported).
    Stuck(String),
}

/// The Running phase's decision, from where the domain is and the job's state.
pub fn running_step(
    m: &Migration,
    uid: &str,
    observed: &Observed,
    task: &Task,
    elapsed: Duration,
) -> RunStep {
    let ours = |d: &Option<super::observe::DomainAt>| {
        d.as_ref()
            .is_some_and(|x| x.owner_uid.as_deref() == Some(uid))
    };
    let live = m
        .status
        .as_ref()
        .and_then(|s| s.effective_mode)
        .unwrap_or(MigrationMode::Live)
        != MigrationMode::Cold;
    let timeout = Duration::from_secs(m.spec.completion_timeout_seconds);
    let on_target = ours(&observed.target)
        && observed.target.as_ref().is_some_and(|t| {
            t.job.is_none()
                && if live {
                    t.state == DomainState::Running || t.state == DomainState::Paused
                } else {
                    true
                }
        });
    let on_source = ours(&observed.source);
    match task {
        Task::Running if elapsed > timeout => RunStep::AbortTimeout,
        Task::Running => RunStep::Watch,
        Task::Done(Err(e)) if on_source => RunStep::RollBack(e.clone()),
        _ if on_target && !on_source => RunStep::Complete,
        // libvirt undefines the source last: a finished live migration may leave it briefly
        _ if on_target
            && observed
                .source
                .as_ref()
                .is_some_and(|s| s.state == DomainState::Shutoff) =>
        {
            RunStep::Complete
        }
        Task::Done(Ok(())) if on_source => RunStep::Stuck(
            "libvirt reported success but the domain is still on the source; nothing is changed until a person checks both nodes".into(),
        ),
        _ if on_source && observed.source.as_ref().is_some_and(|s| s.job.is_some()) => {
            if elapsed > timeout {
                RunStep::AbortTimeout
            } else {
                RunStep::Watch
            }
        }
        _ if on_source && elapsed > timeout => RunStep::RollBack(format!(
            "not completed within spec.completionTimeoutSeconds ({}s)",
            timeout.as_secs()
        )),
        Task::Absent | Task::Done(Ok(())) if on_source => RunStep::StartJob,
        Task::Done(Err(e)) => RunStep::Stuck(format!(
            "the job failed ({e}) and the domain is not on the source"
        )),
        _ => RunStep::Stuck(
            "the domain is on neither node (or not ours); nothing is created or started until a person checks".into(),
        ),
    }
}

/// Live or cold, from the spec and the domain's state on the source.
pub fn effective_mode(spec: MigrationMode, state: DomainState) -> Result<MigrationMode, String> {
    let running = matches!(state, DomainState::Running | DomainState::Paused);
    match (spec, running) {
        (MigrationMode::Auto, true) | (MigrationMode::Live, true) => Ok(MigrationMode::Live),
        (MigrationMode::Auto, false) | (MigrationMode::Cold, false) => Ok(MigrationMode::Cold),
        (MigrationMode::Live, false) => Err("spec.mode is Live but the VM is not running: use Cold or Auto".into()),
        (MigrationMode::Cold, true) => Err("spec.mode is Cold but the VM is running: stop it first (spec.runStrategy: Stopped) or use Live or Auto".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::observe::DomainAt;
    use super::*;

    fn mig(mode: &str, timeout: u64) -> Migration {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kvm-operator.io/v1alpha1", "kind": "Migration",
            "metadata": {"name": "m", "namespace": "ns"},
            "spec": {"vmName": "web", "completionTimeoutSeconds": timeout},
            "status": {"phase": "Running", "effectiveMode": mode},
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn at(state: DomainState, uid: &str, job: bool) -> Option<DomainAt> {
        Some(DomainAt {
            state,
            owner_uid: Some(uid.into()),
            job: job.then(Default::default),
        })
    }

    #[test]
    fn the_transition_function_allows_only_the_documented_moves() {
        use MigrationPhase as P;
        assert_eq!(transition(None, Event::Queue), Ok(P::Pending));
        assert_eq!(
            transition(Some(P::Pending), Event::Schedule),
            Ok(P::Scheduling)
        );
        assert_eq!(
            transition(Some(P::Scheduling), Event::Start),
            Ok(P::Running)
        );
        assert_eq!(
            transition(Some(P::Running), Event::Complete),
            Ok(P::Succeeded)
        );
        assert_eq!(
            transition(Some(P::Running), Event::Cancel),
            Ok(P::Cancelled)
        );
        assert_eq!(transition(Some(P::Scheduling), Event::Fail), Ok(P::Failed));
        for terminal in [P::Succeeded, P::Failed, P::Cancelled] {
            for ev in [
                Event::Queue,
                Event::Schedule,
                Event::Start,
                Event::Complete,
                Event::Fail,
                Event::Cancel,
            ] {
                assert!(
                    transition(Some(terminal), ev).is_err(),
                    "{terminal:?} {ev:?}"
                );
            }
        }
        assert!(transition(Some(P::Pending), Event::Complete).is_err());
        assert!(transition(Some(P::Pending), Event::Start).is_err());
    }

    #[test]
    fn running_decisions_follow_where_the_domain_is() {
        use DomainState::*;
        let m = mig("Live", 60);
        let s = Duration::from_secs(1);
        let o = |src, tgt| Observed {
            source: src,
            target: tgt,
        };
        // not started (or the operator restarted): start
        assert_eq!(
            running_step(&m, "u", &o(at(Running, "u", false), None), &Task::Absent, s),
            RunStep::StartJob
        );
        // a job runs on the source (started before a restart): watch, abort when late
        assert_eq!(
            running_step(
                &m,
                "u",
                &o(at(Running, "u", true), at(Paused, "u", true)),
                &Task::Absent,
                s
            ),
            RunStep::Watch
        );
        assert_eq!(
            running_step(
                &m,
                "u",
                &o(at(Running, "u", true), None),
                &Task::Running,
                Duration::from_secs(61)
            ),
            RunStep::AbortTimeout
        );
        // done: only on the target
        assert_eq!(
            running_step(
                &m,
                "u",
                &o(None, at(Running, "u", false)),
                &Task::Done(Ok(())),
                s
            ),
            RunStep::Complete
        );
        assert_eq!(
            running_step(&m, "u", &o(None, at(Running, "u", false)), &Task::Absent, s),
            RunStep::Complete
        );
        // failed: still on the source
        assert_eq!(
            running_step(
                &m,
                "u",
                &o(at(Running, "u", false), None),
                &Task::Done(Err("x".into())),
                s
            ),
            RunStep::RollBack("x".into())
        );
        // late without a job: roll back
        assert!(matches!(
            running_step(
                &m,
                "u",
                &o(at(Running, "u", false), None),
                &Task::Absent,
                Duration::from_secs(61)
            ),
            RunStep::RollBack(_)
        ));
        // nowhere, or someone else's: never create anything
        assert!(matches!(
            running_step(&m, "u", &o(None, None), &Task::Absent, s),
            RunStep::Stuck(_)
        ));
        assert!(matches!(
            running_step(
                &m,
                "u",
                &o(at(Running, "other", false), None),
                &Task::Absent,
                s
            ),
            RunStep::Stuck(_)
        ));
        // cold: a defined (off) domain on the target is done
        let c = mig("Cold", 60);
        assert_eq!(
            running_step(
                &c,
                "u",
                &o(None, at(Shutoff, "u", false)),
                &Task::Done(Ok(())),
                s
            ),
            RunStep::Complete
        );
    }

    #[test]
    fn modes_follow_the_spec_and_the_domain_state() {
        use DomainState::*;
        assert_eq!(
            effective_mode(MigrationMode::Auto, Running),
            Ok(MigrationMode::Live)
        );
        assert_eq!(
            effective_mode(MigrationMode::Auto, Shutoff),
            Ok(MigrationMode::Cold)
        );
        assert!(effective_mode(MigrationMode::Live, Shutoff).is_err());
        assert!(
            effective_mode(MigrationMode::Cold, Running)
                .unwrap_err()
                .contains("Stopped")
        );
    }
}
