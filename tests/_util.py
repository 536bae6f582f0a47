"""Helpers shared by the test files: realised keep probabilities, 5-sigma statistical tolerances, tree checks,
test inputs and the naive references more than one file checks against.

Statistical tolerances are 5 standard errors of the statistic: a two-sided false alarm about once in 1.7 million
runs per check; each use derives the variance it passes in a comment next to it. Test files import this module
as ``_util`` (pytest puts ``tests/`` on ``sys.path``).
"""

import contextlib
import math
from functools import partial

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

import jdrop
from jdrop import masks

FLOAT_DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32]
SIGMAS = 5.0


def realised_keep(rate):
    """The keep probability the masks really use for ``rate``: ``ceil((1 - rate) 2**23) / 2**23`` in float32.

    What inverted dropout scales by; a Python float or a traced float32 ``rate``; a float32 array.
    """
    return masks.realised_keep(masks.keep_threshold(1 - rate))


def mean_tolerance(variance, n):
    """5 standard errors of the mean of ``n`` independent draws with this variance: ``5 sqrt(variance / n)``.

    ``variance`` may be an array (one bound per element).
    """
    return SIGMAS * np.sqrt(np.asarray(variance, np.float64) / n)


def bernoulli_mean_tolerance(n, p):
    """5 standard errors of the mean of ``n`` independent Bernoulli(p) draws: ``5 sqrt(p (1 - p) / n)``.

    For the count of successes (Binomial(n, p)) multiply by ``n``: ``5 sqrt(n p (1 - p))``.
    """
    return mean_tolerance(p * (1.0 - p), n)


def variance_tolerance(fourth_moment, variance, n):
    """5 standard errors of the sample variance of ``n`` draws: ``5 sqrt((mu4 - sigma^4) / n)``.

    ``fourth_moment`` is the central fourth moment mu4 (estimated from the draws where unknown).
    """
    return SIGMAS * np.sqrt((np.asarray(fourth_moment, np.float64) - np.asarray(variance, np.float64) ** 2) / n)


def normal_variance_tolerance(variance, n):
    """5 standard errors of the sample variance of ``n`` normal draws: ``5 variance sqrt(2 / (n - 1))``."""
    return SIGMAS * variance * np.sqrt(2.0 / (n - 1))


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6):
    """Same tree structure and every leaf ``allclose`` (``chex.assert_trees_all_close``, float32 tolerances)."""
    chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol)


@partial(jax.jit, static_argnums=(1, 2), static_argnames=("broadcast_dims",))
def keep_mask(key, shape, rate, *, broadcast_dims=()):
    """``jdrop.keep_mask`` as one jitted program (static shape, rate and dims), cheaper than eager dispatch."""
    return jdrop.keep_mask(key, shape, rate, broadcast_dims=broadcast_dims)


@partial(jax.jit, static_argnums=1)
def standard_normal(key, shape):
    """The normals the Gaussian variants draw: ``jax.random.normal(key, shape)``, via ``jdrop.masks``."""
    return masks.normal_from_bits(masks.random_bits(key, shape))


def cotangent(y):
    """The fixed, non-trivial cotangent of the gradient checks: ``cos(0), cos(1), ...`` over ``y``'s elements."""
    return jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)


def grad_of(fn, *args, argnums=0):
    """Gradient of ``sum(cotangent * fn(*args))`` with a fixed, non-trivial cotangent."""

    def loss(*a):
        y = fn(*a)
        return jnp.sum(cotangent(y) * y.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=argnums))(*args)


def value_and_grads(fn, *args):
    """``fn(*args)`` and the gradients of ``sum(cotangent * fn(*args))`` with respect to every argument, jitted."""

    def loss(*a):
        y = fn(*a)
        return jnp.sum(cotangent(y) * y.astype(jnp.float32)), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
    return y, grads


def signed_input(shape, dtype=jnp.float32, seed=0):
    """Nonzero values of both signs (|x| in [0.5, 2), every third negative): a zero output means a dropped element."""
    size = math.prod(shape)
    values = np.random.default_rng(seed).uniform(0.5, 2.0, size) * np.where(np.arange(size) % 3, 1, -1)
    return jnp.asarray(values.reshape(shape), dtype)


def assert_variant_matches_reference(variant, key, x, rate, reference, *, rtol, atol, transform=lambda f: f):
    """``variant(key, x, rate)`` and its gradient against a naive ``reference(x)`` and its gradient; in eval mode
    and at rate 0 the variant is the identity.

    ``transform`` wraps the variant's training call (``self.variant`` of a ``chex.variants`` test: jit or not).
    """
    op = transform(lambda v: variant(key, v, rate))
    np.testing.assert_allclose(op(x), reference(x), rtol=rtol, atol=atol)
    np.testing.assert_allclose(grad_of(op, x), grad_of(reference, x), rtol=rtol, atol=atol)
    np.testing.assert_array_equal(variant(None, x, rate, deterministic=True), x)
    np.testing.assert_array_equal(variant(key, x, 0.0), x)


def positive_input(shape, seed=1, dtype=jnp.float32):
    """Inputs bounded away from 0, so a zero output identifies a dropped element."""
    return jnp.asarray(1.0 + np.random.default_rng(seed).random(shape), dtype)


def normal_input(shape, seed=1, dtype=jnp.float32):
    """Standard normal inputs from numpy (eager jax.random compiles per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def qkv_input(batch=2, q_length=37, k_length=45, heads=4, depth=8, kv_heads=None, dtype=jnp.float32, seed=0):
    """Attention inputs ``(query, key, value)``: ``(batch, Tq, heads, depth)`` and twice ``(batch, Tk, kv_heads,
    depth)``, standard normal from numpy (every eager jax.random call compiles a program, and compiling dominates)."""
    rng = np.random.default_rng(seed)
    kv_heads = heads if kv_heads is None else kv_heads
    q = rng.standard_normal((batch, q_length, heads, depth))
    k, v = rng.standard_normal((2, batch, k_length, kv_heads, depth))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def mc_model(params, x, *, key, train):
    """A one-hidden-layer network with dropout, in the jdrop convention (one example or a batch)."""
    hidden = jdrop.dropout(key, jnp.tanh(x @ params["w1"]), params["rate"], deterministic=not train)
    return hidden @ params["w2"]


def mc_params(rate=0.5):
    """Parameters of ``mc_model``: 4 inputs, 16 hidden units, 3 outputs; ``rate`` drops hidden units."""
    return {"w1": normal_input((4, 16), seed=5), "w2": normal_input((16, 3), seed=6), "rate": rate}


def run_on_cpu_devices(script, devices=8, timeout=600):
    """Runs ``script`` in a fresh Python with ``devices`` simulated CPU devices (the count is fixed when JAX
    starts) and this checkout first on the path; returns the JSON it prints after ``RESULT``."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def pallas_calls(jaxpr):
    """``{name: cost_estimate}`` of every pallas_call in a closed jaxpr, sub-jaxprs included."""
    found = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found[eqn.params["name"]] = eqn.params["cost_estimate"]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found.update(pallas_calls(sub.jaxpr))
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found.update(pallas_calls(sub))
    return found


@contextlib.contextmanager
def exclusive(lock):
    """Holds an exclusive lock on the file ``lock`` (POSIX ``flock``; no lock where there is none), so that one
    pytest-xdist worker does a shared, session-wide piece of work while the others wait for it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: xdist workers may then each do the work
        yield
        return
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def compiled_mlp_step(apply_fn, sizes, *, activation="relu", batch=128):
    """The compiled (donating) ``jdrop.train_step`` of an MLP ``jdrop.mlp.init(key, sizes, activation)`` with
    ``apply_fn`` on a float32 batch ``(batch, sizes[0])``: compile only, nothing runs (for memory and op counts)."""
    import jax
    import jax.numpy as jnp
    import optax

    from jdrop import mlp, train

    params = jax.eval_shape(lambda: mlp.init(jax.random.key(0), sizes, activation=activation))
    state = jax.eval_shape(lambda p: train.TrainState.create(apply_fn=apply_fn, params=p, tx=optax.sgd(0.1)), params)
    batch_spec = {
        "x": jax.ShapeDtypeStruct((batch, sizes[0]), jnp.float32),
        "y": jax.ShapeDtypeStruct((batch,), jnp.int32),
    }
    step = jax.jit(train._loop._train_step, donate_argnums=(0,))
    return step.lower(state, batch_spec, jax.random.key(1), 0).compile()
