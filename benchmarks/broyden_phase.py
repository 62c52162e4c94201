"""Cost per evaluation of Broyden's method at λ = 1: TorchDEQ's ``broyden`` against the
homotopy solver's Broyden phase, side by side.

    python benchmarks/broyden_phase.py [--widths 32 128] [--steps 400 1500] [--repeats 3]
        [--batch 8] [--baseline DIR]

Cell: tanh(W z + x) of ``sweep.py`` (‖W‖₂ = 6, bias 1, seed 201, batch 8, float32). Both
solvers take exactly ``steps`` evaluations (tolerance 1e-30, so nothing converges); the
homotopy solver without warm-up and with an unlimited stall patience, so that every
evaluation is a Broyden step (its iterates are TorchDEQ's, without line search). Also timed:
the bare model (:class:`~torchdeq_homotopy.secant.InverseBroyden`, f and the step, nothing
else), the floor of any Broyden phase built on it. Reports the median over ``repeats`` of
milliseconds per evaluation; the runs of a repeat go in an order that turns every repeat.

``--baseline DIR`` also times the homotopy solver of another version of the plugin (a
``torchdeq_homotopy`` package under DIR, e.g. from ``git archive REV torchdeq_homotopy |
tar -x -C DIR``), and reports the median over repeats of its time over the current one's
within each repeat, and whether the two returned the same iterates bit for bit.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from benign_time import BASELINE, load_baseline, turned
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


def homotopy_broyden_phase(f, x0: torch.Tensor, steps: int) -> torch.Tensor:
    return get_solver("homotopy")(f, x0, max_iter=steps, tol=1e-30, stop_mode="rel",
                                  homo_warmup=0, homo_secant_patience=10 ** 9)[0]


def baseline_broyden_phase(f, x0: torch.Tensor, steps: int) -> torch.Tensor:
    return BASELINE["baseline"](f, x0, max_iter=steps, tol=1e-30, stop_mode="rel",
                                homo_warmup=0, homo_secant_patience=10 ** 9)[0]


RUNS = {"broyden": torchdeq_broyden, "homotopy": homotopy_broyden_phase, "bare": bare_model}


def timed(run, f, x0: torch.Tensor, steps: int) -> tuple[float, object]:
    start = time.perf_counter()
    with torch.no_grad():
        out = run(f, x0, steps)
    return time.perf_counter() - start, out


def measure(runs: dict, f, x0: torch.Tensor, steps: int, repeats: int
            ) -> tuple[dict[str, float], float | None, bool | None]:
    """ms per evaluation of each run (median over repeats, order turned every repeat);
    with a baseline, the median of baseline / homotopy within a repeat and whether both
    returned the same state."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    states: dict[str, object] = {}
    names = list(runs)
    for r in range(repeats):
        for name in turned(names, r):
            seconds, states[name] = timed(runs[name], f, x0, steps)
            times[name].append(seconds)
    ms = {name: 1e3 * statistics.median(t) / steps for name, t in times.items()}
    if "baseline" not in runs:
        return ms, None, None
    paired = statistics.median(b / h for b, h in zip(times["baseline"], times["homotopy"],
                                                          strict=True))
    return ms, paired, torch.equal(states["baseline"], states["homotopy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--steps", type=int, nargs="+", default=[400, 1500])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                        help="also time the homotopy solver of the package under DIR")
    args = parser.parse_args()
    torch.set_num_threads(2)
    runs = dict(RUNS)
    if args.baseline is not None:
        load_baseline(args.baseline)
        runs["baseline"] = baseline_broyden_phase
    extra = " | baseline / homotopy | same iterates" if args.baseline else ""
    print("| n | batch | evaluations | TorchDEQ broyden ms/eval | homotopy ms/eval | ratio "
          f"| bare InverseBroyden ms/eval{extra} |")
    print("|---|---|---|---|---|---|---|" + ("---|---|" if args.baseline else ""))
    for n in args.widths:
        f, x0 = tanh_cell(n, 6.0, 1.0, 201, bsz=args.batch)
        for steps in args.steps:
            ms, paired, same = measure(runs, f, x0, steps, args.repeats)
            tail = f" | {paired:.3f} | {same}" if paired is not None else ""
            print(f"| {n} | {args.batch} | {steps} | {ms['broyden']:.3f} | {ms['homotopy']:.3f} "
                  f"| {ms['homotopy'] / ms['broyden']:.2f}× | {ms['bare']:.3f}{tail} |",
                  flush=True)


if __name__ == "__main__":
    main()
