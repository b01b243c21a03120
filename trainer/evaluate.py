"""Few-shot evaluation of inits on held-out task folders (docs/tasks.md format): the runner.

    metalora evaluate --protocol heldout --methods standard_init --k 0,5,30 --out-dir runs/eval-std
    metalora evaluate runs/eval-*/results.json --merge --out-dir results/eval

Per task and seed, `n_train` examples are drawn (seeded) from the task's train split; every method answers the same
(capped) test items, scored by one rule (trainer/scoring.py):
- zero_shot: the base model (LoRA B = 0).
- in_context: as many of the n_train examples as fit in `icl_max_tokens` before the test prompt.
- standard_init+K / multitask_init+K / meta_init+K: `adapt()` for K steps from PEFT's default init / the multitask
  init / the meta-learned init, on the n_train examples (each K scored as a fresh K-step run would be). A shared
  init is adapted with the learning rate and batch size in its metalora_meta.json, the procedure it was learned for
  (what the worker does too); the standard init with the harness's own.
- family_multitask_init+K / family_init+K: the same, from inits trained on these very tasks' draws (the multi-task
  setting, trainer/multitask.py): a multi-task LoRA and a meta-learned init family. Named apart from multitask_init
  and meta_init, which are learned on other tasks, so that no table mistakes one for the other.
- family_full_fomaml+K: that setting's full-model FOMAML baseline (trainer/full_model.py): K steps of THE inner loop
  on every weight, from the learned weights, at the learning rate they were learned for.
- auto_k: what a job with `"steps": "auto"` gets: from the `--auto-init` init, K chosen on a held-out slice of the
  n_train examples (the worker's split and rule, trainer/selection.py); the row records the K chosen.
- full_data: LoRA from the standard init on up to `full_data_cap` train examples, trained until its loss on the
  task's validation split stops improving; the row records the examples and steps.
The report (trainer/eval_report.py) holds every item's answer, so methods are compared item by item.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from peft import get_peft_model, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters.layout import read_init_meta
from adapters.settings import Settings
from trainer.config import AdaptConfig
from trainer.data import ExampleTooLong, encode_examples
from trainer.data_selection import DRAWS, KCENTER_POOL, kcenter_draw, random_draw
from trainer.engine import load_shared_init, split_holdout
from trainer.eval_report import (EVAL_METHODS, K_METHODS, SHARED_INIT_METHODS, merge_reports, with_variant,
                                 write_report)
from trainer.full_model import FULL_MODEL_METHOD, FullModelInit
from trainer.inner_loop import adapt, all_parameters, get_lora_state, lora_parameters, set_lora_state, set_state
from trainer.model_prep import ensure_base_model
from trainer.precision import resolve_device
from trainer.provenance import examples_digest, git_commit, machine_record, weights_digest
from trainer.scoring import DEFAULT_SCORING, GEN_MAX_NEW_TOKENS, SCORING_RULES, answer_items
from adapters.adapt_options import AUTO_K
from trainer.selection import adapt_selecting_k
from trainer.tasks.fetch import default_cache_dir
from trainer.tasks.format import Task, load_task

ICL_MAX_TOKENS = 1024  # context for in-context demos + test prompt; cost grows fast on CPU
FULL_DATA_CAP = 1000
FULL_DATA_MAX_STEPS = 1000
FULL_DATA_EVAL_EVERY = 25
FULL_DATA_PATIENCE = 3
DEFAULT_MAX_TEST = 200


@dataclass(frozen=True)
class Protocol:
    """A fixed evaluation: which tasks, how many test items, seeds and training examples. Named, so that every table
    of a protocol measures the same thing and parts run apart can be merged."""
    tasks: tuple[str, ...]
    max_test: int
    seeds: tuple[int, ...]
    n_train: int
    scoring: str


# The 8 public OLMo tasks, 250 test items each where the split has them (all 40 of COPA and 96 of RTE): 1,636 items,
# enough for a paired interval of about ±0.02 on the mean of task means at 3 seeds.
PROTOCOLS = {
    # Listed cheapest first (BoolQ's passages cost ~6x a short prompt), so a run cut short keeps the most tasks.
    "heldout": Protocol(tasks=("sst2", "copa", "rte", "arc_easy", "openbookqa", "commonsense_qa", "piqa", "boolq"),
                        max_test=250, seeds=(0, 1, 2), n_train=100, scoring=DEFAULT_SCORING),
}


def training_draw(task: Task, seed: int, n: int) -> list[dict]:
    """The `n` train examples a seed adapts on: every method of the evaluation, and the inits the multi-task setting
    trains on the same tasks (trainer/multitask.py), take the draw from here, so a seed means one set of examples."""
    return random_draw(task.train, seed, n)


def variant_name(method: str, rank: int | None, draw: str) -> str:
    """The name an ablation's row carries (`standard_init[kcenter]`, `standard_init[r16]`): a part that changes the
    LoRA rank or the draw rule measures another column than the protocol's, and must not replace its rows in a
    merge. Only what changes the row names it: the rank changes what is trained, the draw every method that reads
    the seed's n examples (in-context its demos; zero-shot reads none, full data its own larger random pool)."""
    parts = ([f"r{rank}"] if rank is not None and method not in ("zero_shot", "in_context") else []) + (
        [draw] if draw != "random" and method not in ("zero_shot", "full_data") else [])
    return with_variant(method, "+".join(parts))


def draw_key(seed: int, draw: str) -> str:
    """Where a task's record keeps the digest of a seed's draw: a k-center draw is another set of examples."""
    return str(seed) if draw == "random" else f"{seed}[{draw}]"


def fitting_examples(tokenizer, examples: list[dict], max_seq_len: int) -> tuple[list[dict], list]:
    """The examples that fit in `max_seq_len` (as prompt/completion pairs), and their encodings; longer ones are
    left out, the same ones for every method that trains on them."""
    kept, encoded = [], []
    for example in examples:
        pair = {"prompt": example["prompt"], "completion": example["completion"]}
        try:
            encoded += encode_examples(tokenizer, [pair], max_seq_len)
        except ExampleTooLong:
            continue  # stated in the results as n_train_used
        kept.append(pair)
    return kept, encoded


def encode_safe(tokenizer, examples: list[dict], max_seq_len: int) -> list:
    return fitting_examples(tokenizer, examples, max_seq_len)[1]


def scored_length(tokenizer, item: dict) -> int:
    """Tokens the model reads for a test item: its prompt and its longest option (an open task: the longest answer
    generation may give). Only what the item shows at test time counts, never its gold answer, so no test answer
    decides how many demos in-context gets."""
    prompt = len(tokenizer(item["prompt"])["input_ids"])
    if not item.get("options"):
        return prompt + GEN_MAX_NEW_TOKENS
    return prompt + max(len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in item["options"])


def icl_prefix(tokenizer, demos: list[dict], test: list[dict], budget: int) -> tuple[str, int]:
    """Demos joined by blank lines, as many as fit in `budget` tokens next to the longest test item."""
    longest = max(scored_length(tokenizer, ex) for ex in test)
    prefix, used, n = "", longest, 0
    for d in demos:
        block = d["prompt"] + d["completion"] + "\n\n"
        cost = len(tokenizer(block)["input_ids"])
        if used + cost > budget:
            break
        prefix, used, n = prefix + block, used + cost, n + 1
    return prefix, n


def load_init(path: Path | str, model, cfg: AdaptConfig) -> tuple[dict[str, torch.Tensor], AdaptConfig]:
    """A shared-init folder, read once through the engine's own reader (so an incomplete or inconsistent folder
    is refused here as the worker would refuse it): its weights keyed like `lora_parameters(model)` (peft saves
    them without the adapter name), and `cfg` with the learning rate and batch size it was meta-learned for."""
    shared = load_shared_init(path)
    saved = get_lora_state(model)
    set_peft_model_state_dict(model, shared.state)
    state = get_lora_state(model)
    set_lora_state(model, saved)
    if all(torch.equal(state[n], saved[n]) for n in state):
        raise ValueError(f"{path}: no LoRA weight was loaded (key mismatch?)")
    learned = shared.adapt_config
    # The worker builds a job's LoRA from the init's own structure (engine.job_defaults); scored in another one,
    # the init would be measured under a procedure no job runs.
    if (learned.lora_structure(), learned.dropout) != (cfg.lora_structure(), cfg.dropout):
        raise ValueError(f"{path}: learned for rank {learned.rank}, alpha {learned.alpha}, dropout {learned.dropout}, "
                         f"modules {sorted(learned.target_modules)}; this run builds rank {cfg.rank}, alpha "
                         f"{cfg.alpha}, dropout {cfg.dropout}, modules {sorted(cfg.target_modules)}")
    return state, replace(cfg, learning_rate=learned.learning_rate, batch_size=learned.batch_size)


def trained_setting(path: Path | str | None) -> dict | None:
    """The multi-task setting an init was trained in (trainer/multitask.py: its seed and each task's draw digest),
    None for an init trained elsewhere."""
    meta = read_init_meta(path) if path else None
    return meta.get("multitask_setting") if meta else None


def check_trained_on(settings: dict[str, dict], seeds, task: str | None = None, drawn: str | None = None) -> None:
    """A family init is scored on the seed whose draws it was trained on, never on another seed's (its K steps
    would start from weights that saw other examples of the very task)."""
    for method, setting in settings.items():
        if set(seeds) != {setting["seed"]}:
            raise ValueError(f"{method} was trained on seed {setting['seed']}'s draws: score it with that seed only")
        want = setting.get("train_sha256", {}).get(task) if task else None
        if want and drawn and want != drawn:
            raise ValueError(f"{method} was trained on other examples of {task} than seed {setting['seed']} draws here")


def check_draws(trained_on: dict[str, dict], task_dirs, seeds, n_train: int, tokenizer, max_seq_len: int) -> None:
    """Every (task, seed) draw against the draws the family inits were trained on, before anything is scored, so a
    mismatch on the last task leaves no half-measured report behind."""
    if not trained_on:
        return
    for task_dir in task_dirs:
        task = load_task(task_dir)
        for seed in seeds:
            kept = fitting_examples(tokenizer, training_draw(task, seed, n_train), max_seq_len)[0]
            check_trained_on(trained_on, [seed], task.name, examples_digest(kept))


@dataclass
class Harness:
    """What every method of one run shares: the model with its LoRA slots, the inits and their procedures."""
    model: object
    tokenizer: object
    cfg: AdaptConfig
    inits: dict[str, dict]
    procedures: dict[str, AdaptConfig]
    scoring: str
    icl_max_tokens: int
    full_data_cap: int
    auto_init: str
    draw: str = "random"
    full_model: FullModelInit | None = None  # family_full_fomaml's own model: its K steps move every weight

    def drawn(self, task: Task, seed: int, n: int) -> list[dict]:
        """The seed's n examples by this run's draw rule (k-center embeds with the base model, adapters off)."""
        if self.draw == "random":
            return training_draw(task, seed, n)
        pool = fitting_examples(self.tokenizer, random_draw(task.train, seed, KCENTER_POOL), self.cfg.max_seq_len)[0]
        return kcenter_draw(self.model, self.tokenizer, pool, n, self.cfg.max_seq_len)

    def answers(self, task: Task, items: list[dict], prefix: str = "", max_prompt_tokens: int = 10**6,
                model=None) -> list:
        return answer_items(self.model if model is None else model, self.tokenizer, items, has_options=task.has_options,
                            rule=self.scoring, prefix=prefix, max_prompt_tokens=max_prompt_tokens)

    def trained(self, method: str) -> tuple[object, dict, dict, AdaptConfig]:
        """What a K method adapts: (model, its weights that move, the init's values of them, the procedure)."""
        if method == FULL_MODEL_METHOD:
            full = self.full_model
            return full.model, all_parameters(full.model), full.theta, full.procedure
        return self.model, lora_parameters(self.model), self.inits[method], self.procedures[method]


def run_task_seed(h: Harness, task: Task, test: list[dict], seed: int, sample: list[dict], enc: list, methods,
                  k_values, record) -> None:
    """Every method on one (task, seed): in-context shows the seed's `sample` (Harness.drawn), the others adapt on
    `enc`, the sample as it fits max_seq_len (fitting_examples). `record(method, k, answers, **extra)` once per
    measured cell."""
    if "zero_shot" in methods:
        set_lora_state(h.model, h.inits["zero"])
        record("zero_shot", 0, h.answers(task, test))
    if "in_context" in methods:
        set_lora_state(h.model, h.inits["zero"])
        prefix, n_demos = icl_prefix(h.tokenizer, sample, test, h.icl_max_tokens)
        record("in_context", 0, h.answers(task, test, prefix, h.icl_max_tokens), n_demos=n_demos)
    for method in K_METHODS:
        if method not in methods:
            continue
        # One run to the largest K, scored as it passes each K: batch order and AdamW have no dependence on the
        # total step count, so step k of a long run is exactly a k-step run.
        model, params, init, procedure = h.trained(method)
        set_state(params, init)
        if 0 in k_values:
            record(method, 0, h.answers(task, test, model=model))

        def score_at(step: int, _loss: float, method=method, model=model) -> None:
            if step in k_values:
                record(method, step, h.answers(task, test, model=model))

        if max(k_values) > 0:
            adapt(model, enc, replace(procedure, steps=max(k_values), seed=seed), on_step=score_at, params=params)
    if "auto_k" in methods:
        procedure = replace(h.procedures[h.auto_init], seed=seed)
        train, held = split_holdout(enc, procedure)
        set_lora_state(h.model, h.inits[h.auto_init])
        chosen = adapt_selecting_k(h.model, train, held, procedure)  # the worker's rule, AUTO_K
        record("auto_k", 0, h.answers(task, test), chosen_k=chosen.k, steps_run=chosen.steps_run,
               init=h.auto_init, curve=chosen.curve)
    if "full_data" in methods:
        pool = training_draw(task, seed, h.full_data_cap)
        full = encode_safe(h.tokenizer, pool, h.cfg.max_seq_len)
        held = encode_safe(h.tokenizer, task.validation, h.cfg.max_seq_len)
        set_lora_state(h.model, h.inits["standard_init"])
        chosen = adapt_selecting_k(h.model, full, held, replace(h.cfg, seed=seed), max_steps=FULL_DATA_MAX_STEPS,
                                   eval_every=FULL_DATA_EVAL_EVERY, patience=FULL_DATA_PATIENCE)
        record("full_data", 0, h.answers(task, test), n_full=len(full), chosen_k=chosen.k,
               steps_run=chosen.steps_run, curve=chosen.curve)


def build_harness(model_dir, methods, *, device, cfg: AdaptConfig, shared_inits: dict, auto_init, scoring,
                  icl_max_tokens, full_data_cap, draw: str = "random") -> tuple[Harness, torch.device]:
    """`shared_inits`: method -> its init folder (None where not given), for the SHARED_INIT_METHODS and
    FULL_MODEL_METHOD run."""
    dev = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev)
    torch.manual_seed(0)
    model = get_peft_model(base, cfg.lora_config())
    standard = get_lora_state(model)
    inits = {"standard_init": standard,
             "zero": {n: (torch.zeros_like(t) if "lora_B" in n else t) for n, t in standard.items()}}
    # Each init is adapted with the procedure it was learned for (its learning rate and batch size); K is swept.
    procedures = {"standard_init": cfg}
    wanted = set(methods) | ({auto_init} if "auto_k" in methods else set())
    for method in SHARED_INIT_METHODS:
        path = shared_inits.get(method)
        if method in wanted:
            if not path:
                raise ValueError(f"{method} needs the path of its shared-init folder")
            inits[method], procedures[method] = load_init(path, model, cfg)
    full_model = None
    if FULL_MODEL_METHOD in wanted:
        if not shared_inits.get(FULL_MODEL_METHOD):
            raise ValueError(f"{FULL_MODEL_METHOD} needs the path of its full-model init folder")
        full_model = FullModelInit.load(shared_inits[FULL_MODEL_METHOD], dev)
        if full_model.procedure.max_seq_len != cfg.max_seq_len:
            raise ValueError(f"{FULL_MODEL_METHOD} was learned for max_seq_len {full_model.procedure.max_seq_len}, "
                             f"this run encodes at {cfg.max_seq_len}")
    return Harness(model, tokenizer, cfg, inits, procedures, scoring, icl_max_tokens, full_data_cap, auto_init,
                   draw, full_model), dev


def init_digests(h: Harness) -> dict[str, str]:
    """The weights each learned init was scored from (trainer/provenance.py weights_digest), by method."""
    digests = {m: weights_digest(state) for m, state in h.inits.items() if m in SHARED_INIT_METHODS}
    if h.full_model is not None:
        digests[FULL_MODEL_METHOD] = weights_digest(h.full_model.theta)
    return digests


def evaluate(task_dirs, methods, k_values, seeds, n_train: int = 100, out_dir: Path | str = "results/eval", *,
             model_dir: Path | str | None = None, meta_init: Path | str | None = None,
             multitask_init: Path | str | None = None, family_init: Path | str | None = None,
             family_multitask_init: Path | str | None = None, family_full_fomaml: Path | str | None = None,
             auto_init: str = "standard_init",
             adapt_config: AdaptConfig | None = None, max_test: int = DEFAULT_MAX_TEST, command: str | None = None,
             device: str = "auto", scoring: str = DEFAULT_SCORING, protocol: str | None = None,
             full_data_cap: int = FULL_DATA_CAP, icl_max_tokens: int = ICL_MAX_TOKENS,
             provenance: dict | None = None, draw: str = "random", rank: int | None = None,
             row_names: dict[str, str] | None = None) -> dict:
    """`provenance`: more to record with the settings (the multi-task setting records the inits it trained).
    `draw` and `rank` make an ablation part: its rows are named by `variant_name` (e.g. `standard_init[kcenter]`).
    `row_names`: another name for a method's rows (the multi-task setting's aggregation ablation)."""
    if draw not in DRAWS:
        raise ValueError(f"draw must be one of {DRAWS}")
    unknown = set(methods) - set(EVAL_METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from {EVAL_METHODS}")
    if scoring not in SCORING_RULES:
        raise ValueError(f"scoring must be one of {SCORING_RULES}")
    if auto_init not in ("standard_init", "meta_init"):
        raise ValueError("auto_init must be standard_init or meta_init")
    # K methods train on all n_train examples; auto_k carves the worker's held-out slice (holdout_fraction) itself.
    cfg = adapt_config or AdaptConfig()
    if rank is not None:
        if (set(methods) & {*SHARED_INIT_METHODS, FULL_MODEL_METHOD}
                or (auto_init != "standard_init" and "auto_k" in methods)):
            raise ValueError("--rank applies to the standard init only: a shared init has the rank it was learned at")
        cfg = cfg.at_rank(rank)
    shared_inits = {"meta_init": meta_init, "multitask_init": multitask_init, "family_init": family_init,
                    "family_multitask_init": family_multitask_init, FULL_MODEL_METHOD: family_full_fomaml}
    trained_on = {m: st for m, path in shared_inits.items() if m in methods and (st := trained_setting(path))}
    check_trained_on(trained_on, seeds)
    model_dir = model_dir or ensure_base_model(Settings())
    h, dev = build_harness(model_dir, methods, device=device, cfg=cfg,
                           shared_inits=shared_inits, auto_init=auto_init, scoring=scoring,
                           icl_max_tokens=icl_max_tokens, full_data_cap=full_data_cap, draw=draw)
    if draw == "random":
        check_draws(trained_on, task_dirs, seeds, n_train, h.tokenizer, cfg.max_seq_len)
    digests = init_digests(h)
    out = Path(out_dir)
    rows: list[dict] = []
    tasks_meta: dict[str, dict] = {}
    t_start = time.time()
    settings = {"command": command or " ".join(sys.argv), "git_commit": git_commit(), "machine": machine_record(dev),
                "protocol": protocol, "scoring": scoring, "model_dir": str(model_dir), "adapt_config": cfg.to_dict(),
                "n_train": n_train, "max_test": max_test, "seeds": list(seeds), "k_values": list(k_values),
                "methods": list(methods), **{m: str(path) if path else None for m, path in shared_inits.items()},
                "auto_init": auto_init,
                "procedures": {m: {"learning_rate": c.learning_rate, "batch_size": c.batch_size}
                               for m, c in h.procedures.items()},
                "full_data": {"cap": full_data_cap, "max_steps": FULL_DATA_MAX_STEPS,
                              "eval_every": FULL_DATA_EVAL_EVERY, "patience": FULL_DATA_PATIENCE},
                "auto_k": asdict(AUTO_K), "icl_max_tokens": icl_max_tokens, "draw": draw, "rank": rank,
                "init_sha256": digests,
                **(provenance or {})}

    def report() -> dict:
        return {**settings, "seconds": round(time.time() - t_start, 1), "tasks": tasks_meta, "rows": rows}

    for task_dir in task_dirs:
        task = load_task(task_dir)
        test = task.test[:max_test]
        gold = [ex["answer"] for ex in test] if task.has_options else None
        tasks_meta[task.name] = {"n_test": len(test), "n_train_available": len(task.train), "gold": gold,
                                 "n_options": sorted({len(ex["options"]) for ex in test}) if gold else None}
        for seed in seeds:
            # Which examples the seed drew (as they fit max_seq_len), so parts run apart can be checked alike.
            sample = h.drawn(task, seed, n_train)
            kept, enc = fitting_examples(h.tokenizer, sample, cfg.max_seq_len)
            drawn = examples_digest(kept)

            def record(method, k, answers, **extra):
                correct = [a.correct for a in answers]
                acc = sum(correct) / len(correct)
                init = {"init_sha256": digests[method]} if method in digests else {}  # the weights it started from
                method = variant_name((row_names or {}).get(method, method), rank, draw)
                rows.append({"task": task.name, "seed": seed, "method": method, "k": k, "accuracy": acc,
                             "n_train_used": len(kept), "n_test": len(test), "correct": correct,
                             "pred": [a.pred for a in answers] if gold else None, **init, **extra})
                print(f"{task.name} seed {seed} {method} K={k}: {acc:.3f}", flush=True)

            run_task_seed(h, task, test, seed, sample, enc, methods, k_values, record)
            tasks_meta[task.name].setdefault("train_sha256", {})[draw_key(seed, draw)] = drawn
        write_report(report(), out)  # after every task, so a run cut short keeps what it measured
    return report()


def protocol_task_dirs(name: str, tasks_root: Path) -> list[Path]:
    return [tasks_root / t for t in PROTOCOLS[name].tasks]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metalora evaluate", description="Few-shot evaluation of LoRA inits on task "
                                "folders; every method answers the same test items, compared item by item.")
    p.add_argument("task_dirs", nargs="*", type=Path,
                   help="task folders (docs/tasks.md format), or with --merge the results.json files to merge")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS),
                   help="a named protocol: fixes the tasks, test items, seeds, n_train and scoring (the held-out "
                        "table is measured with 'heldout'); task_dirs then default to its tasks under --tasks-root")
    p.add_argument("--tasks-root", type=Path, default=default_cache_dir() / "olmo",
                   help="where the protocol's task folders are (built by `metalora prepare-tasks`)")
    p.add_argument("--methods", default=",".join(EVAL_METHODS), help=f"comma-separated, from {','.join(EVAL_METHODS)};"
                   " with --merge, the methods whose rows the merged table keeps")
    p.add_argument("--k", default="0,5,10,30", help="K values (inner steps) scored for the *_init methods")
    p.add_argument("--seeds", help="adaptation seeds (which n_train examples, batch order); default 0,1,2, or the "
                   "protocol's; with --protocol a subset of its seeds, so that parts run apart can be merged")
    p.add_argument("--n-train", type=int, default=100, help="training examples per task and seed")
    p.add_argument("--max-test", type=int, default=DEFAULT_MAX_TEST, help="test items per task (the first ones)")
    p.add_argument("--scoring", choices=SCORING_RULES, default=DEFAULT_SCORING,
                   help="how an option's token log-probabilities are combined (the same for every method)")
    p.add_argument("--meta-init", type=Path, help="shared-init folder for meta_init (e.g. trainer/shared_init/<model>)")
    p.add_argument("--multitask-init", type=Path, help="shared-init folder for multitask_init")
    p.add_argument("--family-init", type=Path, help="shared-init folder for family_init (the multi-task setting's "
                   "meta-learned init, trained on these tasks' draws: trainer/multitask.py)")
    p.add_argument("--family-multitask-init", type=Path, help="shared-init folder for family_multitask_init (the "
                   "multi-task setting's multi-task LoRA)")
    p.add_argument("--family-full-fomaml", type=Path, help="full-model init folder for family_full_fomaml (the "
                   "multi-task setting's full-model FOMAML baseline: trainer/full_model.py)")
    p.add_argument("--auto-init", choices=("standard_init", "meta_init"), default="standard_init",
                   help="the init auto_k adapts from")
    p.add_argument("--model-dir", type=Path, help="base model folder (default: the converted SmolLM2)")
    p.add_argument("--out-dir", type=Path, default=Path("results/eval"), help="where results.{json,md} and plots go")
    p.add_argument("--full-data-cap", type=int, default=FULL_DATA_CAP, help="train examples for full_data at most")
    p.add_argument("--icl-max-tokens", type=int, default=ICL_MAX_TOKENS, help="context budget for in_context")
    p.add_argument("--draw", choices=DRAWS, default="random", help="how a seed's n_train examples are chosen: the "
                   "protocol's random draw, or k-center over the base model's hidden states (an ablation: its rows "
                   "are named method[kcenter])")
    p.add_argument("--rank", type=int, help="LoRA rank for the standard init (an ablation: rows named method[r<rank>])")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--merge", action="store_true", help="task_dirs are results.json files to merge into --out-dir")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    if a.merge:
        merge_reports(a.task_dirs, a.out_dir, methods=a.methods.split(","))
        return
    seeds = [int(s) for s in (a.seeds or "0,1,2").split(",")]
    n_train, max_test, scoring = a.n_train, a.max_test, a.scoring
    task_dirs = a.task_dirs
    if a.protocol:
        proto = PROTOCOLS[a.protocol]
        if a.seeds and not set(seeds) <= set(proto.seeds):
            raise SystemExit(f"--protocol {a.protocol} has seeds {proto.seeds}; --seeds may only pick among them")
        seeds = seeds if a.seeds else list(proto.seeds)
        n_train, max_test, scoring = proto.n_train, proto.max_test, proto.scoring
        task_dirs = task_dirs or protocol_task_dirs(a.protocol, a.tasks_root)
        off = [d for d in task_dirs if d.name not in proto.tasks]
        if off:
            raise SystemExit(f"--protocol {a.protocol} covers {', '.join(proto.tasks)}; not {off[0].name}")
    if not task_dirs:
        raise SystemExit("name task folders or a --protocol")
    if a.threads:
        torch.set_num_threads(a.threads)
    evaluate(task_dirs, a.methods.split(","), [int(k) for k in a.k.split(",")], seeds, n_train, a.out_dir,
             model_dir=a.model_dir, meta_init=a.meta_init, multitask_init=a.multitask_init,
             family_init=a.family_init, family_multitask_init=a.family_multitask_init,
             family_full_fomaml=a.family_full_fomaml, auto_init=a.auto_init,
             max_test=max_test, scoring=scoring, protocol=a.protocol, device=a.device,
             full_data_cap=a.full_data_cap, icl_max_tokens=a.icl_max_tokens, draw=a.draw, rank=a.rank,
             command=" ".join(["metalora evaluate", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    main()
