#!/usr/bin/env bash
# The whole test suite from a bare Debian 12 machine, as root: installs what is missing, starts the
# lab (libvirtd with QEMU/KVM, a loopback sshd, two namespace hosts), checks formatting and lints,
# then runs every test. README's test command; .ci/run runs it, then the dependency-advisory check.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

hack/lab.sh install
hack/lab.sh up
hack/lab.sh hosts 2
eval "$(hack/lab.sh env)"
# qemu+ssh runs the `ssh` program, whose configuration must know the hosts' keys: the lab's
# wrapper points it at the lab's known_hosts with strict checking (tests only)
export PATH="$KVM_LAB/ssh/bin:$PATH"

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
# benches are run on purpose (cargo bench), not as tests; clippy still checks them
cargo test --locked --lib --bins --tests
