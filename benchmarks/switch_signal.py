"""Could a per-sample rule see early which of Anderson and Broyden's method ends lower at a
training budget? (issue 15: the paper-layout forward at initialization)

    python benchmarks/switch_signal.py [--seeds 300 301 302] [--budget 30]
        [--out benchmarks/results/switch_signal.md]

At initialization the paper-layout DEQ's forward converges under no solver. Its first
fixed-point step grows the residuals, so the homotopy solver's samples take Broyden's
method after one call, and they end above the state TorchDEQ's Anderson returns. On hard
64-wide tanh cells the same switch is what lets the solver match Broyden. This script asks
whether anything a rule can measure in the first calls tells the two cases apart:

1. The hard 64-wide tanh cells of ``moderate_budget.py`` (‖W‖₂ 3, 4, 5, bias 0.5 and 1,
   batch 32, seeds ``--seeds``): TorchDEQ's ``anderson`` at ``max_iter`` = budget and its
   ``broyden`` at budget − 1 (equal evaluations), relative tolerance 1e-4, from z = 0,
   each sample's relative residual ||f(z) − z|| / ||f(z)|| after every call. Samples are
   binned by (a) Anderson's rate per call over calls 2–6, and (b) that rate over calls
   2–10 divided by Broyden's. Per bin: samples, the geometric mean of the ratio of their
   lowest residuals (Anderson / Broyden), the share where Anderson ends lower, and the
   share each solves.
2. The paper-layout DEQ at initialization (``reference_forwards.py``'s model and first
   held-out batch, seed 1, ``--paper-batch`` samples, abs. tol 1e-3): the same two
   statistics, and each solver's mean lowest residual.

About 10 seconds on 2 CPU cores.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from sweep import tanh_cell
from torchdeq.solver import get_solver

RATE_BINS = [(0.0, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 0.95), (0.95, 1.0), (1.0, 9.0)]
RATIO_BINS = [(0.0, 0.9), (0.9, 0.95), (0.95, 1.0), (1.0, 1.05), (1.05, 1.1), (1.1, 9.0)]


def residual_traces(f, x0: torch.Tensor, solver: str, calls: int, tol: float,
                    stop_mode: str) -> torch.Tensor:
    """Each sample's relative residual after every call of f, ``(calls made, batch)``."""
    trace = []

    def logged(z: torch.Tensor) -> torch.Tensor:
        fz = f(z)
        trace.append((fz - z).flatten(1).norm(dim=1)
                     / fz.flatten(1).norm(dim=1).clamp_min(1e-12))
        return fz

    max_iter = calls - 1 if solver == "broyden" else calls   # broyden calls f once more
    with torch.no_grad():
        get_solver(solver)(logged, x0, max_iter=max_iter, tol=tol, stop_mode=stop_mode)
    return torch.stack(trace)


def signals(anderson: torch.Tensor, broyden: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per sample: Anderson's rate per call over calls 2–6 (ρ = (r_6 / r_2)^{1/4}), its rate
    over calls 2–10 over Broyden's, and both lowest residuals."""
    rate = (anderson[6] / anderson[2]).pow(1 / 4)
    ratio = (anderson[10] / anderson[2]).pow(1 / 8) / (broyden[10] / broyden[2]).pow(1 / 8)
    return dict(rate=rate, ratio=ratio, anderson=anderson.amin(0), broyden=broyden.amin(0))


def binned(rows: dict[str, torch.Tensor], key: str, bins: list[tuple[float, float]],
           tol: float) -> list[str]:
    lines = [f"| {key} | samples | lowest residual, Anderson / Broyden (geo. mean) | "
             "Anderson ends lower | Anderson solves | Broyden solves |",
             "|---|---|---|---|---|---|"]
    a, b = rows["anderson"], rows["broyden"]
    for lo, hi in bins:
        m = (rows[key] >= lo) & (rows[key] < hi)
        if not bool(m.any()):
            continue
        ratio = (a[m].log() - b[m].log()).mean().exp()
        lines.append(f"| [{lo}, {hi}) | {int(m.sum())} | {ratio:.2f} | "
                     f"{(a[m] < b[m]).float().mean():.2f} | {(a[m] <= tol).float().mean():.2f} | "
                     f"{(b[m] <= tol).float().mean():.2f} |")
    return lines


def tanh_cells(seeds: list[int], budget: int) -> dict[str, torch.Tensor]:
    parts = []
    for seed in seeds:
        for gain in (3.0, 4.0, 5.0):
            for bias in (0.5, 1.0):
                f, x0 = tanh_cell(64, gain, bias, seed, bsz=32)
                parts.append(signals(residual_traces(f, x0, "anderson", budget, 1e-4, "rel"),
                                     residual_traces(f, x0, "broyden", budget, 1e-4, "rel")))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def paper_layout(budget: int, samples: int) -> dict[str, torch.Tensor]:
    from reference_forwards import batch

    from homotopy_zoo.data import load_fashion_mnist
    from homotopy_zoo.models import ImplicitClassifier
    data = load_fashion_mnist(Path("data"))
    torch.manual_seed(1)
    model = ImplicitClassifier(in_channels=1, num_classes=10, width=64, dropout=0.1,
                               core="sliced", f_solver="anderson", f_max_iter=budget,
                               ift=True).eval()
    held_out = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = model.stem(batch(data.test, held_out, 0)[0][:samples])

    def f(z: torch.Tensor) -> torch.Tensor:
        return model.cell(z, x)

    x0 = torch.zeros_like(x)
    return signals(residual_traces(f, x0, "anderson", budget, 1e-3, "abs"),
                   residual_traces(f, x0, "broyden", budget, 1e-3, "abs"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[300, 301, 302])
    parser.add_argument("--budget", type=int, default=30)
    parser.add_argument("--paper-batch", type=int, default=32)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "switch_signal.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tanh = tanh_cells(args.seeds, args.budget)
    paper = paper_layout(args.budget, args.paper_batch)
    lines = [f"Budget {args.budget} evaluations (Broyden `max_iter` {args.budget - 1}); "
             f"tanh cells 64 wide, seeds {args.seeds}, rel. tol 1e-4; paper-layout DEQ at "
             f"initialization, {args.paper_batch} samples, relative residuals. "
             "`python benchmarks/switch_signal.py`.", "",
             f"Hard tanh cells ({len(tanh['rate'])} samples), by Anderson's rate per call "
             "over calls 2–6:", ""]
    lines += binned(tanh, "rate", RATE_BINS, 1e-4)
    lines += ["", "The same samples, by Anderson's rate over calls 2–10 divided by "
              "Broyden's:", ""]
    lines += binned(tanh, "ratio", RATIO_BINS, 1e-4)
    lines += ["", "Paper-layout DEQ at initialization: Anderson's rate over calls 2–6 "
              f"{paper['rate'].min():.3f}–{paper['rate'].max():.3f} (median "
              f"{paper['rate'].median():.3f}); over calls 2–10 divided by Broyden's "
              f"{paper['ratio'].min():.3f}–{paper['ratio'].max():.3f} (median "
              f"{paper['ratio'].median():.3f}); lowest relative residual, mean: Anderson "
              f"{paper['anderson'].mean():.3f}, Broyden {paper['broyden'].mean():.3f}; "
              f"Anderson ends lower on {(paper['anderson'] < paper['broyden']).float().mean():.2f}"
              " of its samples."]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
