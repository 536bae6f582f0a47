"""Loggers for :func:`jdrop.fit`: plain callables taking one record (a dict of numbers) at a time.

``fit(..., log=fn)`` calls ``fn(record)`` after every training step (``record["kind"] == "step"``: the
epoch, the global step count and the step's metrics) and after every epoch (``"epoch"``: the epoch, the
step count, the mean step loss and the evaluations, the row ``history`` gains). Any function works
(``print``, a wandb or tensorboard writer); :class:`CSVLogger` and :class:`JSONLinesLogger` write files.
Both append and flush every record, so a file survives a crash up to its last record; a resumed run logs
again the records written after its checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from jdrop._validation import check_choice

__all__ = ["CSVLogger", "JSONLinesLogger", "Record"]

Record = dict[str, Any]
"""One log record: ``{"kind": "step" | "epoch", "epoch": int, "step": int, <metric>: float, ...}``."""


class CSVLogger:
    """Appends the records of one kind to a CSV file, one row each, columns from the first record.

    Example::

      >>> state, history = jdrop.fit(state, data, key=key, epochs=3, batch_size=32,
      ...                            log=jdrop.train.CSVLogger("epochs.csv"))

    Args:
      path: the CSV file (created with a header, or appended to under its existing header).
      kind: which records to write: ``"epoch"`` (default, one row per epoch) or ``"step"``.
    """

    def __init__(self, path: str | os.PathLike[str], *, kind: str = "epoch") -> None:
        self.path = Path(path)
        self.kind = check_choice(kind, ("epoch", "step"), name="kind")
        self.columns: list[str] | None = None
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open(newline="") as handle:
                self.columns = next(csv.reader(handle), None)

    def __call__(self, record: Record) -> None:
        if record.get("kind") != self.kind:
            return
        row = {name: value for name, value in record.items() if name != "kind"}
        new = self.columns is None
        if self.columns is None:
            self.columns = list(row)
        unknown = set(row) - set(self.columns)
        if unknown:
            raise ValueError(
                f"{self.path} has the columns {self.columns}; a record adds {sorted(unknown)}: log it to a new file."
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns, restval="")
            if new:
                writer.writeheader()
            writer.writerow(row)


class JSONLinesLogger:
    """Appends every record (steps and epochs) to a JSON-lines file, one JSON object per line.

    Read it back with ``[json.loads(line) for line in open(path)]`` or ``pandas.read_json(path, lines=True)``.

    Args:
      path: the file (appended to).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __call__(self, record: Record) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
