"""One compile watchdog for the deviceless accelerator compiles (``tests/accelerators``, ``benchmarks``): a worker
subprocess per group of jobs, a wall-clock timeout and a resident-memory cap per job, so that a compiler that hangs
or runs away is a failure naming its job, never a stuck run.

The worker (any command) reads job names on stdin, one a line, runs them one after the other and writes one JSON
line per event to stdout: ``{"start": NAME}`` before a job, then ``{"done": NAME, "ok": bool, "seconds": ...,
"message": ..., "info": {...}}`` after it. The parent (:func:`run_jobs`) reads those lines, and every ``POLL_S``
checks the job in progress: past ``timeout_s`` of wall-clock time, or past ``max_rss_bytes`` of resident memory
summed over the worker's process group, it kills the whole group (``SIGKILL`` to the group: compilers spawn
threads and sometimes processes), records the job as ``"timeout"`` or ``"memory"`` and starts a fresh worker for
the jobs after it. A worker that dies by itself (a compiler's abort) records its job as ``"crash"`` with the tail
of its stderr, and the rest goes on the same way.

A resident-memory watchdog rather than ``RLIMIT_AS``: XLA and libtpu reserve far more address space than they
touch, so an address-space limit low enough to protect a shared 2-core CI machine kills healthy compiles.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.2
PAGE = os.sysconf("SC_PAGE_SIZE")


def emit(**event: Any) -> None:
    """Writes one worker event as a JSON line on stdout (the protocol :func:`run_jobs` reads)."""
    print(json.dumps(event), flush=True)


def die_with_parent() -> None:
    """Linux: the kernel kills the calling worker when the process that started it dies (a cancelled CI job)."""
    import ctypes
    import signal as signals

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signals.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Result:
    """One job's outcome: ``status`` is ``ok``, ``error`` (the compiler refused it: ``message`` says why),
    ``timeout``, ``memory`` (killed by the watchdog) or ``crash`` (the worker died); ``seconds`` its wall
    time; ``info`` what the worker measured (``memory_analysis()`` fields, anything the job reports)."""

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
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        # Fed from a thread: a worker reads its jobs as it goes, so a long list would fill the pipe and block here
        # while the worker blocks on its own full stdout.
        threading.Thread(target=self._write, args=(names,), daemon=True).start()

    def _write(self, names: Sequence[str]) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write("".join(name + "\n" for name in names))
            self.process.stdin.close()
        except (BrokenPipeError, OSError):
            pass  # the worker ended (or was killed) before reading them all

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
           results: dict[str, Result], on_result: Callable[[Result], None] | None = None) -> None:
    """Reads ``worker``'s events into ``results`` until it ends or the watchdog kills it."""
    current, started = None, time.monotonic()

    def record(result: Result) -> None:
        results[result.name] = result
        if on_result is not None:
            on_result(result)

    while True:
        try:
            line = worker.lines.get(timeout=POLL_S)
        except queue.Empty:
            line = ""
        if line is None:  # the worker ended: cleanly after its last job, or dead inside ``current``
            code = worker.process.wait()
            if current is not None:
                record(Result(current, "crash", time.monotonic() - started,
                                          f"worker exited with {code}: {worker.stderr_tail()}"))
            return
        if line.startswith("{"):
            event = json.loads(line)
            if "start" in event:
                current, started = event["start"], time.monotonic()
            elif "done" in event:
                info = event.get("info", {})
                status = "ok" if event["ok"] else "error"
                record(Result(event["done"], status, event["seconds"], event.get("message", ""), info))
                current = None
        if current is None:
            continue
        elapsed = time.monotonic() - started
        rss = _group_rss(worker.process.pid)
        if elapsed > timeout_s or rss > max_rss_bytes:
            worker.kill()
            if elapsed > timeout_s:
                record(Result(current, "timeout", elapsed, f"still compiling after {timeout_s:.0f} s "
                              f"(resident memory {rss / 2**30:.1f} GiB); killed"))
            else:
                record(Result(current, "memory", elapsed, f"resident memory {rss / 2**30:.1f} GiB "
                              f"over the cap of {max_rss_bytes / 2**30:.1f} GiB; killed"))
            return


def run_jobs(argv: Sequence[str], names: Sequence[str], *, timeout_s: float, max_rss_bytes: int,
             env: dict[str, str] | None = None,
             on_result: Callable[[Result], None] | None = None) -> dict[str, Result]:
    """Runs the jobs ``names`` through worker ``argv`` (names on its stdin, one a line), each watched.

    Returns a :class:`Result` per name (``on_result``, if given, is called with each as it comes). A job killed by
    the watchdog does not stop the others: a fresh worker takes the jobs after it.
    """
    results: dict[str, Result] = {}
    remaining = list(names)
    while remaining:
        worker = _Worker(argv, remaining, dict(os.environ if env is None else env))
        try:
            _watch(worker, remaining, timeout_s, max_rss_bytes, results, on_result)
        finally:
            worker.kill()
        missing = [name for name in remaining if name not in results]
        if missing == remaining:  # the worker did not start a single job: say why once for all
            message = f"worker ended before compiling anything: {worker.stderr_tail()}"
            results.update({name: Result(name, "crash", 0.0, message) for name in missing})
            break
        remaining = missing
    return results
