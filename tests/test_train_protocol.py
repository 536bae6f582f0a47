"""The apply_fn protocol of jdrop.train: the evaluation flag an apply_fn declares (deterministic, or the original
train), the deprecated train= of per_example, functions marked takes_batch, model state with a named example axis,
mc_predict's one-example default, and TrainState.replace / apply_gradients(**changes).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _util import mc_model, mc_params, normal_input

import jdrop
from jdrop import mlp, train

X = normal_input((5, 4), seed=7)


def _params():
    """mc_model's weights without its (Python float) rate, which an optimiser would turn into a parameter."""
    return {name: value for name, value in mc_params().items() if name != "rate"}


def _model(params, x, key, deterministic):
    return jdrop.dropout(key, jnp.tanh(x @ params["w1"]), 0.5, deterministic=deterministic) @ params["w2"]


def test_apply_fn_gets_the_flag_it_declares():
    params, key, seen = _params(), jax.random.key(1), []

    def new_style(params, x, *, key, deterministic):
        seen.append(("deterministic", deterministic))
        return _model(params, x, key, deterministic)

    def old_style(params, x, *, key, train):
        seen.append(("train", train))
        return _model(params, x, key, not train)

    def keywords(params, x, **kwargs):  # no declared flag: the original contract, train=
        seen.append(tuple(sorted(kwargs)))
        return _model(params, x, kwargs["key"], not kwargs["train"])

    outputs = {}
    for fn in (new_style, old_style, keywords):
        outputs[fn.__name__] = (train.per_example(fn, params, X, key), train.per_example(fn, params, X, None,
                                                                                         deterministic=True))
    assert seen == [("deterministic", False), ("deterministic", True), ("train", True), ("train", False),
                    ("key", "train"), ("key", "train")]
    for name in ("old_style", "keywords"):  # the same network either way
        for a, b in zip(outputs[name], outputs["new_style"]):
            np.testing.assert_array_equal(a, b)
    # The deprecated train= of per_example: a warning, the same result; both at once is an error.
    with pytest.warns(DeprecationWarning, match="deterministic=True"):
        evaluated = train.per_example(new_style, params, X, None, train=False)
    np.testing.assert_array_equal(evaluated, outputs["new_style"][1])
    with pytest.raises(TypeError, match="both"):
        train.per_example(new_style, params, X, key, train=True, deterministic=False)
    with pytest.raises(ValueError, match="key"):
        train.per_example(new_style, params, X, None)


def test_takes_batch_calls_the_function_once_with_the_example_keys():
    params, key, shapes = _params(), jax.random.key(2), []

    def one(params, x, *, key, deterministic):
        return _model(params, x, key, deterministic)

    @train.takes_batch
    def batched(params, x, *, key, deterministic):
        shapes.append((x.shape, None if key is None else key.shape))
        if x.ndim == 1:
            return one(params, x, key=key, deterministic=deterministic)
        return jax.vmap(lambda xi, ki: one(params, xi, key=ki, deterministic=deterministic))(x, key)

    expected = train.per_example(one, params, X, key, offset=3)
    np.testing.assert_array_equal(train.per_example(batched, params, X, key, offset=3), expected)
    np.testing.assert_array_equal(train.per_example(functools.partial(batched), params, X.T, key, offset=3, axis=1),
                                  expected)
    train.per_example(batched, params, X, None, deterministic=True)
    assert shapes == [((5, 4), (5,)), ((5, 4), (5,)), ((5, 4), None)]


def test_model_state_under_a_named_example_axis():
    """A framework-free BatchNorm-like state: the mean of the batch over the named vmap, one trace for all steps
    while the state and a traced hparam change."""
    traces = []

    def apply_fn(params, x, *, key, deterministic, model_state, shift):
        traces.append(x.shape)
        mean = jax.lax.pmean(x, "examples")  # the whole batch's mean, inside a one-example function
        new_state = {"mean": 0.5 * model_state["mean"] + 0.5 * mean}
        centred = x - (model_state["mean"] if deterministic else mean)
        return _model(params, centred + shift, key, deterministic), new_state

    state = jdrop.TrainState.create(apply_fn=apply_fn, params=_params(), tx=optax.sgd(0.1),
                                    model_state={"mean": jnp.zeros(4)}, hparams={"shift": 0.0}, axis_name="examples")
    batch = {"x": X, "y": jnp.arange(5) % 3}
    running = np.zeros(4)
    for step in range(3):
        state = state.replace(hparams={"shift": jnp.float32(step)})
        state, _ = jdrop.train_step(state, batch, jax.random.key(step))
        running = 0.5 * running + 0.5 * np.asarray(X, np.float64).mean(0)
        np.testing.assert_allclose(state.model_state["mean"], running, rtol=1e-6, atol=1e-7)
    assert traces == [(4,)]  # one compilation for three steps with new states and hparams
    jdrop.eval_step(state, batch)
    assert len(traces) == 2


def test_apply_gradients_changes_and_replace():
    state = jdrop.TrainState.create(apply_fn=mc_model, params={"w": jnp.ones(2)}, tx=optax.sgd(1.0),
                                    model_state={"n": jnp.zeros(())})
    new = state.apply_gradients({"w": jnp.ones(2)}, model_state={"n": jnp.ones(())})
    np.testing.assert_array_equal(new.params["w"], 0.0)
    assert float(new.model_state["n"]) == 1.0 and int(new.step) == 1
    assert state.replace(batch_format="pytree").batch_format == "pytree" and state.batch_format == "xy"
    with pytest.raises(TypeError, match="axis_name"):
        jdrop.TrainState.create(apply_fn=mc_model, params={}, tx=optax.sgd(1.0), axis_name=0)
    with pytest.raises(TypeError, match="loss_fn"):
        jdrop.TrainState.create(apply_fn=mc_model, params={}, tx=optax.sgd(1.0), loss_fn="mse")


def test_mc_predict_runs_one_example_per_call_by_default(key):
    params, samples, shapes = _params(), 6, []

    def one_example(params, x, *, key, deterministic):
        shapes.append(x.shape)
        return _model(params, x, key, deterministic)

    default = train.mc_predict(one_example, params, X, key, samples)
    explicit = train.mc_predict(one_example, params, X, key, samples, batch_axis=0)
    assert shapes == [(4,)]  # one example per call; batch_axis=0 is the same (cached) program
    np.testing.assert_array_equal(default.mean, explicit.mean)
    # jdrop.mlp.apply takes the batch with its example keys: the default equals the whole-x call it did before.
    mlp_params = mlp.init(jax.random.key(0), [4, 8, 3])
    fn = functools.partial(mlp.apply, rates=(0.0, 0.5))
    np.testing.assert_allclose(train.mc_predict(fn, mlp_params, X, key, 4).mean,
                               train.mc_predict(fn, mlp_params, X, key, 4, batch_axis=None).mean, rtol=1e-6)
