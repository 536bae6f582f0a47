"""Tests for jdrop.variants.alpha (alpha_dropout, feature_alpha_dropout): Klambauer et al. 2017's affine formula
(as ``torch.nn.functional.alpha_dropout`` computes it) for a given keep mask, the self-normalising statistics (zero
mean, unit variance), PyTorch's semantics, low precision, rate 1 and errors.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import (
    assert_variant_matches_reference,
    bernoulli_mean_tolerance,
    grad_of,
    keep_mask,
    mean_tolerance,
    normal_input,
    realised_keep,
    variance_tolerance,
)

from jdrop import variants

SATURATION = -variants.alpha.SELU_SCALE * variants.alpha.SELU_ALPHA  # alpha' = -lambda * alpha


def alpha_reference(x, mask, rate):
    """The formula of Klambauer et al. 2017 / torch.nn.functional.alpha_dropout, for a given keep mask."""
    keep = realised_keep(rate)
    a = (keep + SATURATION**2 * keep * (1 - keep)) ** -0.5
    b = -a * SATURATION * (1 - keep)
    return a * jnp.where(mask, x, SATURATION) + b


def test_alpha_dropout_formula_and_gradient(variant):
    """The affine formula and its gradient, with and without jit."""
    key = jax.random.key(0)
    rate, shape = 0.2, (40, 30)
    x = normal_input(shape)
    mask = keep_mask(key, shape, rate)
    reference = partial(alpha_reference, mask=mask, rate=rate)
    assert_variant_matches_reference(
        variants.alpha_dropout, key, x, rate, reference, rtol=1e-5, atol=1e-6, transform=variant
    )


def test_alpha_dropout_keeps_zero_mean_unit_variance(key):
    rate, n = 0.3, 200_000
    x = normal_input((n,))
    y = np.asarray(jax.jit(lambda k, v: variants.alpha_dropout(k, v, rate))(key, x), np.float64)
    # y has variance 1, so its mean has standard error 1 / sqrt(n).
    assert abs(y.mean()) < mean_tolerance(1.0, n)
    # The sample variance has standard error sqrt((mu4 - sigma^4) / n); mu4 estimated from y.
    centred = y - y.mean()
    assert abs(centred.var() - 1.0) < variance_tolerance(np.mean(centred**4), centred.var(), n)
    # n independent Bernoulli(rate) drops, identified by the constant a * alpha' + b: 5 sigma.
    dropped = np.isclose(y, float(alpha_reference(jnp.zeros(()), jnp.zeros((), bool), rate)), rtol=1e-6)
    assert abs(dropped.mean() - rate) < bernoulli_mean_tolerance(n, rate)


def test_alpha_dropout_matches_torch_semantics():
    torch = pytest.importorskip("torch")
    rate = 0.25
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 3)  # (B, C, H, W) for the feature variant
    keep = 1 - rate
    a = (keep + SATURATION**2 * keep * (1 - keep)) ** -0.5
    b = -a * SATURATION * (1 - keep)
    for fn, shared in [(torch.nn.functional.alpha_dropout, ()), (torch.nn.functional.feature_alpha_dropout, (2, 3))]:
        y = fn(x, rate, training=True).numpy()
        kept = np.isclose(y, a * x.numpy() + b, rtol=1e-5, atol=1e-6)
        dropped = np.isclose(y, a * SATURATION + b, rtol=1e-5, atol=1e-6)
        # Every element of PyTorch's output is the formula's kept or dropped value: the same affine map.
        assert np.all(kept | dropped) and kept.any() and dropped.any()
        for axis in shared:
            assert np.all(kept == np.take(kept, [0], axis=axis))
        assert np.array_equal(fn(x, rate, training=False).numpy(), x.numpy())
    ours = jax.jit(lambda k, v: variants.feature_alpha_dropout(k, v, rate, channel_axis=1))(
        jax.random.key(0), x.numpy()
    )
    mask = keep_mask(jax.random.key(0), tuple(x.shape), rate, broadcast_dims=(2, 3))
    np.testing.assert_allclose(ours, alpha_reference(jnp.asarray(x.numpy()), mask, rate), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_alpha_dropout_low_precision(key, dtype):
    rate, x = 0.5, normal_input((16, 8))
    y = jax.jit(lambda k, v: variants.alpha_dropout(k, v, rate))(key, x.astype(dtype))
    assert y.dtype == dtype
    tolerance = 1e-2 if dtype == jnp.bfloat16 else 2e-3
    np.testing.assert_allclose(
        y.astype(jnp.float32),
        alpha_reference(x.astype(dtype).astype(jnp.float32), keep_mask(key, x.shape, rate), rate),
        rtol=tolerance,
        atol=tolerance,
    )


def test_alpha_dropout_rate_one_and_errors(key):
    x = normal_input((5, 4))
    fn = jax.jit(lambda k, v: variants.alpha_dropout(k, v, 1.0))
    np.testing.assert_array_equal(fn(key, x), jnp.zeros_like(x))  # as PyTorch: p = 1 gives zeros
    np.testing.assert_array_equal(grad_of(lambda v: fn(key, v), x), jnp.zeros_like(x))
    with pytest.raises(TypeError, match="deterministic"):
        variants.alpha_dropout(key, x, 0.1, deterministic=jnp.bool_(True))
    with pytest.raises(ValueError, match="batch_axis"):
        variants.feature_alpha_dropout(key, x, 0.1, channel_axis=0)
