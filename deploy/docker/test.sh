#!/usr/bin/env bash
# Build the image, then check what it promises: under 50 MB, a non-root user, no
# shell, a healthy service on a read-only root with every capability dropped, a
# clean stop on SIGTERM, and JSON logs.
#   test.sh IMAGE:TAG
set -euo pipefail

IMAGE=${1:?usage: test.sh IMAGE:TAG}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LIMIT=$((50 * 1000 * 1000)) # bytes; `docker images` counts MB as 10^6 bytes
NAME=optiinfra-test-$$
LOG=$(mktemp)
docker() { bash "$HERE/dockerd.sh" "$@"; }
# -v: the state volume goes with the container.
trap 'docker rm -f -v "$NAME" >/dev/null 2>&1 || true; rm -f "$LOG"' EXIT

failures=0
pass() { echo "PASS  $*"; }
fail() { echo "FAIL  $*"; failures=$((failures + 1)); }
check() { # check DESCRIPTION COMMAND...
  local what=$1
  shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

t0=$(now)
if ! bash "$HERE/build.sh" "$IMAGE"; then
  echo "FAIL: the image did not build"
  exit 1
fi
build_time=$(since "$t0")
echo

size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
size_mb=$(awk -v s="$size" 'BEGIN { printf "%.1f", s / 1e6 }')
check "image size $size_mb MB is under 50 MB" test "$size" -lt "$LIMIT"

user=$(docker image inspect -f '{{.Config.User}}' "$IMAGE")
check "image user '$user' is not root" test -n "$user" -a "${user%%:*}" != 0 -a "${user%%:*}" != root

no_shell() { ! docker run --rm --entrypoint sh "$IMAGE" -c true >/dev/null 2>&1; }
check "image has no shell" no_shell

# The service's port is not published: the private engine has no bridge. Everything
# that talks HTTP runs inside the container, with the image's own python3.
t0=$(now)
docker run -d --name "$NAME" --read-only --cap-drop ALL \
  --security-opt no-new-privileges "$IMAGE" >/dev/null
status=starting
deadline=$((SECONDS + 60))
while [[ $status == starting ]] && ((SECONDS < deadline)); do
  sleep 0.5
  status=$(docker inspect -f '{{.State.Health.Status}}' "$NAME")
  [[ $(docker inspect -f '{{.State.Running}}' "$NAME") == true ]] || status=exited
done
healthy_time=$(since "$t0")
check "health status '$status' after $healthy_time s (read-only root)" test "$status" = healthy

reply=$(docker exec "$NAME" python3 -c "import http.client as h
c = h.HTTPConnection('127.0.0.1', 8080, timeout=5)
c.request('GET', '/health')
r = c.getresponse()
print(r.status, r.read().decode())" 2>&1 || true)
echo "      GET /health -> $reply"
check "GET /health answers 200 with status healthy" \
  python3 -c 'import json, sys
code, _, body = sys.argv[1].partition(" ")
sys.exit(code != "200" or json.loads(body).get("status") != "healthy")' "$reply"

uid=$(docker exec "$NAME" python3 -c 'import os; print(os.getuid())' 2>&1 || true)
check "service runs as uid $uid" test "$uid" -gt 0 2>/dev/null

t0=$(now)
docker stop "$NAME" >/dev/null
stop_time=$(since "$t0")
code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
check "exit code $code after docker stop (${stop_time} s)" test "$code" = 0

# Every line JSON; start, listen and drain logged; no error, and no complaint about
# the plugin cache (it must have been written at build time).
docker logs "$NAME" >"$LOG" 2>&1
check "logs are JSON lines with start, listen and drain, and no error" python3 - "$LOG" <<'EOF'
import json, sys

problems, messages = [], []
for line in filter(str.strip, open(sys.argv[1])):
    try:
        event = json.loads(line)
    except ValueError:
        problems.append(f"not JSON: {line.strip()}")
        continue
    messages.append(str(event.get("message", "")))
    if event.get("level") in ("error", "critical") or "plugin cache" in messages[-1]:
        problems.append(f"unexpected: {line.strip()}")
for wanted in ("Starting OptiInfra Orchestrator", "Server starting", "drained"):
    if not any(wanted in message for message in messages):
        problems.append(f"missing: {wanted}")
print("".join(f"      {problem}\n" for problem in problems), end="")
sys.exit(bool(problems))
EOF
((failures == 0)) || sed 's/^/      log: /' "$LOG"

echo
echo "image $IMAGE: $size_mb MB, built in $build_time s, healthy after $healthy_time s," \
  "stopped in $stop_time s"
if ((failures)); then
  echo "FAIL: $failures check(s) failed"
  exit 1
fi
echo "PASS: all checks passed"
