//! A Migration's status: phase through the transition function, message, progress, a Ready
//! condition Argo CD and Flux can read (True once Succeeded).

use std::ops::ControlFlow;
use std::time::Duration;

use crate::api::condition::{self, set_condition};
use crate::api::migration::{Migration, MigrationPhase, MigrationProgress, MigrationStatus};
use crate::controller::{Note, Outcome};
use crate::hypervisor::migration::JobProgress;

use super::plan::{Event, transition};

/// Builds one reconcile's status and Events.
pub struct Builder {
    generation: Option<i64>,
    name: String,
    pub status: MigrationStatus,
    notes: Vec<Note>,
}

impl Builder {
    pub fn new(m: &Migration) -> Self {
        let mut status = m.status.clone().unwrap_or_default();
        status.observed_generation = m.metadata.generation;
        Self {
            generation: m.metadata.generation,
            name: crate::controller::describe(m),
            status,
            notes: Vec::new(),
        }
    }

    pub fn note(&mut self, n: Note) {
        self.notes.push(n);
    }

    fn ready(&mut self, ok: bool, reason: &'static str, msg: &str) {
        set_condition(
            &mut self.status.conditions,
            condition::condition(
                condition::READY,
                ok,
                reason,
                msg,
                self.generation,
                crate::controller::now(),
            ),
        );
    }

    fn finish(self, requeue: Option<Duration>) -> Outcome<MigrationStatus> {
        Outcome {
            status: self.status,
            notes: self.notes,
            requeue,
        }
    }

    /// Moves to the next phase through the transition function.
    pub fn go(mut self, ev: Event, reason: &'static str, msg: String) -> Outcome<MigrationStatus> {
        match self.enter(ev, reason, msg) {
            Ok(next) => {
                let requeue = (!next.is_terminal()).then_some(Duration::from_secs(1));
                self.finish(requeue)
            }
            Err(why) => self.illegal(why),
        }
    }

    /// Moves to the next phase and lets the same reconcile decide the next step: for phases
    /// whose decision needs nothing written first (Queued, then Scheduling). An illegal
    /// transition is reported as [`Builder::go`] reports it.
    pub fn advance(
        mut self,
        ev: Event,
        reason: &'static str,
        msg: String,
    ) -> ControlFlow<Outcome<MigrationStatus>, Self> {
        match self.enter(ev, reason, msg) {
            Ok(_) => ControlFlow::Continue(self),
            Err(why) => ControlFlow::Break(self.illegal(why)),
        }
    }

    fn illegal(mut self, why: String) -> Outcome<MigrationStatus> {
        self.notes
            .push(Note::warning("IllegalTransition", "Migrate", why.clone()));
        self.status.message = Some(why);
        self.finish(Some(Duration::from_secs(60)))
    }

    fn enter(
        &mut self,
        ev: Event,
        reason: &'static str,
        msg: String,
    ) -> Result<MigrationPhase, String> {
        let next = transition(self.status.phase, ev)?;
        self.status.phase = Some(next);
        self.ready(next == MigrationPhase::Succeeded, reason, &msg);
        if next == MigrationPhase::Failed {
            let m = format!("{}: {msg}", self.name);
            self.notes.push(Note::warning(reason, "Migrate", m));
        }
        self.status.message = Some(msg);
        Ok(next)
    }

    /// Stays in the phase, saying why.
    pub fn hold(mut self, reason: &'static str, msg: String) -> Outcome<MigrationStatus> {
        self.status.message = Some(msg.clone());
        self.ready(false, reason, &msg);
        self.finish(Some(Duration::from_secs(10)))
    }

    /// Nothing changes.
    pub fn wait(self, requeue: Option<Duration>) -> Outcome<MigrationStatus> {
        self.finish(requeue)
    }

    pub fn progress(&mut self, j: &JobProgress) {
        self.status.progress = Some(MigrationProgress {
            data_total: j.data_total,
            data_processed: j.data_processed,
            data_remaining: j.data_remaining,
            percent: format!("{}%", j.percent()),
        });
    }

    pub fn done_progress(&mut self) {
        if let Some(p) = self.status.progress.as_mut() {
            p.percent = "100%".into();
            p.data_remaining = 0;
        }
    }
}

impl<S> Outcome<S> {
    /// The same outcome, looked at again after `d`.
    pub fn requeue_after(mut self, d: Duration) -> Self {
        self.requeue = Some(d);
        self
    }
}
