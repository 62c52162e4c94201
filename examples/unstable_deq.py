"""A DEQ whose equilibria are hard, trained with each forward solver at the same budget.

    python examples/unstable_deq.py [--seeds 0 1 2 3 4] [--epochs 10] [--f_max_iter 100]

The cell z ← tanh(W z + U x + b), 64 wide, on scikit-learn's 8 × 8 digits (embedded, no
network), with no spectral normalisation or Jacobian regularisation and W initialised at
‖W‖₂ = ``--gain`` (2.5): fixed-point iteration is not a contraction there. Each forward
solver (``fixed_point_iter``, ``anderson``, ``broyden``, ``homotopy``) trains the same model
from the same seed and batches, with ``f_max_iter`` evaluations, relative tolerance 1e-4,
and the same backward (IFT, ``b_solver='broyden'``, whichever the forward). Reported:
the relative forward residual ||f(z) − z|| / ||f(z)|| over training (mean over the batch,
plotted), the fraction of training samples whose forward met the tolerance, and the test
accuracy per seed with its mean and a 95 % t-interval. Writes runs/unstable_deq/results.json
and runs/unstable_deq/residuals.png. ``--solvers ... homotopy-nowarmup`` adds the homotopy
solver with ``homo_warmup=0`` (the setting for hard cells at training budgets, e.g.
``--f_max_iter 30``).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchdeq import get_deq

import torchdeq_homotopy  # noqa: F401  (registers 'homotopy')
from homotopy_zoo.data import load_digits_data

SOLVERS = ("fixed_point_iter", "anderson", "broyden", "homotopy")
VARIANTS = {"homotopy-nowarmup": ("homotopy", {"homo_warmup": 0})}
"""Other ``--solvers`` labels: the homotopy solver with options (``homo_warmup=0``: no
warm-up, Broyden's method from the start, the setting for hard cells at small budgets)."""
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}   # t quantiles, df = n - 1


class TanhDEQ(nn.Module):
    """z* = tanh(W z* + U x + b), logits = V z*: a DEQ with an expansive start."""

    def __init__(self, solver: str, f_max_iter: int, width: int = 64, gain: float = 2.5
                 ) -> None:
        super().__init__()
        self.inject = nn.Linear(64, width)
        self.W = nn.Linear(width, width, bias=False)
        with torch.no_grad():
            self.W.weight.mul_(gain / torch.linalg.matrix_norm(self.W.weight, 2))
        self.readout = nn.Linear(width, 10)
        name, options = VARIANTS.get(solver, (solver, {}))
        self.deq = get_deq(f_solver=name, f_max_iter=f_max_iter, f_tol=1e-4, **options,
                           f_stop_mode="rel", ift=True, b_solver="broyden", b_max_iter=40)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.inject(images.flatten(1))
        f = lambda z: torch.tanh(self.W(z) + x)                 # noqa: E731
        z_out, _ = self.deq(f, torch.zeros_like(x))
        z = z_out[-1]
        with torch.no_grad():
            fz = f(z)
            residual = (fz - z).norm(dim=1) / (fz.norm(dim=1) + 1e-9)
        return self.readout(z), residual


def train(solver: str, seed: int, args: argparse.Namespace, data) -> dict:
    torch.manual_seed(seed)
    model = TanhDEQ(solver, args.f_max_iter, gain=args.gain)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loader = torch.utils.data.DataLoader(data.train, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    residuals, solved = [], []
    for _ in range(args.epochs):
        model.train()
        for images, labels in loader:
            logits, residual = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            residuals.append(float(residual.mean()))
            solved.append(float((residual <= 1e-4).float().mean()))
    model.eval()
    images = torch.stack([data.test[i][0] for i in range(len(data.test))])
    labels = torch.tensor([int(data.test[i][1]) for i in range(len(data.test))])
    with torch.no_grad():
        logits, residual = model(images)
    return dict(solver=solver, seed=seed, test_acc=float((logits.argmax(1) == labels).float()
                                                          .mean()),
                test_residual=float(residual.mean()), residuals=residuals,
                solved_fraction=statistics.mean(solved))


def interval(values: list[float]) -> str:
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.4f}"
    half = T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{mean:.4f} ± {half:.4f}"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--f_max_iter", type=int, default=100)
    parser.add_argument("--gain", type=float, default=2.5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS))
    parser.add_argument("--out", type=Path, default=Path("runs/unstable_deq"))
    args = parser.parse_args(argv)
    data = load_digits_data()
    rows = []
    for seed in args.seeds:
        for solver in args.solvers:
            rows.append(train(solver, seed, args, data))
            r = rows[-1]
            print(f"{solver:<17} seed {seed}: test acc {r['test_acc']:.4f}, training forwards "
                  f"solved {r['solved_fraction']:.3f}, final residual {r['residuals'][-1]:.2e}",
                  flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(dict(config=vars(args) | {
        "out": str(args.out)}, runs=rows), indent=1))
    print(f"\n{'solver':<17}{'test acc (95 % CI)':>24}{'forwards solved':>18}"
          f"{'mean residual, last epoch':>28}")
    steps = len(rows[0]["residuals"]) // args.epochs
    for solver in args.solvers:
        mine = [r for r in rows if r["solver"] == solver]
        last = statistics.mean(statistics.mean(r["residuals"][-steps:]) for r in mine)
        print(f"{solver:<17}{interval([r['test_acc'] for r in mine]):>24}"
              f"{statistics.mean(r['solved_fraction'] for r in mine):>18.3f}{last:>28.2e}")
    plot(rows, args)
    print(f"results: {(args.out / 'results.json').resolve()}; plot: "
          f"{(args.out / 'residuals.png').resolve()}")
    return rows


def plot(rows: list[dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, solver in enumerate(args.solvers):
        for r in (r for r in rows if r["solver"] == solver):
            ax.semilogy(r["residuals"], color=f"C{i}", alpha=0.7,
                        label=solver if r["seed"] == args.seeds[0] else None)
    ax.axhline(1e-4, color="gray", linestyle=":", label="tolerance")
    ax.set(xlabel="training step", ylabel="relative forward residual (batch mean)",
           title=f"tanh DEQ on digits, ‖W‖₂ = {args.gain:g} at start, f_max_iter "
                 f"{args.f_max_iter}, {len(args.seeds)} seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "residuals.png", dpi=120)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
