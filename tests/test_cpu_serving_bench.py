"""benchmarks/cpu_serving.py's schedule, pooling, ratios and report, on made-up client results (the real run is
`make bench` part 7)."""
from __future__ import annotations

import pytest

from adapters.settings import Settings
from benchmarks.cpu_serving import (CONFIGS, MAX_ENGINES, MERGED, Cell, cpu_serving, engine_env, engines_at_once,
                                    interleave, knob_cells, main_cells, plain_model_command, ratios, write_markdown)
from benchmarks.vllm_client import pool
from metalora.vllm_command import vllm_command


def run(tok_s: float, ttft_s: float, tpot_s: float, n: int = 4, out: int = 32, failed: int = 0) -> dict:
    """A `vllm bench serve` result of n requests of `out` tokens at these speeds (one wave: duration = latency)."""
    latency = ttft_s + tpot_s * (out - 1)
    return {"duration": n * out / tok_s, "completed": n - failed, "failed": failed, "command": "vllm bench serve",
            "output_lens": [out] * (n - failed) + [0] * failed, "ttfts": [ttft_s] * (n - failed) + [0.0] * failed,
            "latencies": [latency] * (n - failed) + [0.0] * failed, "errors": [""] * (n - failed) + ["boom"] * failed}


def cell(phase, config, target, load, *runs) -> tuple[str, dict]:
    c = Cell(phase, config, target, load)
    return c.key, {"phase": phase, "config": config, "target": target, "load": load, **pool(list(runs))}


CELLS = dict([
    cell("main", "new", "direct", "base", run(100, 1.0, 0.05), run(100, 1.0, 0.05)),
    cell("main", "new", "direct", "1", run(60, 2.0, 0.1)),
    cell("main", "new", "gateway", "base", run(98, 1.1, 0.05)),
    cell("main", "old", "direct", "base", run(50, 2.0, 0.05)),
    cell("main", "old", "direct", "1", {"error": "RuntimeError: engine exited", "command": "x"}),
    cell("knobs1", "new", "direct", "1", run(40, 2.0, 0.1)),
    cell("knobs1", "new-rank16", "direct", "1", run(20, 8.0, 0.2)),
    cell("knobs2", "new", "direct", "base", run(100, 1.0, 0.05)),
    cell("knobs2", "new", "direct", "1", run(40, 4.0, 0.1)),
    cell("knobs2", MERGED, "direct", "base", run(110, 1.0, 0.05)),
])


def test_pooling_sums_tokens_over_durations_and_drops_failed_requests():
    row = pool([run(100, 1.0, 0.05), run(50, 3.0, 0.05, failed=2)])
    # 4 x 32 tokens in 1.28 s, then 2 x 32 tokens in a run timed for 4 requests at 50 tok/s (2.56 s)
    assert abs(row["output_throughput"] - (6 * 32) / (1.28 + 2.56)) < 1e-9
    assert row["completed"] == 6 and row["failed"] == 2
    assert row["median_ttft_ms"] == 1000.0  # four requests at 1 s, two at 3 s; the failed two are not counted
    assert abs(row["median_tpot_ms"] - 50.0) < 1e-9
    assert [round(r["output_throughput"]) for r in row["rounds"]] == [100, 25]
    assert "error" in pool([{"error": "x", "command": "c"}])


def test_every_ratio_is_inside_one_phase():
    r = ratios(CELLS)
    assert r["new direct: 1 adapter(s) / base"] == {"throughput": 0.6, "ttft": 2.0, "tpot": 2.0}
    assert abs(r["new base: gateway / direct"]["throughput"] - 0.98) < 1e-9
    assert r["direct base: new / old"]["throughput"] == 2.0
    # the knob against the reference measured beside it, not against the main phase's
    assert r["new-rank16 1: knob / new"] == {"throughput": 0.5, "ttft": 4.0, "tpot": 2.0}
    assert "direct 1: new / old" not in r and "old direct: 1 adapter(s) / base" not in r
    # the merged model against its phase's base cell, and against the same adapter served as LoRA
    assert abs(r[f"{MERGED} base: knob / new"]["throughput"] - 1.1) < 1e-9
    assert r[f"{MERGED} model / its adapter as LoRA on new"] == {"throughput": 2.75, "ttft": 0.25, "tpot": 0.5}


def test_the_schedule_interleaves_and_reverses_every_other_round():
    cells = main_cells(["old", "new"], ["direct", "gateway"], ["base", "1"])
    assert [(c.config, c.target, c.load) for c in cells[:4]] == [
        ("old", "direct", "base"), ("new", "direct", "base"), ("new", "gateway", "base"), ("old", "gateway", "base")]
    order = interleave(cells, 2)
    assert [c for r, c in order if r == 1] == cells[::-1]
    # ABBA: every cell's mean position is the same, so linear drift cancels out of every ratio
    positions = {c: [i for i, (_, x) in enumerate(order) if x == c] for c in cells}
    assert len({sum(p) for p in positions.values()}) == 1
    knobs = knob_cells("knobs1", ["new-rank16", "new-maxloras16"])
    assert [(c.config, c.load) for c in knobs] == [
        ("new", "base"), ("new-rank16", "base"), ("new", "1"), ("new-rank16", "1"),
        ("new-maxloras16", "base"), ("new-maxloras16", "1"), ("new", "16"), ("new-maxloras16", "16")]
    # the merged model has one load of its own, next to both of the reference's it is compared with
    assert [(c.config, c.load) for c in knob_cells("knobs2", [MERGED])] == [
        ("new", "base"), (MERGED, "base"), ("new", "1")]


def test_markdown_lists_cells_ratios_errors_and_provenance(tmp_path):
    out = tmp_path / "cpu_serving.md"
    write_markdown({"cells": CELLS, "ratios": ratios(CELLS), "adapters": "x", "load": {"rounds": 2},
                    "configs": {"old": {"doc": "before", "error": "RuntimeError: no start"},
                                "new": {"doc": "now", "engine_command": "python -m vllm --max-lora-rank 8"}}}, out,
                   {"command": "python -m benchmarks.run_all --parts 7", "commit": "abc"})
    text = out.read_text()
    assert "| main | new | direct | base | 100.0 | 1000 | 50 | 0 | 100.0, 100.0 |" in text
    assert "| new-rank16 1: knob / new | 0.50 | 4.00 | 2.00 |" in text
    assert "engine exited" in text and "no start" in text and "commit: abc" in text
    assert "command: `python -m vllm --max-lora-rank 8`" in text


def test_old_configuration_has_no_tuning_and_the_old_rank_limit(tmp_path, monkeypatch):
    for key in ("LD_PRELOAD", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.delenv(key, raising=False)
    settings = Settings(data_dir=tmp_path)
    old, new = engine_env(CONFIGS["old"], settings), engine_env(CONFIGS["new"], settings)
    assert "LD_PRELOAD" not in old and "VLLM_CPU_OMP_THREADS_BIND" not in old and old["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert CONFIGS["old"].settings["vllm_max_lora_rank"] == 16 and "vllm_max_lora_rank" not in CONFIGS["new"].settings
    assert "libiomp" not in engine_env(CONFIGS["new-gomp"], settings).get("LD_PRELOAD", "")
    assert new["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    assert engine_env(CONFIGS["new-allcores"], settings)["VLLM_CPU_OMP_THREADS_BIND"] != "auto"


def test_the_merged_engine_runs_without_lora_and_a_run_keeps_two_engines_at_most(tmp_path):
    argv = vllm_command(Settings(data_dir=tmp_path, base_model=str(tmp_path / "merged")), port=9)
    plain = plain_model_command(argv)
    assert "--enable-lora" in argv
    assert not {"--enable-lora", "--max-loras", "--max-lora-rank", "--max-cpu-loras"} & set(plain)
    assert plain[plain.index("--model") + 1] == str(tmp_path / "merged") and plain[plain.index("--port") + 1] == "9"
    assert len(plain) == len(argv) - 7  # the flag and the value of the three others, nothing else
    assert engines_at_once(["old", "new"], 1) == MAX_ENGINES == 2
    assert engines_at_once([], 2) == 3 and engines_at_once(["old", "new", "new-rank16"], 0) == 3
    registered = []
    with pytest.raises(ValueError, match="at most 2 engines"):  # refused before anything is written or started
        cpu_serving([], ["new-rank16", "new-mbt256"], ["direct"], ["1"], lambda d, n: registered.append(d),
                    knob_batch=2)
    assert registered == []
