"""The tracker's linear solve: the bordered system [H_z  H_λ; borderᵀ] δ = rhs.

One batched solve per iteration serves every phase: Newton and endgame (border e_λ),
the corrector (border t, the pseudo-arclength condition) and the tangent (rhs [0; 1]).
H_z = ∂H/∂z is I − λ J_f for the fixed-point homotopy, so a product with it is one
Jacobian-vector product of f. Three ways to solve, chosen by ``homo_linear_solver``:

* ``'secant'``: a low-rank model J_f ≈ U Vᵀ per sample, solved by Woodbury
  (:mod:`torchdeq_homotopy.secant`); where an exact solve is needed, GMRES
  right-preconditioned by the model, whose products are absorbed into it;
* ``'gmres'``: matrix-free GMRES on Jacobian-vector products;
* ``'dense'``: LU on the dense bordered matrix, the Jacobian from n products in one
  vmapped call, kept current between refreshes by Broyden's update.

:class:`BorderedSolves` is a mixin of :class:`~torchdeq_homotopy.path.PathTracker`.
"""
from __future__ import annotations

import torch

from .homotopies import FixedPointHomotopy, NewtonHomotopy
from .linalg import Linearization, batch_dot, dense_jacobian, finite_rows, gmres, lu_factor
from .outcome import Budget, _where
from .secant import LowRankJacobian
from .tracker_state import JacobianModels, _maybe_any

Tensor = torch.Tensor


class BorderedSolves:
    """The tracker's linear algebra (uses the tracker's ``f``, ``n`` and ``opt``; the
    homotopy and the Jacobian models come with each call, in ``models``)."""

    def _solve(self, models: JacobianModels, y: Tensor, fz: Tensor, border: Tensor,
               rhs: Tensor, budget: Budget, need_exact: Tensor | None = None,
               rows: Tensor | None = None, rtol: Tensor | float | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
        """Solve the bordered system  [H_z  H_λ; borderᵀ] δ = rhs  at y = (z, λ).

        The border row keeps the system regular at turning points of the path. Small
        states (``n <= homo_krylov_dim`` under ``homo_linear_solver='auto'``, or ``'dense'``)
        form the matrix from a dense Jacobian and solve it by LU; ``'secant'`` uses its
        low-rank model; others use GMRES, where (H_z u + H_λ μ) costs one Jacobian-vector
        product.

        ``need_exact`` (the main loop's solves) lets dense solves reuse the secant-updated
        Jacobian of :class:`~torchdeq_homotopy.linalg.SecantJacobian`, refreshed (``n``
        products) only when one of these samples needs it; without it the Jacobian is
        computed afresh. A dense solve factors only the ``rows`` given (default: all); the
        other rows come back as zeros. ``rtol`` is GMRES's relative tolerance, per row or
        one for all (default ``homo_krylov_rtol``).

        Returns:
            ``(δ, finite, exact)``: the solution, the rows solved with finite values, and
            the rows whose Jacobian was exact.
        """
        n, hom = self.n, models.homotopy
        z, lam = y[:, :n], y[:, n]
        rtol = self.opt.krylov_rtol if rtol is None else rtol
        if models.linear_solver == "secant":
            return self._solve_secant(models, z, lam, fz, border, rhs, budget, need_exact,
                                      rows, rtol)
        if models.linear_solver == "dense":
            jac, exact = self._dense_jacobian(models, z, fz, budget, need_exact)
            if jac is not None:
                h_lam = hom.d_lambda(z, fz)
                return (*self._solve_dense(hom, jac, h_lam, lam, border, rhs, rows), exact)
        lin = Linearization(self.f, z, fz, models.jvp_mode)
        h_lam = hom.d_lambda(z, fz)

        def matvec(x: Tensor) -> Tensor:
            u, mu = x[:, :n], x[:, n]
            top = hom.d_z(u, lin.jvp(u), lam) + h_lam * mu[:, None]
            return torch.cat([top, batch_dot(border, x)[:, None]], dim=1)

        calls = budget.used
        sol, _ = gmres(matvec, rhs, rtol=rtol, max_iter=self.opt.krylov_dim,
                       on_matvec=budget.spend_leaving_one)
        models.krylov_solves += 1
        models.krylov_products += budget.used - calls
        models.jvp_mode = lin.mode
        finite = finite_rows(sol)
        exact = torch.ones_like(finite)
        return torch.where(finite[:, None], sol, torch.zeros_like(sol)), finite, exact

    def _linear_solver(self) -> str:
        """The solver of the path's bordered systems: ``'dense'``, ``'secant'`` or
        ``'gmres'``. ``'auto'`` is dense when n <= ``homo_krylov_dim`` (a refresh costs no
        more products than one GMRES solve may, in one vectorised call), else secant."""
        choice = self.opt.linear_solver
        if choice == "auto":
            return "dense" if self.n <= self.opt.krylov_dim else "secant"
        return choice

    def _broyden_newton(self, budget_left: int | float) -> bool:
        """Whether the phase at λ = 1 starts as Broyden's method (one evaluation a step, no
        products) rather than exact Newton: under ``'secant'``, and under ``'auto'`` unless
        the path's solves are dense (n <= ``homo_krylov_dim``) and exact Newton is cheap
        there: its ``homo_newton_iters`` steps of n + 1 evaluations each fit in a quarter of
        the ``budget_left``, leaving the rest to Broyden's method and the path."""
        choice = self.opt.linear_solver
        if choice != "auto":
            return choice == "secant"
        newton_cost = self.opt.newton_iters * (self.n + 1)
        return self._linear_solver() != "dense" or 4 * newton_cost > budget_left

    def _broyden_next(self, budget_left: int | float) -> bool:
        """Whether stalled exact Newton hands its samples to Broyden's method at λ = 1,
        restarted from z0, before the path: under ``'auto'`` when exact Newton comes
        first. On 32-wide cells exact Newton solves some cells that Broyden's method does
        not, and Broyden's method others that the path does not (BENCHMARKS.md, "Small
        states")."""
        return self.opt.linear_solver == "auto" and not self._broyden_newton(budget_left)

    def _solve_secant(self, models: JacobianModels, z: Tensor, lam: Tensor, fz: Tensor,
                      border: Tensor, rhs: Tensor, budget: Budget, need_exact: Tensor | None,
                      rows: Tensor | None, rtol: Tensor | float
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """Bordered solves through the low-rank secant model B ≈ J_f
        (:class:`~torchdeq_homotopy.secant.LowRankJacobian`).

        Rows that need no exact Jacobian get the model's Woodbury solve of
        [I - sB, H_λ; borderᵀ] δ = rhs (no products). The others (``need_exact``; all rows
        when it is None) run GMRES on the exact operator, right-preconditioned by that
        solve; every product (u, J_f u) GMRES makes is absorbed into the model afterwards.
        The main loop's solves (``need_exact`` given) first record (z, f(z)) for Broyden's
        update of the model; iterations in which every sample takes Broyden steps at λ = 1
        (``rows`` empty) leave the model untouched.
        """
        n, hom = self.n, models.homotopy
        bsz = z.shape[0]
        if rows is not None and not _maybe_any(rows):   # only Broyden steps this iteration
            zeros = torch.zeros_like(rows)
            return torch.zeros_like(rhs), zeros, zeros
        if models.low_rank is None:
            models.low_rank = LowRankJacobian(bsz, n, self.opt.secant_rank, z.dtype, z.device)
        model = models.low_rank
        if need_exact is not None:
            model.observe(z, fz)
        scale = hom.jac_scale(lam)
        h_lam = hom.d_lambda(z, fz)
        model_solve = model.factor_bordered(scale, h_lam, border)
        sol, finite = model_solve(rhs)
        exact = torch.ones_like(finite) if need_exact is None else need_exact.clone()
        if rows is not None:
            exact = exact & rows
        if not _maybe_any(exact):
            return sol, finite, exact
        # Each product is one batched call of f: every other row of the solve rides along
        # and keeps the GMRES iterate reached when the rows that needed it are done.
        required = exact
        if need_exact is not None and rows is not None:
            exact = rows.clone()
        lin = Linearization(self.f, z, fz, models.jvp_mode)
        products: list[tuple[Tensor, Tensor]] = []

        def precond(v: Tensor) -> Tensor:
            return model_solve(v)[0]

        def matvec(x: Tensor) -> Tensor:
            u, mu = x[:, :n], x[:, n]
            ju = lin.jvp(u)
            products.append((u, ju))
            top = hom.d_z(u, ju, lam) + h_lam * mu[:, None]
            return torch.cat([top, batch_dot(border, x)[:, None]], dim=1)

        exact_sol, _ = gmres(matvec, torch.where(exact[:, None], rhs, torch.zeros_like(rhs)),
                              rtol=rtol, max_iter=self.opt.krylov_dim,
                              on_matvec=budget.spend_leaving_one, precond=precond,
                              required=required)
        models.jvp_mode = lin.mode
        models.krylov_solves += 1
        models.krylov_products += len(products)
        if products:
            S = torch.stack([u for u, _ in products], dim=2)
            Y = torch.stack([ju for _, ju in products], dim=2)
            keep = exact[:, None, None] & torch.isfinite(Y).all(dim=1, keepdim=True)
            model.absorb(torch.where(keep, S, 0.0), torch.where(keep, Y, 0.0))
        exact_finite = torch.isfinite(exact_sol).all(dim=1) & (exact_sol.abs().sum(dim=1) > 0)
        # A row that only rode along keeps its model solve when GMRES stopped before giving
        # it an iterate (the required rows broke down or finished first).
        exact = exact & (exact_finite | required)
        sol = _where(exact, exact_sol, sol)
        finite = torch.where(exact, exact_finite, finite)
        return torch.where(finite[:, None], sol, torch.zeros_like(sol)), finite, exact

    def _dense_jacobian(self, models: JacobianModels, z: Tensor, fz: Tensor, budget: Budget,
                        need_exact: Tensor | None) -> tuple[Tensor | None, Tensor]:
        """J_f at z: fresh (n products) or the secant-updated cache; None if the budget
        cannot pay for a needed refresh."""
        every = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        if need_exact is None:
            if not budget.spend(self.n):
                return None, every
            jac, models.jvp_mode = dense_jacobian(self.f, z, fz, models.jvp_mode)
            return jac, every
        cache = models.dense
        cache.observe(z, fz)
        if cache.jac is None or bool((need_exact & ~cache.exact).any()):
            if budget.spend(self.n):
                cache.refresh()
            elif cache.jac is None:
                return None, every
        return cache.jac, cache.exact.clone()

    def _solve_dense(self, hom: FixedPointHomotopy | NewtonHomotopy, jac: Tensor,
                     h_lam: Tensor, lam: Tensor, border: Tensor, rhs: Tensor,
                     rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """LU solve of the bordered matrix  M = [H_z  H_λ; borderᵀ],  (B, n+1, n+1).

        H_z = ∂H/∂z = ``d_z`` applied to the columns of (I, J_f) (I - λJ_f for the
        fixed-point homotopy); a singular M (a zero LU pivot) or a non-finite solution marks
        the row as failed.
        """
        if rows is not None:      # factor only these rows (one host sync per solve)
            idx = rows.nonzero().squeeze(1)
            sol, finite = torch.zeros_like(rhs), torch.ones_like(rows)
            if idx.numel():
                part = self._solve_dense(hom, jac[idx], h_lam[idx], lam[idx], border[idx],
                                         rhs[idx])
                sol[idx], finite[idx] = part
            return sol, finite
        eye = torch.eye(self.n, dtype=jac.dtype, device=jac.device).expand_as(jac)
        h_z = hom.d_z(eye, jac, lam[:, None])        # λ broadcast as (B, 1, 1)
        top = torch.cat([h_z, h_lam[:, :, None]], dim=2)
        matrix = torch.cat([top, border[:, None, :]], dim=1)
        matrix = torch.nan_to_num(matrix, nan=0.0, posinf=0.0, neginf=0.0)
        lu, pivots, info = lu_factor(matrix)
        sol = torch.linalg.lu_solve(lu, pivots, rhs.unsqueeze(-1)).squeeze(-1)
        finite = (info == 0) & (sol.sum(dim=1).abs() < float("inf"))   # all entries finite
        return torch.where(finite[:, None], sol, torch.zeros_like(sol)), finite
