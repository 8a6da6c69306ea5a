//! A typed model of the libvirt domain XML the operator writes and reads back.
//!
//! Rendering goes through serde and quick-xml, which escapes every text and attribute value, so
//! names and paths from specs cannot inject XML. Parsing ignores elements the model does not
//! know (libvirt adds many defaults), so the host's XML parses back into the same model for drift
//! checks.

use serde::{Deserialize, Serialize};

use super::HvError;

/// XML namespace of the operator's ownership stamp in `<metadata>`.
/// Prefix of our metadata element.
pub const OWNER_PREFIX: &str = "kvmop";
pub const OWNER_NS: &str = "https://kvm-operator.io/xmlns/owner/v1alpha1";

/// `<domain>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename = "domain")]
pub struct DomainXml {
    /// `kvm` or `qemu` (software emulation) or `test`.
    #[serde(rename = "@type")]
    pub domain_type: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
    pub memory: Memory,
    pub vcpu: Vcpu,
    pub os: Os,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<Features>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Cpu>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_crash: Option<String>,
    pub devices: Devices,
}

/// `<metadata>`: only our own element is modelled; others are ignored when parsing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct Metadata {
    #[serde(
        rename = "kvmop:owner",
        alias = "owner",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub owner: Option<Owner>,
}

/// The ownership stamp: which object this domain belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    #[serde(rename = "@xmlns:kvmop", default = "owner_ns")]
    pub xmlns: String,
    /// UID of the VirtualMachine object.
    #[serde(rename = "@uid")]
    pub uid: String,
    #[serde(rename = "@namespace")]
    pub namespace: String,
    #[serde(rename = "@name")]
    pub name: String,
}

fn owner_ns() -> String {
    OWNER_NS.to_string()
}

/// Our stamp as `virDomainGetMetadata` returns it: the element without its prefix.
#[derive(Deserialize, Serialize)]
struct OwnerElement {
    #[serde(rename = "@uid")]
    uid: String,
    #[serde(rename = "@namespace")]
    namespace: String,
    #[serde(rename = "@name")]
    name: String,
}

impl Owner {
    /// Parses the element libvirt returns for our metadata namespace; `None` if it is not ours.
    pub fn from_metadata_element(xml: &str) -> Option<Self> {
        let e: OwnerElement = quick_xml::de::from_str(xml).ok()?;
        Some(Owner::new(&e.uid, &e.namespace, &e.name))
    }

    /// The element `virDomainSetMetadata` takes (libvirt adds the namespace prefix).
    pub fn to_metadata_element(&self) -> Result<String, HvError> {
        let e = OwnerElement {
            uid: self.uid.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        };
        quick_xml::se::to_string_with_root("owner", &e).map_err(|err| HvError::Xml {
            what: "owner metadata".into(),
            cause: err.to_string(),
        })
    }

    pub fn new(uid: &str, namespace: &str, name: &str) -> Self {
        Self {
            xmlns: OWNER_NS.to_string(),
            uid: uid.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

/// `<memory unit='KiB'>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    #[serde(rename = "@unit", default = "kib")]
    pub unit: String,
    #[serde(rename = "$text")]
    pub value: u64,
}

fn kib() -> String {
    "KiB".into()
}

impl Memory {
    pub fn kib(value: u64) -> Self {
        Self { unit: kib(), value }
    }

    /// The amount in KiB, whatever unit libvirt used.
    pub fn as_kib(&self) -> Option<u64> {
        let mult: u64 = match self.unit.as_str() {
            "b" | "bytes" => return Some(self.value / 1024),
            "KiB" | "k" => 1,
            "MiB" | "M" => 1 << 10,
            "GiB" | "G" => 1 << 20,
            "TiB" | "T" => 1 << 30,
            _ => return None,
        };
        self.value.checked_mul(mult)
    }
}

/// `<vcpu>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Vcpu {
    #[serde(rename = "$text")]
    pub count: u32,
}

/// `<os>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Os {
    #[serde(rename = "type")]
    pub os_type: OsType,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub boot: Vec<Boot>,
}

/// `<type arch= machine=>hvm</type>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OsType {
    #[serde(rename = "@arch", default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    #[serde(rename = "@machine", default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    #[serde(rename = "$text")]
    pub value: String,
}

/// `<boot dev=>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Boot {
    #[serde(rename = "@dev")]
    pub dev: String,
}

/// `<features>`: ACPI is what graceful shutdown and PCI hot-plug need.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct Features {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acpi: Option<Empty>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apic: Option<Empty>,
}

/// `<cpu mode=>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cpu {
    #[serde(rename = "@mode", default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<Topology>,
}

/// `<topology sockets= cores= threads=/>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Topology {
    #[serde(rename = "@sockets")]
    pub sockets: u32,
    #[serde(rename = "@cores")]
    pub cores: u32,
    #[serde(rename = "@threads")]
    pub threads: u32,
}

/// `<devices>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct Devices {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emulator: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk: Vec<Disk>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controller: Vec<Controller>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interface: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub serial: Vec<Serial>,
    /// Read, never written: whether the guest has an agent to ask for its addresses. The
    /// operator does not define channels, and a definition it renders keeps none.
    #[serde(default, skip_serializing)]
    pub channel: Vec<Channel>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub graphics: Vec<Graphics>,
}

/// `<disk type='file' device='disk'>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Disk {
    #[serde(rename = "@type")]
    pub disk_type: String,
    #[serde(rename = "@device", default = "disk_device")]
    pub device: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<DiskDriver>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<DiskSource>,
    pub target: DiskTarget,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readonly: Option<Empty>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootOrder>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<Alias>,
}

/// Per-device `<boot order='N'/>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BootOrder {
    #[serde(rename = "@order")]
    pub order: u32,
}

fn disk_device() -> String {
    "disk".into()
}

/// An empty marker element such as `<readonly/>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct Empty {}

/// `<driver name='qemu' type='qcow2'/>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiskDriver {
    #[serde(rename = "@name")]
    pub name: String,
    #[serde(rename = "@type", default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

/// `<source file= | dev= | pool= volume=>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct DiskSource {
    #[serde(rename = "@file", default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(rename = "@dev", default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
    #[serde(rename = "@pool", default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(rename = "@volume", default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// Network disks: `rbd`, `iscsi`, `nbd`, ...
    #[serde(rename = "@protocol", default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Network disks: image name, e.g. `pool/image` for rbd.
    #[serde(rename = "@name", default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host: Vec<SourceHost>,
}

/// `<host name= port=/>` of a network disk source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceHost {
    #[serde(rename = "@name")]
    pub name: String,
    #[serde(rename = "@port", default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// `<controller type='scsi' model='virtio-scsi' index='0'/>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Controller {
    #[serde(rename = "@type")]
    pub controller_type: String,
    #[serde(rename = "@index", default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    #[serde(rename = "@model", default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// `<target dev='vda' bus='virtio'/>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiskTarget {
    #[serde(rename = "@dev")]
    pub dev: String,
    #[serde(rename = "@bus", default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<String>,
}

/// `<alias name='ua-...'/>`: user aliases carry our device names across reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alias {
    #[serde(rename = "@name")]
    pub name: String,
}

/// `<interface type='bridge' | 'network'>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    #[serde(rename = "@type")]
    pub iface_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<Mac>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<InterfaceSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<Model>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootOrder>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<Alias>,
}

/// `<mac address=>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mac {
    #[serde(rename = "@address")]
    pub address: String,
}

/// `<source bridge= | network=>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct InterfaceSource {
    #[serde(rename = "@bridge", default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    #[serde(rename = "@network", default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

/// `<model type=>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Model {
    #[serde(rename = "@type")]
    pub model_type: String,
}

/// `<serial type='pty'>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Serial {
    #[serde(rename = "@type")]
    pub serial_type: String,
    /// The pty libvirt allocated (read back from a running domain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SerialSource>,
}

/// `<source path='/dev/pts/3'/>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SerialSource {
    #[serde(rename = "@path", default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// `<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Channel {
    #[serde(rename = "@type")]
    pub channel_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<ChannelTarget>,
}

/// A channel's `<target type= name=>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChannelTarget {
    #[serde(rename = "@type", default, skip_serializing_if = "Option::is_none")]
    pub target_type: Option<String>,
    #[serde(rename = "@name", default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The virtio channel name of the QEMU guest agent.
pub const GUEST_AGENT_CHANNEL: &str = "org.qemu.guest_agent.0";

/// `<graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Graphics {
    #[serde(rename = "@type")]
    pub graphics_type: String,
    #[serde(rename = "@port", default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    #[serde(rename = "@autoport", default, skip_serializing_if = "Option::is_none")]
    pub autoport: Option<String>,
    #[serde(rename = "@listen", default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
}

impl DomainXml {
    /// Renders the XML libvirt is given.
    pub fn render(&self) -> Result<String, HvError> {
        quick_xml::se::to_string(self).map_err(|e| HvError::Xml {
            what: format!("domain {:?}", self.name),
            cause: e.to_string(),
        })
    }

    /// Parses XML returned by libvirt (or written by anyone).
    pub fn parse(xml: &str) -> Result<Self, HvError> {
        quick_xml::de::from_str(xml).map_err(|e| HvError::Xml {
            what: "domain XML from the host".into(),
            cause: e.to_string(),
        })
    }

    /// The console endpoints of a running domain (from its live XML).
    pub fn console(&self) -> ConsoleEndpoints {
        let vnc = self
            .devices
            .graphics
            .iter()
            .find(|g| g.graphics_type == "vnc")
            .and_then(|g| {
                let port = g.port.filter(|p| *p > 0)?;
                Some(format!(
                    "{}:{port}",
                    g.listen.as_deref().unwrap_or("127.0.0.1")
                ))
            });
        let serial = self
            .devices
            .serial
            .iter()
            .find_map(|s| s.source.as_ref().and_then(|src| src.path.clone()));
        ConsoleEndpoints { vnc, serial }
    }

    /// True when the definition declares the QEMU guest agent's channel.
    pub fn has_guest_agent(&self) -> bool {
        self.devices.channel.iter().any(|c| {
            c.target
                .as_ref()
                .and_then(|t| t.name.as_deref())
                .is_some_and(|n| n == GUEST_AGENT_CHANNEL)
        })
    }

    /// The ownership stamp, when the domain carries ours.
    pub fn owner(&self) -> Option<&Owner> {
        self.metadata
            .as_ref()
            .and_then(|m| m.owner.as_ref())
            .filter(|o| o.xmlns == OWNER_NS)
    }

    /// A small diskless guest (serial console only): the smallest real workload for tests and for
    /// checking a host can start guests.
    pub fn minimal(name: &str, domain_type: &str, memory_kib: u64, vcpus: u32) -> Self {
        DomainXml {
            domain_type: domain_type.to_string(),
            name: name.to_string(),
            uuid: None,
            metadata: None,
            memory: Memory::kib(memory_kib),
            vcpu: Vcpu { count: vcpus },
            os: Os {
                os_type: OsType {
                    arch: Some("x86_64".into()),
                    machine: None,
                    value: "hvm".into(),
                },
                boot: vec![Boot { dev: "hd".into() }],
            },
            features: Some(Features {
                acpi: Some(Empty {}),
                apic: Some(Empty {}),
            }),
            cpu: None,
            on_crash: None,
            devices: Devices {
                serial: vec![Serial {
                    serial_type: "pty".into(),
                    source: None,
                }],
                ..Devices::default()
            },
        }
    }
}

/// Where a running domain's consoles are, on its host.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ConsoleEndpoints {
    /// `address:port` of the VNC server.
    pub vnc: Option<String>,
    /// Serial console pty.
    pub serial: Option<String>,
}

/// A device that can be attached to or detached from a domain.
#[derive(Clone, Debug, PartialEq)]
pub enum Device {
    Disk(Disk),
    Interface(Interface),
}

impl Device {
    /// The device's XML (`<disk>…</disk>` or `<interface>…</interface>`).
    pub fn render(&self) -> Result<String, HvError> {
        let r = match self {
            Device::Disk(d) => quick_xml::se::to_string_with_root("disk", d),
            Device::Interface(i) => quick_xml::se::to_string_with_root("interface", i),
        };
        r.map_err(|e| HvError::Xml {
            what: "device".into(),
            cause: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_are_escaped_and_round_trip() {
        let nasty = "a<b>&\"c'</name><devices/>é ../x";
        let mut d = DomainXml::minimal(nasty, "kvm", 65536, 1);
        d.metadata = Some(Metadata {
            owner: Some(Owner::new("uid-1", "ns\"><x", "vm&1")),
        });
        d.devices.disk.push(Disk {
            disk_type: "file".into(),
            device: "disk".into(),
            driver: Some(DiskDriver {
                name: "qemu".into(),
                format: Some("qcow2".into()),
            }),
            source: Some(DiskSource {
                file: Some("/var/lib/a'b\"<c>.qcow2".into()),
                ..DiskSource::default()
            }),
            target: DiskTarget {
                dev: "vda".into(),
                bus: Some("virtio".into()),
            },
            readonly: None,
            boot: None,
            alias: None,
        });
        let xml = d.render().unwrap_or_else(|e| panic!("{e}"));
        assert!(!xml.contains("</name><devices/>"), "{xml}");
        assert_eq!(xml.matches("<name>").count(), 1);
        let back = DomainXml::parse(&xml).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, d);
        assert_eq!(back.owner().map(|o| o.namespace.as_str()), Some("ns\"><x"));
    }

    #[test]
    fn parses_libvirt_output_with_unknown_elements() {
        let xml = r#"<domain type='kvm' id='3'>
  <name>web</name>
  <uuid>11111111-2222-4333-8444-555555555555</uuid>
  <metadata>
    <other:thing xmlns:other="http://example.com/x">ignored</other:thing>
    <kvmop:owner xmlns:kvmop="https://kvm-operator.io/xmlns/owner/v1alpha1" uid="u1" namespace="default" name="web"/>
  </metadata>
  <memory unit='KiB'>65536</memory>
  <currentMemory unit='KiB'>65536</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <resource><partition>/machine</partition></resource>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type><boot dev='hd'/></os>
  <clock offset='utc'/>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' index='0' model='piix3-uhci'/>
    <serial type='pty'><source path='/dev/pts/3'/><target type='isa-serial' port='0'/><alias name='serial0'/></serial>
    <memballoon model='virtio'/>
  </devices>
</domain>"#;
        let d = DomainXml::parse(xml).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.name, "web");
        assert_eq!(d.memory.as_kib(), Some(65536));
        assert_eq!(d.vcpu.count, 1);
        assert_eq!(d.owner().map(|o| o.uid.as_str()), Some("u1"));
        assert_eq!(d.devices.serial.len(), 1);
    }

    #[test]
    fn devices_render_as_single_elements_and_consoles_read_back() {
        let nic = Device::Interface(Interface {
            iface_type: "network".into(),
            mac: Some(Mac {
                address: "52:54:00:00:00:01".into(),
            }),
            source: Some(InterfaceSource {
                network: Some("default".into()),
                bridge: None,
            }),
            model: Some(Model {
                model_type: "virtio".into(),
            }),
            boot: None,
            alias: Some(Alias {
                name: "ua-net0".into(),
            }),
        });
        let xml = nic.render().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            xml,
            r#"<interface type="network"><mac address="52:54:00:00:00:01"/><source network="default"/><model type="virtio"/><alias name="ua-net0"/></interface>"#
        );
        let live = r#"<domain type='kvm'><name>x</name><memory>1</memory><vcpu>1</vcpu><os><type>hvm</type></os><devices>
            <serial type='pty'><source path='/dev/pts/7'/><target port='0'/></serial>
            <graphics type='vnc' port='5901' autoport='yes' listen='127.0.0.1'><listen type='address' address='127.0.0.1'/></graphics>
            </devices></domain>"#;
        let c = DomainXml::parse(live)
            .unwrap_or_else(|e| panic!("{e}"))
            .console();
        assert_eq!(c.vnc.as_deref(), Some("127.0.0.1:5901"));
        assert_eq!(c.serial.as_deref(), Some("/dev/pts/7"));
    }

    #[test]
    fn metadata_elements_as_libvirt_returns_them() {
        let o = Owner::from_metadata_element(r#"<owner uid="u1" namespace="ns" name="vm"/>"#);
        assert_eq!(o, Some(Owner::new("u1", "ns", "vm")));
        assert_eq!(Owner::from_metadata_element("<owner uid='u'/>"), None);
        assert_eq!(Owner::from_metadata_element("garbage"), None);
    }

    #[test]
    fn foreign_stamps_are_not_ours() {
        let xml = "<domain type='kvm'><name>x</name><metadata><kvmop:owner xmlns:kvmop='http://evil' uid='u' namespace='n' name='x'/></metadata><memory>1</memory><vcpu>1</vcpu><os><type>hvm</type></os><devices/></domain>";
        let d = DomainXml::parse(xml).unwrap_or_else(|e| panic!("{e}"));
        assert!(d.owner().is_none());
        assert!(DomainXml::parse("<domain><name>x</name>").is_err());
    }
}
