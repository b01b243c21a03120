"""A job whose training diverges (a loss that becomes NaN or inf) fails with `non_finite_loss` and writes no
adapter: the real inner loop, engine and worker on a tiny Llama crafted to diverge, against both stores.

The crafted model: layer 0's attention sees inputs scaled by 1e37 through zeroed q/k/v weights, so the start is
finite (the LoRA B matrices are zero) and the first update with a large alpha/rank overflows."""
from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
import torch

from adapters.artifacts import open_artifacts
from adapters.backend import open_backend
from adapters.names import vllm_name
from adapters.records import JobErrorCode, JobStatus, VersionStatus
from test_inner_loop import EXAMPLES, save_tiny_model
from test_worker import cleanup_redis, make_settings, redis_available
from trainer.config import AdaptConfig, NonFiniteLoss
from trainer.engine import AdaptEngine
from trainer.inner_loop import adapt
from trainer.worker import Worker

DIVERGING = {"steps": 4, "batch_size": 4, "holdout_fraction": 0.0, "max_seq_len": 64, "alpha": 1024, "rank": 1,
             "learning_rate": 0.5}


def save_diverging_model(directory: Path) -> Path:
    from transformers import LlamaForCausalLM

    save_tiny_model(directory)
    model = LlamaForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.input_layernorm.weight.fill_(1e37)
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.weight.zero_()
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def diverging_dir(tmp_path_factory) -> Path:
    return save_diverging_model(tmp_path_factory.mktemp("diverging-llama"))


@pytest.fixture(scope="module")
def engine(diverging_dir) -> AdaptEngine:
    return AdaptEngine(diverging_dir, shared_init=None, device="cpu")


def test_adapt_stops_at_the_first_non_finite_loss(engine):
    config = AdaptConfig(**DIVERGING)
    engine.reset_lora(config)
    seen: list[float] = []
    with pytest.raises(NonFiniteLoss) as info:
        adapt(engine.model, engine_encoded(engine), config, on_step=lambda step, loss: seen.append(loss))
    assert info.value.code == JobErrorCode.NON_FINITE_LOSS.value
    assert seen and all(math.isfinite(x) for x in seen), seen  # the listener never sees the bad loss
    with pytest.raises(NonFiniteLoss):  # and without a listener, the loop still refuses to return it
        engine.reset_lora(config)
        adapt(engine.model, engine_encoded(engine), config)


def engine_encoded(engine):
    from trainer.data import encode_examples

    return encode_examples(engine.tokenizer, EXAMPLES, 64)


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("redis", marks=pytest.mark.skipif(
    not redis_available(), reason="no Redis on 127.0.0.1:6379"))])
async def test_worker_fails_the_job_and_writes_nothing(kind, engine, diverging_dir, tmp_path):
    settings = make_settings(kind, tmp_path, str(diverging_dir))
    backend = open_backend(settings)
    try:
        job = await backend.store.submit_job("default", "diverges", len(EXAMPLES), EXAMPLES, DIVERGING)
        worker = Worker(settings, backend, open_artifacts(settings), engine, asyncio.Event())
        lease = await backend.queue.claim(worker.consumer, 1000)
        assert lease is not None and lease.job_id == job.id
        await worker.process(lease)
        done = await backend.store.get_job(job.id)
        assert done.status is JobStatus.FAILED, done
        assert done.error_code == JobErrorCode.NON_FINITE_LOSS.value and "not finite" in done.error
        adapter = await backend.store.get_adapter("default", "diverges")
        assert [v.status for v in adapter.versions] == [VersionStatus.FAILED]
        root = settings.adapter_root
        assert not (root / vllm_name("default", "diverges", job.version)).exists()
        assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")] if root.exists() else True
    finally:
        await backend.close()
        cleanup_redis(settings)
