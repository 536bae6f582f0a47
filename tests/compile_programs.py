"""The compile-time matrix: programs that every machine must compile in seconds.

Each entry of :data:`PROGRAMS` builds ``(function, args)``; the program is ``jax.jit(function)`` lowered
and compiled for ``args``. ``tests/test_compile_matrix.py`` compiles each one in a worker process with a
timeout, once as the machine compiles it and once under
``XLA_FLAGS=--xla_backend_extra_options=-force-vector-interleave=2``, which makes any x86 CPU interleave
the way AVX-512 CPUs choose to by themselves (that setting once made an unrolled threefry chain compile for
hours). Shapes use a batch of 100 and more, where AVX-512's cost model interleaves.

Run as a worker: ``python tests/compile_programs.py`` reads program names on stdin, one per line, and
prints ``ok NAME SECONDS`` (or ``error NAME MESSAGE``) for each.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

Program = Callable[[], tuple[Callable[..., Any], tuple[Any, ...]]]
PROGRAMS: dict[str, Program] = {}

B = 100  # a trip count at which AVX-512's cost model interleaves


def program(name: str) -> Callable[[Program], Program]:
    def register(builder: Program) -> Program:
        assert name not in PROGRAMS, name
        PROGRAMS[name] = builder
        return builder

    return register


def _key(seed: int = 0) -> jax.Array:
    return jax.random.key(seed)


def _abstract(make: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``make(*args, **kwargs)`` as shapes and dtypes only: lowering needs no values, and building parameters
    eagerly would compile every initialiser op (seconds per program)."""
    return jax.eval_shape(lambda: make(*args, **kwargs))


def _total(tree: Any) -> jax.Array:
    return sum(jnp.sum(leaf.astype(jnp.float32)) for leaf in jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------------------------------------- mlp


def _mlp_program(keys: str, activation: str, layers: int, batch: int) -> Program:
    def build():
        import jdrop

        sizes = [24] + [32] * layers + [10]
        params = _abstract(jdrop.mlp.init, _key(), sizes, activation=activation)
        rates = (0.1,) + (0.5,) * layers
        x = jnp.ones((batch, 24))

        def one(p, xi, k):
            return jdrop.mlp.apply(p, xi, key=k, rates=rates, deterministic=False)

        if keys == "per_example":

            def loss(p, k):
                return jnp.sum(jax.vmap(partial(one, p))(x, jdrop.example_keys(k, batch)))

        elif keys == "shared":

            def loss(p, k):
                return jnp.sum(jax.vmap(partial(one, p))(x, jnp.broadcast_to(k, (batch,))))

        elif keys == "closed_over":

            def loss(p, k):
                return jnp.sum(jax.vmap(lambda xi: one(p, xi, k))(x))

        else:  # "batch": the batched call, one key for the batch

            def loss(p, k):
                return jnp.sum(one(p, x, k))

        return jax.grad(loss), (params, _key(1))

    return build


# Keys x activation, with depths 1-4 and batches 1-512 spread over them; "shared" at batch 100 is the program
# that once compiled for hours on AVX-512 machines.
for _keys, _activation, _layers, _batch in (
    ("per_example", "relu", 1, 1),
    ("per_example", "tanh", 4, 512),
    ("shared", "relu", 2, 100),
    ("shared", "tanh", 2, 100),
    ("shared", "relu", 4, 512),
    ("closed_over", "relu", 3, 64),
    ("closed_over", "tanh", 1, 100),
    ("batch", "relu", 4, 512),
    ("batch", "tanh", 2, 100),
):
    _name = f"mlp-{_keys}-{_activation}-{_layers}layers-batch{_batch}"
    program(_name)(_mlp_program(_keys, _activation, _layers, _batch))


# ---------------------------------------------------------------------------------------- train_step


def _train_state(layers: int, width: int = 64, hparams: Any = None, adam: bool = True):
    import optax

    import jdrop

    apply_fn = jdrop.mlp.apply if hparams else partial(jdrop.mlp.apply, rates=0.3)
    tx = optax.adam(1e-3) if adam else optax.sgd(1e-2)

    def create():
        params = jdrop.mlp.init(_key(), [16] + [width] * layers + [4], activation="relu")
        return jdrop.TrainState.create(apply_fn=apply_fn, params=params, tx=tx, hparams=hparams)

    return _abstract(create)


def _batch(size: int) -> dict[str, jax.Array]:
    return {"x": jnp.ones((size, 16)), "y": jnp.arange(size) % 4}


@program("train_step-deep-8layers")
def _():
    import jdrop

    return jdrop.train_step, (_train_state(8, adam=False), _batch(B), _key(1))


@program("train_step-microbatches")
def _():
    import jdrop

    return partial(jdrop.train_step, microbatches=4), (_train_state(3), _batch(4 * B), _key(1))


@program("train_step-vmapped-over-seeds")
def _():
    import optax

    import jdrop

    def state(k):
        params = jdrop.mlp.init(k, [16, 64, 64, 64, 4], activation="relu")
        return jdrop.TrainState.create(apply_fn=partial(jdrop.mlp.apply, rates=0.3), params=params, tx=optax.sgd(0.1))

    states = _abstract(jax.vmap(state), jax.random.split(_key(), 4))
    keys = jax.random.split(_key(1), 4)
    return jax.vmap(jdrop.train_step, in_axes=(0, None, 0)), (states, _batch(B), keys)


@program("train_step-sharded-8-devices")
def _():
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jdrop

    devices = jax.devices()
    mesh = Mesh(np.array(devices[: 8 if len(devices) >= 8 else 1]), ("data",))
    def placed(tree, spec):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec)), tree)

    state = placed(_train_state(3), P())
    batch = placed(_abstract(_batch, 8 * 32), P("data"))
    return jdrop.train_step, (state, batch, _key(1))


@program("train_step-traced-rates")
def _():
    import jdrop

    state = _train_state(3, hparams={"rates": (0.1, 0.5, 0.5, 0.5)})
    return jdrop.train_step, (state, _batch(B), _key(1))


# ------------------------------------------------------------------------------------ core and remat


def _core_program(make_op: Callable[[], Callable[[jax.Array, jax.Array], jax.Array]], shape: tuple[int, ...]):
    """grad of an op applied four ways: whole batch, vmapped with per-example keys, vmapped with one shared
    key, and vmapped over the minor axis with a shared key (the batch becomes the innermost loop)."""

    def build():
        import jdrop

        op = make_op()
        x = jnp.linspace(-1.0, 1.0, num=int(jnp.prod(jnp.asarray(shape)))).reshape(shape)

        def loss(x, k):
            whole = op(k, x)
            per_example = jax.vmap(op)(jdrop.example_keys(k, x.shape[0]), x)
            shared = jax.vmap(lambda xi: op(k, xi))(x)
            minor = jax.vmap(lambda xi: op(k, xi), in_axes=-1, out_axes=-1)(x)
            return _total((whole**2, per_example**2, shared**2, minor**2))

        return jax.grad(loss), (x, _key(1))

    return build


def _dropout(**options):
    import jdrop

    return lambda k, x: jdrop.dropout(k, x, 0.3, **options)


def _dropout_residuals():
    import jdrop

    return lambda k, x: sum(jdrop.dropout(k, x, 0.3, residual=r) for r in ("key", "bits", "mask"))


def _dropout_scales_and_dtypes():
    import jdrop

    return lambda k, x: (
        jdrop.dropout(k, x, 0.3, scale="classic") + jdrop.dropout(k, x.astype(jnp.bfloat16), 0.3).astype(x.dtype)
    )


def _dropout_broadcast():
    import jdrop

    return lambda k, x: jdrop.dropout(k, x, 0.3, broadcast_dims=(-1,)) + jdrop.dropout(k, x, 0.3, broadcast_dims=(0,))


program("dropout-residual-policies")(_core_program(_dropout_residuals, (B, 64)))
program("dropout-classic-and-bf16")(_core_program(_dropout_scales_and_dtypes, (B, 64)))
program("dropout-broadcast-minor-and-major")(_core_program(_dropout_broadcast, (B, 64)))
program("dropout-scalar-per-example")(_core_program(_dropout, (B,)))


@program("dropout-traced-rate")
def _():
    import jdrop

    def loss(x, k, rate):
        return jnp.sum(jax.vmap(lambda xi: jdrop.dropout(k, xi, rate))(x) ** 2)

    return jax.grad(loss), (jnp.ones((B, 64)), _key(1), jnp.float32(0.3))


@program("remat-mlp-and-dropout")
def _():
    import jdrop

    params = _abstract(jdrop.mlp.init, _key(), [24, 64, 64, 10], activation="relu")

    @jax.checkpoint
    def block(p, x, k):
        h = jdrop.dropout(k, x, 0.2)
        return jax.vmap(lambda xi, ki: jdrop.mlp.apply(p, xi, key=ki, rates=0.5, deterministic=False))(
            h, jdrop.example_keys(k, x.shape[0])
        )

    def loss(p, x, k):
        return jnp.sum(block(p, x, k) ** 2)

    return jax.grad(loss), (params, jnp.ones((B, 24)), _key(1))


@program("second-order-grads")
def _():
    import jdrop

    params = _abstract(jdrop.mlp.init, _key(), [24, 32, 10], activation="tanh")

    def f(p, x, k):
        y = jdrop.dropout(k, x, 0.3)
        y = jax.vmap(lambda yi: jdrop.dropout(k, yi, 0.2, broadcast_dims=(0,)))(y)
        logits = jdrop.mlp.apply(p, y[:, :24], key=k, rates=0.5, deterministic=False)
        return jnp.sum(jnp.sin(y) ** 2) + jnp.sum(logits**2)

    def grad_of_grad_norm(p, x, k):
        return jax.grad(lambda x: jnp.sum(jax.grad(f, argnums=1)(p, x, k) ** 2))(x)

    def hessian_vector_product(p, x, k):
        return jax.jvp(lambda x: jax.grad(f, argnums=1)(p, x, k), (x,), (jnp.ones_like(x),))[1]

    def both(p, x, k):
        return grad_of_grad_norm(p, x, k), hessian_vector_product(p, x, k)

    return both, (params, jnp.ones((B, 64)), _key(1))


# ------------------------------------------------------------------------------------------ variants


def _variants():
    import jdrop

    return {
        "alpha_dropout": lambda k, x: jdrop.alpha_dropout(k, x, 0.2),
        "feature_alpha_dropout": lambda k, x: jdrop.feature_alpha_dropout(k, x, 0.2, batch_axis=None),
        "feature_dropout": lambda k, x: jdrop.feature_dropout(k, x, 0.2, batch_axis=None),
        "gaussian_dropout": lambda k, x: jdrop.gaussian_dropout(k, x, 0.2),
        "gaussian_noise": lambda k, x: jdrop.gaussian_noise(k, x, 0.1),
        "drop_path": lambda k, x: jdrop.drop_path(k, x, 0.2, batch_axis=None),
        "dropconnect": lambda k, x: jdrop.dropconnect(k, x, 0.2),
        "locked_dropout": lambda k, x: jdrop.locked_dropout(k, x, 0.2, time_axis=0),
        "embedding_dropout": lambda k, x: jdrop.embedding_dropout(k, x, 0.2),
        "zoneout": lambda k, x: jdrop.zoneout(k, x, jnp.cos(x), 0.2),
        "attention_dropout": lambda k, x: jdrop.attention_dropout(k, jax.nn.softmax(x), 0.1),
        "concrete_dropout": lambda k, x: jdrop.concrete_dropout(k, x, jnp.float32(-1.0)),
    }


# Grouped so that each group is one program (one compilation) and every variant is in one group.
VARIANT_GROUPS = {
    "alpha-and-gaussian": ("alpha_dropout", "feature_alpha_dropout", "gaussian_dropout", "gaussian_noise"),
    "broadcast-masks": ("feature_dropout", "drop_path", "locked_dropout", "embedding_dropout"),
    "weights-recurrent-attention": ("dropconnect", "zoneout", "attention_dropout", "concrete_dropout"),
}


def _variant_group(names: tuple[str, ...]) -> Callable[[], Callable[[jax.Array, jax.Array], jax.Array]]:
    def make():
        ops = _variants()
        return lambda k, x: sum(ops[name](k, x) for name in names)

    return make


for _group, _names in VARIANT_GROUPS.items():
    program(f"variants-{_group}")(_core_program(_variant_group(_names), (B, 8, 16)))


@program("variant-dropblock")
def _():
    import jdrop

    def loss(x, k):
        whole = jdrop.dropblock(k, x, 0.1, 3)
        per_example = jax.vmap(lambda ki, xi: jdrop.dropblock(ki, xi, 0.1, 3, batch_axis=None))(
            jdrop.example_keys(k, x.shape[0]), x
        )
        shared = jax.vmap(lambda xi: jdrop.dropblock(k, xi, 0.1, 3, batch_axis=None))(x)
        return _total((whole**2, per_example**2, shared**2))

    return jax.grad(loss), (jnp.ones((B, 12, 12, 4)), _key(1))


@program("variant-dropconnect_predict-and-moments")
def _():
    import jdrop

    w = jnp.ones((32, 16)) / 32

    def f(x, k):
        sampled = jdrop.dropconnect_predict(k, x, w, 0.3, activation=jax.nn.relu, num_samples=8)
        moments = jdrop.dropconnect_moments(x, w, 0.3)
        return _total((sampled, moments.mean, moments.variance))

    return jax.grad(f), (jnp.ones((B, 32)), _key(1))


@program("variant-mc_predict")
def _():
    import jdrop

    params = _abstract(jdrop.mlp.init, _key(), [24, 64, 10], activation="relu")
    apply_fn = partial(jdrop.mlp.apply, rates=(0.1, 0.5))

    def f(p, x, k):
        regression = jdrop.mc_predict(apply_fn, p, x, k, 16)
        classification = jdrop.mc_predict(apply_fn, p, x, k, 16, task="classification", batch_axis=0)
        return _total((regression.mean, classification.probs))

    return f, (params, jnp.ones((B, 24)), _key(1))


@program("variant-rdrop_loss")
def _():
    import jdrop

    params = _abstract(jdrop.mlp.init, _key(), [24, 64, 10], activation="relu")
    apply_fn = partial(jdrop.mlp.apply, rates=(0.1, 0.5))
    return jax.grad(lambda p, x, y, k: jdrop.rdrop_loss(apply_fn, p, x, y, k)), (
        params,
        jnp.ones((B, 24)),
        jnp.arange(B) % 10,
        _key(1),
    )


@program("scan-recurrent-locked-and-zoneout")
def _():
    import jdrop

    w = jnp.eye(32) * 0.5

    def loss(w, xs, k):
        kx, kh, kz = jax.random.split(k, 3)
        xs = jdrop.locked_dropout(kx, xs, 0.25, time_axis=0)

        def cell(h, x_t):
            h_in = jdrop.locked_dropout(kh, h, 0.25, time_axis=None)
            h_new = jnp.tanh(x_t + h_in @ w)
            return jdrop.zoneout(kz, h, h_new, 0.1), h_new

        h, hs = jax.lax.scan(cell, jnp.zeros(xs.shape[1:]), xs)
        return jnp.sum(h**2) + jnp.sum(hs**2)

    return jax.grad(loss), (w, jnp.ones((20, B, 32)), _key(1))


# ------------------------------------------------------------------------------------------ attention


def _attention_grad(**options):
    import jdrop

    def loss(q, k, v, rng):
        return jnp.sum(jdrop.dot_product_attention(q, k, v, dropout_rng=rng, dropout_rate=0.1, **options))

    return jax.grad(loss, argnums=(0, 1, 2))


@program("attention-broadcast-mask-gqa-and-bf16")
def _():
    # The grads hold the forward kernels too (the custom_vjp's forward is the forward pass).
    q, kv = jnp.ones((2, 40, 4, 8)), jnp.ones((2, 33, 2, 8))

    def both(q, k, v, rng):
        low = tuple(a.astype(jnp.bfloat16) for a in (q, k, v))
        return _attention_grad()(q, k, v, rng), _attention_grad()(*low, rng)

    return both, (q, kv, kv, _key(1))


@program("attention-per-element-causal-and-vmap-over-keys")
def _():
    q, kv = jnp.ones((2, 40, 4, 8)), jnp.ones((2, 33, 2, 8))
    per_element = _attention_grad(broadcast_dropout=False, is_causal=True)

    def both(q, k, v, rng):
        return per_element(q, k, v, rng), jax.vmap(per_element, in_axes=(None, None, None, 0))(
            q, k, v, jax.random.split(rng, 2)
        )

    return both, (q, kv, kv, _key(1))


@program("attention-cheap-masks")
def _():
    # hash8 draws one threefry call per group of rows, invariant along the columns of a fusion: the hazard.
    q, kv = jnp.ones((2, 40, 4, 8)), jnp.ones((2, 130, 2, 8))
    modes = ("fast16", "fast8", "hash8")

    def every(q, k, v, rng):
        return [_attention_grad(dropout_mask=mode, broadcast_dropout=broadcast)(q, k, v, rng)
                for mode in modes for broadcast in (False, True)]

    return every, (q, kv, kv, _key(1))


# -------------------------------------------------------------------------------------------- adapters


@program("adapter-linen")
def _():
    import flax.linen as nn

    import jdrop.interop.linen as jl

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = jl.Dropout(0.2, deterministic=not train)(x)
            x = nn.relu(nn.Dense(64)(x))
            x = jl.Dropout(0.5, broadcast_dims=(0,), deterministic=not train)(x)
            return nn.Dense(10)(x)

    model = Model()
    x = jnp.ones((B, 24))
    params = model.init(_key(), x, False)

    def loss(p, k):
        return jnp.sum(model.apply(p, x, True, rngs={"dropout": k}) ** 2)

    return jax.grad(loss), (params, _key(1))


@program("adapter-nnx")
def _():
    from flax import nnx

    import jdrop.interop.nnx as jn

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(24, 64, rngs=rngs)
            self.drop = jn.Dropout(0.3, rngs=rngs)
            self.out = nnx.Linear(64, 10, rngs=rngs)

        def __call__(self, x):
            return self.out(self.drop(nnx.relu(self.dense(x))))

    graphdef, state = nnx.split(Model(nnx.Rngs(0, dropout=1)))
    x = jnp.ones((B, 24))

    def step(state):
        model = nnx.merge(graphdef, state)
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
        return grads, nnx.state(model)

    return step, (state,)


@program("adapter-equinox")
def _():
    import equinox as eqx

    import jdrop.interop.equinox as je

    class Model(eqx.Module):
        dense: eqx.nn.Linear
        drop: je.Dropout
        out: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.dense = eqx.nn.Linear(24, 64, key=k1)
            self.drop = je.Dropout(0.3)
            self.out = eqx.nn.Linear(64, 10, key=k2)

        def __call__(self, x, *, key):
            return self.out(self.drop(jax.nn.relu(self.dense(x)), key=key))

    params, static = eqx.partition(Model(_key()), eqx.is_array)
    x = jnp.ones((B, 24))

    def loss(params, k):
        m = eqx.combine(params, static)
        # equinox's idiom: the model takes one example; vmap it with a key per example, and with one shared key.
        per_example = jax.vmap(lambda xi, ki: m(xi, key=ki))(x, jax.random.split(k, B))
        shared = jax.vmap(lambda xi: m(xi, key=k))(x)
        return jnp.sum(per_example**2) + jnp.sum(shared**2)

    return jax.grad(loss), (params, _key(1))


# ---------------------------------------------------------------------------------------------- worker


def compile_program(name: str) -> float:
    """Builds, lowers and compiles program ``name``; returns the seconds it took."""
    start = time.perf_counter()
    function, args = PROGRAMS[name]()
    jax.jit(function).lower(*args).compile()
    return time.perf_counter() - start


def main() -> None:
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        try:
            seconds = compile_program(name)
            print(f"ok {name} {seconds:.3f}", flush=True)
        except Exception:  # reported to the test, which fails with it
            message = traceback.format_exc().replace("\n", "\\n")
            print(f"error {name} {message}", flush=True)


if __name__ == "__main__":
    main()
