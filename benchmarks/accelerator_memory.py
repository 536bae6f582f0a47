"""Accelerator memory without a device: what H100's and TPU v5e's compilers assign to attention and transformer steps.

``python -m benchmarks.accelerator_memory [--out benchmarks/results/accelerator-memory.json]`` with
``JDROP_GPU_PYTHON`` and ``JDROP_TPU_PYTHON`` naming the toolchain pythons that ``make test-accelerators`` builds
(``build/accelerator-envs/{gpu,tpu}/bin/python``). Every number is ``compiled.memory_analysis()`` of a program
compiled for the target by its own compiler (XLA:GPU for sm_90a, XLA:TPU), on this CPU, in watched subprocesses
(``tests/accelerators/_compile.py``): deterministic buffer assignments, not measurements of a run.

- Attention training step (value_and_grad w.r.t. q, k, v; B=4, H=8, D=128, bfloat16; dropout 0.1 where the
  function has it) at T = 2048 ... 32768: jdrop (``implementation="xla"`` and ``"pallas"``), flax's
  ``dot_product_attention`` with dropout, and ``jax.nn.dot_product_attention`` (no dropout; ``implementation="xla"``,
  and ``"cudnn"`` for H100, where it compiles without a device).
- The longest T (a multiple of 1024) whose attention step with B=1 fits the card: arguments + outputs +
  temporaries within 16 GiB (v5e) or the H100's 84,942,979,072 bytes (its target config's
  ``device_memory_size``), by bisection on T, starting from a bracket around the T that a fit of the
  temporaries at three lengths predicts. XLA:TPU refuses a program that does not fit (counted as not fitting);
  XLA:GPU compiles it with a warning, so the sum is compared here.
- The 12-block transformer step of ``tests/accelerators/programs.py`` (width 1024, T=4096, bfloat16) with
  jdrop's dropout, flax's, and none: temporaries, and each dropout's ratio to the model without it.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import ROOT, MiB, log, machine_description, markdown_table

sys.path.insert(0, str(ROOT / "tests" / "accelerators"))
from _compile import Result, compile_on, python_for  # noqa: E402
from programs import ATTENTION_STEPS, TRANSFORMERS, attention_step_name  # noqa: E402

TARGETS = ("h100", "v5e")
CAPACITY = {"h100": 84942979072, "v5e": 16 * 2**30}
"""Bytes of device memory: the H100 target config's ``device_memory_size`` (79.1 GiB); v5e's 16 GiB HBM."""
LENGTHS = (2048, 4096, 8192, 16384, 32768)
GRANULE = 1024
TIMEOUT_S, MAX_RSS_BYTES = 900.0, 10 * 2**30
GiB = 2**30


def kinds(target: str) -> tuple[str, ...]:
    """The attention steps of ``target``: cuDNN's only for H100."""
    return tuple(k for k in ATTENTION_STEPS if target == "h100" or k != "jax-cudnn")


def _compile(target: str, names: Sequence[str]) -> dict[str, Result]:
    return compile_on(target, names, timeout_s=TIMEOUT_S, max_rss_bytes=MAX_RSS_BYTES)


def _record(target: str, result: Result, **fields: Any) -> dict[str, Any]:
    info = result.info
    total = (info["argument_size_in_bytes"] + info["output_size_in_bytes"] + info["temp_size_in_bytes"]
             - info["alias_size_in_bytes"]) if result.ok else None
    return {"target": target, "name": result.name, "status": result.status, "compile_s": round(result.seconds, 2),
            "message": result.message[-400:], "total_bytes": total, **info, **fields}


def _fits(record: dict[str, Any]) -> bool:
    """Whether the program fits its target: compiled, and its buffers within the card's memory."""
    if record["status"] != "ok":
        if "memory" in record["message"].lower() or "resource_exhausted" in record["message"].lower():
            return False
        raise RuntimeError(f"{record['name']} on {record['target']}: {record['status']}: {record['message']}")
    return record["total_bytes"] <= CAPACITY[record["target"]]


def _predicted_length(records: Sequence[dict[str, Any]], capacity: int) -> int:
    """The T at which a least-squares quadratic through the (T, total bytes) points reaches ``capacity``."""
    import numpy as np

    ts = np.array([r["length"] for r in records], float)
    totals = np.array([r["total_bytes"] for r in records], float)
    a, b, c = np.polyfit(ts, totals, 2)
    if a <= 1e-6 * b / ts[-1]:  # linear: solve b T + c = capacity
        return int((capacity - c) / b)
    return int((-b + np.sqrt(b * b - 4 * a * (c - capacity))) / (2 * a))


def longest_length(target: str, kind: str, out: list[dict[str, Any]]) -> dict[str, Any]:
    """The longest multiple of ``GRANULE`` whose B=1 step fits ``target``, by bisection on compiles."""
    cache: dict[int, bool] = {}

    def fits(length: int) -> bool:
        if length not in cache:
            name = attention_step_name(kind, length, batch=1)
            record = _record(target, _compile(target, [name])[name], kind=kind, length=length, batch=1)
            out.append(record)
            cache[length] = _fits(record)
            log(f"{target} {kind} T={length}: {'fits' if cache[length] else 'does not fit'}")
        return cache[length]

    probes = [r for r in out if r["kind"] == kind and r["batch"] == 1 and r["status"] == "ok"]
    guess = max(GRANULE, _predicted_length(probes, CAPACITY[target]) // GRANULE * GRANULE)
    low, high = max(GRANULE, int(guess * 0.9) // GRANULE * GRANULE), int(guess * 1.1) // GRANULE * GRANULE + GRANULE
    while not fits(low):
        high, low = low, max(GRANULE, low // 2 // GRANULE * GRANULE)
        if high == GRANULE:
            return {"target": target, "kind": kind, "longest_length": 0}
    while fits(high):
        low, high = high, high * 2
    while high - low > GRANULE:
        middle = (low + high) // 2 // GRANULE * GRANULE
        low, high = (middle, high) if fits(middle) else (low, middle)
    return {"target": target, "kind": kind, "longest_length": low, "first_too_long": high}


def measure_target(target: str) -> dict[str, Any]:
    """Every record of one target: the steps at B=4, the B=1 probes and bisections, the transformers."""
    records: list[dict[str, Any]] = []
    names = {attention_step_name(k, t, b): (k, t, b) for k in kinds(target) for t in LENGTHS for b in (4, 1)}
    for name, result in _compile(target, list(names)).items():
        kind, length, batch = names[name]
        records.append(_record(target, result, kind=kind, length=length, batch=batch))
    fits = [longest_length(target, kind, records) for kind in kinds(target)
            if sum(r["status"] == "ok" for r in records if r["kind"] == kind and r["batch"] == 1) >= 3]
    models = {cfg.name: cfg for cfg in TRANSFORMERS}
    transformers = [_record(target, result, dropout=models[name].dropout, attention=models[name].attention)
                    for name, result in _compile(target, list(models)).items()]
    return {"steps": records, "fits": fits, "transformers": transformers}


def redo(result: dict[str, Any], target: str, implementation: str) -> None:
    """Recomputes, in ``result``, ``target``'s records of jdrop's ``implementation`` (after a kernel change): its
    attention steps, its longest T and its transformer steps; everything else is kept."""
    kind, found = f"jdrop-{implementation}", result["targets"][target]
    names = {attention_step_name(kind, t, b): (t, b) for t in LENGTHS for b in (4, 1)}
    steps = [_record(target, r, kind=kind, length=names[n][0], batch=names[n][1])
             for n, r in _compile(target, list(names)).items()]
    fit = longest_length(target, kind, steps)
    models = {cfg.name: cfg for cfg in TRANSFORMERS if cfg.attention == implementation}
    redone = [_record(target, r, dropout=models[n].dropout, attention=implementation)
              for n, r in _compile(target, list(models)).items()]
    found["steps"] = [r for r in found["steps"] if r["kind"] != kind] + steps
    found["fits"] = [f for f in found["fits"] if f["kind"] != kind] + [fit]
    found["transformers"] = [r for r in found["transformers"] if r["attention"] != implementation] + redone
    result.setdefault("redone", []).append({"target": target, "implementation": implementation,
                                            "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())})


def measure() -> dict[str, Any]:
    """Both targets, side by side (one watched worker each)."""
    missing = [t for t in TARGETS if python_for(t) is None]
    if missing:
        raise SystemExit(f"set JDROP_GPU_PYTHON and JDROP_TPU_PYTHON (missing for {missing}): `make "
                         "test-accelerators` builds them under build/accelerator-envs/")
    start, results = time.monotonic(), {}

    def run(target: str) -> None:
        results[target] = measure_target(target)

    threads = [threading.Thread(target=run, args=(t,)) for t in TARGETS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"machine": machine_description(), "seconds": round(time.monotonic() - start, 1), "targets": results}


def _temp_mib(record: dict[str, Any] | None) -> float | None:
    return None if record is None or record["status"] != "ok" else record["temp_size_in_bytes"] / MiB


def table(result: dict[str, Any]) -> str:
    """Three Markdown tables: the attention steps, the longest T that fits, the transformer steps (``-``: the
    compiler refused the program; the JSON has its message)."""
    steps, fits, models = [], [], []
    for target, found in result["targets"].items():
        by = {(r["kind"], r["length"]): r for r in found["steps"] if r["batch"] == 4}
        flax = _temp_mib(by.get(("flax-dropout", 8192)))
        for kind in kinds(target):
            temps = [_temp_mib(by.get((kind, t))) for t in LENGTHS]
            ours = _temp_mib(by.get((kind, 8192)))
            steps.append([target, kind, *temps, None if ours is None or not flax else ours / flax])
        fits += [[target, f["kind"], f["longest_length"], CAPACITY[target] / GiB] for f in found["fits"]]
        temp = {(r["dropout"], r["attention"]): _temp_mib(r) for r in found["transformers"]}
        for dropout, attention in [("none", "flax"), ("flax", "flax"), ("none", "xla"), ("jdrop", "xla"),
                                   ("none", "pallas"), ("jdrop", "pallas")]:
            ours, none = temp.get((dropout, attention)), temp.get(("none", attention))
            ratio = None if ours is None or not none else ours / none
            models.append([target, f"{dropout} dropout, {attention} attention", ours, ratio])
    return "\n\n".join([
        markdown_table(["target", "attention step (B=4, H=8, D=128, bf16)", *(f"MiB at T={t}" for t in LENGTHS),
                        "vs flax at 8192"], steps),
        markdown_table(["target", "attention step (B=1)", "longest T that fits", "card GiB"], fits),
        markdown_table(["target", "transformer step (12 x 1024, T=4096, bf16)", "temp MiB", "vs no dropout"],
                       models),
    ])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accelerator_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "accelerator-memory.json")
    parser.add_argument("--table", action="store_true", help="only print the tables of an earlier --out")
    parser.add_argument("--redo", metavar="TARGET:IMPLEMENTATION", action="append", default=[],
                        help="recompute one target's records of one jdrop implementation in --out (e.g. v5e:pallas)")
    args = parser.parse_args(argv)
    if args.table or args.redo:
        result = json.loads(args.out.read_text())
        for item in args.redo:
            redo(result, *item.split(":"))
            args.out.write_text(json.dumps(result, indent=1))
        print(table(result))
        return
    result = measure()
    args.out.write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
