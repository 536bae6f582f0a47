"""``python -m benchmarks``: runs the benchmark suites, one worker process per framework.

Examples::

    PYTHONPATH=. python -m benchmarks                      # everything (13 minutes on a busy 2-core machine)
    PYTHONPATH=. python -m benchmarks --quick              # small sizes, a smoke test
    PYTHONPATH=. python -m benchmarks --only ops --json out/ops.json
    PYTHONPATH=. python -m benchmarks --only memory --framework jdrop --framework none
    PYTHONPATH=. python -m benchmarks --only attention        # attention with dropout, ~15 minutes
    PYTHONPATH=. python -m benchmarks --only transformer      # a transformer with flax's / jdrop's dropout
    PYTHONPATH=. python -m benchmarks --only sequence_parallel   # ring attention on 1, 2, 4, 8 simulated devices

The tables (Markdown) go to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import attention, memory, models, ops, sequence_parallel, step, transformer
from benchmarks._common import log, machine_description, run_worker

SUITES = {
    "ops": (ops, ops.FRAMEWORKS),
    "memory": (memory, models.FRAMEWORKS),
    "step": (step, (step.ALL,)),
    "attention": (attention, attention.FRAMEWORKS),
    "transformer": (transformer, transformer.FRAMEWORKS),
    "sequence_parallel": (sequence_parallel, sequence_parallel.FRAMEWORKS),
}
"""Each suite: its module (``measure``, ``summarize``, ``table``, ``title``) and its worker frameworks."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few runs (a smoke test)")
    parser.add_argument("--only", action="append", choices=tuple(SUITES), help="run only this suite (repeatable)")
    parser.add_argument(
        "--framework",
        action="append",
        choices=tuple(dict.fromkeys((*ops.FRAMEWORKS, *models.FRAMEWORKS, *transformer.FRAMEWORKS))),
        help="run only this framework's workers (repeatable)",
    )
    parser.add_argument("--json", type=Path, help="write the machine description and all results here")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per worker (default 900)")
    return parser.parse_args(argv)


def run_suite(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Runs one suite's workers, one per framework; returns its records, summary and table."""
    module, frameworks = SUITES[name]
    options = ["--quick"] if args.quick else []
    records: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for framework in frameworks:
        worker_options = options
        if framework == step.ALL:  # one worker times the chosen frameworks round-robin
            chosen = [f for f in models.FRAMEWORKS if not args.framework or f in args.framework]
            if not chosen:
                continue
            worker_options = [*options, *(option for f in chosen for option in ("--framework", f))]
        elif args.framework and framework not in args.framework:
            continue
        log(f"[{name}] {framework}")
        timeout_s = max(args.timeout, getattr(module, "MIN_TIMEOUT_S", 0.0))
        result = run_worker(name, framework, worker_options, timeout_s=timeout_s)
        if "error" in result:
            log(f"[{name}] {framework} failed: {result['error']}")
            errors.append(result)
        records.extend(result.get("records", []))
    summary = module.summarize(records)
    return {
        "title": module.title(args.quick),
        "records": records,
        "summary": summary,
        "errors": errors,
        "table": module.table(summary),
    }


def machine_lines(machine: dict[str, Any]) -> list[str]:
    """A short human description of the machine and versions."""
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    return [
        f"Machine: {machine['cpu_model']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"JAX backend {machine['jax_backend']} ({', '.join(machine['jax_devices'])})",
        f"Versions: Python {machine['python']}, {versions}",
        f"Load average at start: {', '.join(f'{v:.2f}' for v in machine['load_average'] or ())}",
    ]


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the chosen suites, prints their tables and writes the JSON report."""
    args = parse_args(argv)
    machine = machine_description()
    suites = args.only or list(SUITES)
    start = time.perf_counter()
    results = {name: run_suite(name, args) for name in suites}
    elapsed = time.perf_counter() - start
    print("\n".join(machine_lines(machine)))
    print(f"Command: python -m benchmarks {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"Total time: {elapsed:.0f} s")
    for result in results.values():
        print(f"\n## {result['title']}\n")
        print(result["table"])
        for error in result["errors"]:
            print(f"\n{error['framework']}: {error['error']}")
    if args.json is not None:
        report = {
            "machine": machine,
            "argv": list(argv if argv is not None else sys.argv[1:]),
            "quick": args.quick,
            "elapsed_s": elapsed,
            "suites": {name: {k: v for k, v in r.items() if k != "table"} for name, r in results.items()},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
