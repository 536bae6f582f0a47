"""What the accelerator tests share: which toolchains are here, and each group of programs compiled once per
pytest process (every program in it still watched and timed on its own; see ``_compile.py``)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import pytest
from _compile import ROOT, TARGETS, Result, compile_on, python_for

REPORT_DIR = ROOT / "build" / "accelerators"
"""Each group's results (status, seconds, the compiler's memory figures) as JSON, for CI's artefacts."""
TIMEOUT_S = 600.0
"""Per program. The largest (the 12-block transformer) compiles in minutes on a loaded 2-core machine; a hang
runs for hours."""
MAX_RSS_BYTES = 10 * 2**30
"""Per worker process group. The largest healthy compile stays under a few GiB; the hang this guards against
grew past 18 GB in 3 minutes."""

_results: dict[tuple[str, str], dict[str, Result]] = {}


def require(target: str) -> None:
    """Skips (or fails, under ``make test-accelerators``) when ``target``'s toolchain python is not given."""
    if python_for(target) is None:
        message = (f"{TARGETS[target][1]} is not set: `make test-accelerators` builds the {target} toolchain "
                   "and sets it")
        if os.environ.get("JDROP_REQUIRE_ACCELERATORS"):
            pytest.fail(message)
        pytest.skip(message)


def results(target: str, group: str, names: Sequence[str]) -> dict[str, Result]:
    """The results of compiling ``names`` for ``target``, computed once per (target, group) in this process."""
    require(target)
    if (target, group) not in _results:
        found = compile_on(target, names, timeout_s=TIMEOUT_S, max_rss_bytes=MAX_RSS_BYTES)
        _results[target, group] = found
        REPORT_DIR.mkdir(parents=True, exist_ok=True)
        report = {name: vars(result) for name, result in found.items()}
        (REPORT_DIR / f"{target}-{group}.json").write_text(json.dumps(report, indent=1))
    return _results[target, group]
