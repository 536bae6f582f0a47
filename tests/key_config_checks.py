"""Every key JAX makes, under one set of global configs: run by tests/test_keys.py, one interpreter per config.

``python tests/key_config_checks.py IMPL PARTITIONABLE X64`` sets ``jax_default_prng_impl``,
``jax_threefry_partitionable`` and ``jax_enable_x64`` before anything is traced, then checks, for a raw key of the
default implementation (``jax.random.PRNGKey``) and, under the threefry2x32 default, also typed keys of threefry2x32,
rbg and unsafe_rbg and of an implementation registered with ``jax.extend.random.define_prng_impl`` (typed keys do not
depend on the default: see :data:`FULL_UNDER_EVERY_DEFAULT`):

- ``keep_mask(key, shape, rate) == jax.random.bernoulli(key, 1 - rate, shape)`` bit for bit (eager and jit, with
  ``broadcast_dims``, a traced rate), and ``random_bits`` equals ``jax.random.bits``;
- ``dropout`` (every residual policy, and the default) equals flax's ``nn.Dropout``, ``nnx.Dropout`` and equinox's
  ``nn.Dropout`` for the same key, and so do jdrop's linen, nnx and equinox adapters; its gradient is
  ``mask * factor``; ``jax.jvp`` / ``jacfwd`` / ``linearize`` / ``hessian`` equal autodiff of equinox's dropout;
- every variant, ``example_keys``, ``mlp.init``/``apply``/``forward``, ``train_step`` and ``eval_step`` run with
  the key, and ``drop_path``/``feature_dropout``/``dropconnect`` draw ``keep_mask``'s mask;
- ``dot_product_attention`` equals flax's (output and gradients), for both ``broadcast_dropout`` settings.

It prints one line ``OK <config> <number of checks>`` or raises with the failing check named.
"""

from __future__ import annotations

import sys
import warnings


def configure(impl: str, partitionable: bool, x64: bool) -> None:
    import jax

    jax.config.update("jax_default_prng_impl", impl)
    jax.config.update("jax_threefry_partitionable", partitionable)
    jax.config.update("jax_enable_x64", x64)


def custom_impl():
    """A user-registered PRNG implementation: a 3-word key whose bits are threefry's of its first two words."""
    import jax
    import jax.extend.random as jex
    import jax.numpy as jnp

    def seed(s):
        s = jnp.asarray(s).astype(jnp.uint32)
        return jnp.stack([s, s ^ jnp.uint32(0x9E3779B9), jnp.uint32(7)])

    def as_threefry(k):
        return jax.random.wrap_key_data(k[:2], impl="threefry2x32")

    def split(k, shape):
        data = jax.random.key_data(jax.random.split(as_threefry(k), shape))
        return jnp.concatenate([data, jnp.broadcast_to(k[2:], (*shape, 1))], axis=-1)

    def fold_in(k, d):
        return jnp.concatenate([jax.random.key_data(jax.random.fold_in(as_threefry(k), d)), k[2:]])

    def random_bits(k, width, shape):
        dtype = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}[width]
        return jax.random.bits(as_threefry(k), shape, dtype)

    return jex.define_prng_impl(key_shape=(3,), seed=seed, split=split, random_bits=random_bits, fold_in=fold_in,
                                name="user_threefry_words", tag="user")


def keys(seed: int):
    import jax

    user = custom_impl()
    return {
        "threefry2x32": jax.random.key(seed, impl="threefry2x32"),
        "rbg": jax.random.key(seed, impl="rbg"),
        "unsafe_rbg": jax.random.key(seed, impl="unsafe_rbg"),
        "raw PRNGKey": jax.random.PRNGKey(seed),
        "user impl": jax.random.key(seed, impl=user),
    }


class Checks:
    def __init__(self) -> None:
        self.count = 0

    def equal(self, what: str, a, b) -> None:
        import numpy as np

        self.count += 1
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or not (a == b).all():
            raise AssertionError(f"{what}: differs ({(a != b).sum() if a.shape == b.shape else 'shape'})")

    def close(self, what: str, a, b, rtol: float) -> None:
        import numpy as np

        self.count += 1
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=rtol,
                                   err_msg=what)


def check_masks(c: Checks, name: str, key) -> None:
    import jax
    import jax.numpy as jnp

    import jdrop

    cases = (((7,), 0.5), ((4, 5), 0.1), ((3, 1, 9), 1 / 3), ((2, 3, 8), 0.9))
    jitted = jax.jit(lambda k: [jdrop.keep_mask(k, shape, rate) for shape, rate in cases])(key)  # one compile
    for (shape, rate), drawn in zip(cases, jitted):
        expected = jax.random.bernoulli(key, 1 - rate, shape)
        c.equal(f"{name} keep_mask {shape} {rate}", jdrop.keep_mask(key, shape, rate), expected)
        c.equal(f"{name} keep_mask jit {shape}", drawn, expected)
    for dtype in (jnp.uint32, jnp.uint64) if jax.config.jax_enable_x64 else (jnp.uint32,):
        c.equal(f"{name} random_bits {dtype}", jdrop.masks.random_bits(key, (5, 7), dtype=dtype),
                jax.random.bits(key, (5, 7), dtype))
    shared = jax.random.bernoulli(key, 0.6, (4, 1, 6))
    c.equal(f"{name} broadcast_dims", jdrop.keep_mask(key, (4, 3, 6), 0.4, broadcast_dims=(1,)),
            jnp.broadcast_to(shared, (4, 3, 6)))
    rate = jnp.float32(0.3)
    c.equal(f"{name} traced rate", jax.jit(lambda k, r: jdrop.keep_mask(k, (6, 6), r))(key, rate),
            jax.random.bernoulli(key, 1 - rate, (6, 6)))


def check_dropout(c: Checks, name: str, key, tol: float) -> None:
    import equinox as eqx
    import flax.linen as nn
    import jax
    from flax import nnx

    import jdrop
    from jdrop.interop import equinox as jeqx
    from jdrop.interop import linen as jlinen
    from jdrop.interop import nnx as jnnx

    x = jax.random.normal(jax.random.key(11, impl="threefry2x32"), (6, 10))
    rate = 0.4
    reference = eqx.nn.Dropout(rate)(x, key=key)  # bernoulli(key, 1 - rate) with the key itself
    c.close(f"{name} linen rng=key", nn.Dropout(rate, deterministic=False).apply({}, x, rng=key), reference, tol)
    linen = nn.Dropout(rate, deterministic=False).apply({}, x, rngs={"dropout": key})  # make_rng derives a key
    flax_nnx = nnx.Dropout(rate, rngs=nnx.Rngs(dropout=key))(x)  # so does nnx.Rngs
    for policy in (None, "key", "bits", "mask"):
        c.close(f"{name} dropout {policy}", jdrop.dropout(key, x, rate, residual=policy), reference, tol)
        grad = jax.grad(lambda x, p=policy: (jdrop.dropout(key, x, rate, residual=p) * x).sum())(x)
        c.close(f"{name} grad {policy}", grad, jax.grad(lambda x: (eqx.nn.Dropout(rate)(x, key=key) * x).sum())(x),
                tol)  # 2 m x / keep: the mask and its factor
    c.close(f"{name} linen adapter", jlinen.Dropout(rate, deterministic=False).apply({}, x, rngs={"dropout": key}),
            linen, tol)
    c.close(f"{name} linen adapter rng=key", jlinen.Dropout(rate, deterministic=False).apply({}, x, rng=key),
            reference, tol)
    c.close(f"{name} nnx adapter", jnnx.Dropout(rate, rngs=nnx.Rngs(dropout=key))(x), flax_nnx, tol)
    c.close(f"{name} equinox adapter", jeqx.Dropout(rate)(x, key=key), reference, tol)
    check_forward_mode(c, name, key, x, tol)


def check_forward_mode(c: Checks, name: str, key, x, tol: float) -> None:
    import equinox as eqx
    import jax

    import jdrop

    def ours(x):
        return jdrop.dropout(key, x, 0.4)

    def theirs(x):
        return eqx.nn.Dropout(0.4)(x, key=key)

    t = x[::-1] + 1.0
    c.close(f"{name} jvp", jax.jvp(ours, (x,), (t,))[1], jax.jvp(theirs, (x,), (t,))[1], tol)
    c.close(f"{name} linearize", jax.linearize(ours, x)[1](t), jax.linearize(theirs, x)[1](t), tol)
    c.close(f"{name} jacfwd", jax.jacfwd(ours)(x[0]), jax.jacfwd(theirs)(x[0]), tol)
    cube = lambda f: lambda v: (f(v) ** 3).sum()  # noqa: E731
    c.close(f"{name} hessian", jax.hessian(cube(ours))(x[0]), jax.hessian(cube(theirs))(x[0]), 10 * tol)


def check_variants(c: Checks, name: str, key) -> None:
    import jax
    import jax.numpy as jnp

    import jdrop

    x = jax.random.normal(jax.random.key(5, impl="threefry2x32"), (4, 6, 8))
    c.equal(f"{name} drop_path", jdrop.drop_path(key, x, 0.5) != 0, jdrop.keep_mask(key, (4, 1, 1), 0.5) & (x != 0))
    c.equal(f"{name} feature_dropout", jdrop.feature_dropout(key, x, 0.5) != 0,
            jdrop.keep_mask(key, x.shape, 0.5, broadcast_dims=(1,)) & (x != 0))
    c.equal(f"{name} dropconnect", jdrop.dropconnect(key, x[0], 0.3) != 0, jdrop.keep_mask(key, (6, 8), 0.3))
    runs = {
        "alpha_dropout": lambda k, x: jdrop.alpha_dropout(k, x, 0.2),
        "feature_alpha_dropout": lambda k, x: jdrop.feature_alpha_dropout(k, x, 0.2),
        "gaussian_dropout": lambda k, x: jdrop.gaussian_dropout(k, x, 0.2),
        "gaussian_noise": lambda k, x: jdrop.gaussian_noise(k, x, 0.1),
        "concrete_dropout": lambda k, x: jdrop.concrete_dropout(k, x, jnp.float32(-1.0)),
        "dropblock": lambda k, x: jdrop.dropblock(k, x[..., None], 0.2, block_size=3),
        "locked_dropout": lambda k, x: jdrop.locked_dropout(k, x, 0.3, time_axis=1),
        "embedding_dropout": lambda k, x: jdrop.embedding_dropout(k, x[0], 0.3),
        "zoneout": lambda k, x: jdrop.zoneout(k, x[0], x[1], 0.3),
        "attention_dropout": lambda k, x: jdrop.attention_dropout(k, jax.nn.softmax(x, axis=-1), 0.3),
    }
    # Eager (op by op) and jitted, all variants in one compile; then one Jacobian through every variant at once.
    jitted = jax.jit(lambda k, x: {variant: run(k, x) for variant, run in runs.items()})(key, x)
    for variant, run in runs.items():
        first = run(key, x)
        c.equal(f"{name} {variant} finite", jnp.isfinite(first).all(), True)
        c.close(f"{name} {variant} same key, same output", jitted[variant], first, 1e-5)  # jit may fuse differently
    grads = jax.jacrev(lambda x: jnp.stack([(run(key, x) * x[0, 0, 0]).sum() for run in runs.values()]))(x)
    for variant, grad in zip(runs, grads):
        c.equal(f"{name} {variant} grad finite", jnp.isfinite(grad).all(), True)  # differentiable through it
    y, t = jax.jvp(lambda x: jdrop.drop_path(key, x, 0.5), (x,), (x,))
    c.close(f"{name} drop_path jvp", t, y, 0)


def check_training(c: Checks, name: str, key) -> None:
    import jax
    import jax.numpy as jnp
    import optax

    import jdrop

    keys = jdrop.example_keys(key, 3)
    c.equal(f"{name} example_keys", jax.random.key_data(keys[1]),
            jax.random.key_data(jax.random.fold_in(jdrop.masks.canonical_key(key), 1)))
    params = jdrop.mlp.init(key, [5, 16, 3])
    x = jax.random.normal(jax.random.key(2, impl="threefry2x32"), (4, 5))
    out = jdrop.mlp.apply(params, x, key=key, rates=(0.1, 0.5), deterministic=False)
    fwd, _ = jdrop.mlp.forward(params, x, key, (0.1, 0.5))
    c.close(f"{name} mlp apply == forward", out, fwd, 1e-6)
    state = jdrop.TrainState.create(apply_fn=lambda p, x, *, key, deterministic: jdrop.mlp.apply(
        p, x, key=key, rates=(0.1, 0.5), deterministic=deterministic), params=params, tx=optax.sgd(0.1))
    batch = {"x": x, "y": jnp.array([0, 1, 2, 0])}
    state, metrics = jdrop.train_step(state, batch, key)
    c.equal(f"{name} train_step", jnp.isfinite(metrics["loss"]), True)
    c.equal(f"{name} eval_step", jnp.isfinite(jdrop.eval_step(state, batch)["loss"]), True)


def check_attention(c: Checks, name: str, key, tol: float) -> None:
    import flax.linen as nn
    import jax

    import jdrop

    q, k, v = (jax.random.normal(jax.random.key(i, impl="threefry2x32"), (2, 13, 2, 4)) for i in range(3))
    for broadcast in (True, False):
        options = dict(dropout_rng=key, dropout_rate=0.3, broadcast_dropout=broadcast)
        def ours(q, options=options):
            return jdrop.dot_product_attention(q, k, v, block_q=8, block_k=4, **options)

        def theirs(q, options=options):
            return nn.dot_product_attention(q, k, v, **options)

        c.close(f"{name} attention {broadcast}", ours(q), theirs(q), 10 * tol)
        if broadcast:  # the gradient reads the same mask tiles as the output (checked for both layouts above)
            c.close(f"{name} attention grad {broadcast}", jax.grad(lambda q, f=ours: f(q).sum())(q),
                    jax.grad(lambda q, f=theirs: f(q).sum())(q), 100 * tol)


def check_reported_x64_case(c: Checks, tol: float) -> None:
    """A reported case: under x64 flax draws float64 uniforms (its keep probability is a Python float)."""
    import flax.linen as nn
    import jax

    import jdrop

    q = jax.random.normal(jax.random.key(0), (1, 4, 1, 8))
    c.close("attention, the x64 report's case",
            jdrop.dot_product_attention(q, q, q, dropout_rng=jax.random.key(1), dropout_rate=0.5),
            nn.dot_product_attention(q, q, q, dropout_rng=jax.random.key(1), dropout_rate=0.5), 10 * tol)


# Under a default implementation other than threefry2x32, the key it changes: the raw key (now of that
# implementation). Typed keys carry their own implementation and behave the same under every default: they run
# under the threefry2x32 default, with partitionable threefry and x64 each on and off; that jdrop never derives a
# key with the default implementation instead of the key's own is checked in its source
# (tests/test_keys.py::test_keys_are_rebuilt_with_their_own_implementation).
FULL_UNDER_EVERY_DEFAULT = ("raw PRNGKey",)


def main(impl: str, partitionable: bool, x64: bool) -> None:
    configure(impl, partitionable, x64)
    import jax

    warnings.simplefilter("ignore", UserWarning)  # the whole-mask attention warning (tests/test_keys.py checks it)
    c = Checks()
    tol = 1e-12 if x64 else 1e-6
    check_reported_x64_case(c, tol)
    for name, key in keys(3).items():
        if impl != "threefry2x32" and name not in FULL_UNDER_EVERY_DEFAULT:
            continue
        check_masks(c, name, key)
        check_dropout(c, name, key, tol)
        check_variants(c, name, key)
        check_training(c, name, key)
        check_attention(c, name, key, tol)
    print(f"OK impl={impl} partitionable={partitionable} x64={x64} float={jax.numpy.zeros(()).dtype} {c.count}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1")
