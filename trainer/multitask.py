"""MeTA-LoRA's own setting (issue 17): inits trained on the evaluated tasks' own ~100 examples, against few-shot LoRA.

    metalora multitask --seeds 0 --threads 2        # one seed: both inits on its draws, then a part in results/multitask
    metalora multitask --merge results/eval/parts/heldout-s0.json ... results/multitask/parts/multitask-s*.json

Per seed, on the held-out protocol's tasks, test items and scoring (trainer/evaluate.py PROTOCOLS["heldout"]):
1. each task's n_train examples are evaluate's `training_draw` for the seed: the few-shot LoRA (standard_init+K)
   adapts on exactly these, so the held-out parts' standard_init rows are that column and are merged, not rerun;
2. family_init: MeTA-LoRA's shared LoRA, meta-trained by trainer/family.py `train_family` (what POST /v1/inits
   runs) on the tasks' draws, support and query drawn from them only; each task's validation split is only reported;
3. family_multitask_init: one LoRA from the standard init on all tasks' draws mixed, THE inner loop `adapt()` with
   the worker's learning rate and batch, for at most the family's compute, stopped when the loss on the tasks'
   validation splits stops improving (trainer/selection.py, the rule full_data uses);
   family_full_fomaml: the seed's baseline, first-order MAML on every base weight (trainer/full_model.py) with the
   family's episodes, K and outer steps;
4. evaluate scores the inits at each K (K = 0: one adapter for every task) and writes the part with provenance:
   the inits' metalora_meta.json, the examples' digests, commit, machine, precision and wall time per stage.
Nothing reads a test item but the scoring in step 4. The inits stay under --runs-dir: they never ship and never
feed the unseen-task table (results/eval). A stage that finished is not run again (an init folder appears only
once complete, a seed with a part is skipped), so a run stopped between stages resumes where it was.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from adapters.adapt_options import FAMILY_DEFAULTS
from adapters.layout import SHARED_INIT_META, read_init_meta
from adapters.settings import Settings
from trainer.config import AdaptConfig
from trainer.data import encode_examples
from trainer.engine import AdaptEngine
from trainer.eval_report import FAMILY_METHODS, merge_reports, with_variant
from trainer.evaluate import (FULL_DATA_EVAL_EVERY, FULL_DATA_PATIENCE, PROTOCOLS, evaluate, fitting_examples,
                              protocol_task_dirs, training_draw)
from trainer.family import FAMILY_AGGREGATIONS, FAMILY_METHOD, FamilyConfig, train_family
from trainer.full_model import FULL_MODEL_METHOD, FullModelConfig, load_trainable, save_full_model_init, train_full_fomaml
from trainer.model_prep import ensure_base_model
from trainer.provenance import examples_digest, git_commit
from trainer.selection import adapt_selecting_k
from trainer.tasks.fetch import default_cache_dir
from trainer.tasks.format import load_task

PROTOCOL = "heldout"
# The table's columns: few-shot LoRA (the held-out parts' standard_init), the family inits, full-data LoRA.
TABLE_METHODS = ("standard_init", *FAMILY_METHODS, "full_data")


@dataclass(frozen=True)
class Recipe:
    """The options of one seed's two inits (recorded in each init; a resumed run must ask for the same ones).

    Defaults, fixed without looking at any result: the worker's family defaults (trainer/family.py: fomaml, every
    task in every outer step, K = 5, support = query = 16, AdamW outer lr 1e-3, inner lr 2e-3, batch 8, rank 8), but
    for `outer_steps`, the most that keeps one seed's family within ~20 min on 2 CPU cores (an outer step over the 8
    tasks is ~450 forward/backward passes, 1.5-2 min there: results/multitask/README.md), and `val_examples`, the
    first examples of each task's validation split, reported on (family) and stopped on (multi-task LoRA). A GPU
    runs far more outer steps in that time: pass --outer-steps."""
    outer_steps: int = 10
    steps: int = FAMILY_DEFAULTS["steps"]
    support_size: int = FAMILY_DEFAULTS["support_size"]
    query_size: int = FAMILY_DEFAULTS["query_size"]
    outer_lr: float = FAMILY_DEFAULTS["outer_lr"]
    val_examples: int = 16
    method: str = FAMILY_METHOD  # the aggregation of the task updates (an ablation: family_init[reptile], ...)

    def family_row(self, rank: int | None = None) -> str:
        """The name of the family init's rows and folder: the method's own name for the paper's aggregation at the
        default rank; an ablation's variant otherwise (family_init[reptile], family_init[r4])."""
        variants = ([self.method] if self.method != FAMILY_METHOD else []) + ([f"r{rank}"] if rank else [])
        return with_variant("family_init", "+".join(variants))

    def family_config(self, seed: int, procedure: AdaptConfig) -> FamilyConfig:
        return FamilyConfig(method=self.method, outer_steps=self.outer_steps, steps=self.steps, outer_lr=self.outer_lr,
                            support_size=self.support_size, query_size=self.query_size,
                            learning_rate=procedure.learning_rate, batch_size=procedure.batch_size,
                            rank=procedure.rank, alpha=procedure.alpha, seed=seed, max_seq_len=procedure.max_seq_len)

    def multitask_steps(self, num_tasks: int, batch_size: int) -> int:
        """The family's compute in optimizer steps of `batch_size`: per outer step and task, K support batches and
        one query batch are run forward and backward."""
        return math.ceil(self.outer_steps * num_tasks * (self.steps * batch_size + self.query_size) / batch_size)


@dataclass
class SeedData:
    """One seed's examples per task: the draw (as it fits max_seq_len) and the validation slice."""
    names: list[str]
    train: dict[str, list[dict]]
    validation: dict[str, list[dict]]

    def family_tasks(self) -> list[dict]:
        return [{"name": n, "examples": self.train[n], "validation": self.validation[n]} for n in self.names]

    def digests(self) -> dict[str, str]:
        return {n: examples_digest(self.train[n]) for n in self.names}


def seed_data(tokenizer, task_dirs: list[Path], seed: int, n_train: int, recipe: Recipe, max_seq_len: int) -> SeedData:
    names, train, validation = [], {}, {}
    for task_dir in task_dirs:
        task = load_task(task_dir)
        names.append(task.name)
        train[task.name] = fitting_examples(tokenizer, training_draw(task, seed, n_train), max_seq_len)[0]
        validation[task.name] = fitting_examples(tokenizer, task.validation, max_seq_len)[0][:recipe.val_examples]
        if not validation[task.name]:
            raise ValueError(f"task {task.name} has no validation example within max_seq_len={max_seq_len}")
    return SeedData(names, train, validation)


def _write_init(out: Path, save: Callable[[Path], None]) -> None:
    """The init folder appears complete or not at all: a stage is done iff its folder exists."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    os.replace(tmp, out)


def _finished(out: Path) -> dict:
    meta = read_init_meta(out)
    if meta is None:
        raise RuntimeError(f"{out}: the init was written without its {SHARED_INIT_META}")
    return meta


def _reuse(out: Path, setting: dict) -> dict | None:
    """The meta of a finished init for the same setting; None where there is none yet."""
    meta = read_init_meta(out)
    if meta is None:
        return None
    if meta.get("multitask_setting") != setting:
        raise SystemExit(f"{out} was trained for another setting (recipe, seed or draw): move it away or pick "
                         f"another --runs-dir\n  it has:  {meta.get('multitask_setting')}\n  asked:   {setting}")
    print(f"{out}: done before, reused", flush=True)
    return meta


def outer_step_printer(label: str, seed: int) -> Callable:
    """The progress line of a meta-training stage, after each outer step (trainer/family.py OuterStep)."""
    def progress(report) -> None:
        losses = {n: round(v, 4) for n, v in report.validation_loss.items() if v is not None}
        print(f"{label} seed {seed} outer step {report.step}/{report.total} query {report.query_loss} "
              f"validation {losses}", flush=True)
    return progress


def train_family_init(engine: AdaptEngine, data: SeedData, recipe: Recipe, seed: int, procedure: AdaptConfig,
                      out: Path, setting: dict) -> dict:
    meta = _reuse(out, setting)
    if meta is not None:
        return meta
    config = recipe.family_config(seed, procedure)
    started = time.time()

    metrics = train_family(engine, data.family_tasks(), config, outer_step_printer("family", seed))
    meta = {"multitask_setting": setting, "metrics": metrics, "family_config": asdict(config),
            "seconds": round(time.time() - started, 1), "git_commit": git_commit()}
    _write_init(out, lambda tmp: engine.save_init(tmp, config.adapt_config(), str(engine.base_model_dir), meta))
    return _finished(out)


def train_multitask_init(engine: AdaptEngine, data: SeedData, recipe: Recipe, seed: int, procedure: AdaptConfig,
                         out: Path, setting: dict) -> dict:
    meta = _reuse(out, setting)
    if meta is not None:
        return meta
    # The procedure the family is learned for (so adapting from either init runs the same K steps), seeded.
    config = recipe.family_config(seed, procedure).adapt_config()
    max_steps = recipe.multitask_steps(len(data.names), config.batch_size)
    started = time.time()
    with engine.lock:
        tok = engine.tokenizer
        train = [e for n in data.names for e in encode_examples(tok, data.train[n], config.max_seq_len)]
        held = [e for n in data.names for e in encode_examples(tok, data.validation[n], config.max_seq_len)]
        engine.reset_lora(config, shared=None)  # the standard init under the seed, as the family starts from
        # Stopped by full_data's rule (trainer/evaluate.py), so both "trained until validation stops" columns agree.
        chosen = adapt_selecting_k(
            engine.model, train, held, config, max_steps=max_steps, eval_every=FULL_DATA_EVAL_EVERY,
            patience=FULL_DATA_PATIENCE,
            on_eval=lambda step, loss: print(f"multi-task LoRA seed {seed} step {step}/{max_steps}: "
                                             f"validation {loss:.4f}", flush=True))
    metrics = {"method": "multitask", "num_train": len(train), "num_validation": len(held), "max_steps": max_steps,
               "eval_every": FULL_DATA_EVAL_EVERY, "patience": FULL_DATA_PATIENCE, "chosen_steps": chosen.k,
               "steps_run": chosen.steps_run, "validation_curve": chosen.curve,
               "tasks": [{"name": n, "num_train": len(data.train[n]), "examples_sha256": examples_digest(data.train[n])}
                         for n in data.names]}
    meta = {"multitask_setting": setting, "metrics": metrics, "seconds": round(time.time() - started, 1),
            "git_commit": git_commit()}
    _write_init(out, lambda tmp: engine.save_init(tmp, config, str(engine.base_model_dir), meta))
    return _finished(out)


def train_full_model_init(engine: AdaptEngine, data: SeedData, recipe: Recipe, seed: int, procedure: AdaptConfig,
                          out: Path, setting: dict) -> dict:
    config = FullModelConfig(recipe.family_config(seed, procedure))
    setting = {**setting, "full_model": {"inner_lr": config.inner_lr, "outer_lr": config.outer_lr}}
    meta = _reuse(out, setting)
    if meta is not None:
        return meta
    started = time.time()

    with engine.lock:
        model = load_trainable(engine.base_model_dir, engine.device)  # beside the engine's: the base stays intact
        metrics = train_full_fomaml(model, engine.tokenizer, data.family_tasks(), config,
                                     outer_step_printer("full-model FOMAML", seed))
        meta = {"multitask_setting": setting, "metrics": metrics, "seconds": round(time.time() - started, 1),
                "git_commit": git_commit()}
        _write_init(out, lambda tmp: save_full_model_init(model, engine.tokenizer, tmp, config, meta))
    return _finished(out)


def run_seed(seed: int, task_dirs: list[Path], recipe: Recipe, *, k_values: list[int], methods: list[str],
             model_dir: Path, runs_dir: Path, parts_dir: Path, device: str, command: str,
             rank: int | None = None) -> Path:
    """One seed end to end; returns its part. A seed whose part exists is skipped. Only the inits that `methods`
    scores are trained, and a part of fewer than every family method is named by its methods, so that a later run
    of the others is not mistaken for done. `rank`: the family's LoRA rank (an ablation; None = the default's)."""
    wanted = [m for m in FAMILY_METHODS if m in methods]
    suffix = "" if set(FAMILY_METHODS) <= set(methods) else "-" + "-".join(sorted(set(methods)))
    if recipe.method != FAMILY_METHOD:
        suffix += f"-{recipe.method}"
    if rank:
        suffix += f"-r{rank}"
    part = parts_dir / f"multitask-s{seed}{suffix}.json"
    if part.is_file():
        print(f"{part}: seed {seed} done before, skipped", flush=True)
        return part
    proto = PROTOCOLS[PROTOCOL]
    procedure = AdaptConfig()  # evaluate's: the draw fits its max_seq_len, the few-shot LoRA uses its lr and batch
    procedure = procedure.at_rank(rank) if rank else procedure
    engine = AdaptEngine(model_dir, shared_init=None, device=device)
    data = seed_data(engine.tokenizer, task_dirs, seed, proto.n_train, recipe, procedure.max_seq_len)
    setting = {"seed": seed, "recipe": asdict(recipe), "n_train": proto.n_train,
               "max_seq_len": procedure.max_seq_len, "train_sha256": data.digests(),
               **({"rank": rank} if rank else {})}  # absent at the default rank: earlier inits stay reusable
    folder = runs_dir / f"s{seed}"
    trainers = {"family_init": train_family_init, "family_multitask_init": train_multitask_init,
                FULL_MODEL_METHOD: train_full_model_init}
    family_row = recipe.family_row(rank)
    folders = {m: folder / (family_row if m == "family_init" else m) for m in wanted}
    inits = {m: trainers[m](engine, data, recipe, seed, procedure, folders[m], setting) for m in wanted}
    del engine  # evaluate loads its own model: one resident copy at a time
    evaluated = time.time()
    report = evaluate(task_dirs, methods, k_values, [seed], proto.n_train, folder / "eval", model_dir=model_dir,
                      **folders, row_names={"family_init": family_row},
                      adapt_config=procedure, max_test=proto.max_test, scoring=proto.scoring, protocol=PROTOCOL,
                      device=device, command=command,
                      provenance={"setting": "multitask", "inits": {m: {"path": str(folders[m]), "meta": meta}
                                                                    for m, meta in inits.items()}})
    # Wall time of the whole seed; the stages apart (an init reused from an earlier run counts its own time).
    stages = {m: meta["seconds"] for m, meta in inits.items()}
    stages["evaluate"] = round(time.time() - evaluated, 1)
    report.update(seconds=round(sum(stages.values()), 1), stage_seconds=stages)
    parts_dir.mkdir(parents=True, exist_ok=True)
    tmp = part.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, part)
    print(f"seed {seed}: {part} ({report['seconds']:.0f} s)", flush=True)
    return part


def build_parser() -> argparse.ArgumentParser:
    d = Recipe()
    p = argparse.ArgumentParser(prog="metalora multitask", description="MeTA-LoRA's multi-task setting: per seed, "
                                "a meta-learned init family and a multi-task LoRA trained on the held-out protocol "
                                "tasks' own draws, scored on their test items; or --merge the parts into a table.")
    p.add_argument("paths", nargs="*", type=Path, help="with --merge: the part files (held-out parts for the "
                   "few-shot LoRA column, results/multitask/parts/* for the family inits)")
    p.add_argument("--merge", action="store_true", help="merge the parts into --out-dir (results.md, results.json)")
    p.add_argument("--out-dir", type=Path, default=Path("results/multitask"), help="where --merge writes the table")
    p.add_argument("--seeds", default="0", help=f"seeds to run (the {PROTOCOL} protocol's: "
                   f"{','.join(map(str, PROTOCOLS[PROTOCOL].seeds))}); each one writes its own part")
    p.add_argument("--tasks", help=f"comma-separated subset of the protocol's tasks (default all: "
                   f"{','.join(PROTOCOLS[PROTOCOL].tasks)})")
    p.add_argument("--tasks-root", type=Path, default=default_cache_dir() / "olmo",
                   help="where the protocol's task folders are (built by `metalora prepare-tasks`)")
    p.add_argument("--k", default="0,30", help="K values scored from each init (0: the init alone)")
    p.add_argument("--methods", default=",".join(FAMILY_METHODS),
                   help=f"evaluated per seed, from {','.join(FAMILY_METHODS)},full_data (full_data is hours on CPU)")
    p.add_argument("--outer-steps", type=int, default=d.outer_steps, help="the family's outer steps N")
    p.add_argument("--steps", type=int, default=d.steps, help="the family's inner steps K in meta-training")
    p.add_argument("--support-size", type=int, default=d.support_size, help="support examples per task and outer step")
    p.add_argument("--query-size", type=int, default=d.query_size, help="query examples per task and outer step")
    p.add_argument("--outer-lr", type=float, default=d.outer_lr, help="the family's outer (AdamW) learning rate")
    p.add_argument("--family-method", choices=FAMILY_AGGREGATIONS, default=d.method,
                   help="how the task updates are aggregated (an ablation: fomaml, MeTA-LoRA's query-gradient mean, "
                        "is the paper's; reptile and average take train-meta's outer steps; rows family_init[<method>])")
    p.add_argument("--rank", type=int, help="the family's LoRA rank (an ablation, alpha / rank kept: rows "
                   "family_init[r<rank>]; the few-shot LoRA's is evaluate's --rank)")
    p.add_argument("--val-examples", type=int, default=d.val_examples,
                   help="first examples of each task's validation split: reported (family), stopped on (multi-task)")
    p.add_argument("--runs-dir", type=Path, default=Path("runs/multitask"), help="the inits, per seed (not committed)")
    p.add_argument("--parts-dir", type=Path, default=Path("results/multitask/parts"), help="where each seed's part goes")
    p.add_argument("--model-dir", type=Path, help="base model folder (default: the converted SmolLM2)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = build_parser().parse_args(argv)
    if a.merge:
        if not a.paths:
            raise SystemExit("--merge needs the part files")
        merge_reports(a.paths, a.out_dir, methods=list(TABLE_METHODS))
        return
    proto = PROTOCOLS[PROTOCOL]
    seeds = [int(s) for s in a.seeds.split(",")]
    if not set(seeds) <= set(proto.seeds):
        raise SystemExit(f"the {PROTOCOL} protocol has seeds {proto.seeds}; --seeds may only pick among them")
    names = a.tasks.split(",") if a.tasks else list(proto.tasks)
    off = [n for n in names if n not in proto.tasks]
    if off:
        raise SystemExit(f"the {PROTOCOL} protocol covers {', '.join(proto.tasks)}; not {off[0]}")
    methods = a.methods.split(",")
    if not set(methods) <= {*FAMILY_METHODS, "full_data"}:
        raise SystemExit(f"--methods: from {', '.join(FAMILY_METHODS)}, full_data")
    if (a.family_method != FAMILY_METHOD or a.rank) and methods != ["family_init"]:
        raise SystemExit("--family-method and --rank change the family init only: run them with --methods family_init")
    if a.threads:
        torch.set_num_threads(a.threads)
    task_dirs = [d for d in protocol_task_dirs(PROTOCOL, a.tasks_root) if d.name in names]
    recipe = Recipe(outer_steps=a.outer_steps, steps=a.steps, support_size=a.support_size, query_size=a.query_size,
                    outer_lr=a.outer_lr, val_examples=a.val_examples, method=a.family_method)
    model_dir = a.model_dir or ensure_base_model(Settings())
    for seed in seeds:
        run_seed(seed, task_dirs, recipe, k_values=[int(k) for k in a.k.split(",")], methods=methods,
                 model_dir=model_dir, runs_dir=a.runs_dir, parts_dir=a.parts_dir, device=a.device,
                 command=" ".join(["metalora multitask", *argv]), rank=a.rank)


if __name__ == "__main__":
    main()
