"""``fit``: epochs of :func:`jdrop.train_epoch` with evaluation and a tqdm progress bar."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from jdrop import masks
from jdrop._typing import KeyLike
from jdrop.train._loop import evaluate, train_epoch
from jdrop.train._state import Batch, TrainState

__all__ = ["fit"]


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
) -> tuple[TrainState, dict[str, list[float]]]:
    """Trains for ``epochs`` epochs with :func:`train_epoch`, evaluating after each, with a tqdm bar.

    Epoch ``e`` uses ``fold_in(key, e)``; ``mesh`` shards the minibatches (:func:`train_epoch`).
    ``eval_data`` maps a name (e.g. ``"train"``, ``"test"``)
    to a data set evaluated deterministically after every epoch.

    Returns:
      ``(state, history)`` where ``history["step_loss"]`` holds the mean training-step loss per
      epoch and ``history[f"{name}_{metric}"]`` the evaluations.
    """
    key = masks.canonical_key(key)
    history: dict[str, list[float]] = {"epoch": [], "step_loss": []}
    bar: Any = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="epochs")
    for epoch in bar:
        state, metrics = train_epoch(
            state, train_data, masks.fold_in(key, epoch), batch_size=batch_size, mesh=mesh
        )
        history["epoch"].append(epoch + 1)
        history["step_loss"].append(float(metrics["loss"]))
        for name, data in (eval_data or {}).items():
            for metric, value in evaluate(state, data).items():
                history.setdefault(f"{name}_{metric}", []).append(value)
        if progress:
            bar.set_postfix({k: f"{v[-1]:.3f}" for k, v in history.items() if k != "epoch"})
    return state, history
