#!/usr/bin/env bash
# The module graph runs one way: `http` sits on `worker`, which sits on `rules`; `rules` does no
# I/O. And a default build (what `cargo build --release` ships) compiles no test scaffolding.
#  1. src/worker and src/rules never import crate::http;
#  2. src/http reaches the worker through its interface (`worker::WorkerControl`), never into
#     the planner's or the pusher's files;
#  3. src/rules imports no I/O module of this crate (store, worker, marketo, sim, app, service,
#     config, register, demo, the Dataverse Web API client) and no I/O crate;
#  4. the library built without features compiles none of store::suite, sim::pg, sim::process,
#     sim::scenario (read from the compiler's own list of source files, its dep-info).
set -euo pipefail
cd "$(cd "$(dirname "$0")/.." && pwd -P)"

fail=0

# Prints `file: offending path` for each Rust file under $1 whose code (comments stripped) names
# one of the crate paths in the regex $2, in `crate::x`, `super::..::x` or `use crate::{.., x}`.
imports() {
  local dir=$1 modules=$2
  find "$dir" -name '*.rs' -print0 | xargs -0 perl -0777 -ne '
    my $modules = q{'"$modules"'};
    s{//[^\n]*}{}g;            # line comments (doc comments included)
    s{/\*.*?\*/}{}gs;          # block comments
    while (/\bcrate::((?:$modules)\b(?:::\w+)*)/g) { print "$ARGV: crate::$1\n" }
    while (/\bcrate::\{([^}]*)\}/g) {
      my $group = $1;
      while ($group =~ /(?:^|[\s,{])((?:$modules)\b(?:::\w+)*)/g) { print "$ARGV: crate::{$1}\n" }
    }'
}

found=$( { imports src/worker 'http'; imports src/rules 'http'; } || true)
if [ -n "$found" ]; then
  echo "check-layering: src/worker and src/rules must not import crate::http:"
  echo "$found" | sed 's/^/  /'
  fail=1
fi

found=$(imports src/http 'worker::(?:planner|pusher)' || true)
if [ -n "$found" ]; then
  echo "check-layering: src/http must use the worker's interface (crate::worker::WorkerControl), not its internals:"
  echo "$found" | sed 's/^/  /'
  fail=1
fi

found=$(imports src/rules 'store|worker|marketo|sim|app|service|config|register|demo|dynamics::webapi' || true)
io_crates=$(grep -rnE '\b(sqlx|reqwest|tokio|axum|rusqlite|hyper|tower|tower_http)::|\bstd::(fs|net|process|env)\b' src/rules || true)
if [ -n "$found$io_crates" ]; then
  echo "check-layering: src/rules is pure domain logic and must not reach I/O:"
  { [ -z "$found" ] || echo "$found"; [ -z "$io_crates" ] || echo "$io_crates"; } | sed 's/^/  /'
  fail=1
fi

# The library without features, as `cargo build --release` builds it: its dep-info lists every
# source file the compiler read.
artifact=$(cargo check --locked --lib --message-format=json 2>/dev/null \
  | jq -r 'select(.reason == "compiler-artifact" and .target.name == "oppsync" and (.target.kind | index("lib"))) | .filenames[] | select(endswith(".rmeta"))' \
  | tail -n 1)
depinfo="${artifact%.rmeta}.d"
depinfo="${depinfo/\/liboppsync-//oppsync-}"
if [ -z "$artifact" ] || [ ! -f "$depinfo" ]; then
  echo "check-layering: could not find the dep-info of the default library build (${depinfo:-none})"
  fail=1
else
  scaffolding=$(tr ' ' '\n' <"$depinfo" | grep -E 'src/(store/suite|sim/pg|sim/process|sim/scenario)\.rs:?$' | sed 's/:$//' | sort -u || true)
  if [ -n "$scaffolding" ]; then
    echo "check-layering: the default build compiles test scaffolding (put it behind the \`testing\` feature):"
    echo "$scaffolding" | sed 's/^/  /'
    fail=1
  fi
fi

if [ "$fail" -ne 0 ]; then
  exit 1
fi
echo "check-layering: ok (worker and rules do not import http; http uses the worker's interface; rules does no I/O; no test scaffolding in the default build)"
