"""``value_and_grad`` of dropout on 4096x4096 as AVX-512 and AVX2 code, side by side, with the loops they compile to.

``python -m benchmarks.vag_isa`` times ``jit(value_and_grad(lambda x: vdot(dropout(key, x), c)))`` (the op
benchmark's ``vag``, rate 0.5) and the forward pass for ``jdrop.dropout`` (each residual policy),
``flax.linen.Dropout`` and a copy (``x * 2``), in worker processes that alternate between two code-generation
modes of this machine: its own (AVX-512 where the CPU has it) and ``--xla_cpu_max_isa=AVX2`` (the code an AVX2
machine gets). Each worker times its candidates round-robin; the modes alternate ``--repeats`` times, so a slow
minute of a shared machine falls on both. Reported per mode: the median wall time and process CPU time (all of
XLA's threads) per call, and each candidate's speed-up over flax.linen in that mode.

It also dumps the compiled program of each mode (``--xla_dump_to``) and counts, with ``objdump``, the instructions of
jdrop's kernels (:data:`KERNELS`) and of their vector loops (the unrolled threefry: 20 rounds of add, rotate, xor
per element): the deterministic part of the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import ROOT, log, machine_description, markdown_table, round_robin

SHAPE = (4096, 4096)
RATE = 0.5
MODES = {"native": "", "AVX2": "--xla_cpu_max_isa=AVX2"}
CANDIDATES = ("jdrop[key]", "jdrop[bits]", "jdrop[mask]", "flax.linen", "copy")
BASELINE = "flax.linen"


def _dropout(name: str) -> Any:
    import flax.linen as nn

    import jdrop

    if name.startswith("jdrop["):
        policy = name[len("jdrop["):-1]
        return lambda key, x: jdrop.dropout(key, x, RATE, residual=policy)
    if name == "flax.linen":
        module = nn.Dropout(RATE, deterministic=False)
        return lambda key, x: module.apply({}, x, rngs={"dropout": key})
    return lambda key, x: x * 2.0


def _programs(name: str) -> dict[str, tuple[Any, tuple[Any, ...]]]:
    import jax
    import jax.numpy as jnp

    fn = _dropout(name)
    x = jax.random.normal(jax.random.key(1), SHAPE, jnp.float32)
    c = jax.random.normal(jax.random.key(2), SHAPE, jnp.float32)
    key = jax.random.key(0)
    vag = jax.jit(jax.value_and_grad(lambda x, c, key: jnp.vdot(fn(key, x), c)))
    return {"vag": (vag, (x, c, key)), "fwd": (jax.jit(fn), (key, x))}


def worker(rounds: int) -> dict[str, Any]:
    """Every candidate and mode of this process's code, timed round-robin: wall and CPU ms per call."""
    import jax

    runners = {}
    cpu_ms: dict[str, list[float]] = {}
    for name in CANDIDATES:
        for mode, (program, args) in _programs(name).items():
            jax.block_until_ready(program(*args))  # compile and warm up
            cpu = cpu_ms.setdefault(f"{name} {mode}", [])

            def run(program: Any = program, args: tuple[Any, ...] = args, cpu: list[float] = cpu) -> float:
                wall, start = time.perf_counter(), time.process_time()
                jax.block_until_ready(program(*args))
                cpu.append(1e3 * (time.process_time() - start))
                return time.perf_counter() - wall

            runners[f"{name} {mode}"] = run
    wall = round_robin(runners, rounds)
    return {name: {"wall_ms": [1e3 * t for t in wall[name]], "cpu_ms": cpu_ms[name]} for name in runners}


KERNELS = {"forward (fused)": "broadcast_select_fusion", "backward draw (staged)": "compare_convert_fusion",
           "backward apply": "multiply_select_fusion"}
"""jdrop's vag kernels by XLA's fusion names: the forward pass draws the mask inside ``x * factor``; on CPU the
backward pass draws it in a kernel of its own (bytes out) and applies it in another."""


def _loop(text: str) -> dict[str, Any]:
    """Instructions of one object file's ``objdump``, in all and in its longest loop (a backward jump's span)."""
    lines = [line for line in text.splitlines() if re.match(r"^\s+[0-9a-f]+:\s", line)]
    address = [int(line.split(":")[0], 16) for line in lines]
    ops = [line.split(":", 1)[1].split()[0] for line in lines]
    loop: list[str] = []
    for index, line in enumerate(lines):
        jump = re.search(r"\bj[a-z]+\s+([0-9a-f]+)\s<", line)
        if jump and int(jump.group(1), 16) < address[index]:
            start = address.index(int(jump.group(1), 16))
            if index - start > len(loop):
                loop = ops[start:index + 1]
    counts: dict[str, int] = {}
    for op in loop:
        counts[op] = counts.get(op, 0) + 1
    vector_bits = 512 if any("zmm" in line for line in lines) else 256 if any("ymm" in line for line in lines) else 128
    return {"kernel": len(lines), "loop": len(loop), "vector_bits": vector_bits,
            "loop_ops": dict(sorted(counts.items(), key=lambda item: -item[1])[:6])}


def kernel_instructions(mode: str) -> dict[str, Any]:
    """Instructions of jdrop's vag kernels (:data:`KERNELS`) as ``mode`` compiles them; ``{}`` without objdump."""
    if shutil.which("objdump") is None:
        return {}
    found = {}
    with tempfile.TemporaryDirectory() as dump:
        flags = f"{os.environ.get('XLA_FLAGS', '')} {MODES[mode]} --xla_dump_to={dump} --xla_dump_emitter_re=.*"
        code = ("import jax, jax.numpy as jnp, jdrop\n"
                f"x = jnp.ones({SHAPE}); key = jax.random.key(0)\n"
                f"f = jax.jit(jax.value_and_grad(lambda x, c: jnp.vdot(jdrop.dropout(key, x, {RATE}), c)))\n"
                "jax.block_until_ready(f(x, x))\n")
        env = dict(os.environ, XLA_FLAGS=flags.strip(), PYTHONPATH=str(ROOT))
        subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
        for label, fusion in KERNELS.items():
            objects = sorted(Path(dump).glob(f"*.{fusion}_kernel_module.o"))
            if objects:
                found[label] = _loop(subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(objects[0])],
                                                    capture_output=True, text=True, check=True).stdout)
    return found


def run(repeats: int, rounds: int) -> dict[str, Any]:
    """Alternates the modes' workers ``repeats`` times; the instruction counts once per mode."""
    results: dict[str, dict[str, dict[str, list[float]]]] = {mode: {} for mode in MODES}
    for repeat in range(repeats):
        for mode, flags in (MODES.items() if repeat % 2 == 0 else reversed(MODES.items())):
            log(f"[vag_isa] repeat {repeat + 1}/{repeats}: {mode}")
            env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
            done = subprocess.run([sys.executable, "-m", "benchmarks.vag_isa", "--worker", "--rounds", str(rounds)],
                                  env=env, cwd=ROOT, capture_output=True, text=True, check=True)
            for name, samples in json.loads(done.stdout.strip().splitlines()[-1]).items():
                merged = results[mode].setdefault(name, {"wall_ms": [], "cpu_ms": []})
                for clock in merged:
                    merged[clock].extend(samples[clock])
    return {"times": results, "instructions": {mode: kernel_instructions(mode) for mode in MODES}}


def table(result: dict[str, Any]) -> str:
    """Median wall / CPU ms per call and the speed-up over flax.linen (wall, CPU), per mode and candidate."""
    rows = []
    for mode, times in result["times"].items():
        for name in CANDIDATES:
            for program in ("vag", "fwd"):
                entry = times[f"{name} {program}"]
                base = times[f"{BASELINE} {program}"]
                wall, cpu = statistics.median(entry["wall_ms"]), statistics.median(entry["cpu_ms"])
                rows.append((mode, program, name, wall, cpu, statistics.median(base["wall_ms"]) / wall,
                             statistics.median(base["cpu_ms"]) / cpu, len(entry["wall_ms"])))
    rows.sort(key=lambda r: (r[1] != "vag", r[0], CANDIDATES.index(r[2])))
    headers = ("mode", "program", "implementation", "wall ms", "CPU ms", "vs flax (wall)", "vs flax (CPU)", "runs")
    lines = [markdown_table(headers, rows), ""]
    for mode, kernels in result["instructions"].items():
        for label, counts in kernels.items():
            lines.append(f"- {mode}, {label}: {counts['kernel']} instructions, loop {counts['loop']} "
                         f"({counts['vector_bits']}-bit registers): {counts['loop_ops']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.vag_isa [--repeats N] [--rounds R] [--json PATH]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4, help="workers per mode, alternating (default 4)")
    parser.add_argument("--rounds", type=int, default=10, help="round-robin rounds per worker (default 10)")
    parser.add_argument("--json", help="write the machine description and the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.rounds)))
        return
    result = run(args.repeats, args.rounds)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_description(), **result}, f, indent=1)


if __name__ == "__main__":
    main()
