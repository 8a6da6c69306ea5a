//! Facts about a host read over SSH: CPUs, memory, load, CPU use, KVM, versions.
//!
//! One fixed command ([`RemoteCommand::HostFacts`]) prints `/proc` files and versions in marked
//! sections; [`parse`] turns that text into [`HostFacts`] and never panics, whatever the host
//! printed (a missing or garbled section leaves its field unset).

use std::time::Duration;

use super::HvError;
use super::ssh::{RemoteCommand, SECTION, SshSession};

/// Cumulative CPU time counters from the first line of `/proc/stat`, in clock ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CpuTimes {
    /// Ticks not idle (user, nice, system, irq, softirq, steal).
    pub busy: u64,
    /// Ticks idle or waiting for I/O.
    pub idle: u64,
}

/// What the operator knows about a host's resources and software.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct HostFacts {
    /// Logical CPUs (threads).
    pub cpus: Option<u32>,
    /// CPU model name, e.g. `AMD EPYC 7543 32-Core Processor`.
    pub cpu_model: Option<String>,
    /// MemTotal, bytes.
    pub memory_total: Option<u64>,
    /// MemAvailable, bytes.
    pub memory_available: Option<u64>,
    /// Load averages over 1, 5 and 15 minutes.
    pub load: Option<[f64; 3]>,
    /// CPU time counters, for [`cpu_usage_percent`].
    pub cpu_times: Option<CpuTimes>,
    /// `/dev/kvm` is present (hardware virtualisation).
    pub kvm: Option<bool>,
    /// libvirt daemon version, e.g. `9.0.0`.
    pub libvirt_version: Option<String>,
    /// QEMU version, e.g. `7.2.22`.
    pub qemu_version: Option<String>,
}

/// Splits the facts output into `(section, body)` pairs.
fn sections(text: &str) -> Vec<(&str, String)> {
    let mut out: Vec<(&str, String)> = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix(SECTION) {
            out.push((name.trim(), String::new()));
        } else if let Some((_, body)) = out.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

/// The first dotted number in `s` (`libvirtd (libvirt) 9.0.0` → `9.0.0`).
fn first_version(s: &str) -> Option<String> {
    s.split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
        .find(|w| {
            w.contains('.')
                && w.starts_with(|c: char| c.is_ascii_digit())
                && w.chars().all(|c| c.is_ascii_digit() || c == '.')
        })
        .map(|w| w.trim_end_matches('.').to_string())
}

/// Parses what [`RemoteCommand::HostFacts`] printed.
pub fn parse(text: &str) -> HostFacts {
    let mut f = HostFacts::default();
    for (name, body) in sections(text) {
        match name {
            "/proc/loadavg" => {
                let v: Vec<f64> = body
                    .split_whitespace()
                    .take(3)
                    .filter_map(|x| x.parse().ok())
                    .filter(|x: &f64| x.is_finite() && *x >= 0.0)
                    .collect();
                if let [a, b, c] = v[..] {
                    f.load = Some([a, b, c]);
                }
            }
            "/proc/meminfo" => {
                for line in body.lines() {
                    let mut it = line.split_whitespace();
                    let (key, val, unit) = (it.next(), it.next(), it.next());
                    let kib = |v: Option<&str>| {
                        v.and_then(|v| v.parse::<u64>().ok())
                            .and_then(|v| match unit {
                                Some("kB") | None => v.checked_mul(1024),
                                _ => None,
                            })
                    };
                    match key {
                        Some("MemTotal:") => f.memory_total = kib(val),
                        Some("MemAvailable:") => f.memory_available = kib(val),
                        _ => {}
                    }
                }
            }
            "/proc/stat" => {
                if let Some(line) = body.lines().find(|l| l.starts_with("cpu ")) {
                    let v: Vec<u64> = line
                        .split_whitespace()
                        .skip(1)
                        .map_while(|x| x.parse().ok())
                        .collect();
                    // user nice system idle iowait irq softirq steal (guest time is inside user)
                    if v.len() >= 4 {
                        let get = |i: usize| v.get(i).copied().unwrap_or(0);
                        let idle = get(3).saturating_add(get(4));
                        let busy = [0, 1, 2, 5, 6, 7]
                            .iter()
                            .fold(0u64, |acc, &i| acc.saturating_add(get(i)));
                        f.cpu_times = Some(CpuTimes { busy, idle });
                    }
                }
            }
            "/proc/cpuinfo" => {
                let n = body.lines().filter(|l| l.starts_with("processor")).count();
                if n > 0 {
                    f.cpus = u32::try_from(n).ok();
                }
                f.cpu_model = body
                    .lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, m)| m.trim().chars().take(128).collect());
            }
            "kvm" => {
                f.kvm = match body.trim() {
                    "yes" => Some(true),
                    "no" => Some(false),
                    _ => None,
                }
            }
            "libvirtd" => f.libvirt_version = first_version(&body),
            "qemu" => f.qemu_version = first_version(&body),
            _ => {}
        }
    }
    f
}

/// CPU use between two samples, in percent of all CPUs (0-100). `None` when no time passed or
/// the counters went backwards (host rebooted).
pub fn cpu_usage_percent(before: CpuTimes, after: CpuTimes) -> Option<u32> {
    let busy = after.busy.checked_sub(before.busy)?;
    let idle = after.idle.checked_sub(before.idle)?;
    let total = busy.checked_add(idle)?;
    if total == 0 {
        return None;
    }
    u32::try_from(busy.saturating_mul(100) / total).ok()
}

/// libvirt's and QEMU's versions as read on a host. Starting the two binaries for their
/// versions is most of a facts reading's cost, so callers keep them and pass them back as
/// `known` for a while: the reading then runs [`RemoteCommand::HostLoad`] and fills them in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Versions {
    pub libvirt: Option<String>,
    pub qemu: Option<String>,
}

impl Versions {
    pub fn of(facts: &HostFacts) -> Self {
        Self {
            libvirt: facts.libvirt_version.clone(),
            qemu: facts.qemu_version.clone(),
        }
    }
}

/// Reads the facts, measuring CPU use against `previous` (the counters of an earlier reading of
/// the same host's counters) when there is one, so a periodic resync needs one command and no
/// wait. Without one, falls back to [`collect`] with `interval`.
pub fn collect_since(
    ssh: &SshSession,
    previous: Option<CpuTimes>,
    interval: Duration,
    known: Option<&Versions>,
) -> Result<(HostFacts, Option<u32>), HvError> {
    let Some(before) = previous else {
        return collect(ssh, Some(interval), known);
    };
    let (facts, _) = collect(ssh, None, known)?;
    let usage = facts.cpu_times.and_then(|now| {
        // counters that went backwards: the host rebooted; no figure this time
        (now.busy >= before.busy && now.idle >= before.idle)
            .then(|| cpu_usage_percent(before, now))
            .flatten()
    });
    Ok((facts, usage))
}

/// Reads the facts. With `interval`, samples `/proc/stat` twice and also returns CPU use. With
/// `known` versions, reads only the `/proc` files and `/dev/kvm` and takes the versions from
/// there.
pub fn collect(
    ssh: &SshSession,
    interval: Option<Duration>,
    known: Option<&Versions>,
) -> Result<(HostFacts, Option<u32>), HvError> {
    let read = |cmd: RemoteCommand| -> Result<HostFacts, HvError> {
        let out = ssh.run(cmd)?;
        if out.status != 0 {
            return Err(HvError::Ssh {
                target: ssh.target().to_string(),
                cause: format!(
                    "reading host facts exited with {}: {}",
                    out.status,
                    out.stderr.trim()
                ),
            });
        }
        let mut facts = parse(&out.stdout);
        if let Some(v) = known {
            facts.libvirt_version = v.libvirt.clone();
            facts.qemu_version = v.qemu.clone();
        }
        Ok(facts)
    };
    let (first_cmd, again) = match known {
        Some(_) => (RemoteCommand::HostLoad, RemoteCommand::HostLoad),
        None => (RemoteCommand::HostFacts, RemoteCommand::HostLoad),
    };
    let first = read(first_cmd)?;
    let Some(interval) = interval else {
        return Ok((first, None));
    };
    std::thread::sleep(interval);
    let mut second = read(again)?;
    second.libvirt_version = first.libvirt_version.clone();
    second.qemu_version = first.qemu_version.clone();
    let usage = match (first.cpu_times, second.cpu_times) {
        (Some(a), Some(b)) => cpu_usage_percent(a, b),
        _ => None,
    };
    Ok((second, usage))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "==> /proc/loadavg
0.52 0.58 0.59 1/389 12345
==> /proc/meminfo
MemTotal:       16318480 kB
MemFree:         1234567 kB
MemAvailable:    8000000 kB
==> /proc/stat
cpu  10132153 290696 3084719 46828483 16683 0 25195 0 0 0
cpu0 1393280 32966 572056 13343292 6130 0 17875 0 0 0
==> /proc/cpuinfo
processor\t: 0
model name\t: AMD EPYC 7543 32-Core Processor
processor\t: 1
model name\t: AMD EPYC 7543 32-Core Processor
==> kvm
yes
==> libvirtd
libvirtd (libvirt) 9.0.0
==> qemu
QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)
";

    #[test]
    fn parses_a_real_host() {
        let f = parse(SAMPLE);
        assert_eq!(f.cpus, Some(2));
        assert_eq!(
            f.cpu_model.as_deref(),
            Some("AMD EPYC 7543 32-Core Processor")
        );
        assert_eq!(f.memory_total, Some(16318480 * 1024));
        assert_eq!(f.memory_available, Some(8000000 * 1024));
        assert_eq!(f.load, Some([0.52, 0.58, 0.59]));
        assert_eq!(f.kvm, Some(true));
        assert_eq!(f.libvirt_version.as_deref(), Some("9.0.0"));
        assert_eq!(f.qemu_version.as_deref(), Some("7.2.22"));
        assert_eq!(
            f.cpu_times,
            Some(CpuTimes {
                busy: 10132153 + 290696 + 3084719 + 25195,
                idle: 46828483 + 16683
            })
        );
    }

    #[test]
    fn garbage_leaves_fields_unset_and_never_panics() {
        for text in [
            "",
            "==> ",
            "==> /proc/loadavg\nnan -1 x\n",
            "==> /proc/meminfo\nMemTotal: 99999999999999999999 kB\nMemAvailable: 5 MB\n",
            "==> /proc/stat\ncpu 1 2\n",
            "==> kvm\nmaybe\n==> libvirtd\n\n==> qemu\nno version here\n",
            "random\n==> /proc/cpuinfo\n",
        ] {
            let f = parse(text);
            assert_eq!(f.load, None, "{text:?}");
            assert_eq!(f.memory_total, None);
            assert_eq!(f.memory_available, None);
            assert_eq!(f.cpu_times, None);
            assert_eq!(f.kvm, None);
            assert_eq!(f.libvirt_version, None);
            assert_eq!(f.qemu_version, None);
            assert_eq!(f.cpus, None);
        }
        // every prefix of a real answer (a cut connection) parses without panicking
        for i in 0..SAMPLE.len() {
            if SAMPLE.is_char_boundary(i) {
                let _ = parse(&SAMPLE[..i]);
            }
        }
    }

    #[test]
    fn cpu_usage_between_samples() {
        let a = CpuTimes {
            busy: 100,
            idle: 900,
        };
        assert_eq!(
            cpu_usage_percent(
                a,
                CpuTimes {
                    busy: 175,
                    idle: 925
                }
            ),
            Some(75)
        );
        assert_eq!(cpu_usage_percent(a, a), None);
        assert_eq!(
            cpu_usage_percent(a, CpuTimes { busy: 0, idle: 0 }),
            None,
            "reboot"
        );
    }
}
