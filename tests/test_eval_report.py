"""The held-out report's paired comparison: arithmetic on hand-made rows (no model needed)."""
from __future__ import annotations

import json

import pytest

from trainer.evaluate import comparisons, item_accuracy, markdown, merge_reports, paired_difference


def row(task, method, k, seed, correct):
    return {"task": task, "method": method, "k": k, "seed": seed, "accuracy": sum(correct) / len(correct),
            "correct": correct}


ROWS = [
    row("a", "standard_init", 5, 0, [1, 0, 0, 1]), row("a", "standard_init", 5, 1, [1, 0, 1, 1]),
    row("a", "meta_init", 5, 0, [1, 1, 1, 1]), row("a", "meta_init", 5, 1, [1, 1, 0, 1]),
    row("b", "standard_init", 5, 0, [0, 1]), row("b", "meta_init", 5, 0, [0, 1]),
    # An older report's row has no per-item results: it cannot be paired and is left out.
    {"task": "c", "method": "standard_init", "k": 5, "seed": 0, "accuracy": 0.5},
    {"task": "c", "method": "meta_init", "k": 5, "seed": 0, "accuracy": 1.0},
]


def test_paired_difference_averages_seeds_per_item_then_combines_tasks():
    p = paired_difference(item_accuracy(ROWS), ("meta_init", 5), ("standard_init", 5))
    # Task a, per item over seeds: meta [1, 1, .5, 1] vs standard [1, 0, .5, 1] -> d = [0, 1, 0, 0].
    assert p["tasks"]["a"]["diff"] == pytest.approx(0.25) and p["tasks"]["a"]["se"] == pytest.approx(0.25)
    assert p["tasks"]["b"] == {"diff": 0.0, "se": 0.0, "n_items": 2}
    assert set(p["tasks"]) == {"a", "b"}
    assert p["diff"] == pytest.approx(0.125) and p["ci95"] == pytest.approx(1.96 * 0.125)
    # The other way round, the difference flips and the interval stays.
    q = paired_difference(item_accuracy(ROWS), ("standard_init", 5), ("meta_init", 5))
    assert q["diff"] == pytest.approx(-0.125) and q["ci95"] == pytest.approx(p["ci95"])
    assert paired_difference(item_accuracy(ROWS), ("meta_init", 5), ("full_data", 40)) is None


def test_items_scored_on_a_different_test_cap_are_not_paired():
    rows = ROWS + [row("d", "standard_init", 5, 0, [1, 0, 1]), row("d", "meta_init", 5, 0, [1, 0])]
    assert "d" not in paired_difference(item_accuracy(rows), ("meta_init", 5), ("standard_init", 5))["tasks"]


def test_comparisons_ask_the_issues_questions_for_every_k_of_every_init():
    cols = [("zero_shot", 0), ("in_context", 0), ("standard_init", 0), ("standard_init", 5), ("meta_init", 0),
            ("meta_init", 5), ("full_data", 150)]
    assert comparisons(cols) == [
        (("standard_init", 5), ("standard_init", 0)), (("standard_init", 5), ("in_context", 0)),
        (("standard_init", 5), ("full_data", 150)),
        (("meta_init", 5), ("meta_init", 0)), (("meta_init", 5), ("standard_init", 5)),
        (("meta_init", 5), ("in_context", 0)), (("meta_init", 5), ("full_data", 150))]
    # More than one K: each K is compared with the init's previous one, not only with K = 0.
    assert (("standard_init", 30), ("standard_init", 5)) in comparisons(cols + [("standard_init", 30)])


def test_markdown_shows_the_paired_table():
    report = {"command": "metalora evaluate ...", "git_commit": "abc", "n_train": 100, "seeds": [0, 1],
              "max_test": 4, "methods": ["standard_init", "meta_init"], "rows": ROWS}
    text = markdown(report)
    assert "## Paired differences" in text
    assert "| meta_init+5 − standard_init+5 | +0.250 | +0.000 | - | **+0.125 ± 0.245** (2 tasks) |" in text


def test_merge_lets_a_later_part_re_measure_a_column(tmp_path):
    def part(name, rows, **extra):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"command": name, "git_commit": name, "n_train": 100, "max_test": 4,
                                    "adapt_config": {}, "model_dir": "m", "seeds": [0, 1], "k_values": [5],
                                    "methods": sorted({r["method"] for r in rows}),
                                    "full_data": {"cap": 1000, "steps": 40}, "rows": rows, **extra}))
        return path

    old = part("old", ROWS[:6])
    new = part("new", [row("a", "meta_init", 5, 0, [0, 0, 0, 0]), row("a", "meta_init", 5, 1, [0, 0, 0, 1])],
               machine={"device": "cpu", "cpu_model": "X", "precision": "fp32"})
    merged = merge_reports([old, new], tmp_path / "merged")
    meta_a = sorted(r["accuracy"] for r in merged["rows"] if (r["task"], r["method"]) == ("a", "meta_init"))
    assert meta_a == [0.0, 0.25]  # the old part's two cells were replaced, not averaged in
    assert len(merged["rows"]) == 6
    assert [p["rows_replaced"] for p in merged["parts"]] == [2, 0]
    text = (tmp_path / "merged" / "results.md").read_text()
    assert "| a | 0.625 ± 0.177 | 0.125 ± 0.177 |" in text
    assert "Commits (by part, see `parts` in results.json): `old`, `new`" in text
    assert "Precision (by part): not recorded, fp32 on cpu (X)" in text  # a report from before it was recorded
