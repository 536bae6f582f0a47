"""Property-based tests (hypothesis) of the core op over shapes, dtypes, rates and broadcast dims."""

import jax
import jax.numpy as jnp
import numpy as np
from _util import FLOAT_DTYPES, realised_keep
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jdrop
from jdrop import masks

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw):
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=4)))
    ndim = len(shape)
    dims = draw(st.lists(st.integers(-ndim, ndim - 1), unique_by=lambda d: d % ndim, max_size=ndim)) if ndim else []
    rate = draw(st.one_of(st.sampled_from([0.0, 1.0, 0.5, 1e-7, 1 - 1e-7]), st.floats(0.0, 1.0)))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    residual = draw(st.sampled_from(["key", "bits", "mask"]))
    scale = draw(st.sampled_from(["inverted", "classic"]))
    return shape, tuple(dims), rate, dtype, seed, residual, scale


@SETTINGS
@given(cases())
def test_dropout_properties(case):
    shape, dims, rate, dtype, seed, residual, scale = case
    key = jax.random.key(seed)
    x = (jax.random.normal(jax.random.key(seed + 1), shape) + 3.0).astype(dtype)  # nonzero inputs
    y, vjp = jax.vjp(lambda v: jdrop.dropout(key, v, rate, broadcast_dims=dims, residual=residual, scale=scale), x)
    assert y.shape == x.shape and y.dtype == x.dtype
    mask = np.asarray(jdrop.keep_mask(key, shape, rate, broadcast_dims=dims))
    keep = float(realised_keep(rate))
    factor = (1.0 / keep if keep > 0 else 0.0) if scale == "inverted" else 1.0
    if rate == 0.0:
        mask, factor = np.ones(shape, bool), 1.0
    y64 = np.asarray(y, np.float64)
    assert np.array_equal(y64 != 0, mask)  # zero pattern = keep_mask (inputs are nonzero)
    expected = np.asarray(x, np.float64) * factor
    tol = {jnp.float16: 1e-3, jnp.bfloat16: 8e-3, jnp.float32: 1e-6}[dtype]
    np.testing.assert_allclose(y64[mask], expected[mask], rtol=tol)  # kept values = x * scale
    dy = jnp.full(shape, 2.0, dtype)
    (dx,) = vjp(dy)
    assert dx.dtype == x.dtype
    assert np.all(np.isfinite(np.asarray(dx, np.float64)))
    np.testing.assert_allclose(np.asarray(dx, np.float64), np.where(mask, 2.0 * factor, 0.0), rtol=tol)


@SETTINGS
@given(st.integers(1, 300), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(size, rate, seed):
    mask = jdrop.keep_mask(jax.random.key(seed), (size,), rate)
    packed = masks.pack_bits(mask)
    assert packed.shape == (-(-size // 8),) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(masks.unpack_bits(packed, (size,)), mask)
