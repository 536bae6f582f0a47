"""The bad-input matrix: every public rate-taking op (jdrop.dropout and each variant) rejects bad rates, inputs and
keys with the same clear error, at trace time, and never turns a bad rate into NaN or a silently different rate when
the rate is static.

Also: no NaN or inf, in outputs or gradients, for extreme valid rates in float16, bfloat16 and float32, and empty
and 0-d inputs work.

Where a bad-input case lives: a check that applies to every op in ``FUNCTIONS`` (rate range and type, non-float or
list input, key type, missing key, trace time) is tested here, once per op, and nowhere else; an error specific to
one function (its axes, ranks, block sizes, option names, other arguments) is tested in that function's own file
(tests/test_dropout.py, tests/test_variants_<module>.py). jdrop.dropout is the matrix's first row, the behaviour the
variants must share; test_dropout.py also checks its messages in full, for dropout_fwd and in eval mode.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import FLOAT_DTYPES

import jdrop

KEY = jax.random.key(0)
X = jnp.linspace(-2.0, 2.0, 2 * 4 * 6 * 3).reshape(2, 4, 6, 3)


def _matrix(v):
    return v.reshape(8, -1) if hasattr(v, "reshape") else v  # lists stay lists, to be rejected


# name -> (call(key, value, rate, **options), name of the array argument)
FUNCTIONS = {
    "dropout": (lambda k, v, r, **o: jdrop.dropout(k, v, r, **o), "x"),
    "feature_dropout": (lambda k, v, r, **o: jdrop.feature_dropout(k, v, r, **o), "x"),
    "drop_path": (lambda k, v, r, **o: jdrop.drop_path(k, v, r, **o), "x"),
    "locked_dropout": (lambda k, v, r, **o: jdrop.locked_dropout(k, v, r, time_axis=1, **o), "x"),
    "embedding_dropout": (lambda k, v, r, **o: jdrop.embedding_dropout(k, _matrix(v), r, **o), "table"),
    "zoneout": (lambda k, v, r, **o: jdrop.zoneout(k, v, v, r, **o), "h_prev"),
    "attention_dropout": (lambda k, v, r, **o: jdrop.attention_dropout(k, v, r, **o), "probs"),
    "alpha_dropout": (lambda k, v, r, **o: jdrop.alpha_dropout(k, v, r, **o), "x"),
    "feature_alpha_dropout": (lambda k, v, r, **o: jdrop.feature_alpha_dropout(k, v, r, **o), "x"),
    "gaussian_dropout": (lambda k, v, r, **o: jdrop.gaussian_dropout(k, v, r, **o), "x"),
    "dropconnect": (lambda k, v, r, **o: jdrop.dropconnect(k, _matrix(v), r, **o), "w"),
    "dropblock": (lambda k, v, r, **o: jdrop.dropblock(k, v, r, 3, **o), "x"),
}
MISSING_KEY = r"(?s)needs a PRNG `key` in training mode: pass key=jax\.random\.key\(seed\).*or deterministic=True"
BAD_RATES = [-0.1, 1.5, float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("rate", BAD_RATES, ids=str)
def test_bad_static_rate_is_a_value_error_naming_rate(name, rate):
    call, _ = FUNCTIONS[name]
    with pytest.raises(ValueError, match=r"`rate` must be in \[0, 1\]"):
        call(KEY, X, rate)


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("rate", ["0.5", None, True, jnp.ones(3) * 0.5], ids=["str", "None", "bool", "vector"])
def test_rate_of_wrong_type_is_rejected(name, rate):
    call, _ = FUNCTIONS[name]
    with pytest.raises((TypeError, ValueError), match="rate"):
        call(KEY, X, rate)


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64])
def test_non_float_input_is_a_type_error_naming_the_argument(name, dtype):
    call, arg = FUNCTIONS[name]
    with pytest.raises(TypeError, match=f"`{arg}` must be a floating-point array"):
        call(KEY, X.astype(dtype), 0.5)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_python_list_input_is_a_type_error(name):
    call, arg = FUNCTIONS[name]
    with pytest.raises(TypeError, match=f"`{arg}`"):
        call(KEY, X.tolist(), 0.5)


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("key", [0, 1.5, "seed", jnp.zeros((3,), jnp.uint32), jnp.zeros(2, jnp.float32)],
                         ids=["int", "float", "str", "uint32[3]", "float[2]"])
def test_wrong_key_type_is_a_type_error_naming_key(name, key):
    call, _ = FUNCTIONS[name]
    with pytest.raises(TypeError, match="`key` must be a PRNG key"):
        call(key, X, 0.5)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_missing_key_in_training_says_what_to_do(name):
    call, _ = FUNCTIONS[name]
    with pytest.raises(ValueError, match=MISSING_KEY):
        call(None, X, 0.5)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_legacy_raw_key_is_accepted_and_equals_the_typed_key(name):
    call, _ = FUNCTIONS[name]
    np.testing.assert_array_equal(call(jax.random.PRNGKey(3), X, 0.5), call(jax.random.key(3), X, 0.5))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_checks_happen_at_trace_time(name):
    call, _ = FUNCTIONS[name]
    with pytest.raises(ValueError, match="rate"):
        jax.jit(lambda k, v: call(k, v, 1.5)).lower(KEY, X)


EXTREME_RATES = [0.0, 1e-7, 0.5, 1 - 1e-7, 1.0]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_no_nan_or_inf_for_extreme_rates(dtype):
    x = X.astype(dtype)

    def outputs(rate):
        out = []
        for name, (call, _) in FUNCTIONS.items():
            if name == "gaussian_dropout":
                continue  # its variance rate/(1-rate) is infinite at rate 1: checked by its own tests
            y, vjp = jax.vjp(lambda v, call=call: call(KEY, v, rate), x)
            out += [y, vjp(jnp.ones_like(y))[0]]
        return out

    traced = jax.jit(outputs)
    for rate in EXTREME_RATES:
        for result in outputs(rate) + traced(jnp.float32(rate)):
            assert result.dtype == dtype
            assert bool(jnp.all(jnp.isfinite(result.astype(jnp.float32)))), rate


@pytest.mark.parametrize("deterministic", [False, True], ids=["train", "eval"])
def test_invalid_traced_rate_gives_nan_outputs_and_gradients_the_same_way_everywhere(deterministic):
    # One road (jdrop._validation.nan_unless): every output element and every gradient is NaN, never a silently
    # different rate, whatever the op and in evaluation too (where the rate is otherwise unused).
    @jax.jit
    def outputs(rate):
        out = {}
        for name, (call, _) in FUNCTIONS.items():
            y, vjp = jax.vjp(lambda v, call=call: call(KEY, v, rate, deterministic=deterministic), X)
            out[name] = (y, vjp(jnp.ones_like(y))[0])
        return out

    for rate in (-0.5, 1.5, float("nan")):
        for name, (y, grad) in outputs(jnp.float32(rate)).items():
            assert bool(jnp.all(jnp.isnan(y))) and bool(jnp.all(jnp.isnan(grad))), (name, rate)


@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (0, 4, 2)])
def test_empty_and_scalar_inputs(shape):
    x = jnp.ones(shape)
    for residual in ("key", "bits", "mask"):
        y, vjp = jax.vjp(lambda v, residual=residual: jdrop.dropout(KEY, v, 0.5, residual=residual), x)
        assert y.shape == shape and vjp(jnp.ones(shape))[0].shape == shape
