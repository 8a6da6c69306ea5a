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
            Ok(Note::normal(
                "Defined",
                "Provision",
                format!("domain {dom} (uuid {uuid}) defined {on}"),
            ))
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
            Ok(Note::normal(
                "Started",
                "Start",
                format!("domain {dom} started {on}"),
            ))
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

/// Runs `steps` in order; stops at the first failure.
pub async fn execute(
    hv: &impl Hypervisor,
    r: &Resolved,
    steps: Vec<Step>,
    grace: Duration,
) -> Executed {
    let mut out = Executed::default();
    for step in steps {
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
