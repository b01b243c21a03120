"""Meta-train the shared LoRA init (MeTA-LoRA) on the BIG-bench task pool, one readable loop (nanoGPT style):
the defaults below, then `main`, a loop over outer steps; the parts it calls live in trainer/meta_run.py.

    python -m trainer.tasks.fetch                       # once: task folders into ~/.cache/metalora/tasks
    python -m trainer.train_meta --threads=2 --out_dir=runs/reptile    # the shipped init's recipe (the defaults)
    python -m trainer.train_meta --out_dir=runs/reptile --resume --outer_steps=60  # continue from ckpt.pt, further
    python -m trainer.train_meta --method=fomaml --out_dir=runs/fomaml   # MeTA-LoRA's query gradient, AdamW 1e-3
    python -m trainer.train_meta --method=average --out_dir=runs/average  # θ ← mean of the adapted copies
    python -m trainer.train_meta --method=multitask --no-eval_at_start --eval_interval=20 \
        --out_dir=runs/multitask  # the baseline init: same pool, episodes and compute, AdamW 2e-3
    python -m trainer.train_meta --validate_only --inner_lr=1e-3 --out_dir=runs/lr1e-3   # the standard init at K steps
    python -m trainer.train_meta --validate_only --resume --inner_lr=1e-3 --out_dir=runs/reptile  # a checkpoint's θ, another lr

Any default below can be overridden as --name=value. The result is a shared-init folder (PEFT adapter +
metalora_meta.json with data, config, command and git commit) at --export_dir (default out_dir/shared_init);
copy it to trainer/shared_init/<base model dir name>/ for the worker to pick it up.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from trainer.config import AdaptConfig
from trainer.meta import OUTER_DEFAULTS, MetaConfig
from trainer.meta_run import checkpoint, export, log_step, sample_episodes, setup, validate_and_log
from trainer.tasks.pool import POOLS

_NOT_FLAGS = set(globals())  # every global defined below, up to DEFAULTS, is a flag

# --- defaults (each overridable as --name=value) ---------------------------------------------------
# The defaults are the shipped init's recipe (trainer/shared_init/<model>/metalora_meta.json): the plain command
# rebuilds it. results/meta-train/ holds every run and the setting it used.
method = "reptile"  # fomaml | reptile | average | multitask
outer_steps = 20  # where the shipped run stopped, its validation still falling: longer runs may do better
meta_batch_tasks = 3  # tasks per outer step
# A job brings ~100 examples, so K = 5 steps of batch 8 see 40 fresh ones; a 16-example support set would show each
# 2.5 times, a regime the service never runs.
support_size = 96
query_size = 16  # examples per task the adapted weights are judged on, disjoint from the support set
meta_params = "all"  # all | lora_A (learn only A; B stays zero, so the init leaves the base model's outputs as they are)
inner_steps = 5  # K during meta-training (serving may use more: the init is evaluated at several K)
inner_lr = 2e-3  # AdamW learning rate of the inner loop
inner_batch_size = 8  # examples per inner step
rank = 8  # LoRA rank of the init (jobs starting from it use the same)
alpha = 16  # LoRA alpha
max_seq_len = 96  # tokens; longer examples are skipped (cost grows with length; most option items fit)
seed = 0  # seeds the standard init, the task sampler and every episode
tasks_dir = str(Path.home() / ".cache" / "metalora" / "tasks" / "bigbench")  # from `metalora prepare-tasks`
# multiple_choice: only tasks scored by option likelihood, the kind every held-out task is; all: generative too.
pool = "multiple_choice"
# family: pick a BIG-bench parent task uniformly, then one of its subtasks; task: every subtask equally.
sample_by = "family"
n_val_tasks = 8  # meta-train tasks held out of the pool, used only for the periodic validation
val_examples = 32  # per validation task, from its validation split
eval_interval = 10  # outer steps between validations
eval_at_start = True  # step 0 = the standard init's baseline; the same for every run with this seed and split
# best: export the θ with the lowest validation loss after K steps (the outer update is noisy and can get worse
# between evaluations); last: the θ the run ended with.
export_theta = "best"
log_interval = 1  # outer steps between log lines
ckpt_interval = 5  # outer steps between checkpoints (out_dir/ckpt.pt)
out_dir = "runs/meta"  # checkpoint, log and (by default) the exported init
export_dir = ""  # "" = out_dir/shared_init
model_dir = ""  # "" = the converted default base model (trainer.model_prep.ensure_base_model)
device = "auto"  # auto | cpu | cuda
threads = 0  # 0 = torch default; 1 to leave the other core to colleagues
resume = False  # continue from out_dir/ckpt.pt when it exists
# Only the validation of the standard init (or, with --resume, of the checkpoint's θ), then stop: nothing is trained,
# checkpointed or exported. For diagnostics such as comparing inner learning rates on the validation tasks.
validate_only = False
# ----------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if k not in _NOT_FLAGS and isinstance(v, (int, float, str, bool))}
# method is checked by MetaConfig, the one place that knows the methods.
CHOICES = {"pool": POOLS, "sample_by": ("family", "task"), "export_theta": ("best", "last")}


def flag_help() -> dict[str, str]:
    """Each flag's --help is its comment in the defaults above (on its line, else the block right above it), so
    the comments stay the one place a default is explained."""
    helps, block = {}, []
    for line in Path(__file__).read_text().splitlines():
        if line.startswith("#"):
            block.append(line.lstrip("# "))
            continue
        name, eq, rest = line.partition(" = ")
        if eq and name in DEFAULTS:
            helps[name] = (rest.split("  # ", 1)[1] if "  # " in rest else " ".join(block)).replace("%", "%%")
        block = []
    return helps


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metalora train-meta", description=__doc__.split("\n\n")[0])
    helps = flag_help()
    for key, value in DEFAULTS.items():
        if isinstance(value, bool):
            parser.add_argument(f"--{key}", action=argparse.BooleanOptionalAction, default=value, help=helps.get(key))
        else:
            parser.add_argument(f"--{key}", type=type(value), default=value, choices=CHOICES.get(key),
                                help=helps.get(key))
    for key, value in OUTER_DEFAULTS[method].items():  # None: the method's default
        parser.add_argument(f"--{key}", type=type(value), default=None,
                            help=f"the outer step's {key.removeprefix('outer_')} (default: the method's, OUTER_DEFAULTS)")
    return parser


def parse_args(argv: list[str]) -> dict:
    args = vars(build_parser().parse_args(argv))
    # An unknown method keeps None here and is rejected by MetaConfig, which names the methods.
    for key, value in OUTER_DEFAULTS.get(args["method"], {}).items():
        if args[key] is None:
            args[key] = value
    return args


def meta_config(args: dict) -> MetaConfig:
    return MetaConfig(
        method=args["method"], outer_steps=args["outer_steps"], meta_batch_tasks=args["meta_batch_tasks"],
        support_size=args["support_size"], query_size=args["query_size"],
        outer_optimizer=args["outer_optimizer"], outer_lr=args["outer_lr"],
        outer_grad_clip=args["outer_grad_clip"], meta_params=args["meta_params"], seed=args["seed"],
        inner=AdaptConfig(steps=args["inner_steps"], learning_rate=args["inner_lr"], batch_size=args["inner_batch_size"],
                          rank=args["rank"], alpha=args["alpha"], max_seq_len=args["max_seq_len"], seed=args["seed"],
                          holdout_fraction=0.0))


def main(argv: list[str] | None = None) -> Path | dict:
    """Returns the exported shared-init folder, or with --validate_only the validation figures."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    run = setup(args, meta_config(args))
    config, learner = run.config, run.learner
    if args["validate_only"]:
        # The procedure goes into the line: it may differ from the run's whose log this is.
        return validate_and_log(run, learner.step, validate_only={"inner_lr": config.inner.learning_rate,
                                                                  "inner_steps": config.inner.steps})
    t0 = time.time()
    if learner.step == 0 and args["eval_at_start"]:
        validate_and_log(run, 0)  # the standard init's baseline: the same for every run with this seed and split
    while learner.step < config.outer_steps:
        episodes = sample_episodes(run)
        t_step = time.time()
        stats = learner.meta_step(episodes)
        log_step(run, episodes, stats, time.time() - t_step)
        # Validate before checkpointing, so a resumed run neither repeats a validation nor loses it from `best`.
        if learner.step % args["eval_interval"] == 0 or learner.step == config.outer_steps:
            validate_and_log(run, learner.step)
        if learner.step % args["ckpt_interval"] == 0 or learner.step == config.outer_steps:
            checkpoint(run)
    if run.last_validation["step"] != learner.step:  # e.g. --resume --outer_steps=<steps done> of a cut-short run
        validate_and_log(run, learner.step)
    print(f"final (step {learner.step}): val loss after K={config.inner.steps} "
          f"{run.last_validation['val_loss_adapted']:.4f}; {time.time() - t0:.0f}s")
    return export(run, " ".join([sys.executable, "-m", "trainer.train_meta", *argv]))


if __name__ == "__main__":
    main()
