"""The homotopy solver's cheap first phase: fixed-point iteration while it contracts fast,
then TorchDEQ's Anderson acceleration.

On benign cells this solves everything at the cost of the cheapest TorchDEQ solver; on
the rest it leaves a best iterate (kept by the solver) and a start for Newton.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchdeq.solver.anderson import anderson_solver

from .outcome import BestIterate, residuals

Tensor = torch.Tensor


@dataclass
class Warmup:
    """What the warm-up leaves: where Newton starts, the best iterate, evaluations spent."""

    newton_start: Tensor
    newton_start_fz: Tensor   # f at newton_start (already evaluated)
    best: BestIterate
    evals: int
    abs_trace: list[Tensor]   # residuals of the iterates evaluated, in order
    rel_trace: list[Tensor]
    trace_nfe: list[int]      # evaluations spent at each of them
    trajectory: list[Tensor]  # best iterate at each requested evaluation count reached


class _Counted:
    """f, counting its calls; after each call the best iterate is updated and, at the
    requested 1-based call counts ``indexing``, recorded in ``trajectory``."""

    def __init__(self, f: Callable[[Tensor], Tensor], best: BestIterate, stop_mode: str,
                 indexing: list[int]) -> None:
        self.f, self.calls = f, 0
        self.best, self.stop_mode, self.indexing = best, stop_mode, indexing
        self.trajectory: list[Tensor] = []

    def __call__(self, z: Tensor) -> Tensor:
        self.calls += 1
        fz = self.f(z)
        if self.calls == 1:
            self.first = (z, fz)
        self.last_res = residuals(z, fz)        # (abs, rel) of this call
        self.best.update(z, *self.last_res, self.stop_mode, self.calls, fz=fz)
        while (len(self.trajectory) < len(self.indexing)
               and self.indexing[len(self.trajectory)] <= self.calls):
            self.trajectory.append(self.best.z.clone())
        return fz


def _record(traces: tuple[list[Tensor], list[Tensor], list[int]], abs_res: Tensor,
            rel_res: Tensor, calls: int) -> None:
    traces[0].append(abs_res)
    traces[1].append(rel_res)
    traces[2].append(calls)


def _fixed_point_while_contracting(f: _Counted, x0: Tensor, budget: int, tol: float,
                                   stop_mode: str, rate: float,
                                   traces: tuple[list[Tensor], list[Tensor], list[int]]
                                   ) -> tuple[Tensor, bool]:
    """z_{k+1} = f(z_k) while every unconverged sample's residual shrinks by ``rate`` per
    step, r_{k+1} <= rate · r_k (one host sync per step, as TorchDEQ's own iteration).

    Returns the residual ||f(x0) - x0|| of the start, and whether the map expands there:
    the first step grew the residual, r_1 > r_0, for at least half the unconverged samples.
    """
    fz = f(x0)
    first, _ = f.last_res
    previous = None
    expanding = False
    abs_first = first
    while True:
        abs_res, rel_res = f.last_res           # of the last call, f(z) with z = f(previous z)
        _record(traces, abs_res, rel_res, f.calls)
        stop = abs_res if stop_mode == "abs" else rel_res
        open_ = stop > tol
        slow = previous is not None and bool((open_ & ~(stop <= rate * previous)).any())
        if slow and f.calls == 2:     # judged on ||f(z) - z||, whatever the stop mode
            expanding = 2 * int((open_ & (abs_res > abs_first)).sum()) >= int(open_.sum())
        if not bool(open_.any()) or slow or f.calls >= budget:
            return first, expanding
        previous = stop
        fz = f(fz)


def warm_up(f: Callable[[Tensor], Tensor], x0: Tensor, budget: int, tol: float,
            stop_mode: str, rate: float = 0.7, indexing: list[int] | None = None
            ) -> Warmup | None:
    """Fixed-point iteration while it contracts by ``rate`` per step, then Anderson
    acceleration (TorchDEQ's) from the best iterate, within ``budget`` calls of f.
    Anderson is skipped where the first fixed-point step grew most residuals: on such
    expansive maps it rarely converges (BENCHMARKS.md), and Newton does better.

    Newton later starts from the best iterate where the warm-up cut the residual tenfold;
    elsewhere (expansive or divergent maps) from x0, the better Newton start there.

    Example:
        >>> warm = warm_up(lambda z: 0.5 * z + 1, torch.zeros(2, 3), 30, 1e-6, 'abs')
        >>> bool((warm.best.abs_res <= 1e-6).all()), warm.evals <= 25
        (True, True)
    """
    if budget <= 0:
        return None
    inf = torch.full((x0.shape[0],), float("inf"), dtype=x0.dtype, device=x0.device)
    best = BestIterate(z=x0.clone(), abs_res=inf.clone(), rel_res=inf.clone(),
                       step=torch.zeros_like(inf))
    counted = _Counted(f, best, stop_mode, sorted(indexing or []))
    traces: tuple[list[Tensor], list[Tensor], list[int]] = ([], [], [])
    first, expanding = _fixed_point_while_contracting(counted, x0, budget, tol, stop_mode,
                                                      rate, traces)
    stop = best.abs_res if stop_mode == "abs" else best.rel_res
    # TorchDEQ's Anderson calls f max(2, max_iter) times; one more call follows.
    if not expanding and bool((stop > tol).any()) and budget - counted.calls >= 3:
        z, _, _ = anderson_solver(counted, best.z, max_iter=budget - counted.calls - 1,
                                  tol=tol, stop_mode=stop_mode)
        # Anderson's reported residuals need not be those of the iterate it returns:
        # evaluate that iterate once more, so the kept iterate and its residual agree.
        z = torch.where(torch.isfinite(z).all(dim=1, keepdim=True), z, best.z)
        counted(z)                              # updates the best iterate
        _record(traces, *counted.last_res, counted.calls)
    helped = best.abs_res <= 0.1 * first
    x0_evaluated, f_x0 = counted.first
    return Warmup(newton_start=torch.where(helped[:, None], best.z, x0_evaluated),
                  newton_start_fz=torch.where(helped[:, None], best.fz, f_x0), best=best,
                  evals=counted.calls, abs_trace=traces[0], rel_trace=traces[1],
                  trace_nfe=traces[2], trajectory=counted.trajectory)
