"""The parts of one `train-meta` run that trainer/train_meta.py's loop calls: setup (the task pool and its fixed
validation split, the model, the learner, resuming), validation, the step log, checkpoints and the export."""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters.settings import Settings
from trainer.data import EncodedExample, ExampleTooLong, encode_examples, mean_loss
from trainer.engine import save_shared_init
from trainer.inner_loop import adapt, set_lora_state
from trainer.meta import Episode, MetaConfig, MetaLearner, load_checkpoint, sample_episode, save_checkpoint
from trainer.model_prep import ensure_base_model
from trainer.precision import resolve_device
from trainer.provenance import git_commit
from trainer.scoring import answer_items
from trainer.tasks.format import Task
from trainer.tasks.pool import load_pool, split_names

DATA_SOURCE = "bigbench==1.0.0 JSON tasks via trainer.tasks.fetch"
# Resuming with other values of these would sample another pool or split, which the MetaConfig does not record.
POOL_ARGS = ("pool", "sample_by", "n_val_tasks")


@dataclass
class TaskPool:
    root: Path
    tasks: dict[str, Task]  # read once: the pool filter needs every task's kind, episodes and validation reuse them
    train_names: list[str]
    val_names: list[str]
    # An episode draws a group uniformly, then one of its tasks: by family, 20 arithmetic subtasks weigh as much as
    # one task and not 20 times more.
    groups: dict[str, list[str]]


def task_pool(tasks_dir: str, pool: str, sample_by: str, n_val_tasks: int, train_tasks_needed: int) -> TaskPool:
    root = Path(tasks_dir).expanduser()
    if "olmo" in root.parts:
        raise SystemExit(f"{root}: the OLMo tasks are held-out evaluation tasks, never meta-train on them")
    tasks = load_pool(root, pool)
    if len(tasks) < n_val_tasks + train_tasks_needed:
        raise SystemExit(f"{root} has {len(tasks)} tasks; run `python -m trainer.tasks.fetch` first")
    train_names, val_names = split_names(list(tasks), n_val_tasks)
    groups: dict[str, list[str]] = {}
    for name in train_names:
        groups.setdefault(name.split("__")[0] if sample_by == "family" else name, []).append(name)
    return TaskPool(root, tasks, train_names, val_names, groups)


def load_model(model_dir: str, device: torch.device, config: MetaConfig) -> tuple[Path, Any, Any]:
    """(model folder, tokenizer, the fp32 base model with peft's LoRA at its standard init) on `device`."""
    model_path = Path(model_dir) if model_dir else ensure_base_model(Settings())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    base.requires_grad_(False)
    torch.manual_seed(config.seed)  # the standard LoRA init θ_0 (A random, B = 0) is part of the run
    return model_path, tokenizer, get_peft_model(base, config.inner.lora_config())


@dataclass
class Run:
    args: dict
    config: MetaConfig
    out: Path
    pool: TaskPool
    device: torch.device
    model_path: Path
    tokenizer: Any
    model: Any
    learner: MetaLearner
    rng: random.Random  # the task sampler: checkpointed, so a resumed run draws the episodes it would have drawn
    # The lowest validation loss after K steps, with its θ: the outer update is noisy and can get worse between
    # evaluations, so the export may take this θ rather than the last.
    best: dict = field(default_factory=lambda: {"val_loss_adapted": math.inf, "step": None, "theta": None})
    last_validation: dict = field(default_factory=lambda: {"step": None})
    encoded_cache: dict[str, list[EncodedExample]] = field(default_factory=dict)

    @property
    def ckpt_path(self) -> Path:
        return self.out / "ckpt.pt"


def setup(args: dict, config: MetaConfig) -> Run:
    out = Path(args["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    pool = task_pool(args["tasks_dir"], args["pool"], args["sample_by"], args["n_val_tasks"], config.meta_batch_tasks)
    device = resolve_device(args["device"])
    model_path, tokenizer, model = load_model(args["model_dir"], device, config)
    run = Run(args, config, out, pool, device, model_path, tokenizer, model, MetaLearner(model, config),
              random.Random(config.seed))
    if args["resume"] and run.ckpt_path.is_file():
        resume(run)
    print(f"{config.method}: {len(pool.train_names)} train tasks in {len(pool.groups)} groups, "
          f"{len(pool.val_names)} val tasks, device {device}, {sum(p.numel() for p in run.learner.theta)} LoRA params")
    return run


def resume(run: Run) -> None:
    ckpt = load_checkpoint(run.ckpt_path, map_location=run.device)
    saved = MetaConfig.from_dict(ckpt["meta_config"])
    # outer_steps only sets where the loop stops (no schedule depends on it), so a run can be extended, or cut short
    # and exported with --resume --outer_steps=<steps done>. A validation alone trains nothing, so it may judge the
    # checkpoint's θ under another inner procedure (e.g. lr); the LoRA shapes must still match.
    if run.args["validate_only"]:
        if saved.inner.lora_structure() != run.config.inner.lora_structure():
            raise SystemExit(f"{run.ckpt_path} holds LoRA weights of another shape: {saved.inner.lora_structure()}")
    elif replace(saved, outer_steps=run.config.outer_steps) != run.config:
        raise SystemExit(f"{run.ckpt_path} was written with a different MetaConfig:\n{ckpt['meta_config']}")
    saved_pool = {k: ckpt.get("run_args", {}).get(k, run.args[k]) for k in POOL_ARGS}
    if saved_pool != {k: run.args[k] for k in POOL_ARGS}:
        raise SystemExit(f"{run.ckpt_path} was written with a different task pool: {saved_pool}")
    run.learner.load_state_dict(ckpt)
    run.rng.setstate(ckpt["rng"]["python"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    run.best = ckpt.get("best", run.best)
    run.last_validation = ckpt.get("last_validation", run.last_validation)
    print(f"resumed from {run.ckpt_path} at step {run.learner.step}")


def encoded(run: Run, name: str, split: str = "train") -> list[EncodedExample]:
    """A task split's examples that fit max_seq_len, encoded on first use: a run samples only part of the pool."""
    key = f"{name}/{split}"
    if key not in run.encoded_cache:
        items = []
        for example in run.pool.tasks[name].split(split):
            try:
                items += encode_examples(run.tokenizer, [example], run.config.inner.max_seq_len)
            except ExampleTooLong:
                pass
        run.encoded_cache[key] = items
    return run.encoded_cache[key]


def sample_episodes(run: Run) -> list[Episode]:
    """meta_batch_tasks distinct train tasks, each with enough examples for disjoint support and query sets."""
    config, groups = run.config, run.pool.groups
    group_names = sorted(groups)
    episodes: list[Episode] = []
    while len(episodes) < config.meta_batch_tasks:
        name = run.rng.choice(groups[run.rng.choice(group_names)])
        if len(encoded(run, name)) >= config.examples_per_task and name not in {e.task for e in episodes}:
            episodes.append(sample_episode(name, encoded(run, name), config, run.rng))
    return episodes


def log(run: Run, record: dict) -> None:
    with (run.out / "log.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


def log_step(run: Run, episodes: list[Episode], stats: dict[str, float], seconds: float) -> None:
    """The line of the outer step just taken (run.learner.step counts it)."""
    step = run.learner.step
    if (step - 1) % run.args["log_interval"] == 0:
        shown = " ".join(f"{k} {v:.4f}" for k, v in stats.items())
        print(f"step {step}/{run.config.outer_steps} {seconds:.1f}s/step {shown}", flush=True)
    log(run, {"step": step, "seconds": seconds, "tasks": [e.task for e in episodes], **stats})


def validate(run: Run) -> dict:
    """Adapt from θ on each validation task's first `support_size` train examples (K = inner_steps), then the loss
    on its validation split and, for option tasks, the accuracy there; also the loss at θ itself (no adaptation)."""
    config, model, n = run.config, run.model, run.args["val_examples"]
    theta = run.learner.theta_state()
    before, after, accuracy = [], [], []
    for name in run.pool.val_names:
        support, held = encoded(run, name)[:config.support_size], encoded(run, name, "validation")[:n]
        if not support or not held:
            continue
        set_lora_state(model, theta)
        before.append(mean_loss(model, held, config.inner.batch_size))
        adapt(model, support, config.inner)
        after.append(mean_loss(model, held, config.inner.batch_size))
        task = run.pool.tasks[name]
        if task.has_options:
            answers = answer_items(model, run.tokenizer, task.split("validation")[:n], has_options=True)
            accuracy.append(sum(a.correct for a in answers) / len(answers))
    run.learner.load_theta_into_model()
    return {"val_loss_theta": sum(before) / len(before), "val_loss_adapted": sum(after) / len(after),
            "val_accuracy_adapted": sum(accuracy) / len(accuracy) if accuracy else None}


def validate_and_log(run: Run, step: int, **extra) -> dict:
    """Validate, write the log line, and keep θ when it is the best so far."""
    v = validate(run)
    print(f"step {step}: val loss at θ {v['val_loss_theta']:.4f}, after K={run.config.inner.steps} "
          f"{v['val_loss_adapted']:.4f}, accuracy after K {v['val_accuracy_adapted']}")
    log(run, {"step": step, **v, **extra})
    if v["val_loss_adapted"] < run.best["val_loss_adapted"]:
        run.best.update(v, step=step, theta={n: t.detach().cpu().clone() for n, t in run.learner.theta_state().items()})
    run.last_validation.clear()
    run.last_validation.update(v, step=step)
    return v


def checkpoint(run: Run) -> None:
    save_checkpoint(run.ckpt_path, run.learner, run.rng,
                    {"best": run.best, "last_validation": run.last_validation, "run_args": run.args})


def export(run: Run, command: str) -> Path:
    """Write the shared-init folder (PEFT adapter + metalora_meta.json) with the θ --export_theta names."""
    args, config, learner = run.args, run.config, run.learner
    final = {k: run.last_validation[k] for k in ("val_loss_theta", "val_loss_adapted")}
    if args["export_theta"] == "best" and run.best["theta"] is not None:
        set_lora_state(run.model, {n: t.to(run.device) for n, t in run.best["theta"].items()})
        exported = {k: run.best[k] for k in ("step", "val_loss_theta", "val_loss_adapted")}
    else:
        learner.load_theta_into_model()
        exported = {"step": learner.step, **final}
    print(f"exporting θ of step {exported['step']} (--export_theta={args['export_theta']}): val loss after "
          f"K={config.inner.steps} {exported['val_loss_adapted']:.4f}")
    path = Path(args["export_dir"] or run.out / "shared_init")
    pool = run.pool
    save_shared_init(run.model, path, config.inner, run.model_path.name, meta={
        "method": config.method, "meta_config": config.to_dict(), "steps_done": learner.step,
        "data": {"tasks_dir": str(pool.root), "pool": args["pool"], "sample_by": args["sample_by"],
                 "train_tasks": pool.train_names, "val_tasks": pool.val_names, "source": DATA_SOURCE},
        "final_validation": final, "exported": {"theta": args["export_theta"], **exported}, "command": command,
        "git_commit": git_commit(),
    })
    print(f"shared init written to {path}")
    return path
