//! Standalone mode (`kvm-operator standalone`): the real binary and the library's runner against
//! libvirt's `test:///default` driver (the embedded default node) and against the lab (a real
//! KVM guest on a namespace host over sshd). No cluster is involved in standalone mode.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use kvm_operator::api::virtual_machine::PowerState;
use kvm_operator::controller::Config;
use kvm_operator::controller::standalone::{Options, Standalone};
use kvm_operator::hypervisor::{Connection, DomainState};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kvm-operator"))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn state(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("status.yaml")).unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

/// `kvm-operator standalone --once` on the quickstart manifests, state in `state_dir`.
fn quickstart_once(state_dir: &std::path::Path) -> std::process::Output {
    bin()
        .args(["standalone", "-f"])
        .arg(root().join("examples/quickstart"))
        .args(["--once", "--timeout", "120", "--state-dir"])
        .arg(state_dir)
        .output()
        .unwrap()
}

#[test]
fn the_quickstart_reaches_running_on_the_embedded_default_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let out = quickstart_once(dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // the last table shows every VM running and ready on the default node
    let table = stdout.rsplit("KIND/NAME").next().unwrap();
    let s = state(dir.path());
    for vm in ["hello", "hello-2", "adopted"] {
        let line = table
            .lines()
            .find(|l| l.starts_with(&format!("vm/{vm} ")))
            .unwrap_or_else(|| panic!("no {vm} in {table}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[1..4], ["default", "Running", "True"], "{line}");
        // the IP column is the first of status.ips: the adopted domain of libvirt's default
        // host has a NIC, the two new VMs none
        let ips = &s["objects"][format!("VirtualMachine/default/{vm}").as_str()]["status"]["ips"];
        let want = ips[0].as_str().unwrap_or("-");
        assert_eq!(cols[4], want, "{line}");
        assert_eq!(vm == "adopted", want != "-", "{line}");
    }
    assert!(stdout.contains("Adopted"), "{stdout}");
    // the state file has each object's UID and status
    let hello = &s["objects"]["VirtualMachine/default/hello"];
    assert_eq!(hello["uid"].as_str().unwrap().len(), 36);
    assert_eq!(hello["status"]["powerState"], "Running");
    assert_eq!(hello["status"]["node"], "default");
    assert_eq!(
        s["objects"]["KvmNode/default"]["spec"]["libvirtUri"],
        "test:///default"
    );
    // each VM's definition is kept beside the state (adopted ones too), as the status says
    for vm in ["hello", "hello-2", "adopted"] {
        let def =
            &s["objects"][format!("VirtualMachine/default/{vm}").as_str()]["status"]["definition"];
        let file = dir.path().join(format!("definitions/default/{vm}.xml"));
        let xml = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{}: {e}; status: {def}", file.display()));
        assert!(
            xml.starts_with("<domain") && xml.contains("<uuid>"),
            "{xml}"
        );
        assert_eq!(def["backup"], file.display().to_string());
        assert_eq!(
            def["backupSha256"],
            kvm_operator::controller::backup::sha256_hex(xml.as_bytes())
        );
        assert_eq!(def["sha256"], def["backupSha256"], "current");
    }
    assert!(stdout.contains("DefinitionBackedUp"), "{stdout}");
}

#[test]
fn a_definition_copy_that_cannot_take_its_place_is_reported_and_not_recorded() {
    let dir = tempfile::tempdir().unwrap();
    // a directory where hello's copy goes: its copy is written, then cannot be renamed there
    let blocked = dir.path().join("definitions/default/hello.xml");
    std::fs::create_dir_all(&blocked).unwrap();
    let out = quickstart_once(dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // a lost copy is a warning: the VMs themselves run
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let warning = stdout
        .lines()
        .find(|l| l.contains("BackupFailed") && l.contains("hello") && !l.contains("hello-2"))
        .unwrap_or_else(|| panic!("no BackupFailed for hello in {stdout}"));
    assert!(
        warning.contains(&blocked.display().to_string()) && warning.contains("retried"),
        "{warning}"
    );
    let s = state(dir.path());
    let def = &s["objects"]["VirtualMachine/default/hello"]["status"]["definition"];
    assert!(def["backupSha256"].is_null(), "not recorded as kept: {def}");
    assert!(!def["sha256"].is_null(), "{def}");
    assert!(blocked.is_dir(), "what was there is untouched");
    assert!(
        !dir.path()
            .join("definitions/default/.hello.xml.tmp")
            .exists(),
        "no temporary file left"
    );
    // the other VMs' copies were kept
    let other = &s["objects"]["VirtualMachine/default/hello-2"]["status"]["definition"];
    let xml = std::fs::read_to_string(dir.path().join("definitions/default/hello-2.xml")).unwrap();
    assert_eq!(
        other["backupSha256"],
        kvm_operator::controller::backup::sha256_hex(xml.as_bytes())
    );
}

#[test]
fn a_failure_exits_non_zero_naming_the_object_and_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("big.yaml");
    std::fs::write(
        &m,
        "apiVersion: kvm-operator.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: huge}\n\
         spec: {vcpus: 1, memory: 900Gi}\n",
    )
    .unwrap();
    let out = bin()
        .args(["standalone", "--once", "--timeout", "60", "-f"])
        .arg(&m)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("VirtualMachine/default/huge") && stderr.contains("Unschedulable"),
        "{stderr}"
    );
    // the state went next to the manifest by default
    assert!(dir.path().join(".kvm-operator/status.yaml").exists());
    // a bad manifest is refused before anything runs, naming the file and the field
    std::fs::write(
        &m,
        "apiVersion: kvm-operator.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: x}\n\
         spec: {vcpus: 1, memory: 1Gi, runStrategy: Sometimes}\n",
    )
    .unwrap();
    let out = bin()
        .args(["standalone", "--once", "-f"])
        .arg(&m)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("big.yaml") && stderr.contains("runStrategy"),
        "{stderr}"
    );
}

/// The manifests of [`a_volume_another_vm_uses_is_not_attached_to_a_second_guest`]: an owner
/// VM (`runStrategy` as given) with a data disk, a VM attaching that disk, and one cloning it.
fn volume_users(owner_runs: &str) -> String {
    format!(
        "apiVersion: kvm-operator.io/v1alpha1
kind: StoragePool
metadata: {{name: scratch}}
spec: {{nodeName: default, type: dir, targetPath: /sa-volume-in-use}}
---
apiVersion: kvm-operator.io/v1alpha1
kind: VirtualMachine
metadata: {{name: owner}}
spec:
  vcpus: 1
  memory: 128Mi
  runStrategy: {owner_runs}
  disks: [{{name: data, new: {{pool: scratch, size: 1Gi}}}}]
---
apiVersion: kvm-operator.io/v1alpha1
kind: VirtualMachine
metadata: {{name: borrower}}
spec:
  vcpus: 1
  memory: 128Mi
  placement: {{nodeName: default}}
  disks:
    - {{name: root, new: {{pool: scratch, size: 1Gi}}}}
    - {{name: data, existing: {{pool: scratch, volume: default-owner-data.qcow2}}}}
---
apiVersion: kvm-operator.io/v1alpha1
kind: VirtualMachine
metadata: {{name: copier}}
spec:
  vcpus: 1
  memory: 128Mi
  placement: {{nodeName: default}}
  disks: [{{name: root, clone: {{pool: scratch, template: default-owner-data.qcow2}}}}]
"
    )
}

/// A VM that asks to attach, as `existing`, a volume another VM created is refused before
/// anything of it is defined (`VolumeInUse`, naming its field and the other VM), and the run
/// exits non-zero; the owner runs untouched. A VM cloning that volume waits while the owner's
/// guest runs, and is made once the owner is stopped. On the embedded default node.
#[test]
fn a_volume_another_vm_uses_is_not_attached_to_a_second_guest() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("vms.yaml");
    let once = || {
        let out = bin()
            .args(["standalone", "--once", "--timeout", "60", "-f"])
            .arg(&m)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let st = state(&dir.path().join(".kvm-operator"));
        (out.status.success(), stderr, st["objects"].clone())
    };
    std::fs::write(&m, volume_users("Running")).unwrap();
    let (ok, stderr, objects) = once();
    assert!(!ok, "{stderr}");
    for part in [
        "VirtualMachine/default/borrower",
        "VolumeInUse",
        "spec.disks[1].existing",
        "VirtualMachine default/owner creates and uses it",
        "VirtualMachine/default/copier",
        "spec.disks[0].clone",
        "runStrategy to Stopped",
    ] {
        assert!(stderr.contains(part), "{part}: {stderr}");
    }
    let status = |name: &str| objects[format!("VirtualMachine/default/{name}")]["status"].clone();
    assert_eq!(status("owner")["powerState"], "Running");
    for name in ["borrower", "copier"] {
        let st = status(name);
        assert!(st["domainUuid"].is_null(), "{name}: nothing defined: {st}");
        assert_ne!(st["powerState"], "Running", "{name}: {st}");
    }
    // the owner stopped (its disk kept): the copy is made and the copier runs; the borrower is
    // still refused, since the owner still has the volume
    std::fs::write(&m, volume_users("Stopped")).unwrap();
    let (ok, stderr, objects) = once();
    let status = |name: &str| objects[format!("VirtualMachine/default/{name}")]["status"].clone();
    assert_eq!(status("owner")["powerState"], "Stopped", "{stderr}");
    assert_eq!(status("copier")["powerState"], "Running", "{stderr}");
    assert!(!ok && stderr.contains("spec.disks[1].existing"), "{stderr}");
    assert!(!stderr.contains("spec.disks[0].clone"), "{stderr}");
}

const VM: &str = "apiVersion: kvm-operator.io/v1alpha1
kind: StoragePool
metadata: {name: scratch}
spec: {nodeName: default, type: dir, targetPath: /sa-scratch}
---
apiVersion: kvm-operator.io/v1alpha1
kind: VirtualMachine
metadata: {name: one}
spec:
  vcpus: 1
  memory: 128Mi
  disks: [{name: root, new: {pool: scratch, size: 1Gi}}]
";

fn runner(files: &Path, state: &Path) -> Standalone {
    Standalone::new(
        Options {
            files: vec![files.to_path_buf()],
            default_uri: "test:///default".into(),
            state_dir: state.to_path_buf(),
            once: true,
            timeout: Duration::from_secs(60),
            resync: Duration::from_secs(30),
        },
        Config {
            shutdown_grace: Duration::from_secs(1),
            ..Config::default()
        },
        Box::new(std::io::sink()),
    )
    .unwrap()
}

fn vm<'a>(s: &'a Standalone, name: &str) -> &'a kvm_operator::api::VirtualMachine {
    s.world()
        .vms
        .iter()
        .find(|v| v.metadata.name.as_deref() == Some(name))
        .map(Arc::as_ref)
        .unwrap_or_else(|| panic!("no VM {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_are_picked_up_and_a_restarted_run_binds_to_the_same_domains() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("m");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("vm.yaml"), VM).unwrap();
    let state_dir = dir.path().join("state");
    let mut first = runner(&files, &state_dir);
    first.run().await.unwrap();
    let one = vm(&first, "one").clone();
    let st = one.status.clone().unwrap();
    assert_eq!(st.power_state, Some(PowerState::Running));
    let uuid = st.domain_uuid.clone().unwrap();
    // an edit: a second VM, and the first one's spec changed
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(
        files.join("vm.yaml"),
        format!(
            "{}  runStrategy: Stopped\n---\napiVersion: kvm-operator.io/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: two}}\nspec: {{vcpus: 1, memory: 128Mi}}\n",
            VM
        ),
    )
    .unwrap();
    first.run().await.unwrap();
    let one2 = vm(&first, "one");
    assert_eq!(one2.metadata.uid, one.metadata.uid, "same object, same UID");
    assert_eq!(one2.metadata.generation, Some(2));
    let st2 = one2.status.clone().unwrap();
    assert_eq!(st2.power_state, Some(PowerState::Stopped));
    assert_eq!(st2.domain_uuid.as_deref(), Some(uuid.as_str()));
    assert_eq!(
        vm(&first, "two").status.as_ref().unwrap().power_state,
        Some(PowerState::Running)
    );
    // a second runner on the same state (the test driver's state lives while a connection to
    // it is open, as a host's would): it resumes, creates nothing
    let mut again = runner(&files, &state_dir);
    again.run().await.unwrap();
    assert_eq!(vm(&again, "one").metadata.uid, one.metadata.uid);
    let c = Connection::open("test:///default", "check").unwrap();
    let doms = c.list_domains().unwrap();
    for name in ["default_one", "default_two"] {
        assert_eq!(
            doms.iter().filter(|d| d.name == name).count(),
            1,
            "{doms:?}"
        );
    }
    // an object removed from the files is forgotten, not deleted
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(files.join("vm.yaml"), VM).unwrap();
    again.run().await.unwrap();
    assert!(
        again
            .world()
            .vms
            .iter()
            .all(|v| v.metadata.name.as_deref() != Some("two"))
    );
    assert!(
        c.list_domains()
            .unwrap()
            .iter()
            .any(|d| d.name == "default_two")
    );
    let s = state(&state_dir);
    assert!(s["objects"].get("VirtualMachine/default/two").is_none());
    drop(first);
}

/// What the run prints, and the state file as it stood when the adoption's Event was printed.
struct Watcher {
    state: PathBuf,
    printed: Arc<std::sync::Mutex<(String, Option<String>)>>,
}

impl std::io::Write for Watcher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut p = self.printed.lock().unwrap();
        p.0.push_str(&String::from_utf8_lossy(buf));
        if p.1.is_none() && p.0.contains("VirtualMachine/default/legacy Adopted") {
            p.1 = Some(std::fs::read_to_string(&self.state).unwrap_or_default());
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A test-driver node file in `dir`: 4 CPUs, 8 GiB, and `extra` (networks, domains).
fn node_file(dir: &Path, extra: &str) -> PathBuf {
    let node = dir.join("node.xml");
    std::fs::write(
        &node,
        format!(
            "<node>\n<cpu><mhz>2000</mhz><model>t</model><active>4</active><nodes>1</nodes><sockets>1</sockets><cores>4</cores><threads>1</threads></cpu>\n<memory>8388608</memory>\n{extra}\n</node>\n"
        ),
    )
    .unwrap();
    node
}

/// Manifests in `dir/m`: KvmNode `n0` on the test-driver file `node`, a VM `legacy` adopting
/// its domain `legacy`, and `more` documents after them.
fn adopting(dir: &Path, node: &Path, more: &str) -> PathBuf {
    let files = dir.join("m");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(
        files.join("all.yaml"),
        format!(
            "apiVersion: kvm-operator.io/v1alpha1\nkind: KvmNode\nmetadata: {{name: n0}}\nspec: {{address: localhost, libvirtUri: \"test://{}\"}}\n---\n\
             apiVersion: kvm-operator.io/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: legacy}}\nspec: {{adopt: {{nodeName: n0, domain: legacy}}}}\n{more}",
            node.display()
        ),
    )
    .unwrap();
    files
}

/// A test-driver node file's pool `held` (at /held) with a volume `db.qcow2`, and a domain
/// `legacy-db`, not managed by the operator, that has that volume as its disk.
const HELD: &str = "<pool type='dir'><name>held</name><uuid>35bb2ad9-388a-cdfe-461a-b8907f6e53fe</uuid>         <capacity>107374182400</capacity><allocation>0</allocation><available>107374182400</available>         <target><path>/held</path></target>         <volume type='file'><name>db.qcow2</name><capacity>1073741824</capacity><allocation>0</allocation>         <target><path>/held/db.qcow2</path><format type='qcow2'/></target></volume></pool>         <domain type='test'><name>legacy-db</name><memory>65536</memory><vcpu>1</vcpu><os><type>hvm</type></os>         <devices><disk type='file' device='disk'><source file='/held/db.qcow2'/><target dev='vda' bus='virtio'/></disk></devices></domain>";

/// The manifests of KvmNode `n0` on the test-driver file `node` and of its StoragePool `held`
/// (the pool of [`HELD`]), each document ended by `---`.
fn held_node(node: &Path) -> String {
    format!(
        "apiVersion: kvm-operator.io/v1alpha1
kind: KvmNode
metadata: {{name: n0}}
spec: {{address: localhost, libvirtUri: \"test://{}\"}}
---
apiVersion: kvm-operator.io/v1alpha1
kind: StoragePool
metadata: {{name: held}}
spec: {{nodeName: n0, type: dir, targetPath: /held}}
---
",
        node.display()
    )
}

/// [`HELD`] without its domain: the pool and its volume only.
const HELD_POOL: &str = "<pool type='dir'><name>held</name><uuid>35bb2ad9-388a-cdfe-461a-b8907f6e53fe</uuid>         <capacity>107374182400</capacity><allocation>0</allocation><available>107374182400</available>         <target><path>/held</path></target>         <volume type='file'><name>db.qcow2</name><capacity>1073741824</capacity><allocation>0</allocation>         <target><path>/held/db.qcow2</path><format type='qcow2'/></target></volume></pool>         ";

/// A VM asking for a volume that a domain outside the operator has as a disk (on a test-driver
/// node, which runs the domains of its file) is refused before anything of it is made, naming
/// that domain and the way to take it over instead (`spec.adopt`); a clone of that volume
/// waits, since its guest is writing it.
#[test]
fn a_volume_an_unmanaged_domain_has_is_not_attached_to_a_second_guest() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_file(dir.path(), HELD);
    let m = dir.path().join("vms.yaml");
    std::fs::write(
        &m,
        format!(
            "{}apiVersion: kvm-operator.io/v1alpha1
kind: VirtualMachine
metadata: {{name: borrower}}
spec:
  vcpus: 1
  memory: 64Mi
  disks: [{{name: data, existing: {{pool: held, volume: db.qcow2}}}}]
---
apiVersion: kvm-operator.io/v1alpha1
kind: VirtualMachine
metadata: {{name: copier}}
spec:
  vcpus: 1
  memory: 64Mi
  disks: [{{name: root, clone: {{pool: held, template: db.qcow2}}}}]
",
            held_node(&node)
        ),
    )
    .unwrap();
    let out = bin()
        .args(["standalone", "--once", "--timeout", "60", "-f"])
        .arg(&m)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    for part in [
        "VirtualMachine/default/borrower: VolumeInUse",
        "spec.disks[0].existing: volume \"db.qcow2\"",
        "domain \"legacy-db\" on KvmNode n0 (running, not managed by this operator)",
        "spec.adopt",
        "VirtualMachine/default/copier: VolumeInUse",
        "spec.disks[0].clone: template \"db.qcow2\" in pool \"held\" is a disk of domain \"legacy-db\"",
    ] {
        assert!(stderr.contains(part), "{part}: {stderr}");
    }
    let st = state(&dir.path().join(".kvm-operator"));
    let status =
        |name: &str| st["objects"][format!("VirtualMachine/default/{name}")]["status"].clone();
    for name in ["borrower", "copier"] {
        assert!(status(name)["domainUuid"].is_null(), "{name}: {stderr}");
    }
}

/// A disk added to a running VM's spec is checked like a new VM's: a volume an unmanaged
/// domain of the node has is not hot-plugged (`VolumeInUse`), and the VM keeps running as it
/// was. One process, so the test-driver node keeps its state between the two runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_an_unmanaged_domain_has_is_not_hot_plugged_into_a_running_vm() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_file(dir.path(), HELD);
    let files = dir.path().join("m");
    std::fs::create_dir(&files).unwrap();
    let manifests = |extra: &str| {
        format!(
            "{}apiVersion: kvm-operator.io/v1alpha1
kind: VirtualMachine
metadata: {{name: grower}}
spec:
  vcpus: 1
  memory: 64Mi
  disks:
    - {{name: root, new: {{pool: held, size: 1Gi}}}}
{extra}",
            held_node(&node)
        )
    };
    std::fs::write(files.join("all.yaml"), manifests("")).unwrap();
    let mut s = runner(&files, &dir.path().join("state"));
    s.run().await.unwrap();
    let before = vm(&s, "grower").status.clone().unwrap();
    assert_eq!(before.power_state, Some(PowerState::Running));
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(
        files.join("all.yaml"),
        manifests("    - {name: data, existing: {pool: held, volume: db.qcow2}}\n"),
    )
    .unwrap();
    let _ = s.run().await;
    let after = vm(&s, "grower").status.clone().unwrap();
    let ready = after
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.reason, "VolumeInUse", "{ready:?}");
    assert!(
        ready.message.contains("spec.disks[1].existing") && ready.message.contains("\"legacy-db\""),
        "{ready:?}"
    );
    assert_eq!(after.power_state, Some(PowerState::Running));
    assert_eq!(after.domain_uuid, before.domain_uuid);
    let disks = after.observed.map(|o| o.disks.len());
    assert_eq!(disks, Some(1), "nothing attached");
}

/// On a pool every node sees (`shared: true`), the volume a VM would attach is looked for on
/// the other nodes too: a domain on another node that has it as a disk refuses it, named with
/// its node. Two test-driver nodes, each with the pool and the volume; the domain is on n2, the
/// VM is pinned to n1.
#[test]
fn a_volume_of_a_shared_pool_a_domain_on_another_node_has_is_not_attached() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    let (n1, n2) = (node_file(&a, HELD_POOL), node_file(&b, HELD));
    let m = dir.path().join("vms.yaml");
    std::fs::write(
        &m,
        format!(
            "apiVersion: kvm-operator.io/v1alpha1
kind: KvmNode
metadata: {{name: n1, labels: {{shared: \"yes\"}}}}
spec: {{address: localhost, libvirtUri: \"test://{}\"}}
---
apiVersion: kvm-operator.io/v1alpha1
kind: KvmNode
metadata: {{name: n2, labels: {{shared: \"yes\"}}}}
spec: {{address: localhost, libvirtUri: \"test://{}\"}}
---
apiVersion: kvm-operator.io/v1alpha1
kind: StoragePool
metadata: {{name: held}}
spec: {{nodeSelector: {{shared: \"yes\"}}, type: dir, targetPath: /held, shared: true}}
---
apiVersion: kvm-operator.io/v1alpha1
kind: VirtualMachine
metadata: {{name: borrower}}
spec:
  vcpus: 1
  memory: 64Mi
  placement: {{nodeName: n1}}
  disks: [{{name: data, existing: {{pool: held, volume: db.qcow2}}}}]
",
            n1.display(),
            n2.display()
        ),
    )
    .unwrap();
    let out = bin()
        .args(["standalone", "--once", "--timeout", "60", "-f"])
        .arg(&m)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    for part in [
        "VirtualMachine/default/borrower: VolumeInUse",
        "domain \"legacy-db\" on KvmNode n2 (running, not managed by this operator)",
    ] {
        assert!(stderr.contains(part), "{part}: {stderr}");
    }
    let st = state(&dir.path().join(".kvm-operator"));
    let borrower = &st["objects"]["VirtualMachine/default/borrower"]["status"];
    assert!(borrower["domainUuid"].is_null(), "{stderr}");
}

/// The UID stamped on a domain is in the state file before the stamp is made: a run that
/// crashed right after stamping would otherwise give the VM a new UID on restart, and its
/// domain would then look foreign. An adoption stamps in the very first round; the state file
/// is otherwise written when the run's rounds settle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uid_is_written_before_any_domain_carries_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_file(
        dir.path(),
        "<domain type='test'><name>legacy</name><uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid><memory>65536</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>",
    );
    let files = adopting(dir.path(), &node, "");
    let state_dir = dir.path().join("state");
    let printed = Arc::new(std::sync::Mutex::new((String::new(), None)));
    let mut s = Standalone::new(
        Options {
            files: vec![files.clone()],
            default_uri: "test:///default".into(),
            state_dir: state_dir.clone(),
            once: true,
            timeout: Duration::from_secs(60),
            resync: Duration::from_secs(30),
        },
        Config::default(),
        Box::new(Watcher {
            state: state_dir.join("status.yaml"),
            printed: printed.clone(),
        }),
    )
    .unwrap();
    s.run().await.unwrap();
    let vm = vm(&s, "legacy");
    assert_eq!(
        vm.status.as_ref().and_then(|st| st.power_state),
        Some(PowerState::Running)
    );
    let uid = vm.metadata.uid.clone().unwrap();
    let (all, at_adoption) = printed.lock().unwrap().clone();
    let at_adoption = at_adoption.unwrap_or_else(|| panic!("no adoption printed:\n{all}"));
    let v: serde_json::Value = serde_saphyr::from_str(&at_adoption).unwrap();
    assert_eq!(
        v["objects"]["VirtualMachine/default/legacy"]["uid"].as_str(),
        Some(uid.as_str()),
        "the state file when the domain was stamped:\n{at_adoption}"
    );
    // and the file the run ends with holds every status
    let end = state(&state_dir);
    assert_eq!(
        end["objects"]["VirtualMachine/default/legacy"]["status"]["powerState"],
        "Running"
    );
}

/// A running guest's addresses land in `status.ips` (the IP column of `kubectl get vm`): a new
/// VM's NICs from the lease of the libvirt network it is on and libvirt's answer for a bridge,
/// an adopted domain's from its guest agent. libvirt's test driver answers every source with
/// an address in the network's DHCP range (192.168.0.0/24 for a bridge).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_guest_reports_its_addresses_in_status() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_file(
        dir.path(),
        "<network><name>lan</name><bridge name='virbr9'/><forward/><ip address='10.7.0.1' netmask='255.255.255.0'><dhcp><range start='10.7.0.10' end='10.7.0.99'/></dhcp></ip></network>\n\
         <domain type='test'><name>legacy</name><memory>65536</memory><vcpu>1</vcpu><os><type>hvm</type></os><devices>\
         <interface type='bridge'><mac address='52:54:00:aa:00:01'/><source bridge='br0'/></interface>\
         <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel></devices></domain>",
    );
    let files = adopting(
        dir.path(),
        &node,
        "---\napiVersion: kvm-operator.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: web}\n\
         spec: {vcpus: 1, memory: 64Mi, nics: [{name: net0, network: lan}, {name: net1, bridge: br0}]}\n---\n\
         apiVersion: kvm-operator.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: quiet}\nspec: {vcpus: 1, memory: 64Mi}\n",
    );
    let state_dir = dir.path().join("state");
    let mut s = runner(&files, &state_dir);
    s.run().await.unwrap();
    let ips = |name: &str| {
        let st = vm(&s, name).status.clone().unwrap();
        assert_eq!(st.power_state, Some(PowerState::Running), "{name}: {st:?}");
        st.ips
    };
    let web = ips("web");
    assert_eq!(web.len(), 2, "{web:?}");
    assert!(
        web[0].starts_with("10.7.0."),
        "net0 first, from the lease: {web:?}"
    );
    assert!(web[1].starts_with("192.168.0."), "{web:?}");
    let legacy = ips("legacy");
    assert!(
        legacy.len() == 1 && legacy[0].starts_with("192.168.0."),
        "{legacy:?}"
    );
    assert!(ips("quiet").is_empty(), "no NIC, no address");
    // the state file carries them, as the cluster's status does
    let end = state(&state_dir);
    assert_eq!(
        end["objects"]["VirtualMachine/default/web"]["status"]["ips"][0].as_str(),
        Some(web[0].as_str())
    );
}

/// A long-running run never returns: it is given half a second at a time.
async fn run_for(s: &mut Standalone) {
    let _ = tokio::time::timeout(Duration::from_millis(500), s.run()).await;
}

/// A long-running run (not `--once`) follows the node's domain events as the cluster does: a
/// guest paused behind its back is resumed at once, although no VM is reconciled on a timer
/// (`resync.vmSeconds` unset) and the node pass that would also notice comes only in an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_running_run_resumes_a_guest_paused_behind_its_back_on_the_event() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("m");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(
        files.join("vm.yaml"),
        "apiVersion: kvm-operator.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: evented}\nspec: {vcpus: 1, memory: 64Mi}\n",
    )
    .unwrap();
    let mut s = Standalone::new(
        Options {
            files: vec![files.clone()],
            default_uri: "test:///default".into(),
            state_dir: dir.path().join("state"),
            once: false,
            timeout: Duration::from_secs(60),
            resync: Duration::from_secs(3600),
        },
        Config::default(),
        Box::new(std::io::sink()),
    )
    .unwrap();
    assert_eq!(Config::default().vm_resync, None);
    let running = |s: &Standalone| {
        vm(s, "evented")
            .status
            .as_ref()
            .is_some_and(|st| st.power_state == Some(PowerState::Running))
    };
    for _ in 0..40 {
        run_for(&mut s).await;
        if running(&s) {
            break;
        }
    }
    assert!(running(&s), "{:?}", vm(&s, "evented").status);
    let domain = vm(&s, "evented")
        .status
        .as_ref()
        .and_then(|st| st.domain_name.clone())
        .unwrap();
    // someone pauses the guest (test:///default is one hypervisor for the whole process)
    let c = Connection::open("test:///default", "someone").unwrap();
    c.suspend(&domain).unwrap();
    assert_eq!(c.state(&domain).unwrap(), DomainState::Paused);
    let mut resumed = false;
    for _ in 0..20 {
        run_for(&mut s).await;
        if c.state(&domain).unwrap() == DomainState::Running {
            resumed = true;
            break;
        }
    }
    assert!(resumed, "the paused guest was not resumed within 10 s");
    assert!(running(&s), "{:?}", vm(&s, "evented").status);
    drop(s);
    c.destroy(&domain).unwrap();
}

fn var(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| {
        panic!("{k} is not set: run the tests through README's test command (hack/test.sh), which starts the lab")
    })
}

/// The lab's host1 as a user would declare it, with its key in a v1 Secret.
fn lab_manifests(dir: &Path, vm: &str, pool: &str) {
    let key = std::fs::read_to_string(var("KVM_LAB_SSH_KEY")).unwrap();
    let indented: String = key.lines().map(|l| format!("    {l}\n")).collect();
    let text = format!(
        "apiVersion: v1
kind: Secret
metadata: {{name: lab-key}}
type: kubernetes.io/ssh-auth
stringData:
  ssh-privatekey: |
{indented}---
apiVersion: kvm-operator.io/v1alpha1
kind: KvmNode
metadata: {{name: host1}}
spec:
  address: {addr}
  port: 22
  user: {user}
  sshKeySecretRef: {{name: lab-key}}
  hostKeyFingerprint: {fp}
---
apiVersion: kvm-operator.io/v1alpha1
kind: StoragePool
metadata: {{name: {pool}}}
spec: {{nodeName: host1, type: dir, targetPath: /var/lib/libvirt/{pool}, deletionPolicy: Delete}}
---
apiVersion: kvm-operator.io/v1alpha1
kind: VirtualMachine
metadata: {{name: {vm}}}
spec:
  vcpus: 1
  memory: 128Mi
  disks: [{{name: root, new: {{pool: {pool}, size: 64Mi}}}}]
",
        addr = var("KVM_LAB_HOST1_ADDR"),
        user = var("KVM_LAB_SSH_USER"),
        fp = var("KVM_LAB_HOST1_FINGERPRINT"),
    );
    std::fs::write(dir.join("lab.yaml"), text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_guest_runs_on_a_lab_host_and_a_second_run_duplicates_nothing() {
    use kvm_operator::controller::World;
    use kvm_operator::hypervisor::cache::NodePool;
    use kvm_operator::hypervisor::{DomainState, NodeAccess};
    let dir = tempfile::tempdir().unwrap();
    let id = std::process::id();
    let (vm_name, pool) = (format!("sa-{id}"), format!("sa-pool-{id}"));
    lab_manifests(dir.path(), &vm_name, &pool);
    let run = || {
        bin()
            .args(["standalone", "--once", "--timeout", "240", "-f"])
            .arg(dir.path())
            .env("KVM_OPERATOR_LOG", "warn")
            .output()
            .unwrap()
    };
    let out = run();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = state(&dir.path().join(".kvm-operator"));
    let vm_key = format!("VirtualMachine/default/{vm_name}");
    let st = &s["objects"][&vm_key]["status"];
    assert_eq!(st["node"], "host1", "{st}");
    assert_eq!(st["powerState"], "Running");
    let uuid = st["domainUuid"].as_str().unwrap().to_string();
    let uid = s["objects"][&vm_key]["uid"].as_str().unwrap().to_string();
    // no secret in the state file or on the terminal
    let key = std::fs::read_to_string(var("KVM_LAB_SSH_KEY")).unwrap();
    let secret_line = key.lines().nth(1).unwrap();
    let state_text = std::fs::read_to_string(dir.path().join(".kvm-operator/status.yaml")).unwrap();
    assert!(!state_text.contains(secret_line) && !stdout.contains(secret_line));

    // what the host has: one running KVM domain with our stamp
    let hv = Arc::new(NodePool::new(Duration::from_secs(60)));
    let node: kvm_operator::api::KvmNode = serde_json::from_value(serde_json::json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "KvmNode",
        "metadata": {"name": "host1"},
        "spec": {"address": var("KVM_LAB_HOST1_ADDR"), "port": 22, "user": var("KVM_LAB_SSH_USER"),
                 "sshKeySecretRef": {"name": "lab-key"},
                 "hostKeyFingerprint": var("KVM_LAB_HOST1_FINGERPRINT")},
    }))
    .unwrap();
    hv.upsert(NodeAccess {
        name: "host1".into(),
        spec: node.spec.clone(),
        private_key: Some(key.into_bytes()),
        state_dir: dir.path().join("check"),
        tls: None,
        timeout: Duration::from_secs(15),
    });
    let domain = format!("default_{vm_name}");
    let ours = |hv: Arc<NodePool>, domain: String| async move {
        hv.call("host1", "t", move |c| {
            Ok(c.list_domains()?
                .into_iter()
                .filter(|d| d.name == domain)
                .map(|d| (d.uuid, d.state))
                .collect::<Vec<_>>())
        })
        .await
        .unwrap()
    };
    assert_eq!(
        ours(hv.clone(), domain.clone()).await,
        [(uuid.clone(), DomainState::Running)]
    );
    let d = domain.clone();
    let owner = hv
        .call("host1", "t", move |c| {
            Ok(c.persistent_xml(&d)?.owner().map(|o| o.uid.clone()))
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(owner, uid);

    // a second run (the operator restarted) binds to the same domain and creates nothing
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout2 = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout2.contains("Defined") && !stdout2.contains("VolumeCreated"),
        "{stdout2}"
    );
    assert_eq!(
        ours(hv.clone(), domain.clone()).await,
        [(uuid.clone(), DomainState::Running)]
    );

    // the console: status says how, and `kvm-operator console` brings the guest's VNC display
    // to a local port through SSH (the RFB banner comes from QEMU's VNC server on host1)
    let con = &st["console"];
    assert_eq!(
        con["command"],
        format!("kvm-operator console {vm_name} -n default"),
        "{st}"
    );
    assert!(
        con["vnc"]
            .as_str()
            .is_some_and(|v| v.starts_with("127.0.0.1:")),
        "VNC on the host's loopback only: {con}"
    );
    assert!(
        con["serialCommand"]
            .as_str()
            .is_some_and(|c| c.contains(&domain)),
        "{con}"
    );
    {
        use std::io::{BufRead, Read};
        let mut child = bin()
            .args(["console", &vm_name, "-n", "default", "-f"])
            .arg(dir.path())
            .env("KVM_OPERATOR_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut said = String::new();
        let addr = loop {
            let Some(Ok(l)) = lines.next() else {
                let _ = child.kill();
                let mut err = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("console ended before listening:\n{said}\n{err}");
            };
            said.push_str(&l);
            said.push('\n');
            if let Some(rest) = l.strip_prefix("listening on ") {
                break rest.split(':').take(2).collect::<Vec<_>>().join(":");
            }
        };
        assert!(
            said.contains(&format!("domain {domain} on KvmNode host1")),
            "{said}"
        );
        assert!(addr.starts_with("127.0.0.1:"), "{addr}");
        // two viewers one after the other: each gets its own channel
        for _ in 0..2 {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut banner = [0u8; 12];
            s.read_exact(&mut banner).unwrap();
            assert!(
                banner.starts_with(b"RFB 003."),
                "{:?}",
                String::from_utf8_lossy(&banner)
            );
        }
        // SIGTERM closes it cleanly
        let pid = child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let status = child.wait().unwrap();
        assert!(status.success(), "{status}");
        assert!(
            std::net::TcpStream::connect(&addr).is_err(),
            "the local port is closed with the console"
        );
    }
    // the host "lost" the domain; an administrator defines it again from the operator's copy:
    // the next run recognises it (same UUID, nothing defined anew) and starts it
    let copy = dir
        .path()
        .join(format!(".kvm-operator/definitions/default/{vm_name}.xml"));
    let xml = std::fs::read_to_string(&copy).unwrap();
    let d = domain.clone();
    hv.call("host1", "t", move |c| {
        c.destroy(&d)?;
        c.undefine(&d)?;
        c.raw()
            .define_domain_xml(&xml)
            .map(|_| ())
            .map_err(|e| kvm_operator::hypervisor::HvError::libvirt("define", "host1", &e))
    })
    .await
    .unwrap();
    let out = run();
    let stdout3 = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout3}");
    assert!(!stdout3.contains("Defined"), "{stdout3}");
    assert_eq!(
        ours(hv.clone(), domain.clone()).await,
        [(uuid.clone(), DomainState::Running)]
    );

    // a VM that is not in the manifests: said so, non-zero
    let out = bin()
        .args(["console", "no-such-vm", "-f"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("VirtualMachine default/no-such-vm is not in the manifests"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // the node's batched statistics of a real guest become per-VM metrics
    let stats = hv.call("host1", "t", |c| c.domain_stats()).await.unwrap();
    let metrics = kvm_operator::metrics::Metrics::new();
    metrics.node_stats("host1", stats);
    let mut seen: kvm_operator::api::VirtualMachine = serde_json::from_value(serde_json::json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": vm_name, "namespace": "default"},
        "spec": {"vcpus": 1, "memory": "128Mi"},
    }))
    .unwrap();
    seen.status = serde_json::from_value(s["objects"][&vm_key]["status"].clone()).unwrap();
    let text = metrics.render(
        &World {
            vms: vec![Arc::new(seen)],
            ..World::default()
        },
        &Default::default(),
    );
    let p = kvm_operator::metrics::parse(&text);
    let cpu = format!(
        "kvm_operator_vm_cpu_seconds{{namespace=\"default\",name=\"{vm_name}\",node=\"host1\"}}"
    );
    assert!(p.get(&cpu).is_some_and(|v| *v > 0.0), "{cpu}:\n{text}");
    let mem = format!(
        "kvm_operator_vm_memory_bytes{{namespace=\"default\",name=\"{vm_name}\",node=\"host1\"}}"
    );
    assert_eq!(p.get(&mem), Some(&(128.0 * 1024.0 * 1024.0)), "{text}");

    // clean up through the controllers' own deletion path
    let s = state(&dir.path().join(".kvm-operator"));
    let mut vm: kvm_operator::api::VirtualMachine = serde_json::from_value(serde_json::json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": vm_name, "namespace": "default", "uid": uid},
        "spec": s["objects"][&vm_key]["spec"].clone(),
    }))
    .unwrap();
    vm.spec.volume_deletion_policy = serde_json::from_value(serde_json::json!("Delete")).unwrap();
    vm.status = serde_json::from_value(s["objects"][&vm_key]["status"].clone()).unwrap();
    let pool_key = format!("StoragePool/default/{pool}");
    let mut p: kvm_operator::api::StoragePool = serde_json::from_value(serde_json::json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "StoragePool",
        "metadata": {"name": pool, "namespace": "default", "uid": s["objects"][&pool_key]["uid"]},
        "spec": s["objects"][&pool_key]["spec"].clone(),
    }))
    .unwrap();
    p.status = serde_json::from_value(s["objects"][&pool_key]["status"].clone()).unwrap();
    let world = World {
        nodes: vec![Arc::new(node)],
        pools: vec![Arc::new(p.clone())],
        ..World::default()
    };
    kvm_operator::controller::virtual_machine::cleanup_core(&vm, &world, hv.as_ref())
        .await
        .unwrap();
    kvm_operator::controller::storage_pool::cleanup_core(&p, &world, hv.as_ref())
        .await
        .unwrap();
    assert!(ours(hv.clone(), domain).await.is_empty());
}

/// `GET path` on `addr`, the body of a 200 answer.
fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

#[test]
fn a_running_standalone_operator_serves_health_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    // a free port: bind, read it, release
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    // a VM's figures come with the first timed node pass after it runs (a pass soon after a
    // full one reads states only): the shortest resync keeps the wait short
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, "resync: {nodeSeconds: 5}\n").unwrap();
    let mut child = bin()
        .args(["standalone", "-f"])
        .arg(root().join("examples/quickstart"))
        .arg("--state-dir")
        .arg(dir.path())
        .arg("--config")
        .arg(&config)
        .args(["--http-addr", &addr])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let want = "kvm_operator_node_vms{node=\"default\",state=\"Running\"}";
    let mut last = String::new();
    let mut ok = false;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(200));
        if let Some(text) = http_get(&addr, "/metrics") {
            let m = kvm_operator::metrics::parse(&text);
            last = text;
            let stats = m.keys().any(|k| {
                k.starts_with("kvm_operator_vm_block_bytes{namespace=\"default\",name=\"hello\"")
            });
            if m.get(want) == Some(&3.0) && stats {
                ok = true;
                break;
            }
        }
    }
    let healthz = http_get(&addr, "/healthz");
    let readyz = http_get(&addr, "/readyz");
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "{want} never reached 3 with VM statistics:\n{last}");
    assert_eq!(healthz.as_deref(), Some("ok\n"));
    assert_eq!(readyz.as_deref(), Some("ready\n"));
    let m = kvm_operator::metrics::parse(&last);
    for ctl in ["kvmnode", "storagepool", "virtualmachine"] {
        let k = format!("kvm_operator_reconciles_total{{controller=\"{ctl}\"}}");
        assert!(m.get(&k).is_some_and(|v| *v >= 1.0), "{k}:\n{last}");
        let k = format!("kvm_operator_reconcile_duration_seconds_count{{controller=\"{ctl}\"}}");
        assert!(m.contains_key(&k), "{k}:\n{last}");
    }
    assert_eq!(
        m.get("kvm_operator_node_ready{node=\"default\"}"),
        Some(&1.0)
    );
    assert!(m.contains_key("kvm_operator_node_score{node=\"default\"}"));
    assert_eq!(
        m.get("kvm_operator_node_allocated{node=\"default\",resource=\"cpus\"}"),
        Some(&5.0),
        "hello (1) + hello-2 (2) + the adopted domain's own 2 (as its status describes it: the \
         test driver's statistics carry no vCPU figures): {last}"
    );
    assert_eq!(
        m.get("kvm_operator_node_allocated{node=\"default\",resource=\"memory_bytes\"}"),
        Some(&(((256 + 512) << 20) as f64 + (8u64 << 30) as f64)),
        "{last}"
    );
    // per-VM figures come from the node's batched statistics (the test driver reports I/O
    // counters but no CPU time; the unit test in src/metrics.rs covers every figure)
    // labels are names and states, never free text
    assert!(!last.contains("message"), "{last}");
}
