#!/usr/bin/env bash
# Makes sure a Docker engine answers and prints the DOCKER_HOST to use (the only line on stdout).
#
# Idempotent. In order:
#   1. an engine already answering on $DOCKER_HOST (or the default socket) is used as it is;
#   2. else our private engine, if it is already running, is used;
#   3. else Debian's docker.io is installed when `dockerd` is missing (a `docker` CLI may exist
#      without an engine), and a private dockerd is started in the background with its own data
#      root and socket under $CTRLMESH_DOCKER_DIR (default /var/lib/ctrlmesh-docker).
# The private engine runs without iptables (the machine may not allow it) and with the vfs
# storage driver (works on any filesystem, overlay-in-overlay included); published ports are
# served by docker-proxy on 127.0.0.1.
#
# CTRLMESH_DOCKER_SWARM=1 also makes the engine a single-node swarm manager (for the swarm
# provider).
set -euo pipefail

DIR=${CTRLMESH_DOCKER_DIR:-/var/lib/ctrlmesh-docker}
SOCK="$DIR/docker.sock"
PRIVATE="unix://$SOCK"

log() { echo "docker-up: $*" >&2; }

answers() {
  # `docker info` through the given host; the CLI negotiates down to an older engine's API.
  DOCKER_HOST="$1" timeout 10 docker info --format '{{.ServerVersion}}' >/dev/null 2>&1
}

swarm_ready() {
  [ "${CTRLMESH_DOCKER_SWARM:-0}" = "1" ] || return 0
  local state
  state=$(DOCKER_HOST="$1" docker info --format '{{.Swarm.LocalNodeState}}' 2>/dev/null || true)
  if [ "$state" != "active" ]; then
    log "initialising a single-node swarm on $1"
    DOCKER_HOST="$1" docker swarm init --advertise-addr 127.0.0.1 >/dev/null 2>&1 || {
      log "swarm init failed"
      return 1
    }
  fi
}

use() {
  swarm_ready "$1"
  echo "$1"
  exit 0
}

ensure_cli() {
  if ! command -v docker >/dev/null 2>&1 || ! command -v dockerd >/dev/null 2>&1; then
    log "installing Debian's docker.io (engine missing)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends docker.io >&2
  fi
}

if command -v docker >/dev/null 2>&1; then
  current=${DOCKER_HOST:-unix:///var/run/docker.sock}
  if answers "$current"; then use "$current"; fi
  if answers "$PRIVATE"; then use "$PRIVATE"; fi
fi

ensure_cli
if answers "$PRIVATE"; then use "$PRIVATE"; fi

mkdir -p "$DIR/data" "$DIR/exec"
# A stale pid file or socket from a killed engine would stop the new one from starting.
if [ -f "$DIR/docker.pid" ] && ! kill -0 "$(cat "$DIR/docker.pid")" 2>/dev/null; then
  rm -f "$DIR/docker.pid" "$SOCK"
fi
if [ ! -f "$DIR/docker.pid" ]; then
  log "starting a private dockerd on $PRIVATE (log: $DIR/dockerd.log)"
  # setsid: the engine outlives this script and is not tied to the caller's terminal.
  setsid dockerd \
    --iptables=false --ip6tables=false --storage-driver=vfs \
    --data-root "$DIR/data" --exec-root "$DIR/exec" --pidfile "$DIR/docker.pid" \
    -H "$PRIVATE" >"$DIR/dockerd.log" 2>&1 </dev/null &
fi

for _ in $(seq 1 120); do
  if answers "$PRIVATE"; then use "$PRIVATE"; fi
  sleep 0.5
done
log "the private dockerd did not answer; last log lines:"
tail -n 30 "$DIR/dockerd.log" >&2 || true
exit 1
