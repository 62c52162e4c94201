"""Per-sample outcomes shared by every module: the status enum, residuals, the best
iterate, the evaluation budget, and the record every phase of a solve adds to.

Everything here is independent of how a solve proceeds; the path tracker, the warm-up,
the solvers and the HomoODE core all import it.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import torch

from . import host

Tensor = torch.Tensor


class Status(enum.IntEnum):
    """Per-sample outcome, reported as ``info['status']``.

    Example:
        >>> import torch
        >>> from torchdeq_homotopy import homotopy_solver
        >>> _, _, info = homotopy_solver(lambda z: 0.5 * z, torch.ones(2, 3), max_iter=50)
        >>> [Status(int(s)).name for s in info['status']]
        ['CONVERGED', 'CONVERGED']
    """

    RUNNING = 0
    CONVERGED = 1
    MAX_EVALS = 2
    """The evaluation budget ran out before the residual reached the tolerance."""
    NONFINITE = 3
    """f returned NaN or Inf where no recovery was possible."""
    STEP_UNDERFLOW = 4
    """Path tracking needed a step below ``homo_step_min`` (or jumped to a branch with
    λ < 0, or its endgame at λ = 1 stalled), on its first path and on every restart."""


class Budget:
    """Counts evaluations: every call of f and every Jacobian-vector product is one.
    The one evaluation counter of the package (``limit=None`` only counts).

    Example:
        >>> budget = Budget(3)
        >>> budget.spend(2), budget.spend(2), budget.left
        (True, False, 1)
    """

    def __init__(self, limit: int | None) -> None:
        self.limit, self.used = limit, 0

    def spend(self, count: int = 1) -> bool:
        if self.limit is not None and self.used + count > self.limit:
            return False
        self.used += count
        return True

    def spend_leaving_one(self) -> bool:
        """Spend one evaluation only if another remains after it: a linear solve's
        products must leave the evaluation of the iterate they produce, or the step is
        lost (the best iterate is only ever updated by an evaluated one).

        Example:
            >>> budget = Budget(2)
            >>> budget.spend_leaving_one(), budget.spend_leaving_one(), budget.left
            (True, False, 1)
        """
        return self.left > 1 and self.spend()

    @property
    def left(self) -> int | float:
        return math.inf if self.limit is None else self.limit - self.used


def residuals(z: Tensor, fz: Tensor) -> tuple[Tensor, Tensor]:
    """TorchDEQ's errors: abs = ||f(z) - z||, rel = abs / (||f(z)|| + 1e-9), non-finite → inf.

    Example:
        >>> residuals(torch.zeros(2, 2), torch.tensor([[3.0, 4.0], [float('nan'), 0.0]]))
        (tensor([5., inf]), tensor([1., inf]))
    """
    inf = float("inf")      # nan_to_num would otherwise turn inf into the largest float
    # ``vector_norm``: what ``Tensor.norm(dim=1)`` calls, without its Python dispatch (a
    # solve computes these at every call of f)
    norm = torch.linalg.vector_norm
    abs_res = norm(fz - z, dim=1).nan_to_num(nan=inf, posinf=inf)
    # abs = inf gives rel = inf or inf/inf = NaN, hence inf as well
    rel_res = (abs_res / (norm(fz, dim=1) + 1e-9)).nan_to_num(nan=inf, posinf=inf)
    return abs_res, rel_res


def by_stop_mode(stop_mode: str, abs_res: Tensor, rel_res: Tensor) -> Tensor:
    """The residual TorchDEQ's ``stop_mode`` judges by: ``abs_res`` for 'abs', else
    ``rel_res``.

    Example:
        >>> by_stop_mode('rel', torch.tensor([1.0]), torch.tensor([0.1]))
        tensor([0.1000])
    """
    return abs_res if stop_mode == "abs" else rel_res


def _where(mask: Tensor, a: Tensor | float, b: Tensor) -> Tensor:
    """Per-sample select: rows of ``a`` where ``mask`` (B,), else rows of ``b``.

    Unlike TorchDEQ's ``batch_masked_mixing`` (mask · a + ~mask · b) it does not spread a
    NaN of the unselected side into the result.
    """
    return torch.where(mask.view(-1, *([1] * (b.dim() - 1))), a, b)


@dataclass
class BestIterate:
    """Best iterate per sample by the fixed-point residual of ``stop_mode``.

    Example:
        >>> inf = torch.full((2,), float('inf'))
        >>> best = BestIterate(torch.zeros(2, 1), inf, inf, torch.zeros(2))
        >>> best.update(torch.ones(2, 1), torch.tensor([1.0, 2.0]), inf, 'abs', used=3)
        >>> best.abs_res.tolist(), best.step.tolist()
        ([1.0, 2.0], [3.0, 3.0])
    """

    z: Tensor
    abs_res: Tensor
    rel_res: Tensor
    step: Tensor
    fz: Tensor | None = None    # f at z, where the caller passes it to update
    contraction: Tensor | None = None   # q of the step into z (:meth:`Record.add`); inf: none

    def update(self, z: Tensor, abs_res: Tensor, rel_res: Tensor, stop_mode: str,
               used: int, fz: Tensor | None = None, contraction: Tensor | None = None
               ) -> None:
        """Keep (z, f(z)) where its residual beats the best one so far; ``used``: the
        evaluations spent when z was evaluated; ``contraction``: the secant ratio q of the
        step that reached z (inf where not measured)."""
        better = (by_stop_mode(stop_mode, abs_res, rel_res)
                  < by_stop_mode(stop_mode, self.abs_res, self.rel_res))
        self.z, self.fz = self._select(better, z, fz)
        self.abs_res = torch.where(better, abs_res, self.abs_res)
        self.rel_res = torch.where(better, rel_res, self.rel_res)
        self.step = self.step.masked_fill(better, float(used))
        if contraction is not None:
            kept = (self.contraction if self.contraction is not None
                    else torch.full_like(contraction, float("inf")))
            self.contraction = torch.where(better, contraction, kept)
        elif self.contraction is not None:
            self.contraction = self.contraction.masked_fill(better, float("inf"))

    def _select(self, better: Tensor, z: Tensor, fz: Tensor | None
                ) -> tuple[Tensor, Tensor | None]:
        """The new best (z, f(z)): rows of the new point where ``better``. On CPU one host
        check picks the cheap cases, since a contracting iteration improves every row at
        each step and a stalled one none: a copy of the new point, or nothing (a masked
        select reads both and the mask); elsewhere the masked select, without a sync."""
        if fz is None:
            kept_fz = self.fz
        else:   # before any f is kept, rows that did not improve take this one (a copy)
            kept_fz = self.fz if self.fz is not None else fz.clone()
        if host.reads_cheap(z):
            count = int(better.sum())
            if count == 0:
                return self.z, kept_fz
            if count == better.numel():
                return z.clone(), (kept_fz if fz is None else fz.clone())
        return (_where(better, z, self.z),
                kept_fz if fz is None else _where(better, fz, kept_fz))

    def residual(self, stop_mode: str) -> Tensor:
        """The best residual in the ``stop_mode``'s sense."""
        return by_stop_mode(stop_mode, self.abs_res, self.rel_res)


@dataclass
class TrackerResult:
    """What a solve returns: best iterates and per-sample statistics (flat ``(B, n)``)."""

    z_best: Tensor
    abs_best: Tensor
    rel_best: Tensor
    step_best: Tensor
    abs_trace: list[Tensor]
    rel_trace: list[Tensor]
    status: Tensor
    lam: Tensor
    evals: int
    trajectory: list[Tensor] = field(default_factory=list)
    trace_nfe: list[int] = field(default_factory=list)
    lam_trace: list[Tensor] = field(default_factory=list)
    restarts: Tensor | None = None
    krylov_solves: int = 0
    krylov_products: int = 0
    fz_best: Tensor | None = None         # f at z_best
    contraction_best: Tensor | None = None   # q of the step into z_best (inf: not measured)


SECANT_WINDOW = 6
"""Calls at the end of a budget within which :meth:`Record.add` measures the secant ratio of
fixed-point and Anderson steps: a best iterate reached earlier has stalled, and its image is
not taken. Measuring at every call cost 5–8 % of a solve's time on 256-wide states at batch
32 (``benchmarks/call_overhead.py``)."""


def secant_ratio(z: Tensor, fz: Tensor, z_prev: Tensor, fz_prev: Tensor) -> Tensor:
    """Per sample, how much f stretched the last step,

        q = ||f(z) − f(z_prev)|| / ||z − z_prev||,

    inf where the step is zero or q is not finite. After a fixed-point step
    (z = f(z_prev)) q is the residual's ratio r(z) / r(z_prev), f's stretching along the
    residual itself.

    Example:
        >>> z0, z1 = torch.zeros(1, 2), torch.ones(1, 2)
        >>> secant_ratio(z1, 0.5 * z1, z0, 0.5 * z0)
        tensor([0.5000])
    """
    step = torch.linalg.vector_norm(z - z_prev, dim=1)
    q = torch.linalg.vector_norm(fz - fz_prev, dim=1) / step
    return q.nan_to_num(nan=float("inf"), posinf=float("inf")).masked_fill(step == 0,
                                                                           float("inf"))


@dataclass
class Record:
    """What a solve records at each evaluation of f, whichever phase made it (the
    warm-up hands its record on to the path tracker): the budget, the best iterate, one
    trace column per evaluated iterate (abs and rel residuals, evaluations spent, λ) and
    the best iterate at each requested 1-based evaluation count of ``indexing``.

    Example:
        >>> record = Record.start(torch.zeros(2, 1), Budget(5), 'abs', indexing=[1])
        >>> record.budget.spend()
        True
        >>> abs_res, rel_res = record.add(torch.ones(2, 1), torch.ones(2, 1))
        >>> abs_res.tolist(), record.best.step.tolist(), len(record.trajectory)
        ([0.0, 0.0], [1.0, 1.0], 1)
    """

    budget: Budget
    best: BestIterate
    stop_mode: str
    indexing: list[int]
    trajectory: list[Tensor] = field(default_factory=list)
    abs_trace: list[Tensor] = field(default_factory=list)
    rel_trace: list[Tensor] = field(default_factory=list)
    trace_nfe: list[int] = field(default_factory=list)
    lam_trace: list[Tensor] = field(default_factory=list)
    last: tuple[Tensor, Tensor] | None = None    # (z, f(z)) of the last evaluation
    _ones: Tensor | None = None                  # λ = 1 for each sample, shared

    @classmethod
    def start(cls, x0: Tensor, budget: Budget, stop_mode: str,
              indexing: list[int] | None = None) -> Record:
        """An empty record: x0 as the best iterate, at an infinite residual."""
        inf = torch.full((x0.shape[0],), float("inf"), dtype=x0.dtype, device=x0.device)
        best = BestIterate(z=x0.clone(), abs_res=inf.clone(), rel_res=inf.clone(),
                           step=torch.zeros_like(inf))
        return cls(budget=budget, best=best, stop_mode=stop_mode,
                   indexing=sorted(indexing or []))

    def add(self, z: Tensor, fz: Tensor, lam: Tensor | None = None,
            mixing: Tensor | bool = False) -> tuple[Tensor, Tensor]:
        """Record fz = f(z), already counted in the budget, at homotopy parameter ``lam``
        (default 1): the residuals (returned), the traces, the best iterate and the
        trajectory entries whose evaluation count is now reached. ``mixing``: the rows (or
        all, True) whose step to z was a fixed-point or Anderson step from the last
        evaluated point; for them, within the budget's last ``SECANT_WINDOW`` calls, the
        best iterate keeps the step's :func:`secant_ratio` (which
        :func:`~torchdeq_homotopy.solvers.returned_state` reads). ``z`` and ``fz`` are held
        until the next call and must not be written in place before it."""
        abs_res, rel_res = residuals(z, fz)
        used = self.budget.used
        self.abs_trace.append(abs_res)
        self.rel_trace.append(rel_res)
        self.trace_nfe.append(used)
        if lam is None:     # λ = 1: one tensor of ones, shared by the trace's columns
            if self._ones is None:
                self._ones = torch.ones_like(abs_res)
            self.lam_trace.append(self._ones)
        else:
            self.lam_trace.append(lam.clone())
        contraction = None
        if self.last is not None and mixing is not False and self.budget.left < SECANT_WINDOW:
            contraction = secant_ratio(z, fz, *self.last)
            if torch.is_tensor(mixing):
                contraction = contraction.masked_fill(~mixing, float("inf"))
        self.last = (z, fz)
        self.best.update(z, abs_res, rel_res, self.stop_mode, used, fz=fz,
                         contraction=contraction)
        while (len(self.trajectory) < len(self.indexing)
               and self.indexing[len(self.trajectory)] <= used):
            self.trajectory.append(self.best.z.clone())
        return abs_res, rel_res

    def result(self, status: Tensor, lam: Tensor, restarts: Tensor | None = None,
               krylov_solves: int = 0, krylov_products: int = 0) -> TrackerResult:
        """The solve's result: the best iterate, the traces, and the trajectory completed
        with the best iterate for counts never reached."""
        best = self.best
        missing = len(self.indexing) - len(self.trajectory)
        return TrackerResult(
            z_best=best.z, abs_best=best.abs_res, rel_best=best.rel_res, step_best=best.step,
            abs_trace=self.abs_trace, rel_trace=self.rel_trace, status=status, lam=lam,
            evals=self.budget.used,
            trajectory=self.trajectory + [best.z.clone() for _ in range(missing)],
            trace_nfe=self.trace_nfe, lam_trace=self.lam_trace,
            restarts=torch.zeros_like(status) if restarts is None else restarts,
            krylov_solves=krylov_solves, krylov_products=krylov_products,
            fz_best=best.fz,
            contraction_best=(best.contraction if best.contraction is not None
                              else torch.full_like(best.abs_res, float("inf"))))
