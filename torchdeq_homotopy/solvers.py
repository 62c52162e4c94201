"""TorchDEQ-contract solvers: ``'homotopy'`` and ``'newton_krylov'``.

Both follow TorchDEQ's solver signature::

    solver(func, x0, max_iter=50, tol=1e-3, stop_mode='abs', indexing=None, **kwargs)
        -> (z_star, trajectory, info)

``max_iter`` counts **evaluations**: every call of ``func`` and every Jacobian-vector
product counts one, so budgets compare fairly with TorchDEQ's one-call-per-iteration
solvers. ``info`` is a :class:`torchdeq.solver.stat.SolverStat` with TorchDEQ's keys
(``abs_lowest``, ``rel_lowest``, ``abs_trace``, ``rel_trace``, ``nstep``) plus
``status`` (a :class:`~torchdeq_homotopy.path.Status` code per sample), ``lam``
(the homotopy parameter each sample reached), ``converged``, ``nfe``, ``trace_nfe``
(the evaluation count at each column of the traces), ``lam_trace`` ``(B, N)`` (λ of
each sample's iterate at each column: 1 during the warm-up and Newton phases) and
``restarts`` (the paths each sample restarted from a perturbed start, ``homo_restarts``),
``krylov_solves`` and ``krylov_products`` (GMRES solves of the batch and the
Jacobian-vector products they made, ints).
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torchdeq.solver.stat import SolverStat

from . import host
from .config import SOLVER_KEYS, resolve
from .outcome import Budget, Record, Status, _where, by_stop_mode
from .path import PathTracker, TrackerOptions, TrackerResult
from .warmup import warm_up

Tensor = torch.Tensor


class HomotopyConvergenceError(RuntimeError):
    """Raised in strict mode (``homo_strict=True``) when some samples did not converge;
    ``info`` holds the solve's statistics (per-sample ``status``, residuals).

    Example:
        >>> import torch
        >>> W = 4.0 * torch.eye(3).roll(1, dims=0)         # an expansive tanh cell
        >>> f = lambda z: torch.tanh(z @ W.T + 1.0)
        >>> try:
        ...     homotopy_solver(f, torch.zeros(2, 3), max_iter=2, tol=1e-12,
        ...                     homo_strict=True)
        ... except HomotopyConvergenceError as error:
        ...     print(error.info['status'].tolist())
        [2, 2]
    """

    def __init__(self, message: str, info: SolverStat) -> None:
        super().__init__(message)
        self.info = info


_HALF = (torch.float16, torch.bfloat16)


def _flatten_func(func: Callable[[Tensor], Tensor], x0: Tensor) -> Callable[[Tensor], Tensor]:
    """Wrap ``func`` on states shaped like ``x0`` into a function on flat ``(B, n)`` batches
    in the working dtype (float32 for half-precision states, else the state's dtype).

    Under ``torch.autocast`` (or with a float16/bfloat16 state) ``func`` still runs in the
    caller's precision and autocast context, and its output is cast to the working dtype:
    the solver's own linear algebra always runs in float32 or wider, outside autocast.
    Otherwise the first call checks that ``func`` returns a tensor of the state's shape,
    dtype and device, and raises an error that names the mismatch.
    """
    shape, device_type = x0.shape, x0.device.type
    autocast = torch.is_autocast_enabled(device_type)
    autocast_dtype = torch.get_autocast_dtype(device_type)
    mixed = autocast or x0.dtype in _HALF
    work_dtype = _work_dtype(x0)
    checked = False

    def flat(z: Tensor) -> Tensor:
        nonlocal checked
        # a disabled autocast context costs more to enter (3 µs) than small fs take
        with torch.autocast(device_type, dtype=autocast_dtype) if autocast else nullcontext():
            # contiguous: the iterates are often rows of a history buffer (batch stride
            # m·n), which a user's z.view(-1) rejects, and on which matmul kernels round
            # differently from the returned (contiguous) state
            out = func(z.to(x0.dtype).contiguous().view(shape))
        if not checked:
            if not torch.is_tensor(out):
                raise TypeError(f"func must return a tensor, got {type(out).__name__}.")
            if out.shape != shape:
                raise ValueError(
                    f"func returned shape {tuple(out.shape)} for a state of shape {tuple(shape)}; "
                    "a fixed-point map must return a tensor of the state's shape.")
            if out.device != x0.device or (out.dtype != x0.dtype and not (
                    mixed and out.is_floating_point())):
                raise TypeError(
                    f"func returned {out.dtype} on {out.device} for a state of {x0.dtype} on "
                    f"{x0.device}; cast the initial state (x0.to(...)) or the function's "
                    "output so they match.")
            checked = True
        return out.reshape(z.shape).to(work_dtype)

    # Finite-difference products step by sqrt of the precision f is evaluated in.
    flat.precision_eps = torch.finfo(autocast_dtype if autocast else x0.dtype).eps
    return flat


def _work_dtype(x0: Tensor) -> torch.dtype:
    return torch.float32 if x0.dtype in _HALF else x0.dtype


def _check_x0(x0: Tensor, stop_mode: str, max_iter: int, tol: float) -> None:
    if not torch.is_tensor(x0):
        raise TypeError(f"x0 must be a tensor, got {type(x0).__name__}.")
    if not x0.is_floating_point():
        raise TypeError(f"x0 has dtype {x0.dtype}; the solver needs a floating-point state: "
                        "pass x0.float() or x0.double().")
    if stop_mode not in ("abs", "rel"):
        raise ValueError(f"stop_mode={stop_mode!r} is not valid; choose 'abs' or 'rel'.")
    if max_iter < 0:
        raise ValueError(f"max_iter={max_iter} must be >= 0 (it counts evaluations of func).")
    if not tol >= 0:
        raise ValueError(f"tol={tol} must be >= 0 (0 spends the whole budget).")


def _stat(result: TrackerResult, stop_mode: str, shape_b: int) -> SolverStat:
    info = SolverStat(
        abs_lowest=result.abs_best,
        rel_lowest=result.rel_best,
        abs_trace=torch.stack(result.abs_trace, dim=1),
        rel_trace=torch.stack(result.rel_trace, dim=1),
        nstep=result.step_best,
    )
    info["status"] = result.status
    info["converged"] = result.status == Status.CONVERGED
    info["lam"] = result.lam
    info["nfe"] = torch.full((shape_b,), float(result.evals), device=result.lam.device)
    info["trace_nfe"] = torch.tensor(result.trace_nfe, dtype=torch.long,
                                     device=result.lam.device)
    info["lam_trace"] = torch.stack(result.lam_trace, dim=1)
    info["restarts"] = result.restarts
    info["krylov_solves"] = result.krylov_solves
    info["krylov_products"] = result.krylov_products
    return info


def _unevaluated(x0: Tensor, bsz: int, indexing: list[int] | None, residual: float
                 ) -> tuple[Tensor, list[Tensor], SolverStat]:
    """The solve without a call of f: x0 unchanged, every sample with ``residual`` in one
    trace column. For ``max_iter`` 0, as TorchDEQ's solvers take it (its ``DEQSliced``
    gives each of ``n_states`` slices ``f_max_iter // n_states`` calls, 0 when
    ``f_max_iter`` < ``n_states``), the residual is unknown (inf, MAX_EVALS); a state with
    no entries is a fixed point (0, CONVERGED)."""
    res = torch.full((bsz,), residual, dtype=_work_dtype(x0), device=x0.device)
    status = Status.CONVERGED if residual == 0 else Status.MAX_EVALS
    info = SolverStat(abs_lowest=res, rel_lowest=res.clone(), abs_trace=res[:, None].clone(),
                      rel_trace=res[:, None].clone(), nstep=torch.zeros_like(res))
    info.update(status=torch.full((bsz,), int(status), device=x0.device),
                converged=torch.full((bsz,), status == Status.CONVERGED, device=x0.device),
                lam=torch.ones_like(res), nfe=torch.zeros_like(res),
                trace_nfe=torch.zeros(1, dtype=torch.long, device=x0.device),
                lam_trace=torch.ones_like(res)[:, None],
                restarts=torch.zeros(bsz, dtype=torch.long, device=x0.device),
                krylov_solves=0, krylov_products=0,
                image=torch.zeros(bsz, dtype=torch.bool, device=x0.device))
    return x0.clone(), [x0.clone() for _ in (indexing or [])], info


def _run(func: Callable[[Tensor], Tensor], x0: Tensor, max_iter: int, tol: float,
         stop_mode: str, indexing: list[int] | None, options: dict[str, Any],
         track: bool) -> tuple[Tensor, list[Tensor], SolverStat]:
    _check_x0(x0, stop_mode, int(max_iter), tol)
    opts = resolve(options, SOLVER_KEYS)
    bsz = x0.shape[0] if x0.dim() >= 2 else x0.numel()
    if x0.numel() == 0 or int(max_iter) == 0:
        z_star, trajectory, info = _unevaluated(x0, bsz, indexing,
                                                0.0 if x0.numel() == 0 else float("inf"))
        _check_strict(opts, info, bsz)
        return z_star, trajectory, info
    flat_f = _flatten_func(func, x0)
    x_flat = x0.detach().reshape(bsz, -1).to(_work_dtype(x0))
    with torch.no_grad(), torch.autocast(x0.device.type, enabled=False):
        result = _solve(flat_f, x_flat, int(max_iter), float(tol), stop_mode,
                        list(indexing or []), opts, track)
    # The status describes the returned (best) iterate: a sample whose best residual met
    # the tolerance converged, whatever phase it was in when the budget ran out; one whose
    # best residual is not finite (f was never finite for it) is NONFINITE, whatever phase
    # ended its solve (a budget spent in the warm-up would otherwise say MAX_EVALS).
    best_stop = by_stop_mode(stop_mode, result.abs_best, result.rel_best)
    status = torch.where(torch.isfinite(best_stop), result.status, int(Status.NONFINITE))
    result.status = torch.where(best_stop <= tol, int(Status.CONVERGED), status)
    info = _stat(result, stop_mode, bsz)
    z_out, info["image"] = returned_state(result, opts["homo_return"])
    z_star = z_out.view(x0.shape).to(x0.dtype)
    trajectory = [z.view(x0.shape).to(x0.dtype) for z in result.trajectory]
    _check_strict(opts, info, bsz)
    return z_star, trajectory, info


IMAGE_CONTRACTION = 0.5
"""Largest secant ratio of the step into a best iterate at which ``homo_return='image'``
returns f there instead: f must have shrunk that step at least twofold."""


def returned_state(result: TrackerResult, mode: str) -> tuple[Tensor, Tensor]:
    """The state a solve returns per sample, and where it is f at the best iterate.

    With ``mode='image'``, a sample that did not converge, whose best iterate z_b was
    reached by a fixed-point or Anderson step over which f shrank distances at least
    twofold (secant ratio q < ``IMAGE_CONTRACTION``,
    :func:`~torchdeq_homotopy.outcome.secant_ratio`), returns f(z_b), known from z_b's own
    evaluation: one fixed-point step further. Where f contracts like that near z_b, the
    image's residual is about q times z_b's,

        ||f(f(z_b)) − f(z_b)|| ≈ ||J_f (f(z_b) − z_b)|| ≈ q ||f(z_b) − z_b||.

    TorchDEQ's ``fixed_point_iter`` and ``anderson`` return f at their best iterate for
    every sample. Here the image is taken only where a step measured the contraction, and
    never for converged samples (their status describes the state returned) nor for
    Broyden's, Newton's or the path's iterates, where f often expands (on hard 64-wide
    cells at 30–60 calls, the few images that rule would have taken there ended higher).
    On tanh cells 32 and 256 wide at budgets of 4–12 calls the rule took the image for
    about half the unconverged samples, each lower (0.31–0.54 decades on average; BENCHMARKS.md,
    "Budgets of a few calls"). ``mode='best'``: always the best iterate.

    Example:
        >>> from torchdeq_homotopy import homotopy_solver
        >>> f = lambda z: 0.25 * z + 1.0                # z* = 4/3; f shrinks distances 4x
        >>> z, _, info = homotopy_solver(f, torch.zeros(1, 2), max_iter=2, tol=1e-9)
        >>> info['image'].tolist(), z.tolist()          # best iterate f(0) = 1; returns f(1)
        ([True], [[1.25, 1.25]])
    """
    if mode != "image" or result.fz_best is None or result.contraction_best is None:
        return result.z_best, torch.zeros_like(result.abs_best, dtype=torch.bool)
    image = ((result.status != int(Status.CONVERGED))
             & (result.contraction_best < IMAGE_CONTRACTION))
    if host.reads_cheap(result.z_best) and not bool(image.any()):
        return result.z_best, image
    return _where(image, result.fz_best, result.z_best), image


def _check_strict(opts: dict[str, Any], info: SolverStat, bsz: int) -> None:
    """Under ``homo_strict``, raise :class:`HomotopyConvergenceError` if a sample failed."""
    if opts["homo_strict"] and not bool(info["converged"].all()):
        failed = (~info["converged"]).nonzero().flatten().tolist()
        names = [Status(int(info["status"][i])).name for i in failed[:10]]
        raise HomotopyConvergenceError(
            f"{len(failed)} of {bsz} samples did not converge (first: samples {failed[:10]} "
            f"with status {names}); raise max_iter or loosen tol, or set homo_strict=False to "
            "read the per-sample status in info['status'].", info)


def _solve(f: Callable[[Tensor], Tensor], x: Tensor, max_iter: int, tol: float,
           stop_mode: str, indexing: list[int], opts: dict[str, Any],
           track: bool) -> TrackerResult:
    """The warm-up (homotopy only), then the tracker for what it left unsolved; both add
    their evaluations to one record."""
    tracker = PathTracker(f, x, TrackerOptions.from_keys(opts, track, max_iter))
    record = Record.start(x, Budget(max_iter), stop_mode, indexing)
    if not track or opts["homo_warmup"] == 0:
        return tracker.run(record, tol)
    warm = warm_up(f, x, record, tol, guaranteed=min(opts["homo_warmup"], max_iter // 2),
                   reserve=opts["homo_warmup"])
    if warm.solved(tol) or record.budget.left <= 0:
        return warm.result()
    return tracker.run(record, tol, newton_start=warm.newton_start,
                       newton_start_fz=warm.newton_start_fz, x0_fz=warm.x0_fz)


def homotopy_solver(func: Callable[[Tensor], Tensor], x0: Tensor, max_iter: int = 50,
                    tol: float = 1e-3, stop_mode: str = "abs", indexing: list[int] | None = None,
                    **kwargs: Any) -> tuple[Tensor, list[Tensor], SolverStat]:
    """Find z = f(z): a cheap warm-up, Newton–Krylov, and homotopy path tracking where
    those stall.

    A warm-up (fixed-point iteration while it contracts, then Anderson; see
    :mod:`torchdeq_homotopy.warmup`) solves benign cells at the cost of TorchDEQ's own
    solvers. At training budgets (fewer than 2 · ``homo_warmup`` calls left after the
    fixed-point steps) it keeps the budget, and each sample whose Anderson residual grows or
    stalls switches to Broyden's method in the same loop. Remaining samples take
    Newton–Krylov steps at λ = 1. A sample whose residual
    stalls restarts on the zero path of the fixed-point homotopy

        H(z, λ) = z - λ f(z) - (1 - λ) z0,        λ: 0 → 1,

    (or the Newton homotopy, ``homo_type='newton'``) followed by a predictor–corrector
    tracker with pseudo-arclength and per-sample step control, and ends with a Newton
    endgame at λ = 1 (see :mod:`torchdeq_homotopy.path`). The phase at λ = 1 is Broyden's
    method and linear solves with [I - λJ_f, ∂H/∂λ] go through a low-rank secant model of
    J_f (Woodbury), with GMRES preconditioned by it where an exact solve is needed
    (:mod:`torchdeq_homotopy.secant`); for states of at most ``homo_krylov_dim`` entries
    the path's solves use LU on a dense Jacobian (n products in one vmapped call) kept
    current by Broyden updates between refreshes. A
    sample whose path step underflows, or whose path jumps below λ = 0, restarts from a
    perturbed start.

    Args:
        func: the map f; called with one tensor shaped like ``x0``.
        x0: initial state ``(B, ...)``; a tensor with fewer than 2 dims is one sample
            per element.
        max_iter: evaluation budget (calls of f plus Jacobian-vector products).
        tol: tolerance on the residual ||f(z) - z|| ('abs') or ||f(z) - z|| / ||f(z)||
            ('rel'); 0 spends the whole budget (only an exact fixed point converges).
        stop_mode: 'abs' or 'rel'.
        indexing: 1-based evaluation counts at which the best iterate so far is recorded
            in ``trajectory`` (every index yields one entry).
        **kwargs: ``homo_*`` options (:data:`torchdeq_homotopy.config.SOLVER_KEYS`);
            other keys are ignored, as by TorchDEQ's solvers.

    Returns:
        ``(z_star, trajectory, info)``: the best iterate per sample (or f there, where
        ``info['image']``: :func:`returned_state`), the recorded states, and a
        ``SolverStat`` with ``status``, ``converged``, ``lam``, ``nfe`` and ``image`` added.

    Example:
        >>> f = lambda z: torch.tanh(4 * z + 0.2)          # expansive: fixed-point iteration fails
        >>> z, _, info = homotopy_solver(f, torch.zeros(3, 1), max_iter=300, tol=1e-6)
        >>> bool(((f(z) - z).abs() < 1e-6).all()), info['status'].tolist()
        (True, [1, 1, 1])
    """
    return _run(func, x0, max_iter, tol, stop_mode, indexing, kwargs, track=True)


def newton_krylov_solver(func: Callable[[Tensor], Tensor], x0: Tensor, max_iter: int = 50,
                         tol: float = 1e-3, stop_mode: str = "abs",
                         indexing: list[int] | None = None,
                         **kwargs: Any) -> tuple[Tensor, list[Tensor], SolverStat]:
    """Find z = f(z) by inexact Newton–Krylov: (I - J_f(z)) δ = f(z) - z by GMRES, z ← z + δ.

    The homotopy solver's corrector on its own: quadratic convergence near a regular
    solution, no globalisation. Arguments and returns as :func:`homotopy_solver`.

    Example:
        >>> A = torch.tensor([[0.5, 0.2], [0.1, 0.3]]); b = torch.ones(1, 2)
        >>> z, _, info = newton_krylov_solver(lambda z: z @ A.T + b, torch.zeros(1, 2), tol=1e-6)
        >>> torch.allclose(z, torch.linalg.solve(torch.eye(2) - A, b[0])[None], atol=1e-5)
        True
    """
    return _run(func, x0, max_iter, tol, stop_mode, indexing, kwargs, track=False)
