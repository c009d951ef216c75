#!/usr/bin/env bash
# Builds the container image's build stage the way Docker would, without Docker (no engine, no
# registry to pull the base images from): the build context is exactly the tracked files that
# .dockerignore lets through (Docker's own matching rules: last pattern wins, `!` re-includes,
# `**`, a pattern matching a parent directory matches what is under it); the build stage's
# WORKDIR, COPY and RUN run in order in a scratch root (target/docker-check/root, kept between
# runs so that cargo's work is reused), its absolute paths mapped under that root; then every
# `COPY --from=<build stage>` source of the later stages must exist.
#
# The cargo invocations are the Dockerfile's own (`--release --locked`); only the release
# profile's optimisation is turned down through CARGO_PROFILE_RELEASE_* here, to keep CI short:
# what is checked is that the image's sources, manifest and lock file build, not the code
# generation.
# Usage: scripts/check-image-build.sh   (from anywhere; prints one line on success)
set -euo pipefail
cd "$(cd "$(dirname "$0")/.." && pwd -P)"

python3 - <<'PY'
import os, re, shutil, subprocess, sys

ROOT = os.path.abspath("target/docker-check/root")

def fail(msg):
    print(f"check-image-build: FAILED: {msg}", file=sys.stderr)
    sys.exit(1)

# ---- .dockerignore, as moby's patternmatcher reads it
def compile_pattern(p):
    out, i = "^", 0
    while i < len(p):
        c = p[i]
        if c == "*":
            if i + 1 < len(p) and p[i + 1] == "*":
                i += 1
                if i + 1 == len(p):
                    out += ".*"
                elif p[i + 1] == "/":
                    out += "(.*/)?"
                    i += 1
                else:
                    out += ".*"
            else:
                out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c in ".$+()^{}|":
            out += "\\" + c
        elif c == "\\" and i + 1 < len(p):
            i += 1
            out += re.escape(p[i])
        else:
            out += c
        i += 1
    return re.compile(out + "$")

patterns = []
if os.path.exists(".dockerignore"):
    for line in open(".dockerignore", encoding="utf-8"):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = line.startswith("!")
        if exclusion:
            line = line[1:].strip()
        line = os.path.normpath(line).lstrip("/")
        if line in (".", ""):
            continue
        patterns.append((exclusion, compile_pattern(line)))

def ignored(path):
    parts = path.split("/")
    parents = ["/".join(parts[: i + 1]) for i in range(len(parts) - 1)]
    matched = False
    for exclusion, rx in patterns:
        if exclusion != matched:
            continue
        hit = rx.match(path) is not None or any(rx.match(d) for d in parents)
        if hit:
            matched = not exclusion
    return matched

tracked = subprocess.run(["git", "ls-files", "-z"], capture_output=True, check=True).stdout.decode().split("\0")
context = sorted(f for f in tracked if f and os.path.isfile(f) and not ignored(f))
if not context:
    fail(".dockerignore leaves nothing in the build context")

# ---- Dockerfile -> stages and instructions (scripts/lib/dockerfile.py)
sys.path.insert(0, "scripts/lib")
from dockerfile import parse
stages, instrs, _, unreadable = parse("Dockerfile")
if unreadable or not stages:
    fail("; ".join(unreadable) or "the Dockerfile has no FROM")
build_stage = 0
build_name = stages[build_stage]["name"] or "0"

def from_build(rest):
    m = re.search(r"--from=(\S+)", rest)
    return m is not None and m.group(1).lower() in (build_name, "0")

# Absolute directories the build stage uses: its WORKDIRs and what later stages copy out of it.
absolute = set()
for st, kw, rest in instrs:
    if st == build_stage and kw == "WORKDIR" and rest.startswith("/"):
        absolute.add(rest.strip("/").split("/")[0])
    if kw == "COPY" and from_build(rest):
        srcs = [w for w in rest.split() if not w.startswith("--")][:-1]
        absolute.update(s.strip("/").split("/")[0] for s in srcs if s.startswith("/"))

def mapped(path):
    return os.path.join(ROOT, path.lstrip("/")) if path.startswith("/") else path

def map_command(cmd):
    for top in sorted(absolute, key=len, reverse=True):
        cmd = re.sub(r"(?<![\w./-])/" + re.escape(top) + r"(?=/|\s|$|;|&)", ROOT + "/" + top, cmd)
    return cmd

# A fresh root, keeping cargo's target directory of the earlier runs.
os.makedirs(ROOT, exist_ok=True)
for entry in os.listdir(ROOT):
    if entry != "cargo-target":
        p = os.path.join(ROOT, entry)
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
ctx = os.path.join(ROOT, "context")
for f in context:
    os.makedirs(os.path.dirname(os.path.join(ctx, f)) or ctx, exist_ok=True)
    shutil.copy2(f, os.path.join(ctx, f))

env = dict(os.environ)
env.update({
    "CARGO_PROFILE_RELEASE_OPT_LEVEL": "0",
    "CARGO_PROFILE_RELEASE_DEBUG": "0",
    "CARGO_PROFILE_RELEASE_LTO": "false",
    "CARGO_PROFILE_RELEASE_CODEGEN_UNITS": "256",
    "CARGO_PROFILE_RELEASE_INCREMENTAL": "true",
    "CARGO_TERM_PROGRESS_WHEN": "never",
})
env.pop("CARGO_TARGET_DIR", None)
cwd = ROOT
for st, kw, rest in instrs:
    if st != build_stage:
        continue
    if kw == "WORKDIR":
        cwd = mapped(rest) if rest.startswith("/") else os.path.join(cwd, rest)
        os.makedirs(cwd, exist_ok=True)
        # cargo's output survives between runs of this check.
        target = os.path.join(ROOT, "cargo-target")
        os.makedirs(target, exist_ok=True)
        if not os.path.exists(os.path.join(cwd, "target")):
            os.symlink(target, os.path.join(cwd, "target"))
    elif kw == "COPY":
        if "--from" in rest:
            fail(f"COPY {rest}: the build stage copies from another stage; this check does not follow it")
        words = [w for w in rest.split() if not w.startswith("--")]
        *srcs, dest = words
        dest_abs = mapped(dest) if dest.startswith("/") else os.path.join(cwd, dest)
        for src in srcs:
            src = os.path.normpath(src)
            matches = [f for f in context if src == "." or f == src or f.startswith(src + "/")]
            if not matches:
                fail(f"COPY {src}: not in the build context (untracked, or excluded by .dockerignore)")
            for f in matches:
                if f == src:  # a file
                    out = os.path.join(dest_abs, os.path.basename(f)) if dest.endswith("/") or len(srcs) > 1 or os.path.isdir(dest_abs) else dest_abs
                else:  # a directory: its contents go into dest
                    out = os.path.join(dest_abs, os.path.relpath(f, src))
                os.makedirs(os.path.dirname(out), exist_ok=True)
                shutil.copy2(os.path.join(ctx, f), out)
    elif kw == "RUN":
        cmd = map_command(rest)
        print(f"check-image-build: RUN {rest[:100]}{'…' if len(rest) > 100 else ''}", flush=True)
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=cwd, env=env)
        if done.returncode != 0:
            fail(f"RUN {rest[:200]} exited {done.returncode} in the image's build context")
    elif kw in ("FROM", "ENV", "ARG", "LABEL", "USER", "SHELL"):
        pass
    else:
        fail(f"{kw} in the build stage: not understood by this check")

missing = []
for st, kw, rest in instrs:
    if kw == "COPY" and from_build(rest):
        for src in [w for w in rest.split() if not w.startswith("--")][:-1]:
            if not os.path.exists(mapped(src)):
                missing.append(src)
if missing:
    fail(f"the build stage does not produce {', '.join(missing)} (COPY --from={build_name})")
print(f"check-image-build: ok ({len(context)} files in the context; the build stage ran and produced every COPY --from source)")
PY
