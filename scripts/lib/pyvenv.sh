# Sourced by the check scripts: a Python venv in target/py with scripts/requirements.txt,
# (re)installed only when the requirements change. Sets PY and PYBIN.
ensure_pyvenv() {
    local venv=target/py req=scripts/requirements.txt stamp
    stamp="$venv/.requirements.sha256"
    if [[ ! -x "$venv/bin/python" ]]; then
        rm -rf "$venv"
        python3 -m venv "$venv" || { echo "cannot create a Python venv in $venv (python3 -m venv)" >&2; return 1; }
    fi
    if [[ ! -f "$stamp" ]] || ! sha256sum --check --status "$stamp" 2>/dev/null; then
        if ! timeout 600 "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
            -r "$req" >"$venv/pip.log" 2>&1; then
            echo "pip install -r $req failed:" >&2
            tail -20 "$venv/pip.log" >&2
            return 1
        fi
        sha256sum "$req" >"$stamp"
    fi
    PY="$venv/bin/python"
    PYBIN="$venv/bin"
}
