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
    let source = observed.source.as_ref().filter(|_| on_source);
    let target = observed.target.as_ref().filter(|_| ours(&observed.target));
    let idle_in = |d: Option<&super::observe::DomainAt>, state: DomainState| {
        d.is_some_and(|d| d.job.is_none() && d.state == state)
    };
    let runs =
        |d: Option<&super::observe::DomainAt>| d.is_some_and(|d| d.state == DomainState::Running);
    match task {
        Task::Running if elapsed > timeout => RunStep::AbortTimeout,
        Task::Running => RunStep::Watch,
        // never made by this operator (the target stays paused until the source is gone), but
        // if it is so, nothing is touched and a person is told
        _ if live && runs(source) && runs(target) => RunStep::Stuck(
            "the domain runs on both the source and the target; nothing is changed until a person stops one of them".into(),
        ),
        // the target's copy runs: this operator resumed it after libvirt's Finish took the
        // whole stream (or a post-copy switch-over ran it), so it is the guest, whatever the job
        // reported and whether that report was seen (a look that took the job's outcome and
        // then waited on a removal has lost it). The source's copy, paused at the switch-over
        // (its Confirm lost with the link) or off, is what the move left: it is removed and
        // never resumed, and no job starts again onto the running copy
        _ if live && runs(target) && target.is_some_and(|t| t.job.is_some()) => {
            RunStep::Watch
        }
        _ if live && runs(target) => RunStep::Complete,
        // both stopped at switch-over: libvirt's Finish took the whole stream on the target (its
        // copy is persistent) but the source was never told the outcome (the link to a node was
        // lost just then). The target's copy is the complete guest: the source's is removed and
        // the target's is the one the VM resumes.
        _ if live
            && idle_in(source, DomainState::Paused)
            && idle_in(target, DomainState::Paused)
            && target.is_some_and(|t| t.persistent) =>
        {
            RunStep::Complete
        }
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
            persistent: true,
            job: job.then(Default::default),
        })
    }

    /// A target's copy before libvirt's Finish step made it persistent.
    fn transient(state: DomainState, uid: &str) -> Option<DomainAt> {
        at(state, uid, false).map(|d| DomainAt {
            persistent: false,
            ..d
        })
    }

    /// The link to a node lost at switch-over (the target's copy waits paused): whatever the
    /// job says, exactly one copy is kept and it is never one that another copy could race.
    #[test]
    fn a_switch_over_lost_to_a_cut_link_keeps_exactly_one_copy() {
        use DomainState::*;
        let m = mig("Live", 60);
        let s = Duration::from_secs(1);
        let o = |src, tgt| Observed {
            source: src,
            target: tgt,
        };
        let failed = Task::Done(Err("unable to connect".into()));
        for task in [&failed, &Task::Absent] {
            // the source was told it failed and runs again: the paused copy on the target goes
            // (with the job gone, the operator restarted, the same)
            let step = running_step(
                &m,
                "u",
                &o(at(Running, "u", false), at(Paused, "u", false)),
                task,
                s,
            );
            assert!(
                matches!(step, RunStep::RollBack(_) | RunStep::StartJob),
                "{task:?}: {step:?}"
            );
            // the source never heard the outcome and both wait paused: the target took the whole
            // stream (persistent), so it is the VM and the source's copy goes
            assert_eq!(
                running_step(
                    &m,
                    "u",
                    &o(at(Paused, "u", false), at(Paused, "u", false)),
                    task,
                    s
                ),
                RunStep::Complete,
                "{task:?}"
            );
            // ... but a transient target copy never had the whole stream: back to the source
            assert!(
                matches!(
                    running_step(
                        &m,
                        "u",
                        &o(at(Paused, "u", false), transient(Paused, "u")),
                        task,
                        s
                    ),
                    RunStep::RollBack(_) | RunStep::StartJob
                ),
                "{task:?}"
            );
            // running on both (libvirt's own order, not ours): nothing is touched
            assert!(
                matches!(
                    running_step(
                        &m,
                        "u",
                        &o(at(Running, "u", false), at(Running, "u", false)),
                        task,
                        s
                    ),
                    RunStep::Stuck(why) if why.contains("both")
                ),
                "{task:?}"
            );
        }
        // while the job runs (or a job still holds a copy) nothing is decided
        assert_eq!(
            running_step(
                &m,
                "u",
                &o(at(Paused, "u", true), at(Paused, "u", false)),
                &Task::Absent,
                s
            ),
            RunStep::Watch
        );
        assert_eq!(
            running_step(
                &m,
                "u",
                &o(at(Running, "u", false), at(Running, "u", false)),
                &Task::Running,
                s
            ),
            RunStep::Watch
        );
    }

    /// The link to the source cut after libvirt's Finish: the job reported success (the source's
    /// Confirm was lost), the operator resumed the target's copy, and the source's copy waits
    /// paused. Whether the look sees the job's outcome, lost it (taken by a look that then had
    /// to wait), or sees a later attempt's failure, the running target is the guest: the move
    /// completes, and neither a new job onto it nor a roll-back to the paused source is chosen.
    #[test]
    fn a_running_target_is_the_guest_whatever_the_job_reported() {
        use DomainState::*;
        let m = mig("Live", 60);
        let o = |src, tgt| Observed {
            source: src,
            target: tgt,
        };
        let failed = Task::Done(Err("domain is already active".into()));
        for task in [&Task::Absent, &Task::Done(Ok(())), &failed] {
            for elapsed in [Duration::from_secs(1), Duration::from_secs(61)] {
                for source in [
                    at(Paused, "u", false),
                    at(Paused, "u", true),
                    at(Shutoff, "u", false),
                    None,
                ] {
                    assert_eq!(
                        running_step(
                            &m,
                            "u",
                            &o(source.clone(), at(Running, "u", false)),
                            task,
                            elapsed
                        ),
                        RunStep::Complete,
                        "{task:?} {elapsed:?} source {source:?}"
                    );
                }
                // a post-copy target still pulls pages: nothing is decided yet
                assert_eq!(
                    running_step(
                        &m,
                        "u",
                        &o(at(Paused, "u", true), at(Running, "u", true)),
                        task,
                        elapsed
                    ),
                    RunStep::Watch,
                    "{task:?}"
                );
                // both run, with or without a job: a person decides
                assert!(
                    matches!(
                        running_step(
                            &m,
                            "u",
                            &o(at(Running, "u", true), at(Running, "u", false)),
                            task,
                            elapsed
                        ),
                        RunStep::Stuck(why) if why.contains("both")
                    ),
                    "{task:?}"
                );
            }
        }
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
