"""``fit``: epochs of minibatch steps, with evaluation, checkpoints that resume bit-identically, logging
and a tqdm progress bar.

The schedule is a function of ``(key, epoch, step)`` only: epoch ``e`` runs :func:`train_epoch`'s
schedule with ``fold_in(key, e)`` (shuffle ``split(.)[0]``, minibatch ``j`` keyed ``fold_in(split(.)[1],
j)``). A checkpoint stores the state with the epoch and step counters (and the history so far), so a
run restarted from it draws the same shuffles and masks as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdrop import checkpoint, masks
from jdrop._typing import KeyLike
from jdrop._validation import check_choice, int_at_least, positive_int
from jdrop.train._loop import check_batch_size, evaluate, metric_float, place, train_steps
from jdrop.train._state import Batch, TrainState, count_examples

__all__ = ["fit"]

_NAME = re.compile(r"fit_(\d{9})\.npz")


@dataclasses.dataclass
class _Run:
    """What ``fit`` was asked to do, and how far it got."""

    key: jax.Array
    steps: int  # minibatches per epoch
    every: int
    unit: str
    directory: Path | None
    keep: int | None
    log: Callable[[dict[str, Any]], Any] | None
    epoch: int = 0  # epochs completed
    step: int = 0  # steps completed in the current epoch
    history: dict[str, list[float]] = dataclasses.field(default_factory=lambda: {"epoch": [], "step_loss": []})
    losses: list[float] = dataclasses.field(default_factory=list)  # the current epoch's step losses

    def identity(self, batch_size: int, n: int) -> dict[str, Any]:
        """What a resumed run must share with the run that saved the checkpoint."""
        return {"key": np.asarray(jax.random.key_data(self.key)).ravel().tolist(),
                "key_impl": str(jax.random.key_impl(self.key)), "batch_size": batch_size, "num_examples": n}

    def save(self, state: TrainState, identity: dict[str, Any]) -> None:
        assert self.directory is not None
        done = self.epoch * self.steps + self.step
        metadata = {"run": identity, "epoch": self.epoch, "step": self.step, "history": self.history,
                    "losses": self.losses}
        checkpoint.save(self.directory / f"fit_{done:09d}.npz", state, metadata=metadata)
        for old in _checkpoints(self.directory)[: -self.keep if self.keep else 0]:
            old.unlink(missing_ok=True)

    def record(self, kind: str, values: Mapping[str, Any]) -> None:
        if self.log is not None:
            done = self.epoch * self.steps + self.step
            self.log({"kind": kind, "epoch": self.epoch + 1, "step": done, **values})


def _checkpoints(directory: Path) -> list[Path]:
    """``fit``'s checkpoints in ``directory``, oldest first (by the step count in their names)."""
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.iterdir() if _NAME.fullmatch(path.name))


def _copy(state: TrainState) -> TrainState:
    """A copy of the arrays of ``state``: the loop donates its own buffers, never the caller's."""
    return jax.tree_util.tree_map(lambda leaf: jnp.copy(leaf) if isinstance(leaf, jax.Array) else leaf, state)


def _resume(state: TrainState, run: _Run, identity: dict[str, Any]) -> TrainState:
    """The state of the latest checkpoint in ``run.directory`` with ``run``'s counters set from it, or a copy
    of ``state`` when there is none."""
    found = _checkpoints(run.directory) if run.directory is not None else []
    if not found:
        return _copy(state)
    metadata = checkpoint.metadata(found[-1])
    if metadata.get("run") != identity:
        raise ValueError(
            f"{found[-1]} was saved by a run with {metadata.get('run')}, this one has {identity}: resume with the "
            "same key, batch size and data, or pass resume=False (or another checkpoint_dir) to start afresh."
        )
    run.epoch, run.step, run.history, run.losses = (metadata["epoch"], metadata["step"], metadata["history"],
                                                     metadata["losses"])
    return checkpoint.restore(found[-1], state)


def _train_epoch(state: TrainState, data: Batch, run: _Run, identity: dict[str, Any], options: dict[str, Any]
                 ) -> TrainState:
    """The rest of epoch ``run.epoch``, in pieces that end at the step checkpoints; logs every step."""
    epoch_key = masks.fold_in(run.key, run.epoch)
    while run.step < run.steps:
        done = run.epoch * run.steps + run.step
        stop = run.steps if run.unit == "epochs" else min(run.steps, run.step + run.every - done % run.every)
        state, metrics = train_steps(state, data, epoch_key, run.step, count=stop - run.step, **options)
        metrics = jax.device_get(metrics)
        for i in range(stop - run.step):
            run.step += 1
            run.losses.append(float(metrics["loss"][i]))
            run.record("step", {name: metric_float(value[i]) for name, value in metrics.items()})
        if run.directory is not None and run.unit == "steps" and (run.epoch * run.steps + run.step) % run.every == 0:
            run.save(state, identity)
    return state


def fit(
    state: TrainState,
    train_data: Batch,
    *,
    key: KeyLike,
    epochs: int,
    batch_size: int,
    eval_data: Mapping[str, Batch] | None = None,
    progress: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    checkpoint_unit: str = "epochs",
    keep_checkpoints: int | None = 3,
    resume: bool = True,
    log: Callable[[dict[str, Any]], Any] | None = None,
) -> tuple[TrainState, dict[str, list[float]]]:
    """Trains for ``epochs`` epochs of minibatch steps, evaluating after each; resumable, logged, with a tqdm bar.

    Epoch ``e`` is :func:`train_epoch` with ``fold_in(key, e)``: its examples shuffled with
    ``split(fold_in(key, e))[0]`` and its minibatch ``j`` trained with ``fold_in(split(fold_in(key, e))[1], j)``
    (the last ``n % batch_size`` shuffled examples sit the epoch out), each run of minibatches one compiled
    ``lax.scan``. ``mesh`` shards the minibatches (:func:`train_epoch`). ``eval_data`` maps a name (e.g.
    ``"train"``, ``"test"``) to a data set evaluated deterministically (:func:`evaluate`) after every epoch.

    The caller's ``state`` is not consumed: ``fit`` copies its arrays once and donates only its own
    buffers from then on, so ``state`` stays usable (the cost: one more copy of the parameters and
    optimiser state in memory while ``fit`` runs).

    Checkpoints (with ``checkpoint_dir``): the state, the epoch and step counters and the history are
    saved atomically (:func:`jdrop.checkpoint.save`: a temporary file, fsync, ``os.replace``) as
    ``checkpoint_dir/fit_<steps done>.npz`` every ``checkpoint_every`` epochs (``checkpoint_unit="epochs"``)
    or steps (``"steps"``: whenever the number of steps done is a multiple), and at the end; the last
    ``keep_checkpoints`` are kept (None: all). With ``resume=True``, a ``checkpoint_dir`` that holds
    checkpoints continues from the latest: the remaining steps draw the shuffles and masks the
    uninterrupted run draws, and with the same ``checkpoint_every`` and ``checkpoint_unit`` (the same
    pieces of compiled steps) the result is bit-identical to it. A checkpoint written with another key,
    batch size or data size is refused.

    Logging: ``log(record)`` is called after every step with ``{"kind": "step", "epoch", "step", <metrics>}``
    and after every epoch with ``{"kind": "epoch", "epoch", "step", "step_loss", <evaluations>}`` (Python
    floats; ``step`` counts the steps done). :class:`jdrop.train.CSVLogger` and
    :class:`jdrop.train.JSONLinesLogger` write them to files.

    Args:
      state: the :class:`TrainState` to start from (not modified), also the template of a checkpoint.
      train_data: the training set, in the state's batch format.
      key: the run's PRNG key (the same key to resume).
      epochs: the total number of epochs (a resumed run trains the ones left).
      batch_size: examples per minibatch.
      eval_data: data sets to evaluate after every epoch, by name.
      progress: show a tqdm bar over the epochs.
      mesh: a device mesh for data parallelism (:func:`train_epoch`).
      checkpoint_dir: the directory of the checkpoints (None: none are written or read).
      checkpoint_every: the checkpoint period, in ``checkpoint_unit``.
      checkpoint_unit: ``"epochs"`` or ``"steps"``.
      keep_checkpoints: how many of the latest checkpoints to keep (None: all).
      resume: continue from the latest checkpoint in ``checkpoint_dir`` when there is one.
      log: a function called with every step's and every epoch's record.

    Returns:
      ``(state, history)``: ``history["epoch"]`` (1, 2, ...), ``history["step_loss"]`` (the epoch's mean
      training-step loss) and ``history[f"{name}_{metric}"]`` (the evaluations), lists over the epochs.

    Example::

      >>> state, history = jdrop.fit(state, {"x": x, "y": y}, key=jax.random.key(0), epochs=10, batch_size=64,
      ...                            eval_data={"test": test}, checkpoint_dir="runs/a", checkpoint_every=100,
      ...                            checkpoint_unit="steps", log=jdrop.train.JSONLinesLogger("runs/a/log.jsonl"))
    """
    n = count_examples(train_data, state.batch_format)
    batch_size = check_batch_size(batch_size, n)
    if log is not None and not callable(log):
        raise TypeError(f"`log` must be a function taking one record (a dict), got {log!r}.")
    run = _Run(
        key=masks.require_key(key, what="jdrop.fit", eval_hint="jdrop.evaluate(state, data)"),
        steps=n // batch_size,
        every=positive_int(checkpoint_every, name="checkpoint_every"),
        unit=check_choice(checkpoint_unit, ("epochs", "steps"), name="checkpoint_unit"),
        directory=None if checkpoint_dir is None else Path(checkpoint_dir),
        keep=None if keep_checkpoints is None else positive_int(keep_checkpoints, name="keep_checkpoints"), log=log,
    )
    epochs = int_at_least(epochs, 0, name="epochs")
    identity = run.identity(batch_size, n)
    state = _resume(state, run, identity) if resume else _copy(state)
    state, data, sharding = place(state, train_data, mesh)
    options = {"batch_size": batch_size, "shuffle": True, "batch_sharding": sharding}
    bar: Any = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, initial=min(run.epoch, epochs), desc="epochs")
    while run.epoch < epochs:
        state = _train_epoch(state, data, run, identity, options)
        _end_epoch(state, run, eval_data or {}, identity, last=run.epoch + 1 == epochs)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v[-1]:.3f}" for k, v in run.history.items() if k != "epoch"})
    if bar is not None:
        bar.close()
    return state, run.history


def _end_epoch(state: TrainState, run: _Run, eval_data: Mapping[str, Batch], identity: dict[str, Any], *,
               last: bool) -> None:
    """The epoch's history row and record (evaluations included), then the counters move to the next epoch
    and, when due, a checkpoint is written."""
    row = {"step_loss": metric_float(np.mean(run.losses))}
    for name, data in eval_data.items():
        row.update({f"{name}_{metric}": value for metric, value in evaluate(state, data).items()})
    run.history["epoch"].append(run.epoch + 1)
    for name, value in row.items():
        run.history.setdefault(name, []).append(value)
    run.record("epoch", row)
    run.epoch, run.step, run.losses = run.epoch + 1, 0, []
    due = run.unit == "epochs" and run.epoch % run.every == 0
    if run.directory is not None and (due or last):
        run.save(state, identity)
