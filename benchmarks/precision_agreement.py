"""How much the precision of an evaluation moves its cells: two `metalora evaluate` results.json files that
measured the same cells (task, method, K, seed) in different precisions (e.g. bf16 autocast on one CPU, fp32 on
one without native bf16), compared item by item.

    python -m benchmarks.precision_agreement A/results.json B/results.json --out results/eval/precision

Writes precision.md and precision.json: per cell, each file's accuracy and precision, the share of test items
where both picked the same option, and the paired difference B − A over all common cells with the bootstrap
interval of trainer/eval_stats.py (one seed per cell: over items).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from trainer.eval_stats import paired_bootstrap


def common_cells(a: dict, b: dict) -> list[tuple[dict, dict]]:
    """Rows of `a` and `b` measuring the same (task, method, K, seed) on the same items."""
    rows_b = {(r["task"], r["method"], r["k"], r["seed"]): r for r in b["rows"]}
    pairs = []
    for r in a["rows"]:
        other = rows_b.get((r["task"], r["method"], r["k"], r["seed"]))
        if other is not None and len(other["correct"]) == len(r["correct"]):
            pairs.append((r, other))
    return pairs


def compare(a: dict, b: dict) -> dict:
    pairs = common_cells(a, b)
    if not pairs:
        raise SystemExit("the two files have no cell in common (task, method, K, seed on the same items)")
    cells = []
    for ra, rb in pairs:
        same = [pa == pb for pa, pb in zip(ra["pred"] or ra["correct"], rb["pred"] or rb["correct"])]
        cells.append({"task": ra["task"], "method": ra["method"], "k": ra["k"], "seed": ra["seed"],
                      "n_items": len(same), "accuracy_a": ra["accuracy"], "accuracy_b": rb["accuracy"],
                      "same_answer": sum(same) / len(same)})
    diffs = {f"{ra['task']}/{ra['method']}+{ra['k']}/s{ra['seed']}":
             np.array([rb["correct"]], dtype=float) - np.array([ra["correct"]], dtype=float) for ra, rb in pairs}
    items = sum(c["n_items"] for c in cells)
    return {"precision_a": a["machine"].get("precision"), "precision_b": b["machine"].get("precision"),
            "machine_a": a["machine"], "machine_b": b["machine"], "commit_a": a["git_commit"],
            "commit_b": b["git_commit"], "command_a": a["command"], "command_b": b["command"],
            "wall_s_a": a.get("seconds"), "wall_s_b": b.get("seconds"), "cells": cells,
            "same_answer": sum(c["same_answer"] * c["n_items"] for c in cells) / items, "n_items": items,
            "b_minus_a": {k: v for k, v in paired_bootstrap(diffs).items() if k != "tasks"}}


def markdown(r: dict) -> str:
    d = r["b_minus_a"]
    lines = [f"# Precision: {r['precision_a']} (A) against {r['precision_b']} (B) on the same cells", "",
             f"A: `{r['command_a']}` at `{r['commit_a']}`, {r['precision_a']} on {r['machine_a'].get('cpu_model')}, "
             f"{r['wall_s_a']} s.", "",
             f"B: `{r['command_b']}` at `{r['commit_b']}`, {r['precision_b']} on {r['machine_b'].get('cpu_model')}, "
             f"{r['wall_s_b']} s.", "",
             "| cell | items | accuracy A | accuracy B | same answer |", "|---|---|---|---|---|"]
    for c in r["cells"]:
        lines.append(f"| {c['task']} {c['method']}+{c['k']} seed {c['seed']} | {c['n_items']} | "
                     f"{c['accuracy_a']:.3f} | {c['accuracy_b']:.3f} | {c['same_answer']:.3f} |")
    lines += ["", f"Same answer on {r['same_answer']:.3f} of {r['n_items']} items. B − A, mean over cells: "
              f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] (paired bootstrap over items, trainer/eval_stats.py);"
              f" {'resolved' if d['resolved'] else 'not resolved'}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    result = compare(json.loads(args.a.read_text()), json.loads(args.b.read_text()))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "precision.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
