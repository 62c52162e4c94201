"""A cell where fixed-point iteration and Anderson fail and Broyden solves about half the
samples; the homotopy solver at its default, and with exact Newton steps and dense path
solves (``homo_linear_solver='dense'``). Plots residual against evaluations, and the path
λ(s) of one sample.

    python examples/hard_equilibria.py [--out runs/hard_equilibria.png]

The cell is one of the benchmark's test cells (tanh, 32 wide, ‖W‖₂ = 5, seed 43, batch 64,
relative tolerance 1e-4, 2,000 evaluations). Measured output (2-core CPU):
fixed_point_iter 0.00, anderson 0.00, broyden 0.53, homotopy 0.66, homotopy (dense) 0.80 of
the samples solved. At its default the homotopy solver takes exact Newton steps first, then
Broyden's method from z0 for the samples where Newton stalled, then the path: 8 samples of 64
more than Broyden here (1 more in the round before, 9 more before that: the Broyden stage's
float32 rounding, which moves with the order of its sums, decides many samples on this cell).
``homo_linear_solver='dense'`` (exact Newton, then the path) solves more on this cell but
fewer on others: on 64 other 32-wide cells 0.9897 against the default's 0.9990
(BENCHMARKS.md, "Small states").
"""
import argparse

import torch
from torchdeq.solver import get_solver

import torchdeq_homotopy  # noqa: F401


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/hard_equilibria.png")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(43)
    n, bsz, budget, tol = 32, 64, 2000, 1e-4
    W = torch.randn(n, n, generator=g)
    W = W / torch.linalg.matrix_norm(W, 2) * 5.0        # ‖W‖₂ = 5: strongly expansive
    x = 0.1 * torch.randn(bsz, n, generator=g)
    f = lambda z: torch.tanh(z @ W.T + x)                  # noqa: E731
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_path) = plt.subplots(1, 2, figsize=(11, 4))
    runs = [("fixed_point_iter", {}), ("anderson", {}), ("broyden", {}), ("homotopy", {}),
            ("homotopy", {"homo_linear_solver": "dense"})]
    for solver, keys in runs:
        with torch.no_grad():
            z, _, info = get_solver(solver)(f, torch.zeros(bsz, n), max_iter=budget, tol=tol,
                                            stop_mode="rel", **keys)
        res = (f(z) - z).norm(dim=1) / f(z).norm(dim=1)
        name = solver + (" (dense)" if keys else "")
        print(f"{name:<18} solved {(res <= tol).float().mean():.2f}  max relative residual "
              f"{res.max():.2e}")
        steps = info["trace_nfe"] if "trace_nfe" in info else torch.arange(
            info["abs_trace"].shape[1])
        trace = info["rel_trace"].clamp_max(1e2).median(dim=0).values
        ax.semilogy(steps[1:], trace[1:], label=name)
    ax.set(xlabel="evaluations", ylabel="median ||f(z) - z|| / ||f(z)||",
           title="tanh cell, n = 32, ‖W‖₂ = 5, batch 64")
    ax.legend()
    # λ along the path: pure path tracking (no warm-up or Newton phase) from z0 = 0.
    with torch.no_grad():
        _, _, info = get_solver("homotopy")(f, torch.zeros(bsz, n), max_iter=budget, tol=tol,
                                            stop_mode="rel", homo_warmup=0, homo_newton_iters=0)
    lams = info["lam_trace"][0]
    ax_path.plot(info["trace_nfe"], lams, marker=".")
    ax_path.set(xlabel="evaluations (along the path)", ylabel="λ of sample 0")
    fig.tight_layout()
    from pathlib import Path

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
