#!/usr/bin/env bash
# The whole test suite: what the README's second quick-start command and CI run.
set -euo pipefail
cd "$(cd "$(dirname "$0")/.." && pwd -P)"

scripts/ensure-postgres.sh
# Offline checks of the Dockerfile, the Kubernetes manifests and the OpenAPI document.
for check in scripts/check-*.sh; do
  [ -e "$check" ] || continue
  echo "== $check"
  "$check"
done
echo "== cargo test --locked (compiles first: cargo prints each crate it builds)"
cargo test --locked
echo "== reliability harness, short mode"
# Reliability harness, short mode: SIGKILLs under load, injected faults, hostile input.
cargo test --locked --bench harness -- --mode short
