#!/usr/bin/env bash
# `make wheelhouse`: the wheels the image installs, offline, in exactly the locked versions.
#
#   dist/wheelhouse/requirements.txt  uv.lock's runtime packages (no dev tools), with hashes,
#                                     markers already decided for the image's Python
#   dist/wheelhouse/*.whl             those wheels, and agentrun's own
#
# The markers are decided here for the image (Python 3.11.2, Debian bookworm's), not for the
# host: redis needs async-timeout below 3.11.3, which a host on a newer 3.11 would leave out.
# Env: UV (the pinned uv), PY (a Python with `packaging`, default .venv/bin/python),
#      IMAGE_PYTHON (default 3.11.2).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${UV:?set UV to the pinned uv (make wheelhouse does)}"
PY="${PY:-.venv/bin/python}"
IMAGE_PYTHON="${IMAGE_PYTHON:-3.11.2}"
OUT=dist/wheelhouse
log() { printf '[wheelhouse %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

rm -rf "$OUT" && mkdir -p "$OUT"
"$UV" export --frozen --no-dev --no-emit-project --format requirements.txt --quiet -o "$OUT/all.txt"
"$PY" - "$OUT/all.txt" "$IMAGE_PYTHON" > "$OUT/requirements.txt" <<'PYEOF'
"""Keep the requirements whose marker holds on the image (Linux, CPython IMAGE_PYTHON)."""
import sys

from packaging.markers import Marker

path, version = sys.argv[1], sys.argv[2]
env = {
    "python_version": ".".join(version.split(".")[:2]),
    "python_full_version": version,
    "sys_platform": "linux",
    "platform_system": "Linux",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
# uv writes one requirement per entry: "name==ver ; marker \" then "    --hash=..." lines.
entries: list[list[str]] = []
for line in open(path):
    if line.startswith("#") or not line.strip():
        continue
    if line.startswith(" "):
        if entries and not line.lstrip().startswith("#"):
            entries[-1].append(line)
        continue
    entries.append([line])
for entry in entries:
    head = entry[0].rstrip(" \\\n")
    name, _, marker = head.partition(" ; ")
    if marker and not Marker(marker).evaluate(env):
        continue
    print(name + " \\")
    print("".join(entry[1:]).rstrip(" \\\n"))
PYEOF
rm "$OUT/all.txt"
log "downloading $(grep -c '==' "$OUT/requirements.txt") locked wheels for Python $IMAGE_PYTHON"
# The host is the image's platform (linux x86_64, glibc >= the wheels' manylinux, cp311).
PIP=("$(dirname "$UV")/pip")
"${PIP[@]}" download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --require-hashes -r "$OUT/requirements.txt" -d "$OUT" >&2
log "building agentrun's own wheel"
"$UV" build --wheel --quiet --out-dir "$OUT" . >&2
ls "$OUT"/agentrun-*.whl >/dev/null
log "$(ls "$OUT"/*.whl | wc -l) wheels in $OUT"
