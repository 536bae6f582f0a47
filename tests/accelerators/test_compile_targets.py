"""Every program of ``programs.py`` compiles for H100 (sm_90a), TPU v5e and v6e (v4: the core of the Pallas matrix)
without a device.

The target's own compiler runs (XLA:GPU with Triton down to cubin; XLA:TPU with Mosaic), each program in a watched
worker (``_compile.py``): a compiler that hangs or runs away fails the program's test by name after
``_targets.TIMEOUT_S`` or past ``_targets.MAX_RSS_BYTES``. Programs go to workers in groups, one group per xdist
worker at a time (``--dist loadgroup``), so the two cores of a CI machine compile two groups side by side.
"""

from __future__ import annotations

import pytest
from _targets import results
from programs import MODEL_PROGRAMS, TRANSFORMERS, core_cases, pallas_matrix, xla_matrix

GROUP_SIZE = 24
ATTENTION = [case.name for case in pallas_matrix() + xla_matrix()]
MODELS = list(MODEL_PROGRAMS)
V4 = [case._replace(grad=grad).name for case in core_cases() if case.head_dim == 128 for grad in (False, True)]
"""v4, the older chip, where it is cheap: the Pallas kernels' core matrix at head dim 128."""
TRANSFORMER_STEPS = [cfg.name for cfg in TRANSFORMERS if cfg.dropout == "jdrop"]
"""jdrop's transformer steps, for v6e: ``test_memory.py`` compiles them (and the models they are compared with)
for H100 and v5e."""
PROGRAMS_BY_TARGET = {
    "h100": ATTENTION + MODELS,
    "v5e": ATTENTION + MODELS,
    "v6e": ATTENTION + MODELS + TRANSFORMER_STEPS,
    "v4": V4,
}


def _groups() -> dict[tuple[str, str], list[str]]:
    groups = {}
    for target, names in PROGRAMS_BY_TARGET.items():
        for start in range(0, len(names), GROUP_SIZE):
            groups[target, f"matrix{start // GROUP_SIZE:02d}"] = names[start:start + GROUP_SIZE]
    return groups


GROUPS = _groups()
CASES = [
    pytest.param(target, group, name, id=f"{target}-{name}", marks=pytest.mark.xdist_group(f"{target}-{group}"))
    for (target, group), names in GROUPS.items()
    for name in names
]


@pytest.mark.parametrize(("target", "group", "name"), CASES)
def test_compiles_without_a_device(target, group, name, record_property):
    result = results(target, group, GROUPS[target, group])[name]
    record_property("compile_s", round(result.seconds, 2))
    assert result.ok, result.describe()
