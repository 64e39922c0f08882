#!/usr/bin/env bash
# Bounded soak of the gateway: wrk at concurrency 32 in 30 s rounds (default 3) against the
# release gateway (mock upstream, Redis and aggregator running), sampling the gateway's RSS and
# open file descriptors, and the CPU time of every process of the pipeline, every 10 s. Loopback
# only; stops by itself.
# Usage: scripts/soak-gateway.sh [rounds, default 3]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
source scripts/lib/release-pipeline.sh
start_release_pipeline soak 38000
# CPU time (utime + stime, clock ticks) of a process so far.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
sample() {
  for i in $(seq 0 $((ROUNDS * 3))); do
    echo "t=$((i * 10))s rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$GW_PID/status") fds=$(ls "/proc/$GW_PID/fd" | wc -l)" \
      "cpu_ticks gateway=$(ticks $GW_PID) aggregator=$(ticks $AG_PID) redis=$(ticks $REDIS_PID) mock=$(ticks $MOCK_PID)"
    sleep 10
  done
}
sample & pids+=($!)
for _ in $(seq 1 "$ROUNDS"); do
  wrk -t2 -c32 -d30s -s "$DIR/post.lua" "http://$GW/v1/messages" | grep -E "Requests/sec"
done
sleep 2
echo "events in stream: $(redis-cli -p $RPORT XLEN "$METER_STREAM")"
