"""What a solve costs beyond f, per call of f, side by side with TorchDEQ's solvers.

    python benchmarks/call_overhead.py [--repeats 30] [--out benchmarks/results/call_overhead.md]

A solver's time per call of f is its wall time over its calls of f; its overhead per call
is that minus f's own time (f timed alone on the cell's state, in the same run). On
small states the overhead is per-operation dispatch, so it is what decides a training
step's speed there (the main job's DEQ, MLP and INR-style cells). Each cell runs every
solver once to warm up, then ``--repeats`` solves of each, interleaved solver by solver
(one solve of each in turn, the order turned by one solver every repeat), so that all see
the same machine load and follow each other alike; the table gives medians. Cells
(tanh(W z + x), ``benchmarks/sweep.py``'s ``tanh_cell``, float32, no gradient):

* ``training, switching``: 256 wide, batch 32, ‖W‖₂ 3, bias 1, ``max_iter`` 30, abs. tol
  1e-3: no solver meets the tolerance, and every homotopy sample switches from Anderson
  to Broyden's method (the main job's DEQ at initialization);
* ``training, benign``: 256 wide, batch 256, ‖W‖₂ 0.9, bias 1, ``max_iter`` 40, abs. tol
  1e-3 (fixed-point iteration converges);
* ``benign, budget 2000``: 512 wide, batch 8, ‖W‖₂ 1.5, bias 0.1, rel. tol 1e-5
  (fixed-point iteration, then Anderson);
* ``main job's DEQ``: the README main job's DEQ cell at initialization, as its first
  training forward solves it (width 16 on the embedded 8×8 digits, a 16 × 4 × 4 state,
  the first 64 training images, training mode: batch statistics in the stem, one
  variational dropout mask), ``max_iter`` 30, abs. tol 1e-3: the homotopy samples
  switch to Broyden's method in three groups over the first 5 calls.

``--baseline DIR`` also times another version of the plugin in the same run, as
``benchmarks/benign_time.py`` does (DIR holds its ``torchdeq_homotopy`` package, e.g.
``git archive REV torchdeq_homotopy | tar -x -C DIR``), in a column ``baseline``.

About 1 minute on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import torchdeq_homotopy  # noqa: F401  (registers 'homotopy')

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benign_time import load_baseline, solver_fn, turned
from sweep import tanh_cell


def main_job_deq(seed: int):
    """The main job's DEQ cell at initialization, in training mode, and its start, for the
    first 64 training images of the embedded digits."""
    from homotopy_zoo.data import load_digits_data
    from homotopy_zoo.models import ImplicitClassifier

    torch.manual_seed(seed)
    model = ImplicitClassifier(1, 10, width=16, core="sliced").train()
    images = torch.stack([load_digits_data().train[i][0] for i in range(64)])
    with torch.no_grad():
        x = model.stem(images)
    return (lambda z: model.cell(z, x)), torch.zeros_like(x)


CELLS = {
    "training, switching": dict(cell=dict(n=256, gain=3.0, bias=1.0, bsz=32),
                                max_iter=30, tol=1e-3, stop_mode="abs"),
    "training, benign": dict(cell=dict(n=256, gain=0.9, bias=1.0, bsz=256),
                             max_iter=40, tol=1e-3, stop_mode="abs"),
    "benign, budget 2000": dict(cell=dict(n=512, gain=1.5, bias=0.1, bsz=8),
                                max_iter=2000, tol=1e-5, stop_mode="rel"),
    "main job's DEQ": dict(build=main_job_deq, max_iter=30, tol=1e-3, stop_mode="abs"),
}
SOLVERS = ("fixed_point_iter", "anderson", "broyden", "homotopy")


class Counted:
    """f, counting its calls."""

    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.f(z)


def f_time(f, x0: torch.Tensor, repeats: int = 500) -> float:
    """Seconds per call of f alone, at a random state of x0's shape (median of 5 runs)."""
    z = torch.randn_like(x0)
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            f(z)
        runs.append((time.perf_counter() - start) / repeats)
    return statistics.median(runs)


def measure(name: str, spec: dict, seed: int, repeats: int, solvers: list[str]) -> list[dict]:
    """Every solver on one cell, ``repeats`` interleaved solves each."""
    f, x0 = spec["build"](seed) if "build" in spec else tanh_cell(seed=seed, **spec["cell"])
    counted = Counted(f)
    kwargs = dict(max_iter=spec["max_iter"], tol=spec["tol"], stop_mode=spec["stop_mode"])
    per_f = f_time(f, x0)
    times = {s: [] for s in solvers}
    calls = {}
    with torch.no_grad():
        for solver in solvers:                        # warm-up, and the calls per solve
            counted.calls = 0
            solver_fn(solver)(counted, x0, **kwargs)
            calls[solver] = counted.calls
        for repeat in range(repeats):
            for solver in turned(solvers, repeat):
                start = time.perf_counter()
                solver_fn(solver)(counted, x0, **kwargs)
                times[solver].append(time.perf_counter() - start)
    rows = []
    for solver in solvers:
        wall = statistics.median(times[solver])
        per_call = wall / calls[solver]
        rows.append(dict(cell=name, solver=solver, calls=calls[solver], wall_ms=1e3 * wall,
                         per_call_ms=1e3 * per_call, f_ms=1e3 * per_f,
                         overhead_ms=1e3 * (per_call - per_f)))
        print(f"{name:22s} {solver:17s} calls {calls[solver]:5d} wall {1e3 * wall:8.2f} ms "
              f"per call {1e3 * per_call:.3f} ms (f {1e3 * per_f:.3f})", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| cell | solver | calls of f | ms per solve | ms per call | of which f | "
             "overhead per call (ms) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['solver']} | {r['calls']} | {r['wall_ms']:.2f} | "
                     f"{r['per_call_ms']:.3f} | {r['f_ms']:.3f} | {r['overhead_ms']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seed", type=int, default=250)
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS))
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--out", type=Path, default=None,
                        help="write the table as Markdown here")
    parser.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                        help="also time the torchdeq_homotopy package under DIR")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.baseline is not None:
        load_baseline(args.baseline)
        args.solvers.append("baseline")
    rows = []
    for name in args.cells:
        rows += measure(name, CELLS[name], args.seed, args.repeats, args.solvers)
    text = table(rows)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/call_overhead.py " + " ".join(sys.argv[1:])
        args.out.write_text(f"Command: `{command.strip()}`\n\n{text}\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
