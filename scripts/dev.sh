#!/usr/bin/env bash
# Brings the whole pipeline up locally: a private Redis (unless REDIS_URL is set), the mock
# upstream, the aggregator and the gateway, then creates (or, on a later run, finds again) an
# Anthropic and an OpenAI account on the mock and a demo key, and prints what to try.
# Ctrl-C stops everything it started.
#
# Settings (environment): REDIS_URL (use that Redis instead of a private one), ADMIN_TOKEN,
# METER_DEMO_DIR (run dir, default .meter), METER_DEMO_GATEWAY_PORT (8080),
# METER_DEMO_AGGREGATOR_PORT (8081), METER_DEMO_MOCK_PORT (9090), METER_DEMO_REDIS_PORT (6390).
set -euo pipefail
cd "$(dirname "$0")/.."

GATEWAY=127.0.0.1:${METER_DEMO_GATEWAY_PORT:-8080}
AGGREGATOR=127.0.0.1:${METER_DEMO_AGGREGATOR_PORT:-8081}
MOCK=127.0.0.1:${METER_DEMO_MOCK_PORT:-9090}
REDIS_PORT=${METER_DEMO_REDIS_PORT:-6390}
ADMIN_TOKEN=${ADMIN_TOKEN:-dev-admin-token}
RUN_DIR=${METER_DEMO_DIR:-.meter}
# The key's secret is shown only when it is created; it is kept here to reprint it next time.
KEY_FILE=$RUN_DIR/demo-key
mkdir -p "$RUN_DIR"
# The pids of the processes started, for whoever must clean up after a script that was killed.
: >"$RUN_DIR/pids"
names=()
pids=()

# Stops what was started, newest first: the gateway hands its last events to Redis before the
# aggregator and Redis go.
stop() {
  trap - INT TERM HUP
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  pids=()
}
trap 'echo; echo "stopping..."; stop; echo "stopped."; exit 0' INT TERM HUP
trap 'stop' EXIT

# Runs a process in the background in its own session, so that a Ctrl-C in the terminal reaches
# only this script, which then stops the processes in order (rather than all at once, with
# Redis possibly gone before the gateway has published its last events).
start() {
  local name=$1
  shift
  setsid "$@" >"$RUN_DIR/$name.log" 2>&1 </dev/null &
  names+=("$name")
  pids+=($!)
  echo $! >>"$RUN_DIR/pids"
}

if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing redis-server (needs root)..."
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi

echo "building (the first time takes a few minutes)..."
CARGO=${CARGO:-cargo}
# Every binary of the workspace, as the tests build them: naming single binaries resolves
# another feature set, and each kind of build would then rebuild what the other one built.
"$CARGO" build --workspace --bins
BIN=${CARGO_TARGET_DIR:-target}/debug

if [ -z "${REDIS_URL:-}" ]; then
  # Its own Redis, persisted in the run dir (append-only file) so that the next run finds the
  # demo accounts, key and figures again; never the machine's Redis on 6379.
  mkdir -p "$RUN_DIR/redis"
  start redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$RUN_DIR/redis" \
    --appendonly yes --save '' --maxmemory-policy noeviction
  REDIS_URL=redis://127.0.0.1:$REDIS_PORT
  for _ in $(seq 1 300); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
    kill -0 "${pids[0]}" 2>/dev/null || break
    sleep 0.1
  done
  if ! redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    echo "redis-server did not start on port $REDIS_PORT; see $RUN_DIR/redis.log" >&2
    exit 1
  fi
fi
export REDIS_URL ADMIN_TOKEN
export GATEWAY_SPOOL_DIR="$RUN_DIR/spool"

start mock "$BIN/mock-upstream" --listen "$MOCK"
start aggregator "$BIN/aggregator" --listen "$AGGREGATOR" --gateway-url "http://$GATEWAY"
start gateway "$BIN/gateway" --listen "$GATEWAY"

# Generous: a loaded machine can take seconds to start a debug build.
wait_for() {
  for _ in $(seq 1 600); do
    curl -fsS "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "$1 did not come up; see $RUN_DIR/*.log" >&2
  exit 1
}
wait_for "http://$MOCK/v1/models"
wait_for "http://$GATEWAY/readyz"
wait_for "http://$AGGREGATOR/healthz"

admin() { curl -fsS -H "authorization: Bearer $ADMIN_TOKEN" -H 'content-type: application/json' "$@"; }
# `"field":"value"` of a one-object JSON document.
field() { sed -n "s/.*\"$1\":\"\\([^\"]*\\)\".*/\\1/p"; }

# One account per provider, found again by name on later runs and pointed at this run's mock.
# Account records hold no nested objects, so one object per line after splitting at `},{`.
account() {
  local name=$1 provider=$2 id
  id=$(admin "http://$GATEWAY/admin/accounts" | sed 's/},{/}\n{/g' \
    | grep -F "\"name\":\"$name\"" | head -n 1 | field id || true)
  if [ -n "$id" ]; then
    admin -X PATCH "http://$GATEWAY/admin/accounts/$id" -d "{\"base_url\":\"http://$MOCK\"}" >/dev/null
  else
    admin -X POST "http://$GATEWAY/admin/accounts" \
      -d "{\"name\":\"$name\",\"provider\":\"$provider\",\"base_url\":\"http://$MOCK\",\"api_key\":\"sk-mock\"}" >/dev/null
  fi
}
account mock-anthropic anthropic
account mock-openai openai

# The demo key: the one created on an earlier run if it still exists and is enabled.
KEY_ID=""
KEY=""
if [ -f "$KEY_FILE" ]; then
  read -r KEY_ID KEY <"$KEY_FILE" || true
  if ! admin "http://$GATEWAY/admin/keys/$KEY_ID" 2>/dev/null | grep -q '"disabled":false'; then
    KEY_ID=""
    KEY=""
  fi
fi
if [ -z "$KEY" ]; then
  created=$(admin -X POST "http://$GATEWAY/admin/keys" -d '{"name":"demo"}')
  KEY_ID=$(field id <<<"$created")
  KEY=$(field key <<<"$created")
  (umask 077 && echo "$KEY_ID $KEY" >"$KEY_FILE")
fi

USAGE_CMD="$BIN/aggregator usage --group-by key,model"
# The command needs the Redis URL unless it is the default one.
[ "$REDIS_URL" = redis://127.0.0.1:6379 ] || USAGE_CMD="$BIN/aggregator usage --redis-url $REDIS_URL --group-by key,model"

cat <<INFO

meter is running (logs in $RUN_DIR/):
  gateway     http://$GATEWAY      (admin token: $ADMIN_TOKEN)
  aggregator  http://$AGGREGATOR
  dashboard   http://$AGGREGATOR/     (asks for the admin token)
  mock LLM    http://$MOCK         (accounts mock-anthropic and mock-openai)
  redis       $REDIS_URL

demo key id: $KEY_ID
demo key:    $KEY   (also in $KEY_FILE)

Try this: send a request through the gateway, Anthropic and OpenAI style:
  curl -s http://$GATEWAY/v1/messages -H 'x-api-key: $KEY' -H 'content-type: application/json' \\
    -d '{"model":"claude-sonnet-4-5","max_tokens":256,"messages":[{"role":"user","content":"Hello"}]}'
  curl -s http://$GATEWAY/v1/chat/completions -H 'authorization: Bearer $KEY' -H 'content-type: application/json' \\
    -d '{"model":"gpt-4o","messages":[{"role":"user","content":"Hello"}]}'

Then see their usage and exact cost:
  curl -s -H 'authorization: Bearer $ADMIN_TOKEN' 'http://$AGGREGATOR/v1/usage?group_by=key,model'
  $USAGE_CMD

Point Claude Code, Codex CLI or the OpenAI SDKs at it (the mock answers here; add real
accounts via /admin/accounts):
  ANTHROPIC_BASE_URL=http://$GATEWAY ANTHROPIC_API_KEY=$KEY claude
  printf '%s' $KEY | codex login --with-api-key
  codex -c openai_base_url='"http://$GATEWAY/v1"'
  OPENAI_BASE_URL=http://$GATEWAY/v1 OPENAI_API_KEY=$KEY python3 your_sdk_script.py
(Codex ignores OPENAI_BASE_URL: its base URL is the openai_base_url setting.)

Ctrl-C (or kill -INT $$) stops everything.
INFO

# Returns when one of the processes exits: a Ctrl-C runs the INT trap instead.
set +e
wait -n "${pids[@]}"
set -e
for i in "${!pids[@]}"; do
  if ! kill -0 "${pids[i]}" 2>/dev/null; then
    echo "${names[i]} exited unexpectedly; see $RUN_DIR/${names[i]}.log" >&2
  fi
done
exit 1
