"""Shared pieces of the benchmarks: timing, the machine description, workers and tables."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
"""The repository root: workers run there, with it on ``PYTHONPATH``."""

MiB = 2**20

_PACKAGES = ("jax", "jaxlib", "flax", "equinox", "dm-haiku", "optax", "torch", "numpy")


# ------------------------------------------------------------------------------------- timing


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


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, which containers restrict)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def package_versions() -> dict[str, str | None]:
    """Installed versions of the benchmarked packages (None when one is missing), without importing them."""
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_description() -> dict[str, Any]:
    """The machine and software the numbers come from: CPU, cores, memory, versions, JAX backend."""
    import jax

    devices = jax.devices()
    return {
        "cpu_model": _cpu_model(),
        "cores": cpu_count(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": package_versions(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [f"{d.platform}:{d.device_kind}" for d in devices],
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


# ------------------------------------------------------------------------------------- workers


def run_worker(module: str, framework: str, options: Sequence[str], *, timeout_s: float) -> dict[str, Any]:
    """Runs ``python -m benchmarks.<module> --framework <framework> ...`` and returns its JSON result.

    The worker's progress goes to this process's stderr. A worker that fails or times out yields
    ``{"framework": ..., "error": ...}`` instead of stopping the whole benchmark.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", f"benchmarks.{module}", "--framework", framework, "--out", str(out), *options]
        try:
            proc = subprocess.run(command, cwd=ROOT, env=env, stdout=sys.stderr, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return {"framework": framework, "error": f"timed out after {timeout_s:.0f} s"}
        if proc.returncode != 0 or not out.exists():
            return {"framework": framework, "error": f"worker exited with status {proc.returncode}"}
        return json.loads(out.read_text())


def worker_main(
    description: str, frameworks: Sequence[str], run: Callable[[str, bool], dict[str, Any]], argv: Sequence[str] | None
) -> None:
    """The command line of a worker: ``--framework NAME [--quick] --out PATH``.

    ``run(framework, quick)`` does the measurements; its result is written as JSON to ``--out``
    (or printed when no path is given).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--framework", required=True, choices=frameworks)
    parser.add_argument("--quick", action="store_true", help="small sizes and few runs (a smoke test)")
    parser.add_argument("--out", type=Path, help="where to write the JSON result")
    args = parser.parse_args(argv)
    result = run(args.framework, args.quick)
    text = json.dumps(result, indent=1)
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text)


def log(message: str) -> None:
    """Progress, on stderr so that stdout holds only the tables."""
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- tables


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table with right-aligned numbers, readable as plain text too."""
    cells = [[str(h) for h in headers]] + [[format_number(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        padded = (c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True))
        return "| " + " | ".join(padded) + " |"

    dashes = (("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric, strict=True))
    rule = "|" + "|".join(dashes) + "|"
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) or value is None


def format_number(value: Any) -> str:
    """A table cell: floats to about three significant digits, None as ``-``, anything else as ``str``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or abs(value) >= 1000:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 0.1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


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
