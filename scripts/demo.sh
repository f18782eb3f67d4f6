#!/usr/bin/env bash
# `make demo`: sandbox up, demo credentials stored encrypted, 30 days posted, sandbox down.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export DAGSTER_HOME="${DAGSTER_HOME:-$PWD/.dagster_home}"
export EXPENSIFY_EXACT_KEY_FILE="${EXPENSIFY_EXACT_KEY_FILE:-$PWD/.demo/fernet.keys}"
mkdir -p "$DAGSTER_HOME" .demo

[ -f "$EXPENSIFY_EXACT_KEY_FILE" ] || "$BIN/expensify-exact" secrets init-key --key-file "$EXPENSIFY_EXACT_KEY_FILE"

"$BIN/expensify-exact-sandbox" serve --exact-port 8765 --expensify-port 8766 > .demo/sandbox.log 2>&1 &
SANDBOX_PID=$!
trap 'kill $SANDBOX_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do
  "$BIN/python" -c "import httpx; httpx.get('http://127.0.0.1:8765/_sandbox/clock', timeout=1)" 2>/dev/null && break
  sleep 0.2
done

# The simulators' demo credentials (they open nothing else), stored encrypted like real ones.
eval "$("$BIN/expensify-exact-sandbox" credentials)"
"$BIN/expensify-exact" secrets set --connection vermeerhals-nl --from-env
START=$("$BIN/python" -c "import datetime; print(datetime.date.today() - datetime.timedelta(days=31))")
END=$("$BIN/python" -c "import datetime; print(datetime.date.today() - datetime.timedelta(days=1))")
echo "Running the main job for approval days $START .. $END (Dagster instance: $DAGSTER_HOME)"
"$BIN/expensify-exact" run --start "$START" --end "$END"
echo
echo "Open the same instance in the Dagster UI with:"
echo "  DAGSTER_HOME=$DAGSTER_HOME $BIN/dagster dev -m expensify_exact.definitions"
