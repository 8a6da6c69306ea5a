//! Moving a domain between two nodes: live (memory copied while it runs) or cold (definition
//! moved while it is off), with optional storage copy. The domain ends up defined on the
//! destination only (persistent there, undefined on the source), so it can never be started on
//! both. A failed or aborted migration leaves it on the source.
//!
//! A live migration leaves the domain paused on the destination (`VIR_MIGRATE_PAUSED`) and
//! resumes it there only after libvirt has confirmed that the source's copy is gone. libvirt's
//! own order resumes the destination in its Finish step, before the source is told: when the
//! caller loses the destination just then (a cut link), libvirt cannot tell a failed Finish from
//! a lost reply and resumes the source too, so the guest would run on both hosts ("the lock
//! manager plugins should take care of safety in this scenario", libvirt's
//! `virDomainMigrateVersion3Full`). Paused, the destination's copy never runs a guest
//! instruction until the source is known to be stopped; the cost is one resume call of extra
//! pause at switch-over. Post-copy cannot be combined with it (libvirt refuses), so a
//! `post_copy` migration keeps libvirt's order and its risk.

use std::time::Duration;

use virt::domain::MigrateParameters;
use virt::sys;

use super::HvError;
use super::connection::{Connection, DomainState};

/// How to migrate.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct MigrateOptions {
    /// Live migration of a running domain; false moves a shut-off domain's definition.
    pub live: bool,
    /// Bandwidth cap, MiB/s.
    pub bandwidth_mib: Option<u64>,
    /// Throttle vCPUs when memory changes faster than it is copied.
    pub auto_converge: bool,
    /// Allow switching to post-copy ([`Connection::start_post_copy`]).
    pub post_copy: bool,
    /// Longest pause at switch-over, ms.
    pub max_downtime_ms: Option<u64>,
    /// Copy disks too (storage not shared between the nodes).
    pub copy_storage: bool,
}

impl MigrateOptions {
    /// libvirt flags for these options.
    pub fn flags(&self) -> u32 {
        let mut f = sys::VIR_MIGRATE_PERSIST_DEST | sys::VIR_MIGRATE_UNDEFINE_SOURCE;
        if self.live {
            f |= sys::VIR_MIGRATE_LIVE;
            if !self.post_copy {
                // resumed by `migrate` once the source is gone (see the module's comment)
                f |= sys::VIR_MIGRATE_PAUSED;
            }
            if self.auto_converge {
                f |= sys::VIR_MIGRATE_AUTO_CONVERGE;
            }
            if self.post_copy {
                f |= sys::VIR_MIGRATE_POSTCOPY;
            }
            if self.copy_storage {
                f |= sys::VIR_MIGRATE_NON_SHARED_DISK;
            }
        } else {
            f |= sys::VIR_MIGRATE_OFFLINE;
        }
        f
    }
}

/// Progress of a domain's current job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct JobProgress {
    /// True while a job runs.
    pub active: bool,
    pub data_total: u64,
    pub data_processed: u64,
    pub data_remaining: u64,
    pub elapsed_ms: u64,
    /// Switch-over pause, once known (ms).
    pub downtime_ms: Option<u64>,
}

impl JobProgress {
    /// Percent done, 0-100.
    pub fn percent(&self) -> u32 {
        if self.data_total == 0 {
            return 0;
        }
        u32::try_from(
            self.data_processed.min(self.data_total).saturating_mul(100) / self.data_total,
        )
        .unwrap_or(100)
    }
}

impl Connection {
    /// Migrates `name` from this node to `dest`. Blocks until libvirt reports the outcome; watch
    /// it with [`Connection::job_progress`] and stop it with [`Connection::abort_job`] from other
    /// threads on the same connection. A live migration of a running domain resumes it on `dest`
    /// once libvirt reports the source's copy stopped; if that resume cannot be made, the
    /// migration still succeeded and the domain waits paused on `dest` (the VM's reconcile
    /// resumes it as its spec says).
    pub fn migrate(
        &self,
        name: &str,
        dest: &Connection,
        opts: &MigrateOptions,
    ) -> Result<(), HvError> {
        let d = self.domain(name)?;
        let (st, _) = d.state().map_err(|e| self.err("domain state", e))?;
        let state = DomainState::from_virt(st);
        let running = matches!(state, DomainState::Running | DomainState::Paused);
        if opts.live && !running {
            return Err(HvError::Local {
                cause: format!(
                    "live migration of {name:?} on {}: the domain is not running (use a cold migration)",
                    self.node()
                ),
            });
        }
        if !opts.live && running {
            return Err(HvError::Local {
                cause: format!(
                    "cold migration of {name:?} on {}: the domain is running; stop it first or migrate live",
                    self.node()
                ),
            });
        }
        if let Some(ms) = opts.max_downtime_ms {
            // accepted before the job by current QEMU; otherwise libvirt's default stands
            let _ = d.migrate_set_max_downtime(ms, 0);
        }
        let params = MigrateParameters {
            bandwidth: opts.bandwidth_mib,
            ..Default::default()
        };
        let flags = opts.flags();
        let r = d.migrate3(dest.raw(), params, flags).map_err(|e| {
            HvError::libvirt("migrate", format!("{} -> {}", self.node(), dest.node()), &e)
        });
        // the domain left one node and arrived on the other (or half did): both list again
        self.index_stale();
        dest.index_stale();
        let moved = r?;
        if flags & sys::VIR_MIGRATE_PAUSED != 0
            && state == DomainState::Running
            && let Err(e) = moved.resume()
        {
            tracing::warn!(
                domain = name,
                node = dest.node(),
                error = %e,
                "migrated, but resuming on the target failed; it stays paused there until the VM's reconcile resumes it"
            );
        }
        Ok(())
    }

    fn job(&self, name: &str, flags: u32) -> Result<JobProgress, HvError> {
        let d = self.domain(name)?;
        let (typ, p) = super::ffi::job_stats(&d, flags).map_err(|e| self.err("job stats", e))?;
        let get = |k: &str| p.get(k).and_then(super::ffi::StatValue::as_u64);
        Ok(JobProgress {
            active: typ != sys::VIR_DOMAIN_JOB_NONE as i32
                && typ != sys::VIR_DOMAIN_JOB_COMPLETED as i32,
            data_total: get("data_total").unwrap_or(0),
            data_processed: get("data_processed").unwrap_or(0),
            data_remaining: get("data_remaining").unwrap_or(0),
            elapsed_ms: get("time_elapsed").unwrap_or(0),
            downtime_ms: get("downtime"),
        })
    }

    /// The domain's current job; `active: false` when none runs.
    pub fn job_progress(&self, name: &str) -> Result<JobProgress, HvError> {
        self.job(name, 0)
    }

    /// Statistics of the last completed job (downtime and duration of a finished migration), read
    /// on the node where the domain now is.
    pub fn completed_job(&self, name: &str) -> Result<JobProgress, HvError> {
        self.job(name, sys::VIR_DOMAIN_JOB_STATS_COMPLETED)
    }

    /// Aborts the domain's running job; the domain stays where it was.
    pub fn abort_job(&self, name: &str) -> Result<(), HvError> {
        let d = self.domain(name)?;
        super::ffi::abort_job(&d).map_err(|e| self.err("abort job", e))
    }

    /// Switches a running live migration (started with `post_copy`) to post-copy.
    pub fn start_post_copy(&self, name: &str) -> Result<(), HvError> {
        let d = self.domain(name)?;
        super::ffi::start_post_copy(&d).map_err(|e| self.err("start post-copy", e))
    }

    /// Waits up to `timeout` for a job to appear on the domain (true when one did).
    pub fn wait_for_job(&self, name: &str, timeout: Duration) -> Result<bool, HvError> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.job_progress(name)?.active {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_follow_options() {
        let live = MigrateOptions {
            live: true,
            auto_converge: true,
            copy_storage: true,
            ..Default::default()
        };
        let f = live.flags();
        for want in [
            sys::VIR_MIGRATE_LIVE,
            sys::VIR_MIGRATE_PERSIST_DEST,
            sys::VIR_MIGRATE_UNDEFINE_SOURCE,
            sys::VIR_MIGRATE_AUTO_CONVERGE,
            sys::VIR_MIGRATE_NON_SHARED_DISK,
        ] {
            assert_ne!(f & want, 0);
        }
        assert_eq!(f & sys::VIR_MIGRATE_OFFLINE, 0);
        // paused on the target until the source is gone: never running on both
        assert_ne!(f & sys::VIR_MIGRATE_PAUSED, 0);
        let post = MigrateOptions {
            live: true,
            post_copy: true,
            ..Default::default()
        };
        // libvirt refuses post-copy with PAUSED
        assert_eq!(post.flags() & sys::VIR_MIGRATE_PAUSED, 0);
        let cold = MigrateOptions {
            auto_converge: true,
            ..Default::default()
        }
        .flags();
        assert_ne!(cold & sys::VIR_MIGRATE_OFFLINE, 0);
        assert_eq!(
            cold & (sys::VIR_MIGRATE_LIVE | sys::VIR_MIGRATE_AUTO_CONVERGE),
            0
        );
        assert_ne!(
            cold & sys::VIR_MIGRATE_UNDEFINE_SOURCE,
            0,
            "never defined on both"
        );
    }

    #[test]
    fn percent_is_bounded() {
        let p = JobProgress {
            data_total: 200,
            data_processed: 50,
            ..Default::default()
        };
        assert_eq!(p.percent(), 25);
        assert_eq!(JobProgress::default().percent(), 0);
        let over = JobProgress {
            data_total: 10,
            data_processed: 30,
            ..Default::default()
        };
        assert_eq!(over.percent(), 100);
    }
}
