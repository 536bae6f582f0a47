"""Transformer benchmark: a pre-LN transformer's training step with flax's dropout, jdrop's, and none.

``python -m benchmarks --only transformer`` (or a worker, ``python -m benchmarks.transformer
--framework flax.linen``, resp. ``flax.nnx``) builds one model, written once in each: tokens
(vocabulary 256) embedded to width 256 plus a learned position embedding, 4 pre-LN blocks (4-head
self-attention, a 4x GELU MLP), a final LayerNorm, mean pooling over the sequence and a 10-way
classifier, batch 8, softmax cross-entropy, plain SGD with donated parameters. Dropout 0.1 sits where
flax's examples put it: on the attention probabilities (``MultiHeadDotProductAttention(dropout_rate=)``,
``nnx.MultiHeadAttention(dropout_rate=)``), on both residual branches, and after the MLP's GELU.

Variants of that one model, all with the same weights (one parameter tree):

- ``no dropout``: rates 0 (flax draws no rng and applies no mask at rate 0);
- ``flax dropout``: ``nn.Dropout`` / ``nnx.Dropout`` and flax's ``dot_product_attention``;
- ``jdrop Dropout``: the residual and MLP dropouts swapped for ``jdrop.interop.linen.Dropout`` /
  ``jdrop.interop.nnx.Dropout``, attention dropout still flax's;
- ``jdrop``: that swap plus ``attention_fn=jdrop.dot_product_attention``: the "two-line change".

Each with and without rematerialisation of the blocks (``nn.remat`` / ``nnx.remat``), at T = 256,
512, 1024 and 2048. The jdrop variants draw exactly flax's masks for the same rngs (tested in
tests/test_transformer.py), so the four variants compute the same function of the same random
numbers; only where the bits are computed and what the backward pass keeps differ.

Memory is XLA's ``compiled.memory_analysis().temp_size_in_bytes`` of the step compiled from abstract
shapes (deterministic; every T). Compile time (trace + lower + XLA) is the median of repeats from
cleared caches. Step times are medians of steps run round-robin in one process per framework (step ``r`` of
every variant before step ``r + 1`` of any, the order rotating), so a slow minute of a shared
machine slows every variant alike; lengths whose slowest step exceeds ``TIME_LIMIT_S`` are skipped
(and reported as skipped).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
from typing import Any

from benchmarks._common import MiB, StepRunner, log, markdown_table, round_robin, worker_main
from benchmarks.models import Variant, make_step

MODEL_FRAMEWORKS = ("flax.linen", "flax.nnx")
FRAMEWORKS = MODEL_FRAMEWORKS
"""One worker per framework, timing all of that framework's variants round-robin."""
MIN_TIMEOUT_S = 3600.0
"""A worker compiles 10 variants at 4 lengths and times them: about half an hour on a busy 2-core CPU."""
NONE, NONE_FUSED = "no dropout", "no dropout, jdrop attention"
FLAX, JDROP_DROPOUT, JDROP = "flax dropout", "jdrop Dropout", "jdrop"
KINDS = (NONE, NONE_FUSED, FLAX, JDROP_DROPOUT, JDROP)
REFERENCE, BASELINE = FLAX, NONE
LENGTHS = {False: (256, 512, 1024, 2048), True: (16,)}
ROUNDS = {False: 5, True: 2}
COMPILE_REPEATS = {False: 1, True: 1}
"""One compilation per variant and length (10 variants x 4 lengths per worker on a loaded 2-core machine)."""
TIME_LIMIT_S = 5.0
"""Lengths beyond ``ALWAYS_TIMED`` are timed while the slowest warm step of the previous length took at most this."""
ALWAYS_TIMED = 512
"""Lengths up to this one (the issue's T=512 model) are always timed."""


@dataclasses.dataclass(frozen=True)
class Config:
    """The model and batch (the issue's model: 4 blocks, width 256, 4 heads, batch 8, dropout 0.1)."""

    length: int = 512
    batch: int = 8
    width: int = 256
    heads: int = 4
    depth: int = 4
    rate: float = 0.1
    broadcast_dropout: bool = True
    """flax's default: one attention-dropout mask for all batch rows and heads; False draws one per (row, head)."""
    attention_blocks: tuple[int, int] | None = None
    """jdrop attention's ``(block_q, block_k)`` tiles; None: its defaults."""
    vocab: int = 256
    classes: int = 10
    learning_rate: float = 1e-3


QUICK = Config(length=16, batch=2, width=32, heads=2, depth=2)


def _parts(kind: str, framework: str, cfg: Config) -> tuple[float | None, bool, Any]:
    """``(rate or None for the model's, jdrop Dropout?, attention_fn)`` of a variant kind in ``framework``."""
    import functools

    import flax.linen as nn
    from flax import nnx

    import jdrop

    flax_attention = nn.dot_product_attention if framework == "flax.linen" else nnx.dot_product_attention
    jdrop_attention = jdrop.dot_product_attention
    if cfg.attention_blocks is not None:
        block_q, block_k = cfg.attention_blocks
        jdrop_attention = functools.partial(jdrop.dot_product_attention, block_q=block_q, block_k=block_k)
    return {
        NONE: (0.0, False, flax_attention),
        NONE_FUSED: (0.0, False, jdrop_attention),
        FLAX: (None, False, flax_attention),
        JDROP_DROPOUT: (None, True, flax_attention),
        JDROP: (None, True, jdrop_attention),
    }[kind]


# ------------------------------------------------------------------------------------- flax.linen


def linen_model(cfg: Config, kind: str = FLAX, *, remat: bool = False, train: bool = True) -> Any:
    """The transformer classifier as a ``flax.linen`` module: ``model.apply(variables, tokens, rngs=...)``."""
    import flax.linen as nn
    import jax.numpy as jnp

    from jdrop.interop import linen as jdrop_linen

    rate, jdrop_dropout, attention_fn = _parts(kind, "flax.linen", cfg)
    rate = cfg.rate if rate is None else rate
    dropout_cls = jdrop_linen.Dropout if jdrop_dropout else nn.Dropout

    class Block(nn.Module):
        """Pre-LN block: ``x + drop(attn(LN(x)))``, then ``x + drop(W2 drop(gelu(W1 LN(x))))``."""

        @nn.compact
        def __call__(self, x):
            h = nn.MultiHeadDotProductAttention(
                cfg.heads, dropout_rate=rate, deterministic=not train, attention_fn=attention_fn,
                broadcast_dropout=cfg.broadcast_dropout,
            )(nn.LayerNorm()(x))
            x = x + dropout_cls(rate, deterministic=not train)(h)
            h = nn.gelu(nn.Dense(4 * cfg.width)(nn.LayerNorm()(x)))
            h = nn.Dense(cfg.width)(dropout_cls(rate, deterministic=not train)(h))
            return x + dropout_cls(rate, deterministic=not train)(h)

    block_cls = nn.remat(Block) if remat else Block

    class Transformer(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(cfg.vocab, cfg.width)(tokens)
            x = x + self.param("position", nn.initializers.normal(0.02), (tokens.shape[-1], cfg.width))
            for i in range(cfg.depth):
                x = block_cls(name=f"block_{i}")(x)
            return nn.Dense(cfg.classes)(jnp.mean(nn.LayerNorm()(x), axis=-2))

    return Transformer()


def _linen_variant(cfg: Config, kind: str, remat: bool) -> Variant:
    import jax.numpy as jnp

    from benchmarks.models import _cross_entropy

    model = linen_model(cfg, kind, remat=remat)

    def init(key: Any) -> Any:
        return linen_model(cfg, FLAX).init(key, jnp.zeros((1, cfg.length), jnp.int32))["params"]

    def loss(params: Any, x: Any, y: Any, key: Any) -> Any:
        return _cross_entropy(model.apply({"params": params}, x, rngs={"dropout": key}), y)

    return Variant(init, loss)


# ------------------------------------------------------------------------------------- flax.nnx


def nnx_model(cfg: Config, kind: str = FLAX, *, remat: bool = False, rngs: Any) -> Any:
    """The transformer classifier as a ``flax.nnx`` module: ``model(tokens, rngs=nnx.Rngs(dropout=key))``.

    The dropout keys come from the ``rngs`` given to the call (so the module holds parameters only and
    splits into one ``nnx.Param`` state); ``rngs=None`` evaluates (no dropout).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jdrop.interop import nnx as jdrop_nnx

    rate, jdrop_dropout, attention_fn = _parts(kind, "flax.nnx", cfg)
    rate = cfg.rate if rate is None else rate
    dropout_cls = jdrop_nnx.Dropout if jdrop_dropout else nnx.Dropout

    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.norm1 = nnx.LayerNorm(cfg.width, rngs=rngs)
            self.attention = nnx.MultiHeadAttention(
                cfg.heads, cfg.width, dropout_rate=rate, attention_fn=attention_fn, decode=False,
                broadcast_dropout=cfg.broadcast_dropout, keep_rngs=False, rngs=rngs,
            )
            self.norm2 = nnx.LayerNorm(cfg.width, rngs=rngs)
            self.up = nnx.Linear(cfg.width, 4 * cfg.width, rngs=rngs)
            self.down = nnx.Linear(4 * cfg.width, cfg.width, rngs=rngs)
            self.drop_attention = dropout_cls(rate)
            self.drop_hidden = dropout_cls(rate)
            self.drop_mlp = dropout_cls(rate)

        def __call__(self, x, rngs):
            train = rngs is not None
            h = self.attention(self.norm1(x), deterministic=not train, rngs=rngs)
            x = x + self.drop_attention(h, deterministic=not train, rngs=rngs)
            h = nnx.gelu(self.up(self.norm2(x)))
            h = self.down(self.drop_hidden(h, deterministic=not train, rngs=rngs))
            return x + self.drop_mlp(h, deterministic=not train, rngs=rngs)

    def run_block(block: Block, x: Any, rngs: Any) -> Any:
        return block(x, rngs)

    run = nnx.remat(run_block) if remat else run_block

    class Transformer(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.embed = nnx.Embed(cfg.vocab, cfg.width, rngs=rngs)
            self.position = nnx.Param(jax.random.normal(rngs.params(), (cfg.length, cfg.width)) * 0.02)
            self.blocks = nnx.List([Block(rngs) for _ in range(cfg.depth)])
            self.norm = nnx.LayerNorm(cfg.width, rngs=rngs)
            self.head = nnx.Linear(cfg.width, cfg.classes, rngs=rngs)

        def __call__(self, tokens, rngs=None):
            x = self.embed(tokens) + self.position[...][: tokens.shape[-1]]
            for block in self.blocks:
                x = run(block, x, rngs)
            return self.head(jnp.mean(self.norm(x), axis=-2))

    return Transformer(rngs)


def _nnx_variant(cfg: Config, kind: str, remat: bool) -> Variant:
    from flax import nnx

    from benchmarks.models import _cross_entropy

    graphdef, _ = nnx.split(nnx.eval_shape(lambda: nnx_model(cfg, kind, remat=remat, rngs=nnx.Rngs(0))))

    def init(key: Any) -> Any:
        return nnx.split(nnx_model(cfg, FLAX, rngs=nnx.Rngs(params=key)))[1]

    def loss(params: Any, x: Any, y: Any, key: Any) -> Any:
        model = nnx.merge(graphdef, params)
        return _cross_entropy(model(x, rngs=nnx.Rngs(dropout=key)), y)

    return Variant(init, loss)


def variant(framework: str, kind: str, remat: bool, cfg: Config) -> Variant:
    """One variant's ``init(key) -> params`` (the same for every kind) and ``loss(params, x, y, key)``."""
    if framework == "flax.linen":
        return _linen_variant(cfg, kind, remat)
    if framework == "flax.nnx":
        return _nnx_variant(cfg, kind, remat)
    raise ValueError(f"unknown framework {framework!r}")


def variant_name(framework: str, kind: str, remat: bool) -> str:
    """``"flax.linen jdrop + remat"`` and the like."""
    return f"{framework} {kind}{' + remat' if remat else ''}"


def all_variants(
    cfg: Config, quick: bool = False, frameworks: Sequence[str] = MODEL_FRAMEWORKS
) -> dict[str, tuple[dict[str, Any], Variant]]:
    """Every (framework, remat, kind) variant by name, with its description (``quick``: no remat, 3 kinds)."""
    kinds = (NONE, FLAX, JDROP) if quick else KINDS
    return {
        variant_name(framework, kind, remat): (
            {"framework": framework, "dropout": kind, "remat": remat},
            variant(framework, kind, remat, cfg),
        )
        for framework in frameworks
        for remat in ((False,) if quick else (False, True))
        for kind in kinds
    }


def batch_specs(cfg: Config) -> tuple[Any, Any, Any]:
    """Abstract ``(tokens, labels, key)`` of one step."""
    import jax
    import jax.numpy as jnp

    return (
        jax.ShapeDtypeStruct((cfg.batch, cfg.length), jnp.int32),
        jax.ShapeDtypeStruct((cfg.batch,), jnp.int32),
        jax.eval_shape(lambda: jax.random.key(0)),
    )


# ------------------------------------------------------------------------------------- measurements


def compile_step(
    model: Variant, cfg: Config, repeats: int, compiler_options: dict[str, Any] | None = None
) -> tuple[Any, dict[str, Any]]:
    """The compiled step, its temporary memory and compile time (median of ``repeats``, each from cleared caches).

    Compiled from abstract shapes (nothing allocated); the returned executable is the one timed later.
    ``compiler_options`` go to XLA (the smoke test skips LLVM's optimisations with them).
    """
    import jax

    step, opt_init = make_step(model.loss, cfg)
    params = jax.eval_shape(model.init, jax.random.key(0))
    opt_state = jax.eval_shape(opt_init, params)
    totals = []
    for _ in range(repeats):
        jax.clear_caches()
        start = time.perf_counter()
        compiled = step.lower(params, opt_state, *batch_specs(cfg)).compile(compiler_options)
        totals.append(time.perf_counter() - start)
    result = {"temp_bytes": compiled.memory_analysis().temp_size_in_bytes, "compile_s": statistics.median(totals),
              "compile_s_runs": totals}
    return compiled, result


def runner(compiled: Any, opt_init: Any, cfg: Config, params: Any) -> StepRunner:
    """A compiled step with its own copy of ``params`` and a fixed batch of token ids."""
    import jax

    params = jax.tree_util.tree_map(lambda a: a.copy(), params)
    x = jax.random.randint(jax.random.key(1), (cfg.batch, cfg.length), 0, cfg.vocab)
    y = jax.random.randint(jax.random.key(2), (cfg.batch,), 0, cfg.classes)
    return StepRunner(compiled, params, opt_init(params), x, y, jax.random.key(3))


def time_steps(runners: dict[str, StepRunner], rounds: int) -> dict[str, dict[str, Any]]:
    """Median step time of each runner, round-robin after one warm-up step each (and every round's time)."""
    warm = {name: run() for name, run in runners.items()}
    times = round_robin(runners, rounds)
    return {
        name: {
            "median_ms": statistics.median(ts) * 1e3,
            "min_ms": min(ts) * 1e3,
            "max_ms": max(ts) * 1e3,
            "runs": len(ts),
            "warm_ms": warm[name] * 1e3,
            "times_ms": [t * 1e3 for t in ts],
        }
        for name, ts in times.items()
    }


def measure(framework: str, quick: bool) -> dict[str, Any]:
    """Per length: every variant compiled (memory, compile time), then timed round-robin: the worker's result.

    Lengths up to ``ALWAYS_TIMED`` are timed; after it, timing stops at the first length whose slowest
    warm step exceeds ``TIME_LIMIT_S``: longer lengths are compiled (memory) but not timed, and a
    ``skipped`` record says so.
    """
    import os

    import jax
    import jax.numpy as jnp
    import optax

    jax.jit(lambda v: v + 1).lower(jnp.zeros(())).compile()  # XLA's one-time set-up, outside the timings
    records: list[dict[str, Any]] = []
    base = QUICK if quick else Config()
    timing = True
    for length in LENGTHS[quick]:
        cfg = dataclasses.replace(base, length=length)
        described = all_variants(cfg, quick, (framework,))
        compiled = {}
        for name, (info, model) in described.items():
            compiled[name], result = compile_step(model, cfg, COMPILE_REPEATS[quick])
            records.append({"kind": "memory", "name": name, "length": length, **info, **result})
            log(f"  {name:44s} T={length:5d}: temp {result['temp_bytes'] / MiB:8.1f} MiB, "
                f"compile {result['compile_s']:.1f} s")
        if not timing and length > ALWAYS_TIMED:
            records.append({"kind": "skipped", "length": length,
                            "reason": f"a step at a shorter T took over {TIME_LIMIT_S:.0f} s"})
            continue
        params = jax.jit(variant(framework, FLAX, False, cfg).init)(jax.random.key(0))
        opt_init = optax.sgd(cfg.learning_rate).init
        runners = {name: runner(step, opt_init, cfg, params) for name, step in compiled.items()}
        load = os.getloadavg() if hasattr(os, "getloadavg") else None
        timed = time_steps(runners, ROUNDS[quick])
        load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
        for name, result in timed.items():
            records.append({"kind": "time", "name": name, "length": length, **described[name][0], **result,
                            "load_average": load, "load_average_after": load_after})
            log(f"  {name:44s} T={length:5d}: {result['median_ms']:8.1f} ms / step")
        del runners
        timing = max(r["warm_ms"] for r in timed.values()) <= TIME_LIMIT_S * 1e3
    return {"framework": framework, "records": records}


# ------------------------------------------------------------------------------------- summary


def paired_speedup(timed: dict[str, dict[str, Any]], reference: str, name: str) -> float:
    """Median over rounds of ``reference``'s time / ``name``'s time in the same round.

    Both ran back to back in each round, so a slow spell of a shared machine slows both: the ratio
    of each round is steadier than the ratio of the two medians.
    """
    return statistics.median(r / t for r, t in zip(timed[reference]["times_ms"], timed[name]["times_ms"]))


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (framework, remat, kind, T): temp MiB, x no-dropout, compile s, step ms, speed-up over flax."""
    memory = {(r["name"], r["length"]): r for r in records if r["kind"] == "memory"}
    times = {(r["name"], r["length"]): r for r in records if r["kind"] == "time"}
    rows = []
    for (name, length), mem in memory.items():
        framework, kind, remat = mem["framework"], mem["dropout"], mem["remat"]
        baseline = memory.get((variant_name(framework, BASELINE, remat), length))
        timing = times.get((name, length))
        reference = times.get((variant_name(framework, REFERENCE, remat), length))
        rows.append(
            {
                "name": name,
                "framework": framework,
                "dropout": kind,
                "remat": remat,
                "length": length,
                "temp_mib": mem["temp_bytes"] / MiB,
                "temp_vs_no_dropout": mem["temp_bytes"] / baseline["temp_bytes"] if baseline else None,
                "compile_s": mem["compile_s"],
                "median_s": timing["median_ms"] / 1e3 if timing else None,
                "speedup_vs_flax": reference["median_ms"] / timing["median_ms"] if timing and reference else None,
            }
        )
    rows.sort(key=lambda r: (r["framework"], r["remat"], r["length"], KINDS.index(r["dropout"])))
    notes = [{"note": f"T={r['length']} not timed: {r['reason']}"} for r in records if r["kind"] == "skipped"]
    return rows + notes


def title(quick: bool) -> str:
    """The heading of the transformer table."""
    cfg = QUICK if quick else Config()
    return (
        f"Transformer benchmark: pre-LN transformer training step (SGD), {cfg.depth} blocks, width {cfg.width}, "
        f"{cfg.heads} heads, batch {cfg.batch}, dropout {cfg.rate} on attention, residual and MLP"
    )


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The transformer benchmark as one Markdown table."""
    headers = ("model", "remat", "dropout", "T", "temp MiB", "x no-dropout", "step s", "speed-up vs flax dropout",
               "compile s")
    notes = [row["note"] for row in rows if "note" in row]
    body = [
        (
            row["framework"],
            "yes" if row["remat"] else "no",
            row["dropout"],
            row["length"],
            row["temp_mib"],
            row["temp_vs_no_dropout"],
            row["median_s"],
            row["speedup_vs_flax"],
            row["compile_s"],
        )
        for row in rows
        if "note" not in row
    ]
    return "\n".join([markdown_table(headers, body), *(f"\n{note}" for note in notes)])


def main(argv: Sequence[str] | None = None) -> None:
    """Worker entry point: ``python -m benchmarks.transformer --framework flax.linen [--quick] [--out PATH]``."""
    worker_main(__doc__.splitlines()[0], FRAMEWORKS, measure, argv)


if __name__ == "__main__":
    main()

