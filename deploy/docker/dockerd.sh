#!/usr/bin/env bash
# A private Docker engine for building and testing the image.  It keeps its state
# under $DOCKER_STATE and leaves the host's network alone (no iptables rules, no
# bridge), so it can run beside anything else on the machine.
#
#   dockerd.sh              start the engine if it is not running
#   dockerd.sh ARGS...      start it if needed, then run `docker ARGS...` against it
#   dockerd.sh stop         stop it (images are kept for the next start)
#   dockerd.sh purge        stop it and delete its state, images included
# With no bridge, `-p` publishes nothing: reach a container with `--network host`
# (the service then listens on the host's port 8080), or from inside (docker exec).
set -euo pipefail

STATE=${DOCKER_STATE:-/tmp/optiinfra-docker}
HOST="unix://$STATE/docker.sock"
# No registry is reachable: BuildKit would try to pull its frontend, the legacy
# builder does not.
export DOCKER_BUILDKIT=0

stop() {
  if [[ -f $STATE/dockerd.pid ]]; then
    local pid
    pid=$(<"$STATE/dockerd.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    rm -f "$STATE/dockerd.pid"
  fi
  # dockerd leaves its network namespace bind-mounted; the exec root cannot be
  # deleted until it is unmounted.
  if mountpoint -q "$STATE/exec/netns/default" 2>/dev/null; then
    umount "$STATE/exec/netns/default"
  fi
  rm -rf --one-file-system "$STATE/exec"
}

case ${1:-} in
  stop) stop; exit 0 ;;
  purge) stop; rm -rf --one-file-system "$STATE"; exit 0 ;;
esac

# /usr/local/bin/docker may be a client alone; the engine comes from Debian.
if ! command -v dockerd >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
fi

if ! docker -H "$HOST" info >/dev/null 2>&1; then
  mkdir -p "$STATE"
  # setsid: the engine outlives this script and a Ctrl-C in the caller's terminal.
  setsid dockerd --data-root "$STATE/root" --exec-root "$STATE/exec" \
    --pidfile "$STATE/dockerd.pid" -H "$HOST" --storage-driver=overlay2 \
    --iptables=false --bridge=none </dev/null >>"$STATE/dockerd.log" 2>&1 &
  for _ in $(seq 60); do
    docker -H "$HOST" info >/dev/null 2>&1 && break
    sleep 0.5
  done
  if ! docker -H "$HOST" info >/dev/null 2>&1; then
    echo "dockerd did not start; last lines of $STATE/dockerd.log:" >&2
    tail -n 20 "$STATE/dockerd.log" >&2
    exit 1
  fi
fi

if (($#)); then
  exec docker -H "$HOST" "$@"
fi
