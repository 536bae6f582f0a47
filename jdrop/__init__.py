"""jdrop: dropout for JAX, fast, light on memory, and provably correct.

The package face re-exports the public names; the code lives in one module per concept:
``jdrop.masks`` (keys to masks), ``jdrop.dropout`` and friends (the custom_vjp core), ``jdrop.mlp``
(the seed's network) and ``jdrop.train`` (the training loop).
"""

from jdrop import checkpoint as checkpoint
from jdrop import distributed as distributed
from jdrop import masks as masks
from jdrop import mlp as mlp
from jdrop import train as train
from jdrop._dropout import DropoutResidual as DropoutResidual
from jdrop._dropout import dropout as dropout
from jdrop._dropout import dropout_bwd as dropout_bwd
from jdrop._dropout import dropout_fwd as dropout_fwd
from jdrop.masks import example_keys as example_keys
from jdrop.masks import keep_mask as keep_mask
from jdrop.train import TrainState as TrainState
from jdrop.train import eval_step as eval_step
from jdrop.train import evaluate as evaluate
from jdrop.train import fit as fit
from jdrop.train import max_norm as max_norm
from jdrop.train import softmax_cross_entropy as softmax_cross_entropy
from jdrop.train import train_epoch as train_epoch
from jdrop.train import train_step as train_step

__version__ = "0.1.0"
