"""Tests for jdrop.variants.stochastic_depth (drop_path, drop_path_rates): one keep draw per example against
``keep_mask(key, shape, rate, broadcast_dims=non-batch axes)``, timm's ``drop_path`` formula (scale_by_keep) and
``torch.linspace`` depth rule, statistics, rate 1 and argument errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import bernoulli_mean_tolerance, grad_of, keep_mask, positive_input, realised_keep

import jdrop
from jdrop import variants


def test_drop_path_formula_and_gradient(variant):
    """timm's formula and its gradient, with and without jit."""
    key = jax.random.key(0)
    rate, shape = 0.4, (64, 3, 5)
    x = positive_input(shape)
    mask = keep_mask(key, shape, rate, broadcast_dims=(1, 2))
    for scale_by_keep, factor in [(True, 1 / realised_keep(rate)), (False, 1.0)]:
        fn = variant(lambda k, v, s=scale_by_keep: variants.drop_path(k, v, rate, scale_by_keep=s))
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
    assert abs(float(jnp.mean(y[:, 0] == 0)) - rate) < bernoulli_mean_tolerance(batch, rate)
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


def test_drop_path_rates_are_python_floats_as_timm_builds_them():
    rates = variants.drop_path_rates(0.3, 12)
    assert isinstance(rates, tuple) and len(rates) == 12 and all(type(rate) is float for rate in rates)
    # timm: [x.item() for x in torch.linspace(0, drop_path_rate, depth)] (float32); ours are float64.
    np.testing.assert_allclose(rates, np.linspace(0.0, 0.3, 12), rtol=1e-15, atol=0)
    assert rates[0] == 0.0 and rates[-1] == 0.3
    assert variants.drop_path_rates(0.3, 1) == (0.0,) and variants.drop_path_rates(0.3, 0) == ()

    # timm's idiom inside a jitted module: float(rates[l]) of a static max_rate is a Python float under jit.
    @jax.jit
    def blocks(key, h):
        rates = variants.drop_path_rates(0.6, 4)
        for layer in range(4):
            h = h + variants.drop_path(jax.random.fold_in(key, layer), h, float(rates[layer]), batch_axis=0)
        return h

    assert blocks(jax.random.key(0), jnp.ones((8, 3))).shape == (8, 3)
    traced = jax.jit(lambda r: jnp.stack(variants.drop_path_rates(r, 4)))(jnp.float32(0.6))
    np.testing.assert_allclose(traced, [0.0, 0.2, 0.4, 0.6], rtol=1e-6)
    with pytest.raises(ValueError, match="max_rate"):
        variants.drop_path_rates(1.5, 4)
    with pytest.raises(ValueError, match="depth"):
        variants.drop_path_rates(0.1, -1)


def test_drop_path_scale_classic_is_the_papers_rule_and_scale_by_keep_timms_alias(key):
    rate, x = 0.4, positive_input((64, 3))
    mask = keep_mask(key, x.shape, rate, broadcast_dims=(1,))
    keep = float(realised_keep(rate))
    run = jax.jit(lambda k, v: [variants.drop_path(k, v, rate, scale="classic"),
                                variants.drop_path(k, v, rate, scale_by_keep=True),
                                variants.drop_path(k, v, rate)])
    classic, timm_scaled, inverted = run(key, x)
    np.testing.assert_allclose(classic, np.where(mask, x, 0.0), rtol=1e-6)
    np.testing.assert_array_equal(timm_scaled, inverted)
    # Huang et al. 2016 scale the branch by its survival probability at test time; timm's unscaled branch does not.
    np.testing.assert_allclose(variants.drop_path(None, x, rate, scale="classic", deterministic=True), x * keep,
                               rtol=1e-6)
    np.testing.assert_array_equal(variants.drop_path(None, x, rate, scale_by_keep=False, deterministic=True), x)
    with pytest.raises(ValueError, match="pass `scale` or its alias `scale_by_keep`, not both"):
        variants.drop_path(key, x, rate, scale="classic", scale_by_keep=False)


def test_drop_path_errors(key):
    with pytest.raises(ValueError, match="batch_axis"):
        variants.drop_path(key, jnp.ones(()), 0.1, batch_axis=0)
    with pytest.raises(TypeError, match="batch_axis"):
        variants.drop_path(key, jnp.ones((2, 3)), 0.1, batch_axis="batch")
    with pytest.raises(TypeError, match="scale_by_keep"):
        variants.drop_path(key, jnp.ones((2, 3)), 0.1, scale_by_keep="yes")


# timm.layers.drop_path(x, drop_prob, training=True, scale_by_keep=True), in float64 numpy:
#   keep_prob = 1 - drop_prob; random_tensor = bernoulli(keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
#   random_tensor /= keep_prob if scale_by_keep; return x * random_tensor
# with jdrop's Bernoulli draw (keep_mask of the same key and shape) for timm's. jdrop divides by the realised keep
# probability (within 2**-23 of 1 - rate, relative) and rounds the scale and the product to float32 (2**-24 each):
# rtol = 2**-23 + 2 * 2**-24 = 2**-22.
TIMM_RTOL = 2.0**-22


def timm_drop_path(x, keep, drop_prob, scale_by_keep=True):
    """timm's drop_path in float64, its per-sample Bernoulli draws given as ``keep`` (shape (B,))."""
    keep_prob = 1.0 - drop_prob
    random_tensor = np.asarray(keep, np.float64).reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor = random_tensor / keep_prob
    return np.asarray(x, np.float64) * random_tensor


def test_drop_path_on_a_batch_is_timms_per_sample_drop_path(key):
    """Batched code, no argument: one draw per sample along axis 0, timm's mask of shape (B, 1, 1)."""
    rate, x = 0.3, positive_input((16, 5, 4))
    keep = keep_mask(key, (16,), rate)
    for scale_by_keep in (True, False):
        y = jax.jit(lambda k, v, s=scale_by_keep: variants.drop_path(k, v, rate, scale_by_keep=s))(key, x)
        np.testing.assert_allclose(y, timm_drop_path(x, keep, rate, scale_by_keep), rtol=TIMM_RTOL, atol=0)
        np.testing.assert_array_equal(y, variants.drop_path(key, x, rate, scale_by_keep=scale_by_keep, batch_axis=0))
    assert 0 < int(np.sum(keep)) < 16  # both cases occur with this key


def _block(params, x, *, key, deterministic):
    """A one-example residual block over a (T, C) sequence: h = x + drop_path(x @ w)."""
    return x + variants.drop_path(key, x @ params["w"], 0.5, deterministic=deterministic)


def test_drop_path_is_per_example_inside_per_example_mc_predict_and_train_step(key):
    """One-example code, no argument: inside jdrop's per-example tools a (T, C) example is one sample, so its
    branch is kept or dropped whole (timm's drop_path of the batch the vmap makes), never token by token."""
    n, length, width, rate = 8, 6, 3, 0.5
    x = positive_input((n, length, width))
    params = {"w": jnp.eye(width, dtype=jnp.float32) * 0.5}
    keys = jdrop.example_keys(key, n)
    keep = np.array([bool(keep_mask(k, (), rate)) for k in keys])
    branch = np.asarray(x, np.float64) * 0.5
    expected = np.asarray(x, np.float64) + timm_drop_path(branch, keep, rate)
    y = jax.jit(lambda p, v, k: jdrop.train.per_example(_block, p, v, k))(params, x, key)
    np.testing.assert_allclose(y, expected, rtol=TIMM_RTOL, atol=0)
    assert 0 < keep.sum() < n

    # mc_predict: sample s runs per_example with key example_keys(key, S)[s]; the mean is over those samples.
    samples = 4
    sample_keys = jdrop.example_keys(key, samples)
    expected_mean = np.mean([np.asarray(jdrop.train.per_example(_block, params, x, k)) for k in sample_keys], axis=0)
    mean = jdrop.mc_predict(_block, params, x, key, samples).mean
    np.testing.assert_allclose(mean, expected_mean, rtol=2 * TIMM_RTOL, atol=0)
    outputs = [np.asarray(jdrop.train.per_example(_block, params, x, k)) - np.asarray(x) for k in sample_keys]
    assert all(np.all((o == 0).all(axis=(1, 2)) | (o != 0).all(axis=(1, 2))) for o in outputs)

    # train_step: loss = sum of the outputs, SGD(1): dL/dw = sum_i sum_t x_it^T 1 * m_i / keep.
    import optax

    state = jdrop.TrainState.create(apply_fn=_block, params=params, tx=optax.sgd(1.0),
                                    loss_fn=lambda out, _: jnp.sum(out))
    new_state, _ = jdrop.train_step(state, {"x": x, "y": jnp.zeros(n)}, key)
    scale = keep / (1.0 - rate)
    grad = np.einsum("i,itc,d->cd", scale, np.asarray(x, np.float64), np.ones(width))
    # float32 sums of n * length = 48 terms of size <= 4: a relative error below 48 * 2**-24 per entry.
    np.testing.assert_allclose(new_state.params["w"], np.asarray(params["w"]) - grad, rtol=48 * 2.0**-24, atol=0)


def test_drop_path_batch_axis_zero_keeps_the_old_per_row_behaviour_inside_per_example(key):
    """batch_axis=0 is an explicit choice: inside per_example it treats the example's rows (tokens) as samples."""
    x = positive_input((4, 6, 3))

    def per_token(params, v, *, key, deterministic):
        return variants.drop_path(key, v, 0.5, deterministic=deterministic, batch_axis=0)

    y = jdrop.train.per_example(per_token, None, x, key)
    for i, k in enumerate(jdrop.example_keys(key, 4)):
        np.testing.assert_allclose(y[i], timm_drop_path(x[i], keep_mask(k, (6,), 0.5), 0.5), rtol=TIMM_RTOL)
    kept = np.asarray(y != 0)[..., 0]
    assert np.any(kept.any(axis=1) & ~kept.all(axis=1))  # some example mixes kept and dropped tokens


def test_batch_axis_auto_is_in_the_jit_cache_key(key):
    """A function jitted on its own and called outside and then inside per_example is traced once for each."""
    drop = jax.jit(lambda k, v: variants.drop_path(k, v, 0.5))
    x = positive_input((6, 3))
    outside = np.asarray(drop(key, x) != 0)[:, 0]
    assert outside.any() and not outside.all()  # one draw per row: a batch
    inside = jdrop.train.per_example(lambda p, v, *, key, deterministic: drop(key, v), None, jnp.stack([x] * 8), key)
    for example in np.asarray(inside != 0):
        assert example.all() or not example.any()  # one draw per example


def test_takes_batch_functions_get_the_batch_and_auto_stays_axis_zero(key):
    @jdrop.train.takes_batch
    def batched(params, v, *, key, deterministic):
        return variants.drop_path(key[0], v, 0.5)  # the whole batch: "auto" is its axis 0 here

    x = positive_input((8, 3))
    y = jdrop.train.per_example(batched, None, x, key)
    np.testing.assert_array_equal(y, variants.drop_path(jdrop.example_keys(key, 8)[0], x, 0.5, batch_axis=0))


@pytest.mark.parametrize("name", ["feature_dropout", "feature_alpha_dropout", "dropblock"])
def test_every_variant_with_a_batch_axis_is_per_example_inside_per_example(key, name):
    """feature_dropout, feature_alpha_dropout and dropblock: the default inside per_example is one example
    (batch_axis=None under a plain vmap), outside it a batch along axis 0 (batch_axis=0)."""
    op = getattr(variants, name)
    extra = (3,) if name == "dropblock" else ()
    x = positive_input((4, 6, 6, 5))

    def one(params, v, *, key, deterministic):
        return op(key, v, 0.3, *extra)

    keys = jdrop.example_keys(key, 4)
    inside = jdrop.train.per_example(one, None, x, key)
    expected = jax.vmap(lambda k, v: op(k, v, 0.3, *extra, batch_axis=None))(keys, x)
    np.testing.assert_array_equal(inside, expected)
    np.testing.assert_array_equal(op(key, x, 0.3, *extra), op(key, x, 0.3, *extra, batch_axis=0))
