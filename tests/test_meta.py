"""Meta-learning on a tiny random Llama (byte tokenizer, see test_inner_loop.save_tiny_model): only LoRA
weights move, one meta step lowers the query loss it was computed on, checkpoints round-trip."""
from __future__ import annotations

import random

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.test_inner_loop import save_tiny_model
from trainer.config import AdaptConfig
from trainer.data import encode_examples
from trainer.inner_loop import get_lora_state, lora_parameters
from trainer.meta import MetaConfig, MetaLearner, load_checkpoint, sample_episode, save_checkpoint

WORDS = ["red", "blue", "green", "black", "white", "gold", "pink", "gray"]


def make_task(shift: int) -> list[dict]:
    # A family of tasks sharing structure (copy a word, with a task-specific rotation): what meta-learning exploits.
    return [{"prompt": f"w{i}: {w} ->", "completion": f" {WORDS[(j + shift) % len(WORDS)]}"}
            for i, (j, w) in enumerate((j, WORDS[j]) for j in list(range(len(WORDS))) * 3)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = save_tiny_model(tmp_path_factory.mktemp("tiny"))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    inner = AdaptConfig(steps=3, batch_size=4, learning_rate=1e-2, max_seq_len=64, holdout_fraction=0.0)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(directory), inner.lora_config())
    tasks = {f"t{s}": encode_examples(tokenizer, make_task(s), 64) for s in range(3)}
    return model, tasks, inner


def learner_for(setup, method: str, outer_lr: float = 1e-3) -> MetaLearner:
    model, _, inner = setup
    return MetaLearner(model, MetaConfig(method=method, meta_batch_tasks=2, support_size=8, query_size=8,
                                         outer_lr=outer_lr, outer_steps=3, inner=inner))


def episodes(setup, seed=0):
    _, tasks, inner = setup
    rng = random.Random(seed)
    cfg = MetaConfig(support_size=8, query_size=8, inner=inner)
    return [sample_episode(name, enc, cfg, rng) for name, enc in list(tasks.items())[:2]]


def test_meta_config_validates_and_round_trips():
    cfg = MetaConfig(method="reptile", outer_steps=7)
    assert MetaConfig.from_dict(cfg.to_dict()) == cfg
    assert MetaConfig(method="fomaml", outer_optimizer="sgd", outer_lr=20.0).outer_lr == 20.0  # gradient units
    for bad in ({"method": "maml2"}, {"outer_steps": 0}, {"outer_lr": 0.0}, {"support_size": -1},
                {"outer_grad_clip": -1.0}, {"inner": "x"}, {"outer_optimizer": "lion"}, {"outer_lr": 1.0},
                {"meta_params": "lora_B"}, {"method": "reptile", "outer_optimizer": "sgd", "outer_lr": 1.5},
                {"method": "multitask", "meta_params": "lora_A"}):
        with pytest.raises(ValueError):
            MetaConfig(**bad)
    # average is exactly Reptile with β = 1: any other outer step is refused, not silently renamed.
    average = {"method": "average", "outer_optimizer": "sgd", "outer_lr": 1.0, "outer_grad_clip": 0.0}
    assert MetaConfig(**average).outer_lr == 1.0
    for bad in ({"outer_lr": 0.5}, {"outer_optimizer": "adamw", "outer_lr": 0.5}, {"outer_grad_clip": 1.0},
                {"outer_weight_decay": 0.1}):
        with pytest.raises(ValueError, match="average"):
            MetaConfig(**{**average, **bad})
    with pytest.raises(ValueError, match="unknown"):
        MetaConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_episode_support_and_query_are_disjoint(setup):
    for ep in episodes(setup):
        ids = lambda xs: {id(x) for x in xs}  # noqa: E731
        assert len(ep.support) == 8 and len(ep.query) == 8 and not ids(ep.support) & ids(ep.query)


@pytest.mark.parametrize("method", ["fomaml", "reptile", "multitask"])
def test_meta_step_changes_only_lora_and_moves_theta(setup, method):
    model = setup[0]
    learner = learner_for(setup, method)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    theta_before = {n: t.clone() for n, t in learner.theta_state().items()}
    stats = learner.meta_step(episodes(setup))
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), f"{method} changed non-LoRA weight {n}"
    moved = sum(not torch.equal(theta_before[n], t) for n, t in learner.theta_state().items())
    assert moved > 0
    # The model is left holding the new θ (not the last task's adapted weights).
    for n, t in get_lora_state(model).items():
        assert torch.equal(t, learner.theta_state()[n])


@pytest.mark.parametrize("method", ["fomaml", "reptile"])
def test_meta_step_lowers_the_query_loss_it_was_computed_on(setup, method):
    learner = learner_for(setup, method, outer_lr=3e-3)
    eps = episodes(setup, seed=1)
    step = learner.step
    before = [learner.adapted_query_loss(ep, i) for i, ep in enumerate(eps)]
    learner.meta_step(eps)
    learner.step = step  # same inner seeds as the step itself used
    after = [learner.adapted_query_loss(ep, i) for i, ep in enumerate(eps)]
    assert sum(after) < sum(before), (before, after)


@pytest.mark.parametrize("method", ["reptile", "average"])
def test_sgd_reptile_with_beta_one_moves_theta_to_the_mean_adapted_weights(setup, method):
    """`average` is the seed's parameter averaging: one step puts θ at the mean of the adapted copies."""
    model, _, inner = setup
    learner = MetaLearner(model, MetaConfig(method=method, outer_optimizer="sgd", outer_lr=1.0,
                                            outer_grad_clip=0.0, meta_batch_tasks=2, support_size=8, query_size=8,
                                            inner=inner))
    eps = episodes(setup, seed=2)
    theta0 = {n: t.clone() for n, t in learner.theta_state().items()}
    adapted = []
    for i, ep in enumerate(eps):  # the same inner seeds the step will use
        learner.adapted_query_loss(ep, i, theta=theta0)
        adapted.append({n: t.detach().clone().float() for n, t in get_lora_state(model).items()})
    learner.meta_step(eps)
    for n, t in learner.theta_state().items():
        expected = (adapted[0][n] + adapted[1][n]) / 2
        assert torch.allclose(t, expected, atol=1e-6), n
    assert any(not torch.equal(theta0[n], t) for n, t in learner.theta_state().items())


def test_train_meta_names_average_with_its_own_outer_step():
    from trainer import train_meta

    args = train_meta.parse_args(["--method=average"])
    assert (args["outer_optimizer"], args["outer_lr"], args["outer_grad_clip"]) == ("sgd", 1.0, 0.0)
    assert train_meta.meta_config(args).method == "average"
    with pytest.raises(ValueError, match="average"):
        train_meta.meta_config(train_meta.parse_args(["--method=average", "--outer_lr=0.5"]))


@pytest.mark.parametrize("method", ["fomaml", "reptile"])
def test_learning_only_lora_a_keeps_b_at_zero_and_the_base_outputs(setup, method):
    model, tasks, inner = setup
    torch.manual_seed(1)
    model.base_model.model.apply(lambda m: m.reset_lora_parameters("default", True)
                                 if hasattr(m, "reset_lora_parameters") else None)  # peft's standard init again
    learner = MetaLearner(model, MetaConfig(method=method, meta_params="lora_A", meta_batch_tasks=2, support_size=8,
                                            query_size=8, outer_lr=1e-2, inner=inner))
    theta0 = {n: t.clone() for n, t in learner.theta_state().items()}
    assert all(not t.any() for n, t in theta0.items() if "lora_B" in n)
    probe = torch.tensor([tasks["t0"][0].input_ids])
    learner.meta_step(episodes(setup, seed=3))
    theta1 = learner.theta_state()
    assert all(torch.equal(theta1[n], theta0[n]) for n in theta0 if "lora_B" in n)
    assert any(not torch.equal(theta1[n], theta0[n]) for n in theta0 if "lora_A" in n)
    with torch.no_grad():  # B = 0: the init is still a no-op on the base model
        with model.disable_adapter():
            base = model(probe).logits
        assert torch.allclose(model(probe).logits, base, atol=1e-6)


def test_checkpoint_round_trips(setup, tmp_path):
    learner = learner_for(setup, "fomaml")
    learner.meta_step(episodes(setup))
    path = tmp_path / "ckpt.pt"
    sampler = random.Random(7)
    sampler.random()
    save_checkpoint(path, learner, sampler, {"best_val": 1.5})
    fresh = learner_for(setup, "fomaml")
    with torch.no_grad():
        for p in fresh.theta:
            p.zero_()
    ckpt = load_checkpoint(path)
    fresh.load_state_dict(ckpt)
    assert MetaConfig.from_dict(ckpt["meta_config"]) == learner.config and ckpt["best_val"] == 1.5
    restored = random.Random()
    restored.setstate(ckpt["rng"]["python"])
    assert restored.random() == sampler.random()  # the run's task sampler, not the global random module
    assert fresh.step == learner.step == 1
    for a, b in zip(fresh.theta, learner.theta):
        assert torch.equal(a, b)
    sa, sb = fresh.optimizer.state_dict()["state"], learner.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
    # Resumed training continues identically to uninterrupted training.
    eps = episodes(setup, seed=2)
    learner.meta_step(eps)
    fresh.meta_step(eps)
    for a, b in zip(fresh.theta, learner.theta):
        assert torch.allclose(a, b, atol=1e-6)
    assert set(lora_parameters(setup[0])) == set(learner.names)


def test_in_context_demo_count_reads_what_a_test_item_shows_never_its_answer(tmp_path):
    """The demos' budget is sized from each test item's prompt and longest option: which option is gold, and how
    long the gold completion is, change nothing, and the longest item still fits beside the demos."""
    from trainer.evaluate import icl_prefix, scored_length
    tokenizer = AutoTokenizer.from_pretrained(save_tiny_model(tmp_path / "tiny"))
    demos = [{"prompt": f"demo {i}: x ->", "completion": " y"} for i in range(40)]

    def items(gold: int) -> list[dict]:
        options = [" no", " a much longer option"]
        return [{"prompt": f"q{i} ->", "options": options, "answer": gold, "completion": options[gold]}
                for i in range(5)]

    budget = 200
    short_gold, long_gold = icl_prefix(tokenizer, demos, items(0), budget), icl_prefix(tokenizer, demos, items(1),
                                                                                          budget)
    assert short_gold == long_gold and 0 < short_gold[1] < len(demos)
    prefix_tokens = len(tokenizer(short_gold[0], add_special_tokens=False)["input_ids"])
    assert prefix_tokens + max(scored_length(tokenizer, ex) for ex in items(0)) <= budget
    # An open task has no options: the longest answer generation may give is what it budgets for.
    open_items = [{"prompt": "q ->", "completion": " a"}, {"prompt": "q ->", "completion": " " + "a" * 60}]
    assert icl_prefix(tokenizer, demos, open_items[:1], budget) == icl_prefix(tokenizer, demos, open_items, budget)


def test_evaluate_writes_results_for_any_task_folder(setup, tmp_path):
    """End to end on the tiny model: an option task and an open task, every method, files written."""
    import json as _json

    from tests.test_inner_loop import save_tiny_model
    from trainer.engine import save_shared_init
    from trainer.evaluate import evaluate
    from trainer.tasks.format import write_task

    model_dir = save_tiny_model(tmp_path / "tiny")
    mc = [{"prompt": f"w{i}: {w} ->", "completion": f" {w}", "options": [f" {w}", " none"], "answer": 0}
          for i, w in enumerate(WORDS * 2)]
    write_task(tmp_path / "tasks" / "mc", {"train": mc, "validation": mc[:2], "test": mc[:4]})
    gen = [{"prompt": f"w{i}: {w} ->", "completion": f" {w}"} for i, w in enumerate(WORDS)]
    write_task(tmp_path / "tasks" / "gen", {"train": gen, "validation": gen[:2], "test": gen[:3]})
    learner = learner_for(setup, "fomaml")
    learner.meta_step(episodes(setup))
    save_shared_init(setup[0], tmp_path / "init", setup[2], "tiny")
    inner = AdaptConfig(steps=2, batch_size=4, learning_rate=2e-2, max_seq_len=64, holdout_fraction=0.0)
    report = evaluate([tmp_path / "tasks" / "mc", tmp_path / "tasks" / "gen"],
                      ["zero_shot", "in_context", "standard_init", "meta_init", "multitask_init"], [0, 2], [0],
                      n_train=8, out_dir=tmp_path / "out", model_dir=model_dir, meta_init=tmp_path / "init",
                      multitask_init=tmp_path / "init", adapt_config=inner, device="cpu")
    rows = report["rows"]
    assert len(rows) == 2 * (2 + 3 * 2) and all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    # Per-item results, so methods can be compared item by item on the same test items.
    assert all(len(r["correct"]) == r["n_test"] and r["accuracy"] == sum(r["correct"]) / r["n_test"] for r in rows)
    # K=0 from the meta init differs from K=0 from the standard init only through the loaded weights: with B=0
    # in the standard init its K=0 accuracy must equal zero-shot.
    by = {(r["task"], r["method"], r["k"]): r["accuracy"] for r in rows}
    assert by[("mc", "standard_init", 0)] == by[("mc", "zero_shot", 0)]
    saved = _json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["git_commit"] and saved["rows"] == rows
    # bf16 and fp32 scoring can differ by an item: the report says which ran (METALORA_CPU_BF16, the CPU).
    assert saved["machine"]["device"] == "cpu" and saved["machine"]["precision"] in ("fp32", "bf16 autocast")
    assert f"Machine and precision: {saved['machine']['precision']} on cpu" in (tmp_path / "out" / "results.md").read_text()
    # The init is adapted with the learning rate it was meta-learned for, the standard init with the harness's.
    assert saved["procedures"]["meta_init"]["learning_rate"] == setup[2].learning_rate != inner.learning_rate
    assert saved["procedures"]["standard_init"]["learning_rate"] == inner.learning_rate
    assert "| mc |" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "accuracy_vs_k_mean.png").stat().st_size > 0


def test_train_meta_script_runs_resumes_and_exports(tmp_path):
    """`metalora train-meta` end to end on the tiny model: the pool keeps only option tasks, a run stopped at
    step 2 resumes to step 3, and the export is a shared init the worker can load, carrying its provenance."""
    import json as _json

    from trainer import train_meta
    from trainer.engine import load_shared_init
    from trainer.tasks.format import write_task

    model_dir = save_tiny_model(tmp_path / "tiny")
    for shift in range(4):  # option tasks in two families (fam_a__*, fam_b__*), plus open-answer tasks
        rows = [{**ex, "options": [ex["completion"], " none"], "answer": 0} for ex in make_task(shift)]
        write_task(tmp_path / "tasks" / f"fam_{'ab'[shift % 2]}__{shift}",
                   {"train": rows, "validation": rows[:4], "test": rows[:4]})
        write_task(tmp_path / "tasks" / f"open_{shift}",
                   {"train": make_task(shift), "validation": make_task(shift)[:4], "test": make_task(shift)[:4]})
    common = [f"--model_dir={model_dir}", f"--tasks_dir={tmp_path / 'tasks'}", f"--out_dir={tmp_path / 'run'}",
              "--method=reptile", "--meta_batch_tasks=2", "--support_size=8", "--query_size=8", "--inner_steps=2",
              "--inner_batch_size=4", "--max_seq_len=64", "--n_val_tasks=1", "--val_examples=4", "--eval_interval=2",
              "--ckpt_interval=1", "--device=cpu"]
    with pytest.raises(SystemExit):  # argparse refuses a value outside the option's choices
        train_meta.main([*common, "--pool=bogus"])
    # --validate_only judges the standard init and writes nothing but its log line.
    quick = train_meta.main([*common, "--validate_only", f"--out_dir={tmp_path / 'quick'}"])
    faster = train_meta.main([*common, "--validate_only", "--inner_lr=0.05", f"--out_dir={tmp_path / 'quick'}"])
    assert quick["val_loss_theta"] == faster["val_loss_theta"] and quick["val_loss_adapted"] != faster["val_loss_adapted"]
    assert sorted(p.name for p in (tmp_path / "quick").iterdir()) == ["log.jsonl"]
    assert len((tmp_path / "quick" / "log.jsonl").read_text().splitlines()) == 2
    train_meta.main([*common, "--outer_steps=2"])
    with pytest.raises(SystemExit, match="different task pool"):
        train_meta.main([*common, "--outer_steps=3", "--resume", "--pool=all"])
    export = train_meta.main([*common, "--outer_steps=3", "--resume"])

    shared = load_shared_init(export)
    assert shared.meta["steps_done"] == 3 and shared.meta["method"] == "reptile"
    data = shared.meta["data"]
    assert data["pool"] == "multiple_choice" and data["sample_by"] == "family"
    assert not any(name.startswith("open_") for name in data["train_tasks"] + data["val_tasks"])
    assert len(data["train_tasks"]) == 3 and len(data["val_tasks"]) == 1
    assert shared.adapt_config.steps == 2 and shared.meta["git_commit"]
    log = [_json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if "tasks" in r]
    assert steps == [1, 2, 3]  # the resumed run continued at step 3, it did not start over
    assert all(len(set(r["tasks"])) == 2 for r in log if "tasks" in r)
    # The export is the θ with the lowest validation loss of the run (step 0 is the standard init).
    validations = [r for r in log if "val_loss_adapted" in r]
    # eval_interval 2, then the last step; the resumed run does not repeat the validation of step 2
    assert [r["step"] for r in validations] == [0, 2, 3]
    # Resumed exactly: the same validation as a run that was never interrupted.
    straight = common[:2] + [f"--out_dir={tmp_path / 'straight'}"] + common[3:]
    train_meta.main([*straight, "--outer_steps=3"])
    straight_log = [_json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert [r for r in straight_log if "val_loss_adapted" in r] == validations
    best = min(validations, key=lambda r: r["val_loss_adapted"])
    assert shared.meta["exported"]["step"] == best["step"]
    assert shared.meta["exported"]["val_loss_adapted"] == best["val_loss_adapted"]
    # A checkpoint's θ can be validated under another inner lr (nothing is trained), but not with other shapes.
    other = train_meta.main([*common, "--outer_steps=3", "--resume", "--validate_only", "--inner_lr=0.05"])
    assert other["val_loss_theta"] == validations[-1]["val_loss_theta"]
    assert other["val_loss_adapted"] != validations[-1]["val_loss_adapted"]
    line = _json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert line["validate_only"] == {"inner_lr": 0.05, "inner_steps": 2} and line["step"] == 3
    with pytest.raises(SystemExit, match="another shape"):
        train_meta.main([*common, "--resume", "--validate_only", "--rank=4"])


def test_evaluate_scores_each_k_as_a_fresh_k_step_run(setup, tmp_path):
    """K values are scored along one run to the largest K; each must equal a separate run of exactly K steps."""
    from trainer.evaluate import evaluate
    from trainer.tasks.format import write_task

    model_dir = save_tiny_model(tmp_path / "tiny")
    rows = [{**ex, "options": [ex["completion"], " none"], "answer": 0} for ex in make_task(1)]
    write_task(tmp_path / "tasks" / "mc", {"train": rows, "validation": rows[:2], "test": rows})
    inner = AdaptConfig(steps=2, batch_size=4, learning_rate=3e-2, max_seq_len=64, holdout_fraction=0.0)

    def run(ks, out):
        report = evaluate([tmp_path / "tasks" / "mc"], ["standard_init"], ks, [0, 1], n_train=16,
                          out_dir=tmp_path / out, model_dir=model_dir, adapt_config=inner, device="cpu")
        return {(r["seed"], r["k"]): r["accuracy"] for r in report["rows"]}

    along = run([0, 1, 3, 6], "along")
    for k in (1, 3, 6):
        alone = run([k], f"alone{k}")
        assert alone == {(s, k): along[s, k] for s in (0, 1)}
    assert len({along[0, k] for k in (0, 1, 3, 6)}) > 1  # training moved the scores, so the check has teeth
