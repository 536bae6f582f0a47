"""The MLP of the memory and step benchmarks, written once in each framework.

``layer_sizes = (width,) * (depth + 1) + (classes,)``: ``depth`` hidden ReLU layers of ``width``
units on a ``width``-wide input, dropout at ``rate`` after every hidden layer (none on the
input), softmax cross-entropy on ``classes`` logits. The training step is plain SGD (optax) with
the parameters and optimiser state donated, so that XLA may update them in place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

FRAMEWORKS = ("none", "jdrop", "flax.linen", "equinox", "haiku")
BASELINE = "no dropout"


@dataclasses.dataclass(frozen=True)
class Config:
    """The network and batch: ``depth`` hidden layers of ``width``, batches of ``batch`` examples."""

    batch: int
    width: int
    depth: int
    classes: int = 10
    rate: float = 0.5
    learning_rate: float = 1e-3

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        """Input, hidden and output sizes: ``depth + 1`` weight layers."""
        return (self.width,) * (self.depth + 1) + (self.classes,)

    @property
    def rates(self) -> tuple[float, ...]:
        """Drop rate on the input of each weight layer: none on the input, ``rate`` after each hidden layer."""
        return (0.0,) + (self.rate,) * self.depth

    @property
    def dropped_elements(self) -> int:
        """Elements that go through dropout in one step: ``batch * width * depth``."""
        return self.batch * self.width * self.depth


class Variant(NamedTuple):
    """One framework's MLP: ``init(key) -> params`` and ``loss(params, x, y, key) -> scalar``."""

    init: Callable[[Any], Any]
    loss: Callable[[Any, Any, Any, Any], Any]


def variants(
    framework: str, cfg: Config, policies: Sequence[str] = ("key", "bits", "mask")
) -> dict[str, Variant | str]:
    """The MLP variants of ``framework`` by display name; a string instead says why one is skipped.

    ``policies`` are the residual policies of the ``jdrop.dropout`` variants.
    """
    if framework == "none":
        return {BASELINE: _plain_variant(cfg, None)}
    if framework == "jdrop":
        return {"jdrop.mlp": _jdrop_mlp_variant(cfg), **_jdrop_dropout_variants(cfg, policies)}
    if framework == "flax.linen":
        return {"flax.linen": _linen_variant(cfg)}
    if framework == "equinox":
        return {"equinox": _equinox_variant(cfg)}
    if framework == "haiku":
        return {"haiku": _haiku_variant(cfg)}
    raise ValueError(f"unknown framework {framework!r}")


def make_step(loss: Callable[[Any, Any, Any, Any], Any], cfg: Config) -> tuple[Any, Callable[[Any], Any]]:
    """The jitted SGD step ``(params, opt_state, x, y, key) -> (params, opt_state, loss)``.

    Parameters and optimiser state are donated (``donate_argnums=(0, 1)``).

    Returns:
      ``(step, tx.init)``.
    """
    import jax
    import optax

    tx = optax.sgd(cfg.learning_rate)

    def step(params: Any, opt_state: Any, x: Any, y: Any, key: Any) -> tuple[Any, Any, Any]:
        value, grads = jax.value_and_grad(loss)(params, x, y, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(step, donate_argnums=(0, 1)), tx.init


def batch_specs(cfg: Config) -> tuple[Any, Any, Any]:
    """Abstract ``(x, y, key)`` of one step, for lowering without data."""
    import jax
    import jax.numpy as jnp

    return (
        jax.ShapeDtypeStruct((cfg.batch, cfg.width), jnp.float32),
        jax.ShapeDtypeStruct((cfg.batch,), jnp.int32),
        jax.eval_shape(lambda: jax.random.key(0)),
    )


def _cross_entropy(logits: Any, y: Any) -> Any:
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# ------------------------------------------------------------------------------------- plain jnp


def _plain_variant(cfg: Config, dropout: Callable[[Any, Any], Any] | None) -> Variant:
    """A jnp MLP (list of ``(w, b)``); ``dropout(key, h)`` after each hidden layer, or none."""
    import jax
    import jax.numpy as jnp

    sizes = cfg.layer_sizes

    def init(key: Any) -> Any:
        keys = jax.random.split(key, len(sizes) - 1)
        return [
            (jax.random.normal(k, (d_in, d_out)) * jnp.sqrt(2.0 / d_in), jnp.zeros((d_out,)))
            for k, d_in, d_out in zip(keys, sizes[:-1], sizes[1:], strict=True)
        ]

    def loss(params: Any, x: Any, y: Any, key: Any) -> Any:
        h = x
        for layer, (w, b) in enumerate(params):
            if layer > 0 and dropout is not None:
                h = dropout(jax.random.fold_in(key, layer), h)
            h = h @ w + b
            if layer < len(params) - 1:
                h = jax.nn.relu(h)
        return _cross_entropy(h, y)

    return Variant(init, loss)


def _jdrop_dropout_variants(cfg: Config, policies: Sequence[str]) -> dict[str, Variant | str]:
    """The jnp MLP with ``jdrop.dropout`` under each residual policy."""
    import jdrop

    def with_policy(policy: str) -> Variant:
        return _plain_variant(cfg, lambda key, h: jdrop.dropout(key, h, cfg.rate, residual=policy))

    return {f"jdrop.dropout[{policy}]": with_policy(policy) for policy in policies}


def _jdrop_mlp_variant(cfg: Config) -> Variant | str:
    """``jdrop.mlp`` with ``rates = (0, rate, ..., rate)``, or why it is skipped (module not there yet)."""
    try:
        from jdrop import mlp
    except ImportError as error:
        return f"skipped: jdrop.mlp cannot be imported ({error})"

    def init(key: Any) -> Any:
        return mlp.init(key, cfg.layer_sizes, activation="relu")

    def loss(params: Any, x: Any, y: Any, key: Any) -> Any:
        return _cross_entropy(mlp.apply(params, x, key=key, rates=cfg.rates, deterministic=False), y)

    return Variant(init, loss)


# ------------------------------------------------------------------------------------- frameworks


def _linen_variant(cfg: Config) -> Variant:
    import flax.linen as nn
    import jax.numpy as jnp

    class MLP(nn.Module):
        """Dense + ReLU + Dropout per hidden layer, then a Dense head."""

        @nn.compact
        def __call__(self, x: Any) -> Any:
            for _ in range(cfg.depth):
                x = nn.Dropout(cfg.rate, deterministic=False)(nn.relu(nn.Dense(cfg.width)(x)))
            return nn.Dense(cfg.classes)(x)

    model = MLP()

    def init(key: Any) -> Any:
        return model.init(key, jnp.zeros((1, cfg.width)))["params"]

    def loss(params: Any, x: Any, y: Any, key: Any) -> Any:
        return _cross_entropy(model.apply({"params": params}, x, rngs={"dropout": key}), y)

    return Variant(init, loss)


def _equinox_variant(cfg: Config) -> Variant:
    import equinox as eqx
    import jax

    sizes = cfg.layer_sizes
    dropout = eqx.nn.Dropout(cfg.rate)

    def init(key: Any) -> Any:
        keys = jax.random.split(key, len(sizes) - 1)
        return tuple(eqx.nn.Linear(i, o, key=k) for k, i, o in zip(keys, sizes[:-1], sizes[1:], strict=True))

    def loss(params: Any, x: Any, y: Any, key: Any) -> Any:
        keys = jax.random.split(key, cfg.depth)
        h = x
        for layer, linear in enumerate(params):
            h = jax.vmap(linear)(h)
            if layer < cfg.depth:
                h = dropout(jax.nn.relu(h), key=keys[layer], inference=False)
        return _cross_entropy(h, y)

    return Variant(init, loss)


def _haiku_variant(cfg: Config) -> Variant:
    import haiku as hk
    import jax
    import jax.numpy as jnp

    def forward(x: Any) -> Any:
        for _ in range(cfg.depth):
            x = hk.dropout(hk.next_rng_key(), cfg.rate, jax.nn.relu(hk.Linear(cfg.width)(x)))
        return hk.Linear(cfg.classes)(x)

    model = hk.transform(forward)

    def init(key: Any) -> Any:
        return model.init(key, jnp.zeros((1, cfg.width)))

    def loss(params: Any, x: Any, y: Any, key: Any) -> Any:
        return _cross_entropy(model.apply(params, key, x), y)

    return Variant(init, loss)
