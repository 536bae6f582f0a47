"""jdrop._linear.linear_map: a hand-written transpose under every autodiff mode, against plain autodiff."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdrop._linear import linear_map

TRANSPOSES: list[int] = []  # how often the hand-written transpose was traced


def _reference(w, x, b):
    return jnp.tanh(x @ w + b)


@jax.custom_jvp
def _layer(w, x, b):
    return _reference(w, x, b)


def _apply(res, t):
    w, x, h = res
    dw, dx, db = t
    return (1 - h**2) * (dx @ w + x @ dw + db)


def _transpose(res, c):
    TRANSPOSES.append(1)
    w, x, h = res
    g = c * (1 - h**2)
    dw = jnp.einsum("...i,...j->ij", x, g)
    return dw, g @ w.T, g.sum(axis=tuple(range(g.ndim - 1)))


@partial(_layer.defjvp, symbolic_zeros=True)
def _layer_jvp(primals, tangents):
    w, x, b = primals
    h = _reference(w, x, b)
    return h, linear_map(_apply, _transpose, (w, x, h), tangents, h)


W = jax.random.normal(jax.random.key(0), (3, 2))
X = jax.random.normal(jax.random.key(1), (3,))
B = jax.random.normal(jax.random.key(2), (2,))
XS = jax.random.normal(jax.random.key(3), (4, 3))


def _scalar(f):
    return lambda w, x, b: jnp.sum(f(w, x, b) ** 3)


MODES = {
    "jvp": lambda f: jax.jvp(f, (W, X, B), (0.3 * W, 0.7 * X, B)),
    "jvp_one_input": lambda f: jax.jvp(lambda w: f(w, X, B), (W,), (W,)),
    "linearize": lambda f: jax.linearize(f, W, X, B)[1](W, X, B),
    "jacfwd": lambda f: jax.jacfwd(f, argnums=(0, 1, 2))(W, X, B),
    "jacrev": lambda f: jax.jacrev(f, argnums=(0, 1, 2))(W, X, B),
    "grad_one_input": lambda f: jax.grad(lambda w: _scalar(f)(w, X, B))(W),
    "hessian": lambda f: jax.hessian(_scalar(f), argnums=(0, 1, 2))(W, X, B),
    "grad_of_grad": lambda f: jax.grad(lambda w: jnp.sum(jax.grad(_scalar(f))(w, X, B) ** 2))(W),
    "jacfwd_of_jacfwd": lambda f: jax.jacfwd(jax.jacfwd(lambda w: _scalar(f)(w, X, B)))(W),
    "jacrev_of_jacfwd": lambda f: jax.jacrev(jax.jacfwd(lambda w: _scalar(f)(w, X, B)))(W),
    "vmap_grad": lambda f: jax.vmap(jax.grad(_scalar(f)), (None, 0, None))(W, XS, B),
    "vmap_jvp": lambda f: jax.vmap(lambda x: jax.jvp(f, (W, x, B), (W, x, B))[1])(XS),
    "jit_grad_batch": lambda f: jax.jit(jax.grad(_scalar(f), argnums=(0, 1, 2)))(W, XS, B),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_equals_autodiff_of_the_reference(mode):
    got, want = MODES[mode](_layer), MODES[mode](_reference)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), got, want)


def test_reverse_mode_runs_the_hand_written_transpose():
    TRANSPOSES.clear()
    jax.grad(lambda w: jnp.sum(_layer(w, X, B)))(W)
    assert TRANSPOSES, "reverse mode must run `transpose`, not JAX's transpose of `apply`"


def _vjp_layer():
    @jax.custom_vjp
    def layer(w, x, b):
        return _reference(w, x, b)

    def fwd(w, x, b):
        h = _reference(w, x, b)
        return h, (w, x, h)

    layer.defvjp(fwd, _transpose)
    return layer


def test_compiled_gradient_is_the_custom_vjp_program():
    """After XLA, the ties and the square system are gone: same instruction count and temporaries as a custom_vjp."""

    def compiled(f):
        c = jax.jit(jax.grad(_scalar(f), argnums=(0, 1, 2))).lower(W, XS, B).compile()
        ops = [line for line in c.as_text().splitlines() if " = " in line and "parameter(" not in line]
        return len(ops), c.memory_analysis().temp_size_in_bytes

    assert compiled(_layer) == compiled(_vjp_layer())
