"""``python -m jdrop``: the demo. Trains the seed-style MLP on MNIST-1D with and without dropout.

Prints a table of train accuracy, test accuracy and the generalisation gap, and writes a PNG of the
learning curves (and the histories as JSON) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial
from pathlib import Path

import jax
import optax

import jdrop
from jdrop import distributed, mlp, train
from jdrop.data import mnist1d


def run(name: str, rates: tuple[float, ...], args: argparse.Namespace, data) -> dict:
    train_data, test_data = data
    params = mlp.init(jax.random.key(args.seed), [40, *args.hidden, 10], activation="relu")
    state = train.TrainState.create(
        apply_fn=partial(mlp.apply, rates=rates), params=params, tx=optax.adam(args.lr)
    )
    start = time.perf_counter()
    state, history = train.fit(
        state,
        train_data,
        key=jax.random.key(args.seed + 1),
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_data={"train": train_data, "test": test_data},
        progress=not args.quiet and jax.process_index() == 0,
        mesh=args.mesh,
    )
    return {**history, "seconds": time.perf_counter() - start, "name": name, "rates": list(rates)}


def plot(histories: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for history, color in zip(histories, ("tab:blue", "tab:orange")):
        for split, style in (("train", "--"), ("test", "-")):
            axes[0].plot(history["epoch"], history[f"{split}_accuracy"], style, color=color,
                         label=f"{history['name']} ({split})")
            axes[1].plot(history["epoch"], history[f"{split}_loss"], style, color=color,
                         label=f"{history['name']} ({split})")
    axes[0].set(xlabel="epoch", ylabel="accuracy (deterministic network)", title="MNIST-1D accuracy")
    axes[1].set(xlabel="epoch", ylabel="cross-entropy", title="MNIST-1D loss", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jdrop", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 512])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.5, 0.5],
                        help="dropout rate on the input of each weight layer (rates[0]: input dropout)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    dist = parser.add_argument_group("multi-process training (jax.distributed; omit to read JAX's environment)")
    dist.add_argument("--coordinator", help="address host:port of process 0, e.g. host0:1234")
    dist.add_argument("--num-processes", type=int)
    dist.add_argument("--process-id", type=int)
    args = parser.parse_args(argv)
    if len(args.rates) != len(args.hidden) + 1:
        parser.error(f"--rates needs {len(args.hidden) + 1} values (one per weight layer)")

    mesh = None
    if args.coordinator or args.num_processes or "JAX_COORDINATOR_ADDRESS" in os.environ:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if jax.device_count() > 1:
        mesh = distributed.data_mesh()
        if args.batch_size % jax.device_count():
            parser.error(f"--batch-size must be a multiple of the device count ({jax.device_count()})")
    args.mesh = mesh
    print(f"jdrop {jdrop.__version__} on {jax.default_backend()}: {jax.device_count()} device(s), "
          f"{jax.process_count()} process(es)")
    data = mnist1d(seed=args.data_seed)
    print(f"MNIST-1D: {len(data[0]['y'])} train / {len(data[1]['y'])} test examples")
    histories = [
        run("no dropout", (0.0,) * len(args.rates), args, data),
        run("dropout " + "/".join(f"{r:g}" for r in args.rates), tuple(args.rates), args, data),
    ]

    if jax.process_index() != 0:
        return 0
    print(f"\n{'model':<22}{'train acc':>10}{'test acc':>10}{'gap':>8}{'seconds':>9}")
    for h in histories:
        tr, te = h["train_accuracy"][-1], h["test_accuracy"][-1]
        print(f"{h['name']:<22}{tr:>10.3f}{te:>10.3f}{tr - te:>8.3f}{h['seconds']:>9.1f}")

    args.out.mkdir(parents=True, exist_ok=True)
    plot(histories, args.out / "learning_curves.png")
    (args.out / "histories.json").write_text(json.dumps(histories, indent=1))
    print(f"\nwrote {args.out / 'learning_curves.png'} and {args.out / 'histories.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
