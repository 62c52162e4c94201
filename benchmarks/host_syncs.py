"""Host synchronizations per call of f, counted on CPU: what a CUDA solve would wait on.

    python benchmarks/host_syncs.py [--solvers homotopy anderson broyden] [--top 6]

On CUDA, every read of a device value by the host (``bool(t)``, ``t.item()``,
``t.tolist()``, ``int(t)``), every ``nonzero`` and boolean-mask index, and the error checks
of ``torch.linalg.solve`` / ``inv`` / ``cholesky`` / ``lu_factor`` stall the host until the
device has finished the work queued before it. No GPU was lent to this project, so this
counts those calls on CPU, where they run the same Python code, by wrapping each of them
(:class:`HostSyncCounter`). The figure is a count of stalls, not their cost: a stall
costs the device queue's depth, which only a GPU run measures.

The plugin's solvers run their accelerator code path (:func:`accelerator_path`): no read
to skip masked work (``torchdeq_homotopy.host.reads_cheap`` False), GMRES's stopping test
read late from its asynchronous host copy (those reads of host memory are not counted,
:data:`HOST_COPY_SITES`); the CPU path's reads are counted too, in a second solve.

Cells: tanh(W z + x), float32, rel. tol 1e-5, batch 8, budget
2,000, W and x from the cell's seed (``benchmarks/sweep.py``'s ``tanh_cell``), the solver's
defaults unless said:

* benign: 512 wide, ‖W‖₂ 1.5, bias 0.1, seed 240 (fixed-point iteration, then Anderson);
* training budget: 64 wide, ‖W‖₂ 4, bias 1, batch 32, ``max_iter`` 30, rel. tol 1e-4, seed
  200 (the per-sample switch from Anderson to Broyden's method);
* Broyden's phase: 128 wide, ‖W‖₂ 6, bias 1, seed 200;
* path only: the same cell with ``homo_newton_iters=0, homo_warmup=0`` (the secant path
  and GMRES);
* dense: 32 wide, ‖W‖₂ 6, bias 1, seed 200 (exact Newton, Broyden's method, the dense
  path).

About 1 minute on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import collections
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torchdeq.solver import get_solver

import torchdeq_homotopy  # noqa: F401  (registers 'homotopy')
from torchdeq_homotopy import host, linalg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import tanh_cell

PACKAGE = "torchdeq_homotopy"
TENSOR_READS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero",
                "cpu", "numpy")
CHECKED_LINALG = ("solve", "inv", "cholesky", "lu_factor")


class HostSyncCounter:
    """Counts the calls that make the host wait for a CUDA device, per call site.

    A site is the innermost frame on the stack whose file lies in a folder named
    ``site_prefix`` (``file:qualified function``); reads with no such frame count under
    ``elsewhere``. Only the outermost of nested counted calls counts (a ``nonzero`` inside
    a mask index is one stall).

    Example:
        >>> with HostSyncCounter() as counter:
        ...     _ = bool(torch.ones(2).sum() > 1)
        >>> counter.total
        1
    """

    def __init__(self, site_prefix: str = PACKAGE) -> None:
        self.site_prefix = site_prefix
        self.sites: collections.Counter[str] = collections.Counter()
        self._saved: list[tuple[object, str, object]] = []
        self._depth = 0

    @property
    def total(self) -> int:
        """Stalls counted so far."""
        return sum(self.sites.values())

    def _site(self) -> str:
        frame = sys._getframe(2)                 # the caller of the wrapped function
        while frame is not None:
            path = Path(frame.f_code.co_filename)
            if self.site_prefix in path.parts:
                return f"{path.name}:{frame.f_code.co_qualname}"
            frame = frame.f_back
        return "elsewhere"

    def _wrap(self, owner: object, name: str, counts: Callable[..., bool]) -> None:
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            outer = self._depth == 0 and counts(*args, **kwargs)
            if outer:
                self.sites[self._site()] += 1
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        self._saved.append((owner, name, original))
        setattr(owner, name, wrapped)

    def __enter__(self) -> HostSyncCounter:
        for name in TENSOR_READS:
            self._wrap(torch.Tensor, name, lambda *a, **k: True)
        self._wrap(torch, "nonzero", lambda *a, **k: True)
        for name in CHECKED_LINALG:
            self._wrap(torch.linalg, name, lambda *a, **k: True)
        for name in ("__getitem__", "__setitem__"):
            self._wrap(torch.Tensor, name, _masks)
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()


def _masks(tensor: torch.Tensor, index: object, *rest: object) -> bool:
    """Whether an index holds a boolean tensor (its size depends on the data)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool and p.dim() > 0
               for p in parts)


@contextmanager
def accelerator_path() -> Iterator[None]:
    """The plugin's accelerator code path on CPU, for the duration: no host read to skip
    masked work (``host.reads_cheap`` False), and GMRES's stopping test read late, from
    its host copy, as on CUDA."""
    original_cheap, original_init = host.reads_cheap, linalg.LaggedAll.__init__

    def lagged(self, device, lagged=None):
        original_init(self, device, True if lagged is None else lagged)

    host.reads_cheap = lambda t: False
    linalg.LaggedAll.__init__ = lagged
    try:
        yield
    finally:
        host.reads_cheap, linalg.LaggedAll.__init__ = original_cheap, original_init


HOST_COPY_SITES = {"linalg.py:LaggedAll._read"}
"""Sites that read an asynchronous host copy on CUDA (pinned memory, landed before it is
read): not stalls."""


def stalls(counter: HostSyncCounter) -> collections.Counter[str]:
    """The counted sites that stall a CUDA device: all but :data:`HOST_COPY_SITES`."""
    return collections.Counter({site: k for site, k in counter.sites.items()
                                if site not in HOST_COPY_SITES})


CELLS = {
    "benign (512 wide, ‖W‖₂ 1.5)": dict(n=512, gain=1.5, bias=0.1, bsz=8, budget=2000,
                                         tol=1e-5, seed=240),
    "training budget (64 wide, ‖W‖₂ 4, 30 calls)": dict(n=64, gain=4.0, bias=1.0, bsz=32,
                                                        budget=30, tol=1e-4),
    "Broyden's phase (128 wide, ‖W‖₂ 6)": dict(n=128, gain=6.0, bias=1.0, bsz=8, budget=2000,
                                               tol=1e-5),
    "path only (128 wide, ‖W‖₂ 6)": dict(n=128, gain=6.0, bias=1.0, bsz=8, budget=2000,
                                         tol=1e-5, solvers=("homotopy",),
                                         homotopy={"homo_newton_iters": 0, "homo_warmup": 0}),
    "dense (32 wide, ‖W‖₂ 6)": dict(n=32, gain=6.0, bias=1.0, bsz=8, budget=2000, tol=1e-5),
}


def count(solver: str, cell: dict, prefix: str = PACKAGE, accelerator: bool = True
          ) -> tuple[int, HostSyncCounter]:
    """(calls of f, the counter) of one solve; ``accelerator``: on the plugin's
    accelerator code path (:func:`accelerator_path`), else on CPU's."""
    options = cell.get(solver, {})
    f, x0 = tanh_cell(cell["n"], cell["gain"], cell["bias"], cell.get("seed", 200),
                      bsz=cell["bsz"])
    calls = 0

    def counted(z: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return f(z)

    path = accelerator_path() if accelerator else nullcontext()
    with torch.no_grad(), path, HostSyncCounter(prefix) as counter:
        get_solver(solver)(counted, x0, max_iter=cell["budget"], tol=cell["tol"],
                           stop_mode="rel", **options)
    return calls, counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--solvers", nargs="+", default=["homotopy"])
    parser.add_argument("--top", type=int, default=6, help="call sites listed per cell")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("| cell | solver | calls of f | reads, CPU path | stalls, accelerator path "
          "| per call | stalls by site (most first) |")
    print("|---|---|---|---|---|---|---|")
    for label, cell in CELLS.items():
        for solver in [s for s in args.solvers if s in cell.get("solvers", args.solvers)]:
            prefix = PACKAGE if solver in ("homotopy", "newton_krylov") else "torchdeq"
            _, on_cpu = count(solver, cell, prefix, accelerator=False)
            calls, counter = count(solver, cell, prefix)
            cuda = stalls(counter)
            sites = ", ".join(f"{site} {k}" for site, k in cuda.most_common(args.top))
            print(f"| {label} | {solver} | {calls} | {on_cpu.total} | {cuda.total()} | "
                  f"{cuda.total() / max(calls, 1):.2f} | {sites} |", flush=True)

if __name__ == "__main__":
    main()
