"""What a path costs above the dense size, and whether stalled Broyden samples should take it.

    python benchmarks/path_cost.py --cost --seeds 201 202 203 --widths 64 128
    python benchmarks/path_cost.py --compare --seeds 207 208 209 --widths 64 128
    python benchmarks/path_cost.py --cost --seeds 207 208 209 --widths 128 \
        --options '{"homo_secant_rank": 128}'

Cells: tanh(W z + x), W Gaussian scaled to ‖W‖₂ = gain, x ~ bias · N(0, 1), batch 8,
float32, start z = 0, relative tolerance 1e-5 (``benchmarks/sweep.py``'s cells).

``--cost`` (budget 20,000): samples enter the path early (``homo_secant_patience=100``); a
sample's path cost is the evaluations of the batch from its first iterate with λ < 1 to the
one from which it stays at λ = 1 (``info['lam_trace']``, ``info['trace_nfe']``); a path that never
returns is counted as unfinished. ``--options`` (a JSON object of ``homo_*`` keys) changes the
solver's settings; the table then also counts the samples solved and the Krylov products.
With ``--compare`` it adds a column: the default with those settings.

``--compare`` (budget 2,000): the default; ``homo_secant_patience`` set to a third of the
budget, which is the default's patience without its condition that 32 n evaluations be left
(the rule before that condition); Broyden's phase never left
(``homo_secant_patience=10**6``); and TorchDEQ's ``broyden``. Samples solved per cell.
``--configs`` runs a subset of these columns (``default third never broyden``).

Writes ``benchmarks/results/path_cost/{cost,compare}_<seeds>.md``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from sweep import relative_residual, tanh_cell
from torchdeq.solver import get_solver

import torchdeq_homotopy  # noqa: F401  (registers the solvers)

TOL = 1e-5
GAINS = (3.0, 4.5, 6.0, 8.0)
BIASES = (0.1, 1.0)


def solve(solver: str, n: int, gain: float, bias: float, seed: int, budget: int,
          **options) -> tuple[torch.Tensor, dict, float, torch.Tensor]:
    """One solve: (solved mask, info, wall seconds, z)."""
    f, x0 = tanh_cell(n, gain, bias, seed)
    start = time.perf_counter()
    with torch.no_grad():
        z, _, info = get_solver(solver)(f, x0, max_iter=budget, tol=TOL, stop_mode="rel",
                                        **options)
    wall = time.perf_counter() - start
    return relative_residual(f, z) <= TOL, info, wall, z


def path_costs(info: dict) -> list[float | None]:
    """Per sample that entered the path: the batch's evaluations from its first λ < 1 to
    the column from which it stays at λ = 1 (its endgame, or converged; None: it ends the
    solve off λ = 1). A point predicted past λ = 1 is evaluated at λ ≥ 1 too, and when
    its corrector rejects it the path goes on: only staying counts as finishing."""
    lam, nfe = info["lam_trace"], info["trace_nfe"]
    costs = []
    for row in lam:
        on = (row < 1).nonzero()
        if len(on) == 0:
            continue
        first, last_below = int(on[0]), int(on[-1])
        costs.append(None if last_below == len(row) - 1
                     else float(nfe[last_below + 1] - nfe[first]))
    return costs


def cost(seeds: list[int], widths: list[int], budget: int, options: dict) -> str:
    lines = ["| n | paths | finished | median cost of finished (evaluations) | quartiles "
             "| samples solved | Krylov products |", "|---|---|---|---|---|---|---|"]
    for n in widths:
        finished, unfinished, solved_total, samples, products = [], 0, 0, 0, 0
        for seed in seeds:
            for gain in GAINS[1:]:
                for bias in BIASES:
                    solved, info, wall, _ = solve("homotopy", n, gain, bias, seed, budget,
                                                  **{"homo_secant_patience": 100, **options})
                    solved_total += int(solved.sum())
                    samples += solved.numel()
                    products += info["krylov_products"]
                    costs = path_costs(info)
                    finished += [c for c in costs if c is not None]
                    unfinished += sum(c is None for c in costs)
                    print(f"n {n} seed {seed} ‖W‖ {gain:g} bias {bias:g}: paths {costs}, "
                          f"solved {int(solved.sum())} ({wall:.1f}s)", flush=True)
        quart = (statistics.quantiles(finished, n=4) if len(finished) > 1 else [float("nan")] * 3)
        median = statistics.median(finished) if finished else float("nan")
        lines.append(f"| {n} | {len(finished) + unfinished} | {len(finished)} | {median:.0f} "
                     f"| {quart[0]:.0f}–{quart[2]:.0f} | {solved_total} / {samples} | {products} |")
    return "\n".join(lines)


CONFIGS = ("default", "third", "never", "broyden")


def compare(seeds: list[int], widths: list[int], budget: int, options: dict,
            chosen: tuple[str, ...] = CONFIGS) -> str:
    configs = {name: config for key, (name, config) in {
        "default": ("default", ("homotopy", {})),
        "third": ("third, unconditional", ("homotopy", {"homo_secant_patience": budget // 3})),
        "never": ("never leave", ("homotopy", {"homo_secant_patience": 10 ** 6})),
        "broyden": ("broyden", ("broyden", {}))}.items() if key in chosen}
    if options:
        configs[f"default with {json.dumps(options)}"] = ("homotopy", options)
    totals = {name: [0, 0.0] for name in configs}
    lines = ["| cell | " + " | ".join(configs) + " |", "|---" * (len(configs) + 1) + "|"]
    for seed in seeds:
        for n in widths:
            for gain in GAINS:
                for bias in BIASES:
                    cells = []
                    for name, (solver, options) in configs.items():
                        solved, _, wall, _ = solve(solver, n, gain, bias, seed, budget,
                                                   **options)
                        totals[name][0] += int(solved.sum())
                        totals[name][1] += wall
                        cells.append(f"{int(solved.sum())} / {wall:.1f}s")
                    line = f"| n={n} ‖W‖={gain:g} bias={bias:g} (seed {seed}) | " + \
                        " | ".join(cells) + " |"
                    print(line, flush=True)
                    lines.append(line)
    lines.append("| **samples solved / wall time** | " + " | ".join(
        f"**{s}** / {w:.0f}s" for s, w in totals.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--cost", action="store_true")
    mode.add_argument("--compare", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[201, 202, 203])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--budget", type=int, default=None,
                        help="evaluations (default 20,000 for --cost, 2,000 for --compare)")
    parser.add_argument("--options", type=json.loads, default={},
                        help="homo_* keys as a JSON object (--compare: one more column), e.g. "
                             "'{\"homo_secant_rank\": 128}'")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS),
                        help="--compare: the columns to run (TorchDEQ's broyden keeps every "
                             "pair: slow at large budgets)")
    parser.add_argument("--out", default="benchmarks/results/path_cost")
    args = parser.parse_args()
    torch.set_num_threads(2)
    budget = args.budget or (20000 if args.cost else 2000)
    text = (cost(args.seeds, args.widths, budget, args.options) if args.cost
            else compare(args.seeds, args.widths, budget, args.options, tuple(args.configs)))
    subset = args.compare and set(args.configs) != set(CONFIGS)
    header = (f"Seeds {args.seeds}, widths {args.widths}, budget {budget}, batch 8, float32, "
              f"rel. tol {TOL:g}; `python benchmarks/path_cost.py "
              f"{'--cost' if args.cost else '--compare'} --seeds "
              f"{' '.join(map(str, args.seeds))} --widths {' '.join(map(str, args.widths))}"
              + (f" --budget {budget}" if args.budget else "")
              + (f" --options '{json.dumps(args.options)}'" if args.options else "")
              + (f" --configs {' '.join(args.configs)}" if subset else "") + "`\n\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "cost" if args.cost else "compare"
    suffix = "_" + "-".join(map(str, args.seeds)) + (f"_budget{budget}" if args.budget else "") \
        + ("_" + "-".join(args.configs) if subset else "") + "".join(
        f"_{key.removeprefix('homo_')}{value}" for key, value in args.options.items())
    (out / f"{name}{suffix}.md").write_text(header + text + "\n")
    print(text)


if __name__ == "__main__":
    main()
