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
    map: Mutex<HashMap<String, JoinHandle<Result<(), HvError>>>>,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.map.lock().map(|m| m.len()).unwrap_or(0);
        f.debug_struct("Jobs").field("running", &n).finish()
    }
}

impl Jobs {
    /// The job's state; a finished job's result is taken (reported once).
    pub fn state(&self, uid: &str) -> Task {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(uid) {
            None => Task::Absent,
            Some(h) if !h.is_finished() => Task::Running,
            Some(_) => {
                let r = m
                    .remove(uid)
                    .and_then(|h| h.now_or_never())
                    .map(|r| match r {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(join) => Err(format!("the migration task failed: {join}")),
                    })
                    .unwrap_or_else(|| Err("the migration task vanished".into()));
                Task::Done(r)
            }
        }
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
        let task = tokio::spawn(async move {
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
        });
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid.to_string(), task);
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

/// Removes a copy of `domain` on `node` that carries `uid`'s stamp and does not run: a shut-off
/// one is undefined; a paused one without a job (a migration's copy stopped at switch-over) is
/// destroyed, then undefined. Callers decide that the other node holds the VM first. A running
/// domain, one with a job, or one not ours is never touched. True when something was removed.
pub async fn remove_leftover(
    hv: &impl Hypervisor,
    node: &str,
    domain: &str,
    uid: &str,
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
                tracing::warn!(domain = %d, node = c.node(), "destroying the paused copy a migration left; the VM runs from the other node");
                c.destroy(&d)?;
            }
            _ => return Ok(false),
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
