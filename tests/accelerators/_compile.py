"""Deviceless compiles of the registered programs (``programs.py``) for one target, each watched by the compile
watchdog (``benchmarks/_watchdog.py``: a worker subprocess per group of programs, a wall-clock timeout and a
resident-memory cap per program), so that a compiler that hangs or runs away is a failure naming its program,
never a stuck CI. The worker is ``_worker.py``, run by the accelerator toolchain's own python.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks._watchdog import Result, run_jobs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKER = HERE / "_worker.py"

# Compile-only targets: (jdrop's Pallas backend, the environment variable naming the toolchain's python).
TARGETS = {
    "h100": ("gpu", "JDROP_GPU_PYTHON"),
    "v4": ("tpu", "JDROP_TPU_PYTHON"),
    "v5e": ("tpu", "JDROP_TPU_PYTHON"),
    "v6e": ("tpu", "JDROP_TPU_PYTHON"),
}

__all__ = ["ROOT", "TARGETS", "Result", "compile_on", "python_for", "run_jobs"]


def python_for(target: str) -> str | None:
    """The toolchain python of ``target`` from its environment variable, or None when it is not set."""
    return os.environ.get(TARGETS[target][1]) or None


def compile_on(target: str, names: Sequence[str], *, timeout_s: float = 300.0,
               max_rss_bytes: int = 8 * 2**30) -> dict[str, Result]:
    """Compiles the registered programs ``names`` (``programs.py``) for ``target`` without a device, each watched."""
    python = python_for(target)
    if python is None:
        raise RuntimeError(f"{TARGETS[target][1]} is not set: it names the python of the {target} toolchain.")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE)])
    env.update(ALLOW_MULTIPLE_LIBTPU_LOAD="1", TPU_SKIP_MDS_QUERY="1", JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    return run_jobs([python, str(WORKER), target], names, timeout_s=timeout_s, max_rss_bytes=max_rss_bytes, env=env)


if __name__ == "__main__":  # python tests/accelerators/_compile.py TARGET NAME...: one-off compiles, printed
    for result in compile_on(sys.argv[1], sys.argv[2:]).values():
        print(result.describe(), json.dumps(result.info))
