"""The transformer benchmark's "two-line swap": jdrop's Dropout and attention_fn give flax's outputs and gradients.

A small pre-LN transformer (benchmarks/transformer.py) in flax.linen and flax.nnx, with and without remat: for
the same parameters and rngs, the model with ``jdrop.interop.{linen,nnx}.Dropout`` and
``attention_fn=jdrop.dot_product_attention`` computes the flax-dropout model's function, masks included.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")

from benchmarks import transformer  # noqa: E402

CFG = dataclasses.replace(transformer.QUICK, length=24, batch=2, width=32, heads=2, depth=2, rate=0.3)


def _loss_and_grads(framework: str, kind: str, remat: bool):
    model = transformer.variant(framework, kind, remat, CFG)
    params = model.init(jax.random.key(0))
    x = jax.random.randint(jax.random.key(1), (CFG.batch, CFG.length), 0, CFG.vocab)
    y = jax.random.randint(jax.random.key(2), (CFG.batch,), 0, CFG.classes)
    return jax.jit(jax.value_and_grad(model.loss))(params, x, y, jax.random.key(3))


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
@pytest.mark.parametrize("framework", transformer.MODEL_FRAMEWORKS)
def test_jdrop_swap_gives_flax_outputs_and_gradients(framework, remat):
    flax_loss, flax_grads = _loss_and_grads(framework, transformer.FLAX, remat)
    jdrop_loss, jdrop_grads = _loss_and_grads(framework, transformer.JDROP, remat)
    plain_loss, _ = _loss_and_grads(framework, transformer.NONE, remat)
    assert abs(float(flax_loss) - float(plain_loss)) > 1e-3, "dropout at 0.3 changes the loss"
    np.testing.assert_allclose(jdrop_loss, flax_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(jax.tree_util.tree_leaves(jdrop_grads), jax.tree_util.tree_leaves(flax_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_linen_logits_equal_flax_per_example():
    tokens = jax.random.randint(jax.random.key(1), (CFG.batch, CFG.length), 0, CFG.vocab)
    variables = transformer.linen_model(CFG).init(jax.random.key(0), tokens)
    rngs = {"dropout": jax.random.key(5)}
    want = transformer.linen_model(CFG).apply(variables, tokens, rngs=rngs)
    got = transformer.linen_model(CFG, transformer.JDROP).apply(variables, tokens, rngs=rngs)
    evaluated = transformer.linen_model(CFG, transformer.JDROP, train=False).apply(variables, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(evaluated, want), "train mode drops"
    assert jnp.all(jnp.isfinite(evaluated))
