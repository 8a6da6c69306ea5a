//! Leader election with a `coordination.k8s.io/v1` Lease, so two replicas never both act.
//!
//! The decision is pure ([`decide`]); the glue reads the Lease, writes it with the
//! `resourceVersion` it read (so of two replicas racing for it, the API server lets exactly one
//! write win and answers the other 409), and renews it every `renew` while leading. A leader that
//! cannot renew before its lease runs out stops leading: `run` stops the controllers and the
//! process exits, so a replica that lost the lease (a network partition, a long pause) can never
//! keep acting next to the new leader. A standby takes over only after the lease has expired
//! by the holder's own duration.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

/// Name of the Lease (in the operator's namespace).
pub const LEASE_NAME: &str = "kvm-operator-leader";

/// What a replica should do about the Lease.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// No Lease yet: create it, held by us.
    Create,
    /// The Lease is free (expired, or released): take it over, counting a transition.
    Take { transitions: i32 },
    /// We hold it: renew it.
    Renew,
    /// Another replica holds it until `until`.
    Wait { holder: String, until: Timestamp },
}

/// The decision for replica `me` given the Lease as read at `now`.
pub fn decide(lease: Option<&Lease>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return if lease.is_none() {
            Decision::Create
        } else {
            Decision::Take { transitions: 0 }
        };
    };
    let transitions = spec.lease_transitions.unwrap_or(0);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder.is_empty() {
        return Decision::Take {
            transitions: transitions + 1,
        };
    }
    if holder == me {
        return Decision::Renew;
    }
    let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64);
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0);
    let until = renewed
        .and_then(|r| r.checked_add(duration).ok())
        .unwrap_or(now);
    if until <= now {
        Decision::Take {
            transitions: transitions + 1,
        }
    } else {
        Decision::Wait { holder, until }
    }
}

/// The Lease held by `me` from `now`.
pub fn held(
    prior: Option<&Lease>,
    me: &str,
    now: Timestamp,
    duration: Duration,
    d: &Decision,
) -> Lease {
    let mut lease = prior.cloned().unwrap_or_default();
    lease.metadata.name = Some(LEASE_NAME.to_string());
    let old = lease.spec.take().unwrap_or_default();
    let acquire = match d {
        Decision::Renew => old.acquire_time.clone().unwrap_or(MicroTime(now)),
        _ => MicroTime(now),
    };
    lease.spec = Some(LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(duration.as_secs().clamp(1, i32::MAX as u64) as i32),
        acquire_time: Some(acquire),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(match d {
            Decision::Take { transitions } => *transitions,
            _ => old.lease_transitions.unwrap_or(0),
        }),
        ..old
    });
    lease
}

/// Timing of the election.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long a lease lasts without renewal.
    pub lease: Duration,
    /// How often the leader renews (well under `lease`).
    pub renew: Duration,
    /// How often a standby looks again.
    pub retry: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(15),
            renew: Duration::from_secs(5),
            retry: Duration::from_secs(2),
        }
    }
}

/// One attempt: read the Lease and create, take or renew it. `Ok(true)` when `me` holds it
/// now; `Ok(false)` when another replica does (or won a race for it).
pub async fn try_acquire(api: &Api<Lease>, me: &str, timing: &Timing) -> Result<bool, kube::Error> {
    let lease = api.get_opt(LEASE_NAME).await?;
    let now = Timestamp::now();
    let d = decide(lease.as_ref(), me, now);
    let write = match &d {
        Decision::Wait { holder, until } => {
            tracing::debug!(%holder, %until, "another replica leads");
            return Ok(false);
        }
        Decision::Create => {
            api.create(
                &PostParams::default(),
                &held(None, me, now, timing.lease, &d),
            )
            .await
        }
        Decision::Take { .. } | Decision::Renew => {
            api.replace(
                LEASE_NAME,
                &PostParams::default(),
                &held(lease.as_ref(), me, now, timing.lease, &d),
            )
            .await
        }
    };
    match write {
        Ok(_) => {
            if !matches!(d, Decision::Renew) {
                tracing::info!(identity = me, "acquired the leader Lease");
            }
            Ok(true)
        }
        // another replica wrote first (its create or its update won)
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Waits until `me` leads, retrying every `timing.retry`; `on_standby` is called once the
/// replica knows it is a standby (leadership is settled: it may report ready).
pub async fn acquire(
    api: &Api<Lease>,
    me: &str,
    timing: &Timing,
    mut on_standby: impl FnMut(),
) -> Result<(), kube::Error> {
    loop {
        match try_acquire(api, me, timing).await {
            Ok(true) => return Ok(()),
            Ok(false) => on_standby(),
            Err(e) => tracing::warn!(error = %e, "cannot read or write the leader Lease; retrying"),
        }
        tokio::time::sleep(timing.retry).await;
    }
}

/// Renews the Lease every `timing.renew` while leading; returns when leadership is lost: another
/// replica holds it, or it could not be renewed before it ran out.
pub async fn keep(api: &Api<Lease>, me: &str, timing: &Timing) -> String {
    use tokio::time::{Instant, sleep_until, timeout_at};
    // the lease counts from the renewTime written, which is set before the request is sent:
    // count from the start of the attempt that succeeded
    let mut renewed_at = Instant::now();
    loop {
        // give up one renew period before the lease runs out, however slow the API server is
        let deadline = renewed_at + timing.lease.saturating_sub(timing.renew);
        sleep_until((Instant::now() + timing.renew).min(deadline)).await;
        let started = Instant::now();
        match timeout_at(deadline, try_acquire(api, me, timing)).await {
            Ok(Ok(true)) => renewed_at = started,
            Ok(Ok(false)) => return "another replica holds the leader Lease".into(),
            Ok(Err(e)) if Instant::now() >= deadline => {
                return format!("the leader Lease could not be renewed in time: {e}");
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "leader Lease renewal failed; retrying");
            }
            Err(_) => {
                return "the leader Lease could not be renewed in time: the API server did not answer before the lease ran out".into();
            }
        }
    }
}

/// Gives the Lease up on a clean shutdown, so a standby takes over at once instead of waiting
/// for it to expire.
pub async fn release(api: &Api<Lease>, me: &str) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(LEASE_NAME).await? else {
        return Ok(());
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(());
    };
    if spec.holder_identity.as_deref() != Some(me) {
        return Ok(());
    }
    spec.holder_identity = None;
    api.replace(LEASE_NAME, &PostParams::default(), &lease)
        .await
        .map(|_| ())
}

/// This replica's identity: the pod's name, else host name and process id.
pub fn identity() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "unknown".into());
            format!("{host}-{}", std::process::id())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed_secs_ago: i64, duration: i32, transitions: i32) -> Lease {
        let now = Timestamp::from_second(1_000_000).unwrap();
        Lease {
            metadata: Default::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(duration),
                acquire_time: Some(MicroTime(Timestamp::from_second(1_000_000 - 100).unwrap())),
                renew_time: Some(MicroTime(
                    now.checked_sub(jiff_secs(renewed_secs_ago)).unwrap(),
                )),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        }
    }

    fn jiff_secs(s: i64) -> k8s_openapi::jiff::SignedDuration {
        k8s_openapi::jiff::SignedDuration::from_secs(s)
    }

    #[test]
    fn the_decision_table() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        assert_eq!(decide(None, "a", now), Decision::Create);
        assert_eq!(
            decide(Some(&lease("a", 3, 15, 2)), "a", now),
            Decision::Renew
        );
        // held by b and fresh: wait until it would expire
        assert_eq!(
            decide(Some(&lease("b", 3, 15, 2)), "a", now),
            Decision::Wait {
                holder: "b".into(),
                until: now.checked_add(jiff_secs(12)).unwrap()
            }
        );
        // held by b but expired (exactly, and long ago): take it, one more transition
        assert_eq!(
            decide(Some(&lease("b", 15, 15, 2)), "a", now),
            Decision::Take { transitions: 3 }
        );
        assert_eq!(
            decide(Some(&lease("b", 3600, 15, 2)), "a", now),
            Decision::Take { transitions: 3 }
        );
        // released (no holder): take it
        assert_eq!(
            decide(Some(&lease("", 1, 15, 2)), "a", now),
            Decision::Take { transitions: 3 }
        );
        // a Lease without spec or times: free
        assert_eq!(
            decide(Some(&Lease::default()), "a", now),
            Decision::Take { transitions: 0 }
        );
    }

    #[test]
    fn a_renewal_keeps_the_acquire_time_and_a_takeover_resets_it() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let prior = lease("a", 3, 15, 2);
        let renewed = held(
            Some(&prior),
            "a",
            now,
            Duration::from_secs(15),
            &Decision::Renew,
        );
        let s = renewed.spec.unwrap();
        assert_eq!(s.acquire_time, prior.spec.as_ref().unwrap().acquire_time);
        assert_eq!(s.renew_time, Some(MicroTime(now)));
        assert_eq!(s.lease_transitions, Some(2));
        let taken = held(
            Some(&lease("b", 60, 15, 2)),
            "a",
            now,
            Duration::from_secs(15),
            &Decision::Take { transitions: 3 },
        );
        let s = taken.spec.unwrap();
        assert_eq!(s.holder_identity.as_deref(), Some("a"));
        assert_eq!(s.acquire_time, Some(MicroTime(now)));
        assert_eq!(s.lease_transitions, Some(3));
        assert_eq!(taken.metadata.name.as_deref(), Some(LEASE_NAME));
    }
}
