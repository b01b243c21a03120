"""Adapter folders are durable before they appear (files and folders fsynced before and after the rename) and
carry the sha256 of each file recorded at write; a download refuses a truncated or tampered file."""
from __future__ import annotations

import json
import os

import pytest

from adapters.artifacts import LocalArtifactStore, pack_peft
from adapters.errors import ArtifactCorrupt
from adapters.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKSUMS

NAME = "acme~adp@v1"
WEIGHTS = bytes(range(256)) * 64


@pytest.fixture
def store(tmp_path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "adapters")


def write_version(store: LocalArtifactStore) -> None:
    with store.staging(NAME) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps({"r": 8}))
        (tmp / ADAPTER_WEIGHTS).write_bytes(WEIGHTS)


def test_files_and_folders_are_fsynced_around_the_rename(store, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def counting_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    write_version(store)
    names = [os.path.basename(p) for p in synced]
    # Every file and the staging folder before the rename (a crash must never expose a folder whose files
    # are not on disk), then the adapter root, so the rename itself survives a power loss.
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKSUMS} <= set(names), synced
    staging = [p for p in synced if os.path.basename(p).startswith(".tmp-")]
    assert staging and synced.index(staging[0]) < synced.index(str(store.root)), synced
    assert synced[-1] == str(store.root)


def test_checksums_are_recorded_and_a_download_verifies_them(store):
    write_version(store)
    recorded = json.loads((store.path(NAME) / CHECKSUMS).read_text())["sha256"]
    assert set(recorded) == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    store.verify(NAME)
    assert pack_peft(store, NAME, "adp-v1", "base")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_tampered_or_truncated_weights_file_is_refused(store, damage):
    write_version(store)
    weights = store.path(NAME) / ADAPTER_WEIGHTS
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[100] ^= 0x01
    else:
        data = data[: len(data) // 2]
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorrupt, match=ADAPTER_WEIGHTS):
        store.verify(NAME)
    with pytest.raises(ArtifactCorrupt, match="sha256"):
        pack_peft(store, NAME, "adp-v1", "base")


def test_a_missing_recorded_file_is_refused(store):
    write_version(store)
    (store.path(NAME) / ADAPTER_CONFIG).unlink()
    with pytest.raises(ArtifactCorrupt, match=ADAPTER_CONFIG):
        store.verify(NAME)


class FakeEngine:
    """Writes a fixed adapter; counts how often it trains."""

    shared = None

    def __init__(self):
        from trainer.config import AdaptConfig

        self.default_config = AdaptConfig(steps=2, holdout_fraction=0.0)
        self.trained = 0

    def train(self, examples, config, on_step=None):
        from trainer.engine import AdaptOutcome

        self.trained += 1
        return AdaptOutcome(config=config, metrics={"steps_run": 2, "train_losses": [2.0, 1.0], "loss_before": 2.0,
                                                    "loss_after": 1.0, "init": "standard"})

    def save(self, out_dir, base_model_name):
        from adapters.layout import ADAPT_RECORD

        (out_dir / ADAPTER_CONFIG).write_text(json.dumps({"r": 8}))
        (out_dir / ADAPTER_WEIGHTS).write_bytes(WEIGHTS)
        (out_dir / ADAPT_RECORD).write_text(json.dumps({"metrics": {"loss_before": 2.0, "loss_after": 1.0,
                                                                    "init": "standard", "steps_run": 2}}))


async def test_the_worker_retrains_instead_of_reusing_a_corrupt_folder(tmp_path):
    import asyncio

    from adapters.artifacts import open_artifacts
    from adapters.backend import open_backend
    from adapters.layout import JOB_RECORD
    from adapters.names import vllm_name
    from adapters.records import JobStatus
    from adapters.settings import Settings
    from trainer.worker import Worker

    settings = Settings(data_dir=tmp_path, redis_url=None)
    backend = open_backend(settings)
    artifacts, engine = open_artifacts(settings), FakeEngine()
    try:
        examples = [{"prompt": "2+2?", "completion": " 4"}]
        job = await backend.store.submit_job("default", "adp", 1, examples, {})
        name = vllm_name("default", "adp", job.version)
        # An earlier attempt wrote the folder and died before marking it ready; since then the weights were cut.
        with artifacts.staging(name) as tmp:
            engine.save(tmp, "base")
            (tmp / JOB_RECORD).write_text(json.dumps({"job_id": job.id}))
        weights = artifacts.path(name) / ADAPTER_WEIGHTS
        weights.write_bytes(weights.read_bytes()[:100])
        worker = Worker(settings, backend, artifacts, engine, asyncio.Event())
        lease = await backend.queue.claim(worker.consumer, 1000)
        await worker.process(lease)
        assert (await backend.store.get_job(job.id)).status is JobStatus.SUCCEEDED
        assert engine.trained == 1
        artifacts.verify(name)
        assert artifacts.read_bytes(name, ADAPTER_WEIGHTS) == WEIGHTS
    finally:
        await backend.close()
