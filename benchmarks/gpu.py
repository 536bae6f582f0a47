"""A prepared check-and-time script for a lent GPU: ``python -m benchmarks.gpu``.

One command, in one process, under 8 minutes on one H100/H200 (a time budget, 7.5 minutes by default, skips the
rows still to come when it runs out); it needs only JAX with its CUDA plugin (plus whichever of flax, equinox and
haiku are installed: the others are skipped). In order:

1. Correctness: ``jdrop.keep_mask`` equals ``jax.random.bernoulli`` for the same key (jitted and
   not), ``jdrop.dropout`` equals the naive ``where(bernoulli, x / keep, 0)``, and its gradient
   under every residual policy equals ``jax.grad`` of the naive version; the golden bits;
   ``jdrop.dot_product_attention`` against flax with the same ``dropout_rng``; then its Pallas kernels
   (``implementation="pallas"``, Triton here) against its xla path on the device: the exact mask equals
   ``jax.random.bernoulli`` (value = identity), the fast and hash8 masks equal the xla path's, outputs and gradients
   agree (causal, grouped queries, bias, mask; highest precision) and bfloat16 stays within its rounding.
2. Fused attention: the training step (forward and backward) of one attention call, bfloat16,
   B=2, H=16, D=128, dropout 0.1 (flax's broadcast mask), at T = 1024 ... 16384: step time and XLA's temporary
   memory for cuDNN without dropout (``jax.nn.dot_product_attention(implementation="cudnn")``, no key-driven
   dropout there), flax with dropout, jdrop's xla path, and jdrop's Pallas kernels with the exact (flax's) mask
   the fast16, fast8 and hash8 masks, and without dropout (``"jdrop pallas none"``: what every mask is measured
   against). Each row runs in its own ``try``: an error (out of memory for flax's
   ``T x T`` arrays, a kernel Triton refuses) is recorded in the row and the table goes on.
3. The op table of :mod:`benchmarks.ops` (4096x4096 and 256x1024, forward and value_and_grad)
   for every JAX framework, with the device copy ``x * 2.0`` as the bandwidth reference.
4. Attention-probability dropout at shape (8, 16, 2048, 2048) (batch, heads, queries, keys),
   where dropout's memory traffic matters most, reported the same way.
5. The memory table of :mod:`benchmarks.memory` (the MLP training step's temporary memory from
   XLA's buffer assignment on this backend; compilation only, one compilation per step).

Without a GPU (or with ``--smoke``, alias ``--quick``) the sizes shrink so that it runs on a CPU; there the
Pallas rows run the GPU kernels under Pallas's interpreter (slow, but the same code path). Results go to
``$OUT/gpu.json`` when ``OUT`` is set (or ``--out PATH``), rewritten after every section so that a cut-off run
still leaves what it measured; the exit status is 1 when a correctness check fails. ``--sections`` runs a
subset (e.g. ``--sections checks,attention``).

Example, on the lent machine::

    PYTHONPATH=. python -m benchmarks.gpu            # writes $OUT/gpu.json
    PYTHONPATH=. python -m benchmarks.gpu --smoke    # a smoke test anywhere
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import memory, models, ops
from benchmarks._common import MiB, log, machine_description, markdown_table, time_call

JAX_FRAMEWORKS = tuple(f for f in ops.FRAMEWORKS if f != "torch")
ATTENTION_SHAPE = {"gpu": (8, 16, 2048, 2048), "cpu": (8, 16, 128, 128), "quick": (2, 4, 64, 64)}
OP_SHAPES = {"gpu": ops.FULL_SHAPES, "cpu": ops.QUICK_SHAPES, "quick": ((256, 256), (64, 256))}
RUNS = {"gpu": (50, 200), "cpu": (10, 30), "quick": (3, 5)}
"""Timed runs (large arrays, small arrays) per measurement."""
CALLS_PER_RUN = {"gpu": 10, "cpu": 1, "quick": 1}
"""Calls queued per timed run: on a GPU, enough to hide the per-call host round trip."""
FUSED_ATTENTION_LENGTHS = {"gpu": (1024, 2048, 4096, 8192, 16384), "cpu": (128, 256), "quick": (64,)}
FUSED_ATTENTION_SHAPE = {"gpu": (2, 16, 128), "cpu": (1, 2, 64), "quick": (1, 2, 32)}
"""(batch, heads, head dim) of the fused attention step."""
FUSED_ATTENTION_RATE = 0.1
SECTIONS = ("checks", "attention", "ops", "attention_dropout", "memory")
DEFAULT_BUDGET_S = 450.0
"""The whole run's time budget: rows still to come when it is spent are skipped (recorded as such)."""

# ------------------------------------------------------------------------------------- checks


def correctness_checks() -> list[dict[str, Any]]:
    """Mask equality with ``jax.random.bernoulli`` and gradients against a naive dropout."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jdrop

    results = []

    def check(name: str, passed: Callable[[], Any]) -> None:
        try:
            ok, detail = bool(passed()), ""
        except Exception as error:  # a crash is a failed check, reported, not a stopped script
            ok, detail = False, f"{type(error).__name__}: {error}"
        results.append({"check": name, "passed": ok, **({"detail": detail} if detail else {})})
        log(f"  {'PASS' if ok else 'FAIL'} {name} {detail}")

    def naive(key: Any, x: Any, rate: float) -> Any:
        keep = 1.0 - rate
        return jnp.where(jax.random.bernoulli(key, keep, x.shape), x / keep, 0.0)

    key = jax.random.key(42)
    for shape in ((7,), (128, 257), (4, 3, 33, 65)):
        for rate in (0.1, 0.5, 0.9):
            expected = jax.random.bernoulli(key, 1.0 - rate, shape)
            check(
                f"keep_mask == bernoulli {shape} rate {rate}",
                lambda s=shape, r=rate, e=expected: np.array_equal(jdrop.keep_mask(key, s, r), e),
            )
            jitted = jax.jit(jdrop.keep_mask, static_argnums=(1,))
            check(
                f"jit(keep_mask) == bernoulli {shape} rate {rate}",
                lambda s=shape, r=rate, e=expected, f=jitted: np.array_equal(f(key, s, r), e),
            )
    x = jax.random.normal(jax.random.key(1), (256, 513), jnp.float32)
    cotangent = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)
    naive_grad = jax.jit(jax.grad(lambda x: jnp.vdot(naive(key, x, 0.5), cotangent)))(x)
    for policy in ("key", "bits", "mask"):
        forward = jax.jit(lambda x, p=policy: jdrop.dropout(key, x, 0.5, residual=p))
        check(f"dropout[{policy}] == naive forward", lambda f=forward: np.allclose(f(x), naive(key, x, 0.5)))
        grad = jax.jit(jax.grad(lambda x, p=policy: jnp.vdot(jdrop.dropout(key, x, 0.5, residual=p), cotangent)))
        check(f"grad dropout[{policy}] == grad naive", lambda g=grad: np.allclose(g(x), naive_grad))
    for name, matches in golden_matches().items():
        check(f"golden bits: {name}", lambda m=matches: m)
    for name, passed in {**fused_attention_checks(), **pallas_attention_checks()}.items():
        check(name, passed)
    return results


def fused_attention_checks() -> dict[str, Callable[[], bool]]:
    """``jdrop.dot_product_attention`` against flax's attention with the same ``dropout_rng``.

    Products at highest precision (a GPU's default float32 matmul is TF32), lengths that are not
    multiples of the tiles, both mask layouts; and the exact mask: with ``value`` the identity, the
    output rows are the dropped probabilities, so their zeros are the dropped entries.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jdrop

    rng = jax.random.key(7)
    q, k, v = (jax.random.normal(key, (2, 301, 4, 32)) for key in jax.random.split(jax.random.key(3), 3))
    cotangent = jax.random.normal(jax.random.key(4), q.shape)

    def value_and_grads(fn: Callable[..., Any], broadcast: bool) -> Any:
        options = {"dropout_rng": rng, "dropout_rate": 0.1, "broadcast_dropout": broadcast, "precision": "highest"}

        def loss(q: Any, k: Any, v: Any) -> Any:
            return jnp.vdot(fn(q, k, v, **options), cotangent)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    def close(broadcast: bool) -> bool:
        got, want = value_and_grads(jdrop.dot_product_attention, broadcast), value_and_grads(
            nn.dot_product_attention, broadcast
        )
        return all(
            np.allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(b))))
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))
        )

    def exact_mask() -> bool:
        length = 299
        identity = jnp.broadcast_to(jnp.eye(length)[None, :, None, :], (1, length, 2, length))
        out = jax.jit(
            lambda q, k: jdrop.dot_product_attention(q, k, identity, dropout_rng=rng, dropout_rate=0.5,
                                                     broadcast_dropout=False)
        )(q[:1, :, :2], k[:1, :length, :2])
        keep = jax.random.bernoulli(rng, 0.5, (1, 2, 301, length))
        return np.array_equal(np.asarray(out).transpose(0, 2, 1, 3) != 0, np.asarray(keep))

    return {
        "dot_product_attention == flax (broadcast mask): outputs and grads": lambda: close(True),
        "dot_product_attention == flax (per-element mask): outputs and grads": lambda: close(False),
        "dot_product_attention mask == bernoulli exactly (301 x 299)": exact_mask,
    }


def golden_matches() -> dict[str, bool]:
    """Whether each integer/bool golden case of tests/test_golden.py gives the stored bits on this backend.

    The cases and their digests live with the test (``tests/golden/masks.json``); a lent GPU runs them here
    so that "same key, same mask on any backend" is checked, not assumed.
    """
    import importlib.util
    import json

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("jdrop_golden", root / "tests" / "test_golden.py")
    if spec is None or spec.loader is None:
        return {"tests/test_golden.py importable": False}
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stored = json.loads((root / "tests" / "golden" / "masks.json").read_text())
    current = module._fingerprints()
    # Bits, masks and keys must agree exactly on every backend; float outputs (e.g. an MLP's matmuls, which a
    # GPU may run in TF32) are not compared here.
    return {name: stored.get(name) == value for name, value in current.items() if not value["dtype"].startswith("<f")}


# ------------------------------------------------------------------------------------- timing


def time_frameworks(shapes: Sequence[Sequence[int]], size: str) -> list[dict[str, Any]]:
    """The op records (see :mod:`benchmarks.ops`) of every installed JAX framework at ``shapes``."""
    large_runs, small_runs = RUNS[size]
    records = []
    for framework in JAX_FRAMEWORKS:
        try:
            candidates = ops.jax_candidates(framework)
        except ImportError as error:
            log(f"  {framework}: skipped ({error})")
            continue
        for shape in shapes:
            runs = large_runs if ops.is_large(shape) else small_runs
            for name, fn in candidates.items():
                for mode in ops.MODES:
                    timing = ops.time_jax(fn, shape, mode, runs=runs, calls_per_run=CALLS_PER_RUN[size])
                    records.append({"framework": framework, "name": name, "shape": list(shape), "mode": mode, **timing})
                    log(f"  {name:24s} {'x'.join(map(str, shape)):>16s} {mode}: {timing['median_ms']:9.3f} ms")
    return records


def memory_records(quick: bool) -> list[dict[str, Any]]:
    """The memory suite's records for every installed framework (one compilation per step)."""
    records = []
    for framework in models.FRAMEWORKS:
        for cfg in memory.configs(quick):
            try:
                candidates = models.variants(framework, cfg)
            except ImportError as error:
                log(f"  {framework}: skipped ({error})")
                break
            for name, variant in candidates.items():
                base = {"framework": framework, "name": name, "depth": cfg.depth}
                if isinstance(variant, str):
                    records.append({**base, "note": variant})
                    continue
                result = memory.compile_step(variant, cfg, repeats=1)
                records.append({**base, "dropped_elements": cfg.dropped_elements, **result})
                log(f"  {name:24s} depth {cfg.depth}: temp {result['temp_bytes'] / 2**20:9.1f} MiB")
    return records


def _pallas_context(backend: str) -> Any:
    """On a GPU nothing; elsewhere Pallas's interpreter with the GPU kernels (the smoke run's stand-in)."""
    from jdrop.attention import _pallas

    return contextlib.nullcontext() if backend == "gpu" else _pallas.kernels_for("gpu")


def pallas_attention_checks() -> dict[str, Callable[[], bool]]:
    """The Pallas kernels against the xla path of ``jdrop.dot_product_attention`` on this device.

    Masks must agree exactly (value = identity: an output row is its dropped probabilities, zeros are the dropped
    entries); outputs and gradients in float32 at highest precision to 1e-4 of their scale (the two paths round
    differently), bfloat16 to 2e-2 of the float32 result's scale.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jdrop

    backend = jax.default_backend()
    rng = jax.random.key(7)
    q, k, v = (jax.random.normal(key, (2, 301, 4, 64)) for key in jax.random.split(jax.random.key(3), 3))
    bias = jax.random.normal(jax.random.key(5), (4, 301, 301))
    mask = jnp.arange(301) < jnp.asarray([301, 200])[:, None, None, None]

    def zeros(implementation: str, dropout_mask: str, broadcast: bool) -> Any:
        length = 299
        identity = jnp.broadcast_to(jnp.eye(length)[None, :, None, :], (1, length, 2, length))

        def attend(q: Any, k: Any) -> Any:
            return jdrop.dot_product_attention(q, k, identity, dropout_rng=rng, dropout_rate=0.5,
                                               broadcast_dropout=broadcast, implementation=implementation,
                                               dropout_mask=dropout_mask)

        with _pallas_context(backend):
            out = jax.jit(attend)(q[:1, :, :2], k[:1, :length, :2])
        return np.asarray(out).transpose(0, 2, 1, 3) == 0

    def exact_mask(broadcast: bool) -> bool:
        shape = (1, 1, 301, 299) if broadcast else (1, 2, 301, 299)
        keep = np.broadcast_to(np.asarray(jax.random.bernoulli(rng, 0.5, shape)), (1, 2, 301, 299))
        return np.array_equal(~zeros("pallas", "exact", broadcast), keep)

    def same_fast_mask(dropout_mask: str) -> bool:
        return np.array_equal(zeros("pallas", dropout_mask, False), zeros("xla", dropout_mask, False))

    def value_and_grads(implementation: str, dtype: Any) -> Any:
        def loss(q: Any, k: Any, v: Any, b: Any) -> Any:
            out = jdrop.dot_product_attention(q, k[..., :2, :], v[..., :2, :], bias=b, mask=mask, dropout_rng=rng,
                                              dropout_rate=0.1, broadcast_dropout=False, is_causal=True,
                                              precision="highest", implementation=implementation)
            weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
            return jnp.vdot(out.astype(jnp.float32), weights)

        with _pallas_context(backend):
            args = [x.astype(dtype) for x in (q, k, v)] + [bias]
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(*args)

    def close(dtype: Any, tolerance: float) -> bool:
        got, want = value_and_grads("pallas", dtype), value_and_grads("xla", jnp.float32)
        errors = [(float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b)))), float(np.max(np.abs(b))))
                  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
        return all(error <= tolerance * max(1.0, scale) for error, scale in errors)

    return {
        "pallas mask == bernoulli exactly (per-head, 301 x 299)": lambda: exact_mask(False),
        "pallas mask == bernoulli exactly (broadcast, 301 x 299)": lambda: exact_mask(True),
        "pallas fast16 mask == xla fast16 mask": lambda: same_fast_mask("fast16"),
        "pallas fast8 mask == xla fast8 mask": lambda: same_fast_mask("fast8"),
        "pallas hash8 mask == xla hash8 mask": lambda: same_fast_mask("hash8"),
        "pallas == xla float32 outputs and grads (causal, GQA, bias, mask)": lambda: close(jnp.float32, 1e-4),
        "pallas bfloat16 == xla float32 to bfloat16 rounding": lambda: close(jnp.bfloat16, 2e-2),
    }


def fused_attention_variants() -> dict[str, Callable[..., Any]]:
    """The rows of the fused attention table: ``fn(q, k, v) -> out`` for (B, T, H, D) inputs."""
    import flax.linen as nn
    import jax

    import jdrop

    rng, rate = jax.random.key(1), FUSED_ATTENTION_RATE

    def jdrop_attention(implementation: str, dropout_mask: str = "exact", dropout_rate: float = rate
                        ) -> Callable[..., Any]:
        return lambda q, k, v: jdrop.dot_product_attention(q, k, v, dropout_rng=rng, dropout_rate=dropout_rate,
                                                           implementation=implementation, dropout_mask=dropout_mask)

    return {
        "cuDNN, no dropout": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"),
        "flax.linen, dropout": lambda q, k, v: nn.dot_product_attention(q, k, v, dropout_rng=rng, dropout_rate=rate),
        "jdrop xla": jdrop_attention("xla"),
        "jdrop pallas none": jdrop_attention("pallas", dropout_rate=0.0),
        "jdrop pallas exact": jdrop_attention("pallas"),
        "jdrop pallas fast16": jdrop_attention("pallas", "fast16"),
        "jdrop pallas fast8": jdrop_attention("pallas", "fast8"),
        "jdrop pallas hash8": jdrop_attention("pallas", "hash8"),
    }


def fused_attention_records(size: str, deadline: float) -> list[dict[str, Any]]:
    """Step time and temporary memory of one attention call's training step, per variant and length.

    The step is ``grad(vdot(attention(q, k, v), dout))`` in bfloat16, compiled once from abstract shapes (its
    temporary memory from XLA's buffer assignment) and timed with queued calls. Every row is tried on its own;
    once ``deadline`` (a ``time.perf_counter`` value) has passed the remaining rows are recorded as skipped.
    """
    import jax
    import jax.numpy as jnp

    batch, heads, depth = FUSED_ATTENTION_SHAPE[size]
    variants = fused_attention_variants()
    backend = jax.default_backend()
    records: list[dict[str, Any]] = []
    for length in FUSED_ATTENTION_LENGTHS[size]:
        shape = (batch, length, heads, depth)
        args = [jax.random.normal(key, shape, jnp.bfloat16) for key in jax.random.split(jax.random.key(0), 4)]
        for name, fn in variants.items():
            row: dict[str, Any] = {"name": name, "length": length, "shape": list(shape), "dtype": "bfloat16"}
            records.append(row)
            if time.perf_counter() > deadline:
                row["skipped"] = "time budget spent"
                continue
            try:
                with _pallas_context(backend):  # only implementation="pallas" calls notice it
                    step = jax.jit(jax.grad(lambda q, k, v, dout, f=fn: jnp.vdot(f(q, k, v), dout), argnums=(0, 1, 2)))
                    compiled = step.lower(*args).compile()
                analysis = compiled.memory_analysis()
                row["temp_mib"] = analysis.temp_size_in_bytes / MiB
                row["total_mib"] = (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
                                    + analysis.output_size_in_bytes - analysis.alias_size_in_bytes) / MiB
                row.update(time_call(lambda c=compiled, a=args: c(*a), jax.block_until_ready, runs=RUNS[size][0],
                                     calls_per_run=CALLS_PER_RUN[size], min_runs=3,
                                     budget_s=min(5.0, max(0.0, deadline - time.perf_counter()))))
                log(f"  {name:22s} T={length:5d}: {row['median_ms']:9.3f} ms, temp {row['temp_mib']:9.1f} MiB")
            except Exception as error:  # a row's failure (OOM, a refused kernel) is recorded, not fatal
                row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
                log(f"  {name:22s} T={length:5d}: {row['error']}")
    return records


def fused_attention_table(records: Sequence[dict[str, Any]]) -> str:
    """Rows: variant x length, with the step time relative to jdrop's xla path at the same length."""
    xla = {r["length"]: r.get("median_ms") for r in records if r["name"] == "jdrop xla"}
    rows = []
    for r in records:
        base = xla.get(r["length"])
        ratio = r["median_ms"] / base if r.get("median_ms") and base else None
        note = r.get("error") or r.get("skipped") or ""
        rows.append((r["name"], r["length"], r.get("median_ms"), ratio, r.get("temp_mib"), note[:80]))
    return markdown_table(("variant", "T", "median ms", "vs jdrop xla", "temp MiB", "note"), rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the checks and timings, prints the tables, writes the JSON; 1 if a check failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", "--quick", dest="smoke", action="store_true",
                        help="tiny sizes, few runs (a smoke test on any machine)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="time budget of the whole run")
    parser.add_argument("--out", type=Path, help="JSON path (default $OUT/gpu.json when OUT is set)")
    args = parser.parse_args(argv)
    sections = [name for name in args.sections.split(",") if name]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    import jax

    backend = jax.default_backend()
    size = "quick" if args.smoke else ("gpu" if backend == "gpu" else "cpu")
    start = time.perf_counter()
    deadline = start + args.budget_s
    out = args.out or (Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else None)
    report: dict[str, Any] = {"machine": machine_description(), "sizes": size, "budget_s": args.budget_s}

    def save() -> None:
        report["elapsed_s"] = time.perf_counter() - start
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1))

    def section(name: str, title: str, run: Callable[[], Any]) -> Any:
        if name not in sections:
            return None
        if time.perf_counter() > deadline:
            report.setdefault("skipped_sections", []).append(name)
            log(f"{title}: skipped (time budget spent)")
            return None
        log(title)
        try:
            result = run()
        except Exception as error:  # a broken section is recorded; the others still run
            report.setdefault("section_errors", {})[name] = f"{type(error).__name__}: {error}"
            log(f"  {title} failed: {type(error).__name__}: {error}")
            result = None
        report[name] = result
        save()
        return result

    log(f"backend {backend}, devices {jax.devices()}, sizes: {size}, budget {args.budget_s:.0f} s")
    checks = section("checks", "correctness", correctness_checks) or []
    fused = section("attention", "fused attention step", lambda: fused_attention_records(size, deadline))
    op_summary = section("ops", "op table", lambda: ops.summarize(time_frameworks(OP_SHAPES[size], size)))
    dropout_summary = section("attention_dropout", "attention-probability dropout",
                              lambda: ops.summarize(time_frameworks([ATTENTION_SHAPE[size]], size)))
    memory_summary = section("memory", "MLP step memory",
                             lambda: memory.summarize(memory_records(quick=size != "gpu")))
    failed = [c["check"] for c in checks if not c["passed"]]
    if "checks" in sections:
        print(f"correctness: {len(checks) - len(failed)}/{len(checks)} checks passed",
              f"FAILED: {failed}" if failed else "")
    if fused is not None:
        batch, heads, depth = FUSED_ATTENTION_SHAPE[size]
        print(f"\n## Fused attention step (bfloat16, B={batch}, H={heads}, D={depth}, dropout "
              f"{FUSED_ATTENTION_RATE})\n")
        print(fused_attention_table(fused))
    if op_summary is not None:
        print("\n## Op table\n")
        print(ops.table(op_summary))
    if dropout_summary is not None:
        print(f"\n## Attention-probability dropout {ATTENTION_SHAPE[size]}\n")
        print(ops.table(dropout_summary))
    if memory_summary is not None:
        print(f"\n## {memory.title(quick=size != 'gpu')}\n")
        print(memory.table(memory_summary))
    save()
    if out is not None:
        log(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
