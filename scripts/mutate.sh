#!/usr/bin/env bash
# Mutation testing of the modules that carry the reliability promises, each against the tests that cover it.
#   bash scripts/mutate.sh                  every group (under 30 minutes on 2 cores)
#   bash scripts/mutate.sh leases writer    some groups
#   bash scripts/mutate.sh --show GROUP     the surviving mutants of a group, as diffs
# Each group runs in a fresh scratch copy of the working tree (/tmp/sidecar-mutation/GROUP), so the checkout is
# never touched and every score is of the tree as it is now. Scores per module go to stdout and to
# /tmp/sidecar-mutation/scores.txt; a survivor listed in scripts/mutation/equivalent/GROUP.txt (one line each: the
# mutant's name, then why no test can kill it) counts as equivalent, not as a survivor. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
SCRATCH=${SIDECAR_MUTATION_DIR:-/tmp/sidecar-mutation}
[[ -x $PY ]] || bash scripts/dev.sh install >/dev/null
"$PY" -m pip show mutmut 2>/dev/null | grep -q '^Version: 3.8.1$' || "$PY" -m pip install --quiet "mutmut==3.8.1"

# group: modules to mutate | test files that cover them (PostgreSQL variants left out: the same code paths,
# a cluster per mutant run would cost more than the rest)
declare -A MODULES=(
  [leases]="sidecar/limits/local.py sidecar/limits/admission.py"
  [writer]="sidecar/records/writer.py sidecar/records/rows.py"
  [deadline]="sidecar/upstream/deadline.py"
  [sse]="sidecar/wire/sse.py sidecar/wire/usage.py sidecar/wire/tokens.py"
  [relay]="sidecar/relay.py sidecar/responses.py sidecar/exchange.py sidecar/errors.py"
  [auth]="sidecar/keys/auth.py sidecar/keys/format.py sidecar/keys/pepper.py sidecar/keys/static.py sidecar/keys/service.py"
)
declare -A TESTS=(
  [leases]="tests/test_leases.py tests/test_leases_contract.py tests/test_budgets.py"
  [writer]="tests/test_writer.py tests/test_spool.py tests/test_writer_contract.py"
  [deadline]="tests/test_deadline.py tests/test_proxy.py"
  [sse]="tests/test_sse.py tests/test_tokens.py tests/test_sse_contract.py"
  [relay]="tests/test_errors_contract.py tests/test_relay_contract.py tests/test_disconnect.py tests/test_proxy.py"
  [auth]="tests/test_auth_contract.py tests/test_keys_contract.py tests/test_auth.py tests/test_keys.py"
)
# and a -k filter: tests that need the session's PostgreSQL or run for seconds, whose promises faster tests of
# the same group also hold
declare -A SKIP=(
  [writer]="not postgres and not never_acknowledged and not ten_minute and not long_outage and not dead_letter_file and not nul_in_a_text and not spool_cap and not being_replayed"
  [auth]="not postgres and not outage and not store_is_down and not slow_lookup and not demo_upstream and not started_with_the_store_down and not reload_at_most_once and not cli_keys_end_to_end"
)
ORDER=(leases writer deadline sse relay auth)

toml_list() { printf '['; local sep=""; for x in "$@"; do printf '%s"%s"' "$sep" "$x"; sep=", "; done; printf ']'; }

# A mutant whose tests hang is stopped after (their measured time + 3 s) x 2: a timeout counts as killed, and
# these are what most of a run's time went to with mutmut's defaults. fastfirst runs a mutant's quickest tests
# first, so most mutants die in the first test that touches them.
prepare() {  # a scratch copy of the tracked tree, with the group's mutmut settings
  local group=$1 dir=$SCRATCH/$1
  rm -rf "$dir" && mkdir -p "$dir"
  git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$dir"  # new files too
  cp scripts/mutation/fastfirst.py "$dir/tests/mutation_fastfirst.py"  # a plugin pytest imports as tests.*
  # shellcheck disable=SC2086
  cat >> "$dir/pyproject.toml" <<EOF

[tool.mutmut]
source_paths = ["sidecar"]
only_mutate = $(toml_list ${MODULES[$group]})
pytest_add_cli_args_test_selection = $(toml_list ${TESTS[$group]})
pytest_add_cli_args = ["-x", "-p", "no:logging", "-p", "no:cacheprovider", "-p", "tests.mutation_fastfirst", "-k", "${SKIP[$group]:-not postgres}", "-q"]
timeout_multiplier = 2.0
timeout_constant = 3.0
EOF
}

show() {
  cd "$SCRATCH/$1"
  "$PY" -m mutmut results 2>/dev/null | awk -F: '/survived/ {print $1}' | while read -r name; do
    "$PY" -m mutmut show "$name"
  done
}

run_group() {
  # mutmut's forced-fail pass aborts tests between a store's open and close, and the aiosqlite threads they
  # leave keep its process from exiting: once it has printed its summary, it gets 15 s to exit, then is killed.
  local log=$SCRATCH/$1.log pid
  # Three children on two cores: the tests mostly wait on sockets and timers (two children kept the load at 1.1).
  (cd "$SCRATCH/$1" && exec "$PY" -m mutmut run --max-children "${MUTATION_CHILDREN:-3}") >"$log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null && ! grep -q "mutations/second" "$log"; do sleep 2; done
  for _ in $(seq 15); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

if [[ ${1:-} == --show ]]; then show "$2"; exit; fi
groups=("$@"); [[ ${#groups[@]} -gt 0 ]] || groups=("${ORDER[@]}")
for group in "${groups[@]}"; do
  [[ -n ${MODULES[$group]:-} ]] || { echo "unknown group: $group (one of: ${ORDER[*]})" >&2; exit 2; }
  prepare "$group"
  echo "== $group: ${MODULES[$group]} against ${TESTS[$group]}"
  start=$SECONDS
  run_group "$group"
  (cd "$SCRATCH/$group" && "$PY" -m mutmut results --all true 2>/dev/null) >"$SCRATCH/$group.results"
  "$PY" scripts/mutation/score.py "$group" "$SCRATCH/$group.results" "scripts/mutation/equivalent/$group.txt" \
    "$((SECONDS - start))" | tee -a "$SCRATCH/scores.txt"
done
