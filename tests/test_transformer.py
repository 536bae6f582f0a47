"""The transformer benchmark's "two-line swap": jdrop's Dropout and attention_fn give flax's outputs and gradients.

A small pre-LN transformer (benchmarks/transformer.py) in flax.linen and flax.nnx, with and without remat: for
the same parameters and rngs, the model with ``jdrop.interop.{linen,nnx}.Dropout`` and
``attention_fn=jdrop.dot_product_attention`` computes the flax-dropout model's function, masks included.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

pytest.importorskip("flax")

from benchmarks import transformer  # noqa: E402

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
"""XLA:CPU without its LLVM optimisations: the same numbers (to rounding) in a quarter of the compile time."""
CFG = dataclasses.replace(transformer.QUICK, length=24, batch=2, width=16, heads=2, depth=1, rate=0.3)


def _loss_and_grads(framework: str, kind: str, remat: bool, seeds=(3,)):
    """``jit(value_and_grad(loss))`` of one variant at the same parameters and data, for each dropout seed."""
    model = transformer.variant(framework, kind, remat, CFG)
    params = model.init(jax.random.key(0))
    x = jax.random.randint(jax.random.key(1), (CFG.batch, CFG.length), 0, CFG.vocab)
    y = jax.random.randint(jax.random.key(2), (CFG.batch,), 0, CFG.classes)
    step = jax.jit(jax.value_and_grad(model.loss)).lower(params, x, y, jax.random.key(0)).compile(FAST_COMPILE)
    return [step(params, x, y, jax.random.key(seed)) for seed in seeds]


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
@pytest.mark.parametrize("framework", transformer.MODEL_FRAMEWORKS)
def test_jdrop_swap_gives_flax_outputs_and_gradients(framework, remat):
    [(flax_loss, flax_grads)] = _loss_and_grads(framework, transformer.FLAX, remat)
    (jdrop_loss, jdrop_grads), (other_loss, _) = _loss_and_grads(framework, transformer.JDROP, remat, seeds=(3, 4))
    assert abs(float(other_loss) - float(jdrop_loss)) > 1e-4, "dropout is on: another seed, another loss"
    np.testing.assert_allclose(jdrop_loss, flax_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(jax.tree_util.tree_leaves(jdrop_grads), jax.tree_util.tree_leaves(flax_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_equinox_multihead_attention_gives_equinox_outputs_masks_and_gradients():
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
