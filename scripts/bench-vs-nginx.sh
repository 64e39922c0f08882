#!/usr/bin/env bash
# The gateway against one nginx reverse-proxy hop over the same fast fake upstream
# (`mock-upstream --canned`), non-streaming, measured in one run: wrk alternates between nginx
# and the gateway (and GATEWAY_B, a second gateway binary started on the same Redis, for an A/B
# of two builds) for ROUNDS rounds at concurrency 32, then at concurrency 1 for the added p50.
# Per row: req/s, p50, and the CPU time per request of the process behind the port (nginx runs
# as one process, `master_process off`). Throughput ratios come from neighbouring rows of the
# same round. Ends with the conservation check over both gateways. Loopback only.
# Usage: [GATEWAY_B=path/to/gateway] scripts/bench-vs-nginx.sh [seconds per row, default 5] [rounds, default 3]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
ROUNDS=${2:-3}
command -v nginx >/dev/null || { echo "needs nginx (apt-get install nginx-light)"; exit 1; }
MOCK_ARGS=--canned
source scripts/lib/release-pipeline.sh
start_release_pipeline vsnginx 28000

NGINX=127.0.0.1:$((28000 + 82))
mkdir -p "$DIR/nginx"
cat >"$DIR/nginx/nginx.conf" <<CONF
daemon off;
master_process off;
worker_processes 1;
pid $DIR/nginx/nginx.pid;
error_log $DIR/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log $DIR/nginx/access.log;
    client_body_temp_path $DIR/nginx/client_body;
    proxy_temp_path $DIR/nginx/proxy;
    fastcgi_temp_path $DIR/nginx/fastcgi;
    uwsgi_temp_path $DIR/nginx/uwsgi;
    scgi_temp_path $DIR/nginx/scgi;
    upstream mock { server $MOCK; keepalive 64; }
    server {
        listen $NGINX backlog=4096;
        keepalive_requests 1000000;
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
CONF
nginx -p "$DIR/nginx" -c "$DIR/nginx/nginx.conf" -e "$DIR/nginx/error.log" & pids+=($!)
NGINX_PID=$!
# direct: the mock alone, whose p50 the hops' added p50 is measured against (its CPU column is
# the mock's own).
names=(direct nginx gateway); hosts=($MOCK $NGINX $GW); procs=($MOCK_PID $NGINX_PID $GW_PID)
if [ -n "${GATEWAY_B:-}" ]; then
  GW_B=127.0.0.1:$((28000 + 83))
  "$GATEWAY_B" --listen "$GW_B" >"$DIR/gw-b.log" 2>&1 & pids+=($!)
  names+=(gateway_b); hosts+=($GW_B); procs+=($!)
  for _ in $(seq 1 100); do curl -fs "http://$GW_B/readyz" >/dev/null && break; sleep 0.1; done
fi
sleep 0.5

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
sys_ticks() { awk '{print $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
# Warm every target's pools (and the key cache) before anything is measured.
for h in "${hosts[@]}"; do wrk -t2 -c32 -d1s -s "$DIR/post.lua" "http://$h/v1/messages" >/dev/null; done
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)  at $(date -u +%H:%M:%S) UTC"
printf '%-6s %-10s %5s %10s %9s %9s %12s %8s\n' round target conc req/s p50_ms p99_ms cpu_us/req sys_%
row() { # round name host pid conc
  local threads=$(( $5 < 2 ? 1 : 2 )) before after sys_before sys_after out rps p50 p99 total sys
  before=$(ticks "$4"); sys_before=$(sys_ticks "$4")
  out=$(wrk -t$threads -c"$5" -d"${SECS}s" --latency -s "$DIR/post.lua" "http://$3/v1/messages")
  after=$(ticks "$4"); sys_after=$(sys_ticks "$4")
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  total=$(echo "$out" | awk '/requests in/ {print $1}')
  cpu=$(awk -v t=$((after - before)) -v n="$total" -v hz="$HZ" 'BEGIN { if (n > 0) printf "%.1f", t / hz / n * 1e6; else print "-" }')
  sys=$(awk -v s=$((sys_after - sys_before)) -v t=$((after - before)) 'BEGIN { if (t > 0) printf "%.0f", 100 * s / t; else print "-" }')
  printf '%-6s %-10s %5s %10s %9s %9s %12s %8s\n' "$1" "$2" "$5" "$rps" "$p50" "$p99" "$cpu" "$sys"
}
for conc in 32 1; do
  for r in $(seq 1 "$ROUNDS"); do
    for i in "${!names[@]}"; do
      # Alternate the order each round, so neither target always runs right after the other.
      j=$(( (r % 2 == 0) ? ${#names[@]} - 1 - i : i ))
      row "$r" "${names[$j]}" "${hosts[$j]}" "${procs[$j]}" "$conc"
    done
  done
done
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)  at $(date -u +%H:%M:%S) UTC"
sleep 3
counted=0
for i in "${!names[@]}"; do
  case ${names[$i]} in direct | nginx) continue ;; esac
  n=$(curl -s "http://${hosts[$i]}/metrics" | awk '/^meter_gateway_requests_total/ && /route="messages"/ {s += $NF} END {printf "%d", s}')
  counted=$((counted + n))
done
echo "conservation: gateways counted $counted requests; events in stream: $(redis-cli -p $RPORT XLEN "$METER_STREAM")"
