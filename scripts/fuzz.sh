#!/usr/bin/env bash
# Bounded-time fuzzing of everything that parses untrusted bytes, through the proptest
# properties that CI runs at the default case count (256 per property):
#   shared   event decoder (arbitrary and mangled MessagePack)
#   gateway  SSE parser, usage extractors and stream handlers, usage-chunk hider,
#            include_usage injection (gateway/src/relay/fuzz.rs)
#   aggregator  stats query parser and planner (aggregator/src/query/mod.rs)
# Each property is run again and again with a fresh random seed and PROPTEST_CASES per run
# until its share of the time budget is spent. A failure stops the script; proptest saves the
# shrunk input under <crate>/proptest-regressions/, which is committed as a regression test.
# Usage: scripts/fuzz.sh [seconds per property, default 60] [cases per run, default 20000]
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:-60}
CASES=${2:-20000}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
TARGETS=(
  "shared event::tests::decoding_arbitrary_bytes_never_panics"
  "shared event::tests::every_event_round_trips"
  "gateway sse::tests::arbitrary_bytes_in_any_chunking_parse_like_the_whole"
  "gateway relay::fuzz::json_extractors_never_panic"
  "gateway relay::fuzz::stream_handlers_never_panic_and_ignore_chunking"
  "gateway relay::fuzz::the_usage_hider_ignores_chunking_and_passes_usage_free_streams_unchanged"
  "gateway relay::fuzz::injecting_include_usage_never_panics_and_yields_a_request_that_asks_for_usage"
  "aggregator query::tests::fuzz::query_parsing_and_planning_never_panic_and_stay_bounded"
)
# Built per crate exactly as each run invokes it (building several crates at once resolves
# other features, and the first timed run would then pay a rebuild inside its time limit).
for crate in shared gateway aggregator; do
  cargo test -q -p "$crate" --lib --no-run
done
for target in "${TARGETS[@]}"; do
  read -r crate name <<<"$target"
  runs=0
  start=$(date +%s)
  while (($(date +%s) - start < BUDGET)); do
    # Each run is also capped, so one slow run cannot overrun the budget by much.
    if ! PROPTEST_CASES=$CASES timeout $((BUDGET * 2)) \
      cargo test -q -p "$crate" --lib -- --exact "$name" >/tmp/fuzz-$$.log 2>&1; then
      cat /tmp/fuzz-$$.log
      echo "FAILED: $crate $name (after $runs clean runs of $CASES cases)"
      exit 1
    fi
    runs=$((runs + 1))
  done
  echo "$crate $name: $((runs * CASES)) cases in $(($(date +%s) - start)) s, no failure"
done
rm -f /tmp/fuzz-$$.log
