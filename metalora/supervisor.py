"""`metalora serve`: the embedded single-machine default.

One command supervises three child processes, the same programs compose runs as services: the vLLM
server, one worker and the gateway, around the SQLite store and queue in the data dir (or Redis when
METALORA_REDIS_URL is set). A child that dies is restarted with backoff; nothing needs a restart when
adapters are added, because vLLM resolves them from the adapter store by name.
"""
from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import IO

import httpx

from adapters.settings import Settings
from metalora.vllm_command import engine_port, vllm_command, vllm_env

log = logging.getLogger("metalora.serve")

ENGINE_START_TIMEOUT_S = 600.0
GATEWAY_START_TIMEOUT_S = 60.0
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
# How often a wait checks whether SIGTERM/SIGINT asked us to stop.
STOP_POLL_S = 0.1
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Stop:
    """Set by SIGTERM/SIGINT. A flag, not a threading.Event: a handler that runs while the main thread is inside
    Event.wait() would take the lock that thread holds."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        def on_signal(signum, _frame):
            self.requested = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def sleep(self, seconds: float) -> bool:
        """Sleep up to `seconds`; False as soon as a stop is requested."""
        deadline = time.monotonic() + seconds
        while not self.requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(STOP_POLL_S, left))
        return False


class Stopped(Exception):
    """A stop was requested while waiting for a child."""


def _die_with_parent(parent: int) -> None:
    """preexec_fn: the kernel SIGKILLs this child when the supervisor dies, however it dies (SIGKILL included)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the supervisor died between fork and prctl
        os._exit(1)


# The watchdog outlives a SIGKILLed supervisor and takes its children's process groups with it: the parent-death
# signal reaches only the direct child, and vLLM's engine core (a grandchild) survives its server's SIGKILL. It
# reads "+pgid" / "-pgid" lines; end of input (the supervisor is gone, cleanly or not) kills what is still listed.
WATCHDOG = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
groups = set()
for line in sys.stdin:
    op, pgid = line[0], int(line[1:])
    (groups.add if op == "+" else groups.discard)(pgid)
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""


class Watchdog:
    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", WATCHDOG], stdin=subprocess.PIPE,
                                        start_new_session=True, text=True)

    def tell(self, line: str) -> None:
        try:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):  # the watchdog died: the parent-death signal still holds
            log.warning("the supervisor's watchdog is gone")

    def close(self) -> None:
        try:
            self.process.stdin.close()
        except BrokenPipeError:
            pass
        self.process.wait(10)


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    health_url: str | None = None
    start_timeout_s: float = 60.0
    process: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    log_path: str | None = None
    watchdog: Watchdog | None = field(default=None, repr=False)
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self._close_log()
        if self.log_path:
            self._log_file = open(self.log_path, "ab")
        parent = os.getpid()
        # Its own process group: vLLM forks engine processes, and a dead server's children must go with it.
        self.process = subprocess.Popen(self.argv, env=self.env, stdout=self._log_file, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=lambda: _die_with_parent(parent))
        if self.watchdog:
            self.watchdog.tell(f"+{self.process.pid}")
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.process.pid)

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

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
            if self.watchdog:
                self.watchdog.tell(f"-{self.process.pid}")

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
        self._close_log()


def wait_healthy(child: Child, stop: Stop) -> None:
    deadline = time.monotonic() + child.start_timeout_s
    while time.monotonic() < deadline:
        if stop.requested:
            raise Stopped(f"stopped while waiting for {child.name} to become healthy")
        if not child.alive():
            raise RuntimeError(f"{child.name} exited with code {child.process.returncode} while starting")
        try:
            if httpx.get(child.health_url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        stop.sleep(0.5)
    raise RuntimeError(f"{child.name} not healthy after {child.start_timeout_s:.0f}s ({child.health_url})")


def http_url(host: str, port: int) -> str:
    """Where to reach a server listening on host:port: an IPv6 literal in brackets, a wildcard address as its
    loopback."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return f"http://{host}:{port}"
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    return f"http://[{address}]:{port}" if address.version == 6 else f"http://{address}:{port}"


def build_children(settings: Settings, log_dir: str | None) -> list[Child]:
    # The engine's key is METALORA_VLLM_API_KEY alone: a stray VLLM_API_KEY in the shell would lock the gateway out.
    env = {k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"}
    # Children read the same settings from the environment; pin the engine URL to the child we start.
    port = engine_port(settings)
    env["METALORA_VLLM_URLS"] = f"http://127.0.0.1:{port}"
    # Only the gateway and the worker hold the engine's key, so only they can load adapters into it or use it.
    env["METALORA_VLLM_API_KEY"] = settings.vllm_api_key or secrets.token_urlsafe(32)
    engine_settings = settings.model_copy(update={"vllm_api_key": env["METALORA_VLLM_API_KEY"]})
    me = [sys.executable, "-m", "metalora"]

    def logfile(name: str) -> str | None:
        return os.path.join(log_dir, f"{name}.log") if log_dir else None

    return [
        Child("engine", vllm_command(engine_settings, port=port), {**vllm_env(engine_settings), **env},
              f"http://127.0.0.1:{port}/health", ENGINE_START_TIMEOUT_S, log_path=logfile("engine")),
        Child("worker", [*me, "worker"], env, log_path=logfile("worker")),
        Child("gateway", [*me, "gateway"], env, http_url(settings.host, settings.port) + "/health",
              GATEWAY_START_TIMEOUT_S, log_path=logfile("gateway")),
    ]


def supervise(children: list[Child], stop: Stop, banner: str = "") -> int:
    """Start the children, wait for each health URL in order, then restart any that dies (with backoff) until a
    stop is requested; stop them all, last first. Returns the exit code."""
    watchdog = Watchdog()
    for child in children:
        child.watchdog = watchdog
    try:
        for child in children:
            child.start()
        for child in children:
            if child.health_url:
                wait_healthy(child, stop)
        if banner:
            print(banner, flush=True)
        while stop.sleep(0.5):
            for child in children:
                if stop.requested or child.alive():
                    continue
                code = child.process.returncode
                # A child that ran a while before dying gets a fresh backoff sequence.
                if time.monotonic() - child.started_at > 60:
                    child.restarts = 0
                delay = RESTART_BACKOFF_S[min(child.restarts, len(RESTART_BACKOFF_S) - 1)]
                log.warning("%s exited with code %s; restarting in %.0fs", child.name, code, delay)
                child.reap_group()
                if not stop.sleep(delay):
                    break
                child.restarts += 1
                child.start()
        return 0
    except Stopped as exc:
        log.info("%s", exc)
        return 0
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    finally:
        # Gateway first so no new work arrives, the engine last.
        for child in reversed(children):
            child.stop()
        watchdog.close()


def serve(settings: Settings, log_dir: str | None = None) -> int:
    """Run until SIGINT/SIGTERM. Returns the exit code."""
    stop = Stop()
    stop.install()
    # Here, not at the top: the CLI imports this module for every command, and `metalora gateway` must not
    # load the trainer side.
    from trainer.model_prep import ensure_base_model

    ensure_base_model(settings)
    settings.adapter_root.mkdir(parents=True, exist_ok=True)
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    store = settings.redis_url or f"sqlite:{settings.sqlite_path}"
    banner = (f"metalora is serving at {http_url(settings.host, settings.port)}  (store: {store}, "
              f"adapters: {settings.adapter_root})")
    return supervise(build_children(settings, log_dir), stop, banner)
