//! Running migration jobs. A libvirt migration blocks its caller until it ends, so each runs on
//! its own task; reconciles only look at it (progress, outcome) and abort it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use tokio::task::JoinHandle;

use crate::hypervisor::migration::MigrateOptions;
use crate::hypervisor::{DomainState, HvError, Hypervisor};

use super::plan::Task;

/// How long a migration start refused as busy ([`HvError::is_busy`]) is retried.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
const BUSY_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

/// The migration jobs this process runs, by Migration UID.
#[derive(Default)]
pub struct Jobs {
    map: Mutex<HashMap<String, JoinHandle<()>>>,
    /// Outcomes of the jobs that ended, written by each job's task before it signals `ended`.
    results: Arc<Mutex<HashMap<String, Result<(), String>>>>,
    /// Signalled when a job ends, so that its Migration is looked at without waiting for its
    /// requeue (one waiter: the standalone loop, or the cluster's trigger stream).
    ended: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.map.lock().map(|m| m.len()).unwrap_or(0);
        f.debug_struct("Jobs").field("running", &n).finish()
    }
}

impl Jobs {
    fn lock_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, JoinHandle<()>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_results(&self) -> std::sync::MutexGuard<'_, HashMap<String, Result<(), String>>> {
        self.results.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The job's state; a finished job's result is taken (reported once).
    pub fn state(&self, uid: &str) -> Task {
        let mut m = self.lock_map();
        if let Some(r) = self.lock_results().remove(uid) {
            m.remove(uid);
            return Task::Done(r);
        }
        match m.get(uid) {
            None => Task::Absent,
            Some(h) if !h.is_finished() => Task::Running,
            // ended without writing its outcome: it panicked or was cancelled
            Some(_) => {
                let why = match m.remove(uid).and_then(|h| h.now_or_never()) {
                    Some(Err(join)) => format!("the migration task failed: {join}"),
                    _ => "the migration task ended without an outcome".to_string(),
                };
                Task::Done(Err(why))
            }
        }
    }

    /// True when the job of `uid` has ended and its result is not taken yet.
    pub fn has_ended(&self, uid: &str) -> bool {
        self.ended_uids().iter().any(|u| u == uid)
    }

    /// The UIDs of the jobs that have ended and whose results are not taken yet.
    pub fn ended_uids(&self) -> Vec<String> {
        let m = self.lock_map();
        let mut uids: Vec<String> = self.lock_results().keys().cloned().collect();
        uids.extend(
            m.iter()
                .filter(|(u, h)| h.is_finished() && !uids.contains(u))
                .map(|(u, _)| u.clone())
                .collect::<Vec<_>>(),
        );
        uids
    }

    /// Resolves when a job has ended since the last call (a job that ended while nobody waited
    /// is not missed).
    pub async fn ended(&self) {
        self.ended.notified().await;
    }

    /// Starts migrating `domain` from `source` to `target`.
    pub fn start<H: Hypervisor>(
        &self,
        uid: &str,
        hv: &Arc<H>,
        source: &str,
        target: &str,
        domain: &str,
        opts: MigrateOptions,
    ) {
        let (hv, s, t, d) = (
            hv.clone(),
            source.to_string(),
            target.to_string(),
            domain.to_string(),
        );
        let (ended, results, key) = (self.ended.clone(), self.results.clone(), uid.to_string());
        let job = async move {
            // a job that just ended (an abort, a migration before this one) can hold the domain
            // on either host for a moment; libvirt then refuses before anything moves: try again
            let mut waited = std::time::Duration::ZERO;
            loop {
                let (dn, o) = (d.clone(), opts.clone());
                match hv
                    .call_pair(&s, &t, "migrate", move |src, dst| src.migrate(&dn, dst, &o))
                    .await
                {
                    Err(e) if e.is_busy() && waited < BUSY_WAIT => {
                        tracing::info!(domain = %d, error = %e, "migration start refused while another job winds down; retrying");
                        tokio::time::sleep(BUSY_RETRY).await;
                        waited += BUSY_RETRY;
                    }
                    r => return r,
                }
            }
        };
        // the handle is registered before the task can write its outcome
        let mut map = self.lock_map();
        let task = tokio::spawn(async move {
            let r = job.await.map_err(|e| e.to_string());
            results
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, r);
            ended.notify_one();
        });
        map.insert(uid.to_string(), task);
    }
}

/// Aborts the job on `domain` at `source`.
pub async fn abort(hv: &impl Hypervisor, source: &str, domain: &str) -> Result<(), HvError> {
    let d = domain.to_string();
    hv.call(source, "abort migration", move |c| match c.abort_job(&d) {
        // no job any more: it ended on its own
        Err(HvError::Libvirt { .. }) if !c.job_progress(&d).map(|j| j.active).unwrap_or(false) => {
            Ok(())
        }
        other => other,
    })
    .await
}

/// Which stopped copies [`remove_leftover`] may remove.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leftover {
    /// Any stopped copy of ours: the caller has just seen the other node hold the VM in a way
    /// no later step can undo (the source running while the target's copy is paused, or the
    /// target's copy complete while the source is gone or paused).
    Any,
    /// Not a paused copy that is persistent: libvirt's Finish made it so after taking the whole
    /// stream, and it may be the only complete guest when the source finished its side since the
    /// caller looked (a job of another process, or a link lost at the switch-over). Such a copy
    /// makes the call fail, so the Migration holds and its next look decides.
    SpareComplete,
}

/// Removes a copy of `domain` on `node` that carries `uid`'s stamp and does not run: a shut-off
/// one is undefined; a paused one without a job (a migration's copy stopped at switch-over) is
/// destroyed, then undefined, unless `which` spares it. Callers decide that the other node holds
/// the VM first. A running domain, one with a job, or one not ours is never touched; a copy of
/// ours that runs (or one with a job, or a spared one) is an error, so that no caller goes on
/// as if the node were clear of the VM. True when something was removed.
pub async fn remove_leftover(
    hv: &impl Hypervisor,
    node: &str,
    domain: &str,
    uid: &str,
    which: Leftover,
) -> Result<bool, HvError> {
    let (d, u) = (domain.to_string(), uid.to_string());
    hv.call(node, "remove migration leftover", move |c| {
        let state = match c.state(&d) {
            Ok(s) => s,
            Err(HvError::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        let ours = c
            .persistent_xml(&d)
            .ok()
            .and_then(|x| x.owner().map(|o| o.uid == u))
            .unwrap_or(false);
        if !ours {
            return Ok(false);
        }
        match state {
            DomainState::Shutoff => {}
            DomainState::Paused => {
                if c.job_progress(&d).map(|j| j.active).unwrap_or(true) {
                    return Err(HvError::Local {
                        cause: format!(
                            "the paused copy of {d} on {node} still has a libvirt job; it is removed once that ends",
                            node = c.node()
                        ),
                    });
                }
                if which == Leftover::SpareComplete && c.is_persistent(&d)? {
                    return Err(HvError::Local {
                        cause: format!(
                            "the paused copy of {d} on {node} is complete (libvirt made it persistent at the switch-over); both nodes are looked at again before either copy is removed",
                            node = c.node()
                        ),
                    });
                }
                tracing::warn!(domain = %d, node = c.node(), "destroying the paused copy a migration left; the VM runs from the other node");
                c.destroy(&d)?;
            }
            // a copy of ours that runs may be the guest: it is never touched, and the caller
            // does not go on as if the node were clear of it
            other => {
                return Err(HvError::Local {
                    cause: format!(
                        "the copy of {d} on {node} is {other:?}, not stopped; a running copy may be the guest, so it is left alone and both nodes are looked at again",
                        node = c.node()
                    ),
                });
            }
        }
        // a transient copy is gone once destroyed
        match c.undefine(&d) {
            Ok(()) | Err(HvError::NotFound { .. }) => Ok(true),
            Err(e) => Err(e),
        }
    })
    .await
}

/// Downtime (ms) and duration (ms) of the finished migration, read on the target.
pub async fn completed(
    hv: &impl Hypervisor,
    target: &str,
    domain: &str,
) -> Option<(Option<u64>, u64)> {
    let d = domain.to_string();
    hv.call(target, "completed migration stats", move |c| {
        c.completed_job(&d)
    })
    .await
    .ok()
    .map(|j| (j.downtime_ms, j.elapsed_ms))
}
