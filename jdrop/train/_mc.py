"""Monte-Carlo dropout prediction: the predictive distribution from stochastic forward passes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jdrop import masks
from jdrop._typing import KeyLike
from jdrop._validation import canonical_axis, check_choice, positive_int
from jdrop.train._per_example import call_apply, check_apply_fn, per_example

__all__ = ["ClassificationPrediction", "RegressionPrediction", "mc_predict"]

Task = Literal["regression", "classification"]


class RegressionPrediction(NamedTuple):
    """Predictive mean and variance of the outputs over dropout samples."""

    mean: jax.Array
    variance: jax.Array


class ClassificationPrediction(NamedTuple):
    """Mean class probabilities, predictive entropy and mutual information (BALD), in nats."""

    probs: jax.Array
    predictive_entropy: jax.Array
    mutual_information: jax.Array


def _entropy(log_probs: jax.Array) -> jax.Array:
    return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def mc_predict(
    apply_fn: Callable[..., jax.Array],
    params: Any,
    x: ArrayLike,
    key: KeyLike,
    num_samples: int,
    *,
    task: Task = "regression",
    chunk_size: int | None = None,
    batch_axis: int | None = 0,
    hparams: Mapping[str, Any] | None = None,
) -> RegressionPrediction | ClassificationPrediction:
    """Monte-Carlo dropout (Gal & Ghahramani 2016, "Dropout as a Bayesian Approximation").

    Runs ``S = num_samples`` training-mode passes ``f_s`` of ``apply_fn`` (dropout on), sample ``s``
    keyed by ``k_s = jdrop.example_keys(key, S)[s]`` (so sample ``s`` is the same whatever the chunking), and
    summarises them::

        regression      mean = (1/S) sum_s f_s          variance = (1/S) sum_s (f_s - mean)**2
        classification  p_s = softmax(f_s)  (f_s are logits),  p = (1/S) sum_s p_s
                        predictive_entropy  = H[p] = -sum_c p_c log p_c
                        mutual_information  = H[p] - (1/S) sum_s H[p_s]   (BALD, Houlsby et al. 2011)

    (the mutual information is >= 0 by concavity of H; rounding below 0 is clipped to 0).

    The variance is the model (epistemic) part; add the observation noise ``1 / tau`` for the full
    predictive variance of the paper. The computation is jit-compiled (reuse the same ``apply_fn`` object to
    reuse the compilation). Samples run vectorised with ``jax.vmap``; with ``chunk_size``
    they run ``chunk_size`` at a time in a ``lax.scan`` that carries running statistics (Chan et
    al.'s parallel mean/variance update), so memory does not grow with ``num_samples``.

    ``apply_fn(params, x, *, key, deterministic, **hparams)`` follows the jdrop convention: it is written for
    ONE example, and by default runs per example through :func:`jdrop.train.per_example` (vmap over axis
    ``batch_axis=0`` of ``x``, example ``i`` of sample ``s`` keyed by ``jdrop.example_keys(k_s, n)[i]``), as
    :func:`jdrop.train_step` does; a function marked :func:`jdrop.train.takes_batch` (``jdrop.mlp.apply``)
    gets the batch with those keys at once. ``batch_axis=None`` calls ``apply_fn(params, x, key=k_s,
    deterministic=False)`` on ``x`` whole instead, one key per sample for all of ``x`` (what mc_predict did
    by default until the one-example rule was applied to it; pass it to keep that behaviour).

    Args:
      apply_fn: the model.
      params: its parameters.
      x: inputs.
      key: PRNG key.
      num_samples: number of dropout samples ``S``.
      task: ``"regression"`` or ``"classification"``.
      chunk_size: samples per vectorised chunk (None: all at once).
      batch_axis: the example axis of ``x`` (default 0); None calls ``apply_fn`` on ``x`` whole.
      hparams: keyword arguments of ``apply_fn`` (arrays, e.g. traced ``rates``), as in a ``TrainState``.

    Returns:
      :class:`RegressionPrediction` or :class:`ClassificationPrediction`; the leading sample axis is
      reduced, the rest has the output's shape (without the class axis for the entropies).

    Example::

      >>> apply_fn = functools.partial(jdrop.mlp.apply, rates=(0.0, 0.5))
      >>> prediction = jdrop.mc_predict(apply_fn, params, x_test, jax.random.key(0), 100, task="classification")
      >>> prediction.probs, prediction.mutual_information      # (n, classes), (n,)
    """
    check_apply_fn(apply_fn)
    check_choice(task, ("regression", "classification"), name="task")
    num_samples = positive_int(num_samples, name="num_samples")
    chunk = num_samples if chunk_size is None else min(positive_int(chunk_size, name="chunk_size"), num_samples)
    key = masks.require_key(key, what="jdrop.mc_predict", eval_hint="apply_fn(..., deterministic=True)")
    axis = None if batch_axis is None else canonical_axis(batch_axis, jnp.ndim(x), name="batch_axis")
    return _mc_predict(apply_fn, params, x, key, dict(hparams or {}), num_samples, task, chunk, axis)


@partial(jax.jit, static_argnums=(0, 5, 6, 7, 8))
def _mc_predict(
    apply_fn: Callable[..., jax.Array],
    params: Any,
    x: ArrayLike,
    key: jax.Array,
    hparams: dict[str, Any],
    num_samples: int,
    task: str,
    chunk: int,
    axis: int | None,
) -> RegressionPrediction | ClassificationPrediction:
    """The compiled body of :func:`mc_predict` (static: ``apply_fn``, counts, task, axis)."""
    if axis is None:

        def sample(sample_key: jax.Array) -> jax.Array:
            return call_apply(apply_fn, params, x, sample_key, False, hparams)

    else:

        def sample(sample_key: jax.Array) -> jax.Array:
            return per_example(apply_fn, params, x, sample_key, hparams=hparams, axis=axis)

    def chunk_stats(keys: jax.Array) -> tuple[jax.Array, ...]:
        outputs = jax.vmap(sample)(keys)
        count = jnp.asarray(keys.shape[0], jnp.float32)
        if task == "regression":
            outputs = outputs.astype(jnp.promote_types(outputs.dtype, jnp.float32))
            mean = jnp.mean(outputs, axis=0)
            return count, mean, jnp.sum(jnp.square(outputs - mean), axis=0)
        log_probs = jax.nn.log_softmax(outputs.astype(jnp.promote_types(outputs.dtype, jnp.float32)), axis=-1)
        return count, jnp.mean(jnp.exp(log_probs), axis=0), jnp.mean(_entropy(log_probs), axis=0)

    def combine(a: tuple[jax.Array, ...], b: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        count = a[0] + b[0]
        delta = b[1] - a[1]
        mean = a[1] + delta * (b[0] / count)
        if task == "regression":  # Chan, Golub & LeVeque's pairwise update of the sum of squares
            return count, mean, a[2] + b[2] + jnp.square(delta) * (a[0] * b[0] / count)
        return count, mean, a[2] + (b[2] - a[2]) * (b[0] / count)

    keys = masks.example_keys(key, num_samples)
    full = num_samples // chunk
    stats = chunk_stats(keys[:chunk])
    if full > 1:
        chunked = keys[chunk : full * chunk].reshape(full - 1, chunk)
        stats = lax.scan(lambda carry, k: (combine(carry, chunk_stats(k)), None), stats, chunked)[0]
    if full * chunk < num_samples:
        stats = combine(stats, chunk_stats(keys[full * chunk :]))
    _, mean, spread = stats
    if task == "regression":
        return RegressionPrediction(mean, spread / num_samples)
    predictive = _entropy(jnp.log(jnp.maximum(mean, jnp.finfo(mean.dtype).tiny)))
    return ClassificationPrediction(mean, predictive, jnp.maximum(predictive - spread, 0.0))
