#!/usr/bin/env bash
# Bounded soak of the gateway: wrk at concurrency 32 in 30 s rounds (default 3) against the
# release gateway (mock upstream, Redis and aggregator running), sampling the gateway's RSS and
# open file descriptors every 10 s. Loopback only; stops by itself.
# Usage: scripts/soak-gateway.sh [rounds, default 3]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)"; exit 1; }
cargo build --quiet --release --bin gateway --bin aggregator --bin mock-upstream
BIN=target/release
DIR=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT

RPORT=6393; GW=127.0.0.1:38080; AG=127.0.0.1:38081; MOCK=127.0.0.1:39090
redis-server --port $RPORT --bind 127.0.0.1 --save '' --appendonly no --logfile "$DIR/redis.log" &
pids+=($!)
export REDIS_URL=redis://127.0.0.1:$RPORT ADMIN_TOKEN=soak METER_STREAM="soak:$$" RUST_LOG=warn GATEWAY_SPOOL_DIR="$DIR/spool"
sleep 0.3
"$BIN/mock-upstream" --listen $MOCK >/dev/null 2>&1 & pids+=($!)
"$BIN/aggregator" --listen $AG >"$DIR/agg.log" 2>&1 & pids+=($!)
"$BIN/gateway" --listen $GW >"$DIR/gw.log" 2>&1 & pids+=($!)
gw_pid=${pids[3]}
for _ in $(seq 1 100); do curl -fs "http://$GW/readyz" >/dev/null && break; sleep 0.1; done
admin() { curl -fsS -H "authorization: Bearer $ADMIN_TOKEN" -H 'content-type: application/json' "$@"; }
admin -X POST "http://$GW/admin/accounts" \
  -d "{\"name\":\"mock\",\"provider\":\"anthropic\",\"base_url\":\"http://$MOCK\",\"api_key\":\"sk-mock\"}" >/dev/null
KEY=$(admin -X POST "http://$GW/admin/keys" -d '{"name":"soak"}' | sed -n 's/.*"key":"\([^"]*\)".*/\1/p')
cat >"$DIR/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Hello"}],"mock":{"input_tokens":100,"output_tokens":20}}'
wrk.headers["content-type"] = "application/json"
wrk.headers["x-api-key"] = "$KEY"
LUA
sample() {
  for i in $(seq 0 $((ROUNDS * 3))); do
    echo "t=$((i * 10))s rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$gw_pid/status") fds=$(ls "/proc/$gw_pid/fd" | wc -l)"
    sleep 10
  done
}
sample & pids+=($!)
for _ in $(seq 1 "$ROUNDS"); do
  wrk -t2 -c32 -d30s -s "$DIR/post.lua" "http://$GW/v1/messages" | grep -E "Requests/sec"
done
sleep 2
echo "events in stream: $(redis-cli -p $RPORT XLEN "$METER_STREAM")"
