"""Tests for jdrop.fit as a loop left running: bit-identical resume from a checkpoint written mid-epoch or at an
epoch boundary, periodic atomic checkpoints that keep the last K, the logging callback and its CSV / JSON-lines
loggers, the caller's state left usable, and evaluate's floats.
"""

import csv
import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdrop
from jdrop import checkpoint, mlp

N, BATCH, EPOCHS = 20, 4, 3  # 5 steps an epoch, 15 in all


def _state():
    params = mlp.init(jax.random.key(0), [6, 16, 3])
    return jdrop.TrainState.create(apply_fn=partial(mlp.apply, rates=(0.2, 0.5)), params=params, tx=optax.adam(1e-2))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return {"x": jnp.asarray(rng.normal(size=(N, 6)), jnp.float32), "y": jnp.asarray(rng.integers(0, 3, N), jnp.int32)}


@pytest.fixture(scope="module")
def test_data():
    rng = np.random.default_rng(1)
    return {"x": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32), "y": jnp.asarray(rng.integers(0, 3, 8), jnp.int32)}


class Crash(Exception):
    """The interruption: a logger that raises at a given record, as a killed process stops there."""


def _crash_at(kind, count):
    seen = []

    def log(record):
        if record["kind"] == kind:
            seen.append(record)
            if len(seen) == count:
                raise Crash(f"stopped at {kind} {count}")

    return log


def _assert_bit_identical(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit-identical, not close


@pytest.mark.parametrize(
    "unit, every, crash, saved",
    [
        # Steps 0-4 are epoch 1, 5-9 epoch 2: checkpoints every 2 steps, the crash at step 8's record leaves the
        # checkpoint after 6 steps, one step into epoch 2 (mid-epoch).
        ("steps", 2, ("step", 8), 6),
        # The crash at step 11's record leaves the checkpoint after 10 steps: epoch 2's last step, its end not
        # yet recorded (an epoch boundary, in steps).
        ("steps", 2, ("step", 11), 10),
        # Checkpoints every epoch; the crash at epoch 2's record leaves the one after epoch 1 (an epoch boundary).
        ("epochs", 1, ("epoch", 2), 5),
    ],
)
def test_fit_resumes_bit_identically(tmp_path, data, test_data, unit, every, crash, saved):
    options = dict(key=jax.random.key(7), epochs=EPOCHS, batch_size=BATCH, eval_data={"test": test_data},
                   progress=False, checkpoint_every=every, checkpoint_unit=unit, keep_checkpoints=None)
    uninterrupted, history = jdrop.fit(_state(), data, checkpoint_dir=tmp_path / "a", **options)
    with pytest.raises(Crash):
        jdrop.fit(_state(), data, checkpoint_dir=tmp_path / "b", log=_crash_at(*crash), **options)
    latest = sorted((tmp_path / "b").iterdir())[-1]
    assert latest.name == f"fit_{saved:09d}.npz"
    meta = checkpoint.metadata(latest)
    assert meta["epoch"] * 5 + meta["step"] == saved
    records = []
    resumed, resumed_history = jdrop.fit(_state(), data, checkpoint_dir=tmp_path / "b", log=records.append,
                                         **options)
    _assert_bit_identical(resumed, uninterrupted)
    assert int(resumed.step) == EPOCHS * 5
    assert resumed_history == history
    # The resumed run trains exactly the steps after the checkpoint.
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(saved + 1, EPOCHS * 5 + 1))


def test_fit_without_checkpoints_is_the_same_run(tmp_path, data):
    """Checkpointing (in pieces of 2 steps) changes nothing but the files: same masks, same shuffles."""
    options = dict(key=jax.random.key(7), epochs=2, batch_size=BATCH, progress=False)
    plain, plain_history = jdrop.fit(_state(), data, **options)
    saved, saved_history = jdrop.fit(_state(), data, checkpoint_dir=tmp_path, checkpoint_every=2,
                                     checkpoint_unit="steps", **options)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 jax.tree.leaves(plain.params), jax.tree.leaves(saved.params))
    assert plain_history["epoch"] == saved_history["epoch"]
    np.testing.assert_allclose(plain_history["step_loss"], saved_history["step_loss"], rtol=1e-6)
    # The last checkpoint is the returned state.
    _assert_bit_identical(checkpoint.restore(sorted(tmp_path.iterdir())[-1], _state()), saved)


def test_fit_keeps_the_last_checkpoints_and_refuses_another_runs(tmp_path, data):
    options = dict(epochs=2, batch_size=BATCH, progress=False, checkpoint_dir=tmp_path)
    jdrop.fit(_state(), data, key=jax.random.key(1), checkpoint_every=3, checkpoint_unit="steps",
              keep_checkpoints=2, **options)
    # Steps done 3, 6, 9 and the end (10): the last two kept, no temporary file left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit_000000009.npz", "fit_000000010.npz"]
    with pytest.raises(ValueError, match="same key, batch size and data"):
        jdrop.fit(_state(), data, key=jax.random.key(2), **options)
    with pytest.raises(ValueError, match="same key, batch size and data"):
        jdrop.fit(_state(), data, key=jax.random.key(1), **{**options, "batch_size": 5})
    # resume=False starts afresh (and overwrites the run's checkpoints as it goes).
    fresh, history = jdrop.fit(_state(), data, key=jax.random.key(2), resume=False, **options)
    assert history["epoch"] == [1, 2] and int(fresh.step) == 10


def test_fit_does_not_consume_the_callers_state(data):
    state = _state()
    before = jax.tree.map(np.asarray, state)
    trained, _ = jdrop.fit(state, data, key=jax.random.key(0), epochs=1, batch_size=BATCH, progress=False)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))
    _assert_bit_identical(state, before)
    jdrop.train_step(state, {"x": data["x"][:4], "y": data["y"][:4]}, jax.random.key(0))  # still usable
    assert int(trained.step) == 5


def test_fit_logs_steps_and_epochs_to_a_function_csv_and_json_lines(tmp_path, data, test_data):
    records = []
    csv_epochs, csv_steps = jdrop.train.CSVLogger(tmp_path / "e.csv"), jdrop.train.CSVLogger(tmp_path / "s.csv",
                                                                                              kind="step")
    jsonl = jdrop.train.JSONLinesLogger(tmp_path / "log.jsonl")

    def log(record):
        for sink in (records.append, csv_epochs, csv_steps, jsonl):
            sink(record)

    _, history = jdrop.fit(_state(), data, key=jax.random.key(3), epochs=2, batch_size=BATCH, progress=False,
                           eval_data={"test": test_data}, log=log)
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == list(range(1, 11)) and [r["epoch"] for r in steps] == [1] * 5 + [2] * 5
    assert set(steps[0]) == {"kind", "epoch", "step", "loss", "accuracy"}
    assert all(type(r["loss"]) is float for r in steps)
    # Each epoch's record is the history's row; step_loss is the mean of its steps' losses.
    for i, record in enumerate(epochs):
        assert record["epoch"] == i + 1 and record["step"] == 5 * (i + 1)
        assert {k: record[k] for k in history if k != "epoch"} == {k: v[i] for k, v in history.items() if k != "epoch"}
        mean = np.mean([r["loss"] for r in steps[5 * i : 5 * i + 5]])
        assert record["step_loss"] == pytest.approx(mean, rel=1e-6)
    assert [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()] == records
    with open(tmp_path / "e.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["test_loss"]) for row in rows] == history["test_loss"]
    with open(tmp_path / "s.csv", newline="") as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == list(range(1, 11))
    with pytest.raises(TypeError, match="`log`"):
        jdrop.fit(_state(), data, key=jax.random.key(3), epochs=1, batch_size=BATCH, progress=False, log="print")
    with pytest.raises(ValueError, match="checkpoint_unit"):
        jdrop.fit(_state(), data, key=jax.random.key(3), epochs=1, batch_size=BATCH, checkpoint_unit="minutes")


def test_evaluate_returns_float32_digits_as_python_floats(data):
    state = _state()
    metrics = jdrop.evaluate(state, data)
    step = jdrop.eval_step(state, data)
    assert set(metrics) == set(step) and all(type(v) is float for v in metrics.values())
    for name, value in metrics.items():
        assert np.float32(value) == step[name]  # one chunk: exactly eval_step's float32
        assert value == float(str(np.float32(value)))  # the shortest digits, no float32 noise
    # Chunks combine by example count in float64: (8 * m1 + 8 * m2 + 4 * m3) / 20.
    chunked = jdrop.evaluate(state, data, batch_size=8)
    parts = [jdrop.eval_step(state, {k: v[s : s + 8] for k, v in data.items()}) for s in (0, 8, 16)]
    expected = (8 * float(parts[0]["loss"]) + 8 * float(parts[1]["loss"]) + 4 * float(parts[2]["loss"])) / 20
    assert chunked["loss"] == float(str(np.float32(expected)))


def test_a_missing_key_raises_the_ops_missing_key_error(data):
    """train_step(state, batch, None) and the other training entry points raise what the ops raise for a
    missing key: MissingKeyError, a ValueError that says what to pass."""
    from jdrop._validation import MissingKeyError

    state, batch = _state(), {"x": data["x"][:4], "y": data["y"][:4]}
    with pytest.raises(MissingKeyError) as op_error:
        jdrop.dropout(None, data["x"], 0.5)
    calls = {
        "jdrop.train_step": lambda: jdrop.train_step(state, batch, None),
        "jdrop.train_epoch": lambda: jdrop.train_epoch(state, data, None, batch_size=BATCH),
        "jdrop.fit": lambda: jdrop.fit(state, data, key=None, epochs=1, batch_size=BATCH, progress=False),
        "jdrop.mc_predict": lambda: jdrop.mc_predict(state.apply_fn, state.params, data["x"], None, 4),
        "jdrop.rdrop_loss": lambda: jdrop.rdrop_loss(state.apply_fn, state.params, data["x"], data["y"], None),
    }
    for name, call in calls.items():
        with pytest.raises(MissingKeyError, match=rf"^{name} needs a PRNG `key` in training mode: pass key=") as error:
            call()
        assert isinstance(error.value, ValueError)
        # One wording: the op's message with the caller's name and its evaluation alternative.
        assert str(error.value).split(": pass")[1].split(", or ")[0] == str(op_error.value).split(": pass")[1].split(
            ", or ")[0]
