"""Job metrics that outlive the worker process: the worker adds each finished job's observations to counters in
the metadata store (`MetadataStore.add_stats`), and every gateway reads them back on a /metrics scrape
(`MetadataStore.read_stats`) as Prometheus counters and histograms. Counters in the store, not in a process:
they add up over any number of workers, survive restarts, and every gateway reports the same values.

The field names of the store's counters and the histogram buckets live here, once; the gateway's collector
(server/metrics.py) turns `read_stats()` into metric families with `decode`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

# Seconds from a job's start (claimed by a worker) to its end; adapt jobs run seconds to minutes.
DURATION_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# Seconds per optimizer step: ~0.1 s on a GPU, ~1 s for SmolLM2 on two CPU cores.
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

DURATION, STEP, FINISHED, FAILED = "job_duration_seconds", "job_step_seconds", "jobs_finished", "job_failures"
_SEP = "|"


def _histogram(name: str, buckets: tuple[float, ...], values: list[float], out: dict[str, float]) -> None:
    for bound in (*buckets, math.inf):
        count = sum(1 for v in values if v <= bound)
        if count:
            out[f"{name}{_SEP}le{_SEP}{bound}"] = out.get(f"{name}{_SEP}le{_SEP}{bound}", 0) + count
    out[f"{name}{_SEP}sum"] = out.get(f"{name}{_SEP}sum", 0) + sum(values)
    out[f"{name}{_SEP}count"] = out.get(f"{name}{_SEP}count", 0) + len(values)


def job_observation(status: str, duration_s: float | None, step_times_s: list[float],
                    error_code: str | None = None) -> dict[str, float]:
    """The counter increments for one finished job (store field -> amount). The duration histogram holds the
    jobs that ran to their end (succeeded or failed), not those stopped by a cancel."""
    out: dict[str, float] = {f"{FINISHED}{_SEP}{status}": 1}
    if duration_s is not None and duration_s >= 0 and status in ("succeeded", "failed"):
        _histogram(DURATION, DURATION_BUCKETS, [duration_s], out)
    if step_times_s:
        _histogram(STEP, STEP_BUCKETS, step_times_s, out)
    if error_code:
        out[f"{FAILED}{_SEP}{error_code}"] = 1
    return out


@dataclass
class Histogram:
    buckets: list[tuple[float, float]]  # (upper bound, cumulative count), +Inf last
    sum: float
    count: float


@dataclass
class JobStats:
    finished: dict[str, float] = field(default_factory=dict)  # status -> jobs
    failures: dict[str, float] = field(default_factory=dict)  # error code -> jobs
    duration: Histogram | None = None
    step: Histogram | None = None


def decode(stats: dict[str, float]) -> JobStats:
    out = JobStats()
    for name, buckets in ((DURATION, DURATION_BUCKETS), (STEP, STEP_BUCKETS)):
        count = stats.get(f"{name}{_SEP}count", 0)
        if count:
            # job_observation counts each value in every bucket at or above it: the counts are cumulative.
            cumulative = [(b, stats.get(f"{name}{_SEP}le{_SEP}{b}", 0)) for b in (*buckets, math.inf)]
            hist = Histogram(cumulative, stats.get(f"{name}{_SEP}sum", 0.0), count)
            setattr(out, "duration" if name == DURATION else "step", hist)
    for key, value in stats.items():
        kind, _, label = key.partition(_SEP)
        if kind == FINISHED:
            out.finished[label] = value
        elif kind == FAILED:
            out.failures[label] = value
    return out


class StepClock:
    """Times the steps of one training run from its progress callback: step k's time is the gap between the
    calls for steps k-1 and k (step 1 also holds the run's warm-up, so it is left out)."""

    def __init__(self):
        self.times: list[float] = []
        self._last: float | None = None

    def wrap(self, on_step: Callable[[int, float], None]) -> Callable[[int, float], None]:
        def timed(step: int, loss: float) -> None:
            t = time.monotonic()
            if self._last is not None:
                self.times.append(t - self._last)
            self._last = t
            on_step(step, loss)

        return timed
