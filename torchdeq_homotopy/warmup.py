"""The homotopy solver's cheap first phase: fixed-point iteration while it contracts fast,
then TorchDEQ's Anderson acceleration.

On benign cells this solves everything at the cost of the cheapest TorchDEQ solver; on
the rest it leaves a best iterate (kept by the solver) and a start for Newton.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torchdeq.solver.anderson import anderson_solver

from .outcome import BestIterate, Budget, Status, TrackerResult, by_stop_mode, residuals

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

    def solved(self, tol: float, stop_mode: str) -> bool:
        """Whether every sample's best iterate meets the tolerance (one host sync)."""
        return bool((self.best.residual(stop_mode) <= tol).all())

    def result(self, indexing: list[int]) -> TrackerResult:
        """The solve's result when the warm-up left nothing for the tracker: every sample
        MAX_EVALS (the solver marks those whose best meets the tolerance CONVERGED) at λ = 1."""
        best, ones = self.best, torch.ones_like(self.best.abs_res)
        trajectory = self.trajectory + [best.z.clone()] * (len(indexing) - len(self.trajectory))
        return TrackerResult(
            z_best=best.z, abs_best=best.abs_res, rel_best=best.rel_res, step_best=best.step,
            abs_trace=list(self.abs_trace), rel_trace=list(self.rel_trace),
            status=torch.full_like(best.step, int(Status.MAX_EVALS), dtype=torch.long),
            lam=ones, evals=self.evals, trajectory=trajectory, trace_nfe=list(self.trace_nfe),
            lam_trace=[ones for _ in self.abs_trace],
            restarts=torch.zeros_like(best.step, dtype=torch.long))


PROGRESS_WINDOW = 5
"""Calls over which the warm-up measures a method's rate of progress."""

FAST_CONTRACTION = 0.7
"""Fixed-point iteration goes on, without projecting, while each step shrinks every open
sample's residual at least by this factor."""


def horizon(calls_left: int, reserve: int) -> float:
    """Calls within which a slowly converging warm-up method must be projected to
    converge to keep the budget: ``reserve``, so that a slow method never holds a large
    budget that Broyden's method or the path would use better; but unbounded (it keeps
    the budget while it makes progress at all) once fewer than 2 · ``reserve`` calls are
    left, too few for the next phase to catch up."""
    return float("inf") if calls_left < 2 * reserve else float(reserve)


def on_time(history: list[Tensor], tol: float, within: float,
            window: int = PROGRESS_WINDOW) -> Tensor:
    """Per sample, whether the residual's geometric rate over the last
    w = min(``window``, steps known) steps,

        ρ = (r_k / r_{k−w})^{1/w},     calls needed = log(tol / r_k) / log ρ,

    reaches ``tol`` within ``within`` calls (ρ < 1 suffices while fewer than ``window``
    steps are known: one step says too little to project).

    Example:
        >>> halving = [torch.tensor([0.5 ** k]) for k in range(6)]
        >>> on_time(halving, 1e-3, 5).item(), on_time(halving, 1e-3, 4).item()
        (True, False)
    """
    known = min(window, len(history) - 1)
    now = history[-1]
    rate = (now / history[-1 - known]).pow(1.0 / known)
    if known < window:
        return rate < 1
    needed = torch.log(tol / now) / torch.log(rate)
    return (now <= tol) | ((rate < 1) & (needed <= within))


class _Handover(Exception):
    """Raised from inside Anderson's loop when its progress no longer pays."""


@dataclass
class ProgressRule:
    """When Anderson hands the unconverged samples over to the next phase.

    Anderson always gets ``guaranteed`` calls of f. After that it continues while every
    open sample's best residual is projected to reach ``tol`` (:func:`on_time`) within the
    :func:`horizon` of the calls left: a benign cell keeps the accelerator that is solving
    it, as TorchDEQ's Anderson would with the whole budget; a stalled or slow one hands
    over to Broyden's method and the path.

    Example:
        >>> rule = ProgressRule(guaranteed=2, budget=100, tol=1e-3, reserve=5, window=2)
        >>> history = [torch.tensor([1.0]), torch.tensor([0.1]), torch.tensor([0.01])]
        >>> rule.hand_over(3, history)     # rate 0.1 per call: one more call suffices
        False
        >>> rule.hand_over(5, history + [torch.tensor([0.01])] * 2)   # stalled
        True
    """

    guaranteed: int
    budget: int
    tol: float
    reserve: int = 0
    window: int = PROGRESS_WINDOW

    def hand_over(self, calls: int, recent: Sequence[Tensor]) -> bool:
        """After ``calls`` calls of f; ``recent``: the best residual per sample after each
        of the last calls, oldest first (at least ``window`` + 1 of them once that many
        calls were made). One host sync per call, as TorchDEQ's Anderson's own test."""
        open_ = recent[-1] > self.tol
        if calls < max(self.guaranteed, self.window + 1):
            return not bool(open_.any())
        within = horizon(self.budget - calls, self.reserve)
        late = open_ & ~on_time(list(recent)[-1 - self.window:], self.tol, within,
                                self.window)
        return bool(late.any() | ~open_.any())


class _Counted:
    """f, counting its calls; after each call the best iterate is updated and, at the
    requested 1-based call counts ``indexing``, recorded in ``trajectory``. With a
    ``rule`` set, a call after which the rule hands over raises :class:`_Handover`."""

    def __init__(self, f: Callable[[Tensor], Tensor], best: BestIterate, stop_mode: str,
                 indexing: list[int]) -> None:
        self.f, self.evals = f, Budget(limit=None)
        self.best, self.stop_mode, self.indexing = best, stop_mode, indexing
        self.trajectory: list[Tensor] = []
        self.best_recent: deque[Tensor] = deque(maxlen=PROGRESS_WINDOW + 1)
        self.traces: tuple[list[Tensor], list[Tensor], list[int]] = ([], [], [])
        self.rule: ProgressRule | None = None
        self.cached: tuple[Tensor, Tensor] | None = None   # (z, f(z)) to serve once, free

    def __call__(self, z: Tensor) -> Tensor:
        if self.cached is not None and z.data_ptr() == self.cached[0].data_ptr():
            fz, self.cached = self.cached[1], None     # Anderson's first call, at its start
            return fz
        self.cached = None
        self.evals.spend()
        fz = self.f(z)
        if self.calls == 1:
            self.first = (z, fz)
        self.last_res = residuals(z, fz)        # (abs, rel) of this call
        for trace, value in zip(self.traces, (*self.last_res, self.calls), strict=True):
            trace.append(value)
        self.best.update(z, *self.last_res, self.stop_mode, self.calls, fz=fz)
        self.best_recent.append(self.best.residual(self.stop_mode))
        while (len(self.trajectory) < len(self.indexing)
               and self.indexing[len(self.trajectory)] <= self.calls):
            self.trajectory.append(self.best.z.clone())
        if self.rule is not None and self.rule.hand_over(self.calls, self.best_recent):
            raise _Handover
        return fz

    @property
    def calls(self) -> int:
        """Evaluations of f so far (a cached call is free)."""
        return self.evals.used


def _fixed_point_while_contracting(f: _Counted, x0: Tensor, budget: int, tol: float,
                                   stop_mode: str, rate: float, reserve: int
                                   ) -> tuple[Tensor, bool]:
    """z_{k+1} = f(z_k) while it pays, judged per step on each unconverged sample's
    residual r (one host sync per step, as TorchDEQ's own iteration): it goes on while
    every open sample contracts fast, r_k <= rate · r_{k−1}, or at a rate that reaches the
    tolerance within the calls left and their :func:`horizon` (:func:`on_time`).

    Returns the residual ||f(x0) - x0|| of the start, and whether the map expands there:
    the first step grew the residual, r_1 > r_0, for at least half the unconverged samples.
    """
    fz = f(x0)
    first, _ = f.last_res
    history: deque[Tensor] = deque(maxlen=PROGRESS_WINDOW + 1)   # the last iterates' residuals
    expanding = False
    while True:
        abs_res, rel_res = f.last_res           # of the last call, f(z) with z = f(previous z)
        stop = by_stop_mode(stop_mode, abs_res, rel_res)
        history.append(stop)
        open_ = stop > tol
        if len(history) > 1:
            fast = stop <= rate * history[-2]
            # the accelerator that follows beats slow iteration: no unbounded horizon
            within = min(budget - f.calls, horizon(budget - f.calls, reserve))
            slow = bool((open_ & ~fast & ~on_time(list(history), tol, within)).any())
        else:
            slow = False
        if slow and f.calls == 2:     # judged on ||f(z) - z||, whatever the stop mode
            expanding = 2 * int((open_ & (abs_res > first)).sum()) >= int(open_.sum())
        if not bool(open_.any()) or slow or f.calls >= budget:
            return first, expanding
        fz = f(fz)


def warm_up(f: Callable[[Tensor], Tensor], x0: Tensor, budget: int, tol: float,
            stop_mode: str, rate: float = FAST_CONTRACTION, indexing: list[int] | None = None,
            guaranteed: int | None = None, reserve: int = 0) -> Warmup | None:
    """Fixed-point iteration while it contracts by ``rate`` per step, then Anderson
    acceleration (TorchDEQ's) from the best iterate, within ``budget`` calls of f.
    Anderson is skipped where the first fixed-point step grew most residuals: on such
    expansive maps it rarely converges, and Broyden's method or Newton does better.
    After ``guaranteed`` calls (default: all of ``budget``) Anderson hands over to the
    next phase once an open sample is no longer projected to converge within the budget
    at its current rate (:class:`ProgressRule`).

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
    first, expanding = _fixed_point_while_contracting(counted, x0, budget, tol, stop_mode,
                                                      rate, reserve)
    stop = best.abs_res if stop_mode == "abs" else best.rel_res
    # TorchDEQ's Anderson calls f max(2, max_iter) times, the first at its start, whose f
    # is known (served free by ``counted``). Every call is recorded by
    # ``counted`` (the best iterate is the best verified one), so Anderson's own return
    # value, whose residual it never evaluated, is not needed.
    if not expanding and bool((stop > tol).any()) and budget - counted.calls >= 1:
        counted.rule = ProgressRule(guaranteed if guaranteed is not None else budget,
                                    budget, tol, reserve)
        counted.cached = (best.z, best.fz)     # Anderson starts by evaluating its start
        try:
            anderson_solver(counted, best.z, max_iter=budget - counted.calls + 1, tol=tol,
                            stop_mode=stop_mode)
        except _Handover:
            pass
        counted.rule = None
    helped = best.abs_res <= 0.1 * first
    x0_evaluated, f_x0 = counted.first
    return Warmup(newton_start=torch.where(helped[:, None], best.z, x0_evaluated),
                  newton_start_fz=torch.where(helped[:, None], best.fz, f_x0), best=best,
                  evals=counted.calls, abs_trace=counted.traces[0],
                  rel_trace=counted.traces[1], trace_nfe=counted.traces[2],
                  trajectory=counted.trajectory)
