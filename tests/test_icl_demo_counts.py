"""benchmarks/icl_demo_counts.py: recorded in-context demo counts checked against today's rule, on the real
tokenizer and protocol-named task folders."""
from __future__ import annotations

import json

import pytest

from benchmarks.icl_demo_counts import main
from trainer.evaluate import ICL_MAX_TOKENS, PROTOCOLS


def rows(name: str, n: int) -> list[dict]:
    return [{"prompt": f"{name} {i}: is {'word ' * (i % 7)}good? ->", "completion": " yes",
             "options": [" yes", " no"], "answer": 0} for i in range(n)]


def test_a_recorded_count_that_the_rule_no_longer_gives_is_named_for_a_rerun(tmp_path):
    from trainer.tasks.format import write_task
    for name in PROTOCOLS["heldout"].tasks:
        write_task(tmp_path / "tasks" / name, {"train": rows(name, 120), "validation": rows(name, 4),
                                              "test": rows(name, 6)})
    args = ["--tasks-root", str(tmp_path / "tasks"), "--seeds", "0", "--out", str(tmp_path / "counts.md")]
    proto = PROTOCOLS["heldout"]
    part = {"protocol": "heldout", "n_train": proto.n_train, "max_test": proto.max_test, "draw": "random",
            "icl_max_tokens": ICL_MAX_TOKENS, "rows": [{"task": "sst2", "seed": 0, "method": "in_context",
                                                        "n_demos": 1}]}
    (tmp_path / "part.json").write_text(json.dumps(part))
    assert main([str(tmp_path / "part.json"), *args]) == 1  # 1 demo recorded, far more fit in the budget
    table = (tmp_path / "counts.md").read_text()
    assert "| sst2 | 0 | 1 |" in table and "DIFFERS: rerun" in table and "1 recorded cell(s) differ" in table

    today = int(next(line for line in table.splitlines() if line.startswith("| sst2 | 0 |")).split("|")[4])
    part["rows"][0]["n_demos"] = today
    (tmp_path / "part.json").write_text(json.dumps(part))
    assert main([str(tmp_path / "part.json"), *args]) == 0
    assert "| copa | 0 | - |" in (tmp_path / "counts.md").read_text()  # not recorded: reported, not a failure

    # A part of other test items (or a merged table, which records no budget) would be checked for other demos.
    (tmp_path / "other.json").write_text(json.dumps({**part, "max_test": 20}))
    with pytest.raises(SystemExit, match="not a part of this protocol"):
        main([str(tmp_path / "other.json"), *args])
