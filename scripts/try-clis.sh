#!/usr/bin/env bash
# Tries the real coding CLIs against the demo, as a user would: installs Claude Code and Codex
# CLI from the npm registry into a temporary directory, brings up the demo (scripts/dev.sh: Redis,
# mock upstream, aggregator, gateway, a demo key), runs
#   - `codex exec` with its built-in OpenAI provider pointed at the gateway (openai_base_url,
#     logged in with `codex login --with-api-key`): the Responses API over WebSocket,
#   - `codex exec` with a [model_providers.meter] entry (wire_api = "responses"): HTTP + SSE,
#   - `claude -p` with ANTHROPIC_API_KEY, then with ANTHROPIC_AUTH_TOKEN,
# and prints what the gateway relayed to the mock upstream for each, then the usage rows.
# Exits non-zero if a CLI fails or Codex falls back from WebSocket to HTTP. Not part of CI: it
# needs the npm registry, and the CLIs change with every release.
#
# Settings (environment): CODEX_VERSION, CLAUDE_CODE_VERSION (default: latest), PROMPT, and the
# ports of scripts/dev.sh (METER_DEMO_GATEWAY_PORT, METER_DEMO_AGGREGATOR_PORT,
# METER_DEMO_MOCK_PORT, METER_DEMO_REDIS_PORT), KEEP=1 to keep the temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."

PROMPT=${PROMPT:-"Say hello in one sentence."}
TMP=$(mktemp -d -t meter-try-clis.XXXXXX)
GATEWAY=127.0.0.1:${METER_DEMO_GATEWAY_PORT:-8080}
REDIS_PORT=${METER_DEMO_REDIS_PORT:-6390}
BIN=${CARGO_TARGET_DIR:-target}/debug
# The demo's own Redis, so that the usage rows are this run's only.
unset REDIS_URL
export METER_DEMO_DIR=$TMP/demo
DEV_PID=""

cleanup() {
  if [ -n "$DEV_PID" ]; then
    # TERM: a background job of a script ignores INT.
    kill -TERM "$DEV_PID" 2>/dev/null || true
    wait "$DEV_PID" 2>/dev/null || true
  fi
  if [ "${KEEP:-0}" = 1 ]; then
    echo "kept $TMP"
  else
    rm -rf "$TMP"
  fi
}
trap cleanup EXIT

section() { printf '\n=== %s\n' "$*"; }

section "installing the CLIs from the npm registry into $TMP/npm"
npm install --prefix "$TMP/npm" --no-audit --no-fund --loglevel error \
  "@openai/codex@${CODEX_VERSION:-latest}" "@anthropic-ai/claude-code@${CLAUDE_CODE_VERSION:-latest}" >/dev/null
CODEX=$TMP/npm/node_modules/.bin/codex
CLAUDE=$TMP/npm/node_modules/.bin/claude
echo "$("$CODEX" --version), Claude Code $("$CLAUDE" --version)"

section "starting the demo (scripts/dev.sh)"
# Something already answering there would be measured instead of this run's demo.
for port in "${METER_DEMO_GATEWAY_PORT:-8080}" "${METER_DEMO_AGGREGATOR_PORT:-8081}" "${METER_DEMO_MOCK_PORT:-9090}" "$REDIS_PORT"; do
  if (: <"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is in use; stop what listens there or set METER_DEMO_*_PORT" >&2
    exit 1
  fi
done
setsid scripts/dev.sh >"$TMP/dev.out" 2>&1 &
DEV_PID=$!
for _ in $(seq 1 1800); do
  grep -q "meter is running" "$TMP/dev.out" && break
  if ! kill -0 "$DEV_PID" 2>/dev/null; then
    cat "$TMP/dev.out" >&2
    echo "scripts/dev.sh exited" >&2
    DEV_PID=""
    exit 1
  fi
  sleep 0.5
done
grep -q "meter is running" "$TMP/dev.out" || { cat "$TMP/dev.out" >&2; exit 1; }
read -r _ KEY <"$METER_DEMO_DIR/demo-key"
MOCK_LOG=$METER_DEMO_DIR/mock.log
echo "gateway http://$GATEWAY, demo key ${KEY:0:10}…"

failed=0
# Runs a CLI (its output in $TMP/<name>.out), then prints its answer, how long it took, and
# what the gateway relayed to the mock upstream meanwhile (HTTP requests, socket events).
run() {
  local name=$1 from took status=0
  shift
  from=$(wc -l <"$MOCK_LOG")
  local start=$(date +%s%N)
  "$@" >"$TMP/$name.out" 2>&1 </dev/null || status=$?
  took=$((($(date +%s%N) - start) / 1000000))
  section "$name: exit $status in ${took} ms"
  grep -v -e bubblewrap -e 'PATH aliases' "$TMP/$name.out" | tail -n 6
  echo "--- relayed to the upstream:"
  tail -n +"$((from + 1))" "$MOCK_LOG" | grep -E 'mock upstream (request|socket event)' \
    | sed -E 's/^[^ ]+ +INFO [^ ]+ //' || true
  if [ "$status" -ne 0 ]; then
    failed=1
  fi
  if grep -q "Falling back from WebSockets" "$TMP/$name.out"; then
    echo "!!! Codex fell back from WebSocket to HTTP"
    failed=1
  fi
}

# Codex's built-in OpenAI provider, pointed at the gateway and logged in with the demo key.
export CODEX_HOME=$TMP/codex-builtin
mkdir -p "$CODEX_HOME"
printf 'openai_base_url = "http://%s/v1"\n' "$GATEWAY" >"$CODEX_HOME/config.toml"
printf '%s' "$KEY" | "$CODEX" login --with-api-key >/dev/null 2>&1
run "codex exec (built-in provider, WebSocket)" "$CODEX" exec --skip-git-repo-check "$PROMPT"

# A provider entry of its own: the Responses API over HTTP.
export CODEX_HOME=$TMP/codex-provider
mkdir -p "$CODEX_HOME"
cat >"$CODEX_HOME/config.toml" <<TOML
model_provider = "meter"

[model_providers.meter]
name = "meter gateway"
base_url = "http://$GATEWAY/v1"
wire_api = "responses"
env_key = "METER_API_KEY"
TOML
run "codex exec ([model_providers.meter], HTTP)" env METER_API_KEY="$KEY" "$CODEX" exec --skip-git-repo-check "$PROMPT"
unset CODEX_HOME

# Claude Code, with either variable; its own HOME so no user setting applies.
mkdir -p "$TMP/claude-home"
claude_env=(env HOME="$TMP/claude-home" ANTHROPIC_BASE_URL="http://$GATEWAY" CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1)
run "claude -p (ANTHROPIC_API_KEY)" "${claude_env[@]}" ANTHROPIC_API_KEY="$KEY" "$CLAUDE" -p "$PROMPT"
run "claude -p (ANTHROPIC_AUTH_TOKEN)" "${claude_env[@]}" ANTHROPIC_AUTH_TOKEN="$KEY" "$CLAUDE" -p "$PROMPT"

# Every event the gateway published, once the aggregator has counted them all.
section "usage rows (aggregator usage)"
REDIS=redis://127.0.0.1:$REDIS_PORT
events=$(redis-cli -p "$REDIS_PORT" xlen meter:events)
for _ in $(seq 1 200); do
  counted=$("$BIN/aggregator" usage --redis-url "$REDIS" --json 2>/dev/null \
    | sed -n 's/.*"requests":\([0-9]*\).*/\1/p' | head -n 1)
  [ "${counted:-0}" -ge "$events" ] && break
  sleep 0.1
done
echo "$events events in the stream"
"$BIN/aggregator" usage --redis-url "$REDIS" --group-by endpoint,model,status
"$BIN/aggregator" latency --redis-url "$REDIS" --group-by endpoint

if [ "$failed" -ne 0 ]; then
  section "FAILED (see above)"
  exit 1
fi
section "all CLIs answered through the gateway, every request metered"
