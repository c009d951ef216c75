#!/usr/bin/env bash
# Renders each kustomize overlay under deploy/overlays and checks it offline:
#  - rendering with `kubectl kustomize` (kustomize v5, part of this machine image), or a
#    standalone `kustomize build` if that is what is installed;
#  - every document against the Kubernetes OpenAPI schemas, strictly, with kubernetes-validate
#    from PyPI (ships its schemas; installed into target/py) for the oldest supported version
#    (1.30: preStop sleep) and the newest it knows;
#  - oppsync's own rules: probe paths, non-root, read-only root, grace period >= the shutdown
#    grace, replicas, strategy, PDB/HPA, Secret not rendered, NetworkPolicy ports.
# Usage: scripts/check-k8s.sh   (prints one line per overlay on success)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/pyvenv.sh
ensure_pyvenv

K8S_VERSIONS=(1.30.0 1.37.0)
out=target/k8s
mkdir -p "$out"

render() {
    if command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
        timeout 120 kubectl kustomize "$1"
    elif command -v kustomize >/dev/null 2>&1; then
        timeout 120 kustomize build "$1"
    else
        echo "check-k8s: neither kubectl (with kustomize) nor kustomize is installed" >&2
        return 1
    fi
}

status=0
for dir in deploy/overlays/*/; do
    overlay=$(basename "$dir")
    file="$out/$overlay.yaml"
    if ! render "$dir" >"$file" 2>"$out/$overlay.err"; then
        echo "check-k8s: $overlay: rendering failed:" >&2
        cat "$out/$overlay.err" >&2
        status=1
        continue
    fi
    for v in "${K8S_VERSIONS[@]}"; do
        if ! report=$(timeout 120 "$PYBIN/kubernetes-validate" -k "$v" --strict --quiet "$file" 2>&1); then
            echo "check-k8s: $overlay: schema validation against Kubernetes $v failed:" >&2
            echo "$report" >&2
            status=1
        fi
    done
    if ! "$PY" - "$overlay" "$file" <<'PY'
import re, sys, yaml

overlay, path = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(path)) if d]
problems = []
def bad(m): problems.append(m)
def one(kind):
    found = [d for d in docs if d["kind"] == kind]
    if len(found) != 1:
        bad(f"expected one {kind}, found {len(found)}")
        return {}
    return found[0]

# Default shutdown grace from src/config.rs, and the configured one if the ConfigMap sets it.
cfg = open("src/config.rs", encoding="utf-8").read()
m = re.search(r"shutdown_grace_secs:\s*(\d+)", cfg)
grace = int(m.group(1)) if m else 25
maps = [d for d in docs if d["kind"] == "ConfigMap"]
def named(prefix):
    found = [d for d in maps if d["metadata"]["name"].startswith(prefix + "-")]
    if len(found) != 1:
        bad(f"expected one ConfigMap {prefix}-<hash>, found {len(found)}")
        return {}
    return found[0]
if len(maps) != 2:
    bad(f"expected the ConfigMaps oppsync-config and oppsync-instance, found {len(maps)}")
cm = named("oppsync-config")
toml_text = (cm.get("data") or {}).get("oppsync.toml", "")
# The overlay names its Marketo instance and Dataverse environment.
instance = named("oppsync-instance")
for key in ["OPPSYNC__MARKETO__BASE_URL", "OPPSYNC__MARKETO__CLIENT_ID", "OPPSYNC__DATAVERSE__URL",
            "OPPSYNC__DATAVERSE__TENANT_ID", "OPPSYNC__DATAVERSE__CLIENT_ID"]:
    if not (instance.get("data") or {}).get(key):
        bad(f"the overlay's oppsync-instance ConfigMap does not set {key}")
m = re.search(r"^\s*shutdown_grace_secs\s*=\s*(\d+)", toml_text, re.M)
if m:
    grace = max(grace, int(m.group(1)))
if not toml_text:
    bad("the ConfigMap has no oppsync.toml")

dep = one("Deployment")
spec = dep.get("spec", {})
pod = spec.get("template", {}).get("spec", {})
containers = pod.get("containers", [])
main = next((c for c in containers if c["name"] == "oppsync"), None)
if not main:
    bad("no container named oppsync")
    main = {}

def probe_path(p): return (main.get(p) or {}).get("httpGet", {}).get("path")
for probe, want in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")]:
    if probe_path(probe) != want:
        bad(f"{probe} path is {probe_path(probe)!r}, expected {want}")
ports = [p.get("containerPort") for p in main.get("ports", [])]
if ports != [8080]:
    bad(f"container ports {ports}, expected [8080]")

psc = pod.get("securityContext", {})
if psc.get("runAsNonRoot") is not True or not psc.get("runAsUser"):
    bad("pod securityContext must set runAsNonRoot: true and a non-zero runAsUser")
if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
    bad("pod seccompProfile must be RuntimeDefault")
if pod.get("automountServiceAccountToken") is not False:
    bad("automountServiceAccountToken must be false")
for c in containers + pod.get("initContainers", []):
    sc = c.get("securityContext", {})
    if sc.get("readOnlyRootFilesystem") is not True:
        bad(f"{c['name']}: readOnlyRootFilesystem must be true")
    if sc.get("allowPrivilegeEscalation") is not False:
        bad(f"{c['name']}: allowPrivilegeEscalation must be false")
    if sc.get("capabilities", {}).get("drop") != ["ALL"]:
        bad(f"{c['name']}: capabilities must drop ALL")
    if sc.get("runAsUser") == 0 or sc.get("privileged"):
        bad(f"{c['name']}: runs as root or privileged")
    res = c.get("resources", {})
    if not res.get("requests", {}).get("cpu") or not res.get("limits", {}).get("memory"):
        bad(f"{c['name']}: needs cpu requests and a memory limit")
    mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
    if "/tmp" not in mounts:
        bad(f"{c['name']}: /tmp must be a writable volume (read-only root)")
    if any(e.get("name", "").upper().endswith(("SECRET", "KEYS", "PASSWORD")) and "value" in e
           for e in c.get("env", [])):
        bad(f"{c['name']}: a secret-looking env var has a literal value; use the Secret")
    refs = [e.get("secretRef", {}).get("name") for e in c.get("envFrom", [])]
    if "oppsync-secrets" not in refs:
        bad(f"{c['name']}: does not take envFrom the Secret oppsync-secrets")
    if c["name"] == "oppsync":
        maps_used = [e.get("configMapRef", {}).get("name") for e in c.get("envFrom", [])]
        if instance and instance["metadata"]["name"] not in maps_used:
            bad("oppsync: does not take envFrom the overlay's oppsync-instance ConfigMap")

tgp = pod.get("terminationGracePeriodSeconds", 30)
pre = ((main.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
if tgp < grace + pre:
    bad(f"terminationGracePeriodSeconds {tgp} < shutdown grace {grace} + preStop {pre}")
annotations = spec.get("template", {}).get("metadata", {}).get("annotations", {})
if annotations.get("prometheus.io/scrape") != "true" or annotations.get("prometheus.io/path") != "/metrics":
    bad("the pod template lacks the Prometheus scrape annotations")

svc = one("Service")
sp = (svc.get("spec", {}).get("ports") or [{}])[0]
if sp.get("port") != 80 or sp.get("targetPort") not in (8080, "http"):
    bad(f"Service port {sp.get('port')} -> {sp.get('targetPort')}, expected 80 -> 8080")
sel = svc.get("spec", {}).get("selector", {})
labels = spec.get("template", {}).get("metadata", {}).get("labels", {})
if not sel or any(labels.get(k) != v for k, v in sel.items()):
    bad("the Service selector does not match the pod labels")

np = one("NetworkPolicy")
egress_ports = {p.get("port") for r in np.get("spec", {}).get("egress", []) for p in r.get("ports", [])}
ingress_ports = {p.get("port") for r in np.get("spec", {}).get("ingress", []) for p in r.get("ports", [])}
if ingress_ports != {8080}:
    bad(f"NetworkPolicy ingress ports {ingress_ports}, expected {{8080}}")
if not {53, 443} <= egress_ports:
    bad(f"NetworkPolicy egress ports {egress_ports} lack DNS or 443")

if any(d["kind"] == "Secret" for d in docs):
    bad("a Secret is rendered: secrets are created with kubectl, never kept in the repository")
store_env = {e["name"]: e for e in main.get("env", [])}.get("OPPSYNC__STORE__URL", {})

if overlay == "single":
    if spec.get("replicas") != 1:
        bad(f"replicas {spec.get('replicas')}, expected 1")
    if spec.get("strategy", {}).get("type") != "Recreate":
        bad("strategy must be Recreate (SQLite, ReadWriteOnce volume)")
    if not store_env.get("value", "").startswith("sqlite:///var/lib/oppsync/"):
        bad("OPPSYNC__STORE__URL must point at the volume")
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    claim = vols.get("data", {}).get("persistentVolumeClaim", {}).get("claimName")
    pvcs = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    if not claim or claim not in pvcs:
        bad("the data volume is not a rendered PersistentVolumeClaim")
    if "--migrate" not in main.get("args", []):
        bad("single runs `serve --migrate`")
elif overlay == "ha":
    if spec.get("replicas") != 3:
        bad(f"replicas {spec.get('replicas')}, expected 3")
    if spec.get("strategy", {}).get("type") != "RollingUpdate":
        bad("strategy must be RollingUpdate")
    pdb = one("PodDisruptionBudget")
    if pdb.get("spec", {}).get("minAvailable") != 2:
        bad("PodDisruptionBudget minAvailable must be 2")
    hpa = one("HorizontalPodAutoscaler")
    hs = hpa.get("spec", {})
    if (hs.get("minReplicas"), hs.get("maxReplicas")) != (3, 6):
        bad(f"HPA {hs.get('minReplicas')}..{hs.get('maxReplicas')}, expected 3..6")
    if hs.get("scaleTargetRef", {}).get("name") != dep.get("metadata", {}).get("name"):
        bad("the HPA does not target the Deployment")
    if not any(m.get("resource", {}).get("name") == "cpu" for m in hs.get("metrics", [])):
        bad("the HPA does not scale on CPU")
    if store_env.get("valueFrom", {}).get("secretKeyRef", {}).get("name") != "oppsync-secrets":
        bad("OPPSYNC__STORE__URL must come from the Secret")
    inits = pod.get("initContainers", [])
    if not any(c.get("args", [None])[0] == "migrate" for c in inits):
        bad("no initContainer runs `oppsync migrate`")
    if 5432 not in egress_ports:
        bad("NetworkPolicy egress lacks PostgreSQL (5432)")
    for s in (pdb, hpa):
        sel = s.get("spec", {}).get("selector", {}).get("matchLabels", {})
        if s is pdb and any(labels.get(k) != v for k, v in sel.items()):
            bad("the PDB selector does not match the pod labels")
else:
    bad(f"unknown overlay {overlay}: teach scripts/check-k8s.sh what to expect of it")

images = {c.get("image") for c in containers + pod.get("initContainers", [])}
if len(images) != 1 or any(":" not in (i or "") for i in images):
    bad(f"containers use images {images}: one image, with a tag")

if problems:
    print(f"check-k8s: {overlay}: FAILED", file=sys.stderr)
    for p in problems:
        print(f"  - {p}", file=sys.stderr)
    sys.exit(1)
PY
    then
        status=1
        continue
    fi
    echo "check-k8s: $overlay: ok ($(grep -c '^kind:' "$file") objects, Kubernetes ${K8S_VERSIONS[*]})"
done
# The example PrometheusRule (deploy/monitoring): a custom resource of the Prometheus Operator,
# which the Kubernetes schemas above do not know, so its shape is checked here: kind, groups,
# alerts with an expression, a severity and a summary, durations, and metric names that oppsync
# describes (src/service/metrics.rs). tests/it/operations_doc.rs checks the same and the docs.
for rule in deploy/monitoring/*.yaml; do
    [ -e "$rule" ] || continue
    if ! "$PY" - "$rule" <<'PY'
import re, sys, yaml

path = sys.argv[1]
doc = yaml.safe_load(open(path))
described = set(re.findall(r'"(oppsync_[a-z_]+)"', open("src/service/metrics.rs").read()))
problems = []
if doc.get("apiVersion") != "monitoring.coreos.com/v1" or doc.get("kind") != "PrometheusRule":
    problems.append("not a monitoring.coreos.com/v1 PrometheusRule")
if not (doc.get("metadata") or {}).get("name"):
    problems.append("metadata.name missing")
groups = (doc.get("spec") or {}).get("groups") or []
if not groups:
    problems.append("no groups")
names = set()
for g in groups:
    for r in g.get("rules") or []:
        alert = r.get("alert")
        if not alert or alert in names:
            problems.append(f"rule without a unique alert name: {r}")
        names.add(alert)
        expr = r.get("expr") or ""
        if not expr.strip():
            problems.append(f"{alert}: no expr")
        for o, c in ("()", "[]", "{}"):
            if expr.count(o) != expr.count(c):
                problems.append(f"{alert}: unbalanced {o}{c}")
        for m in re.findall(r"\boppsync_[a-z_]+", expr):
            if m not in described:
                problems.append(f"{alert}: {m} is not a metric oppsync describes")
        if "for" in r and not re.fullmatch(r"\d+[smh]", str(r["for"])):
            problems.append(f"{alert}: bad duration {r['for']!r}")
        if (r.get("labels") or {}).get("severity") not in ("critical", "warning", "info"):
            problems.append(f"{alert}: severity must be critical, warning or info")
        if not (r.get("annotations") or {}).get("summary"):
            problems.append(f"{alert}: no summary")
if problems:
    print(f"check-k8s: {path}: FAILED", file=sys.stderr)
    for p in problems:
        print(f"  - {p}", file=sys.stderr)
    sys.exit(1)
print(f"check-k8s: {path}: ok ({len(names)} alerts)")
PY
    then
        status=1
    fi
done
if compgen -G "deploy/base/secret*.yaml" >/dev/null && grep -q "secret" deploy/base/kustomization.yaml \
    && grep -Eq '^\s*-\s*secret' deploy/base/kustomization.yaml; then
    echo "check-k8s: deploy/base/kustomization.yaml lists the secret template as a resource" >&2
    status=1
fi
exit "$status"
