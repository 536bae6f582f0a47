"""Tests for jdrop.mlp: init, apply (train/eval), the hand-written forward/backward and their memory.

Every training-mode output and gradient is checked against a naive ``jnp`` MLP that draws its masks with
``jdrop.keep_mask(fold_in(example_key_i, layer), ...)`` and differentiates with plain autodiff. Everything that
runs a network is jit-compiled (eager dispatch of the unrolled threefry is slow on CPU) and shared between
tests, so the file stays fast on a small machine.
"""

import functools
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from _util import assert_trees_close as _allclose_tree
from _util import compiled_mlp_step
from _util import realised_keep as _keep

import jdrop
from jdrop import mlp, train

SIZES = (5, 7, 6, 3)
RATES = (0.2, 0.5, 0.25)  # input dropout + both hidden layers
BATCH = 4
KEY = jax.random.key(7)


def _act(name, z):
    return jnp.tanh(z) if name == "tanh" else jax.nn.relu(z)


def naive_one(params, x, masks_i, rates, scale="inverted"):
    """One example through a plain-jnp MLP with the given per-layer keep masks (see ``example_masks``)."""
    h = x
    last = len(params.weights) - 1
    for layer, (w, b) in enumerate(zip(params.weights, params.biases)):
        s = 1.0 / _keep(rates[layer]) if scale == "inverted" else 1.0
        a = jnp.where(masks_i[layer], h * s, 0.0).astype(h.dtype)
        z = a @ w + b
        h = z if layer == last else _act(params.activation, z)
    return h


def naive_eval(params, x, rates, scale="inverted"):
    h = x
    last = len(params.weights) - 1
    for layer, (w, b) in enumerate(zip(params.weights, params.biases)):
        a = h if scale == "inverted" else _keep(rates[layer]) * h
        z = a @ w + b
        h = z if layer == last else _act(params.activation, z)
    return h


@functools.partial(jax.jit, static_argnames=("n", "sizes", "rates"))
def example_masks(key, n, sizes, rates):
    """Layer l's mask of example i: keep_mask(fold_in(example_keys(key, n)[i], l), (d_l,), rates[l]).

    Drawn once, outside the differentiated references (cheaper to compile than drawing inside each one).
    """
    keys = jdrop.example_keys(key, n)
    return tuple(
        jax.vmap(lambda k, layer=layer: jdrop.keep_mask(jax.random.fold_in(k, layer), (sizes[layer],), rates[layer]))(
            keys
        )
        for layer in range(len(rates))
    )


def naive_batch(params, x, masks_, rates, scale="inverted"):
    return jax.vmap(naive_one, in_axes=(None, 0, 0, None, None))(params, x, masks_, rates, scale)


def _setup(activation, sizes=SIZES, batch=BATCH, dtype=jnp.float32):
    """Parameters and a batch drawn with numpy (each jax.random shape would cost a compilation)."""
    rng = np.random.default_rng(0)
    weights = tuple(jnp.asarray(rng.normal(size=(i, o)) / np.sqrt(i), dtype) for i, o in zip(sizes[:-1], sizes[1:]))
    # Non-zero biases so that db and the bias path are exercised.
    biases = tuple(jnp.asarray(0.1 * np.arange(o) - 0.2, dtype) for o in sizes[1:])
    x = jnp.asarray(rng.normal(size=(batch, sizes[0])), dtype)
    return mlp.MLPParams(weights, biases, activation), x


# ------------------------------------------------------------------------------------------- init


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_init_shapes_dtypes_and_static_activation(activation):
    params = mlp.init(jax.random.key(0), (5, 7, 3), activation=activation)
    assert isinstance(params, mlp.MLPParams)
    assert params.activation == activation
    assert [w.shape for w in params.weights] == [(5, 7), (7, 3)]
    assert [b.shape for b in params.biases] == [(7,), (3,)]
    assert all(w.dtype == jnp.float32 for w in params.weights + params.biases)
    assert all(np.all(np.asarray(b) == 0) for b in params.biases)
    assert not np.allclose(params.weights[0], 0)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    assert len(leaves) == 4 and all(isinstance(leaf, jax.Array) for leaf in leaves)
    # The activation is static: it lives in the treedef, and jit sees a Python string.
    assert activation in str(treedef)
    seen = []

    @jax.jit
    def f(p):
        seen.append(p.activation)
        return p.weights[0].sum()

    f(params)
    assert seen == [activation]
    other = mlp.init(jax.random.key(0), (5, 7, 3), activation="relu" if activation == "tanh" else "tanh")
    assert jax.tree_util.tree_structure(other) != treedef

    # Deeper nets and other dtypes: shapes and dtypes only (eval_shape compiles nothing).
    deep = jax.eval_shape(lambda: mlp.init(jax.random.key(0), SIZES, activation=activation, dtype=jnp.bfloat16))
    assert [w.shape for w in deep.weights] == [(5, 7), (7, 6), (6, 3)]
    assert [b.shape for b in deep.biases] == [(7,), (6,), (3,)]
    assert all(w.dtype == jnp.bfloat16 for w in deep.weights + deep.biases)
    assert deep.activation == activation


@pytest.mark.parametrize("activation, gain", [("tanh", 1.0), ("relu", 2.0)])
def test_init_weight_variance(activation, gain):
    d_in, d_out = 200, 300
    (w,) = mlp.init(jax.random.key(3), (d_in, d_out), activation=activation).weights
    n = d_in * d_out
    var = gain / d_in
    # The sample variance of n Gaussians has standard error var * sqrt(2 / n); 5 sigma.
    assert abs(float(jnp.var(w)) - var) <= 5 * var * math.sqrt(2 / n)
    # The sample mean has standard error sqrt(var / n); 5 sigma.
    assert abs(float(jnp.mean(w))) <= 5 * math.sqrt(var / n)


@pytest.mark.parametrize("activation", ["gelu", "Tanh", None])
def test_init_rejects_bad_activation(activation):
    with pytest.raises(ValueError, match="activation"):
        mlp.init(jax.random.key(0), SIZES, activation=activation)


@pytest.mark.parametrize("sizes", [(), (5,), (5, 0), (5, -1, 3), (5, 2.0), (5, True), ("5", 3)])
def test_init_rejects_bad_layer_sizes(sizes):
    with pytest.raises(ValueError, match="layer_sizes"):
        mlp.init(jax.random.key(0), sizes)


# ------------------------------------------------------------------------------------ apply: values


def _loss_weights(shape):
    return jnp.asarray(np.random.default_rng(11).normal(size=shape), jnp.float32)


@functools.cache
def _shared(activation):
    """Outputs and gradients of every way of running the same training loss ``sum(c * logits)``: the batch, the
    naive MLP, vmap over single examples, vmap of per-example grads and one example. Computed once, in one
    compilation, and shared by the tests below. The vmap variants exercise machinery that does not depend on the
    activation: tanh only (compile time).
    """
    params, x = _setup(activation)
    c = _loss_weights((BATCH, SIZES[-1]))
    masks_ = example_masks(KEY, BATCH, SIZES[:-1], RATES)
    full = activation == "tanh"

    @jax.jit
    def compute(params, x, key, c, masks_):
        keys = jdrop.example_keys(key, x.shape[0])

        def loss_batch(p, x):
            out = mlp.apply(p, x, key=key, rates=RATES, deterministic=False)
            return jnp.sum(c * out), out

        def loss_naive(p, x):
            out = naive_batch(p, x, masks_, RATES)
            return jnp.sum(c * out), out

        def loss_vmap(p, x):
            out = jax.vmap(lambda xi, ki: mlp.apply(p, xi, key=ki, rates=RATES, deterministic=False))(x, keys)
            return jnp.sum(c * out), out

        def loss_single(p, xi, ki, ci):
            out = mlp.apply(p, xi, key=ki, rates=RATES, deterministic=False)
            return jnp.sum(ci * out), out

        def loss_single_naive(p, xi, mi, ci):
            out = naive_one(p, xi, mi, RATES)
            return jnp.sum(ci * out), out

        def run(f, *args):
            (_, out), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(*args)
            return {"out": out, "grad": grads}

        results = {"batch": run(loss_batch, params, x), "naive": run(loss_naive, params, x)}
        if full:
            results["vmap"] = run(loss_vmap, params, x)
            results["per_example"] = jax.vmap(functools.partial(run, loss_single), in_axes=(None, 0, 0, 0))(
                params, x, keys, c
            )
            results["single"] = run(loss_single, params, x[2], keys[2], c[2])
            results["single_naive"] = run(loss_single_naive, params, x[2], tuple(m[2] for m in masks_), c[2])
        return results

    return params, x, c, compute(params, x, KEY, c, masks_)


_apply_train = jax.jit(functools.partial(mlp.apply, deterministic=False), static_argnames=("rates", "scale"))
_naive_batch = jax.jit(naive_batch, static_argnames=("rates", "scale"))


def _naive_train(params, x, key, rates, scale="inverted"):
    sizes = tuple(w.shape[0] for w in params.weights)
    return _naive_batch(params, x, example_masks(key, x.shape[0], sizes, rates), rates, scale)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("scale", ["inverted", "classic"])
def test_apply_train_equals_naive_mlp(activation, scale):
    if scale == "inverted":
        params, x, _, r = _shared(activation)
        batch, naive = r["batch"]["out"], r["naive"]["out"]
    else:
        params, x = _setup(activation)
        batch = _apply_train(params, x, key=KEY, rates=RATES, scale=scale)
        naive = _naive_train(params, x, KEY, RATES, scale)
    assert batch.shape == (BATCH, SIZES[-1]) and batch.dtype == jnp.float32
    np.testing.assert_allclose(batch, naive, rtol=1e-5, atol=1e-6)
    # Dropout really did something (the reference is not the deterministic network).
    assert not np.allclose(batch, naive_eval(params, x, RATES, scale), atol=1e-3)


def test_batch_equals_vmap_of_single_examples():
    *_, r = _shared("tanh")
    batch = r["batch"]["out"]
    # A batch is the vmap of single examples with keys example_keys(key, B) ...
    np.testing.assert_allclose(r["vmap"]["out"], batch, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r["per_example"]["out"], batch, rtol=1e-5, atol=1e-6)
    # ... and one example (1-D input) uses its key directly: example 2 of the batch.
    assert r["single"]["out"].shape == (SIZES[-1],)
    np.testing.assert_allclose(r["single"]["out"], batch[2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r["single_naive"]["out"], batch[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", ["inverted", "classic"])
def test_apply_eval_is_deterministic_network(scale):
    params, x = _setup("relu")
    out = jax.jit(functools.partial(mlp.apply, rates=RATES, deterministic=True, scale=scale))(params, x)
    np.testing.assert_allclose(out, naive_eval(params, x, RATES, scale), rtol=1e-5, atol=1e-6)
    # Eval needs no key and a single example is row 0 of the batch.
    one = mlp.apply(params, x[0], rates=RATES, deterministic=True, scale=scale)
    np.testing.assert_allclose(one, out[0], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------- apply: gradients


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_grad_of_batch_equals_grad_of_naive(activation):
    *_, r = _shared(activation)
    (dp, dx), (dp_ref, dx_ref) = r["batch"]["grad"], r["naive"]["grad"]
    _allclose_tree(dp, dp_ref)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-6)
    assert dp.activation == activation
    # Non-trivial: every weight gets a gradient somewhere.
    assert all(float(jnp.abs(w).max()) > 1e-3 for w in dp.weights)


def test_grad_of_single_example_equals_naive():
    *_, r = _shared("tanh")
    _allclose_tree(r["single"]["grad"], r["single_naive"]["grad"])


def test_grad_of_vmap_over_examples_equals_batch_grad():
    *_, r = _shared("tanh")
    _allclose_tree(r["vmap"]["grad"], r["batch"]["grad"])


def test_vmap_of_grad_gives_per_example_grads_that_sum_to_batch_grad():
    *_, r = _shared("tanh")
    dp_each, dx_each = r["per_example"]["grad"]
    assert dp_each.weights[0].shape == (BATCH, *SIZES[:2])
    _allclose_tree(jax.tree_util.tree_map(lambda a: a.sum(0), dp_each), r["batch"]["grad"][0])
    np.testing.assert_allclose(dx_each, r["batch"]["grad"][1], rtol=1e-5, atol=1e-6)
    # Example 2's own gradient is the single-example gradient.
    _allclose_tree(jax.tree_util.tree_map(lambda a: a[2], (dp_each, dx_each)), r["single"]["grad"])


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_per_example_calls_apply_once_on_the_batch_with_the_example_keys(activation, monkeypatch):
    """apply is marked takes_batch, so per_example (train_step, mc_predict, rdrop_loss) calls it once on the batch
    with the example keys (any offset) instead of vmapping it; that equals JAX's vmap of the one-example custom_vjp
    with the same keys: same outputs, parameter and input gradients. No JAX internal decides it."""
    from jdrop._batching import is_batched

    assert is_batched(mlp.apply) and is_batched(functools.partial(mlp.apply, rates=RATES))
    params, x, c, _ = _shared(activation)
    offset = 3
    keys = jdrop.example_keys(KEY, BATCH, offset=offset)

    @jax.jit
    def both(p, x):
        def per_example(p, x):
            return train.per_example(functools.partial(mlp.apply, rates=RATES), p, x, KEY, offset=offset)

        def vmapped(p, x):
            return jax.vmap(lambda xi, ki: mlp.apply(p, xi, key=ki, rates=RATES, deterministic=False))(x, keys)

        def run(f):
            return jax.value_and_grad(lambda p, x: jnp.sum(c * f(p, x)), argnums=(0, 1))(p, x)

        return run(per_example), run(vmapped), per_example(p, x)

    fast, plain, out = both(params, x)
    np.testing.assert_allclose(fast[0], plain[0], rtol=1e-6)
    _allclose_tree(fast[1], plain[1])
    # One call on the batch: the custom_vjp sees (B, d_0), where under vmap it sees one example (d_0,).
    seen = []
    core = mlp._train_apply
    monkeypatch.setattr(mlp, "_train_apply", lambda *args: seen.append(args[2].shape) or core(*args))
    jax.eval_shape(lambda p, x: train.per_example(functools.partial(mlp.apply, rates=RATES), p, x, KEY), params, x)
    jax.eval_shape(lambda p, x: jax.vmap(lambda xi, ki: mlp.apply(p, xi, key=ki, rates=RATES, deterministic=False))(
        x, keys), params, x)
    assert seen == [(BATCH, SIZES[0]), (SIZES[0],)]
    assert out.shape == (BATCH, SIZES[-1])


def test_batch_with_one_key_per_example_and_key_errors():
    params, x, _, r = _shared("tanh")
    keys = jdrop.example_keys(KEY, BATCH)
    # One key per example equals one key for the batch (whose example keys these are).
    np.testing.assert_allclose(_apply_train(params, x, key=keys, rates=RATES), r["batch"]["out"], rtol=1e-6)
    with pytest.raises(ValueError, match="one key per example"):
        mlp.apply(params, x, key=keys[:2], rates=RATES, deterministic=False)
    with pytest.raises(ValueError, match="single key"):
        mlp.apply(params, x[0], key=keys, rates=RATES, deterministic=False)


def test_train_flag_is_deprecated_with_identical_results():
    params, x, _, r = _shared("tanh")
    with pytest.warns(DeprecationWarning, match="deterministic=False"):
        out = jax.jit(lambda p, x: mlp.apply(p, x, key=KEY, rates=RATES, train=True))(params, x)
    np.testing.assert_allclose(out, r["batch"]["out"], rtol=1e-6)
    with pytest.warns(DeprecationWarning, match="deterministic=True"):
        evaluated = mlp.apply(params, x, rates=RATES, train=False)
    np.testing.assert_array_equal(evaluated, mlp.apply(params, x, rates=RATES))  # evaluation stays the default
    with pytest.raises(TypeError, match="both"):
        mlp.apply(params, x, key=KEY, rates=RATES, train=True, deterministic=False)


def test_params_reject_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        mlp.MLPParams((jnp.ones((2, 2)),), (jnp.zeros(2),), "gelu")


# (layer, index) of the parameters checked against finite differences; index of length 2: weight, 1: bias.
_FD_ENTRIES = [(0, (0, 0)), (0, (4, 6)), (1, (3, 2)), (1, (6, 5)), (2, (5, 1)), (2, (0, 2)), (0, (3,)), (1, (1,))]


def test_grad_matches_float64_finite_differences():
    eps = 1e-6
    with jax.enable_x64(True):
        params, x = _setup("tanh", dtype=jnp.float64)
        key = KEY
        c = jnp.asarray(np.asarray(_loss_weights((BATCH, SIZES[-1]))), jnp.float64)

        def loss(p):
            return jnp.sum(c * jnp.sin(mlp.apply(p, x, key=key, rates=RATES, deterministic=False)))

        # Perturbed copies of the parameters, +eps and -eps for every checked entry, stacked on a leading axis.
        def moved(sign):
            weights = [np.repeat(np.asarray(w)[None], len(_FD_ENTRIES), 0) for w in params.weights]
            biases = [np.repeat(np.asarray(b)[None], len(_FD_ENTRIES), 0) for b in params.biases]
            for n, (layer, index) in enumerate(_FD_ENTRIES):
                (weights if len(index) == 2 else biases)[layer][(n, *index)] += sign * eps
            return mlp.MLPParams(tuple(map(jnp.asarray, weights)), tuple(map(jnp.asarray, biases)), "tanh")

        @jax.jit
        def compute(params, plus, minus):
            return jax.grad(loss)(params), jax.vmap(loss)(plus), jax.vmap(loss)(minus)

        grads, up, down = compute(params, moved(1.0), moved(-1.0))
        assert grads.weights[1].dtype == jnp.float64 and up.dtype == jnp.float64
        fd = (np.asarray(up) - np.asarray(down)) / (2 * eps)
        analytic = [
            float((grads.weights if len(index) == 2 else grads.biases)[layer][index]) for layer, index in _FD_ENTRIES
        ]
        # Central differences in float64: truncation O(eps^2) ~ 1e-12, rounding ~ 1e-16 / eps ~ 1e-10.
        np.testing.assert_allclose(analytic, fd, rtol=1e-6, atol=1e-8)
        assert np.sum(np.abs(fd) > 1e-4) >= 4  # most checked entries are not trivially zero (dropped units)
    assert jnp.zeros(()).dtype == jnp.float32  # x64 did not leak


@jax.jit
def _forward_backward(params, x, key, dout):
    keys = jdrop.example_keys(key, x.shape[0])
    inverted = mlp.forward(params, x, key, RATES)
    classic = mlp.forward(params, x, key, RATES, scale="classic")
    single = mlp.forward(params, x[2], keys[2], RATES)
    return {
        "inverted": (inverted[0], inverted[1], mlp.backward(params, inverted[1], dout)),
        "classic": (classic[0], classic[1], mlp.backward(params, classic[1], dout)),
        "single": (single[0], single[1], mlp.backward(params, single[1], dout[2])),
    }


@jax.jit
def _naive_classic_vjp(params, x, masks_, dout):
    out, vjp = jax.vjp(lambda p: naive_batch(p, x, masks_, RATES, "classic"), params)
    return out, vjp(dout)[0]


def test_forward_backward_equal_autodiff():
    params, x, dout, r = _shared("tanh")
    key = KEY
    results = _forward_backward(params, x, key, dout)
    # inverted, batch: the jax.grad of apply (itself checked against the naive MLP above)
    out, res, grads = results["inverted"]
    np.testing.assert_allclose(out, r["batch"]["out"], rtol=1e-6, atol=1e-7)
    _allclose_tree(grads, r["batch"]["grad"][0])
    # The residuals are the pre-dropout activations and the example keys: no mask, no dropped copy.
    assert [a.shape for a in res.activations] == [(BATCH, d) for d in SIZES[:-1]]
    np.testing.assert_array_equal(res.activations[0], x)
    assert not any(leaf.dtype == jnp.bool_ for leaf in jax.tree_util.tree_leaves(res))
    np.testing.assert_array_equal(res.key_data, jax.random.key_data(jdrop.example_keys(key, BATCH)))
    # classic, batch: the vjp of the naive MLP with the same masks
    out, _, grads = results["classic"]
    ref_out, ref_grads = _naive_classic_vjp(params, x, example_masks(key, BATCH, SIZES[:-1], RATES), dout)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    _allclose_tree(grads, ref_grads)
    # one example (1-D input, its own key)
    out, _, grads = results["single"]
    assert out.shape == (SIZES[-1],)
    np.testing.assert_allclose(out, r["single"]["out"], rtol=1e-6, atol=1e-7)
    _allclose_tree(grads, r["single"]["grad"][0])


@jax.jit
def _manual_grads(params, x, masks_, c):
    """The seed's backward by hand with the same masks, taking act' from the pre-dropout value h or from the
    dropped, scaled value a (the seed's bug)."""
    last = len(params.weights) - 1
    hs, as_, ms = [], [], []
    h = x
    for layer, (w, b) in enumerate(zip(params.weights, params.biases)):
        ms_l = masks_[layer] / _keep(RATES[layer])
        a = h * ms_l
        hs.append(h)
        as_.append(a)
        ms.append(ms_l)
        z = a @ w + b
        h = z if layer == last else jnp.tanh(z)
    results = {}
    for source in ("pre", "dropped"):
        g = c
        gw, gb = [], []
        for layer in reversed(range(last + 1)):
            gw.append(as_[layer].T @ g)
            gb.append(g.sum(0))
            dh = (g @ params.weights[layer].T) * ms[layer]
            v = hs[layer] if source == "pre" else as_[layer]
            g = dh * (1.0 - v * v)
        results[source] = mlp.MLPParams(tuple(reversed(gw)), tuple(reversed(gb)), params.activation)
    return results


def _threefry_calls(jaxpr):
    """How many times a (closed) jaxpr draws bits with jdrop's unrolled threefry, nested jaxprs included.

    A conditional runs one branch: it counts as its most drawing branch (the core's per-platform choice of
    program, and the CPU program's kernel boundary, are conditionals whose branches draw the same bits). A
    ``custom_linear_solve`` (the MLP's autodiff rule, jdrop._linear.linear_map) runs its ``solve`` on its
    ``solve`` operands; its other jaxprs, and what only their operands use, exist for differentiating it
    further and are not compiled (XLA removes them: an equation counts only if something that runs uses it).
    """
    needed = {v for v in jaxpr.outvars if isinstance(v, jax.extend.core.Var)}
    count = 0
    for eqn in reversed(jaxpr.eqns):
        if not any(v in needed for v in eqn.outvars):
            continue
        operands = eqn.invars
        if eqn.primitive.name in ("pjit", "jit") and eqn.params.get("name") == "_threefry_bits":
            count += 1
        elif eqn.primitive.name == "cond":
            count += max(_threefry_calls(branch.jaxpr) for branch in eqn.params["branches"])
        elif eqn.primitive.name == "custom_linear_solve":
            lengths = eqn.params["const_lengths"]
            start = lengths.matvec + lengths.vecmat
            operands = operands[start : start + lengths.solve] + operands[sum(lengths) :]
            count += _threefry_calls(eqn.params["jaxprs"].solve.jaxpr)
        else:
            count += sum(_threefry_calls(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
        needed.update(v for v in operands if isinstance(v, jax.extend.core.Var))
    return count


def test_relu_layers_keep_the_dropped_activation_and_never_regenerate_masks():
    params, x = _setup("relu")
    out, res = mlp.forward(params, x, KEY, RATES)
    masks_ = example_masks(KEY, BATCH, SIZES[:-1], RATES)
    # Layer 0 keeps x itself; hidden ReLU layers keep a_l = m_l * relu(z) / keep (the matmul's input).
    np.testing.assert_array_equal(res.activations[0], x)
    h = x
    for layer in range(len(SIZES) - 1):
        keep = 1.0 - RATES[layer]
        a = jnp.where(masks_[layer], h / keep, 0.0)
        if layer > 0:
            np.testing.assert_allclose(res.activations[layer], a, rtol=1e-6, atol=1e-7)
        z = a @ params.weights[layer] + params.biases[layer]
        h = jax.nn.relu(z) if layer < len(SIZES) - 2 else z
    np.testing.assert_allclose(out, h, rtol=1e-5, atol=1e-6)
    # The gradient w.r.t. the parameters draws each layer's bits once (the forward pass): the backward
    # pass reads ReLU layers' masks from [a_l > 0] and only x's gradient (unused here) would regenerate one.
    loss = lambda p: mlp.apply(p, x, key=KEY, rates=RATES, deterministic=False).sum()  # noqa: E731
    assert _threefry_calls(jax.make_jaxpr(loss)(params).jaxpr) == len(RATES)
    grad_jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
    assert _threefry_calls(grad_jaxpr) == len(RATES) + 1  # forward: one per layer; backward: input layer only
    # tanh keeps h_l and regenerates every active layer's mask in the backward pass (value_and_grad: the last
    # layer's forward draw feeds only the loss, which grad alone would drop).
    tparams, _ = _setup("tanh")
    tloss = lambda p: mlp.apply(p, x, key=KEY, rates=RATES, deterministic=False).sum()  # noqa: E731
    assert _threefry_calls(jax.make_jaxpr(jax.value_and_grad(tloss))(tparams).jaxpr) == 2 * len(RATES)
    assert _threefry_calls(jax.make_jaxpr(jax.grad(tloss))(tparams).jaxpr) == 2 * len(RATES) - 1


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_other_key_implementation_equals_naive(activation):
    # rbg keys take jax.random's own bits and fold_in; the MLP's masks and gradients follow them exactly.
    params, x = _setup(activation)
    key = jax.random.key(5, impl="rbg")
    masks_ = example_masks(key, BATCH, SIZES[:-1], RATES)
    c = _loss_weights((BATCH, SIZES[-1]))

    @jax.jit
    def both(params, x, masks_):
        ours = jax.value_and_grad(
            lambda p: jnp.sum(c * mlp.apply(p, x, key=key, rates=RATES, deterministic=False))
        )(params)
        ref = jax.value_and_grad(lambda p: jnp.sum(c * naive_batch(p, x, masks_, RATES)))(params)
        return ours, ref

    (value, grads), (ref_value, ref_grads) = both(params, x, masks_)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-6)
    _allclose_tree(grads, ref_grads)


def test_relu_backward_with_invalid_traced_rate_is_nan():
    params, x = _setup("relu")
    grads = jax.jit(
        jax.grad(lambda p, r: mlp.apply(p, x, key=KEY, rates=(0.0, r, 0.5), deterministic=False).sum())
    )(params, jnp.float32(1.5))
    assert all(bool(jnp.isnan(w).all()) for w in grads.weights[:2])


def test_seed_bug_activation_derivative_from_dropped_value_is_wrong():
    # tanh: act' = 1 - h^2 must use the pre-dropout h. (For relu the seed's bug is invisible: a > 0 iff h > 0
    # on kept units, and dropped units get zero gradient anyway.)
    params, x, c, r = _shared("tanh")
    manual = _manual_grads(params, x, example_masks(KEY, BATCH, SIZES[:-1], RATES), c)
    autodiff, ours = r["naive"]["grad"][0], r["batch"]["grad"][0]
    _allclose_tree(manual["pre"], autodiff)
    _allclose_tree(ours, manual["pre"])
    # Taking act' from the dropped/scaled value changes the gradient of every layer below the top one.
    for layer in (0, 1):
        wrong, right = manual["dropped"].weights[layer], autodiff.weights[layer]
        rel = float(jnp.abs(wrong - right).max() / jnp.abs(right).max())
        assert rel > 0.05, (layer, rel)
    np.testing.assert_allclose(manual["dropped"].weights[2], autodiff.weights[2], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ classic rule


@pytest.mark.parametrize("scale", ["classic", "inverted"])
def test_eval_output_is_mean_of_train_outputs_through_a_linear_layer(scale):
    rate, d_in, d_out, n = 0.3, 8, 3, 4000
    params, _ = _setup("tanh", sizes=(d_in, d_out))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(d_in,)), jnp.float32)
    keys = jdrop.example_keys(jax.random.key(9), n)

    @jax.jit
    def sample(params, x, keys):
        outs = jax.vmap(lambda k: mlp.apply(params, x, key=k, rates=(rate,), deterministic=False, scale=scale))(keys)
        mask = jax.vmap(lambda k: jdrop.keep_mask(jax.random.fold_in(k, 0), x.shape, rate))(keys)
        return outs, mask

    outs, mask = sample(params, x, keys)
    outs, mask = np.asarray(outs, np.float64), np.asarray(mask, np.float64)
    keep = float(_keep(rate))
    w, b, xs = np.asarray(params.weights[0], np.float64), np.asarray(params.biases[0]), np.asarray(x, np.float64)
    s = 1.0 / keep if scale == "inverted" else 1.0
    evaluated = np.asarray(mlp.apply(params, x, rates=(rate,), deterministic=True, scale=scale), np.float64)
    expected_eval = (keep * s) * xs @ w + b
    np.testing.assert_allclose(evaluated, expected_eval, rtol=1e-5, atol=1e-6)
    # Exactly (linear layer): the mean train output is the output of the mean mask.
    np.testing.assert_allclose(outs.mean(0), (s * mask.mean(0) * xs) @ w + b, rtol=1e-5, atol=1e-5)
    # Statistically: y_j = s * sum_i m_i x_i w_ij + b_j has variance s^2 keep (1 - keep) sum_i x_i^2 w_ij^2;
    # the mean of n draws has standard error sqrt(var / n); 5 sigma (plus float32 rounding).
    se = np.sqrt(s**2 * keep * (1 - keep) * (xs[:, None] ** 2 * w**2).sum(0) / n)
    assert np.all(np.abs(outs.mean(0) - evaluated) <= 5 * se + 1e-5), (outs.mean(0) - evaluated, se)


# ----------------------------------------------------------------------------------- traced rates


def test_traced_rates_compile_once_and_equal_static_rates():
    params, x, _, r = _shared("tanh")
    key = KEY
    traces = []

    @jax.jit
    def traced(params, x, key, rates):
        traces.append(1)
        return mlp.apply(params, x, key=key, rates=tuple(rates), deterministic=False)

    # (0, 1, r): rate 0 is the identity (statically: no mask at all), rate 1 drops everything.
    # The third rate set is checked against the naive MLP (one static compilation fewer).
    for rates in [RATES, (0.0, 1.0, 0.5), (0.3, 0.1, 0.7)]:
        out = traced(params, x, key, jnp.asarray(rates, jnp.float32))
        if rates[-1] != 0.7:
            static = r["batch"]["out"] if rates == RATES else _apply_train(params, x, key=key, rates=rates)
            np.testing.assert_allclose(out, static, rtol=1e-6, atol=1e-7)
            # rates[1] = 1 drops the whole first hidden layer: the output is the network of the constant tanh(b_1)
            if rates[1] == 1.0:
                m = example_masks(key, BATCH, SIZES[:-1], rates)[2]
                h = jnp.where(m, jnp.tanh(params.biases[1]) / _keep(0.5), 0.0)
                np.testing.assert_allclose(out, h @ params.weights[2] + params.biases[2], rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_allclose(out, _naive_train(params, x, key, rates), rtol=1e-5, atol=1e-6)
    assert len(traces) == 1


# ----------------------------------------------------------------------------------------- memory


def _naive_bernoulli_apply(rates):
    """A naive single-example MLP: jax.random.bernoulli masks and plain autodiff (what other code does)."""

    def apply_fn(params, x, *, key, train):
        h = x
        last = len(params.weights) - 1
        for layer, (w, b) in enumerate(zip(params.weights, params.biases)):
            if train and rates[layer] > 0:
                keep = 1.0 - rates[layer]
                m = jax.random.bernoulli(jax.random.fold_in(key, layer), keep, h.shape)
                h = jnp.where(m, h / keep, 0.0)
            z = h @ w + b
            h = z if layer == last else jax.nn.relu(z)
        return h

    return apply_fn


def _step_temp_bytes(hidden_layers, rate, *, naive=False, batch=128, width=1024):
    """Temporary memory of one compiled (donating) training step; compile only, nothing runs."""
    sizes = (width,) * (hidden_layers + 1) + (10,)
    rates = (0.0,) + (rate,) * hidden_layers
    apply_fn = _naive_bernoulli_apply(rates) if naive else functools.partial(mlp.apply, rates=rates)
    analysis = compiled_mlp_step(apply_fn, sizes, batch=batch).memory_analysis()
    if analysis is None:  # pragma: no cover - backend without memory analysis
        pytest.skip("this backend reports no memory analysis")
    return analysis.temp_size_in_bytes


def test_dropout_adds_no_per_element_memory_to_a_training_step():
    batch, width = 128, 1024
    base = {d: _step_temp_bytes(d, 0.0, batch=batch, width=width) for d in (4, 8)}
    drop = {d: _step_temp_bytes(d, 0.5, batch=batch, width=width) for d in (4, 8)}
    for d in (4, 8):
        assert drop[d] <= 1.05 * base[d], (d, drop[d], base[d])
    # 4 more dropped hidden layers of batch x width elements: the growth beyond the no-dropout growth must be
    # below 0.05 bytes per dropped element (a bool mask would cost 1 byte, a packed one 0.125).
    extra_elements = 4 * batch * width
    extra_bytes = (drop[8] - drop[4]) - (base[8] - base[4])
    assert extra_bytes <= 0.05 * extra_elements, (extra_bytes, extra_elements)
    # For contrast: bernoulli masks under plain autodiff keep per-element residuals alive.
    naive = _step_temp_bytes(4, 0.5, naive=True, batch=batch, width=width)
    assert naive > drop[4], (naive, drop[4])
    assert naive > 1.05 * base[4], (naive, base[4])


# ----------------------------------------------------------------------------------------- errors


def test_apply_errors():
    params, x = _setup("tanh")
    with pytest.raises(ValueError, match="key"):
        mlp.apply(params, x, rates=RATES, deterministic=False)
    with pytest.raises(ValueError, match="rates"):
        mlp.apply(params, x, rates=(0.1, 0.2), deterministic=True)
    with pytest.raises(ValueError, match="rates"):
        mlp.apply(params, x, rates=(0.1, 1.5, 0.2), deterministic=True)
    with pytest.raises(ValueError, match="x"):
        mlp.apply(params, x[:, :3], rates=RATES, deterministic=True)
    with pytest.raises(ValueError, match="x"):
        mlp.apply(params, x[None], rates=RATES, deterministic=True)
    with pytest.raises(TypeError, match="x"):
        mlp.apply(params, jnp.ones((2, 5), jnp.int32), rates=RATES, deterministic=True)
    with pytest.raises(ValueError, match="scale"):
        mlp.apply(params, x, rates=RATES, deterministic=True, scale="hinton")
    with pytest.raises(TypeError, match="params"):
        mlp.apply({"weights": params.weights}, x, rates=RATES, deterministic=True)
    with pytest.raises(TypeError, match="key"):
        mlp.apply(params, x, key=3, rates=RATES, deterministic=False)
    with pytest.raises(ValueError, match="key"):
        mlp.forward(params, x, None, RATES)
