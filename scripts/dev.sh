#!/usr/bin/env bash
# Brings the whole pipeline up locally: Redis (a private one if none is reachable), the mock
# upstream, the aggregator and the gateway, then creates a demo account and key and prints what
# to try. Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."

GATEWAY=127.0.0.1:8080
AGGREGATOR=127.0.0.1:8081
MOCK=127.0.0.1:9090
ADMIN_TOKEN=${ADMIN_TOKEN:-dev-admin-token}
RUN_DIR=.meter
mkdir -p "$RUN_DIR"
pids=()

stopping=""
stop() {
  stopping=1
  trap - INT TERM EXIT
  if ((${#pids[@]})); then
    echo
    echo "stopping ${#pids[@]} processes..."
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  echo "stopped."
}
trap stop INT TERM EXIT

if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing redis-server (needs root)..."
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi

echo "building (first time takes a few minutes)..."
cargo build --quiet --bin gateway --bin aggregator --bin mock-upstream
BIN=target/debug

if [ -z "${REDIS_URL:-}" ]; then
  if redis-cli -p 6379 ping >/dev/null 2>&1; then
    REDIS_URL=redis://127.0.0.1:6379
  else
    redis-server --port 6390 --bind 127.0.0.1 --save '' --appendonly no \
      --logfile "$RUN_DIR/redis.log" &
    pids+=($!)
    REDIS_URL=redis://127.0.0.1:6390
  fi
fi
export REDIS_URL ADMIN_TOKEN
export GATEWAY_SPOOL_DIR="$RUN_DIR/spool"

"$BIN/mock-upstream" --listen "$MOCK" >"$RUN_DIR/mock.log" 2>&1 &
pids+=($!)
"$BIN/aggregator" --listen "$AGGREGATOR" >"$RUN_DIR/aggregator.log" 2>&1 &
pids+=($!)
"$BIN/gateway" --listen "$GATEWAY" >"$RUN_DIR/gateway.log" 2>&1 &
pids+=($!)

wait_for() {
  for _ in $(seq 1 100); do
    curl -fsS "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "$1 did not come up; see $RUN_DIR/*.log" >&2
  exit 1
}
wait_for "http://$GATEWAY/readyz"
wait_for "http://$AGGREGATOR/healthz"

admin() { curl -fsS -H "authorization: Bearer $ADMIN_TOKEN" -H 'content-type: application/json' "$@"; }
admin -X POST "http://$GATEWAY/admin/accounts" \
  -d "{\"name\":\"mock-anthropic\",\"provider\":\"anthropic\",\"base_url\":\"http://$MOCK\",\"api_key\":\"sk-mock\"}" >/dev/null
KEY=$(admin -X POST "http://$GATEWAY/admin/keys" -d '{"name":"demo"}' \
  | sed -n 's/.*"key":"\([^"]*\)".*/\1/p')

cat <<INFO

meter is running (logs in $RUN_DIR/):
  gateway     http://$GATEWAY      (admin token: $ADMIN_TOKEN)
  aggregator  http://$AGGREGATOR
  mock LLM    http://$MOCK
  redis       $REDIS_URL

demo key: $KEY

Send a request through the gateway:
  curl -s http://$GATEWAY/v1/messages -H 'x-api-key: $KEY' -H 'content-type: application/json' \\
    -d '{"model":"claude-sonnet-4-5","max_tokens":256,"messages":[{"role":"user","content":"Hello"}]}'

Then see its usage and exact cost:
  curl -s -H 'authorization: Bearer $ADMIN_TOKEN' 'http://$AGGREGATOR/v1/usage?group_by=key,model'
  $BIN/aggregator usage --group-by key,model

Point Claude Code at it (against the mock here, or a real Anthropic account added via /admin/accounts):
  ANTHROPIC_BASE_URL=http://$GATEWAY ANTHROPIC_API_KEY=$KEY claude

Ctrl-C stops everything.
INFO

wait -n "${pids[@]}" || true
[ -n "$stopping" ] || echo "a process exited unexpectedly; see $RUN_DIR/*.log"
