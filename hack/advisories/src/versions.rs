//! Which versions an advisory affects, with RustSec's semantics: an advisory lists the version
//! requirements that are `patched` and those that were never affected (`unaffected`); every other
//! version is affected. Each requirement is read as an interval of versions ordered by semver
//! precedence, as the `rustsec` crate (cargo-audit) does when it turns them into OSV ranges: a
//! pre-release such as `1.3.0-rc.1` is inside `>= 1.2.5`, unlike Cargo's dependency resolution.

use semver::{BuildMetadata, Comparator, Op, Prerelease, Version, VersionReq};
use std::cmp::Ordering;

/// One end of an interval of versions.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Bound {
    Unbounded,
    Inclusive(Version),
    Exclusive(Version),
}

/// The versions one `patched` or `unaffected` requirement covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    start: Bound,
    end: Bound,
}

impl Range {
    /// Reads a requirement as the `rustsec` crate accepts it: at most one lower and one upper
    /// bound (`>= 1.2.3, < 1.3.0`), or a single `^`, `~`, `=` or bare version. Wildcards and any
    /// other shape are refused, as cargo-audit refuses them.
    pub fn parse(text: &str) -> Result<Range, String> {
        let req =
            VersionReq::parse(text).map_err(|e| format!("version requirement {text:?}: {e}"))?;
        let only = |what: &str| -> Result<(), String> {
            if req.comparators.len() == 1 {
                Ok(())
            } else {
                Err(format!(
                    "version requirement {text:?}: {what} must be alone in its requirement"
                ))
            }
        };
        if req.comparators.is_empty() || req.comparators.len() > 2 {
            return Err(format!(
                "version requirement {text:?}: want one or two comparators"
            ));
        }
        let mut start = Bound::Unbounded;
        let mut end = Bound::Unbounded;
        for c in &req.comparators {
            let v = comparator_version(c);
            match c.op {
                Op::Greater | Op::GreaterEq => {
                    if start != Bound::Unbounded {
                        return Err(format!("version requirement {text:?}: two lower bounds"));
                    }
                    start = if c.op == Op::Greater {
                        Bound::Exclusive(v)
                    } else {
                        Bound::Inclusive(v)
                    };
                }
                Op::Less | Op::LessEq => {
                    if end != Bound::Unbounded {
                        return Err(format!("version requirement {text:?}: two upper bounds"));
                    }
                    end = if c.op == Op::Less {
                        Bound::Exclusive(v)
                    } else {
                        Bound::Inclusive(v)
                    };
                }
                Op::Exact => {
                    only("an exact version (=)")?;
                    start = Bound::Inclusive(v.clone());
                    end = Bound::Inclusive(v);
                }
                Op::Caret => {
                    only("a caret requirement (^, or a bare version)")?;
                    let upper = match (c.major, c.minor, c.patch) {
                        (0, Some(0), Some(patch)) => Version::new(0, 0, patch + 1),
                        (0, Some(minor), _) => Version::new(0, minor + 1, 0),
                        (major, _, _) => Version::new(major + 1, 0, 0),
                    };
                    start = Bound::Inclusive(v);
                    end = Bound::Exclusive(lowest_prerelease(upper));
                }
                Op::Tilde => {
                    only("a tilde requirement (~)")?;
                    let upper = match c.minor {
                        Some(minor) => Version::new(c.major, minor + 1, 0),
                        None => Version::new(c.major + 1, 0, 0),
                    };
                    start = Bound::Inclusive(v);
                    end = Bound::Exclusive(lowest_prerelease(upper));
                }
                _ => {
                    return Err(format!(
                        "version requirement {text:?}: unsupported operator in {c}"
                    ));
                }
            }
        }
        Ok(Range { start, end })
    }

    /// Whether `version` is inside this interval (build metadata ignored, as semver says).
    pub fn contains(&self, version: &Version) -> bool {
        let after_start = match &self.start {
            Bound::Unbounded => true,
            Bound::Inclusive(s) => precedence(version, s) != Ordering::Less,
            Bound::Exclusive(s) => precedence(version, s) == Ordering::Greater,
        };
        let before_end = match &self.end {
            Bound::Unbounded => true,
            Bound::Inclusive(e) => precedence(version, e) != Ordering::Greater,
            Bound::Exclusive(e) => precedence(version, e) == Ordering::Less,
        };
        after_start && before_end
    }
}

/// An advisory's `[versions]`: a version is affected when no requirement of either list covers it
/// (so an advisory with both lists empty affects every version).
#[derive(Clone, Debug, Default)]
pub struct Versions {
    pub patched: Vec<String>,
    pub unaffected: Vec<String>,
    ranges: Vec<Range>,
}

impl Versions {
    pub fn new(patched: Vec<String>, unaffected: Vec<String>) -> Result<Versions, String> {
        let ranges = patched
            .iter()
            .chain(&unaffected)
            .map(|r| Range::parse(r))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Versions {
            patched,
            unaffected,
            ranges,
        })
    }

    pub fn affects(&self, version: &Version) -> bool {
        !self.ranges.iter().any(|r| r.contains(version))
    }
}

/// A comparator's version with missing parts as zeros (`>= 0.17` is `>= 0.17.0`), as `rustsec`.
fn comparator_version(c: &Comparator) -> Version {
    Version {
        major: c.major,
        minor: c.minor.unwrap_or(0),
        patch: c.patch.unwrap_or(0),
        pre: c.pre.clone(),
        build: BuildMetadata::EMPTY,
    }
}

/// `2.0.0-0`, the lowest version of the 2.0.0 series: `^1.2` stops before any 2.0.0 pre-release.
fn lowest_prerelease(mut v: Version) -> Version {
    v.pre = Prerelease::new("0").unwrap_or(Prerelease::EMPTY);
    v
}

/// Semver precedence: `Version`'s `Ord` also orders build metadata, which precedence ignores.
fn precedence(a: &Version, b: &Version) -> Ordering {
    (a.major, a.minor, a.patch)
        .cmp(&(b.major, b.minor, b.patch))
        .then_with(|| a.pre.cmp(&b.pre))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    fn affects(patched: &[&str], unaffected: &[&str], version: &str) -> bool {
        let own = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        Versions::new(own(patched), own(unaffected))
            .unwrap()
            .affects(&v(version))
    }

    #[test]
    fn at_least_patched() {
        assert!(affects(&[">= 0.41.0"], &[], "0.38.4"));
        assert!(affects(&[">= 0.41.0"], &[], "0.40.99"));
        assert!(!affects(&[">= 0.41.0"], &[], "0.41.0"));
        assert!(!affects(&[">= 0.41.0"], &[], "1.0.0"));
        // no space after the operator, as some advisories write it
        assert!(!affects(&[">=0.4.20"], &[], "0.4.45"));
        assert!(affects(&[">=0.4.20"], &[], "0.4.19"));
    }

    #[test]
    fn backported_fixes_leave_gaps() {
        // tokio RUSTSEC-2023-0001
        let patched = [">= 1.18.4, < 1.19.0", ">= 1.20.3, < 1.21.0", ">= 1.23.1"];
        let unaffected = ["< 1.7.0"];
        assert!(!affects(&patched, &unaffected, "1.6.0"));
        assert!(affects(&patched, &unaffected, "1.7.0"));
        assert!(affects(&patched, &unaffected, "1.18.3"));
        assert!(!affects(&patched, &unaffected, "1.18.4"));
        assert!(affects(&patched, &unaffected, "1.19.0"));
        assert!(!affects(&patched, &unaffected, "1.20.9"));
        assert!(affects(&patched, &unaffected, "1.22.0"));
        assert!(affects(&patched, &unaffected, "1.23.0"));
        assert!(!affects(&patched, &unaffected, "1.54.1"));
    }

    #[test]
    fn bare_and_caret_versions_cover_their_series() {
        // hyper RUSTSEC-2021-0020: a bare version is a caret requirement
        let patched = [">= 0.14.3", "0.13.10", "0.12.36"];
        let unaffected = ["< 0.12.0"];
        assert!(!affects(&patched, &unaffected, "0.11.9"));
        assert!(affects(&patched, &unaffected, "0.12.35"));
        assert!(!affects(&patched, &unaffected, "0.12.36"));
        assert!(!affects(&patched, &unaffected, "0.13.12"));
        assert!(affects(&patched, &unaffected, "0.13.9"));
        assert!(affects(&patched, &unaffected, "0.14.2"));
        assert!(!affects(&patched, &unaffected, "1.12.0"));
        // caret with a space after the operator, and caret above 1.0
        assert!(!affects(&["^ 0.3.1", ">= 0.4.2"], &[], "0.3.9"));
        assert!(affects(&["^ 0.3.1", ">= 0.4.2"], &[], "0.4.1"));
        assert!(!affects(&["^1.1.1", ">= 2.0.1"], &[], "1.9.0"));
        assert!(affects(&["^1.1.1", ">= 2.0.1"], &[], "2.0.0"));
        assert!(affects(&["^1.1.1", ">= 2.0.1"], &[], "2.0.0-rc.1"));
        assert!(!affects(&["^0.0.3"], &[], "0.0.3"));
        assert!(affects(&["^0.0.3"], &[], "0.0.4"));
        assert!(!affects(&["~1.2.3"], &[], "1.2.9"));
        assert!(affects(&["~1.2.3"], &[], "1.3.0"));
        assert!(!affects(&["=1.2.3"], &[], "1.2.3"));
        assert!(affects(&["=1.2.3"], &[], "1.2.4"));
    }

    #[test]
    fn no_ranges_means_every_version() {
        // serde_yml RUSTSEC-2025-0068: patched = []
        assert!(affects(&[], &[], "0.0.12"));
        assert!(affects(&[], &[], "99.0.0"));
        // ring RUSTSEC-2025-0010: only old versions
        assert!(!affects(&[], &[">= 0.17"], "0.17.14"));
        assert!(affects(&[], &[">= 0.17"], "0.16.20"));
    }

    #[test]
    fn prereleases_by_precedence() {
        // rustls-webpki RUSTSEC-2026-0098
        let patched = [">= 0.103.12, < 0.104.0-alpha.1", ">= 0.104.0-alpha.6"];
        assert!(affects(&patched, &[], "0.103.11"));
        assert!(!affects(&patched, &[], "0.103.17"));
        assert!(!affects(&patched, &[], "0.104.0-alpha.0"));
        assert!(affects(&patched, &[], "0.104.0-alpha.1"));
        assert!(affects(&patched, &[], "0.104.0-alpha.5"));
        assert!(!affects(&patched, &[], "0.104.0-alpha.6"));
        assert!(!affects(&patched, &[], "0.104.0"));
        // a pre-release after a patched version is patched (Cargo's matching would say otherwise)
        assert!(!affects(&[">= 1.2.5"], &[], "1.3.0-rc.1"));
        assert!(affects(&[">= 1.2.5"], &[], "1.2.5-rc.1"));
        assert!(!affects(&[], &["< 0.102.0-alpha.0"], "0.101.9"));
        assert!(affects(&[], &["< 0.102.0-alpha.0"], "0.102.0-alpha.0"));
    }

    #[test]
    fn build_metadata_is_ignored() {
        assert!(!affects(&[">= 1.2.1"], &[], "1.2.1+spec-1.1.0"));
        assert!(!affects(&[], &["<= 1.2.1"], "1.2.1+spec-1.1.0"));
        assert!(affects(&[], &["< 1.2.1"], "1.2.1+spec-1.1.0"));
    }

    #[test]
    fn exclusive_bounds() {
        assert!(!affects(&["> 1.0.0"], &[], "1.0.1"));
        assert!(affects(&["> 1.0.0"], &[], "1.0.0"));
        assert!(!affects(&[], &["<= 0.2.1"], "0.2.1"));
        assert!(affects(&[], &["<= 0.2.1"], "0.2.2"));
    }

    #[test]
    fn unsupported_requirements_are_errors() {
        for bad in [
            "*",
            "1.*",
            ">= 1.0, >= 2.0",
            "< 1.0, <= 2.0",
            "^1.0, < 3.0",
            "=1.0, < 2.0",
            "not a version",
        ] {
            assert!(Range::parse(bad).is_err(), "{bad} should be refused");
        }
    }
}
