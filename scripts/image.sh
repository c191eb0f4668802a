#!/usr/bin/env bash
# Build the container image with podman, run it and check it, then run the cpu overlay's pod from its
# own manifests with `podman kube play` and check that too. What it checks, in order:
#   the image builds (from a locally made Debian base where no registry is reachable); the container
#   answers /ready, then the JFK sentence through /asr; `podman stop` within the grace period lets a
#   request in flight finish with its 200; the rendered deploy/k8s/overlays/cpu, played by podman,
#   answers JFK through /asr in the pod; `podman kube down` removes it.
# It reports the image size, the build time and the time to ready, leaves the image in podman's default
# store, prints the image's name as its last line and exits non-zero on any failure. Every port is a
# free loopback port; whatever it started is removed on exit, whatever it did not start is left alone.
#
#   scripts/image.sh                         the default image (CTranslate2, embedded model, no torch)
#   scripts/image.sh --tag NAME              the image's name (default localhost/asr-service:0.1.0-cpu)
#   scripts/image.sh --base IMAGE            build on IMAGE (a Debian with Python 3.11)
#   scripts/image.sh --build-arg KEY=VALUE   passed to podman build (ENGINES=all, TORCH_WHEELS=wheels...)
#   scripts/image.sh --no-kube               without the pod
#
# Podman, not Docker: `podman kube play` needs the image in podman's store. Missing packages (podman,
# buildah, runc, catatonit for the pod's infra container, debootstrap, curl, espeak-ng) are installed
# with apt, as scripts/setup.sh does. The base, when no registry is reachable: debootstrap of Debian
# bookworm (minbase + python3, python3-venv, python3-pip, python-is-python3) from this host's apt
# mirror, imported as localhost/asr-base:bookworm and reused by later runs. pip in the build gets this
# host's CA bundle (ASR_IMAGE_CA_BUNDLE, default /etc/ssl/certs/ca-certificates.crt) as a build secret.
# Where podman cannot start a container with its defaults (runc refusing the default rlimits in a
# sandbox), it writes a containers.conf drop-in (runc, explicit nofile/nproc ulimits) and says so.
set -euo pipefail
cd "$(dirname "$0")/.."

image=localhost/asr-service:0.1.0-cpu base="" kube=1 build_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) image=$2; shift 2 ;;
    --base) base=$2; shift 2 ;;
    --build-arg) build_args+=(--build-arg "$2"); shift 2 ;;
    --no-kube) kube=0; shift ;;
    -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
    *) echo "image.sh: unknown option $1 (see --help)" >&2; exit 1 ;;
  esac
done

LOCAL_BASE=localhost/asr-base:bookworm
REGISTRY_BASE=docker.io/library/python:3.11-slim-bookworm
CA_BUNDLE=${ASR_IMAGE_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
READY_TIMEOUT=${ASR_IMAGE_READY_TIMEOUT:-300}
GRACE=360   # docs/kubernetes.md: docker stop -t 360, longer than gunicorn's graceful_timeout (340 s)
JFK="And so, my fellow Americans, ask not what your country can do for you, ask what you can do for your country."

log() { printf '[image] %s\n' "$*"; }
die() { log "FAILED: $*"; exit 1; }
now() { date +%s.%N; }
since() { python3 -c 'import sys; print(f"{float(sys.argv[2]) - float(sys.argv[1]):.1f}")' "$1" "$(now)"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    die "need root (or sudo) to run: $*"; fi
}

# -- cleanup: only what this run started -----------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/asr-image.XXXXXX")
container="" inflight_pid="" pods_before="" volumes_before="" played=0 deployment="" claimed=""
remove_new_volumes() {  # the manifest's PVC and ConfigMap volumes that did not exist before the play
  local v
  for v in $claimed; do
    grep -qx "$v" <<<"$volumes_before" || ! podman volume exists "$v" || timeout 60 podman volume rm -f "$v" >/dev/null 2>&1
  done
}
new_pods() {  # the pods of the played Deployment that were not there before the play
  local p
  for p in $(podman pod ps -q --no-trunc --filter "name=^$deployment-"); do grep -qx "$p" <<<"$pods_before" || echo "$p"; done
}
cleanup() {
  local rc=$? p v
  set +e
  [ -z "$inflight_pid" ] || kill "$inflight_pid" 2>/dev/null
  [ -z "$container" ] || timeout 60 podman rm -f -v "$container" >/dev/null 2>&1
  # Not `podman kube down`: after a failed play, a pod of the same name may be someone else's. Only
  # the pods and volumes named by the manifest that were not there before the play.
  if [ "$played" = 1 ]; then
    for p in $(new_pods); do timeout 60 podman pod rm -f "$p" >/dev/null 2>&1; done
    remove_new_volumes
  fi
  [ ! -d "$work/rootfs" ] || as_root rm -rf "$work/rootfs"
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# -- tools -----------------------------------------------------------------------------------------
missing=()
for tool in podman buildah runc catatonit curl espeak-ng; do command -v "$tool" >/dev/null || missing+=("$tool"); done
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing with apt: ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
kubectl=.venv/bin/kubectl python=.venv/bin/python
if [ "$kube" = 1 ]; then
  [ -x "$kubectl" ] || kubectl=$(command -v kubectl) || die "kubectl not found (scripts/setup.sh installs it in .venv)"
  [ -x "$python" ] || python=python3
  "$python" -c 'import yaml' 2>/dev/null || die "$python lacks PyYAML (scripts/setup.sh installs it in .venv)"
fi
if command -v docker >/dev/null && timeout 20 docker info >/dev/null 2>&1; then
  log "Docker is running here too; this script builds with podman, whose store podman kube play reads"
fi
log "podman $(podman version --format '{{.Client.Version}}')," \
    "runtime $(podman info --format '{{.Host.OCIRuntime.Name}}')," \
    "cgroup manager $(podman info --format '{{.Host.CgroupManager}}')"

# -- the base --------------------------------------------------------------------------------------
# This host's Debian mirror for bookworm (deb822 .sources or one-line .list), else deb.debian.org.
apt_mirror() {
  { cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk 'BEGIN { RS = "" } {
      uri = ""; bookworm = 0; deb = 0
      for (i = 1; i <= NF; i++) {
        if ($i == "URIs:") uri = $(i + 1)
        if ($i == "Types:") for (j = i + 1; j <= NF && $j !~ /:$/; j++) if ($j == "deb") deb = 1
        if ($i == "Suites:") for (j = i + 1; j <= NF && $j !~ /:$/; j++) if ($j == "bookworm") bookworm = 1
      }
      if (deb && bookworm && uri != "") print uri }'
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '$1 == "deb" {
      i = 2; if ($i ~ /^\[/) while ($i !~ /\]$/) i++; if ($i ~ /\]$/ && $2 ~ /^\[/) i++
      if ($(i + 1) == "bookworm") print $i }'
    echo http://deb.debian.org/debian; } | head -n 1
}

make_base() {
  local mirror started
  mirror=$(apt_mirror) started=$(now)
  command -v debootstrap >/dev/null || export PATH=$PATH:/usr/sbin
  log "no registry reachable: making $LOCAL_BASE with debootstrap (bookworm, minbase) from $mirror"
  as_root debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,python-is-python3 \
      bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log"; die "debootstrap failed (log above)"; }
  as_root rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
  as_root tar -C "$work/rootfs" -c . | podman import -q - "$LOCAL_BASE" >/dev/null || die "podman import failed"
  as_root rm -rf "$work/rootfs"
  log "made $LOCAL_BASE in $(since "$started") s"
}

if [ -n "$base" ]; then
  podman image exists "$base" || timeout 300 podman pull -q "$base" >/dev/null || die "base $base: not here and not pullable"
  log "base: $base (--base)"
elif podman image exists "$LOCAL_BASE"; then
  base=$LOCAL_BASE; log "base: $base (made by an earlier run, reused)"
elif podman image exists "$REGISTRY_BASE" || timeout 120 podman pull -q "$REGISTRY_BASE" >/dev/null 2>&1; then
  base=$REGISTRY_BASE; log "base: $base (from the registry)"
else
  make_base; base=$LOCAL_BASE
fi

# -- podman on this host ---------------------------------------------------------------------------
if [ "$(id -u)" -eq 0 ]; then conf_dir=/etc/containers/containers.conf.d
else conf_dir=${XDG_CONFIG_HOME:-$HOME/.config}/containers/containers.conf.d; fi
conf=$conf_dir/50-asr-image.conf
starts() { timeout 120 podman run --rm --network none "$base" true >"$work/probe.log" 2>&1; }
if ! starts; then
  log "podman cannot start a container with its defaults here: $(tail -n 1 "$work/probe.log")"
  nofile=$(ulimit -Hn) nproc=4096
  [ "$nofile" != unlimited ] || nofile=1048576
  mkdir -p "$conf_dir"
  { echo "# Written by asr-service scripts/image.sh: podman's defaults could not start a container here."
    echo "[containers]"
    echo "default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]"
    if command -v runc >/dev/null; then echo "[engine]"; echo 'runtime = "runc"'; fi; } >"$conf"
  log "configured podman in $conf: runtime runc, ulimits nofile=$nofile nproc=$nproc"
  starts || { cat "$work/probe.log"; die "podman still cannot start a container (see above)"; }
elif [ -f "$conf" ]; then
  log "podman configured by $conf (an earlier run of this script: its defaults failed on this host)"
fi
# Health checks run from systemd timers; without systemd podman logs an error per container instead.
run_opts=()
if [ ! -d /run/systemd/system ]; then
  run_opts+=(--no-healthcheck)
  log "no systemd: the container runs without the image's HEALTHCHECK (this script polls /ready itself)"
fi

# -- build -----------------------------------------------------------------------------------------
build=(podman build --format docker --build-arg "PYTHON_IMAGE=$base" "${build_args[@]}" -t "$image")
if [ -n "$CA_BUNDLE" ] && [ -s "$CA_BUNDLE" ]; then
  build+=(--secret "id=ca-bundle,src=$CA_BUNDLE"); log "pip in the build trusts $CA_BUNDLE (build secret, in no layer)"
fi
log "building $image"
started=$(now)
timeout 3600 "${build[@]}" . >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log"; die "podman build failed (log above)"; }
build_s=$(since "$started")
size=$(podman image inspect --format '{{.Size}}' "$image")
log "built $image in $build_s s: $((size / 1000000)) MB"

# -- speech ----------------------------------------------------------------------------------------
espeak-ng -v en -s 150 -w "$work/jfk.wav" "$JFK"
# A request long enough to be in flight when the stop is sent: the sentence five times (~35 s of audio).
espeak-ng -v en -s 150 -w "$work/long.wav" "$(for _ in 1 2 3 4 5; do printf '%s ' "$JFK"; done)"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# The transcript (JSON from /asr in $1) holds both halves of the sentence, else fail.
check_jfk() {
  python3 - "$1" "$2" <<'EOF' || die "$2: the JFK sentence is not in the transcript"
import json, re, sys
text = json.load(open(sys.argv[1])).get("text", "")
words = " ".join(re.sub(r"[^a-z' ]", " ", text.lower()).split())
ok = "ask not what your country can do for you" in words and "ask what you can do for your country" in words
print(f"[image] {sys.argv[2]}: {' '.join(text.split())[:160]}")
sys.exit(0 if ok else 1)
EOF
}

# /ready on PORT within READY_TIMEOUT seconds (while CONTAINER, if named, runs); prints the seconds
# since STARTED.
wait_ready() {  # wait_ready PORT STARTED [CONTAINER]
  local port=$1 started=$2 deadline=$((SECONDS + READY_TIMEOUT))
  until curl -sf -o /dev/null --max-time 5 "http://127.0.0.1:$port/ready"; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    [ -z "${3:-}" ] || [ "$(podman inspect --format '{{.State.Running}}' "$3")" = true ] || return 1
    sleep 0.5
  done
  since "$started"
}

asr() {  # asr PORT WAV OUT: the HTTP status of POST /asr
  curl -sS --max-time 600 -o "$3" -w '%{http_code}' -F "audio=@$2" "http://127.0.0.1:$1/asr"
}

# -- the container ---------------------------------------------------------------------------------
port=$(free_port)
container=asr-image-check-$$
started=$(now)
podman run -d --name "$container" -p "127.0.0.1:$port:7861" "${run_opts[@]}" "$image" >/dev/null
ready_s=$(wait_ready "$port" "$started" "$container") || { podman logs --tail 30 "$container"; die "container: no /ready within $READY_TIMEOUT s"; }
log "container: ready in $ready_s s on 127.0.0.1:$port"
code=$(asr "$port" "$work/jfk.wav" "$work/asr.json") || true
[ "$code" = 200 ] || die "container: POST /asr answered $code: $(head -c 300 "$work/asr.json" 2>/dev/null)"
check_jfk "$work/asr.json" "container /asr"

# Stop with a request in flight: it must still get its 200, and the container exit by itself (0).
asr "$port" "$work/long.wav" "$work/inflight.json" >"$work/inflight.code" 2>&1 &
inflight_pid=$!
deadline=$((SECONDS + 60))
running() {  # /health's count of requests being transcribed now
  curl -sf --max-time 5 "http://127.0.0.1:$1/health" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["queue"]["running"])' 2>/dev/null || echo 0
}
until [ "$(running "$port")" -gt 0 ]; do
  kill -0 "$inflight_pid" 2>/dev/null || die "the long request finished before it was seen in flight"
  [ "$SECONDS" -lt "$deadline" ] || die "the long request was not seen in flight within 60 s"
  sleep 0.2
done
started=$(now)
timeout $((GRACE + 30)) podman stop -t "$GRACE" "$container" >/dev/null || die "podman stop failed"
stop_s=$(since "$started")
wait "$inflight_pid" || true; inflight_pid=""
exit_code=$(podman inspect --format '{{.State.ExitCode}}' "$container")
code=$(cat "$work/inflight.code")
[ "$code" = 200 ] || die "the request in flight when the stop was sent answered '$code'"
check_jfk "$work/inflight.json" "request in flight during the stop"
[ "$exit_code" = 0 ] || die "the container exited with $exit_code after podman stop -t $GRACE (0 = its own graceful stop)"
log "container: stopped in $stop_s s (grace $GRACE s), exit code 0, the request in flight answered 200"
podman rm -v "$container" >/dev/null; container=""

# -- the pod, from the cpu overlay -----------------------------------------------------------------
kube_ready_s=""
if [ "$kube" = 1 ]; then
  kport=$(free_port)
  "$kubectl" kustomize deploy/k8s/overlays/cpu \
    | "$python" scripts/podman_kube.py --image "$image" --host-port "$kport" >"$work/play.yaml"
  log "pod: playing deploy/k8s/overlays/cpu ($(grep '^kind:' "$work/play.yaml" | cut -d' ' -f2 | paste -sd, -))" \
      "on 127.0.0.1:$kport"
  names() {  # the names of the played objects of these kinds
    "$python" -c 'import sys, yaml
print(" ".join(d["metadata"]["name"] for d in yaml.safe_load_all(open(sys.argv[1])) if d["kind"] in sys.argv[2:]))' \
      "$work/play.yaml" "$@"
  }
  deployment=$(names Deployment) claimed=$(names PersistentVolumeClaim ConfigMap)
  pods_before=$(podman pod ps -q --no-trunc) volumes_before=$(podman volume ls -q)
  played=1
  started=$(now)
  timeout 300 podman kube play "$work/play.yaml" >"$work/play.log" 2>&1 || { cat "$work/play.log"; die "podman kube play failed"; }
  if ! kube_ready_s=$(wait_ready "$kport" "$started"); then
    for p in $(new_pods); do podman pod logs --tail 30 "$p" 2>&1; done
    die "pod: no /ready within $READY_TIMEOUT s"
  fi
  log "pod: ready in $kube_ready_s s"
  code=$(asr "$kport" "$work/jfk.wav" "$work/pod.json") || true
  [ "$code" = 200 ] || die "pod: POST /asr answered $code"
  check_jfk "$work/pod.json" "pod /asr"
  timeout $((GRACE + 60)) podman kube down "$work/play.yaml" >/dev/null || die "podman kube down failed"
  [ -z "$(new_pods)" ] || die "podman kube down left the pod"
  remove_new_volumes
  played=0
  log "pod: torn down (podman kube down), its volumes removed"
fi

python3 -c 'import json, sys
keys = ["image", "size_bytes", "build_seconds", "ready_seconds", "stop_seconds", "pod_ready_seconds"]
values = [sys.argv[1], int(sys.argv[2])] + [float(a) if a else None for a in sys.argv[3:]]
print("[image] report", json.dumps(dict(zip(keys, values))))' \
  "$image" "$size" "$build_s" "$ready_s" "$stop_s" "$kube_ready_s"
echo "$image"
