"""Budgets of a few calls of f (``max_iter`` 4–20): what each solver returns, and its cost.

    python benchmarks/few_calls.py [--seeds 600 601] [--budgets 4 6 8 12 20]
        [--out benchmarks/results/few_calls.md]

Warm-started DEQs (optical flow, implicit neural representations, the solve after a small
weight update) run their solver for a handful of calls. Cells: tanh(W z + x),
``benchmarks/sweep.py``'s ``tanh_cell``, 32 and 256 wide, batch 32, ‖W‖₂ 0.5 / 0.9 / 1.5 /
3, bias 0.1 and 1, start z = 0, float32, abs. tol 1e-3, each seed of ``--seeds``. Every
solver makes ``max_iter`` evaluations of f (TorchDEQ's ``broyden`` gets ``max_iter`` − 1,
since it evaluates once more). Per ‖W‖₂ and budget, over the seeds, both widths and both
biases:

* *returned*: mean log10 of ||f(z) − z|| at the state z the solver returns, recomputed;
* *reported*: mean log10 of the solver's own ``abs_lowest``. TorchDEQ's
  ``fixed_point_iter`` and ``anderson`` return f at their best iterate, one fixed-point
  step past the iterate whose residual they report; ``broyden`` and this plugin's solvers
  return the best evaluated iterate, whose residual they report;
* *met*: samples whose returned state meets the tolerance (of 32 × 4 per seed);
* wall seconds for all of the ‖W‖₂ row's solves.

About 30 s per seed on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torchdeq.solver import get_solver

import torchdeq_homotopy  # noqa: F401  (registers 'homotopy')

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import tanh_cell

SOLVERS = ("fixed_point_iter", "anderson", "broyden", "homotopy")
GAINS = (0.5, 0.9, 1.5, 3.0)
WIDTHS, BIASES, BATCH, TOL = (32, 256), (0.1, 1.0), 32, 1e-3


def solve(solver: str, f, x0: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                   float]:
    """(recomputed residual of the returned state, the reported lowest, wall seconds)."""
    max_iter = budget - 1 if solver == "broyden" else budget
    start = time.perf_counter()
    with torch.no_grad():
        z, _, info = get_solver(solver)(f, x0, max_iter=max_iter, tol=TOL, stop_mode="abs")
    wall = time.perf_counter() - start
    return (f(z) - z).flatten(1).norm(dim=1), info["abs_lowest"], wall


def log10_mean(r: torch.Tensor) -> float:
    return float(torch.log10(r.clamp_min(1e-30)).mean())


def run(seeds: list[int], budgets: list[int]) -> list[dict]:
    rows = []
    for gain in GAINS:
        for budget in budgets:
            for solver in SOLVERS:
                returned, reported, met, wall, count = 0.0, 0.0, 0, 0.0, 0
                for seed in seeds:
                    for n in WIDTHS:
                        for bias in BIASES:
                            f, x0 = tanh_cell(n, gain, bias, seed, bsz=BATCH)
                            r, lowest, w = solve(solver, f, x0, budget)
                            returned += log10_mean(r)
                            reported += log10_mean(lowest)
                            met += int((r <= TOL).sum())
                            wall += w
                            count += 1
                rows.append(dict(gain=gain, budget=budget, solver=solver,
                                 returned=returned / count, reported=reported / count,
                                 met=met, samples=count * BATCH, wall_s=wall))
            print(f"‖W‖₂ {gain} budget {budget}: " + ", ".join(
                f"{r['solver']} {r['returned']:.2f} ({r['reported']:.2f}) met {r['met']} "
                f"{r['wall_s']:.2f}s" for r in rows[-len(SOLVERS):]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = "| ‖W‖₂ | budget | " + " | ".join(SOLVERS) + " |"
    lines = [head, "|" + "---|" * (2 + len(SOLVERS))]
    by_cell: dict[tuple, list[dict]] = {}
    for r in rows:
        by_cell.setdefault((r["gain"], r["budget"]), []).append(r)
    for (gain, budget), cell in by_cell.items():
        cells = [f"{r['returned']:.2f} ({r['reported']:.2f}), {r['met']}, {r['wall_s']:.2f} s"
                 for r in cell]
        lines.append(f"| {gain} | {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[600, 601])
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 6, 8, 12, 20])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/few_calls.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = run(args.seeds, args.budgets)
    samples = rows[0]["samples"]
    text = (f"Command: `python benchmarks/few_calls.py {' '.join(sys.argv[1:])}`\n\n"
            f"Each cell: returned (reported) mean log10 abs. residual, samples of {samples} "
            f"whose returned state meets tol {TOL:g}, wall seconds.\n\n{table(rows)}\n")
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
