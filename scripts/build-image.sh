#!/usr/bin/env bash
# Build the agentrun image without Docker and without a container registry:
#   1. a Debian bookworm base (debootstrap, python3 + venv), cached by name under
#      ~/.cache/agentrun/ as an image archive, so only the first build pays ~1 minute;
#   2. the wheelhouse of agentrun and its dependencies (make wheelhouse);
#   3. buildah bud of ./Dockerfile on that base, saved as a docker-archive tarball that
#      `ctr -n k8s.io images import` (the local node) or `kind load image-archive` can load.
# Usage: scripts/build-image.sh [IMAGE] [OUTPUT.tar]    Prints the tarball path.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE="${1:-localhost/agentrun:dev}"
OUT="${2:-.work/images/agentrun.tar}"
CACHE="${AGENTRUN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/agentrun}"
BASE_NAME=localhost/agentrun-base:bookworm-py3
BASE_TAR="$CACHE/images/agentrun-base-bookworm-py3.tar"
STORAGE=(--storage-driver vfs)
log() { printf '[image %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

scripts/install-deps.sh image

if ! buildah "${STORAGE[@]}" inspect --type image "$BASE_NAME" >/dev/null 2>&1; then
  if [ -f "$BASE_TAR" ]; then
    log "loading the cached base image $BASE_TAR"
    buildah "${STORAGE[@]}" pull -q "docker-archive:$BASE_TAR" >/dev/null
    buildah "${STORAGE[@]}" tag "$(buildah "${STORAGE[@]}" images -q | head -1)" "$BASE_NAME"
  else
    root=$(mktemp -d)
    log "debootstrap bookworm (minbase + python3, venv) into $root (about a minute)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$root" http://deb.debian.org/debian >&2
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    log "committing the base image $BASE_NAME"
    ctr=$(buildah "${STORAGE[@]}" from scratch)
    buildah "${STORAGE[@]}" copy "$ctr" "$root" / >/dev/null
    buildah "${STORAGE[@]}" config --cmd '["python3"]' "$ctr"
    buildah "${STORAGE[@]}" commit -q "$ctr" "$BASE_NAME" >/dev/null
    buildah "${STORAGE[@]}" rm "$ctr" >/dev/null
    rm -rf "$root"
    mkdir -p "$(dirname "$BASE_TAR")"
    buildah "${STORAGE[@]}" push -q "$BASE_NAME" "docker-archive:$BASE_TAR:$BASE_NAME"
  fi
fi

log "wheelhouse"
make -s wheelhouse >&2
log "buildah bud $IMAGE"
buildah "${STORAGE[@]}" bud -q --build-arg "BASE_IMAGE=$BASE_NAME" -t "$IMAGE" . >&2
mkdir -p "$(dirname "$OUT")"
rm -f "$OUT"
buildah "${STORAGE[@]}" push -q "$IMAGE" "docker-archive:$OUT:$IMAGE"
log "image $IMAGE: $(du -h "$OUT" | cut -f1) as $OUT"
echo "$OUT"
