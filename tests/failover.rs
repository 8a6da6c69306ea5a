//! Host failure on the lab: the real operator (`kvm-operator standalone`) runs two VMs with
//! `runStrategy: RerunOnFailure` on host1, one with its disk on a shared pool (a directory both
//! namespace hosts see, declared `shared: true`) and one on host1's own disk. host1 then loses
//! power (its guests die, libvirtd stops, its link is cut):
//! - the node turns Ready=False after the grace period, both VMs say Unknown, and neither is
//!   started anywhere else: the operator cannot know the host is down and not merely cut off
//!   (`Recovery=False`, NotFenced / StorageNotShared);
//! - once the administrator sets host1's `spec.outOfService`, the shared-storage VM is started on
//!   host2 from the same volume (its MAC kept), the other one stays Unknown on host1;
//! - when host1 comes back, the stale stopped definition it still holds is removed and nothing
//!   runs twice at any look.
//!
//! Runs through README's test command (the lab's KVM_LAB_* variables).

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_operator::hypervisor::cache::NodePool;
use kvm_operator::hypervisor::{DomainState, NodeAccess};

const HOSTS: [&str; 2] = ["host1", "host2"];

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| {
        panic!("{k} is not set: run the tests through README's test command (hack/test.sh)")
    })
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn lab(args: &[&str]) {
    let out = Command::new(root().join("hack/lab.sh"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lab.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn vm_yaml(name: &str, pool: &str) -> String {
    format!(
        "---\napiVersion: kvm-operator.io/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\n\
         spec:\n  vcpus: 1\n  memory: 64Mi\n  runStrategy: RerunOnFailure\n  console: {{vnc: false}}\n\
         \x20 nics: [{{name: eth0, bridge: vmbr0}}]\n\
         \x20 disks: [{{name: root, new: {{pool: {pool}, size: 16Mi}}}}]\n"
    )
}

/// Writes the node manifest with host1/host2 flags changed (whole file, atomically).
fn write_nodes(dir: &Path, base: &str, host2_maintenance: bool, host1_out_of_service: bool) {
    let mut text = base.to_string();
    let h1 = format!("  address: {}\n", env("KVM_LAB_HOST1_ADDR"));
    let h2 = format!("  address: {}\n", env("KVM_LAB_HOST2_ADDR"));
    assert!(text.contains(&h1) && text.contains(&h2), "{text}");
    if host1_out_of_service {
        text = text.replace(&h1, &format!("{h1}  outOfService: true\n"));
    }
    if host2_maintenance {
        text = text.replace(&h2, &format!("{h2}  maintenance: true\n"));
    }
    std::fs::write(dir.join("lab-nodes.yaml.tmp"), text).unwrap();
    std::fs::rename(dir.join("lab-nodes.yaml.tmp"), dir.join("lab-nodes.yaml")).unwrap();
}

fn status_of(dir: &Path, key: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join(".kvm-operator/status.yaml")).unwrap_or_default();
    let v: serde_json::Value = serde_saphyr::from_str(&text).unwrap_or_default();
    v["objects"][key]["status"].clone()
}

fn uid_of(dir: &Path, key: &str) -> String {
    let text = std::fs::read_to_string(dir.join(".kvm-operator/status.yaml")).unwrap_or_default();
    let v: serde_json::Value = serde_saphyr::from_str(&text).unwrap_or_default();
    v["objects"][key]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn condition(st: &serde_json::Value, type_: &str) -> (String, String) {
    st["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == type_)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .unwrap_or_default()
}

/// Domains stamped with `uid` on each host that answers: (host, state, MACs in the XML).
async fn domains_of(hv: &Arc<NodePool>, uid: &str) -> Vec<(String, DomainState, String)> {
    let mut out = Vec::new();
    for host in HOSTS {
        hv.reset_backoff(host);
        let u = uid.to_string();
        let r = hv
            .call(host, "failover look", move |c| {
                let mut v = Vec::new();
                for d in c.list_domains()? {
                    if d.owner.as_ref().is_some_and(|o| o.uid == u) {
                        let xml = c.persistent_xml_text(&d.name).unwrap_or_default();
                        v.push((d.state, xml));
                    }
                }
                Ok(v)
            })
            .await;
        for (state, xml) in r.unwrap_or_default() {
            out.push((host.to_string(), state, xml));
        }
    }
    out
}

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `f` every 500 ms until it returns None or `limit` passes (then panics with its last
/// reason and the operator's log); every look checks that nothing runs twice.
async fn until<F, Fut>(what: &str, limit: Duration, log: &Path, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<String>>,
{
    let t0 = Instant::now();
    loop {
        let Some(why) = f().await else { return };
        if t0.elapsed() > limit {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            panic!(
                "{what}: not within {limit:?}: {why}\n{}",
                lines[lines.len().saturating_sub(80)..].join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn cleanup(hv: &Arc<NodePool>, shared: &Path) {
    for host in HOSTS {
        hv.reset_backoff(host);
        let _ = hv
            .call(host, "failover cleanup", |c| {
                for d in c.list_domains()? {
                    if d.name.starts_with("default_fo-") {
                        let _ = c.destroy(&d.name);
                        let _ = c.undefine(&d.name);
                    }
                }
                for v in c.list_volumes("lab-images").unwrap_or_default() {
                    if v.starts_with("default-fo-") {
                        let _ = c.delete_volume("lab-images", &v);
                    }
                }
                Ok(())
            })
            .await;
    }
    if let Ok(rd) = std::fs::read_dir(shared) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("default-fo-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_host_s_shared_storage_vm_restarts_elsewhere_and_nothing_else_moves() {
    let work = tempfile::tempdir().unwrap();
    let key = std::fs::read(env("KVM_LAB_SSH_KEY")).unwrap();
    let hv = Arc::new(NodePool::new(Duration::from_secs(10)));
    for (i, host) in HOSTS.iter().enumerate() {
        let n = i + 1;
        let spec = serde_json::from_value(serde_json::json!({
            "address": env(&format!("KVM_LAB_HOST{n}_ADDR")), "user": "root",
            "sshKeySecretRef": {"name": "lab-key"},
            "hostKeyFingerprint": env(&format!("KVM_LAB_HOST{n}_FINGERPRINT")),
        }))
        .unwrap();
        hv.upsert(NodeAccess {
            name: host.to_string(),
            spec,
            private_key: Some(key.clone()),
            state_dir: work.path().join("look"),
            tls: None,
            timeout: Duration::from_secs(3),
        });
    }
    // a directory outside the hosts' private /var/lib/libvirt: the same files in both
    let shared = PathBuf::from(env("KVM_LAB")).join("shared-pool");
    std::fs::create_dir_all(&shared).unwrap();
    cleanup(&hv, &shared).await;
    let r = tokio::spawn(scenario(
        hv.clone(),
        work.path().to_path_buf(),
        shared.clone(),
    ))
    .await;
    let _ = Command::new(root().join("hack/lab.sh"))
        .args(["fault", "power", "on", "1"])
        .output();
    cleanup(&hv, &shared).await;
    if let Err(e) = r {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn scenario(hv: Arc<NodePool>, work: PathBuf, shared: PathBuf) {
    let dir = work.join("manifests");
    lab(&["manifests", dir.to_str().unwrap()]);
    let base = std::fs::read_to_string(dir.join("lab-nodes.yaml")).unwrap();
    let config = work.join("config.yaml");
    std::fs::write(
        &config,
        "resync: {nodeSeconds: 5, vmSeconds: 10, poolSeconds: 10}\n\
         connectTimeoutSeconds: 3\nshutdownGraceSeconds: 3\nhostFailure: {graceSeconds: 4}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("shared-pool.yaml"),
        format!(
            "apiVersion: kvm-operator.io/v1alpha1\nkind: StoragePool\nmetadata: {{name: fo-shared}}\n\
             spec: {{nodeSelector: {{lab.kvm-operator.io/pool: \"yes\"}}, type: dir, targetPath: {}, shared: true}}\n",
            shared.display()
        ),
    )
    .unwrap();
    // host2 in maintenance first, so that both VMs land on host1
    write_nodes(&dir, &base, true, false);
    std::fs::write(
        dir.join("vms.yaml"),
        format!(
            "{}{}",
            vm_yaml("fo-shared", "fo-shared"),
            vm_yaml("fo-local", "lab-images")
        ),
    )
    .unwrap();
    let log = work.join("operator.log");
    let out = std::fs::File::create(&log).unwrap();
    let _op = Operator(
        Command::new(env!("CARGO_BIN_EXE_kvm-operator"))
            .args(["standalone", "-f"])
            .arg(&dir)
            .arg("--config")
            .arg(&config)
            .env("KVM_OPERATOR_LOG", "info")
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap(),
    );
    let (fs, fl) = (
        "VirtualMachine/default/fo-shared",
        "VirtualMachine/default/fo-local",
    );
    until(
        "both VMs running on host1",
        Duration::from_secs(120),
        &log,
        || {
            let d = dir.clone();
            async move {
                [fs, fl].iter().find_map(|k| {
                    let st = status_of(&d, k);
                    (st["node"] != "host1" || st["powerState"] != "Running")
                        .then(|| format!("{k}: {} {}", st["node"], st["powerState"]))
                })
            }
        },
    )
    .await;
    let shared_uid = uid_of(&dir, fs);
    let local_uid = uid_of(&dir, fl);
    let mac = status_of(&dir, fs)["macs"]["eth0"]
        .as_str()
        .unwrap()
        .to_string();
    write_nodes(&dir, &base, false, false);
    until(
        "host2 back in service",
        Duration::from_secs(60),
        &log,
        || {
            let d = dir.clone();
            async move {
                let st = status_of(&d, "KvmNode/host2");
                (condition(&st, "Schedulable").0 != "True").then(|| format!("{st}"))
            }
        },
    )
    .await;

    // host1 loses power
    lab(&["fault", "power", "off", "1"]);
    until(
        "host1 not Ready, both VMs Unknown and not moved",
        Duration::from_secs(60),
        &log,
        || {
            let d = dir.clone();
            async move {
                let node = status_of(&d, "KvmNode/host1");
                if condition(&node, "Ready").0 != "False" {
                    return Some(format!("host1: {node}"));
                }
                for (k, reason) in [(fs, "NotFenced"), (fl, "StorageNotShared")] {
                    let st = status_of(&d, k);
                    if st["powerState"] != "Unknown" || condition(&st, "Recovery").1 != reason {
                        return Some(format!("{k}: {st}"));
                    }
                }
                None
            }
        },
    )
    .await;
    // a host that does not answer may still run its guests: nothing is started elsewhere
    tokio::time::sleep(Duration::from_secs(8)).await;
    for uid in [&shared_uid, &local_uid] {
        let ds = domains_of(&hv, uid).await;
        assert!(
            ds.iter().all(|(h, _, _)| h == "host1"),
            "started elsewhere without fencing: {ds:?}"
        );
    }
    assert_eq!(status_of(&dir, fs)["node"], "host1");

    // the administrator fences host1
    write_nodes(&dir, &base, false, true);
    until(
        "the shared-storage VM running on host2",
        Duration::from_secs(90),
        &log,
        || {
            let d = dir.clone();
            async move {
                let st = status_of(&d, fs);
                (st["node"] != "host2"
                    || st["powerState"] != "Running"
                    || st["failover"]["from"] != "host1"
                    || condition(&st, "Recovery") != ("True".into(), "FailedOver".into()))
                    .then(|| format!("{st}"))
            }
        },
    )
    .await;
    let ds = domains_of(&hv, &shared_uid).await;
    assert_eq!(ds.len(), 1, "{ds:?}");
    let (host, state, xml) = &ds[0];
    assert_eq!((host.as_str(), *state), ("host2", DomainState::Running));
    assert!(
        xml.contains(&shared.display().to_string()) && xml.contains(&mac),
        "the same volume and MAC on host2:\n{xml}"
    );
    // the local-disk VM stays where its disk is
    let st = status_of(&dir, fl);
    assert_eq!(st["node"], "host1", "{st}");
    assert_eq!(condition(&st, "Recovery").1, "StorageNotShared", "{st}");

    // host1 returns and is taken back into service: its stale definition goes, nothing twice
    lab(&["fault", "power", "on", "1"]);
    write_nodes(&dir, &base, false, false);
    until(
        "the stale definition on host1 removed",
        Duration::from_secs(90),
        &log,
        || {
            let (d, hv, u) = (dir.clone(), hv.clone(), shared_uid.clone());
            async move {
                let st = status_of(&d, fs);
                if st["failover"]["staleRemoved"] != true {
                    return Some(format!("{st}"));
                }
                let ds = domains_of(&hv, &u).await;
                (ds.len() != 1 || ds[0].0 != "host2").then(|| format!("{ds:?}"))
            }
        },
    )
    .await;
    let ds = domains_of(&hv, &local_uid).await;
    assert!(
        ds.len() == 1 && ds[0].0 == "host1",
        "the local-disk VM's domain stays on host1 only: {ds:?}"
    );
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("FailedOver"), "{log_text}");
}
