"""Save and restore a TrainState (or any pytree of arrays) as one ``.npz`` file, atomically.

Format: a NumPy ``.npz`` archive with one array per leaf (``leaf_00000``, ... in
``jax.tree_util`` order) and ``__meta__``, a JSON string holding the format version, every
leaf's key path, every leaf's dtype and shape, optional user ``metadata`` (JSON, e.g. a training loop's
counters) and a SHA-256 of all leaf bytes and the metadata. PRNG key leaves are stored as their key data
plus the key implementation's name.

Atomicity: the archive is written to a temporary file in the destination directory, flushed and
fsynced, then moved over the destination with ``os.replace`` (atomic on POSIX and Windows), and the
directory is fsynced. A crash mid-save leaves the previous checkpoint untouched; a file that was
cut short or altered fails the checksum on restore instead of loading as valid but wrong.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np

__all__ = ["metadata", "restore", "save"]

FORMAT_VERSION = 1
T = TypeVar("T")


def _leaf_to_numpy(leaf: Any) -> tuple[np.ndarray, str | None]:
    if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(leaf)), str(jax.random.key_impl(leaf))
    return np.asarray(leaf), None


def _paths_and_leaves(tree: Any) -> tuple[list[str], list[Any]]:
    """Leaves with their key paths (``.params.weights[0]``): stable across processes, unlike the
    treedef's text, which shows static fields such as ``apply_fn`` by address."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(p) for p, _ in flat], [leaf for _, leaf in flat]


def _digest(arrays: list[np.ndarray], user: Any = None) -> str:
    sha = hashlib.sha256()
    for array in arrays:
        sha.update(str((array.dtype.str, array.shape)).encode())
        sha.update(np.ascontiguousarray(array).tobytes())
    if user is not None:  # checkpoints without metadata keep the digest they always had
        sha.update(json.dumps(user, sort_keys=True).encode())
    return sha.hexdigest()


def save(path: str | os.PathLike[str], tree: Any, *, metadata: dict[str, Any] | None = None) -> Path:
    """Writes ``tree`` (e.g. a :class:`jdrop.TrainState`) to ``path`` atomically.

    Static fields (``apply_fn``, ``tx``) are not stored: :func:`restore` takes them from a
    template. ``metadata`` (a JSON-serialisable dict) is stored beside the arrays and read back by
    :func:`metadata`. Returns the path written.

    Raises:
      TypeError: if ``metadata`` is not a dict or not JSON-serialisable.
    """
    path = Path(path)
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise TypeError(f"`metadata` must be a dict, got {type(metadata).__name__}.")
        try:
            metadata = json.loads(json.dumps(metadata))
        except (TypeError, ValueError) as err:
            raise TypeError(f"`metadata` must be JSON-serialisable (numbers, strings, lists, dicts): {err}") from err
    paths, leaves = _paths_and_leaves(tree)
    converted = [_leaf_to_numpy(leaf) for leaf in leaves]
    arrays = [array for array, _ in converted]
    meta = {
        "format": "jdrop-checkpoint",
        "version": FORMAT_VERSION,
        "paths": paths,
        "leaves": [{"dtype": a.dtype.str, "shape": list(a.shape), "key_impl": impl} for a, impl in converted],
        "sha256": _digest(arrays, metadata),
    }
    if metadata is not None:
        meta["metadata"] = metadata
    buffer = io.BytesIO()
    entries: dict[str, Any] = {f"leaf_{i:05d}": a for i, a in enumerate(arrays)}
    entries["__meta__"] = np.array(json.dumps(meta))
    np.savez(buffer, **entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def _read(path: Path) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The checked ``__meta__`` and arrays of a checkpoint, or ``ValueError`` saying what is wrong with it."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["__meta__"]))
            arrays = [archive[f"leaf_{i:05d}"] for i in range(len(meta["leaves"]))]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is not a readable jdrop checkpoint: {err}") from err
    if meta.get("format") != "jdrop-checkpoint" or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a jdrop checkpoint of format version {FORMAT_VERSION}.")
    if _digest(arrays, meta.get("metadata")) != meta["sha256"]:
        raise ValueError(f"{path} is corrupt: its contents do not match the stored SHA-256.")
    return meta, arrays


def metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``metadata`` dict saved with the checkpoint at ``path`` (empty if none was given).

    Raises:
      ValueError: if the file is not a jdrop checkpoint or is corrupt.
    """
    return dict(_read(Path(path))[0].get("metadata") or {})


def restore(path: str | os.PathLike[str], template: T) -> T:
    """Reads a checkpoint written by :func:`save` into the structure of ``template``.

    ``template`` supplies the tree structure and the static fields (e.g. a freshly created
    ``TrainState`` with the same ``apply_fn`` and ``tx``); its leaf values are ignored.

    Raises:
      ValueError: if the file is not a jdrop checkpoint, is corrupt (checksum mismatch), or does not
        match the template's structure, shapes or dtypes.
    """
    path = Path(path)
    meta, arrays = _read(path)
    paths, leaves = _paths_and_leaves(template)
    if paths != meta["paths"]:
        raise ValueError(f"{path} holds a different tree than the template: leaves {meta['paths']} vs {paths}.")
    restored = []
    for i, (leaf, array, info) in enumerate(zip(leaves, arrays, meta["leaves"])):
        expected, impl = _leaf_to_numpy(leaf)
        if expected.shape != array.shape or expected.dtype != array.dtype or impl != info["key_impl"]:
            raise ValueError(
                f"{path}: leaf {i} has dtype {array.dtype} and shape {array.shape}, the template expects "
                f"{expected.dtype} and {expected.shape}."
            )
        value = jax.numpy.asarray(array)
        restored.append(jax.random.wrap_key_data(value, impl=impl) if impl else value)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), restored)
