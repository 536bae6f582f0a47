"""The programs compiled for accelerators without a device, by name: jdrop's attention in every configuration the
Pallas kernels take, the xla path, ``jdrop.train_step`` of an MLP and of a BatchNorm CNN, and a flax transformer.

Each program is ``(function, abstract arguments)``; ``_worker.py`` places the arguments on a compile-only device
of the target and compiles ``jax.jit(function)``. Names spell the configuration, so a failure says which one.

The attention matrix is read from the code: every ``dropout_mask`` of ``jdrop.attention._dropout_mask.MODES`` and
every member of ``jdrop.attention._kernel.DropoutMode`` (a new one is a failure here until it is given its
arguments in :func:`dropout_arguments`), so a mode added later is compiled for every target.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jdrop.attention import _dropout_mask
from jdrop.attention._kernel import DropoutMode

Program = Callable[[], tuple[Callable[..., Any], tuple[Any, ...]]]
BATCH, HEADS = 2, 4
RATE = 0.1
DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}


def dropout_arguments(mode: DropoutMode) -> dict[str, Any]:
    """``dot_product_attention`` arguments that select ``mode`` (the rate where it needs one)."""
    table = {
        DropoutMode.NONE: {"dropout_rate": 0.0},
        DropoutMode.BROADCAST: {"dropout_rate": RATE, "broadcast_dropout": True},
        DropoutMode.PER_ELEMENT: {"dropout_rate": RATE, "broadcast_dropout": False},
    }
    if mode not in table:
        raise KeyError(f"DropoutMode.{mode.name} has no arguments in tests/accelerators/programs.py: add them.")
    return table[mode]


class Attention(NamedTuple):
    """One configuration of ``jdrop.dot_product_attention`` and whether its gradient is compiled too."""

    implementation: str = "pallas"
    grad: bool = False
    dtype: str = "bf16"
    head_dim: int = 128
    length: int = 1024
    causal: bool = False
    dropout: DropoutMode = DropoutMode.BROADCAST
    dropout_mask: str = "exact"
    kv_heads: int = HEADS
    bias: bool = False
    mask: bool = False
    vmap_keys: bool = False
    traced_rate: bool = False
    batch: int = BATCH
    heads: int = HEADS

    @property
    def name(self) -> str:
        extras = [flag for flag in ("bias", "mask", "vmap_keys", "traced_rate") if getattr(self, flag)]
        if self.kv_heads != self.heads:
            extras.append(f"gqa{self.heads}x{self.kv_heads}")
        if (self.batch, self.heads) != (BATCH, HEADS):
            extras.append(f"b{self.batch}h{self.heads}")
        parts = [f"attention-{self.implementation}", "vag" if self.grad else "fwd", self.dtype, f"d{self.head_dim}",
                 f"t{self.length}", "causal" if self.causal else "full", self.dropout.value]
        if self.dropout != DropoutMode.NONE:
            parts.append(self.dropout_mask)
        return "-".join(parts + extras)


def _spec(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def attention_program(case: Attention) -> Program:
    """``case`` as a program: the attention output, or its value_and_grad w.r.t. q, k, v (and the bias)."""

    def build():
        import jdrop

        dtype = DTYPES[case.dtype]
        b, t, d = case.batch, case.length, case.head_dim
        q = _spec((b, t, case.heads, d), dtype)
        kv = _spec((b, t, case.kv_heads, d), dtype)
        extras = {
            "key": _spec((b, 2) if case.vmap_keys else (2,), jnp.uint32),
            "bias": _spec((1, case.heads, t, t), jnp.float32) if case.bias else None,
            "mask": _spec((b, 1, t, t), jnp.bool_) if case.mask else None,
            "rate": _spec((), jnp.float32) if case.traced_rate else None,
        }
        options = dict(dropout_arguments(case.dropout), implementation=case.implementation, is_causal=case.causal,
                       dropout_mask=case.dropout_mask)

        def attend(q, k, v, extras):
            kwargs = dict(options, bias=extras["bias"], mask=extras["mask"])
            if extras["rate"] is not None:
                kwargs["dropout_rate"] = extras["rate"]
            if not case.vmap_keys:
                return jdrop.dot_product_attention(q, k, v, dropout_rng=jax.random.wrap_key_data(extras["key"]),
                                                   **kwargs)

            def one(qi, ki, vi, key_data):
                return jdrop.dot_product_attention(qi, ki, vi, dropout_rng=jax.random.wrap_key_data(key_data),
                                                   **kwargs)

            return jax.vmap(one)(q, k, v, extras["key"])

        if not case.grad:
            return attend, (q, kv, kv, extras)

        def loss(q, k, v, extras, cotangent):
            return jnp.sum(attend(q, k, v, extras).astype(jnp.float32) * cotangent)

        def value_and_grad(q, k, v, extras, cotangent):
            argnums = (0, 1, 2, 3) if case.bias else (0, 1, 2)
            return jax.value_and_grad(loss, argnums=argnums, allow_int=True)(q, k, v, extras, cotangent)

        return value_and_grad, (q, kv, kv, extras, _spec(q.shape, jnp.float32))

    return build


def core_cases() -> list[Attention]:
    """The Pallas kernels' core: dtype x head dim x length x causal x rate (0 or 0.1 with flax's broadcast mask)."""
    return [
        Attention(dtype=dtype, head_dim=d, length=t, causal=causal,
                  dropout=DropoutMode.BROADCAST if rate else DropoutMode.NONE)
        for dtype, d, t, causal, rate in itertools.product(DTYPES, (64, 128), (1024, 4096), (False, True), (0, RATE))
    ]


def pallas_matrix() -> list[Attention]:
    """Every Pallas kernel configuration: the full cross of dtype, head dim, length, causal and rate (flax's
    exact, broadcast mask); every dropout mask and mode at two dtypes; grouped queries, bias with its gradient, a
    mask, per-example keys under vmap and a traced rate. Each forward and value_and_grad."""
    cases = core_cases()
    cases += [
        Attention(dtype=dtype, causal=causal, dropout=mode, dropout_mask=mask)
        for dtype, causal, mode, mask in itertools.product(DTYPES, (False, True), DropoutMode, _dropout_mask.MODES)
        if mode != DropoutMode.NONE
    ]
    cases += [
        Attention(causal=True, kv_heads=1),
        Attention(causal=True, kv_heads=2, dropout=DropoutMode.PER_ELEMENT),
        Attention(bias=True),
        Attention(bias=True, dropout=DropoutMode.PER_ELEMENT, dropout_mask="fast16"),
        Attention(mask=True),
        Attention(mask=True, causal=True, dropout=DropoutMode.PER_ELEMENT),
        Attention(vmap_keys=True, dropout=DropoutMode.PER_ELEMENT),
        Attention(traced_rate=True),
        Attention(traced_rate=True, dropout=DropoutMode.PER_ELEMENT, dropout_mask="fast8"),
    ]
    unique = list(dict.fromkeys(cases))
    return [case._replace(grad=grad) for case in unique for grad in (False, True)]


def xla_matrix() -> list[Attention]:
    """The xla path: both dtypes, causal and not, flax's mask and a fast one, per element; forward and gradient."""
    cases = [
        Attention(implementation="xla", dtype=dtype, length=4096, causal=causal, dropout=mode, dropout_mask=mask)
        for dtype, causal, (mode, mask) in itertools.product(
            DTYPES, (False, True), ((DropoutMode.BROADCAST, "exact"), (DropoutMode.PER_ELEMENT, "fast16")))
    ]
    cases.append(Attention(implementation="xla", bias=True, mask=True, kv_heads=2, traced_rate=True))
    return [case._replace(grad=grad) for case in cases for grad in (False, True)]


# ------------------------------------------------------------------------------------------ training steps


def _abstract_state(make: Callable[[], Any]) -> Any:
    """A ``TrainState`` (or any pytree) as shapes only: building it compiles nothing."""
    return jax.eval_shape(make)


def _train_step_program(make_state: Callable[[], Any], x: jax.ShapeDtypeStruct) -> Program:
    def build():
        import jdrop

        def step(state, batch, key_data):
            return jdrop.train_step(state, batch, jax.random.wrap_key_data(key_data))

        batch = {"x": x, "y": _spec((x.shape[0],), jnp.int32)}
        return step, (_abstract_state(make_state), batch, _spec((2,), jnp.uint32))

    return build


def mlp_state() -> Any:
    """jdrop.mlp on 784 inputs, two hidden layers of 1024, 10 classes, rates 0.2/0.5/0.5, Adam."""
    import optax

    import jdrop

    params = jdrop.mlp.init(jax.random.key(0), [784, 1024, 1024, 10], activation="relu")
    return jdrop.TrainState.create(apply_fn=jdrop.mlp.apply, params=params, tx=optax.adam(1e-3),
                                   hparams={"rates": (0.2, 0.5, 0.5)})


def cnn_state() -> Any:
    """A BatchNorm CNN on one (32, 32, 3) image: two conv -> BatchNorm over the whole batch -> relu -> jdrop
    Dropout stages, mean pooling, a 10-way classifier; SGD with momentum."""
    import flax.linen as nn
    import optax

    import jdrop
    from jdrop.interop import linen as jdrop_linen

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x, *, deterministic):
            for features in (32, 64):
                x = nn.Conv(features, (3, 3))(x)
                x = nn.BatchNorm(use_running_average=deterministic, axis_name=jdrop.train.BATCH_AXIS)(x)
                x = jdrop_linen.Dropout(0.3, deterministic=deterministic)(nn.relu(x))
            return nn.Dense(10)(jnp.mean(x, axis=(0, 1)))

    model = CNN()

    def apply_fn(params, x, *, key, deterministic, model_state):
        return model.apply({"params": params, **model_state}, x, deterministic=deterministic,
                           rngs=None if key is None else {"dropout": key}, mutable=["batch_stats"])

    variables = model.init(jax.random.key(0), jnp.zeros((32, 32, 3)), deterministic=True)
    return jdrop.TrainState.create(apply_fn=apply_fn, params=variables["params"], tx=optax.sgd(0.1, 0.9),
                                   model_state={"batch_stats": variables["batch_stats"]})


MODEL_PROGRAMS: dict[str, Program] = {
    "train_step-mlp-f32-b256": _train_step_program(mlp_state, _spec((256, 784), jnp.float32)),
    "train_step-cnn-batchnorm-f32-b128": _train_step_program(cnn_state, _spec((128, 32, 32, 3), jnp.float32)),
}


# ----------------------------------------------------------------------------------------- transformer


class Transformer(NamedTuple):
    """A pre-LN transformer language-model step (12 scanned blocks of width 1024, 8 heads of 128, T=4096, bfloat16
    compute, float32 parameters, SGD), with dropout 0.1 on the attention weights, both residual branches and after the
    MLP's GELU: ``dropout`` is ``"none"`` (rates 0), ``"flax"`` (flax's Dropout and attention) or ``"jdrop"``
    (``jdrop.interop.linen.Dropout`` and ``jdrop.dot_product_attention``); ``attention`` the attention function
    (``"flax"``, ``"xla"`` or ``"pallas"``: jdrop's implementations)."""

    dropout: str
    attention: str
    depth: int = 12
    width: int = 1024
    heads: int = 8
    length: int = 4096
    batch: int = 1
    vocab: int = 32768

    @property
    def name(self) -> str:
        return (f"transformer-{self.dropout}_dropout-{self.attention}_attention-l{self.depth}-w{self.width}"
                f"-t{self.length}-b{self.batch}-bf16")


def _transformer_module(cfg: Transformer) -> Any:
    import functools

    import flax.linen as nn

    import jdrop
    from jdrop.interop import linen as jdrop_linen

    rate = 0.0 if cfg.dropout == "none" else RATE
    drop = jdrop_linen.Dropout if cfg.dropout == "jdrop" else nn.Dropout
    attention_fn = (nn.dot_product_attention if cfg.attention == "flax"
                    else functools.partial(jdrop.dot_product_attention, implementation=cfg.attention))
    dense = functools.partial(nn.Dense, dtype=jnp.bfloat16)

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            h = nn.MultiHeadDotProductAttention(cfg.heads, dtype=jnp.bfloat16, dropout_rate=rate, deterministic=False,
                                                attention_fn=attention_fn)(nn.LayerNorm(dtype=jnp.bfloat16)(x))
            x = x + drop(rate, deterministic=False)(h)
            h = nn.gelu(dense(4 * cfg.width)(nn.LayerNorm(dtype=jnp.bfloat16)(x)))
            return x + drop(rate, deterministic=False)(dense(cfg.width)(drop(rate, deterministic=False)(h))), None

    # The blocks as one lax.scan (flax's nn.scan, parameters stacked): what large models do, and one block for
    # the compiler to optimise instead of twelve.
    blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                     length=cfg.depth)

    class Model(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(cfg.vocab, cfg.width, dtype=jnp.bfloat16)(tokens)
            x, _ = blocks(name="blocks")(x, None)
            return dense(cfg.vocab)(nn.LayerNorm(dtype=jnp.bfloat16)(x))

    return Model()


def transformer_program(cfg: Transformer) -> Program:
    """One SGD step of the causal-free language model (next-token cross-entropy) under ``cfg``."""

    def build():
        import optax

        model = _transformer_module(cfg)
        tokens = _spec((cfg.batch, cfg.length), jnp.int32)
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(tokens.shape, jnp.int32)))

        def step(params, tokens, key_data):
            def loss(p):
                logits = model.apply(p, tokens, rngs={"dropout": jax.random.wrap_key_data(key_data)})
                targets = jnp.roll(tokens, -1, axis=-1)
                return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()

            value, grads = jax.value_and_grad(loss)(params)
            return jax.tree_util.tree_map(lambda p, g: p - 1e-3 * g, params, grads), value

        return step, (params, tokens, _spec((2,), jnp.uint32))

    return build


TRANSFORMERS = [Transformer("none", "flax"), Transformer("flax", "flax"), Transformer("none", "xla"),
                Transformer("jdrop", "xla"), Transformer("none", "pallas"), Transformer("jdrop", "pallas")]


# -------------------------------------------------------------------------------------- memory programs


ATTENTION_STEPS = ("jdrop-xla", "jdrop-pallas", "flax-dropout", "jax-xla", "jax-cudnn")
"""The attention training steps whose memory is compared: jdrop's two implementations and flax's, with dropout
0.1 (flax's default broadcast mask); ``jax.nn.dot_product_attention`` (no dropout) with XLA's and cuDNN's
implementation."""


def attention_step_name(kind: str, length: int, batch: int = 4) -> str:
    return f"attention_step-{kind}-b{batch}-t{length}-h8-d128-bf16"


def attention_step_program(kind: str, length: int, batch: int) -> Program:
    """value_and_grad w.r.t. q, k, v of ``sum(attention(q, k, v) * cotangent)``, H=8, D=128, bfloat16."""

    def build():
        import flax.linen as nn

        import jdrop

        def attend(q, k, v, key):
            if kind.startswith("jdrop-"):
                return jdrop.dot_product_attention(q, k, v, dropout_rng=key, dropout_rate=RATE,
                                                   implementation=kind.removeprefix("jdrop-"))
            if kind == "flax-dropout":
                return nn.dot_product_attention(q, k, v, dropout_rng=key, dropout_rate=RATE, deterministic=False)
            return jax.nn.dot_product_attention(q, k, v, implementation=kind.removeprefix("jax-"))

        def step(q, k, v, cotangent, key_data):
            def loss(q, k, v):
                return jnp.sum(attend(q, k, v, jax.random.wrap_key_data(key_data)).astype(jnp.float32) * cotangent)

            return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

        x = _spec((batch, length, 8, 128), jnp.bfloat16)
        return step, (x, x, x, _spec(x.shape, jnp.bfloat16), _spec((2,), jnp.uint32))

    return build


PROGRAMS: dict[str, Program] = {case.name: attention_program(case) for case in pallas_matrix() + xla_matrix()}
PROGRAMS.update(MODEL_PROGRAMS)
PROGRAMS.update({cfg.name: transformer_program(cfg) for cfg in TRANSFORMERS})


def build(name: str) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """The program ``name``: a registered one, or an attention step ``attention_step_name(kind, T, B)`` at any
    length and batch (the memory benchmark bisects on T)."""
    if name in PROGRAMS:
        return PROGRAMS[name]()
    parts = name.split("-")
    if parts[0] == "attention_step" and len(parts) == 8:
        kind = "-".join(parts[1:3])
        if kind in ATTENTION_STEPS and name == attention_step_name(kind, int(parts[4][1:]), int(parts[3][1:])):
            return attention_step_program(kind, int(parts[4][1:]), int(parts[3][1:]))()
    raise KeyError(f"no program named {name!r}")
