"""Every registered solver on a suite of fixed-point problems, at equal evaluation budgets.

    python benchmarks/solvers.py [--budget 2000] [--out benchmarks/results]
    python benchmarks/solvers.py --held-out     # 16 expansive cells, homotopy solver only
    python benchmarks/solvers.py --hard-ratio   # homotopy / Broyden wall time, interleaved
    python benchmarks/solvers.py --test-cells   # 32 more expansive cells, with Broyden

Writes benchmarks/results/solvers.json, solvers.md (the table in BENCHMARKS.md) and
residual_vs_evaluations.png. A sample counts as solved when its recomputed relative
residual ||f(z) - z|| / ||f(z)|| is at most the tolerance.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torchdeq.solver import get_solver

import torchdeq_homotopy  # noqa: F401  (registers the solvers)
from homotopy_zoo.models import Cell

SOLVERS = ["fixed_point_iter", "anderson", "broyden", "newton_krylov", "homotopy"]


def tanh_cell(gain: float, n: int = 32, bsz: int = 64, bias: float = 0.1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g)
    W = W / torch.linalg.matrix_norm(W, 2) * gain
    x = bias * torch.randn(bsz, n, generator=g)
    return (lambda z: torch.tanh(z @ W.T + x)), torch.zeros(bsz, n)


def linear(radius: float, sign: float, n: int = 32, bsz: int = 64, seed: int = 0):
    """f(z) = A z + b, A symmetric with spectrum sign·[0.6ρ, ρ] (sign -1: oscillating)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    eig = radius * torch.linspace(0.6, 1.0, n)
    A = sign * (Q * eig) @ Q.T
    b = torch.randn(bsz, n, generator=g)
    return (lambda z: z @ A.T + b), torch.zeros(bsz, n)


def conv_cell(seed: int = 0, width: int = 16, bsz: int = 32):
    torch.manual_seed(seed)
    cell = Cell(width, dropout=0.0).eval()
    x = torch.randn(bsz, width, 8, 8)
    return (lambda z: cell(z, x)), torch.zeros(bsz, width, 8, 8)


PROBLEMS = {
    "contractive tanh (‖W‖=0.5)": lambda: tanh_cell(0.5),
    "near-critical tanh (‖W‖=0.97)": lambda: tanh_cell(0.97),
    "expansive tanh (‖W‖=3)": lambda: tanh_cell(3.0),
    "expansive tanh (‖W‖=4.5)": lambda: tanh_cell(4.5, seed=1),
    "expansive tanh (‖W‖=6)": lambda: tanh_cell(6.0, seed=2),
    "oscillating linear (ρ=0.95, negative)": lambda: linear(0.95, -1.0),
    "divergent linear (ρ=2)": lambda: linear(2.0, 1.0),
    "conv + GroupNorm cell": lambda: conv_cell(),
}


@torch.no_grad()
def solved_fraction(f, z: torch.Tensor, tol: float) -> float:
    """Share of samples whose recomputed ||f(z) - z|| / ||f(z)|| is finite and <= tol."""
    fz = f(z)
    rel = (fz - z).flatten(1).norm(dim=1) / (fz.flatten(1).norm(dim=1) + 1e-9)
    return float(((rel <= tol) & torch.isfinite(rel)).float().mean())


def run(budget: int, tol: float) -> list[dict]:
    rows = []
    for problem, make in PROBLEMS.items():
        for solver in SOLVERS:
            f, x0 = make()
            torch.manual_seed(0)
            walls = []
            with torch.no_grad():
                for _ in range(3):
                    start = time.perf_counter()
                    z, _, info = get_solver(solver)(f, x0, max_iter=budget, tol=tol,
                                                    stop_mode="rel")
                    walls.append(time.perf_counter() - start)
            wall = sorted(walls)[1]
            nfe = info["nfe"][0].item() if "nfe" in info else info["nstep"].max().item()
            trace = info["rel_trace"].clamp_max(1e3).median(dim=0).values
            xs = (info["trace_nfe"].tolist() if "trace_nfe" in info
                  else list(range(trace.shape[0])))
            rows.append(dict(problem=problem, solver=solver, solved=solved_fraction(f, z, tol),
                             nfe=float(nfe), wall_s=wall, trace=trace.tolist()[:len(xs)],
                             trace_nfe=xs))
            print(f"{problem:<40}{solver:<18}solved {rows[-1]['solved']:.3f}  nfe {nfe:6.0f}"
                  f"  wall {wall:7.3f}s", flush=True)
    return rows


def table(rows: list[dict], budget: int, tol: float) -> str:
    lines = [f"Budget {budget} evaluations per solve, relative tolerance {tol}; "
             "cells: fraction of samples solved / evaluations used / wall milliseconds "
             "(median of 3 runs).", "",
             "| problem | " + " | ".join(SOLVERS) + " |",
             "|---" * (len(SOLVERS) + 1) + "|"]
    for problem in PROBLEMS:
        cells = []
        for solver in SOLVERS:
            r = next(r for r in rows if r["problem"] == problem and r["solver"] == solver)
            cells.append(f"{r['solved']:.2f} / {r['nfe']:.0f} / {1e3 * r['wall_s']:.1f}")
        lines.append(f"| {problem} | " + " | ".join(cells) + " |")
    total = {s: sum(r["solved"] for r in rows if r["solver"] == s) / len(PROBLEMS)
             for s in SOLVERS}
    lines.append("| **mean solved** | " + " | ".join(f"**{total[s]:.3f}**" for s in SOLVERS)
                 + " |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path, problem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["problem"] == problem:
            ax.semilogy(r["trace_nfe"][1:] if r["solver"] not in ("homotopy", "newton_krylov")
                        else r["trace_nfe"], r["trace"][1:] if r["solver"] not in (
                            "homotopy", "newton_krylov") else r["trace"], label=r["solver"])
    ax.set(xlabel="evaluations of f (and JVPs)", ylabel="median relative residual",
           title=problem)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "residual_vs_evaluations.png", dpi=120)


def held_out(budget: int, tol: float, seeds: tuple[int, ...] = (10, 11, 12, 13),
             against_broyden: bool = False) -> str:
    """Expansive tanh cells (‖W‖ = 3, 4, 5, 6 × ``seeds``) outside the suite: the homotopy
    solver (and, with ``against_broyden``, Broyden at the same budget)."""
    solvers = ["homotopy"] + (["broyden"] if against_broyden else [])
    head = " | ".join(str(seed) for seed in seeds)
    lines = [f"| ‖W‖ \\ seed | {head} |", "|---|" + "---|" * len(seeds)]
    solved: dict[str, list[float]] = {name: [] for name in solvers}
    evals = 0
    for gain in (3.0, 4.0, 5.0, 6.0):
        cells = []
        for seed in seeds:
            f, x0 = tanh_cell(gain, seed=seed)
            cell = []
            for name in solvers:
                with torch.no_grad():
                    z, _, info = get_solver(name)(f, x0, max_iter=budget, tol=tol,
                                                  stop_mode="rel")
                solved[name].append(solved_fraction(f, z, tol))
                cell.append(f"{solved[name][-1]:.3f}")
                if name == "homotopy":
                    evals += int(info["nfe"][0])
                    cell.append(f"{info['nfe'][0]:.0f}")
            cells.append(" / ".join(cell))
        lines.append(f"| {gain:g} | " + " | ".join(cells) + " |")
    what = "fraction solved / evaluations" + (" / Broyden's fraction solved"
                                             if against_broyden else "")
    means = ", ".join(f"{name} **{sum(v) / len(v):.4f}**" for name, v in solved.items())
    lines.append(f"\nMean fraction solved: {means}; homotopy evaluations in all: {evals} "
                 f"(cells: {what}).")
    return "\n".join(lines)


HARD = ["expansive tanh (‖W‖=3)", "expansive tanh (‖W‖=4.5)", "expansive tanh (‖W‖=6)"]


def hard_ratio(budget: int, tol: float, repeats: int = 7) -> str:
    """Homotopy against Broyden on the hard cells, alternating runs so that both see the
    same machine load; the medians and their ratio."""
    lines = ["| problem | Broyden ms | homotopy ms | ratio | solved (Broyden / homotopy) |",
             "|---|---|---|---|---|"]
    for problem in HARD:
        f, x0 = PROBLEMS[problem]()
        walls: dict[str, list[float]] = {"broyden": [], "homotopy": []}
        solved = {}
        for _ in range(repeats):
            for solver in walls:
                start = time.perf_counter()
                with torch.no_grad():
                    z, _, _ = get_solver(solver)(f, x0, max_iter=budget, tol=tol,
                                                 stop_mode="rel")
                walls[solver].append(time.perf_counter() - start)
                solved[solver] = solved_fraction(f, z, tol)
        med = {k: 1e3 * sorted(v)[len(v) // 2] for k, v in walls.items()}
        lines.append(f"| {problem} | {med['broyden']:.1f} | {med['homotopy']:.1f} | "
                     f"{med['homotopy'] / med['broyden']:.2f} | {solved['broyden']:.3f} / "
                     f"{solved['homotopy']:.3f} |")
        print(lines[-1], flush=True)
    return f"Median of {repeats} alternating runs each.\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=int, default=2000)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--held-out", action="store_true",
                        help="only the homotopy solver on 16 cells no default was tuned on")
    parser.add_argument("--test-cells", action="store_true",
                        help="homotopy and Broyden on 32 expansive cells (seeds 40-47), "
                             "run once to check the defaults chosen on other cells")
    parser.add_argument("--hard-ratio", action="store_true",
                        help="homotopy against Broyden on the hard cells, interleaved")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.hard_ratio:
        text = hard_ratio(args.budget, args.tol)
        (out / "solvers_hard_ratio.md").write_text(text + "\n")
        print(text)
        return
    if args.test_cells:
        text = held_out(args.budget, args.tol, seeds=tuple(range(40, 48)), against_broyden=True)
        (out / "solvers_test_cells.md").write_text(text + "\n")
        print(text)
        return
    if args.held_out:
        text = held_out(args.budget, args.tol)
        (out / "solvers_held_out.md").write_text(text + "\n")
        print(text)
        return
    rows = run(args.budget, args.tol)
    (out / "solvers.json").write_text(json.dumps(rows))
    (out / "solvers.md").write_text(table(rows, args.budget, args.tol) + "\n")
    plot(rows, out, "expansive tanh (‖W‖=4.5)")
    print(table(rows, args.budget, args.tol))


if __name__ == "__main__":
    main()
