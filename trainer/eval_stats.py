"""Statistics of an evaluation report: per-cell accuracy, balanced accuracy and majority rate, and paired
differences between two methods with a bootstrap interval over adaptation seeds AND test items.

Why both: with few seeds the spread between seeds (which 100 training examples were drawn, the data order) is as
large as the item noise, and an interval over items alone (seeds averaged first) understates it. Each bootstrap
replicate draws, per task, the seeds with replacement and the test items with replacement; the pairing keeps seed s
and item i of one method against seed s and item i of the other, which share the training sample and the question.
Tasks are resampled independently: a seed of one task shares nothing with the same seed number of another but the
RNG's starting value, and tasks may have been run with different numbers of seeds.

Few seeds: drawing S seeds with replacement gives the seeds' mean a variance of (S - 1) / S times the right one
(half of it at 2 seeds), so each replicate's departure over seeds is scaled back by sqrt(S / (S - 1)) (the rescaled
bootstrap). One seed has no spread to resample: its interval covers the items only, and the tables say so.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

BOOTSTRAP_REPLICATES = 2000
BOOTSTRAP_SEED = 0


def mean_and_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    return mean, (sum((x - mean) ** 2 for x in values) / max(1, len(values) - 1)) ** 0.5


def balanced_accuracy(preds: list[int], golds: list[int]) -> float:
    """Mean recall over the gold classes present: a constant answer scores 1 / (number of classes) whatever the
    class balance, so it cannot pass for learning."""
    recalls = []
    for label in sorted(set(golds)):
        picked = [p == g for p, g in zip(preds, golds) if g == label]
        recalls.append(sum(picked) / len(picked))
    return sum(recalls) / len(recalls)


def majority_rate(golds: list[int]) -> float:
    """Accuracy of always answering the most frequent gold option."""
    return Counter(golds).most_common(1)[0][1] / len(golds)



def cells(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(task, method, K) -> its rows, one per seed, sorted by seed."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["task"], r["method"], r["k"]), []).append(r)
    return {key: sorted(v, key=lambda r: r["seed"]) for key, v in out.items()}


def paired_bootstrap(diffs: dict[str, np.ndarray], replicates: int = BOOTSTRAP_REPLICATES,
                     seed: int = BOOTSTRAP_SEED) -> dict:
    """`diffs[task]` is a (seeds x items) array of a[s, i] - b[s, i]. Returns the mean over tasks of each task's mean
    difference, and its 95 % percentile interval from resampling, per task, seeds (rescaled) and items."""
    rng = np.random.default_rng(seed)
    totals = np.zeros(replicates)
    per_task = {}
    for task, d in sorted(diffs.items()):
        n_seeds, n_items = d.shape
        seed_draw = rng.integers(0, n_seeds, size=(replicates, n_seeds))
        item_draw = rng.integers(0, n_items, size=(replicates, n_items))
        # Each seed's mean over the drawn items (one item draw for every seed: the items are shared), then the mean
        # over the drawn seeds, its departure from the all-seed mean rescaled for the few seeds.
        per_seed = d[:, item_draw].mean(axis=2).T  # (replicates, S)
        every_seed = per_seed.mean(axis=1)
        drawn = np.take_along_axis(per_seed, seed_draw, axis=1).mean(axis=1)
        scale = np.sqrt(n_seeds / (n_seeds - 1)) if n_seeds > 1 else 0.0
        resampled = every_seed + scale * (drawn - every_seed)
        totals += resampled
        lo, hi = np.percentile(resampled, [2.5, 97.5])
        per_task[task] = {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "n_items": int(n_items),
                          "n_seeds": int(n_seeds)}
    totals /= len(diffs)
    lo, hi = np.percentile(totals, [2.5, 97.5])
    diff = float(np.mean([d.mean() for d in diffs.values()]))
    seeds = sorted({v["n_seeds"] for v in per_task.values()})
    return {"diff": diff, "lo": float(lo), "hi": float(hi), "resolved": bool(lo > 0 or hi < 0),
            "n_seeds": seeds[0] if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}",
            "n_items": sum(v["n_items"] for v in per_task.values()), "tasks": per_task}


def paired_difference(by_cell: dict[tuple, list[dict]], column: tuple[str, int], reference: tuple[str, int],
                      metric: str = "correct") -> dict | None:
    """`column` minus `reference` ((method, K) pairs) on every task where both were run on the same items, over the
    seeds both ran; None where no task qualifies."""
    diffs = {}
    for (task, m, k), rows in by_cell.items():
        if (m, k) != column or (task, *reference) not in by_cell:
            continue
        # Paired on the seeds both ran (a part may have run a column with fewer seeds).
        ref = {r["seed"]: r for r in by_cell[(task, *reference)]}
        both = [r for r in rows if r["seed"] in ref]
        if not both:
            continue
        a = np.array([r[metric] for r in both], dtype=float)
        b = np.array([ref[r["seed"]][metric] for r in both], dtype=float)
        if a.shape != b.shape:
            continue
        diffs[task] = a - b
    return paired_bootstrap(diffs) if diffs else None


def mean_accuracy_table(rows: list[dict]) -> dict[tuple, float]:
    """(task, method, K) -> accuracy averaged over seeds."""
    return {key: sum(r["accuracy"] for r in v) / len(v) for key, v in cells(rows).items()}
