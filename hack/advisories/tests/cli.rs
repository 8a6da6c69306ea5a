//! The built binary run on a small advisory database and lock files written by each test.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const CRATES_IO: &str = "registry+https://github.com/rust-lang/crates.io-index";

/// A scratch directory with an advisory database in `db/`, removed when dropped.
struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let dir =
            std::env::temp_dir().join(format!("advisories-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("db/crates")).unwrap();
        fs::write(
            dir.join("db/SNAPSHOT.txt"),
            "Test database, snapshot dated 2001-02-03.\n",
        )
        .unwrap();
        let f = Fixture { dir };
        f.advisory(
            "vulny",
            "RUSTSEC-2001-0001",
            "",
            "patched = [\">= 1.2.0\"]\nunaffected = [\"< 1.0.0\"]",
            "Remote code execution in vulny",
        );
        f.advisory(
            "oldie",
            "RUSTSEC-2001-0002",
            "informational = \"unmaintained\"\n",
            "patched = []",
            "oldie is unmaintained",
        );
        f.advisory(
            "gone",
            "RUSTSEC-2001-0003",
            "withdrawn = \"2001-03-01\"\n",
            "patched = []",
            "Not a real problem after all",
        );
        f
    }

    fn advisory(&self, package: &str, id: &str, extra: &str, versions: &str, title: &str) {
        let dir = self.dir.join("db/crates").join(package);
        fs::create_dir_all(&dir).unwrap();
        let text = format!(
            "```toml\n[advisory]\nid = \"{id}\"\npackage = \"{package}\"\ndate = \"2001-02-03\"\n\
             url = \"https://example.org/{id}\"\ncategories = [\"code-execution\"]\n{extra}\n\
             [versions]\n{versions}\n```\n\n# {title}\n\nDetails.\n"
        );
        fs::write(dir.join(format!("{id}.md")), text).unwrap();
    }

    /// A Cargo.lock whose root package `app` depends on `mid`, which depends on each of `deps`
    /// (`(name, version, from crates.io)`).
    fn lock(&self, deps: &[(&str, &str, bool)]) -> PathBuf {
        let mut text = String::from(
            "version = 4\n\n[[package]]\nname = \"app\"\nversion = \"0.1.0\"\ndependencies = [\"mid\"]\n\n\
             [[package]]\nname = \"mid\"\nversion = \"0.3.0\"\n",
        );
        text.push_str(&format!("source = \"{CRATES_IO}\"\ndependencies = [\n"));
        for (name, version, _) in deps {
            text.push_str(&format!("  \"{name} {version}\",\n"));
        }
        text.push_str("]\n");
        for (name, version, crates_io) in deps {
            let source = if *crates_io {
                CRATES_IO.to_owned()
            } else {
                "git+https://example.org/fork#0123".to_owned()
            };
            text.push_str(&format!(
                "\n[[package]]\nname = \"{name}\"\nversion = \"{version}\"\nsource = \"{source}\"\n"
            ));
        }
        let path = self.dir.join("Cargo.lock");
        fs::write(&path, text).unwrap();
        path
    }

    fn policy(&self, text: &str) -> PathBuf {
        let path = self.dir.join("policy.toml");
        fs::write(&path, text).unwrap();
        path
    }

    fn run(&self, policy: Option<&Path>, locks: &[&Path]) -> (i32, String) {
        run(&self.dir.join("db"), policy, locks)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn run(db: &Path, policy: Option<&Path>, locks: &[&Path]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_advisories"));
    cmd.arg("--db").arg(db);
    if let Some(p) = policy {
        cmd.arg("--policy").arg(p);
    }
    cmd.args(locks);
    let out = cmd.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn an_affected_version_fails_naming_the_advisory() {
    let f = Fixture::new("affected");
    let lock = f.lock(&[("vulny", "1.1.0", true)]);
    let (code, out) = f.run(None, &[&lock]);
    assert_eq!(code, 1, "{out}");
    for expected in [
        "snapshot 2001-02-03",
        "3 advisories about crates, 1 withdrawn",
        "error: vulny 1.1.0 in ",
        "RUSTSEC-2001-0001 (vulnerability: code-execution)",
        "title:    Remote code execution in vulny",
        "patched:  >= 1.2.0",
        "url:      https://example.org/RUSTSEC-2001-0001",
        "advisory: https://rustsec.org/advisories/RUSTSEC-2001-0001.html",
        "via:      vulny 1.1.0 <- mid 0.3.0 <- app 0.1.0",
        "1 error(s) (vulnerability), 0 warning(s), 0 ignored",
        "fix: ",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
}

#[test]
fn patched_and_unaffected_versions_pass() {
    let f = Fixture::new("patched");
    for version in ["1.2.0", "1.10.3", "0.9.9"] {
        let lock = f.lock(&[
            ("vulny", version, true),
            ("gone", "0.1.0", true),
            ("other", "1.0.0", true),
        ]);
        let (code, out) = f.run(None, &[&lock]);
        assert_eq!(code, 0, "{version}: {out}");
        assert!(out.contains("0 error(s), 0 warning(s), 0 ignored"), "{out}");
        assert!(out.contains("4 packages from crates.io checked"), "{out}");
        // withdrawn advisories are never reported
        assert!(!out.contains("RUSTSEC-2001-0003"), "{out}");
    }
}

#[test]
fn informational_advisories_fail_unless_the_policy_warns() {
    let f = Fixture::new("informational");
    let lock = f.lock(&[("oldie", "0.4.0", true)]);
    let (code, out) = f.run(None, &[&lock]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("error: oldie 0.4.0") && out.contains("(unmaintained: code-execution)"),
        "{out}"
    );
    assert!(
        out.contains("patched:  none (no fixed release: replace the crate)"),
        "{out}"
    );

    let policy = f.policy("warn = [\"unmaintained\"]\n");
    let (code, out) = f.run(Some(&policy), &[&lock]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("warning: oldie 0.4.0"), "{out}");
    assert!(out.contains("0 error(s), 1 warning(s)"), "{out}");
}

#[test]
fn an_ignored_advisory_is_reported_with_its_reason() {
    let f = Fixture::new("ignored");
    let lock = f.lock(&[("vulny", "1.1.0", true)]);
    let policy = f.policy(
        "[[ignore]]\nid = \"RUSTSEC-2001-0001\"\nreason = \"only the server side is affected\"\n\
         [[ignore]]\nid = \"RUSTSEC-2001-0009\"\nreason = \"left over\"\n",
    );
    let (code, out) = f.run(Some(&policy), &[&lock]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ignored: vulny 1.1.0")
            && out.contains("ignored because: only the server side"),
        "{out}"
    );
    assert!(
        out.contains("[[ignore]] RUSTSEC-2001-0009 matches nothing"),
        "{out}"
    );
    assert!(out.contains("0 error(s), 1 warning(s), 1 ignored"), "{out}");
}

#[test]
fn a_denied_crate_fails_without_an_advisory() {
    let f = Fixture::new("denied");
    let lock = f.lock(&[("serde_yaml", "0.9.34+deprecated", true)]);
    let policy = f.policy(
        "[[deny]]\ncrate = \"serde_yaml\"\nreason = \"archived upstream; use serde-saphyr\"\n",
    );
    let (code, out) = f.run(Some(&policy), &[&lock]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("error: serde_yaml 0.9.34+deprecated in ") && out.contains("denied crate"),
        "{out}"
    );
    assert!(
        out.contains("reason:   archived upstream; use serde-saphyr"),
        "{out}"
    );
}

#[test]
fn packages_from_elsewhere_are_not_matched() {
    let f = Fixture::new("elsewhere");
    let lock = f.lock(&[("vulny", "1.1.0", false)]);
    let (code, out) = f.run(None, &[&lock]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 from elsewhere"), "{out}");
}

#[test]
fn every_lock_file_is_checked() {
    let f = Fixture::new("two-locks");
    let clean = f.dir.join("clean.lock");
    fs::write(&clean, "version = 4\n").unwrap();
    let lock = f.lock(&[("vulny", "1.0.0", true)]);
    let (code, out) = f.run(None, &[&clean, &lock]);
    assert_eq!(code, 1, "{out}");
}

#[test]
fn unreadable_inputs_are_errors_not_passes() {
    let f = Fixture::new("unreadable");
    let lock = f.lock(&[]);
    let (code, out) = run(&f.dir.join("missing"), None, &[&lock]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("advisory database"), "{out}");

    let (code, out) = f.run(None, &[&f.dir.join("nope.lock")]);
    assert_eq!(code, 2, "{out}");

    // a file the reader does not understand stops the check rather than being skipped
    f.advisory(
        "weird",
        "RUSTSEC-2001-0004",
        "",
        "patched = [\"1.*\"]",
        "Wildcards",
    );
    let (code, out) = f.run(None, &[&lock]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("RUSTSEC-2001-0004"), "{out}");

    let empty = f.dir.join("empty-db");
    fs::create_dir_all(empty.join("crates")).unwrap();
    let (code, out) = run(&empty, None, &[&lock]);
    assert_eq!(code, 2, "{out}");
}

/// The shared snapshot (when present) loads completely: every advisory in it is understood.
#[test]
fn the_shared_snapshot_loads() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let db = std::env::var_os("ADVISORY_DB")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../../../shared/advisory-db"));
    if !db.join("crates").is_dir() {
        eprintln!("skipped: no advisory database at {}", db.display());
        return;
    }
    let (code, out) = run(&db, None, &[&manifest.join("Cargo.lock")]);
    assert_ne!(code, 2, "{out}");
    assert!(out.contains("advisories about crates"), "{out}");
}
