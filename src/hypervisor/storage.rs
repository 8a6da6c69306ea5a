//! Storage pools and volumes: typed XML built from specs, and the operations on a connection.
//!
//! Safety rules: a pool is built with `NO_OVERWRITE` (an LVM device that holds data is never
//! formatted), and removing a pool stops and undefines it without deleting its storage. Volumes
//! are deleted only when asked by name.

use serde::{Deserialize, Serialize};
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;
use virt::sys;

use super::HvError;
use super::connection::Connection;
use crate::api::storage_pool::{PoolAuthType, PoolType, SourceFormat, StoragePoolSpec};
use crate::api::virtual_machine::VolumeFormat;

/// `<pool type=>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename = "pool")]
pub struct PoolXml {
    #[serde(rename = "@type")]
    pub pool_type: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PoolSourceXml>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<PathTarget>,
}

/// `<source>` of a pool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct PoolSourceXml {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host: Vec<HostXml>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device: Vec<PathAttr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathAttr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<TypeAttr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiator: Option<Initiator>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthXml>,
}

/// `<host name= port=/>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostXml {
    #[serde(rename = "@name")]
    pub name: String,
    #[serde(rename = "@port", default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// An element with a `path` attribute.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PathAttr {
    #[serde(rename = "@path")]
    pub path: String,
}

/// An element with a `type` attribute.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TypeAttr {
    #[serde(rename = "@type")]
    pub type_: String,
}

/// `<initiator><iqn name=/></initiator>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Initiator {
    pub iqn: NameAttr,
}

/// An element with a `name` attribute.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NameAttr {
    #[serde(rename = "@name")]
    pub name: String,
}

/// `<auth type= username=><secret usage=/></auth>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuthXml {
    #[serde(rename = "@type")]
    pub type_: String,
    #[serde(rename = "@username")]
    pub username: String,
    pub secret: SecretUsage,
}

/// `<secret usage=/>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SecretUsage {
    #[serde(rename = "@usage")]
    pub usage: String,
}

/// `<target><path>…</path></target>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PathTarget {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<TypeAttr>,
}

impl PoolXml {
    /// The libvirt definition of a StoragePool spec, named `name` on the host.
    pub fn from_spec(name: &str, spec: &StoragePoolSpec) -> Self {
        let src = spec.source.clone().unwrap_or_default();
        let host = src
            .host
            .iter()
            .map(|h| HostXml {
                name: h.clone(),
                port: src.port,
            })
            .collect();
        let auth = src.auth.as_ref().map(|a| AuthXml {
            type_: match a.type_ {
                PoolAuthType::Chap => "chap",
                PoolAuthType::Ceph => "ceph",
            }
            .into(),
            username: a.username.clone(),
            secret: SecretUsage {
                usage: a.secret_usage.clone(),
            },
        });
        let fmt = |f: SourceFormat| TypeAttr {
            type_: match f {
                SourceFormat::Nfs => "nfs",
                SourceFormat::Cifs => "cifs",
                SourceFormat::Glusterfs => "glusterfs",
                SourceFormat::Lvm2 => "lvm2",
            }
            .into(),
        };
        let target = |default: Option<String>| {
            spec.target_path
                .clone()
                .or(default)
                .map(|path| PathTarget { path, format: None })
        };
        let (source, target) = match spec.type_ {
            PoolType::Dir => (None, target(None)),
            PoolType::Netfs => (
                Some(PoolSourceXml {
                    host,
                    dir: src.dir.clone().map(|path| PathAttr { path }),
                    format: Some(fmt(src.format.unwrap_or(SourceFormat::Nfs))),
                    ..PoolSourceXml::default()
                }),
                target(None),
            ),
            PoolType::Logical => (
                Some(PoolSourceXml {
                    device: src
                        .devices
                        .iter()
                        .map(|p| PathAttr { path: p.clone() })
                        .collect(),
                    name: src.name.clone(),
                    format: Some(fmt(SourceFormat::Lvm2)),
                    ..PoolSourceXml::default()
                }),
                target(src.name.as_ref().map(|vg| format!("/dev/{vg}"))),
            ),
            PoolType::Iscsi => (
                Some(PoolSourceXml {
                    host,
                    device: src
                        .target
                        .iter()
                        .map(|t| PathAttr { path: t.clone() })
                        .collect(),
                    initiator: src.initiator.clone().map(|name| Initiator {
                        iqn: NameAttr { name },
                    }),
                    auth,
                    ..PoolSourceXml::default()
                }),
                target(Some("/dev/disk/by-path".into())),
            ),
            PoolType::Rbd => (
                Some(PoolSourceXml {
                    host,
                    name: src.name.clone(),
                    auth,
                    ..PoolSourceXml::default()
                }),
                None,
            ),
        };
        PoolXml {
            pool_type: spec.type_.as_str().into(),
            name: name.into(),
            uuid: None,
            source,
            target,
        }
    }

    pub fn render(&self) -> Result<String, HvError> {
        quick_xml::se::to_string(self).map_err(|e| HvError::Xml {
            what: format!("pool {:?}", self.name),
            cause: e.to_string(),
        })
    }

    pub fn parse(xml: &str) -> Result<Self, HvError> {
        quick_xml::de::from_str(xml).map_err(|e| HvError::Xml {
            what: "pool XML from the host".into(),
            cause: e.to_string(),
        })
    }

    /// True when `observed` (read back from the host) defines the same pool: type, source and
    /// target as we would write them. libvirt's own additions (uuid, capacity, permissions, a
    /// default port) are ignored.
    pub fn same_definition(&self, observed: &PoolXml) -> bool {
        let strip = |p: &PoolXml| {
            let mut p = p.clone();
            p.uuid = None;
            if let Some(t) = p.target.as_mut() {
                t.format = None;
            }
            if let Some(s) = p.source.as_mut() {
                // libvirt omits an empty <source/> on output
                if *s == PoolSourceXml::default() {
                    p.source = None;
                }
            }
            p
        };
        strip(self) == strip(observed)
    }
}

/// `<volume>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename = "volume")]
pub struct VolumeXml {
    pub name: String,
    pub capacity: Capacity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<Capacity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<VolTarget>,
    #[serde(
        rename = "backingStore",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backing_store: Option<VolTarget>,
}

/// `<capacity unit='bytes'>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    #[serde(rename = "@unit", default = "bytes")]
    pub unit: String,
    #[serde(rename = "$text")]
    pub value: u64,
}

fn bytes() -> String {
    "bytes".into()
}

/// `<target>` / `<backingStore>` of a volume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VolTarget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<TypeAttr>,
}

impl VolumeXml {
    /// A new volume of `capacity` bytes. `sparse` volumes start with no allocation (files);
    /// block pools (logical) need fully allocated volumes, or libvirt makes a snapshot LV.
    pub fn new(name: &str, capacity: u64, format: VolumeFormat, sparse: bool) -> Self {
        Self {
            name: name.into(),
            capacity: Capacity {
                unit: bytes(),
                value: capacity,
            },
            allocation: Some(Capacity {
                unit: bytes(),
                value: if sparse { 0 } else { capacity },
            }),
            target: Some(VolTarget {
                path: None,
                format: Some(TypeAttr {
                    type_: format_name(format).into(),
                }),
            }),
            backing_store: None,
        }
    }

    pub fn render(&self) -> Result<String, HvError> {
        quick_xml::se::to_string(self).map_err(|e| HvError::Xml {
            what: format!("volume {:?}", self.name),
            cause: e.to_string(),
        })
    }
}

fn format_name(f: VolumeFormat) -> &'static str {
    match f {
        VolumeFormat::Qcow2 => "qcow2",
        VolumeFormat::Raw => "raw",
    }
}

/// A pool's state and sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolInfo {
    pub running: bool,
    pub autostart: bool,
    pub capacity: u64,
    pub allocation: u64,
    pub available: u64,
}

/// A volume's path and sizes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub path: String,
    pub capacity: u64,
    pub allocation: u64,
}

impl Connection {
    fn pool(&self, name: &str) -> Result<StoragePool, HvError> {
        self.raw().lookup_storage_pool_by_name(name).map_err(|e| {
            if e.code()
                == virt::error::ErrorNumberEnum::Known(virt::error::ErrorNumber::NoStoragePool)
            {
                HvError::NotFound {
                    what: format!("storage pool {name:?}"),
                    target: self.node().to_string(),
                }
            } else {
                self.err("lookup pool", e)
            }
        })
    }

    fn vol(&self, pool: &StoragePool, pool_name: &str, name: &str) -> Result<StorageVol, HvError> {
        // libvirt answers from its list of the pool's volumes, which misses a volume another
        // host made on shared storage (or one copied in by hand) until the pool is refreshed:
        // refresh once before calling a volume missing, so nothing is created over it
        if let Ok(v) = pool.lookup_storage_vol_by_name(name) {
            return Ok(v);
        }
        let _ = pool.refresh(0);
        pool.lookup_storage_vol_by_name(name).map_err(|e| {
            if e.code()
                == virt::error::ErrorNumberEnum::Known(virt::error::ErrorNumber::NoStorageVolume)
            {
                HvError::NotFound {
                    what: format!("volume {name:?} in pool {pool_name:?}"),
                    target: self.node().to_string(),
                }
            } else {
                self.err("lookup volume", e)
            }
        })
    }

    /// The pool's definition as the host has it, or `None` when no pool has that name.
    pub fn pool_definition(&self, name: &str) -> Result<Option<PoolXml>, HvError> {
        match self.pool(name) {
            Ok(p) => {
                // the persistent definition; drivers without that flag (libvirt's test driver)
                // have only one definition, the current one
                let xml = match p.xml_desc(sys::VIR_STORAGE_XML_INACTIVE) {
                    Ok(x) => x,
                    Err(e) if e.code().to_raw() == sys::VIR_ERR_INVALID_ARG => {
                        p.xml_desc(0).map_err(|e| self.err("get pool XML", e))?
                    }
                    Err(e) => return Err(self.err("get pool XML", e)),
                };
                Ok(Some(PoolXml::parse(&xml)?))
            }
            Err(HvError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Defines the pool, builds it without overwriting existing data, starts it and sets
    /// autostart. Each step is skipped when already done, so it can be retried after any failure.
    pub fn ensure_pool(&self, def: &PoolXml, autostart: bool) -> Result<PoolInfo, HvError> {
        let pool = match self.pool(&def.name) {
            Ok(p) => p,
            Err(HvError::NotFound { .. }) => self
                .raw()
                .define_storage_pool_xml(&def.render()?, 0)
                .map_err(|e| self.err("define pool", e))?,
            Err(e) => return Err(e),
        };
        if !pool.is_active().map_err(|e| self.err("pool state", e))? {
            // dir: mkdir; logical with devices: vgcreate, refused if the devices hold data.
            let needs_build = matches!(def.pool_type.as_str(), "dir" | "netfs")
                || (def.pool_type == "logical"
                    && def.source.as_ref().is_some_and(|s| !s.device.is_empty()));
            if needs_build {
                if let Err(e) = pool.build(sys::VIR_STORAGE_POOL_BUILD_NO_OVERWRITE) {
                    // an existing volume group or directory is fine; anything else is not
                    let exists = def.pool_type == "logical" && e.message().contains("already");
                    if !exists && def.pool_type != "dir" {
                        return Err(self.err("build pool", e));
                    }
                }
            }
            pool.create(0).map_err(|e| self.err("start pool", e))?;
        }
        if pool
            .autostart()
            .map_err(|e| self.err("pool autostart", e))?
            != autostart
        {
            pool.set_autostart(autostart)
                .map_err(|e| self.err("set pool autostart", e))?;
        }
        self.pool_info(&def.name)
    }

    /// Refreshes and reports a pool.
    pub fn pool_info(&self, name: &str) -> Result<PoolInfo, HvError> {
        let pool = self.pool(name)?;
        let running = pool.is_active().map_err(|e| self.err("pool state", e))?;
        if running {
            pool.refresh(0).map_err(|e| self.err("refresh pool", e))?;
        }
        let i = pool.info().map_err(|e| self.err("pool info", e))?;
        Ok(PoolInfo {
            running,
            autostart: pool
                .autostart()
                .map_err(|e| self.err("pool autostart", e))?,
            capacity: i.capacity,
            allocation: i.allocation,
            available: i.available,
        })
    }

    /// Stops and undefines a pool. Its directory, volume group or volumes are left as they are.
    /// A missing pool is success.
    pub fn remove_pool(&self, name: &str) -> Result<(), HvError> {
        let pool = match self.pool(name) {
            Ok(p) => p,
            Err(HvError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        if pool.is_active().map_err(|e| self.err("pool state", e))? {
            pool.destroy().map_err(|e| self.err("stop pool", e))?;
        }
        pool.undefine().map_err(|e| self.err("undefine pool", e))
    }

    /// File-based pools hold sparse volumes; block pools do not.
    fn sparse(&self, pool: &StoragePool) -> Result<bool, HvError> {
        let xml = pool.xml_desc(0).map_err(|e| self.err("get pool XML", e))?;
        Ok(matches!(
            PoolXml::parse(&xml)?.pool_type.as_str(),
            "dir" | "netfs"
        ))
    }

    /// Names of the volumes in a pool.
    pub fn list_volumes(&self, pool: &str) -> Result<Vec<String>, HvError> {
        let p = self.pool(pool)?;
        p.refresh(0).map_err(|e| self.err("refresh pool", e))?;
        p.list_volumes().map_err(|e| self.err("list volumes", e))
    }

    fn vol_info(&self, v: &StorageVol) -> Result<VolumeInfo, HvError> {
        let i = v.info().map_err(|e| self.err("volume info", e))?;
        Ok(VolumeInfo {
            name: v.name().map_err(|e| self.err("volume name", e))?,
            path: v.path().map_err(|e| self.err("volume path", e))?,
            capacity: i.capacity,
            allocation: i.allocation,
        })
    }

    /// A volume's path and sizes.
    pub fn volume_info(&self, pool: &str, name: &str) -> Result<VolumeInfo, HvError> {
        let p = self.pool(pool)?;
        let v = self.vol(&p, pool, name)?;
        self.vol_info(&v)
    }

    /// Creates an empty volume; an existing volume of that name is returned as is.
    pub fn create_volume(
        &self,
        pool: &str,
        name: &str,
        capacity: u64,
        format: VolumeFormat,
    ) -> Result<VolumeInfo, HvError> {
        let p = self.pool(pool)?;
        if let Ok(v) = self.vol(&p, pool, name) {
            return self.vol_info(&v);
        }
        let xml = VolumeXml::new(name, capacity, format, self.sparse(&p)?).render()?;
        let v = StorageVol::create_xml(&p, &xml, 0).map_err(|e| self.err("create volume", e))?;
        self.vol_info(&v)
    }

    /// Copies `template` into a new volume `name` in the same pool, grown to `capacity` when
    /// larger. An existing volume of that name is returned as is (the copy is not redone).
    pub fn clone_volume(
        &self,
        pool: &str,
        template: &str,
        name: &str,
        capacity: Option<u64>,
        format: VolumeFormat,
    ) -> Result<VolumeInfo, HvError> {
        let p = self.pool(pool)?;
        if let Ok(v) = self.vol(&p, pool, name) {
            return self.vol_info(&v);
        }
        let src = self.vol(&p, pool, template)?;
        let src_info = self.vol_info(&src)?;
        let cap = capacity.unwrap_or(src_info.capacity).max(src_info.capacity);
        let xml = VolumeXml::new(name, cap, format, self.sparse(&p)?).render()?;
        let v = StorageVol::create_xml_from(&p, &xml, &src, 0)
            .map_err(|e| self.err("clone volume", e))?;
        // libvirt copies at the template's size whatever the XML says: grow the copy after.
        if self.vol_info(&v)?.capacity < cap {
            v.resize(cap, 0)
                .map_err(|e| self.err("resize cloned volume", e))?;
        }
        self.vol_info(&v)
    }

    /// A qcow2 volume `name` whose backing file is `base` (same pool).
    pub fn overlay_volume(
        &self,
        pool: &str,
        base: &str,
        name: &str,
        capacity: Option<u64>,
    ) -> Result<VolumeInfo, HvError> {
        let p = self.pool(pool)?;
        if let Ok(v) = self.vol(&p, pool, name) {
            return self.vol_info(&v);
        }
        let b = self.vol(&p, pool, base)?;
        let b_info = self.vol_info(&b)?;
        let b_xml = b.xml_desc(0).map_err(|e| self.err("get volume XML", e))?;
        let b_format = quick_xml::de::from_str::<VolumeXml>(&b_xml)
            .ok()
            .and_then(|x| x.target)
            .and_then(|t| t.format)
            .map(|f| f.type_)
            .unwrap_or_else(|| "raw".into());
        let mut xml = VolumeXml::new(
            name,
            capacity.unwrap_or(b_info.capacity).max(b_info.capacity),
            VolumeFormat::Qcow2,
            true,
        );
        xml.backing_store = Some(VolTarget {
            path: Some(b_info.path.clone()),
            format: Some(TypeAttr { type_: b_format }),
        });
        let v = StorageVol::create_xml(&p, &xml.render()?, 0)
            .map_err(|e| self.err("create overlay", e))?;
        self.vol_info(&v)
    }

    /// Grows a volume to `capacity` bytes (never shrinks: a smaller size is an error).
    pub fn resize_volume(
        &self,
        pool: &str,
        name: &str,
        capacity: u64,
    ) -> Result<VolumeInfo, HvError> {
        let p = self.pool(pool)?;
        let v = self.vol(&p, pool, name)?;
        let cur = self.vol_info(&v)?;
        if capacity < cur.capacity {
            return Err(HvError::Local {
                cause: format!(
                    "volume {name:?} in pool {pool:?} on {} is {} bytes; shrinking to {capacity} would lose data",
                    self.node(),
                    cur.capacity
                ),
            });
        }
        if capacity > cur.capacity {
            v.resize(capacity, 0)
                .map_err(|e| self.err("resize volume", e))?;
        }
        self.vol_info(&v)
    }

    /// Deletes a volume. A missing volume is success.
    pub fn delete_volume(&self, pool: &str, name: &str) -> Result<(), HvError> {
        let p = self.pool(pool)?;
        match self.vol(&p, pool, name) {
            Ok(v) => v.delete(0).map_err(|e| self.err("delete volume", e)),
            Err(HvError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Writes a cloud-init seed image into raw volume `name`, creating or replacing it so it holds
    /// exactly this seed.
    pub fn write_seed(
        &self,
        pool: &str,
        name: &str,
        seed: &super::cloud_init::Seed,
    ) -> Result<VolumeInfo, HvError> {
        let iso = seed.to_iso();
        let len = iso.len() as u64;
        if let Ok(cur) = self.volume_info(pool, name)
            && cur.capacity != len
        {
            self.delete_volume(pool, name)?;
        }
        self.create_volume(pool, name, len, VolumeFormat::Raw)?;
        self.upload(pool, name, &iso)?;
        self.volume_info(pool, name)
    }

    /// Writes `data` into a volume from offset 0 through a libvirt stream.
    pub fn upload(&self, pool: &str, name: &str, data: &[u8]) -> Result<(), HvError> {
        let p = self.pool(pool)?;
        let v = self.vol(&p, pool, name)?;
        let st = Stream::new(self.raw(), 0).map_err(|e| self.err("open stream", e))?;
        v.upload(&st, 0, data.len() as u64, 0)
            .map_err(|e| self.err("upload", e))?;
        let mut off = 0;
        while off < data.len() {
            let n = st.send(&data[off..]).map_err(|e| self.err("upload", e))?;
            let n = usize::try_from(n).unwrap_or(0);
            if n == 0 {
                let _ = st.abort();
                return Err(HvError::Local {
                    cause: format!(
                        "upload to {name:?} on {} stalled at {off} bytes",
                        self.node()
                    ),
                });
            }
            off += n;
        }
        st.finish().map_err(|e| self.err("finish upload", e))
    }

    /// Reads `len` bytes of a volume from offset 0 through a libvirt stream.
    pub fn download(&self, pool: &str, name: &str, len: u64) -> Result<Vec<u8>, HvError> {
        let p = self.pool(pool)?;
        let v = self.vol(&p, pool, name)?;
        let st = Stream::new(self.raw(), 0).map_err(|e| self.err("open stream", e))?;
        v.download(&st, 0, len, 0)
            .map_err(|e| self.err("download", e))?;
        let mut out = Vec::with_capacity(usize::try_from(len).unwrap_or(0).min(64 << 20));
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = st.recv(&mut buf).map_err(|e| self.err("download", e))?;
            let n = usize::try_from(n).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        st.finish().map_err(|e| self.err("finish download", e))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> StoragePoolSpec {
        serde_saphyr::from_str(yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn pool_xml_for_every_type() {
        let cases = [
            (
                "nodeName: a\ntype: dir\ntargetPath: /var/lib/libvirt/images",
                r#"<pool type="dir"><name>p</name><target><path>/var/lib/libvirt/images</path></target></pool>"#,
            ),
            (
                "nodeName: a\ntype: logical\nsource: {name: vg0, devices: [/dev/sdb, /dev/sdc]}",
                r#"<pool type="logical"><name>p</name><source><device path="/dev/sdb"/><device path="/dev/sdc"/><name>vg0</name><format type="lvm2"/></source><target><path>/dev/vg0</path></target></pool>"#,
            ),
            (
                "nodeName: a\ntype: netfs\nsource: {host: nfs.example.org, dir: /exports/vms}\ntargetPath: /mnt/vms",
                r#"<pool type="netfs"><name>p</name><source><host name="nfs.example.org"/><dir path="/exports/vms"/><format type="nfs"/></source><target><path>/mnt/vms</path></target></pool>"#,
            ),
            (
                "nodeName: a\ntype: iscsi\nsource: {host: 10.0.0.9, port: 3260, target: 'iqn.2024-01.org.example:s1', initiator: 'iqn.2024-01.org.example:hv1', auth: {type: chap, username: u, secretUsage: iscsi-s1}}",
                r#"<pool type="iscsi"><name>p</name><source><host name="10.0.0.9" port="3260"/><device path="iqn.2024-01.org.example:s1"/><initiator><iqn name="iqn.2024-01.org.example:hv1"/></initiator><auth type="chap" username="u"><secret usage="iscsi-s1"/></auth></source><target><path>/dev/disk/by-path</path></target></pool>"#,
            ),
            (
                "nodeName: a\ntype: rbd\nsource: {host: mon1, name: vms, auth: {type: ceph, username: libvirt, secretUsage: ceph-client}}",
                r#"<pool type="rbd"><name>p</name><source><host name="mon1"/><name>vms</name><auth type="ceph" username="libvirt"><secret usage="ceph-client"/></auth></source></pool>"#,
            ),
        ];
        for (yaml, want) in cases {
            let s = spec(yaml);
            s.validate().unwrap_or_else(|e| panic!("{yaml}: {e}"));
            let xml = PoolXml::from_spec("p", &s);
            assert_eq!(xml.render().unwrap_or_default(), want);
            let back = PoolXml::parse(want).unwrap_or_else(|e| panic!("{e}"));
            assert!(xml.same_definition(&back));
        }
    }

    #[test]
    fn every_pool_type_is_accepted_by_libvirts_parser() {
        // libvirt's test driver parses pool XML with the same code as the real daemons.
        let conn = Connection::open("test:///default", "test").unwrap_or_else(|e| panic!("{e}"));
        for (i, yaml) in [
            "nodeName: a\ntype: logical\nsource: {name: vg0, devices: [/dev/sdb]}",
            "nodeName: a\ntype: netfs\nsource: {host: nfs, dir: /x}\ntargetPath: /mnt/x",
            "nodeName: a\ntype: iscsi\nsource: {host: portal, target: 'iqn.2024-01.org.example:s1'}",
            "nodeName: a\ntype: rbd\nsource: {host: mon1, name: vms, auth: {type: ceph, username: libvirt, secretUsage: ceph-client}}",
        ]
        .iter()
        .enumerate()
        {
            let xml = PoolXml::from_spec(&format!("parse{i}"), &spec(yaml)).render().unwrap_or_default();
            let p = conn
                .raw()
                .define_storage_pool_xml(&xml, 0)
                .unwrap_or_else(|e| panic!("{yaml}: {e}"));
            let back = PoolXml::parse(&p.xml_desc(0).unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
            assert!(PoolXml::from_spec(&format!("parse{i}"), &spec(yaml)).same_definition(&back), "{back:?}");
            let _ = p.undefine();
        }
    }

    #[test]
    fn hostile_names_stay_inside_their_elements() {
        let s = spec("nodeName: a\ntype: dir\ntargetPath: /x</path></target><target><path>/etc");
        let xml = PoolXml::from_spec("a\"b<c>&", &s)
            .render()
            .unwrap_or_default();
        assert_eq!(xml.matches("<target>").count(), 1, "{xml}");
        let v = VolumeXml::new("v</name><capacity>1", 5, VolumeFormat::Raw, true)
            .render()
            .unwrap_or_default();
        assert_eq!(v.matches("<capacity").count(), 1, "{v}");
    }
}
