"""adapters/artifacts.py (atomic, immutable adapter folders) and adapters/base_model.py (paths vLLM sees)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from adapters.artifacts import ArtifactExists, LocalArtifactStore
from adapters.base_model import DEFAULT_BASE_MODEL_DIRNAME, base_model_path, served_model_name
from adapters.errors import InvalidAdapterName
from adapters.settings import Settings

NAME = "acme~adp@v1"


@pytest.fixture
def store(tmp_path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "adapters")


def entries(store: LocalArtifactStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir())


def test_staging_appears_only_when_complete(store):
    with store.staging(NAME) as tmp:
        (tmp / "adapter_config.json").write_text("{}")
        assert not store.exists(NAME)  # vLLM must not see a half-written folder
        assert tmp.parent == store.root and tmp.name.startswith(".tmp-")
    assert store.exists(NAME)
    assert (store.path(NAME) / "adapter_config.json").read_text() == "{}"
    assert entries(store) == [NAME]


def test_failure_leaves_nothing(store):
    with pytest.raises(RuntimeError):
        with store.staging(NAME) as tmp:
            (tmp / "partial.safetensors").write_bytes(b"x")
            raise RuntimeError("training crashed")
    assert not store.exists(NAME)
    assert entries(store) == []


def test_versions_are_immutable(store):
    with store.staging(NAME) as tmp:
        (tmp / "weights").write_text("first")
    with pytest.raises(ArtifactExists):
        with store.staging(NAME):
            pass
    assert (store.path(NAME) / "weights").read_text() == "first"


def test_racing_writers_first_one_wins(store):
    with pytest.raises(ArtifactExists):
        with store.staging(NAME) as slow:
            (slow / "weights").write_text("slow")
            with store.staging(NAME) as fast:
                (fast / "weights").write_text("fast")
    assert (store.path(NAME) / "weights").read_text() == "fast"
    assert entries(store) == [NAME]  # the loser's temp folder is gone


@pytest.mark.parametrize("bad", ["", "..", "../x", "a/b", "a\\b", "/abs", ".hidden", ".tmp-x", "a\x00b", "a..b"])
def test_refuses_names_outside_root(store, bad):
    with pytest.raises(InvalidAdapterName):
        store.path(bad)
    with pytest.raises(InvalidAdapterName):
        with store.staging(bad):
            pass
    with pytest.raises(InvalidAdapterName):
        store.delete(bad)
    assert entries(store) == []


def test_delete(store):
    with store.staging(NAME) as tmp:
        (tmp / "weights").write_text("w")
    assert store.delete(NAME) is True
    assert not store.exists(NAME) and entries(store) == []
    assert store.delete(NAME) is False


def test_sweep_removes_only_stale_orphans(store):
    old = time.time() - 3600
    for name in (".tmp-acme~a@v1-dead", ".trash-acme~b@v1-dead", NAME):
        (store.root / name).mkdir()
        (store.root / name / "f").write_text("x")
        os.utime(store.root / name, (old, old))
    (store.root / ".tmp-acme~c@v1-writing").mkdir()  # fresh: a worker is still writing it
    removed = store.sweep_orphans(max_age_s=60)
    assert sorted(removed) == [".tmp-acme~a@v1-dead", ".trash-acme~b@v1-dead"]
    assert entries(store) == [".tmp-acme~c@v1-writing", NAME]


def test_default_base_model_path_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = Settings(model_cache_dir=Path("models"), base_model="default")
    path = base_model_path(settings)
    assert path == tmp_path.resolve() / "models" / DEFAULT_BASE_MODEL_DIRNAME
    assert served_model_name(settings) == DEFAULT_BASE_MODEL_DIRNAME


def test_custom_base_model_path_resolved(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    settings = Settings(base_model=str(tmp_path / "link" / ".." / "real"))
    assert str(base_model_path(settings)) == str((tmp_path / "real").resolve())
    assert served_model_name(Settings(base_model=str(tmp_path / "real"), served_model_name="smol")) == "smol"
