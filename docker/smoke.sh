#!/usr/bin/env bash
# Smoke test of the deployment with real containers (podman + podman-compose, or Docker Compose):
#   1. build the CPU image (docker/Dockerfile) and, where prom/prometheus cannot be pulled, the
#      Prometheus stand-in (docker/prometheus-standin) under the name docker-compose.yml uses;
#   2. check the Prometheus config and alert rules with promtool (syntax + rule unit tests);
#   3. `compose up` the detector and Prometheus from docker-compose.yml (Grafana is left out: no
#      registry here holds it), with the bundle mounted read-only;
#   4. wait for /readyz and the container healthcheck; POST a clean and a triggered image to
#      /detect and check the flags (clean not flagged, triggered flagged);
#   5. check through Prometheus's HTTP API that the detector is scraped (dede_ series) and the
#      alert rules are loaded; then stop the detector (drain) and tear everything down.
#
#   bash docker/smoke.sh
#
# The bundle: bundles/demo (built by `make serve` or `dede demo`; if it is missing the script builds
# it first, which takes long on a small CPU machine: see docker/README.md). Any other bundle:
# DEDE_SMOKE_BUNDLE=path; the flags are checked when <bundle>-samples/{clean,triggered}.png exist.
# Settings: DEDE_SMOKE_PORT (18000), DEDE_SMOKE_PROM_PORT (19090), DEDE_SMOKE_PROJECT (dedesmoke),
# DEDE_SMOKE_KEEP=1 leaves the stack running for a look; DEDE_SMOKE_RESULT=file.json writes the
# outcome (image size, scores, flags, step timings) as JSON, e.g. docker/smoke-result.json.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PROJECT=${DEDE_SMOKE_PROJECT:-dedesmoke}
PORT=${DEDE_SMOKE_PORT:-18000}
PROM_PORT=${DEDE_SMOKE_PROM_PORT:-19090}
BUNDLE=${DEDE_SMOKE_BUNDLE:-bundles/demo}
IMAGE=localhost/dede:cpu
PROM_IMAGE=$(awk '$1 == "image:" && $2 ~ /prometheus/ {print $2; exit}' docker-compose.yml)
SETUP_PODMAN=$ROOT/../shared/tools/containers/setup-podman.sh

T0=$SECONDS
STEP_T=
TIMINGS=()
step() { # close the previous step's timing, announce the next
  if [ -n "$STEP_T" ]; then TIMINGS+=("$(printf '%5ss  %s' $((SECONDS - STEP_T)) "$STEP_NAME")"); fi
  STEP_T=$SECONDS
  STEP_NAME=$*
  echo "== $*"
}
fail() {
  echo "SMOKE FAILED: $*" >&2
  exit 1
}

# -- container tools ---------------------------------------------------------------------------
if command -v podman >/dev/null && command -v podman-compose >/dev/null; then
  ENGINE=podman
  COMPOSE=(podman-compose -p "$PROJECT")
  export BUILDAH_FORMAT=docker # keep HEALTHCHECK in built images
elif command -v docker >/dev/null && docker compose version >/dev/null 2>&1; then
  ENGINE=docker
  COMPOSE=(docker compose -p "$PROJECT")
elif [ -x "$SETUP_PODMAN" ] && [ "$(id -u)" = 0 ]; then
  echo "== no podman or docker: installing podman with $SETUP_PODMAN"
  bash "$SETUP_PODMAN"
  ENGINE=podman
  COMPOSE=(podman-compose -p "$PROJECT")
  export BUILDAH_FORMAT=docker
else
  fail "needs podman + podman-compose, or docker with the compose plugin (see docker/README.md)"
fi
command -v curl >/dev/null || fail "needs curl"
command -v python3 >/dev/null || fail "needs python3 (to read JSON answers)"

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/dede-smoke.XXXXXX")
cleanup() {
  local status=$?
  if [ "${DEDE_SMOKE_KEEP:-0}" = 1 ]; then
    echo "== DEDE_SMOKE_KEEP=1: stack left running; stop it with: ${COMPOSE[*]} down -v"
    return
  fi
  if [ "$status" != 0 ]; then
    echo "== logs of the failed run" >&2
    "${COMPOSE[@]}" logs --tail 40 detector prometheus >&2 2>/dev/null || true
  fi
  "${COMPOSE[@]}" down -v >/dev/null 2>&1 || true
  rm -rf "$STAGE"
}
trap cleanup EXIT

# -- the bundle --------------------------------------------------------------------------------
step "bundle: $BUNDLE"
if [ ! -f "$BUNDLE/manifest.json" ]; then
  [ "$BUNDLE" = bundles/demo ] || fail "no bundle at $BUNDLE (manifest.json missing)"
  echo "no demo bundle yet: building it with 'dede demo' (about 12 minutes on 2 idle CPU cores; once)"
  make setup >/dev/null
  .venv/bin/dede demo --out bundles/demo
fi
NAME=$(basename "$BUNDLE")
# A copy readable by the container's user (uid 10001, not the host user): exports are private (0700).
cp -r "$BUNDLE" "$STAGE/$NAME"
chmod -R a+rX "$STAGE"
SAMPLES="${BUNDLE%/}-samples"
if [ -f "$SAMPLES/clean.png" ] && [ -f "$SAMPLES/triggered.png" ]; then
  CHECK_FLAGS=1
else
  CHECK_FLAGS=0
  echo "no $SAMPLES/{clean,triggered}.png: flags will be reported, not checked"
  python3 -c "
import struct, zlib, sys
def png(path, value):  # a 32x32 grey PNG, written without any imaging library
    row = b'\x00' + bytes([value]) * 96
    raw = zlib.compress(row * 32)
    chunk = lambda t, d: struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d))
    ihdr = struct.pack('>IIBBBBB', 32, 32, 8, 2, 0, 0, 0)
    open(path, 'wb').write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', raw) + chunk(b'IEND', b''))
png(sys.argv[1], 90); png(sys.argv[2], 200)
" "$STAGE/clean.png" "$STAGE/triggered.png"
  SAMPLES=$STAGE
fi

# -- images ------------------------------------------------------------------------------------
step "build $IMAGE (docker/Dockerfile)"
if [ "$ENGINE" = podman ]; then
  podman build --format docker -q -f docker/Dockerfile -t "$IMAGE" . >/dev/null
else
  docker build -q -f docker/Dockerfile -t "$IMAGE" . >/dev/null
fi
IMAGE_BYTES=$($ENGINE image inspect "$IMAGE" --format '{{.Size}}')
echo "image size: $((IMAGE_BYTES / 1000000)) MB"

step "Prometheus image $PROM_IMAGE"
if $ENGINE image inspect "$PROM_IMAGE" >/dev/null 2>&1; then
  echo "present"
elif $ENGINE pull -q "$PROM_IMAGE" >/dev/null 2>&1; then
  echo "pulled"
else
  echo "cannot pull it here: building the stand-in from Debian's prometheus package"
  $ENGINE build -q -t localhost/dede-prometheus-standin:latest docker/prometheus-standin >/dev/null
  $ENGINE tag localhost/dede-prometheus-standin:latest "$PROM_IMAGE"
fi

step "promtool: config, rules, rule unit tests"
$ENGINE run --rm --entrypoint sh -v "$ROOT/docker/prometheus:/etc/prometheus/dede:ro" "$PROM_IMAGE" -c \
  'cd /etc/prometheus/dede && promtool check config prometheus.yml >/dev/null && promtool check rules alerts.yml >/dev/null && promtool test rules alerts_test.yml' 2>&1 |
  grep -v -e systemd -e '^$' || fail "promtool checks"

# -- the stack ---------------------------------------------------------------------------------
step "compose up: detector + prometheus"
export DEDE_BUNDLES=$STAGE DEDE_BUNDLE_NAME=$NAME DEDE_IMAGE=$IMAGE
export DEDE_PUBLISH=127.0.0.1:$PORT PROMETHEUS_PUBLISH=127.0.0.1:$PROM_PORT
unset DEDE_API_KEY
"${COMPOSE[@]}" down -v >/dev/null 2>&1 || true # leftovers of an interrupted run
"${COMPOSE[@]}" up -d detector prometheus >"$STAGE/compose-up.log" 2>&1 || {
  cat "$STAGE/compose-up.log" >&2
  fail "compose up"
}
DETECTOR=$($ENGINE ps -q --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=detector" | head -1)
[ -n "$DETECTOR" ] || fail "no detector container"

step "wait for the detector to be ready"
URL=http://127.0.0.1:$PORT
for _ in $(seq 1 240); do
  curl -fsS --max-time 2 "$URL/readyz" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -fsS --max-time 2 "$URL/readyz" || fail "detector not ready after 120 s"
echo
# podman schedules no healthchecks without systemd: run the compose healthcheck by hand.
if [ "$ENGINE" = podman ]; then
  podman healthcheck run "$DETECTOR" 2>/dev/null && echo "healthcheck (/readyz in the container): healthy" ||
    fail "container healthcheck"
fi

step "POST clean + triggered images to /detect"
ANSWER=$(curl -fsS --max-time 30 -F "images=@$SAMPLES/clean.png" -F "images=@$SAMPLES/triggered.png" "$URL/detect") ||
  fail "/detect did not answer 200"
python3 - "$CHECK_FLAGS" "$ANSWER" <<'PY' || fail "wrong /detect answer"
import json, sys
check, body = sys.argv[1] == "1", json.loads(sys.argv[2])
images = body["images"]
for name, image in zip(("clean", "triggered"), images):
    print(f"  {name:9s} score {image['score']:.6g}  flagged {image['flagged']}  (threshold {body['threshold']:.6g})")
assert len(images) == 2 and all(isinstance(i["flagged"], bool) for i in images), body
if check:
    assert images[0]["flagged"] is False, "the clean image was flagged"
    assert images[1]["flagged"] is True, "the triggered image was not flagged"
    print("  flags as expected: clean passes, triggered is flagged")
PY

step "Prometheus: detector scraped, alert rules loaded"
PROM=http://127.0.0.1:$PROM_PORT
query() { curl -fsS --max-time 5 --get "$PROM/api/v1/query" --data-urlencode "query=$1" 2>/dev/null; }
scraped=0
for _ in $(seq 1 90); do # DNS discovery refreshes every 10 s, scrapes every 5 s
  if query 'sum(dede_images_total{job="dede"})' | python3 -c '
import json, sys
r = json.load(sys.stdin)["data"]["result"]
sys.exit(0 if r and float(r[0]["value"][1]) >= 2 else 1)' 2>/dev/null; then
    scraped=1
    break
  fi
  sleep 1
done
[ "$scraped" = 1 ] || fail "Prometheus has not scraped the two images from the detector"
query 'count by (__name__) ({__name__=~"dede_.+", job="dede"})' | python3 -c '
import json, sys
names = sorted(r["metric"]["__name__"] for r in json.load(sys.stdin)["data"]["result"])
print(f"  {len(names)} dede_ series names scraped, e.g. {names[:4]}")
assert "dede_images_total" in names and "dede_request_duration_seconds_bucket" in names, names' ||
  fail "dede_ series missing"
query 'up{job="dede"}' | python3 -c '
import json, sys
r = json.load(sys.stdin)["data"]["result"]
print("  targets:", [(x["metric"]["instance"], x["metric"].get("service"), x["value"][1]) for x in r])
assert r and all(x["value"][1] == "1" for x in r), r' || fail "detector target not up"
curl -fsS --max-time 5 "$PROM/api/v1/rules" | python3 -c '
import json, sys
groups = json.load(sys.stdin)["data"]["groups"]
alerts = {r["name"] for g in groups for r in g["rules"] if r["type"] == "alerting"}
print(f"  {len(alerts)} alert rules loaded: {sorted(alerts)}")
need = {"DedeDetectorDown", "DedeLatencyP99High", "DedeFlagRateSpike", "DedeQueueFull", "DedeQueueSaturating"}
assert need <= alerts, need - alerts
broken = {r["name"]: r.get("lastError") for g in groups for r in g["rules"] if r["health"] == "err"}
assert not broken, f"rules failing to evaluate: {broken}"  # "unknown" = not evaluated yet' ||
  fail "alert rules not loaded"

if [ "${DEDE_SMOKE_KEEP:-0}" = 1 ]; then
  echo "SMOKE PASSED in $((SECONDS - T0)) s (stack left running)"
  exit 0
fi

step "stop the detector (SIGTERM: drain, then exit)"
"${COMPOSE[@]}" stop detector >/dev/null 2>&1 || fail "compose stop"
STOP_LOG=$($ENGINE logs "$DETECTOR" 2>&1)
grep -q 'drained: every accepted request answered' <<<"$STOP_LOG" || fail "the detector did not drain on SIGTERM"
grep -q '"message": "stopped"' <<<"$STOP_LOG" || fail "the detector did not stop cleanly"
echo "drained and stopped cleanly"

step "tear down"
"${COMPOSE[@]}" down -v >/dev/null 2>&1
TIMINGS+=("$(printf '%5ss  %s' $((SECONDS - STEP_T)) "$STEP_NAME")")
trap - EXIT
rm -rf "$STAGE"

echo "== timings"
printf '%s\n' "${TIMINGS[@]}"
echo "SMOKE PASSED in $((SECONDS - T0)) s"
if [ -n "${DEDE_SMOKE_RESULT:-}" ]; then
  printf '%s\n' "${TIMINGS[@]}" | python3 -c '
import datetime, json, os, platform, sys
engine, image_bytes, bundle, checked, total, answer, out, commit = sys.argv[1:]
body = json.loads(answer)
steps = [line.strip().split("s  ", 1) for line in sys.stdin if line.strip()]
result = {
    "command": "bash docker/smoke.sh",
    "date": datetime.date.today().isoformat(),
    "engine": engine,
    "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
    "cpu_image_mb": round(int(image_bytes) / 1e6),
    "bundle": body["model_name"] + " " + body["model_version"],
    "threshold": body["threshold"],
    "images": [{"sample": s, "score": i["score"], "flagged": i["flagged"]} for s, i in zip(("clean", "triggered"), body["images"])],
    "flags_checked": checked == "1",
    "steps_s": {name: int(secs) for secs, name in steps},
    "total_s": int(total),
    "commit": commit,
    "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
}
json.dump(result, open(out, "w"), indent=2)
open(out, "a").write("\n")
print(f"result written to {out}")
' "$ENGINE" "$IMAGE_BYTES" "$BUNDLE" "$CHECK_FLAGS" "$((SECONDS - T0))" "$ANSWER" "$DEDE_SMOKE_RESULT" \
    "$(git rev-parse HEAD 2>/dev/null || echo unknown)"
fi
