"""The training layer: the per-example convention and what is built on it.

- :func:`per_example`: ``apply_fn`` (written for one example) vmapped over a batch with example keys,
  the vmap named :data:`BATCH_AXIS` for batch statistics; :func:`takes_batch` marks functions that take
  the batch with its example keys directly;
- the loop: :class:`TrainState` (also from flax linen, nnx and equinox models: :meth:`TrainState.from_linen`,
  :meth:`TrainState.from_nnx`, :meth:`TrainState.from_equinox`), :func:`train_step`, :func:`eval_step`,
  :func:`evaluate`, :func:`train_epoch`, :func:`fit` (resumable checkpoints, logging to :class:`CSVLogger` /
  :class:`JSONLinesLogger` or any function);
- losses: :func:`softmax_cross_entropy`, :func:`rdrop_loss` (R-Drop) and its :func:`symmetric_kl`;
- prediction: :func:`mc_predict` (Monte-Carlo dropout);
- optax transformations: :func:`max_norm`.
"""

from jdrop._batching import takes_batch as takes_batch
from jdrop.train._constraints import MaxNormState as MaxNormState
from jdrop.train._constraints import max_norm as max_norm
from jdrop.train._fit import fit as fit
from jdrop.train._logging import CSVLogger as CSVLogger
from jdrop.train._logging import JSONLinesLogger as JSONLinesLogger
from jdrop.train._loop import eval_step as eval_step
from jdrop.train._loop import evaluate as evaluate
from jdrop.train._loop import train_epoch as train_epoch
from jdrop.train._loop import train_step as train_step
from jdrop.train._losses import softmax_cross_entropy as softmax_cross_entropy
from jdrop.train._mc import ClassificationPrediction as ClassificationPrediction
from jdrop.train._mc import RegressionPrediction as RegressionPrediction
from jdrop.train._mc import mc_predict as mc_predict
from jdrop.train._per_example import BATCH_AXIS as BATCH_AXIS
from jdrop.train._per_example import per_example as per_example
from jdrop.train._rdrop import rdrop_loss as rdrop_loss
from jdrop.train._rdrop import symmetric_kl as symmetric_kl
from jdrop.train._state import Batch as Batch
from jdrop.train._state import BatchFormat as BatchFormat
from jdrop.train._state import LossFn as LossFn
from jdrop.train._state import TrainState as TrainState

__all__ = [
    "BATCH_AXIS",
    "Batch",
    "BatchFormat",
    "CSVLogger",
    "ClassificationPrediction",
    "JSONLinesLogger",
    "LossFn",
    "MaxNormState",
    "RegressionPrediction",
    "TrainState",
    "eval_step",
    "evaluate",
    "fit",
    "max_norm",
    "mc_predict",
    "per_example",
    "rdrop_loss",
    "softmax_cross_entropy",
    "symmetric_kl",
    "takes_batch",
    "train_epoch",
    "train_step",
]
