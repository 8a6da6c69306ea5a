//! Per-operation latency of the hypervisor layer, side by side in one run over the lab's
//! loopback sshd (`eval "$(hack/lab.sh env)"; cargo bench --bench hypervisor`):
//!
//! - ours: `NodePool::call` (spawn_blocking, timeout, cached connection through our own ssh2
//!   tunnel), as the controllers use it;
//! - direct: the same libvirt calls made raw on a connection of the same transport;
//! - qemu+libssh and qemu+ssh: libvirt's own SSH transports, for the transport choice;
//! - ssh+virsh: a new `ssh host virsh …` per operation, as SSH/virsh-based managers do.
//!
//! Each line ends with the ratio and its target. Figures are medians; the machine is shared and
//! noisy, so only ratios measured in the same run are compared.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_operator::api::KvmNodeSpec;
use kvm_operator::hypervisor::cache::NodePool;
use kvm_operator::hypervisor::domain_xml::DomainXml;
use kvm_operator::hypervisor::{HvError, NodeAccess};

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set: eval \"$(hack/lab.sh env)\" first"))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<F: FnMut()>(n: usize, mut f: F) -> Duration {
    f(); // warm-up
    median(
        (0..n)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect(),
    )
}

fn ssh_virsh(args: &[&str], stdin: Option<&str>) {
    let mut cmd = Command::new("ssh");
    cmd.args([
        "-q",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
    ])
    .arg("-o")
    .arg(format!("UserKnownHostsFile={}", env("KVM_LAB_KNOWN_HOSTS")))
    .arg("-i")
    .arg(env("KVM_LAB_SSH_KEY"))
    .arg("-p")
    .arg(env("KVM_LAB_SSH_PORT"))
    .arg(format!(
        "{}@{}",
        env("KVM_LAB_SSH_USER"),
        env("KVM_LAB_SSH_ADDR")
    ))
    .args(["virsh", "-q", "-c", "qemu:///system"])
    .args(args)
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().unwrap();
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ssh virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn line(what: &str, ours: Duration, other_name: &str, other: Duration, ratio: f64, target: &str) {
    println!(
        "{what}: ours {:.3} ms, {other_name} {:.3} ms, ratio {ratio:.2}x (target {target})",
        ours.as_secs_f64() * 1e3,
        other.as_secs_f64() * 1e3
    );
}

fn main() {
    let domain_type = if std::path::Path::new("/dev/kvm").exists() {
        "kvm"
    } else {
        "qemu"
    };
    let dir = tempfile::tempdir().unwrap();
    let spec: KvmNodeSpec = serde_json::from_value(serde_json::json!({
        "address": env("KVM_LAB_SSH_ADDR"), "port": env("KVM_LAB_SSH_PORT").parse::<u16>().unwrap(),
        "user": env("KVM_LAB_SSH_USER"), "sshKeySecretRef": {"name": "lab"},
        "hostKeyFingerprint": env("KVM_LAB_SSH_FINGERPRINT"),
    }))
    .unwrap();
    let access = NodeAccess {
        name: "bench".into(),
        spec,
        private_key: Some(std::fs::read(env("KVM_LAB_SSH_KEY")).unwrap()),
        state_dir: dir.path().to_path_buf(),
        tls: None,
        timeout: Duration::from_secs(10),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pool = Arc::new(NodePool::new(Duration::from_secs(30)));
    pool.upsert(access.clone());
    // open the pool's connection before timing
    rt.block_on(pool.call("bench", "connect", |_| Ok::<_, HvError>(())))
        .unwrap();
    // a second connection over the same transport (qemu+libssh, same sshd and daemon) for the
    // raw calls: the pool's own connection is not reachable outside its calls
    let direct = kvm_operator::hypervisor::connect_node(&access).unwrap();
    let raw = direct.raw();

    // a few defined (not running) domains so that listing has something to list
    let names: Vec<String> = (0..5).map(|i| format!("kvmop-bench-{i}")).collect();
    for n in &names {
        direct
            .define(&DomainXml::minimal(n, domain_type, 32 * 1024, 1))
            .unwrap();
    }
    let probe = names[0].clone();
    let n_fast = 200;
    let n_ssh = 15;

    // list: names and states of all domains
    let ours_list = time(n_fast, || {
        rt.block_on(pool.call("bench", "list", |c| c.list_domains().map(|d| d.len())))
            .unwrap();
    });
    let direct_list = time(n_fast, || {
        for d in raw.list_all_domains(0).unwrap() {
            let _ = (
                d.name().unwrap(),
                d.uuid_string().unwrap(),
                d.state().unwrap(),
                d.metadata(
                    virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                    Some(kvm_operator::hypervisor::domain_xml::OWNER_NS),
                    0,
                ),
            );
        }
    });
    let virsh_list = time(n_ssh, || ssh_virsh(&["list", "--all"], None));

    // info of one domain
    let ours_info = time(n_fast, || {
        let p = probe.clone();
        rt.block_on(pool.call("bench", "info", move |c| c.info(&p)))
            .unwrap();
    });
    let direct_info = time(n_fast, || {
        raw.lookup_domain_by_name(&probe).unwrap().info().unwrap();
    });
    let virsh_info = time(n_ssh, || ssh_virsh(&["dominfo", &probe], None));

    // define + start + destroy + undefine of a small real guest
    let cycle_xml = DomainXml::minimal("kvmop-bench-cycle", domain_type, 32 * 1024, 1);
    let cycle_text = cycle_xml.render().unwrap();
    let n_cycle = 8;
    let ours_cycle = time(n_cycle, || {
        let x = cycle_xml.clone();
        rt.block_on(pool.call("bench", "define", move |c| c.define(&x)))
            .unwrap();
        rt.block_on(pool.call("bench", "start", |c| c.start("kvmop-bench-cycle")))
            .unwrap();
        rt.block_on(pool.call("bench", "destroy", |c| c.destroy("kvmop-bench-cycle")))
            .unwrap();
        rt.block_on(pool.call("bench", "undefine", |c| c.undefine("kvmop-bench-cycle")))
            .unwrap();
    });
    let direct_cycle = time(n_cycle, || {
        let d = raw.define_domain_xml(&cycle_text).unwrap();
        d.create().unwrap();
        d.destroy().unwrap();
        d.undefine().unwrap();
    });
    let virsh_cycle = time(4, || {
        ssh_virsh(&["define", "/dev/stdin"], Some(&cycle_text));
        ssh_virsh(&["start", "kvmop-bench-cycle"], None);
        ssh_virsh(&["destroy", "kvmop-bench-cycle"], None);
        ssh_virsh(&["undefine", "kvmop-bench-cycle"], None);
    });
    // libvirt's other SSH transport: qemu+ssh runs the `ssh` program, whose known_hosts must hold
    // the host key (the lab's wrapper in $KVM_LAB/ssh/bin does that when it is first on PATH)
    let wrapper = format!("{}/ssh/bin", env("KVM_LAB"));
    let ssh_transport =
        std::env::var("PATH").unwrap_or_default().split(':').next() == Some(wrapper.as_str());
    let ours_info_ssh = ssh_transport.then(|| {
        let mut a = access.clone();
        a.name = "bench-ssh".into();
        a.spec.libvirt_uri = Some(format!(
            "qemu+ssh://{}@{}:{}/system",
            env("KVM_LAB_SSH_USER"),
            env("KVM_LAB_SSH_ADDR"),
            env("KVM_LAB_SSH_PORT")
        ));
        pool.upsert(a);
        time(n_fast, || {
            let p = probe.clone();
            rt.block_on(pool.call("bench-ssh", "info", move |c| c.info(&p)))
                .unwrap();
        })
    });
    // libvirt's own libssh transport, for the transport comparison (same calls, same daemon)
    let mut libssh_access = access.clone();
    libssh_access.name = "bench-libssh".into();
    libssh_access.spec.libvirt_uri = Some(format!(
        "qemu+libssh://{}@{}:{}/system",
        env("KVM_LAB_SSH_USER"),
        env("KVM_LAB_SSH_ADDR"),
        env("KVM_LAB_SSH_PORT")
    ));
    let libssh = kvm_operator::hypervisor::connect_node(&libssh_access).unwrap();
    let libssh_info = time(n_fast, || {
        libssh
            .raw()
            .lookup_domain_by_name(&probe)
            .unwrap()
            .info()
            .unwrap();
    });
    let libssh_list = time(n_fast, || {
        libssh.list_domains().unwrap();
    });
    let tunnel_list = time(n_fast, || {
        direct.list_domains().unwrap();
    });
    drop(libssh);
    for n in &names {
        let _ = direct.undefine(n);
    }

    let r = |a: Duration, b: Duration| b.as_secs_f64() / a.as_secs_f64();
    println!(
        "hypervisor layer over loopback sshd ({domain_type} guests, 5 defined domains), medians:"
    );
    line(
        "list vs ssh+virsh",
        ours_list,
        "ssh+virsh",
        virsh_list,
        r(ours_list, virsh_list),
        ">= 20x faster",
    );
    line(
        "info vs ssh+virsh",
        ours_info,
        "ssh+virsh",
        virsh_info,
        r(ours_info, virsh_info),
        ">= 20x faster",
    );
    line(
        "define+start+destroy+undefine vs ssh+virsh",
        ours_cycle,
        "ssh+virsh",
        virsh_cycle,
        r(ours_cycle, virsh_cycle),
        "faster; QEMU start dominates",
    );
    line(
        "list vs direct libvirt",
        ours_list,
        "direct",
        direct_list,
        r(direct_list, ours_list),
        "<= 1.2x",
    );
    line(
        "info vs direct libvirt",
        ours_info,
        "direct",
        direct_info,
        r(direct_info, ours_info),
        "<= 1.2x",
    );
    line(
        "define+start+destroy+undefine vs direct libvirt",
        ours_cycle,
        "direct",
        direct_cycle,
        r(direct_cycle, ours_cycle),
        "<= 1.2x",
    );
    match ours_info_ssh {
        Some(t) => line(
            "info: ours (ssh2 tunnel) vs qemu+ssh",
            ours_info,
            "qemu+ssh",
            t,
            r(ours_info, t),
            "no slower (>= 1x)",
        ),
        None => {
            println!("info: ours vs qemu+ssh: not measured (run with PATH=$KVM_LAB/ssh/bin:$PATH)")
        }
    }
    line(
        "info: our ssh2 tunnel vs qemu+libssh",
        direct_info,
        "qemu+libssh",
        libssh_info,
        r(direct_info, libssh_info),
        "tunnel no slower (>= 1x)",
    );
    line(
        "list: our ssh2 tunnel vs qemu+libssh",
        tunnel_list,
        "qemu+libssh",
        libssh_list,
        r(tunnel_list, libssh_list),
        "tunnel no slower (>= 1x)",
    );
}
