"""Diversity-aware draws (trainer/data_selection.py) and ablation rows: the k-center rule covers the clusters of
its points before it repeats one, a k-center draw is seeded and distinct from the random one, and a part that
changes the draw or the rank keeps its rows apart from the protocol's columns (named `method[variant]`), merges
beside them and is compared with the column it varies."""
from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from test_eval_report import report_for, row
from test_inner_loop import save_tiny_model
from test_multitask import option_rows
from trainer.config import AdaptConfig
from trainer.data_selection import kcenter, kcenter_draw, random_draw
from trainer.eval_report import comparisons, markdown, merge_reports
from trainer.evaluate import evaluate, variant_name
from trainer.tasks.format import write_task


def test_kcenter_takes_one_point_of_every_cluster_before_a_second_of_any():
    torch.manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(25, 2) for c in centers])  # 4 tight clusters of 25
    picked = kcenter(points, 4)
    assert sorted(i // 25 for i in picked) == [0, 1, 2, 3]
    everything = kcenter(points, 500)
    assert sorted(everything) == list(range(100))  # n beyond the points: each one once


def test_kcenter_draw_is_seeded_distinct_and_not_the_random_draw(tmp_path):
    directory = save_tiny_model(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(directory), AdaptConfig().lora_config())
    examples = option_rows("sst2", 0, 60)
    candidates = random_draw(examples, 0, 40)
    a = kcenter_draw(model, tokenizer, candidates, n=10, max_tokens=64)
    assert a == kcenter_draw(model, tokenizer, candidates, n=10, max_tokens=64)
    assert len({e["prompt"] for e in a}) == 10 and all(e in candidates for e in a)
    assert a[0] == candidates[0]  # k-center starts from the seed's first candidate
    assert a != random_draw(examples, 0, 10)
    assert kcenter_draw(model, tokenizer, candidates[:8], n=10, max_tokens=64) == candidates[:8]


def test_an_ablation_part_keeps_its_rows_apart_and_is_compared_with_the_column_it_varies(tmp_path):
    root = tmp_path
    write_task(root / "tasks" / "sst2", {"train": option_rows("sst2", 0, 40), "validation": option_rows("sst2", 200, 4),
                                         "test": option_rows("sst2", 300, 6)})
    model_dir = save_tiny_model(root / "tiny")
    common = dict(model_dir=model_dir, device="cpu", max_test=6)
    plain = evaluate([root / "tasks" / "sst2"], ["standard_init"], [2], [0], 12, root / "plain", **common)
    diverse = evaluate([root / "tasks" / "sst2"], ["standard_init"], [2], [0], 12, root / "kcenter", draw="kcenter",
                       **common)
    ranked = evaluate([root / "tasks" / "sst2"], ["standard_init"], [2], [0], 12, root / "r4", rank=4, **common)
    assert {r["method"] for r in diverse["rows"]} == {"standard_init[kcenter]"}
    assert {r["method"] for r in ranked["rows"]} == {"standard_init[r4]"}
    assert (ranked["adapt_config"]["rank"], ranked["adapt_config"]["alpha"]) == (4, 8)  # alpha / rank kept at 2
    with pytest.raises(ValueError, match="standard init only"):
        evaluate([root / "tasks" / "sst2"], ["meta_init"], [2], [0], 12, root / "bad", rank=4, **common)
    assert set(diverse["tasks"]["sst2"]["train_sha256"]) == {"0[kcenter]"}
    assert diverse["tasks"]["sst2"]["train_sha256"]["0[kcenter]"] != plain["tasks"]["sst2"]["train_sha256"]["0"]

    merged = merge_reports([root / p / "results.json" for p in ("plain", "kcenter", "r4")], root / "merged",
                           methods=["standard_init"])
    assert {r["method"] for r in merged["rows"]} == {"standard_init", "standard_init[kcenter]", "standard_init[r4]"}
    text = (root / "merged" / "results.md").read_text()
    assert "| standard_init+2 | standard_init[kcenter]+2 | standard_init[r4]+2 |" in text
    assert "| standard_init[kcenter]+2 − standard_init+2 |" in text and "| standard_init[r4]+2 − standard_init+2 |" in text


def test_an_ablation_column_on_fewer_tasks_does_not_shrink_the_mean_row():
    rows = [row(t, "standard_init", 5, 0, [1, 0, 1, 1] if t == "a" else [1, 0]) for t in ("a", "b")]
    rows.append(row("a", "standard_init[kcenter]", 5, 0, [1, 1, 1, 1]))
    text = markdown(report_for(rows))
    assert "| **mean over 2 task(s) with every column** | **0.625** | - |" in text
    assert "mean over all" not in text  # every protocol column has both tasks: one mean row
    # A protocol column on one task only: the common mean shrinks to that task, and the complete columns keep
    # their mean over every task in a row of their own.
    rows.append(row("a", "in_context", 0, 0, [0, 0, 0, 1]))
    text = markdown(report_for(rows))
    assert "| **mean over 1 task(s) with every column** | **0.250** | **0.750** | **1.000** |" in text
    assert "| **mean over all 2 tasks** (columns run on every task) | - | **0.625** | - |" in text
    assert comparisons([("standard_init", 5), ("standard_init[kcenter]", 5)]) == [
        (("standard_init[kcenter]", 5), ("standard_init", 5))]


def test_a_row_names_only_the_settings_that_change_it():
    assert variant_name("standard_init", 4, "kcenter") == "standard_init[r4+kcenter]"
    assert variant_name("in_context", 4, "kcenter") == "in_context[kcenter]"  # demos come from the draw
    assert variant_name("zero_shot", 4, "kcenter") == "zero_shot"
    assert variant_name("full_data", None, "kcenter") == "full_data"  # its pool is its own random draw
    assert variant_name("full_data", 4, "kcenter") == "full_data[r4]"
    assert variant_name("standard_init", None, "random") == "standard_init"
