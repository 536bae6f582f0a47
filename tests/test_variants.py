"""Tests for jdrop.variants: each variant against its train/eval formula (a naive reference built from
``jdrop.keep_mask`` or ``jax.random``), its statistics, its gradients, dtypes and errors.

Statistical bounds are 5 standard errors of the statistic (a false alarm about once in 1.7 million runs per
check); each bound's derivation is in a comment next to it. Everything heavy runs under ``jit``: eager
dispatch of the unrolled threefry compiles each op per shape.
"""

import math
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdrop
from jdrop import masks, variants

FLOAT_DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32]


def realised_keep(rate: float) -> float:
    """The keep probability the core really uses for ``rate`` (within 2**-23 of ``1 - rate``)."""
    return math.ceil(float(np.float32(1.0 - rate)) * 2**masks.THRESHOLD_BITS) / 2**masks.THRESHOLD_BITS


@partial(jax.jit, static_argnums=(1, 2), static_argnames=("broadcast_dims",))
def keep_mask(key, shape, rate, *, broadcast_dims=()):
    """``jdrop.keep_mask``, jitted: eagerly, the unrolled threefry compiles op by op (seconds per shape)."""
    return jdrop.keep_mask(key, shape, rate, broadcast_dims=broadcast_dims)


@partial(jax.jit, static_argnums=1)
def standard_normal(key, shape):
    """The normals the Gaussian variants draw: ``jax.random.normal(key, shape)``, via ``jdrop.masks``."""
    return masks.normal_from_bits(masks.random_bits(key, shape))


@partial(jax.jit, static_argnums=1)
def uniform(key, shape):
    """The uniforms concrete dropout draws: ``jax.random.uniform(key, shape)``, via ``jdrop.masks``."""
    return masks.uniform_from_bits(masks.random_bits(key, shape))


def five_sigma_fraction(n: int, p: float) -> float:
    """5 standard errors of the mean of ``n`` independent Bernoulli(p) draws: 5 * sqrt(p (1 - p) / n)."""
    return 5.0 * math.sqrt(p * (1.0 - p) / n)


def grad_of(fn, *args, argnums=0):
    """Gradient of ``sum(cotangent * fn(*args))`` with a fixed, non-trivial cotangent."""

    def loss(*a):
        y = fn(*a)
        cotangent = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        return jnp.sum(cotangent * y.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=argnums))(*args)


def positive_input(shape, seed=1, dtype=jnp.float32):
    """Inputs bounded away from 0, so a zero output identifies a dropped element."""
    return jnp.asarray(1.0 + np.random.default_rng(seed).random(shape), dtype)


def normal_input(shape, seed=1, dtype=jnp.float32):
    """Standard normal inputs from numpy (eager jax.random compiles per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


# --------------------------------------------------------------------------------------- feature dropout


@pytest.mark.parametrize(
    "shape, channel_axis, batch_axis, shared",
    [
        ((6, 9, 5), -1, 0, (1,)),  # (B, L, C): Dropout1d / SpatialDropout1D channels-last
        ((6, 4, 3, 5), -1, 0, (1, 2)),  # (B, H, W, C): Dropout2d / SpatialDropout2D
        ((6, 5, 4, 3, 2), 1, 0, (2, 3, 4)),  # (B, C, D, H, W): PyTorch's Dropout3d layout
        ((4, 3, 5), -1, None, (0, 1)),  # one example (inside vmap)
        ((6, 5), -1, 0, ()),  # no spatial axes: ordinary dropout
    ],
)
def test_feature_dropout_formula(key, shape, channel_axis, batch_axis, shared):
    rate = 0.3
    x = positive_input(shape)
    fn = jax.jit(lambda k, v: variants.feature_dropout(k, v, rate, channel_axis=channel_axis, batch_axis=batch_axis))
    y = fn(key, x)
    mask = keep_mask(key, shape, rate, broadcast_dims=shared)
    np.testing.assert_allclose(y, np.where(mask, x / realised_keep(rate), 0.0), rtol=1e-6)
    # Mask structure: constant along the shared (spatial) axes.
    kept = np.asarray(y != 0)
    for axis in shared:
        assert np.all(kept == np.take(kept, [0], axis=axis))
    if len(shared) == 2:  # the gradient (the core's backward with broadcast dims), once
        grad = grad_of(lambda v: fn(key, v), x)
        naive = grad_of(lambda v: jnp.where(mask, v / realised_keep(rate), 0.0), x)
        np.testing.assert_allclose(grad, naive, rtol=1e-6)


def test_feature_dropout_statistics(key):
    rate, batch, channels = 0.2, 400, 64
    y = jax.jit(lambda k: variants.feature_dropout(k, jnp.ones((batch, 3, 3, channels)), rate))(key)
    dropped = np.asarray(y[:, 0, 0, :] == 0)
    # batch * channels independent Bernoulli(rate) channel drops: 5 sigma of their mean.
    assert abs(dropped.mean() - rate) < five_sigma_fraction(batch * channels, rate)
    # Unbiased: mean of y over all elements = mean of m / keep; the same 25600 channel draws.
    keep = 1 - rate
    assert abs(float(jnp.mean(y)) - 1.0) < 5 * math.sqrt(rate / keep / (batch * channels))


def test_feature_dropout_matches_torch_semantics():
    torch = pytest.importorskip("torch")
    rate = 0.4
    torch.manual_seed(0)
    x = torch.rand(8, 5, 4, 3) + 1.0  # (B, C, H, W)
    y = torch.nn.functional.dropout2d(x, rate, training=True).numpy()
    kept = y != 0
    # PyTorch's Dropout2d drops whole (example, channel) maps and scales the rest by 1 / keep: our formula.
    assert np.all(kept == kept[:, :, :1, :1])
    np.testing.assert_allclose(y, np.where(kept, x.numpy() / (1 - rate), 0.0), rtol=1e-6)
    ours = jax.jit(lambda k, v: variants.feature_dropout(k, v, rate, channel_axis=1))(jax.random.key(0), x.numpy())
    ours_kept = np.asarray(ours != 0)
    assert np.all(ours_kept == ours_kept[:, :, :1, :1])
    np.testing.assert_allclose(ours, np.where(ours_kept, x.numpy() / realised_keep(rate), 0.0), rtol=1e-6)


def test_feature_dropout_per_example_keys_under_vmap(key):
    rate, shape = 0.5, (4, 3, 5)
    keys = jdrop.example_keys(key, 6)
    x = positive_input((6, *shape))
    y = jax.jit(jax.vmap(lambda k, v: variants.feature_dropout(k, v, rate, batch_axis=None)))(keys, x)
    for i in range(6):
        mask = keep_mask(keys[i], shape, rate, broadcast_dims=(0, 1))
        np.testing.assert_allclose(y[i], np.where(mask, x[i] / 0.5, 0.0), rtol=1e-6)


def test_feature_dropout_eval_and_errors(key):
    x = jnp.ones((2, 3, 4))
    np.testing.assert_array_equal(variants.feature_dropout(None, x, 0.5, deterministic=True), x)
    with pytest.raises(ValueError, match="batch_axis.*channel_axis"):
        variants.feature_dropout(key, x, 0.5, channel_axis=0)
    with pytest.raises(ValueError, match="channel_axis"):
        variants.feature_dropout(key, x, 0.5, channel_axis=3)
    with pytest.raises(TypeError, match="channel_axis"):
        variants.feature_dropout(key, x, 0.5, channel_axis=1.0)
    with pytest.raises(ValueError, match="rank >= 1"):
        variants.feature_dropout(key, jnp.ones(()), 0.5)
    with pytest.raises(ValueError, match=r"rate.*\[0, 1\]"):
        variants.feature_dropout(key, x, 1.5)
    with pytest.raises(TypeError, match="floating"):
        variants.feature_dropout(key, jnp.ones((2, 3), jnp.int32), 0.5)
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        variants.feature_dropout(None, x, 0.5)


# --------------------------------------------------------------------------------------- drop path


def test_drop_path_formula_and_gradient(key):
    rate, shape = 0.4, (64, 3, 5)
    x = positive_input(shape)
    mask = keep_mask(key, shape, rate, broadcast_dims=(1, 2))
    for scale_by_keep, factor in [(True, 1 / realised_keep(rate)), (False, 1.0)]:
        fn = jax.jit(lambda k, v, s=scale_by_keep: variants.drop_path(k, v, rate, scale_by_keep=s))
        y = fn(key, x)
        np.testing.assert_allclose(y, np.where(mask, x * factor, 0.0), rtol=1e-6)
        grad = grad_of(lambda v, f=fn: f(key, v), x)
        np.testing.assert_allclose(grad, grad_of(lambda v, c=factor: jnp.where(mask, v * c, 0.0), x), rtol=1e-6)
        # timm's evaluation is the identity whatever scale_by_keep.
        np.testing.assert_array_equal(
            variants.drop_path(None, x, rate, scale_by_keep=scale_by_keep, deterministic=True), x
        )
    # One draw per example: whole examples are kept or dropped.
    kept = np.asarray(fn(key, x) != 0)
    assert np.all(kept == kept[:, :1, :1])


def test_drop_path_statistics_and_rate_one(key):
    rate, batch = 0.3, 20000
    y = jax.jit(lambda k: variants.drop_path(k, jnp.ones((batch, 2)), rate))(key)
    # batch independent Bernoulli(rate) example drops: 5 sigma of their mean.
    assert abs(float(jnp.mean(y[:, 0] == 0)) - rate) < five_sigma_fraction(batch, rate)
    x = jnp.ones((4, 3))
    np.testing.assert_array_equal(jax.jit(variants.drop_path, static_argnums=2)(key, x, 1.0), jnp.zeros_like(x))
    np.testing.assert_array_equal(grad_of(lambda v: variants.drop_path(key, v, 1.0), x), jnp.zeros_like(x))


def test_drop_path_per_example_under_vmap(key):
    keys = jdrop.example_keys(key, 8)
    x = positive_input((8, 3, 2))
    y = jax.jit(jax.vmap(lambda k, v: variants.drop_path(k, v, 0.5, batch_axis=None)))(keys, x)
    for i in range(8):
        keep = bool(keep_mask(keys[i], (), 0.5))
        np.testing.assert_allclose(y[i], x[i] * 2.0 if keep else jnp.zeros_like(x[i]), rtol=1e-6)


def test_drop_path_rates_match_timm_linspace():
    rates = variants.drop_path_rates(0.3, 12)
    assert rates.dtype == jnp.float32 and rates.shape == (12,)
    # timm: [x.item() for x in torch.linspace(0, drop_path_rate, depth)].
    np.testing.assert_allclose(rates, np.linspace(0.0, 0.3, 12, dtype=np.float32), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(variants.drop_path_rates(0.3, 1), [0.0])
    traced = jax.jit(lambda r: variants.drop_path_rates(r, 4))(jnp.float32(0.6))
    np.testing.assert_allclose(traced, [0.0, 0.2, 0.4, 0.6], rtol=1e-6)
    with pytest.raises(ValueError, match="max_rate"):
        variants.drop_path_rates(1.5, 4)
    with pytest.raises(ValueError, match="depth"):
        variants.drop_path_rates(0.1, -1)


def test_drop_path_errors(key):
    with pytest.raises(ValueError, match="batch_axis"):
        variants.drop_path(key, jnp.ones(()), 0.1)
    with pytest.raises(TypeError, match="scale_by_keep"):
        variants.drop_path(key, jnp.ones((2, 3)), 0.1, scale_by_keep="yes")
    with pytest.raises(TypeError, match="floating"):
        variants.drop_path(key, jnp.ones((2, 3), jnp.int8), 0.1)


# --------------------------------------------------------------------------------------- recurrent


def test_locked_dropout_formula_and_structure(key):
    rate, shape = 0.5, (7, 4, 6)  # (T, B, D)
    x = positive_input(shape)
    y = jax.jit(lambda k, v: variants.locked_dropout(k, v, rate, time_axis=0))(key, x)
    mask = keep_mask(key, shape, rate, broadcast_dims=(0,))
    np.testing.assert_allclose(y, np.where(mask, x * 2.0, 0.0), rtol=1e-6)
    kept = np.asarray(y != 0)
    assert np.all(kept == kept[:1])  # the same mask at every time step
    assert 0 < kept[0].mean() < 1  # but not the same for every unit


def test_locked_dropout_inside_scan_equals_whole_sequence(key):
    rate, steps, batch, width = 0.3, 9, 4, 5
    key_x, key_h = jax.random.key(1), jax.random.key(2)
    xs = positive_input((steps, batch, width))
    w = 0.3 * normal_input((width, width), seed=3)

    def rnn(xs, w, dropped_outside):
        def step(h, x_t):
            if not dropped_outside:
                x_t = variants.locked_dropout(key_x, x_t, rate, time_axis=None)
            h = jnp.tanh(x_t + variants.locked_dropout(key_h, h, rate, time_axis=None) @ w)
            return h, h

        if dropped_outside:
            xs = variants.locked_dropout(key_x, xs, rate, time_axis=0)
        return jax.lax.scan(step, jnp.ones((batch, width)), xs)[1]

    def inside(xs, w):
        return rnn(xs, w, False)

    np.testing.assert_allclose(*jax.jit(lambda xs, w: (inside(xs, w), rnn(xs, w, True)))(xs, w), rtol=1e-6)
    # The gradient through the scan (the core's backward at every step) equals the naive one.
    mask_x = keep_mask(key_x, (batch, width), rate)
    mask_h = keep_mask(key_h, (batch, width), rate)
    keep = realised_keep(rate)

    def naive(xs, w):
        def step(h, x_t):
            h = jnp.tanh(jnp.where(mask_x, x_t / keep, 0.0) + jnp.where(mask_h, h / keep, 0.0) @ w)
            return h, h

        return jax.lax.scan(step, jnp.ones((batch, width)), xs)[1]

    grads = jax.jit(lambda xs, w: [grad_of(f, xs, w, argnums=(0, 1)) for f in (inside, naive)])(xs, w)
    for ours, reference in zip(*grads):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)


def test_embedding_dropout_drops_word_types(key):
    rate, vocab, dim = 0.25, 4000, 3
    table = positive_input((vocab, dim))
    fn = jax.jit(lambda k, t: variants.embedding_dropout(k, t, rate))
    dropped_table = fn(key, table)
    mask = keep_mask(key, (vocab, dim), rate, broadcast_dims=(1,))
    np.testing.assert_allclose(dropped_table, np.where(mask, table / 0.75, 0.0), rtol=1e-6)
    kept = np.asarray(dropped_table != 0)
    assert np.all(kept == kept[:, :1])  # whole rows
    # vocab independent Bernoulli(rate) row drops: 5 sigma of their mean.
    assert abs((~kept[:, 0]).mean() - rate) < five_sigma_fraction(vocab, rate)
    # Every occurrence of a dropped word embeds to zero; gradients reach only kept rows, scaled.
    tokens = jnp.array([3, 3, 17, 3, 42])

    def embed(t):
        return fn(key, t)[tokens]

    grad = grad_of(embed, table)
    naive = grad_of(lambda t: jnp.where(mask, t / 0.75, 0.0)[tokens], table)
    np.testing.assert_allclose(grad, naive, rtol=1e-6)
    np.testing.assert_array_equal(variants.embedding_dropout(None, table, rate, deterministic=True), table)
    with pytest.raises(ValueError, match="vocabulary"):
        variants.embedding_dropout(key, jnp.ones(()), rate)
    with pytest.raises(TypeError, match="table"):
        variants.embedding_dropout(key, jnp.ones((3, 2), jnp.int32), rate)


def test_zoneout_formula_gradient_and_statistics(key):
    rate, shape = 0.3, (200, 50)
    h_prev = normal_input(shape, seed=1)
    h_new = normal_input(shape, seed=2)
    fn = jax.jit(lambda k, a, b: variants.zoneout(k, a, b, rate))
    h = fn(key, h_prev, h_new)
    # m = 1 - keep_mask: a unit zones out (keeps h_prev) with probability rate.
    zoned = ~keep_mask(key, shape, rate)
    np.testing.assert_array_equal(h, jnp.where(zoned, h_prev, h_new))  # exact, not just close
    # 10000 independent Bernoulli(rate) zoneout draws: 5 sigma of their mean.
    assert abs(float(jnp.mean(zoned)) - rate) < five_sigma_fraction(zoned.size, rate)
    grads = grad_of(fn, key, h_prev, h_new, argnums=(1, 2))
    naive = grad_of(lambda k, a, b: jnp.where(zoned, a, b), key, h_prev, h_new, argnums=(1, 2))
    for ours, reference in zip(grads, naive):
        np.testing.assert_array_equal(ours, reference)
    evaluated = variants.zoneout(None, h_prev, h_new, rate, deterministic=True)
    np.testing.assert_allclose(evaluated, rate * h_prev + (1 - rate) * h_new, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(jax.jit(variants.zoneout)(key, h_prev, h_new, 1.0), h_prev)
    np.testing.assert_array_equal(variants.zoneout(key, h_prev, h_new, 0.0), h_new)


def test_zoneout_errors(key):
    with pytest.raises(ValueError, match="same shape and dtype"):
        variants.zoneout(key, jnp.ones((2, 3)), jnp.ones((3, 2)), 0.1)
    with pytest.raises(ValueError, match="same shape and dtype"):
        variants.zoneout(key, jnp.ones(3, jnp.float16), jnp.ones(3), 0.1)
    with pytest.raises(TypeError, match="h_new"):
        variants.zoneout(key, jnp.ones(3), jnp.ones(3, jnp.int32), 0.1)
    with pytest.raises(ValueError, match="rate"):
        variants.zoneout(key, jnp.ones(3), jnp.ones(3), -0.1)


# --------------------------------------------------------------------------------------- attention


def test_attention_dropout_formula(key):
    rate = 0.1
    probs = jax.nn.softmax(normal_input((2, 3, 8, 8)), axis=-1)
    y = jax.jit(lambda k, p: variants.attention_dropout(k, p, rate))(key, probs)
    mask = keep_mask(key, probs.shape, rate)  # = jax.random.bernoulli(key, 1 - rate, shape) (tests/test_masks.py)
    np.testing.assert_allclose(y, jnp.where(mask, probs / realised_keep(rate), 0.0), rtol=1e-6)
    broadcast = jax.jit(lambda k, p: variants.attention_dropout(k, p, rate, broadcast_dims=(0, 1)))(key, probs)
    kept = np.asarray(broadcast != 0)
    assert np.all(kept == kept[:1, :1])


def test_attention_dropout_temp_memory_below_flax(key):
    flax_linen = pytest.importorskip("flax.linen")
    batch, heads, length, depth, rate = 2, 4, 128, 16, 0.1

    def block(drop):
        def loss(q, k, v, key):
            probs = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(depth), axis=-1)
            return jnp.sum(jnp.einsum("bhqk,bhkd->bhqd", drop(key, probs), v) ** 2)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    def flax_dropout(k, p):
        return flax_linen.Dropout(rate, deterministic=False).apply({}, p, rngs={"dropout": k})

    qkv = [jnp.ones((batch, heads, length, depth))] * 3

    def temp_bytes(drop):
        return block(drop).lower(*qkv, key).compile().memory_analysis().temp_size_in_bytes

    ours = temp_bytes(lambda k, p: variants.attention_dropout(k, p, rate))
    mask_bytes = batch * heads * length * length  # one byte per attention weight
    assert ours + mask_bytes <= temp_bytes(flax_dropout)
    # No more than attention without dropout (plus a few bytes of key).
    assert ours <= temp_bytes(lambda k, p: p) + 1024


# --------------------------------------------------------------------------------------- alpha dropout

SATURATION = -variants.alpha.SELU_SCALE * variants.alpha.SELU_ALPHA  # alpha' = -lambda * alpha


def alpha_reference(x, mask, rate):
    """The formula of Klambauer et al. 2017 / torch.nn.functional.alpha_dropout, for a given keep mask."""
    keep = realised_keep(rate)
    a = (keep + SATURATION**2 * keep * (1 - keep)) ** -0.5
    b = -a * SATURATION * (1 - keep)
    return a * jnp.where(mask, x, SATURATION) + b


def test_alpha_dropout_formula_and_gradient(key):
    rate, shape = 0.2, (40, 30)
    x = normal_input(shape)
    fn = jax.jit(lambda k, v: variants.alpha_dropout(k, v, rate))
    mask = keep_mask(key, shape, rate)
    np.testing.assert_allclose(fn(key, x), alpha_reference(x, mask, rate), rtol=1e-5, atol=1e-6)
    grad = grad_of(lambda v: fn(key, v), x)
    np.testing.assert_allclose(grad, grad_of(lambda v: alpha_reference(v, mask, rate), x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(variants.alpha_dropout(None, x, rate, deterministic=True), x)
    np.testing.assert_array_equal(variants.alpha_dropout(key, x, 0.0), x)


def test_alpha_dropout_keeps_zero_mean_unit_variance(key):
    rate, n = 0.3, 200_000
    x = normal_input((n,))
    y = np.asarray(jax.jit(lambda k, v: variants.alpha_dropout(k, v, rate))(key, x), np.float64)
    # y has variance 1, so its mean has standard error 1 / sqrt(n).
    assert abs(y.mean()) < 5 / math.sqrt(n)
    # The sample variance has standard error sqrt((mu4 - sigma^4) / n); mu4 estimated from y.
    centred = y - y.mean()
    assert abs(centred.var() - 1.0) < 5 * math.sqrt((np.mean(centred**4) - centred.var() ** 2) / n)
    # n independent Bernoulli(rate) drops, identified by the constant a * alpha' + b: 5 sigma.
    dropped = np.isclose(y, float(alpha_reference(jnp.zeros(()), jnp.zeros((), bool), rate)), rtol=1e-6)
    assert abs(dropped.mean() - rate) < five_sigma_fraction(n, rate)


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
    with pytest.raises(ValueError, match="rate"):
        variants.alpha_dropout(key, x, 1.01)
    with pytest.raises(TypeError, match="floating"):
        variants.alpha_dropout(key, jnp.ones(3, jnp.int32), 0.1)
    with pytest.raises(TypeError, match="deterministic"):
        variants.alpha_dropout(key, x, 0.1, deterministic=jnp.bool_(True))
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        variants.alpha_dropout(None, x, 0.1)
    with pytest.raises(ValueError, match="batch_axis"):
        variants.feature_alpha_dropout(key, x, 0.1, channel_axis=0)


# --------------------------------------------------------------------------------------- Gaussian


def test_masks_float_helpers_match_jax_random(key):
    shape = (50, 40)  # the shape of the next test: JAX compiles its threefry once per shape
    np.testing.assert_array_equal(uniform(key, shape), jax.jit(jax.random.uniform, static_argnums=1)(key, shape))
    np.testing.assert_array_equal(standard_normal(key, shape), jax.jit(jax.random.normal, static_argnums=1)(key, shape))
    bits = jax.jit(masks.random_bits, static_argnums=1)(key, shape)
    scaled = jax.jit(lambda b: masks.uniform_from_bits(b, -2.0, 3.0))(bits)
    assert scaled.dtype == jnp.float32 and float(scaled.min()) >= -2.0 and float(scaled.max()) < 3.0
    # The uniforms' top 23 bits are those of the keep test: u < keep exactly where the mask keeps.
    np.testing.assert_array_equal(uniform(key, shape) < realised_keep(0.3), keep_mask(key, shape, 0.3))


def test_gaussian_dropout_formula_noise_and_gradient(key):
    rate, shape = 0.2, (50, 40)
    x = normal_input(shape)
    fn = jax.jit(lambda k, v: variants.gaussian_dropout(k, v, rate))
    y = fn(key, x)
    z = standard_normal(key, shape)  # = jax.random.normal(key, shape), test_masks_float_helpers_match_jax_random
    stddev = math.sqrt(rate / (1 - rate))
    np.testing.assert_allclose(y, x * (1 + stddev * z), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        grad_of(lambda v: fn(key, v), x), grad_of(lambda v: v * (1 + stddev * z), x), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_array_equal(variants.gaussian_dropout(None, x, rate, deterministic=True), x)
    np.testing.assert_array_equal(variants.gaussian_dropout(key, x, 0.0), x)


def test_gaussian_dropout_statistics(key):
    rate, n = 0.4, 200_000
    noise = np.asarray(jax.jit(lambda k: variants.gaussian_dropout(k, jnp.ones(n), rate))(key), np.float64)
    variance = rate / (1 - rate)  # Keras's GaussianDropout: N(1, rate / (1 - rate))
    # The mean of n normals with this variance: standard error sqrt(variance / n).
    assert abs(noise.mean() - 1.0) < 5 * math.sqrt(variance / n)
    # The sample variance of normals: standard error variance * sqrt(2 / (n - 1)).
    assert abs(noise.var() - variance) < 5 * variance * math.sqrt(2 / (n - 1))


def test_gaussian_dropout_keeps_no_noise_residual(key):
    x = normal_input((256, 64))
    for fn, rate in [
        (variants.gaussian_dropout, 0.3),
        (variants.gaussian_noise, 0.3),
        (variants.gaussian_dropout, jnp.float32(0.3)),
    ]:
        # The residuals are the leaves of the vjp function; eval_shape lists them without running anything.
        vjp = jax.eval_shape(lambda v, f=fn, r=rate: jax.vjp(lambda u: f(key, u, r), v)[1], x)
        # The backward pass draws the noise again from the key: nothing per element is kept.
        assert all(math.prod(leaf.shape) <= 2 for leaf in jax.tree_util.tree_leaves(vjp))


def test_gaussian_noise_formula_and_statistics(key):
    stddev, n = 0.5, 200_000
    x = normal_input((n,))
    fn = jax.jit(lambda k, v, s: variants.gaussian_noise(k, v, s))
    y = fn(key, x, stddev)
    z = standard_normal(key, (n,))
    np.testing.assert_allclose(y, x + stddev * z, rtol=1e-6, atol=1e-6)
    added = np.asarray(y - x, np.float64)
    # n normals with variance stddev^2: 5 standard errors of their mean and of their variance.
    assert abs(added.mean()) < 5 * stddev / math.sqrt(n)
    assert abs(added.var() - stddev**2) < 5 * stddev**2 * math.sqrt(2 / (n - 1))
    np.testing.assert_array_equal(grad_of(lambda v: fn(key, v, stddev), x[:10]), grad_of(lambda v: v, x[:10]))
    np.testing.assert_array_equal(variants.gaussian_noise(None, x, stddev, deterministic=True), x)
    assert bool(jnp.all(jnp.isnan(fn(key, x[:3], jnp.float32(-1.0)))))  # a traced invalid stddev poisons


def test_gaussian_variants_errors(key):
    x = jnp.ones((3, 2))
    with pytest.raises(ValueError, match=r"\[0, 1\) for Gaussian dropout"):
        variants.gaussian_dropout(key, x, 1.0)
    with pytest.raises(ValueError, match="rate"):
        variants.gaussian_dropout(key, x, -0.5)
    with pytest.raises(ValueError, match="stddev"):
        variants.gaussian_noise(key, x, -0.5)
    with pytest.raises(ValueError, match="stddev"):
        variants.gaussian_noise(key, x, float("inf"))
    with pytest.raises(TypeError, match="floating"):
        variants.gaussian_noise(key, jnp.ones(3, jnp.int32), 0.1)
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        variants.gaussian_dropout(None, x, 0.1)
    with pytest.raises(TypeError, match="PRNG key"):
        variants.gaussian_noise(0, x, 0.1)
    rates = jnp.array([0.3, 1.0, -0.1])
    outputs = jax.jit(jax.vmap(lambda r: variants.gaussian_dropout(key, x, r)))(rates)
    assert not np.isnan(outputs[0]).any() and np.isnan(outputs[1:]).all()


# --------------------------------------------------------------------------------------- DropConnect


def test_dropconnect_per_example_masks_under_vmap(key):
    rate, batch, d_in, d_out = 0.5, 5, 6, 4
    w = normal_input((d_in, d_out))
    xs = normal_input((batch, d_in), seed=2)

    @jax.jit
    def run(w, xs):
        keys = jdrop.example_keys(key, batch)
        weight_masks = jax.vmap(lambda k: jdrop.keep_mask(k, (d_in, d_out), rate))(keys)

        def layer(w, xs):
            return jax.vmap(lambda k, xi: xi @ variants.dropconnect(k, w, rate))(keys, xs)

        def naive(w, xs):
            return jnp.einsum("bi,bio->bo", xs, jnp.where(weight_masks, w / 0.5, 0.0))

        outputs = layer(w, xs), naive(w, xs)
        grads = grad_of(layer, w, xs, argnums=(0, 1)), grad_of(naive, w, xs, argnums=(0, 1))
        classic = (
            variants.dropconnect(key, w, rate, scale="classic"),
            jnp.where(jdrop.keep_mask(key, w.shape, rate), w, 0.0),
        )
        return weight_masks, outputs, grads, classic

    weight_masks, outputs, grads, classic = run(w, xs)
    np.testing.assert_allclose(*outputs, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(weight_masks[0], weight_masks[1])  # each example its own mask
    for ours, reference in zip(*grads):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(*classic)  # the paper's training rule: M * W
    np.testing.assert_allclose(variants.dropconnect(None, w, rate, scale="classic", deterministic=True), 0.5 * w)


def test_dropconnect_moments_match_sampled_masks(key):
    scale = "inverted"  # "classic" moments are checked against the paper's formula below
    rate, samples, d_in, d_out = 0.3, 4000, 8, 3
    w = normal_input((d_in, d_out))
    x = normal_input((2, d_in), seed=2)
    keys = jdrop.example_keys(key, samples)
    outputs = jax.jit(jax.vmap(lambda k: x @ variants.dropconnect(k, w, rate, scale=scale)))(keys)
    mean, variance = variants.dropconnect_moments(x, w, rate, scale=scale)
    sample_mean = np.asarray(outputs, np.float64).mean(0)
    sample_var = np.asarray(outputs, np.float64).var(0)
    # The mean of `samples` draws with this variance: standard error sqrt(variance / samples).
    np.testing.assert_array_less(np.abs(sample_mean - mean), 5 * np.sqrt(variance / samples))
    # Sample variance: standard error sqrt((mu4 - sigma^4) / samples), mu4 estimated from the draws.
    centred = np.asarray(outputs, np.float64) - sample_mean
    spread = np.sqrt((np.mean(centred**4, 0) - sample_var**2) / samples)
    np.testing.assert_array_less(np.abs(sample_var - variance), 5 * spread)


def test_dropconnect_predict_gaussian_average(key):
    rate, samples = 0.4, 20_000
    w = normal_input((6, 3))
    x = normal_input((6,), seed=2)
    bias = jnp.array([0.1, -0.2, 0.3])
    predict = jax.jit(
        lambda k: variants.dropconnect_predict(
            k, x, w, rate, activation=jax.nn.relu, num_samples=samples, bias=bias, scale="classic"
        )
    )
    y = predict(key)
    mean, variance = variants.dropconnect_moments(x, w, rate, bias=bias, scale="classic")
    keep = realised_keep(rate)
    np.testing.assert_allclose(mean, keep * (x @ w) + bias, rtol=1e-5)  # Wan et al.: N(p W v, p (1 - p) (W*W)(v*v))
    np.testing.assert_allclose(variance, keep * (1 - keep) * (x**2 @ w**2), rtol=1e-5)
    # Naive reference with the same normals.
    z = standard_normal(key, (samples, 3))
    np.testing.assert_allclose(y, jnp.mean(jax.nn.relu(mean + jnp.sqrt(variance) * z), 0), rtol=1e-5, atol=1e-6)
    # E[relu(u)] for u ~ N(mu, s^2) is mu Phi(mu / s) + s phi(mu / s); relu(u) has variance <= E[u^2].
    sigma = np.sqrt(np.asarray(variance, np.float64))
    mu = np.asarray(mean, np.float64)
    ratio = mu / sigma
    phi = np.exp(-0.5 * ratio**2) / math.sqrt(2 * math.pi)
    Phi = 0.5 * (1 + np.vectorize(math.erf)(ratio / math.sqrt(2)))
    exact = mu * Phi + sigma * phi
    np.testing.assert_array_less(np.abs(np.asarray(y) - exact), 5 * np.sqrt((mu**2 + sigma**2) / samples))
    with pytest.raises(ValueError, match="compatible"):
        variants.dropconnect_moments(x, w.T, rate)
    with pytest.raises(ValueError, match="num_samples"):
        variants.dropconnect_predict(key, x, w, rate, activation=jnp.tanh, num_samples=0)
    with pytest.raises(TypeError, match="w"):
        variants.dropconnect(key, jnp.ones((2, 2), jnp.int32), rate)


# --------------------------------------------------------------------------------------- DropBlock


def dropblock_reference(x, centres_kept, block, channel_axis=-1):
    """Naive DropBlock with the given centre draws: loops over dropped centres, numpy, (B, H, W, C) layout."""
    x = np.moveaxis(np.asarray(x, np.float64), channel_axis, -1)
    centres_kept = np.moveaxis(np.asarray(centres_kept), channel_axis, -1)
    _, height, width, _ = x.shape
    bh, bw = min(block, height), min(block, width)
    kept = np.ones(centres_kept.shape)
    for b, i, j, c in zip(*np.nonzero(~centres_kept)):
        # Valid centres: the whole block inside the map (the reference's clip mask).
        if bh // 2 <= i < height - (bh - 1) // 2 and bw // 2 <= j < width - (bw - 1) // 2:
            kept[b, i - bh // 2 : i + (bh - 1) // 2 + 1, j - bw // 2 : j + (bw - 1) // 2 + 1, c] = 0
    y = x * kept * kept.size / kept.sum()
    return np.moveaxis(y, -1, channel_axis)


def dropblock_gamma(rate, block, height, width):
    bh, bw = min(block, height), min(block, width)
    return rate * height * width / (bh * bw) / ((height - bh + 1) * (width - bw + 1))


@pytest.mark.parametrize(
    "block, couple, shape, channel_axis",
    [
        (3, True, (4, 9, 8, 3), -1),
        (4, True, (4, 9, 8, 3), -1),  # even block: SAME padding, centre at offset block // 2
        (3, False, (4, 3, 9, 8), 1),  # per-channel masks (the TF reference), PyTorch layout
        (20, True, (2, 6, 5, 2), -1),  # block clipped to the map
    ],
)
def test_dropblock_matches_naive_reference(key, block, couple, shape, channel_axis):
    rate = 0.3
    x = positive_input(shape)
    fn = jax.jit(lambda k, v: variants.dropblock(k, v, rate, block, channel_axis=channel_axis, couple_channels=couple))
    y = fn(key, x)
    height, width = [size for axis, size in enumerate(shape) if axis not in (0, channel_axis % 4)]
    gamma = min(dropblock_gamma(rate, block, height, width), 1.0)
    mask_shape = tuple(1 if couple and axis == channel_axis % 4 else s for axis, s in enumerate(shape))
    centres_kept = np.broadcast_to(keep_mask(key, mask_shape, gamma), mask_shape)
    reference = dropblock_reference(x, centres_kept, block, channel_axis)
    np.testing.assert_allclose(y, reference, rtol=1e-5)
    assert np.any(reference == 0) and np.any(reference != 0)
    if couple:
        kept = np.asarray(y != 0)
        assert np.all(kept == np.take(kept, [0], axis=channel_axis))
    if block == 4:  # the gradient (autodiff through the checkpointed mask), once
        scale = jnp.asarray(reference / np.asarray(x), jnp.float32)
        np.testing.assert_allclose(grad_of(lambda v: fn(key, v), x), grad_of(lambda v: v * scale, x), rtol=1e-5)


def test_dropblock_statistics(key):
    rate, block, batch, size = 0.15, 5, 256, 20
    y = jax.jit(lambda k: variants.dropblock(k, jnp.ones((batch, size, size, 1)), rate, block))(key)
    # Ones in, so the output's mean is exactly 1: the count / kept normalisation keeps the total.
    assert abs(float(jnp.mean(y)) - 1.0) < 1e-5
    # Exact expected kept fraction: position (i, j) survives iff none of the n_i * n_j valid centres whose
    # block covers it is dropped, probability (1 - gamma)^(n_i n_j).
    gamma = dropblock_gamma(rate, block, size, size)
    centres = np.arange(size)
    valid = (centres >= block // 2) & (centres < size - (block - 1) // 2)
    covering = np.array(
        [np.sum(valid & (centres - block // 2 <= i) & (i <= centres + (block - 1) // 2)) for i in range(size)]
    )
    expected_kept = np.mean((1 - gamma) ** np.outer(covering, covering))
    assert abs(expected_kept - (1 - rate)) < 0.05  # the paper's gamma targets `rate` (overlaps make it inexact)
    # Positions sharing no centre are independent; each shares centres with at most (2 block - 1)^2 positions,
    # so Var(sum of N kept indicators) <= N (2 block - 1)^2 / 4: 5 sigma of the mean.
    n = batch * size * size
    kept_fraction = float(jnp.mean(y != 0))
    assert abs(kept_fraction - expected_kept) < 5 * (2 * block - 1) / (2 * math.sqrt(n))


def test_dropblock_edge_cases_and_errors(key):
    x = positive_input((2, 6, 6, 3))
    np.testing.assert_array_equal(variants.dropblock(None, x, 0.3, 3, deterministic=True), x)
    np.testing.assert_array_equal(variants.dropblock(key, x, 0.0, 3), x)
    fn = jax.jit(lambda k, v, r: variants.dropblock(k, v, r, 3))
    np.testing.assert_array_equal(fn(key, x, 1.0), jnp.zeros_like(x))  # rate 1 drops everything
    np.testing.assert_array_equal(grad_of(lambda v: fn(key, v, 1.0), x), jnp.zeros_like(x))
    assert bool(jnp.all(jnp.isnan(fn(key, x, jnp.float32(1.5)))))  # a traced invalid rate poisons
    single = jax.jit(jax.vmap(lambda k, v: variants.dropblock(k, v, 0.3, 3, batch_axis=None)))(
        jdrop.example_keys(key, 2), x
    )
    assert single.shape == x.shape
    with pytest.raises(ValueError, match="rank 4"):
        variants.dropblock(key, jnp.ones((6, 6, 3)), 0.1, 3)
    with pytest.raises(ValueError, match="block_size"):
        variants.dropblock(key, x, 0.1, 0)
    with pytest.raises(TypeError, match="block_size"):
        variants.dropblock(key, x, 0.1, 2.5)
    with pytest.raises(ValueError, match="rate"):
        variants.dropblock(key, x, 2.0, 3)
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        variants.dropblock(None, x, 0.1, 3)


# --------------------------------------------------------------------------------------- Monte-Carlo prediction


def mc_model(params, x, *, key, train):
    """A one-hidden-layer network with dropout, in the jdrop convention."""
    hidden = jdrop.dropout(key, jnp.tanh(x @ params["w1"]), params["rate"], deterministic=not train)
    return hidden @ params["w2"]


def mc_params(rate=0.5):
    return {"w1": normal_input((4, 16), seed=5), "w2": normal_input((16, 3), seed=6), "rate": rate}


def test_mc_predict_regression_matches_naive_and_chunking(key):
    params, x, samples = mc_params(), normal_input((5, 4), seed=7), 30

    @jax.jit
    def run(k):
        naive = jax.vmap(lambda sample_key: mc_model(params, x, key=sample_key, train=True))(
            jdrop.example_keys(k, samples)
        )
        whole = variants.mc_predict(mc_model, params, x, k, samples)
        return naive, whole, variants.mc_predict(mc_model, params, x, k, samples, chunk_size=7)

    outputs, whole, chunked = run(key)
    outputs = np.asarray(outputs, np.float64)
    assert isinstance(whole, variants.RegressionPrediction)
    for prediction in (whole, chunked):  # 30 = 4 chunks of 7 + 2: same samples, same statistics
        np.testing.assert_allclose(prediction.mean, outputs.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(prediction.variance, outputs.var(0), rtol=1e-4, atol=1e-6)


def test_mc_predict_classification_entropy_and_bald(key):
    params, x, samples = mc_params(), normal_input((5, 4), seed=7), 24

    @jax.jit
    def run(k):
        logits = jax.vmap(lambda sample_key: mc_model(params, x, key=sample_key, train=True))(
            jdrop.example_keys(k, samples)
        )
        # 24 samples = 4 chunks of 5 in the scan + a remainder of 4 (unchunked is tested for regression).
        prediction = variants.mc_predict(mc_model, params, x, k, samples, task="classification", chunk_size=5)
        certain = variants.mc_predict(mc_model, mc_params(0.0), x, k, 3, task="classification")
        return jax.nn.softmax(logits, -1), prediction, certain

    probs, prediction, certain = run(key)
    probs = np.asarray(probs, np.float64)
    mean = probs.mean(0)
    entropy = -np.sum(mean * np.log(mean), -1)
    expected_entropy = np.mean(-np.sum(probs * np.log(probs), -1), 0)
    np.testing.assert_allclose(prediction.probs, mean, rtol=1e-5)
    np.testing.assert_allclose(prediction.predictive_entropy, entropy, rtol=1e-5)
    np.testing.assert_allclose(prediction.mutual_information, entropy - expected_entropy, rtol=1e-4, atol=1e-6)
    assert np.all(entropy - expected_entropy > 0)  # dropout disagreement: positive BALD scores
    np.testing.assert_allclose(certain.mutual_information, 0.0, atol=1e-6)


def test_mc_predict_per_example_keys_and_errors(key):
    params, x, samples = mc_params(), normal_input((5, 4), seed=7), 6

    def sample(sample_key):
        example_keys = jdrop.example_keys(sample_key, 5)
        return jax.vmap(lambda xi, ki: mc_model(params, xi, key=ki, train=True))(x, example_keys)

    @jax.jit
    def run(k):
        prediction = variants.mc_predict(mc_model, params, x, k, samples, batch_axis=0)
        return prediction, jax.vmap(sample)(jdrop.example_keys(k, samples))

    prediction, outputs = run(key)
    np.testing.assert_allclose(prediction.mean, outputs.mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="task"):
        variants.mc_predict(mc_model, params, x, key, 4, task="ranking")
    with pytest.raises(ValueError, match="num_samples"):
        variants.mc_predict(mc_model, params, x, key, 0)
    with pytest.raises(ValueError, match="chunk_size"):
        variants.mc_predict(mc_model, params, x, key, 4, chunk_size=-1)
    with pytest.raises(TypeError, match="apply_fn"):
        variants.mc_predict("model", params, x, key, 4)


def test_mc_predict_chunks_bound_memory(key):
    params, x, samples = mc_params(), normal_input((256, 4), seed=7), 512

    def temp_bytes(chunk_size):
        fn = jax.jit(lambda k: variants.mc_predict(mc_model, params, x, k, samples, chunk_size=chunk_size))
        return fn.lower(key).compile().memory_analysis().temp_size_in_bytes

    # All samples at once hold samples x 256 x 16 hidden activations; chunks of 16 hold 1/32 of that.
    assert temp_bytes(16) * 8 < temp_bytes(None)


# --------------------------------------------------------------------------------------- R-Drop


def test_symmetric_kl_formula():
    a, b = normal_input((6, 5), seed=1), normal_input((6, 5), seed=2)
    p, q = np.asarray(jax.nn.softmax(a), np.float64), np.asarray(jax.nn.softmax(b), np.float64)
    naive = 0.5 * (np.sum(p * np.log(p / q), -1) + np.sum(q * np.log(q / p), -1))
    kl = jax.jit(variants.symmetric_kl, static_argnames="axis")
    np.testing.assert_allclose(kl(a, b), naive, rtol=1e-5)
    np.testing.assert_allclose(kl(a, a), 0.0, atol=1e-7)
    np.testing.assert_allclose(kl(a.T, b.T, axis=0), naive, rtol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        variants.symmetric_kl(a, b[:2])


def test_rdrop_loss_two_passes_and_gradient(key):
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
            * (jnp.take_along_axis(log_p, labels[:, None], 1) + jnp.take_along_axis(log_q, labels[:, None], 1))[:, 0]
        )
        kl = 0.5 * jnp.sum(jnp.exp(log_p) * (log_p - log_q) + jnp.exp(log_q) * (log_q - log_p), -1)
        return jnp.mean(cross_entropy + alpha * kl)

    def loss(p):
        return variants.rdrop_loss(model, p, x, labels, key, alpha=alpha)

    @jax.jit
    def run(p):
        without_dropout = variants.rdrop_loss(model, mc_params(0.0), x, labels, key, alpha=alpha)
        logits = jnp.tanh(x @ p["w1"]) @ p["w2"]
        # Without dropout the two passes agree: R-Drop reduces to the cross-entropy.
        plain = jdrop.softmax_cross_entropy(logits, labels)
        return jax.value_and_grad(loss)(p), jax.value_and_grad(naive)(p), (without_dropout, plain)

    (value, grads), (naive_value, naive_grads), deterministic = run(params)
    np.testing.assert_allclose(value, naive_value, rtol=1e-5)
    for name in ("w1", "w2"):
        np.testing.assert_allclose(grads[name], naive_grads[name], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(*deterministic, rtol=1e-5)
    with pytest.raises(TypeError, match="labels"):
        variants.rdrop_loss(model, params, x, labels.astype(jnp.float32), key)
    with pytest.raises(ValueError, match="leading"):
        variants.rdrop_loss(model, params, x, labels[:3], key)
    with pytest.raises(ValueError, match="alpha"):
        variants.rdrop_loss(model, params, x, labels, key, alpha=-1.0)


# --------------------------------------------------------------------------------------- concrete dropout


def concrete_reference(x, u, rate_logit, temperature, eps=1e-7):
    """Gal et al. 2017's relaxed dropout as the reference implementation writes it."""
    p = jax.nn.sigmoid(rate_logit)
    logit = jnp.log(p + eps) - jnp.log(1 - p + eps) + jnp.log(u + eps) - jnp.log(1 - u + eps)
    return x * (1 - jax.nn.sigmoid(logit / temperature)) / (1 - p)


def test_concrete_dropout_formula_and_gradients(key):
    x, logit, temperature = normal_input((30, 20)), jnp.float32(-1.0), 0.1
    per_feature = jnp.linspace(-2.0, 2.0, 20)  # one learnable rate per feature

    @jax.jit
    def run(x, logit):
        u = masks.uniform_from_bits(masks.random_bits(key, x.shape))

        def ours(v, l):
            return variants.concrete_dropout(key, v, l, temperature=temperature)

        def naive(v, l):
            return concrete_reference(v, u, l, temperature)

        outputs = [(ours(x, l), naive(x, l)) for l in (logit, per_feature)]
        return outputs, grad_of(ours, x, logit, argnums=(0, 1)), grad_of(naive, x, logit, argnums=(0, 1))

    outputs, grads, naive_grads = run(x, logit)
    for got, expected in outputs:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, naive_grads):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(variants.concrete_dropout(None, x, logit, deterministic=True), x)


def test_concrete_dropout_cold_limit_is_dropout(key):
    rate, n = 0.3, 100_000
    logit = jnp.float32(math.log(rate / (1 - rate)))
    y = np.asarray(jax.jit(lambda k: variants.concrete_dropout(k, jnp.ones(n), logit, temperature=1e-3))(key))
    dropped = y < 0.5
    # At low temperature the relaxed mask is nearly binary: 0 or 1 / (1 - p).
    assert np.mean(np.abs(y[~dropped] * (1 - rate) - 1) < 1e-2) > 0.99
    # n independent Bernoulli(rate) drops: 5 sigma of their mean.
    assert abs(dropped.mean() - rate) < five_sigma_fraction(n, rate)


def test_concrete_dropout_regulariser_formula():
    logit, kernel = jnp.float32(0.4), normal_input((6, 3))
    p = float(jax.nn.sigmoid(logit))
    value = variants.concrete_dropout_regulariser(logit, kernel, 6, weight_regulariser=0.01, dropout_regulariser=0.2)
    expected = 0.01 * float(jnp.sum(kernel**2)) / (1 - p) + 0.2 * 6 * (p * math.log(p) + (1 - p) * math.log(1 - p))
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    # The entropy term alone pulls p towards 1/2.
    entropy_grad = jax.grad(
        lambda l: variants.concrete_dropout_regulariser(l, kernel, 6, weight_regulariser=0.0, dropout_regulariser=1.0)
    )
    assert entropy_grad(jnp.float32(-1.0)) < 0 < entropy_grad(jnp.float32(1.0))
    with pytest.raises(ValueError, match="scalar"):
        variants.concrete_dropout_regulariser(jnp.zeros(3), kernel, 6, weight_regulariser=0.1, dropout_regulariser=0.1)
    with pytest.raises(ValueError, match="weight_regulariser"):
        variants.concrete_dropout_regulariser(logit, kernel, 6, weight_regulariser=-1.0, dropout_regulariser=0.1)


def concrete_learned_rate(n, signal, init_rate, steps=200):
    """Fits a linear model behind a concrete dropout layer (MSE + regulariser, Adam); returns the learned rate.

    Traceable: call it under ``jit``.
    """
    import optax

    rng = np.random.default_rng(0)
    d = 8
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    targets = x @ rng.standard_normal((d, 1)) if signal else rng.standard_normal((n, 1))
    y = jnp.asarray(targets, jnp.float32)
    params = {"w": jnp.zeros((d, 1)), "logit": jnp.float32(math.log(init_rate / (1 - init_rate)))}
    optimiser = optax.adam(0.05)

    def loss(p, k):
        prediction = variants.concrete_dropout(k, x, p["logit"]) @ p["w"]
        regulariser = variants.concrete_dropout_regulariser(
            p["logit"], p["w"], d, weight_regulariser=1.0 / n, dropout_regulariser=2.0 / n
        )
        return jnp.mean((prediction - y) ** 2) + regulariser

    def step(carry, k):
        p, state = carry
        updates, state = optimiser.update(jax.grad(loss)(p, k), state, p)
        return (optax.apply_updates(p, updates), state), None

    keys = jdrop.example_keys(jax.random.key(0), steps)
    return jax.nn.sigmoid(jax.lax.scan(step, (params, optimiser.init(params)), keys)[0][0]["logit"])


def test_concrete_dropout_learns_rate_in_right_direction():
    @jax.jit
    def learned_rates():
        # Plenty of noiseless data: dropout only adds prediction noise, so the rate falls (from 0.5).
        # Eight points of pure noise: nothing to fit, the regulariser wins and the rate rises (from 0.12).
        return concrete_learned_rate(1000, True, 0.5), concrete_learned_rate(8, False, 0.12)

    clean, noise = learned_rates()
    assert clean < 0.1 and noise > 0.25


def test_concrete_dropout_errors(key):
    with pytest.raises(ValueError, match="temperature"):
        variants.concrete_dropout(key, jnp.ones(3), 0.0, temperature=0.0)
    with pytest.raises(TypeError, match="rate_logit"):
        variants.concrete_dropout(key, jnp.ones(3), jnp.ones((), jnp.int32))
    with pytest.raises(TypeError, match="floating"):
        variants.concrete_dropout(key, jnp.ones(3, jnp.int32), 0.0)
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        variants.concrete_dropout(None, jnp.ones(3), 0.0)


# --------------------------------------------------------------------------------------- schedules


def test_schedules_values():
    steps = jnp.arange(12)
    np.testing.assert_allclose(jax.vmap(variants.constant_schedule(0.2))(steps), 0.2)
    warmup = jax.vmap(variants.linear_schedule(0.0, 0.4, 4, transition_begin=2))(steps)
    np.testing.assert_allclose(warmup, [0, 0, 0, 0.1, 0.2, 0.3, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4], atol=1e-7)
    decay = jax.vmap(variants.linear_schedule(0.5, 0.1, 8))(steps)
    np.testing.assert_allclose(decay, np.clip(0.5 - 0.05 * np.arange(12), 0.1, None), atol=1e-7)
    # Liu et al. 2023's drop_scheduler(mode="early"): np.full / np.linspace(rate, 0, cutoff) then zeros.
    early = jax.vmap(variants.early_dropout_schedule(0.1, 5))(steps)
    np.testing.assert_allclose(early, np.concatenate([np.full(5, 0.1), np.zeros(7)]), atol=1e-8)
    early_linear = jax.vmap(variants.early_dropout_schedule(0.1, 5, schedule="linear"))(steps)
    np.testing.assert_allclose(early_linear, np.concatenate([np.linspace(0.1, 0, 5), np.zeros(7)]), atol=1e-8)
    late = jax.vmap(variants.late_dropout_schedule(0.3, 4))(steps)
    np.testing.assert_allclose(late, np.concatenate([np.zeros(4), np.full(8, 0.3)]), atol=1e-8)


def test_schedules_drive_traced_rates_without_recompiling(key):
    schedule = variants.early_dropout_schedule(0.5, 3, schedule="linear")
    x = jnp.ones((64, 8))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(k, count):
        rate = schedule(count)
        return variants.feature_dropout(k, x, rate), variants.drop_path(k, x, rate), rate

    for count in range(5):
        y, path, rate = step(key, count)
        expected = float(schedule(count))
        np.testing.assert_allclose(rate, expected)
        if expected == 0.0:
            np.testing.assert_array_equal(y, x)
            np.testing.assert_array_equal(path, x)
        else:
            assert np.all((np.asarray(y) == 0) | np.isclose(y, 1 / (1 - expected), rtol=1e-5))


def test_schedules_errors():
    with pytest.raises(ValueError, match="init_rate"):
        variants.linear_schedule(1.5, 0.0, 10)
    with pytest.raises(ValueError, match="transition_steps"):
        variants.linear_schedule(0.1, 0.0, 0)
    with pytest.raises(ValueError, match="schedule"):
        variants.early_dropout_schedule(0.1, 10, schedule="cosine")
    with pytest.raises(ValueError, match="cutoff_step"):
        variants.early_dropout_schedule(0.1, -1)
    with pytest.raises(TypeError, match="step"):
        variants.constant_schedule(0.1)(jnp.zeros(3))


# --------------------------------------------------------------------------------------- all variants


def all_variants(key, x, rate):
    """Every variant with the input ``x`` of shape (B, H, W, C) and drop rate ``rate``."""
    return {
        "feature_dropout": variants.feature_dropout(key, x, rate),
        "drop_path": variants.drop_path(key, x, rate),
        "locked_dropout": variants.locked_dropout(key, x, rate, time_axis=1),
        "embedding_dropout": variants.embedding_dropout(key, x, rate),
        "zoneout": variants.zoneout(key, x, 2 * x, rate),
        "attention_dropout": variants.attention_dropout(key, x, rate),
        "alpha_dropout": variants.alpha_dropout(key, x, rate),
        "feature_alpha_dropout": variants.feature_alpha_dropout(key, x, rate),
        "gaussian_dropout": variants.gaussian_dropout(key, x, rate),
        "gaussian_noise": variants.gaussian_noise(key, x, rate),
        "dropconnect": variants.dropconnect(key, x, rate),
        "dropblock": variants.dropblock(key, x, rate, 3),
        "concrete_dropout": variants.concrete_dropout(key, x, rate),
    }


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_all_variants_preserve_dtype(key, dtype):
    x = positive_input((2, 6, 6, 4), dtype=dtype)
    # Tracing decides the dtypes: eval_shape checks them without compiling.
    for name, y in jax.eval_shape(all_variants, key, x, jnp.float32(0.3)).items():
        assert y.dtype == dtype and y.shape == x.shape, name


def test_float64_inputs_stay_float64(key, x64):
    x = positive_input((2, 6, 6, 4), dtype=jnp.float64)
    for name, y in jax.eval_shape(all_variants, key, x, 0.3).items():
        assert y.dtype == jnp.float64, name


def test_all_variants_compile_once_for_traced_rates(key):
    x = positive_input((2, 6, 6, 4))
    fn = jax.jit(chex.assert_max_traces(all_variants, n=1))
    for rate in (0.2, 0.6):  # traced: one compilation serves every rate
        for name, y in fn(key, x, jnp.float32(rate)).items():
            assert np.all(np.isfinite(y)), name


def test_public_names_are_documented():
    import importlib

    for name in variants.__all__:
        value = getattr(variants, name)
        assert value.__doc__ and value.__module__.startswith("jdrop.variants."), name
        # Module names never shadow the functions they hold (jdrop.variants.<name> is the function).
        assert importlib.import_module(value.__module__).__name__ != f"jdrop.variants.{name}", name
    functions = [getattr(variants, name) for name in variants.__all__ if name[0].islower() and "schedule" not in name]
    for fn in functions:
        assert "Args:" in fn.__doc__ or "Returns:" in fn.__doc__, fn.__name__
