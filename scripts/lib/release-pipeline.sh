# Sourced by the benchmark scripts: builds the release binaries and starts a private Redis, the
# mock upstream, the aggregator and the gateway on loopback ports, with an account and a key.
# Everything stops when the sourcing script exits.
# Usage: start_release_pipeline NAME PORT_BASE: gateway on PORT_BASE+80, aggregator +81, mock
# +1090, Redis on 6390 + PORT_BASE/10000.
# Sets: BIN DIR GW AG MOCK RPORT KEY and the PIDs REDIS_PID MOCK_PID AG_PID GW_PID, and writes
# $DIR/post.lua for wrk.

start_release_pipeline() {
  local name=$1 base=$2
  command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)"; exit 1; }
  cargo build --quiet --release --bin gateway --bin aggregator --bin mock-upstream
  BIN=${CARGO_TARGET_DIR:-target}/release
  DIR=$(mktemp -d)
  pids=()
  trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT
  RPORT=$((6390 + base / 10000)); GW=127.0.0.1:$((base + 80)); AG=127.0.0.1:$((base + 81)); MOCK=127.0.0.1:$((base + 1090))
  redis-server --port $RPORT --bind 127.0.0.1 --save '' --appendonly no --logfile "$DIR/redis.log" &
  pids+=($!)
  export REDIS_URL=redis://127.0.0.1:$RPORT ADMIN_TOKEN=$name METER_STREAM="$name:$$" RUST_LOG=warn GATEWAY_SPOOL_DIR="$DIR/spool"
  sleep 0.3
  # MOCK_ARGS=--canned: a fixed reply without parsing, the fast fake upstream.
  "$BIN/mock-upstream" --listen "$MOCK" ${MOCK_ARGS:-} >/dev/null 2>&1 & pids+=($!)
  "$BIN/aggregator" --listen "$AG" >"$DIR/agg.log" 2>&1 & pids+=($!)
  # GATEWAY_WRAPPER: a command to run the gateway under, such as valgrind (scripts/profile-gateway.sh);
  # GATEWAY_BIN: another gateway build to run in place of this tree's (an A/B of two builds).
  ${GATEWAY_WRAPPER:-} "${GATEWAY_BIN:-$BIN/gateway}" --listen "$GW" >"$DIR/gw.log" 2>&1 & pids+=($!)
  REDIS_PID=${pids[0]} MOCK_PID=${pids[1]} AG_PID=${pids[2]} GW_PID=${pids[3]}
  for _ in $(seq 1 600); do curl -fs "http://$GW/readyz" >/dev/null && break; sleep 0.1; done
  local admin=(curl -fsS -H "authorization: Bearer $ADMIN_TOKEN" -H 'content-type: application/json')
  "${admin[@]}" -X POST "http://$GW/admin/accounts" \
    -d "{\"name\":\"mock\",\"provider\":\"anthropic\",\"base_url\":\"http://$MOCK\",\"api_key\":\"sk-mock\"}" >/dev/null
  KEY=$("${admin[@]}" -X POST "http://$GW/admin/keys" -d "{\"name\":\"$name\"}" | sed -n 's/.*"key":"\([^"]*\)".*/\1/p')
  cat >"$DIR/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Hello"}],"mock":{"input_tokens":100,"output_tokens":20}}'
wrk.headers["content-type"] = "application/json"
wrk.headers["x-api-key"] = "$KEY"
wrk.headers["anthropic-version"] = "2023-06-01"
LUA
}
