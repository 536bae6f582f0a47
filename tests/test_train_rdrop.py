"""Tests for jdrop.train.rdrop_loss and symmetric_kl: R-Drop (Liang et al. 2021) against a naive
two-pass loss with the same example keys, its gradients, and the symmetric KL against numpy.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import mc_model, mc_params, normal_input

import jdrop
from jdrop import train


def test_symmetric_kl_formula():
    a, b = normal_input((6, 5), seed=1), normal_input((6, 5), seed=2)
    p, q = np.asarray(jax.nn.softmax(a), np.float64), np.asarray(jax.nn.softmax(b), np.float64)
    naive = 0.5 * (np.sum(p * np.log(p / q), -1) + np.sum(q * np.log(q / p), -1))
    kl = jax.jit(train.symmetric_kl, static_argnames="axis")
    np.testing.assert_allclose(kl(a, b), naive, rtol=1e-5)
    np.testing.assert_allclose(kl(a, a), 0.0, atol=1e-7)
    np.testing.assert_allclose(kl(a.T, b.T, axis=0), naive, rtol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        train.symmetric_kl(a, b[:2])


class RDropLossTest(chex.TestCase):
    """The two-pass loss and its gradient, with and without jit (chex variants)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_rdrop_loss_two_passes_and_gradient(self):
        key = jax.random.key(0)
        params, x, alpha = mc_params(), normal_input((8, 4), seed=7), 2.0
        labels = jnp.array([0, 1, 2, 0, 1, 2, 0, 1])

        def model(p, xi, *, key, train):  # the jdrop convention: one example
            return mc_model(p, xi, key=key, train=train)

        def naive(p):
            keys = jdrop.example_keys(key, 16)
            first = jax.vmap(lambda xi, k: model(p, xi, key=k, train=True))(x, keys[:8])
            second = jax.vmap(lambda xi, k: model(p, xi, key=k, train=True))(x, keys[8:])
            log_p, log_q = jax.nn.log_softmax(first), jax.nn.log_softmax(second)
            cross_entropy = (
                -0.5
                * (jnp.take_along_axis(log_p, labels[:, None], 1) + jnp.take_along_axis(log_q, labels[:, None], 1))[
                    :, 0
                ]
            )
            kl = 0.5 * jnp.sum(jnp.exp(log_p) * (log_p - log_q) + jnp.exp(log_q) * (log_q - log_p), -1)
            return jnp.mean(cross_entropy + alpha * kl)

        def loss(p):
            return train.rdrop_loss(model, p, x, labels, key, alpha=alpha)

        def run(p):
            without_dropout = train.rdrop_loss(model, mc_params(0.0), x, labels, key, alpha=alpha)
            logits = jnp.tanh(x @ p["w1"]) @ p["w2"]
            # Without dropout the two passes agree: R-Drop reduces to the cross-entropy.
            plain = jdrop.softmax_cross_entropy(logits, labels)
            return loss(p), (without_dropout, plain)

        value, deterministic = self.variant(run)(params)
        grads = jax.jit(jax.grad(loss))(params)  # jitted either way: eager autodiff through vmap takes ~30 s
        naive_value, naive_grads = jax.jit(jax.value_and_grad(naive))(params)  # the reference, jitted either way
        np.testing.assert_allclose(value, naive_value, rtol=1e-5)
        for name in ("w1", "w2"):
            np.testing.assert_allclose(grads[name], naive_grads[name], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(*deterministic, rtol=1e-5)
        with pytest.raises(TypeError, match="labels"):
            train.rdrop_loss(model, params, x, labels.astype(jnp.float32), key)
        with pytest.raises(ValueError, match="leading"):
            train.rdrop_loss(model, params, x, labels[:3], key)
        with pytest.raises(ValueError, match="alpha"):
            train.rdrop_loss(model, params, x, labels, key, alpha=-1.0)
