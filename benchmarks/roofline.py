"""What each attention dropout mask should cost on an H100 and a TPU v5e / v6e: a roofline from counted ops.

``python -m benchmarks.roofline [--depth 128] [--kernels] [--out PATH]`` prints, per target and ``dropout_mask``
mode, the estimated time of one attention training step (forward, dK/dV and dQ kernels) per attention weight, and
its ratio to the step without dropout, from:

- the products: ``4 D`` flops per weight forward (``Q K^T``, ``P V``), ``8 D`` in jdrop's dK/dV kernel (``Q K^T``,
  ``dO V^T``, ``dV += P~^T dO``, ``dK += dS^T Q``) and ``6 D`` in its dQ kernel (``Q K^T``, ``dO V^T``,
  ``dQ += dS K``): ``18 D`` per weight (a fused FlashAttention-2 backward needs ``10 D``; jdrop recomputes ``S``
  and ``dP`` in both backward kernels), at the target's published dense bf16 matrix rate;
- the mask: its integer ops per weight (:func:`benchmarks.attention_mask.ops_per_element`, the jaxpr count at the
  target's default tile; ``--kernels`` adds the count from the kernels' own Triton / Mosaic IR) plus the select of
  the factor, drawn three times (forward, dK/dV, dQ), at the target's 32-bit integer vector rate.

Two bounds per mode: ``serial`` (mask after products, no overlap: ``t = t_mm + t_mask``) and ``overlapped`` (the
integer units run beside the matrix units: ``t = max(t_mm, t_mask)``). Real kernels sit between, and also spend
vector time on the softmax (exp on the H100's MUFU, 16 per SM per clock) that both dropout and no dropout pay:
that is left out, so the ratios are of the mask's cost against the products alone.

The rates and their sources are in :data:`TARGETS`; the TPU's vector rate is not published and is an estimate
(lanes x ALU slots x clock), stated as such. The ``cost_estimate`` column is what the kernels' ``pl.CostEstimate``
reports per weight and step (flops, with the mask's integer ops counted as flops, as XLA's cost analysis counts
them), from :func:`cost_estimate_per_weight`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import markdown_table

MODES = ("none", "exact", "fast16", "fast8", "hash8")
PRODUCT_FLOPS = {"forward": 4, "dkv": 8, "dq": 6}
"""Matrix flops per weight and head dim in each of jdrop's kernels (``18 D`` per training step)."""
SOFTMAX_OPS = {"forward": 3, "dkv": 5, "dq": 5}
"""Float ops per logit besides the products, as the kernels' cost estimate counts them (forward max, subtract,
sum; backward ``S - max - log_sum`` (2), ``P~ dP~``, ``P delta``, their difference)."""
THREEFRY_OPS = 117
"""uint32 ops of one threefry-2x32 call: 2 key additions, 5 blocks of 4 rounds (add, rotate = 2 shifts and an or,
xor) and a key injection (3 additions)."""

TARGETS: dict[str, dict[str, Any]] = {
    "H100 SXM": {
        "matrix": 989.4e12,
        "integer": 132 * 64 * 1.98e9,
        "tile": (64, 64),
        "platform": "cuda",
        "sources": "bf16 dense tensor: 989.4 TFLOPS (NVIDIA H100 Tensor Core GPU datasheet, SXM5; 1979 with "
                   "sparsity). 32-bit integer: 132 SMs x 64 results/clock/SM (CUDA C++ Programming Guide, "
                   "'Arithmetic Instructions' throughput table, compute capability 9.0: integer add, multiply(-add), "
                   "shift, compare, logical ops) x 1.98 GHz boost (NVIDIA H100 whitepaper, SXM5; 67 TFLOPS FP32 = "
                   "132 x 128 x 2 x 1.98e9) = 16.7 T ops/s",
    },
    "TPU v5e": {
        "matrix": 197e12,
        "integer": 1024 * 4 * 1.5e9,
        "tile": (128, 128),
        "platform": "tpu",
        "sources": "bf16: 197 TFLOPS, int8 393 TOPS (Google Cloud TPU docs, 'TPU v5e', docs.cloud.google.com/tpu/"
                   "docs/v5e). Vector unit: not published; estimated as one (8, 128) = 1024-lane op per ALU slot "
                   "and clock, 4 slots (an assumption), at 1.5 GHz (197e12 / (4 MXUs x 128 x 128 x 2)) = 6.1 T "
                   "ops/s",
    },
    "TPU v6e": {
        "matrix": 918e12,
        "integer": 1024 * 4 * 1.75e9,
        "tile": (128, 128),
        "platform": "tpu",
        "sources": "bf16: 918 TFLOPS, int8 1836 TOPS (Google Cloud TPU docs, 'TPU v6e', docs.cloud.google.com/tpu/"
                   "docs/v6e). Vector unit: not published; estimated as 1024 lanes x 4 slots (assumption) x "
                   "1.75 GHz (918e12 / (4 MXUs x 256 x 256 x 2)) = 7.2 T ops/s",
    },
}


def mask_ops(mode: str, tile: tuple[int, int], kernels: str | None = None) -> float:
    """Integer ops per weight of one draw of the mask at ``tile`` (0 for ``"none"``); from the kernel IR if asked."""
    if mode == "none":
        return 0.0
    from benchmarks import attention_mask

    if kernels is not None:
        return float(attention_mask.kernel_ops_per_element(kernels, mode)["integer_ops_per_element"])
    return float(attention_mask.ops_per_element(mode, tile)["integer_ops_per_element"])


def cost_estimate_per_weight(mode: str, depth: int, block_k: int) -> float:
    """Flops per weight and training step the kernels' ``pl.CostEstimate`` reports (no bias, mask or causal flag).

    Per kernel: ``PRODUCT_FLOPS * D + SOFTMAX_OPS``, and with dropout 1 (the factor's multiply) plus the mask's
    integer ops: per threefry call ``THREEFRY_OPS + 2`` (its counter) and per weight 4 (exact: xor of the words,
    shift, compare, select) or 5 (fast: word select, shift, and, compare, select); hash8 draws one call per group
    of 4 rows and tile (``1 / (4 block_k)`` per weight, plus its 3 counter and multiplier ops), 4 ops per word
    (``1`` per weight) and 3 per weight (multiply, compare, select).
    """
    per_kernel = {name: PRODUCT_FLOPS[name] * depth + SOFTMAX_OPS[name] for name in PRODUCT_FLOPS}
    total = float(sum(per_kernel.values()))
    if mode == "none":
        return total
    if mode == "hash8":
        mask = (THREEFRY_OPS + 3) / (4 * block_k) + 1 + 3
    else:
        group = {"exact": 1, "fast16": 4, "fast8": 8}[mode]
        mask = (THREEFRY_OPS + 2) / group + (4 if mode == "exact" else 5)
    return total + len(PRODUCT_FLOPS) * (1 + mask)


def estimate(depth: int, kernels: bool) -> list[dict[str, Any]]:
    """One row per target and mode: times per weight (ps) and ratios to no dropout, both bounds."""
    rows = []
    for target, spec in TARGETS.items():
        matrix_s = sum(PRODUCT_FLOPS.values()) * depth / spec["matrix"]
        for mode in MODES:
            ops = mask_ops(mode, spec["tile"], spec["platform"] if kernels else None)
            per_step = 0.0 if mode == "none" else len(PRODUCT_FLOPS) * (ops + 1)  # + the factor's select, per pass
            mask_s = per_step / spec["integer"]
            rows.append({
                "target": target, "mode": mode, "tile": list(spec["tile"]), "depth": depth,
                "mask_ops_per_draw": ops, "mask_ops_per_step": per_step,
                "matrix_ps": 1e12 * matrix_s, "mask_ps": 1e12 * mask_s,
                "serial_vs_none": (matrix_s + mask_s) / matrix_s,
                "overlapped_vs_none": max(matrix_s, mask_s) / matrix_s,
                "cost_estimate_flops_per_weight": cost_estimate_per_weight(mode, depth, spec["tile"][1]),
            })
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    return markdown_table(
        ("target", "mask", "int ops / weight / draw", "products ps", "mask ps", "step vs none (serial)",
         "step vs none (overlapped)", "cost_estimate flops / weight"),
        [(r["target"], r["mode"], r["mask_ops_per_draw"], r["matrix_ps"], r["mask_ps"], r["serial_vs_none"],
          r["overlapped_vs_none"], r["cost_estimate_flops_per_weight"]) for r in rows])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=128, help="head dim D")
    parser.add_argument("--kernels", action="store_true", help="mask ops from the kernels' own IR (slower)")
    parser.add_argument("--out", type=Path, help="JSON path")
    args = parser.parse_args(argv)
    rows = estimate(args.depth, args.kernels)
    print(f"## Attention training step per weight, D={args.depth}, by counted ops and published peak rates\n")
    print(table(rows))
    print("\nRates and sources:\n")
    for target, spec in TARGETS.items():
        print(f"- {target}: matrix {spec['matrix'] / 1e12:.1f} T flops/s, 32-bit integer {spec['integer'] / 1e12:.1f} "
              f"T ops/s. {spec['sources']}.")
    if args.out is not None:
        args.out.write_text(json.dumps({"depth": args.depth, "targets": TARGETS, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
