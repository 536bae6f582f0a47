"""Tests for the dropout core: jdrop.dropout, jdrop.dropout_fwd and jdrop.dropout_bwd.

Every output and gradient is checked against a naive ``jnp.where`` implementation with the same mask (the mask
itself is checked against ``jax.random.bernoulli`` in test_masks.py), and against flax, equinox and haiku.

A jitted function compiles in ~0.2 s; run eagerly, jdrop compiles its small ops one by one for each new shape
(~1 s), so each test jits the variants it checks together, and eager runs use the shared shape ``SHAPE``.
"""

import itertools
import math
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import FLOAT_DTYPES, mean_tolerance, realised_keep, signed_input

import jdrop
from jdrop import masks
from jdrop._validation import RESIDUALS, SCALES

SHAPE = (13, 5)  # odd sizes


def naive_dropout(key, x, rate, *, scale="inverted", broadcast_dims=()):
    """The textbook implementation, differentiated by JAX: ``where(m, x / keep, 0)`` or ``where(m, x, 0)``."""
    mask = jdrop.keep_mask(key, x.shape, rate, broadcast_dims=broadcast_dims)
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    kept = wide / realised_keep(rate) if scale == "inverted" else wide
    return jnp.where(mask, kept, 0).astype(x.dtype)


def _vjp(fn, x, dy):
    """``(fn(x), vjp(dy))``."""
    y, vjp_fn = jax.vjp(fn, x)
    return y, vjp_fn(dy)[0]


def _dropout_vjp(key, x, dy, rate, **options):
    """``(y, dx)`` of ``jdrop.dropout`` at ``x`` for the cotangent ``dy``."""
    return _vjp(lambda x: jdrop.dropout(key, x, rate, **options), x, dy)


def _bits(a):
    return np.asarray(a).view(np.uint32)


# --------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("scale", SCALES)
def test_forward_equals_naive_reference(variant, scale):
    """jdrop.dropout and jdrop.keep_mask with and without jit: the same bits either way."""
    key, x = jax.random.key(0), signed_input(SHAPE)
    rates = [0.1, 0.5, 0.9]
    outputs = variant(
        lambda k, x: [(jdrop.dropout(k, x, rate, scale=scale), jdrop.keep_mask(k, SHAPE, rate)) for rate in rates]
    )(key, x)
    for rate, (y, mask) in zip(rates, outputs):
        expected = naive_dropout(key, x, rate, scale=scale)
        chex.assert_shape(y, x.shape)
        chex.assert_type(y, x.dtype)
        # The same result inside and outside jit: each variant against the other's eager call.
        np.testing.assert_array_equal(y, jdrop.dropout(key, x, rate, scale=scale))
        np.testing.assert_array_equal(mask, jdrop.keep_mask(key, SHAPE, rate))
        np.testing.assert_array_equal(y != 0, mask)
        # jdrop multiplies by 1/keep where the reference divides by keep: at most 1 ulp apart.
        np.testing.assert_allclose(y, expected, rtol=1e-6, atol=0)
        if scale == "classic" or rate == 0.5:  # multiplying by 1 or 2 is exact
            np.testing.assert_array_equal(y, expected)


def test_inverted_scale_uses_realised_keep(key):
    # E[y] = x exactly needs the scale 1 / realised keep, not 1 / (1 - rate): for these rates the two differ.
    for rate in (0.3, 0.7):
        y = jdrop.dropout(key, jnp.ones(SHAPE), rate)
        realised = float(realised_keep(rate))
        assert np.float32(1 / realised) != np.float32(1 / (1 - rate))
        np.testing.assert_allclose(y[y != 0], 1 / realised, rtol=1e-7)


@pytest.mark.parametrize("shape, all_dims", [((13, 5), [(0,), (-1,), (1, 0)]), ((4, 5, 6), [(1,), (0, -1)])], ids=str)
def test_forward_broadcast_dims(key, shape, all_dims):
    x = signed_input(shape)
    cases = list(itertools.product(all_dims, SCALES))

    @jax.jit
    def run(x):
        return [
            (
                jdrop.dropout(key, x, 0.4, broadcast_dims=dims, scale=scale),
                naive_dropout(key, x, 0.4, scale=scale, broadcast_dims=dims),
                jdrop.keep_mask(key, shape, 0.4, broadcast_dims=dims),
            )
            for dims, scale in cases
        ]

    for y, expected, mask in run(x):
        np.testing.assert_array_equal(y != 0, mask)
        np.testing.assert_allclose(y, expected, rtol=1e-6)


def test_eval_mode(key):
    x = signed_input(SHAPE)
    rates = [0.0, 0.3, 1.0]

    def run(k, x):
        return [jdrop.dropout(k, x, rate, deterministic=True, scale=scale) for rate in rates for scale in SCALES]

    for k in (None, key):  # the key is not needed, and ignored if given
        for outputs in (run(k, x), jax.jit(partial(run, k))(x)):
            for (rate, scale), y in zip(itertools.product(rates, SCALES), outputs):
                expected = x if scale == "inverted" else realised_keep(rate) * x
                np.testing.assert_array_equal(y, expected, err_msg=f"{rate} {scale}")


def test_same_output_eager_jit_vmap_and_legacy_key(key):
    keys = jdrop.example_keys(key, 4)
    xs = jnp.stack([signed_input(SHAPE, seed=i) for i in range(4)])
    fn = partial(jdrop.dropout, rate=0.3)
    jitted = jax.jit(fn)
    vmapped = jax.jit(jax.vmap(fn))(keys, xs)
    for i in range(4):
        eager = fn(keys[i], xs[i])
        np.testing.assert_array_equal(jitted(keys[i], xs[i]), eager)
        np.testing.assert_array_equal(vmapped[i], eager)
        np.testing.assert_array_equal(fn(jax.random.key_data(keys[i]), xs[i]), eager)  # legacy raw key


def test_rbg_key():
    # A non-threefry key goes through jax.random.bits; the "key" residual must rebuild the same implementation.
    rbg = jax.random.key(3, impl="rbg")
    x, dy = signed_input(SHAPE), signed_input(SHAPE, seed=1)
    expected_mask = jax.random.bernoulli(rbg, 0.6, SHAPE)
    run = jax.jit(lambda x: [_dropout_vjp(rbg, x, dy, 0.4, residual=r) for r in RESIDUALS])
    for y, dx in run(x):
        np.testing.assert_array_equal(y != 0, expected_mask)
        np.testing.assert_array_equal(dx != 0, expected_mask)
        np.testing.assert_allclose(dx, naive_dropout(rbg, dy, 0.4), rtol=1e-6)


# --------------------------------------------------------------------------------------- other libraries


def test_same_mask_as_flax_equinox_haiku(key):
    import equinox as eqx
    import flax.linen as nn
    import haiku as hk

    x = signed_input(SHAPE)
    for rate in [0.1, 0.3, 0.5]:
        y = jdrop.dropout(key, x, rate)
        others = {
            "flax": nn.Dropout(rate=rate, deterministic=False).apply({}, x, rng=key),
            "equinox": eqx.nn.Dropout(rate)(x, key=key),
            "haiku": hk.dropout(key, rate, x),
        }
        for name, other in others.items():
            np.testing.assert_array_equal(y != 0, other != 0, err_msg=f"{name} {rate}")
            np.testing.assert_allclose(y, other, rtol=1e-6, err_msg=f"{name} {rate}")
    # Eval: both return x.
    eval_ = jdrop.dropout(None, x, 0.3, deterministic=True)
    np.testing.assert_array_equal(eval_, eqx.nn.Dropout(0.3)(x, inference=True))


def test_same_mask_as_flax_broadcast_dims(key):
    import flax.linen as nn

    x = signed_input(SHAPE)
    y = jdrop.dropout(key, x, 0.5, broadcast_dims=(0,))
    other = nn.Dropout(rate=0.5, broadcast_dims=(0,), deterministic=False).apply({}, x, rng=key)
    np.testing.assert_array_equal(y, other)


# --------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("residual", RESIDUALS)
def test_gradient_equals_naive_reference(key, residual):
    x, dy, rate = signed_input(SHAPE), signed_input(SHAPE, seed=1), 0.35
    cases = list(itertools.product(SCALES, [(), (-1,)]))

    def ours(x, scale, dims):
        return _dropout_vjp(key, x, dy, rate, scale=scale, residual=residual, broadcast_dims=dims)

    def reference(x, scale, dims):
        return _vjp(lambda x: naive_dropout(key, x, rate, scale=scale, broadcast_dims=dims), x, dy)

    for (y, dx), (reference_y, reference_dx) in jax.jit(
        lambda x: [(ours(x, *case), reference(x, *case)) for case in cases]
    )(x):
        np.testing.assert_allclose(y, reference_y, rtol=1e-6)
        np.testing.assert_allclose(dx, reference_dx, rtol=1e-6)
        np.testing.assert_array_equal(dx != 0, y != 0)  # the backward uses the forward's mask
    # jax.grad of a scalar loss, eagerly (each new configuration compiles every op eagerly: one here).
    grad = jax.grad(lambda x: jnp.sum(dy * jdrop.dropout(key, x, rate, residual=residual)))(x)
    np.testing.assert_allclose(grad, jax.grad(lambda x: jnp.sum(dy * naive_dropout(key, x, rate)))(x), rtol=1e-6)


def test_dropout_fwd_bwd_equal_dropout_and_its_vjp(key):
    x, dy = signed_input(SHAPE), signed_input(SHAPE, seed=1)
    cases = [(r, s, False) for r, s in itertools.product(RESIDUALS, SCALES)] + [("key", s, True) for s in SCALES]

    def one(x, residual, scale, deterministic):
        options = dict(scale=scale, residual=residual, deterministic=deterministic, broadcast_dims=(1,))
        y_fwd, res = jdrop.dropout_fwd(key, x, 0.25, **options)
        y, dx = _dropout_vjp(key, x, dy, 0.25, **options)
        reference_dx = naive_dropout(key, dy, 0.25, scale=scale, broadcast_dims=(1,))  # dropout is linear
        return y_fwd, jdrop.dropout_bwd(res, dy), y, dx, reference_dx

    for case, (y_fwd, dx_bwd, y, dx, reference_dx) in zip(cases, jax.jit(lambda x: [one(x, *c) for c in cases])(x)):
        np.testing.assert_array_equal(y_fwd, y, err_msg=str(case))
        np.testing.assert_array_equal(dx_bwd, dx, err_msg=str(case))
        residual, scale, deterministic = case
        if deterministic:  # eval: dx = dy (inverted) or keep * dy (classic)
            np.testing.assert_array_equal(dx, dy if scale == "inverted" else realised_keep(0.25) * dy)
        else:
            np.testing.assert_allclose(dx, reference_dx, rtol=1e-6, err_msg=str(case))
            np.testing.assert_array_equal(dx != 0, reference_dx != 0, err_msg=str(case))
    # Eager, without jit, too.
    y_fwd, res = jdrop.dropout_fwd(key, x, 0.25)
    y, dx = _dropout_vjp(key, x, dy, 0.25)
    np.testing.assert_array_equal(y_fwd, y)
    np.testing.assert_array_equal(jdrop.dropout_bwd(res, dy), dx)


def test_gradient_finite_differences_float64(key, x64):
    x = signed_input(SHAPE, dtype=jnp.float64)
    cases = [("inverted", "key"), ("inverted", "bits"), ("classic", "mask")]
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(len(cases), *SHAPE)))

    @jax.jit
    def loss(x):
        ys = jnp.stack([jdrop.dropout(key, x, 0.4, scale=scale, residual=residual) for scale, residual in cases])
        assert ys.dtype == jnp.float64
        return jnp.sum(weights * ys)

    grad = jax.jit(jax.grad(loss))(x)
    assert grad.dtype == jnp.float64
    rng = np.random.default_rng(2)
    step = 1e-3
    for _ in range(5):
        direction = jnp.asarray(rng.normal(size=SHAPE))
        # Central difference; dropout is linear in x, so only float64 rounding remains.
        numerical = (loss(x + step * direction) - loss(x - step * direction)) / (2 * step)
        np.testing.assert_allclose(numerical, jnp.sum(grad * direction), rtol=1e-9)


def test_x64_mask_is_bernoullis_for_how_the_rate_enters(key, x64):
    # Under x64 a Python-float rate enters as float64, as flax and equinox pass it to bernoulli, which then
    # draws float64 uniforms (52 bits of a 64-bit word); a float32 array rate keeps float32 uniforms.
    x = signed_input(SHAPE, dtype=jnp.float64)
    y = jax.jit(lambda x: jdrop.dropout(key, x, 0.3))(x)
    assert y.dtype == jnp.float64
    mask64 = jax.random.bernoulli(key, 1 - 0.3, SHAPE)
    np.testing.assert_array_equal(y != 0, mask64)
    keep64 = np.ceil(0.7 * 2.0**52) / 2.0**52
    np.testing.assert_allclose(y, np.asarray(x) / keep64 * np.asarray(mask64), rtol=1e-15)
    y32 = jdrop.dropout(key, x, jnp.float32(0.3))
    np.testing.assert_array_equal(y32 != 0, jax.random.bernoulli(key, 1 - jnp.float32(0.3), SHAPE))
    with jax.enable_x64(False):
        mask32 = jdrop.keep_mask(key, SHAPE, 0.3)
    np.testing.assert_array_equal(y32 != 0, mask32)
    assert (mask64 != mask32).any()  # the two draws differ: the rate's dtype decides


def test_x64_does_not_leak():
    # The x64 fixture used above is scoped to its tests.
    assert not jax.config.jax_enable_x64
    assert jnp.asarray(1.0).dtype == jnp.float32


def test_vmap_gradients_equal_loop(key):
    keys = jdrop.example_keys(key, 3)
    xs = jnp.stack([signed_input(SHAPE, seed=i) for i in range(3)])
    dys = jnp.stack([signed_input(SHAPE, seed=10 + i) for i in range(3)])

    def per_example(k, x, dy):
        return _dropout_vjp(k, x, dy, 0.5)[1]

    batched = jax.jit(jax.vmap(per_example))(keys, xs, dys)
    for i in range(3):
        np.testing.assert_array_equal(batched[i], per_example(keys[i], xs[i], dys[i]))


def test_scalar_and_empty_inputs(key):
    shapes = [(), (0,), (3, 0)]
    cases = list(itertools.product(shapes, RESIDUALS))

    @jax.jit
    def run():
        return [_dropout_vjp(key, jnp.ones(shape), jnp.ones(shape), 0.5, residual=r) for shape, r in cases]

    for (shape, residual), (y, dx) in zip(cases, run()):
        expected = np.where(jdrop.keep_mask(key, shape, 0.5), 2.0, 0.0)
        assert y.shape == shape and dx.shape == shape
        np.testing.assert_array_equal(y, expected, err_msg=f"{shape} {residual}")
        np.testing.assert_array_equal(dx, expected, err_msg=f"{shape} {residual}")


def test_vmap_over_rates_equals_loop(key):
    x, dy = signed_input(SHAPE), signed_input(SHAPE, seed=1)
    rates = np.asarray([0.0, 0.1, 0.5, 0.9, 1.0], np.float32)
    batched = jax.jit(jax.vmap(lambda rate: _dropout_vjp(key, x, dy, rate, residual="bits")))(rates)
    for i, rate in enumerate(rates):
        y, dx = _dropout_vjp(key, x, dy, rate, residual="bits")
        np.testing.assert_array_equal(batched[0][i], y)
        np.testing.assert_array_equal(batched[1][i], dx)


# --------------------------------------------------------------------------------------- rate 0 and rate 1


SPECIAL = np.array([1.0, -0.0, 0.0, np.inf, -np.inf, np.nan, 3.4e38, -1.5, 1e-30], np.float32)


def test_rate_zero_is_identity(key):
    x, dy = jnp.asarray(SPECIAL), jnp.asarray(SPECIAL[::-1].copy())

    def run(k, x):
        return [_dropout_vjp(k, x, dy, 0.0, scale=scale) for scale in SCALES]

    for k in (key, None):  # rate 0 needs no key
        for outputs in (run(k, x), jax.jit(partial(run, k))(x)):
            for y, dx in outputs:
                np.testing.assert_array_equal(_bits(y), _bits(x))  # bit for bit: -0.0, inf and NaN included
                np.testing.assert_array_equal(_bits(dx), _bits(dy))


def test_traced_rate_zero_is_identity(key):
    x = signed_input(SHAPE)
    y, dx = jax.jit(lambda x, rate: _dropout_vjp(key, x, x, rate))(x, 0.0)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(dx, x)


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("mode", ["rate0", "eval"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_identity_keeps_subnormals(key, mode, dtype, use_jit):
    # Static identity passes return x itself: eager XLA:CPU would flush subnormals in x * 1.0.
    x = jnp.asarray([1e-40, -3e-39, 1.0], dtype)
    rate, deterministic = (0.0, False) if mode == "rate0" else (0.3, True)
    fn = partial(jdrop.dropout, key, rate=rate, deterministic=deterministic)
    y = (jax.jit(fn) if use_jit else fn)(x)
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), np.asarray(x.astype(jnp.float32)))


def test_rate_one_gives_zeros_and_zero_gradients(key):
    x = jnp.asarray(np.resize(SPECIAL, SHAPE))  # even inf and NaN inputs are dropped
    dy = signed_input(SHAPE)
    cases = list(itertools.product(SCALES, RESIDUALS))

    def run(x, rate, cases=cases):
        outputs = []
        for scale, residual in cases:
            outputs += _dropout_vjp(key, x, dy, rate, scale=scale, residual=residual)
        return outputs

    static = jax.jit(lambda x: run(x, 1.0))(x)
    traced = jax.jit(run)(x, 1.0)
    eager = run(x, 1.0, cases[:1])
    grad = jax.grad(lambda x: jnp.sum(jdrop.dropout(key, x, 1.0)))(x)
    for out in [*static, *traced, *eager, grad]:
        assert not np.any(np.isnan(out))
        np.testing.assert_array_equal(out, np.zeros(SHAPE, np.float32))


# --------------------------------------------------------------------------------------- traced rates


def test_traced_rate_one_compilation_matches_static_rates(key):
    x, dy = signed_input(SHAPE), signed_input(SHAPE, seed=1)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def traced(rate):
        return _dropout_vjp(key, x, dy, rate)

    for rate in [0.0, 0.1, 0.25, 0.5, 0.6, 0.75, 0.9, 0.99, 1.0]:
        y, dx = traced(jnp.float32(rate))
        # A traced rate is a float32: the static rate with the same float32 value gives the very same result.
        y_static, dx_static = _dropout_vjp(key, x, dy, np.float32(rate))
        np.testing.assert_array_equal(y, y_static, err_msg=f"rate={rate}")
        np.testing.assert_array_equal(dx, dx_static, err_msg=f"rate={rate}")
        # The Python float rate: 1 - rate is rounded once from float64 (as jax.random.bernoulli(key, 1 - rate)
        # does) instead of in float32, so the realised keep may differ by one 2**-23 step (e.g. at 0.6 and 0.99):
        # the mask only where bits >> 9 hits that step (probability 2**-23), the values by about 1 ulp.
        y_python = jdrop.dropout(key, x, rate)
        np.testing.assert_array_equal(y != 0, y_python != 0, err_msg=f"rate={rate}")
        np.testing.assert_allclose(y, y_python, rtol=1e-6, err_msg=f"rate={rate}")


def test_traced_rate_matches_naive_reference(key):
    x, dy = signed_input(SHAPE), signed_input(SHAPE, seed=1)
    cases = list(itertools.product(SCALES, RESIDUALS))

    @jax.jit
    def run(rate):
        ours = [_dropout_vjp(key, x, dy, rate, scale=s, residual=r) for s, r in cases]
        naive = [_vjp(partial(naive_dropout, key, rate=rate, scale=s), x, dy) for s, _ in cases]
        return ours, naive

    for rate in (0.2, 0.7):
        for (y, dx), (reference_y, reference_dx) in zip(*run(rate)):
            np.testing.assert_allclose(y, reference_y, rtol=1e-6)
            np.testing.assert_allclose(dx, reference_dx, rtol=1e-6)


def test_traced_invalid_rate_gives_nan(key):
    x, dy = signed_input(SHAPE), signed_input(SHAPE, seed=1)

    @jax.jit
    def run(rate):
        outputs = []
        for scale, residual in itertools.product(SCALES, RESIDUALS):
            outputs += _dropout_vjp(key, x, dy, rate, scale=scale, residual=residual)
        return outputs + [jdrop.dropout(None, x, rate, deterministic=True, scale=scale) for scale in SCALES]

    for rate in [-0.1, 1.5, float("nan"), float("inf"), -float("inf"), -1e-7, 1 + 1e-7]:
        for out in run(rate):
            assert np.all(np.isnan(out)), f"rate={rate}"
    for out in run(0.5):
        assert not np.any(np.isnan(out))


def test_no_gradient_flows_to_rate(key):
    x = signed_input(SHAPE)
    grad = jax.jit(jax.grad(lambda rate: jnp.sum(jdrop.dropout(key, x, rate))))(0.3)
    assert float(grad) == 0.0


# --------------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dtype_in_equals_dtype_out(key, dtype):
    x, dy = signed_input(SHAPE, dtype=dtype), signed_input(SHAPE, dtype=dtype, seed=1)
    cases = [("inverted", "key"), ("inverted", "bits"), ("inverted", "mask"), ("classic", "key")]
    mask = jdrop.keep_mask(key, SHAPE, 0.3)

    @jax.jit
    def run(x, dy):
        train = [_dropout_vjp(key, x, dy, 0.3, scale=s, residual=r) for s, r in cases]
        return train, [naive_dropout(key, x, 0.3, scale=s) for s, _ in cases]

    for (y, dx), expected in zip(*run(x, dy)):
        assert y.dtype == dtype and dx.dtype == dtype
        np.testing.assert_array_equal(y != 0, mask)
        np.testing.assert_array_equal(dx != 0, mask)
        # Computed in float32 and rounded once to the input dtype: within one ulp of the reference.
        eps = float(jnp.finfo(dtype).eps)
        np.testing.assert_allclose(y.astype(jnp.float32), expected.astype(jnp.float32), rtol=eps)
    for scale in SCALES:
        assert jdrop.dropout(None, x, 0.3, deterministic=True, scale=scale).dtype == dtype
        assert jdrop.dropout(None, x, 0.0, scale=scale).dtype == dtype


@pytest.mark.parametrize(
    "x",
    [
        jnp.ones(3, jnp.int32),
        jnp.ones(3, jnp.uint8),
        jnp.ones(3, jnp.bool_),
        jnp.ones(3, jnp.complex64),
        np.ones(3, np.int64),
        [1.0, 2.0],
        1.0,
        "x",
    ],
    ids=lambda x: type(x).__name__ + str(getattr(x, "dtype", "")),
)
@pytest.mark.parametrize("fn", [jdrop.dropout, jdrop.dropout_fwd], ids=["dropout", "dropout_fwd"])
def test_non_float_x_is_rejected(key, fn, x):
    with pytest.raises(TypeError, match="`x` must be a floating-point array"):
        fn(key, x, 0.5)
    with pytest.raises(TypeError, match="`x`"):
        fn(None, x, 0.5, deterministic=True)


# --------------------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    "rate", [-0.1, 1.5, float("nan"), float("inf"), np.float32(1.5), jnp.asarray(-0.5)], ids=lambda r: repr(float(r))
)
@pytest.mark.parametrize("fn", [jdrop.dropout, jdrop.dropout_fwd], ids=["dropout", "dropout_fwd"])
def test_static_rate_out_of_range(key, fn, rate):
    x = signed_input(SHAPE)
    with pytest.raises(ValueError, match=r"`rate` must be in \[0, 1\]"):
        fn(key, x, rate)
    with pytest.raises(ValueError, match=r"`rate` must be in \[0, 1\]"):
        fn(None, x, rate, deterministic=True)
    with pytest.raises(ValueError, match=r"`rate` must be in \[0, 1\]"):
        jax.jit(lambda x: fn(key, x, rate))(x)  # a static rate under jit is checked at trace time


@pytest.mark.parametrize("rate", ["0.5", None, True, jnp.asarray(1 + 0j), jnp.ones(2)], ids=repr)
def test_rate_of_wrong_type(key, rate):
    is_scalar = getattr(rate, "shape", ()) == ()
    error, match = (TypeError, "`rate`") if is_scalar else (ValueError, "`rate` must be a scalar")
    with pytest.raises(error, match=match):
        jdrop.dropout(key, signed_input(SHAPE), rate)


@pytest.mark.parametrize("fn", [jdrop.dropout, jdrop.dropout_fwd], ids=["dropout", "dropout_fwd"])
def test_missing_key_in_training(fn):
    with pytest.raises(ValueError, match=r"(?s)pass key=jax\.random\.key\(seed\).*or deterministic=True"):
        fn(None, signed_input(SHAPE), 0.5)
    with pytest.raises(ValueError, match="`key`"):
        # A traced rate may be nonzero: a key is needed.
        jax.jit(lambda x, rate: fn(None, x, rate))(signed_input(SHAPE), 0.0)


@pytest.mark.parametrize("bad_key", [0, 1.5, "key", np.zeros(2, np.float32), np.zeros(3, np.uint32)], ids=repr)
def test_key_of_wrong_type(bad_key):
    with pytest.raises(TypeError, match="`key` must be a PRNG key"):
        jdrop.dropout(bad_key, signed_input(SHAPE), 0.5)


def test_key_array_is_rejected(key):
    with pytest.raises(ValueError, match="single key"):
        jdrop.dropout(jax.random.split(key, 2), signed_input(SHAPE), 0.5)


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"scale": "bogus"}, ValueError, "`scale` must be one of"),
        ({"scale": None}, ValueError, "`scale`"),
        ({"residual": "bogus"}, ValueError, "`residual` must be one of"),
        ({"residual": "bool"}, ValueError, "`residual`"),
        ({"deterministic": "yes"}, TypeError, "`deterministic`"),
        ({"deterministic": jnp.asarray(True)}, TypeError, "`deterministic`"),
        ({"broadcast_dims": (2,)}, ValueError, "`broadcast_dims`"),
        ({"broadcast_dims": (0, -2)}, ValueError, "`broadcast_dims`"),
        ({"broadcast_dims": (-3,)}, ValueError, "`broadcast_dims`"),
        ({"broadcast_dims": (1, 1)}, ValueError, "`broadcast_dims`"),
    ],
    ids=str,
)
@pytest.mark.parametrize("fn", [jdrop.dropout, jdrop.dropout_fwd], ids=["dropout", "dropout_fwd"])
def test_bad_options(key, fn, options, error, match):
    with pytest.raises(error, match=match):
        fn(key, signed_input(SHAPE), 0.5, **options)


# --------------------------------------------------------------------------------------- residuals


RESIDUAL_SHAPE = (7, 143)  # 1001 elements: not a multiple of 8
HANDFUL = 4  # a threefry key is 2 words, an rbg key 4
BROADCASTS = [((), 1001), ((0,), 143), ((1,), 7)]  # (broadcast_dims, size of the drawn mask)


def _residual_leaves(fn, x):
    """The arrays that jax.vjp keeps for the backward pass, less the input itself."""
    _, vjp_fn = jax.vjp(fn, x)
    return [leaf for leaf in jax.tree_util.tree_leaves(vjp_fn) if hasattr(leaf, "nbytes") and leaf is not x]


@pytest.mark.parametrize("residual", RESIDUALS)
def test_vjp_residual_sizes(key, residual):
    x = signed_input(RESIDUAL_SHAPE)
    for (dims, mask_size), use_jit in itertools.product(BROADCASTS, [True, False]):
        if not use_jit and dims:
            continue  # eager compiles every op again for each mask shape
        fn = partial(jdrop.dropout, key, rate=0.5, residual=residual, broadcast_dims=dims)
        leaves = _residual_leaves(jax.jit(fn) if use_jit else fn, x)
        per_element = [leaf for leaf in leaves if leaf.size > HANDFUL]
        per_element_bytes = sum(leaf.nbytes for leaf in per_element)
        assert sum(leaf.nbytes for leaf in leaves if leaf.size <= HANDFUL) <= 32  # key words, threshold, flag
        if residual == "key":
            assert per_element == []  # nothing per element: the mask is regenerated from the key
        elif residual == "bits":
            assert per_element_bytes <= math.ceil(mask_size / 8)  # 1 bit per drawn mask element
            assert all(leaf.dtype == jnp.uint8 for leaf in per_element)
        else:
            assert per_element_bytes == mask_size  # 1 byte per drawn mask element
        assert not any(leaf.dtype == x.dtype and leaf.size > HANDFUL for leaf in leaves)  # no float copy


def _tanh_network_temp_bytes(depth: int, drop) -> int:
    """Temporary memory of ``grad`` of a ``depth``-layer tanh network (512 x 256) with ``drop(layer, h)`` after
    each layer; masks, when ``drop`` takes them, are inputs of the program."""
    batch, width = 512, 256

    def loss(ws, x, extra):
        h = x
        for layer, w in enumerate(ws):
            h = drop(layer, jnp.tanh(h @ w), extra)
        return jnp.sum(h)

    ws = [jax.ShapeDtypeStruct((width, width), jnp.float32)] * depth
    extra = [jax.ShapeDtypeStruct((batch, width), jnp.bool_)] * depth
    compiled = jax.jit(jax.grad(loss)).lower(ws, jax.ShapeDtypeStruct((batch, width), jnp.float32), extra).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_key_policy_adds_nothing_to_a_step_beyond_a_given_mask(key):
    """A network with ``residual="key"`` dropout needs what the same network multiplying by masks it is given
    needs: nothing per element of its own, also with the backward pass's regeneration drawn in a kernel of its
    own on CPU (a byte mask between two kernels, which must not live from the forward pass to the backward)."""
    keyed = lambda layer, h, _: jdrop.dropout(jax.random.fold_in(key, layer), h, 0.5)  # noqa: E731
    given = lambda layer, h, masks_: jnp.where(masks_[layer], h * 2.0, 0.0)  # noqa: E731
    for depth in (2, 6):
        # 0.05 bytes per element of slack (a kept byte mask would add 1, a packed one 0.125).
        slack = 0.05 * depth * 512 * 256
        assert _tanh_network_temp_bytes(depth, keyed) <= _tanh_network_temp_bytes(depth, given) + slack


def test_backward_regeneration_is_its_own_kernel_on_cpu(key):
    """On CPU the backward pass draws its mask in a conditional of two equal branches (a kernel boundary,
    see ``jdrop._dropout._staged_on_cpu``); the forward pass and per-example (vmapped) draws fuse."""
    if jax.default_backend() != "cpu":
        pytest.skip("the staging is XLA:CPU's")
    x = signed_input((64, 128))
    vag = jax.jit(jax.value_and_grad(lambda x, c: jnp.vdot(jdrop.dropout(key, x, 0.5), c)))
    assert vag.lower(x, x).compile().as_text().count("conditional(") == 1
    assert "conditional(" not in jax.jit(lambda x: jdrop.dropout(key, x, 0.5)).lower(x).compile().as_text()
    keys = jax.random.split(key, 64)
    vmapped = jax.jit(jax.grad(lambda x: jax.vmap(lambda k, r: jdrop.dropout(k, r, 0.5))(keys, x).sum()))
    want = jax.vmap(lambda k: jnp.where(jdrop.keep_mask(k, (128,), 0.5), 2.0, 0.0))(keys)
    np.testing.assert_array_equal(vmapped(x), want)
    grad = jax.grad(lambda x: jnp.vdot(jdrop.dropout(key, x, 0.5), x))(x)
    np.testing.assert_allclose(grad, np.where(jdrop.keep_mask(key, x.shape, 0.5), 4.0 * np.asarray(x), 0.0), rtol=1e-6)


def test_eval_vjp_keeps_nothing_per_element():
    x = signed_input(RESIDUAL_SHAPE)
    for scale in SCALES:
        leaves = _residual_leaves(partial(jdrop.dropout, None, rate=0.5, deterministic=True, scale=scale), x)
        assert all(leaf.size <= HANDFUL for leaf in leaves)


def test_dropout_fwd_residual_fields(key):
    x, dy = signed_input(RESIDUAL_SHAPE), signed_input(RESIDUAL_SHAPE, seed=1)
    cases = list(itertools.product([(), (0,), (-1,)], RESIDUALS))

    @jax.jit
    def run(x):
        return [
            (
                jdrop.dropout_fwd(key, x, 0.5, residual=r, broadcast_dims=d)[1],
                jdrop.keep_mask(key, RESIDUAL_SHAPE, 0.5, broadcast_dims=d),
            )
            for d, r in cases
        ]

    for (dims, residual), (res, expected_mask) in zip(cases, run(x)):
        mask_shape = masks.broadcast_shape(RESIDUAL_SHAPE, dims)
        size = math.prod(mask_shape)
        assert isinstance(res, jdrop.DropoutResidual)
        assert res.policy == residual and res.mask_shape == mask_shape
        if residual == "key":
            np.testing.assert_array_equal(res.saved, jax.random.key_data(key))
        elif residual == "bits":
            assert res.saved.dtype == jnp.uint8 and res.saved.shape == (math.ceil(size / 8),)
            unpacked = np.unpackbits(np.asarray(res.saved), bitorder="little")[:size].reshape(mask_shape)
            np.testing.assert_array_equal(np.broadcast_to(unpacked, RESIDUAL_SHAPE), expected_mask)
        else:
            assert res.saved.dtype == jnp.bool_ and res.saved.size == size
            np.testing.assert_array_equal(np.broadcast_to(res.saved, RESIDUAL_SHAPE), expected_mask)
        if not dims:  # a residual is a pytree: it crosses jit boundaries, and dropout_bwd applies its mask
            dx = jax.jit(jdrop.dropout_bwd)(res, dy)
            np.testing.assert_array_equal(dx, np.where(expected_mask, np.asarray(dy) * 2, 0))
    _, res = jdrop.dropout_fwd(None, x, 0.5, deterministic=True)
    assert res.policy == "deterministic" and res.saved is None


def test_residual_from_mask_applies_that_mask_with_the_training_scale():
    mask = jnp.asarray([True, False, True, True])
    dy = jnp.asarray([1.0, 2.0, 3.0, 4.0])
    for scale, factor in (("inverted", 1 / float(realised_keep(0.25))), ("classic", 1.0)):
        res = jdrop.DropoutResidual.from_mask(mask, 0.25, scale=scale)
        assert res.policy == "mask" and res.mask_shape == (4,)
        np.testing.assert_allclose(jdrop.dropout_bwd(res, dy), np.where(mask, dy * factor, 0.0), rtol=1e-7)
    traced = jax.jit(lambda rate: jdrop.dropout_bwd(jdrop.DropoutResidual.from_mask(mask, rate), dy))
    assert np.all(np.isnan(traced(1.5)))


def test_residual_old_field_names_still_read_with_a_deprecation_warning(key):
    x = signed_input(RESIDUAL_SHAPE)
    _, res = jdrop.dropout_fwd(key, x, 0.5, residual="bits")
    with pytest.warns(DeprecationWarning, match="res.policy"):
        assert res.residual == "bits"
    with pytest.warns(DeprecationWarning):
        assert res.train and res.key_data is None and res.mask is res.saved
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        res.nope  # noqa: B018


# --------------------------------------------------------------------------------------- statistics


N_KEYS = 4096


def test_unbiased_over_keys(key):
    x = jnp.linspace(-2.0, 2.0, 64)
    keys = jdrop.example_keys(key, N_KEYS)
    mean_over_keys = jax.jit(lambda rate: jnp.mean(jax.vmap(lambda k: jdrop.dropout(k, x, rate))(keys), axis=0))
    for rate in (0.1, 0.5, 0.9):
        keep = float(realised_keep(rate))
        mean = np.asarray(mean_over_keys(rate))
        # y = m x / keep with m ~ Bernoulli(keep): sd(y) = |x| sqrt((1 - keep) / keep), so the mean over N_KEYS
        # independent masks has binomial standard error |x| sqrt((1 - keep) / (keep N_KEYS)).
        tolerance = mean_tolerance(np.asarray(x) ** 2 * (1 - keep) / keep, N_KEYS)
        assert np.all(np.abs(mean - np.asarray(x)) <= tolerance + 1e-6), rate  # 5 sigma (+ rounding)


def test_classic_rule_for_a_linear_layer(key):
    # Hinton et al. 2012: scaling by keep at test time gives the expected train output of a linear layer W (m x).
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(8, 64)), jnp.float32)
    x = jnp.asarray(rng.normal(size=64), jnp.float32)
    keys = jdrop.example_keys(key, N_KEYS)
    train = jax.jit(lambda rate: jax.vmap(lambda k: w @ jdrop.dropout(k, x, rate, scale="classic"))(keys))
    for rate in (0.2, 0.5):
        outputs = np.asarray(train(rate))
        eval_ = np.asarray(w @ jdrop.dropout(None, x, rate, deterministic=True, scale="classic"))
        keep = float(realised_keep(rate))
        # Exactly in expectation: E[m] = keep, so E[W (m x)] = W (keep x), which is the eval output.
        np.testing.assert_allclose(eval_, keep * np.asarray(w @ x), rtol=1e-5, atol=1e-5)
        # Statistically: Var[(W (m x))_j] = sum_i W_ji^2 x_i^2 keep (1 - keep) for independent Bernoulli m_i,
        # so the mean over N_KEYS masks has standard error sqrt(that / N_KEYS).
        variance = (np.asarray(w) ** 2 @ np.asarray(x) ** 2) * keep * (1 - keep)
        assert np.all(np.abs(outputs.mean(axis=0) - eval_) <= mean_tolerance(variance, N_KEYS)), rate  # 5 sigma
        # The masks are independent across keys: the sample variance matches (its relative standard error is
        # about sqrt(2 / N_KEYS) ~ 2.2%, so 5 sigma is 11%).
        np.testing.assert_allclose(outputs.var(axis=0), variance, rtol=0.11)
