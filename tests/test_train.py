"""Tests for jdrop.train: TrainState, train_step, eval_step, evaluate, train_epoch, fit and max_norm.

Every result is checked against a reference written by hand: ``vmap`` of the one-example ``apply_fn`` with
``jdrop.example_keys``, the documented key schedule of ``train_epoch`` and ``fit``, a numpy max-norm projection.
The training runs are small, shared by the tests through module-scoped fixtures, and reuse compilations.
"""

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _util import assert_trees_close

import jdrop
from jdrop import mlp

SIZES = (6, 8, 3)
RATES = (0.2, 0.5)
B = 8
LR = 0.1


def _params(sizes=SIZES, seed=0):
    """MLP parameters drawn with numpy (jax.random would compile once per shape)."""
    rng = np.random.default_rng(seed)
    weights = tuple(jnp.asarray(rng.normal(size=(i, o)) / np.sqrt(i), jnp.float32) for i, o in zip(sizes, sizes[1:]))
    biases = tuple(jnp.asarray(0.1 * rng.normal(size=(o,)), jnp.float32) for o in sizes[1:])
    return mlp.MLPParams(weights, biases, "tanh")


def _data(n, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, SIZES[0])).astype(np.float32)
    x[1] = x[0]  # two identical examples
    y = rng.integers(0, SIZES[-1], size=n).astype(np.int32)
    y[1] = y[0]
    return {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def _copy(state):
    """A copy of a state's buffers (train_epoch and donate=True consume their input)."""
    return jax.tree_util.tree_map(jnp.copy, state)


def _cross_entropy(logits, labels):
    logits = np.asarray(logits, np.float64)
    logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    return float(np.mean(logz - logits[np.arange(len(labels)), np.asarray(labels)]))


@functools.partial(jax.jit, static_argnames=("rates",))
def _reference(params, x, y, key, offset, rates=RATES):
    """Per-example outputs, loss and gradient of one training step, by hand: vmap + example_keys."""
    keys = jdrop.example_keys(key, x.shape[0], offset=offset)

    def loss(p):
        out = jax.vmap(lambda xi, ki: mlp.apply(p, xi, key=ki, rates=rates, deterministic=False))(x, keys)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, y)), out

    (value, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return out, value, grads


# --------------------------------------------------------------------------------------- TrainState


def test_train_state_create_and_apply_gradients():
    params = _params()
    apply_fn = functools.partial(mlp.apply, rates=RATES)
    state = jdrop.TrainState.create(apply_fn=apply_fn, params=params, tx=optax.sgd(LR))
    assert int(state.step) == 0 and state.step.dtype == jnp.int32
    assert state.apply_fn is apply_fn and state.loss_fn is jdrop.softmax_cross_entropy
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.5), params)
    new = state.apply_gradients(grads)
    assert int(new.step) == 1
    assert_trees_close(new.params, jax.tree_util.tree_map(lambda p: p - LR * 0.5, params))
    assert new.params.activation == "tanh" and new.apply_fn is apply_fn
    # The old state is untouched (functional update).
    assert_trees_close(state.params, params)

    small = {"w": jnp.arange(6.0).reshape(2, 3)}
    adam = jdrop.TrainState.create(apply_fn=apply_fn, params=small, tx=optax.adam(1e-2))
    assert_trees_close(adam.opt_state, optax.adam(1e-2).init(small))
    stepped = adam.apply_gradients({"w": jnp.full((2, 3), -0.5)})
    # Adam's first step moves every parameter by -lr * sign(g) (up to eps).
    assert_trees_close(stepped.params, {"w": small["w"] + 1e-2}, rtol=1e-6)
    assert int(stepped.step) == 1 and int(stepped.opt_state[0].count) == 1


def test_train_state_is_a_pytree_with_static_functions():
    params = _params()
    state = jdrop.TrainState.create(apply_fn=functools.partial(mlp.apply, rates=RATES), params=params, tx=optax.sgd(LR))
    leaves = jax.tree_util.tree_leaves(state)
    assert len(leaves) == 1 + len(jax.tree_util.tree_leaves(params))  # step + params (sgd keeps no state)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    doubled = jax.tree_util.tree_map(lambda a: 2 * a, state)
    assert isinstance(doubled, jdrop.TrainState) and doubled.tx is state.tx
    np.testing.assert_allclose(doubled.params.weights[0], 2 * params.weights[0])
    assert int(jax.jit(lambda s: s.step + 1)(state)) == 1


def test_train_state_create_errors():
    with pytest.raises(TypeError, match="apply_fn"):
        jdrop.TrainState.create(apply_fn=None, params=_params(), tx=optax.sgd(LR))
    with pytest.raises(TypeError, match="tx"):
        jdrop.TrainState.create(apply_fn=mlp.apply, params=_params(), tx=LR)


# --------------------------------------------------------------------------------------- train_step


@pytest.fixture(scope="module")
def run():
    """A few training steps of one state, with a Python counter of apply_fn traces and the per-example outputs
    of every step recorded by a debug callback in the loss."""
    traces, outputs = [], []

    def apply_fn(params, x, *, key, train):
        traces.append(x.shape)
        return mlp.apply(params, x, key=key, rates=RATES, deterministic=not train)

    def loss_fn(out, y):
        jax.debug.callback(lambda o: outputs.append(np.asarray(o)), out)
        return jdrop.softmax_cross_entropy(out, y)

    def step(*args, **kwargs):
        before = len(outputs)
        result = jdrop.train_step(*args, **kwargs)
        jax.effects_barrier()
        assert len(outputs) == before + 1
        return result, outputs[-1], len(traces)

    state0 = jdrop.TrainState.create(apply_fn=apply_fn, params=_params(), tx=optax.sgd(LR), loss_fn=loss_fn)
    data = _data(B)
    half0 = {k: v[: B // 2] for k, v in data.items()}
    half1 = {k: v[B // 2 :] for k, v in data.items()}
    key, key2 = jax.random.key(3), jax.random.key(4)
    r = {"state0": state0, "data": data, "key": key}
    r["whole"] = step(state0, data, key)
    r["again"] = step(r["whole"][0][0], data, key2)
    r["half0"] = step(state0, half0, key, offset=0)
    r["half1"] = step(state0, half1, key, offset=B // 2)
    r["half0_at_4"] = step(state0, half0, key, offset=B // 2)
    r["traces"] = traces
    return r


def test_train_step_traces_once_per_shape(run):
    (_, _), _, after_first = run["whole"]
    assert after_first == 1
    assert run["again"][2] == 1  # same shapes, new key and state: no retrace
    assert run["half0"][2] == 2  # a new batch shape traces once more
    assert run["half1"][2] == 2 and run["half0_at_4"][2] == 2  # the offset is traced, not static
    assert run["traces"][:2] == [(SIZES[0],), (SIZES[0],)]  # apply_fn sees one example at a time


def test_train_step_loss_metrics_and_update_equal_reference(run):
    (state, metrics), outputs, _ = run["whole"]
    data, key, state0 = run["data"], run["key"], run["state0"]
    assert set(metrics) == {"loss", "accuracy"}
    ref_out, ref_loss, ref_grads = _reference(state0.params, data["x"], data["y"], key, 0)
    np.testing.assert_allclose(outputs, ref_out, rtol=1e-5, atol=1e-6)
    # The loss is that of the outputs before the update, computed by hand.
    np.testing.assert_allclose(float(metrics["loss"]), _cross_entropy(ref_out, data["y"]), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=1e-6)
    accuracy = np.mean(np.argmax(np.asarray(ref_out), 1) == np.asarray(data["y"]))
    assert float(metrics["accuracy"]) == pytest.approx(accuracy)
    # One SGD update with the gradient of that loss.
    assert int(state.step) == 1
    assert_trees_close(state.params, jax.tree_util.tree_map(lambda p, g: p - LR * g, state0.params, ref_grads))
    # The next step starts from the updated parameters.
    (state2, _), _, _ = run["again"]
    assert int(state2.step) == 2
    assert not np.allclose(state2.params.weights[0], state.params.weights[0])


def test_each_example_gets_its_own_mask(run):
    (_, _), outputs, _ = run["whole"]
    data = run["data"]
    np.testing.assert_array_equal(data["x"][0], data["x"][1])
    # Identical inputs, different dropout masks, different training outputs ...
    assert not np.allclose(outputs[0], outputs[1], atol=1e-4)
    # ... which differ only through dropout: the deterministic network gives them the same output.
    evaluated = mlp.apply(run["state0"].params, data["x"][:2], rates=RATES, deterministic=True)
    np.testing.assert_array_equal(evaluated[0], evaluated[1])
    # Two steps with different keys drop differently too.
    assert not np.allclose(outputs, run["again"][1], atol=1e-4)


def test_microbatches_with_offsets_equal_the_whole_batch(run):
    (state, metrics), outputs, _ = run["whole"]
    (state_a, metrics_a), out_a, _ = run["half0"]
    (state_b, metrics_b), out_b, _ = run["half1"]
    # Example i's mask depends only on (step key, global index i).
    np.testing.assert_allclose(np.concatenate([out_a, out_b]), outputs, rtol=1e-6, atol=1e-7)
    # So the mean loss and the (mean) gradient are the averages over the two microbatches.
    np.testing.assert_allclose(float(metrics["loss"]), (float(metrics_a["loss"]) + float(metrics_b["loss"])) / 2,
                               rtol=1e-6)
    p0 = run["state0"].params
    averaged = jax.tree_util.tree_map(lambda p, a, b: p + ((a - p) + (b - p)) / 2, p0, state_a.params, state_b.params)
    assert_trees_close(state.params, averaged)
    # The offset matters: the first half trained at offset B/2 gets the second half's masks (other outputs).
    assert not np.allclose(run["half0_at_4"][1], out_a, atol=1e-4)
    ref_out, _, _ = _reference(p0, run["data"]["x"][: B // 2], run["data"]["y"][: B // 2], run["key"], B // 2)
    np.testing.assert_allclose(run["half0_at_4"][1], ref_out, rtol=1e-5, atol=1e-6)


def test_train_step_donate(run):
    (state, metrics), _, _ = run["whole"]
    donated = _copy(run["state0"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Dd]onat.*")  # backends that cannot donate say so
        new, new_metrics = jdrop.train_step(donated, run["data"], run["key"], donate=True)
    assert_trees_close(new.params, state.params, rtol=0, atol=0)
    np.testing.assert_array_equal(new_metrics["loss"], metrics["loss"])
    # The original state was not donated and is still usable.
    np.testing.assert_array_equal(run["state0"].params.weights[0], _params().weights[0])


def test_train_step_accepts_legacy_keys(run):
    (state, metrics), _, _ = run["whole"]
    legacy = jax.random.key_data(run["key"])
    new, new_metrics = jdrop.train_step(run["state0"], run["data"], legacy)
    np.testing.assert_array_equal(new_metrics["loss"], metrics["loss"])


def test_user_loss_fn_regression():
    rates = (0.0, 0.0)  # no dropout: the masks are covered above, and this compiles faster
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(B, SIZES[0])), jnp.float32)
    y = jnp.asarray(rng.normal(size=(B, SIZES[-1])), jnp.float32)
    calls = []

    def mse(out, target):
        calls.append(out.shape)
        return jnp.mean(jnp.sum((out - target) ** 2, axis=-1))

    params = _params()
    state = jdrop.TrainState.create(
        apply_fn=functools.partial(mlp.apply, rates=rates), params=params, tx=optax.sgd(LR), loss_fn=mse
    )
    key = jax.random.key(8)
    new, metrics = jdrop.train_step(state, {"x": x, "y": y}, key)
    assert calls == [(B, SIZES[-1])]  # the loss sees the whole minibatch of outputs
    assert set(metrics) == {"loss"}  # no accuracy for float targets
    keys = jdrop.example_keys(key, B)

    @jax.jit
    def reference(p):
        out = jax.vmap(lambda xi, ki: mlp.apply(p, xi, key=ki, rates=rates, deterministic=False))(x, keys)
        return jnp.mean(jnp.sum((out - y) ** 2, axis=-1))

    value, grads = jax.value_and_grad(reference)(params)
    np.testing.assert_allclose(float(metrics["loss"]), float(value), rtol=1e-6)
    assert_trees_close(new.params, jax.tree_util.tree_map(lambda p, g: p - LR * g, params, grads))


# ------------------------------------------------------------------------------------- eval/evaluate


def test_eval_step_and_evaluate_are_deterministic_and_equal_apply_eval(run):
    state = run["whole"][0][0]
    data = _data(20, seed=7)
    first, second = jdrop.eval_step(state, data), jdrop.eval_step(state, data)
    assert set(first) == {"loss", "accuracy"}
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    logits = mlp.apply(state.params, data["x"], rates=RATES, deterministic=True)
    np.testing.assert_allclose(float(first["loss"]), _cross_entropy(logits, data["y"]), rtol=1e-5)
    accuracy = np.mean(np.argmax(np.asarray(logits), 1) == np.asarray(data["y"]))
    assert float(first["accuracy"]) == pytest.approx(accuracy)
    # evaluate: chunks of 8, 8 and 4 examples, averaged by example count.
    totals = jdrop.evaluate(state, data, batch_size=8)
    assert set(totals) == {"loss", "accuracy"} and all(isinstance(v, float) for v in totals.values())
    assert totals["loss"] == pytest.approx(float(first["loss"]), rel=1e-5)
    assert totals["accuracy"] == pytest.approx(accuracy)


# ------------------------------------------------------------------------------------ epochs and fit


def _epoch_by_hand(state, data, key, batch_size):
    """train_epoch's documented schedule with a Python loop of train_step."""
    n = data["x"].shape[0]
    shuffle_key, step_key = jax.random.split(key)
    order = np.asarray(jax.random.permutation(shuffle_key, n))
    losses = []
    for j in range(n // batch_size):
        idx = order[j * batch_size : (j + 1) * batch_size]
        batch = {k: v[idx] for k, v in data.items()}
        state, metrics = jdrop.train_step(state, batch, jax.random.fold_in(step_key, j))
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def epoch_data():
    return _data(20, seed=9)  # 2 minibatches of 8, the last 4 shuffled examples dropped


def test_train_epoch_equals_python_loop_of_train_step(run, epoch_data):
    state0, key = run["state0"], jax.random.key(12)
    by_hand, losses = _epoch_by_hand(state0, epoch_data, key, B)
    state, metrics = jdrop.train_epoch(_copy(state0), epoch_data, key, batch_size=B)
    assert int(state.step) == 2
    assert_trees_close(state.params, by_hand.params)
    assert float(metrics["loss"]) == pytest.approx(np.mean(losses), rel=1e-5)
    assert set(metrics) == {"loss", "accuracy"}
    # The whole epoch is one lax.scan over the minibatches.
    jaxpr = jax.make_jaxpr(lambda s, d, k: jdrop.train_epoch(s, d, k, batch_size=B))(state0, epoch_data, key)
    assert "scan" in str(jaxpr)


def test_train_epoch_errors(run, epoch_data):
    with pytest.raises(ValueError, match="batch_size"):
        jdrop.train_epoch(run["state0"], epoch_data, jax.random.key(0), batch_size=21)
    with pytest.raises(ValueError, match="batch_size"):
        jdrop.train_epoch(run["state0"], epoch_data, jax.random.key(0), batch_size=0)


def test_fit_histories(run, epoch_data):
    state0, key = run["state0"], jax.random.key(13)
    test_data = _data(12, seed=10)
    state, history = jdrop.fit(
        _copy(state0), epoch_data, key=key, epochs=2, batch_size=B,
        eval_data={"train": epoch_data, "test": test_data}, progress=False,
    )
    expected = {"epoch", "step_loss", "train_loss", "train_accuracy", "test_loss", "test_accuracy"}
    assert set(history) == expected
    assert history["epoch"] == [1, 2]
    assert all(len(v) == 2 and all(isinstance(x, (int, float)) for x in v) for v in history.values())
    # Epoch e is train_epoch with fold_in(key, e), then a deterministic evaluation.
    manual = _copy(state0)
    for epoch in range(2):
        manual, metrics = jdrop.train_epoch(manual, epoch_data, jax.random.fold_in(key, epoch), batch_size=B)
        assert history["step_loss"][epoch] == pytest.approx(float(metrics["loss"]), rel=1e-6)
    assert_trees_close(state.params, manual.params)
    assert history["test_loss"][-1] == pytest.approx(jdrop.evaluate(state, test_data)["loss"], rel=1e-6)
    assert int(state.step) == 4
    # Without eval_data only the training curve is kept.
    _, short = jdrop.fit(_copy(state0), epoch_data, key=key, epochs=1, batch_size=B, progress=False)
    assert set(short) == {"epoch", "step_loss"} and short["step_loss"] == history["step_loss"][:1]


# ------------------------------------------------------------------------------------------ max_norm


def _project(w, c):
    norms = np.sqrt((w.astype(np.float64) ** 2).sum(0, keepdims=True))
    return w * np.minimum(1.0, c / norms)


def test_max_norm_projects_incoming_weight_columns():
    c, lr = 1.0, 0.5
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 5)).astype(np.float32)
    w[:, 0] *= 0.1  # columns 0 and 1 stay inside the ball after the update
    w[:, 1] *= 0.05
    w[:, 2:] *= 2.0
    params = {"w": jnp.asarray(w), "b": jnp.asarray(rng.normal(size=(5,)) * 5, jnp.float32)}
    grads = {"w": jnp.asarray(rng.normal(size=(4, 5)) * 0.1, jnp.float32), "b": jnp.ones((5,), jnp.float32)}
    tx = optax.chain(optax.sgd(lr), jdrop.max_norm(c))
    state = jdrop.TrainState.create(apply_fn=lambda *a, **k: None, params=params, tx=tx).apply_gradients(grads)
    plain = np.asarray(params["w"]) - lr * np.asarray(grads["w"])
    new_w = np.asarray(state.params["w"])
    norms = np.linalg.norm(new_w, axis=0)
    assert np.all(norms <= c * (1 + 1e-6))
    np.testing.assert_allclose(norms[2:], c, rtol=1e-6)  # the outside columns land on the sphere
    np.testing.assert_allclose(new_w[:, :2], plain[:, :2], rtol=1e-6)  # the inside ones are untouched
    np.testing.assert_allclose(new_w, _project(plain, c), rtol=1e-6, atol=1e-7)
    # Biases are not constrained (their norm is > c).
    np.testing.assert_allclose(state.params["b"], np.asarray(params["b"]) - lr, rtol=1e-6)
    assert np.linalg.norm(np.asarray(state.params["b"])) > c


def test_max_norm_on_mlp_params_and_axis():
    params = _params()
    big = jax.tree_util.tree_map(lambda p: 10 * p, params)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    tx = jdrop.max_norm(2.0)
    updates, _ = tx.update(zeros, tx.init(big), big)
    projected = optax.apply_updates(big, updates)
    for w_new, w_big in zip(projected.weights, big.weights):
        np.testing.assert_allclose(w_new, _project(np.asarray(w_big), 2.0), rtol=1e-5, atol=1e-6)
    assert_trees_close(projected.biases, big.biases)
    # axis=1: outgoing rows instead of incoming columns.
    tx_rows = jdrop.max_norm(2.0, axis=1)
    updates, _ = tx_rows.update(zeros, tx_rows.init(big), big)
    rows = optax.apply_updates(big, updates).weights[0]
    np.testing.assert_allclose(rows, _project(np.asarray(big.weights[0]).T, 2.0).T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), True, "3", None])
def test_max_norm_rejects_bad_max_value(bad):
    with pytest.raises(ValueError, match="max_value"):
        jdrop.max_norm(bad)


def test_max_norm_needs_params():
    tx = jdrop.max_norm(1.0)
    with pytest.raises(ValueError, match="param"):
        tx.update({"w": jnp.ones((2, 2))}, tx.init(None))


# -------------------------------------------------------------------------------------------- errors


def test_batch_errors(run):
    state, key = run["state0"], jax.random.key(0)
    x, y = run["data"]["x"], run["data"]["y"]
    for bad in ({"x": x}, {"y": y}, {"inputs": x, "labels": y}, (x, y)):
        with pytest.raises(TypeError, match="batch"):
            jdrop.train_step(state, bad, key)
        with pytest.raises(TypeError, match="batch"):
            jdrop.eval_step(state, bad)
    with pytest.raises(ValueError, match="leading"):
        jdrop.train_step(state, {"x": x, "y": y[:-1]}, key)
    with pytest.raises(ValueError, match="leading"):
        jdrop.eval_step(state, {"x": x[:3], "y": y})


def test_missing_key_in_training_mode():
    params = _params()
    with pytest.raises(ValueError, match="key"):
        mlp.apply(params, jnp.ones((SIZES[0],)), rates=RATES, deterministic=False)
    with pytest.raises(ValueError, match="key"):
        mlp.apply(params, jnp.ones((2, SIZES[0])), key=None, rates=RATES, deterministic=False)


def test_dataclass_replace_keeps_static_fields(run):
    state = run["state0"]
    replaced = dataclasses.replace(state, step=jnp.asarray(5, jnp.int32))
    assert replaced.apply_fn is state.apply_fn and replaced.loss_fn is state.loss_fn and int(replaced.step) == 5


def test_python_float_hparams_do_not_recompile_when_a_schedule_replaces_them():
    traces = []

    def counting_apply(params, x, *, key, train, rates):
        traces.append(1)
        return jdrop.mlp.apply(params, x, key=key, deterministic=not train, rates=rates)

    params = jdrop.mlp.init(jax.random.key(0), [4, 8, 3])
    state = jdrop.TrainState.create(apply_fn=counting_apply, params=params, tx=optax.sgd(0.1),
                                    hparams={"rates": (0.0, 0.5)})
    batch = {"x": jnp.ones((2, 4)), "y": jnp.zeros((2,), jnp.int32)}
    state, _ = jdrop.train_step(state, batch, jax.random.key(1))
    schedule = jdrop.linear_schedule(0.0, 0.5, 100)
    state = dataclasses.replace(state, hparams={"rates": (schedule(0), schedule(50))})
    jdrop.train_step(state, batch, jax.random.key(2))
    assert len(traces) == 1
