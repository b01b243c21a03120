"""GET /metrics in the Prometheus text format.

Two sources, one page:
- this gateway process: per adapter (labels tenant and adapter *name*, never the version, so the series are
  bounded by the adapter quota) requests, errors, prompt and completion tokens from vLLM's `usage` (in a stream
  only when the client asked for it with `stream_options.include_usage`), latency, and time to the first
  streamed chunk. Requests for the base model are labelled adapter="__base__"; requests whose adapter could not
  be resolved (unknown, not ready, invalid) adapter="__unresolved__", so a client cannot mint series by
  naming adapters that do not exist. Each gateway replica counts its own requests: sum them in Prometheus.
- the metadata store, read on each scrape: jobs waiting and running (the queue), finished jobs by status, failures
  by error code, job duration and step time histograms (counters the workers add to when a job ends:
  adapters/job_stats.py), and the health of each vLLM replica. Every gateway reports the same values for these
  (they are global): use max(), not sum(), across gateway replicas.
"""
from __future__ import annotations

import hmac
import json
import logging
import time
from typing import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from adapters.errors import AuthenticationFailed, MetaloraError
from adapters.job_stats import JobStats, decode
from adapters.names import parse_ref
from server.proxy import ProxiedResponse, ProxiedStream, Target

log = logging.getLogger("metalora.gateway")

BASE_ADAPTER = "__base__"
UNRESOLVED_ADAPTER = "__unresolved__"
# Completions on a CPU box take seconds; on a GPU, tens of milliseconds.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_USAGE = b'"usage":{'


class GatewayMetrics:
    """This process's request metrics, in a registry of its own (one per app, so tests can run many)."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=False)
        labels = ["tenant", "adapter", "endpoint"]
        r = self.registry
        self.requests = Counter("metalora_requests", "Inference requests that reached adapter resolution", labels,
                                registry=r)
        self.errors = Counter("metalora_request_errors", "Inference requests answered with an error, by error code",
                              [*labels, "code"], registry=r)
        self.prompt_tokens = Counter("metalora_prompt_tokens", "Prompt tokens vLLM reported in `usage`",
                                     ["tenant", "adapter"], registry=r)
        self.completion_tokens = Counter("metalora_completion_tokens", "Completion tokens vLLM reported in `usage`",
                                         ["tenant", "adapter"], registry=r)
        self.latency = Histogram("metalora_request_duration_seconds",
                                 "Inference request latency through the gateway (streams: to the last byte)",
                                 labels, buckets=LATENCY_BUCKETS, registry=r)
        self.first_chunk = Histogram("metalora_stream_first_chunk_seconds",
                                     "Streamed inference: time to the first chunk from vLLM", labels,
                                     buckets=LATENCY_BUCKETS, registry=r)

    def request(self, tenant: str, endpoint: str) -> "RequestObservation":
        return RequestObservation(self, tenant, endpoint)


class RequestObservation:
    """One inference request: `with metrics.request(...) as o: o.routed(target); return o.answered(result)`."""

    def __init__(self, metrics: GatewayMetrics, tenant: str, endpoint: str):
        self.m, self.tenant, self.endpoint = metrics, tenant, endpoint
        self.adapter = UNRESOLVED_ADAPTER
        self.started = time.perf_counter()

    def __enter__(self) -> "RequestObservation":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            return
        self.m.requests.labels(self.tenant, self.adapter, self.endpoint).inc()
        code = exc.code if isinstance(exc, MetaloraError) else "internal_error"
        self.m.errors.labels(self.tenant, self.adapter, self.endpoint, code).inc()

    def routed(self, target: Target) -> None:
        self.adapter = BASE_ADAPTER if target.affinity_key is None else parse_ref(target.visible_model).name

    def answered(self, result: ProxiedResponse | ProxiedStream) -> ProxiedResponse | ProxiedStream:
        self.m.requests.labels(self.tenant, self.adapter, self.endpoint).inc()
        if isinstance(result, ProxiedStream):
            result.chunks = self._watch(result.chunks)
            return result
        self._usage(result.body)
        self.m.latency.labels(self.tenant, self.adapter, self.endpoint).observe(time.perf_counter() - self.started)
        return result

    async def _watch(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        first = True
        try:
            async for chunk in chunks:
                if first:
                    first = False
                    self.m.first_chunk.labels(self.tenant, self.adapter, self.endpoint).observe(
                        time.perf_counter() - self.started)
                if _USAGE in chunk:  # vLLM's last chunk, with stream_options.include_usage
                    for line in chunk.split(b"\n"):
                        if line.startswith(b"data:") and _USAGE in line:
                            self._usage(line[5:])
                yield chunk
        finally:
            self.m.latency.labels(self.tenant, self.adapter, self.endpoint).observe(time.perf_counter() - self.started)
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:  # a client that went away: the relay closes its upstream response now
                await aclose()

    def _usage(self, payload: bytes) -> None:
        try:
            usage = json.loads(payload).get("usage")
        except (ValueError, AttributeError):
            return
        if not isinstance(usage, dict):
            return
        for key, counter in (("prompt_tokens", self.m.prompt_tokens), ("completion_tokens", self.m.completion_tokens)):
            value = usage.get(key)
            if isinstance(value, int) and value > 0:
                counter.labels(self.tenant, self.adapter).inc(value)


# ---------------------------------------------------------------- the store's and the pool's side, per scrape
class _Families:
    def __init__(self, families: list):
        self.families = families

    def collect(self):
        return self.families


def _histogram(name: str, doc: str, hist) -> HistogramMetricFamily:
    buckets = [("+Inf" if b == float("inf") else repr(float(b)), count) for b, count in hist.buckets]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=hist.sum)


def store_families(stats: JobStats, waiting: int, running: int) -> list:
    out = [GaugeMetricFamily("metalora_jobs_queued", "Adapt jobs waiting for a worker", value=waiting),
           GaugeMetricFamily("metalora_jobs_running", "Adapt jobs claimed by a worker", value=running)]
    finished = CounterMetricFamily("metalora_jobs_finished", "Adapt jobs finished, by final status", labels=["status"])
    for status, value in sorted(stats.finished.items()):
        finished.add_metric([status], value)
    failures = CounterMetricFamily("metalora_job_failures", "Failed adapt jobs, by error code", labels=["code"])
    for code, value in sorted(stats.failures.items()):
        failures.add_metric([code], value)
    out += [finished, failures]
    if stats.duration is not None:
        out.append(_histogram("metalora_job_duration_seconds", "Adapt job time from start (claimed) to its end",
                              stats.duration))
    if stats.step is not None:
        out.append(_histogram("metalora_job_step_seconds", "Time of one optimizer step of an adapt job (steps 2..K)",
                              stats.step))
    return out


def upstream_families(snapshot: list[dict]) -> list:
    healthy = GaugeMetricFamily("metalora_upstream_healthy", "1 when the vLLM replica answers its health check",
                                labels=["url"])
    for upstream in snapshot:
        healthy.add_metric([upstream["url"]], 1.0 if upstream["healthy"] else 0.0)
    return [healthy]


async def render(metrics: GatewayMetrics, store, queue, pool) -> bytes:
    families = upstream_families(pool.snapshot())
    try:
        stats, depth = decode(await store.read_stats()), await queue.depth()
        families += store_families(stats, depth.waiting, depth.leased)
        store_up = 1.0
    except MetaloraError as exc:  # the page still answers, saying the store did not
        log.warning("metrics: the store could not be read: %s", exc)
        store_up = 0.0
    families.append(GaugeMetricFamily("metalora_store_up", "1 when the metadata store answered this scrape",
                                      value=store_up))
    return generate_latest(metrics.registry) + generate_latest(_Families(families))


def check_scraper(settings, authorization: str | None) -> None:
    """Open without auth; with auth required, only for `Bearer <METALORA_METRICS_TOKEN>` (the page names every
    tenant's adapters, so a tenant's API key is not enough)."""
    if not settings.auth_required:
        return
    token = settings.metrics_token
    scheme, _, presented = (authorization or "").partition(" ")
    if not token:
        raise AuthenticationFailed("/metrics is closed: set METALORA_METRICS_TOKEN and scrape with"
                                   " `Authorization: Bearer <token>`", code="metrics_token_unset")
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), token.encode()):
        raise AuthenticationFailed("invalid metrics token", code="invalid_metrics_token")


CONTENT_TYPE = CONTENT_TYPE_LATEST
