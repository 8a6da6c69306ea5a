//! The packages of a Cargo.lock (format versions 1 to 4) and who depends on whom.

use semver::Version;
use std::collections::{HashMap, VecDeque};

/// Sources under which a package comes from crates.io, the registry RustSec's advisories are about.
const CRATES_IO: [&str; 2] = [
    "registry+https://github.com/rust-lang/crates.io-index",
    "sparse+https://index.crates.io/",
];

#[derive(Clone, Debug)]
pub struct Package {
    pub name: String,
    pub version: Version,
    /// From crates.io (as opposed to a path, a git repository or another registry).
    pub crates_io: bool,
}

#[derive(Debug, Default)]
pub struct Lockfile {
    pub packages: Vec<Package>,
    /// For each package, the packages that depend on it.
    dependents: Vec<Vec<usize>>,
}

impl Lockfile {
    pub fn parse(text: &str) -> Result<Lockfile, String> {
        let doc: toml::Table = text.parse().map_err(|e| format!("not TOML: {e}"))?;
        let Some(entries) = doc.get("package") else {
            return Ok(Lockfile::default());
        };
        let entries = entries
            .as_array()
            .ok_or("`package` is not an array of tables")?;
        let mut packages = Vec::new();
        let mut deps = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let field = |key: &str| entry.get(key).and_then(|v| v.as_str());
            let name = field("name").ok_or(format!("package #{} has no name", i + 1))?;
            let version = field("version").ok_or(format!("package {name} has no version"))?;
            let version = Version::parse(version)
                .map_err(|e| format!("package {name}: version {version:?}: {e}"))?;
            let crates_io =
                field("source").is_some_and(|s| CRATES_IO.iter().any(|c| s.starts_with(c)));
            let listed: Vec<String> = match entry.get("dependencies").and_then(|d| d.as_array()) {
                Some(list) => list
                    .iter()
                    .filter_map(|d| d.as_str())
                    .map(str::to_owned)
                    .collect(),
                None => Vec::new(),
            };
            packages.push(Package {
                name: name.to_owned(),
                version,
                crates_io,
            });
            deps.push(listed);
        }

        // "name", "name version" or "name version (source)", as Cargo writes them
        let mut by_name: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, p) in packages.iter().enumerate() {
            by_name.entry(p.name.as_str()).or_default().push(i);
        }
        let mut dependents = vec![Vec::new(); packages.len()];
        for (from, listed) in deps.iter().enumerate() {
            for dep in listed {
                let mut words = dep.split_whitespace();
                let name = words.next().unwrap_or_default();
                let version = words.next();
                let candidates = by_name.get(name).map(Vec::as_slice).unwrap_or_default();
                let to = candidates.iter().copied().find(|&c| match version {
                    Some(v) => packages[c].version.to_string() == v,
                    None => true,
                });
                if let Some(to) = to {
                    dependents[to].push(from);
                }
            }
        }
        Ok(Lockfile {
            packages,
            dependents,
        })
    }

    /// The shortest chain of dependents from package `index` up to a package nothing depends on
    /// (the project's own), starting with `index` itself.
    pub fn chain_to_root(&self, index: usize) -> Vec<usize> {
        let mut came_from: Vec<Option<usize>> = vec![None; self.packages.len()];
        let mut seen = vec![false; self.packages.len()];
        let mut queue = VecDeque::from([index]);
        seen[index] = true;
        while let Some(at) = queue.pop_front() {
            if self.dependents[at].is_empty() {
                let mut chain = vec![at];
                let mut cur = at;
                while let Some(prev) = came_from[cur] {
                    chain.push(prev);
                    cur = prev;
                }
                chain.reverse();
                return chain;
            }
            for &up in &self.dependents[at] {
                if !seen[up] {
                    seen[up] = true;
                    came_from[up] = Some(at);
                    queue.push_back(up);
                }
            }
        }
        vec![index]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCK: &str = r#"
version = 4

[[package]]
name = "app"
version = "0.1.0"
dependencies = ["mid", "leaf 1.0.0"]

[[package]]
name = "mid"
version = "0.2.0"
source = "registry+https://github.com/rust-lang/crates.io-index"
checksum = "00"
dependencies = ["leaf 2.0.0 (registry+https://github.com/rust-lang/crates.io-index)"]

[[package]]
name = "leaf"
version = "1.0.0"
source = "sparse+https://index.crates.io/"

[[package]]
name = "leaf"
version = "2.0.0"
source = "registry+https://github.com/rust-lang/crates.io-index"

[[package]]
name = "forked"
version = "0.1.0"
source = "git+https://example.org/forked#abc"
"#;

    #[test]
    fn packages_and_sources() {
        let lock = Lockfile::parse(LOCK).unwrap();
        let seen: Vec<(&str, String, bool)> = lock
            .packages
            .iter()
            .map(|p| (p.name.as_str(), p.version.to_string(), p.crates_io))
            .collect();
        assert_eq!(
            seen,
            [
                ("app", "0.1.0".into(), false),
                ("mid", "0.2.0".into(), true),
                ("leaf", "1.0.0".into(), true),
                ("leaf", "2.0.0".into(), true),
                ("forked", "0.1.0".into(), false),
            ]
        );
    }

    #[test]
    fn chains_follow_versions() {
        let lock = Lockfile::parse(LOCK).unwrap();
        assert_eq!(lock.chain_to_root(3), [3, 1, 0]);
        assert_eq!(lock.chain_to_root(2), [2, 0]);
        assert_eq!(lock.chain_to_root(0), [0]);
    }

    #[test]
    fn refuses_a_broken_lock() {
        assert!(Lockfile::parse("[[package]]\nname = \"x\"\n").is_err());
        assert!(Lockfile::parse("[[package]]\nname = \"x\"\nversion = \"one\"\n").is_err());
        assert!(Lockfile::parse("[[package]\n").is_err());
    }
}
