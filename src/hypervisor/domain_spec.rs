//! From a VM's resolved spec to libvirt domain XML, and from the host's XML back to what it
//! runs, for drift detection that judges only the fields the user set.
//!
//! Device names from the spec travel in libvirt user aliases (`ua-<name>`), so disks and NICs
//! read back from the host map to spec entries by name, not by position.

use std::collections::BTreeMap;

use super::domain_xml::{
    Alias, BootOrder, Controller, Cpu, Device, Devices, Disk, DiskDriver, DiskSource, DiskTarget,
    DomainXml, Empty, Features, Graphics, Interface, InterfaceSource, Mac, Memory, Metadata, Model,
    Os, OsType, Owner, Serial, SourceHost, Topology, Vcpu,
};
use crate::api::virtual_machine::{CpuMode, DiskBus, NicModel};

/// Prefix libvirt requires for user-chosen device aliases.
pub const ALIAS_PREFIX: &str = "ua-";

/// Where a disk's data is, on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskBacking {
    /// A file (dir and netfs pools).
    File(String),
    /// A block device (logical and iscsi pools).
    Block(String),
    /// A network disk, e.g. rbd `pool/image` on monitors.
    Network {
        protocol: String,
        name: String,
        hosts: Vec<(String, Option<u16>)>,
    },
}

/// A disk with its volume resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedDisk {
    /// Spec name (becomes the alias).
    pub name: String,
    pub bus: DiskBus,
    pub cdrom: bool,
    pub backing: DiskBacking,
    /// `qcow2` or `raw`.
    pub format: String,
    pub readonly: bool,
}

/// Where a NIC plugs in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NicSource {
    Bridge(String),
    Network(String),
}

/// A NIC as the domain gets it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedNic {
    pub name: String,
    pub source: NicSource,
    pub model: NicModel,
    pub mac: Option<String>,
}

/// A VM fully resolved to host terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainPlan {
    pub name: String,
    pub owner: Owner,
    /// `kvm`, or `qemu` on hosts without /dev/kvm.
    pub domain_type: String,
    pub vcpus: u32,
    pub memory_kib: u64,
    /// (sockets, cores, threads)
    pub topology: Option<(u32, u32, u32)>,
    pub cpu_mode: Option<CpuMode>,
    pub disks: Vec<PlannedDisk>,
    pub nics: Vec<PlannedNic>,
    /// Device names in boot order; empty: first disk, then first cdrom.
    pub boot_order: Vec<String>,
    pub vnc: bool,
    pub serial: bool,
}

fn alias(name: &str) -> Alias {
    Alias {
        name: format!("{ALIAS_PREFIX}{name}"),
    }
}

fn bus_name(b: DiskBus) -> &'static str {
    match b {
        DiskBus::Virtio => "virtio",
        DiskBus::Sata => "sata",
        DiskBus::Scsi => "scsi",
        DiskBus::Ide => "ide",
    }
}

/// Target device name for the `index`-th disk on a bus (`vda`, `sdb`, `hdc`, … `vdaa`).
fn target_dev(bus: DiskBus, index: usize) -> String {
    let prefix = target_prefix(bus);
    let mut n = index;
    let mut letters = Vec::new();
    loop {
        letters.push((b'a' + (n % 26) as u8) as char);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    letters.reverse();
    format!("{prefix}{}", letters.into_iter().collect::<String>())
}

fn target_prefix(bus: DiskBus) -> &'static str {
    match bus {
        DiskBus::Virtio => "vd",
        DiskBus::Sata | DiskBus::Scsi => "sd",
        DiskBus::Ide => "hd",
    }
}

fn disk_xml(d: &PlannedDisk, dev: String, boot: Option<BootOrder>) -> Disk {
    let (disk_type, source) = match &d.backing {
        DiskBacking::File(p) => (
            "file",
            DiskSource {
                file: Some(p.clone()),
                ..DiskSource::default()
            },
        ),
        DiskBacking::Block(p) => (
            "block",
            DiskSource {
                dev: Some(p.clone()),
                ..DiskSource::default()
            },
        ),
        DiskBacking::Network {
            protocol,
            name,
            hosts,
        } => (
            "network",
            DiskSource {
                protocol: Some(protocol.clone()),
                name: Some(name.clone()),
                host: hosts
                    .iter()
                    .map(|(h, p)| SourceHost {
                        name: h.clone(),
                        port: *p,
                    })
                    .collect(),
                ..DiskSource::default()
            },
        ),
    };
    Disk {
        disk_type: disk_type.into(),
        device: if d.cdrom { "cdrom" } else { "disk" }.into(),
        driver: Some(DiskDriver {
            name: "qemu".into(),
            format: Some(d.format.clone()),
        }),
        source: Some(source),
        target: DiskTarget {
            dev,
            bus: Some(bus_name(d.bus).into()),
        },
        readonly: (d.readonly || d.cdrom).then_some(Empty {}),
        boot,
        alias: Some(alias(&d.name)),
    }
}

fn nic_xml(n: &PlannedNic, boot: Option<BootOrder>) -> Interface {
    let (t, source) = match &n.source {
        NicSource::Bridge(b) => (
            "bridge",
            InterfaceSource {
                bridge: Some(b.clone()),
                network: None,
            },
        ),
        NicSource::Network(w) => (
            "network",
            InterfaceSource {
                network: Some(w.clone()),
                bridge: None,
            },
        ),
    };
    Interface {
        iface_type: t.into(),
        mac: n.mac.clone().map(|address| Mac { address }),
        source: Some(source),
        model: Some(Model {
            model_type: match n.model {
                NicModel::Virtio => "virtio",
                NicModel::E1000 => "e1000",
                NicModel::Rtl8139 => "rtl8139",
            }
            .into(),
        }),
        boot,
        alias: Some(alias(&n.name)),
    }
}

/// The device to hot-plug for `disk`, on the first target name of its bus that `used` (the
/// domain's current targets) does not hold. Hot-plugged devices carry no boot order.
pub fn hotplug_disk(disk: &PlannedDisk, used: &std::collections::BTreeSet<String>) -> Device {
    let dev = (0..)
        .map(|i| target_dev(disk.bus, i))
        .find(|d| !used.contains(d))
        .unwrap_or_else(|| target_dev(disk.bus, used.len()));
    Device::Disk(disk_xml(disk, dev, None))
}

/// The device to hot-plug for `nic`.
pub fn hotplug_nic(nic: &PlannedNic) -> Device {
    Device::Interface(nic_xml(nic, None))
}

/// The device to detach: the domain's own element for the disk or NIC named `name` (spec name
/// from the alias, or target / MAC for devices without one).
pub fn device_named(x: &DomainXml, name: &str) -> Option<Device> {
    let alias_name = format!("{ALIAS_PREFIX}{name}");
    x.devices
        .disk
        .iter()
        .find(|d| d.alias.as_ref().is_some_and(|a| a.name == alias_name) || d.target.dev == name)
        .map(|d| Device::Disk(d.clone()))
        .or_else(|| {
            x.devices
                .interface
                .iter()
                .find(|n| {
                    n.alias.as_ref().is_some_and(|a| a.name == alias_name)
                        || n.mac
                            .as_ref()
                            .is_some_and(|m| m.address.eq_ignore_ascii_case(name))
                })
                .map(|n| Device::Interface(n.clone()))
        })
}

impl DomainPlan {
    /// The domain XML for this plan.
    pub fn to_xml(&self) -> DomainXml {
        let mut counters: BTreeMap<&str, usize> = BTreeMap::new();
        let boot_of = |name: &str| -> Option<BootOrder> {
            if self.boot_order.is_empty() {
                return None;
            }
            self.boot_order
                .iter()
                .position(|b| b == name)
                .and_then(|i| u32::try_from(i + 1).ok())
                .map(|order| BootOrder { order })
        };
        let mut disks = Vec::new();
        for d in &self.disks {
            // sata and scsi share the sdX namespace
            let idx = counters.entry(target_prefix(d.bus)).or_insert(0);
            let dev = target_dev(d.bus, *idx);
            *idx += 1;
            disks.push(disk_xml(d, dev, boot_of(&d.name)));
        }
        let interface = self
            .nics
            .iter()
            .map(|n| nic_xml(n, boot_of(&n.name)))
            .collect();
        let mut controller = Vec::new();
        if self.disks.iter().any(|d| d.bus == DiskBus::Scsi) {
            controller.push(Controller {
                controller_type: "scsi".into(),
                index: Some(0),
                model: Some("virtio-scsi".into()),
            });
        }
        // without per-device boot order: first disk, then cdrom (os/boot and per-device boot
        // elements are mutually exclusive in libvirt)
        let os_boot = if self.boot_order.is_empty() {
            vec![
                super::domain_xml::Boot { dev: "hd".into() },
                super::domain_xml::Boot {
                    dev: "cdrom".into(),
                },
            ]
        } else {
            vec![]
        };
        DomainXml {
            domain_type: self.domain_type.clone(),
            name: self.name.clone(),
            uuid: None,
            metadata: Some(Metadata {
                owner: Some(self.owner.clone()),
            }),
            memory: Memory::kib(self.memory_kib),
            vcpu: Vcpu { count: self.vcpus },
            os: Os {
                os_type: OsType {
                    arch: Some("x86_64".into()),
                    machine: None,
                    value: "hvm".into(),
                },
                boot: os_boot,
            },
            features: Some(Features {
                acpi: Some(Empty {}),
                apic: Some(Empty {}),
            }),
            cpu: (self.cpu_mode.is_some() || self.topology.is_some()).then(|| Cpu {
                mode: self.cpu_mode.map(|m| match m {
                    CpuMode::HostPassthrough => "host-passthrough".into(),
                    CpuMode::HostModel => "host-model".into(),
                }),
                topology: self.topology.map(|(sockets, cores, threads)| Topology {
                    sockets,
                    cores,
                    threads,
                }),
            }),
            on_crash: Some("destroy".into()),
            devices: Devices {
                emulator: None,
                disk: disks,
                controller,
                interface,
                serial: if self.serial {
                    vec![Serial {
                        serial_type: "pty".into(),
                        source: None,
                    }]
                } else {
                    vec![]
                },
                channel: vec![],
                graphics: if self.vnc {
                    vec![Graphics {
                        graphics_type: "vnc".into(),
                        port: Some(-1),
                        autoport: Some("yes".into()),
                        listen: Some("127.0.0.1".into()),
                    }]
                } else {
                    vec![]
                },
            },
        }
    }
}

/// A disk as the host has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedDisk {
    pub backing: Option<DiskBacking>,
    pub bus: Option<String>,
    pub cdrom: bool,
    pub target: String,
}

/// A NIC as the host has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedNic {
    pub source: Option<NicSource>,
    pub mac: Option<String>,
    pub model: Option<String>,
}

/// What a domain is, read from the host's XML. Devices are keyed by spec name (from the `ua-`
/// alias); devices without one (adopted domains) by target device or MAC address.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ObservedVm {
    pub vcpus: u32,
    pub memory_kib: Option<u64>,
    pub disks: BTreeMap<String, ObservedDisk>,
    pub nics: BTreeMap<String, ObservedNic>,
}

fn spec_name(alias: &Option<Alias>) -> Option<String> {
    alias
        .as_ref()
        .and_then(|a| a.name.strip_prefix(ALIAS_PREFIX))
        .map(str::to_string)
}

impl ObservedVm {
    pub fn from_xml(x: &DomainXml) -> Self {
        let disks = x
            .devices
            .disk
            .iter()
            .map(|d| {
                let backing = d.source.as_ref().and_then(|s| match d.disk_type.as_str() {
                    "file" => s.file.clone().map(DiskBacking::File),
                    "block" => s.dev.clone().map(DiskBacking::Block),
                    "network" => Some(DiskBacking::Network {
                        protocol: s.protocol.clone().unwrap_or_default(),
                        name: s.name.clone().unwrap_or_default(),
                        hosts: s.host.iter().map(|h| (h.name.clone(), h.port)).collect(),
                    }),
                    _ => None,
                });
                let key = spec_name(&d.alias).unwrap_or_else(|| d.target.dev.clone());
                (
                    key,
                    ObservedDisk {
                        backing,
                        bus: d.target.bus.clone(),
                        cdrom: d.device == "cdrom",
                        target: d.target.dev.clone(),
                    },
                )
            })
            .collect();
        let nics = x
            .devices
            .interface
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let mac = n.mac.as_ref().map(|m| m.address.to_ascii_lowercase());
                let key = spec_name(&n.alias)
                    .or_else(|| mac.clone())
                    .unwrap_or_else(|| format!("nic{i}"));
                let source = n.source.as_ref().and_then(|s| match n.iface_type.as_str() {
                    "bridge" => s.bridge.clone().map(NicSource::Bridge),
                    "network" => s.network.clone().map(NicSource::Network),
                    _ => None,
                });
                (
                    key,
                    ObservedNic {
                        source,
                        mac,
                        model: n.model.as_ref().map(|m| m.model_type.clone()),
                    },
                )
            })
            .collect();
        ObservedVm {
            vcpus: x.vcpu.count,
            memory_kib: x.memory.as_kib(),
            disks,
            nics,
        }
    }
}

/// What the user set, for drift: `None` means "whatever the domain has" (adopted VMs).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DesiredVm {
    pub vcpus: Option<u32>,
    pub memory_kib: Option<u64>,
    /// Set when the spec lists disks: then the domain has exactly these.
    pub disks: Option<BTreeMap<String, PlannedDisk>>,
    pub nics: Option<BTreeMap<String, PlannedNic>>,
}

impl From<&DomainPlan> for DesiredVm {
    fn from(p: &DomainPlan) -> Self {
        DesiredVm {
            vcpus: Some(p.vcpus),
            memory_kib: Some(p.memory_kib),
            disks: Some(
                p.disks
                    .iter()
                    .map(|d| (d.name.clone(), d.clone()))
                    .collect(),
            ),
            nics: Some(p.nics.iter().map(|n| (n.name.clone(), n.clone())).collect()),
        }
    }
}

/// One difference between spec and host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Drift {
    Vcpus {
        want: u32,
        have: u32,
    },
    Memory {
        want_kib: u64,
        have_kib: Option<u64>,
    },
    MissingDisk(String),
    ExtraDisk(String),
    DiskBacking {
        name: String,
    },
    MissingNic(String),
    ExtraNic(String),
    NicSource {
        name: String,
    },
    NicMac {
        name: String,
        want: String,
        have: Option<String>,
    },
}

impl Drift {
    /// True when the change can be applied to a running guest (hot-plug); CPU and memory changes
    /// wait for the next restart.
    pub fn live_fixable(&self) -> bool {
        !matches!(self, Drift::Vcpus { .. } | Drift::Memory { .. })
    }
}

/// Differences on the fields the user set. Empty when the host matches.
pub fn drift(desired: &DesiredVm, observed: &ObservedVm) -> Vec<Drift> {
    let mut out = Vec::new();
    if let Some(v) = desired.vcpus
        && v != observed.vcpus
    {
        out.push(Drift::Vcpus {
            want: v,
            have: observed.vcpus,
        });
    }
    if let Some(m) = desired.memory_kib
        && Some(m) != observed.memory_kib
    {
        out.push(Drift::Memory {
            want_kib: m,
            have_kib: observed.memory_kib,
        });
    }
    if let Some(disks) = &desired.disks {
        for (name, d) in disks {
            match observed.disks.get(name) {
                None => out.push(Drift::MissingDisk(name.clone())),
                Some(o) if o.backing.as_ref() != Some(&d.backing) => {
                    out.push(Drift::DiskBacking { name: name.clone() })
                }
                Some(_) => {}
            }
        }
        out.extend(
            observed
                .disks
                .keys()
                .filter(|k| !disks.contains_key(*k))
                .map(|k| Drift::ExtraDisk(k.clone())),
        );
    }
    if let Some(nics) = &desired.nics {
        for (name, n) in nics {
            match observed.nics.get(name) {
                None => out.push(Drift::MissingNic(name.clone())),
                Some(o) => {
                    if o.source.as_ref() != Some(&n.source) {
                        out.push(Drift::NicSource { name: name.clone() });
                    }
                    if let Some(want) = &n.mac
                        && o.mac.as_deref() != Some(want.to_ascii_lowercase().as_str())
                    {
                        out.push(Drift::NicMac {
                            name: name.clone(),
                            want: want.clone(),
                            have: o.mac.clone(),
                        });
                    }
                }
            }
        }
        out.extend(
            observed
                .nics
                .keys()
                .filter(|k| !nics.contains_key(*k))
                .map(|k| Drift::ExtraNic(k.clone())),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn full_plan() -> DomainPlan {
        DomainPlan {
            name: "default_web-1".into(),
            owner: Owner::new("6f1e3c1a-0000-4000-8000-000000000001", "default", "web-1"),
            domain_type: "kvm".into(),
            vcpus: 4,
            memory_kib: 2 * 1024 * 1024,
            topology: Some((1, 2, 2)),
            cpu_mode: Some(CpuMode::HostModel),
            disks: vec![
                PlannedDisk {
                    name: "root".into(),
                    bus: DiskBus::Virtio,
                    cdrom: false,
                    backing: DiskBacking::File(
                        "/var/lib/libvirt/images/default-web-1-root.qcow2".into(),
                    ),
                    format: "qcow2".into(),
                    readonly: false,
                },
                PlannedDisk {
                    name: "data".into(),
                    bus: DiskBus::Scsi,
                    cdrom: false,
                    backing: DiskBacking::Block("/dev/vg0/default-web-1-data".into()),
                    format: "raw".into(),
                    readonly: false,
                },
                PlannedDisk {
                    name: "ceph".into(),
                    bus: DiskBus::Virtio,
                    cdrom: false,
                    backing: DiskBacking::Network {
                        protocol: "rbd".into(),
                        name: "vms/web-1".into(),
                        hosts: vec![("mon1".into(), Some(6789))],
                    },
                    format: "raw".into(),
                    readonly: false,
                },
                PlannedDisk {
                    name: "cloud-init".into(),
                    bus: DiskBus::Sata,
                    cdrom: true,
                    backing: DiskBacking::File(
                        "/var/lib/libvirt/images/default-web-1-cidata.iso".into(),
                    ),
                    format: "raw".into(),
                    readonly: true,
                },
            ],
            nics: vec![
                PlannedNic {
                    name: "net0".into(),
                    source: NicSource::Bridge("br0".into()),
                    model: NicModel::Virtio,
                    mac: Some("52:54:00:12:34:56".into()),
                },
                PlannedNic {
                    name: "mgmt".into(),
                    source: NicSource::Network("default".into()),
                    model: NicModel::E1000,
                    mac: None,
                },
            ],
            boot_order: vec!["root".into(), "net0".into()],
            vnc: true,
            serial: true,
        }
    }

    #[test]
    fn full_domain_matches_the_golden_file() {
        let xml = full_plan()
            .to_xml()
            .render()
            .unwrap_or_else(|e| panic!("{e}"));
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/domain-full.xml");
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, format!("{xml}\n")).unwrap_or_else(|e| panic!("{e}"));
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            xml,
            want.trim_end(),
            "run with UPDATE_GOLDEN=1 to accept a deliberate change"
        );
    }

    #[test]
    fn target_devices_follow_buses() {
        assert_eq!(target_dev(DiskBus::Virtio, 0), "vda");
        assert_eq!(target_dev(DiskBus::Scsi, 1), "sdb");
        assert_eq!(target_dev(DiskBus::Virtio, 25), "vdz");
        assert_eq!(target_dev(DiskBus::Virtio, 26), "vdaa");
        let xml = full_plan().to_xml();
        let devs: Vec<&str> = xml
            .devices
            .disk
            .iter()
            .map(|d| d.target.dev.as_str())
            .collect();
        assert_eq!(devs, ["vda", "sda", "vdb", "sdb"]);
        assert!(
            xml.os.boot.is_empty(),
            "per-device boot order excludes <os><boot>"
        );
    }

    #[test]
    fn the_plan_reads_back_without_drift_and_hand_edits_are_found() {
        let plan = full_plan();
        let desired = DesiredVm::from(&plan);
        let back = DomainXml::parse(&plan.to_xml().render().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut observed = ObservedVm::from_xml(&back);
        assert_eq!(drift(&desired, &observed), []);
        observed.vcpus = 2;
        observed.disks.remove("data");
        observed.nics.insert(
            "52:54:00:99:99:99".into(),
            ObservedNic {
                source: None,
                mac: None,
                model: None,
            },
        );
        if let Some(n) = observed.nics.get_mut("net0") {
            n.mac = Some("52:54:00:00:00:01".into());
        }
        let d = drift(&desired, &observed);
        assert!(d.contains(&Drift::Vcpus { want: 4, have: 2 }));
        assert!(d.contains(&Drift::MissingDisk("data".into())));
        assert!(d.contains(&Drift::ExtraNic("52:54:00:99:99:99".into())));
        assert!(
            d.iter()
                .any(|x| matches!(x, Drift::NicMac { name, .. } if name == "net0"))
        );
        assert!(!Drift::Vcpus { want: 1, have: 2 }.live_fixable());
        assert!(Drift::MissingDisk("x".into()).live_fixable());
    }

    #[test]
    fn adopted_domains_are_judged_only_on_what_the_user_set() {
        let observed = ObservedVm::from_xml(&full_plan().to_xml());
        // the user set nothing: nothing drifts, whatever the domain has
        assert_eq!(drift(&DesiredVm::default(), &observed), []);
        // the user set memory only
        let d = drift(
            &DesiredVm {
                memory_kib: Some(1024),
                ..Default::default()
            },
            &observed,
        );
        assert_eq!(
            d,
            [Drift::Memory {
                want_kib: 1024,
                have_kib: Some(2 * 1024 * 1024)
            }]
        );
    }

    #[test]
    fn libvirts_parser_accepts_the_full_domain_and_keeps_our_aliases() {
        // the test driver parses domain XML with the daemons' code
        let conn = super::super::Connection::open("test:///default", "test")
            .unwrap_or_else(|e| panic!("{e}"));
        let mut plan = full_plan();
        plan.name = format!("golden-{}", std::process::id());
        conn.define(&plan.to_xml())
            .unwrap_or_else(|e| panic!("{e}"));
        let back = conn
            .domain_xml(&plan.name)
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = conn.undefine(&plan.name);
        assert_eq!(
            drift(&DesiredVm::from(&plan), &ObservedVm::from_xml(&back)),
            []
        );
        assert_eq!(back.owner(), Some(&plan.owner));
    }
}
