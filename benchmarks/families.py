"""Cell families the solver was never tuned on: Broyden against homotopy, sample by sample.

    python benchmarks/families.py [--seeds 300 301] [--budget 1000]

Cells (batch 16, float32, start z = 0, stop mode 'rel', tolerance 1e-5), W Gaussian scaled
to ‖W‖₂ = gain, x ~ N(0, 1):
  sin       sin(W z + x)
  sigmoid   4 σ(W z + x) − 2
  gelu2     tanh(V gelu(W z + x)), ‖V‖₂ = 1 (two layers)
  softsign  softsign(W z + x)
at widths 96 and 256 (the secant solver's regime) and gains 2 and 4. A sample is solved
when its recomputed ||f(z) − z|| / ||f(z)|| is at most the tolerance. Writes
benchmarks/results/families.{json,md}: per cell, each solver's solved fraction, evaluations
and wall time, and the samples one solver solved and the other did not.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torchdeq.solver import get_solver

import torchdeq_homotopy  # noqa: F401  (registers the solvers)

SOLVERS = ["broyden", "homotopy"]
FAMILIES = ["sin", "sigmoid", "gelu2", "softsign"]


def cell(family: str, n: int, gain: float, seed: int, bsz: int = 16):
    """f and the start z = 0 of one cell."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g)
    W = W / torch.linalg.matrix_norm(W, 2) * gain
    V = torch.randn(n, n, generator=g)
    V = V / torch.linalg.matrix_norm(V, 2)
    x = torch.randn(bsz, n, generator=g)
    act = {"sin": torch.sin, "sigmoid": lambda u: 4 * torch.sigmoid(u) - 2,
           "gelu2": lambda u: torch.tanh(torch.nn.functional.gelu(u) @ V.T),
           "softsign": torch.nn.functional.softsign}[family]
    return (lambda z: act(z @ W.T + x)), torch.zeros(bsz, n)


def run_cell(family: str, n: int, gain: float, seed: int, budget: int, tol: float) -> dict:
    row: dict = dict(family=family, n=n, gain=gain, seed=seed)
    for solver in SOLVERS:
        f, x0 = cell(family, n, gain, seed)
        start = time.perf_counter()
        with torch.no_grad():
            z, _, info = get_solver(solver)(f, x0, max_iter=budget, tol=tol, stop_mode="rel")
            fz = f(z)
        wall = time.perf_counter() - start
        rel = (fz - z).norm(dim=1) / (fz.norm(dim=1) + 1e-9)
        solved = (rel <= tol) & torch.isfinite(rel)
        row[solver] = dict(solved=solved.tolist(), nfe=float(info["nstep"].max()), wall_s=wall)
    return row


def report(rows: list[dict]) -> str:
    lines = ["| cell | broyden solved / evals / s | homotopy solved / evals / s | "
             "only Broyden | only homotopy |", "|---|---|---|---|---|"]
    wins = losses = 0
    for r in rows:
        b, h = r["broyden"], r["homotopy"]
        only_b = sum(x and not y for x, y in zip(b["solved"], h["solved"], strict=True))
        only_h = sum(y and not x for x, y in zip(b["solved"], h["solved"], strict=True))
        frac = [sum(s["solved"]) / len(s["solved"]) for s in (b, h)]
        wins += frac[1] > frac[0]
        losses += frac[1] < frac[0]
        lines.append(f"| {r['family']} n={r['n']} ‖W‖={r['gain']:g} (seed {r['seed']}) | "
                     f"{frac[0]:.2f} / {b['nfe']:.0f} / {b['wall_s']:.1f} | "
                     f"{frac[1]:.2f} / {h['nfe']:.0f} / {h['wall_s']:.1f} | {only_b} | {only_h} |")
    head = (f"{len(rows)} cells: homotopy solved more than Broyden on {wins}, fewer on "
            f"{losses}, as many on {len(rows) - wins - losses}.")
    return head + "\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[300, 301])
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for family in FAMILIES:
        for n in (96, 256):
            for gain in (2.0, 4.0):
                for seed in args.seeds:
                    rows.append(run_cell(family, n, gain, seed, args.budget, args.tol))
                    print(report(rows[-1:]).splitlines()[-1], flush=True)
    (out / "families.json").write_text(json.dumps(rows))
    text = report(rows)
    (out / "families.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
