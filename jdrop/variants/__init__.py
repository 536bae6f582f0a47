"""Dropout variants: each is a mask from :mod:`jdrop.masks` plus a scale, run through the one core.

One module per concept; this package face re-exports the public names (``jdrop`` re-exports them too).
Monte-Carlo prediction and R-Drop are training-level tools built on the per-example convention; they
live in :mod:`jdrop.train` (``jdrop.mc_predict``, ``jdrop.rdrop_loss``), and their old names here
still work.
"""

import importlib
from typing import Any

from jdrop.variants.alpha import alpha_dropout as alpha_dropout
from jdrop.variants.alpha import feature_alpha_dropout as feature_alpha_dropout
from jdrop.variants.attention import attention_dropout as attention_dropout
from jdrop.variants.block import dropblock as dropblock
from jdrop.variants.concrete import concrete_dropout as concrete_dropout
from jdrop.variants.concrete import concrete_dropout_regulariser as concrete_dropout_regulariser
from jdrop.variants.feature import feature_dropout as feature_dropout
from jdrop.variants.gaussian import gaussian_dropout as gaussian_dropout
from jdrop.variants.gaussian import gaussian_noise as gaussian_noise
from jdrop.variants.recurrent import embedding_dropout as embedding_dropout
from jdrop.variants.recurrent import locked_dropout as locked_dropout
from jdrop.variants.recurrent import zoneout as zoneout
from jdrop.variants.schedules import constant_schedule as constant_schedule
from jdrop.variants.schedules import early_dropout_schedule as early_dropout_schedule
from jdrop.variants.schedules import late_dropout_schedule as late_dropout_schedule
from jdrop.variants.schedules import linear_schedule as linear_schedule
from jdrop.variants.stochastic_depth import drop_path as drop_path
from jdrop.variants.stochastic_depth import drop_path_rates as drop_path_rates
from jdrop.variants.weight import DropConnectMoments as DropConnectMoments
from jdrop.variants.weight import dropconnect as dropconnect
from jdrop.variants.weight import dropconnect_moments as dropconnect_moments
from jdrop.variants.weight import dropconnect_predict as dropconnect_predict

__all__ = [
    "DropConnectMoments",
    "alpha_dropout",
    "attention_dropout",
    "concrete_dropout",
    "concrete_dropout_regulariser",
    "constant_schedule",
    "drop_path",
    "drop_path_rates",
    "dropblock",
    "dropconnect",
    "dropconnect_moments",
    "dropconnect_predict",
    "early_dropout_schedule",
    "embedding_dropout",
    "feature_alpha_dropout",
    "feature_dropout",
    "gaussian_dropout",
    "gaussian_noise",
    "late_dropout_schedule",
    "linear_schedule",
    "locked_dropout",
    "zoneout",
]

_MOVED_TO_TRAIN = ("ClassificationPrediction", "RegressionPrediction", "mc_predict", "rdrop_loss", "symmetric_kl")


def __getattr__(name: str) -> Any:
    # Resolved on use, so that importing the variants never imports the layer above them.
    if name in _MOVED_TO_TRAIN:
        return getattr(importlib.import_module("jdrop.train"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
