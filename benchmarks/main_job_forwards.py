"""The main job's DEQ through training: each forward's time with Anderson and with the
homotopy solver, on the same model and batch.

    python benchmarks/main_job_forwards.py [--steps 220] [--every 10]

The README main job's DEQ (``homotopy_zoo``'s classifier, width 16 on the embedded 8 × 8
digits: a 16 × 4 × 4 state) trains with Anderson (``f_max_iter`` 30, ``f_tol`` 1e-3, Adam
1e-3, batch 64 drawn with replacement, seed 0). Every ``--every`` steps, in training mode
(batch statistics in the stem, one dropout mask per forward), TorchDEQ's ``anderson`` and
the plugin's ``homotopy`` solve that step's forward at the same settings, in alternating
order, without gradient; reported per snapshot: each solver's wall time and calls of f, and
the ratio of the times. ``benchmarks/call_overhead.py`` measures the first forward alone,
with repeats. ``--baseline DIR`` also solves each snapshot with another version of the
plugin (DIR holds its ``torchdeq_homotopy`` package, e.g. ``git archive REV
torchdeq_homotopy | tar -x -C DIR``), in a column ``baseline``, the solvers' order turned
by one at every snapshot. About 30 seconds on 2 CPU cores (45 with a baseline).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from benign_time import BASELINE, load_baseline, turned
from torchdeq import get_deq, reset_deq
from torchdeq.solver import register_solver

import torchdeq_homotopy  # noqa: F401  (registers 'homotopy')
from homotopy_zoo.data import load_digits_data
from homotopy_zoo.models import ImplicitClassifier

SOLVERS = ["anderson", "homotopy"]


def timed_forward(model: ImplicitClassifier, deq, x: torch.Tensor) -> tuple[float, int]:
    """Seconds and calls of f for one forward of ``deq`` on the cell at stem output x."""
    calls = 0

    def f(z: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return model.cell(z, x)

    reset_deq(model)
    start = time.perf_counter()
    deq(f, torch.zeros_like(x))
    return time.perf_counter() - start, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=220)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                        help="also time the torchdeq_homotopy package under DIR")
    args = parser.parse_args()
    torch.set_num_threads(2)
    solvers = list(SOLVERS)
    if args.baseline is not None:
        load_baseline(args.baseline)
        register_solver("baseline", BASELINE["baseline"])
        solvers.append("baseline")
    torch.manual_seed(0)
    data = load_digits_data()
    model = ImplicitClassifier(1, 10, width=16, core="sliced", f_solver="anderson",
                               f_max_iter=30, f_tol=1e-3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    deqs = {s: get_deq(core="sliced", f_solver=s, f_max_iter=30, f_tol=1e-3) for s in solvers}
    draw = torch.Generator().manual_seed(0)
    totals = dict.fromkeys(solvers, 0.0)
    print("| step | " + " | ".join(f"{s} ms (calls)" for s in solvers)
          + " | ratio |" * (len(solvers) - 1) + "\n|" + "---|" * (2 * len(solvers)))
    for step in range(args.steps):
        idx = torch.randint(len(data.train), (64,), generator=draw)
        images = torch.stack([data.train[i][0] for i in idx])
        labels = torch.tensor([int(data.train[i][1]) for i in idx])
        model.train()
        if step % args.every == 0:
            with torch.no_grad():
                x = model.stem(images)
                order = turned(solvers, step // args.every)
                runs = {s: timed_forward(model, deqs[s], x) for s in order}
            for s in solvers:
                totals[s] += runs[s][0]
            cells = [f"{1e3 * runs[s][0]:.1f} ({runs[s][1]})" for s in solvers]
            ratios = [f"{runs[s][0] / runs['anderson'][0]:.2f}" for s in solvers[1:]]
            print(f"| {step} | " + " | ".join(cells + ratios) + " |", flush=True)
        reset_deq(model)
        logits, _ = model(images)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print("\nAll snapshots: " + ", ".join(
        f"{s} {totals[s] / totals['anderson']:.2f}×" for s in solvers[1:]) + " Anderson's time.")


if __name__ == "__main__":
    main()
