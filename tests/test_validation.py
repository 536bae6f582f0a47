"""One rule, one checker, one wording: the same bad argument gets the same error from every function that takes it.

The checkers live in ``jdrop._validation``; each case here calls public functions (at trace time: nothing is
compiled) and checks the type and the wording of the error, so a second spelling of a rule shows up as a failure.
Per-function errors stay in that function's own test file; the rate/input/key matrix of every rate-taking op is
``tests/test_bad_inputs.py``.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import jdrop
from jdrop._validation import MissingKeyError
from jdrop.interop import equinox as jdrop_eqx

KEY = jax.random.key(0)
X = jnp.ones((2, 3, 4, 5))
Q = jnp.ones((1, 4, 2, 8))


@pytest.mark.parametrize(
    "call",
    [
        lambda: jdrop.dropout(None, X, 0.5),
        lambda: jdrop.dropblock(None, X, 0.5, 3),
        lambda: jdrop.gaussian_noise(None, X, 0.5),
        lambda: jdrop.concrete_dropout(None, X, 0.0),
        lambda: jdrop.dropconnect_predict(None, X, jnp.ones((5, 2)), 0.5, activation=jnp.tanh, num_samples=2),
        lambda: jdrop.dot_product_attention(Q, Q, Q, dropout_rate=0.1),
        lambda: jdrop_eqx.Dropout(0.5)(X),
    ],
    ids=["dropout", "dropblock", "gaussian_noise", "concrete_dropout", "dropconnect_predict", "attention", "equinox"],
)
def test_a_missing_key_is_one_error_with_one_wording(call):
    with pytest.raises(MissingKeyError, match=r"(?s)needs a PRNG `\w+` in training mode: pass \w+=jax\.random\.key"):
        call()


def test_missing_key_error_is_a_value_error_and_equinoxs_runtime_error():
    assert issubclass(MissingKeyError, ValueError) and issubclass(MissingKeyError, RuntimeError)
    with pytest.raises(RuntimeError):  # what equinox's own Dropout raises: code written for it keeps working
        eqx.nn.Dropout(0.5)(X)


@pytest.mark.parametrize(
    "call",
    [lambda: jdrop.example_keys(jax.random.split(KEY, 2), 3),
     lambda: jdrop.dropout(jax.random.split(KEY, 2), X, 0.5),
     lambda: jdrop.dot_product_attention(Q, Q, Q, dropout_rng=jax.random.split(KEY, 2), dropout_rate=0.1)],
    ids=["example_keys", "dropout", "attention"],
)
def test_a_key_array_for_one_key_is_one_error(call):
    with pytest.raises(ValueError, match=r"must be a single key \(shape \(\)\), got a key array of shape \(2,\); use"):
        call()


@pytest.mark.parametrize(
    "call, name",
    [(lambda v: jdrop.gaussian_noise(KEY, X, v), "stddev"),
     (lambda v: jdrop.concrete_dropout_regulariser(0.0, X, 3, weight_regulariser=v, dropout_regulariser=1.0),
      "weight_regulariser"),
     (lambda v: jdrop.concrete_dropout_regulariser(0.0, X, 3, weight_regulariser=1.0, dropout_regulariser=v),
      "dropout_regulariser")],
    ids=["gaussian_noise", "weight_regulariser", "dropout_regulariser"],
)
@pytest.mark.parametrize("value", [-1.0, float("inf"), float("nan")], ids=str)
def test_finite_and_nonnegative_is_one_error(call, name, value):
    with pytest.raises(ValueError, match=rf"`{name}` must be finite and >= 0, got {value!r}"):
        call(value)


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf")], ids=str)
def test_finite_and_positive_is_the_same_checker(value):
    with pytest.raises(ValueError, match=rf"`temperature` must be finite and > 0, got {value!r}"):
        jdrop.concrete_dropout(KEY, X, 0.0, temperature=value)


@pytest.mark.parametrize(
    "call",
    [lambda **a: jdrop.dot_product_attention(Q, Q, Q, **{"block_q": 2.5, **a}),
     lambda **a: jdrop.example_keys(KEY, **{"n": 2.5, **a}),
     lambda **a: jdrop.dropblock(KEY, X, 0.1, **{"block_size": 2.5, **a}),
     lambda **a: jdrop.dropconnect_predict(KEY, X, jnp.ones((5, 2)), 0.5, activation=jnp.tanh,
                                           **{"num_samples": 2.5, **a})],
    ids=["attention block_q", "example_keys n", "dropblock block_size", "dropconnect_predict num_samples"],
)
def test_a_non_int_size_is_a_type_error_a_small_one_a_value_error(call):
    with pytest.raises(TypeError, match=r"must be an int >= \d, got float 2.5"):
        call()


@pytest.mark.parametrize(
    "call",
    [lambda: jdrop.feature_dropout(KEY, X, 0.5, channel_axis=0),
     lambda: jdrop.feature_alpha_dropout(KEY, X, 0.5, channel_axis=0),
     lambda: jdrop.dropblock(KEY, X, 0.5, 3, channel_axis=0)],
    ids=["feature_dropout", "feature_alpha_dropout", "dropblock"],
)
def test_batch_and_channel_axes_must_differ_one_wording(call):
    with pytest.raises(ValueError, match=r"`batch_axis` and `channel_axis` must differ, both are dim 0 of a rank-4"):
        call()


def test_deterministic_must_be_a_static_bool_in_attention_as_in_the_core():
    for call in (lambda d: jdrop.dropout(None, X, 0.5, deterministic=d),
                 lambda d: jdrop.dot_product_attention(Q, Q, Q, deterministic=d)):
        with pytest.raises(TypeError, match=r"`deterministic` must be a Python bool \(static\), got ndarray\. Choose"):
            call(jnp.ones((), bool).__array__())


def test_callables_one_wording():
    with pytest.raises(TypeError, match=r"`activation` must be callable, got int 3"):
        jdrop.dropconnect_predict(KEY, X, jnp.ones((5, 2)), 0.5, activation=3, num_samples=2)
