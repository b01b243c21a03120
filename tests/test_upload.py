"""Bring your own adapter: the upload checks (adapters/upload_check.py) on their own, then through the gateway on
both stores: a good PEFT LoRA becomes a ready version that downloads back byte for byte; every bad one is a 400
that leaves no version, no folder and no loaded LoRA behind. The replicas here are small stand-ins that only
answer /health and the LoRA load/unload routes; tests/test_io_stack.py does the same round trip on real vLLM."""
from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters.errors import QuotaExceeded
from adapters.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from adapters.model_shapes import BaseModelShapes
from adapters.names import DEFAULT_TENANT
from adapters.records import AdapterVersion, VersionStatus
from adapters.settings import Settings
from adapters.upload_check import UploadRejected, check_upload, read_safetensors_header, unpack
from gateway_helpers import ServerThread, gateway_env, write_wordlevel_tokenizer
from helpers import REDIS_URL

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 16}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_model(folder: Path) -> Path:
    write_wordlevel_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(TINY))
    return folder


SHAPES = BaseModelShapes.from_config(TINY)


def peft_config(**overrides) -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": PROJECTIONS,
            "bias": "none", "use_dora": False, "modules_to_save": None, "base_model_name_or_path": "tiny-llama",
            "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True, **overrides}


def tensors(rank: int = 4, targets=PROJECTIONS, dtype=np.float32, layers=range(2)) -> dict[str, np.ndarray]:
    out = {}
    for layer in layers:
        for path, (d_in, d_out) in SHAPES.linear.items():
            if path.split(".")[-1] not in targets:
                continue
            prefix = f"base_model.model.model.layers.{layer}.{path}"
            out[f"{prefix}.lora_A.weight"] = np.full((rank, d_in), 0.01, dtype=dtype)
            out[f"{prefix}.lora_B.weight"] = np.full((d_out, rank), 0.02, dtype=dtype)
    return out


def adapter_files(config: dict | None = None, weights: dict | bytes | None = None) -> dict[str, bytes]:
    blob = weights if isinstance(weights, bytes) else save_safetensors(weights if weights is not None else tensors())
    return {ADAPTER_CONFIG: json.dumps(config or peft_config()).encode(), ADAPTER_WEIGHTS: blob}


def header_swap(blob: bytes, edit) -> bytes:
    """The safetensors file with its JSON header changed by `edit(header)`, length prefix rewritten."""
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + size])
    edit(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + blob[8 + size:]


def settings_for(tmp_path: Path, **kw) -> Settings:
    return Settings(data_dir=tmp_path / "data", base_model=str(tiny_model(tmp_path / "tiny")), **kw)


# Two tensors of one shape: pointing one at the other's bytes keeps every size right.
Q_A, K_A = (f"base_model.model.model.layers.0.self_attn.{p}.lora_A.weight" for p in ("q_proj", "k_proj"))


def check(files, settings=None, tmp_path=None):
    return check_upload(files, SHAPES, settings or Settings(), "/models/tiny")


# ---------------------------------------------------------------- the checks alone
def test_a_plain_peft_lora_passes_and_only_the_base_path_is_rewritten():
    checked = check(adapter_files())
    config = json.loads(checked.files[ADAPTER_CONFIG])
    assert config["base_model_name_or_path"] == "/models/tiny" and config["inference_mode"] is True
    assert config["r"] == 4 and config["target_modules"] == PROJECTIONS
    assert checked.files[ADAPTER_WEIGHTS] == adapter_files()[ADAPTER_WEIGHTS]
    assert checked.summary["rank"] == 4 and checked.summary["modules"] == 14
    assert checked.summary["uploaded_base_model"] == "tiny-llama"


def test_peft_target_rules_regex_layers_rank_pattern_and_half_precision():
    only_attn = peft_config(target_modules=r".*\.(q_proj|v_proj)", layers_to_transform=[1])
    check(adapter_files(only_attn, tensors(targets=["q_proj", "v_proj"], layers=[1], dtype=np.float16)))
    # rank_pattern: a per-module rank, as PEFT and vLLM match it (suffix at a "." boundary).
    patterned = peft_config(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 8})
    weights = tensors(targets=["q_proj"])
    weights.update({k: v for k, v in tensors(rank=8, targets=["v_proj"]).items()})
    check(adapter_files(patterned, weights))
    with pytest.raises(UploadRejected, match="has shape"):
        check(adapter_files(patterned, tensors(targets=["q_proj", "v_proj"])))


@pytest.mark.parametrize("tamper, message", [
    (lambda b: b[:4], "too short"),
    (lambda b: struct.pack("<Q", 10 ** 9) + b[8:], "header claims"),
    (lambda b: b[:8] + b"{not json" + b[17:], "not valid JSON"),
    (lambda b: b + b"\x00" * 8, "after the last tensor"),
    (lambda b: b[:-4], "outside the file|after the last tensor|overlap"),
    (lambda b: header_swap(b, lambda h: h[Q_A].__setitem__("data_offsets", h[K_A]["data_offsets"])), "overlap"),
    (lambda b: header_swap(b, lambda h: h[sorted(h)[0]].__setitem__("dtype", "I64")), "dtype"),
    (lambda b: header_swap(b, lambda h: h[sorted(h)[0]].__setitem__("shape", [3, 3])), "bytes of data"),
])
def test_a_tampered_safetensors_file_is_rejected(tamper, message):
    blob = save_safetensors(tensors())
    with pytest.raises(UploadRejected, match=message):
        check(adapter_files(weights=tamper(blob)))


@pytest.mark.parametrize("files, code, message", [
    ({ADAPTER_CONFIG: b"{}", "adapter_model.bin": b"\x80\x04"}, "unsafe_adapter_format", "pickle"),
    ({ADAPTER_CONFIG: json.dumps(peft_config()).encode()}, "invalid_adapter_upload", "lacks adapter_model"),
    (adapter_files(peft_config(r=16), tensors(rank=16)), "rank_too_high", "max LoRA rank 8"),
    (adapter_files(peft_config(target_modules=["q_proj", "lm_head"])), "unknown_target_module", "lm_head"),
    (adapter_files(peft_config(target_modules=r"nothing\.matches")), "unknown_target_module", "match no"),
    (adapter_files(peft_config(use_dora=True)), "invalid_adapter_upload", "DoRA"),
    (adapter_files(peft_config(init_lora_weights="pissa")), "invalid_adapter_upload", "base weights"),
    (adapter_files(peft_config(peft_type="IA3")), "invalid_adapter_upload", "only LORA"),
    (adapter_files(peft_config(r=8)), "adapter_mismatch", "has shape"),  # config says 8, tensors are rank 4
    (adapter_files(peft_config(target_modules=["q_proj"])), "adapter_mismatch", "does not imply"),
    (adapter_files(weights=tensors(targets=PROJECTIONS[:-1])), "adapter_mismatch", "missing"),
    ({ADAPTER_CONFIG: b"[1, 2]", ADAPTER_WEIGHTS: b""}, "invalid_adapter_upload", "JSON object"),
])
def test_mismatched_or_unsafe_uploads_are_rejected(files, code, message):
    with pytest.raises(UploadRejected, match=message) as info:
        check(files)
    assert info.value.code == code


def test_size_limit_covers_loose_files_and_archive_contents():
    files = adapter_files()
    small = Settings(max_upload_bytes=1000)
    with pytest.raises(UploadRejected) as info:
        check(files, small)
    assert info.value.code == "upload_too_large"
    # A zip that claims little but inflates to much (a zip bomb) is refused before it is inflated.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("adapter_model.safetensors", b"\x00" * 5_000_000)
    with pytest.raises(UploadRejected, match="larger than the upload limit"):
        unpack(buffer.getvalue(), 1_000_000)


def test_archives_zip_and_tar_gz_with_a_folder_unpack_to_the_files():
    files = adapter_files()
    zipped, tarred = io.BytesIO(), io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        for name, content in files.items():
            z.writestr(f"my-adapter/{name}", content)
        z.writestr("my-adapter/README.md", "ignored")
    with tarfile.open(fileobj=tarred, mode="w:gz") as t:
        for name, content in files.items():
            info = tarfile.TarInfo(f"./out/{name}")
            info.size = len(content)
            t.addfile(info, io.BytesIO(content))
    for blob in (zipped.getvalue(), tarred.getvalue()):
        assert check(unpack(blob, 10 ** 8)).files[ADAPTER_WEIGHTS] == files[ADAPTER_WEIGHTS]
    with pytest.raises(UploadRejected, match="neither a zip nor a tar"):
        unpack(b"just some bytes", 10 ** 8)


def test_the_header_reader_agrees_with_safetensors():
    weights = tensors()
    parsed = read_safetensors_header(save_safetensors(weights))
    assert parsed == {k: ("F32", list(v.shape)) for k, v in weights.items()}


# ---------------------------------------------------------------- through the gateway, both stores
def stand_in_replica():
    """/health, and LoRA load/unload answered as vLLM does: 200, or 500 when `refuse` is set."""
    async def health(request: Request):
        return Response(status_code=200)

    async def load(request: Request):
        body = await request.json()
        request.app.state.calls.append(("load", body))
        if request.app.state.refuse:
            return JSONResponse({"error": {"message": "LoRA rank 4 is greater than max_lora_rank 1.", "code": 500}},
                                status_code=500)
        request.app.state.loaded.add(body["lora_name"])
        return Response("Success", status_code=200)

    async def unload(request: Request):
        body = await request.json()
        request.app.state.calls.append(("unload", body))
        request.app.state.loaded.discard(body["lora_name"])
        return Response("Success", status_code=200)

    app = Starlette(routes=[Route("/health", health), Route("/v1/load_lora_adapter", load, methods=["POST"]),
                            Route("/v1/unload_lora_adapter", unload, methods=["POST"])])
    app.state.refuse, app.state.calls, app.state.loaded = False, [], set()
    return app


@pytest.fixture(scope="module")
def replica():
    app = stand_in_replica()
    with ServerThread(app) as server:
        yield app, server


@pytest.fixture(params=["sqlite", "redis"])
async def env(request, tmp_path: Path, replica):
    app, server = replica
    app.state.refuse, app.state.calls, app.state.loaded = False, [], set()
    common = {"vllm_urls": [server.url], "health_interval_s": 0.2, "quota_max_adapters": 3}
    if request.param == "redis":
        common.update(redis_url=REDIS_URL, redis_prefix=f"test-upload-{uuid4().hex}")
    settings = settings_for(tmp_path, **common)
    async with gateway_env(settings) as (client, backend):
        yield client, backend, settings, app


def multipart(files: dict[str, bytes]) -> list:
    return [("files", (name, content)) for name, content in files.items()]


async def assert_nothing_left(client, backend, settings, name: str, replica_app) -> None:
    assert (await client.get(f"/v1/adapters/{name}")).status_code == 404
    assert name not in [a.name for a in await backend.store.list_adapters(DEFAULT_TENANT)]
    folders = settings.adapter_root.iterdir() if settings.adapter_root.exists() else []
    assert [p.name for p in folders if name in p.name] == []
    assert not any(name in n for n in replica_app.state.loaded)


async def test_upload_serves_warm_and_downloads_back(env):
    client, backend, settings, replica_app = env
    files = adapter_files()
    response = await client.post("/v1/adapters/byo/versions", files=multipart(files))
    assert response.status_code == 201, response.text
    version = response.json()
    assert (version["version"], version["model"], version["status"]) == (1, "byo@v1", "ready")
    assert version["metrics"]["source"] == "upload" and version["metrics"]["warm"]["warm"] is True
    loads = [body for kind, body in replica_app.state.calls if kind == "load"]
    folder = str(settings.adapter_root.resolve() / "default~byo@v1")
    assert loads == [{"lora_name": "default~byo@v1", "lora_path": folder}]
    assert (await backend.store.resolve(DEFAULT_TENANT, "byo", None)).status is VersionStatus.READY

    download = await client.get("/v1/adapters/byo/download")
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    assert 'filename="byo@v1.zip"' in download.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(download.content)) as z:
        assert sorted(z.namelist()) == [f"byo@v1/{ADAPTER_CONFIG}", f"byo@v1/{ADAPTER_WEIGHTS}"]
        assert z.read(f"byo@v1/{ADAPTER_WEIGHTS}") == files[ADAPTER_WEIGHTS]
        assert json.loads(z.read(f"byo@v1/{ADAPTER_CONFIG}"))["base_model_name_or_path"] == "tiny"

    # The archive goes straight back in, as a raw body, and becomes v2; both versions download by pin.
    again = await client.post("/v1/adapters/byo/versions", content=download.content,
                              headers={"content-type": "application/zip"})
    assert again.status_code == 201 and again.json()["version"] == 2
    for pin in ("byo@v1", "byo?version=2"):
        assert (await client.get(f"/v1/adapters/{pin.split('?')[0]}/download"
                                 + (f"?{pin.split('?')[1]}" if "?" in pin else ""))).status_code == 200
    mismatch = await client.get("/v1/adapters/byo@v1/download?version=2")
    assert mismatch.status_code == 400 and mismatch.json()["error"]["code"] == "version_mismatch"
    assert (await client.get("/v1/adapters/nope/download")).status_code == 404


@pytest.mark.parametrize("case", ["tampered_header", "wrong_shapes", "pickle", "rank_too_high", "unknown_target",
                                  "oversize_body", "engine_refuses"])
async def test_bad_uploads_are_400_and_leave_no_version(env, case):
    client, backend, settings, replica_app = env
    name = f"bad-{case.replace('_', '-')}"
    blob = save_safetensors(tensors())
    files = {
        "tampered_header": adapter_files(weights=blob[:8] + b"[" + blob[9:]),
        "wrong_shapes": adapter_files(weights=tensors(rank=2)),
        "pickle": {ADAPTER_CONFIG: json.dumps(peft_config()).encode(), "adapter_model.bin": b"\x80\x04K\x01."},
        "rank_too_high": adapter_files(peft_config(r=16), tensors(rank=16)),
        "unknown_target": adapter_files(peft_config(target_modules=["q_proj", "c_attn"])),
        "oversize_body": {ADAPTER_CONFIG: b"{}", ADAPTER_WEIGHTS: b"\x00" * (settings.max_upload_bytes + 70_000)},
        "engine_refuses": adapter_files(),
    }[case]
    replica_app.state.refuse = case == "engine_refuses"
    response = await client.post(f"/v1/adapters/{name}/versions", files=multipart(files))
    expected = 413 if case == "oversize_body" else 400
    assert response.status_code == expected, response.text
    assert set(response.json()["error"]) >= {"message", "type", "code"}
    await assert_nothing_left(client, backend, settings, name, replica_app)
    if case == "engine_refuses":  # it was loaded to be examined, so it is unloaded again
        assert ("unload", {"lora_name": f"default~{name}@v1"}) in replica_app.state.calls
    else:  # rejected before anything was written or loaded
        assert replica_app.state.calls == []


async def test_upload_respects_the_adapter_quota_and_existing_names(env):
    client, backend, settings, replica_app = env
    for i in range(3):
        assert (await client.post(f"/v1/adapters/q{i}/versions", files=multipart(adapter_files()))).status_code == 201
    over = await client.post("/v1/adapters/q3/versions", files=multipart(adapter_files()))
    assert over.status_code == 429 and over.json()["error"]["code"] == "quota_exceeded"
    await assert_nothing_left(client, backend, settings, "q3", replica_app)
    # A new version of an existing adapter needs no new quota slot.
    assert (await client.post("/v1/adapters/q0/versions", files=multipart(adapter_files()))).json()["version"] == 2


async def test_store_allocates_numbers_that_are_never_reused(env):
    _, backend, _, _ = env
    store = backend.store
    assert [await store.allocate_version(DEFAULT_TENANT, "n") for _ in range(2)] == [1, 2]
    record = AdapterVersion(tenant=DEFAULT_TENANT, adapter="n", version=2, job_id="upload-x", num_examples=0,
                            status=VersionStatus.READY)
    await store.add_version(record)
    assert (await store.resolve(DEFAULT_TENANT, "n", None)).version == 2
    job = await store.submit_job(DEFAULT_TENANT, "n", 1, [{"prompt": "a", "completion": "b"}], {})
    assert job.version == 3  # a trained version after uploads continues the same numbering
    await store.delete_adapter(DEFAULT_TENANT, "n")
    assert await store.allocate_version(DEFAULT_TENANT, "n") == 4
    with pytest.raises(QuotaExceeded):
        from adapters.store import TenantQuota
        other = AdapterVersion(tenant=DEFAULT_TENANT, adapter="m", version=1, job_id="upload-y", num_examples=0,
                               status=VersionStatus.READY)
        await store.add_version(other, TenantQuota(max_adapters=0))


def test_damaged_archives_and_odd_configs_are_rejected_never_crash():
    """Random damage to zip/tar(.gz/.bz2/.xz) archives and odd config values: always UploadRejected (a 400),
    never another exception (a 500)."""
    import random

    files = adapter_files()

    def tar(mode: str) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode=mode) as t:
            for name, content in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(content)
                t.addfile(info, io.BytesIO(content))
        return out.getvalue()

    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, content in files.items():
            z.writestr(name, content)
    blobs = [tar("w"), tar("w:gz"), tar("w:bz2"), tar("w:xz"), zipped.getvalue()]
    rng = random.Random(7)

    def damage(blob: bytes) -> bytes:
        b = bytearray(blob)
        for _ in range(rng.randint(1, 6)):
            op = rng.random()
            if op < 0.5:
                b[rng.randrange(len(b))] = rng.randrange(256)
            elif op < 0.8 and len(b) > 1:
                del b[rng.randrange(1, len(b)):]
            else:
                b[rng.randrange(len(b) + 1):0] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))
        return bytes(b)

    odd = [None, True, 0, -1, 3.5, "x", "(", [], ["("], {}, {"(": 4}, {"q_proj": 0}, [1, "a"], "all-linear", 10 ** 30]
    fields = [*peft_config(), "layers_to_transform", "exclude_modules", "lora_bias"]
    for _ in range(400):
        try:
            check(unpack(damage(rng.choice(blobs)), 10 ** 7))
        except UploadRejected:
            pass
        config = peft_config(**{rng.choice(fields): rng.choice(odd) for _ in range(rng.randint(1, 3))})
        try:
            check(adapter_files(config, damage(files[ADAPTER_WEIGHTS]) if rng.random() < 0.5 else None))
        except UploadRejected:
            pass
