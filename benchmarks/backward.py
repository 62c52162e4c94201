"""The backward pass: which ``b_solver`` for the IFT system (I − J_fᵀ) g = ∂L/∂z*.

    python benchmarks/backward.py [--seeds 400 401] [--repeats 3]

Cells tanh(W z + U x) in float64, batch 16, widths 32 and 128, ‖W‖₂ ∈ {0.9, 2, 4}. The
forward pass is solved tightly (homotopy, tol 1e-10) so that every backward solver starts
from the same equilibrium; each ``b_solver`` then runs at TorchDEQ's defaults
(``b_max_iter`` 40, ``b_tol`` 1e-6, ``b_stop_mode`` 'abs'). The exact gradient solves the
same system densely: J = ∂f/∂z at z* per sample (analytic, checked by torch.func.jacrev),
g = (I − Jᵀ)⁻¹ ∂L/∂z* (torch.linalg.solve), ∂L/∂W = gᵀ ∂f/∂W. Reported: relative error
of ∂L/∂W, the backward's median wall time, and the median spectral radius ρ(J)
(fixed-point iteration on the backward system converges only where ρ(J) < 1).
Writes benchmarks/results/backward.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.func import jacrev
from torchdeq import get_deq

import torchdeq_homotopy  # noqa: F401  (registers the solvers)

B_SOLVERS = ["fixed_point_iter", "anderson", "broyden", "newton_krylov", "homotopy"]


def make_cell(n: int, gain: float, seed: int, bsz: int = 16):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=torch.float64)
    W = (W / torch.linalg.matrix_norm(W, 2) * gain).requires_grad_()
    U = (torch.randn(n, n, generator=g, dtype=torch.float64) / n ** 0.5).requires_grad_()
    x = torch.randn(bsz, n, generator=g, dtype=torch.float64)
    c = torch.randn(bsz, n, generator=g, dtype=torch.float64)     # L = Σ c · z*

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ W.T + x @ U.T)
    return f, W, c, torch.zeros(bsz, n, dtype=torch.float64)


def exact_gradient(f, W: torch.Tensor, z_star: torch.Tensor, c: torch.Tensor):
    """∂L/∂W by a dense solve of (I − Jᵀ) g = c per sample, and ρ(J) per sample."""
    z = z_star.detach()
    # per sample, J = ∂f/∂z = diag(1 − f(z)²) W for f(z) = tanh(W z + U x); checked
    # against torch.func.jacrev on the first sample
    fz = f(z).detach()
    J = (1 - fz ** 2).unsqueeze(-1) * W.detach()                      # (B, n, n)
    first = jacrev(lambda zi: f(torch.cat([zi[None], z[1:]]))[0])(z[0])
    torch.testing.assert_close(J[0], first.detach())
    eye = torch.eye(z.shape[1], dtype=z.dtype)
    g = torch.linalg.solve(eye - J.transpose(1, 2), c.unsqueeze(-1)).squeeze(-1)
    (grad,) = torch.autograd.grad(f(z), W, g)
    radius = torch.linalg.eigvals(J).abs().max(dim=1).values
    return grad, radius


def run(seeds: list[int], repeats: int) -> list[dict]:
    rows = []
    for n in (32, 128):
        for gain in (0.9, 2.0, 4.0):
            for seed in seeds:
                f, W, c, z0 = make_cell(n, gain, seed)
                solve = get_deq(f_solver="homotopy", f_max_iter=4000, f_tol=1e-10)
                with torch.no_grad():
                    z_star = solve(f, z0)[0][-1]
                solved = float((f(z_star) - z_star).norm(dim=1).max())
                exact, radius = exact_gradient(f, W, z_star, c)
                for b_solver in B_SOLVERS:
                    walls, error = [], float("nan")
                    for _ in range(repeats):
                        deq = get_deq(f_solver="homotopy", f_max_iter=4000, f_tol=1e-10,
                                      ift=True, b_solver=b_solver)
                        z_out = deq(f, z_star.detach().clone())[0][-1]
                        loss = (c * z_out).sum()
                        W.grad = None
                        start = time.perf_counter()
                        loss.backward()
                        walls.append(time.perf_counter() - start)
                        error = float((W.grad - exact).norm() / exact.norm())
                    row = dict(n=n, gain=gain, seed=seed, b_solver=b_solver,
                               rel_error=error, backward_s=statistics.median(walls),
                               spectral_radius=float(radius.median()),
                               forward_residual=solved)
                    rows.append(row)
                    print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in row.items()), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| cell | median ρ(J) | " + " | ".join(B_SOLVERS) + " |",
             "|---|---|" + "---|" * len(B_SOLVERS)]
    keys = list(dict.fromkeys((r["n"], r["gain"], r["seed"]) for r in rows))
    for key in keys:
        group = {r["b_solver"]: r for r in rows if (r["n"], r["gain"], r["seed"]) == key}
        radius = next(iter(group.values()))["spectral_radius"]
        cells = [f"{group[s]['rel_error']:.1e} / {1e3 * group[s]['backward_s']:.1f} ms"
                 for s in B_SOLVERS]
        lines.append(f"| n={key[0]} ‖W‖={key[1]:g} (seed {key[2]}) | {radius:.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[400, 401])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = run(args.seeds, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backward.json").write_text(json.dumps(rows, indent=1))
    md = ("Each entry: relative error of ∂L/∂W against a dense solve / median backward wall "
          "time. TorchDEQ's backward defaults: b_max_iter 40, b_tol 1e-6, abs.\n\n"
          + table(rows) + "\n")
    (args.out / "backward.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
