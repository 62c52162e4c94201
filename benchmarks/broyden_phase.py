"""Cost per evaluation of Broyden's method at λ = 1: TorchDEQ's ``broyden`` against the
homotopy solver's Broyden phase, side by side.

    python benchmarks/broyden_phase.py [--widths 32 128] [--steps 400 1500] [--repeats 3]

Cell: tanh(W z + x) of ``sweep.py`` (‖W‖₂ = 6, bias 1, seed 201, batch 8, float32). Both
solvers take exactly ``steps`` evaluations (tolerance 1e-30, so nothing converges); the
homotopy solver without warm-up and with an unlimited stall patience, so that every
evaluation is a Broyden step (its iterates are TorchDEQ's, without line search). Also timed:
the bare model (:class:`~torchdeq_homotopy.secant.InverseBroyden`, f and the step, nothing
else), the floor of any Broyden phase built on it. Reports the median over ``repeats`` of
milliseconds per evaluation.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from sweep import tanh_cell
from torchdeq.solver import get_solver

import torchdeq_homotopy  # noqa: F401  (registers the solvers)
from torchdeq_homotopy.secant import InverseBroyden


def bare_model(f, x0: torch.Tensor, steps: int) -> None:
    model, z = InverseBroyden(x0.shape[0], x0.shape[1], steps, x0.dtype, x0.device,
                              merge=True), x0
    for _ in range(steps):
        model.observe(z, f(z))
        z = z + model.step()


def torchdeq_broyden(f, x0: torch.Tensor, steps: int) -> None:
    get_solver("broyden")(f, x0, max_iter=steps, tol=1e-30, stop_mode="rel")


def homotopy_broyden_phase(f, x0: torch.Tensor, steps: int) -> None:
    get_solver("homotopy")(f, x0, max_iter=steps, tol=1e-30, stop_mode="rel", homo_warmup=0,
                           homo_secant_patience=10 ** 9)


RUNS = {"broyden": torchdeq_broyden, "homotopy": homotopy_broyden_phase, "bare": bare_model}


def timed(run, f, x0: torch.Tensor, steps: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        run(f, x0, steps)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--steps", type=int, nargs="+", default=[400, 1500])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("| n | evaluations | TorchDEQ broyden ms/eval | homotopy ms/eval | ratio "
          "| bare InverseBroyden ms/eval |")
    print("|---|---|---|---|---|---|")
    for n in args.widths:
        f, x0 = tanh_cell(n, 6.0, 1.0, 201)
        for steps in args.steps:
            ms = {name: 1e3 * statistics.median(timed(run, f, x0, steps)
                                                for _ in range(args.repeats)) / steps
                  for name, run in RUNS.items()}
            print(f"| {n} | {steps} | {ms['broyden']:.3f} | {ms['homotopy']:.3f} | "
                  f"{ms['homotopy'] / ms['broyden']:.2f}× | {ms['bare']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
