"""Budgets of about 100 evaluations on hard 64-wide cells: how the warm-up's share costs.

    python benchmarks/moderate_budget.py [--budget 100] [--seeds 300 301 302 303 304 305]
        [--out benchmarks/results/moderate_budget.md]

Two checks, each solver at ``max_iter`` ``--budget`` (100), relative tolerance 1e-4, start z = 0:

* synthetic cells tanh(W z + x), 64 wide, batch 32, ‖W‖₂ 3, 4 and 5, x ~ bias · N(0, 1) with
  bias 0.5 and 1, seeds ``--seeds`` (300–305: 36 cells): mean solved fraction and wall time;
* the hard-equilibria DEQ of ``examples/unstable_deq.py`` with W started at ‖W‖₂ = 4,
  trained 3 epochs with Broyden at ``f_max_iter`` 100 (seed 0), then its forward on 512
  training images solved by every solver (the same model and batch for all), and by
  homotopy without a warm-up.

At ``max_iter`` = budget, TorchDEQ's ``broyden`` evaluates f budget + 1 times (once before its
budget steps); ``fixed_point_iter``, ``anderson`` and the plugin's solvers budget times.
``--equal-evaluations`` gives ``broyden`` ``max_iter`` = budget − 1, so that every solver
makes the same number of evaluations.

About 1 minute on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sweep import relative_residual, tanh_cell
from torchdeq.solver import get_solver

import torchdeq_homotopy  # noqa: F401  (registers 'homotopy')
from homotopy_zoo.data import load_digits_data

ROOT = Path(__file__).resolve().parents[1]
TRAIN_BUDGET, TOL = 100, 1e-4
RUNS = [("fixed_point_iter", {}), ("anderson", {}), ("broyden", {}), ("homotopy", {}),
        ("homotopy", {"homo_warmup": 0})]


EQUAL_EVALUATIONS = {"on": False}   # set by --equal-evaluations


def solve(f, x0: torch.Tensor, solver: str, options: dict, budget: int
          ) -> tuple[float, float, torch.Tensor]:
    """(solved fraction, wall seconds, per-sample relative residual) of one solve at the
    budget."""
    max_iter = budget - 1 if solver == "broyden" and EQUAL_EVALUATIONS["on"] else budget
    start = time.perf_counter()
    with torch.no_grad():
        z, _, _ = get_solver(solver)(f, x0, max_iter=max_iter, tol=TOL, stop_mode="rel",
                                     **options)
    wall = time.perf_counter() - start
    residual = relative_residual(f, z)
    return float((residual <= TOL).float().mean()), wall, residual


def synthetic(budget: int, seeds: list[int]
              ) -> dict[str, tuple[float, float, float | None]]:
    """Per run over the synthetic cells: mean solved fraction, total wall time, and the
    geometric mean of the relative residual over the samples that no run solves (how far
    each method gets where none reaches the tolerance)."""
    totals: dict[str, list[float]] = {}
    unsolved_logs: dict[str, list[torch.Tensor]] = {}
    for seed in seeds:
        for gain in (3.0, 4.0, 5.0):
            for bias in (0.5, 1.0):
                residuals = {}
                for solver, options in RUNS:
                    f, x0 = tanh_cell(64, gain, bias, seed, bsz=32)
                    solved, wall, residuals[label(solver, options)] = solve(
                        f, x0, solver, options, budget)
                    entry = totals.setdefault(label(solver, options), [0.0, 0.0, 0])
                    entry[0] += solved
                    entry[1] += wall
                    entry[2] += 1
                nobody = torch.stack([r > TOL for r in residuals.values()]).all(dim=0)
                for key, r in residuals.items():
                    unsolved_logs.setdefault(key, []).append(r[nobody].log())
    return {k: (s / c, w, _geometric_mean(torch.cat(unsolved_logs[k])))
            for k, (s, w, c) in totals.items()}


def _geometric_mean(logs: torch.Tensor) -> float | None:
    """exp(mean(logs)); None when there are no samples."""
    return float(logs.mean().exp()) if logs.numel() else None


def trained_deq(budget: int) -> dict[str, tuple[float, float]]:
    """Every solver on the same forward of a Broyden-trained ‖W‖₂ = 4 DEQ."""
    spec = importlib.util.spec_from_file_location("unstable_deq",
                                                  ROOT / "examples" / "unstable_deq.py")
    unstable = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(unstable)
    data = load_digits_data()
    torch.manual_seed(0)
    model = unstable.TanhDEQ("broyden", TRAIN_BUDGET, gain=4.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(data.train, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for images, labels in loader:
            loss = F.cross_entropy(model(images)[0], labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    images = torch.stack([data.train[i][0] for i in range(512)])
    with torch.no_grad():
        x = model.inject(images.flatten(1))

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(model.W(z) + x)

    return {label(s, o): solve(f, torch.zeros_like(x), s, o, budget)[:2] for s, o in RUNS}


def label(solver: str, options: dict) -> str:
    return solver + ("" if not options else " (no warm-up)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=int, default=100, help="evaluations per solve")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(300, 306)),
                        help="seeds of the synthetic cells (6 cells each)")
    parser.add_argument("--out", default="benchmarks/results/moderate_budget.md")
    parser.add_argument("--equal-evaluations", action="store_true",
                        help="TorchDEQ's broyden at max_iter budget - 1 (budget evaluations)")
    args = parser.parse_args()
    EQUAL_EVALUATIONS["on"] = args.equal_evaluations
    torch.set_num_threads(2)
    cells, deq = synthetic(args.budget, args.seeds), trained_deq(args.budget)
    seeds = f"seeds {args.seeds[0]}–{args.seeds[-1]}" if len(args.seeds) > 1 \
        else f"seed {args.seeds[0]}"
    counting = (" (every solver makes this many evaluations: broyden at max_iter "
                f"{args.budget - 1})" if args.equal_evaluations else "")
    lines = [f"Budget {args.budget}{counting}, rel. tol {TOL:g}; solved fraction / wall s.", "",
             f"| solver | {6 * len(args.seeds)} synthetic 64-wide cells ({seeds}) "
             "| their samples that no solver solves: geometric-mean rel. residual "
             "| trained ‖W‖₂ = 4 DEQ, 512 forwards |",
             "|---|---|---|---|"]
    lines += [f"| {k} | {cells[k][0]:.3f} / {cells[k][1]:.1f} | "
              f"{'—' if cells[k][2] is None else format(cells[k][2], '.3g')} | "
              f"{deq[k][0]:.3f} / {deq[k][1]:.2f} |" for k in cells]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
