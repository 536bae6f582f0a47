"""Tests for the demo (``python -m jdrop``) and the MNIST-1D loader it trains on.

MNIST-1D is generated once for the module (about 6 s) and handed to the demo in place of a second generation.
"""

import contextlib
import io
import json

import jax
import numpy as np
import pytest
from _util import bernoulli_mean_tolerance

import jdrop.__main__ as demo
from jdrop.data import mnist1d

pytest.importorskip("mnist1d")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def data():
    return mnist1d()


def test_mnist1d_shapes_and_dtypes(data):
    train, test = data
    assert set(train) == set(test) == {"x", "y"}
    assert train["x"].shape == (4000, 40) and train["x"].dtype == np.float32
    assert train["y"].shape == (4000,) and train["y"].dtype == np.int32
    assert test["x"].shape == (1000, 40) and test["x"].dtype == np.float32
    assert test["y"].shape == (1000,) and test["y"].dtype == np.int32
    for split in (train, test):
        assert np.all(np.isfinite(split["x"]))
        assert set(np.unique(split["y"])) == set(range(10))
    # Not a degenerate set: the inputs vary and the train/test splits differ.
    assert float(train["x"].std()) > 0.1
    assert not np.array_equal(train["x"][:1000], test["x"])


def test_mnist1d_rejects_unknown_arguments():
    with pytest.raises(ValueError, match="no_such_argument"):
        mnist1d(no_such_argument=1)


@pytest.fixture(scope="module")
def demo_run(data, tmp_path_factory):
    """One run of ``python -m jdrop --epochs 2 --hidden 32 32 --quiet --out <tmp>``, in-process."""
    out = tmp_path_factory.mktemp("demo")
    seeds = []

    def fake_mnist1d(*, seed=42, **overrides):
        seeds.append(seed)
        return data

    # The default --batch-size 100 unless the session runs on several (e.g. forced host) devices.
    batch = [] if 100 % jax.device_count() == 0 else ["--batch-size", str(100 - 100 % jax.device_count())]
    patch = pytest.MonkeyPatch()
    patch.setattr(demo, "mnist1d", fake_mnist1d)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            code = demo.main(["--epochs", "2", "--hidden", "32", "32", "--quiet", "--out", str(out)] + batch)
    finally:
        patch.undo()
    return {"code": code, "out": out, "stdout": stdout.getvalue(), "seeds": seeds}


def test_demo_runs_and_prints_the_table(demo_run):
    assert demo_run["code"] == 0
    assert demo_run["seeds"] == [42]  # --data-seed default
    text = demo_run["stdout"]
    assert "MNIST-1D: 4000 train / 1000 test examples" in text
    header = next(line for line in text.splitlines() if "train acc" in line)
    assert "test acc" in header and "gap" in header and "seconds" in header
    rows = [line for line in text.splitlines() if line.startswith(("no dropout", "dropout 0.1/0.5/0.5"))]
    assert len(rows) == 2
    for row in rows:
        train_acc, test_acc, gap, seconds = (float(v) for v in row.split()[-4:])
        assert 0.0 <= train_acc <= 1.0 and 0.0 <= test_acc <= 1.0
        assert gap == pytest.approx(train_acc - test_acc, abs=2e-3)  # printed to 3 decimals
        assert seconds >= 0
    assert "learning_curves.png" in text and "histories.json" in text


def test_demo_writes_learning_curves_and_histories(demo_run):
    out = demo_run["out"]
    png = (out / "learning_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    histories = json.loads((out / "histories.json").read_text())
    assert [h["name"] for h in histories] == ["no dropout", "dropout 0.1/0.5/0.5"]
    assert [h["rates"] for h in histories] == [[0.0, 0.0, 0.0], [0.1, 0.5, 0.5]]
    per_epoch = {"epoch", "step_loss", "train_loss", "train_accuracy", "test_loss", "test_accuracy"}
    for h in histories:
        assert set(h) == per_epoch | {"seconds", "name", "rates"}
        assert h["epoch"] == [1, 2]
        for name in per_epoch - {"epoch"}:
            assert len(h[name]) == 2 and all(np.isfinite(h[name]))
        assert all(0.0 <= a <= 1.0 for a in h["train_accuracy"] + h["test_accuracy"])
        # Two epochs of Adam learn something: the training loss falls, and the training accuracy beats chance
        # (0.1; over 4000 examples a chance-level accuracy has standard error sqrt(0.1 * 0.9 / 4000); 5 sigma).
        assert h["train_loss"][1] < h["train_loss"][0] and h["step_loss"][1] < h["step_loss"][0]
        assert h["train_accuracy"][-1] > 0.1 + bernoulli_mean_tolerance(4000, 0.1)
    # The table's numbers are the histories' last entries.
    row = next(line for line in demo_run["stdout"].splitlines() if line.startswith("no dropout"))
    assert float(row.split()[-4]) == pytest.approx(histories[0]["train_accuracy"][-1], abs=1e-3)


def test_demo_rejects_mismatched_rates(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(["--hidden", "32", "32", "--rates", "0.1", "0.5", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "--rates needs 3 values" in capsys.readouterr().err
