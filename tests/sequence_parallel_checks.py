"""Sequence-parallel attention on 8 simulated CPU devices: the measurements ``tests/test_sequence_parallel.py`` asserts.

The device count is fixed when JAX starts, so this runs in its own process:
``python tests/sequence_parallel_checks.py OUT.json`` (it adds
``--xla_force_host_platform_device_count=8`` to ``XLA_FLAGS``). Every check compiles a few programs, so
one process runs them all and writes what it measured (errors against the references, the references'
own errors, mask patterns, memory, error messages) as JSON; the test file holds the assertions.

References for each configuration: the single-device ``jdrop.dot_product_attention`` (float32),
``flax.linen.dot_product_attention`` (float32) and naive attention in float64 with flax's mask
``jax.random.bernoulli(rng, 1 - rate, shape)`` (its gradients by ``jax.grad``). Values are
``v = identity`` (per key/value head), so each output row is the row's dropped probabilities: its zeros
are exactly the dropped (or masked) entries, and the mask can be compared bit for bit.
"""

from __future__ import annotations

import json
import os
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jdrop  # noqa: E402
from jdrop import masks  # noqa: E402

RNG = jax.random.key(7)
B, T, H, D = 2, 48, 4, 8
BLOCKS = {"block_q": 4, "block_k": 5}  # ragged tiles on every shard (6, 12, 24 or 48 rows, chunks of 3 ...)
RATE = 0.3
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
"""Tiny shapes run in no time: compile them fast (the memory check compiles as XLA does by default)."""


KEEP_PER_ELEMENT = np.asarray(jax.random.bernoulli(RNG, np.float32(1 - RATE), (B, H, T, T)))  # flax's masks
KEEP_BROADCAST = np.asarray(jax.random.bernoulli(RNG, np.float32(1 - RATE), (1, 1, T, T)))
KEEP = float(masks.realised_keep(masks.keep_threshold(jnp.float32(1 - RATE))))  # what jdrop scales by


def inputs(kv_heads: int = H, dtype: Any = jnp.float32, seed: int = 0) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, D))
    k = rng.standard_normal((B, T, kv_heads, D))
    v = np.broadcast_to(np.eye(T)[None, :, None, :], (B, T, kv_heads, T))  # out row = dropped probabilities
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def value_and_grads(fn: Any, *args: Any) -> tuple[np.ndarray, list[np.ndarray]]:
    """Output and gradients of a loss that weights every output element differently (float64 numpy)."""

    def loss(*a: Any) -> Any:
        out = fn(*a)
        weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return jnp.sum(out.astype(jnp.float32) * weights), out

    step = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))
    (_, out), grads = step.lower(*args).compile(FAST_COMPILE)(*args)
    return np.asarray(out, np.float64), [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]


def naive64(q: Any, k: Any, v: Any, bias: Any, *, causal: bool, per_element: bool, key_mask: Any = None) -> Any:
    """Naive attention in float64 with flax's dropout mask (drawn at float32's keep probability, as flax does)."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q / np.sqrt(q.shape[-1]), k)
    if bias is not None:
        logits = logits + bias
    allowed = jnp.ones(logits.shape, bool)
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((T, T), bool))
    if key_mask is not None:
        allowed = allowed & key_mask
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    keep_mask = KEEP_PER_ELEMENT if per_element else KEEP_BROADCAST
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits) * keep_mask / KEEP, v)


def max_error(actual: Any, expected: Any) -> float:
    return max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(e, np.float64))))
               for a, e in zip(actual, expected))


def mask_pattern(out: np.ndarray) -> np.ndarray:
    """``(B, Hq, Tq, Tk)``: which attention weights survive (v = identity: out[b, q, h, k] = P~[b, h, q, k])."""
    return np.asarray(out).transpose(0, 2, 1, 3) != 0


def expected_pattern(*, causal: bool, per_element: bool, key_mask: Any = None) -> np.ndarray:
    keep = np.broadcast_to(KEEP_PER_ELEMENT if per_element else KEEP_BROADCAST, (B, H, T, T))
    if causal:
        keep = keep & np.tril(np.ones((T, T), bool))
    if key_mask is not None:
        keep = keep & np.asarray(key_mask)
    return keep


def compare(name: str, ring: Any, args: tuple[Any, ...], references: dict[str, Any], pattern: np.ndarray,
            results: dict[str, Any]) -> None:
    """Runs ``ring`` on ``args`` and records its errors against each reference and its mask pattern."""
    out, grads = value_and_grads(ring, *args)
    record = {"mask_equal": bool((mask_pattern(out) == pattern).all())}
    for ref_name, (ref_out, ref_grads) in references.items():
        record[f"error_vs_{ref_name}"] = max_error([out, *grads], [ref_out, *ref_grads])
    record["scale"] = max(float(np.max(np.abs(x))) for x in [references["float64"][0], *references["float64"][1]])
    results[name] = record


def reference_set(args32: tuple[Any, ...], jdrop_fn: Any, flax_fn: Any, naive_fn: Any) -> dict[str, Any]:
    """The three references' outputs and gradients, and the single-device call's own error against float64."""
    refs = {"jdrop": value_and_grads(jdrop_fn, *args32), "flax": value_and_grads(flax_fn, *args32)}
    with jax.enable_x64(True):
        refs["float64"] = value_and_grads(naive_fn, *(jnp.asarray(np.asarray(a), jnp.float64) for a in args32))
    return refs


def sequence_mesh(n: int, *names_sizes: tuple[str, int]) -> Mesh:
    shape = dict(names_sizes) if names_sizes else {"seq": n}
    devices = np.array(jax.devices()[: int(np.prod(list(shape.values())))]).reshape(tuple(shape.values()))
    return Mesh(devices, tuple(shape))


def check_matrix(results: dict[str, Any]) -> None:
    """N = 1, 2, 4, 8: flax's defaults (broadcast dropout, contiguous) and causal per-element dropout (zigzag)."""
    q, k, v = inputs()
    cases = {
        "broadcast": {"causal": False, "per_element": False},
        "causal_per_element": {"causal": True, "per_element": True},
    }
    for case, how in cases.items():
        options = {"dropout_rng": RNG, "dropout_rate": RATE, "broadcast_dropout": not how["per_element"]}
        causal_mask = jnp.tril(jnp.ones((T, T), bool)) if how["causal"] else None
        refs = reference_set(
            (q, k, v),
            partial(jdrop.dot_product_attention, is_causal=how["causal"], **BLOCKS, **options),
            partial(nn.dot_product_attention, mask=causal_mask, **options),
            partial(naive64, bias=None, **how),
        )
        results[f"{case}/single_error_vs_float64"] = max_error([refs["jdrop"][0], *refs["jdrop"][1]],
                                                               [refs["float64"][0], *refs["float64"][1]])
        pattern = expected_pattern(**how)
        for n in (1, 2, 4, 8):
            ring = partial(jdrop.sequence_parallel_attention, mesh=sequence_mesh(n), is_causal=how["causal"],
                           **BLOCKS, **options)
            compare(f"{case}/{n}", ring, (q, k, v), refs, pattern, results)


def check_meshes(results: dict[str, Any]) -> None:
    """2-D and 3-D meshes: batch and heads sharded with the sequence, grouped queries, a key mask and bias."""
    q, k, v = inputs(kv_heads=2)
    lengths = np.array([T, 29])
    key_mask = jnp.asarray((np.arange(T) < lengths[:, None])[:, None, None, :])  # (B, 1, 1, Tk) padding
    bias = jnp.asarray(np.random.default_rng(5).standard_normal((B, 1, 1, T)), jnp.float32)
    options = {"dropout_rng": RNG, "dropout_rate": RATE, "broadcast_dropout": False, "is_causal": True,
               "mask": key_mask}
    refs = reference_set(
        (q, k, v, bias),
        lambda q, k, v, b: jdrop.dot_product_attention(q, k, v, b, **BLOCKS, **options),
        lambda q, k, v, b: nn.dot_product_attention(
            q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), b, dropout_rng=RNG, dropout_rate=RATE,
            broadcast_dropout=False, mask=key_mask & jnp.tril(jnp.ones((T, T), bool))),
        lambda q, k, v, b: naive64(q, k, v, b, causal=True, per_element=True, key_mask=key_mask),
    )
    results["meshes/single_error_vs_float64"] = max_error([refs["jdrop"][0], *refs["jdrop"][1]],
                                                          [refs["float64"][0], *refs["float64"][1]])
    pattern = expected_pattern(causal=True, per_element=True, key_mask=key_mask)
    meshes = {
        # jax.make_mesh: explicit axes (its default), which shard_map does not reshard by itself.
        "data2_seq4": (jax.make_mesh((2, 4), ("data", "seq")), {"batch_axis_name": "data"}, False),
        "data2_seq2_heads2": (sequence_mesh(0, ("data", 2), ("seq", 2), ("heads", 2)),
                              {"batch_axis_name": "data", "head_axis_name": "heads"}, True),
    }
    for name, (mesh, axes, balance) in meshes.items():
        def ring(q, k, v, b, mesh=mesh, axes=axes, balance=balance):
            return jdrop.sequence_parallel_attention(q, k, v, b, mesh=mesh, load_balance=balance, **axes, **BLOCKS,
                                                     **options)

        compare(f"meshes/{name}", ring, (q, k, v, bias), refs, pattern, results)


def check_data_parallel(results: dict[str, Any]) -> None:
    """The single-device call (no axis_name) inside a data-parallel shard_map, with a bias replicated over it."""
    q, k, v = inputs()
    bias = jnp.asarray(np.random.default_rng(6).standard_normal((1, H, T, T)), jnp.float32)  # shared by the batch
    mesh = sequence_mesh(0, ("data", 2))
    options = {"dropout_rng": RNG, "dropout_rate": RATE, "is_causal": True, **BLOCKS}

    def sharded(q, k, v, b):
        return jax.shard_map(lambda q, k, v, b: jdrop.dot_product_attention(q, k, v, b, **options), mesh=mesh,
                             in_specs=(P("data"), P("data"), P("data"), P()), out_specs=P("data"))(q, k, v, b)

    out, grads = value_and_grads(sharded, q, k, v, bias)
    ref, ref_grads = value_and_grads(lambda q, k, v, b: jdrop.dot_product_attention(q, k, v, b, **options),
                                     q, k, v, bias)
    # The bias's gradient sums both devices' contributions (shard_map's psum of a replicated input's cotangent).
    results["data_parallel"] = {"error_vs_jdrop": max_error([out, *grads], [ref, *ref_grads]),
                                "scale": max(float(np.max(np.abs(x))) for x in [ref, *ref_grads])}


def check_rates_and_dtypes(results: dict[str, Any]) -> None:
    """A traced rate (one compilation for 0, 0.3, 1 and an invalid 1.5) and bfloat16, on 4 devices."""
    q, k, v = inputs()
    mesh = sequence_mesh(4)

    def loss(rate, q, k, v):
        out = jdrop.sequence_parallel_attention(q, k, v, mesh=mesh, dropout_rng=RNG, dropout_rate=rate,
                                                is_causal=True, **BLOCKS)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=out.dtype)).reshape(out.shape)), out

    # One executable for every rate: the rate is an argument of the compiled program.
    step = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True))
    compiled = step.lower(jnp.float32(0.0), q, k, v).compile(FAST_COMPILE)
    single = jax.jit(lambda rate, q, k, v: jdrop.dot_product_attention(q, k, v, dropout_rng=RNG, dropout_rate=rate,
                                                                       is_causal=True, **BLOCKS))
    for rate in (0.0, 0.3, 1.0, 1.5):
        (_, out), grads = compiled(jnp.float32(rate), q, k, v)
        reference = single(jnp.float32(rate), q, k, v)
        results[f"rate/{rate}"] = {
            "error_vs_jdrop": None if rate > 1 else max_error([out], [reference]),
            "all_zero": bool(np.all(np.asarray(out) == 0) and all(np.all(np.asarray(g) == 0) for g in grads)),
            "all_nan": bool(np.all(np.isnan(np.asarray(out)))),
        }

    low = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
    options = {"dropout_rng": RNG, "dropout_rate": RATE, "is_causal": True, **BLOCKS}
    out, grads = value_and_grads(partial(jdrop.sequence_parallel_attention, mesh=mesh, **options), *low)
    single, single_grads = value_and_grads(partial(jdrop.dot_product_attention, **options), *low)
    with jax.enable_x64(True):
        ref, ref_grads = value_and_grads(partial(naive64, bias=None, causal=True, per_element=False),
                                         *(jnp.asarray(np.asarray(x, np.float64)) for x in low))
    results["bfloat16"] = {
        "dtype": str(jax.eval_shape(partial(jdrop.sequence_parallel_attention, mesh=mesh, **options), *low).dtype),
        "error_vs_float64": max_error([out, *grads], [ref, *ref_grads]),
        "single_error_vs_float64": max_error([single, *single_grads], [ref, *ref_grads]),
        "scale": max(float(np.max(np.abs(x))) for x in [ref, *ref_grads]),
    }


def check_flax_recipe(results: dict[str, Any]) -> None:
    """flax.linen.MultiHeadDotProductAttention inside shard_map with ``attention_fn=partial(..., axis_name=...)``."""
    x = jnp.asarray(np.random.default_rng(2).standard_normal((B, T, 16)), jnp.float32)
    mesh = sequence_mesh(4)

    def layer(attention_fn: Any) -> nn.Module:
        return nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=16, dropout_rate=RATE,
                                               attention_fn=attention_fn)

    sharded_layer = layer(partial(jdrop.dot_product_attention, axis_name="seq", is_causal=True))
    single_layer = layer(partial(jdrop.dot_product_attention, is_causal=True))
    flax_layer = layer(nn.dot_product_attention)
    params = single_layer.init(jax.random.key(0), x, deterministic=True)
    causal = nn.make_causal_mask(x[..., 0])

    def sharded_apply(params: Any, x: Any) -> Any:
        apply = partial(sharded_layer.apply, deterministic=False, rngs={"dropout": RNG})
        return jax.shard_map(apply, mesh=mesh, in_specs=(P(), P(None, "seq")), out_specs=P(None, "seq"))(params, x)

    runs = {
        "sharded": sharded_apply,
        "single": lambda p, x: single_layer.apply(p, x, deterministic=False, rngs={"dropout": RNG}),
        "flax": lambda p, x: flax_layer.apply(p, x, mask=causal, deterministic=False, rngs={"dropout": RNG}),
    }
    values = {name: value_and_grads(fn, params, x) for name, fn in runs.items()}

    def flat(value: Any) -> list[np.ndarray]:
        out, grads = value
        return [out, *grads]

    results["flax_recipe"] = {
        "error_vs_jdrop": max_error(flat(values["sharded"]), flat(values["single"])),
        "error_vs_flax": max_error(flat(values["sharded"]), flat(values["flax"])),
        "single_error_vs_flax": max_error(flat(values["single"]), flat(values["flax"])),
        "scale": max(float(np.max(np.abs(a))) for a in flat(values["flax"])),
    }


def check_memory(results: dict[str, Any]) -> None:
    """Per-device temporary bytes of a training step at fixed T (compiled from abstract shapes, never run)."""
    length, heads, depth = 2048, 2, 64  # shards (L x H x D) well above a tile's working set (B x H x 32 x 32)
    memory = {}
    for n in (1, 2, 4, 8):
        mesh = sequence_mesh(n)
        spec = jax.ShapeDtypeStruct((1, length, heads, depth), jnp.float32,
                                    sharding=NamedSharding(mesh, P(None, "seq")))

        def loss(q, k, v, d_out, mesh=mesh):
            out = jdrop.sequence_parallel_attention(q, k, v, mesh=mesh, dropout_rng=RNG, dropout_rate=0.1,
                                                    is_causal=True, block_q=32, block_k=32)
            return jnp.vdot(out, d_out)

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec, spec).compile()
        memory[n] = compiled.memory_analysis().temp_size_in_bytes
    results["memory"] = memory


def check_errors(results: dict[str, Any]) -> None:
    """What the ring rejects, traced only (nothing compiles): the messages, to match in the test."""
    q, k, v = inputs()
    mesh = sequence_mesh(4)
    seq = P(None, "seq")

    def inside(fn: Any, mesh: Mesh = mesh, specs: Any = (seq, seq, seq)) -> Any:
        return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=seq)

    attempts = {
        "length_not_divisible": lambda: jdrop.sequence_parallel_attention(
            q[:, :46], k[:, :46], v[:, :46, :, :46], mesh=mesh),
        "zigzag_odd_shard": lambda: inside(partial(jdrop.dot_product_attention, axis_name="seq",
                                                   sequence_layout="zigzag"))(q[:, :44], k[:, :44], v[:, :44]),
        "full_mask": lambda: jdrop.sequence_parallel_attention(q, k, v, mask=jnp.ones((T, T), bool), mesh=mesh),
        "undeclared_batch_axis": lambda: inside(
            partial(jdrop.dot_product_attention, axis_name="seq", dropout_rng=RNG, dropout_rate=0.1,
                    broadcast_dropout=False), mesh=sequence_mesh(0, ("data", 2), ("seq", 4)),
            specs=(P("data", "seq"),) * 3)(q, k, v),
        "key_varies_along_ring": lambda: inside(
            lambda q, k, v: jdrop.dot_product_attention(
                q, k, v, axis_name="seq", dropout_rate=0.1,
                dropout_rng=jax.random.fold_in(RNG, jax.lax.axis_index("seq"))))(q, k, v),
        "causal_cross_lengths": lambda: inside(partial(jdrop.dot_product_attention, axis_name="seq", is_causal=True))(
            q, k[:, :32], v[:, :32]),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
            results[f"error/{name}"] = None
        except ValueError as error:
            results[f"error/{name}"] = str(error)


def check_layouts(results: dict[str, Any]) -> None:
    """to_zigzag / from_zigzag and sequence_positions on 4 devices: the permutation the zigzag layout means."""
    mesh = sequence_mesh(4)
    x = jnp.arange(2 * T, dtype=jnp.float32).reshape(2, T, 1, 1)
    seq = P(None, "seq")
    zigzag = jax.jit(jax.shard_map(lambda x: jdrop.attention.to_zigzag(x, "seq"), mesh=mesh, in_specs=seq,
                                   out_specs=seq))(x)
    back = jax.jit(jax.shard_map(lambda x: jdrop.attention.from_zigzag(x, "seq"), mesh=mesh, in_specs=seq,
                                 out_specs=seq))(zigzag)
    positions = jax.jit(jax.shard_map(lambda: jdrop.attention.sequence_positions(T // 4, "seq", "zigzag"),
                                      mesh=mesh, in_specs=(), out_specs=P("seq")))()
    chunk = T // 8
    order = np.concatenate([np.r_[d * chunk:(d + 1) * chunk, (7 - d) * chunk:(8 - d) * chunk] for d in range(4)])
    results["layouts"] = {
        "positions_are_zigzag": bool(np.array_equal(np.asarray(positions), order)),
        "to_zigzag_permutes": bool(np.array_equal(np.asarray(zigzag), np.asarray(x)[:, order])),
        "round_trip": bool(np.array_equal(np.asarray(back), np.asarray(x))),
    }


def check_readme_recipe(results: dict[str, Any]) -> None:
    """The sequence-parallel guide's training step (docs/guides/sequence_parallel.md, "A language model") runs as
    written and equals the same step on one device."""
    import re

    import optax

    guide = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "sequence_parallel.md").read_text()
    section = guide[guide.index("## A language model"):]
    recipe = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict[str, Any] = {}
    exec(compile(recipe, "the sequence-parallel guide's recipe", "exec"), namespace)  # prints 3 losses
    lm, tokens, targets = namespace["LM"], np.asarray(namespace["batch"]["tokens"]), namespace["batch"]["targets"]
    params = lm(jdrop.dot_product_attention).init(jax.random.key(0), tokens[:1, :8], jnp.arange(8)[None], False)
    key = jax.random.key(5)

    def single_loss(params: Any) -> Any:
        positions = jnp.arange(tokens.shape[1])[None]
        logits = lm(partial(jdrop.dot_product_attention, is_causal=True)).apply(params, tokens, positions, True,
                                                                               rngs={"dropout": key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, np.asarray(targets)).mean()

    loss, grads = jax.jit(jax.value_and_grad(single_loss))(params)
    ring_params, ring_loss = namespace["train_step"](params, namespace["batch"]["tokens"], targets, key)
    single_params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    results["readme_recipe"] = {
        "loss_error": abs(float(ring_loss) - float(loss)),
        "params_error": max_error(jax.tree.leaves(ring_params), jax.tree.leaves(single_params)),
        "loss": float(loss),
    }


CHECKS = (check_matrix, check_meshes, check_data_parallel, check_rates_and_dtypes, check_flax_recipe, check_memory,
          check_errors, check_layouts, check_readme_recipe)


def main(out: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    results: dict[str, Any] = {}
    for check in CHECKS:
        start = time.perf_counter()
        check(results)
        results[f"seconds/{check.__name__}"] = time.perf_counter() - start
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
