#!/usr/bin/env bash
# Gateway overhead: anyad vs the minimal aiohttp pass-through vs the LiteLLM proxy,
# each measured by the shared harness (../shared/bench/gateway-overhead) against the
# same fake upstream on 127.0.0.1, direct and through the gateway interleaved.
#
#   bench/gateway_overhead.sh [--duration 5] [--reps 3] [--gateways "anyad minproxy litellm"]
#                             (also: anyad-nostore, anyad with its history and cache off;
#                             anyad-pool, anyad with a pool of four replicas of the upstream)
#                             [--concurrency "1 32"] [--modes "nonstream stream"]
#
# Needs /tmp/bench-venv (aiohttp uvloop) and /tmp/litellm-venv ('litellm[proxy]' uvloop);
# it creates them when missing. Results: /tmp/gwbench/results/<gateway>; one table at the end.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
H="${GWBENCH:-$ROOT/../shared/bench/gateway-overhead}"
H="$(cd "$H" && pwd)"
DURATION=5; REPS=3; GATEWAYS="anyad minproxy litellm"; CONCS="1 32"; MODES="nonstream stream"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --duration) DURATION="$2"; shift 2;;
    --reps) REPS="$2"; shift 2;;
    --gateways) GATEWAYS="$2"; shift 2;;
    --concurrency) CONCS="$2"; shift 2;;
    --modes) MODES="$2"; shift 2;;
    *) echo "unknown arg $1" >&2; exit 2;;
  esac
done
PY=/tmp/bench-venv/bin/python
[[ -x $PY ]] || { python3 -m venv /tmp/bench-venv && /tmp/bench-venv/bin/pip install -q aiohttp uvloop; }
if [[ " $GATEWAYS " == *" litellm "* && ! -x /tmp/litellm-venv/bin/litellm ]]; then
  python3 -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install -q 'litellm[proxy]' uvloop
fi
ANYAD="$ROOT/.venv/bin/anyad"
RESULTS=/tmp/gwbench/results; LOGS=/tmp/gwbench/logs; mkdir -p "$RESULTS" "$LOGS"
UP_PORT=9000; GW_PORT=8000
UP_PID=""; GW_PID=""
stop_pid() {
  local p=$1
  [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null || return 0
  kill "$p" 2>/dev/null || true
  for _ in $(seq 1 40); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.5; done
  kill -KILL -- "-$p" 2>/dev/null || kill -KILL "$p" 2>/dev/null || true
}
cleanup() { stop_pid "$GW_PID"; stop_pid "$UP_PID"; }
trap cleanup EXIT
wait_url() { for _ in $(seq 1 240); do curl -fsS -m 2 "$1" >/dev/null 2>&1 && return 0; sleep 0.25; done; return 1; }

setsid "$PY" "$H/upstream.py" "$UP_PORT" > "$LOGS/upstream.log" 2>&1 < /dev/null &
UP_PID=$!
wait_url "http://127.0.0.1:$UP_PORT/v1/models"

dirs=()
for gw in $GATEWAYS; do
  model=bench; key=""; meta=()
  case "$gw" in
    anyad|anyad-nostore|anyad-pool)
      cfg=/tmp/gwbench/anyad.toml
      printf '[server]\nport = %s\nlog_level = "warning"\n[providers.up]\nbase_url = "http://127.0.0.1:%s/v1"\nmax_retries = 0\n' \
        "$GW_PORT" "$UP_PORT" > "$cfg"
      # anyad-nostore: the same with the history, the cache and the audit log off, to show what they cost.
      [[ $gw == anyad-nostore ]] && printf '[history]\nenabled = false\n[cache]\nenabled = false\n[audit]\nenabled = false\n' >> "$cfg"
      # anyad-pool: the defaults, the requests spread over four replicas (the same upstream
      # under four names: what is measured is the pool's own work).
      [[ $gw == anyad-pool ]] && printf '[pools.fleet]\nmodel = "bench"\nhealth_check = "models"\nreplicas = [%s]\n' \
        "$(for i in 0 1 2 3; do printf '{ base_url = "http://127.0.0.1:%s/v1", name = "r%s" },' "$UP_PORT" "$i"; done)" >> "$cfg"
      XDG_DATA_HOME=/tmp/gwbench/data setsid "$ANYAD" serve --config "$cfg" > "$LOGS/anyad.log" 2>&1 < /dev/null &
      GW_PID=$!; model=up/bench
      [[ $gw == anyad-pool ]] && model=fleet
      wait_url "http://127.0.0.1:$GW_PORT/health"
      meta=(--meta "anyad=$("$ROOT/.venv/bin/python" -c 'import anyad; print(anyad.__version__)')");;
    minproxy)
      setsid "$PY" "$H/minproxy.py" --port "$GW_PORT" --upstream "http://127.0.0.1:$UP_PORT/v1" \
        > "$LOGS/minproxy.log" 2>&1 < /dev/null &
      GW_PID=$!
      sleep 1;;
    litellm)
      key="${LITELLM_MASTER_KEY:-sk-gwbench-local-loopback-only}"
      export LITELLM_MASTER_KEY="$key"
      GW_PID=$("$H/start_litellm.sh" --port "$GW_PORT" --upstream "http://127.0.0.1:$UP_PORT/v1" \
               --venv /tmp/litellm-venv --log "$LOGS/litellm.log")
      meta=(--meta "litellm=$(/tmp/litellm-venv/bin/python -c 'import importlib.metadata as m; print(m.version("litellm"))')");;
    *) echo "unknown gateway $gw" >&2; exit 2;;
  esac
  echo "=== $gw (pid $GW_PID) ===" >&2
  args=(--gateway "http://127.0.0.1:$GW_PORT" --model "$model" --upstream "http://127.0.0.1:$UP_PORT"
        --label "$gw" --duration "$DURATION" --reps "$REPS" --gateway-pid "$GW_PID" --upstream-pid "$UP_PID"
        --python "$PY" --out "$RESULTS/$gw" --concurrency "$CONCS" --modes "$MODES")
  [[ -n "$key" ]] && args+=(--api-key "$key")
  "$H/run.sh" "${args[@]}" "${meta[@]+"${meta[@]}"}"
  stop_pid "$GW_PID"; GW_PID=""
  sleep 1
  dirs+=("$RESULTS/$gw")
done
"$PY" "$H/summarize.py" "${dirs[@]}"
