#!/usr/bin/env bash
# Validates openapi/openapi.yaml as OpenAPI 3.1 with an independent validator, then fuzzes the
# running service from the document with schemathesis: no 5xx, and every response's status,
# content type and body as documented. Python tools live in a venv under target/py.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=target/py
if [ ! -x "$VENV/bin/schemathesis" ] || [ ! -x "$VENV/bin/openapi-spec-validator" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "openapi-spec-validator==0.9.0" "schemathesis==4.32.5"
fi

echo "== openapi-spec-validator"
"$VENV/bin/openapi-spec-validator" openapi/openapi.yaml

echo "== schemathesis"
cargo build --example openapi_target
BIN="${CARGO_TARGET_DIR:-target}/debug/examples/openapi_target"
OUT=$(mktemp)
RUST_LOG=warn "$BIN" >"$OUT" 2>"$OUT.log" &
SERVICE_PID=$!
cleanup() { kill -TERM "$SERVICE_PID" 2>/dev/null || true; wait "$SERVICE_PID" 2>/dev/null || true; rm -f "$OUT" "$OUT.log"; }
trap cleanup EXIT
for _ in $(seq 1 100); do grep -q '^TOKEN ' "$OUT" && break; sleep 0.1; done
URL=$(sed -n 's/^URL //p' "$OUT")
TOKEN=$(sed -n 's/^TOKEN //p' "$OUT")
[ -n "$URL" ] && [ -n "$TOKEN" ] || { echo "the service did not start"; cat "$OUT.log"; exit 1; }

"$VENV/bin/schemathesis" run openapi/openapi.yaml \
  --url "$URL" \
  --header "Authorization: Bearer $TOKEN" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --max-examples "${SCHEMATHESIS_MAX_EXAMPLES:-25}" \
  --request-timeout 10 \
  --no-color
