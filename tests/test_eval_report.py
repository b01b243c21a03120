"""The evaluation's statistics and report on hand-made rows (no model needed): balanced accuracy, the majority
rate, the paired bootstrap over seeds x items, the comparisons asked, the markdown and merging."""
from __future__ import annotations

import json

import numpy as np
import pytest

from trainer.eval_report import comparisons, markdown, merge_reports
from trainer.eval_stats import balanced_accuracy, cells, majority_rate, paired_bootstrap, paired_difference


def row(task, method, k, seed, correct, pred=None):
    return {"task": task, "method": method, "k": k, "seed": seed, "accuracy": sum(correct) / len(correct),
            "correct": correct, "pred": pred}


def test_balanced_accuracy_gives_a_constant_answer_one_half_whatever_the_balance():
    gold = [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert majority_rate(gold) == 0.7
    assert balanced_accuracy([0] * 10, gold) == 0.5  # plain accuracy 0.7
    assert balanced_accuracy([1] * 10, gold) == 0.5
    assert balanced_accuracy(gold, gold) == 1.0
    assert balanced_accuracy([0, 0, 0, 0, 0, 0, 1, 1, 1, 0], gold) == pytest.approx((6 / 7 + 2 / 3) / 2)


def test_bootstrap_interval_widens_with_seed_disagreement_that_item_noise_alone_misses():
    rng = np.random.default_rng(1)
    items = rng.integers(0, 2, size=200).astype(float) * 0.1
    agree = {"t": np.stack([items + 0.05] * 3)}  # every seed gains the same
    disagree = {"t": np.stack([items + 0.25, items - 0.15, items + 0.05])}  # same mean, seeds disagree
    a, d = paired_bootstrap(agree), paired_bootstrap(disagree)
    assert a["diff"] == pytest.approx(d["diff"])
    assert (d["hi"] - d["lo"]) > 3 * (a["hi"] - a["lo"])
    assert a["resolved"] and not d["resolved"]


def test_few_seeds_are_rescaled_so_the_seed_spread_is_not_understated():
    # Three seeds whose every item moves together by 0, 0.1 and 0.2: the spread is all between seeds. Drawing 3 of 3
    # with replacement alone would put the interval at [0, 0.2], the narrowest the values allow; rescaled by
    # sqrt(3 / 2) its ends sit 0.1225 from the mean, so all-seeds-gain-a-little is not read as a resolved gain.
    spread = {"t": np.stack([np.full(40, x) for x in (0.0, 0.1, 0.2)])}
    p = paired_bootstrap(spread)
    assert p["diff"] == pytest.approx(0.1)
    assert p["lo"] == pytest.approx(0.1 - 0.1 * 1.5 ** 0.5) and p["hi"] == pytest.approx(0.1 + 0.1 * 1.5 ** 0.5)
    assert not p["resolved"]
    # One seed has no spread to resample: its interval is over items only, and the same as before any rescaling.
    one = {"t": np.array([[1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]])}
    assert 0.0 < paired_bootstrap(one)["lo"] < 0.75 < paired_bootstrap(one)["hi"] <= 1.0


def test_bootstrap_of_identical_methods_is_zero_and_unresolved():
    zeros = {"t": np.zeros((3, 50)), "u": np.zeros((3, 20))}
    p = paired_bootstrap(zeros)
    assert p["diff"] == 0.0 and p["lo"] == 0.0 and p["hi"] == 0.0 and not p["resolved"]
    assert p["n_items"] == 70 and p["n_seeds"] == 3


ROWS = [
    row("a", "standard_init", 5, 0, [1, 0, 0, 1], [0, 0, 0, 1]), row("a", "standard_init", 5, 1, [1, 0, 1, 1], [0, 0, 1, 1]),
    row("a", "meta_init", 5, 0, [1, 1, 1, 1], [0, 1, 1, 1]), row("a", "meta_init", 5, 1, [1, 1, 0, 1], [0, 1, 0, 1]),
    row("b", "standard_init", 5, 0, [0, 1]), row("b", "meta_init", 5, 0, [0, 1]),
]


def test_paired_difference_pairs_seed_and_item_and_averages_task_means():
    p = paired_difference(cells(ROWS), ("meta_init", 5), ("standard_init", 5))
    # Task a: per seed d = [0,1,1,0] and [0,1,-1,0] -> mean 0.25; task b (one seed) d = [0,0]: the mean of task
    # means is 0.125, whatever the number of seeds each task ran.
    assert p["tasks"]["a"]["diff"] == pytest.approx(0.25) and p["tasks"]["b"]["diff"] == 0.0
    assert p["tasks"]["b"]["lo"] == p["tasks"]["b"]["hi"] == 0.0
    assert p["diff"] == pytest.approx(0.125) and p["lo"] <= p["diff"] <= p["hi"] and p["n_seeds"] == "1-2"
    q = paired_difference(cells(ROWS), ("standard_init", 5), ("meta_init", 5))
    assert q["diff"] == pytest.approx(-0.125)
    assert paired_difference(cells(ROWS), ("meta_init", 5), ("full_data", 0)) is None


def test_pairs_on_the_seeds_both_columns_ran():
    rows = [row("a", "standard_init", 0, 0, [1, 0, 0, 0]), row("a", "meta_init", 5, 0, [1, 1, 0, 0]),
            row("a", "meta_init", 5, 1, [0, 0, 0, 0])]
    p = paired_difference(cells(rows), ("meta_init", 5), ("standard_init", 0))
    assert p["tasks"]["a"]["diff"] == pytest.approx(0.25) and p["tasks"]["a"]["n_seeds"] == 1


def test_items_of_a_different_test_cap_are_not_paired():
    rows = ROWS + [row("d", "standard_init", 5, 0, [1, 0, 1]), row("d", "meta_init", 5, 0, [1, 0])]
    p = paired_difference(cells(rows), ("meta_init", 5), ("standard_init", 5))
    assert "d" not in p["tasks"]


def test_comparisons_ask_each_question_for_every_k_of_every_init():
    cols = [("zero_shot", 0), ("in_context", 0), ("standard_init", 5), ("standard_init", 30), ("meta_init", 0),
            ("meta_init", 5), ("auto_k", 0), ("full_data", 0)]
    got = comparisons(cols)
    assert (("meta_init", 5), ("meta_init", 0)) in got
    assert (("meta_init", 5), ("standard_init", 5)) in got
    # What a job got before any init shipped (the standard init at its largest K) is always a reference.
    assert (("meta_init", 5), ("standard_init", 30)) in got
    assert (("meta_init", 5), ("in_context", 0)) in got and (("meta_init", 5), ("full_data", 0)) in got
    assert (("standard_init", 30), ("standard_init", 5)) in got
    assert (("auto_k", 0), ("standard_init", 30)) in got and (("auto_k", 0), ("meta_init", 5)) in got


def report_for(rows, **extra):
    return {"command": "metalora evaluate ...", "git_commit": "abc", "n_train": 100, "seeds": [0, 1],
            "max_test": 4, "methods": ["standard_init", "meta_init"], "protocol": "heldout", "scoring": "sum",
            "machine": {"device": "cpu", "cpu_model": "X", "precision": "fp32"}, "seconds": 12.0,
            "tasks": {"a": {"n_test": 4, "n_train_available": 500, "gold": [0, 1, 1, 1], "n_options": [2]},
                      "b": {"n_test": 2, "n_train_available": 50, "gold": None, "n_options": None}},
            "rows": rows, **extra}


def test_markdown_names_protocol_scoring_machine_and_shows_binary_and_paired_tables():
    text = markdown(report_for(ROWS))
    assert "Protocol: `heldout`; option scoring: `sum`" in text
    assert "Machine and precision: fp32 on cpu (X)" in text and "Wall time: 12 s" in text
    assert "| a (4, 100) | 0.625 ± 0.177 | 0.875 ± 0.177 |" in text
    assert "| b (2, 50) |" in text  # the table names how many training examples a task had
    # Binary task a, gold [0,1,1,1], majority 0.75: standard seeds 0.667 and 0.833, meta seeds 1.0 and 0.833.
    assert "| a | 0.750 | 0.750 | 0.917 |" in text
    assert "## Paired differences" in text and "meta_init+5 − standard_init+5 | +0.250 | +0.000 |" in text


def test_merge_lets_a_later_part_re_measure_a_column_and_refuses_other_protocols(tmp_path):
    def part(name, rows, **extra):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**report_for(rows), "command": name, "git_commit": name, "k_values": [5],
                                    "methods": sorted({r["method"] for r in rows}), **extra}))
        return path

    old = part("old", ROWS)
    new = part("new", [row("a", "meta_init", 5, 0, [0, 0, 0, 0], [1, 0, 0, 0]),
                       row("a", "meta_init", 5, 1, [0, 0, 0, 1], [1, 0, 0, 1])])
    merged = merge_reports([old, new], tmp_path / "merged")
    meta_a = sorted(r["accuracy"] for r in merged["rows"] if (r["task"], r["method"]) == ("a", "meta_init"))
    assert meta_a == [0.0, 0.25]  # the old part's two cells were replaced, not averaged in
    assert len(merged["rows"]) == 6 and [p["rows_replaced"] for p in merged["parts"]] == [2, 0]
    text = (tmp_path / "merged" / "results.md").read_text()
    assert "Commits (by part, see `parts` in results.json): `old`, `new`" in text
    other = part("other", ROWS, scoring="per_char")
    with pytest.raises(ValueError, match="different scoring"):
        merge_reports([old, other], tmp_path / "bad")

    # Cells trained another way are not seeds of the same cell; another precision is named, not refused.
    lora = {"rank": 8, "alpha": 16, "dropout": 0.0, "learning_rate": 0.002, "batch_size": 8, "max_seq_len": 256,
            "target_modules": ["q_proj"], "seed": 0, "steps": 30}
    plain = part("plain", ROWS, adapt_config=lora)
    for name, extra, refused in (("lr", {"adapt_config": {**lora, "learning_rate": 0.01}}, "different procedure"),
                                 ("r4", {"adapt_config": {**lora, "rank": 4, "alpha": 8}}, "different LoRA rank")):
        with pytest.raises(ValueError, match=refused):
            merge_reports([plain, part(name, ROWS, **extra)], tmp_path / "bad")
    # A rank ablation names its rank in its rows (standard_init[r4]), so it merges beside the protocol's parts;
    # its seed and K differ by row and are not compared.
    ablation = part("ablation", [{**r, "method": r["method"] + "[r4]"} for r in ROWS if r["method"] == "standard_init"],
                    adapt_config={**lora, "rank": 4, "alpha": 8, "seed": 3}, rank=4)
    merged = merge_reports([plain, ablation], tmp_path / "with-ablation", methods=["meta_init", "standard_init"])
    assert [(p["rows_replaced"], p["rows_left_out"]) for p in merged["parts"]] == [(0, 0), (0, 0)]
    only_meta = merge_reports([plain, ablation], tmp_path / "meta-only", methods=["meta_init"])
    assert [(p["rows_replaced"], p["rows_left_out"]) for p in only_meta["parts"]] == [(0, 3), (0, 3)]
    bf16 = part("bf16", ROWS, adapt_config=lora, machine={"device": "cpu", "cpu_model": "Y", "precision": "bf16 autocast"})
    merge_reports([plain, bf16], tmp_path / "mixed")
    assert "Machine and precision (by part): fp32 on cpu (X), bf16 autocast on cpu (Y)" in (
        tmp_path / "mixed" / "results.md").read_text()


def test_a_table_with_family_columns_names_them_and_reads_each_target_off_its_interval():
    n = 40  # items; every seed alike, so each interval is narrow around its difference
    fewshot = [1] * 20 + [0] * 20  # 0.50
    rows = []
    for seed in (0, 1):
        rows += [row("a", "standard_init", 30, seed, fewshot), row("a", "meta_init", 30, seed, [1] * n),
                 row("a", "family_multitask_init", 30, seed, [1] * 26 + [0] * 14),  # 0.65
                 row("a", "family_init", 0, seed, [1] * 18 + [0] * 22),  # 0.45
                 row("a", "family_init", 30, seed, [1] * 30 + [0] * 10)]  # 0.75
    report = report_for(rows, tasks={"a": {"n_test": n, "n_train_available": 500, "gold": None, "n_options": None}})
    text = markdown(report)
    assert text.startswith("# Multi-task setting") and "| few-shot LoRA+30 | meta_init+30 | multi-task LoRA+30 |" in text
    targets = text.split("## The seed's targets")[1].split("\n## ")[0]
    # +0.25 over few-shot (every item of the gain agrees: the whole interval clears 0.10), +0.10 over multi-task:
    # the interval straddles 0.05; K = 0 is compared with few-shot at its largest K and falls short of it.
    assert "| over few-shot LoRA by >= 0.10 | MeTA-LoRA family+30 − few-shot LoRA+30 | **+0.250**" in targets
    lines = {line.split(" | ")[1]: line for line in targets.splitlines() if line.count(" | ") >= 3}
    assert lines["MeTA-LoRA family+30 − few-shot LoRA+30"].endswith("| met |")
    assert lines["MeTA-LoRA family+30 − multi-task LoRA+30"].endswith("| not resolved |")
    assert lines["MeTA-LoRA family+0 − few-shot LoRA+30"].endswith("| missed |")
    assert lines["MeTA-LoRA family+30 − full-data LoRA"].endswith("| not measured |")
    assert "# Few-shot evaluation" in markdown(report_for(ROWS))  # without family columns, the plain table


def test_merge_keeps_only_the_methods_asked_and_refuses_parts_of_other_test_items(tmp_path):
    def part(name, tasks=None):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**report_for(ROWS), "command": name, "git_commit": name, "k_values": [5],
                                    **({"tasks": tasks} if tasks else {})}))
        return path

    merged = merge_reports([part("one")], tmp_path / "std", methods=["standard_init"])
    assert {r["method"] for r in merged["rows"]} == {"standard_init"} and merged["methods"] == ["standard_init"]
    moved = report_for(ROWS)["tasks"]
    moved["a"] = {**moved["a"], "gold": [1, 1, 1, 1]}
    with pytest.raises(ValueError, match="task a has another gold"):
        merge_reports([part("one"), part("two", moved)], tmp_path / "bad")


def test_columns_run_with_other_seeds_are_named_beside_the_table():
    rows = [row("a", "standard_init", 5, s, [1, 0, 1, 1]) for s in (0, 1, 2)] + [row("a", "in_context", 0, 0, [1, 1, 0, 0])]
    text = markdown(report_for(rows))
    assert "in_context: seed 0; standard_init+5: seeds 0, 1, 2." in text
    assert "Seeds per column" not in markdown(report_for([r for r in rows if r["method"] == "standard_init"]))


def test_a_difference_says_where_its_interval_has_no_seed_spread():
    three = [row("a", m, 5, s, [1, 0, 1, 1]) for m in ("standard_init", "meta_init") for s in (0, 1, 2)]
    one = [row("b", m, 5, 0, [1, 0]) for m in ("standard_init", "meta_init")]
    assert "(1 tasks, 3 seeds, 4 items) |" in markdown(report_for(three))
    assert "(2 tasks, 1-3 seeds, 6 items, items only on 1 of 2 tasks) |" in markdown(report_for(three + one))
    assert "(1 tasks, 1 seeds, 2 items, items only) |" in markdown(report_for(one))


def test_a_column_is_one_init_per_seed_for_a_family_and_one_for_every_seed_otherwise(tmp_path):
    def part(name, method, seed, digest):
        rows = [{**row("a", method, 5, seed, [1, 0, 1, 1], [0, 0, 1, 1]), "init_sha256": digest},
                {**row("a", "standard_init", 5, seed, [0, 0, 1, 1], [1, 0, 1, 1])}]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**report_for(rows), "command": name, "k_values": [5],
                                    "methods": ["standard_init", method]}))
        return path

    # A family init is trained on its seed's draws: another seed from other weights is the normal case.
    merge_reports([part("f0", "family_init", 0, "a" * 64), part("f1", "family_init", 1, "b" * 64)], tmp_path / "f")
    # The shipped init is one for every seed: seed 1 scored from other weights is another init under the same name.
    with pytest.raises(ValueError, match="meta_init column was scored from other init weights"):
        merge_reports([part("m0", "meta_init", 0, "a" * 64), part("m1", "meta_init", 1, "b" * 64)], tmp_path / "m")
    assert not (tmp_path / "m").exists()
    # The digest travels with the rows, so a merged table merged again is checked too.
    merge_reports([part("m0", "meta_init", 0, "a" * 64)], tmp_path / "once")
    with pytest.raises(ValueError, match="meta_init column"):
        merge_reports([tmp_path / "once" / "results.json", part("m1", "meta_init", 1, "b" * 64)], tmp_path / "twice")
