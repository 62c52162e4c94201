"""Does the homotopy solver's equilibrium leave the IFT backward worse off than Anderson's?
(issue 15: accuracy of the paper-layout DEQ trained with homotopy)

    python benchmarks/backward_residuals.py [--seed 1] [--trainer homotopy]
        [--snapshots 0 60 150]

The paper-layout DEQ (``deq_training.py``'s: 64 × 14 × 14 state on Fashion-MNIST,
``f_max_iter`` 30, IFT) trains with ``--trainer``. At each snapshot, on that step's
training batch in eval mode, TorchDEQ's ``anderson`` and the plugin's ``homotopy`` each
solve the forward (30 calls, abs. tol 1e-3, from z = 0); at each equilibrium z* the script
reports, per solver, medians over the batch of:

* the forward's relative residual ||f(z*) − z*|| / ||f(z*)||;
* the relative residual ||g − J_fᵀ g − v|| / ||v|| of TorchDEQ's default backward (40
  fixed-point steps g ← J_fᵀ g + v from g = 0, v = ∂L/∂z* of the cross-entropy), and the
  share of samples above 0.1;
* ρ, a power-iteration estimate (30 steps) of the spectral radius of J_f(z*), and the
  share of samples with ρ > 1, where the fixed-point backward diverges.

About 3 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from reference_forwards import batch
from torchdeq.solver import get_solver

import torchdeq_homotopy  # noqa: F401  (registers 'homotopy')
from homotopy_zoo.data import load_fashion_mnist
from homotopy_zoo.models import ImplicitClassifier


def row_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def at_equilibria(model: ImplicitClassifier, images: torch.Tensor, labels: torch.Tensor
                  ) -> dict[str, tuple[float, ...]]:
    """Per solver: forward residual, backward residual, share above 0.1, ρ, share ρ > 1."""
    model.eval()
    x = model.stem(images).detach()

    def f(z: torch.Tensor) -> torch.Tensor:
        return model.cell(z, x)

    out = {}
    for solver in ("anderson", "homotopy"):
        with torch.no_grad():
            z, _, _ = get_solver(solver)(f, torch.zeros_like(x), max_iter=30, tol=1e-3,
                                         stop_mode="abs")
        z = z.detach().requires_grad_()
        fz = f(z)
        v = torch.autograd.grad(F.cross_entropy(model.readout(z), labels), z)[0]

        def vjp(g: torch.Tensor, fz: torch.Tensor = fz, z: torch.Tensor = z
                ) -> torch.Tensor:                                  # J_fᵀ g
            return torch.autograd.grad(fz, z, g, retain_graph=True)[0]

        g = torch.zeros_like(v)
        for _ in range(40):                                         # g ← J_fᵀ g + v
            g = vjp(g) + v
        backward = (row_norm(g - vjp(g) - v) / row_norm(v)).detach()
        u = torch.randn_like(v)
        for _ in range(30):                                         # power iteration
            w = vjp(u)
            rho = row_norm(w) / row_norm(u)
            u = w / row_norm(w).view(-1, *([1] * (w.dim() - 1)))
        forward = (row_norm(fz - z) / row_norm(fz)).detach()
        out[solver] = (float(forward.median()), float(backward.median()),
                       float((backward > 0.1).float().mean()), float(rho.median()),
                       float((rho > 1).float().mean()))
    model.train()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--trainer", default="homotopy")
    parser.add_argument("--snapshots", type=int, nargs="+", default=[0, 60, 150])
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = load_fashion_mnist(Path("data"))
    torch.manual_seed(args.seed)
    model = ImplicitClassifier(in_channels=1, num_classes=10, width=64, dropout=0.1,
                               core="sliced", f_solver=args.trainer, f_max_iter=30, ift=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.randperm(len(data.train),
                           generator=torch.Generator().manual_seed(args.seed))
    print("| step | solver | forward rel. residual | backward rel. residual | > 0.1 | ρ(J_f) "
          "| ρ > 1 |\n|---|---|---|---|---|---|---|")
    for step in range(max(args.snapshots) + 1):
        images, labels = batch(data.train, order, step)
        if step in args.snapshots:
            for solver, (fwd, bwd, bad, rho, big) in at_equilibria(model, images,
                                                                   labels).items():
                print(f"| {step} | {solver} | {fwd:.1e} | {bwd:.2e} | {bad:.2f} | {rho:.3f} "
                      f"| {big:.2f} |", flush=True)
        if step == max(args.snapshots):
            break
        logits, _ = model(images)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


if __name__ == "__main__":
    main()
