"""jdrop: dropout for JAX, fast, light on memory, and provably correct.

The package face re-exports the public names; the code lives in one module per concept.
"""

from jdrop import masks as masks
from jdrop._dropout import DropoutResidual as DropoutResidual
from jdrop._dropout import dropout as dropout
from jdrop._dropout import dropout_bwd as dropout_bwd
from jdrop._dropout import dropout_fwd as dropout_fwd
from jdrop.masks import example_keys as example_keys
from jdrop.masks import keep_mask as keep_mask

__version__ = "0.1.0"
