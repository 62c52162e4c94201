"""Wall time on the size sweep's benign cells, repeated and interleaved.

    python benchmarks/benign_time.py [--seeds 260] [--repeats 15]
        [--out benchmarks/results/benign_time.md]

The size sweep (``benchmarks/sweep.py``) times each solve once. Its benign cells, those
that fixed-point iteration or Anderson solves, take 4–50 ms, and a single solve's time on
this shared machine moves by up to 1.6× between two runs of identical iterates. Here every
benign cell of ``sweep.py --quick`` (batch 8, float32, start z = 0, relative tolerance 1e-5,
budget 2,000) is solved ``--repeats`` times by every solver, one solve of each in turn
(the order turned by one solver every repeat: in a fixed order, which solver follows which
moved a solve's time by 7–15 % in ``call_overhead.py``), after one solve each to warm up;
the table gives each solver's median, and homotopy's median over that of the fastest
TorchDEQ solver that solves at least 99 % of the cell.
A cell is benign when fixed-point iteration or Anderson solves at least 99 % of it (the
sweep's rule). About 2 minutes per seed on 2 CPU cores.

``--baseline DIR`` also times another version of the plugin, side by side in the same
process: DIR holds its ``torchdeq_homotopy`` package, e.g. the code of an earlier commit
(``git archive REV torchdeq_homotopy | tar -x -C DIR``). Its column and the ratio
homotopy / baseline are added; ratios within one run are what this shared machine can resolve.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
from torchdeq.solver import get_solver, register_solver

import torchdeq_homotopy  # registers 'homotopy'

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import cells, conv_cell, relative_residual, tanh_cell

TORCHDEQ = ("fixed_point_iter", "anderson", "broyden")
SOLVERS = [*TORCHDEQ, "homotopy"]
BASELINE: dict = {}       # "baseline": the other version's homotopy_solver (--baseline)


def load_baseline(directory: Path) -> None:
    """Import the ``torchdeq_homotopy`` package under ``directory`` as
    ``baseline_homotopy``; its import registers its own 'homotopy', so the current one is
    registered again after it."""
    init = directory / "torchdeq_homotopy" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline: no torchdeq_homotopy package in {directory}; "
                         "extract one with `git archive REV torchdeq_homotopy | tar -x -C DIR`")
    spec = importlib.util.spec_from_file_location(
        "baseline_homotopy", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_homotopy"] = module
    spec.loader.exec_module(module)
    register_solver("homotopy", torchdeq_homotopy.homotopy_solver)
    BASELINE["baseline"] = module.homotopy_solver
    SOLVERS.append("baseline")


def solver_fn(solver: str):
    """The solver behind a column: TorchDEQ's registry's, or the ``--baseline`` version's."""
    return BASELINE[solver] if solver in BASELINE else get_solver(solver)


def turned(names: list[str], repeat: int) -> list[str]:
    """``names`` turned by ``repeat`` places: the order of one repeat's solves. In a fixed
    order, which solver follows which moved a solve's time by 7–15 % on the CI machine
    (two copies of the same code, in turn; ``call_overhead.py``)."""
    turn = repeat % len(names)
    return names[turn:] + names[:turn]


def solved(solver: str, f, x0: torch.Tensor, tol: float, budget: int) -> tuple[float, int]:
    """Fraction of samples whose recomputed relative residual meets ``tol``, and the
    evaluations the solver reports."""
    z, _, info = solver_fn(solver)(f, x0, max_iter=budget, tol=tol, stop_mode="rel")
    return (float((relative_residual(f, z) <= tol).float().mean()),
            int(info["nstep"].max()))


def time_cell(f, x0: torch.Tensor, tol: float, budget: int, repeats: int) -> dict[str, float]:
    """Median wall seconds per solver, ``repeats`` interleaved solves each."""
    times: dict[str, list[float]] = {s: [] for s in SOLVERS}
    for repeat in range(repeats):
        for solver in turned(SOLVERS, repeat):
            start = time.perf_counter()
            solver_fn(solver)(f, x0, max_iter=budget, tol=tol, stop_mode="rel")
            times[solver].append(time.perf_counter() - start)
    return {s: statistics.median(v) for s, v in times.items()}


@torch.no_grad()
def measure(seed: int, tol: float, budget: int, repeats: int) -> list[dict]:
    rows = []
    for family, _, params in cells(quick=True):
        f, x0 = (tanh_cell(seed=seed, **params) if family == "tanh"
                 else conv_cell(seed=seed, **params))
        outcome = {s: solved(s, f, x0, tol, budget) for s in SOLVERS}
        if max(outcome["fixed_point_iter"][0], outcome["anderson"][0]) < 0.99:
            continue                                           # not benign
        wall = time_cell(f, x0, tol, budget, repeats)
        able = [s for s in TORCHDEQ if outcome[s][0] >= 0.99]
        fastest = min(able, key=wall.__getitem__)
        name = (f"tanh n={params['n']} ‖W‖={params['gain']:g} bias={params['bias']:g}"
                if family == "tanh" else
                f"conv {params['width']}×{params['side']}×{params['side']} "
                f"gain {params['gain']:g}")
        row = dict(cell=name, seed=seed, fastest=fastest,
                   ratio=wall["homotopy"] / wall[fastest],
                   **{f"{s}_ms": 1e3 * wall[s] for s in SOLVERS},
                   **{f"{s}_nfe": outcome[s][1] for s in SOLVERS},
                   homotopy_solved=outcome["homotopy"][0])
        if BASELINE:
            row["over_baseline"] = wall["homotopy"] / wall["baseline"]
        print(f"{name} (seed {seed}): homotopy {row['ratio']:.2f}× {fastest} "
              f"({row['homotopy_ms']:.1f} ms, {row['homotopy_nfe']} evaluations, against "
              f"{row[fastest + '_ms']:.1f} ms, {row[fastest + '_nfe']})", flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    extra = " baseline | homotopy / baseline |" if BASELINE else ""
    lines = ["| cell | fixed-point ms / evals | Anderson | Broyden | homotopy | "
             "homotopy / fastest |" + extra,
             "|---|---|---|---|---|---|" + ("---|---|" if BASELINE else "")]
    for r in rows:
        cols = " | ".join(f"{r[s + '_ms']:.1f} / {r[s + '_nfe']}" for s in SOLVERS
                          if s != "baseline")
        line = (f"| {r['cell']} (seed {r['seed']}) | {cols} | "
                f"**{r['ratio']:.2f}×** ({r['fastest']}) |")
        if BASELINE:
            line += (f" {r['baseline_ms']:.1f} / {r['baseline_nfe']} | "
                     f"{r['over_baseline']:.2f}× |")
        lines.append(line)
    ratios = [r["ratio"] for r in rows]
    lines.append("")
    lines.append(f"Homotopy within 1.2× the fastest TorchDEQ solver on "
                 f"{sum(x <= 1.2 for x in ratios)} of {len(ratios)} benign cells "
                 f"(median {statistics.median(ratios):.2f}×, max {max(ratios):.2f}×).")
    if BASELINE:
        over = [r["over_baseline"] for r in rows]
        lines.append(f"Homotopy / baseline: geometric mean "
                     f"{statistics.geometric_mean(over):.3f}×, "
                     f"{min(over):.2f}–{max(over):.2f}× per cell.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[260])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--budget", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None,
                        help="write the table as Markdown here")
    parser.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                        help="also time the torchdeq_homotopy package under DIR")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.baseline is not None:
        load_baseline(args.baseline)
    rows = []
    for seed in args.seeds:
        rows += measure(seed, args.tol, args.budget, args.repeats)
    text = table(rows)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/benign_time.py " + " ".join(sys.argv[1:])
        args.out.write_text(f"Command: `{command.strip()}`\n\n{text}\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
