"""benchmarks/cpu_serving.py's arithmetic and report, on made-up client results (the real run is `make bench`)."""
from __future__ import annotations

from adapters.settings import Settings
from benchmarks.cpu_serving import CONFIGS, engine_env, ratios, write_markdown


def row(tok_s: float, ttft: float) -> dict:
    return {"output_throughput": tok_s, "median_ttft_ms": ttft, "median_tpot_ms": 50.0, "failed": 0}


RESULTS = {"new": {"direct/base": row(100, 1000), "direct/1": row(60, 2000), "gateway/base": row(98, 1010)},
           "old": {"status": "error", "error": "RuntimeError: engine exited"}}


def test_ratios_are_inside_one_configuration():
    r = ratios(RESULTS)
    assert r["new direct 1 adapter(s)/base throughput"] == 0.6
    assert r["new direct 1 adapter(s)/base median TTFT"] == 2.0
    assert r["new gateway/direct throughput, base"] == 0.98
    assert not any(k.startswith("old") for k in r)


def test_markdown_lists_rows_errors_and_provenance(tmp_path):
    out = tmp_path / "cpu_serving.md"
    write_markdown({"configs": RESULTS, "ratios": ratios(RESULTS), "adapters": "x"}, out,
                   {"command": "python -m benchmarks.run_all --parts 7", "commit": "abc"})
    text = out.read_text()
    assert "| new | direct | 1 | 60.0 | 2000 | 50 | 0 |" in text
    assert "engine exited" in text and "commit: abc" in text


def test_old_configuration_has_no_tuning_and_new_has_it(tmp_path, monkeypatch):
    for key in ("LD_PRELOAD", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.delenv(key, raising=False)
    settings = Settings(data_dir=tmp_path)
    old, new = engine_env(CONFIGS["old"], settings), engine_env(CONFIGS["new"], settings)
    assert "LD_PRELOAD" not in old and "VLLM_CPU_OMP_THREADS_BIND" not in old and old["VLLM_CPU_KVCACHE_SPACE"] == "2"
    gomp = engine_env(CONFIGS["new-gomp"], settings)
    assert "libiomp" not in gomp.get("LD_PRELOAD", "")
    assert new["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    assert engine_env(CONFIGS["new-allcores"], settings)["VLLM_CPU_OMP_THREADS_BIND"] != "auto"
