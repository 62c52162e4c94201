"""Forwards of a DEQ whose equilibria are hard, every solver on the same models.

    python benchmarks/training_snapshots.py [--seeds 8 9] [--budgets 30 40 60]
        [--out benchmarks/results/training_snapshots.md]

Training runs with different solvers part after a few steps, so their forward statistics
(``examples/unstable_deq.py``) compare different models. Here one model per seed,
``examples/unstable_deq.py``'s ``TanhDEQ`` (64 wide, no spectral normalisation, W started
at ‖W‖₂ = 2.5, the digits, Adam 1e-3, batch 64), trains 10 epochs with TorchDEQ's
``broyden`` at ``f_max_iter`` 30; every 12 steps the training batch's forward is solved from
z = 0 by each solver at each budget, relative tolerance 1e-4:

* ``broyden``: TorchDEQ's at ``max_iter`` = budget − 1, which makes budget evaluations (it
  evaluates f once more than ``max_iter``), and at ``max_iter`` = budget (budget + 1);
* ``anderson``, ``homotopy`` and ``homotopy`` with ``homo_warmup=0`` (Broyden's iterates):
  budget evaluations.

Reported: the fraction of samples whose returned state meets the tolerance (recomputed),
mean over snapshots. About 2 minutes per seed on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from sweep import relative_residual
from torchdeq.solver import get_solver

import torchdeq_homotopy  # noqa: F401  (registers 'homotopy')
from homotopy_zoo.data import load_digits_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from unstable_deq import TanhDEQ

TOL, TRAIN_BUDGET, EVERY = 1e-4, 30, 12
RUNS = (("broyden, equal evaluations", "broyden", -1, {}),
        ("broyden at max_iter", "broyden", 0, {}),
        ("anderson", "anderson", 0, {}),
        ("homotopy", "homotopy", 0, {}),
        ("homotopy, homo_warmup=0", "homotopy", 0, {"homo_warmup": 0}))


def snapshots(seed: int, epochs: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(W, injected input) of the training batch every ``EVERY`` steps of a Broyden-trained
    model."""
    data = load_digits_data()
    torch.manual_seed(seed)
    model = TanhDEQ("broyden", TRAIN_BUDGET)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(data.train, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    out, step = [], 0
    for _ in range(epochs):
        for images, labels in loader:
            if step % EVERY == 0:
                with torch.no_grad():
                    out.append((model.W.weight.detach().clone(),
                                model.inject(images.flatten(1))))
            logits, _ = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    return out


@torch.no_grad()
def met(W: torch.Tensor, x: torch.Tensor, solver: str, max_iter: int, options: dict) -> float:
    """Fraction of the batch whose returned state meets the relative tolerance."""
    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ W.T + x)

    z, _, _ = get_solver(solver)(f, torch.zeros_like(x), max_iter=max_iter, tol=TOL,
                                 stop_mode="rel", **options)
    return float((relative_residual(f, z) <= TOL).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[8, 9])
    parser.add_argument("--budgets", type=int, nargs="+", default=[30, 40, 60])
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/training_snapshots.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    models = [snap for seed in args.seeds for snap in snapshots(seed)]
    lines = [f"Command: `python benchmarks/training_snapshots.py {' '.join(sys.argv[1:])}`",
             "", f"{len(models)} snapshots (seeds {args.seeds}, every {EVERY} steps), batch "
             f"64, rel. tol {TOL:g}; fraction of samples meeting it, mean over snapshots.", "",
             "| solver | " + " | ".join(f"budget {b}" for b in args.budgets) + " |",
             "|---|" + "---|" * len(args.budgets)]
    for label, solver, delta, options in RUNS:
        cells = [sum(met(W, x, solver, budget + delta, options) for W, x in models)
                 / len(models) for budget in args.budgets]
        lines.append(f"| {label} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text + f"wrote {args.out}")


if __name__ == "__main__":
    main()
