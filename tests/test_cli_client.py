"""The CLI's client commands against a real gateway over HTTP (uvicorn, SQLite store, a stand-in replica for
completions and LoRA loads), configured only through METALORA_URL / METALORA_API_KEY. Jobs are driven through
the store as a worker would, so `adapt --wait` can be watched to the end without training."""
from __future__ import annotations

import asyncio
import json
import threading
import time
import zipfile
from pathlib import Path

import pytest
import uvicorn

from adapters.api_keys import new_api_key
from adapters.backend import open_backend
from adapters.names import DEFAULT_TENANT
from adapters.records import JobStatus
from adapters.settings import Settings
from gateway_helpers import ServerThread, fake_replica, free_port
from metalora.cli import main
from server.app import create_app
from test_upload import adapter_files, tiny_model

EXAMPLES = [{"prompt": "hello world", "completion": "positive"}, {"prompt": "bad world", "completion": "negative"}]


class Gateway:
    """The gateway app served by uvicorn with its lifespan, in a thread."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.port}"
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "gateway did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def gateway(tmp_path, monkeypatch):
    replica = fake_replica("r0")
    with ServerThread(replica) as upstream:
        settings = Settings(data_dir=tmp_path / "data", base_model=str(tiny_model(tmp_path / "tiny")),
                            vllm_urls=[upstream.url], port=free_port(), health_interval_s=0.2, auth="required")
        record, key = new_api_key(DEFAULT_TENANT, "cli-test")
        asyncio.run(_create_key(settings, record))
        with Gateway(settings) as gw:
            monkeypatch.setenv("METALORA_URL", gw.url)
            monkeypatch.setenv("METALORA_API_KEY", key)
            yield gw


async def _create_key(settings, record):
    backend = open_backend(settings)
    try:
        await backend.store.create_api_key(record)
    finally:
        await backend.close()


def run(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    out = capsys.readouterr()
    return exited.value.code, out.out, out.err


def drive_job_to_success(settings: Settings, adapter: str, steps: int = 3) -> None:
    """What a worker does to the store, in a thread: claim, report a few steps, finish."""
    async def drive():
        backend = open_backend(settings)
        try:
            while not (adapters := await backend.store.list_adapters(DEFAULT_TENANT)) or \
                    adapter not in [a.name for a in adapters]:
                await asyncio.sleep(0.05)
            job_id = next(a for a in adapters if a.name == adapter).versions[-1].job_id
            await backend.store.update_job(job_id, status=JobStatus.RUNNING, total_steps=steps)
            for step in range(1, steps + 1):
                await asyncio.sleep(0.3)
                await backend.store.update_job(job_id, step=step, loss=2.0 / step)
            await backend.store.finish_job(job_id, {"loss_after": 0.5})
        finally:
            await backend.close()

    threading.Thread(target=asyncio.run, args=(drive(),), daemon=True).start()


def test_adapt_wait_jobs_adapters_complete_through_the_gateway(gateway, tmp_path, capsys):
    examples = tmp_path / "examples.jsonl"
    examples.write_text("\n".join(json.dumps(e) for e in EXAMPLES) + "\n\n")

    code, out, err = run(capsys, "adapt", str(examples), "--adapter", "queued-one", "--steps", "7")
    assert code == 0 and out.strip().startswith("job-") and "queued-one@v1 queued" in err

    drive_job_to_success(gateway.settings, "waited")
    code, out, err = run(capsys, "adapt", str(examples), "--adapter", "waited", "--wait", "--json")
    assert code == 0, err
    job = json.loads(out)
    assert job["status"] == "succeeded" and job["options"]["max_seq_len"] > 0
    # The progress bar (not a terminal here: one line per change) showed steps and losses to the end.
    bar = [line for line in err.splitlines() if line.startswith("[")]
    assert len(bar) >= 2 and " running" in bar[-2] and "loss" in bar[-2]
    assert bar[-1] == f"[{'#' * 30}] step 3/3 loss 0.6667 succeeded"

    code, out, _ = run(capsys, "jobs")
    assert code == 0 and "waited@v1" in out and "queued-one@v1" in out
    assert out.index("waited@v1") < out.index("queued-one@v1")  # newest first
    code, out, _ = run(capsys, "jobs", "--status", "succeeded")
    assert "waited@v1" in out and "queued-one" not in out

    code, out, _ = run(capsys, "adapters")
    rows = {line.split()[0]: line.split()[1:4] for line in out.splitlines()[1:]}
    assert rows["waited"] == ["1", "1", "ready"] and rows["queued-one"] == ["-", "1", "queued"]

    code, out, _ = run(capsys, "complete", "--adapter", "waited", "Hello")
    assert code == 0 and "r0:0" in out and "r0:2" in out  # the stand-in replica's streamed chunks
    code, out, _ = run(capsys, "complete", "Hello")  # the base model
    assert code == 0 and "r0:0" in out

    code, _, err = run(capsys, "complete", "--adapter", "nope", "Hello")
    assert code == 1 and "error: adapter 'nope' not found" in err


def test_upload_then_download_through_the_cli(gateway, tmp_path, capsys):
    folder = tmp_path / "my-adapter"
    folder.mkdir()
    for name, content in adapter_files().items():
        (folder / name).write_bytes(content)
    code, out, err = run(capsys, "upload", "byo", str(folder))
    assert code == 0 and out.strip() == "byo@v1", err
    code, out, _ = run(capsys, "download", "byo@v1", "-o", str(tmp_path / "byo.zip"))
    assert code == 0
    with zipfile.ZipFile(tmp_path / "byo.zip") as z:
        assert z.read("byo@v1/adapter_model.safetensors") == (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(b"garbage")
    code, _, err = run(capsys, "upload", "byo", str(folder))
    assert code == 1 and "adapter_model.safetensors" in err


def test_wrong_key_and_unreachable_gateway_are_one_line_errors(gateway, capsys, monkeypatch):
    monkeypatch.setenv("METALORA_API_KEY", "mlk-wrong")
    code, _, err = run(capsys, "adapters")
    assert code == 1 and err.startswith("error: invalid or revoked API key")
    monkeypatch.setenv("METALORA_URL", f"http://127.0.0.1:{free_port()}")
    code, _, err = run(capsys, "jobs")
    assert code == 1 and "cannot reach the gateway" in err


def test_init_family_and_adapt_from_it_through_the_cli(gateway, tmp_path, capsys):
    files = []
    for task in ("refunds", "shipping"):
        path = tmp_path / f"{task}.jsonl"
        path.write_text("\n".join(json.dumps(e) for e in EXAMPLES) + "\n")
        files.append(str(path))
    code, out, err = run(capsys, "init", "desk", *files, "--outer-steps", "2", "--register-task-adapters", "--json")
    assert code == 0, err
    job = json.loads(out)
    assert (job["kind"], job["model"], job["status"], job["options"]["outer_steps"]) == ("init", "desk@v1", "queued", 2)
    assert job["options"]["register_task_adapters"] is True and job["num_examples"] == 4

    code, out, _ = run(capsys, "inits")
    rows = {line.split()[0]: line.split()[1:4] for line in out.splitlines()[1:]}
    assert rows == {"desk": ["-", "1", "queued"]}
    # Not trained yet: the gateway's 409, as one line.
    code, _, err = run(capsys, "adapt", files[0], "--adapter", "warranty", "--init", "desk")
    assert code == 1 and "error: init 'desk' has no ready version yet" in err
    code, _, err = run(capsys, "init", "solo", files[0])
    assert code == 1 and "an init family needs between 2 and 64" in err
