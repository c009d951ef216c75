#!/usr/bin/env bash
# The whole test suite: what the README's second quick-start command and CI run.
set -euo pipefail
cd "$(cd "$(dirname "$0")/.." && pwd -P)"

scripts/ensure-postgres.sh
cargo test --locked
# Reliability harness, short mode: SIGKILLs under load, injected faults, hostile input.
cargo test --locked --bench harness -- --mode short
for check in scripts/check-*.sh; do
  [ -e "$check" ] || continue
  echo "== $check"
  "$check"
done
