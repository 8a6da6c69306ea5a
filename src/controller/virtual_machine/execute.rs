//! Carrying out a VM plan step by step. Every step is idempotent (an existing volume is kept,
//! defining is redefining, starting a running domain succeeds), so a round interrupted at any
//! point is finished by the next one: no duplicate domain, no leaked volume.

use std::time::Duration;

use crate::controller::Note;
use crate::hypervisor::{DeviceScope, HvError, Hypervisor, ShutdownOutcome};

use super::plan::{Resolved, Step};

/// What a round did.
#[derive(Debug, Default)]
pub struct Executed {
    pub notes: Vec<Note>,
    /// The step that failed, and why; the steps after it did not run.
    pub failed: Option<(&'static str, HvError)>,
    /// A crashed guest was started again.
    pub restarted: bool,
    /// Steps that ran.
    pub ran: usize,
    /// The VM as read right after the last step, in the same call (see [`execute`]).
    pub observed: Option<super::observe::Observed>,
}

fn label(s: &Step) -> &'static str {
    match s {
        Step::CreateVolume { .. } => "create volume",
        Step::CloneVolume { .. } => "clone volume",
        Step::OverlayVolume { .. } => "create overlay",
        Step::WriteSeed { .. } => "write cloud-init seed",
        Step::Define { .. } => "define domain",
        Step::Stamp(_) => "adopt domain",
        Step::SetConfigResources { .. } => "set vCPUs and memory",
        Step::AttachConfig(_) | Step::AttachLive(_) => "attach device",
        Step::DetachConfig(_) | Step::DetachLive(_) => "detach device",
        Step::Start => "start",
        Step::Restart => "restart",
        Step::Shutdown => "shut down",
        Step::Suspend => "pause",
        Step::Resume => "resume",
    }
}

fn device_name(d: &crate::hypervisor::domain_xml::Device) -> String {
    use crate::hypervisor::domain_xml::Device;
    let alias = match d {
        Device::Disk(x) => x
            .alias
            .as_ref()
            .map(|a| a.name.clone())
            .unwrap_or_else(|| x.target.dev.clone()),
        Device::Interface(x) => x
            .alias
            .as_ref()
            .map(|a| a.name.clone())
            .or_else(|| x.mac.as_ref().map(|m| m.address.clone()))
            .unwrap_or_default(),
    };
    alias
        .strip_prefix(crate::hypervisor::domain_spec::ALIAS_PREFIX)
        .map(str::to_string)
        .unwrap_or(alias)
}

fn defined(r: &Resolved, uuid: &str) -> Note {
    Note::normal(
        "Defined",
        "Provision",
        format!(
            "domain {} (uuid {uuid}) defined on KvmNode {}",
            r.domain, r.node
        ),
    )
}

fn started(r: &Resolved) -> Note {
    Note::normal(
        "Started",
        "Start",
        format!("domain {} started on KvmNode {}", r.domain, r.node),
    )
}

async fn run_step(
    hv: &impl Hypervisor,
    r: &Resolved,
    step: Step,
    grace: Duration,
) -> Result<Note, HvError> {
    let node = r.node.clone();
    let dom = r.domain.clone();
    let on = format!("on KvmNode {node}");
    match step {
        Step::CreateVolume {
            pool,
            name,
            capacity,
            format,
        } => {
            let n = name.clone();
            hv.call(&node, "create volume", move |c| {
                c.create_volume(&pool, &n, capacity, format)
            })
            .await?;
            Ok(Note::normal(
                "VolumeCreated",
                "Provision",
                format!("volume {name} created {on}"),
            ))
        }
        Step::CloneVolume {
            pool,
            template,
            name,
            capacity,
            format,
        } => {
            let (n, t) = (name.clone(), template.clone());
            hv.call(&node, "clone volume", move |c| {
                c.clone_volume(&pool, &t, &n, capacity, format)
            })
            .await?;
            Ok(Note::normal(
                "VolumeCloned",
                "Provision",
                format!("volume {name} cloned from template {template} {on}"),
            ))
        }
        Step::OverlayVolume {
            pool,
            base,
            name,
            capacity,
        } => {
            let (n, b) = (name.clone(), base.clone());
            hv.call(&node, "create overlay", move |c| {
                c.overlay_volume(&pool, &b, &n, capacity)
            })
            .await?;
            Ok(Note::normal(
                "VolumeCreated",
                "Provision",
                format!("volume {name} created as an overlay of {base} {on}"),
            ))
        }
        Step::WriteSeed { pool, name, seed } => {
            let n = name.clone();
            hv.call(&node, "write seed", move |c| c.write_seed(&pool, &n, &seed))
                .await?;
            Ok(Note::normal(
                "SeedWritten",
                "Provision",
                format!("cloud-init seed {name} written {on}"),
            ))
        }
        Step::Define { plan, uuid } => {
            let mut xml = plan.to_xml();
            xml.uuid = uuid;
            let uuid = hv
                .call(&node, "define domain", move |c| c.define(&xml))
                .await?;
            Ok(defined(r, &uuid))
        }
        Step::Stamp(owner) => {
            let d = dom.clone();
            hv.call(&node, "adopt domain", move |c| c.set_owner(&d, &owner))
                .await?;
            Ok(Note::normal(
                "Adopted",
                "Adopt",
                format!(
                    "domain {dom} {on} is now managed by this object; it kept running as it was"
                ),
            ))
        }
        Step::SetConfigResources { vcpus, memory_kib } => {
            let d = dom.clone();
            hv.call(&node, "set vCPUs and memory", move |c| {
                c.set_config_resources(&d, vcpus, memory_kib)
            })
            .await?;
            Ok(Note::normal(
                "ConfigUpdated",
                "Update",
                format!(
                    "vCPUs/memory of domain {dom} set in its definition; they apply at the next restart"
                ),
            ))
        }
        Step::AttachConfig(dev) => {
            let what = device_name(&dev);
            let d = dom.clone();
            hv.call(&node, "attach device", move |c| {
                c.attach(&d, &dev, DeviceScope::Config)
            })
            .await?;
            Ok(Note::normal(
                "DeviceAttached",
                "Update",
                format!("{what} added to the definition of {dom}"),
            ))
        }
        Step::AttachLive(dev) => {
            let what = device_name(&dev);
            let d = dom.clone();
            hv.call(&node, "hot-plug device", move |c| {
                c.attach(&d, &dev, DeviceScope::Live)
            })
            .await?;
            Ok(Note::normal(
                "DeviceHotplugged",
                "Update",
                format!("{what} hot-plugged into the running guest {dom}"),
            ))
        }
        Step::DetachConfig(dev) => {
            let what = device_name(&dev);
            let d = dom.clone();
            hv.call(&node, "detach device", move |c| {
                c.detach(&d, &dev, DeviceScope::Config)
            })
            .await?;
            Ok(Note::normal(
                "DeviceDetached",
                "Update",
                format!("{what} removed from the definition of {dom}"),
            ))
        }
        Step::DetachLive(dev) => {
            let what = device_name(&dev);
            let d = dom.clone();
            hv.call(&node, "hot-unplug device", move |c| {
                c.detach(&d, &dev, DeviceScope::Live)
            })
            .await?;
            Ok(Note::normal(
                "DeviceUnplugRequested",
                "Update",
                format!(
                    "removal of {what} from the running guest {dom} requested (the guest acknowledges it)"
                ),
            ))
        }
        Step::Start | Step::Restart => {
            let d = dom.clone();
            hv.call(&node, "start domain", move |c| c.start(&d)).await?;
            Ok(started(r))
        }
        Step::Shutdown => {
            let d = dom.clone();
            let out = hv
                .call(&node, "shut down domain", move |c| c.shutdown(&d, grace))
                .await?;
            let how = match out {
                ShutdownOutcome::AlreadyOff => "was already off",
                ShutdownOutcome::Graceful => "shut down",
                ShutdownOutcome::Forced => "did not shut down in time and was forced off",
            };
            Ok(Note::normal(
                "Stopped",
                "Stop",
                format!("domain {dom} {how}"),
            ))
        }
        Step::Suspend => {
            let d = dom.clone();
            hv.call(&node, "pause domain", move |c| c.suspend(&d))
                .await?;
            Ok(Note::normal(
                "Paused",
                "Pause",
                format!("domain {dom} paused"),
            ))
        }
        Step::Resume => {
            let d = dom.clone();
            hv.call(&node, "resume domain", move |c| c.resume(&d))
                .await?;
            Ok(Note::normal(
                "Resumed",
                "Resume",
                format!("domain {dom} resumed"),
            ))
        }
    }
}

/// Runs `steps` in order; stops at the first failure. A plan that ends by defining and
/// starting the domain (a new VM), or by starting it, does that in one call on the connection
/// and reads the VM in the same call ([`Executed::observed`]): one lane taken instead of three,
/// which matters most when the node's lanes are busy with other guests' starts.
pub async fn execute(
    hv: &impl Hypervisor,
    r: &Resolved,
    steps: Vec<Step>,
    grace: Duration,
) -> Executed {
    let mut out = Executed::default();
    let mut steps = std::collections::VecDeque::from(steps);
    while let Some(step) = steps.pop_front() {
        let tail = match (&step, steps.front(), steps.len()) {
            (Step::Define { plan, uuid }, Some(Step::Start), 1) => {
                let mut xml = plan.to_xml();
                xml.uuid = uuid.clone();
                Some(Some(xml))
            }
            (Step::Start, None, 0) => Some(None),
            _ => None,
        };
        if let Some(define) = tail {
            start_and_read(hv, r, define, &mut out).await;
            break;
        }
        let what = label(&step);
        let restart = step == Step::Restart;
        match run_step(hv, r, step, grace).await {
            Ok(mut note) => {
                if restart {
                    out.restarted = true;
                    note.reason = "Restarted";
                    note.message.push_str(" again after a crash");
                }
                out.notes.push(note);
                out.ran += 1;
            }
            Err(e) => {
                out.failed = Some((what, e));
                break;
            }
        }
    }
    out
}

/// Defines the domain (when `define` is given), starts it, and reads the VM, in one call.
async fn start_and_read(
    hv: &impl Hypervisor,
    r: &Resolved,
    define: Option<crate::hypervisor::domain_xml::DomainXml>,
    out: &mut Executed,
) {
    let dom = r.domain.clone();
    let read = super::observe::reader(r);
    let op = if define.is_some() {
        "define and start domain"
    } else {
        "start domain"
    };
    let defining = define.is_some();
    // each part's own result: which step failed names it in the status
    let done = hv
        .call(&r.node, op, move |c| {
            let uuid = match define {
                Some(xml) => match c.define(&xml) {
                    Ok(u) => Some(u),
                    Err(e) => return Ok((None, Err(e), None)),
                },
                None => None,
            };
            if let Err(e) = c.start(&dom) {
                return Ok((uuid, Err(e), None));
            }
            Ok((uuid, Ok(()), Some(read(c))))
        })
        .await;
    let first = if defining { "define domain" } else { "start" };
    match done {
        // the call itself failed (node unreachable, timeout): every step is idempotent, the
        // next round looks again
        Err(e) => out.failed = Some((first, e)),
        Ok((uuid, started_, read)) => {
            if let Some(u) = &uuid {
                out.notes.push(defined(r, u));
                out.ran += 1;
            }
            match started_ {
                Ok(()) => {
                    out.notes.push(started(r));
                    out.ran += 1;
                    // a failed read is made again by the caller's own observation
                    out.observed = read.and_then(Result::ok);
                }
                Err(e) if defining && uuid.is_none() => out.failed = Some(("define domain", e)),
                Err(e) => out.failed = Some(("start", e)),
            }
        }
    }
}
