//! Against the lab (hack/lab.sh): real libvirtd with QEMU/KVM reached over a real sshd on
//! 127.0.0.1, with the host key pinned. Run through README's test command, which starts the lab
//! and exports the KVM_LAB_* variables these tests read.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kvm_operator::api::KvmNodeSpec;
use kvm_operator::hypervisor::domain_xml::{DomainXml, Owner};
use kvm_operator::hypervisor::{self, DomainState, HvError, NodeAccess};

struct Lab {
    addr: String,
    port: u16,
    user: String,
    key: PathBuf,
    fingerprint: String,
}

fn lab() -> Lab {
    let var = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| {
            panic!("{k} is not set: run the tests through README's test command (hack/test.sh), which starts the lab")
        })
    };
    Lab {
        addr: var("KVM_LAB_SSH_ADDR"),
        port: var("KVM_LAB_SSH_PORT")
            .parse()
            .unwrap_or_else(|e| panic!("{e}")),
        user: var("KVM_LAB_SSH_USER"),
        key: PathBuf::from(var("KVM_LAB_SSH_KEY")),
        fingerprint: var("KVM_LAB_SSH_FINGERPRINT"),
    }
}

fn access(
    lab: &Lab,
    name: &str,
    fingerprint: &str,
    key: Option<Vec<u8>>,
) -> (NodeAccess, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let spec: KvmNodeSpec = serde_json::from_value(serde_json::json!({
        "address": lab.addr, "port": lab.port, "user": lab.user,
        "sshKeySecretRef": {"name": "lab"},
        "hostKeyFingerprint": fingerprint,
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    spec.validate().unwrap_or_else(|e| panic!("{e}"));
    let access = NodeAccess {
        name: name.to_string(),
        spec,
        private_key: key,
        state_dir: dir.path().to_path_buf(),
        tls: None,
        timeout: Duration::from_secs(10),
    };
    (access, dir)
}

/// KVM when /dev/kvm exists, else QEMU's software emulation.
fn domain_type() -> &'static str {
    if std::path::Path::new("/dev/kvm").exists() {
        "kvm"
    } else {
        "qemu"
    }
}

#[test]
fn real_guest_lifecycle_over_ssh_with_pinned_host_key() {
    let lab = lab();
    let key = std::fs::read(&lab.key).unwrap_or_else(|e| panic!("{e}"));
    let (access, dir) = access(&lab, "lab-local", &lab.fingerprint, Some(key));
    let conn = hypervisor::connect_node(&access).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(conn.driver().unwrap_or_default(), "QEMU");
    let (libvirt, qemu) = conn.versions().unwrap_or_else(|e| panic!("{e}"));
    assert!(libvirt.starts_with(|c: char| c.is_ascii_digit()) && qemu.contains('.'));

    // The default path (our SSH tunnel) writes no key anywhere: only the local socket, 0600.
    use std::os::unix::fs::PermissionsExt;
    let node_dir = dir.path().join("lab-local");
    assert!(
        !node_dir.join("id").exists(),
        "the private key stays in memory"
    );
    let mode = std::fs::metadata(node_dir.join("libvirt-main.sock"))
        .unwrap_or_else(|e| panic!("{e}"))
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o077,
        0,
        "libvirt-main.sock is reachable by others: {mode:o}"
    );

    let name = format!("kvmop-lab-{}", std::process::id());
    let mut xml = DomainXml::minimal(&name, domain_type(), 64 * 1024, 1);
    xml.metadata = Some(kvm_operator::hypervisor::domain_xml::Metadata {
        owner: Some(Owner::new(
            "00000000-1111-4222-8333-444444444444",
            "lab",
            "guest",
        )),
    });
    let uuid = conn.define(&xml).unwrap_or_else(|e| panic!("{e}"));
    let cleanup = |c: &hypervisor::Connection| {
        let _ = c.destroy(&name);
        let _ = c.undefine(&name);
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_eq!(conn.state(&name).ok(), Some(DomainState::Shutoff));
        let listed = conn.list_domains().unwrap_or_else(|e| panic!("{e}"));
        let me = listed
            .iter()
            .find(|d| d.name == name)
            .unwrap_or_else(|| panic!("{name} not listed"));
        assert_eq!(me.uuid, uuid);
        assert_eq!(
            me.owner.as_ref().map(|o| o.name.as_str()),
            Some("guest"),
            "ownership stamp read back"
        );

        let t0 = Instant::now();
        conn.start(&name).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(conn.state(&name).ok(), Some(DomainState::Running));
        eprintln!(
            "guest {name} started in {:?} ({})",
            t0.elapsed(),
            domain_type()
        );
        conn.start(&name)
            .unwrap_or_else(|e| panic!("starting a running guest must succeed: {e}"));
        let live = conn.domain_xml(&name).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(live.memory.as_kib(), Some(64 * 1024));
        assert_eq!(
            live.owner().map(|o| o.uid.as_str()),
            Some("00000000-1111-4222-8333-444444444444")
        );

        conn.destroy(&name).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(conn.state(&name).ok(), Some(DomainState::Shutoff));
        conn.undefine(&name).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(conn.state(&name), Err(HvError::NotFound { .. })));
        conn.undefine(&name)
            .unwrap_or_else(|e| panic!("undefining a missing domain must succeed: {e}"));
    }));
    cleanup(&conn);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

#[test]
fn qemu_libssh_transport_pins_the_host_key_in_a_private_known_hosts() {
    use std::os::unix::fs::PermissionsExt;
    let lab = lab();
    let key = std::fs::read(&lab.key).unwrap_or_else(|e| panic!("{e}"));
    let uri = format!(
        "qemu+libssh://{}@{}:{}/system",
        lab.user, lab.addr, lab.port
    );
    let (mut acc, dir) = access(&lab, "lab-libssh", &lab.fingerprint, Some(key.clone()));
    acc.spec.libvirt_uri = Some(uri.clone());
    let conn = hypervisor::connect_node(&acc).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(conn.driver().unwrap_or_default(), "QEMU");
    for f in ["id", "known_hosts"] {
        let mode = std::fs::metadata(dir.path().join("lab-libssh").join(f))
            .unwrap_or_else(|e| panic!("{f}: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{f} is readable by others: {mode:o}");
    }
    // the same transport refuses a host whose key is not the pinned one
    let (mut wrong, _d) = access(
        &lab,
        "lab-libssh-wrong",
        &format!("SHA256:{}", "C".repeat(43)),
        Some(key),
    );
    wrong.spec.libvirt_uri = Some(uri);
    assert!(matches!(
        hypervisor::connect_node(&wrong),
        Err(HvError::HostKeyMismatch { .. })
    ));
}

#[test]
fn qemu_ssh_transport_through_the_ssh_program() {
    let lab = lab();
    let wrapper = format!("{}/ssh/bin", std::env::var("KVM_LAB").unwrap_or_default());
    let path = std::env::var("PATH").unwrap_or_default();
    assert_eq!(
        path.split(':').next(),
        Some(wrapper.as_str()),
        "qemu+ssh needs the lab's ssh wrapper first on PATH (hack/test.sh sets it)"
    );
    let key = std::fs::read(&lab.key).unwrap_or_else(|e| panic!("{e}"));
    let (mut acc, dir) = access(&lab, "lab-ssh", &lab.fingerprint, Some(key));
    acc.spec.libvirt_uri = Some(format!(
        "qemu+ssh://{}@{}:{}/system",
        lab.user, lab.addr, lab.port
    ));
    let conn = hypervisor::connect_node(&acc).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(conn.driver().unwrap_or_default(), "QEMU");
    assert!(conn.list_domains().is_ok());
    // the ssh program reads the key from a 0600 file the operator wrote
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("lab-ssh").join("id"))
        .unwrap_or_else(|e| panic!("{e}"))
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0);
}

#[test]
fn a_changed_host_key_is_refused_before_any_credential_is_sent() {
    let lab = lab();
    let wrong = format!("SHA256:{}", "A".repeat(43));
    let key = std::fs::read(&lab.key).unwrap_or_else(|e| panic!("{e}"));
    let (access, dir) = access(&lab, "lab-wrong-key", &wrong, Some(key));
    let err = hypervisor::connect_node(&access)
        .err()
        .unwrap_or_else(|| panic!("connected despite a wrong pin"));
    assert!(matches!(err, HvError::HostKeyMismatch { .. }), "{err}");
    assert_eq!(err.reason(), "HostKeyMismatch");
    assert!(!err.is_transient());
    let msg = err.to_string();
    assert!(
        msg.contains(&lab.fingerprint) && msg.contains("spec.hostKeyFingerprint"),
        "{msg}"
    );
    // refused before the key was written anywhere
    assert!(!dir.path().join("lab-wrong-key").join("id").exists());
}

#[test]
fn a_wrong_private_key_is_refused_with_an_error_naming_the_node() {
    let lab = lab();
    // A fresh key the lab's sshd does not know.
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let kp = tmp.path().join("k");
    let ok = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&kp)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "ssh-keygen failed");
    let key = std::fs::read(&kp).unwrap_or_else(|e| panic!("{e}"));
    let (access, _dir) = access(&lab, "lab-bad-key", &lab.fingerprint, Some(key));
    let t0 = Instant::now();
    let err = hypervisor::connect_node(&access)
        .err()
        .unwrap_or_else(|| panic!("connected with an unknown key"));
    assert!(matches!(err, HvError::AuthFailed { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("lab-bad-key") && msg.contains("authentication failed"),
        "{msg}"
    );
    assert!(t0.elapsed() < Duration::from_secs(30));
}

#[test]
fn the_test_driver_lists_its_default_domain_unmanaged() {
    let conn = hypervisor::Connection::open("test:///default", "embedded")
        .unwrap_or_else(|e| panic!("{e}"));
    let doms = conn.list_domains().unwrap_or_else(|e| panic!("{e}"));
    let t = doms
        .iter()
        .find(|d| d.name == "test")
        .unwrap_or_else(|| panic!("{doms:?}"));
    assert_eq!(t.state, DomainState::Running);
    assert!(t.owner.is_none());
}

#[test]
fn namespace_hosts_are_separate_hypervisors_each_pinned_to_its_own_key() {
    let lab = lab();
    let key = std::fs::read(&lab.key).unwrap_or_else(|e| panic!("{e}"));
    let n: u32 = std::env::var("KVM_LAB_HOSTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        n >= 2,
        "the lab must run at least two namespace hosts (hack/lab.sh hosts 2)"
    );
    let host = |i: u32| {
        let addr = std::env::var(format!("KVM_LAB_HOST{i}_ADDR")).unwrap_or_else(|e| panic!("{e}"));
        let fp =
            std::env::var(format!("KVM_LAB_HOST{i}_FINGERPRINT")).unwrap_or_else(|e| panic!("{e}"));
        (addr, fp)
    };
    let (a1, f1) = host(1);
    let (a2, f2) = host(2);
    assert_ne!(f1, f2, "each host has its own key");
    let node = |addr: &str, fp: &str, name: &str| {
        let lab = Lab {
            addr: addr.to_string(),
            port: 22,
            user: lab.user.clone(),
            key: lab.key.clone(),
            fingerprint: fp.to_string(),
        };
        access(&lab, name, fp, Some(key.clone()))
    };
    let (acc1, _d1) = node(&a1, &f1, "host1");
    let (acc2, _d2) = node(&a2, &f2, "host2");
    let c1 = hypervisor::connect_node(&acc1).unwrap_or_else(|e| panic!("{e}"));
    let c2 = hypervisor::connect_node(&acc2).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c1.hostname().ok().as_deref(), Some("host1"));
    assert_eq!(c2.hostname().ok().as_deref(), Some("host2"));
    // a guest defined on host1 does not exist on host2
    let name = format!("kvmop-ns-{}", std::process::id());
    c1.define(&DomainXml::minimal(&name, domain_type(), 32 * 1024, 1))
        .unwrap_or_else(|e| panic!("{e}"));
    let on2 = c2.state(&name);
    let _ = c1.undefine(&name);
    assert!(matches!(on2, Err(HvError::NotFound { .. })), "{on2:?}");
    // host2's key does not open host1
    let (swapped, _d3) = node(&a1, &f2, "host1-swapped");
    assert!(matches!(
        hypervisor::connect_node(&swapped),
        Err(HvError::HostKeyMismatch { .. })
    ));
}

#[test]
fn host_facts_over_ssh_match_the_host() {
    use kvm_operator::hypervisor::host_facts;
    use kvm_operator::hypervisor::ssh::{HostKeyPolicy, SshSession};
    let lab = lab();
    let key = std::fs::read(&lab.key).unwrap_or_else(|e| panic!("{e}"));
    let ssh = SshSession::connect(
        &lab.addr,
        lab.port,
        &lab.user,
        &key,
        &HostKeyPolicy::Pinned(lab.fingerprint.clone()),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (facts, usage) = host_facts::collect(&ssh, Some(Duration::from_millis(300)), None)
        .unwrap_or_else(|e| panic!("{e}"));
    // the lab's sshd runs on this machine: compare with what this process sees
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(0);
    assert_eq!(facts.cpus, Some(cpus));
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert_eq!(facts.memory_total, Some(total_kib * 1024));
    assert!(
        facts
            .memory_available
            .is_some_and(|a| a > 0 && a <= total_kib * 1024)
    );
    assert!(facts.load.is_some());
    assert!(usage.is_some_and(|u| u <= 100), "{usage:?}");
    assert_eq!(facts.kvm, Some(std::path::Path::new("/dev/kvm").exists()));
    // versions agree with what libvirt itself reports over its own connection
    let conn =
        hypervisor::Connection::open("qemu:///system", "local").unwrap_or_else(|e| panic!("{e}"));
    let (libvirt, qemu) = conn.versions().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(facts.libvirt_version.as_deref(), Some(libvirt.as_str()));
    assert!(
        facts
            .qemu_version
            .as_deref()
            .is_some_and(|v| v.starts_with(&qemu[..3])),
        "{:?} vs {qemu}",
        facts.qemu_version
    );
    // a later reading on the same session with the versions known runs only the /proc part,
    // reads the host again and carries the versions it was given
    let known = host_facts::Versions {
        libvirt: Some("known-libvirt".into()),
        qemu: Some("known-qemu".into()),
    };
    let (again, _) = host_facts::collect_since(
        &ssh,
        facts.cpu_times,
        Duration::from_millis(300),
        Some(&known),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(host_facts::Versions::of(&again), known);
    assert_eq!(again.memory_total, facts.memory_total);
    assert!(
        again
            .cpu_times
            .is_some_and(|t| t.busy + t.idle >= facts.cpu_times.map_or(0, |f| f.busy + f.idle))
    );
}

#[test]
fn ssh_sessions_refuse_a_wrong_pin_and_a_wrong_key() {
    use kvm_operator::hypervisor::ssh::{HostKeyPolicy, SshSession};
    let lab = lab();
    let key = std::fs::read(&lab.key).unwrap_or_else(|e| panic!("{e}"));
    let wrong = HostKeyPolicy::Pinned(format!("SHA256:{}", "B".repeat(43)));
    let r = SshSession::connect(
        &lab.addr,
        lab.port,
        &lab.user,
        &key,
        &wrong,
        Duration::from_secs(10),
    );
    assert!(matches!(r, Err(HvError::HostKeyMismatch { .. })), "{r:?}");
    let r = SshSession::connect(
        &lab.addr,
        lab.port,
        &lab.user,
        b"not a key",
        &HostKeyPolicy::Pinned(lab.fingerprint.clone()),
        Duration::from_secs(10),
    );
    let err = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("authentication failed"), "{err}");
}

#[test]
fn running_guest_operations_and_hotplug() {
    use kvm_operator::hypervisor::domain_xml::{
        Alias, Controller, Device, Disk, DiskDriver, DiskSource, DiskTarget, Graphics, Interface,
        Model,
    };
    use kvm_operator::hypervisor::{DeviceScope, ShutdownOutcome};
    let conn =
        hypervisor::Connection::open("qemu:///system", "local").unwrap_or_else(|e| panic!("{e}"));
    let name = format!("kvmop-ops-{}", std::process::id());
    let mut xml = DomainXml::minimal(&name, domain_type(), 64 * 1024, 1);
    xml.devices.controller.push(Controller {
        controller_type: "scsi".into(),
        index: Some(0),
        model: Some("virtio-scsi".into()),
    });
    xml.devices.graphics.push(Graphics {
        graphics_type: "vnc".into(),
        port: Some(-1),
        autoport: Some("yes".into()),
        listen: Some("127.0.0.1".into()),
    });
    conn.define(&xml).unwrap_or_else(|e| panic!("{e}"));
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        conn.start(&name).unwrap_or_else(|e| panic!("{e}"));
        let info = conn.info(&name).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (info.state, info.vcpus, info.max_memory_kib),
            (DomainState::Running, 1, 64 * 1024)
        );
        let console = conn.console(&name).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            console
                .vnc
                .as_deref()
                .is_some_and(|v| v.starts_with("127.0.0.1:59")),
            "{console:?}"
        );
        assert!(
            console
                .serial
                .as_deref()
                .is_some_and(|p| p.starts_with("/dev/pts/")),
            "{console:?}"
        );

        // an ACPI reboot request is accepted; the guest keeps running (QEMU restarts it)
        conn.reboot(&name).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(conn.state(&name).ok(), Some(DomainState::Running));
        conn.suspend(&name).unwrap_or_else(|e| panic!("{e}"));
        conn.suspend(&name)
            .unwrap_or_else(|e| panic!("suspending a paused guest must succeed: {e}"));
        assert_eq!(conn.state(&name).ok(), Some(DomainState::Paused));
        conn.resume(&name).unwrap_or_else(|e| panic!("{e}"));
        conn.resume(&name).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(conn.state(&name).ok(), Some(DomainState::Running));

        // a node pass flags a domain whose make-up changed since the last full reading (a
        // hot-plug emits no lifecycle event): unchanged twice, then the disk below; a reading
        // within `window` of the last full one reads states only and flags nothing
        let reading = |window: Duration| {
            let l = conn
                .domains_with_stats(window)
                .unwrap_or_else(|e| panic!("{e}"));
            let flagged: Vec<&str> = l
                .domains
                .iter()
                .filter(|d| d.reshaped)
                .map(|d| d.name.as_str())
                .collect();
            let vcpus = l
                .stats
                .iter()
                .find(|s| s.domain == name)
                .and_then(|s| s.vcpus);
            (
                l.domains.iter().any(|d| d.name == name),
                flagged.contains(&name.as_str()),
                l.fresh,
                vcpus,
            )
        };
        let reshaped = || {
            let (present, flagged, fresh, _) = reading(Duration::ZERO);
            assert!(fresh, "a zero window reads every group");
            (present, flagged)
        };
        assert_eq!(reshaped(), (true, false), "first reading");
        assert_eq!(reshaped(), (true, false), "nothing changed");

        // hot-plug a SCSI disk: live and persistent
        let img = tmp.path().join("data.qcow2");
        let ok = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("16M")
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "qemu-img create failed");
        let disk = Device::Disk(Disk {
            disk_type: "file".into(),
            device: "disk".into(),
            driver: Some(DiskDriver {
                name: "qemu".into(),
                format: Some("qcow2".into()),
            }),
            source: Some(DiskSource {
                file: Some(img.display().to_string()),
                ..DiskSource::default()
            }),
            target: DiskTarget {
                dev: "sda".into(),
                bus: Some("scsi".into()),
            },
            readonly: None,
            boot: None,
            alias: Some(Alias {
                name: "ua-data".into(),
            }),
        });
        conn.attach(&name, &disk, DeviceScope::LiveAndConfig)
            .unwrap_or_else(|e| panic!("{e}"));
        // states only: the size is the last full reading's, the change waits for a full one
        assert_eq!(
            reading(Duration::from_secs(3600)),
            (true, false, false, Some(1)),
            "a states-only reading"
        );
        assert_eq!(reshaped(), (true, true), "a disk was added");
        assert_eq!(reshaped(), (true, false), "flagged once");
        let has_disk = |x: &DomainXml| x.devices.disk.iter().any(|d| d.target.dev == "sda");
        assert!(
            has_disk(&conn.domain_xml(&name).unwrap_or_else(|e| panic!("{e}"))),
            "live"
        );
        assert!(
            has_disk(&conn.persistent_xml(&name).unwrap_or_else(|e| panic!("{e}"))),
            "persistent"
        );
        // SCSI unplug needs no guest cooperation: it is gone from both at once
        conn.detach(&name, &disk, DeviceScope::LiveAndConfig)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !has_disk(&conn.domain_xml(&name).unwrap_or_else(|e| panic!("{e}"))),
            "live after detach"
        );
        assert!(!has_disk(
            &conn.persistent_xml(&name).unwrap_or_else(|e| panic!("{e}"))
        ));

        // hot-plug a NIC (user-mode networking: no host network touched)
        let nic = Device::Interface(Interface {
            iface_type: "user".into(),
            mac: Some(kvm_operator::hypervisor::domain_xml::Mac {
                address: "52:54:00:aa:bb:01".into(),
            }),
            source: None,
            model: Some(Model {
                model_type: "virtio".into(),
            }),
            boot: None,
            alias: Some(Alias {
                name: "ua-net0".into(),
            }),
        });
        conn.attach(&name, &nic, DeviceScope::LiveAndConfig)
            .unwrap_or_else(|e| panic!("{e}"));
        let has_nic = |x: &DomainXml| {
            x.devices.interface.iter().any(|i| {
                i.mac
                    .as_ref()
                    .is_some_and(|m| m.address == "52:54:00:aa:bb:01")
            })
        };
        assert!(
            has_nic(&conn.domain_xml(&name).unwrap_or_else(|e| panic!("{e}"))),
            "NIC live"
        );
        assert!(
            has_nic(&conn.persistent_xml(&name).unwrap_or_else(|e| panic!("{e}"))),
            "NIC persistent"
        );
        // removing it from the definition only leaves the running guest untouched
        conn.detach(&name, &nic, DeviceScope::Config)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!has_nic(
            &conn.persistent_xml(&name).unwrap_or_else(|e| panic!("{e}"))
        ));
        assert!(has_nic(
            &conn.domain_xml(&name).unwrap_or_else(|e| panic!("{e}"))
        ));

        // a guest with no OS ignores the ACPI request: forced off after the grace period
        let t0 = Instant::now();
        let out = conn
            .shutdown(&name, Duration::from_millis(800))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out, ShutdownOutcome::Forced);
        assert!(t0.elapsed() >= Duration::from_millis(800));
        assert_eq!(conn.state(&name).ok(), Some(DomainState::Shutoff));
        assert_eq!(
            conn.shutdown(&name, Duration::from_secs(1)).ok(),
            Some(ShutdownOutcome::AlreadyOff)
        );
    }));
    let _ = conn.destroy(&name);
    let _ = conn.undefine(&name);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

fn pool_spec(yaml: &str) -> kvm_operator::api::StoragePoolSpec {
    serde_saphyr::from_str(yaml).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn dir_pool_and_volume_lifecycle() {
    use kvm_operator::api::virtual_machine::VolumeFormat;
    use kvm_operator::hypervisor::storage::PoolXml;
    let conn =
        hypervisor::Connection::open("qemu:///system", "local").unwrap_or_else(|e| panic!("{e}"));
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let dir = tmp.path().join("pool dir <&>");
    let name = format!("kvmop-pool-{}", std::process::id());
    let def = PoolXml::from_spec(
        &name,
        &pool_spec(&format!(
            "nodeName: local\ntype: dir\ntargetPath: {:?}",
            dir.display().to_string()
        )),
    );
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let info = conn
            .ensure_pool(&def, true)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            info.running && info.autostart && info.capacity > 0,
            "{info:?}"
        );
        assert!(dir.is_dir(), "build made the directory");
        conn.ensure_pool(&def, true)
            .unwrap_or_else(|e| panic!("ensure_pool twice: {e}"));
        let observed = conn
            .pool_definition(&name)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("gone"));
        assert!(def.same_definition(&observed), "{observed:?}");
        let mut other = def.clone();
        other.target = Some(kvm_operator::hypervisor::storage::PathTarget {
            path: "/elsewhere".into(),
            format: None,
        });
        assert!(
            !other.same_definition(&observed),
            "a different target is a different definition"
        );

        let mib = 1u64 << 20;
        let base = conn
            .create_volume(&name, "base.qcow2", 64 * mib, VolumeFormat::Qcow2)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(base.capacity, 64 * mib);
        assert_eq!(
            conn.create_volume(&name, "base.qcow2", 64 * mib, VolumeFormat::Qcow2)
                .ok()
                .map(|v| v.path),
            Some(base.path.clone())
        );
        let clone = conn
            .clone_volume(
                &name,
                "base.qcow2",
                "clone.qcow2",
                Some(128 * mib),
                VolumeFormat::Qcow2,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(clone.capacity, 128 * mib);
        let ovl = conn
            .overlay_volume(&name, "base.qcow2", "ovl.qcow2", None)
            .unwrap_or_else(|e| panic!("{e}"));
        let qi = std::process::Command::new("qemu-img")
            .args(["info", "--output=json", "-U", &ovl.path])
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        let qi: serde_json::Value =
            serde_json::from_slice(&qi.stdout).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            qi["backing-filename"].as_str(),
            Some(base.path.as_str()),
            "{qi}"
        );
        assert_eq!(qi["format"], "qcow2");
        assert_eq!(
            conn.resize_volume(&name, "clone.qcow2", 256 * mib)
                .map(|v| v.capacity)
                .ok(),
            Some(256 * mib)
        );
        let shrink = conn
            .resize_volume(&name, "clone.qcow2", mib)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(shrink.contains("would lose data"), "{shrink}");

        // upload and download through libvirt streams
        conn.create_volume(&name, "blob.raw", mib, VolumeFormat::Raw)
            .unwrap_or_else(|e| panic!("{e}"));
        let data: Vec<u8> = (0..mib as usize).map(|i| (i % 251) as u8).collect();
        conn.upload(&name, "blob.raw", &data)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            conn.download(&name, "blob.raw", mib)
                .unwrap_or_else(|e| panic!("{e}")),
            data
        );

        let mut vols = conn.list_volumes(&name).unwrap_or_else(|e| panic!("{e}"));
        vols.sort();
        assert_eq!(vols, ["base.qcow2", "blob.raw", "clone.qcow2", "ovl.qcow2"]);
        for v in &vols {
            conn.delete_volume(&name, v)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        conn.delete_volume(&name, "base.qcow2")
            .unwrap_or_else(|e| panic!("deleting a missing volume must succeed: {e}"));
        assert!(matches!(
            conn.volume_info(&name, "base.qcow2"),
            Err(HvError::NotFound { .. })
        ));
    }));
    conn.remove_pool(&name).unwrap_or_else(|e| panic!("{e}"));
    conn.remove_pool(&name)
        .unwrap_or_else(|e| panic!("removing a missing pool must succeed: {e}"));
    assert!(dir.is_dir(), "removing a pool never deletes its storage");
    assert_eq!(conn.pool_definition(&name).ok(), Some(None));
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

#[test]
fn logical_pool_on_a_loop_device_never_overwrites_the_volume_group() {
    use kvm_operator::api::virtual_machine::VolumeFormat;
    use kvm_operator::hypervisor::storage::PoolXml;
    let sh = |cmd: &str, args: &[&str]| {
        let out = std::process::Command::new(cmd)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{cmd}: {e}"));
        assert!(
            out.status.success(),
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let img = tmp.path().join("pv.img");
    sh("truncate", &["-s", "64M", &img.display().to_string()]);
    let dev = sh("losetup", &["-f", "--show", &img.display().to_string()]);
    let vg = format!("kvmopvg{}", std::process::id());
    let conn =
        hypervisor::Connection::open("qemu:///system", "local").unwrap_or_else(|e| panic!("{e}"));
    let def = PoolXml::from_spec(
        &vg,
        &pool_spec(&format!(
            "nodeName: local\ntype: logical\nsource: {{name: {vg}, devices: [{dev}]}}"
        )),
    );
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let info = conn
            .ensure_pool(&def, false)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            info.running && !info.autostart && info.capacity > 0,
            "{info:?}"
        );
        let vgs = sh("vgs", &["--noheadings", "-o", "vg_name"]);
        assert!(
            vgs.lines().any(|l| l.trim() == vg),
            "build created the VG: {vgs}"
        );
        // device-mapper is what creates LVs; a sandbox without it can still build VGs
        let dm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/mapper/control")
            .is_ok();
        if dm {
            let lv = conn
                .create_volume(&vg, "lv0", 8 << 20, VolumeFormat::Raw)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(lv.path, format!("/dev/{vg}/lv0"));
        } else {
            eprintln!("device-mapper is not available here: logical volume creation not exercised");
        }
        // undefine and define again: the existing VG (and any LV) survives the second build
        conn.remove_pool(&vg).unwrap_or_else(|e| panic!("{e}"));
        let vgs = sh("vgs", &["--noheadings", "-o", "vg_name"]);
        assert!(
            vgs.lines().any(|l| l.trim() == vg),
            "removing the pool keeps the VG: {vgs}"
        );
        conn.ensure_pool(&def, false)
            .unwrap_or_else(|e| panic!("ensure on an existing VG: {e}"));
        if dm {
            assert_eq!(conn.list_volumes(&vg).unwrap_or_default(), ["lv0"]);
            conn.delete_volume(&vg, "lv0")
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }));
    let _ = conn.remove_pool(&vg);
    let _ = std::process::Command::new("vgremove")
        .args(["-f", &vg])
        .output();
    let _ = std::process::Command::new("losetup")
        .args(["-d", &dev])
        .output();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

#[test]
fn lifecycle_events_and_bulk_stats_of_a_real_guest() {
    use kvm_operator::hypervisor::ffi::LifecycleKind;
    let conn =
        hypervisor::Connection::open("qemu:///system", "local").unwrap_or_else(|e| panic!("{e}"));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sub = conn.subscribe_events(tx).unwrap_or_else(|e| panic!("{e}"));
    let name = format!("kvmop-ev-{}", std::process::id());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        conn.define(&DomainXml::minimal(&name, domain_type(), 64 * 1024, 1))
            .unwrap_or_else(|e| panic!("{e}"));
        conn.start(&name).unwrap_or_else(|e| panic!("{e}"));
        std::thread::sleep(Duration::from_millis(300));
        let stats = conn.domain_stats().unwrap_or_else(|e| panic!("{e}"));
        let me = stats
            .iter()
            .find(|s| s.domain == name)
            .unwrap_or_else(|| panic!("{name} not in stats"));
        assert_eq!(me.state, Some(1), "running");
        assert!(me.cpu_time_ns.is_some_and(|t| t > 0), "{me:?}");
        assert_eq!(me.balloon_maximum_kib, Some(64 * 1024));
        assert_eq!(me.vcpus, Some(1));
        conn.suspend(&name).unwrap_or_else(|e| panic!("{e}"));
        conn.resume(&name).unwrap_or_else(|e| panic!("{e}"));
        conn.destroy(&name).unwrap_or_else(|e| panic!("{e}"));
        conn.undefine(&name).unwrap_or_else(|e| panic!("{e}"));
        // events arrive asynchronously on libvirt's event thread
        let want = [
            LifecycleKind::Defined,
            LifecycleKind::Started,
            LifecycleKind::Suspended,
            LifecycleKind::Resumed,
            LifecycleKind::Stopped,
            LifecycleKind::Undefined,
        ];
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        while Instant::now() < deadline && !want.iter().all(|k| seen.contains(k)) {
            match rx.try_recv() {
                Ok(ev) if ev.domain == name => {
                    assert_eq!(ev.node, "local");
                    seen.push(ev.kind);
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        // QEMU starts paused and is resumed, so a start also brings a Resumed: the events we
        // expect must appear in this order, others may come between.
        let mut it = seen.iter();
        let in_order = want.iter().all(|w| it.any(|k| k == w));
        assert!(in_order, "expected {want:?} in order, got {seen:?}");
    }));
    drop(sub);
    let _ = conn.destroy(&name);
    let _ = conn.undefine(&name);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

#[test]
fn cloud_init_seed_is_a_real_iso_with_the_cidata_label() {
    use kvm_operator::hypervisor::cloud_init::Seed;
    use kvm_operator::hypervisor::storage::PoolXml;
    let conn =
        hypervisor::Connection::open("qemu:///system", "local").unwrap_or_else(|e| panic!("{e}"));
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let name = format!("kvmop-seed-{}", std::process::id());
    let def = PoolXml::from_spec(
        &name,
        &pool_spec(&format!(
            "nodeName: local\ntype: dir\ntargetPath: {}",
            tmp.path().display()
        )),
    );
    let user_data = format!(
        "#cloud-config\nhostname: web-1\nwrite_files:\n  - path: /etc/motd\n    content: {}\n",
        "é".repeat(3000)
    );
    let seed = Seed::new(
        "6f1e3c1a-uid",
        "web-1",
        &user_data,
        Some("version: 2\nethernets: {}\n"),
    );
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        conn.ensure_pool(&def, false)
            .unwrap_or_else(|e| panic!("{e}"));
        let vol = conn
            .write_seed(&name, "seed.iso", &seed)
            .unwrap_or_else(|e| panic!("{e}"));
        // read it back with independent tools
        let label = std::process::Command::new("blkid")
            .args(["-o", "value", "-s", "LABEL", &vol.path])
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(String::from_utf8_lossy(&label.stdout).trim(), "cidata");
        let ls = std::process::Command::new("isoinfo")
            .args(["-J", "-f", "-i", &vol.path])
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        let mut names: Vec<String> = String::from_utf8_lossy(&ls.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        names.sort();
        assert_eq!(names, ["/meta-data", "/network-config", "/user-data"]);
        let extract = |file: &str| {
            let out = std::process::Command::new("isoinfo")
                .args(["-J", "-i", &vol.path, "-x", file])
                .output()
                .unwrap_or_else(|e| panic!("{e}"));
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert_eq!(extract("/user-data"), user_data);
        assert_eq!(extract("/meta-data"), seed.meta_data);
        // rewriting with other content replaces it
        let smaller = Seed::new("6f1e3c1a-uid", "web-1", "#cloud-config\n", None);
        let vol = conn
            .write_seed(&name, "seed.iso", &smaller)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(vol.capacity, smaller.to_iso().len() as u64);
        let out = std::process::Command::new("isoinfo")
            .args(["-J", "-i", &vol.path, "-x", "/user-data"])
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "#cloud-config\n");
        conn.delete_volume(&name, "seed.iso")
            .unwrap_or_else(|e| panic!("{e}"));
    }));
    let _ = conn.remove_pool(&name);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

#[test]
fn libvirt_and_vnc_through_our_own_ssh_tunnel() {
    use kvm_operator::hypervisor::domain_xml::Graphics;
    use kvm_operator::hypervisor::ssh::{HostKeyPolicy, SshSession};
    use kvm_operator::hypervisor::tunnel::{Remote, Tunnel};
    use std::io::Read;
    let lab = lab();
    let key = std::fs::read(&lab.key).unwrap_or_else(|e| panic!("{e}"));
    let session = || {
        SshSession::connect(
            &lab.addr,
            lab.port,
            &lab.user,
            &key,
            &HostKeyPolicy::Pinned(lab.fingerprint.clone()),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    };
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let sock = tmp.path().join("libvirt.sock");
    let tunnel = Tunnel::start(
        session(),
        Remote::UnixSocket("/var/run/libvirt/libvirt-sock".into()),
        &sock,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let conn = hypervisor::Connection::open(
        &format!("qemu+unix:///system?socket={}", sock.display()),
        "tunnelled",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(conn.driver().ok().as_deref(), Some("QEMU"));
    let name = format!("kvmop-tun-{}", std::process::id());
    let mut xml = DomainXml::minimal(&name, domain_type(), 64 * 1024, 1);
    xml.devices.graphics.push(Graphics {
        graphics_type: "vnc".into(),
        port: Some(-1),
        autoport: Some("yes".into()),
        listen: Some("127.0.0.1".into()),
    });
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        conn.define(&xml).unwrap_or_else(|e| panic!("{e}"));
        conn.start(&name).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(conn.state(&name).ok(), Some(DomainState::Running));
        // the console: a guest's VNC port on the host's loopback, through a second tunnel
        let vnc = conn
            .console(&name)
            .unwrap_or_else(|e| panic!("{e}"))
            .vnc
            .unwrap_or_else(|| panic!("no VNC"));
        let port: u16 = vnc
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{vnc}"));
        let vsock = tmp.path().join("vnc.sock");
        let _vt = Tunnel::start(session(), Remote::Tcp("127.0.0.1".into(), port), &vsock)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut s =
            std::os::unix::net::UnixStream::connect(&vsock).unwrap_or_else(|e| panic!("{e}"));
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut banner = [0u8; 12];
        s.read_exact(&mut banner).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            banner.starts_with(b"RFB 003."),
            "{:?}",
            String::from_utf8_lossy(&banner)
        );
    }));
    let _ = conn.destroy(&name);
    let _ = conn.undefine(&name);
    assert!(tunnel.is_running());
    drop(conn);
    drop(tunnel);
    assert!(!sock.exists(), "the socket is removed with the tunnel");
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}
