//! The image the Dockerfile builds packages the binary these tests run, with every shared library
//! it links. No Docker engine runs here, so this checks the Dockerfile against the real binary.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

fn dockerfile() -> String {
    std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Dockerfile"))
        .unwrap_or_default()
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Debian package that ships `path` (merged /usr aware).
fn package_of(path: &str) -> Option<String> {
    for p in [path.to_string(), format!("/usr{path}")] {
        let out = run("dpkg", &["-S", &p]);
        if let Some((pkg, _)) = out.lines().next().and_then(|l| l.split_once(':')) {
            return Some(pkg.to_string());
        }
    }
    None
}

#[test]
fn runtime_stage_installs_every_library_the_binary_links() {
    let bin = env!("CARGO_BIN_EXE_kvm-operator");
    let needed: Vec<String> = run("readelf", &["-d", bin])
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| {
            l.split('[')
                .nth(1)
                .map(|s| s.trim_end_matches(']').to_string())
        })
        .collect();
    assert!(
        needed.iter().any(|n| n.starts_with("libvirt.so")),
        "{needed:?}"
    );
    let ldd = run("ldd", &[bin]);
    let df = dockerfile();
    let runtime = df.rsplit("FROM debian:bookworm-slim").next().unwrap_or("");
    // what debian:bookworm-slim already has
    let base = ["libc6", "libgcc-s1"];
    for soname in &needed {
        let path = ldd
            .lines()
            .find(|l| l.trim_start().starts_with(soname.as_str()))
            .and_then(|l| l.split("=>").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_string);
        let Some(path) = path else { continue }; // the loader itself
        let pkg = package_of(&path).unwrap_or_else(|| panic!("no package ships {path}"));
        assert!(
            base.contains(&pkg.as_str()) || runtime.split_whitespace().any(|w| w == pkg),
            "the binary links {soname} from package {pkg}, which the Dockerfile's runtime stage does not install"
        );
    }
}

#[test]
fn image_builds_the_tested_binary_and_runs_it_unprivileged() {
    let df = dockerfile();
    assert!(df.contains("cargo build --release --locked --bin kvm-operator"));
    assert!(df.contains(
        "COPY --from=build /src/target/release/kvm-operator /usr/local/bin/kvm-operator"
    ));
    let user = df
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .unwrap_or("root");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "runs as {user}"
    );
    assert!(
        df.contains("openssh-client"),
        "qemu+ssh needs the ssh client"
    );
    // the image's default command is a subcommand the binary has
    let out = Command::new(env!("CARGO_BIN_EXE_kvm-operator"))
        .args(["run", "--help"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("--http-addr"));
}
