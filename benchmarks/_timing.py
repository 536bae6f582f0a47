"""Timing: one call's statistics, round-robin rounds, and a training step that threads its own state."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["StepRunner", "round_robin", "time_call"]


def time_call(
    fn: Callable[[], Any],
    sync: Callable[[Any], Any],
    *,
    runs: int,
    warmup: int = 2,
    calls_per_run: int = 1,
    min_runs: int | None = None,
    budget_s: float = float("inf"),
) -> dict[str, float]:
    """Times ``fn`` over ``runs`` runs after ``warmup`` calls; milliseconds per call.

    A run is ``calls_per_run`` calls back to back, then ``sync`` of the last result (e.g.
    ``jax.block_until_ready``), timed with ``time.perf_counter``. One call per run measures the
    latency of a call; several let an accelerator queue them, so the per-call host-device
    round trip (tens of microseconds) no longer hides a kernel that is faster than that. The first
    warm-up call includes tracing and compilation; it is reported as ``first_call_ms`` and never
    counted in the statistics. Runs are timed on their own so that the median ignores runs slowed
    by other processes. Timing stops early, after ``min_runs`` runs, once the runs have taken
    ``budget_s`` seconds (a slow candidate need not run as often as a fast one).

    Returns:
      ``{"median_ms", "p25_ms", "p75_ms", "min_ms", "runs", "first_call_ms"}``, per call.
    """
    min_runs = runs if min_runs is None else min_runs
    start = time.perf_counter()
    sync(fn())
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        sync(fn())
    times: list[float] = []
    spent = 0.0
    while len(times) < runs and (len(times) < min_runs or spent < budget_s):
        start = time.perf_counter()
        for _ in range(calls_per_run - 1):
            fn()
        sync(fn())
        elapsed = time.perf_counter() - start
        spent += elapsed
        times.append(elapsed / calls_per_run)
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
    return {
        "median_ms": 1e3 * statistics.median(times),
        "p25_ms": 1e3 * quartiles[0],
        "p75_ms": 1e3 * quartiles[2],
        "min_ms": 1e3 * min(times),
        "runs": len(times),
        "first_call_ms": 1e3 * first,
    }


def round_robin(runners: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each runner's times (seconds) over ``rounds`` rounds; round ``r`` starts at the ``r``-th runner.

    Step ``r`` of every runner runs before step ``r + 1`` of any, so a slow minute of a shared machine
    slows every runner alike, and no runner always follows the same one.
    """
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for round_ in range(rounds):
        shift = round_ % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            times[name].append(runners[name]())
    return times


class StepRunner:
    """A compiled training step ``(params, opt_state, x, y, key) -> (params, opt_state, loss)`` and its state.

    Each call runs one step to completion, threading the parameters and optimiser state from step to step,
    and returns its wall time in seconds.
    """

    def __init__(self, step: Any, params: Any, opt_state: Any, x: Any, y: Any, key: Any) -> None:
        self.step = step
        self.state = [params, opt_state]
        self.x, self.y, self.key = x, y, key

    def __call__(self) -> float:
        import jax

        start = time.perf_counter()
        self.state[0], self.state[1], loss = self.step(self.state[0], self.state[1], self.x, self.y, self.key)
        jax.block_until_ready(loss)
        return time.perf_counter() - start
