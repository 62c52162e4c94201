"""Batched predictor–corrector path tracking with pseudo-arclength and per-sample steps.

Each sample of a batch follows the zero path of its own homotopy H(z, λ) (see
:mod:`torchdeq_homotopy.homotopies`) in the unknowns y = (z, λ). Each sample is in one
of these phases, and all of them advance together, one batched call of f and one
batched linear solve per iteration:

``NEWTON``  Newton–Krylov on z = f(z) at λ = 1, tried first (from the warm-up's iterate
            where that helped, else from z0). A sample stalls when three exact-Jacobian
            steps in a row end above the lowest residual it has met (Newton may climb
            before it converges) or when it exceeds its Newton budget. Stalled samples
            wait until no sample is still converging under Newton; then all of them
            start on the path from (z0, 0) together, so that their path steps share
            linear solves.
``TANGENT`` at an accepted point y_a, the unit tangent t of the path solves the bordered
            system   [H_z  H_λ; t_prevᵀ] w = [0; 1],  t = w / ||w||,
            which stays regular at turning points (where H_z = I - λJ is singular) and
            keeps the orientation t · t_prev > 0. The predictor is y_p = y_a + h t
            (``'tangent'``), or the Davidenko ODE dy/ds = t(y) integrated over [0, h]
            by torchdiffeq (``'ode'``); ``'secant'`` skips the solve and takes
            t = (y_a - y_{a-1}) / ||·||. A tangent that turns by more than
            arccos(``max_turn``) from the previous one suggests a jump to another branch:
            the step is retaken from the previous anchor with h/4.
``CORRECT`` Newton on the pseudo-arclength system
                H(y) = 0,   tᵀ (y - y_p) = 0,
            by  [H_z  H_λ; tᵀ] δ = -[H(y); tᵀ(y - y_p)].  The step is accepted when
            ||H|| <= tol_c (1 + ||z||); rejected (h ← h/2, retry from y_a) when the
            corrector exceeds its iterations, contracts worse than θ
            (||δ_k|| > θ ||δ_{k-1}||) or meets non-finite values. Accepted steps grow h
            by a factor set by the corrector's iteration count.
``ENDGAME`` once the path reaches λ >= 1: Newton at λ = 1 (border row e_λ, so the first
            step also moves λ onto 1) down to the requested tolerance.
``DONE``    converged or failed; the sample is frozen (its linear system is zero).

Linear solves (``homo_linear_solver``): for states larger than ``homo_krylov_dim`` (the
``'secant'`` solver), a low-rank secant model of J_f per sample
(:mod:`torchdeq_homotopy.secant`). There the NEWTON phase is Broyden's method in inverse
form (TorchDEQ's iterates, no products); path and endgame solves use the model's Woodbury
solve of the bordered system, and where an exact solve is needed (the same triggers as a
dense refresh below) GMRES right-preconditioned by the model, whose products are absorbed
into the model. Otherwise: matrix-free GMRES on Jacobian-vector products (``'gmres'``), or,
for small states (n <= ``homo_krylov_dim``), LU on the dense bordered matrix. The dense
Jacobian costs n products in one vmapped call; between refreshes it follows Broyden's
secant update at no cost, and a sample asks for a refresh when a Newton step under the
secant Jacobian does not halve its residual, when a corrector under it is rejected (the
step is then retried once, from the same prediction, with the exact Jacobian), or when an
accepted step needed three or more corrector steps (the tangent at its endpoint then uses
the exact Jacobian).

Restarts: a sample whose step underflows, or whose path jumps to a branch at λ < 0 (H(·, 0)
vanishes only at z0), starts a new path from a randomly perturbed z0, up to
``homo_restarts`` times; from almost every start the path is regular.

All per-sample quantities (phase, step h, corrector counts, status) are ``(B,)`` tensors;
there is no Python loop over samples. The best iterate by the fixed-point residual
||z - f(z)|| is kept for every sample throughout.
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .homotopies import HOMOTOPIES, NewtonHomotopy
from .linalg import Linearization, SecantJacobian, batch_dot, dense_jacobian, gmres
from .outcome import BestIterate, Budget, Status, TrackerResult, _where, residuals
from .secant import InverseBroyden, LowRankJacobian

Tensor = torch.Tensor

# Corrector steps after which an accepted path step refreshes the dense Jacobian.
_SLOW_CORRECTOR = 3
# Dense refreshes (n products each) the budget must afford for 'auto' to choose dense solves.
_DENSE_REFRESHES = 10
# Exact-Jacobian Newton steps in a row that may end above the lowest residual met so far
# before a sample counts as stalled. Newton on expansive cells often climbs before it
# converges (up to hundreds of times its best residual, then quadratic convergence); the
# earlier rule, a 10 % fall at every exact step, sent such samples onto the path.
_PATIENCE = 3


class Phase(enum.IntEnum):
    NEWTON = 0
    TANGENT = 1
    CORRECT = 2
    ENDGAME = 3
    DONE = 4


@dataclass
class TrackerOptions:
    """Numerical options of the tracker (the ``homo_*`` solver keys without prefix)."""

    homotopy: str = "fixed_point"
    predictor: str = "tangent"
    ode_method: str = "rk4"
    jvp: str = "finite_difference"
    newton_iters: int = 6
    track: bool = True
    step_init: float = 0.1
    step_min: float = 1e-4
    step_max: float = 16.0
    corrector_iters: int = 4
    corrector_tol: float = 1e-3
    contraction: float = 0.5
    max_turn: float = 0.5
    krylov_dim: int = 40
    krylov_rtol: float = 1e-2
    linear_solver: str = "auto"
    secant_rank: int = 32
    secant_patience: int | None = None
    broyden_memory: int | None = None
    restarts: int = 2


def _maybe_any(mask: Tensor) -> bool:
    """False only when ``mask`` is known to be empty: checked on CPU, where the host check
    costs less than the masked updates it skips; assumed True on accelerators, where it
    would be a device sync."""
    return mask.device.type != "cpu" or bool(mask.any())


def _unit(y: Tensor) -> Tensor:
    return y / y.norm(dim=1, keepdim=True).clamp_min(1e-30)


@dataclass
class _State:
    """Per-sample state of the tracker. Points of the path are y = (z, λ), shape (B, n+1)."""

    y: Tensor             # current point: where f is evaluated next
    anchor: Tensor        # last accepted point of the path
    tangent: Tensor       # unit tangent at the anchor (e_λ before the first tangent)
    anchor_prev: Tensor   # the accepted point before the anchor, and its tangent, to
    tangent_prev: Tensor  # step back to when the path turns too sharply
    pred: Tensor          # predicted point of the current step
    phase: Tensor         # Phase per sample
    status: Tensor        # Status per sample
    step: Tensor          # arclength step h
    step_unit: Tensor     # h of the first path step; h_min and h_max are relative to it
    k_corr: Tensor        # corrector iterations of the current step
    dnorm: Tensor         # ||δ|| of the last corrector step
    dnorm_prev: Tensor    # ||δ|| of the one before
    n_newton: Tensor      # Newton steps taken in phase NEWTON
    res_prev: Tensor      # residual before the last Newton step
    newton_best: Tensor   # lowest residual met in phase NEWTON
    n_worse: Tensor       # exact Newton steps in a row that ended above newton_best
    solve_failed: Tensor  # the last linear solve gave non-finite values
    exact: Tensor         # the last linear solve used an exact Jacobian
    stale: Tensor         # the next solve needs an exact Jacobian (dense mode)
    retried: Tensor       # the current path step was already retried with an exact one
    derailed: Tensor      # the step underflowed or λ went below 0: restart or give up
    restarts: Tensor      # paths restarted from a perturbed start point

    @classmethod
    def start(cls, x0: Tensor, newton_first: bool) -> _State:
        bsz = x0.shape[0]
        lam = torch.ones(bsz, 1, dtype=x0.dtype, device=x0.device)
        y0 = torch.cat([x0, lam if newton_first else 0 * lam], dim=1)
        e_lam = torch.zeros_like(y0)
        e_lam[:, -1] = 1
        inf = torch.full((bsz,), float("inf"), dtype=x0.dtype, device=x0.device)
        zeros_i = torch.zeros(bsz, dtype=torch.long, device=x0.device)
        return cls(
            y=y0, anchor=torch.cat([x0, 0 * lam], dim=1), tangent=e_lam, pred=y0.clone(),
            anchor_prev=torch.cat([x0, 0 * lam], dim=1), tangent_prev=e_lam.clone(),
            phase=torch.full_like(zeros_i, int(Phase.NEWTON if newton_first else Phase.TANGENT)),
            status=torch.full_like(zeros_i, int(Status.RUNNING)),
            step=torch.zeros_like(inf), step_unit=torch.zeros_like(inf), k_corr=zeros_i.clone(),
            dnorm=inf.clone(), dnorm_prev=inf.clone(), n_newton=zeros_i.clone(),
            res_prev=inf.clone(), newton_best=inf.clone(), n_worse=zeros_i.clone(),
            solve_failed=torch.zeros_like(zeros_i, dtype=torch.bool),
            exact=torch.ones_like(zeros_i, dtype=torch.bool),
            stale=torch.ones_like(zeros_i, dtype=torch.bool),
            retried=torch.zeros_like(zeros_i, dtype=torch.bool),
            derailed=torch.zeros_like(zeros_i, dtype=torch.bool), restarts=zeros_i.clone())

    def finish(self, mask: Tensor, status: Status) -> None:
        self.status = self.status.masked_fill(mask, int(status))
        self.phase = self.phase.masked_fill(mask, int(Phase.DONE))

    def begin_step(self, mask: Tensor, pred: Tensor) -> None:
        """Start the corrector of a path step at the predicted point ``pred``."""
        if not _maybe_any(mask):
            return
        self.pred = _where(mask, pred, self.pred)
        self.y = _where(mask, pred, self.y)
        self.phase = self.phase.masked_fill(mask, int(Phase.CORRECT))
        self.k_corr = self.k_corr.masked_fill(mask, 0)
        self.dnorm = self.dnorm.masked_fill(mask, float("inf"))
        self.dnorm_prev = self.dnorm_prev.masked_fill(mask, float("inf"))


class PathTracker:
    """Solve z = f(z) for a flat batch by Newton first, then homotopy path tracking.

    Args:
        f: callable on ``(B, n)`` batches.
        x0: start points ``(B, n)``.
        options: :class:`TrackerOptions`.

    Example:
        >>> f = lambda z: torch.tanh(3 * z + 0.5)
        >>> res = PathTracker(f, torch.zeros(4, 1), TrackerOptions()).run(200, 1e-6, 'abs')
        >>> bool((res.abs_best < 1e-6).all())
        True
    """

    def __init__(self, f: Callable[[Tensor], Tensor], x0: Tensor, options: TrackerOptions) -> None:
        self.f, self.x0, self.opt = f, x0, options
        self.n = x0.shape[1]
        self.jvp_mode = options.jvp
        self.jac = SecantJacobian(f, options.jvp)
        self.model: LowRankJacobian | None = None      # the 'secant' linear solver's model
        self.broyden: InverseBroyden | None = None     # its Broyden phase at λ = 1
        self.max_evals = 0            # the budget of the current run
        self.krylov_solves = 0        # GMRES solves run, and the products they made
        self.krylov_products = 0
        # Until a sample leaves λ = 1, H(z, 1) = z - f(z) needs no z0: a Newton homotopy
        # with G(z0) = 0 stands in (H = G(z), ∂H/∂λ = 0). The real one is built, with one
        # more call f(z0), when the first sample starts tracking.
        self.hom = NewtonHomotopy(x0, x0)
        self.fz0: Tensor | None = None
        self._gen: torch.Generator | None = None

    # ---------------------------------------------------------------- linear algebra
    def _solve(self, y: Tensor, fz: Tensor, border: Tensor, rhs: Tensor, budget: Budget,
               need_exact: Tensor | None = None,
               rows: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Solve the bordered system  [H_z  H_λ; borderᵀ] δ = rhs  at y = (z, λ).

        The border row keeps the system regular at turning points of the path. Small
        states (``n <= homo_krylov_dim`` under ``homo_linear_solver='auto'``, or ``'dense'``)
        form the matrix from a dense Jacobian and solve it by LU; others use GMRES, where
        (H_z u + H_λ μ) costs one Jacobian-vector product.

        ``need_exact`` (the main loop's solves) lets dense solves reuse the secant-updated
        Jacobian of :class:`~torchdeq_homotopy.linalg.SecantJacobian`, refreshed (``n``
        products) only when one of these samples needs it; without it the Jacobian is
        computed afresh. A dense solve factors only the ``rows`` given (default: all); the
        other rows come back as zeros.

        Returns:
            ``(δ, finite, exact)``: the solution, the rows solved with finite values, and
            the rows whose Jacobian was exact.
        """
        n = self.n
        z, lam = y[:, :n], y[:, n]
        if self._mode() == "secant":
            return self._solve_secant(z, lam, fz, border, rhs, budget, need_exact, rows)
        if self._dense():
            jac, exact = self._dense_jacobian(z, fz, budget, need_exact)
            if jac is not None:
                h_lam = self.hom.d_lambda(z, fz)
                return (*self._solve_dense(jac, h_lam, lam, border, rhs, rows), exact)
        lin = Linearization(self.f, z, fz, self.jvp_mode)
        h_lam = self.hom.d_lambda(z, fz)

        def matvec(x: Tensor) -> Tensor:
            u, mu = x[:, :n], x[:, n]
            top = self.hom.d_z(u, lin.jvp(u), lam) + h_lam * mu[:, None]
            return torch.cat([top, batch_dot(border, x)[:, None]], dim=1)

        calls = budget.used
        sol, _ = gmres(matvec, rhs, rtol=self.opt.krylov_rtol, max_iter=self.opt.krylov_dim,
                       on_matvec=budget.spend_leaving_one)
        self.krylov_solves += 1
        self.krylov_products += budget.used - calls
        self.jvp_mode = lin.mode
        finite = torch.isfinite(sol).all(dim=1)
        exact = torch.ones_like(finite)
        return torch.where(finite[:, None], sol, torch.zeros_like(sol)), finite, exact

    def _mode(self) -> str:
        """The linear solver in use: ``'dense'``, ``'secant'`` or ``'gmres'``.

        ``'auto'`` weighs what a dense Jacobian costs against the budget: dense when
        n <= ``homo_krylov_dim`` (one refresh then costs no more products than one GMRES
        solve may, in one vectorised call) and the budget pays for at least
        ``_DENSE_REFRESHES`` refreshes of n products each; else secant, whose Broyden steps
        cost one evaluation each."""
        choice = self.opt.linear_solver
        if choice == "auto":
            affordable = self.max_evals >= _DENSE_REFRESHES * self.n
            return "dense" if self.n <= self.opt.krylov_dim and affordable else "secant"
        return choice

    def _dense(self) -> bool:
        return self._mode() == "dense"

    def _solve_secant(self, z: Tensor, lam: Tensor, fz: Tensor, border: Tensor, rhs: Tensor,
                      budget: Budget, need_exact: Tensor | None,
                      rows: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
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
        n = self.n
        bsz = z.shape[0]
        if rows is not None and not _maybe_any(rows):   # only Broyden steps this iteration
            zeros = torch.zeros_like(rows)
            return torch.zeros_like(rhs), zeros, zeros
        if self.model is None:
            self.model = LowRankJacobian(bsz, n, self.opt.secant_rank, z.dtype, z.device)
        if need_exact is not None:
            self.model.observe(z, fz)
        scale = self.hom.jac_scale(lam)
        h_lam = self.hom.d_lambda(z, fz)
        model_solve = self.model.factor_bordered(scale, h_lam, border)
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
        lin = Linearization(self.f, z, fz, self.jvp_mode)
        products: list[tuple[Tensor, Tensor]] = []

        def precond(v: Tensor) -> Tensor:
            return model_solve(v)[0]

        def matvec(x: Tensor) -> Tensor:
            u, mu = x[:, :n], x[:, n]
            ju = lin.jvp(u)
            products.append((u, ju))
            top = self.hom.d_z(u, ju, lam) + h_lam * mu[:, None]
            return torch.cat([top, batch_dot(border, x)[:, None]], dim=1)

        exact_sol, _ = gmres(matvec, torch.where(exact[:, None], rhs, torch.zeros_like(rhs)),
                              rtol=self.opt.krylov_rtol, max_iter=self.opt.krylov_dim,
                              on_matvec=budget.spend_leaving_one, precond=precond,
                              required=required)
        self.jvp_mode = lin.mode
        self.krylov_solves += 1
        self.krylov_products += len(products)
        if products:
            S = torch.stack([u for u, _ in products], dim=2)
            Y = torch.stack([ju for _, ju in products], dim=2)
            keep = exact[:, None, None] & torch.isfinite(Y).all(dim=1, keepdim=True)
            self.model.absorb(torch.where(keep, S, 0.0), torch.where(keep, Y, 0.0))
        exact_finite = torch.isfinite(exact_sol).all(dim=1) & (exact_sol.abs().sum(dim=1) > 0)
        sol = _where(exact, exact_sol, sol)
        finite = torch.where(exact, exact_finite, finite)
        return torch.where(finite[:, None], sol, torch.zeros_like(sol)), finite, exact

    def _dense_jacobian(self, z: Tensor, fz: Tensor, budget: Budget,
                        need_exact: Tensor | None) -> tuple[Tensor | None, Tensor]:
        """J_f at z: fresh (n products) or the secant-updated cache; None if the budget
        cannot pay for a needed refresh."""
        every = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        if need_exact is None:
            if not budget.spend(self.n):
                return None, every
            jac, self.jvp_mode = dense_jacobian(self.f, z, fz, self.jvp_mode)
            return jac, every
        self.jac.observe(z, fz)
        if self.jac.jac is None or bool((need_exact & ~self.jac.exact).any()):
            if budget.spend(self.n):
                self.jac.refresh()
            elif self.jac.jac is None:
                return None, every
        return self.jac.jac, self.jac.exact.clone()

    def _solve_dense(self, jac: Tensor, h_lam: Tensor, lam: Tensor, border: Tensor,
                     rhs: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """LU solve of the bordered matrix  M = [H_z  H_λ; borderᵀ],  (B, n+1, n+1).

        H_z = ∂H/∂z = ``d_z`` applied to the columns of (I, J_f) (I - λJ_f for the
        fixed-point homotopy); a singular M (a zero LU pivot) or a non-finite solution marks
        the row as failed.
        """
        if rows is not None:      # factor only these rows (one host sync per solve)
            idx = rows.nonzero().squeeze(1)
            sol, finite = torch.zeros_like(rhs), torch.ones_like(rows)
            if idx.numel():
                part = self._solve_dense(jac[idx], h_lam[idx], lam[idx], border[idx], rhs[idx])
                sol[idx], finite[idx] = part
            return sol, finite
        eye = torch.eye(self.n, dtype=jac.dtype, device=jac.device).expand_as(jac)
        h_z = self.hom.d_z(eye, jac, lam[:, None])        # λ broadcast as (B, 1, 1)
        top = torch.cat([h_z, h_lam[:, :, None]], dim=2)
        matrix = torch.cat([top, border[:, None, :]], dim=1)
        matrix = torch.nan_to_num(matrix, nan=0.0, posinf=0.0, neginf=0.0)
        sol, info = torch.linalg.solve_ex(matrix, rhs)
        finite = (info == 0) & (sol.sum(dim=1).abs() < float("inf"))   # all entries finite
        return torch.where(finite[:, None], sol, torch.zeros_like(sol)), finite

    # ---------------------------------------------------------------- predictors
    def _predict_linear(self, st: _State) -> Tensor:
        """y_p = y_a + h t, with h shortened so that λ_p does not pass 1: h <= (1 - λ_a) / t_λ."""
        lam_a, t_lam = st.anchor[:, -1], st.tangent[:, -1]
        to_end = (1 - lam_a) / t_lam
        h = torch.where((t_lam > 0) & (lam_a < 1) & (st.step > to_end), to_end, st.step)
        return st.anchor + h[:, None] * st.tangent

    def _predict(self, st: _State, mask: Tensor, budget: Budget) -> Tensor:
        linear = self._predict_linear(st)
        if self.opt.predictor == "tangent":
            return linear
        return self._predict_ode(st, linear, mask, budget)

    def _predict_ode(self, st: _State, linear: Tensor, mask: Tensor, budget: Budget) -> Tensor:
        """Integrate the arclength Davidenko ODE  dy/ds = t(y),  s ∈ [0, h],  with odeint.

        t(y) solves [H_z H_λ; t_aᵀ] w = [0; 1], t = w / ||w|| (oriented like the anchor's
        tangent t_a). Each sample uses its own h (that of the linear predictor) through
        s = h σ, σ ∈ [0, 1]; samples outside ``mask`` have zero velocity.
        """
        from torchdiffeq import odeint

        h = (linear - st.anchor).norm(dim=1)
        h = torch.where(mask, h, torch.zeros_like(h))
        e_lam = torch.zeros_like(st.y)
        e_lam[:, -1] = 1

        def velocity(_sigma: Tensor, y: Tensor) -> Tensor:
            if not budget.spend():
                return torch.zeros_like(y)
            fz = torch.nan_to_num(self.f(y[:, : self.n]))
            w, finite, _ = self._solve(y, fz, st.tangent, e_lam, budget)
            return torch.where((finite & mask)[:, None], _unit(w) * h[:, None],
                               torch.zeros_like(w))

        grid = torch.tensor([0.0, 1.0], device=st.y.device, dtype=st.y.dtype)
        return odeint(velocity, st.anchor, grid, method=self.opt.ode_method)[-1]

    # ---------------------------------------------------------------- decisions
    def _build_homotopy(self, budget: Budget) -> bool:
        if self.fz0 is None:
            if not budget.spend():
                return False
            self.fz0 = self.f(self.x0)
            self.hom = HOMOTOPIES[self.opt.homotopy](self.x0, self.fz0)
        return True

    def _mark_stale(self, st: _State, abs_res: Tensor) -> None:
        """A Newton or endgame step under a secant Jacobian that did not halve the residual
        (or failed) asks for the exact Jacobian at the next solve."""
        newtonish = (st.phase == Phase.ENDGAME) | (
            (st.phase == Phase.NEWTON) & (self._mode() != "secant"))
        if not _maybe_any(newtonish):
            return
        slow = ~(abs_res <= 0.5 * st.res_prev) | st.solve_failed
        st.stale = st.stale | (newtonish & ~st.exact & slow)

    def _leave_newton(self, st: _State, f_finite: Tensor, abs_res: Tensor,
                      budget: Budget) -> Tensor:
        """NEWTON samples that stall restart on the path from (z0, 0); returns the samples
        that are idle this iteration (waiting or restarting)."""
        opt = self.opt
        in_newton = st.phase == Phase.NEWTON
        if not _maybe_any(in_newton):
            return in_newton
        if not opt.track:
            st.finish(in_newton & ~f_finite, Status.NONFINITE)
            return torch.zeros_like(in_newton)
        if self._mode() == "secant":
            return self._leave_broyden(st, in_newton, f_finite, abs_res, budget)
        # Only a step taken with the exact Jacobian can stall (a secant one refreshes it).
        exact_step = in_newton & (st.n_newton > 0) & st.exact
        worse = exact_step & ~(abs_res < st.newton_best)
        st.n_worse = torch.where(worse, st.n_worse + 1, st.n_worse.masked_fill(exact_step, 0))
        st.newton_best = torch.where(in_newton, torch.minimum(st.newton_best, abs_res),
                                     st.newton_best)
        stalled = (~f_finite | (st.solve_failed & st.exact) | (st.n_worse >= _PATIENCE)
                   | (st.n_newton >= opt.newton_iters))
        # Stalled samples wait until no sample is still converging under Newton, then all
        # start on the path together, so that their path steps share linear solves.
        leave = in_newton & stalled
        st.n_newton = torch.where(leave, opt.newton_iters, st.n_newton)   # stays stalled
        if bool((in_newton & ~stalled).any()):
            return leave
        if not bool(leave.any()) or not self._build_homotopy(budget):
            return torch.zeros_like(leave)
        st.finish(leave & ~torch.isfinite(self.fz0).all(dim=1), Status.NONFINITE)
        leave = leave & (st.phase != Phase.DONE)
        self._start_path(st, leave, self.x0)
        return leave

    def _broyden_step(self, z: Tensor, fz: Tensor, rows: Tensor, delta: Tensor, finite: Tensor,
                      max_evals: int) -> tuple[Tensor, Tensor]:
        """Broyden's step δ = W (f(z) - z) (:class:`~torchdeq_homotopy.secant.InverseBroyden`,
        memory ``homo_broyden_memory``, default the budget as in TorchDEQ) for ``rows``;
        the model observes every evaluation, so its updates follow each sample's steps."""
        if not _maybe_any(rows):     # no sample returns to this phase: free the pairs
            self.broyden = None
            return delta, finite
        if self.broyden is None:
            memory = self.opt.broyden_memory or max_evals
            self.broyden = InverseBroyden(z.shape[0], self.n, memory, z.dtype, z.device)
        self.broyden.observe(z, fz)
        step = self.broyden.step()
        ok = torch.isfinite(step).all(dim=1) & torch.isfinite(fz).all(dim=1)
        step = torch.cat([step, torch.zeros_like(step[:, :1])], dim=1)
        return _where(rows, step, delta), torch.where(rows, ok, finite)

    def _leave_broyden(self, st: _State, in_newton: Tensor, f_finite: Tensor,
                       abs_res: Tensor, budget: Budget) -> Tensor:
        """With the secant model the NEWTON phase is Broyden's method (see
        :meth:`_broyden_step`). A sample stalls when ``homo_secant_patience`` steps in a row
        find no residual below its lowest, or when f or the step is not finite; once every
        sample of the phase has stalled, the stalled ones start on the path together."""
        progress = in_newton & (abs_res < st.newton_best)
        st.n_worse = torch.where(progress, 0, torch.where(in_newton, st.n_worse + 1, st.n_worse))
        st.newton_best = torch.where(in_newton, torch.minimum(st.newton_best, abs_res),
                                     st.newton_best)
        patience = self.opt.secant_patience or max(1, budget.limit // 3)
        stalled = in_newton & (~f_finite | st.solve_failed | (st.n_worse >= patience))
        # Stalled samples go on with (free) Broyden steps until every sample in this phase
        # has stalled: a path step's products are batched calls of f, and would take
        # evaluations from the samples that Broyden is still solving.
        if not _maybe_any(stalled) or bool((in_newton & ~stalled).any()) \
                or not self._build_homotopy(budget):
            return torch.zeros_like(stalled)
        st.finish(stalled & ~torch.isfinite(self.fz0).all(dim=1), Status.NONFINITE)
        stalled = stalled & (st.phase != Phase.DONE)
        self._start_path(st, stalled, self.x0)
        return stalled

    def _start_path(self, st: _State, mask: Tensor, z0: Tensor) -> None:
        """Put the samples in ``mask`` at (z0, 0), the start of their path."""
        st.stale = st.stale | mask
        st.retried = st.retried & ~mask
        st.step_unit = st.step_unit.masked_fill(mask, 0.0)
        start_y = torch.cat([z0, torch.zeros_like(z0[:, :1])], dim=1)
        st.anchor = _where(mask, start_y, st.anchor)
        st.anchor_prev = _where(mask, start_y, st.anchor_prev)
        st.y = _where(mask, start_y, st.y)
        start = self.hom.start_tangent()
        if start is None:    # the tangent at λ = 0 needs a solve: do it at the next iteration
            e_lam = torch.zeros_like(start_y)
            e_lam[:, -1] = 1
            st.tangent = _where(mask, e_lam, st.tangent)
            st.tangent_prev = _where(mask, e_lam, st.tangent_prev)
            st.phase = st.phase.masked_fill(mask, int(Phase.TANGENT))
            return
        self._set_tangent(st, mask, _unit(torch.cat([start[0], start[1][:, None]], dim=1)))

    def _restart(self, st: _State, budget: Budget) -> Tensor:
        """Samples whose path step underflowed, or whose path went below λ = 0 (a jump to
        another branch), start a new path from a perturbed start

            z0' = z0 + k σ ξ,   ξ ~ N(0, I),   σ = max(rms(f(z0) - z0), 0.01 (1 + rms(z0)))

        (k: the restart's number), up to ``homo_restarts`` times; then they fail with
        STEP_UNDERFLOW. By the probability-one theory a random start almost surely has a
        regular path. Costs one call of f; returns the restarted samples (idle this
        iteration)."""
        if not _maybe_any(st.derailed):
            return st.derailed
        pending = st.derailed & (st.phase != Phase.DONE)
        st.derailed = torch.zeros_like(st.derailed)
        give_up = pending & (st.restarts >= self.opt.restarts)
        st.finish(give_up, Status.STEP_UNDERFLOW)
        again = pending & ~give_up
        if not bool(again.any()):
            return again
        if not budget.spend():
            st.finish(again, Status.STEP_UNDERFLOW)
            return torch.zeros_like(again)
        st.restarts = st.restarts + again.long()
        rms = (self.n ** -0.5)
        sigma = torch.maximum((self.fz0 - self.x0).norm(dim=1) * rms,
                              0.01 * (1 + self.x0.norm(dim=1) * rms))
        noise = torch.randn(self.x0.shape, generator=self._generator(), dtype=self.x0.dtype,
                            device=self.x0.device)
        z0 = self.x0 + (st.restarts * sigma)[:, None] * noise
        z0 = _where(again, z0, self.x0)
        fz0 = self.f(z0)
        again = again & torch.isfinite(fz0).all(dim=1)
        self.hom.restart(again, z0, fz0)
        self._start_path(st, again, z0)
        return again

    def _generator(self) -> torch.Generator:
        """A fixed-seed generator: restarts are reproducible run to run."""
        if self._gen is None:
            self._gen = torch.Generator(device=self.x0.device).manual_seed(0)
        return self._gen

    def _judge_corrector(self, st: _State, h_norm: Tensor, idle: Tensor) -> Tensor:
        """Accept, reject or continue each CORRECT sample; returns the samples now idle."""
        opt = self.opt
        in_corr = (st.phase == Phase.CORRECT) & ~idle
        if not _maybe_any(in_corr):
            return in_corr
        z = st.y[:, : self.n]
        h_ok = h_norm < float("inf")         # False for NaN too
        accept = in_corr & h_ok & ~st.solve_failed & (
            h_norm <= opt.corrector_tol * (1 + z.norm(dim=1)))
        diverging = (st.dnorm_prev < float("inf")) & (st.dnorm > opt.contraction * st.dnorm_prev)
        reject = in_corr & ~accept & (~h_ok | st.solve_failed | diverging
                                      | (st.k_corr >= opt.corrector_iters))
        if not _maybe_any(accept | reject):     # every corrector goes on: nothing to decide
            return torch.zeros_like(in_corr)
        # A step rejected under a secant Jacobian is retried once from the same prediction
        # with the exact one; otherwise from the anchor with h/2.
        soft = reject & ~st.exact & ~st.retried
        st.stale = st.stale | soft
        st.begin_step(soft, st.pred)
        st.retried = (st.retried | soft) & ~accept & ~(reject & ~soft)
        reject = reject & ~soft
        # Accepted: at λ ≈ 1 go to the endgame; otherwise grow h and take a tangent here.
        at_end = accept & (st.y[:, -1] >= 1 - 1e-3)
        # H(z, 0) = 0 only at z0: a path at λ < 0 has jumped to another branch.
        behind = accept & (st.y[:, -1] < -opt.step_init)
        st.derailed = st.derailed | behind
        onward = accept & ~at_end & ~behind
        # A corrector that needed _SLOW_CORRECTOR or more steps had a poor secant
        # Jacobian: the tangent at the new anchor is taken with a fresh one.
        st.stale = st.stale | (onward & (st.k_corr >= _SLOW_CORRECTOR))
        grow = torch.where(st.k_corr <= 1, 2.0, torch.where(st.k_corr == 2, 1.25, 0.8))
        h_max = opt.step_max * st.step_unit
        st.step = torch.where(onward, torch.minimum(st.step * grow, h_max), st.step)
        secant = _unit(st.y - st.anchor) if opt.predictor == "secant" else None
        st.anchor_prev = _where(onward, st.anchor, st.anchor_prev)
        st.tangent_prev = _where(onward, st.tangent, st.tangent_prev)
        st.anchor = _where(onward, st.y, st.anchor)
        st.phase = st.phase.masked_fill(at_end, int(Phase.ENDGAME))
        if opt.predictor != "secant":
            st.phase = st.phase.masked_fill(onward, int(Phase.TANGENT))
            return soft | self._retry(st, reject)
        # Secant predictor: t = (y_k - y_{k-1}) / ||·||, no linear solve.
        self._set_tangent(st, onward, secant)
        return onward | soft | self._retry(st, reject)

    def _retry(self, st: _State, reject: Tensor) -> Tensor:
        """Halve h and predict again from the anchor, unless h underflows; returns retries."""
        opt = self.opt
        if not _maybe_any(reject):
            return reject
        st.step = torch.where(reject, 0.5 * st.step, st.step)
        underflow = reject & (st.step.abs() < opt.step_min * st.step_unit.abs())
        st.derailed = st.derailed | underflow
        retry = reject & ~underflow
        st.begin_step(retry, self._predict_linear(st))
        return retry

    def _set_tangent(self, st: _State, got: Tensor, t: Tensor,
                     budget: Budget | None = None, exact: Tensor | None = None) -> None:
        """Take ``t`` as the anchor's tangent and predict the next point. The first tangent
        sets the step scale. A tangent turning sharply (t · t_prev < ``max_turn``) means the
        step may have jumped to another branch: go back to the previous anchor with a
        quarter of the step. A sharp turn of a tangent solved with a secant Jacobian
        (``exact`` False) is first recomputed with the exact one."""
        opt = self.opt
        first = got & (st.step_unit == 0)
        sharp = got & ~first & (batch_dot(t, st.tangent) < opt.max_turn)
        if exact is not None:
            recheck = sharp & ~exact        # stays in TANGENT; the next solve is exact
            st.stale = st.stale | recheck
            sharp, got = sharp & ~recheck, got & ~recheck
        h0 = opt.step_init / t[:, -1].abs().clamp_min(1e-3)     # raises λ by step_init
        st.step = torch.where(first, h0, st.step)
        st.step_unit = torch.where(first, h0, st.step_unit)
        st.tangent_prev = _where(first, t, st.tangent_prev)
        smooth = got & ~sharp
        st.tangent = _where(smooth, t, st.tangent)
        st.anchor = _where(sharp, st.anchor_prev, st.anchor)
        st.tangent = _where(sharp, st.tangent_prev, st.tangent)
        st.step = torch.where(sharp, 0.25 * st.step, st.step)
        underflow = sharp & (st.step.abs() < opt.step_min * st.step_unit.abs())
        st.derailed = st.derailed | underflow
        got = got & ~underflow
        pred = (self._predict(st, got, budget) if budget is not None
                else self._predict_linear(st))
        st.begin_step(got, pred)

    # ---------------------------------------------------------------- main loop
    def run(self, max_evals: int, tol: float, stop_mode: str,
            indexing: list[int] | None = None, newton_start: Tensor | None = None,
            used: int = 0, best: BestIterate | None = None,
            trajectory: list[Tensor] | None = None,
            newton_start_fz: Tensor | None = None) -> TrackerResult:
        """Track every sample until it converges, fails, or the budget is spent.

        ``newton_start`` (default ``x0``) is where the Newton phase starts; the path itself
        always starts at (x0, 0). ``used`` evaluations were already spent by a warm-up,
        whose best iterate ``best`` is kept unless a later iterate beats it, and whose
        recorded states ``trajectory`` (for the first entries of ``indexing``) come first;
        ``newton_start_fz``, f at ``newton_start`` if already known, saves its evaluation.
        """
        opt, x0, n = self.opt, self.x0, self.n
        self.max_evals = max_evals
        budget = Budget(max_evals)
        budget.used = used
        indexing = sorted(indexing or [])
        newton_first = opt.newton_iters > 0 or not opt.track
        st = _State.start(x0 if newton_start is None or not newton_first else newton_start,
                          newton_first=newton_first)
        if not newton_first:
            self._build_homotopy(budget)
        if best is None:
            inf = torch.full_like(st.step, float("inf"))
            best = BestIterate(z=x0.clone(), abs_res=inf.clone(), rel_res=inf.clone(),
                               step=torch.zeros_like(inf))
        abs_trace: list[Tensor] = []
        rel_trace: list[Tensor] = []
        trajectory = list(trajectory or [])
        trace_nfe: list[int] = []
        lam_trace: list[Tensor] = []

        # f at the Newton start, when the warm-up already evaluated it, costs nothing here.
        known_fz = newton_start_fz if newton_first and newton_start is not None else None
        while known_fz is not None or budget.spend():
            z, lam = st.y[:, :n], st.y[:, n]
            fz, known_fz = (self.f(z), None) if known_fz is None else (known_fz, None)
            abs_res, rel_res = residuals(z, fz)
            f_finite = abs_res < float("inf")
            abs_trace.append(abs_res)
            rel_trace.append(rel_res)
            trace_nfe.append(budget.used)
            lam_trace.append(lam.clone())
            best.update(z, abs_res, rel_res, stop_mode, budget.used)
            # A sample is done once its best iterate (the warm-up's included) meets tol.
            best_res = best.abs_res if stop_mode == "abs" else best.rel_res
            converged = (st.phase != Phase.DONE) & (best_res <= tol)
            st.finish(converged, Status.CONVERGED)
            st.y[:, n] = lam.masked_fill(converged, 1.0)
            while len(trajectory) < len(indexing) and indexing[len(trajectory)] <= budget.used:
                trajectory.append(best.z.clone())
            if bool((st.phase == Phase.DONE).all()) or budget.left <= 0:
                break

            H = self.hom.residual(z, fz, lam)
            h_norm = H.norm(dim=1)
            self._mark_stale(st, abs_res)
            idle = self._leave_newton(st, f_finite, abs_res, budget)
            idle = idle | self._judge_corrector(st, h_norm, idle)
            st.finish((st.phase == Phase.ENDGAME) & (~(h_norm < float("inf")) | st.solve_failed),
                      Status.NONFINITE)

            # One batched bordered solve; each sample chooses its border row and rhs:
            #   NEWTON/ENDGAME  [H_z H_λ; e_λᵀ] δ = -[H; λ - 1]
            #   CORRECT         [H_z H_λ; tᵀ]   δ = -[H; tᵀ(y - y_p)]
            #   TANGENT         [H_z H_λ; tᵀ]   w = [0; 1]
            newton = ((st.phase == Phase.NEWTON) | (st.phase == Phase.ENDGAME)) & ~idle
            tangent = (st.phase == Phase.TANGENT) & ~idle
            correct = (st.phase == Phase.CORRECT) & ~idle
            e_lam = torch.zeros_like(st.y)
            e_lam[:, -1] = 1
            border = _where(tangent | correct, st.tangent, e_lam)
            H_safe = torch.nan_to_num(H, nan=0.0, posinf=0.0, neginf=0.0)
            rhs_lam = (1 - lam).masked_fill(~newton, 0.0)
            rhs_lam = torch.where(correct, -batch_dot(st.tangent, st.y - st.pred), rhs_lam)
            rhs = torch.cat([_where(newton | correct, -H_safe, torch.zeros_like(H)),
                             rhs_lam[:, None]], dim=1)
            rhs = _where(tangent, e_lam, rhs)
            y_eval = _where(f_finite, st.y, torch.cat([best.z, st.y[:, n:]], dim=1))
            active = newton | tangent | correct
            fz_safe = torch.nan_to_num(fz, nan=0.0, posinf=0.0, neginf=0.0)
            broyden = (newton & (st.phase == Phase.NEWTON) if self._mode() == "secant"
                       else torch.zeros_like(newton))
            delta, finite, exact = self._solve(
                y_eval, fz_safe, border, rhs, budget,
                need_exact=active & st.stale & ~broyden, rows=active & ~broyden)
            if self._mode() == "secant":
                delta, finite = self._broyden_step(z, fz, broyden, delta, finite, max_evals)
            st.solve_failed = ~finite & active
            st.exact = torch.where(active, exact, st.exact)
            st.stale = st.stale & ~exact

            # Newton and corrector updates: y <- y + δ.
            move = (newton | correct) & finite
            st.y = _where(move, st.y + delta, st.y)
            st.res_prev = torch.where(newton, abs_res, st.res_prev)
            # Newton steps count against homo_newton_iters when their Jacobian was exact.
            st.n_newton = torch.where(newton & (st.phase == Phase.NEWTON) & exact,
                                      st.n_newton + 1, st.n_newton)
            st.dnorm_prev = torch.where(correct, st.dnorm, st.dnorm_prev)
            st.dnorm = torch.where(correct, delta.norm(dim=1), st.dnorm)
            st.k_corr = torch.where(correct, st.k_corr + 1, st.k_corr)

            # Tangent updates: t = w / ||w||, then predict (see _set_tangent).
            got = tangent & finite
            if bool(got.any()):
                self._set_tangent(st, got, _unit(delta), budget, exact)
            # A failed tangent solve retries from the anchor with half the step.
            lost = tangent & ~finite
            if _maybe_any(lost):
                st.step = torch.where(lost, 0.5 * st.step, st.step)
                st.solve_failed = st.solve_failed & ~lost
                st.begin_step(lost, self._predict_linear(st))
            self._restart(st, budget)

        st.status = st.status.masked_fill(st.status == Status.RUNNING, int(Status.MAX_EVALS))
        while len(trajectory) < len(indexing):
            trajectory.append(best.z.clone())
        return TrackerResult(z_best=best.z, abs_best=best.abs_res, rel_best=best.rel_res,
                             step_best=best.step, abs_trace=abs_trace, rel_trace=rel_trace,
                             status=st.status, lam=st.y[:, n].clone(), evals=budget.used,
                             trajectory=trajectory, trace_nfe=trace_nfe, lam_trace=lam_trace,
                             restarts=st.restarts, krylov_solves=self.krylov_solves,
                             krylov_products=self.krylov_products)
