"""Few-shot evaluation of inits on held-out task folders (docs/tasks.md format).

    evaluate(task_dirs, methods, k_values, seeds, n_train=100, out_dir=...)

Per task and seed, `n_train` examples are drawn (seeded) from the task's train split; every method scores
the (capped) test split:
- zero_shot: the base model (LoRA B = 0).
- in_context: as many of the n_train examples as fit in ICL_MAX_TOKENS before the test prompt.
- standard_init+K / multitask_init+K / meta_init+K: `adapt()` for K steps from PEFT's default init / the
  multitask init / the meta-learned init, on the n_train examples (each K scored as a fresh K-step run would
  be). A shared init is adapted with the learning rate and batch size in its metalora_meta.json, the
  procedure it was learned for (what the worker does too); the standard init with the harness's own.
- full_data: `adapt()` from the standard init on min(len(train), FULL_DATA_CAP) examples for
  FULL_DATA_STEPS steps (the "LoRA on the full data" reference, capped for CPU cost).
Accuracy: option tasks by the log-likelihood of each option's completion (+ EOS: the trained and served
format), argmax vs gold; open tasks by greedy generation and exact match after stripping whitespace.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from trainer.config import AdaptConfig
from trainer.data import (IGNORE_INDEX, ExampleTooLong, collate, encode_examples, model_device, only_labelled_logits,
                          to_device)
from trainer.inner_loop import adapt, get_lora_state, set_lora_state
from trainer.precision import autocast_for, cpu_features, precision_for
from trainer.tasks.format import Task, load_task

EVAL_METHODS = ("zero_shot", "in_context", "standard_init", "multitask_init", "meta_init", "full_data")
K_METHODS = ("standard_init", "multitask_init", "meta_init")
ICL_MAX_TOKENS = 1024  # context for in-context demos + test prompt; cost grows fast on CPU
FULL_DATA_CAP = 1000
FULL_DATA_STEPS = 250  # 2 epochs of 1000 at batch 8
DEFAULT_MAX_TEST = 200
GEN_MAX_NEW_TOKENS = 24


def encode_safe(tokenizer, examples: list[dict], max_seq_len: int) -> list:
    out = []
    for example in examples:
        try:
            out += encode_examples(tokenizer, [{"prompt": example["prompt"], "completion": example["completion"]}],
                                   max_seq_len)
        except ExampleTooLong:
            pass  # stated in the results as n_train_used
    return out


@torch.no_grad()
def option_logprobs(model, tokenizer, prompt: str, options: list[str], max_seq_len: int, prefix: str = "") -> list[float]:
    enc = encode_examples(tokenizer, [{"prompt": prefix + prompt, "completion": o} for o in options], 10**6)
    enc = [e if len(e.input_ids) <= max_seq_len else type(e)(e.input_ids[-max_seq_len:], e.labels[-max_seq_len:])
           for e in enc]
    device = model_device(model)
    # Logits only from just before the options' first token: with in-context demos the prompt is most of
    # each row, and the vocabulary projection + log-softmax over it would be wasted work.
    batch = to_device(only_labelled_logits(collate(enc)), device)
    with autocast_for(device):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=batch.get("logits_to_keep", 0)).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1).tolist()


@torch.no_grad()
def generate(model, tokenizer, prompt: str, prefix: str = "") -> str:
    ids = tokenizer(prefix + prompt, return_tensors="pt")["input_ids"].to(model_device(model))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=GEN_MAX_NEW_TOKENS,
                         do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def correct_items(model, tokenizer, task: Task, test: list[dict], max_seq_len: int, prefix: str = "") -> list[int]:
    """1/0 per test item. Kept per item (not only the accuracy) because every method scores the same items, so
    two methods can be compared item by item, which resolves far smaller differences than two accuracies."""
    model.eval()
    correct = []
    for ex in test:
        if task.has_options:
            scores = option_logprobs(model, tokenizer, ex["prompt"], ex["options"], max_seq_len, prefix)
            correct.append(int(max(range(len(scores)), key=scores.__getitem__) == ex["answer"]))
        else:
            text = generate(model, tokenizer, ex["prompt"], prefix)
            correct.append(int(text.strip().split("\n")[0].strip() == ex["completion"].strip()))
    return correct


def icl_prefix(tokenizer, demos: list[dict], test: list[dict], budget: int) -> tuple[str, int]:
    """Demos joined by blank lines, as many as fit in `budget` tokens next to the longest test prompt."""
    longest = max(len(tokenizer(ex["prompt"] + ex["completion"])["input_ids"]) for ex in test)
    prefix, used, n = "", longest, 0
    for d in demos:
        block = d["prompt"] + d["completion"] + "\n\n"
        cost = len(tokenizer(block)["input_ids"])
        if used + cost > budget:
            break
        prefix, used, n = prefix + block, used + cost, n + 1
    return prefix, n


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent.parent,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_init(path: Path | str, model, cfg: AdaptConfig) -> tuple[dict[str, torch.Tensor], AdaptConfig]:
    """A shared-init folder, read once through the engine's own reader (so an incomplete or inconsistent folder
    is refused here as the worker would refuse it): its weights keyed like `lora_parameters(model)` (peft saves
    them without the adapter name), and `cfg` with the learning rate and batch size it was meta-learned for."""
    from peft import set_peft_model_state_dict

    from trainer.engine import load_shared_init

    shared = load_shared_init(path)
    saved = get_lora_state(model)
    set_peft_model_state_dict(model, shared.state)
    state = get_lora_state(model)
    set_lora_state(model, saved)
    if all(torch.equal(state[n], saved[n]) for n in state):
        raise ValueError(f"{path}: no LoRA weight was loaded (key mismatch?)")
    learned = shared.adapt_config
    return state, replace(cfg, learning_rate=learned.learning_rate, batch_size=learned.batch_size)


def evaluate(task_dirs, methods, k_values, seeds, n_train: int = 100, out_dir: Path | str = "results/eval", *,
             model_dir: Path | str | None = None, meta_init: Path | str | None = None,
             multitask_init: Path | str | None = None, adapt_config: AdaptConfig | None = None,
             max_test: int = DEFAULT_MAX_TEST, command: str | None = None, device: str = "auto",
             full_data_steps: int = FULL_DATA_STEPS, icl_max_tokens: int = ICL_MAX_TOKENS) -> dict:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.precision import resolve_device

    unknown = set(methods) - set(EVAL_METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from {EVAL_METHODS}")
    if ("meta_init" in methods and not meta_init) or ("multitask_init" in methods and not multitask_init):
        raise ValueError("meta_init / multitask_init need the path of the corresponding shared-init folder")
    if model_dir is None:
        from adapters.settings import Settings
        from trainer.model_prep import ensure_base_model
        model_dir = ensure_base_model(Settings())
    cfg = adapt_config or AdaptConfig(holdout_fraction=0.0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev)
    torch.manual_seed(0)
    model = get_peft_model(base, cfg.lora_config())
    standard = get_lora_state(model)
    inits = {"standard_init": standard}
    # Each init is adapted with the procedure it was learned for (its learning rate and batch size); K is swept.
    procedures = {"standard_init": cfg}
    for method, path in (("meta_init", meta_init), ("multitask_init", multitask_init)):
        if method in methods:
            inits[method], procedures[method] = load_init(path, model, cfg)
    zero = {n: (torch.zeros_like(t) if "lora_B" in n else t) for n, t in standard.items()}

    rows: list[dict] = []
    t_start = time.time()
    commit = git_commit()
    machine = {"device": str(dev), "cpu_model": cpu_features()["model"], "precision": precision_for(dev)}

    def report() -> dict:
        return {"command": command or " ".join(sys.argv), "git_commit": commit, "machine": machine,
                "model_dir": str(model_dir),
                "adapt_config": cfg.to_dict(), "n_train": n_train, "max_test": max_test, "seeds": list(seeds),
                "k_values": list(k_values), "methods": list(methods), "meta_init": str(meta_init) if meta_init else None,
                "multitask_init": str(multitask_init) if multitask_init else None,
                "procedures": {m: {"learning_rate": c.learning_rate, "batch_size": c.batch_size}
                               for m, c in procedures.items()},
                "full_data": {"cap": FULL_DATA_CAP, "steps": full_data_steps}, "icl_max_tokens": icl_max_tokens,
                "seconds": round(time.time() - t_start, 1), "rows": rows}

    for task_dir in task_dirs:
        task = load_task(task_dir)
        test = task.test[:max_test]
        for seed in seeds:
            sample = random.Random(seed).sample(task.train, min(n_train, len(task.train)))
            enc = encode_safe(tokenizer, sample, cfg.max_seq_len)

            def record(method, k, correct, **extra):
                acc = sum(correct) / len(correct)
                rows.append({"task": task.name, "seed": seed, "method": method, "k": k, "accuracy": acc,
                             "n_train_used": len(enc), "n_test": len(test), "correct": correct, **extra})
                print(f"{task.name} seed {seed} {method} K={k}: {acc:.3f}", flush=True)

            if "zero_shot" in methods:
                set_lora_state(model, zero)
                record("zero_shot", 0, correct_items(model, tokenizer, task, test, 10**6))
            if "in_context" in methods:
                set_lora_state(model, zero)
                prefix, n_demos = icl_prefix(tokenizer, sample, test, icl_max_tokens)
                record("in_context", 0, correct_items(model, tokenizer, task, test, icl_max_tokens, prefix),
                       n_demos=n_demos)
            for method in K_METHODS:
                if method not in methods:
                    continue
                # One run to the largest K, scored as it passes each K: batch order and AdamW have no
                # dependence on the total step count, so step k of a long run is exactly a k-step run.
                set_lora_state(model, inits[method])
                if 0 in k_values:
                    record(method, 0, correct_items(model, tokenizer, task, test, 10**6))

                def score_at(step: int, _loss: float, method=method) -> None:
                    if step in k_values:
                        record(method, step, correct_items(model, tokenizer, task, test, 10**6))
                        model.train()  # correct_items() switched to eval mode; the run continues training

                if max(k_values) > 0:
                    adapt(model, enc, replace(procedures[method], steps=max(k_values), seed=seed), on_step=score_at)
            if "full_data" in methods:
                full = encode_safe(tokenizer, random.Random(seed).sample(task.train, min(FULL_DATA_CAP, len(task.train))),
                                   cfg.max_seq_len)
                set_lora_state(model, standard)
                adapt(model, full, replace(cfg, steps=full_data_steps, seed=seed))
                record("full_data", full_data_steps, correct_items(model, tokenizer, task, test, 10**6),
                       n_full=len(full))
        write_report(report(), out)  # after every task, so a run cut short keeps what it measured
    return report()


def write_report(report: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(markdown(report))
    plot(report, out)
    return report


def merge_reports(paths: list[Path], out: Path) -> dict:
    """One table from runs split by method or task (so they can run in parallel); each part keeps its
    own command, commit and settings under `parts`. A later part's row replaces an earlier part's row for the
    same (task, method, K, seed), so one column can be re-measured (a new init, new code) without rerunning the
    rest; each part records how many of its rows were replaced."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    cells: dict[tuple, tuple[int, dict]] = {}
    for i, part in enumerate(parts):
        for r in part["rows"]:
            cells[(r["task"], r["method"], r["k"], r["seed"])] = (i, r)
    kept = [sum(1 for i, _ in cells.values() if i == n) for n in range(len(parts))]
    merged = {key: parts[0][key] for key in ("n_train", "max_test", "adapt_config", "model_dir")}
    merged.update({
        "command": " && ".join(p["command"] for p in parts), "git_commit": parts[0]["git_commit"],
        "seeds": sorted({s for p in parts for s in p["seeds"]}),
        "k_values": sorted({k for p in parts for k in p["k_values"]}),
        "methods": [m for m in EVAL_METHODS if any(m in p["methods"] for p in parts)],
        "full_data": next((p["full_data"] for p in parts if "full_data" in p["methods"]), parts[0]["full_data"]),
        "parts": [{**{k: v for k, v in p.items() if k != "rows"}, "rows_replaced": len(p["rows"]) - kept[n]}
                  for n, p in enumerate(parts)],
        "rows": [r for _, r in cells.values()],
    })
    return write_report(merged, out)


def _by_cell(rows) -> dict[tuple, list[float]]:
    acc: dict[tuple, list[float]] = {}
    for r in rows:
        acc.setdefault((r["task"], r["method"], r["k"]), []).append(r["accuracy"])
    return acc


def mean_accuracy_table(rows) -> dict[tuple, float]:
    """(task, method, K) -> accuracy averaged over seeds."""
    return {k: sum(v) / len(v) for k, v in _by_cell(rows).items()}


def _mean_and_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    return mean, (sum((x - mean) ** 2 for x in values) / max(1, len(values) - 1)) ** 0.5


def _spread_table(rows) -> dict[tuple, float]:
    """Standard deviation over seeds (0 with one seed)."""
    return {k: _mean_and_sd(v)[1] for k, v in _by_cell(rows).items()}


def item_accuracy(rows) -> dict[tuple, list[float]]:
    """(task, method, K) -> each test item's accuracy averaged over seeds (rows without per-item results, from
    older reports, are left out)."""
    per_seed: dict[tuple, list[list[int]]] = {}
    for r in rows:
        if r.get("correct"):
            per_seed.setdefault((r["task"], r["method"], r["k"]), []).append(r["correct"])
    return {cell: [sum(items) / len(items) for items in zip(*runs)] for cell, runs in per_seed.items()
            if len({len(run) for run in runs}) == 1}


def paired_difference(items: dict[tuple, list[float]], column: tuple[str, int],
                      reference: tuple[str, int]) -> dict | None:
    """Accuracy of `column` minus `reference` ((method, K) pairs), item by item on the test items both scored
    (`items` is `item_accuracy(rows)`, built once for all comparisons of a report).
    Per task: the mean difference and its standard error over items; overall: the mean over tasks, whose standard
    error combines the tasks'. The interval counts the test items as the sample (seeds are averaged first), which
    is the noise that dominates with tens of items per task."""
    tasks = sorted(t for t, m, k in items if (m, k) == column and (t, *reference) in items
                   and len(items[(t, *reference)]) == len(items[(t, *column)]))
    if not tasks:
        return None
    per_task = {}
    for t in tasks:
        d = [a - b for a, b in zip(items[(t, *column)], items[(t, *reference)])]
        mean, sd = _mean_and_sd(d)
        per_task[t] = {"diff": mean, "se": sd / len(d) ** 0.5, "n_items": len(d)}
    diff = sum(v["diff"] for v in per_task.values()) / len(tasks)
    se = sum(v["se"] ** 2 for v in per_task.values()) ** 0.5 / len(tasks)
    return {"diff": diff, "ci95": 1.96 * se, "tasks": per_task}


def comparisons(methods_and_ks: list[tuple[str, int]]) -> list[tuple[tuple[str, int], tuple[str, int]]]:
    """The issue's questions, for every K > 0 of an init: what did the steps since its previous K add, does it
    beat the standard init at the same K, the in-context examples, and how far is it from full-data LoRA? The
    standard init is held to the last two too."""
    present = set(methods_and_ks)
    full = [c for c in methods_and_ks if c[0] == "full_data"]
    out = []
    for m, k in methods_and_ks:
        if m not in K_METHODS or k == 0:
            continue
        fewer = [kk for mm, kk in methods_and_ks if mm == m and kk < k]
        if fewer:
            out.append(((m, k), (m, max(fewer))))
        if m != "standard_init" and ("standard_init", k) in present:
            out.append(((m, k), ("standard_init", k)))
        if ("in_context", 0) in present:
            out.append(((m, k), ("in_context", 0)))
        out += [((m, k), f) for f in full]
    return out


def _column_name(method: str, k: int) -> str:
    return method + (f"+{k}" if method in K_METHODS else "")


def markdown(report: dict) -> str:
    means, spreads = mean_accuracy_table(report["rows"]), _spread_table(report["rows"])
    tasks = sorted({t for t, _, _ in means})
    cols = sorted({(m, k) for _, m, k in means}, key=lambda mk: (EVAL_METHODS.index(mk[0]), mk[1]))
    head = [_column_name(m, k) for m, k in cols]
    # A merged report was measured by several commits: name them all, in part order, not only the first's.
    commits = list(dict.fromkeys(part["git_commit"] for part in report.get("parts", []))) or [report["git_commit"]]
    machines = [part.get("machine") for part in report.get("parts", [])] or [report.get("machine")]
    lines = ["# Few-shot evaluation", "", f"Command: `{report['command']}`",
             ("Commit: " if len(commits) == 1 else "Commits (by part, see `parts` in results.json): ") +
             ", ".join(f"`{c}`" for c in commits),
             ("Precision: " if len(machines) == 1 else "Precision (by part): ") + ", ".join(
                 f"{m['precision']} on {m['device']} ({m['cpu_model']})" if m else "not recorded" for m in machines),
             f"n_train={report['n_train']}, seeds={report['seeds']}, test items per task <= {report['max_test']};" +
             (f" full_data = {report['full_data']['steps']} steps on <= {report['full_data']['cap']} train examples;"
              if "full_data" in report["methods"] else "") +
             " cells: mean ± standard deviation over seeds; the last row averages the task means.", "",
             "| task | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(f"{means[(t, m, k)]:.3f} ± {spreads[(t, m, k)]:.3f}"
                                             if (t, m, k) in means else "-" for m, k in cols) + " |")
    # A run cut short covers some tasks with fewer methods: average only over tasks every column has, so the
    # columns stay comparable, and say which tasks those are.
    complete = [t for t in tasks if all((t, m, k) in means for m, k in cols)]
    if complete:
        lines.append(f"| **mean over {len(complete)} task(s) with every column** | " + " | ".join(
            f"{sum(means[(t, m, k)] for t in complete) / len(complete):.3f}" for m, k in cols) + " |")
    if len(complete) < len(tasks):
        lines.append("")
        lines.append(f"Tasks with every column: {', '.join(complete) or 'none'}; '-' = not run.")
    items = item_accuracy(report["rows"])
    paired = [(a, b, paired_difference(items, a, b)) for a, b in comparisons(cols)]
    paired = [(a, b, p) for a, b, p in paired if p]
    if paired:
        lines += ["", "## Paired differences", "",
                  "Accuracy of one column minus another on the same test items (seeds averaged first); "
                  "± is a 95 % interval over the items. A difference whose interval contains 0 is not resolved "
                  "by this many items.", "",
                  "| comparison | " + " | ".join(tasks) + " | mean over tasks |", "|" + "---|" * (len(tasks) + 2)]
        for a, b, p in paired:
            lines.append(f"| {_column_name(*a)} − {_column_name(*b)} | " + " | ".join(
                f"{p['tasks'][t]['diff']:+.3f}" if t in p["tasks"] else "-" for t in tasks) +
                f" | **{p['diff']:+.3f} ± {p['ci95']:.3f}** ({len(p['tasks'])} tasks) |")
    return "\n".join(lines) + "\n"


def _cell(means: dict, task: str, method: str, k: int) -> float | None:
    if method == "standard_init" and k == 0 and (task, method, 0) not in means:
        return means.get((task, "zero_shot", 0))
    return means.get((task, method, k))


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
    # The mean curve uses only tasks where every K method was run, as in the table.
    complete = [t for t in tasks if all(any(tt == t and mm == m for tt, mm, _ in means)
                                        for m in K_METHODS if any(mm == m for _, mm, _ in means))]
    paths = []
    for t in tasks + (["mean"] if complete else []):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for m in K_METHODS:
            ks = sorted({k for tt, mm, k in means if mm == m and (tt == t or t == "mean")})
            if not ks:
                continue
            # K = 0 from the standard init is the base model, i.e. zero-shot.
            if m == "standard_init" and 0 not in ks and any(mm == "zero_shot" for _, mm, _ in means):
                ks = [0] + ks
            ks = [k for k in ks if all(_cell(means, tt, m, k) is not None for tt in (complete if t == "mean" else [t]))]
            if not ks:
                continue
            ys = [_cell(means, t, m, k) if t != "mean" else sum(_cell(means, tt, m, k) for tt in complete) / len(complete)
                  for k in ks]
            ax.plot(ks, ys, marker="o", label=m)
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


def main(argv: list[str] | None = None) -> None:
    import argparse
    p = argparse.ArgumentParser(description="few-shot evaluation of LoRA inits on task folders")
    p.add_argument("task_dirs", nargs="+", type=Path)
    p.add_argument("--methods", default=",".join(EVAL_METHODS))
    p.add_argument("--k", default="0,5,10,30")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--n-train", type=int, default=100)
    p.add_argument("--max-test", type=int, default=DEFAULT_MAX_TEST)
    p.add_argument("--meta-init", type=Path)
    p.add_argument("--multitask-init", type=Path)
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--out-dir", type=Path, default=Path("results/eval"))
    p.add_argument("--full-data-steps", type=int, default=FULL_DATA_STEPS)
    p.add_argument("--icl-max-tokens", type=int, default=ICL_MAX_TOKENS)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--merge", action="store_true", help="task_dirs are results.json files to merge into --out-dir")
    a = p.parse_args(argv)
    if a.merge:
        merge_reports(a.task_dirs, a.out_dir)
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    evaluate(a.task_dirs, a.methods.split(","), [int(k) for k in a.k.split(",")], [int(s) for s in a.seeds.split(",")],
             a.n_train, a.out_dir, model_dir=a.model_dir, meta_init=a.meta_init, multitask_init=a.multitask_init,
             max_test=a.max_test, full_data_steps=a.full_data_steps, icl_max_tokens=a.icl_max_tokens,
             command=" ".join(["metalora evaluate", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    main()
