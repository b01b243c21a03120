"""Shared fixtures. The `stack` fixture runs the real system exactly as `make serve` does
(`python -m metalora serve`): a vLLM-CPU server, a worker process and the gateway, here against the
real Redis at 127.0.0.1:6379 under a key prefix of its own."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from drill_records import TEST_STARTED
from helpers import REDIS_URL
STACK_START_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Stack:
    url: str
    env: dict[str, str]
    data_dir: Path
    log_dir: Path
    process: subprocess.Popen
    base_model: str

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 300.0), **kwargs)

    def logs(self) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            parts.append(f"--- {path.name} (tail) ---\n" + path.read_text(errors="replace")[-4000:])
        return "\n".join(parts)


def start_stack(tmp: Path, extra_env: dict[str, str] | None = None) -> Stack:
    data_dir, log_dir = tmp / "data", tmp / "logs"
    data_dir.mkdir(parents=True)
    port, engine_port = free_port(), free_port()
    env = {
        **os.environ,
        "METALORA_DATA_DIR": str(data_dir),
        "METALORA_PORT": str(port),
        "METALORA_VLLM_URLS": f"http://127.0.0.1:{engine_port}",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        # Known to the tests that talk to vLLM directly (`metalora serve` would generate one otherwise).
        "METALORA_VLLM_API_KEY": f"stack-{uuid.uuid4().hex}",
        **(extra_env or {}),
    }
    process = subprocess.Popen([sys.executable, "-m", "metalora", "serve", "--log-dir", str(log_dir)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STACK_START_TIMEOUT_S
    stack = Stack(url, env, data_dir, log_dir, process, "")
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"metalora serve exited early:\n{process.stdout.read()}\n{stack.logs()}")
        try:
            health = httpx.get(f"{url}/health", timeout=2)
            if health.status_code == 200:
                models = httpx.get(f"{url}/v1/models", timeout=5).json()
                stack.base_model = models["data"][0]["id"]
                return stack
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_stack(stack)
    raise RuntimeError(f"stack not healthy within {STACK_START_TIMEOUT_S}s\n{stack.logs()}")


def stop_stack(stack: Stack) -> None:
    if stack.process.poll() is None:
        stack.process.send_signal(signal.SIGTERM)
        try:
            stack.process.wait(60)
        except subprocess.TimeoutExpired:
            stack.process.kill()


def delete_redis_prefix(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture(autouse=True)
def record_test_start(request):
    """A test's start, for the wall time its results/drills record states (tests/drill_records.py)."""
    TEST_STARTED[request.node.nodeid] = time.monotonic()


@pytest.fixture(autouse=True)
def _gateway_open_unless_asked(monkeypatch):
    """With Redis the gateway requires API keys by default. Tests that predate keys call it anonymously (as
    the default tenant); auth tests pass Settings(auth="required"), which wins over the environment."""
    monkeypatch.setenv("METALORA_AUTH", "disabled")


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The real system on Redis: vLLM-CPU + worker + gateway, started once per test session. Auth is off
    (the OpenAI-client test sends a dummy key); tests/test_auth.py covers keys against the same gateway code."""
    prefix = f"stack-{uuid.uuid4().hex[:8]}"
    running = start_stack(tmp_path_factory.mktemp("stack"),
                          {"METALORA_REDIS_URL": REDIS_URL, "METALORA_REDIS_PREFIX": prefix,
                           "METALORA_AUTH": "disabled"})
    try:
        yield running
    finally:
        stop_stack(running)
        delete_redis_prefix(prefix)
