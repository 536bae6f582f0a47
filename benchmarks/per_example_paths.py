"""The MLP training step through jdrop's per-example paths, timed round-robin in one process.

``python -m benchmarks.per_example_paths [--batch 256] [--width 1024] [--depth 4] [--rounds 8] [--before FILE]``

- ``per_example``: what :func:`jdrop.train_step` runs for ``apply_fn=partial(jdrop.mlp.apply, rates=...)``:
  ``mlp.apply`` is marked ``jdrop.train.takes_batch``, so it is called once on the batch with the example keys
  (the weight gradient is one matrix product);
- ``vmap``: a one-example wrapper without the marker, which ``per_example`` vmaps: JAX batches the custom_vjp
  (the weight gradient sums per-example outer products);
- ``train_step``: ``jdrop.train_step`` itself (the same path plus the state update and metrics);
- ``--before FILE``: another revision's ``jdrop/mlp.py`` (``git show REV:jdrop/mlp.py > FILE``) under a vmap
  over examples, as that revision's ``train_step`` ran it (before the marker: ``custom_vmap`` chosen by reading
  ``jax._src``).

Every variant trains the same network from the same parameters on the same batch and key, so the losses printed
after two steps agree (same masks). The table gives median and min step times and the speed relative to the first
variant; on a shared machine only the ratios mean much.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks._common import round_robin


def _load_mlp(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("_mlp_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main(argv: Sequence[str] | None = None) -> None:
    """Builds the variants, checks their losses agree and prints the round-robin timings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4, help="hidden ReLU layers")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--before", help="another revision's jdrop/mlp.py, run under vmap as its train_step did")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import optax

    import jdrop
    from jdrop import mlp

    rates = (0.0,) + (0.5,) * args.depth
    tx = optax.sgd(0.01)
    params0 = mlp.init(jax.random.key(0), [args.width] * (args.depth + 1) + [10], activation="relu")
    x = jax.random.normal(jax.random.key(1), (args.batch, args.width), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (args.batch,), 0, 10)
    key = jax.random.key(3)

    def raw_runner(outputs: Callable[[Any, Any, Any], Any], params: Any) -> Callable[[], float]:
        def step(params, opt_state):
            def loss(p):
                return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(outputs(p, x, key), y))

            value, grads = jax.value_and_grad(loss)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, value

        compiled = jax.jit(step, donate_argnums=(0, 1))
        carry = [jax.tree_util.tree_map(jnp.copy, params), tx.init(params)]

        def run() -> float:
            start = time.perf_counter()
            carry[0], carry[1], value = compiled(carry[0], carry[1])
            losses[run] = float(value)
            return time.perf_counter() - start

        return run

    def train_step_runner() -> Callable[[], float]:
        apply_fn = functools.partial(mlp.apply, rates=rates)
        state = [jdrop.TrainState.create(apply_fn=apply_fn, params=jax.tree_util.tree_map(jnp.copy, params0), tx=tx)]

        def run() -> float:
            start = time.perf_counter()
            state[0], metrics = jdrop.train_step(state[0], {"x": x, "y": y}, key, donate=True)
            losses[run] = float(metrics["loss"])
            return time.perf_counter() - start

        return run

    def per_example(p, x, key):
        return jdrop.train.per_example(functools.partial(mlp.apply, rates=rates), p, x, key)

    def vmapped(module):
        def outputs(p, x, key):
            keys = jdrop.example_keys(key, x.shape[0])
            flag = {"deterministic": False} if module is mlp else {"train": True}
            return jax.vmap(lambda xi, ki: module.apply(p, xi, key=ki, rates=rates, **flag))(x, keys)

        return outputs

    losses: dict[Any, float] = {}
    runners: dict[str, Callable[[], float]] = {}
    if args.before:
        before = _load_mlp(args.before)
        runners["before (vmap, FILE)"] = raw_runner(vmapped(before), before.MLPParams(params0.weights, params0.biases,
                                                                                     "relu"))
    runners["per_example (batch call)"] = raw_runner(per_example, params0)
    runners["vmap (unmarked wrapper)"] = raw_runner(vmapped(mlp), params0)
    runners["train_step"] = train_step_runner()
    first = {name: run() for name, run in runners.items()}
    for run in runners.values():
        run()
    print("loss after two steps:", {name: losses[run] for name, run in runners.items()})
    times = round_robin(runners, args.rounds)
    reference = statistics.median(next(iter(times.values())))
    print(f"batch {args.batch} x width {args.width} x {args.depth} hidden ReLU layers, rates {rates}, "
          f"{args.rounds} rounds, jax {jax.__version__}, {jax.devices()[0].device_kind}")
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"  {name:26s} median {median * 1e3:8.1f} ms  min {min(ts) * 1e3:8.1f} ms  "
              f"speed vs first {reference / median:5.2f}  first call {first[name]:5.1f} s")


if __name__ == "__main__":
    main()
