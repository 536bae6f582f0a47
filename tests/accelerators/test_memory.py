"""Memory claims, by the target compilers: ``compiled.memory_analysis().temp_size_in_bytes`` of programs compiled
for H100 and TPU v5e without a device (deterministic: the compiler's buffer assignment, not a measurement).

- jdrop's attention training step (value_and_grad w.r.t. q, k, v; B=4, H=8, D=128, bfloat16, dropout 0.1) needs
  temporaries linear in T (each doubling from T=8192 to 32768 under 3x, the last within 10% of 2x), and at
  T=8192 at most 5% of flax's ``dot_product_attention`` with dropout;
- the 12-block transformer step with jdrop's dropout needs at most 1.05x the temporaries of the same model without
  dropout (same attention implementation). flax's ratio is in ``benchmarks/accelerator_memory.py``'s table.

The numbers are tabled by ``python -m benchmarks.accelerator_memory`` (BENCHMARKS.md, "Accelerators without a device").
"""

from __future__ import annotations

import pytest
from _targets import results
from programs import TRANSFORMERS, Transformer, attention_step_name

TARGETS = ("h100", "v5e")
LENGTHS = (8192, 16384, 32768)
FLAX_LENGTHS = (2048, 8192)
JDROP = ("jdrop-xla", "jdrop-pallas")
FLAX = "flax-dropout"
STEPS = [attention_step_name(kind, t) for kind in JDROP for t in LENGTHS]
STEPS += [attention_step_name(FLAX, t) for t in FLAX_LENGTHS]
MODELS = [cfg.name for cfg in TRANSFORMERS]


def _temp(target: str, group: str, names: list[str], name: str) -> int:
    result = results(target, group, names)[name]
    assert result.ok, result.describe()
    return result.info["temp_size_in_bytes"]


def _step_temp(target: str, kind: str, length: int) -> int:
    return _temp(target, "attention-steps", STEPS, attention_step_name(kind, length))


def _per_target(group: str) -> list:
    """The targets as parameters, each group of a target compiled in one xdist worker."""
    return [pytest.param(t, marks=pytest.mark.xdist_group(f"{t}-{group}")) for t in TARGETS]


@pytest.mark.parametrize("kind", JDROP)
@pytest.mark.parametrize("target", _per_target("attention-steps"))
def test_attention_step_temporaries_are_linear_in_length(target, kind):
    temps = dict(zip(LENGTHS, (_step_temp(target, kind, t) for t in LENGTHS)))
    flax = [_step_temp(target, FLAX, t) for t in FLAX_LENGTHS]
    # Doubling T doubles a linear program's temporaries (less with a constant part) and quadruples a quadratic
    # one's. The compiler's buffer assignment is not smooth in T (XLA:TPU keeps more copies from some size on: with
    # the Pallas path on v5e, 8192 -> 16384 is 2.5x, then exactly 2x), so every doubling must stay well below 4x,
    # and the last one linear within 10%: a T^2 term is then under about a tenth of the temporaries at T=32768.
    # flax's 16x over two doublings shows the test can tell.
    shown = {t: f"{b / 2**20:.0f} MiB" for t, b in temps.items()}
    for short, long in zip(LENGTHS, LENGTHS[1:]):
        assert temps[long] < 3 * temps[short], f"{kind} on {target}: {shown}"
    assert temps[32768] <= 1.1 * 2 * temps[16384], f"{kind} on {target}: {shown}"
    assert flax[1] >= 0.9 * 16 * flax[0], f"flax on {target}: {flax} bytes at T={FLAX_LENGTHS} (expected quadratic)"


@pytest.mark.parametrize("kind", JDROP)
@pytest.mark.parametrize("target", _per_target("attention-steps"))
def test_attention_step_needs_at_most_5_percent_of_flax_at_8192(target, kind):
    ours, flax = _step_temp(target, kind, 8192), _step_temp(target, FLAX, 8192)
    assert ours <= 0.05 * flax, f"{kind} on {target} at T=8192: {ours / 2**20:.0f} MiB vs flax {flax / 2**20:.0f} MiB"


def _model_temp(target: str, dropout: str, attention: str) -> int:
    return _temp(target, "transformers", MODELS, Transformer(dropout, attention).name)


@pytest.mark.parametrize("attention", ("xla", "pallas"))
@pytest.mark.parametrize("target", _per_target("transformers"))
def test_transformer_dropout_costs_at_most_5_percent_of_temporaries(target, attention):
    ours, none = _model_temp(target, "jdrop", attention), _model_temp(target, "none", attention)
    flax, flax_none = _model_temp(target, "flax", "flax"), _model_temp(target, "none", "flax")
    assert ours <= 1.05 * none, (
        f"{target}, jdrop {attention} attention: {ours / 2**20:.0f} MiB with dropout vs {none / 2**20:.0f} MiB "
        f"without ({ours / none:.3f}x; flax: {flax / flax_none:.3f}x)"
    )
