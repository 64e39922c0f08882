#!/usr/bin/env bash
# Relay overhead, measured in one run: the same non-streaming Anthropic request sent with wrk
# directly to the mock upstream and through the gateway (auth, relay, event publishing on, the
# aggregator consuming), at concurrency 1 and 32. Loopback only; stops by itself.
# Usage: scripts/bench-relay.sh [seconds per run, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)"; exit 1; }
cargo build --quiet --release --bin gateway --bin aggregator --bin mock-upstream
BIN=target/release
DIR=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT

RPORT=6391; GW=127.0.0.1:18080; AG=127.0.0.1:18081; MOCK=127.0.0.1:19090
redis-server --port $RPORT --bind 127.0.0.1 --save '' --appendonly no --logfile "$DIR/redis.log" &
pids+=($!)
export REDIS_URL=redis://127.0.0.1:$RPORT ADMIN_TOKEN=bench METER_STREAM="bench:$$" RUST_LOG=warn GATEWAY_SPOOL_DIR="$DIR/spool"
sleep 0.3
"$BIN/mock-upstream" --listen $MOCK >/dev/null 2>&1 & pids+=($!)
"$BIN/aggregator" --listen $AG >"$DIR/agg.log" 2>&1 & pids+=($!)
"$BIN/gateway" --listen $GW >"$DIR/gw.log" 2>&1 & pids+=($!)
for _ in $(seq 1 100); do curl -fs "http://$GW/readyz" >/dev/null && break; sleep 0.1; done
admin() { curl -fsS -H "authorization: Bearer $ADMIN_TOKEN" -H 'content-type: application/json' "$@"; }
admin -X POST "http://$GW/admin/accounts" \
  -d "{\"name\":\"mock\",\"provider\":\"anthropic\",\"base_url\":\"http://$MOCK\",\"api_key\":\"sk-mock\"}" >/dev/null
KEY=$(admin -X POST "http://$GW/admin/keys" -d '{"name":"bench"}' | sed -n 's/.*"key":"\([^"]*\)".*/\1/p')

cat >"$DIR/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Hello"}],"mock":{"input_tokens":100,"output_tokens":20}}'
wrk.headers["content-type"] = "application/json"
wrk.headers["x-api-key"] = "$KEY"
wrk.headers["anthropic-version"] = "2023-06-01"
LUA

gw_pid=${pids[3]}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$gw_pid/stat"; }
printf '%-8s %-5s %12s %10s %10s %18s\n' target conc req/s p50_ms p99_ms gw_cpu_s/1k_req
for conc in 1 32; do
  for target in direct gateway; do
    host=$MOCK; [ $target = gateway ] && host=$GW
    threads=$(( conc < 2 ? 1 : 2 ))
    before=$(cpu_ticks)
    out=$(wrk -t$threads -c$conc -d${SECS}s --latency -s "$DIR/post.lua" "http://$host/v1/messages")
    after=$(cpu_ticks)
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p50=$(echo "$out" | awk '$1=="50%" {print $2}')
    p99=$(echo "$out" | awk '$1=="99%" {print $2}')
    total=$(echo "$out" | awk '/requests in/ {print $1}')
    cpu=$(awk -v t=$((after - before)) -v n="$total" -v hz="$(getconf CLK_TCK)" 'BEGIN { if (n > 0) printf "%.3f", t / hz / n * 1000; else print "-" }')
    [ $target = direct ] && cpu="-"
    printf '%-8s %-5s %12s %10s %10s %18s\n' $target $conc "$rps" "$p50" "$p99" "$cpu"
  done
done
sleep 2
echo "events in stream: $(redis-cli -p $RPORT XLEN "$METER_STREAM")"
curl -s "http://$AG/v1/usage" | sed 's/^/usage: /'
echo
