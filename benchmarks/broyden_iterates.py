"""Broyden's phase against TorchDEQ's ``broyden``, sample by sample: calls to tolerance.

    python benchmarks/broyden_iterates.py --seeds 253-262 --width 128 --gains 3 4.5
    python benchmarks/broyden_iterates.py --seeds 250 --width 128 --gains 3 4.5 --dtype float64

Each sample of a tanh cell (``benchmarks/sweep.py``'s ``tanh_cell``: batch 8, z0 = 0, bias
scale 0.1) is solved by Broyden's good method from W = I, as the homotopy solver's λ = 1
phase runs it (:class:`~torchdeq_homotopy.secant.InverseBroyden`, memory = the budget,
merged exactly into n columns past 2n pairs as the solver does, and unmerged), and by
TorchDEQ's ``broyden_solver``. In exact arithmetic all three take the same iterates; in
float32 their roundings differ, and on cells where Broyden's method takes hundreds of
steps a single sample's count moves both ways by hundreds. The table gives, per cell, the
slowest sample and the mean over samples of the calls until the relative residual
||f(z) − z|| / ||f(z)|| first meets the tolerance (the budget where it never does);
the summary, the mean, geometric mean and unsolved count over all samples. (``--dtype
float64`` draws W and x in float64: other cells than float32's of the same seed.)
"""
from __future__ import annotations

import argparse

import torch
from sweep import tanh_cell
from torchdeq.solver import get_solver

import torchdeq_homotopy  # noqa: F401  (registers the solvers)
from torchdeq_homotopy.secant import InverseBroyden

VARIANTS = ("merged", "unmerged", "torchdeq")


def first_hit(trace: torch.Tensor, tol: float, budget: int) -> torch.Tensor:
    """Per sample, the first call whose residual meets ``tol`` (``budget`` if none);
    ``trace`` is ``(calls, B)``."""
    hit = trace <= tol
    return torch.where(hit.any(0), hit.float().argmax(0), torch.full_like(hit[0], budget,
                                                                           dtype=torch.float))


@torch.no_grad()
def plugin_calls(f, z: torch.Tensor, budget: int, tol: float, merge: bool) -> torch.Tensor:
    """Calls to tolerance per sample under the plugin's inverse Broyden model:
    δ = W (f(z) − z), z ← z + δ, with the good update after every call."""
    model = InverseBroyden(z.shape[0], z.shape[1], budget, z.dtype, z.device, merge=merge)
    trace = []
    for _ in range(budget):
        fz = f(z)
        rel = (fz - z).norm(dim=1) / fz.norm(dim=1)
        trace.append(rel)
        if bool((rel <= tol).all()):
            break
        model.observe(z, fz)
        z = z + model.step()
    return first_hit(torch.stack(trace), tol, budget)


@torch.no_grad()
def torchdeq_calls(f, z: torch.Tensor, budget: int, tol: float) -> torch.Tensor:
    """Calls to tolerance per sample under TorchDEQ's ``broyden`` (its per-sample trace of
    the lowest relative residual)."""
    _, _, info = get_solver("broyden")(f, z, max_iter=budget, tol=tol, stop_mode="rel")
    return first_hit(info["rel_trace"].T, tol, budget)


def seeds_arg(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=seeds_arg, default=seeds_arg("253-262"))
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--gains", type=float, nargs="+", default=[3.0, 4.5])
    parser.add_argument("--bias", type=float, default=0.1)
    parser.add_argument("--budget", type=int, default=1500)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = parser.parse_args()
    torch.set_num_threads(2)
    dtype = getattr(torch, args.dtype)
    totals: dict[str, list[torch.Tensor]] = {v: [] for v in VARIANTS}
    print(f"| cell | slowest sample: {' / '.join(VARIANTS)} | mean: {' / '.join(VARIANTS)} |")
    print("|---|---|---|")
    for seed in args.seeds:
        for gain in args.gains:
            params = dict(n=args.width, gain=gain, bias=args.bias, seed=seed, dtype=dtype)
            calls = {"merged": plugin_calls(*tanh_cell(**params), args.budget, args.tol,
                                                merge=True),
                     "unmerged": plugin_calls(*tanh_cell(**params), args.budget, args.tol,
                                                  merge=False),
                     "torchdeq": torchdeq_calls(*tanh_cell(**params), args.budget, args.tol)}
            for v in VARIANTS:
                totals[v].append(calls[v])
            slowest = " / ".join(f"{int(calls[v].max())}" for v in VARIANTS)
            mean = " / ".join(f"{float(calls[v].mean()):.0f}" for v in VARIANTS)
            print(f"| n={args.width} ‖W‖={gain:g} bias={args.bias:g} seed {seed} | {slowest} | "
                  f"{mean} |", flush=True)
    print()
    for v in VARIANTS:
        every = torch.cat(totals[v])
        print(f"{v}: mean {float(every.mean()):.1f}, geometric mean "
              f"{float(every.log().mean().exp()):.1f}, unsolved {int((every >= args.budget).sum())}"
              f" of {every.numel()}")


if __name__ == "__main__":
    main()
