#!/usr/bin/env bash
# The dependency-advisory check, run by .ci/run after hack/test.sh: Cargo.lock (and the checker's
# own lock file) against the snapshot of the RustSec advisory database beside the repository,
# ../shared/advisory-db, or $ADVISORY_DB (the live database cannot be downloaded here). Fails when
# an advisory that is not withdrawn affects a locked version, or a crate that
# hack/advisories/policy.toml denies is locked. The checker is a small package of its own
# (hack/advisories/, built in target/advisories, outside the operator's build), linted and tested
# here before it runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

db=${ADVISORY_DB:-$PWD/../shared/advisory-db}
if [ ! -d "$db/crates" ]; then
  echo "hack/advisories.sh: no advisory database at $db (want crates/<name>/RUSTSEC-*.md): set ADVISORY_DB to a RustSec advisory-db checkout" >&2
  exit 2
fi
export ADVISORY_DB=$db

tool=(--locked --manifest-path hack/advisories/Cargo.toml --target-dir target/advisories)
cargo fmt --manifest-path hack/advisories/Cargo.toml -- --check
cargo clippy "${tool[@]}" --all-targets -- -D warnings
cargo test "${tool[@]}"
cargo run "${tool[@]}" --quiet -- --db "$db" --policy hack/advisories/policy.toml \
  Cargo.lock hack/advisories/Cargo.lock
