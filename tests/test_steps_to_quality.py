"""Benchmark part 4 reads the evaluation's rows: the fewest standard-init steps that match an init at K."""
from __future__ import annotations

from benchmarks.meta_cost import steps_to_quality_from_rows


def rows(task: str, method: str, by_k: dict[int, list[float]]) -> list[dict]:
    return [{"task": task, "method": method, "k": k, "seed": s, "accuracy": a}
            for k, accs in by_k.items() for s, a in enumerate(accs)]


def test_match_bound_and_zero_shot_as_k0():
    data = (rows("t", "zero_shot", {0: [0.5, 0.5]}) + rows("t", "standard_init", {5: [0.5, 0.6], 30: [0.7, 0.8]})
            + rows("t", "meta_init", {5: [0.7, 0.7], 30: [0.9, 0.9]}) + rows("t", "multitask_init", {5: [0.4, 0.4]}))
    by = {(r["init"], r["k"]): r for r in steps_to_quality_from_rows(data)["rows"]}
    assert by["meta_init", 5]["standard_steps"] == 30 and by["meta_init", 5]["speedup"] == 6.0
    # Never reached on the grid: a lower bound, not a number.
    assert by["meta_init", 30]["standard_steps"] is None
    assert by["meta_init", 30]["standard_steps_bound"] == ">30" and by["meta_init", 30]["speedup_at_least"] == 1.0
    # Worse than zero-shot: standard needs 0 steps, no speed-up.
    assert by["multitask_init", 5]["standard_steps"] == 0 and by["multitask_init", 5]["speedup"] == 0.0
    assert by["meta_init", 5]["standard_curve"] == {"0": 0.5, "5": 0.55, "30": 0.75}
