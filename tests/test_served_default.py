"""The procedure `/adapt` runs by default (init and K) is the one results/eval/served-default.json says the held-out
protocol chose: the worker's settings, job defaults and options must not drift from the evidence."""
from __future__ import annotations

import json
from pathlib import Path

from adapters.adapt_options import DEFAULTS
from adapters.settings import Settings
from trainer.engine import job_defaults, load_shared_init
from trainer.worker import shared_init_path

ROOT = Path(__file__).resolve().parent.parent
CHOSEN = json.loads((ROOT / "results" / "eval" / "served-default.json").read_text())
BASE_DIR = Path("/nonexistent") / "SmolLM2-135M-Instruct"  # shared_init_path reads only the folder's name


def test_the_record_names_its_evidence():
    assert CHOSEN["init"] in ("standard", "shipped")
    assert CHOSEN["steps"] == "auto" or isinstance(CHOSEN["steps"], int)
    for path in CHOSEN["evidence"]:
        assert (ROOT / path).is_file(), path


def test_worker_defaults_are_the_chosen_procedure(monkeypatch):
    monkeypatch.delenv("METALORA_SHARED_INIT", raising=False)
    path = shared_init_path(Settings(), BASE_DIR)
    if CHOSEN["init"] == "standard":
        assert path is None
        assert job_defaults(None).steps == CHOSEN["steps"] == DEFAULTS["steps"]
    else:
        assert path is not None
        assert job_defaults(load_shared_init(path)).steps == CHOSEN["steps"]


def test_the_shipped_init_stays_one_setting_away():
    # Not the default, but kept and documented: METALORA_SHARED_INIT=auto serves it (K from its metalora_meta.json).
    shipped = shared_init_path(Settings(shared_init="auto"), BASE_DIR)
    assert shipped is not None and job_defaults(load_shared_init(shipped)).steps == CHOSEN["shipped_init_k"]
