"""Worker processes: one benchmark suite per framework in its own process, its result as JSON, and progress logs."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ROOT", "log", "run_worker", "worker_main"]

ROOT = Path(__file__).resolve().parents[1]
"""The repository root: workers run there, with it on ``PYTHONPATH``."""


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
