"""The benchmark summary says by how much a target is missed and why, from the measured figures themselves."""
from __future__ import annotations

import json

from benchmarks.report import write_summary


def variant(ratio: float, rounds: list[float], added_p50: float) -> dict:
    latency = {"p50": 1000.0}
    return {"throughput_ratio_median": ratio, "throughput_ratio_pooled": ratio, "throughput_ratio_per_round": rounds,
            "added_p50_ms": added_p50, "added_p99_ms": 0.0, "direct_latency_ms": latency}


def by_count(ratio: float) -> dict:
    return {"throughput_ratio_to_base_median": ratio, "req_per_s_pooled": 1.0, "latency_p50_ms": 1.0,
            "latency_p99_ms": 1.0}


def test_summary_quantifies_misses_and_stays_quiet_when_met(tmp_path):
    results = {
        "git_commit": "abc123-dirty",
        "machine": {"cpus": 2, "cpu_model": "Test CPU", "cpu_flags": ["avx2"], "precision": "fp32"},
        "gateway_overhead": {
            "config": {"concurrency": 8, "requests_per_round": 32, "max_tokens": 16, "rounds": 2},
            "variants": {"base/non-stream": variant(0.99, [0.98, 1.0], 1.0),
                         "adapter/non-stream": variant(0.95, [0.93, 0.97], 1.5)}},
        "many_adapters": {
            "config": {"concurrency": 16, "max_loras": 4, "max_cpu_loras": 64, "adapter_rank": 8, "adapters": "random"},
            "cold_first_request_ms": {"p50": 10.0}, "base_single_request_ms": {"p50": 5.0},
            "by_count": {"0": by_count(1.0), "1": by_count(0.8), "16": by_count(0.6)}},
    }
    write_summary(results, tmp_path, [])
    text = (tmp_path / "summary.md").read_text()
    assert "Test CPU; flags avx2; precision fp32" in text
    assert "git commit: `abc123-dirty` (tracked files differed from it)" in text
    assert "adapter/non-stream: throughput missed by 0.020; its rounds ran 0.930-0.970." in text
    assert "base/non-stream: throughput missed" not in text
    # 16 adapters at 0.6 against 0.7; one adapter at 0.8 already carries half of the 0.4 loss.
    assert "Missed by 0.100. One adapter alone (always resident) runs at 0.800 of base, so 50% of the loss" in text

    results["many_adapters"]["by_count"]["16"] = by_count(0.75)
    results["gateway_overhead"]["variants"]["adapter/non-stream"] = variant(0.98, [0.97, 0.99], 0.5)
    write_summary(results, tmp_path, [])
    text = (tmp_path / "summary.md").read_text()
    assert "Missed by" not in text and "missed by" not in text


def test_k_step_target_is_judged_on_the_ratio_of_medians_not_the_best_round(tmp_path):
    summary = {"breakdown_ours_median_s": {"k_steps_s": 10.0}, "breakdown_baseline_median_s": {"k_steps_s": 14.0},
               "ours_total_s": 11.0, "baseline_total_s": 15.0, "ours_overhead_over_k_steps": 0.08,
               "baseline_overhead_over_k_steps": 0.1, "k_steps_speedup_in_process": 1.4,
               "k_steps_speedup_best_of_n": 1.6, "k_steps_speedup_stack_worker": 1.2, "end_to_end_speedup": 1.3}
    results = {"machine": {"cpus": 2, "precision": "fp32"},
               "adaptation": {"config": {"adapt_config": {}, "held_out": "none", "init": "standard"},
                              "summary": summary}}
    write_summary(results, tmp_path, [])
    text = (tmp_path / "summary.md").read_text()
    assert "best-of-N 1.60x (target >= 1.5x, judged on the ratio of medians as every other part is: MISSED)" in text
    assert "K-step target missed by 0.10x (ratio of medians 1.40x against 1.5x)" in text


def test_results_written_before_the_provenance_helper_still_render(tmp_path):
    """Older results.json files recorded {"git": {"commit", "dirty"}} and a cpu_bf16_autocast bool."""
    old = {"git": {"commit": "abc123", "dirty": True}, "machine": {"cpus": 2, "cpu_bf16_autocast": True},
           "merged_from": [{"command": "earlier", "git": {"commit": "def456", "dirty": False}}]}
    write_summary(old, tmp_path, [])
    text = (tmp_path / "summary.md").read_text()
    assert "git commit: `abc123-dirty`" in text and "precision bf16 autocast" in text
    assert "at commit `def456`, started" in text


def test_part_7_comes_from_its_own_files_when_results_json_lacks_it(tmp_path):
    def cell(config, target, load, tok_s):
        return {"phase": "main", "config": config, "target": target, "load": load, "output_throughput": tok_s,
                "median_ttft_ms": 1000.0, "median_tpot_ms": 50.0}

    main = {"command": "python -m benchmarks.run_all --parts 7", "commit": "abc", "load": {"rounds": 2},
            "cells": {"main:new/direct/base": cell("new", "direct", "base", 100.0),
                      "main:new/direct/1": cell("new", "direct", "1", 70.0)},
            "ratios": {"new direct: 1 adapter(s) / base": {"throughput": 0.7, "ttft": 2.5, "tpot": 1.2},
                       "new 1: gateway / direct": {"throughput": 0.96, "ttft": 1.0, "tpot": 1.0}}}
    knobs = {"runs": [{"command": "python -m benchmarks.run_all --parts 7 --cpu-configs ''", "commit": "def"}],
             "cells": {"knobs1:merged/direct/base": {}},
             "ratios": {"new-rank16 1: knob / new": {"throughput": 0.8, "ttft": 1.5, "tpot": None},
                        "merged model / its adapter as LoRA on new": {"throughput": 2.5, "ttft": 0.2, "tpot": 0.4}},
             "configs": {"new-lora-fp16": {"error": "RuntimeError: exited early"}}}
    write_summary({"machine": {}}, tmp_path, [])
    assert "## 7. vLLM-CPU serving speed" in (tmp_path / "summary.md").read_text()
    assert "not run" in (tmp_path / "summary.md").read_text().split("## 7.")[1]

    (tmp_path / "cpu_serving.json").write_text(json.dumps(main))
    (tmp_path / "cpu_serving_knobs.json").write_text(json.dumps(knobs))
    write_summary({"machine": {}}, tmp_path, [])
    text = (tmp_path / "summary.md").read_text()
    assert "| new | direct | 1 | 70.0 | 1000 | 50 |" in text
    # TTFT 2.5x misses the <= 2x half of issue 21's target although throughput meets its 0.6
    assert ("1 adapter at 0.70 of base throughput, 2.50x its median TTFT (issue 21's target >= 0.6 and <= 2x:"
            " MISSED)") in text
    assert "gateway / direct throughput on the new engine: 0.96 (target >= 0.97: MISSED)" in text
    assert "| new-rank16 1: knob / new | 0.80 | 1.50 | n/a |" in text
    assert "| merged model / its adapter as LoRA on new | 2.50 | 0.20 | 0.40 |" in text
    assert "--cpu-configs ''` at `def`" in text and "new-lora-fp16 (RuntimeError: exited early)" in text
