//! `advisories --db DIR [--policy FILE] CARGO_LOCK...`
//!
//! Checks every crates.io package of the given Cargo.lock files against a RustSec advisory
//! database on disk (a snapshot: nothing is fetched) and exits 1 when a package is affected by an
//! advisory that is not withdrawn, or is a crate the policy denies; 0 when none is; 2 when the
//! database, a lock file or the policy cannot be read. Every kind of advisory fails, informational
//! ones (unsound, unmaintained, notice) included, unless the policy lists the kind under `warn`
//! or the advisory under `[[ignore]]` with a reason.

mod advisory;
mod lockfile;
mod policy;
mod versions;

use advisory::{Advisory, Database};
use lockfile::Lockfile;
use policy::{Entry, Policy};
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: advisories --db DIR [--policy FILE] CARGO_LOCK...";

struct Args {
    db: PathBuf,
    policy: Option<PathBuf>,
    locks: Vec<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut db = None;
    let mut policy = None;
    let mut locks = Vec::new();
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--db") => db = Some(PathBuf::from(args.next().ok_or("--db needs a directory")?)),
            Some("--policy") => {
                policy = Some(PathBuf::from(args.next().ok_or("--policy needs a file")?))
            }
            Some("-h" | "--help") => return Err(USAGE.into()),
            Some(s) if s.starts_with('-') => return Err(format!("unknown option {s}")),
            _ => locks.push(PathBuf::from(arg)),
        }
    }
    let db = db.ok_or("--db DIR is required (a RustSec advisory-db checkout or snapshot)")?;
    if locks.is_empty() {
        return Err("name at least one Cargo.lock".into());
    }
    Ok(Args { db, policy, locks })
}

fn main() -> ExitCode {
    let outcome = parse_args().and_then(|args| run(&args));
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("advisories: {e}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Error,
    Warning,
    Ignored,
}

enum Cause<'a> {
    Advisory(&'a Advisory),
    Denied(&'a Entry),
}

struct Finding<'a> {
    level: Level,
    lock: usize,
    package: usize,
    cause: Cause<'a>,
    /// Why an ignored advisory is ignored.
    note: Option<&'a str>,
}

/// Prints the report; `Ok(true)` when nothing fails.
fn run(args: &Args) -> Result<bool, String> {
    let db = Database::load(&args.db).map_err(|e| format!("advisory database: {e}"))?;
    let policy = match &args.policy {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            Policy::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => Policy::default(),
    };
    let mut locks = Vec::new();
    for path in &args.locks {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        locks.push(Lockfile::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?);
    }

    let live: Vec<&Advisory> = db
        .advisories
        .iter()
        .filter(|a| !a.withdrawn && a.crates_io)
        .collect();
    println!(
        "advisory database {} (snapshot {}): {} advisories about crates, {} withdrawn or about another registry (skipped)",
        args.db.display(),
        db.snapshot.as_deref().unwrap_or("undated: no SNAPSHOT.txt"),
        db.advisories.len(),
        db.advisories.len() - live.len(),
    );

    let mut findings = Vec::new();
    for (l, lock) in locks.iter().enumerate() {
        let checked = lock.packages.iter().filter(|p| p.crates_io).count();
        println!(
            "{}: {} packages from crates.io checked ({} from elsewhere, the project's own, git or path, not checked)",
            args.locks[l].display(),
            checked,
            lock.packages.len() - checked,
        );
        for (p, package) in lock.packages.iter().enumerate() {
            for entry in policy.deny.iter().filter(|d| d.key == package.name) {
                findings.push(Finding {
                    level: Level::Error,
                    lock: l,
                    package: p,
                    cause: Cause::Denied(entry),
                    note: None,
                });
            }
            if !package.crates_io {
                continue;
            }
            for a in live
                .iter()
                .filter(|a| a.package == package.name && a.versions.affects(&package.version))
            {
                let ignored = policy.ignore.iter().find(|i| i.key == a.id);
                let level = match (ignored, &a.informational) {
                    (Some(_), _) => Level::Ignored,
                    (None, Some(kind)) if policy.warn.contains(kind) => Level::Warning,
                    (None, _) => Level::Error,
                };
                findings.push(Finding {
                    level,
                    lock: l,
                    package: p,
                    cause: Cause::Advisory(a),
                    note: ignored.map(|i| i.reason.as_str()),
                });
            }
        }
    }
    findings.sort_by_key(|f| f.level);

    for f in &findings {
        println!();
        print_finding(f, &locks[f.lock], &args.locks[f.lock]);
    }
    let mut stale = 0;
    for entry in &policy.ignore {
        let used = findings
            .iter()
            .any(|f| matches!(f.cause, Cause::Advisory(a) if a.id == entry.key));
        if !used {
            stale += 1;
            println!(
                "\nwarning: policy [[ignore]] {} matches nothing in these lock files: remove it",
                entry.key
            );
        }
    }

    let count = |level| findings.iter().filter(|f| f.level == level).count();
    let errors = count(Level::Error);
    let mut kinds: Vec<String> = Vec::new();
    for f in findings.iter().filter(|f| f.level == Level::Error) {
        let kind = match f.cause {
            Cause::Advisory(a) => a.kind().to_owned(),
            Cause::Denied(_) => "denied crate".to_owned(),
        };
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    println!();
    println!(
        "{} error(s){}, {} warning(s), {} ignored",
        errors,
        if kinds.is_empty() {
            String::new()
        } else {
            format!(" ({})", kinds.join(", "))
        },
        count(Level::Warning) + stale,
        count(Level::Ignored),
    );
    if errors > 0 {
        let policy = args
            .policy
            .as_ref()
            .map_or("the policy file".into(), |p| p.display().to_string());
        println!(
            "fix: move to a version the advisory lists as patched (`cargo update -p NAME`, or raise the \
             requirement in Cargo.toml for a semver-incompatible release) or drop the crate; only when \
             the advisory cannot apply here, add an [[ignore]] entry with the reason to {policy}"
        );
    }
    Ok(errors == 0)
}

fn print_finding(f: &Finding, lock: &Lockfile, lock_path: &std::path::Path) {
    let package = &lock.packages[f.package];
    let label = match f.level {
        Level::Error => "error",
        Level::Warning => "warning",
        Level::Ignored => "ignored",
    };
    let chain: Vec<String> = lock
        .chain_to_root(f.package)
        .iter()
        .map(|&i| format!("{} {}", lock.packages[i].name, lock.packages[i].version))
        .collect();
    match f.cause {
        Cause::Denied(entry) => {
            println!(
                "{label}: {} {} in {}: denied crate",
                package.name,
                package.version,
                lock_path.display()
            );
            println!("  reason:   {}", entry.reason);
        }
        Cause::Advisory(a) => {
            let mut kind = a.kind().to_owned();
            if !a.categories.is_empty() {
                kind = format!("{kind}: {}", a.categories.join(", "));
            }
            println!(
                "{label}: {} {} in {}: {} ({kind})",
                package.name,
                package.version,
                lock_path.display(),
                a.id
            );
            println!("  title:    {}", a.title);
            let patched = if a.versions.patched.is_empty() {
                "none (no fixed release: replace the crate)".to_owned()
            } else {
                a.versions.patched.join(" | ")
            };
            println!("  patched:  {patched}");
            if !a.versions.unaffected.is_empty() {
                println!("  never affected: {}", a.versions.unaffected.join(" | "));
            }
            if !a.os.is_empty() || !a.arch.is_empty() {
                println!(
                    "  only on:  {}",
                    [a.os.join(", "), a.arch.join(", ")].join(" ").trim()
                );
            }
            if let Some(cvss) = &a.cvss {
                println!("  cvss:     {cvss}");
            }
            if !a.aliases.is_empty() {
                println!("  aliases:  {}", a.aliases.join(", "));
            }
            if let Some(url) = &a.url {
                println!("  url:      {url}");
            }
            println!("  advisory: https://rustsec.org/advisories/{}.html", a.id);
        }
    }
    if chain.len() > 1 {
        println!("  via:      {}", chain.join(" <- "));
    }
    if let Some(note) = f.note {
        println!("  ignored because: {note}");
    }
}
