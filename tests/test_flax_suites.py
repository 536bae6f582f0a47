"""flax's own attention tests, run with :func:`jdrop.dot_product_attention` as the modules' default ``attention_fn``.

The test files of the installed flax version (``tests/linen/linen_attention_test.py``,
``tests/nnx/nn/attention_test.py`` and the attention case of ``tests/nnx/spmd_test.py``) come from
flax's source distribution, fetched once with pip into a cache directory (``$JDROP_CACHE``, default
``~/.cache/jdrop``; skipped only when pip cannot reach the package index) and never copied into this
repository. Each file runs in a pytest subprocess with ``tests/flax_suite_plugin.py``, which makes
jdrop's function the default ``attention_fn`` of ``flax.linen.MultiHeadDotProductAttention`` (and its
subclasses) and ``flax.nnx.MultiHeadAttention`` and counts its calls: every case must pass, none may
be skipped, and jdrop's function must really have been called (the run would otherwise test flax's
own). The cases they exercise are also ported, in this project's style, to
``tests/test_attention_flax_compat.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

import pytest
from _util import exclusive

pytestmark = pytest.mark.integration  # flax's own test files, from its sdist

ROOT = Path(__file__).resolve().parents[1]
FLAX_VERSION = metadata.version("flax")
SUITES = {
    "linen": ("tests/linen/linen_attention_test.py", 1),
    "nnx": ("tests/nnx/nn/attention_test.py", 1),
    # The one case of the SPMD tests that builds an attention module: an explicit-axes mesh of 2 x 2 devices.
    "nnx_spmd": ("tests/nnx/spmd_test.py::TestSPMD::test_out_sharding_mha", 4),
}
# pip's words when it cannot reach the index (no network, no proxy): only then is the test skipped.
_OFFLINE = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
            "Network is unreachable", "(from versions: none)", "ConnectionError", "ProxyError")


def _cache_dir() -> Path:
    return Path(os.environ.get("JDROP_CACHE", Path.home() / ".cache" / "jdrop")) / f"flax-{FLAX_VERSION}"


def _download_sdist(cache: Path) -> Path:
    """flax's sdist for the installed version in ``cache`` (downloaded with pip unless it is there already)."""
    sdist = cache / f"flax-{FLAX_VERSION}.tar.gz"
    if sdist.exists():
        return sdist
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
           "--timeout", "30", "--retries", "1", f"flax=={FLAX_VERSION}", "-d", str(cache / "download")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        if any(word in output for word in _OFFLINE):
            pytest.skip(f"pip cannot reach the package index to fetch flax=={FLAX_VERSION}'s sdist:\n{output[-800:]}")
        raise AssertionError(f"pip download of flax=={FLAX_VERSION} failed:\n{output[-4000:]}")
    (cache / "download" / sdist.name).replace(sdist)
    return sdist


@pytest.fixture(scope="session")
def flax_tests(tmp_path_factory) -> Path:
    """The directory holding the installed flax version's ``tests/``, from its sdist (one xdist worker fetches it)."""
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with exclusive(cache / "lock"):
        sdist = _download_sdist(cache)
        root = cache / "src"
        if not (root / "done").exists():
            prefix = f"flax-{FLAX_VERSION}/"
            with tarfile.open(sdist) as tar:
                members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(prefix + "tests/")
                           and m.name.endswith(".py")]
                for member in members:
                    member.name = member.name[len(prefix):]
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(root, members=members, **safe)
            (root / "pytest.ini").write_text("[pytest]\n")  # flax's tests with no configuration of ours or theirs
            (root / "done").write_text(FLAX_VERSION)
    return root


def _run_suite(root: Path, target: str, devices: int, tmp_path: Path) -> tuple[dict, dict]:
    """Runs ``target`` (flax's tests) under the plugin: (the junit counts and failures, the plugin's call report)."""
    report, junit = tmp_path / "calls.json", tmp_path / "junit.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JDROP_FLAX_SUITE_REPORT=str(report),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "flax_suite_plugin", "-p", "no:randomly", "-p", "no:xdist",
           "-p", "no:cacheprovider", "-c", str(root / "pytest.ini"), "--rootdir", str(root),
           f"--junitxml={junit}", target]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert junit.exists() and report.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    cases = ET.parse(junit).getroot().iter("testcase")
    outcome = {"passed": [], "failed": [], "skipped": []}
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        kind = "failed" if bad is not None else "skipped" if case.find("skipped") is not None else "passed"
        outcome[kind].append(name if kind == "passed" else (name, (bad if bad is not None else case.find(
            "skipped")).get("message", "")[:300]))
    return outcome, json.loads(report.read_text())


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_flax_attention_suite_passes_with_jdrop(flax_tests, suite, tmp_path):
    target, devices = SUITES[suite]
    outcome, calls = _run_suite(flax_tests, target, devices, tmp_path)
    passed = len(outcome["passed"])
    print(f"flax {FLAX_VERSION} {target}: {passed} passed, {len(outcome['failed'])} failed, "
          f"{len(outcome['skipped'])} skipped; jdrop called {calls['calls']}")
    assert passed > 0
    assert not outcome["failed"], outcome["failed"]
    assert not outcome["skipped"], outcome["skipped"]
    # The patch took effect: jdrop's function ran, from the modules whose default was patched.
    assert sum(calls["calls"].values()) > 0, calls
    module_tests = [name for name, n in calls["per_test"].items() if n > 0]
    print(f"{len(module_tests)} of {len(calls['per_test'])} cases called jdrop.dot_product_attention")
    assert module_tests, calls["per_test"]
