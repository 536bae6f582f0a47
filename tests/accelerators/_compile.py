"""Deviceless compiles, each watched: a worker subprocess per group of programs, a wall-clock timeout and a memory
cap per program, so that a compiler that hangs or runs away is a failure naming its program, never a stuck CI.

The worker (``_worker.py``, run by the accelerator toolchain's own python) compiles the programs it is given one
after the other and writes one JSON line per event to stdout: ``{"start": NAME}`` before a program, then
``{"done": NAME, "ok": bool, ...}`` after it. The parent (:func:`run_jobs`) reads those lines, and every
``POLL_S`` checks the program in progress: past ``timeout_s`` of wall-clock time, or past ``max_rss_bytes`` of
resident memory summed over the worker's process group, it kills the whole group (``SIGKILL`` to the group:
compilers spawn threads and sometimes processes), records the program as ``"timeout"`` or ``"memory"`` and starts
a fresh worker for the programs after it. A worker that dies by itself (a compiler's abort) records its program
as ``"crash"`` with the tail of its stderr, and the rest goes on the same way.

A resident-memory watchdog rather than ``RLIMIT_AS``: XLA and libtpu reserve far more address space than they
touch, so an address-space limit low enough to protect a shared 2-core CI machine kills healthy compiles.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKER = HERE / "_worker.py"
POLL_S = 0.2
PAGE = os.sysconf("SC_PAGE_SIZE")

# Compile-only targets: (jdrop's Pallas backend, the environment variable naming the toolchain's python).
TARGETS = {
    "h100": ("gpu", "JDROP_GPU_PYTHON"),
    "v4": ("tpu", "JDROP_TPU_PYTHON"),
    "v5e": ("tpu", "JDROP_TPU_PYTHON"),
    "v6e": ("tpu", "JDROP_TPU_PYTHON"),
}


@dataclass
class Result:
    """One program's outcome: ``status`` is ``ok``, ``error`` (the compiler refused it: ``message`` says why),
    ``timeout``, ``memory`` (killed by the watchdog) or ``crash`` (the worker died); ``seconds`` its wall
    time; ``info`` what the worker measured (``memory_analysis()`` fields, anything the program reports)."""

    name: str
    status: str
    seconds: float
    message: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def describe(self) -> str:
        return f"{self.name}: {self.status} after {self.seconds:.1f} s{': ' + self.message if self.message else ''}"


def python_for(target: str) -> str | None:
    """The toolchain python of ``target`` from its environment variable, or None when it is not set."""
    return os.environ.get(TARGETS[target][1]) or None


def _group_rss(pgid: int) -> int:
    """Resident bytes of every process in process group ``pgid`` (Linux ``/proc``)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # fields after the command: state, ppid, pgrp, ...
                total += int(fields[21]) * PAGE  # rss in pages
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
    return total


class _Worker:
    """One worker process in its own process group, its stdout read line by line on a thread."""

    def __init__(self, argv: Sequence[str], names: Sequence[str], env: dict[str, str]):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env,
            cwd=ROOT, start_new_session=True,
        )
        assert self.process.stdin is not None
        self.process.stdin.write("".join(name + "\n" for name in names))
        self.process.stdin.close()
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)  # end of output

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def stderr_tail(self, chars: int = 2000) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-chars:].strip()


def _watch(worker: _Worker, names: Sequence[str], timeout_s: float, max_rss_bytes: int,
           results: dict[str, Result]) -> None:
    """Reads ``worker``'s events into ``results`` until it ends or the watchdog kills it."""
    current, started = None, time.monotonic()
    while True:
        try:
            line = worker.lines.get(timeout=POLL_S)
        except queue.Empty:
            line = ""
        if line is None:  # the worker ended: cleanly after its last program, or dead inside ``current``
            code = worker.process.wait()
            if current is not None:
                results[current] = Result(current, "crash", time.monotonic() - started,
                                          f"worker exited with {code}: {worker.stderr_tail()}")
            return
        if line.startswith("{"):
            event = json.loads(line)
            if "start" in event:
                current, started = event["start"], time.monotonic()
            elif "done" in event:
                info = event.get("info", {})
                status = "ok" if event["ok"] else "error"
                results[event["done"]] = Result(event["done"], status, event["seconds"], event.get("message", ""), info)
                current = None
        if current is None:
            continue
        elapsed = time.monotonic() - started
        rss = _group_rss(worker.process.pid)
        if elapsed > timeout_s or rss > max_rss_bytes:
            worker.kill()
            if elapsed > timeout_s:
                results[current] = Result(current, "timeout", elapsed, f"still compiling after {timeout_s:.0f} s "
                                          f"(resident memory {rss / 2**30:.1f} GiB); killed")
            else:
                results[current] = Result(current, "memory", elapsed, f"resident memory {rss / 2**30:.1f} GiB "
                                          f"over the cap of {max_rss_bytes / 2**30:.1f} GiB; killed")
            return


def run_jobs(argv: Sequence[str], names: Sequence[str], *, timeout_s: float, max_rss_bytes: int,
             env: dict[str, str] | None = None) -> dict[str, Result]:
    """Runs the programs ``names`` through worker ``argv`` (names on its stdin, one a line), each watched.

    Returns a :class:`Result` per name. A program killed by the watchdog does not stop the others: a fresh worker
    takes the programs after it.
    """
    results: dict[str, Result] = {}
    remaining = list(names)
    while remaining:
        worker = _Worker(argv, remaining, dict(os.environ if env is None else env))
        try:
            _watch(worker, remaining, timeout_s, max_rss_bytes, results)
        finally:
            worker.kill()
        missing = [name for name in remaining if name not in results]
        if missing == remaining:  # the worker did not start a single program: say why once for all
            message = f"worker ended before compiling anything: {worker.stderr_tail()}"
            results.update({name: Result(name, "crash", 0.0, message) for name in missing})
            break
        remaining = missing
    return results


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
