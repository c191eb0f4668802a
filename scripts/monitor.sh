#!/usr/bin/env bash
# One screen of the service's health, for a terminal, `watch` or cron:
#
#   scripts/monitor.sh [RUN_DIR]          # RUN_DIR defaults to ./run (or $ASR_RUN_DIR)
#   watch -n 2 scripts/monitor.sh run
#
# Shows host load, each GPU (nvidia-smi, when present), nginx, and every instance: supervisord state,
# readiness, requests in flight, queue, requests served, errors, audio seconds. Exits 0 when all is
# up, 2 when an instance or nginx is down or not ready (so cron and alerting can act), 1 on misuse.
set -uo pipefail

run_dir=${1:-${ASR_RUN_DIR:-run}}
conf="$run_dir/supervisor/supervisord.conf"
here=$(cd "$(dirname "$0")/.." && pwd)
supervisorctl=${SUPERVISORCTL:-$here/.venv/bin/supervisorctl}
[ -x "$supervisorctl" ] || supervisorctl=supervisorctl

if [ ! -f "$conf" ]; then
  echo "no service in $run_dir (no $conf); start one with: asrctl up --run-dir $run_dir" >&2
  exit 1
fi

setting() {  # a value from the run directory's asr.toml
  sed -n "s/^$1 = \"\{0,1\}\([^\"]*\)\"\{0,1\}$/\1/p" "$run_dir/asr.toml" | head -n 1
}

trim() { local s=$1; s=${s#"${s%%[![:space:]]*}"}; printf '%s' "${s%"${s##*[![:space:]]}"}"; }

metric() {  # sum of a Prometheus metric's samples whose line matches an optional label filter
  awk -v name="$1" -v filter="${2:-}" '
    $1 ~ "^"name"([{]|$)" && (filter == "" || index($1, filter)) { sum += $NF }
    END { printf "%g", sum + 0 }' <<<"$3"
}

problems=()
port=$(setting port)
host=$(setting host)
[ "$host" = "0.0.0.0" ] || [ -z "$host" ] && host=127.0.0.1

printf 'asr-service  %s  run=%s\n' "$(date '+%F %T')" "$(cd "$run_dir" && pwd)"
read -r l1 l5 l15 _ < /proc/loadavg
mem=$(awk '/MemTotal/ {t=$2} /MemAvailable/ {a=$2} END {printf "%.1f/%.1f GiB", (t-a)/1048576, t/1048576}' /proc/meminfo)
printf 'host   load %s %s %s  cores %s  memory %s\n' "$l1" "$l5" "$l15" "$(nproc)" "$mem"

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,utilization.gpu,memory.used,memory.total --format=csv,noheader,nounits 2>/dev/null |
    while IFS=',' read -r idx name util used total; do  # commas only: GPU names have spaces
      printf 'gpu%-2s  %-26s util %4s%%  memory %s/%s MiB\n' "$(trim "$idx")" "$(trim "$name")" "$(trim "$util")" \
        "$(trim "$used")" "$(trim "$total")"
    done
fi

status=$("$supervisorctl" -c "$conf" status 2>&1)
if [ $? -ge 4 ] || grep -q "refused\|no such file" <<<"$status"; then
  echo "supervisord is not running for $run_dir" >&2
  exit 2
fi

nginx_line=$(grep '^nginx ' <<<"$status")
nginx_state=$(awk '{print $2}' <<<"$nginx_line")
public=$(curl -s -o /dev/null -m 3 -w '%{http_code}' "http://$host:$port/ready")
conns=$(curl -s -m 3 "http://127.0.0.1:$port/nginx_status" | awk '/Active connections/ {print $3}')
printf 'nginx  %-8s http://%s:%s  /ready %s  connections %s\n' "${nginx_state:-MISSING}" "$host" "$port" "$public" "${conns:--}"
[ "$nginx_state" = RUNNING ] || problems+=("nginx is ${nginx_state:-missing}")
[ "$public" = 200 ] || problems+=("nginx /ready answers $public")

auto=$(grep '^autoscaler ' <<<"$status" | awk '{print $2}')
[ -n "$auto" ] && printf 'autoscaler %s\n' "$auto"
watcher=$(grep '^watcher ' <<<"$status" | awk '{print $2}')
[ -n "$watcher" ] && printf 'watcher %s\n' "$watcher"
[ -z "$watcher" ] || [ "$watcher" = RUNNING ] || problems+=("the liveness watcher is $watcher")

printf '\n%-12s %5s  %-9s %-5s %9s %5s %9s %6s %9s\n' INSTANCE PORT STATE READY IN_FLIGHT QUEUE REQUESTS ERRORS AUDIO_S
while read -r name state _; do
  case "$name" in asr-*) ;; *) continue ;; esac
  iport=${name#asr-}
  ready=$(curl -s -o /dev/null -m 3 -w '%{http_code}' "http://127.0.0.1:$iport/ready")
  metrics=$(curl -s -m 3 "http://127.0.0.1:$iport/metrics")
  printf '%-12s %5s  %-9s %-5s %9s %5s %9s %6s %9s\n' "$name" "$iport" "$state" \
    "$([ "$ready" = 200 ] && echo yes || echo no)" \
    "$(metric asr_requests_in_flight '' "$metrics")" \
    "$(metric asr_queue_waiting '' "$metrics")" \
    "$(metric asr_requests_total 'route="/asr"' "$metrics")" \
    "$(metric asr_requests_total 'route="/asr",status="5' "$metrics")" \
    "$(metric asr_audio_seconds_total '' "$metrics")"
  [ "$state" = RUNNING ] || problems+=("$name is $state")
  [ "$state" != RUNNING ] || [ "$ready" = 200 ] || problems+=("$name is not ready ($ready)")
done <<<"$status"

if [ ${#problems[@]} -eq 0 ]; then
  printf '\nOK\n'
  exit 0
fi
printf '\nDOWN: %s\n' "${problems[@]}"
exit 2
