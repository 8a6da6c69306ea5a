//! Backup of domain definitions: each managed domain's persistent XML, exactly as libvirt writes
//! it (secure fields such as VNC passwords left out), is copied off its host whenever it
//! changes, so a lost host's guests can be defined again elsewhere from their disks.
//!
//! The VM's status carries the definition's digest (`status.definition.sha256`, refreshed by
//! every observation) and the copy's (`backupSha256`); a copy is written only when they differ.
//! In a cluster the copy is a ConfigMap `<vm>-domain-definition` beside the VM (owned by it, so
//! it goes when the VM is deleted); in standalone mode a file under the state directory.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};

use super::{Note, describe, now};
use crate::api::VirtualMachine;
use crate::api::virtual_machine::VirtualMachineStatus;
use crate::hypervisor::Hypervisor;

/// Key of the XML in the ConfigMap.
pub const KEY: &str = "domain.xml";
/// Label on the ConfigMaps the operator writes (and will overwrite).
pub const LABEL: &str = "kvm-operator.io/definition-of";

/// SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Name of a VM's backup ConfigMap.
pub fn config_map_name(vm: &str) -> String {
    format!("{vm}-domain-definition")
}

/// Where copies go.
pub trait BackupSink: Sync {
    /// Keeps `xml` as the definition of `vm`'s domain `domain` on `node`; returns where.
    fn put(
        &self,
        vm: &VirtualMachine,
        node: &str,
        domain: &str,
        xml: &str,
    ) -> impl std::future::Future<Output = Result<String, String>> + Send;
}

/// In a cluster: a ConfigMap in the VM's namespace, owned by the VM.
impl BackupSink for Client {
    async fn put(
        &self,
        vm: &VirtualMachine,
        node: &str,
        domain: &str,
        xml: &str,
    ) -> Result<String, String> {
        let ns = vm.namespace().unwrap_or_else(|| "default".into());
        let name = config_map_name(&vm.name_any());
        let api: Api<ConfigMap> = Api::namespaced(self.clone(), &ns);
        // never overwrite a ConfigMap someone else made under the same name
        match api.get_opt(&name).await {
            Ok(Some(cm)) if cm.labels().get(LABEL) != Some(&vm.name_any()) => {
                return Err(format!(
                    "ConfigMap {ns}/{name} exists and is not the operator's backup (no label {LABEL}={}); rename that ConfigMap to let the operator keep the copy",
                    vm.name_any()
                ));
            }
            Ok(_) => {}
            Err(e) => return Err(format!("cannot read ConfigMap {ns}/{name}: {e}")),
        }
        let owner = vm.controller_owner_ref(&()).map(|mut o| {
            // the ConfigMap belongs to the VM, but its deletion never waits for it
            o.controller = Some(false);
            o.block_owner_deletion = Some(false);
            o
        });
        let cm = serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": {LABEL: vm.name_any(), "app.kubernetes.io/managed-by": "kvm-operator"},
                "annotations": {
                    "kvm-operator.io/node": node,
                    "kvm-operator.io/domain": domain,
                    "kvm-operator.io/sha256": sha256_hex(xml.as_bytes()),
                },
                "ownerReferences": owner.into_iter().collect::<Vec<_>>(),
            },
            "data": {KEY: xml},
        });
        api.patch(
            &name,
            &PatchParams::apply("kvm-operator-backup").force(),
            &Patch::Apply(&cm),
        )
        .await
        .map_err(|e| format!("cannot write ConfigMap {ns}/{name}: {e}"))?;
        Ok(format!("ConfigMap {ns}/{name}"))
    }
}

/// In standalone mode: `<dir>/<namespace>/<vm>.xml`, written atomically, mode 0600.
pub struct Files(pub PathBuf);

impl BackupSink for Files {
    async fn put(
        &self,
        vm: &VirtualMachine,
        _node: &str,
        _domain: &str,
        xml: &str,
    ) -> Result<String, String> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let ns = vm.namespace().unwrap_or_else(|| "default".into());
        // names are validated when manifests load; checked again here because a path built
        // from them must never leave the directory (an absolute namespace would replace it)
        let name = vm.name_any();
        if !crate::api::validation::is_dns_label(&ns)
            || !crate::api::validation::is_object_name(&name)
        {
            return Err(format!(
                "{ns:?}/{name:?} cannot name a file: namespace and name must be Kubernetes names"
            ));
        }
        let dir = self.0.join(&ns);
        let path = dir.join(format!("{name}.xml"));
        let tmp = dir.join(format!(".{name}.xml.tmp"));
        let xml = xml.to_string();
        let shown = path.display().to_string();
        // writing and syncing wait on the disk: not on the async runtime, and side by side with
        // the other VMs' copies (the filesystem commits concurrent syncs together)
        let write = move || -> std::io::Result<()> {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(xml.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        match tokio::task::spawn_blocking(write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("cannot write {shown}: {e}")),
            Err(e) => return Err(format!("writing {shown} panicked: {e}")),
        }
        Ok(shown)
    }
}

/// Copies the VM's definition when the status says the last copy is not of the current one.
/// `read` is the definition's text as the reconcile read it, used when it is the one the status
/// names (else the definition is read from the node). Updates `status.definition` and returns
/// the Event to publish (None: nothing to do).
pub async fn keep<H: Hypervisor>(
    vm: &VirtualMachine,
    status: &mut VirtualMachineStatus,
    hv: &H,
    sink: &impl BackupSink,
    read: Option<&str>,
) -> Option<Note> {
    let def = status.definition.as_mut()?;
    if def.backup_sha256.as_deref() == Some(def.sha256.as_str()) || def.sha256.is_empty() {
        return None;
    }
    let (Some(node), Some(domain)) = (status.node.clone(), status.domain_name.clone()) else {
        return None;
    };
    let d = domain.clone();
    let known = read.filter(|x| sha256_hex(x.as_bytes()) == def.sha256);
    let fetched = match known {
        Some(x) => Ok(x.to_string()),
        None => {
            hv.call(&node, "read definition", move |c| c.persistent_xml_text(&d))
                .await
        }
    };
    let xml = match fetched {
        Ok(x) => x,
        Err(e) => {
            return Some(Note::warning(
                "BackupFailed",
                "Backup",
                format!(
                    "{}: the domain definition could not be read for its backup: {e}; retried at the next reconcile",
                    describe(vm)
                ),
            ));
        }
    };
    match sink.put(vm, &node, &domain, &xml).await {
        Ok(location) => {
            let digest = sha256_hex(xml.as_bytes());
            let msg = format!(
                "{}: definition of domain {domain} on KvmNode {node} copied to {location}",
                describe(vm)
            );
            def.sha256 = digest.clone();
            def.backup = Some(location);
            def.backup_sha256 = Some(digest);
            def.backup_time = Some(now());
            Some(Note::normal("DefinitionBackedUp", "Backup", msg))
        }
        Err(e) => Some(Note::warning(
            "BackupFailed",
            "Backup",
            format!(
                "{}: the domain definition could not be kept: {e}; retried at the next reconcile",
                describe(vm)
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_is_the_standard_digest() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
