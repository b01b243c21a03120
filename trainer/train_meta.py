"""Meta-train the shared LoRA init (MeTA-LoRA) on the BIG-bench task pool, one readable loop.

    python -m trainer.tasks.fetch                       # once: task folders into ~/.cache/metalora/tasks
    python -m trainer.train_meta --threads=2 --out_dir=runs/reptile    # the shipped init's recipe (the defaults)
    python -m trainer.train_meta --out_dir=runs/reptile --resume --outer_steps=60  # continue from ckpt.pt, further
    python -m trainer.train_meta --method=fomaml --out_dir=runs/fomaml   # MeTA-LoRA's query gradient, AdamW 1e-3
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
import json
import math
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

# --- defaults (each overridable as --name=value) ---------------------------------------------------
# The defaults are the shipped init's recipe (trainer/shared_init/, results/meta-train/reptile-s96-2026-11-30/):
# the plain command rebuilds it, in ~35 min on 2 CPU cores. Runs before 2026-12-01 used fomaml, AdamW 1e-3 (clip 1),
# 4 tasks per step, 16-example support sets and 192 tokens; their metalora_meta.json files record every value.
method = "reptile"  # fomaml | reptile | multitask
outer_steps = 20  # the shipped run stopped here for the clock, its validation still falling: try more
meta_batch_tasks = 3  # tasks per outer step
# A job brings ~100 examples, so K = 5 steps of batch 8 see 40 fresh ones; with 16 they saw each 2.5 times, a regime
# the service never runs (runs 1-7).
support_size = 96
query_size = 16
# The outer step's defaults depend on the method, since the pseudo-gradients differ in kind: Reptile's is a weight
# difference, which SGD with β = 0.5 moves halfway along (the paper's θ ← θ + β·mean(θ_i − θ)); fomaml's and
# multitask's are loss gradients, which take AdamW's bounded per-coordinate step. --outer_optimizer (adamw | sgd),
# --outer_lr and --outer_grad_clip (0 = off) override them. Each is the setting that method was run with.
OUTER_DEFAULTS = {
    "reptile": {"outer_optimizer": "sgd", "outer_lr": 0.5, "outer_grad_clip": 0.0},  # the shipped init
    "fomaml": {"outer_optimizer": "adamw", "outer_lr": 1e-3, "outer_grad_clip": 1.0},  # run 1
    "multitask": {"outer_optimizer": "adamw", "outer_lr": 2e-3, "outer_grad_clip": 1.0},  # the baseline init
}
meta_params = "all"  # all | lora_A (learn only A; B stays zero, so the init leaves the base model's outputs as they are)
inner_steps = 5  # K during meta-training (serving may use more: the init is evaluated at several K)
inner_lr = 2e-3
inner_batch_size = 8
rank = 8
alpha = 16
max_seq_len = 96  # tokens; longer examples are skipped (cost grows with length; most option items fit)
seed = 0
tasks_dir = str(Path.home() / ".cache" / "metalora" / "tasks" / "bigbench")
# multiple_choice: only tasks scored by option likelihood, the kind every held-out task is; all: generative too.
pool = "multiple_choice"
# family: pick a BIG-bench parent task uniformly, then one of its subtasks, so that 20 arithmetic subtasks
# weigh as much as one task and not 20 times more; task: every subtask equally.
sample_by = "family"
n_val_tasks = 8  # meta-train tasks held out of the pool, used only for the periodic validation
val_examples = 32  # per validation task, from its validation split
eval_interval = 10
eval_at_start = True  # step 0 = the standard init's baseline; the same for every run with this seed and split
# best: export the θ with the lowest validation loss after K steps (the outer update is noisy and can get worse
# between evaluations); last: the θ the run ended with.
export_theta = "best"
log_interval = 1
ckpt_interval = 5
out_dir = "runs/meta"
export_dir = ""  # "" = out_dir/shared_init
model_dir = ""  # "" = the converted default base model (trainer.model_prep.ensure_base_model)
device = "auto"
threads = 0  # 0 = torch default; 1 to leave the other core to colleagues
resume = False
# Only the validation of the standard init (or, with --resume, of the checkpoint's θ), then stop: nothing is trained,
# checkpointed or exported. For diagnostics such as comparing inner learning rates on the validation tasks.
validate_only = False
# ----------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, str, bool))
            and k not in ("annotations",)}
# method is checked by MetaConfig, the one place that knows the methods.
CHOICES = {"pool": ("all", "multiple_choice"),
           "sample_by": ("family", "task"), "export_theta": ("best", "last")}


def parse_args(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for key, value in DEFAULTS.items():
        if isinstance(value, bool):
            parser.add_argument(f"--{key}", action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(f"--{key}", type=type(value), default=value, choices=CHOICES.get(key))
    for key, value in OUTER_DEFAULTS[method].items():
        parser.add_argument(f"--{key}", type=type(value), default=None)  # None: the method's default
    args = vars(parser.parse_args(argv))
    # An unknown method keeps None here and is rejected by MetaConfig, which names the methods.
    for key, value in OUTER_DEFAULTS.get(args["method"], {}).items():
        if args[key] is None:
            args[key] = value
    return args


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "trainer"], cwd=root, capture_output=True,
                               text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def meta_config(args: dict):
    from trainer.config import AdaptConfig
    from trainer.meta import MetaConfig

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
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.data import ExampleTooLong, encode_examples, mean_loss
    from trainer.engine import save_shared_init
    from trainer.inner_loop import adapt, set_lora_state
    from trainer.meta import MetaConfig, MetaLearner, load_checkpoint, sample_episode, save_checkpoint
    from trainer.precision import resolve_device
    from trainer.scoring import answer_items
    from trainer.tasks.format import find_tasks, load_task

    if args["threads"]:
        torch.set_num_threads(args["threads"])
    config = meta_config(args)
    out = Path(args["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt.pt"
    log_file = (out / "log.jsonl").open("a")

    # --- task pool: every task folder under tasks_dir; the evaluation tasks can never be in it ---
    tasks_root = Path(args["tasks_dir"]).expanduser()
    if "olmo" in tasks_root.parts:
        raise SystemExit(f"{tasks_root}: the OLMo tasks are held-out evaluation tasks, never meta-train on them")
    # Read once: the pool filter needs every task's kind, and the episodes and validation reuse the same objects.
    tasks = {t.name: t for t in map(load_task, find_tasks(tasks_root)) if args["pool"] == "all" or t.has_options}
    names = list(tasks)
    if len(names) < args["n_val_tasks"] + config.meta_batch_tasks:
        raise SystemExit(f"{tasks_root} has {len(names)} tasks; run `python -m trainer.tasks.fetch` first")
    random.Random(1234).shuffle(names)  # a fixed split, independent of the run's seed
    val_names, train_names = sorted(names[:args["n_val_tasks"]]), sorted(names[args["n_val_tasks"]:])
    families: dict[str, list[str]] = {}
    for name in train_names:
        families.setdefault(name.split("__")[0] if args["sample_by"] == "family" else name, []).append(name)
    family_names = sorted(families)

    # --- model ---
    if args["model_dir"]:
        model_path = Path(args["model_dir"])
    else:
        from adapters.settings import Settings
        from trainer.model_prep import ensure_base_model
        model_path = ensure_base_model(Settings())
    dev = resolve_device(args["device"])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(dev)
    for p in base.parameters():
        p.requires_grad_(False)
    torch.manual_seed(config.seed)  # the standard LoRA init θ_0 (A random, B = 0) is part of the run
    model = get_peft_model(base, config.inner.lora_config())
    learner = MetaLearner(model, config)

    encoded_cache: dict[str, list] = {}

    def encoded(name: str, split: str = "train") -> list:
        # Lazily encoded: the pool has hundreds of tasks and one run samples only part of them.
        key = f"{name}/{split}"
        if key not in encoded_cache:
            items = []
            for example in tasks[name].split(split):
                try:
                    items += encode_examples(tokenizer, [example], config.inner.max_seq_len)
                except ExampleTooLong:
                    pass
            encoded_cache[key] = items
        return encoded_cache[key]

    rng = random.Random(config.seed)
    best = {"val_loss_adapted": math.inf, "step": None, "theta": None}  # lowest validation loss after K steps
    last_validation: dict = {"step": None}
    if args["resume"] and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path, map_location=dev)
        saved = MetaConfig.from_dict(ckpt["meta_config"])
        # outer_steps only sets where the loop stops (no schedule depends on it), so a run can be extended, or
        # cut short and exported with --resume --outer_steps=<steps done>. A validation alone trains nothing, so it
        # may judge the checkpoint's θ under another inner procedure (e.g. lr); the LoRA shapes must still match.
        if args["validate_only"]:
            if saved.inner.lora_structure() != config.inner.lora_structure():
                raise SystemExit(f"{ckpt_path} holds LoRA weights of another shape: {saved.inner.lora_structure()}")
        elif replace(saved, outer_steps=config.outer_steps) != config:
            raise SystemExit(f"{ckpt_path} was written with a different MetaConfig:\n{ckpt['meta_config']}")
        saved_data = {k: ckpt.get("run_args", {}).get(k, args[k]) for k in ("pool", "sample_by", "n_val_tasks")}
        if saved_data != {k: args[k] for k in saved_data}:
            raise SystemExit(f"{ckpt_path} was written with a different task pool: {saved_data}")
        learner.load_state_dict(ckpt)
        rng.setstate(ckpt["rng"]["python"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        best = ckpt.get("best", best)
        last_validation = ckpt.get("last_validation", last_validation)
        print(f"resumed from {ckpt_path} at step {learner.step}")

    def validate() -> dict:
        """Adapt from θ on each held-out task's first `support_size` train examples (K = inner_steps), then
        the loss on its validation split; also the loss at θ itself (no adaptation)."""
        theta = learner.theta_state()
        before, after, accuracy = [], [], []
        for name in val_names:
            support, held = encoded(name)[:config.support_size], encoded(name, "validation")[:args["val_examples"]]
            if not support or not held:
                continue
            set_lora_state(model, theta)
            before.append(mean_loss(model, held, config.inner.batch_size))
            adapt(model, support, config.inner)
            after.append(mean_loss(model, held, config.inner.batch_size))
            if tasks[name].has_options:
                items = tasks[name].split("validation")[:args["val_examples"]]
                answers = answer_items(model, tokenizer, items, has_options=True)
                accuracy.append(sum(a.correct for a in answers) / len(answers))
        learner.load_theta_into_model()
        return {"val_loss_theta": sum(before) / len(before), "val_loss_adapted": sum(after) / len(after),
                "val_accuracy_adapted": sum(accuracy) / len(accuracy) if accuracy else None}

    def validate_and_log(step: int, **extra) -> dict:
        v = validate()
        print(f"step {step}: val loss at θ {v['val_loss_theta']:.4f}, after K={config.inner.steps} "
              f"{v['val_loss_adapted']:.4f}, accuracy after K {v['val_accuracy_adapted']}")
        log_file.write(json.dumps({"step": step, **v, **extra}) + "\n")
        log_file.flush()
        if v["val_loss_adapted"] < best["val_loss_adapted"]:
            best.update(v, step=step, theta={n: t.detach().cpu().clone() for n, t in learner.theta_state().items()})
        last_validation.clear()
        last_validation.update(v, step=step)
        return v

    print(f"{config.method}: {len(train_names)} train tasks in {len(family_names)} groups, {len(val_names)} val tasks, "
          f"device {dev}, "
          f"{sum(p.numel() for p in learner.theta)} LoRA params")
    if args["validate_only"]:
        # The procedure goes into the line: it may differ from the run's whose log this is.
        v = validate_and_log(learner.step, validate_only={"inner_lr": config.inner.learning_rate,
                                                          "inner_steps": config.inner.steps})
        log_file.close()
        return v
    t0 = time.time()
    if learner.step == 0 and args["eval_at_start"]:
        validate_and_log(0)
    while learner.step < config.outer_steps:
        step = learner.step
        episodes = []
        while len(episodes) < config.meta_batch_tasks:
            name = rng.choice(families[rng.choice(family_names)])
            if len(encoded(name)) >= config.examples_per_task and name not in {e.task for e in episodes}:
                episodes.append(sample_episode(name, encoded(name), config, rng))
        t_step = time.time()
        stats = learner.meta_step(episodes)
        dt = time.time() - t_step
        if step % args["log_interval"] == 0:
            shown = " ".join(f"{k} {v:.4f}" for k, v in stats.items())
            print(f"step {step + 1}/{config.outer_steps} {dt:.1f}s/step {shown}", flush=True)
        log_file.write(json.dumps({"step": step + 1, "seconds": dt, "tasks": [e.task for e in episodes], **stats}) + "\n")
        log_file.flush()
        # Validate before checkpointing, so a resumed run neither repeats a validation nor loses it from `best`.
        if learner.step % args["eval_interval"] == 0 or learner.step == config.outer_steps:
            validate_and_log(learner.step)
        if learner.step % args["ckpt_interval"] == 0 or learner.step == config.outer_steps:
            save_checkpoint(ckpt_path, learner, rng, {"best": best, "last_validation": last_validation, "run_args": args})
    if last_validation["step"] != learner.step:  # e.g. --resume --outer_steps=<steps done> of a cut-short run
        validate_and_log(learner.step)
    v = {k: last_validation[k] for k in ("val_loss_theta", "val_loss_adapted")}
    print(f"final (step {learner.step}): val loss after K={config.inner.steps} {v['val_loss_adapted']:.4f};"
          f" {time.time() - t0:.0f}s")
    if args["export_theta"] == "best" and best["theta"] is not None:
        set_lora_state(model, {n: t.to(dev) for n, t in best["theta"].items()})
        exported = {k: best[k] for k in ("step", "val_loss_theta", "val_loss_adapted")}
    else:
        learner.load_theta_into_model()
        exported = {"step": learner.step, **v}
    print(f"exporting θ of step {exported['step']} (--export_theta={args['export_theta']}): val loss after "
          f"K={config.inner.steps} {exported['val_loss_adapted']:.4f}")

    export = Path(args["export_dir"] or out / "shared_init")
    save_shared_init(model, export, config.inner, model_path.name, meta={
        "method": config.method, "meta_config": config.to_dict(), "steps_done": learner.step,
        "data": {"tasks_dir": str(tasks_root), "pool": args["pool"], "sample_by": args["sample_by"],
                 "train_tasks": train_names, "val_tasks": val_names,
                 "source": "bigbench==1.0.0 JSON tasks via trainer.tasks.fetch"},
        "final_validation": v, "exported": {"theta": args["export_theta"], **exported}, "command": " ".join([sys.executable, "-m", "trainer.train_meta", *(
            sys.argv[1:] if argv is None else argv)]), "git_commit": git_commit(),
    })
    print(f"shared init written to {export}")
    return export


if __name__ == "__main__":
    main()
