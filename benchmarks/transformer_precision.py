"""How close the jdrop transformer's gradients are to flax's: float rounding, bounded by a float64 run.

``python -m benchmarks.transformer_precision`` evaluates the transformer benchmark's model (4 pre-LN blocks, width
256, 4 heads, T=512, batch 8, dropout 0.1 on the attention weights with ``broadcast_dropout=False``, on both
residual branches and after the MLP's GELU; benchmarks/transformer.py) with flax's dropout and with jdrop's (the
two-line swap), compiled as users compile (no XLA option), in float32, and compares each with the same model
evaluated in float64 with the same masks:

- float64 changes no mask: flax draws ``jax.random.bernoulli(rng, keep, shape)``, which in float64 mode would
  compare 52-bit uniforms with a float64 ``keep``; the reference runs flax's model with ``keep`` cast to float32
  (:func:`float32_bernoulli`), which draws exactly the float32 run's masks; both models get the rate as a float32
  scalar there, from which jdrop draws (as bernoulli does) the float32 run's masks too.
- The two models differ on purpose in one respect: jdrop divides by the *realised* keep probability
  ``ceil(keep * 2**23) / 2**23`` (unbiased), flax by ``1 - rate``. At rate 0.1 that is a relative 1.06e-7 per
  dropout; at rates whose ``keep * 2**23`` is an integer (0.25, 0.5, ...) the two are the same function, and their
  float64 gradients agree to float64 rounding (``tests/test_transformer.py`` checks that: the masks are the same).

Per parameter the error is the relative 2-norm ``||g32 - g64|| / ||g64||``. One parameter has no scale: the key
projection's bias, whose exact gradient is 0 (softmax is invariant to adding ``q . b`` to every logit of a row,
so ``dL/db_k = 0`` with or without dropout); in float32 both models return rounding noise there, and its absolute
size is reported relative to the whole gradient's norm.

Each mode of :data:`MODES` runs in its own subprocess: the CPU's own code, ``--xla_cpu_max_isa=AVX2`` (the code an
AVX2 machine gets), ``--xla_backend_extra_options=-force-vector-interleave=2`` (what AVX-512 machines' vectorizer
does by itself), XLA's fast math, and ``jax_default_matmul_precision=bfloat16``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from benchmarks import transformer
from benchmarks._common import log, machine_description, markdown_table

ISSUE_CONFIG = dataclasses.replace(transformer.Config(), broadcast_dropout=False)
"""The model of issue 17: per-(row, head) attention dropout."""
MODES = {
    "native": ("", {}),
    "AVX2": ("--xla_cpu_max_isa=AVX2", {}),
    "interleave": ("--xla_backend_extra_options=-force-vector-interleave=2", {}),
    "fast-math": ("--xla_cpu_enable_fast_math=true", {}),
    "matmul bf16": ("", {"JAX_DEFAULT_MATMUL_PRECISION": "bfloat16"}),
}
"""Each mode's XLA_FLAGS (added to the environment's) and environment: the CPU's own code, AVX2's, AVX-512's
interleaving, and two settings users may have: XLA's fast math (off by default) and a lower default matmul
precision (``jax_default_matmul_precision``; None by default)."""
ONE_TILE = "jdrop, one tile"
"""jdrop with a single attention tile (no blockwise summation): isolates the summation order's part."""
FLOAT32_EPS = float(np.finfo(np.float32).eps)


@contextlib.contextmanager
def float32_bernoulli() -> Iterator[None]:
    """``jax.random.bernoulli`` with its probability cast to float32, so float64 runs draw float32 runs' masks.

    ``bernoulli(key, p)`` compares ``uniform(key, shape, dtype(p))`` with ``p``; flax passes ``p = 1 - rate``, a
    Python float, which becomes float64 under ``jax.enable_x64``: other uniforms, other masks. Cast to float32,
    ``p`` gives the float32 masks bit for bit.
    """
    import jax
    import jax.numpy as jnp

    original = jax.random.bernoulli

    def bernoulli(key: Any, p: Any = 0.5, shape: Any = None, **kwargs: Any) -> Any:
        return original(key, jnp.asarray(p, jnp.float32), shape, **kwargs)

    jax.random.bernoulli = bernoulli
    try:
        yield
    finally:
        jax.random.bernoulli = original


def _model(framework: str, kind: str, cfg: transformer.Config, remat: bool) -> transformer.Variant:
    if kind == ONE_TILE:
        cfg = dataclasses.replace(cfg, attention_blocks=(cfg.length, cfg.length))
        kind = transformer.JDROP
    return transformer.variant(framework, kind, remat, cfg)


def gradients(
    framework: str, kind: str, cfg: transformer.Config, *, remat: bool = False, x64: bool = False,
    seeds: Sequence[int] = (3,),
) -> list[tuple[float, dict[str, np.ndarray]]]:
    """``(loss, {parameter path: gradient})`` of one variant per dropout seed, at the benchmark's parameters and data.

    Compiled once, as users compile (no XLA option). ``x64``: the same model with its parameters cast to float64,
    evaluated under ``jax.enable_x64`` with float32 masks (:func:`float32_bernoulli`).
    """
    import jax
    import jax.numpy as jnp

    if x64:  # a float32 rate: under x64 flax's bernoulli and jdrop draw the float32 run's masks from it
        cfg = dataclasses.replace(cfg, rate=np.float32(cfg.rate))
    model = _model(framework, kind, cfg, remat)
    params = jax.jit(transformer.variant(framework, transformer.FLAX, False, cfg).init)(jax.random.key(0))
    x = jax.random.randint(jax.random.key(1), (cfg.batch, cfg.length), 0, cfg.vocab)
    y = jax.random.randint(jax.random.key(2), (cfg.batch,), 0, cfg.classes)
    with contextlib.ExitStack() as stack:
        if x64:
            stack.enter_context(jax.enable_x64(True))
            stack.enter_context(float32_bernoulli())
            params = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float64)), params)
        step = jax.jit(jax.value_and_grad(model.loss))
        results = []
        for seed in seeds:
            loss, grads = step(params, x, y, jax.random.key(seed))
            leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
            results.append((float(loss), {jax.tree_util.keystr(path): np.asarray(g, np.float64) for path, g in leaves}))
        return results


def zero_gradient(name: str) -> bool:
    """The key projection's bias: its exact gradient is 0 (see the module docstring)."""
    return "['key']['bias']" in name


def relative_errors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, float]:
    """Per parameter ``||got - want|| / ||want||``; for the zero-gradient ones ``||got - want|| / ||want||_all``."""
    total = math.sqrt(sum(float(np.sum(w * w)) for w in want.values()))
    return {
        name: float(np.linalg.norm(got[name] - w)) / (total if zero_gradient(name) else float(np.linalg.norm(w)))
        for name, w in want.items()
    }


def whole_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    """``||got - want|| / ||want||`` over all parameters at once."""
    diff = sum(float(np.sum((got[n] - w) ** 2)) for n, w in want.items())
    return math.sqrt(diff / sum(float(np.sum(w * w)) for w in want.values()))


def mismatches(got: dict[str, np.ndarray], want: dict[str, np.ndarray], rtol: float = 2e-3) -> dict[str, int]:
    """Elements outside ``rtol`` (no absolute tolerance), per parameter with any: what issue 17 counted."""
    counts = {n: int(np.sum(~np.isclose(got[n], w, rtol=rtol, atol=0.0))) for n, w in want.items()}
    return {n: c for n, c in counts.items() if c}


def measure(framework: str, cfg: transformer.Config) -> dict[str, Any]:
    """Every variant in float32 against its float64 reference, and flax against jdrop in both precisions."""
    kinds = (transformer.FLAX, transformer.JDROP_DROPOUT, transformer.JDROP, ONE_TILE)
    f32 = {kind: gradients(framework, kind, cfg)[0] for kind in kinds}
    f64 = {kind: gradients(framework, kind, cfg, x64=True)[0] for kind in (transformer.FLAX, transformer.JDROP)}
    rows = []
    for kind, (loss, grads) in f32.items():
        # flax's model against flax's float64 function; jdrop's kinds compute jdrop's (the realised keep).
        ref = f64[transformer.FLAX if kind == transformer.FLAX else transformer.JDROP][1]
        per = relative_errors(grads, ref)
        scaled = {n: e for n, e in per.items() if not zero_gradient(n)}
        rows.append({
            "kind": kind, "loss": loss,
            "whole": whole_error(grads, ref),
            "max_parameter": max(scaled.values()), "worst": max(scaled, key=scaled.__getitem__),
            "median_parameter": float(np.median(list(scaled.values()))),
            "zero_gradient_noise": max(e for n, e in per.items() if zero_gradient(n)),
        })
    flax32, jdrop32 = f32[transformer.FLAX][1], f32[transformer.JDROP][1]
    between = relative_errors(jdrop32, flax32)
    return {
        "framework": framework,
        "config": dataclasses.asdict(cfg),
        "rows": rows,
        "float64_jdrop_vs_flax": whole_error(f64[transformer.JDROP][1], f64[transformer.FLAX][1]),
        "float32_jdrop_vs_flax": whole_error(jdrop32, flax32),
        "float32_jdrop_vs_flax_max_parameter": max(e for n, e in between.items() if not zero_gradient(n)),
        "issue_mismatches_rtol_2e-3": mismatches(jdrop32, flax32),
    }


def swap_errors(framework: str, cfg: transformer.Config, remat: bool = False) -> dict[str, Any]:
    """The swap's errors: jdrop against flax in float64, and each float32 model against flax's float64 gradients.

    Meant for rates whose ``keep * 2**23`` is an integer (0.25, 0.5, ...), where jdrop's realised keep is flax's
    ``1 - rate`` and both models compute the same function: then ``float64`` (jdrop's float64 gradient against
    flax's, relative 2-norm) is float64 rounding unless a mask differs. ``flax``/``jdrop`` map each parameter to
    its float32 error (:func:`relative_errors`); ``*_whole`` over all parameters; ``losses`` are the float32
    losses of flax and of jdrop at seeds 3 and 4 (dropout must be on: another seed, another loss).
    """
    (flax_loss, flax32), = gradients(framework, transformer.FLAX, cfg, remat=remat)
    (jdrop_loss, jdrop32), (other_loss, _) = gradients(framework, transformer.JDROP, cfg, remat=remat, seeds=(3, 4))
    (_, flax64), = gradients(framework, transformer.FLAX, cfg, remat=remat, x64=True)
    (_, jdrop64), = gradients(framework, transformer.JDROP, cfg, remat=remat, x64=True)
    return {
        "float64": whole_error(jdrop64, flax64),
        "flax": relative_errors(flax32, flax64),
        "jdrop": relative_errors(jdrop32, flax64),
        "flax_whole": whole_error(flax32, flax64),
        "jdrop_whole": whole_error(jdrop32, flax64),
        "losses": [flax_loss, jdrop_loss, other_loss],
    }


def in_mode(mode: str, argv: Sequence[str], *, worker: bool = True) -> dict[str, Any]:
    """This module's command line ``argv`` in a subprocess under ``mode`` (:data:`MODES`): its JSON output."""
    flags, extra = MODES[mode]
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip(), **extra)
    command = [sys.executable, "-m", "benchmarks.transformer_precision", *(["--worker"] if worker else []), *argv]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed in mode {mode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: Sequence[dict[str, Any]]) -> str:
    """One Markdown row per (mode, variant)."""
    headers = ("mode", "variant", "whole gradient vs float64", "worst parameter", "median parameter",
               "key-bias noise / ||g||")
    body = [
        (r["mode"], row["kind"], f"{row['whole']:.2e}", f"{row['max_parameter']:.2e}",
         f"{row['median_parameter']:.2e}", f"{row['zero_gradient_noise']:.2e}")
        for r in results for row in r["rows"]
    ]
    lines = [markdown_table(headers, body), ""]
    for r in results:
        lines.append(
            f"- {r['mode']}: jdrop vs flax, float32 {r['float32_jdrop_vs_flax']:.2e} (worst parameter "
            f"{r['float32_jdrop_vs_flax_max_parameter']:.2e}); float64 {r['float64_jdrop_vs_flax']:.2e} (the realised "
            f"keep's {cfg_keep_gap(r['config']['rate']):.2e} per dropout); elements off at rtol 2e-3: "
            f"{r['issue_mismatches_rtol_2e-3']}"
        )
    return "\n".join(lines)


def cfg_keep_gap(rate: float) -> float:
    """Relative gap between jdrop's realised keep probability and flax's ``1 - rate``."""
    keep = np.float32(1.0 - rate)
    realised = math.ceil(float(keep) * 2**23) / 2**23
    return abs(realised - (1.0 - rate)) / (1.0 - rate)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.transformer_precision [--length T] [--framework F] [--mode M ...]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=ISSUE_CONFIG.length)
    parser.add_argument("--framework", default="flax.linen", choices=transformer.MODEL_FRAMEWORKS)
    parser.add_argument("--mode", action="append", choices=tuple(MODES), help="default: all modes")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--config", type=json.loads, default={},
                        help='JSON fields of the model config, e.g. \'{"rate": 0.25, "width": 32}\'')
    parser.add_argument("--swap", action="store_true", help="print swap_errors(...) as JSON (tests run this)")
    parser.add_argument("--remat", action="store_true", help="with --swap: the rematerialised model")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    fields = dict(args.config)
    if fields.get("attention_blocks") is not None:
        fields["attention_blocks"] = tuple(fields["attention_blocks"])
    cfg = dataclasses.replace(ISSUE_CONFIG, **{"length": args.length, **fields})
    if args.swap:
        print(json.dumps(swap_errors(args.framework, cfg, args.remat)))
        return
    if args.worker:
        print(json.dumps(measure(args.framework, cfg)))
        return
    results = []
    for mode in args.mode or tuple(MODES):
        log(f"[precision] {args.framework} T={args.length} {mode}")
        argv = ["--length", str(args.length), "--framework", args.framework, "--config", json.dumps(args.config)]
        results.append({"mode": mode, **in_mode(mode, argv)})
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_description(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()


__all__ = ["float32_bernoulli", "gradients", "in_mode", "measure", "relative_errors", "swap_errors", "whole_error",
           "zero_gradient"]
