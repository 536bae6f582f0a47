"""Checkpoint and resume: atomic writes, corruption detection, bit-identical resume in a fresh process."""

import json
import os
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdrop
from jdrop import checkpoint, mlp

ROOT = Path(__file__).resolve().parents[1]

# The training run shared by this process and the fresh one: step s uses fold_in(key(3), s).
RUN = textwrap.dedent(
    """
    from functools import partial
    import jax, jax.numpy as jnp, optax, jdrop
    from jdrop import mlp

    def fresh_state():
        params = mlp.init(jax.random.key(0), [10, 32, 32, 4], activation="relu")
        return jdrop.TrainState.create(apply_fn=partial(mlp.apply, rates=(0.1, 0.5, 0.5)), params=params,
                                       tx=optax.adam(1e-2))

    def batch(step):
        x = jax.random.normal(jax.random.fold_in(jax.random.key(1), step), (16, 10))
        return {"x": x, "y": (jnp.arange(16) + step) % 4}

    def train(state, start, stop):
        for step in range(start, stop):
            state, _ = jdrop.train_step(state, batch(step), jax.random.fold_in(jax.random.key(3), step))
        return state
    """
)


def _namespace():
    namespace: dict = {}
    exec(RUN, namespace)
    return namespace


def test_resume_in_fresh_process_is_bit_identical(tmp_path):
    run = _namespace()
    uninterrupted = run["train"](run["fresh_state"](), 0, 6)
    first = run["train"](run["fresh_state"](), 0, 3)
    checkpoint.save(tmp_path / "ckpt.npz", first)
    script = RUN + textwrap.dedent(
        f"""
        import numpy as np
        from jdrop import checkpoint
        state = checkpoint.restore({str(tmp_path / 'ckpt.npz')!r}, fresh_state())
        assert int(state.step) == 3
        state = train(state, 3, 6)
        checkpoint.save({str(tmp_path / 'resumed.npz')!r}, state)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = checkpoint.restore(tmp_path / "resumed.npz", run["fresh_state"]())
    assert int(resumed.step) == 6
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit-identical, not just close


def _state():
    params = mlp.init(jax.random.key(0), [3, 5, 2])
    return jdrop.TrainState.create(apply_fn=partial(mlp.apply, rates=0.5), params=params, tx=optax.sgd(0.1))


def test_round_trip_including_prng_keys(tmp_path):
    tree = {"state": _state(), "key": jax.random.key(42), "rbg": jax.random.key(1, impl="rbg")}
    restored = checkpoint.restore(checkpoint.save(tmp_path / "a.npz", tree), tree)
    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(restored["state"]), jax.tree.leaves(tree["state"])):
        np.testing.assert_array_equal(a, b)
    for name in ("key", "rbg"):
        np.testing.assert_array_equal(jax.random.key_data(restored[name]), jax.random.key_data(tree[name]))
        assert jax.random.key_impl(restored[name]) == jax.random.key_impl(tree[name])


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    good = _state()
    checkpoint.save(path, good)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(os, "fsync", crash)
    changed = jdrop.TrainState.create(apply_fn=good.apply_fn, params=jax.tree.map(lambda p: p + 1, good.params),
                                      tx=good.tx)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, changed)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]  # no temporary file left behind


def test_corrupt_or_truncated_file_is_rejected(tmp_path):
    path = checkpoint.save(tmp_path / "ckpt.npz", _state())
    data = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable jdrop checkpoint"):
        checkpoint.restore(tmp_path / "cut.npz", _state())
    # Alter one stored array but keep a valid archive: the checksum catches it.
    with np.load(path) as archive:
        arrays = dict(archive)
    arrays["leaf_00001"] = arrays["leaf_00001"] + 1
    np.savez(tmp_path / "altered.npz", **arrays)
    with pytest.raises(ValueError, match="corrupt"):
        checkpoint.restore(tmp_path / "altered.npz", _state())


def test_template_mismatch_is_rejected(tmp_path):
    path = checkpoint.save(tmp_path / "ckpt.npz", _state())
    params = mlp.init(jax.random.key(0), [3, 6, 2])
    other = jdrop.TrainState.create(apply_fn=partial(mlp.apply, rates=0.5), params=params, tx=optax.sgd(0.1))
    with pytest.raises(ValueError, match="shape"):
        checkpoint.restore(path, other)
    with pytest.raises(ValueError, match="different tree"):
        checkpoint.restore(path, {"x": jnp.zeros(3)})


def test_metadata_round_trip_and_checksum(tmp_path):
    path = checkpoint.save(tmp_path / "ckpt.npz", _state(), metadata={"epoch": 2, "history": {"loss": [0.5, 0.25]}})
    assert checkpoint.metadata(path) == {"epoch": 2, "history": {"loss": [0.5, 0.25]}}
    assert checkpoint.metadata(checkpoint.save(tmp_path / "plain.npz", _state())) == {}
    # Altered metadata fails the checksum, like an altered array.
    with np.load(path) as archive:
        arrays = dict(archive)
    meta = json.loads(str(arrays["__meta__"]))
    meta["metadata"]["epoch"] = 3
    arrays["__meta__"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "altered.npz", **arrays)
    with pytest.raises(ValueError, match="corrupt"):
        checkpoint.metadata(tmp_path / "altered.npz")
    with pytest.raises(TypeError, match="JSON-serialisable"):
        checkpoint.save(tmp_path / "bad.npz", _state(), metadata={"array": np.zeros(2)})
