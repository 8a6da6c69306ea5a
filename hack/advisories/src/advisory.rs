//! The RustSec advisory database on disk: `crates/<name>/RUSTSEC-*.md`, each file a ```toml
//! front matter block followed by Markdown whose first `# ` heading is the title (the "V3"
//! format the `rustsec` crate reads). The `rust/` collection (std, cargo, rustdoc) is about the
//! toolchain, not about Cargo.lock, and is left out, as cargo-audit does.

use crate::versions::Versions;
use std::fs;
use std::path::{Path, PathBuf};
use toml::{Table, Value};

#[derive(Clone, Debug)]
pub struct Advisory {
    pub id: String,
    pub package: String,
    pub title: String,
    pub url: Option<String>,
    /// `unmaintained`, `unsound`, `notice`...; `None` for a vulnerability.
    pub informational: Option<String>,
    pub withdrawn: bool,
    pub categories: Vec<String>,
    pub cvss: Option<String>,
    pub aliases: Vec<String>,
    /// `[affected] os` / `arch`: where the problem shows (empty: everywhere). Reported, not used
    /// to filter, as cargo-audit does unless told the target.
    pub os: Vec<String>,
    pub arch: Vec<String>,
    /// About the crates.io package of that name (the default), not another registry's.
    pub crates_io: bool,
    pub versions: Versions,
}

pub struct Database {
    /// The date in SNAPSHOT.txt, else its first line.
    pub snapshot: Option<String>,
    pub advisories: Vec<Advisory>,
}

impl Database {
    pub fn load(root: &Path) -> Result<Database, String> {
        let crates = root.join("crates");
        let mut files: Vec<PathBuf> = Vec::new();
        for dir in read_dir_sorted(&crates)? {
            if dir.is_dir() {
                files.extend(
                    read_dir_sorted(&dir)?
                        .into_iter()
                        .filter(|f| f.extension().is_some_and(|e| e == "md")),
                );
            }
        }
        let mut advisories = Vec::with_capacity(files.len());
        for file in &files {
            let text = fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
            advisories
                .push(Advisory::parse(&text).map_err(|e| format!("{}: {e}", file.display()))?);
        }
        if advisories.is_empty() {
            return Err(format!(
                "{}: no advisories (crates/<name>/*.md) found",
                root.display()
            ));
        }
        let snapshot = fs::read_to_string(root.join("SNAPSHOT.txt"))
            .ok()
            .and_then(|s| snapshot_date(&s));
        Ok(Database {
            snapshot,
            advisories,
        })
    }
}

impl Advisory {
    pub fn parse(text: &str) -> Result<Advisory, String> {
        let rest = text
            .strip_prefix("```toml")
            .ok_or("does not start with a ```toml front matter block")?;
        let end = rest
            .find("\n```")
            .ok_or("the ```toml front matter block is not closed")?;
        let front: Table = rest[..end]
            .parse()
            .map_err(|e| format!("front matter: {e}"))?;
        let markdown = rest[end + 4..].trim_start();
        let title = markdown
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# "))
            .map(|t| t.trim().to_owned())
            .ok_or("no `# title` after the front matter")?;

        let advisory = table(&front, "advisory")?.ok_or("no [advisory] table")?;
        let versions = table(&front, "versions")?.ok_or("no [versions] table")?;
        let affected = table(&front, "affected")?;
        let id = string(advisory, "id")?.ok_or("no advisory.id")?;
        let package = string(advisory, "package")?.ok_or("no advisory.package")?;
        let crates_io = match string(advisory, "source")? {
            None => true,
            Some(s) => {
                s.contains("github.com/rust-lang/crates.io-index") || s.contains("index.crates.io")
            }
        };
        Ok(Advisory {
            title,
            url: string(advisory, "url")?,
            informational: string(advisory, "informational")?.map(|s| s.trim().to_owned()),
            withdrawn: advisory.contains_key("withdrawn"),
            categories: strings(advisory, "categories")?,
            cvss: string(advisory, "cvss")?,
            aliases: strings(advisory, "aliases")?,
            os: affected
                .map(|a| strings(a, "os"))
                .transpose()?
                .unwrap_or_default(),
            arch: affected
                .map(|a| strings(a, "arch"))
                .transpose()?
                .unwrap_or_default(),
            crates_io,
            versions: Versions::new(
                strings(versions, "patched")?,
                strings(versions, "unaffected")?,
            )
            .map_err(|e| format!("{id}: {e}"))?,
            id,
            package,
        })
    }

    /// What the advisory is, for people: `vulnerability` or its informational kind.
    pub fn kind(&self) -> &str {
        self.informational.as_deref().unwrap_or("vulnerability")
    }
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut paths = entries
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    paths.sort();
    Ok(paths)
}

fn table<'a>(t: &'a Table, key: &str) -> Result<Option<&'a Table>, String> {
    match t.get(key) {
        None => Ok(None),
        Some(Value::Table(inner)) => Ok(Some(inner)),
        Some(_) => Err(format!("`{key}` is not a table")),
    }
}

fn string(t: &Table, key: &str) -> Result<Option<String>, String> {
    match t.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("`{key}` is not a string")),
    }
}

fn strings(t: &Table, key: &str) -> Result<Vec<String>, String> {
    match t.get(key) {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or(format!("`{key}` has an item that is not a string"))
            })
            .collect(),
        Some(_) => Err(format!("`{key}` is not an array")),
    }
}

/// `2026-08-21` out of SNAPSHOT.txt's prose; its first line when there is no date.
fn snapshot_date(text: &str) -> Option<String> {
    let date = text
        .split(|c: char| !(c.is_ascii_digit() || c == '-'))
        .find(|w| {
            let b = w.as_bytes();
            b.len() == 10
                && b[4] == b'-'
                && b[7] == b'-'
                && w.chars().filter(char::is_ascii_digit).count() == 8
        });
    date.map(str::to_owned).or_else(|| {
        text.lines()
            .next()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use semver::Version;

    const SERDE_YML: &str = r#"```toml
[advisory]
id = "RUSTSEC-2025-0068"
package = "serde_yml"
date = "2025-09-11"
url = "https://github.com/rustsec/advisory-db/issues/2395"
informational = "unsound"  
aliases = ["GHSA-hhw4-xg65-fp2x"]

[versions]
patched = []
```

# serde_yml crate is unsound and unmaintained

Using `serde_yml::ser::Serializer.emitter` can cause a segmentation fault.
"#;

    #[test]
    fn reads_front_matter_and_title() {
        let a = Advisory::parse(SERDE_YML).unwrap();
        assert_eq!(a.id, "RUSTSEC-2025-0068");
        assert_eq!(a.package, "serde_yml");
        assert_eq!(a.title, "serde_yml crate is unsound and unmaintained");
        assert_eq!(a.kind(), "unsound");
        assert!(!a.withdrawn);
        assert!(a.crates_io);
        assert_eq!(a.aliases, ["GHSA-hhw4-xg65-fp2x"]);
        assert!(a.versions.affects(&Version::new(0, 0, 12)));
    }

    #[test]
    fn withdrawn_platforms_and_other_registries() {
        let text = "```toml\n[advisory]\nid = \"RUSTSEC-2020-0055\"\npackage = \"x\"\nwithdrawn = \"2020-10-22\"\n\
                    source = \"https://example.org/index\"\n[affected]\nos = [\"windows\"]\n\
                    [affected.functions]\n\"x::f\" = [\"< 1.0.0\"]\n[versions]\npatched = [\">= 1.0.0\"]\n```\n\n# T\n";
        let a = Advisory::parse(text).unwrap();
        assert!(a.withdrawn);
        assert!(!a.crates_io);
        assert_eq!(a.os, ["windows"]);
        assert_eq!(a.kind(), "vulnerability");
    }

    #[test]
    fn refuses_malformed_files() {
        for bad in [
            "# no front matter\n",
            "```toml\n[advisory]\nid = \"X\"\n",
            "```toml\n[advisory]\nid = \"X\"\npackage = \"x\"\n```\n\n# T\n",
            "```toml\n[advisory]\nid = \"X\"\npackage = \"x\"\n[versions]\npatched = [\"1.*\"]\n```\n\n# T\n",
            "```toml\n[advisory]\nid = \"X\"\npackage = \"x\"\n[versions]\npatched = []\n```\n\nno title\n",
        ] {
            assert!(Advisory::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn snapshot_dates() {
        let text = "RustSec advisory database, data files only, snapshot dated 2026-08-21 (the live database...).";
        assert_eq!(snapshot_date(text).as_deref(), Some("2026-08-21"));
        assert_eq!(
            snapshot_date("taken last week\n").as_deref(),
            Some("taken last week")
        );
        assert_eq!(snapshot_date(""), None);
    }
}
