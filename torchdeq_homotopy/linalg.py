"""Matrix-free linear algebra: batched GMRES and Jacobian-vector products.

Everything here works on flat batches ``(B, n)``: one independent linear system per row.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from . import host

Tensor = torch.Tensor
MatVec = Callable[[Tensor], Tensor]


def batch_dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise inner products ``<a_i, b_i>`` of two ``(B, n)`` batches, shape ``(B,)``.

    Example:
        >>> batch_dot(torch.ones(2, 3), torch.ones(2, 3))
        tensor([3., 3.])
    """
    return (a * b).sum(dim=1)


def eisenstat_walker(h_norm: Tensor, h_prev: Tensor, eta_prev: Tensor, eta_first: float,
                     target: Tensor, gamma: float = 0.9, alpha: float = 2.0,
                     eta_max: float = 0.9) -> Tensor:
    """Per-row forcing term η_k of an inexact Newton step (Eisenstat & Walker 1996,
    choice 2, with the safeguards of Kelley, *Iterative Methods for Linear and Nonlinear
    Equations*, §6.3): the linear solve of step k stops at ||r|| <= η_k ||H_k||, where

        η_k = γ (||H_k|| / ||H_{k-1}||)^α                      (η_first on the first step)
        η_k = max(η_k, γ η_{k-1}^α)        where γ η_{k-1}^α > 0.1   (no sudden drop)
        η_k = min(η_max, max(η_k, 0.5 target / ||H_k||))      (no oversolving near target)

    Fast progress tightens the solve (superlinear convergence); slow progress loosens it,
    so products are not spent on a step the nonlinear residual will not follow.

    Args:
        h_norm: ||H_k|| per row; ``h_prev``: ||H_{k-1}|| (inf before the first step).
        eta_prev: η_{k-1} per row; ``eta_first``: η on a row's first step.
        target: the residual norm a row must reach, per row.

    Example:
        >>> h = torch.tensor([1e-2, 0.5]); prev = torch.tensor([1.0, 1.0])
        >>> eisenstat_walker(h, prev, torch.tensor([0.01, 0.01]), 0.01, torch.zeros(2))
        tensor([9.0000e-05, 2.2500e-01])
    """
    continuing = torch.isfinite(h_prev)
    eta = torch.where(continuing, gamma * (h_norm / h_prev) ** alpha, eta_first)
    guard = gamma * eta_prev ** alpha
    eta = torch.where(continuing & (guard > 0.1), torch.maximum(eta, guard), eta)
    eta = torch.maximum(eta, 0.5 * target / h_norm.clamp_min(torch.finfo(h_norm.dtype).tiny))
    return torch.nan_to_num(eta, nan=eta_first).clamp(max=eta_max)


class LaggedAll:
    """``bool(mask.all())`` for a loop's stopping test, without stalling an accelerator
    at every iteration.

    On CPU (or with ``lagged=False``) the answer is read at once. On CUDA reading it would
    wait for every queued kernel (a host sync per iteration), so after the first test the
    reduction is copied to pinned host memory asynchronously instead, and read once its
    copy has landed (``torch.cuda.Event.query``), one iteration or more later. For masks
    that only gain True entries (rows that stop stay stopped) a stale answer is never a
    wrong True: the loop may run past the iteration where it could have stopped, never
    stop early. The first test is read at once everywhere (one sync per loop): a loop
    with nothing to do, such as a Krylov solve for which no row is required, must not run
    a step, and on the tracker's GMRES that step would be a product charged to the
    budget. ``lagged=True`` on CPU reads each later answer exactly one call late (tests).

    Example:
        >>> flag = LaggedAll(torch.device('cpu'), lagged=True)
        >>> flag(torch.tensor([False])), flag(torch.tensor([True])), flag(torch.tensor([True]))
        (False, False, True)
        >>> LaggedAll(torch.device('cpu'), lagged=True)(torch.tensor([True]))   # first: at once
        True
    """

    def __init__(self, device: torch.device, lagged: bool | None = None) -> None:
        self.lagged = device.type == "cuda" if lagged is None else lagged
        self._pending: tuple[Callable[[], bool], Tensor] | None = None
        self._first = True

    def __call__(self, mask: Tensor) -> bool:
        if not self.lagged or self._first:
            self._first = False
            return bool(mask.all())
        if self._pending is not None and self._pending[0]():
            if self._read(self._pending[1]):
                return True
            self._pending = None
        if self._pending is None:
            self._pending = self._copy_to_host(mask.all())
        return False

    @staticmethod
    def _read(host_copy: Tensor) -> bool:
        """The value of a landed host copy (host memory: no device sync)."""
        return bool(host_copy)

    @staticmethod
    def _copy_to_host(flag: Tensor) -> tuple[Callable[[], bool], Tensor]:
        """(landed, host copy): an asynchronous copy and the query of its event on CUDA; an
        immediate copy elsewhere."""
        if flag.device.type != "cuda":
            return (lambda: True), flag.clone()
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return event.query, host


def _hessenberg_column(h: Tensor, w: Tensor, inactive: Tensor
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Column j of the Arnoldi Hessenberg matrix from the projections h = V_jᵀ A v_j and
    the orthogonalized remainder w: h_{j+1,j} = ||w||, per row.

    h_{j+1,j} ≈ 0 with a nonzero column is a breakdown: the Krylov space is invariant and
    the solution exact. A zero column (A v_j = 0) is singular: A is singular on the space,
    and the row stops unsolved. A stopped row (``inactive`` or singular) gets the column
    e_{j+1}: below every real row of H, it keeps H full rank and gives y_j = 0.

    Returns (h, h_{j+1,j}, stopped, breakdown, singular).
    """
    tiny = torch.finfo(w.dtype).tiny ** 0.5
    h_next = w.norm(dim=1)
    small = h_next <= 1e3 * torch.finfo(w.dtype).eps * h.norm(dim=1).clamp_min(tiny)
    singular = h.norm(dim=1) <= tiny
    breakdown = small & ~singular
    stopped = inactive | singular
    h = torch.where(stopped[:, None], torch.zeros_like(h), h)
    h_next = torch.where(breakdown, torch.zeros_like(h_next), h_next)
    h_next = torch.where(stopped, torch.ones_like(h_next), h_next)
    return h, h_next, stopped, breakdown, singular


def gmres(
    matvec: MatVec,
    b: Tensor,
    *,
    rtol: float | Tensor = 1e-2,
    max_iter: int = 20,
    on_matvec: Callable[[], bool] | None = None,
    precond: MatVec | None = None,
    required: Tensor | None = None,
    lagged_stop: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Solve ``A x_i = b_i`` for every row of ``b`` by GMRES(m) without restarts, from x = 0.

    With a right preconditioner ``precond`` (v -> P⁻¹ v, linear and fixed during the
    solve), the Arnoldi process runs on A P⁻¹ and the solution is x = P⁻¹ V_k y_k; the
    residual ||b - A x|| is the same quantity as without it.

    The Arnoldi process builds an orthonormal basis ``V_k`` of the Krylov space
    ``K_k(A, b) = span{b, Ab, ..., A^{k-1} b}`` with ``A V_k = V_{k+1} H_k``
    (``H_k`` upper Hessenberg, ``(k+1) x k``); the iterate is ``x_k = V_k y_k`` with

        y_k = argmin_y || β e_1 - H_k y ||,    β = ||b||,

    and ``|| b - A x_k || = || β e_1 - H_k y_k ||``. Each row stops contributing once its
    residual is below ``rtol * β`` (or its basis breaks down, ``h_{k+1,k} = 0``, which
    means the solution is exact); the loop ends when every row has stopped, after
    ``max_iter`` products, or when ``on_matvec`` returns False (an exhausted budget).

    Rows whose data are not finite are returned as zeros and flagged.

    Args:
        matvec: ``v -> A v`` on ``(B, n)`` batches, row-wise independent.
        b: right-hand sides, ``(B, n)``.
        rtol: relative residual tolerance, a float or one per row ``(B,)``.
        max_iter: Krylov dimension (number of products).
        on_matvec: called before each product; returning False stops the iteration.
        precond: optional right preconditioner ``v -> P⁻¹ v`` on ``(B, n)`` batches.
        required: optional ``(B,)`` mask; the iteration ends once these rows are done, and
            the other rows (riding along on the same batched products) keep the iterate
            they reached by then.
        lagged_stop: read the stopping test one iteration or more late, without a host
            sync (:class:`LaggedAll`); None: on CUDA. A stopped row's later columns are
            e_{j+1} and leave its solution unchanged, so a late stop costs only products.

    Returns:
        ``(x, ok)``: solutions ``(B, n)`` and a ``(B,)`` bool mask of rows that reached
        ``rtol`` with finite values.

    Example:
        >>> A = torch.tensor([[[2., 1.], [0., 3.]]])
        >>> x, ok = gmres(lambda v: (A @ v.unsqueeze(-1)).squeeze(-1), torch.tensor([[3., 3.]]))
        >>> torch.allclose(x, torch.tensor([[1., 1.]])), bool(ok)
        (True, True)
    """
    bsz, n = b.shape
    beta = b.norm(dim=1)
    finite = torch.isfinite(beta)
    beta = torch.where(finite, beta, torch.zeros_like(beta))
    tiny = torch.finfo(b.dtype).tiny ** 0.5
    done = beta <= tiny
    basis = b.new_zeros(bsz, max_iter + 1, n)
    basis[:, 0] = torch.where(done[:, None], torch.zeros_like(b), b / beta.clamp_min(tiny)[:, None])
    hess = b.new_zeros(bsz, max_iter + 1, max_iter)
    # u spans the left null space of H_k: H_kᵀ u = 0, u_0 = 1; then ||r_k|| = β / ||u||.
    null = b.new_zeros(bsz, max_iter + 1)
    null[:, 0] = 1
    residual = beta.clone()
    steps = 0
    all_finished = LaggedAll(b.device, lagged_stop)
    for j in range(max_iter):
        finished = done if required is None else done | ~required
        if all_finished(finished) or (on_matvec is not None and not on_matvec()):
            break
        w = matvec(basis[:, j] if precond is None else precond(basis[:, j]))
        h, w = _orthogonalize(basis[:, : j + 1], w)
        h, h_next, stopped, breakdown, singular = _hessenberg_column(h, w, done | ~finite)
        hess[:, : j + 1, j] = h
        hess[:, j + 1, j] = h_next
        basis[:, j + 1] = torch.where((stopped | breakdown)[:, None], torch.zeros_like(w),
                                      w / h_next.clamp_min(tiny)[:, None])
        steps = j + 1
        # u_{j+1} = -(Σ_{i<=j} h_ij u_i) / h_{j+1,j}  (breakdown: exact, residual 0).
        u_next = -batch_dot(h, null[:, : j + 1]) / h_next.clamp_min(tiny)
        null[:, j + 1] = torch.where(stopped | breakdown, torch.zeros_like(u_next), u_next)
        new_residual = beta / null[:, : j + 2].norm(dim=1)
        new_residual = torch.where(breakdown & ~stopped, torch.zeros_like(h_next), new_residual)
        residual = torch.where(stopped, residual, new_residual)
        finite = finite & torch.isfinite(residual) & torch.isfinite(h).all(dim=1)
        done = done | ~finite | breakdown | singular | (residual <= rtol * beta)
    if steps == 0:
        return torch.zeros_like(b), finite & (beta <= tiny)
    x = _krylov_solution(hess[:, : steps + 1, :steps], basis[:, :steps], beta, finite)
    if precond is not None:
        x = precond(x)
    finite = finite & finite_rows(x)
    x = torch.where(finite[:, None], x, torch.zeros_like(x))
    ok = finite & (residual <= rtol * beta + tiny)
    return x, ok


def bmv(A: Tensor, x: Tensor) -> Tensor:
    """A x per row, ``(B, m, n), (B, n) -> (B, m)``, computed as the row vector xᵀ times
    the transposed view Aᵀ (no copy): (A x)ᵀ = xᵀ Aᵀ.

    On CPU, ``torch.bmm`` with x as a one-column right-hand side takes a path 3–11× slower
    than this form (torch 2.14.1, batch 64, n = 256 to 12,544; BENCHMARKS.md, "Batched
    matrix–vector products"); the two give the same values up to rounding.

    Example:
        >>> A = torch.arange(6.0).reshape(1, 2, 3); x = torch.ones(1, 3)
        >>> bmv(A, x)
        tensor([[ 3., 12.]])
    """
    return torch.bmm(x.unsqueeze(1), A.mT).squeeze(1)


def finite_rows(x: Tensor) -> Tensor:
    """Whether every entry of each row is finite, ``(B, ...) -> (B,)``, as
    ``torch.isfinite(x).flatten(1).all(1)`` but from one reduction: a row's sum is
    finite exactly when all its entries are (NaN and ±inf propagate through a sum), as
    long as the sum of finite entries cannot overflow. Summed in float64, entries of
    float32 or narrower cannot (n · 3.4e38 stays far below 1.8e308); float64 rows (and
    devices without float64) take the elementwise test. 7× faster at 64 × 12,544 float32
    entries, 3× at 64 × 256, a few µs slower at 8 × 128 (``benchmarks/matvec.py``).

    Example:
        >>> finite_rows(torch.tensor([[1.0, 3e38, 3e38], [1.0, float('nan'), 0.0]]))
        tensor([ True, False])
    """
    flat = x.flatten(1)
    if flat.dtype == torch.float64 or flat.device.type == "mps" \
            or not flat.dtype.is_floating_point:
        return torch.isfinite(flat).all(dim=1)
    return torch.isfinite(flat.sum(dim=1, dtype=torch.float64))


BATCHED_LU_MAX = 128
"""Largest matrix side that :func:`lu_factor` factors as one batch on a multi-threaded CPU."""


def lu_factor(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.lu_factor_ex(A)`` for a batch ``(B, k, k)``: P A = L U per matrix,
    with ``info`` > 0 where A is singular.

    On CPU with more than one thread and k > ``BATCHED_LU_MAX``, the matrices are factored
    one at a time. torch 2.14.1's batched CPU factorization (MKL 2024.2), which splits the
    batch over threads while MKL threads each factorization, returns invalid pivots
    ("Pivots given to lu_solve must all be greater or equal to 1") or never returns for
    k ≳ 150 with 2 threads; batches of one, and any batch with one thread, are correct. One at
    a time is also the faster of the two there (8 × 513 matrices: 13.5 ms against 22.4 ms for
    the batch on one thread), since MKL threads each factorization itself; at k <= 144 the
    batch is correct (30 calls each at batch 2–512) and twice as fast as a loop.

    Example:
        >>> A = torch.eye(200).expand(3, 200, 200) * 2.0
        >>> lu, pivots, info = lu_factor(A)
        >>> x = torch.linalg.lu_solve(lu, pivots, torch.ones(3, 200, 1))
        >>> x[0, :2, 0].tolist(), info.tolist()
        ([0.5, 0.5], [0, 0, 0])
    """
    if (A.device.type != "cpu" or A.dim() < 3 or A.shape[-1] <= BATCHED_LU_MAX
            or torch.get_num_threads() == 1 or A.flatten(0, -3).shape[0] <= 1):
        return torch.linalg.lu_factor_ex(A)
    flat = A.flatten(0, -3)
    parts = [torch.linalg.lu_factor_ex(flat[i:i + 1]) for i in range(flat.shape[0])]
    lu, pivots, info = (torch.cat(column) for column in zip(*parts, strict=True))
    return (lu.view(A.shape), pivots.view(*A.shape[:-2], A.shape[-1]),
            info.view(A.shape[:-2]))


def _orthogonalize(v_j: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Classical Gram–Schmidt, twice (CGS2), against the basis ``v_j`` ``(B, j+1, n)``:
    h = V_jᵀ w,  w ← w − V_j h, repeated once; returns (h₁ + h₂, w)."""
    h = bmv(v_j, w)
    w = w - torch.bmm(h.unsqueeze(1), v_j).squeeze(1)
    h2 = bmv(v_j, w)
    w = w - torch.bmm(h2.unsqueeze(1), v_j).squeeze(1)
    return h + h2, w


def _krylov_solution(hess: Tensor, basis: Tensor, beta: Tensor, finite: Tensor) -> Tensor:
    """x = V_k y,  y = argmin_y ||β e_1 − H_k y||  (``hess`` ``(B, k+1, k)``, ``basis``
    ``(B, k, n)``), once, at the end. Rows with non-finite data get H = [0; I], so y = 0."""
    bsz, steps = hess.shape[0], hess.shape[2]
    rhs = hess.new_zeros(bsz, steps + 1)
    rhs[:, 0] = beta
    rhs = torch.where(finite[:, None], rhs, torch.zeros_like(rhs))
    sub_eye = torch.eye(steps + 1, dtype=hess.dtype, device=hess.device)[:, 1:]   # e_{j+1}
    h_k = torch.where(finite[:, None, None], hess, sub_eye)
    y = torch.linalg.lstsq(h_k, rhs.unsqueeze(-1)).solution.squeeze(-1)
    return torch.bmm(y.unsqueeze(1), basis).squeeze(1)


class Linearization:
    """``f`` at a batch of points ``z``, with its Jacobian-vector products ``J_f(z) v``.

    ``mode='finite_difference'`` uses the Jacobian-free Newton–Krylov product

        J v ≈ (f(z + ε v) - f(z)) / ε,    ε = sqrt(eps) (1 + ||z||) / ||v||   (per row),

    which costs one call of ``f``. ``mode='forward'`` uses ``torch.func.jvp`` (exact,
    several times the cost of a call on CPU); ``'auto'`` tries forward mode once and falls
    back to finite differences for callables that do not support it.

    Example:
        >>> lin = Linearization(lambda z: 2 * z, torch.ones(1, 3), torch.full((1, 3), 2.))
        >>> torch.allclose(lin.jvp(torch.ones(1, 3)), torch.full((1, 3), 2.), rtol=1e-3)
        True
    """

    def __init__(self, f: Callable[[Tensor], Tensor], z: Tensor, fz: Tensor,
                 mode: str = "finite_difference") -> None:
        self.f, self.z, self.fz, self.mode = f, z, fz, mode
        # ε · ||v|| per row, (B, 1): sqrt(eps) (1 + ||z||), with eps the precision f is
        # evaluated in (``f.precision_eps`` where f declares it, as under autocast)
        eps = getattr(f, "precision_eps", torch.finfo(z.dtype).eps)
        self.step_scale = eps ** 0.5 * (1 + z.norm(dim=1, keepdim=True))

    def jvp(self, v: Tensor) -> Tensor:
        if self.mode in ("forward", "auto"):
            try:
                return torch.func.jvp(self.f, (self.z,), (v,))[1]
            except Exception as err:
                if self.mode == "forward":
                    raise
                warnings.warn(f"forward-mode JVP unavailable ({err!r}); using finite differences",
                              stacklevel=2)
                self.mode = "finite_difference"
        v_norm = v.norm(dim=1, keepdim=True)
        eps = self.step_scale / v_norm.clamp_min(1e-30)
        jv = (self.f(self.z + eps * v) - self.fz) / eps
        return torch.where(v_norm > 0, jv, torch.zeros_like(jv))


def dense_jacobian(f: Callable[[Tensor], Tensor], z: Tensor, fz: Tensor,
                   mode: str = "finite_difference") -> tuple[Tensor, str]:
    """The Jacobians ``J_f(z_i)`` of every row, shape ``(B, n, n)``, from ``n`` products.

    Column ``k`` is ``J e_k``: all ``n`` products run as one ``torch.func.vmap`` call over
    the basis vectors (forward mode ``torch.func.jvp``, or the finite difference
    ``(f(z + ε e_k) - f(z)) / ε`` with ``ε = sqrt(eps) (1 + ||z||)``). A callable that
    ``vmap`` cannot trace (random ops, ``torch.autograd.grad`` inside) gets the columns one
    product at a time, each still batched over the rows.

    For ``n`` at most the Krylov dimension this costs no more products than GMRES may need,
    takes one vectorised call instead of ``n`` sequential ones, and gives exact solves.

    Returns:
        ``(J, mode)``: the Jacobians and the product mode that worked (``'auto'`` resolves
        to ``'forward'`` or ``'finite_difference'``).

    Example:
        >>> A = torch.tensor([[2., 1.], [0., 3.]])
        >>> z = torch.ones(4, 2)
        >>> J, _ = dense_jacobian(lambda v: v @ A.T, z, z @ A.T, mode="forward")
        >>> torch.allclose(J, A.expand(4, 2, 2))
        True
    """
    n = z.shape[1]
    eye = torch.eye(n, dtype=z.dtype, device=z.device)
    lin = Linearization(f, z, fz, mode)

    def column(e: Tensor) -> Tensor:
        return lin.jvp(e.expand_as(z))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if lin.mode == "finite_difference":
                # ||e_k|| = 1, so ε is the row's own scale: vmap f alone over z + ε e_k.
                shifted = z + lin.step_scale * eye[:, None, :]      # (n, B, n)
                cols = (torch.func.vmap(f)(shifted) - fz) / lin.step_scale
            else:
                cols = torch.func.vmap(column)(eye)           # (n, B, n): cols[k] = J e_k
    except Exception:
        lin = Linearization(f, z, fz, lin.mode)
        cols = torch.stack([column(e) for e in eye])
    return cols.permute(1, 2, 0), lin.mode


class SecantJacobian:
    """Dense Jacobians ``J_f`` per sample: exact on refresh, kept current by Broyden between.

    After each new evaluation ``(z, f(z))`` every sample that moved gets Broyden's rank-one
    secant update (free: no products)

        J ← J + (Δf - J Δz) Δzᵀ / (Δzᵀ Δz),    Δz = z - z_prev,  Δf = f(z) - f(z_prev),

    so that ``J Δz = Δf`` holds for the last step. :meth:`refresh` recomputes every row
    exactly by :func:`dense_jacobian` (``n`` products); ``exact`` marks the rows that have
    not moved since.

    Example:
        >>> A = torch.tensor([[2., 1.], [0., 3.]])
        >>> f = lambda v: v @ A.T
        >>> cache = SecantJacobian(f, "forward")
        >>> z = torch.ones(1, 2); cache.observe(z, f(z)); cache.refresh()
        >>> torch.allclose(cache.jac[0], A), bool(cache.exact[0])
        (True, True)
    """

    def __init__(self, f: Callable[[Tensor], Tensor], mode: str,
                 gather_rows: bool | None = None) -> None:
        self.f, self.mode = f, mode
        self.gather_rows = gather_rows      # None: gather on CPU, full-batch update elsewhere
        self.jac: Tensor | None = None
        self.exact: Tensor | None = None
        self.z: Tensor | None = None
        self.fz: Tensor | None = None

    def observe(self, z: Tensor, fz: Tensor) -> None:
        """Record the newest evaluation and apply the secant update to rows that moved.

        On CPU (or with ``gather_rows=True``) only the rows that moved are gathered and
        updated (one host check): late in a solve most samples have finished and their
        Jacobians stay as they are. On accelerators every row is updated, with a zero
        update for the others (no sync).
        """
        if self.jac is not None and self.z is not None:
            dz, df = z - self.z, fz - self.fz
            dz_sq = batch_dot(dz, dz)
            # moved, with every entry of Δf and Δz finite (a sum is finite only then)
            moved = ((dz_sq > torch.finfo(z.dtype).tiny) & (dz_sq < float("inf"))
                     & (df.sum(dim=1).abs() < float("inf")))
            gather = host.reads_cheap(z) if self.gather_rows is None else self.gather_rows
            if gather:
                rows = moved.nonzero().squeeze(1)
                if rows.numel():
                    self.jac[rows] = self._secant_update(self.jac[rows], dz[rows], df[rows],
                                                         dz_sq[rows])
            else:
                keep = moved[:, None]
                self.jac = self._secant_update(self.jac, torch.where(keep, dz, 0.0),
                                               torch.where(keep, df, 0.0),
                                               torch.where(moved, dz_sq, 1.0))
            self.exact = self.exact & ~moved
        self.z, self.fz = z, fz

    @staticmethod
    def _secant_update(jac: Tensor, dz: Tensor, df: Tensor, dz_sq: Tensor) -> Tensor:
        """J + (Δf - J Δz) Δzᵀ / (Δzᵀ Δz), batched: one bmm and one baddbmm."""
        miss = df - bmv(jac, dz)
        return torch.baddbmm(jac, miss.unsqueeze(-1), (dz / dz_sq[:, None]).unsqueeze(1))

    def refresh(self) -> None:
        """Recompute every row exactly at the last observed point (``n`` products)."""
        jac, self.mode = dense_jacobian(self.f, self.z, self.fz, self.mode)
        self.jac = jac.contiguous()       # updated in place by observe; fast bmm
        self.exact = torch.ones(self.z.shape[0], dtype=torch.bool, device=self.z.device)
