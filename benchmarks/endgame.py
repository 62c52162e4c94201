"""Path ends: does every sample whose path reaches λ = 1 converge there?

    python benchmarks/endgame.py [--seeds 10-14] [--out benchmarks/results/endgame.md]

Pure path tracking with the secant solver (``homo_linear_solver='secant'``, no warm-up,
Broyden's phase handing its samples to the path after 10 steps without a new lowest
residual) on expansive tanh cells tanh(W z + x), x ~ 0.1 · N(0, 1), float32, start z = 0,
stop mode 'rel', tolerance 1e-5:

* 64 wide, batch 4, budget 6,000, ‖W‖₂ 6 and 8, every seed given;
* 128 wide, batch 8, budget 20,000, ‖W‖₂ 8, the first two seeds given.

Per cell: the samples at λ = 1 when the solve ended, how many of them meet the tolerance
(recomputed from f), all samples solved, and wall time. To compare two versions of the
endgame, run the script from a checkout of each (``git worktree add /tmp/old REV``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from sweep import relative_residual, tanh_cell

from torchdeq_homotopy import homotopy_solver

TOL = 1e-5
PATH_ONLY = dict(homo_linear_solver="secant", homo_secant_patience=10, homo_warmup=0)


def seeds_from(text: str) -> list[int]:
    """'10-14' or '10,12' → a list of seeds."""
    if "-" in text:
        lo, hi = map(int, text.split("-"))
        return list(range(lo, hi + 1))
    return [int(s) for s in text.split(",")]


def run(n: int, gain: float, seed: int, bsz: int, budget: int) -> dict:
    """One cell: samples at λ = 1, solved among them, solved in all, wall time."""
    f, z0 = tanh_cell(n, gain, 0.1, seed, bsz=bsz)
    start = time.perf_counter()
    with torch.no_grad():
        z, _, info = homotopy_solver(f, z0, max_iter=budget, tol=TOL, stop_mode="rel",
                                     **PATH_ONLY)
    wall = time.perf_counter() - start
    solved = relative_residual(f, z) <= TOL
    at_one = info["lam"] >= 1
    return dict(n=n, gain=gain, seed=seed, batch=bsz, budget=budget,
                at_one=int(at_one.sum()), solved_at_one=int((solved & at_one).sum()),
                solved=int(solved.sum()), wall_s=wall)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="10-14")
    parser.add_argument("--out", default="benchmarks/results/endgame.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    seeds = seeds_from(args.seeds)
    cells = [(64, g, s, 4, 6000) for s in seeds for g in (6.0, 8.0)]
    cells += [(128, 8.0, s, 8, 20000) for s in seeds[:2]]
    rows = []
    for cell in cells:
        rows.append(run(*cell))
        r = rows[-1]
        print(f"n={r['n']} ‖W‖={r['gain']:g} seed {r['seed']}: at λ = 1 {r['at_one']}, "
              f"solved there {r['solved_at_one']}, solved {r['solved']} of {r['batch']}, "
              f"{r['wall_s']:.1f} s", flush=True)
    lines = ["| cell | budget | at λ = 1 | solved there | solved | wall s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| tanh n={r['n']} ‖W‖={r['gain']:g} (seed {r['seed']}) | {r['budget']} | "
              f"{r['at_one']} of {r['batch']} | {r['solved_at_one']} | {r['solved']} | "
              f"{r['wall_s']:.1f} |" for r in rows]
    total = {k: sum(r[k] for r in rows) for k in ("at_one", "solved_at_one", "solved", "batch")}
    lines.append(f"| all | | {total['at_one']} of {total['batch']} | {total['solved_at_one']} | "
                 f"{total['solved']} | {sum(r['wall_s'] for r in rows):.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
