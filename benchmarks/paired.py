"""Paired, per-seed comparison of two rows of ``benchmarks/training.py`` results.

    python benchmarks/paired.py benchmarks/results/training.json [--out FILE]

Reads any number of result files, pairs the runs of the two rows (default: the learned
and the zero start of the HomoODE core) by seed, and writes one table: per seed the test
accuracy, forward evaluations and training time of each row and their accuracy
difference; then mean ± sample standard deviation, the paired difference's standard
error and its 95 % t interval (mean ± t₀.₉₇₅,ₙ₋₁ · SE), and how many seeds came out
higher, equal and lower.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import torch

# two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(dof: int) -> float:
    """Student's t quantile t₀.₉₇₅ for ``dof`` degrees of freedom (normal beyond 30).

    Example:
        >>> t975(5), t975(100)
        (2.571, 1.96)
    """
    return _T975[dof - 1] if 1 <= dof <= len(_T975) else 1.96


def by_seed(runs: list[dict], row: str) -> dict[int, dict]:
    """The runs whose label starts with ``row``, keyed by the seed in their label."""
    out = {}
    for run in runs:
        match = re.fullmatch(re.escape(row) + r", seed (\d+)", run["label"])
        if match:
            out[int(match.group(1))] = run
    return out


def paired_table(runs: list[dict], first: str, second: str) -> str:
    a, b = by_seed(runs, first), by_seed(runs, second)
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        raise ValueError(f"need at least two seeds with both rows; found {seeds}")
    lines = [f"| seed | {first}: test acc | NFE fwd | train s | {second}: test acc | NFE fwd "
             "| train s | difference |", "|---" * 8 + "|"]
    for s in seeds:
        lines.append(f"| {s} | {a[s]['test_acc']:.4f} | {a[s]['nfe_forward']:.1f} | "
                     f"{a[s]['wall_time_s']:.0f} | {b[s]['test_acc']:.4f} | "
                     f"{b[s]['nfe_forward']:.1f} | {b[s]['wall_time_s']:.0f} | "
                     f"{a[s]['test_acc'] - b[s]['test_acc']:+.4f} |")
    acc_a = torch.tensor([a[s]["test_acc"] for s in seeds], dtype=torch.float64)
    acc_b = torch.tensor([b[s]["test_acc"] for s in seeds], dtype=torch.float64)
    nfe_a = sum(a[s]["nfe_forward"] for s in seeds) / len(seeds)
    nfe_b = sum(b[s]["nfe_forward"] for s in seeds) / len(seeds)
    diff = acc_a - acc_b
    n = len(seeds)
    se = float(diff.std()) / math.sqrt(n)
    half = t975(n - 1) * se
    lines.append(f"| **mean ± std** | **{acc_a.mean():.4f} ± {acc_a.std():.4f}** | {nfe_a:.1f} | "
                 f"| **{acc_b.mean():.4f} ± {acc_b.std():.4f}** | {nfe_b:.1f} | | "
                 f"**{diff.mean():+.4f} ± {diff.std():.4f}** |")
    higher, equal = int((diff > 0).sum()), int((diff == 0).sum())
    lines += ["", f"{n} seeds. Paired difference (first − second): mean {100 * diff.mean():+.2f} "
              f"points, standard error {100 * se:.2f}, 95 % interval "
              f"[{100 * (diff.mean() - half):+.2f}, {100 * (diff.mean() + half):+.2f}] points; "
              f"first higher in {higher}, equal in {equal}, lower in {n - higher - equal}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="result JSON files of benchmarks/training.py")
    parser.add_argument("--first", default="HomoODE, learned z0, direct")
    parser.add_argument("--second", default="HomoODE, zero z0 (plain odeint)")
    parser.add_argument("--out", default=None, help="write the table here too")
    args = parser.parse_args()
    runs = [run for path in args.results for run in json.loads(Path(path).read_text())]
    text = paired_table(runs, args.first, args.second)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
