"""Cost parity on benign cells at TorchDEQ's defaults (issue: DEQ training with homotopy).

    python benchmarks/parity.py [--seeds 300 301] [--repeats 3] [--profile] [--no-warmup]

Cells (float32, no gradient), each solved cold (z = 0) and warm (from the equilibrium of
the same cell before a 1 % perturbation of its weights, as in training):
  * ``inr``: an INR-style cell, z ← tanh(W z + U φ(p)), 256 wide, ‖W‖₂ = 0.9, Fourier
    features φ of 9,216 pixel coordinates (the full batch);
  * ``conv``: the reference classifier's cell, conv + GroupNorm, 64 × 14 × 14, batch 64;
  * ``mlp``: tanh(W z + x), 128 wide, ‖W‖₂ = 0.9, batch 256;
  * ``slow``: tanh(W z + x), 256 wide, ‖W‖₂ = 2.5, x ~ N(0, 1), batch 256: fixed-point
    iteration contracts slowly there, and Anderson or Broyden is needed within 40 calls;
  * ``damped``: the relaxed update z ← (z + tanh(W z + x)) / 2, 128 wide, ‖W‖₂ = 0.97,
    batch 256: fixed-point iteration contracts at about 0.65–0.7 per step.
Every solver runs at ``max_iter`` 40 and ``tol`` 1e-3 in both stop modes. Reported per
solver: solved fraction, evaluations (``nstep`` for TorchDEQ's, ``nfe`` for the plugin's),
mean residual, and median wall time over ``--repeats`` (solvers interleaved, so the machine's
drift hits all alike). ``--profile`` adds the share of the homotopy solve spent inside f;
``--no-warmup`` adds the homotopy solver with ``homo_warmup=0`` (what it costs on these
cells; it is the setting for hard cells at training budgets).
Writes benchmarks/results/parity.{json,md}.
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

SOLVERS = ["fixed_point_iter", "anderson", "broyden", "homotopy"]
NO_WARMUP = "homotopy (no warm-up)"
MAX_ITER, TOL = 40, 1e-3


def _solver(label: str) -> tuple[str, dict]:
    """The registered solver and its options behind a column label."""
    return ("homotopy", {"homo_warmup": 0}) if label == NO_WARMUP else (label, {})


def _spectral(w: torch.Tensor, norm: float) -> torch.Tensor:
    return w / torch.linalg.matrix_norm(w, 2) * norm


def inr_cell(seed: int, perturb: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    side, width, freqs = 96, 256, 64
    coords = torch.stack(torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side),
                                        indexing="ij"), -1).reshape(-1, 2)
    B = 10 * torch.randn(2, freqs, generator=g)
    phi = torch.cat([torch.sin(coords @ B), torch.cos(coords @ B)], dim=1)
    W = torch.randn(width, width, generator=g)
    U = torch.randn(2 * freqs, width, generator=g) / math.sqrt(2 * freqs)
    if perturb:
        W = W + perturb * torch.randn(width, width, generator=g)
    W = _spectral(W, 0.9)
    x = phi @ U
    return (lambda z: torch.tanh(z @ W.T + x)), torch.zeros(side * side, width)


def conv_cell(seed: int, perturb: float = 0.0):
    torch.manual_seed(seed)
    cell = Cell(64, dropout=0.0).eval()
    x = torch.randn(64, 64, 14, 14)
    if perturb:
        with torch.no_grad():
            for p in cell.parameters():
                p.add_(perturb * p.abs().mean() * torch.randn_like(p))
    return (lambda z: cell(z, x)), torch.zeros(64, 64, 14, 14)


def _tanh_cell(width: int, gain: float, seed: int, perturb: float):
    """tanh(W z + x), batch 256, x ~ N(0, 1), ‖W‖₂ = gain (after the perturbation)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(width, width, generator=g)
    x = torch.randn(256, width, generator=g)
    if perturb:
        W = W + perturb * torch.randn(width, width, generator=g)
    W = _spectral(W, gain)
    return (lambda z: torch.tanh(z @ W.T + x)), torch.zeros(256, width)


def mlp_cell(seed: int, perturb: float = 0.0):
    return _tanh_cell(128, 0.9, seed, perturb)


def slow_cell(seed: int, perturb: float = 0.0):
    return _tanh_cell(256, 2.5, seed, perturb)


def damped_cell(seed: int, perturb: float = 0.0):
    """A relaxed update z ← (z + tanh(W z + x)) / 2, 128 wide, ‖W‖₂ = 0.97: fixed-point
    iteration contracts at about 0.65–0.7 per step, where Anderson needs half the calls."""
    f, z0 = _tanh_cell(128, 0.97, seed, perturb)
    return (lambda z: 0.5 * z + 0.5 * f(z)), z0


CELLS = {"inr": inr_cell, "conv": conv_cell, "mlp": mlp_cell, "slow": slow_cell,
         "damped": damped_cell}


@torch.no_grad()
def _residual(f, z: torch.Tensor, stop_mode: str) -> torch.Tensor:
    fz = f(z)
    abs_res = (fz - z).flatten(1).norm(dim=1)
    return abs_res if stop_mode == "abs" else abs_res / (fz.flatten(1).norm(dim=1) + 1e-9)


def _start(name: str, seed: int, warm: bool):
    """The cell to solve and its start: zero (cold) or the solution of the unperturbed cell."""
    f, z0 = CELLS[name](seed, perturb=0.01 if warm else 0.0)
    if warm:
        f_prev, _ = CELLS[name](seed)
        with torch.no_grad():
            z0, _, _ = get_solver("anderson")(f_prev, z0, max_iter=100, tol=1e-6)
    return f, z0


class _Timed:
    """f, accumulating the seconds spent inside it."""

    def __init__(self, f) -> None:
        self.f, self.seconds = f, 0.0

    def __call__(self, z):
        start = time.perf_counter()
        out = self.f(z)
        self.seconds += time.perf_counter() - start
        return out


def run(seeds: list[int], repeats: int, profile: bool) -> list[dict]:
    rows = []
    for name in CELLS:
        for warm in (False, True):
            for seed in seeds:
                f, z0 = _start(name, seed, warm)
                for stop_mode in ("abs", "rel"):
                    walls: dict[str, list[float]] = {s: [] for s in SOLVERS}
                    outcome: dict[str, tuple] = {}
                    for _ in range(repeats):
                        for solver in SOLVERS:
                            timed = _Timed(f)
                            start = time.perf_counter()
                            name_, options = _solver(solver)
                            with torch.no_grad():
                                z, _, info = get_solver(name_)(timed, z0, max_iter=MAX_ITER,
                                                               tol=TOL, stop_mode=stop_mode,
                                                               **options)
                            walls[solver].append(time.perf_counter() - start)
                            res = _residual(f, z, stop_mode)
                            evals = (float(info["nfe"][0]) if "nfe" in info
                                     else float(info["nstep"].max()))
                            outcome[solver] = (float((res <= TOL).float().mean()), evals,
                                               float(res.mean()), timed.seconds / walls[solver][-1])
                    for solver in SOLVERS:
                        solved, evals, mean_res, f_share = outcome[solver]
                        row = dict(cell=name, start="warm" if warm else "cold", seed=seed,
                                   stop_mode=stop_mode, solver=solver, solved=solved,
                                   evals=evals, mean_residual=mean_res,
                                   wall_s=statistics.median(walls[solver]))
                        if profile:
                            row["f_share"] = f_share
                        rows.append(row)
                        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in row.items()), flush=True)
    return rows


def _compare(group: dict[str, dict]) -> tuple[str, float, float]:
    """The best TorchDEQ solver of a cell (most solved, then fastest), homotopy's solved
    fraction minus its, and homotopy's wall time over its."""
    best = min((s for s in SOLVERS if not s.startswith("homotopy")),
               key=lambda s: (-group[s]["solved"], group[s]["wall_s"]))
    home = group["homotopy"]
    return best, home["solved"] - group[best]["solved"], home["wall_s"] / group[best]["wall_s"]


def table(rows: list[dict]) -> str:
    lines = ["| cell | start | stop | " + " | ".join(SOLVERS)
             + " | best TorchDEQ solver | homotopy − best, solved | homotopy / best, wall |",
             "|---|---|---|" + "---|" * len(SOLVERS) + "---|---|---|"]
    keys = list(dict.fromkeys((r["cell"], r["start"], r["stop_mode"], r["seed"]) for r in rows))
    for key in keys:
        group = {r["solver"]: r for r in rows
                 if (r["cell"], r["start"], r["stop_mode"], r["seed"]) == key}
        cells = [f"{g['solved']:.2f} / {g['evals']:.0f} / {g['mean_residual']:.1e} / "
                 f"{g['wall_s']:.2f}s" for g in (group[s] for s in SOLVERS)]
        best, gap, ratio = _compare(group)
        lines.append(f"| {key[0]} (seed {key[3]}) | {key[1]} | {key[2]} | " + " | ".join(cells)
                     + f" | {best} | {gap:+.2f} | {ratio:.2f} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    keys = list(dict.fromkeys((r["cell"], r["start"], r["stop_mode"], r["seed"]) for r in rows))
    gaps, ratios = [], []
    for key in keys:
        group = {r["solver"]: r for r in rows
                 if (r["cell"], r["start"], r["stop_mode"], r["seed"]) == key}
        _, gap, ratio = _compare(group)
        gaps.append(gap)
        if gap >= -1e-9:
            ratios.append(ratio)
    ratios.sort()
    extra = ""
    if NO_WARMUP in SOLVERS:
        wall = {s: sum(r["wall_s"] for r in rows if r["solver"] == s) for s in SOLVERS}
        solved = {s: sum(r["solved"] for r in rows if r["solver"] == s) / len(keys)
                  for s in ("homotopy", NO_WARMUP)}
        extra = (f" With homo_warmup=0: mean solved {solved[NO_WARMUP]:.3f} against "
                 f"{solved['homotopy']:.3f}, total wall {wall[NO_WARMUP]:.1f} s against "
                 f"{wall['homotopy']:.1f} s (Broyden {wall['broyden']:.1f} s, fixed-point "
                 f"{wall['fixed_point_iter']:.1f} s).")
    return (f"{len(keys)} solves: homotopy solves at least as many samples as the best "
            f"TorchDEQ solver on {sum(g >= -1e-9 for g in gaps)}; on those, its wall time "
            f"over that solver's is at most 1.1 on {sum(r <= 1.1 for r in ratios)} "
            f"(median {ratios[len(ratios) // 2]:.2f}, max {ratios[-1]:.2f})." + extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[300])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-warmup", action="store_true",
                        help="also run the homotopy solver with homo_warmup=0")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for name in [c for c in list(CELLS) if c not in args.cells]:
        CELLS.pop(name)
    if args.no_warmup:
        SOLVERS.append(NO_WARMUP)
    rows = run(args.seeds, args.repeats, args.profile)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "parity.json").write_text(json.dumps(rows, indent=1))
    md = (summary(rows) + "\n\nEach entry: solved fraction / evaluations / mean residual / "
          "median wall. The best TorchDEQ solver of a cell solved the most samples, then "
          "fastest.\n\n" + table(rows) + "\n")
    (args.out / "parity.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
