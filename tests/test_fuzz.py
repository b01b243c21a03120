"""Schema-driven fuzzing of the gateway: schemathesis generates requests from the gateway's own OpenAPI
schema (`app.openapi()`), valid and invalid, with and without a valid API key, and sends them to the ASGI
app in-process. Real stores (an SQLite file in tmp; real Redis under a unique prefix); a stand-in vLLM
replica (tests/gateway_helpers.py) so completions get real 200/4xx answers.

Asserted: no 5xx at all (a 503 `upstream_unavailable` would be counted apart, but the stand-in is always
up), every 4xx in the one error shape, every 401 with `WWW-Authenticate`, and the gateway still healthy at
the end. Counts go to stdout and results/drills/fuzz.json.

METALORA_FUZZ_EXAMPLES sets the number of generated requests per store (default 1000 for SQLite; Redis
runs half as many).
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from uuid import uuid4

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from adapters.api_keys import new_api_key  # noqa: E402
from adapters.backend import open_backend  # noqa: E402
from adapters.settings import Settings  # noqa: E402
from server.app import create_app  # noqa: E402
from drill_records import RESULTS as DRILL_RESULTS, provenance  # noqa: E402
from gateway_helpers import ServerThread, fake_replica, tokenizer_dir  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/0"
RESULTS = DRILL_RESULTS / "fuzz.json"  # one record per store, each with its own provenance
EXAMPLES = int(os.environ.get("METALORA_FUZZ_EXAMPLES", "1000"))
# ?wait=true would block for `timeout` seconds with no worker running; generated waits are capped to this.
MAX_WAIT_S = 0.05

_results: dict[str, dict] = {}


@pytest.fixture(scope="module")
def replica():
    app = fake_replica("fuzz")
    server = ServerThread(app).start()
    yield server
    server.stop()


def _create_keys(settings: Settings) -> dict[str, str]:
    async def create():
        backend = open_backend(settings)
        try:
            keys = {}
            for tenant in ("acme", "globex"):
                record, key = new_api_key(tenant, "fuzz")
                await backend.store.create_api_key(record)
                keys[tenant] = key
            return keys
        finally:
            await backend.close()

    return asyncio.run(create())


def _drop_redis(settings: Settings) -> None:
    import redis

    client = redis.Redis.from_url(settings.redis_url)
    keys = list(client.scan_iter(f"{settings.redis_prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def _header(response, name: str) -> str:
    # schemathesis responses keep every value of a header, under its lower-cased name.
    values = {k.lower(): v for k, v in response.headers.items()}.get(name, [])
    return values[0] if isinstance(values, list) and values else (values or "")


def _is_error_shape(body) -> bool:
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return False
    error = body["error"]
    return (isinstance(error.get("message"), str) and bool(error["message"]) and isinstance(error.get("type"), str)
            and "code" in error)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_fuzz_gateway_from_its_openapi_schema(kind, tmp_path, replica):
    examples = EXAMPLES if kind == "sqlite" else max(1, EXAMPLES // 2)
    common = dict(data_dir=tmp_path / "data", base_model=str(tokenizer_dir(tmp_path)), vllm_urls=[replica.url],
                  health_interval_s=0.5, auth="required", max_examples=50, max_body_bytes=256 * 1024,
                  quota_max_active_jobs=20, quota_max_adapters=40)
    if kind == "sqlite":
        settings = Settings(redis_url=None, **common)
    else:
        settings = Settings(redis_url=REDIS_URL, redis_prefix=f"test-fuzz-{uuid4().hex}", **common)
    keys = _create_keys(settings)
    app = create_app(settings)
    # The schema is the app's own; the ASGI transport runs the app's lifespan once in schemathesis' loop.
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    strategies = [op.as_strategy(generation_mode=mode) for op in operations
                  for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
    auth_headers = st.sampled_from([
        {"Authorization": f"Bearer {keys['acme']}"}, {"Authorization": f"Bearer {keys['acme']}"},
        {"Authorization": f"Bearer {keys['globex']}"}, {}, {"Authorization": "Bearer mlk_wrong"},
        {"Authorization": "Basic Zm9vOmJhcg=="},
    ])
    statuses: Counter[int] = Counter()
    by_operation: Counter[str] = Counter()
    problems: list[str] = []
    upstream_503 = 0

    @hsettings(max_examples=examples, deadline=None, database=None, derandomize=True,
               suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(strategies), auth=auth_headers)
    def run(case, auth):
        nonlocal upstream_503
        if case.query and "wait" in case.query:
            case.query["timeout"] = MAX_WAIT_S
        headers = dict(case.headers or {})
        headers.pop("Authorization", None)
        headers.pop("authorization", None)
        case.headers = {**headers, **auth}
        response = case.call()
        statuses[response.status_code] += 1
        by_operation[f"{case.method} {case.path}"] += 1
        where = f"{case.method} {case.formatted_path} query={case.query!r} -> {response.status_code}"
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 500:
            if response.status_code == 503 and _is_error_shape(body) and body["error"]["code"] == "upstream_unavailable":
                upstream_503 += 1
            else:
                problems.append(f"5xx: {where}: {response.text[:300]}")
        elif response.status_code >= 400 and not _is_error_shape(body):
            problems.append(f"4xx not in the error shape: {where}: {response.text[:300]}")
        if response.status_code == 401 and not _header(response, "www-authenticate").startswith("Bearer"):
            problems.append(f"401 without WWW-Authenticate: {where}")

    started = time.monotonic()
    try:
        run()
        # Still up and healthy after everything above.
        health_op = next(o for o in operations if (o.method.upper(), o.path) == ("GET", "/health"))
        health = health_op.Case().call()
    finally:
        from schemathesis.python.asgi import shutdown_lifespans

        shutdown_lifespans()
        if settings.redis_url:
            _drop_redis(settings)
    elapsed = time.monotonic() - started

    total = sum(statuses.values())
    summary = {
        "store": kind,
        "requests": total,
        "seconds": round(elapsed, 1),
        "status_histogram": {str(k): v for k, v in sorted(statuses.items())},
        "5xx_unexpected": sum(v for k, v in statuses.items() if k >= 500) - upstream_503,
        "503_upstream_unavailable": upstream_503,
        "operations": dict(sorted(by_operation.items())),
        "problems": problems[:20],
        "health_after": health.status_code,
        "generator": f"schemathesis {schemathesis.__version__ if hasattr(schemathesis, '__version__') else ''}"
                     " positive+negative over app.openapi(), 6 auth header variants",
    }
    _results[kind] = summary
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    existing[kind] = {**provenance(), **summary}
    RESULTS.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"\nfuzz[{kind}]: {total} requests in {elapsed:.0f}s, statuses {summary['status_histogram']},"
          f" unexpected 5xx {summary['5xx_unexpected']}, upstream 503 {upstream_503}")

    assert not problems, "\n".join(problems[:20])
    assert health.status_code == 200, health.text
    assert total >= min(examples, 1000) * 0.9, f"only {total} requests were generated"
    assert statuses[401] > 0 and statuses[400] > 0 and any(200 <= s < 300 for s in statuses)
