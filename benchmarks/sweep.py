"""Size sweep: every solver on tanh and conv + GroupNorm cells from 32 to 65,536 entries.

    python benchmarks/sweep.py [--seeds 200] [--tols 1e-5] [--budget 2000] [--quick]
    python benchmarks/sweep.py --quick --seeds 200 --only "conv 16" "conv 32×16×16 gain 1"
    python benchmarks/sweep.py --quick --seeds 100 --solvers newton_krylov \
        --options homo_forcing=constant --out /tmp/ab
    python benchmarks/sweep.py --quick --seeds 200 --solvers homotopy   # rerun one solver
    python benchmarks/sweep.py --quick --seeds 290 --only "n=32 ‖" --repeats 5 \
        --out benchmarks/results/sweep_n32_repeats      # median wall time of 5 runs

Cells (batch 8, float32, start z = 0, stop mode 'rel'):
  tanh(W z + x), W Gaussian scaled to ‖W‖₂ = gain, x ~ bias · N(0, 1), width n;
  conv + GroupNorm (the reference classifier's cell) with both convolutions scaled by a gain.
A sample is solved when its recomputed ||f(z) - z|| / ||f(z)|| is at most the tolerance.
The seeds given here were not used to choose any default (those were chosen on seeds
100-101). Writes benchmarks/results/sweep.{json,md} and sweep_profiles.png (Dolan–Moré
performance profile of wall time and Moré–Wild data profile of evaluations).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from torchdeq.solver import get_solver

import torchdeq_homotopy  # noqa: F401  (registers the solvers)
from homotopy_zoo.models import Cell

SOLVERS = ["fixed_point_iter", "anderson", "broyden", "newton_krylov", "homotopy"]


def tanh_cell(n: int, gain: float, bias: float, seed: int, bsz: int = 8,
              dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=dtype)
    W = W / torch.linalg.matrix_norm(W, 2) * gain
    x = bias * torch.randn(bsz, n, generator=g, dtype=dtype)
    return (lambda z: torch.tanh(z @ W.T + x)), torch.zeros(bsz, n, dtype=dtype)


def conv_cell(width: int, side: int, gain: float, seed: int, bsz: int = 8):
    torch.manual_seed(seed)
    cell = Cell(width, dropout=0.0).eval()
    with torch.no_grad():
        cell.conv1.weight.mul_(gain)
        cell.conv2.weight.mul_(gain)
    x = torch.randn(bsz, width, side, side)
    return (lambda z: cell(z, x)), torch.zeros(bsz, width, side, side)


def cells(quick: bool) -> list[tuple[str, int, dict]]:
    """(family, entries per sample, parameters) for every cell of the sweep."""
    out = []
    widths = (32, 128, 512) if quick else (32, 128, 512, 2048)
    for n in widths:
        for gain in (1.5, 3.0, 4.5, 6.0, 8.0):
            for bias in (0.1, 1.0):
                out.append(("tanh", n, dict(n=n, gain=gain, bias=bias)))
    for width, side in ((16, 8), (32, 16)) if quick else ((16, 8), (32, 16), (64, 16), (64, 32)):
        for gain in (1.0, 4.0, 8.0):
            out.append(("conv", width * side * side, dict(width=width, side=side, gain=gain)))
    return out


@torch.no_grad()
def relative_residual(f, z: torch.Tensor) -> torch.Tensor:
    fz = f(z)
    return (fz - z).flatten(1).norm(dim=1) / (fz.flatten(1).norm(dim=1) + 1e-9)


def solve_once(family: str, params: dict, seed: int, tol: float, budget: int, solver: str,
               options: dict) -> tuple[float, float, float, float | None]:
    """One solve of one cell: (fraction solved, evaluations, wall seconds, products per
    Krylov solve or None)."""
    extra = options if solver in ("newton_krylov", "homotopy") else {}
    f, x0 = (tanh_cell(seed=seed, **params) if family == "tanh"
             else conv_cell(seed=seed, **params))
    start = time.perf_counter()
    with torch.no_grad():
        z, _, info = get_solver(solver)(f, x0, max_iter=budget, tol=tol, stop_mode="rel",
                                        **extra)
    wall = time.perf_counter() - start
    rel = relative_residual(f, z)
    solved = float(((rel <= tol) & torch.isfinite(rel)).float().mean())
    nfe = float(info["nfe"][0]) if "nfe" in info else float(info["nstep"].max())
    solves = info.get("krylov_solves", 0)
    per_solve = info["krylov_products"] / solves if solves else None
    return solved, nfe, wall, per_solve


def run_cell(family: str, params: dict, seed: int, tol: float, budget: int,
             solvers: list[str], options: dict, repeats: int = 1) -> list[dict]:
    """Every solver on one cell; ``options`` (``homo_*`` keys) go to the plugin's solvers.
    With ``repeats`` > 1 the solvers run in turn that many times (interleaved, so the
    machine's load falls on each alike) and the wall time is the median; the solved
    fraction and evaluations are the first run's (the solves are deterministic)."""
    runs: dict[str, list] = {solver: [] for solver in solvers}
    for _ in range(repeats):
        for solver in solvers:
            runs[solver].append(solve_once(family, params, seed, tol, budget, solver, options))
    rows = []
    for solver, results in runs.items():
        solved, nfe, _, per_solve = results[0]
        wall = statistics.median(r[2] for r in results)
        rows.append(dict(family=family, **params, seed=seed, tol=tol, solver=solver,
                         solved=solved, nfe=nfe, wall_s=wall, products_per_solve=per_solve))
        print(f"{family} {params} seed {seed} tol {tol:g} {solver:<17} solved {solved:.3f} "
              f"nfe {nfe:6.0f} wall {wall:7.3f}s"
              + (f" products/solve {per_solve:.1f}" if per_solve else ""), flush=True)
    return rows


def label(r: dict) -> str:
    if r["family"] == "tanh":
        return f"tanh n={r['n']} ‖W‖={r['gain']:g} bias={r['bias']:g}"
    return f"conv {r['width']}×{r['side']}×{r['side']} gain {r['gain']:g}"


def table(rows: list[dict], solvers: list[str]) -> str:
    keys = list(dict.fromkeys((label(r), r["tol"], r["seed"]) for r in rows))
    lines = ["| cell | tol | " + " | ".join(solvers) + " | homotopy products / Krylov solve |",
             "|---|---|" + "---|" * len(solvers) + "---|"]
    for cell, tol, seed in keys:
        group = {r["solver"]: r for r in rows
                 if (label(r), r["tol"], r["seed"]) == (cell, tol, seed)}
        cells_ = [f"{group[s]['solved']:.2f} / {group[s]['nfe']:.0f} / {group[s]['wall_s']:.1f}s"
                  for s in solvers]
        pps = group["homotopy"]["products_per_solve"] if "homotopy" in group else None
        lines.append(f"| {cell} (seed {seed}) | {tol:g} | " + " | ".join(cells_)
                     + f" | {'—' if pps is None else f'{pps:.1f}'} |")
    return "\n".join(lines)


def summary(rows: list[dict], solvers: list[str]) -> str:
    problems = sorted({(label(r), r["tol"], r["seed"]) for r in rows})
    lines = ["| solver | mean solved | cells ≥ 99 % solved | cells < 50 % solved |",
             "|---|---|---|---|"]
    for solver in solvers:
        mine = [r for r in rows if r["solver"] == solver]
        lines.append(f"| {solver} | {sum(r['solved'] for r in mine) / len(mine):.3f} | "
                     f"{sum(r['solved'] >= 0.99 for r in mine)} of {len(problems)} | "
                     f"{sum(r['solved'] < 0.5 for r in mine)} |")
    return "\n".join(lines)


def wall_ratios(rows: list[dict]) -> str:
    """Homotopy's wall time against TorchDEQ's solvers. Benign cells (fixed-point iteration
    or Anderson solve ≥ 99 %): over the fastest TorchDEQ solver that solves ≥ 99 %. Hard
    cells (neither does): over Broyden where both solve ≥ 99 %, geometric mean per width (and
    per seed of that width, when several seeds ran)."""
    cells: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cells.setdefault((label(r), r["tol"], r["seed"]), {})[r["solver"]] = r
    if not all({"fixed_point_iter", "anderson", "broyden", "homotopy"} <= set(c)
               for c in cells.values()):
        return ""
    benign, hard = [], {}
    for (name, _, seed), c in cells.items():
        if c["fixed_point_iter"]["solved"] >= 0.99 or c["anderson"]["solved"] >= 0.99:
            fastest = min(c[s]["wall_s"] for s in ("fixed_point_iter", "anderson", "broyden")
                          if c[s]["solved"] >= 0.99)
            benign.append(c["homotopy"]["wall_s"] / fastest)
        elif c["homotopy"]["solved"] >= 0.99 and c["broyden"]["solved"] >= 0.99:
            size = name.split()[1] if name.startswith("tanh") else "conv"
            hard.setdefault(size, {}).setdefault(seed, []).append(
                c["homotopy"]["wall_s"] / c["broyden"]["wall_s"])
    text = (f"Benign cells: homotopy within 1.2× the fastest TorchDEQ solver on "
            f"{sum(x <= 1.2 for x in benign)} of {len(benign)} (max {max(benign):.2f}×)."
            if benign else "No benign cells.")
    for size, by_seed in hard.items():
        ratios = [r for seed_ratios in by_seed.values() for r in seed_ratios]
        text += (f" Hard cells, {size}: {_geometric_mean(ratios):.2f}× Broyden's wall time "
                 f"({len(ratios)} cells)")
        if len(by_seed) > 1:
            text += "; per seed " + ", ".join(
                f"{seed}: {_geometric_mean(r):.2f}× ({len(r)})"
                for seed, r in sorted(by_seed.items()))
        text += "."
    return text


def _geometric_mean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def profiles(rows: list[dict], out: Path, budget: int, solvers: list[str]) -> None:
    """Dolan–Moré: share of cells a solver solves (≥ 99 %) within τ × the best wall time.
    Moré–Wild: share of cells solved (≥ 99 %) within a given number of evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = sorted({(label(r), r["tol"], r["seed"]) for r in rows})
    inf = float("inf")
    wall = {s: [] for s in solvers}
    evals = {s: [] for s in solvers}
    for p in problems:
        group = {r["solver"]: r for r in rows if (label(r), r["tol"], r["seed"]) == p}
        for s in solvers:
            ok = group[s]["solved"] >= 0.99
            wall[s].append(group[s]["wall_s"] if ok else inf)
            evals[s].append(group[s]["nfe"] if ok else inf)
    best = [min(wall[s][i] for s in solvers) for i in range(len(problems))]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    taus = [1.0 + 0.05 * k for k in range(0, 400)]
    for s in solvers:
        ratios = [w / b if b < inf else inf for w, b in zip(wall[s], best, strict=True)]
        ax1.plot(taus, [sum(r <= t for r in ratios) / len(problems) for t in taus], label=s)
        grid = list(range(0, budget + 1, 10))
        ax2.plot(grid, [sum(e <= g for e in evals[s]) / len(problems) for g in grid], label=s)
    ax1.set(xscale="log", xlabel="τ (wall time / best solver's)",
            ylabel="share of cells solved (≥ 99 % of samples)",
            title="Performance profile (wall time)")
    ax2.set(xlabel="evaluations (f calls + JVPs)", ylabel="share of cells solved",
            title="Data profile (evaluations)")
    ax1.legend(fontsize=8)
    fig.suptitle(f"Size sweep, {len(problems)} cells, budget {budget}, float32, 2 CPU cores")
    fig.tight_layout()
    fig.savefig(out / "sweep_profiles.png", dpi=110)


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="200")
    parser.add_argument("--tols", default="1e-5")
    parser.add_argument("--budget", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="widths up to 512, two conv sizes")
    parser.add_argument("--only-2048", action="store_true",
                        help="the 2048-wide tanh cells at ‖W‖₂ 1.5 and 3 only (sweep_2048.*)")
    parser.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                        help="run only the cells whose label contains one of these texts, and "
                             "merge them into the existing results (replacing their rows)")
    parser.add_argument("--solvers", nargs="+", default=SOLVERS, choices=SOLVERS,
                        help="run only these solvers; a subset merges into the existing "
                             "results (replacing these solvers' rows of the cells run)")
    parser.add_argument("--options", nargs="*", default=[], metavar="KEY=VALUE",
                        help="homo_* keys for newton_krylov and homotopy (an A/B run: give "
                             "--out elsewhere)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run each cell's solvers this many times in turn and report the "
                             "median wall time (millisecond solves: a single run's time is noise)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    options = {k: _value(v) for k, v in (item.split("=", 1) for item in args.options)}
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "sweep_2048" if args.only_2048 else "sweep"
    chosen = ([("tanh", 2048, dict(n=2048, gain=g, bias=b)) for g in (1.5, 3.0)
               for b in (0.1, 1.0)] if args.only_2048 else cells(args.quick))
    if args.only:
        chosen = [c for c in chosen if any(text in label(dict(family=c[0], **c[2]))
                                           for text in args.only)]
    tols, seeds = list(map(float, args.tols.split(","))), list(map(int, args.seeds.split(",")))
    rerun = {(label(dict(family=c[0], **c[2])), t, s) for c in chosen for t in tols
             for s in seeds}
    rows: list[dict] = []
    # With --only or a subset of --solvers, earlier rows of the other cells and solvers stay.
    partial = args.only or set(args.solvers) != set(SOLVERS)
    if partial and (out / f"{name}.json").exists():
        rows = [r for r in json.loads((out / f"{name}.json").read_text())
                if (label(r), r["tol"], r["seed"]) not in rerun or r["solver"] not in args.solvers]
    for tol in tols:
        for seed in seeds:
            for family, _, params in chosen:
                rows.extend(run_cell(family, params, seed, tol, args.budget, args.solvers,
                                     options, args.repeats))
                (out / f"{name}.json").write_text(json.dumps(rows))
    solvers = [s for s in SOLVERS if any(r["solver"] == s for r in rows)]
    text = (summary(rows, solvers) + "\n\n" + wall_ratios(rows) + "\n\n"
            + table(rows, solvers))
    (out / f"{name}.md").write_text(text + "\n")
    if not args.only_2048:
        profiles(rows, out, args.budget, solvers)
    print(text)


if __name__ == "__main__":
    main()
