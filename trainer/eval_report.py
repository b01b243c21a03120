"""An evaluation report written out: results.json (every row with its per-item answers), results.md (accuracy per
task and method, balanced accuracy and majority rate for binary tasks, paired differences with intervals over seeds
and items) and accuracy-vs-K plots; and merging the reports of runs split by method or task."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from trainer.eval_stats import (balanced_accuracy, cells, majority_rate, mean_accuracy_table, mean_and_sd,
                                 paired_difference)

# The evaluation's methods, in table order (trainer/evaluate.py runs them); the K methods are scored at several K.
# family_*: inits trained on the evaluated tasks' own draws (the multi-task setting, trainer/multitask.py), never
# on other tasks as multitask_init and meta_init are.
# family_full_fomaml: the seed's baseline, first-order MAML on every weight of the base model (trainer/full_model.py).
EVAL_METHODS = ("zero_shot", "in_context", "standard_init", "multitask_init", "meta_init", "family_multitask_init",
                "family_init", "family_full_fomaml", "auto_k", "full_data")
K_METHODS = ("standard_init", "multitask_init", "meta_init", "family_multitask_init", "family_init",
             "family_full_fomaml")
SHARED_INIT_METHODS = ("multitask_init", "meta_init", "family_multitask_init", "family_init")  # LoRA, from a folder
FAMILY_METHODS = ("family_multitask_init", "family_init", "family_full_fomaml")
# A table with family columns is the multi-task setting's, where the columns take the names MeTA-LoRA's paper
# (and issue 17) gives them.
FAMILY_LABELS = {"standard_init": "few-shot LoRA", "family_multitask_init": "multi-task LoRA",
                 "family_init": "MeTA-LoRA family", "family_full_fomaml": "full-model FOMAML",
                 "full_data": "full-data LoRA"}
# The seed's targets for MeTA-LoRA in that setting: (what it is compared with, by how much it must lead, the target
# in words). The last is "within 2-5 points of full-data LoRA", taken at its loose end: at most 0.05 behind it.
FAMILY_TARGETS = (("standard_init", 0.10, "over few-shot LoRA by >= 0.10"),
                  ("family_multitask_init", 0.05, "over multi-task LoRA by >= 0.05"),
                  ("full_data", -0.05, "at most 0.05 behind full-data LoRA"))


def write_report(report: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(markdown(report))
    plot(report, out)
    return report


def merge_reports(paths: list[Path], out: Path, methods: list[str] | None = None) -> dict:
    """One table from runs split by method or task (so they can run in parallel); each part keeps its own command,
    commit, machine and settings under `parts`. A later part's row replaces an earlier part's row for the same
    (task, method, K, seed), so one column can be re-measured without rerunning the rest; each part records how many
    of its rows were replaced. Parts of different protocols, scoring rules or training procedures (LoRA, optimiser,
    sequence length) are refused: their cells do not compare; so are parts whose task has other test items or train
    pool, or whose seed drew other examples. Precision is not refused (a CPU without native bf16 cannot reproduce
    bf16 autocast at a usable speed); the header names each part's, and results/eval/README.md measures the
    difference on the same cells.
    `methods`: keep only these methods' rows (a table of one setting from parts that measured more)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    for key, value in (("protocol", lambda p: p.get("protocol")), ("scoring", lambda p: p.get("scoring")),
                       ("n_train", lambda p: p.get("n_train")), ("procedure", _procedure),
                       ("LoRA rank and alpha", _lora_size)):
        values = {json.dumps(v, sort_keys=True) for p in parts if (v := value(p)) is not NOT_COMPARED}
        if len(values) > 1:
            raise ValueError(f"cannot merge reports with different {key}: {sorted(values)}")
    by_key: dict[tuple, tuple[int, dict]] = {}
    considered = [0] * len(parts)
    for i, part in enumerate(parts):
        for r in part["rows"]:
            if methods is None or split_variant(r["method"])[0] in methods:
                by_key[(r["task"], r["method"], r["k"], r["seed"])] = (i, r)
                considered[i] += 1
    _check_inits(parts, paths, by_key.values())
    kept = [sum(1 for i, _ in by_key.values() if i == n) for n in range(len(parts))]
    merged = {key: parts[0].get(key) for key in ("protocol", "scoring", "n_train", "max_test", "adapt_config",
                                                 "model_dir")}
    tasks = _merge_tasks(parts, paths)
    merged.update({
        "command": " && ".join(p["command"] for p in parts), "git_commit": parts[0]["git_commit"],
        "seeds": sorted({s for p in parts for s in p["seeds"]}),
        "k_values": sorted({k for p in parts for k in p["k_values"]}),
        "methods": sorted({m for p in parts for m in p["methods"] if methods is None or m in methods},
                          key=_method_rank),
        "tasks": tasks,
        "parts": [{**{k: v for k, v in p.items() if k not in ("rows", "tasks")}, "rows_replaced": considered[n] - kept[n],
                   "rows_left_out": len(p["rows"]) - considered[n]} for n, p in enumerate(parts)],
        "rows": [r for _, r in by_key.values()],
    })
    return write_report(merged, out)


def _check_inits(parts: list[dict], paths: list[Path], kept) -> None:
    """A column is one init per seed (a family init: trained on the seed's draws) or one init for every seed (the
    others): every row it keeps must have been scored from the same weights (each row's `init_sha256`; rows of
    older parts carry none and are not checked). A retrained init would otherwise pass for the column's one."""
    seen: dict[tuple, tuple[str, Path]] = {}
    for i, row in kept:
        digest = row.get("init_sha256")
        if digest is None:
            continue
        per_seed = split_variant(row["method"])[0] in FAMILY_METHODS
        first = seen.setdefault((row["method"], row["seed"] if per_seed else None), (digest, paths[i]))
        if first[0] != digest:
            which = f"seed {row['seed']}" if per_seed else "column"
            raise ValueError(f"cannot merge {paths[i]}: {row['method']} {which} was scored from other init weights "
                             f"than in {first[1]}; score it from one init")


def _procedure(part: dict) -> dict:
    """What the K steps of a part's rows were trained with, where every part must agree: the LoRA's modules and
    dropout, the optimisation, the sequence length (the seed and K vary by row; the rank by `_lora_size`)."""
    return {k: v for k, v in (part.get("adapt_config") or {}).items() if k not in ("seed", "steps", "rank", "alpha")}


NOT_COMPARED = object()


def _lora_size(part: dict):
    """The protocol's parts must agree on rank and alpha; a rank ablation (`rank` set) names its own in its rows."""
    config = part.get("adapt_config") or {}
    return NOT_COMPARED if part.get("rank") is not None else [config.get("rank"), config.get("alpha")]


def _merge_tasks(parts: list[dict], paths: list[Path]) -> dict[str, dict]:
    """Each task's record over the parts; a task must have the same test items (gold answers) and train pool in
    every part, and a seed the same drawn examples wherever a part recorded them (older parts did not)."""
    tasks: dict[str, dict] = {}
    for part, path in zip(parts, paths):
        for name, meta in part.get("tasks", {}).items():
            seen = tasks.setdefault(name, {})
            for key in ("n_test", "n_train_available", "gold"):
                if key in meta and key in seen and meta[key] != seen[key]:
                    raise ValueError(f"cannot merge {path}: task {name} has another {key} than an earlier part")
            for seed, digest in meta.get("train_sha256", {}).items():
                if seen.get("train_sha256", {}).get(seed, digest) != digest:
                    raise ValueError(f"cannot merge {path}: seed {seed} of task {name} drew other train examples "
                                     "than in an earlier part")
            draws = {**seen.get("train_sha256", {}), **meta.get("train_sha256", {})}
            seen.update(meta)
            if draws:
                seen["train_sha256"] = draws
    return tasks


def with_variant(method: str, variant: str | None) -> str:
    """The name of a method's rows in an ablation that varies it (`standard_init[kcenter]`); split_variant's inverse."""
    return f"{method}[{variant}]" if variant else method


def split_variant(method: str) -> tuple[str, str | None]:
    """`standard_init[kcenter]` -> ("standard_init", "kcenter"): an ablation's rows carry their variant in the
    method's name (trainer/evaluate.py variant_name)."""
    base, sep, rest = method.partition("[")
    return (base, rest.removesuffix("]")) if sep else (method, None)


def _method_rank(method: str) -> tuple[int, str]:
    base, variant = split_variant(method)
    return (EVAL_METHODS.index(base) if base in EVAL_METHODS else len(EVAL_METHODS), variant or "")


def column_name(method: str, k: int, labels: dict[str, str] | None = None) -> str:
    base, variant = split_variant(method)
    return ((labels or {}).get(base, base) + (f"[{variant}]" if variant else "")
            + (f"+{k}" if base in K_METHODS else ""))


def columns(by_cell: dict) -> list[tuple[str, int]]:
    return sorted({(m, k) for _, m, k in by_cell}, key=lambda mk: (_method_rank(mk[0]), mk[1]))


def comparisons(cols: list[tuple[str, int]]) -> list[tuple[tuple[str, int], tuple[str, int]]]:
    """For each init at each K > 0: the gain of its steps since its previous K, against the standard init at the
    same K and at its largest K (what a job got before any init shipped), against in-context examples and against
    full data. auto_k against the fixed-K columns of the init it adapts from."""
    present = set(cols)
    std_ks = [k for m, k in cols if m == "standard_init"]
    out = []
    for m, k in cols:
        base, variant = split_variant(m)
        if variant is not None:  # an ablation: against the column it varies, at the same K
            if (base, k) in present:
                out.append(((m, k), (base, k)))
            continue
        if m in K_METHODS and k > 0:
            fewer = [kk for mm, kk in cols if mm == m and kk < k]
            if fewer:
                out.append(((m, k), (m, max(fewer))))
            if m != "standard_init":
                for ref_k in sorted({k, max(std_ks, default=k)}):
                    if ("standard_init", ref_k) in present:
                        out.append(((m, k), ("standard_init", ref_k)))
            if m == "family_init":
                out += [((m, k), (other, k)) for other in ("family_multitask_init", "family_full_fomaml")
                        if (other, k) in present]
            if ("in_context", 0) in present:
                out.append(((m, k), ("in_context", 0)))
            if ("full_data", 0) in present:
                out.append(((m, k), ("full_data", 0)))
        if m == "auto_k":
            out += [((m, k), c) for c in cols if c[0] in K_METHODS and c[1] > 0]
    return out


def _header(report: dict, title: str) -> list[str]:
    commits = list(dict.fromkeys(part["git_commit"] for part in report.get("parts", []))) or [report["git_commit"]]
    machines = [part.get("machine") for part in report.get("parts", [])] or [report.get("machine")]
    seconds = [part.get("seconds") for part in report.get("parts", [])] or [report.get("seconds")]
    return [
        f"# {title}", "",
        f"Protocol: `{report.get('protocol') or 'none (ad hoc task list)'}`; option scoring: "
        f"`{report.get('scoring', 'sum+eos (before the scoring rule was recorded)')}` (trainer/scoring.py).",
        f"Command: `{report['command']}`",
        ("Commit: " if len(commits) == 1 else "Commits (by part, see `parts` in results.json): ") +
        ", ".join(f"`{c}`" for c in commits),
        ("Machine and precision: " if len(machines) == 1 else "Machine and precision (by part): ") + ", ".join(
            f"{m['precision']} on {m['device']} ({m['cpu_model']})" if m else "not recorded" for m in machines),
        f"Wall time: {' + '.join(f'{s:.0f} s' for s in seconds if s is not None)}.",
        f"n_train={report['n_train']}, seeds={report['seeds']}, test items per task <= {report['max_test']}. "
        "Cells: accuracy, mean ± standard deviation over seeds; the mean row averages the task means.", "",
    ]


def markdown(report: dict) -> str:
    by_cell = cells(report["rows"])
    tasks_meta = report.get("tasks", {})
    tasks = sorted({t for t, _, _ in by_cell})
    cols = columns(by_cell)
    acc = {key: mean_and_sd([r["accuracy"] for r in rows]) for key, rows in by_cell.items()}
    family = any(split_variant(m)[0] in FAMILY_METHODS for m, _ in cols)
    labels = FAMILY_LABELS if family else {}
    lines = _header(report, "Multi-task setting: inits trained on these tasks' own draws" if family
                    else "Few-shot evaluation")
    if family:
        lines += [f"Columns: {', '.join(f'{v} = `{k}`' for k, v in FAMILY_LABELS.items())} (trainer/multitask.py "
                  "trains the family inits on each seed's draw of every task's train split: the same examples "
                  "the few-shot LoRA adapts on).", ""]
    head = [column_name(m, k, labels) for m, k in cols]
    lines += ["| task (items, train examples) | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
    for t in tasks:
        meta = tasks_meta.get(t, {})
        label = f"{t} ({meta.get('n_test', '?')}, {min(report['n_train'], meta.get('n_train_available', 10**9))})"
        lines.append(f"| {label} | " + " | ".join(
            f"{acc[(t, m, k)][0]:.3f} ± {acc[(t, m, k)][1]:.3f}" if (t, m, k) in acc else "-" for m, k in cols) + " |")
    # An ablation column measured on fewer tasks gets '-' here rather than shrinking every other column's mean.
    complete = [t for t in tasks if all((t, m, k) in acc for m, k in cols if split_variant(m)[1] is None)]
    if complete:
        lines.append(f"| **mean over {len(complete)} task(s) with every column** | " + " | ".join(
            f"**{sum(acc[(t, m, k)][0] for t in complete) / len(complete):.3f}**"
            if all((t, m, k) in acc for t in complete) else "-" for m, k in cols) + " |")
    if len(complete) < len(tasks):
        # A partial column would shrink the common mean to a few tasks; the columns run on every task keep theirs.
        lines.append(f"| **mean over all {len(tasks)} tasks** (columns run on every task) | " + " | ".join(
            f"**{sum(acc[(t, m, k)][0] for t in tasks) / len(tasks):.3f}**"
            if all((t, m, k) in acc for t in tasks) else "-" for m, k in cols) + " |")
        lines += ["", f"Tasks with every column: {', '.join(complete) or 'none'}; '-' = not run."]
    seeds = {col: sorted({r["seed"] for (t, m, k), rows in by_cell.items() if (m, k) == col for r in rows})
             for col in cols}
    if len({tuple(v) for v in seeds.values()}) > 1:
        groups: dict[tuple, list[str]] = {}
        for col, v in seeds.items():
            groups.setdefault(tuple(v), []).append(column_name(*col, labels))
        listed = "; ".join(f"{', '.join(names)}: seed{'s' if len(v) > 1 else ''} {', '.join(map(str, v))}"
                           for v, names in groups.items())
        lines += ["", "Seeds per column, over its tasks (a cell averages its own seeds; a paired difference uses "
                  f"the seeds both columns ran on each task): {listed}."]
    if family:
        lines += _targets_section(by_cell, cols)
    lines += _binary_section(by_cell, tasks_meta, cols, labels)
    lines += _auto_k_section(by_cell)
    lines += _paired_section(by_cell, cols, tasks, labels)
    return "\n".join(lines) + "\n"


def _targets_section(by_cell: dict, cols) -> list[str]:
    """The seed's targets (FAMILY_TARGETS) for each K of the family init, each read off a paired interval: met when
    the whole interval clears the margin, missed when none of it does, not resolved otherwise. K = 0 (one adapter
    for every task of the family) is compared with the few-shot LoRA at its largest K. An ablation of the family
    (family_init[reptile], ...) is read against the same targets: each is a way to learn the family's init."""
    present = set(cols)
    lines = ["", "## The seed's targets", "",
             "MeTA-LoRA family over few-shot LoRA by >= 0.10 on the mean, over multi-task LoRA by >= 0.05, and at "
             "most 0.05 behind full-data LoRA (the seed: within 2-5 points). Difference of the means over tasks "
             "with its 95 % paired bootstrap interval over seeds x items (as below).", "",
             "| target | comparison | difference [95 % interval] | status |", "|---|---|---|---|"]
    for family, k in [(m, k) for m, k in cols if split_variant(m)[0] == "family_init"]:
        for ref, margin, target in FAMILY_TARGETS:
            ref_ks = [kk for m, kk in cols if m == ref and kk > 0]
            ref_k = {"full_data": 0, "standard_init": k if k in ref_ks else max(ref_ks, default=k)}.get(ref, k)
            name = f"{column_name(family, k, FAMILY_LABELS)} − {column_name(ref, ref_k, FAMILY_LABELS)}"
            p = paired_difference(by_cell, (family, k), (ref, ref_k)) if (ref, ref_k) in present else None
            if p is None:
                lines.append(f"| {target} | {name} | - | not measured |")
                continue
            status = "met" if p["lo"] >= margin else "missed" if p["hi"] < margin else "not resolved"
            lines.append(f"| {target} | {name} | **{p['diff']:+.3f}** [{p['lo']:+.3f}, {p['hi']:+.3f}] "
                         f"({len(p['tasks'])} tasks, {p['n_seeds']} seeds) | {status} |")
    return lines


def _binary_section(by_cell: dict, tasks_meta: dict, cols, labels: dict[str, str]) -> list[str]:
    binary = sorted(t for t, meta in tasks_meta.items() if meta.get("n_options") == [2] and meta.get("gold"))
    binary = [t for t in binary if any(key[0] == t for key in by_cell)]
    if not binary:
        return []
    lines = ["", "## Binary tasks: balanced accuracy", "",
             "Mean recall over the two gold answers (0.5 for any constant answer), mean over seeds, beside the "
             "majority-class rate of the test items (the accuracy of always giving the more frequent answer).", "",
             "| task | majority rate | " + " | ".join(column_name(m, k, labels) for m, k in cols) + " |",
             "|" + "---|" * (len(cols) + 2)]
    for t in binary:
        gold = tasks_meta[t]["gold"]
        cells_ = []
        for m, k in cols:
            rows = by_cell.get((t, m, k))
            if not rows or any(r.get("pred") is None for r in rows):
                cells_.append("-")
                continue
            values = [balanced_accuracy(r["pred"], gold[:len(r["pred"])]) for r in rows]
            cells_.append(f"{sum(values) / len(values):.3f}")
        lines.append(f"| {t} | {majority_rate(gold):.3f} | " + " | ".join(cells_) + " |")
    return lines


def _auto_k_section(by_cell: dict) -> list[str]:
    chosen = {t: [r.get("chosen_k") for r in rows] for (t, m, _), rows in by_cell.items() if m == "auto_k"}
    if not chosen:
        return []
    return ["", "## K chosen by auto_k (per seed)", "", "| task | K chosen |", "|---|---|"] + [
        f"| {t} | {', '.join(str(k) for k in ks)} |" for t, ks in sorted(chosen.items())]


def _paired_section(by_cell: dict, cols, tasks, labels: dict[str, str]) -> list[str]:
    paired = [(a, b, paired_difference(by_cell, a, b)) for a, b in comparisons(cols)]
    paired = [(a, b, p) for a, b, p in paired if p]
    if not paired:
        return []
    lines = ["", "## Paired differences", "",
             "Accuracy of one column minus another on the same test items and seeds. Mean over tasks, with a 95 % "
             "paired bootstrap interval that resamples the seeds (rescaled by sqrt(S / (S − 1)) for few seeds) and "
             "the items together (trainer/eval_stats.py); **resolved** when the interval excludes 0. A task both "
             "columns ran with one seed contributes item noise only: 'items only' marks such rows.", "",
             "| comparison | " + " | ".join(tasks) + " | mean over tasks [95 % interval] | |",
             "|" + "---|" * (len(tasks) + 3)]
    for a, b, p in paired:
        lines.append(f"| {column_name(*a, labels)} − {column_name(*b, labels)} | " + " | ".join(
            f"{p['tasks'][t]['diff']:+.3f}" if t in p["tasks"] else "-" for t in tasks) +
            f" | **{p['diff']:+.3f}** [{p['lo']:+.3f}, {p['hi']:+.3f}] ({len(p['tasks'])} tasks, {p['n_seeds']} seeds,"
            f" {p['n_items']} items{_items_only(p)})"
            f" | {'resolved' if p['resolved'] else 'not resolved'} |")
    return lines


def _items_only(p: dict) -> str:
    """Where the interval has no seed spread to cover: the tasks both columns ran with one seed."""
    single = sum(t["n_seeds"] == 1 for t in p["tasks"].values())
    if not single:
        return ""
    return ", items only" if single == len(p["tasks"]) else f", items only on {single} of {len(p['tasks'])} tasks"


def plot(report: dict, out: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'metalora[eval]'): no plots", file=sys.stderr)
        return []
    means = mean_accuracy_table(report["rows"])
    tasks = sorted({t for t, _, _ in means})
    paths = []
    for t in tasks + ["mean"]:
        scope = tasks if t == "mean" else [t]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        drawn = False
        for m in K_METHODS:
            ks = sorted({k for tt, mm, k in means if mm == m and tt in scope})
            # K = 0 from the standard init is the base model, i.e. zero-shot.
            cell = (lambda tt, k, m=m: means.get((tt, m, k), means.get((tt, "zero_shot", 0))
                                                  if m == "standard_init" and k == 0 else None))
            ks = ([0] if m == "standard_init" and 0 not in ks and ks else []) + ks
            ks = [k for k in ks if all(cell(tt, k) is not None for tt in scope)]
            if ks:
                ax.plot(ks, [sum(cell(tt, k) for tt in scope) / len(scope) for k in ks], marker="o", label=m)
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("K inner steps")
        ax.set_ylabel("accuracy")
        ax.set_title(t)
        ax.legend()
        fig.tight_layout()
        path = out / f"accuracy_vs_k_{t}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
