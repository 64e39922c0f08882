#!/usr/bin/env bash
# Relay overhead, measured in one run: the same non-streaming Anthropic request sent with wrk
# directly to the mock upstream and through the gateway (auth, relay, event publishing on, the
# aggregator consuming), at concurrency 1 and 32. Loopback only; stops by itself.
# Usage: scripts/bench-relay.sh [seconds per run, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
source scripts/lib/release-pipeline.sh
start_release_pipeline bench 18000

cpu_ticks() { awk '{print $14 + $15}' "/proc/$GW_PID/stat"; }
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
curl -s -H "authorization: Bearer $ADMIN_TOKEN" "http://$AG/v1/usage" | sed 's/^/usage: /'
echo
