"""`metalora multitask` end to end on the tiny Llama (tests/test_inner_loop.py) and two tiny option tasks named as
held-out protocol tasks: both inits train on exactly the examples evaluate draws for the seed (never a test item), the
part holds every family column at every K with the inits' metadata, stages resume, and the merge with a few-shot
part names the columns as the issue does and reads the targets off the intervals."""
from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from test_inner_loop import save_tiny_model
from trainer import multitask
from trainer.config import AdaptConfig
from trainer.family import FamilyConfig
from trainer.evaluate import evaluate
from trainer.provenance import examples_digest
from trainer.tasks.format import write_task

WORDS = "red blue green black white gold pink gray".split()
TASKS = ("sst2", "copa")


def option_rows(task: str, start: int, n: int) -> list[dict]:
    # Distinct prompts per split (numbered by position), so a test item can never pass for a train example.
    rows = []
    for i in range(start, start + n):
        word, other = WORDS[i % len(WORDS)], WORDS[(i + 3) % len(WORDS)]
        options = [f" {word}", f" {other}"] if i % 2 else [f" {other}", f" {word}"]
        rows.append({"prompt": f"{task} {i}: {word} ->", "completion": f" {word}", "options": options,
                     "answer": options.index(f" {word}")})
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multitask")
    for task in TASKS:  # 120 train examples: the protocol's draw of 100 is a real choice among them
        write_task(root / "tasks" / task, {"train": option_rows(task, 0, 120), "validation": option_rows(task, 200, 4),
                                          "test": option_rows(task, 300, 6)})
    return root, save_tiny_model(root / "tiny")


def args(root, model_dir, *extra):
    return ["--seeds", "0", "--tasks", ",".join(TASKS), "--tasks-root", str(root / "tasks"), "--model-dir",
            str(model_dir), "--runs-dir", str(root / "runs"), "--parts-dir", str(root / "parts"), "--outer-steps", "2",
            "--steps", "2", "--support-size", "4", "--query-size", "4", "--val-examples", "3", "--k", "0,2",
            "--device", "cpu", *extra]


def test_multitask_trains_on_the_evaluate_draw_writes_a_part_resumes_and_merges(setup):
    root, model_dir = setup
    multitask.main(args(root, model_dir))
    part_path = root / "parts" / "multitask-s0.json"
    part = json.loads(part_path.read_text())
    assert part["protocol"] == "heldout" and part["setting"] == "multitask" and part["seeds"] == [0]
    cells = {(r["task"], r["method"], r["k"], r["seed"]) for r in part["rows"]}
    methods = ("family_multitask_init", "family_init", "family_full_fomaml")
    assert cells == {(t, m, k, 0) for t in TASKS for m in methods for k in (0, 2)}
    assert all(len(r["correct"]) == 6 for r in part["rows"])

    for task in TASKS:
        # The draw, by evaluate's rule written out here: 100 of the 120 train examples, seeded by the seed.
        train = [json.loads(line) for line in (root / "tasks" / task / "train.jsonl").read_text().splitlines()]
        drawn = random.Random(0).sample(train, 100)
        digest = examples_digest([{"prompt": e["prompt"], "completion": e["completion"]} for e in drawn])
        assert part["tasks"][task]["train_sha256"] == {"0": digest}  # what evaluate adapted on
        for method in methods:
            trained = {t["name"]: t for t in part["inits"][method]["meta"]["metrics"]["tasks"]}
            assert trained[task]["examples_sha256"] == digest and trained[task]["num_train"] == 100
        test = [json.loads(line)["prompt"] for line in (root / "tasks" / task / "test.jsonl").read_text().splitlines()]
        assert not {e["prompt"] for e in drawn} & set(test)

    # The part carries each init's metalora_meta.json as written, and the wall time of every stage.
    for method in methods:
        on_disk = json.loads((root / "runs" / "s0" / method / "metalora_meta.json").read_text())
        assert part["inits"][method]["meta"] == on_disk and on_disk["adapt_config"]["steps"] == 2
    family = part["inits"]["family_init"]["meta"]["metrics"]
    assert family["method"] == "fomaml" and [s["step"] for s in family["outer_steps"]] == [0, 1, 2]
    mt = part["inits"]["family_multitask_init"]["meta"]["metrics"]
    # The family's compute in batch-8 steps: 2 outer steps x 2 tasks x (2 support batches of 8 + a query of 4).
    assert mt["max_steps"] == 10 and mt["num_train"] == 200 and 0 <= mt["chosen_steps"] <= mt["steps_run"] <= 10
    assert set(part["stage_seconds"]) == {*methods, "evaluate"}
    assert part["git_commit"] and part["machine"]["device"] == "cpu"

    # A finished seed is skipped; without its part, the finished inits are reused and only evaluation reruns.
    multitask.main(args(root, model_dir))
    assert json.loads(part_path.read_text()) == part
    part_path.unlink()
    multitask.main(args(root, model_dir))
    again = json.loads(part_path.read_text())
    assert again["inits"] == part["inits"] and again["rows"] == part["rows"]
    # The weights each init was scored from: the same init read again gives the same digest.
    assert again["init_sha256"] == part["init_sha256"] and set(part["init_sha256"]) == set(methods)
    assert all(len(d) == 64 for d in part["init_sha256"].values()) and len(set(part["init_sha256"].values())) == 3
    assert all(r["init_sha256"] == part["init_sha256"][r["method"]] for r in part["rows"])  # each row names its init
    part_path.unlink()
    with pytest.raises(SystemExit, match="another setting"):  # an init of another recipe is never reused
        multitask.main(args(root, model_dir, "--outer-steps", "3"))

    # The few-shot LoRA column comes from an evaluate part of the same protocol and seed; the merge checks the draws.
    few_shot = evaluate([root / "tasks" / t for t in TASKS], ["standard_init"], [2], [0], 100, root / "fewshot",
                        model_dir=model_dir, protocol="heldout", max_test=250, device="cpu")
    assert few_shot["tasks"]["sst2"]["train_sha256"] == part["tasks"]["sst2"]["train_sha256"]
    # A family init is scored on the seed it was trained on, in the LoRA it was trained as, or not at all.
    family_dir, task_dirs = root / "runs" / "s0" / "family_init", [root / "tasks" / t for t in TASKS]
    with pytest.raises(ValueError, match="seed 0's draws"):
        evaluate(task_dirs, ["family_init"], [0], [1], 100, root / "wrong-seed", model_dir=model_dir,
                 family_init=family_dir, device="cpu")
    with pytest.raises(ValueError, match="learned for rank 8, alpha 16"):
        evaluate(task_dirs, ["family_init"], [0], [0], 100, root / "wrong-lora", model_dir=model_dir,
                 family_init=family_dir, adapt_config=AdaptConfig(alpha=32), device="cpu")
    # ... and on the examples it was trained on: an init whose record names another draw of the last task is
    # refused before any task is scored, so nothing is written.
    tampered = root / "tampered-family"
    shutil.copytree(family_dir, tampered)
    meta = json.loads((tampered / "metalora_meta.json").read_text())
    meta["multitask_setting"]["train_sha256"][TASKS[-1]] = "0" * 64
    (tampered / "metalora_meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"other examples of {TASKS[-1]}"):
        evaluate(task_dirs, ["family_init"], [0], [0], 100, root / "wrong-draw", model_dir=model_dir,
                 family_init=tampered, device="cpu")
    assert not any(p.exists() for p in (root / "wrong-seed", root / "wrong-lora", root / "wrong-draw"))
    part_path.write_text(json.dumps(part))
    multitask.main(["--merge", str(root / "fewshot" / "results.json"), str(part_path), "--out-dir",
                    str(root / "table")])
    text = (root / "table" / "results.md").read_text()
    for column in ("few-shot LoRA+2", "multi-task LoRA+0", "multi-task LoRA+2", "MeTA-LoRA family+0",
                   "MeTA-LoRA family+2", "full-model FOMAML+0", "full-model FOMAML+2"):
        assert column in text
    assert "MeTA-LoRA family+2 − full-model FOMAML+2" in text
    targets = text.split("## The seed's targets")[1].split("\n## ")[0]
    rows = [line for line in targets.splitlines() if line.startswith("| ") and "−" in line]
    assert len(rows) == 2 * 3  # three targets at each K of the family
    assert "| over few-shot LoRA by >= 0.10 | MeTA-LoRA family+0 − few-shot LoRA+2 |" in targets
    assert all(r.rstrip(" |").endswith(("met", "missed", "not resolved")) for r in rows if "full-data" not in r)
    assert all(r.endswith("| not measured |") for r in rows if "full-data" in r)

    other = json.loads(part_path.read_text())
    other["tasks"]["copa"]["train_sha256"]["0"] = "0" * 64
    (root / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="drew other train examples"):
        multitask.main(["--merge", str(root / "fewshot" / "results.json"), str(root / "other.json"), "--out-dir",
                        str(root / "bad")])

    # A seed's family column is one init: copa's rows scored from a retrained init (other weights) do not merge
    # with sst2's from the first one, while a re-measurement from the same weights does.
    retrained = json.loads(part_path.read_text())
    retrained["rows"] = [r for r in retrained["rows"] if r["task"] == "copa"]
    (root / "same.json").write_text(json.dumps(retrained))
    multitask.main(["--merge", str(part_path), str(root / "same.json"), "--out-dir", str(root / "same")])
    for r in retrained["rows"]:
        r["init_sha256"] = "f" * 64 if r["method"] == "family_init" else r.get("init_sha256")
    (root / "retrained.json").write_text(json.dumps(retrained))
    with pytest.raises(ValueError, match="family_init seed 0 was scored from other init weights"):
        multitask.main(["--merge", str(part_path), str(root / "retrained.json"), "--out-dir", str(root / "bad2")])
    assert not (root / "bad2").exists()


def test_a_run_of_one_family_method_trains_only_its_init_and_names_its_part(setup):
    root, model_dir = setup
    runs = ["--runs-dir", str(root / "runs-one"), "--parts-dir", str(root / "parts-one")]
    multitask.main(args(root, model_dir, "--methods", "family_multitask_init", *runs))
    assert not (root / "runs-one" / "s0" / "family_init").exists()  # the meta-training it does not score: not run
    part = json.loads((root / "parts-one" / "multitask-s0-family_multitask_init.json").read_text())
    assert {r["method"] for r in part["rows"]} == {"family_multitask_init"}
    assert set(part["stage_seconds"]) == {"family_multitask_init", "evaluate"}
    assert not (root / "parts-one" / "multitask-s0.json").exists()  # a full run of the seed is still to do


def family_ablation(setup, tag: str, flags: list[str], part_name: str, row: str):
    """An ablation of the family init: refused unless it trains the family alone, then run; its part holds only the
    variant's rows. Returns (part, the init's folder)."""
    root, model_dir = setup
    runs = ["--runs-dir", str(root / f"runs-{tag}"), "--parts-dir", str(root / f"parts-{tag}")]
    with pytest.raises(SystemExit, match="family init only"):
        multitask.main(args(root, model_dir, *flags, *runs))
    multitask.main(args(root, model_dir, *flags, "--methods", "family_init", *runs))
    part = json.loads((root / f"parts-{tag}" / part_name).read_text())
    assert {r["method"] for r in part["rows"]} == {row}
    return part, root / f"runs-{tag}" / "s0" / row


def test_the_aggregation_ablation_trains_its_own_family_init_with_its_outer_step(setup):
    root, _ = setup
    _, folder = family_ablation(setup, "agg", ["--family-method", "reptile"], "multitask-s0-family_init-reptile.json",
                                "family_init[reptile]")
    meta = json.loads((folder / "metalora_meta.json").read_text())
    config = meta["metrics"]["meta_config"]
    assert meta["metrics"]["method"] == "reptile" and (config["outer_optimizer"], config["outer_lr"]) == ("sgd", 0.5)
    assert not (root / "runs-agg" / "s0" / "family_init").exists()
    # Merged beside the few-shot LoRA, the variant is read against the seed's targets like the family itself.
    few_shot = evaluate([root / "tasks" / t for t in TASKS], ["standard_init"], [2], [0], 100, root / "fewshot-agg",
                        model_dir=setup[1], protocol="heldout", max_test=250, device="cpu")
    multitask.main(["--merge", str(root / "fewshot-agg" / "results.json"),
                    str(root / "parts-agg" / "multitask-s0-family_init-reptile.json"), "--out-dir", str(root / "agg")])
    targets = (root / "agg" / "results.md").read_text().split("## The seed's targets")[1].split("\n## ")[0]
    assert few_shot["rows"] and "| over few-shot LoRA by >= 0.10 | MeTA-LoRA family[reptile]+0 − few-shot LoRA+2 |" in targets
    assert "| over few-shot LoRA by >= 0.10 | MeTA-LoRA family[reptile]+2 − few-shot LoRA+2 |" in targets


def test_the_rank_ablation_trains_the_family_at_its_rank_with_the_scale_kept(setup):
    part, folder = family_ablation(setup, "rank", ["--rank", "4"], "multitask-s0-family_init-r4.json",
                                   "family_init[r4]")
    peft = json.loads((folder / "adapter_config.json").read_text())
    meta = json.loads((folder / "metalora_meta.json").read_text())
    assert (peft["r"], peft["lora_alpha"]) == (4, 8) == (meta["adapt_config"]["rank"], meta["adapt_config"]["alpha"])
    assert meta["multitask_setting"]["rank"] == 4 and part["adapt_config"]["rank"] == 4


def test_family_aggregations_take_their_outer_step_and_fomaml_keeps_the_job_option():
    assert (FamilyConfig(outer_lr=3e-4).meta_config(3).outer_lr, FamilyConfig().meta_config(3).method) == (3e-4, "fomaml")
    reptile = FamilyConfig(method="reptile", outer_lr=3e-4).meta_config(3)
    assert (reptile.method, reptile.outer_optimizer, reptile.outer_lr, reptile.outer_grad_clip) == ("reptile", "sgd", 0.5, 0.0)
    with pytest.raises(ValueError, match="method must be one of"):
        FamilyConfig(method="multitask")


def test_the_full_model_fomaml_baseline_learns_every_weight_on_the_family_episodes_and_is_scored_as_a_column(setup):
    from safetensors.torch import load_file
    from trainer.full_model import FullModelConfig

    root, model_dir = setup
    runs = ["--runs-dir", str(root / "runs-full"), "--parts-dir", str(root / "parts-full")]
    multitask.main(args(root, model_dir, "--methods", "family_full_fomaml", *runs))
    folder = root / "runs-full" / "s0" / "family_full_fomaml"
    meta = json.loads((folder / "metalora_meta.json").read_text())
    metrics = meta["metrics"]
    assert meta["kind"] == "full_model" and metrics["meta_params"] == "full_model" and metrics["method"] == "fomaml"
    assert [s["step"] for s in metrics["outer_steps"]] == [0, 1, 2] and metrics["outer_steps"][1]["query_loss"] > 0
    # The family's episodes, K and batch with the full-model learning rates; evaluation adapts at the inner one.
    config = FullModelConfig(**metrics["full_model_config"])
    assert (config.family.outer_steps, config.family.steps, config.family.support_size) == (2, 2, 4)
    assert meta["adapt_config"]["learning_rate"] == config.inner_lr == metrics["meta_config"]["inner"]["learning_rate"]
    assert metrics["meta_config"]["outer_lr"] == config.outer_lr
    # Every kind of weight moved (attention, MLP, norms, the tied embedding), and the base model's folder did not.
    learned, base = load_file(str(folder / "model.safetensors")), load_file(str(model_dir / "model.safetensors"))
    moved = {name.split(".")[-2] for name in base if not torch.equal(learned[name], base[name])}
    assert {"q_proj", "down_proj", "input_layernorm", "embed_tokens"} <= moved

    part = json.loads((root / "parts-full" / "multitask-s0-family_full_fomaml.json").read_text())
    assert {(r["task"], r["method"], r["k"]) for r in part["rows"]} == {
        (t, "family_full_fomaml", k) for t in TASKS for k in (0, 2)}
    assert part["inits"]["family_full_fomaml"]["meta"] == meta
    # K = 0 is the learned weights as saved, one model for every task: scored again here, the same answers.
    again = evaluate([root / "tasks" / t for t in TASKS], ["family_full_fomaml"], [0], [0], 100, root / "full-again",
                     model_dir=model_dir, family_full_fomaml=folder, protocol="heldout", max_test=250, device="cpu")
    assert [r["correct"] for r in again["rows"]] == [r["correct"] for r in part["rows"] if r["k"] == 0]



def test_full_model_learning_rates_are_bounded_for_pretrained_weights():
    from trainer.full_model import FullModelConfig

    with pytest.raises(ValueError, match="inner_lr must be in"):
        FullModelConfig(FamilyConfig(), inner_lr=2e-3)  # the LoRA step: it would wreck pretrained weights
    with pytest.raises(ValueError, match="fomaml"):
        from trainer.full_model import train_full_fomaml
        train_full_fomaml(None, None, [], FullModelConfig(FamilyConfig(method="reptile")))
