"""Parts 4 and 5: steps to quality (read from the evaluation's results, if any) and meta-training cost.

Part 5 times one first-order outer step against one plain LoRA fine-tuning step on the same batch, and
measures the peak memory of each. Each variant runs in a fresh subprocess (`python -m benchmarks.meta_cost
--variant plain|outer`) so peaks do not mix; the peak is the kernel's VmHWM (peak RSS), reset after the
model is loaded and warmed up (write 5 to /proc/self/clear_refs), so it covers the step only. tracemalloc's
peak is reported too but it only sees Python-heap allocations, not torch tensors.

The outer step is the real meta-trainer's (`trainer.meta.MetaLearner.meta_step`, fomaml) with one task whose
support and query sets are the two halves of the plain step's batch.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Callable

import torch

from adapters.base_model import base_model_path
from adapters.settings import Settings
from benchmarks.common import REPO, log, median
from tests.stack_data import examples as stack_examples
from trainer.config import AdaptConfig
from trainer.data import EncodedExample, collate, encode_examples, only_labelled_logits
from trainer.eval_stats import mean_accuracy_table
from trainer.inner_loop import lora_parameters
from trainer.meta import Episode, MetaConfig, MetaLearner
from trainer.precision import autocast_for

EVAL_RESULTS = "results/eval/results.json"  # what `metalora evaluate` writes (trainer/evaluate.py)


# ---------------------------------------------------------------- part 4
def steps_to_quality(eval_json: str | None) -> dict:
    """From the evaluation's rows: per held-out task, the fewest standard-init steps whose mean accuracy (over
    seeds) reaches what an init reaches in K steps. Only the K values the evaluation ran are known, so the
    answer is a grid point or a bound ("> the largest K tried")."""
    path = Path(eval_json) if eval_json else REPO / EVAL_RESULTS
    if not path.is_file():
        return {"status": "not run", "path": str(path),
                "note": "run `metalora evaluate` with standard_init and meta_init first (see docs/tasks.md)"}
    try:
        rows = json.loads(path.read_text())["rows"]
    except (ValueError, KeyError) as exc:
        return {"status": "error", "path": str(path), "error": f"not an evaluation results.json: {exc}"}
    shown = path.resolve().relative_to(REPO) if path.resolve().is_relative_to(REPO) else path
    return {"status": "read", "path": str(shown), **steps_to_quality_from_rows(rows)}


def steps_to_quality_from_rows(rows: list[dict]) -> dict:
    # Zero-shot is the standard init at K = 0 (LoRA B = 0).
    mean = mean_accuracy_table([{**r, "method": "standard_init"} if r["method"] == "zero_shot" else r for r in rows])
    out = []
    for (task, method, k), acc in sorted(mean.items()):
        if method not in ("meta_init", "multitask_init") or k == 0:
            continue
        curve = sorted((sk, a) for (t, m, sk), a in mean.items() if t == task and m == "standard_init")
        if not curve:
            continue
        reached = next((sk for sk, a in curve if a >= acc - 1e-9), None)
        largest = curve[-1][0]
        out.append({"task": task, "init": method, "k": k, "accuracy": round(acc, 4),
                    "standard_steps": reached, "standard_steps_bound": None if reached is not None else f">{largest}",
                    "speedup": None if reached is None else round(reached / k, 2),
                    "speedup_at_least": round(largest / k, 2) if reached is None else None,
                    "standard_curve": {str(sk): round(a, 4) for sk, a in curve}})
    return {"rows": out}


# ---------------------------------------------------------------- part 5, inside the subprocess
def _vm_hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _vm_rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


OUTER_STEP = "trainer.meta.MetaLearner.meta_step (fomaml, one task)"


def outer_step(model, examples: list[EncodedExample], config: AdaptConfig) -> Callable[[], dict]:
    """A callable running one real first-order outer step with one task (support = the first half of `examples`,
    query = the rest). The learner (θ copy + outer AdamW) is built here, once, as in training."""
    if len(examples) < 2:
        raise ValueError("need at least 2 examples (support and query)")
    half = len(examples) // 2
    meta_config = MetaConfig(method="fomaml", meta_batch_tasks=1, support_size=half,
                             query_size=len(examples) - half, inner=config)
    learner = MetaLearner(model, meta_config)
    episode = Episode("benchmark", list(examples[:half]), list(examples[half:]))
    return lambda: learner.meta_step([episode])


def _run_variant(variant: str, repeats: int) -> dict:
    # transformers + peft (through the engine and train-meta): only the measuring subprocess loads the model; the
    # parent process (parts 4 and 5's orchestration) reads JSON and starts processes.
    from trainer import train_meta
    from trainer.engine import AdaptEngine, split_holdout

    engine = AdaptEngine(base_model_path(Settings()), None, device="cpu")
    # K as meta-training runs it (train_meta's default inner_steps), not the worker's 30: part 5 is the cost
    # of an outer step of the trainer that ships.
    model, config = engine.model, AdaptConfig(steps=train_meta.inner_steps)
    encoded = encode_examples(engine.tokenizer, stack_examples("square"), config.max_seq_len)
    train, _ = split_holdout(encoded, config)
    # One batch for both: the plain step trains on it, the outer step splits it into its task's support and query.
    batch_examples = train[:config.batch_size]
    if variant == "plain":
        # The worker's own step (bf16 autocast where the CPU has it, logits only where labelled), so the ratio
        # isolates what the outer step adds rather than a precision difference.
        batch = only_labelled_logits(collate(batch_examples))
        opt = torch.optim.AdamW(list(lora_parameters(model).values()), lr=config.learning_rate, weight_decay=0.0)
        source = "plain"

        def step():
            model.train()
            with autocast_for(torch.device("cpu")):
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        step, source = outer_step(model, batch_examples, config), OUTER_STEP
    step()  # warm-up (allocator pools, lazy init)
    rss_before = _vm_rss_kb()
    reset_ok = _reset_peak()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _vm_hwm_kb()
    tracemalloc.start()  # one more step, untimed: tracing slows every Python allocation
    step()
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"variant": variant, "source": source, "inner_steps": config.steps if variant != "plain" else 0,
            "step_s": median(times), "times_s": times, "rss_before_mib": rss_before / 1024,
            "peak_rss_mib": peak / 1024, "peak_over_before_mib": (peak - rss_before) / 1024,
            "peak_reset": reset_ok, "tracemalloc_peak_mib": py_peak / 2**20, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------- part 5, orchestration
def meta_training_cost(repeats_outer: int = 2, rounds: int = 2) -> dict:
    runs: dict[str, list[dict]] = {"plain": [], "outer": []}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for r in range(rounds):
        for variant in (("plain", "outer") if r % 2 == 0 else ("outer", "plain")):
            repeats = 10 if variant == "plain" else repeats_outer
            proc = subprocess.run([sys.executable, "-m", "benchmarks.meta_cost", "--variant", variant,
                                   "--repeats", str(repeats)], cwd=REPO, env=env, capture_output=True,
                                  text=True, timeout=1200)
            if proc.returncode != 0:
                return {"status": "error", "variant": variant, "returncode": proc.returncode,
                        "stderr": proc.stderr[-2000:]}
            runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            log(f"part 5 {variant}: {runs[variant][-1]['step_s']:.3f} s/step,"
                f" peak +{runs[variant][-1]['peak_over_before_mib']:.0f} MiB over {runs[variant][-1]['rss_before_mib']:.0f}")
    p, o = runs["plain"], runs["outer"]
    mem_ratio_total = median([x["peak_rss_mib"] for x in o]) / median([x["peak_rss_mib"] for x in p])
    mem_ratio_step = (median([x["peak_over_before_mib"] for x in o]) /
                      max(median([x["peak_over_before_mib"] for x in p]), 1e-9))
    return {
        "status": "run", "source": o[0]["source"],
        "time_ratio_outer_over_plain": median([x["step_s"] for x in o]) / median([x["step_s"] for x in p]),
        "time_ratio_per_inner_step": (median([x["step_s"] for x in o]) / (o[0]["inner_steps"] + 1))
        / median([x["step_s"] for x in p]),
        "peak_rss_ratio": mem_ratio_total, "peak_step_memory_ratio": mem_ratio_step,
        "targets": {"peak_rss_ratio_max": 1.3},
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=("plain", "outer"), required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(_run_variant(args.variant, args.repeats)))


if __name__ == "__main__":
    main()
