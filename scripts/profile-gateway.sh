#!/usr/bin/env bash
# Where the gateway's user-space instructions go on the non-streaming path, counted by
# callgrind (repeatable whatever else the machine runs): the release gateway runs under
# `valgrind --tool=callgrind` behind the fast fake upstream (`mock-upstream --canned`), wrk
# warms it up, the counters are zeroed, wrk sends load for SECS seconds, and the profile is
# dumped and divided by the requests the gateway counted in that window. Kernel time (syscalls,
# loopback TCP) is not in these counts; compare utime and stime for that.
# Usage: [GATEWAY_BIN=path/to/gateway] scripts/profile-gateway.sh [seconds of measured load, default 20] [concurrency, default 8]
# Leaves the profile in $OUT (default /tmp/callgrind.gateway.out; annotate with callgrind_annotate --inclusive=yes).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-20}
CONC=${2:-8}
OUT=${OUT:-/tmp/callgrind.gateway.out}
MOCK_ARGS=--canned
GATEWAY_WRAPPER="valgrind --tool=callgrind --callgrind-out-file=$OUT.%p --collect-atstart=yes"
source scripts/lib/release-pipeline.sh
start_release_pipeline profile 27000
counted() { curl -s "http://$GW/metrics" | awk '/^meter_gateway_requests_total/ && /route="messages"/ {s += $NF} END {printf "%d", s}'; }
# One request first: a broken setup would otherwise profile nothing but the error path.
preflight=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://$GW/v1/messages" -H "x-api-key: $KEY" \
  -H 'anthropic-version: 2023-06-01' -H 'content-type: application/json' \
  -d '{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Hello"}]}')
[ "$preflight" = 200 ] || { echo "preflight answered $preflight"; tail -20 "$DIR/gw.log"; exit 1; }
wrk -t1 -c"$CONC" -d5s -s "$DIR/post.lua" "http://$GW/v1/messages" >/dev/null
sleep 1
before=$(counted)
callgrind_control --zero "$GW_PID" >/dev/null
wrk -t1 -c"$CONC" -d"${SECS}s" -s "$DIR/post.lua" "http://$GW/v1/messages" | grep -E "Requests/sec|requests in"
sleep 1
callgrind_control --dump "$GW_PID" >/dev/null
after=$(counted)
# The counter scrape between the zeroing and the dump is one request of the profile, too small to matter.
echo "requests in the profiled window: $((after - before))"
dump=$(ls -t "$OUT".* | head -1)
mv "$dump" "$OUT"
echo "profile: $OUT"
total=$(callgrind_annotate "$OUT" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
echo "instructions per request (user space): $(awk -v t="$total" -v n=$((after - before)) 'BEGIN { if (n > 0) printf "%.0f", t / n }')"
