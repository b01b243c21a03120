"""The embedded supervisor (metalora/supervisor.py) on real processes: it honours SIGTERM while it waits for a
child's health and while it waits to restart one, its children (and theirs) die with it when it is SIGKILLed, it
closes the log file of each run of a child, and it reaches a gateway listening on an IPv6 address."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from adapters.settings import Settings
from gateway_helpers import free_port
from metalora.supervisor import Child, Stop, build_children, http_url, wait_healthy

HERE = Path(__file__).resolve().parent
PY = sys.executable
SLEEPER = [PY, "-c", "import time; time.sleep(600)"]


def start_driver(children: list[dict], **extra) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    return subprocess.Popen([PY, str(HERE / "supervisor_driver.py"), json.dumps({"children": children, **extra})],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        time.sleep(0.05)


def pids_in(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_family(pid: int) -> None:
    """End a driver that failed its test and everything it started (which a broken supervisor leaves behind)."""
    try:
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def stopped_in_time(driver: subprocess.Popen, within_s: float) -> float:
    started = time.monotonic()
    driver.send_signal(signal.SIGTERM)
    try:
        driver.wait(within_s)
    except subprocess.TimeoutExpired:
        kill_family(driver.pid)
        pytest.fail(f"the supervisor ignored SIGTERM for {within_s}s")
    return time.monotonic() - started


def test_sigterm_while_waiting_for_a_childs_health_stops_at_once(tmp_path):
    pidfile = tmp_path / "child.pid"
    never_healthy = [PY, "-c", f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(600)"]
    driver = start_driver([{"name": "engine", "argv": never_healthy, "start_timeout_s": 600,
                            "health_url": f"http://127.0.0.1:{free_port()}/health"}])
    wait_for(pidfile.exists, what="child started")
    child = pids_in(pidfile)[0]
    try:
        assert stopped_in_time(driver, within_s=10) < 10
    finally:
        if not gone(child):
            os.kill(child, signal.SIGKILL)
    assert driver.returncode == 0


def test_sigterm_while_waiting_to_restart_a_child_stops_at_once(tmp_path):
    runs = tmp_path / "runs"
    dies = [PY, "-c", f"open({str(runs)!r}, 'a').write('run\\n'); raise SystemExit(3)"]
    driver = start_driver([{"name": "worker", "argv": dies}], backoff=[60.0])
    wait_for(runs.exists, what="child ran")
    time.sleep(1.5)  # it died and the supervisor is in its 60 s backoff
    assert stopped_in_time(driver, within_s=10) < 10
    assert runs.read_text().count("run") == 1


def test_a_sigkilled_supervisor_takes_its_children_and_grandchildren_along(tmp_path):
    pidfile = tmp_path / "family.pid"
    # Like vLLM's API server and its engine core: a child that forks a process of its own.
    parent = [PY, "-c", "import os, subprocess, sys, time\n"
              f"g = subprocess.Popen({SLEEPER!r})\n"
              f"open({str(pidfile)!r}, 'w').write(f'{{os.getpid()}} {{g.pid}}')\n"
              "time.sleep(600)"]
    driver = start_driver([{"name": "engine", "argv": parent}, {"name": "gateway", "argv": SLEEPER}])
    wait_for(lambda: len(pids_in(pidfile)) == 2, what="child and grandchild started")
    supervised = psutil.Process(driver.pid).children()
    family = [*pids_in(pidfile), *(p.pid for p in supervised)]
    driver.send_signal(signal.SIGKILL)
    driver.wait(5)
    try:
        wait_for(lambda: all(gone(pid) for pid in family), timeout=10, what="children and grandchild dead")
    finally:
        for pid in family:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_each_run_of_a_child_closes_its_log_file(tmp_path):
    log = tmp_path / "worker.log"
    runs = tmp_path / "runs"
    dies = [PY, "-c", f"open({str(runs)!r}, 'a').write('run\\n'); print('run', flush=True); raise SystemExit(1)"]
    driver = start_driver([{"name": "worker", "argv": dies, "log_path": str(log)}], backoff=[0.05])
    try:
        wait_for(lambda: runs.exists() and runs.read_text().count("run") >= 6, what="six runs")
        open_logs = [f for f in psutil.Process(driver.pid).open_files() if f.path == str(log)]
        assert len(open_logs) <= 1, open_logs
    finally:
        stopped_in_time(driver, within_s=10)
    assert log.read_text().count("run") >= 6


def test_an_ipv6_gateway_address_is_reached_in_brackets(tmp_path):
    assert http_url("::1", 8000) == "http://[::1]:8000"
    assert http_url("::", 8000) == "http://[::1]:8000"
    assert http_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert http_url("localhost", 8000) == "http://localhost:8000"
    port = free_port()
    gateway = next(c for c in build_children(Settings(host="::1", port=port), None) if c.name == "gateway")
    server = Child("gateway", [PY, "-m", "http.server", "--bind", "::1", str(port)], dict(os.environ),
                   gateway.health_url.replace("/health", "/"), start_timeout_s=20)
    server.start()
    try:
        wait_healthy(server, Stop())  # raises when the URL is unusable or nothing answers within 20 s
    finally:
        server.stop()


def test_the_engine_key_is_generated_when_unset_and_held_only_by_our_children(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "stray")  # a shell's own value must not lock the gateway out
    monkeypatch.delenv("METALORA_VLLM_API_KEY", raising=False)
    runs = [{c.name: c for c in build_children(Settings(), None)} for _ in range(2)]
    keys = [run["engine"].env["VLLM_API_KEY"] for run in runs]
    assert keys[0] != keys[1] and all(len(k) >= 32 for k in keys)  # fresh per run
    for run, key in zip(runs, keys):
        assert run["worker"].env["METALORA_VLLM_API_KEY"] == run["gateway"].env["METALORA_VLLM_API_KEY"] == key
        assert "VLLM_API_KEY" not in run["worker"].env and "VLLM_API_KEY" not in run["gateway"].env
        assert not any(key in arg for arg in run["engine"].argv)  # never on a command line (ps shows it)
    given = {c.name: c for c in build_children(Settings(vllm_api_key="given-key"), None)}
    assert given["engine"].env["VLLM_API_KEY"] == given["gateway"].env["METALORA_VLLM_API_KEY"] == "given-key"
