#!/usr/bin/env bash
# Failure drills on the real stack (tests/test_drills.py): worker SIGKILL, Redis outage + AOF restart,
# 320 concurrent completions over 8 adapters of 2 tenants, vLLM kill + restart; and one tenant flooding
# completions while another's p95 is measured (tests/test_drill_isolation.py). Each drill fails if its
# guarantee breaks and writes its figures to results/drills/<drill>.json; a summary is printed at the end.
#   scripts/drills.sh                 # all drills (~6-8 min on 2 CPU cores; needs redis-server on PATH)
#   scripts/drills.sh -k concurrent   # one drill (extra args go to pytest)
# METALORA_HEAVY_LOCK=/tmp/metalora-heavy.lock serialises with other heavy jobs on a shared box.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
export HF_HUB_OFFLINE=1
export METALORA_LOAD_DRILL=1  # tests/test_drill_isolation.py runs only here
cmd=("$PY" -m pytest -q -ra -s -p no:cacheprovider tests/test_drills.py tests/test_drill_isolation.py "$@")
if [[ -n "${METALORA_HEAVY_LOCK:-}" ]]; then cmd=(flock "$METALORA_HEAVY_LOCK" "${cmd[@]}"); fi
"${cmd[@]}"
rc=$?
"$PY" - <<'PY'
import json, pathlib
for path in sorted(pathlib.Path("results/drills").glob("*.json")):
    data = json.loads(path.read_text())
    keys = [k for k in data if any(w in k for w in ("requests", "5xx", "lost", "mixups", "errors", "seconds",
                                                     "recovered", "status", "orphans", "attempts", "max_latency",
                                                     "p95"))]
    print(f"{path.name}: " + ", ".join(f"{k}={data[k]}" for k in keys))
PY
exit $rc
