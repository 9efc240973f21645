#!/usr/bin/env bash
# Builds the test images locally, never pulling from a registry: `docker import` of a tiny rootfs
# holding Debian's busybox-static, serving /www with busybox httpd on port 8080.
#
#   ctrlmesh-test/httpd:v1      index.html says "v1"; /healthz answers 200
#   ctrlmesh-test/httpd:v2      index.html says "v2"; /healthz answers 200
#   ctrlmesh-test/httpd:broken  serves, but has no /healthz (its http health check fails)
#   ctrlmesh-test/httpd:pg      v1 plus `psql` (PostgreSQL 16's, from the pgserver wheel the
#                               venv installs; no TLS in it) with the shared libraries `ldd`
#                               names and the dynamic loader: bound apps' checks connect with it
#
# Every image writes $GREETING (when set) to /www/env.txt at start, so tests can see the
# environment a deploy gave it, and logs each request to stderr.
#
# Usage: DOCKER_HOST=... scripts/test-images.sh   (idempotent: present images are kept)
set -euo pipefail

REPO=ctrlmesh-test/httpd
# Bump when the recipe changes so existing images are rebuilt.
RECIPE=3

log() { echo "test-images: $*" >&2; }

have() {
  [ "$(docker image inspect --format '{{index .Config.Labels "ctrlmesh.recipe"}}' "$1" 2>/dev/null || true)" = "$RECIPE" ]
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)

if have "$REPO:v1" && have "$REPO:v2" && have "$REPO:broken" && have "$REPO:pg"; then
  exit 0
fi

BUSYBOX=/bin/busybox
if ! [ -x "$BUSYBOX" ] || ! "$BUSYBOX" --list 2>/dev/null | grep -qx httpd || ldd "$BUSYBOX" >/dev/null 2>&1; then
  # Debian's busybox-static is a static binary with httpd; the dynamic `busybox` package is not
  # usable inside an empty rootfs.
  export DEBIAN_FRONTEND=noninteractive
  if ! dpkg -s busybox-static >/dev/null 2>&1; then
    log "installing Debian's busybox-static"
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends busybox-static >&2
  fi
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# psql and what it needs at run time, copied into a rootfs: every library `ldd` resolves goes to
# /lib/x86_64-linux-gnu (a default search directory of the loader) under its own name, the
# loader to the path the binary names.
add_psql() {
  local root=$1 psql lib
  psql=$("$ROOT/.venv/bin/python" -c 'import pathlib, pgserver; print(pathlib.Path(pgserver.__file__).parent / "pginstall/bin/psql")' 2>/dev/null)
  [ -x "$psql" ] || { log "no psql in the pgserver wheel at $psql"; exit 1; }
  mkdir -p "$root/lib/x86_64-linux-gnu" "$root/lib64"
  cp "$psql" "$root/bin/psql"
  for lib in $(ldd "$psql" | awk '/=> \// {print $3}'); do
    cp -L "$lib" "$root/lib/x86_64-linux-gnu/$(basename "$lib")"
  done
  local loader
  loader=$(ldd "$psql" | awk '!/=>/ && /\// {print $1}')
  mkdir -p "$root$(dirname "$loader")"
  cp -L "$loader" "$root$loader"
}

build() {
  local tag=$1 content=$2 healthz=$3 extra=${4:-}
  local root="$work/$tag"
  if have "$REPO:$tag"; then
    return
  fi
  mkdir -p "$root/bin" "$root/www" "$root/tmp" "$root/etc"
  cp "$BUSYBOX" "$root/bin/busybox"
  for applet in $("$BUSYBOX" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
  done
  echo "root:x:0:0:root:/:/bin/sh" >"$root/etc/passwd"
  echo "root:x:0:" >"$root/etc/group"
  echo "$content" >"$root/www/index.html"
  if [ "$healthz" = yes ]; then echo ok >"$root/www/healthz"; fi
  if [ "$extra" = psql ]; then add_psql "$root"; fi
  tar -C "$root" -cf "$work/$tag.tar" .
  docker import \
    --change 'ENV PATH=/bin' \
    --change 'EXPOSE 8080' \
    --change "LABEL ctrlmesh.recipe=$RECIPE" \
    --change 'CMD ["/bin/sh", "-c", "[ -z \"$GREETING\" ] || echo \"$GREETING\" > /www/env.txt; echo \"serving on 8080\"; exec httpd -f -v -p 8080 -h /www"]' \
    "$work/$tag.tar" "$REPO:$tag" >/dev/null
  log "built $REPO:$tag"
}

build v1 "ctrlmesh-test v1" yes
build v2 "ctrlmesh-test v2" yes
build broken "ctrlmesh-test broken" no
build pg "ctrlmesh-test v1" yes psql
