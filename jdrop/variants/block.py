"""DropBlock: contiguous square regions of 2-D feature maps dropped together."""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jdrop import masks
from jdrop._batching import AUTO, BatchAxis, resolve_batch_axis
from jdrop._dropout import dropout
from jdrop._typing import KeyLike
from jdrop._validation import (
    check_channel_and_batch_axes,
    check_deterministic,
    check_float_input,
    check_rate,
    nan_unless_valid,
    positive_int,
    require_key,
    static_bool,
)

__all__ = ["dropblock"]


def _layout(ndim: int, channel_axis: Any, batch_axis: Any) -> tuple[int, tuple[int, int]]:
    """``(channel, (height, width))`` axes of a 2-D feature map, batched or not."""
    expected = 3 if batch_axis is None else 4
    if ndim != expected:
        raise ValueError(
            f"dropblock works on 2-D feature maps: `x` must have rank {expected} "
            f"({'(H, W, C)' if batch_axis is None else '(B, H, W, C)'} or any order set by `channel_axis`"
            f"{'' if batch_axis is None else ' and `batch_axis`'}), got rank {ndim}."
        )
    channel, batch = check_channel_and_batch_axes(ndim, channel_axis=channel_axis, batch_axis=batch_axis)
    height, width = (axis for axis in range(ndim) if axis not in (channel, batch))
    return channel, (height, width)


def _valid_centres(shape: tuple[int, ...], axis: int, block: int) -> np.ndarray:
    """Bool along ``axis`` (size 1 elsewhere): centres whose block lies inside the map (the reference's rule)."""
    size = shape[axis]
    index = np.arange(size)
    valid = (index >= block // 2) & (index < size - (block - 1) // 2)
    return valid.reshape([size if a == axis else 1 for a in range(len(shape))])


def dropblock(
    key: KeyLike | None,
    x: ArrayLike,
    rate: ArrayLike,
    block_size: int,
    *,
    channel_axis: int = -1,
    batch_axis: BatchAxis = AUTO,
    couple_channels: bool = True,
    deterministic: bool = False,
) -> jax.Array:
    """DropBlock (Ghiasi, Lin & Le 2018, "DropBlock: A regularization method for convolutional networks").

    Drops ``block_size x block_size`` squares of a 2-D feature map. Block centres are drawn with
    probability ``gamma`` among the centres whose block fits in the map, every position within a
    dropped block is dropped, and the kept activations are rescaled so that their total is kept::

        gamma  = rate * H * W / (bh * bw) / ((H - bh + 1) * (W - bw + 1))
                 with bh = min(block_size, H), bw = min(block_size, W)
        drop   = max-pool of the dropped centres over the block (centre at offset block_size // 2)
        train  y = x * (1 - drop) * count / kept          eval  y = x

    where ``count`` is the number of mask positions and ``kept`` the number kept, over the whole
    mask (the batch, as the reference implementation and timm do). ``gamma`` is the paper's Eq. (1),
    so about ``rate`` of the positions are dropped (a little less where blocks overlap). Even block
    sizes follow the reference's SAME padding: a block covers rows ``c - block_size // 2`` to
    ``c + (block_size - 1) // 2`` around its centre ``c``.

    This is the TF reference implementation (``tensorflow/tpu`` ResNet ``dropblock``), which drops
    per channel, when ``couple_channels=False`` (also timm's ``drop_block_2d``); the default
    ``couple_channels=True`` draws one block pattern per example and shares it across channels.
    Deliberate differences: non-square maps are allowed (the reference requires H = W); when nothing
    is kept the output is 0 (not NaN) and ``rate = 1`` drops everything (the reference's ``gamma``
    does not). The centres come from ``jdrop.keep_mask(key, mask_shape, gamma)`` (a centre is
    dropped where it is not kept); the backward pass (``dx = dy * (1 - drop) * count / kept``)
    recomputes the mask from the key instead of storing it. No gradient flows to ``rate``.

    Args:
      key: PRNG key (may be None when ``deterministic``).
      x: floating feature maps, ``(B, H, W, C)`` for a batch, ``(H, W, C)`` for one example.
      rate: target fraction of dropped positions, in [0, 1]; may be traced.
      block_size: side of the dropped squares (clipped to the map), odd or even.
      channel_axis: the channel axis (1 for PyTorch's ``(B, C, H, W)``).
      batch_axis: the example axis; None: the whole input is one example; ``"auto"`` (default): None
        while jdrop runs a one-example ``apply_fn`` (``train_step``, ``per_example``, ``mc_predict``), else 0.
      couple_channels: one block pattern for all channels of an example (else one per channel).
      deterministic: evaluation mode (identity).

    Returns:
      Array of ``x``'s shape and dtype.
    """
    x = check_float_input(x)
    deterministic = check_deterministic(deterministic)
    block_size = positive_int(block_size, name="block_size")
    channel, (height, width) = _layout(x.ndim, channel_axis, resolve_batch_axis(batch_axis))
    couple_channels = static_bool(couple_channels, name="couple_channels")
    rate = check_rate(rate)
    if isinstance(rate, float) and (deterministic or rate == 0.0):
        return x
    if deterministic:
        return dropout(None, x, rate, deterministic=True)  # the core's evaluation: x (NaN for an invalid rate)
    key = require_key(key, what="dropblock")
    mask_shape = tuple(1 if couple_channels and axis == channel else size for axis, size in enumerate(x.shape))
    block_h, block_w = min(block_size, x.shape[height]), min(block_size, x.shape[width])
    centres_h, centres_w = x.shape[height] - block_h + 1, x.shape[width] - block_w + 1
    gamma_factor = x.shape[height] * x.shape[width] / (block_h * block_w) / (centres_h * centres_w)
    valid = _valid_centres(mask_shape, height, block_h) & _valid_centres(mask_shape, width, block_w)
    window = [1] * x.ndim
    window[height], window[width] = block_h, block_w
    padding = [(0, 0)] * x.ndim
    padding[height] = ((block_h - 1) // 2, block_h // 2)
    padding[width] = ((block_w - 1) // 2, block_w // 2)
    dtype = jnp.promote_types(x.dtype, jnp.float32)

    def apply(key: jax.Array, x: jax.Array, gamma: Any, everything: Any) -> jax.Array:
        centres = (~masks.keep_mask(key, mask_shape, gamma) & valid).astype(jnp.float32)
        dropped = lax.reduce_window(centres, np.float32(0), lax.max, window, [1] * x.ndim, padding)
        kept = jnp.where(everything, 0.0, 1.0 - dropped)
        kept_count = jnp.sum(kept)
        normalise = jnp.where(kept_count > 0, kept.size / jnp.where(kept_count > 0, kept_count, 1.0), 0.0)
        return x * (kept * normalise).astype(x.dtype)

    # jax.checkpoint: the backward pass redraws the mask from the key rather than keeping it.
    if isinstance(rate, float):  # a static gamma keeps keep_mask's static threshold
        static = partial(apply, gamma=min(rate * gamma_factor, 1.0), everything=rate == 1.0)
        return jax.checkpoint(static)(key, x.astype(dtype)).astype(x.dtype)
    gamma = jnp.clip(lax.stop_gradient(rate) * gamma_factor, 0.0, 1.0)
    y = jax.checkpoint(apply)(key, x.astype(dtype), gamma, rate >= 1.0)
    return (y * nan_unless_valid(rate, dtype)).astype(x.dtype)
