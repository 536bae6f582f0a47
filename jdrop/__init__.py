"""jdrop: dropout for JAX, fast, light on memory, and provably correct.

The package face re-exports the public names; the code lives in one module per concept:
``jdrop.masks`` (keys to masks), ``jdrop.dropout`` and friends (the custom_vjp core),
``jdrop.dot_product_attention`` (fused blockwise attention with dropout, sequence-parallel with
``axis_name=``; ``jdrop.sequence_parallel_attention`` on global arrays), ``jdrop.mlp``
(the seed's network), ``jdrop.train`` (the per-example convention, the training loop, losses, MC prediction),
``jdrop.variants`` (every other dropout, on the same core), ``jdrop.distributed``, ``jdrop.checkpoint`` and
``jdrop.interop`` (flax and equinox modules, imported on demand).

Conventions
-----------
One spelling per idea, in every public function:

- **Evaluation flag**: ``deterministic: bool`` (flax's name), a static Python bool, False by default:
  ``jdrop.dropout(key, x, rate, deterministic=True)``, every variant, ``jdrop.dot_product_attention``,
  ``jdrop.mlp.apply`` and the training functions; the one-example ``apply_fn`` that ``jdrop.train``
  vmaps gets ``deterministic=`` (or ``train=``, the original contract, if that is what it declares).
  Where jdrop took ``train=`` it still does, with a ``DeprecationWarning`` (``train=t`` is
  ``deterministic=not t``). The
  framework adapters keep their framework's flag (``deterministic`` in flax, ``inference`` in equinox).
- **Key position**: a random op takes its key first, as ``jax.random`` does: ``op(key, x, ...)`` (the
  core, every variant, ``keep_mask``, ``example_keys``, ``mlp.init``). A function whose first argument is
  a model (``params``, ``state``, ``apply_fn``) takes the key after its data, ``train_step(state, batch,
  key)``, ``mc_predict(apply_fn, params, x, key, num_samples)``, ``mlp.forward(params, x, key, rates)``, or
  as ``key=`` where it is optional (``mlp.apply``, ``fit``). No public function had to move its key to
  follow this. ``jdrop.dot_product_attention`` keeps flax's signature (``dropout_rng=``), to be a drop-in
  ``attention_fn``.
- **Scaling**: ``scale="inverted"`` (default: ``m * x / keep`` in training, ``x`` at evaluation) or
  ``"classic"`` (``m * x`` in training, ``keep * x`` at evaluation; Srivastava et al. 2014), in the core
  and every variant that is a Bernoulli mask and a scale (feature, locked, embedding, attention
  dropout, drop path, DropConnect, ``mlp``). ``drop_path`` also takes timm's ``scale_by_keep`` (True:
  inverted; False: timm's unscaled branch, whose evaluation stays the identity). Variants whose formula
  fixes the scale (alpha, Gaussian, concrete, DropBlock, zoneout) have no ``scale``.
- **Rates**: a Python float or a traced scalar in [0, 1] (one compilation serves every rate). A static
  rate outside it raises ``ValueError`` at trace time; a traced one makes every output element and every
  gradient NaN, the same way in every op and in evaluation too (``jdrop._validation.nan_unless``).
- **Bad arguments**: ``TypeError`` for the wrong kind of value, ``ValueError`` for the right kind out of
  range, naming the argument and what is allowed, with one wording per rule (``jdrop._validation``); a
  missing key in training raises ``ValueError`` saying what to pass (for equinox code, also a
  ``RuntimeError``).
"""

from jdrop import attention as attention
from jdrop import checkpoint as checkpoint
from jdrop import distributed as distributed
from jdrop import interop as interop
from jdrop import masks as masks
from jdrop import mlp as mlp
from jdrop import train as train
from jdrop import variants as variants
from jdrop._dropout import DropoutResidual as DropoutResidual
from jdrop._dropout import dropout as dropout
from jdrop._dropout import dropout_bwd as dropout_bwd
from jdrop._dropout import dropout_fwd as dropout_fwd
from jdrop.attention import dot_product_attention as dot_product_attention
from jdrop.attention import sequence_parallel_attention as sequence_parallel_attention
from jdrop.masks import example_keys as example_keys
from jdrop.masks import keep_mask as keep_mask
from jdrop.train import ClassificationPrediction as ClassificationPrediction
from jdrop.train import RegressionPrediction as RegressionPrediction
from jdrop.train import TrainState as TrainState
from jdrop.train import eval_step as eval_step
from jdrop.train import evaluate as evaluate
from jdrop.train import fit as fit
from jdrop.train import max_norm as max_norm
from jdrop.train import mc_predict as mc_predict
from jdrop.train import rdrop_loss as rdrop_loss
from jdrop.train import softmax_cross_entropy as softmax_cross_entropy
from jdrop.train import symmetric_kl as symmetric_kl
from jdrop.train import train_epoch as train_epoch
from jdrop.train import train_step as train_step
from jdrop.variants import DropConnectMoments as DropConnectMoments
from jdrop.variants import alpha_dropout as alpha_dropout
from jdrop.variants import attention_dropout as attention_dropout
from jdrop.variants import concrete_dropout as concrete_dropout
from jdrop.variants import concrete_dropout_regulariser as concrete_dropout_regulariser
from jdrop.variants import constant_schedule as constant_schedule
from jdrop.variants import drop_path as drop_path
from jdrop.variants import drop_path_rates as drop_path_rates
from jdrop.variants import dropblock as dropblock
from jdrop.variants import dropconnect as dropconnect
from jdrop.variants import dropconnect_moments as dropconnect_moments
from jdrop.variants import dropconnect_predict as dropconnect_predict
from jdrop.variants import early_dropout_schedule as early_dropout_schedule
from jdrop.variants import embedding_dropout as embedding_dropout
from jdrop.variants import feature_alpha_dropout as feature_alpha_dropout
from jdrop.variants import feature_dropout as feature_dropout
from jdrop.variants import gaussian_dropout as gaussian_dropout
from jdrop.variants import gaussian_noise as gaussian_noise
from jdrop.variants import late_dropout_schedule as late_dropout_schedule
from jdrop.variants import linear_schedule as linear_schedule
from jdrop.variants import locked_dropout as locked_dropout
from jdrop.variants import zoneout as zoneout

__version__ = "0.1.0"
