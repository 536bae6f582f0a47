"""The compile watchdog itself (``_compile.run_jobs``): a program that hangs is reported as a timeout, one whose
memory grows past the cap as a memory failure, a worker that dies as a crash, each by name, and the programs after
it still run in a fresh worker. Needs no accelerator toolchain: the worker here is a small script that pretends.
"""

from __future__ import annotations

import sys
import textwrap
import threading
import time

import pytest
from _compile import run_jobs

FAKE_WORKER = textwrap.dedent("""
    import json, os, sys, time

    def emit(**event):
        print(json.dumps(event), flush=True)

    hoard = []
    for name in (line.strip() for line in sys.stdin):
        emit(start=name)
        start = time.monotonic()
        if name.startswith("sleep"):
            time.sleep(3600)
        elif name.startswith("grow"):
            while True:  # a runaway compiler: 16 MiB more every 10 ms, touched so that it is resident
                hoard.append(bytearray(os.urandom(1)) * (16 << 20))
                time.sleep(0.01)
        elif name.startswith("die"):
            os._exit(3)
        elif name.startswith("refuse"):
            emit(done=name, ok=False, seconds=time.monotonic() - start, message="MosaicError: no")
            continue
        emit(done=name, ok=True, seconds=time.monotonic() - start, info={"temp_size_in_bytes": len(name)})
""")


@pytest.fixture
def worker(tmp_path):
    path = tmp_path / "fake_worker.py"
    path.write_text(FAKE_WORKER)
    return [sys.executable, str(path)]


def test_a_hang_is_a_timeout_naming_the_program_and_the_rest_still_run(worker):
    start = time.monotonic()
    results = run_jobs(worker, ["ok-a", "sleep-kernel", "ok-b"], timeout_s=2.0, max_rss_bytes=2**30)
    assert time.monotonic() - start < 60  # killed, not waited for (a generous bound: only "not an hour")
    assert [results[n].status for n in ("ok-a", "sleep-kernel", "ok-b")] == ["ok", "timeout", "ok"]
    assert results["sleep-kernel"].seconds >= 2.0
    assert "sleep-kernel: timeout" in results["sleep-kernel"].describe()
    assert results["ok-b"].info == {"temp_size_in_bytes": len("ok-b")}


def test_runaway_memory_is_a_memory_failure_naming_the_program(worker):
    results = run_jobs(worker, ["grow-kernel", "ok-c"], timeout_s=120.0, max_rss_bytes=256 << 20)
    assert results["grow-kernel"].status == "memory", results["grow-kernel"].describe()
    assert "over the cap of 0.2 GiB" in results["grow-kernel"].message
    assert results["ok-c"].ok


def test_a_dead_worker_is_a_crash_and_a_refusal_is_an_error(worker):
    results = run_jobs(worker, ["refuse-x", "die-y", "ok-z"], timeout_s=60.0, max_rss_bytes=2**30)
    assert results["refuse-x"].status == "error" and results["refuse-x"].message == "MosaicError: no"
    assert results["die-y"].status == "crash" and "exited with 3" in results["die-y"].message
    assert results["ok-z"].ok


def test_a_worker_that_cannot_start_fails_every_program_once(tmp_path):
    results = run_jobs([sys.executable, str(tmp_path / "missing.py")], ["p", "q"], timeout_s=30.0,
                       max_rss_bytes=2**30)
    assert {r.status for r in results.values()} == {"crash"}
    assert "missing.py" in results["p"].message


def test_a_long_job_list_does_not_deadlock_the_pipes(worker):
    # More names than a pipe holds (64 KiB), each answered with more output than a pipe holds: the names are fed
    # while the answers are read.
    names = [f"ok-{i:05d}-" + "x" * 400 for i in range(400)]
    found: dict = {}
    runner = threading.Thread(target=lambda: found.update(run_jobs(worker, names, timeout_s=60.0,
                                                                   max_rss_bytes=2**30)), daemon=True)
    runner.start()
    runner.join(timeout=300)  # a deadlock never returns: fail instead of hanging the suite (generous: not a timing)
    assert not runner.is_alive(), "run_jobs deadlocked on a long job list"
    assert len(found) == len(names) and all(result.ok for result in found.values())
