"""The CLI's client commands as a user runs them: the installed `metalora` script in a subprocess, configured only by
METALORA_URL / METALORA_API_KEY, against the real stack (vLLM-CPU, worker process, Redis, gateway; the session's
`stack` fixture, no stack of its own). adapt --wait follows real training to succeeded, jobs and adapters list what
it made, complete streams the adapter's completion. The same commands with an API key the gateway checks, and every
flag's help text: tests/test_cli_client.py, tests/test_cli_help.py."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stack_data import examples, prompt_for

pytestmark = pytest.mark.stack

ADAPTER = "cli-square"
STEPS = 4


def metalora(stack, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "METALORA_URL": stack.url, "METALORA_API_KEY": "mlk_unused-the-stack-runs-open"}
    return subprocess.run([str(Path(sys.executable).with_name("metalora")), *args], env=env, capture_output=True,
                          text=True, timeout=timeout_s)


def test_cli_adapt_wait_jobs_adapters_complete(stack, tmp_path):
    data = tmp_path / "examples.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in examples("square", 24)))

    adapt = metalora(stack, "adapt", str(data), "--adapter", ADAPTER, "--steps", str(STEPS), "--wait")
    assert adapt.returncode == 0, adapt.stderr
    job_id = adapt.stdout.strip()
    assert re.fullmatch(r"job-[0-9a-f]+", job_id), adapt.stdout
    # The progress bar (stderr, one line per change off a terminal): step i/K with the loss, ending succeeded.
    bars = [line for line in adapt.stderr.splitlines() if line.startswith("[")]
    assert bars and re.search(rf"\] step {STEPS}/{STEPS} loss \d+\.\d{{4}} succeeded$", bars[-1]), adapt.stderr
    assert any(re.search(r"step \d+/\d+ loss \d+\.\d{4} running$", line) for line in bars), adapt.stderr

    jobs = metalora(stack, "jobs")
    assert jobs.returncode == 0, jobs.stderr
    row = next((line for line in jobs.stdout.splitlines() if line.startswith(job_id)), None)
    assert row is not None, jobs.stdout
    assert row.split()[1:4] == [f"{ADAPTER}@v1", "succeeded", f"{STEPS}/{STEPS}"], row

    adapters = metalora(stack, "adapters")
    assert adapters.returncode == 0, adapters.stderr
    row = next((line.split() for line in adapters.stdout.splitlines() if line.split()[:1] == [ADAPTER]), None)
    assert row is not None and row[1:4] == ["1", "1", "ready"], adapters.stdout  # name, ready @v1, latest @v1

    complete = metalora(stack, "complete", "--adapter", ADAPTER, "--max-tokens", "8", prompt_for("biscuit"))
    assert complete.returncode == 0, complete.stderr
    # The adapter's own greedy completion, streamed: the same text the gateway answers for it unstreamed.
    with stack.client() as client:
        direct = client.post("/v1/completions", json={"model": ADAPTER, "prompt": prompt_for("biscuit"),
                                                      "max_tokens": 8, "temperature": 0})
    assert direct.status_code == 200 and direct.json()["model"] == f"{ADAPTER}@v1", direct.text
    text = direct.json()["choices"][0]["text"]
    assert text.strip() and complete.stdout == text + "\n", (complete.stdout, text)
