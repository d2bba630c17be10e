#!/usr/bin/env bash
# The deployment, end to end (`make compose-check`): builds the images, brings docker-compose.yml
# up, drives it through the API from this host, and tears it down. Run as root on a Debian
# machine with no image registry in reach:
#
#  1. Docker: installs Debian's docker.io, docker-compose and debootstrap when missing; starts
#     dockerd when none answers, without touching the host's network
#     (--iptables=false --ip6tables=false --bridge=none; the stack gets a user-defined bridge).
#  2. A base image: local/debian:bookworm, made with debootstrap when missing.
#  3. The images, built with host networking: mmbatch-web and mmbatch-worker (Dockerfile), and
#     redis and postgres from Debian's packages (docker/compose.local-services.yml), since their
#     official images cannot be pulled. pip reaches the package index with this host's CA bundle,
#     given to the builder stages as a BuildKit secret (never in a layer: checked below).
#  4. The stack: redis, postgres, migrate, web, worker-cpu, the model worker (worker-gpu with a
#     GPU; without one docker/compose.cpu.yml swaps it for worker-model on the CPU), beat and
#     Flower, as project "mmbatch-check" on ports of its own; waits until each is healthy.
#  5. scripts/compose_check_api.py: trains on the sample and classifies through the API from the
#     host, restarts the model worker mid-job, checks every item was processed exactly once,
#     the results, /metrics and Flower; then kills the model worker (SIGKILL) mid-job, with the
#     stale-job sweeper made quick (docker/compose.check-sweep.yml), and checks the job still
#     completes with every item processed once.
#  6. Tears the stack down (volumes too); the images and the build cache stay for the next run.
#
# Settings (environment): MMBATCH_CHECK_KEEP=1 leaves the stack up; MMBATCH_CHECK_BASE (default
# local/debian:bookworm); MMBATCH_CHECK_CA (default /etc/ssl/certs/ca-certificates.crt, skipped
# when absent); MMBATCH_CHECK_UNLABELLED (items of the classify job, default 400); DOCKER (the
# client; Debian's /usr/bin/docker by default, since it builds with BuildKit without buildx).
# Logs: var/compose-check/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/var/compose-check
mkdir -p "$OUT"

PROJECT=mmbatch-check
TAG=${MMBATCH_TAG:-latest}
BASE=${MMBATCH_CHECK_BASE:-local/debian:bookworm}
CA=${MMBATCH_CHECK_CA:-/etc/ssl/certs/ca-certificates.crt}
UNLABELLED=${MMBATCH_CHECK_UNLABELLED:-400}
KEEP=${MMBATCH_CHECK_KEEP:-0}
CHECK_START=$(date +%s.%N)

say() { printf '%s\n' "$*"; }
fail() { say "  FAILED  $*" >&2; exit 1; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(date +%s.%N)"; }
# step NAME COMMAND...: runs it, then prints "ok NAME seconds".
step() {
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  "$@"
  say "$(printf '  ok  %-62s %7s s' "$name" "$(elapsed "$t0")")"
}

# ---- 1. Docker ----
install_tools() {
  local missing=()
  [ -x /usr/bin/docker ] || command -v docker >/dev/null || missing+=(docker.io)
  [ -x /usr/sbin/dockerd ] || missing+=(docker.io)
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  [ "${#missing[@]}" -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || fail "missing ${missing[*]} and not root to install them"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${missing[@]}" >"$OUT/apt.log" 2>&1 \
    || { apt-get update -qq >>"$OUT/apt.log" 2>&1 \
         && apt-get install -y -qq "${missing[@]}" >>"$OUT/apt.log" 2>&1; } \
    || fail "apt-get install ${missing[*]} failed (see $OUT/apt.log)"
}
pick_client() {
  if [ -z "${DOCKER:-}" ]; then
    # A client of Docker 23 or newer builds with BuildKit only through the buildx plugin, which
    # Debian does not package; Debian's own client (20.10) has BuildKit built in.
    if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
  fi
  export DOCKER_BUILDKIT=1
}
start_daemon() {
  if "$DOCKER" info >/dev/null 2>&1; then
    say "      dockerd already running"
    return 0
  fi
  [ "$(id -u)" = 0 ] || fail "no Docker daemon answers and not root to start one"
  say "      starting dockerd (log: $OUT/dockerd.log)"
  setsid nohup dockerd --iptables=false --ip6tables=false --bridge=none \
    >"$OUT/dockerd.log" 2>&1 < /dev/null &
  for _ in $(seq 1 60); do
    "$DOCKER" info >/dev/null 2>&1 && return 0
    sleep 1
  done
  fail "dockerd did not answer within 60 s (see $OUT/dockerd.log)"
}

# ---- 2. the base ----
make_base() {
  if "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
    say "      $BASE already there"
    return 0
  fi
  [ "$BASE" = local/debian:bookworm ] || fail "$BASE is missing (only local/debian:bookworm is made here)"
  local rootfs; rootfs=$(mktemp -d "$OUT/rootfs.XXXXXX")
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian \
    >"$OUT/debootstrap.log" 2>&1 || fail "debootstrap failed (see $OUT/debootstrap.log)"
  # what debootstrap downloaded is no part of the base: every image runs apt-get update itself
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | "$DOCKER" import - "$BASE" >/dev/null
  rm -rf "$rootfs"
}

# ---- 3. the images ----
image_id() { "$DOCKER" image inspect -f '{{.Id}}' "$1" 2>/dev/null || true; }
build() {  # build LOG IMAGE CONTEXT [docker build options]
  local log=$1 image=$2 context=$3; shift 3
  local secret=() before
  [ -s "$CA" ] && secret=(--secret "id=pip_ca,src=$CA")
  before=$(image_id "$image")
  "$DOCKER" build --progress=plain --network host "${secret[@]}" --build-arg "BASE=$BASE" \
    -t "$image" "$@" "$context" >"$OUT/$log" 2>&1 \
    || { tail -n 30 "$OUT/$log" >&2; fail "building $image failed (see $OUT/$log)"; }
  # the image this tag named before is left untagged: drop it (its shared layers stay)
  if [ -n "$before" ] && [ "$before" != "$(image_id "$image")" ]; then
    "$DOCKER" rmi "$before" >/dev/null 2>&1 || true
  fi
}
check_images() {
  # The web image has no torch; no final image's history names the CA secret; non-root users.
  "$DOCKER" run --rm --network none "mmbatch-web:$TAG" python3 -c \
    "import importlib.util as u; assert u.find_spec('torch') is None, 'torch in the web image'" \
    || fail "mmbatch-web:$TAG has torch"
  "$DOCKER" run --rm --network none "mmbatch-worker:$TAG" python3 -c "import torch, models" \
    || fail "mmbatch-worker:$TAG cannot import torch and models"
  local image
  for image in "mmbatch-web:$TAG" "mmbatch-worker:$TAG"; do
    if "$DOCKER" history --no-trunc --format '{{.CreatedBy}}' "$image" | grep -qiE 'pip_ca|PIP_CERT|ca-certificates\.crt'; then
      fail "$image: a layer names the build's CA bundle"
    fi
    [ "$("$DOCKER" image inspect -f '{{.Config.User}}' "$image")" = mmbatch ] \
      || fail "$image does not run as the user mmbatch"
  done
}

# ---- 4. the stack ----
has_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 \
    && "$DOCKER" info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia
}
free_port() { python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
compose() { docker-compose -p "$PROJECT" "${FILES[@]}" "$@"; }
service_health() {  # healthy, unhealthy, starting, exited:CODE, or missing
  local id; id=$(compose ps -q "$1" 2>/dev/null | head -n1)
  [ -n "$id" ] || { echo missing; return; }
  "$DOCKER" inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}:{{.State.ExitCode}}{{end}}' "$id"
}
wait_healthy() {
  local deadline=$(( $(date +%s) + 300 )) svc status pending
  while :; do
    pending=()
    for svc in "$@"; do
      status=$(service_health "$svc")
      case $status in
        healthy) ;;
        unhealthy|exited:*|missing) fail "$svc is $status (logs: $OUT/compose.log)";;
        *) pending+=("$svc");;
      esac
    done
    [ "${#pending[@]}" -eq 0 ] && return 0
    [ "$(date +%s)" -lt "$deadline" ] || fail "not healthy within 300 s: ${pending[*]}"
    sleep 2
  done
}
stack_up() {
  compose up -d --no-build >"$OUT/up.log" 2>&1 || { tail -n 30 "$OUT/up.log" >&2; fail "compose up failed"; }
}
migrated() {
  [ "$(service_health migrate)" = exited:0 ] || fail "migrate: $(service_health migrate)"
  compose logs --no-color migrate > "$OUT/migrate.log" 2>&1
}
teardown() {
  local rc=$?
  if [ "${#FILES[@]}" -gt 0 ] && "$DOCKER" info >/dev/null 2>&1; then
    compose logs --no-color --timestamps > "$OUT/compose.log" 2>&1 || true
    if [ "$KEEP" = 1 ]; then
      say "      left up (MMBATCH_CHECK_KEEP=1): web http://127.0.0.1:$WEB_PORT, Flower http://127.0.0.1:$FLOWER_PORT"
      say "      stop it: docker-compose -p $PROJECT ${FILES[*]} down -v"
    else
      local t0; t0=$(date +%s.%N)
      compose down -v --remove-orphans >"$OUT/down.log" 2>&1 || true
      say "$(printf '  ok  %-62s %7s s' "stack torn down (containers, network, volumes)" "$(elapsed "$t0")")"
    fi
  fi
  if [ "$rc" != 0 ]; then
    say "compose check FAILED; service logs: $OUT/compose.log" >&2
  fi
}

FILES=()
trap teardown EXIT
say "mmbatch compose check (logs in $OUT)"
step "docker.io, docker-compose, debootstrap installed" install_tools
pick_client
step "Docker daemon answers ($("$DOCKER" version --format '{{.Client.Version}}' 2>/dev/null) client)" start_daemon
step "base image $BASE" make_base
step "build mmbatch-web (Dockerfile, target web)" build build-web.log "mmbatch-web:$TAG" . --target web
step "build mmbatch-worker (Dockerfile, target worker)" build build-worker.log "mmbatch-worker:$TAG" . --target worker
step "build redis and postgres from Debian's packages" eval \
  'build build-redis.log mmbatch-local/redis:7 docker/redis && build build-postgres.log mmbatch-local/postgres:15 docker/postgres'
step "images: web torch-free, no layer names the CA, user mmbatch" check_images

FILES=(-f docker-compose.yml -f docker/compose.local-services.yml)
MODEL_WORKER=worker-gpu
if ! has_gpu; then
  FILES+=(-f docker/compose.cpu.yml)
  MODEL_WORKER=worker-model
fi
WEB_PORT=$(free_port)
FLOWER_PORT=$(free_port)
export MMBATCH_TAG=$TAG MMBATCH_BASE=$BASE
export MMBATCH_WEB_PORT=127.0.0.1:$WEB_PORT MMBATCH_FLOWER_PORT=127.0.0.1:$FLOWER_PORT
compose down -v --remove-orphans >/dev/null 2>&1 || true  # what an interrupted run left
say "      compose files: ${FILES[*]}; model worker: $MODEL_WORKER"
step "compose up (migrate ran before the services that wait for it)" stack_up
step "migrate exited 0" migrated
step "healthy: redis postgres web worker-cpu $MODEL_WORKER flower" \
  wait_healthy redis postgres web worker-cpu "$MODEL_WORKER" flower
step "beat running" eval '[ "$(service_health beat)" = running:0 ] || fail "beat: $(service_health beat)"'

KEY=""
make_key() {
  KEY=$(compose exec -T web mmbatch keys create --name compose-check | sed -n 's/^key: //p')
  [ -n "$KEY" ] || fail "mmbatch keys create printed no key"
}
make_sample() {
  # sample-kill: other content (another seed), which no feature cache holds, for the kill step
  rm -rf "$OUT/sample" "$OUT/sample-kill"
  "$DOCKER" run --rm --network none --user "$(id -u):$(id -g)" -e HOME=/tmp \
    -v "$OUT:/out" "mmbatch-web:$TAG" sh -c \
    "mmbatch sample /out/sample --unlabelled $UNLABELLED \
     && mmbatch sample /out/sample-kill --seed 1 --train 8 --unlabelled $UNLABELLED" \
    >"$OUT/sample.log" 2>&1 || fail "mmbatch sample failed (see $OUT/sample.log)"
}
step "an API key (mmbatch keys create in the web container)" make_key
step "two samples by the web image ($UNLABELLED unlabelled items each)" make_sample

say "      API checks from the host against http://127.0.0.1:$WEB_PORT"
python3 scripts/compose_check_api.py --url "http://127.0.0.1:$WEB_PORT" \
  --flower "http://127.0.0.1:$FLOWER_PORT" --key "$KEY" --sample "$OUT/sample" \
  --compose "docker-compose -p $PROJECT ${FILES[*]}" --model-worker "$MODEL_WORKER" \
  --kill-sample "$OUT/sample-kill" --sweep-override docker/compose.check-sweep.yml \
  || fail "API checks"

say "image sizes:"
"$DOCKER" image ls --format '  {{.Repository}}:{{.Tag}}  {{.Size}}' \
  | grep -E "mmbatch-(web|worker):$TAG|mmbatch-local/" || true
"$DOCKER" system df --format '  {{.Type}}: {{.Size}}' | grep -E 'Images|Build Cache' || true
say "  (docker builder prune frees the build cache; the next run then builds from scratch)"
say "compose check passed in $(elapsed "$CHECK_START") s"
