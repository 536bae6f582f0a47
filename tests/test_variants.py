"""Tests for the jdrop.variants package face: every variant at once (dtypes, float64, one compilation for traced
rates) and the documentation of every public name. Each variant's own behaviour is tested in
tests/test_variants_<module>.py, one file per module of jdrop/variants.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import FLOAT_DTYPES, positive_input, realised_keep

from jdrop import variants


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
    outputs = jax.eval_shape(all_variants, key, x, jnp.float32(0.3))
    chex.assert_trees_all_equal_shapes_and_dtypes(outputs, dict.fromkeys(outputs, x))


def test_float64_inputs_stay_float64(key, x64):
    x = positive_input((2, 6, 6, 4), dtype=jnp.float64)
    outputs = jax.eval_shape(all_variants, key, x, 0.3)
    chex.assert_trees_all_equal_dtypes(outputs, dict.fromkeys(outputs, x))


def test_all_variants_compile_once_for_traced_rates(key):
    x = positive_input((2, 6, 6, 4))
    fn = jax.jit(chex.assert_max_traces(all_variants, n=1))
    for rate in (0.2, 0.6):  # traced: one compilation serves every rate
        for name, y in fn(key, x, jnp.float32(rate)).items():
            assert np.all(np.isfinite(y)), name


# The variants that are a Bernoulli mask and a scale: ``scale=`` means there what it means in jdrop.dropout.
BERNOULLI = {
    "feature_dropout": lambda k, x, r, **o: variants.feature_dropout(k, x, r, **o),
    "drop_path": lambda k, x, r, **o: variants.drop_path(k, x, r, **o),
    "locked_dropout": lambda k, x, r, **o: variants.locked_dropout(k, x, r, time_axis=1, **o),
    "embedding_dropout": lambda k, x, r, **o: variants.embedding_dropout(k, x, r, **o),
    "attention_dropout": lambda k, x, r, **o: variants.attention_dropout(k, x, r, **o),
    "dropconnect": lambda k, x, r, **o: variants.dropconnect(k, x, r, **o),
}


def test_scale_is_one_option_for_every_bernoulli_variant(key):
    # classic = inverted * keep in training (the same mask), keep * x at evaluation, inverted's identity.
    x, rate = positive_input((2, 6, 6, 4)), 0.3

    @jax.jit
    def run(key, x):
        return {name: (fn(key, x, rate), fn(key, x, rate, scale="classic"),
                       fn(None, x, rate, scale="classic", deterministic=True))
                for name, fn in BERNOULLI.items()}

    keep = float(realised_keep(rate))
    for name, (inverted, classic, evaluation) in run(key, x).items():
        np.testing.assert_allclose(classic, inverted * keep, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(evaluation, x * keep, rtol=1e-6, err_msg=name)
        np.testing.assert_array_equal(BERNOULLI[name](None, x, rate, deterministic=True), x)


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
