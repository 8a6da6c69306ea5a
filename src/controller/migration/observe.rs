//! Where a migrating VM's domain is: on the source, the target, or both, and the job on it.

use crate::hypervisor::migration::JobProgress;
use crate::hypervisor::{DomainState, HvError, Hypervisor};

/// The domain on one node.
#[derive(Clone, Debug, PartialEq)]
pub struct DomainAt {
    pub state: DomainState,
    /// UID in our stamp, when stamped.
    pub owner_uid: Option<String>,
    /// Defined persistently (a target's copy becomes persistent only when libvirt's Finish step
    /// has taken the whole migration stream; before that it is transient).
    pub persistent: bool,
    /// The job running on it, when one runs.
    pub job: Option<JobProgress>,
}

/// The domain on the source and on the target (None: not defined there).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    pub source: Option<DomainAt>,
    pub target: Option<DomainAt>,
}

async fn at(hv: &impl Hypervisor, node: &str, domain: &str) -> Result<Option<DomainAt>, HvError> {
    let d = domain.to_string();
    hv.call(node, "read migrating domain", move |c| {
        let state = match c.state(&d) {
            Ok(s) => s,
            Err(HvError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let owner_uid = c
            .persistent_xml(&d)
            .ok()
            .or_else(|| c.domain_xml(&d).ok())
            .and_then(|x| x.owner().map(|o| o.uid.clone()));
        let job = c.job_progress(&d).ok().filter(|j| j.active);
        let persistent = match c.is_persistent(&d) {
            Ok(p) => p,
            Err(HvError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(Some(DomainAt {
            state,
            owner_uid,
            persistent,
            job,
        }))
    })
    .await
}

/// Reads both nodes (the target only when one is chosen).
pub async fn observe(
    hv: &impl Hypervisor,
    source: &str,
    target: Option<&str>,
    domain: &str,
) -> Result<Observed, HvError> {
    // the target first: a source then seen running has not handed the guest over since, so a
    // stopped copy seen on the target can be told from one a switch-over just completed
    let target = match target {
        Some(t) => at(hv, t, domain).await?,
        None => None,
    };
    let source = at(hv, source, domain).await?;
    Ok(Observed { source, target })
}
