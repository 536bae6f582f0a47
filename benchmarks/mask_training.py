"""Does a model trained with a cheap attention dropout mask reach the exact mask's accuracy?

``python -m benchmarks.mask_training [--seeds 5] [--epochs 40] [--out PATH]`` trains notebook 05's transformer
classifier (MNIST-1D read as a 40-step sequence; width 64, 4 heads, 2 pre-LN blocks; Adam 1e-3, batch 100; jdrop's
Dropout on the residual branches and after the MLP's GELU, drop_path, and ``jdrop.dot_product_attention`` on the
attention probabilities) once per ``dropout_mask`` mode and seed. The seed sets the initial weights, the data order
and the dropout keys; within a seed every mode starts from the same weights and sees the same minibatches, so the
per-seed difference of test accuracies between a mode and ``"exact"`` isolates the mask (paired comparison).

The attention dropout rate is higher than the notebook's (0.3 by default, ``--attention-rate``) so that the mask
matters; residual and drop_path rates are the notebook's 0.1. The summary gives each mode's mean final test accuracy
over the seeds and the mean and standard deviation of its paired difference from the exact mask's, with the
standard error ``sd / sqrt(seeds)``: "within noise" means the mean difference is within a few standard errors of 0
and small against the seed-to-seed spread. ``--small`` runs a few steps for the tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import log, machine_description, markdown_table

MODES = ("exact", "fast8", "hash8")
WIDTH, HEADS, DEPTH, BATCH = 64, 4, 2, 100


def model(mode: str, rates: tuple[float, float, float], small: bool) -> Any:
    """Notebook 05's ``SequenceClassifier`` with jdrop's dropout and ``dropout_mask=mode`` in the attention."""
    from functools import partial

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import jdrop
    from jdrop.interop import linen as jdrop_linen

    attention_fn = partial(jdrop.dot_product_attention, dropout_mask=mode)
    width, heads, depth = (16, 2, 1) if small else (WIDTH, HEADS, DEPTH)
    attention_rate, residual_rate, path_rate = rates

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x: Any, train: bool) -> Any:
            def path(h: Any) -> Any:
                h = jdrop_linen.Dropout(residual_rate, deterministic=not train)(h)
                if not train or path_rate == 0.0:
                    return h
                return jdrop.drop_path(self.make_rng("dropout"), h, path_rate, batch_axis=None)

            h = nn.MultiHeadDotProductAttention(heads, dropout_rate=attention_rate, attention_fn=attention_fn,
                                                deterministic=not train)(nn.LayerNorm()(x))
            x = x + path(h)
            h = nn.gelu(nn.Dense(4 * x.shape[-1])(nn.LayerNorm()(x)))
            h = nn.Dense(x.shape[-1])(jdrop_linen.Dropout(residual_rate, deterministic=not train)(h))
            return x + path(h)

    class SequenceClassifier(nn.Module):
        @nn.compact
        def __call__(self, x: Any, train: bool = False) -> Any:
            x = nn.Dense(width)(x[..., None])
            x = x + self.param("position", nn.initializers.normal(0.02), x.shape[-2:])
            for _ in range(depth):
                x = Block()(x, train)
            return nn.Dense(10)(jnp.mean(nn.LayerNorm()(x), axis=-2))

    del jax
    return SequenceClassifier()


def train(mode: str, seed: int, epochs: int, rates: tuple[float, float, float], small: bool) -> dict[str, Any]:
    """Final train and test accuracy of one mode and seed."""
    import jax
    import optax

    import jdrop
    from jdrop.data import mnist1d

    train_set, test_set = mnist1d()
    if small:
        train_set = {k: v[:256] for k, v in train_set.items()}
        test_set = {k: v[:256] for k, v in test_set.items()}
    net = model(mode, rates, small)

    def apply_fn(params: Any, x: Any, *, key: Any, train: bool) -> Any:  # one example
        return net.apply({"params": params}, x, train=train, rngs={"dropout": key} if train else {})

    params = net.init(jax.random.key(seed), train_set["x"][:1])["params"]
    state = jdrop.TrainState.create(apply_fn=apply_fn, params=params, tx=optax.adam(1e-3))
    key = jax.random.key(1000 + seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        state, _ = jdrop.train_epoch(state, train_set, jax.random.fold_in(key, epoch),
                                     batch_size=64 if small else BATCH)
    return {"mode": mode, "seed": seed, "epochs": epochs, "seconds": time.perf_counter() - start,
            "train_accuracy": jdrop.evaluate(state, train_set)["accuracy"],
            "test_accuracy": jdrop.evaluate(state, test_set)["accuracy"]}


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per mode: mean test accuracy, and the paired (per-seed) difference from the exact mask's."""
    by = {(r["mode"], r["seed"]): r["test_accuracy"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    rows = []
    for mode in dict.fromkeys(r["mode"] for r in runs):
        accuracies = [by[mode, s] for s in seeds if (mode, s) in by]
        diffs = [by[mode, s] - by["exact", s] for s in seeds if (mode, s) in by and ("exact", s) in by]
        sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        rows.append({"mode": mode, "seeds": len(accuracies), "mean_test_accuracy": statistics.fmean(accuracies),
                     "sd_test_accuracy": statistics.stdev(accuracies) if len(accuracies) > 1 else float("nan"),
                     "mean_diff_vs_exact": statistics.fmean(diffs) if diffs else float("nan"), "sd_diff": sd,
                     "se_diff": sd / len(diffs) ** 0.5 if diffs else float("nan")})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--attention-rate", type=float, default=0.3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--small", action="store_true", help="a tiny model for a few steps (the tests)")
    parser.add_argument("--out", type=Path, help="JSON path (rewritten after every run)")
    args = parser.parse_args(argv)
    rates = (args.attention_rate, 0.1, 0.1)
    runs = []
    for seed in range(args.seeds):
        for mode in args.modes.split(","):
            runs.append(train(mode, seed, args.epochs, rates, args.small))
            log(f"{mode} seed {seed}: test accuracy {runs[-1]['test_accuracy']:.4f} ({runs[-1]['seconds']:.0f} s)")
            if args.out is not None:
                args.out.write_text(json.dumps({"machine": machine_description(), "rates": rates, "runs": runs,
                                                "summary": summarize(runs)}, indent=1))
    print(markdown_table(("mask", "seeds", "mean test acc", "sd", "mean diff vs exact (paired)", "sd of diff",
                          "se of diff"),
                         [(r["mode"], r["seeds"], r["mean_test_accuracy"], r["sd_test_accuracy"],
                           r["mean_diff_vs_exact"], r["sd_diff"], r["se_diff"]) for r in summarize(runs)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
