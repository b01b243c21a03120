"""`metalora serve`: the embedded single-machine default.

One command supervises three child processes, the same programs compose runs as services: the vLLM
server, one worker and the gateway, around the SQLite store and queue in the data dir (or Redis when
METALORA_REDIS_URL is set). A child that dies is restarted with backoff; nothing needs a restart when
adapters are added, because vLLM resolves them from the adapter store by name.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

from adapters.settings import Settings
from metalora.vllm_command import engine_port, vllm_command, vllm_env

log = logging.getLogger("metalora.serve")

ENGINE_START_TIMEOUT_S = 600.0
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    health_url: str | None = None
    process: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    log_path: str | None = None
    _log_file: object = field(default=None, repr=False)

    def start(self) -> None:
        out = None
        if self.log_path:
            self._log_file = open(self.log_path, "ab")
            out = self._log_file
        # Its own process group: vLLM forks engine processes, and a dead server's children must go with it.
        self.process = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.process.pid)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def reap_group(self) -> None:
        """Kill what the dead child left behind (e.g. vLLM's engine core) before starting it again."""
        if self.process is not None:
            self._signal_group(signal.SIGKILL)

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None:
            return
        if self.alive():
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.reap_group()
        self.process.wait()


def wait_healthy(child: Child, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited with code {child.process.returncode} while starting")
        try:
            if httpx.get(child.health_url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{child.name} not healthy after {timeout_s:.0f}s ({child.health_url})")


def build_children(settings: Settings, log_dir: str | None) -> list[Child]:
    env = dict(os.environ)
    # Children read the same settings from the environment; pin the engine URL to the child we start.
    port = engine_port(settings)
    env["METALORA_VLLM_URLS"] = f"http://127.0.0.1:{port}"
    me = [sys.executable, "-m", "metalora"]

    def logfile(name: str) -> str | None:
        return os.path.join(log_dir, f"{name}.log") if log_dir else None

    return [
        Child("engine", vllm_command(settings, port=port), {**vllm_env(settings), **env},
              f"http://127.0.0.1:{port}/health", log_path=logfile("engine")),
        Child("worker", [*me, "worker"], env, log_path=logfile("worker")),
        Child("gateway", [*me, "gateway"], env, f"http://{settings.host}:{settings.port}/health",
              log_path=logfile("gateway")),
    ]


def serve(settings: Settings, log_dir: str | None = None) -> int:
    """Run until SIGINT/SIGTERM. Returns the exit code."""
    # Here, not at the top: the CLI imports this module for every command, and `metalora gateway` must not
    # load the trainer side.
    from trainer.model_prep import ensure_base_model

    ensure_base_model(settings)
    settings.adapter_root.mkdir(parents=True, exist_ok=True)
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    children = build_children(settings, log_dir)
    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for child in children:
            child.start()
        wait_healthy(children[0], ENGINE_START_TIMEOUT_S)
        wait_healthy(children[2], 60.0)
        store = settings.redis_url or f"sqlite:{settings.sqlite_path}"
        print(f"metalora is serving at http://{settings.host}:{settings.port}  (store: {store}, "
              f"adapters: {settings.adapter_root})", flush=True)
        while not stopping:
            time.sleep(0.5)
            for child in children:
                if stopping or child.alive():
                    continue
                code = child.process.returncode
                # A child that ran a while before dying gets a fresh backoff sequence.
                if time.monotonic() - child.started_at > 60:
                    child.restarts = 0
                delay = RESTART_BACKOFF_S[min(child.restarts, len(RESTART_BACKOFF_S) - 1)]
                log.warning("%s exited with code %s; restarting in %.0fs", child.name, code, delay)
                child.reap_group()
                time.sleep(delay)
                child.restarts += 1
                child.start()
        return 0
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    finally:
        # Gateway first so no new work arrives, the engine last.
        for child in reversed(children):
            child.stop()
