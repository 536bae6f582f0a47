"""Tests for jdrop.train.mc_predict: Monte-Carlo dropout prediction (Gal & Ghahramani 2016) against a naive
``vmap`` over ``jdrop.example_keys``: regression mean and variance, classification entropy and BALD mutual
information, chunking, per-example keys, memory and errors.
"""

import chex
import jax
import numpy as np
import pytest
from _util import mc_model, mc_params, normal_input

import jdrop
from jdrop import train


class McPredictRegressionTest(chex.TestCase):
    """Regression mean and variance, whole and chunked, with and without jit (chex variants)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_mc_predict_regression_matches_naive_and_chunking(self):
        key = jax.random.key(0)
        params, x, samples = mc_params(), normal_input((5, 4), seed=7), 30

        @jax.jit  # the reference, jitted either way
        def naive(k):
            return jax.vmap(lambda sample_key: mc_model(params, x, key=sample_key, train=True))(
                jdrop.example_keys(k, samples)
            )

        def run(k):
            whole = train.mc_predict(mc_model, params, x, k, samples, batch_axis=None)
            return whole, train.mc_predict(mc_model, params, x, k, samples, chunk_size=7, batch_axis=None)

        whole, chunked = self.variant(run)(key)
        outputs = naive(key)
        outputs = np.asarray(outputs, np.float64)
        assert isinstance(whole, train.RegressionPrediction)
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
        prediction = train.mc_predict(mc_model, params, x, k, samples, task="classification", chunk_size=5,
                                      batch_axis=None)
        certain = train.mc_predict(mc_model, mc_params(0.0), x, k, 3, task="classification")
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
        prediction = train.mc_predict(mc_model, params, x, k, samples, batch_axis=0)
        return prediction, jax.vmap(sample)(jdrop.example_keys(k, samples))

    prediction, outputs = run(key)
    np.testing.assert_allclose(prediction.mean, outputs.mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="task"):
        train.mc_predict(mc_model, params, x, key, 4, task="ranking")
    with pytest.raises(ValueError, match="num_samples"):
        train.mc_predict(mc_model, params, x, key, 0)
    with pytest.raises(ValueError, match="chunk_size"):
        train.mc_predict(mc_model, params, x, key, 4, chunk_size=-1)
    with pytest.raises(TypeError, match="apply_fn"):
        train.mc_predict("model", params, x, key, 4)


def test_mc_predict_chunks_bound_memory(key):
    params, x, samples = mc_params(), normal_input((256, 4), seed=7), 512

    def temp_bytes(chunk_size):
        fn = jax.jit(lambda k: train.mc_predict(mc_model, params, x, k, samples, chunk_size=chunk_size))
        return fn.lower(key).compile().memory_analysis().temp_size_in_bytes

    # All samples at once hold samples x 256 x 16 hidden activations; chunks of 16 hold 1/32 of that.
    assert temp_bytes(16) * 8 < temp_bytes(None)


def test_old_names_under_variants_still_resolve():
    # mc_predict and rdrop_loss moved to the training layer; their names under jdrop.variants stay.
    from jdrop import variants

    for name in ("mc_predict", "rdrop_loss", "symmetric_kl", "RegressionPrediction", "ClassificationPrediction"):
        assert getattr(variants, name) is getattr(train, name) is getattr(jdrop, name)
    with pytest.raises(AttributeError):
        variants.no_such_variant  # noqa: B018
