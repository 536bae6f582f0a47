"""Every program of the compile-time matrix compiles within a timeout, as this CPU compiles it and as AVX-512 does.

The programs are in ``tests/compile_programs.py``. Each is compiled in a worker process (one per xdist worker
and mode, restarted after a timeout), so that a compilation that never finishes fails its own test instead of
hanging the suite. The second mode, ``XLA_FLAGS=--xla_backend_extra_options=-force-vector-interleave=2``,
makes LLVM interleave vectorized loops on any x86 CPU as AVX-512's cost model does by itself: an unrolled
threefry chain that is loop-invariant then took hours to compile (see ``jdrop.masks``).
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from compile_programs import PROGRAMS

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("compile_programs.py")
FORCED_INTERLEAVE = "--xla_backend_extra_options=-force-vector-interleave=2"
MODES = {"native": "", "interleave2": FORCED_INTERLEAVE}
# A program compiles in a few seconds on 2 cores; the hazard this guards against takes hours. The margin is
# for a loaded CI machine, not for slow programs.
TIMEOUT_S = 120


class _Worker:
    def __init__(self, mode: str):
        env = dict(os.environ)
        flags = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8 {MODES[mode]}"
        env.update(XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("")  # end of output: the worker died

    def compile(self, name: str) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(name + "\n")
        self.process.stdin.flush()
        return self.lines.get(timeout=TIMEOUT_S)

    def stderr_tail(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-3000:]

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        self.stderr.close()


@pytest.fixture(scope="module")
def workers():
    running: dict[str, _Worker] = {}
    yield running
    for worker in running.values():
        worker.close()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_program_compiles_in_seconds(workers, name, mode):
    worker = workers.get(mode) or workers.setdefault(mode, _Worker(mode))
    try:
        line = worker.compile(name)
    except queue.Empty:
        workers.pop(mode).close()
        pytest.fail(f"{name} did not compile within {TIMEOUT_S} s with XLA_FLAGS={MODES[mode]!r}")
    if not line:
        workers.pop(mode).close()
        pytest.fail(f"the compile worker died on {name}:\n{worker.stderr_tail()}")
    assert line.startswith(f"ok {name} "), line.replace("\\n", "\n")[-4000:]


def test_matrix_covers_the_issue_list():
    """The matrix names what it must hold: MLP key modes, train_step forms, remat, scan, second order,
    every variant, every adapter."""
    names = " ".join(PROGRAMS)
    for needle in ("mlp-per_example", "mlp-shared", "mlp-closed_over", "train_step-deep", "train_step-microbatches",
                   "train_step-vmapped-over-seeds", "train_step-sharded-8-devices", "remat", "scan-recurrent",
                   "second-order", "attention-", "adapter-linen", "adapter-nnx", "adapter-equinox"):
        assert needle in names, needle
    from compile_programs import VARIANT_GROUPS

    import jdrop.variants

    names += " ".join(" ".join(group) for group in VARIANT_GROUPS.values())
    for variant in ("alpha_dropout", "feature_alpha_dropout", "feature_dropout", "gaussian_dropout", "gaussian_noise",
                    "drop_path", "dropconnect", "locked_dropout", "embedding_dropout", "zoneout", "attention_dropout",
                    "concrete_dropout", "dropblock", "mc_predict", "rdrop_loss", "dropconnect_predict"):
        assert hasattr(jdrop.variants, variant) and variant in names, variant
