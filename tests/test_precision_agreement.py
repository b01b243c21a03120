"""benchmarks/precision_agreement.py: the same cells measured in two precisions, compared item by item."""
from __future__ import annotations

import json

import pytest

from benchmarks.precision_agreement import main


def report(precision: str, rows: list[dict]) -> dict:
    return {"command": f"metalora evaluate ({precision})", "git_commit": "abc", "seconds": 10.0,
            "machine": {"device": "cpu", "cpu_model": "X", "precision": precision}, "rows": rows}


def row(task, k, pred, gold):
    correct = [p == g for p, g in zip(pred, gold)]
    return {"task": task, "method": "standard_init", "k": k, "seed": 0, "pred": pred, "correct": correct,
            "accuracy": sum(correct) / len(correct)}


def test_cells_in_both_files_are_compared_item_by_item(tmp_path):
    gold = [0, 1, 0, 1, 0, 1, 0, 1]
    a = report("bf16 autocast", [row("sst2", 0, [0, 1, 0, 1, 0, 1, 0, 0], gold), row("rte", 5, [1] * 8, gold),
                                 row("copa", 0, [0] * 8, gold)])
    b = report("fp32", [row("sst2", 0, [0, 1, 0, 1, 0, 1, 1, 0], gold), row("rte", 5, [1] * 8, gold)])
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    result = main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "out")])
    assert [(c["task"], c["same_answer"]) for c in result["cells"]] == [("sst2", 7 / 8), ("rte", 1.0)]  # copa: A only
    assert result["same_answer"] == pytest.approx(15 / 16) and result["n_items"] == 16
    assert result["b_minus_a"]["diff"] == pytest.approx(-1 / 16)  # one sst2 item lost, rte unchanged
    text = (tmp_path / "out" / "precision.md").read_text()
    assert "bf16 autocast (A) against fp32 (B)" in text and "| sst2 standard_init+0 seed 0 | 8 | 0.875 | 0.750 | 0.875 |" in text
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(report("fp32", [])))
    with pytest.raises(SystemExit, match="no cell in common"):
        main([str(tmp_path / "a.json"), str(empty), "--out", str(tmp_path)])
