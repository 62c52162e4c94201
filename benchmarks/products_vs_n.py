"""Jacobian-vector products per path solve against the state size n, cell by cell.

    python benchmarks/products_vs_n.py [--seeds 210 211] [--budget 1000]
        [--out benchmarks/results/products_vs_n]

The size sweep (``sweep.py``) reports products per Krylov solve only on the cells where
Broyden's method stalls and paths run, and those differ from width to width, so its
per-width medians compare different cells. Here every cell tracks the path from the start
(``homo_newton_iters=0``, ``homo_warmup=0``: no Broyden phase, no warm-up) with the
default secant model and GMRES, so that each (‖W‖₂, bias) cell is measured at every width
n ∈ {128, 512, 2048} on the same kind of solve:

    tanh(W z + x), W Gaussian scaled to ‖W‖₂ ∈ {3, 4.5, 6, 8}, x ~ bias · N(0, 1),
    bias ∈ {0.1, 1}, batch 8, float32, z0 = 0, budget ``--budget`` evaluations.

Per cell and width: the mean products per GMRES solve over the solve
(``info['krylov_products'] / info['krylov_solves']``), then the median over seeds; and
per cell the ratio of the 2,048-wide figure to the 128-wide one. About 3 minutes on 2 CPU
cores. Writes ``products_vs_n.{json,md}`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from sweep import tanh_cell
from torchdeq.solver import get_solver

import torchdeq_homotopy  # noqa: F401  (registers the solvers)

WIDTHS = (128, 512, 2048)
GAINS = (3.0, 4.5, 6.0, 8.0)
BIASES = (0.1, 1.0)
PATH_ONLY = {"homo_newton_iters": 0, "homo_warmup": 0}


def products_per_solve(n: int, gain: float, bias: float, seed: int, budget: int) -> dict:
    """One path-only solve of a tanh cell: its mean products per GMRES solve."""
    f, x0 = tanh_cell(n, gain, bias, seed)
    start = time.perf_counter()
    with torch.no_grad():
        _, _, info = get_solver("homotopy")(f, x0, max_iter=budget, tol=1e-5, stop_mode="rel",
                                            **PATH_ONLY)
    solves, products = info["krylov_solves"], info["krylov_products"]
    return dict(n=n, gain=gain, bias=bias, seed=seed, solves=solves, products=products,
                per_solve=products / solves if solves else None,
                lam=float(info["lam"].mean()), wall_s=time.perf_counter() - start)


def table(rows: list[dict]) -> str:
    """Median over seeds per (cell, width), and the 2,048 / 128 ratio per cell."""
    lines = ["| ‖W‖₂ | bias | " + " | ".join(f"n = {n}" for n in WIDTHS)
             + f" | n = {WIDTHS[-1]} / n = {WIDTHS[0]} |",
             "|---|---|" + "---|" * (len(WIDTHS) + 1)]
    ratios = []
    for gain in GAINS:
        for bias in BIASES:
            med = {}
            for n in WIDTHS:
                values = [r["per_solve"] for r in rows if (r["n"], r["gain"], r["bias"])
                          == (n, gain, bias) and r["per_solve"] is not None]
                med[n] = statistics.median(values) if values else None
            ratio = (med[WIDTHS[-1]] / med[WIDTHS[0]]
                     if med[WIDTHS[-1]] and med[WIDTHS[0]] else None)
            if ratio is not None:
                ratios.append(ratio)
            cells = " | ".join("—" if med[n] is None else f"{med[n]:.1f}" for n in WIDTHS)
            lines.append(f"| {gain:g} | {bias:g} | {cells} | "
                         + ("—" if ratio is None else f"{ratio:.2f}×") + " |")
    overall = {n: statistics.median([r["per_solve"] for r in rows
                                     if r["n"] == n and r["per_solve"] is not None])
               for n in WIDTHS}
    lines.append("")
    lines.append("Median over every cell and seed: " + ", ".join(
        f"n = {n}: {v:.1f}" for n, v in overall.items())
        + (f"; per-cell ratio n = {WIDTHS[-1]} / n = {WIDTHS[0]} from {min(ratios):.2f}× to "
           f"{max(ratios):.2f}× (median {statistics.median(ratios):.2f}×)." if ratios else "."))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[210, 211])
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/products_vs_n"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for gain in GAINS:
        for bias in BIASES:
            for n in WIDTHS:
                for seed in args.seeds:
                    row = products_per_solve(n, gain, bias, seed, args.budget)
                    rows.append(row)
                    per = "—" if row["per_solve"] is None else f"{row['per_solve']:.1f}"
                    print(f"‖W‖₂ {gain:g} bias {bias:g} n {n} seed {seed}: {row['solves']} "
                          f"solves, {per} products each, mean λ {row['lam']:.3f}, "
                          f"{row['wall_s']:.1f} s", flush=True)
    (args.out / "products_vs_n.json").write_text(json.dumps(rows))
    text = (f"Path-only solves (budget {args.budget}, seeds {', '.join(map(str, args.seeds))}): "
            "mean Jacobian-vector products per GMRES solve, median over seeds.\n\n"
            + table(rows))
    (args.out / "products_vs_n.md").write_text(text + "\n")
    print(text)
    print(f"wrote {args.out}/products_vs_n.{{json,md}}")


if __name__ == "__main__":
    main()
