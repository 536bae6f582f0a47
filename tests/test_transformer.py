"""The transformer benchmark's "two-line swap": jdrop's Dropout and attention_fn compute flax's model, masks included.

A small pre-LN transformer (benchmarks/transformer.py) in flax.linen and flax.nnx, with and without remat, compiled
as users compile it (no XLA option). For the same parameters and rngs:

- in float64, the jdrop model's gradients are the flax model's to float64 rounding: the same function and the same
  masks (a rate whose ``keep * 2**23`` is an integer, so that jdrop's realised keep is flax's ``1 - rate``; one
  differing mask element would move the gradients by orders of magnitude more);
- in float32, both differ from that float64 truth by float32 rounding, and jdrop's error is of the size of flax's.
  That is the only sense in which float32 gradients of the two can be compared: they sum in different orders
  (blockwise online softmax), and some exact gradients are 0 (the key projection's bias: softmax is invariant to a
  per-row shift), where float32 returns rounding noise whose elements no relative tolerance can match
  (benchmarks/transformer_precision.py measures the issue-17 model; docs/guides/transformers.md).
"""

from __future__ import annotations

import dataclasses
import json
import platform

import numpy as np
import pytest

pytest.importorskip("flax")

from benchmarks import transformer, transformer_precision  # noqa: E402

pytestmark = pytest.mark.integration  # transformer-size models against flax in float64: minutes

CFG = dataclasses.replace(transformer.QUICK, length=40, batch=2, width=32, heads=2, depth=2, rate=0.25,
                          broadcast_dropout=False, attention_blocks=(16, 16))
"""Per-(row, head) attention dropout over 3 x 3 tiles of 16 (the last one padded), at rate 0.25 (keep * 2**23 exact)."""
CASES = {"linen-per-head": ("flax.linen", False, CFG),
         "nnx-remat-broadcast": ("flax.nnx", True, dataclasses.replace(CFG, broadcast_dropout=True))}
FLOAT64_TOLERANCE = 1e-12
"""jdrop vs flax in float64: measured 5e-16 (float64 rounding); a single flipped mask element moves it by ~1e-3."""
ACCURACY_FACTOR = 4.0
"""jdrop's float32 error against float64 may be at most this many times flax's own (measured: up to 1.75x for one
parameter, 1.0x over all parameters, on AVX-512, AVX2 code and AVX-512 interleaving alike)."""
ROUNDING_FLOOR = float(np.finfo(np.float32).eps)
"""One float32 rounding: the least error a parameter's float32 gradient can be expected to have (flax may be luckier
than that on a parameter by chance)."""


def check_swap(errors: dict) -> None:
    flax_loss, jdrop_loss, other_loss = errors["losses"]
    np.testing.assert_allclose(jdrop_loss, flax_loss, rtol=1e-6)
    assert abs(other_loss - jdrop_loss) > 1e-4, "dropout is on: another seed, another loss"
    assert errors["float64"] < FLOAT64_TOLERANCE, "not flax's function in float64: a mask or a formula differs"
    assert errors["jdrop_whole"] <= ACCURACY_FACTOR * max(errors["flax_whole"], ROUNDING_FLOOR)
    assert errors["jdrop_whole"] < 1e-5, "float32 rounding of a few hundred operations, not more"
    for name, flax_error in errors["flax"].items():
        assert errors["jdrop"][name] <= ACCURACY_FACTOR * max(flax_error, ROUNDING_FLOOR), name


@pytest.mark.parametrize("case", list(CASES))
def test_jdrop_swap_is_flax_in_float64_and_as_accurate_in_float32(case):
    framework, remat, cfg = CASES[case]
    check_swap(transformer_precision.swap_errors(framework, cfg, remat))


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="an x86 LLVM option")
def test_jdrop_swap_holds_under_avx512_interleaving():
    """As AVX-512 machines vectorize (``-force-vector-interleave=2``), in a subprocess (XLA reads flags at start-up)."""
    framework, remat, cfg = CASES["linen-per-head"]
    fields = {"length": cfg.length, "batch": cfg.batch, "width": cfg.width, "heads": cfg.heads, "depth": cfg.depth,
              "rate": cfg.rate, "broadcast_dropout": cfg.broadcast_dropout, "attention_blocks": cfg.attention_blocks}
    argv = ["--swap", "--framework", framework, "--length", str(cfg.length), "--config", json.dumps(fields)]
    check_swap(transformer_precision.in_mode("interleave", argv, worker=False))


def test_equinox_multihead_attention_gives_equinox_outputs_masks_and_gradients():
    import jax

    eqx = pytest.importorskip("equinox")
    from jdrop.interop import equinox as jdrop_eqx

    mha = eqx.nn.MultiheadAttention(4, 32, dropout_p=0.3, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (20, 32))
    key = jax.random.key(2)
    head_masks = jax.random.bernoulli(jax.random.key(3), 0.8, (4, 20, 20))
    for mask in (None, head_masks, head_masks[0]):
        np.testing.assert_allclose(jdrop_eqx.multihead_attention(mha, x, x, x, mask, key=key),
                                   mha(x, x, x, mask, key=key), rtol=1e-5, atol=1e-6)
    want = jax.grad(lambda q: mha(q, x, x, key=key).sum())(x)
    got = jax.grad(lambda q: jdrop_eqx.multihead_attention(mha, q, x, x, key=key).sum())(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jdrop_eqx.multihead_attention(mha, x, x, x, inference=True),
                               mha(x, x, x, inference=True), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="needs a PRNG `key` in training mode"):  # jdrop's wording, equinox's type
        jdrop_eqx.multihead_attention(mha, x, x, x)
