#!/usr/bin/env bash
# Runs every check and test: format, lints, shipped configs, unit and
# integration tests (real PostgreSQL, origin, edge, BIRD in network namespaces),
# the lab smoke run, and the README's seller example against the lab.
# One release build serves the binaries, the tests and the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/../.."

step() { printf '\n== %s\n' "$*"; }

step "format"
cargo fmt --all --check

step "lints"
cargo clippy --release --workspace --all-targets --locked -- -D warnings

step "build"
cargo build --release --workspace --locked

step "region data exported for terraform and ansible is current"
target/release/edgefront-regions export --check

step "terraform (offline: fmt everywhere; init, validate, test of the region logic)"
command -v terraform >/dev/null || { echo "terraform not found (this machine kind ships it in /usr/local/bin)" >&2; exit 1; }
terraform/check.sh

step "ansible lint (production profile) and syntax"
(cd ansible && ansible-lint --offline --profile production -q playbooks/ roles/)

step "shipped configs"
target/release/edge --config edge/edge.example.toml --check-config
target/release/origin --config origin/origin.example.toml --check-config

step "tests"
cargo test --release --workspace --locked --no-fail-fast 2>&1 | tee target/test.log
grep -q "test result: FAILED" target/test.log && exit 1

step "main job smoke run"
# The whole anycast lab (nine regions in network namespaces), with its own prefix.
target/release/edgefront-lab --smoke --prefix "efci$$" | tail -3

step "README's seller example, as written, against the lab"
tests/scripts/readme-example.sh

passed=$(grep -Eo '[0-9]+ passed' target/test.log | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' target/test.log | awk '{s+=$1} END {print s+0}')
echo
echo "$passed passed, $failed failed"
