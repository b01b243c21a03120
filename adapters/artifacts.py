"""The adapter store: one flat folder per version, `<root>/<vllm_name>/`, read by vLLM's resolver.

Folders appear and disappear only by rename (atomic on one filesystem), so vLLM never reads half a
folder: writes go to `.tmp-*` and are renamed into place; deletes are renamed to `.trash-*` first.
Versions are immutable: a folder that exists is never replaced.

Durability: before the rename every file and the staging folder are fsynced, and after it the root, so a power
loss never leaves a version in place whose files are not on disk. Each version records the sha256 of its files
(CHECKSUMS), written at staging; reads for a download and a reuse by the worker verify them.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import time
import uuid
import zipfile
from pathlib import Path
from typing import Iterator, Protocol

from adapters.errors import ArtifactCorrupt, InvalidAdapterName
from adapters.names import parse_vllm_name, vllm_name
from adapters.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKSUMS

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"


class ArtifactExists(FileExistsError):
    """The version's folder already exists; versions are immutable."""


class ArtifactStore(Protocol):
    """What the worker and the gateway need; a local folder today, an object store later."""

    def staging(self, vllm_name: str) -> contextlib.AbstractContextManager[Path]: ...

    def exists(self, vllm_name: str) -> bool: ...

    def read_json(self, vllm_name: str, filename: str) -> dict | None:
        """A small JSON file of a stored version (its job record, its metrics); None when absent."""

    def read_bytes(self, vllm_name: str, filename: str) -> bytes:
        """One file of a stored version; ArtifactCorrupt when it is missing (the records say it exists) or does
        not match the checksum recorded at write."""

    def verify(self, vllm_name: str) -> None:
        """Every file recorded at write is there with its checksum; ArtifactCorrupt otherwise."""

    def serving_path(self, vllm_name: str) -> str:
        """Where vLLM loads the version from (its filesystem resolver reads the same folder)."""

    def delete(self, vllm_name: str) -> bool: ...

    def sweep_orphans(self, max_age_s: float) -> list[str]: ...

    def version_ages(self, tenant: str, name: str) -> dict[int, float]:
        """The versions of one adapter that have a folder, each with the seconds since it was last written."""


def _check_name(vllm_name: str) -> str:
    # vllm_name() already produces safe names; this guards callers that pass anything else.
    if (not isinstance(vllm_name, str) or not vllm_name or vllm_name.startswith(".")
            or any(sep in vllm_name for sep in ("/", "\\", "\x00")) or ".." in vllm_name):
        raise InvalidAdapterName(vllm_name)
    return vllm_name


class LocalArtifactStore:
    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, vllm_name: str) -> Path:
        path = (self.root / _check_name(vllm_name)).resolve()
        if path.parent != self.root:
            raise InvalidAdapterName(vllm_name)
        return path

    def exists(self, vllm_name: str) -> bool:
        return self.path(vllm_name).is_dir()

    def read_json(self, vllm_name: str, filename: str) -> dict | None:
        try:
            return json.loads((self.path(vllm_name) / _check_name(filename)).read_text())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None

    def read_bytes(self, vllm_name: str, filename: str) -> bytes:
        try:
            content = (self.path(vllm_name) / _check_name(filename)).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise ArtifactCorrupt(f"the stored files of {vllm_name!r} lack {filename}") from None
        expected = self._checksums(vllm_name).get(filename)
        if expected is not None and hashlib.sha256(content).hexdigest() != expected:
            raise _mismatch(vllm_name, filename)
        return content

    def verify(self, vllm_name: str) -> None:
        verify_folder(self.path(vllm_name))

    def _checksums(self, vllm_name: str) -> dict[str, str]:
        return recorded_checksums(self.path(vllm_name))

    def serving_path(self, vllm_name: str) -> str:
        return str(self.path(vllm_name))

    @contextlib.contextmanager
    def staging(self, vllm_name: str) -> Iterator[Path]:
        """Yield an empty temp folder; on success it becomes `path(vllm_name)`, on error it is removed.
        Raises ArtifactExists (before or after writing) when the version is already stored."""
        final = self.path(vllm_name)
        if final.exists():
            raise ArtifactExists(str(final))
        tmp = self.root / f"{TMP_PREFIX}{vllm_name}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            yield tmp
            _seal(tmp)
            # rename(2) would silently replace an *empty* folder, hence the check; a writer racing us
            # past the check leaves a non-empty folder, which rename refuses (ENOTEMPTY/EEXIST).
            if final.exists():
                raise ArtifactExists(str(final))
            try:
                os.rename(tmp, final)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise ArtifactExists(str(final)) from exc
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync(self.root)  # the rename itself

    def delete(self, vllm_name: str) -> bool:
        """Remove a version's folder; False when it was not there."""
        final = self.path(vllm_name)
        trash = self.root / f"{TRASH_PREFIX}{vllm_name}-{uuid.uuid4().hex}"
        try:
            os.rename(final, trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def version_ages(self, tenant: str, name: str) -> dict[int, float]:
        prefix, now, ages = vllm_name(tenant, name, 0).removesuffix("0"), time.time(), {}
        for entry in self.root.iterdir():
            parsed = parse_vllm_name(entry.name) if entry.name.startswith(prefix) else None
            if parsed is None or parsed[:2] != (tenant, name):
                continue
            try:
                ages[parsed[2]] = now - entry.lstat().st_mtime
            except FileNotFoundError:
                continue
        return ages

    def sweep_orphans(self, max_age_s: float) -> list[str]:
        """Remove `.tmp-*` / `.trash-*` left by crashed writers, older than max_age_s (so a staging
        folder still being written is spared). Returns the names removed."""
        cutoff = time.time() - max_age_s
        removed = []
        for entry in self.root.iterdir():
            if not entry.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                continue
            try:
                if entry.lstat().st_mtime > cutoff:
                    continue
            except FileNotFoundError:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
        return removed


def verify_folder(folder: Path) -> None:
    """Every file a version folder recorded at write is there with its sha256; ArtifactCorrupt otherwise. By path,
    for callers that hold a serving path rather than the store (adapters/warmup.py)."""
    for filename, expected in recorded_checksums(folder).items():
        try:
            actual = _sha256(folder / _check_name(filename))
        except (FileNotFoundError, NotADirectoryError):
            raise ArtifactCorrupt(f"the stored files of {folder.name!r} lack {filename}") from None
        if actual != expected:
            raise _mismatch(folder.name, filename)


def recorded_checksums(folder: Path) -> dict[str, str]:
    """{file: sha256} recorded at write; empty for a version written before checksums were recorded."""
    try:
        text = (folder / CHECKSUMS).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return {}
    try:
        sums = json.loads(text)["sha256"]
        if not isinstance(sums, dict):
            raise TypeError(type(sums).__name__)
        return sums
    except (ValueError, KeyError, TypeError):
        raise ArtifactCorrupt(f"the checksums of {folder.name!r} ({CHECKSUMS}) are unreadable") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a folder opens read-only too, which is all fsync needs
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mismatch(vllm_name: str, filename: str) -> ArtifactCorrupt:
    return ArtifactCorrupt(f"{filename} of {vllm_name!r} does not match the sha256 recorded when it was written"
                           " (truncated or modified since)")


def _seal(folder: Path) -> None:
    """Record the sha256 of each file of a staged (flat) version folder, and put the files, the record and the
    folder on disk."""
    sums = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != CHECKSUMS:
            sums[path.name] = _sha256(path)
            _fsync(path)
    (folder / CHECKSUMS).write_text(json.dumps({"sha256": sums}, indent=2, sort_keys=True))
    _fsync(folder / CHECKSUMS)
    _fsync(folder)


def pack_peft(store: ArtifactStore, vllm_name: str, folder: str, base_model_name: str) -> bytes:
    """A version's PEFT files as one zip, under `folder/` (what `POST /v1/adapters/{name}/versions` takes back,
    and what PEFT's `from_pretrained` reads once unpacked). `base_model_name_or_path` names the served model
    rather than this machine's path to it."""
    config = json.loads(store.read_bytes(vllm_name, ADAPTER_CONFIG))
    config["base_model_name_or_path"] = base_model_name
    weights = store.read_bytes(vllm_name, ADAPTER_WEIGHTS)
    buffer = io.BytesIO()
    # Stored, not deflated: safetensors of floats barely compress, and the gateway should not spend CPU on it.
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{folder}/{ADAPTER_CONFIG}", json.dumps(config, indent=2, sort_keys=True))
        archive.writestr(f"{folder}/{ADAPTER_WEIGHTS}", weights)
    return buffer.getvalue()


# Chosen by configuration like the metadata backends; an object-store implementation registers here.
ARTIFACT_STORES = {"local": LocalArtifactStore}


def open_artifacts(settings) -> ArtifactStore:
    return ARTIFACT_STORES["local"](settings.adapter_root)
