#!/usr/bin/env bash
# The fault-injection e2e tests of RELIABILITY.md, run ROUNDS times in a row (default 5): a
# longer, benchmark-style variant of what CI runs once. Prints each run's measured figures and
# stops at the first failure. Loopback only; every test bounds its own time.
# Usage: scripts/faults.sh [rounds, default 5]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
TESTS=(--test hostile --test secrets --test upstream_faults --test client_storm
  --test exactly_once --test redis_outage --test gateway_crash)
cargo test -q -p tests "${TESTS[@]}" --no-run
for round in $(seq 1 "$ROUNDS"); do
  start=$(date +%s)
  if ! cargo test -q -p tests "${TESTS[@]}" -- --nocapture >/tmp/faults-$$.log 2>&1; then
    cat /tmp/faults-$$.log
    echo "round $round: FAILED"
    exit 1
  fi
  echo "round $round: all passed in $(($(date +%s) - start)) s"
  grep -E "MiB|hang:|stall|reset mid|slow drip|storm:|fds:|steady load:|searched:|93 days" /tmp/faults-$$.log | sed 's/^/  /'
done
rm -f /tmp/faults-$$.log
