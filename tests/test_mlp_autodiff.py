"""Every mode of autodiff through jdrop.mlp.apply equals autodiff of an MLP built on flax's dropout, same masks.

The reference is a plain-jnp MLP whose layer ``l`` applies ``flax.linen.Dropout`` to example ``i`` with jdrop's key
for it, ``fold_in(example_keys(key, B)[i], l)`` (for the same key flax draws jdrop's mask), differentiated by JAX;
the classic scale, which flax lacks, multiplies by ``jdrop.keep_mask`` of the same key. The rates keep 3/4 or 1/2
exactly (flax's ``1 / (1 - rate)`` is jdrop's realised scale) and enter float32, so that under x64 both draw the
float32 run's masks (bernoulli draws uniforms in the dtype of its probability).

Tolerances come from a float64 run of the reference (the same inputs, under x64): a float32 result must be as
close to it as 8 times the float32 reference's own distance to it, plus 4 float32 ulps of the result's scale;
jdrop in float64 must equal the float64 reference to ``1e-11`` of the scale (rounding only).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import compiled_mlp_step

import jdrop
from jdrop import mlp

SIZES = (5, 7, 6, 3)
BATCH = 4
KEY = jax.random.key(7)
KEYS = jdrop.example_keys(KEY, BATCH)
EPS32 = float(np.finfo(np.float32).eps)


def _arrays(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape).astype(np.float32) for shape in shapes]


def _params(activation, seed=0):
    weights = _arrays(seed, *zip(SIZES[:-1], SIZES[1:]))
    biases = _arrays(seed + 1, *((d,) for d in SIZES[1:]))
    return mlp.MLPParams(tuple(w / np.sqrt(w.shape[0]) for w in weights), tuple(0.3 * b for b in biases), activation)


def _cast(tree, dtype):
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


def _reference(params, x, keys, rates, scale):
    """The plain MLP with flax's dropout (inverted) or flax's mask, unscaled (classic): one example or a batch."""
    if x.ndim == 2:
        return jax.vmap(lambda xi, ki: _reference(params, xi, ki, rates, scale))(x, keys)
    h, last = x, len(params.weights) - 1
    for layer, (w, b) in enumerate(zip(params.weights, params.biases)):
        key = jax.random.fold_in(keys, layer)
        if scale == "inverted":
            h = nn.Dropout(rates[layer]).apply({}, h, deterministic=False, rng=key)
        else:
            h = jnp.where(jax.random.bernoulli(key, 1.0 - rates[layer], h.shape), h, 0.0)
        z = h @ w + b
        h = z if layer == last else (jnp.tanh(z) if params.activation == "tanh" else jax.nn.relu(z))
    return h


def _reference_eval(params, x, keys, rates, scale):
    """The evaluation network: ``a_l = h_l`` (inverted) or ``keep_l * h_l`` (classic)."""
    del keys
    h, last = x, len(params.weights) - 1
    for layer, (w, b) in enumerate(zip(params.weights, params.biases)):
        z = (h if scale == "inverted" else (1.0 - rates[layer]) * h) @ w + b
        h = z if layer == last else (jnp.tanh(z) if params.activation == "tanh" else jax.nn.relu(z))
    return h


def _jdrop(params, x, keys, rates, scale, *, one_key=False, deterministic=False):
    key = KEY if one_key and x.ndim == 2 else keys
    return mlp.apply(params, x, key=None if deterministic else key, rates=rates, deterministic=deterministic,
                     scale=scale)


def _scalar(f):
    # sin: a non-zero second derivative through ReLU networks too.
    return lambda p, x, k: jnp.sum(jnp.sin(f(p, x, k)))


MODES = {
    "jvp": lambda f, p, x, t: jax.jvp(lambda p, x: f(p, x, KEYS), (p, x), t),
    "linearize": lambda f, p, x, t: jax.linearize(lambda p, x: f(p, x, KEYS), p, x)[1](*t),
    "jacfwd": lambda f, p, x, t: jax.jacfwd(f, argnums=(0, 1))(p, x, KEYS),
    "jacrev": lambda f, p, x, t: jax.jacrev(f, argnums=(0, 1))(p, x, KEYS),
    "hessian": lambda f, p, x, t: jax.hessian(_scalar(f), argnums=(0, 1))(p, x, KEYS),
    "grad_of_grad": lambda f, p, x, t: jax.grad(
        lambda p: jnp.sum(jax.grad(_scalar(f), argnums=1)(p, x, KEYS) ** 2))(p),
    "jacrev_of_jacfwd": lambda f, p, x, t: jax.jacrev(jax.jacfwd(_scalar(f), argnums=1))(p, x, KEYS),
    # Three tangent directions at once, and per-example gradients of single examples (1-D x, their own keys).
    "vmap_jvp": lambda f, p, x, t: jax.vmap(
        lambda s: jax.jvp(lambda p, x: f(p, x, KEYS), (p, x), jax.tree.map(lambda a: s * a, t))[1])(
        jnp.asarray([1.0, -0.5, 2.0], x.dtype)),
    "vmap_grad": lambda f, p, x, t: jax.vmap(jax.grad(_scalar(f), argnums=(0, 1)), (None, 0, 0))(p, x, KEYS),
    "jvp_one_example": lambda f, p, x, t: jax.jvp(lambda p, x: f(p, x, KEYS[2]), (p, x[2]), (t[0], t[1][2])),
}

CONFIGS = {
    "tanh": dict(activation="tanh", rates=(0.25, 0.5, 0.25), scale="inverted"),
    "relu": dict(activation="relu", rates=(0.25, 0.5, 0.25), scale="inverted"),
    # Traced rates, a rate-0 layer (no mask at all), one key per example.
    "relu_classic_traced": dict(activation="relu", rates=(0.5, 0.0, 0.25), scale="classic", traced=True),
    "tanh_classic_traced": dict(activation="tanh", rates=(0.25, 0.5, 0.0), scale="classic", traced=True),
    "eval_classic": dict(activation="tanh", rates=(0.25, 0.5, 0.25), scale="classic", deterministic=True),
}
FULL = ("tanh", "relu", "eval_classic")  # every mode; the other configurations: the modes below
SOME_MODES = ("jvp", "jacfwd", "hessian", "vmap_grad")


def _run(config, mode, dtype):
    """``(jdrop's result, the reference's)`` for one mode, in one jitted program, in ``dtype``.

    The reference takes the rates as float32 constants. jdrop takes a rate of 0 statically (no mask), the others
    as traced float32 scalars in the ``traced`` configurations and under x64 (so that its masks are the float32
    run's: a static rate enters as a float64 under x64), and as Python floats otherwise.
    """
    options = CONFIGS[config]
    rates, scale, deterministic = options["rates"], options["scale"], options.get("deterministic", False)
    traced = options.get("traced", False) or dtype == np.float64
    params = _cast(_params(options["activation"]), dtype)
    x, tx = (jnp.asarray(a, dtype) for a in _arrays(2, (BATCH, SIZES[0]), (BATCH, SIZES[0])))
    tangents = (_cast(_params(options["activation"], seed=3), dtype), tx)

    @jax.jit
    def program(params, x, tangents, rate_args):
        ours_rates = tuple(a if traced and r != 0.0 else r for r, a in zip(rates, rate_args))
        ours = functools.partial(_jdrop, rates=ours_rates, scale=scale, deterministic=deterministic,
                                 one_key=not traced)
        reference = _reference_eval if deterministic else _reference
        theirs = functools.partial(reference, rates=tuple(np.float32(r) for r in rates), scale=scale)
        return MODES[mode](ours, params, x, tangents), MODES[mode](theirs, params, x, tangents)

    return program(params, x, tangents, tuple(jnp.float32(r) for r in rates))


def _leaves(tree):
    return [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(tree)]


@functools.cache
def _float64_reference(config, mode):
    with jax.enable_x64(True):
        ours, theirs = _run(config, mode, np.float64)
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(ours))
        return _leaves(ours), _leaves(theirs)


CASES = [(c, m) for c in CONFIGS for m in (MODES if c in FULL else SOME_MODES)]
# `make test` runs every mode once (tanh: the layers that regenerate their masks from the key) and the common modes
# on the others; the rest (about 4 s of compiling each) runs with the integration checks.
QUICK = {"tanh": tuple(MODES), "relu": SOME_MODES, "eval_classic": ("jvp", "hessian"),
         "relu_classic_traced": ("jvp", "hessian"), "tanh_classic_traced": ("jacfwd", "vmap_grad")}


def _case(config, mode):
    marks = () if mode in QUICK[config] else (pytest.mark.integration,)
    return pytest.param(config, mode, id=f"{config}-{mode}", marks=marks)


@pytest.mark.parametrize(("config", "mode"), [_case(c, m) for c, m in CASES])
def test_every_mode_equals_autodiff_of_flax_dropout(config, mode):
    ours64, ref64 = _float64_reference(config, mode)
    ours32, theirs32 = (_leaves(tree) for tree in _run(config, mode, np.float32))
    assert len(ours32) == len(theirs32) == len(ref64) == len(ours64)
    for ours, theirs, ref, exact in zip(ours32, theirs32, ref64, ours64):
        scale = np.abs(ref).max()
        # float64: the same maths as the reference, rounding only.
        np.testing.assert_allclose(exact, ref, rtol=0, atol=1e-11 * (1 + scale))
        # float32: as close to the float64 reference as the float32 reference is (8x), plus 4 ulps of the scale.
        tol = 8 * np.abs(theirs - ref).max() + 4 * EPS32 * scale
        np.testing.assert_allclose(ours, ref, rtol=0, atol=tol)
    # Not vacuous: the derivatives are not zero, and dropout did drop (the eval network gives other values).
    assert any(np.abs(leaf).max() > 1e-3 for leaf in ref64)


def test_dropout_really_drops_in_the_reference():
    params = _params("tanh")
    x = jnp.asarray(_arrays(2, (BATCH, SIZES[0]))[0])
    rates = CONFIGS["tanh"]["rates"]
    dropped = _reference(params, x, KEYS, rates, "inverted")
    assert not np.allclose(dropped, _reference_eval(params, x, KEYS, rates, "inverted"), atol=1e-3)
    ours = _jdrop(params, x, KEYS, rates, "inverted", one_key=True)
    np.testing.assert_allclose(ours, dropped, rtol=4 * EPS32, atol=4 * EPS32 * float(np.abs(dropped).max()))


# ------------------------------------------------------------------------------------- reverse mode unchanged


def test_reverse_mode_runs_the_hand_written_backward(monkeypatch):
    calls = []
    backward = mlp._backward

    def counted(*args):
        calls.append(1)
        return backward(*args)

    monkeypatch.setattr(mlp, "_backward", counted)
    params = _params("relu")
    x = jnp.asarray(_arrays(2, (BATCH, SIZES[0]))[0])
    jax.make_jaxpr(jax.grad(lambda p: jnp.sum(mlp.apply(p, x, key=KEY, rates=0.5, deterministic=False))))(params)
    assert calls, "reverse mode must run jdrop.mlp's hand-written backward pass, not JAX's transpose of the JVP"


@jdrop.train.takes_batch
def _custom_vjp_apply(params, x, *, key, rates, deterministic):
    """``mlp.apply`` in training as a ``jax.custom_vjp`` of the same forward and backward passes (reverse mode only)."""
    assert not deterministic
    static, params, x, key_data, rates_array = mlp._train_arguments(params, x, key, rates, "inverted")

    @jax.custom_vjp
    def apply(params, x):
        return mlp._train_forward(static, params, x, key_data, rates_array)[0]

    def fwd(params, x):
        out, res = mlp._train_forward(static, params, x, key_data, rates_array)
        return out, (params, res)

    apply.defvjp(fwd, lambda saved, dout: mlp._backward(*saved, dout))
    return apply(params, x)


def _step_program(apply_fn, activation, depth=4, batch=128, width=1024):
    """Temporaries and instruction count of the compiled (donating) training step of a depth-4 MLP."""
    sizes = (width,) * (depth + 1) + (10,)
    apply_fn = functools.partial(apply_fn, rates=(0.0,) + (0.5,) * depth)
    compiled = compiled_mlp_step(apply_fn, sizes, activation=activation, batch=batch)
    instructions = [line for line in compiled.as_text().splitlines() if " = " in line and "parameter(" not in line]
    return compiled.memory_analysis().temp_size_in_bytes, len(instructions)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_training_step_is_the_custom_vjp_program(activation):
    """The forward-mode rule leaves the reverse-mode program as it was: same temporaries, same instructions.

    Measured on XLA:CPU when forward mode was added (batch 128, width 1024, 4 hidden layers at rate 0.5): ReLU
    6,820,032 bytes of temporaries and 1281 instructions, tanh 8,440,256 bytes and 1973, before and after.
    """
    ours = _step_program(mlp.apply, activation)
    assert ours == _step_program(_custom_vjp_apply, activation)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_unjitted_vjp_keeps_the_residuals_not_masks(activation):
    """Outside jit (no XLA to remove dead values) ``jax.vjp`` holds what the custom_vjp of the same pair holds, plus
    the forward-mode rule's zero blocks on the logits (a bool and a float zero per logit, twice) and the transposed
    weights its second-order rule closes over: no mask, no product of the kept activations, nothing else per
    hidden unit."""
    params = _params(activation)
    x = jnp.asarray(_arrays(2, (BATCH, SIZES[0]))[0])

    def held(apply_fn):
        _, vjp_fn = jax.vjp(lambda p, x: apply_fn(p, x, key=KEYS, rates=(0.25, 0.5, 0.25), deterministic=False),
                            params, x)
        return [leaf for leaf in jax.tree.leaves(vjp_fn) if hasattr(leaf, "nbytes")]

    ours, theirs = held(mlp.apply), held(_custom_vjp_apply)
    logits = BATCH * SIZES[-1]
    weights = sum(w.nbytes for w in params.weights)
    assert sum(leaf.nbytes for leaf in ours) <= sum(leaf.nbytes for leaf in theirs) + 2 * logits * (1 + 4) + weights
    assert not any(leaf.dtype == jnp.bool_ and leaf.size > logits for leaf in ours)
