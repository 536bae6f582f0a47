"""jdrop.train_step on research models (issue 21): BatchNorm state, ghost-batch microbatches, 8 devices, a token
batch with a padding mask, and the one-compilation property with model state.

References are written by hand: a flax.linen step on the whole batch (BatchNorm over the batch axis, the same
per-example dropout masks drawn with jax.random.bernoulli from jdrop.example_keys), per-microbatch reference
steps for ghost batches, and a vmap over examples for the token model.
"""

import functools
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _util import assert_trees_close, run_on_cpu_devices

import jdrop

B, LENGTH, CHANNELS, CLASSES = 8, 10, 2, 3
RATE, MOMENTUM, LR, STEPS = 0.3, 0.8, 0.1, 3


class CNN(nn.Module):
    """Conv -> BatchNorm -> relu -> dropout -> dense, on one example (LENGTH, CHANNELS) or a batch.

    One example (``key`` a single key) drops with flax's nn.Dropout; a batch (``key`` of shape (B,)) with the
    hand-written flax formula per example: the same masks for the same keys.
    """

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, key, train):
        x = nn.Conv(6, (3,))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=MOMENTUM, axis_name=self.axis_name)(x)
        x = nn.relu(x)
        if train:
            if key.ndim == 0:
                x = nn.Dropout(RATE, deterministic=False)(x, rng=jax.random.fold_in(key, 0))
            else:
                keep = 1.0 - RATE

                def drop(k, h):
                    mask = jax.random.bernoulli(jax.random.fold_in(k, 0), keep, h.shape)
                    return jax.lax.select(mask, h / keep, jnp.zeros_like(h))

                x = jax.vmap(drop)(key, x)
        return nn.Dense(CLASSES)(x.reshape(*x.shape[:-2], -1))


TX = optax.sgd(LR)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, LENGTH, CHANNELS)), jnp.float32)
    y = jnp.asarray(rng.integers(0, CLASSES, size=B), jnp.int32)
    return {"x": x, "y": y}


@functools.partial(jax.jit, static_argnames=("size", "offset"))
def _reference_grads(params, batch_stats, x, y, key, size, offset):
    """Loss, gradient and new batch statistics of the whole-batch flax model on ``size`` examples."""
    keys = jdrop.example_keys(key, size, offset=offset)

    def loss(p):
        logits, updates = CNN().apply({"params": p, "batch_stats": batch_stats}, x, keys, True, mutable=["batch_stats"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)), updates["batch_stats"]

    (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, grads, stats


@pytest.fixture(scope="module")
def cnn():
    """A CNN trained 3 steps by train_step (per-example vmap, BatchNorm(axis_name="batch")) and by a hand-written
    flax step on the whole batch; the train_step's apply_fn counts its traces."""
    traces = []

    def apply_fn(params, x, *, key, deterministic, model_state):
        traces.append(x.shape)
        return CNN(axis_name=jdrop.train.BATCH_AXIS).apply(
            {"params": params, **model_state}, x, key, not deterministic, mutable=["batch_stats"]
        )

    batch = _data()
    variables = jax.jit(CNN().init, static_argnums=3)(jax.random.key(0), batch["x"], None, False)
    state = jdrop.TrainState.create(apply_fn=apply_fn, params=variables["params"], tx=TX,
                                    model_state={"batch_stats": variables["batch_stats"]})
    params, stats, opt_state = variables["params"], variables["batch_stats"], TX.init(variables["params"])
    run = {"state0": state, "batch": batch, "losses": [], "reference_losses": []}
    for step in range(STEPS):
        key = jax.random.key(100 + step)
        state, metrics = jdrop.train_step(state, batch, key)
        run["losses"].append(float(metrics["loss"]))
        value, grads, stats = _reference_grads(params, stats, batch["x"], batch["y"], key, B, 0)
        updates, opt_state = TX.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        run["reference_losses"].append(float(value))
        if step == 0:
            run["first"], run["first_reference"] = state, (params, stats)
    run.update(state=state, reference=(params, stats), traces=traces)
    return run


def test_cnn_with_batchnorm_and_dropout_equals_a_hand_written_flax_step(cnn):
    np.testing.assert_allclose(cnn["losses"], cnn["reference_losses"], rtol=1e-5)
    assert cnn["losses"][-1] < cnn["losses"][0]  # it trains
    params, stats = cnn["reference"]
    assert_trees_close(cnn["state"].params, params)
    # The running statistics are the whole batch's: BatchNorm reduced over the named vmap.
    assert_trees_close(cnn["state"].model_state["batch_stats"], stats)
    assert int(cnn["state"].step) == STEPS
    # Evaluation uses the running statistics and no dropout: the flax model in eval mode on the batch.
    state, batch = cnn["state"], cnn["batch"]
    logits = CNN().apply({"params": state.params, **state.model_state}, batch["x"], None, False)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]))
    np.testing.assert_allclose(float(jdrop.eval_step(state, batch)["loss"]), float(loss), rtol=1e-5)


def test_one_compilation_with_changing_model_state(cnn):
    # Three steps, each with a new state (parameters and batch statistics), one trace; eval traced once more.
    assert cnn["traces"][:1] == [(LENGTH, CHANNELS)]  # apply_fn sees one example
    assert len(cnn["traces"]) == 2


def test_microbatches_are_ghost_batches_with_the_running_statistics_averaged(cnn):
    state0, batch, key = cnn["state0"], cnn["batch"], jax.random.key(100)
    state, metrics = jdrop.train_step(state0, batch, key, microbatches=2)
    params0, stats0 = state0.params, state0.model_state["batch_stats"]
    half = B // 2
    parts = [_reference_grads(params0, stats0, batch["x"][j * half:(j + 1) * half],
                              batch["y"][j * half:(j + 1) * half], key, half, j * half) for j in range(2)]
    grads = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, parts[0][1], parts[1][1])
    stats = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, parts[0][2], parts[1][2])
    np.testing.assert_allclose(float(metrics["loss"]), (float(parts[0][0]) + float(parts[1][0])) / 2, rtol=1e-5)
    assert_trees_close(state.params, jax.tree_util.tree_map(lambda p, g: p - LR * g, params0, grads))
    assert_trees_close(state.model_state["batch_stats"], stats)
    # The running mean is exactly the whole batch's (the mean of equal microbatches' means) ...
    whole = cnn["first"].model_state["batch_stats"]
    recorded = state.model_state["batch_stats"]
    leaf = next(iter(recorded))
    np.testing.assert_allclose(recorded[leaf]["mean"], whole[leaf]["mean"], rtol=1e-5, atol=1e-6)
    # ... the running variance is the mean of the microbatch variances: at most the whole batch's (law of total
    # variance: the variance of the microbatch means is missing).
    assert np.all(np.asarray(recorded[leaf]["var"]) <= np.asarray(whole[leaf]["var"]) + 1e-6)
    assert not np.allclose(recorded[leaf]["var"], whole[leaf]["var"], rtol=1e-4)


# ------------------------------------------------------------------------------------------- 8 devices

SHARDED = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jdrop

    assert jax.device_count() == 8, jax.devices()

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(6, 16, use_bias=False, rngs=rngs)  # BatchNorm follows: no bias
            self.norm = nnx.BatchNorm(16, momentum=0.8, axis_name=jdrop.train.BATCH_AXIS, rngs=rngs)
            self.dropout = nnx.Dropout(0.5, rngs=rngs)
            self.out = nnx.Linear(16, 3, rngs=rngs)
        def __call__(self, x):
            return self.out(self.dropout(nnx.relu(self.norm(self.linear(x)))))

    B = 32
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(B, 6)) * 2 + 1, jnp.float32), "y": jnp.arange(B) % 3}

    def train(devices, microbatches=1):
        mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
        # SGD: Adam would turn rounding noise in gradients that are ~0 into steps of size lr.
        state = jdrop.TrainState.from_nnx(Net(nnx.Rngs(0)), optax.sgd(0.1))
        state = jax.device_put(state, NamedSharding(mesh, P()))
        sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
        for step in range(2):
            state, metrics = jdrop.train_step(state, sharded, jax.random.key(step), microbatches=microbatches)
        stats = jax.tree.leaves(state.model_state["norm"])
        return jax.tree.leaves(state.params), stats, float(metrics["loss"])

    def diff(a, b):
        return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in zip(a, b))

    one = train(1)
    eight = train(8)
    ghost_one, ghost_eight = train(1, microbatches=2), train(8, microbatches=2)
    result = {"params": diff(one[0], eight[0]), "stats": diff(one[1], eight[1]), "loss": abs(one[2] - eight[2]),
              "ghost_stats": diff(ghost_one[1], ghost_eight[1]), "ghost_params": diff(ghost_one[0], ghost_eight[0]),
              "stats_moved": diff(one[1], [np.zeros(16), np.ones(16)])}
    print("RESULT" + json.dumps(result))
    """
)


def test_batch_statistics_over_8_devices_equal_one_device():
    result = run_on_cpu_devices(SHARDED, devices=8)
    assert result["stats_moved"] > 0.1  # the statistics did move away from their initial (0, 1)
    # Float tolerance: the reductions over the batch are summed in another order per shard.
    for name in ("params", "stats", "loss", "ghost_params", "ghost_stats"):
        assert result[name] < 1e-5, f"{name} differ over 8 devices by {result[name]}"


# ------------------------------------------------------------------------------------------ token batch

VOCAB, T, WIDTH = 11, 6, 8


def _lm(params, example, *, key, deterministic):
    """A next-token model for ONE sequence: embedding, dropout, a dense layer; the batch is a dict."""
    h = params["embedding"][example["tokens"]]
    h = jdrop.dropout(key, h, 0.5, deterministic=deterministic)
    return h @ params["out"]


def _lm_loss(logits, batch):
    """Mean cross-entropy of the next token over the real (unpadded) positions, and how many there are."""
    mask = batch["mask"][:, 1:]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["tokens"][:, 1:])
    count = jnp.sum(mask)
    return jnp.sum(losses * mask) / count, {"tokens": count}


def _tokens(pad_with=0):
    rng = np.random.default_rng(3)
    lengths = np.array([6, 4, 3, 5])
    mask = np.arange(T)[None, :] < lengths[:, None]
    tokens = np.where(mask, rng.integers(1, VOCAB, size=(4, T)), pad_with)
    return {"tokens": jnp.asarray(tokens, jnp.int32), "mask": jnp.asarray(mask)}


def test_token_batch_with_a_padding_mask():
    rng = np.random.default_rng(4)
    params = {"embedding": jnp.asarray(rng.normal(size=(VOCAB, WIDTH)), jnp.float32),
              "out": jnp.asarray(rng.normal(size=(WIDTH, VOCAB)) / 3, jnp.float32)}
    state = jdrop.TrainState.create(apply_fn=_lm, params=params, tx=TX, loss_fn=_lm_loss, batch_format="pytree")
    batch, key = _tokens(), jax.random.key(5)
    new, metrics = jdrop.train_step(state, batch, key)
    assert set(metrics) == {"loss", "tokens"} and int(metrics["tokens"]) == 5 + 3 + 2 + 4

    @functools.partial(jax.jit, static_argnames="offset")
    def reference(p, batch, offset=0):
        n = batch["tokens"].shape[0]
        keys = jdrop.example_keys(key, n, offset=offset)
        logits = jax.vmap(lambda e, k: _lm(p, e, key=k, deterministic=False))(batch, keys)
        return _lm_loss(logits, batch)[0]

    value, grads = jax.value_and_grad(reference)(params, batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(value), rtol=1e-6)
    assert_trees_close(new.params, jax.tree_util.tree_map(lambda p, g: p - LR * g, params, grads))
    # The padding is masked out: other padding tokens, the same loss and update.
    other, other_metrics = jdrop.train_step(state, _tokens(pad_with=7), key)
    np.testing.assert_allclose(float(other_metrics["loss"]), float(metrics["loss"]), rtol=1e-6)
    assert_trees_close(other.params, new.params)
    # Microbatches: loss and metrics are the microbatches' means.
    _, micro = jdrop.train_step(state, batch, key, microbatches=2)
    halves = [jax.tree_util.tree_map(lambda v, j=j: v[2 * j:2 * j + 2], batch) for j in range(2)]
    expected = [float(reference(params, half, offset=2 * j)) for j, half in enumerate(halves)]
    np.testing.assert_allclose(float(micro["loss"]), np.mean(expected), rtol=1e-6)
    assert float(micro["tokens"]) == pytest.approx((8 + 6) / 2)
    # Evaluation over pytree chunks, averaged by example count.
    totals = jdrop.evaluate(new, batch, batch_size=2)
    chunks = [jdrop.eval_step(new, half) for half in halves]
    assert totals["loss"] == pytest.approx(np.mean([float(c["loss"]) for c in chunks]), rel=1e-6)


def test_pytree_batch_and_loss_errors():
    params = {"embedding": jnp.ones((VOCAB, WIDTH)), "out": jnp.ones((WIDTH, VOCAB))}
    state = jdrop.TrainState.create(apply_fn=_lm, params=params, tx=TX, loss_fn=_lm_loss, batch_format="pytree")
    batch, key = _tokens(), jax.random.key(0)
    with pytest.raises(ValueError, match="leading"):
        jdrop.train_step(state, {"tokens": batch["tokens"], "mask": batch["mask"][:3]}, key)
    with pytest.raises(ValueError, match="no arrays"):
        jdrop.train_step(state, {}, key)
    with pytest.raises(ValueError, match="microbatches"):
        jdrop.train_step(state, batch, key, microbatches=3)
    with pytest.raises(ValueError, match="batch_format"):
        jdrop.TrainState.create(apply_fn=_lm, params=params, tx=TX, batch_format="dict")
    for bad_loss, error in [(lambda out, b: (1.0, 2.0), TypeError), (lambda out, b: jnp.ones(2), ValueError),
                            (lambda out, b: (jnp.zeros(()), {"loss": 1.0}), ValueError)]:
        with pytest.raises(error, match="loss_fn"):
            jdrop.train_step(state.replace(loss_fn=bad_loss), batch, key)
