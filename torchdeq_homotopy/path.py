"""Batched predictor–corrector path tracking with pseudo-arclength and per-sample steps.

Each sample of a batch follows the zero path of its own homotopy H(z, λ) (see
:mod:`torchdeq_homotopy.homotopies`) in the unknowns y = (z, λ). Each sample is in one
of these phases, and all of them advance together, one batched call of f and one
batched GMRES solve per iteration:

``NEWTON``  Newton–Krylov on z = f(z) at λ = 1, tried first (from the warm-up's iterate
            where that helped, else from z0). A sample whose residual stalls (does not
            fall by 10 % per step) or exceeds its Newton budget waits until no sample is
            still converging under Newton; then all of them start on the path from
            (z0, 0) together, so that their path steps share GMRES calls.
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

All per-sample quantities (phase, step h, corrector counts, status) are ``(B,)`` tensors;
there is no Python loop over samples. The best iterate by the fixed-point residual
||z - f(z)|| is kept for every sample throughout.
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .homotopies import HOMOTOPIES, NewtonHomotopy
from .linalg import Linearization, batch_dot, gmres

Tensor = torch.Tensor


class Status(enum.IntEnum):
    """Per-sample outcome, reported as ``info['status']``."""

    RUNNING = 0
    CONVERGED = 1
    MAX_EVALS = 2
    """The evaluation budget ran out before the residual reached the tolerance."""
    NONFINITE = 3
    """f returned NaN or Inf where no recovery was possible."""
    STEP_UNDERFLOW = 4
    """Path tracking needed a step below ``homo_step_min``."""


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
    newton_iters: int = 8
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


class _Budget:
    """Counts evaluations: every call of f and every Jacobian-vector product is one."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def spend(self) -> bool:
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    @property
    def left(self) -> int:
        return self.limit - self.used


def residuals(z: Tensor, fz: Tensor) -> tuple[Tensor, Tensor]:
    """TorchDEQ's errors: abs = ||f(z) - z||, rel = abs / (||f(z)|| + 1e-9), non-finite → inf."""
    abs_res = (fz - z).norm(dim=1)
    rel_res = abs_res / (fz.norm(dim=1) + 1e-9)
    inf = torch.full_like(abs_res, float("inf"))
    finite = torch.isfinite(abs_res) & torch.isfinite(rel_res)
    return torch.where(finite, abs_res, inf), torch.where(finite, rel_res, inf)


def _where(mask: Tensor, a: Tensor | float, b: Tensor) -> Tensor:
    """Per-sample select: rows of ``a`` where ``mask`` (B,), else rows of ``b``.

    Unlike TorchDEQ's ``batch_masked_mixing`` (mask · a + ~mask · b) it does not spread a
    NaN of the unselected side into the result.
    """
    return torch.where(mask.view(-1, *([1] * (b.dim() - 1))), a, b)


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
    solve_failed: Tensor  # the last linear solve gave non-finite values

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
            res_prev=inf.clone(), solve_failed=torch.zeros_like(zeros_i, dtype=torch.bool))

    def finish(self, mask: Tensor, status: Status) -> None:
        self.status = torch.where(mask, int(status), self.status)
        self.phase = torch.where(mask, int(Phase.DONE), self.phase)

    def begin_step(self, mask: Tensor, pred: Tensor) -> None:
        """Start the corrector of a path step at the predicted point ``pred``."""
        self.pred = _where(mask, pred, self.pred)
        self.y = _where(mask, pred, self.y)
        self.phase = torch.where(mask, int(Phase.CORRECT), self.phase)
        self.k_corr = torch.where(mask, 0, self.k_corr)
        self.dnorm = torch.where(mask, float("inf"), self.dnorm)
        self.dnorm_prev = torch.where(mask, float("inf"), self.dnorm_prev)


@dataclass
class BestIterate:
    """Best iterate per sample by the fixed-point residual of ``stop_mode``."""

    z: Tensor
    abs_res: Tensor
    rel_res: Tensor
    step: Tensor

    def update(self, z: Tensor, abs_res: Tensor, rel_res: Tensor, stop_mode: str,
               used: int) -> None:
        better = (abs_res < self.abs_res) if stop_mode == "abs" else (rel_res < self.rel_res)
        self.z = _where(better, z, self.z)
        self.abs_res = torch.where(better, abs_res, self.abs_res)
        self.rel_res = torch.where(better, rel_res, self.rel_res)
        self.step = torch.where(better, float(used), self.step)


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
        # Until a sample leaves λ = 1, H(z, 1) = z - f(z) needs no z0: a Newton homotopy
        # with G(z0) = 0 stands in (H = G(z), ∂H/∂λ = 0). The real one is built, with one
        # more call f(z0), when the first sample starts tracking.
        self.hom = NewtonHomotopy(x0, x0)
        self.fz0: Tensor | None = None

    # ---------------------------------------------------------------- linear algebra
    def _solve(self, y: Tensor, fz: Tensor, border: Tensor, rhs: Tensor,
               budget: _Budget) -> tuple[Tensor, Tensor]:
        """Solve the bordered system  [H_z  H_λ; borderᵀ] δ = rhs  by GMRES, at y = (z, λ).

        (H_z u + H_λ μ) uses one Jacobian-vector product; the border row keeps the system
        regular at turning points of the path.
        """
        n = self.n
        z, lam = y[:, :n], y[:, n]
        lin = Linearization(self.f, z, fz, self.jvp_mode)
        h_lam = self.hom.d_lambda(z, fz)

        def matvec(x: Tensor) -> Tensor:
            u, mu = x[:, :n], x[:, n]
            top = self.hom.d_z(u, lin.jvp(u), lam) + h_lam * mu[:, None]
            return torch.cat([top, batch_dot(border, x)[:, None]], dim=1)

        sol, _ = gmres(matvec, rhs, rtol=self.opt.krylov_rtol, max_iter=self.opt.krylov_dim,
                       on_matvec=budget.spend)
        self.jvp_mode = lin.mode
        finite = torch.isfinite(sol).all(dim=1)
        return torch.where(finite[:, None], sol, torch.zeros_like(sol)), finite

    # ---------------------------------------------------------------- predictors
    def _predict_linear(self, st: _State) -> Tensor:
        """y_p = y_a + h t, with h shortened so that λ_p does not pass 1: h <= (1 - λ_a) / t_λ."""
        lam_a, t_lam = st.anchor[:, -1], st.tangent[:, -1]
        to_end = (1 - lam_a) / t_lam
        h = torch.where((t_lam > 0) & (lam_a < 1) & (st.step > to_end), to_end, st.step)
        return st.anchor + h[:, None] * st.tangent

    def _predict(self, st: _State, mask: Tensor, budget: _Budget) -> Tensor:
        linear = self._predict_linear(st)
        if self.opt.predictor == "tangent":
            return linear
        return self._predict_ode(st, linear, mask, budget)

    def _predict_ode(self, st: _State, linear: Tensor, mask: Tensor, budget: _Budget) -> Tensor:
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
            w, finite = self._solve(y, fz, st.tangent, e_lam, budget)
            return torch.where((finite & mask)[:, None], _unit(w) * h[:, None],
                               torch.zeros_like(w))

        grid = torch.tensor([0.0, 1.0], device=st.y.device, dtype=st.y.dtype)
        return odeint(velocity, st.anchor, grid, method=self.opt.ode_method)[-1]

    # ---------------------------------------------------------------- decisions
    def _build_homotopy(self, budget: _Budget) -> bool:
        if self.fz0 is None:
            if not budget.spend():
                return False
            self.fz0 = self.f(self.x0)
            self.hom = HOMOTOPIES[self.opt.homotopy](self.x0, self.fz0)
        return True

    def _leave_newton(self, st: _State, f_finite: Tensor, abs_res: Tensor,
                      budget: _Budget) -> Tensor:
        """NEWTON samples that stall restart on the path from (z0, 0); returns the samples
        that are idle this iteration (waiting or restarting)."""
        opt = self.opt
        in_newton = st.phase == Phase.NEWTON
        if not opt.track:
            st.finish(in_newton & ~f_finite, Status.NONFINITE)
            return torch.zeros_like(in_newton)
        stalled = (~f_finite | st.solve_failed
                   | ((st.n_newton > 0) & (abs_res > 0.9 * st.res_prev))
                   | (st.n_newton >= opt.newton_iters))
        # Stalled samples wait until no sample is still converging under Newton, then all
        # start on the path together, so that their path steps share GMRES calls.
        leave = in_newton & stalled
        st.n_newton = torch.where(leave, opt.newton_iters, st.n_newton)   # stays stalled
        if bool((in_newton & ~stalled).any()):
            return leave
        if not bool(leave.any()) or not self._build_homotopy(budget):
            return torch.zeros_like(leave)
        st.finish(leave & ~torch.isfinite(self.fz0).all(dim=1), Status.NONFINITE)
        leave = leave & (st.phase != Phase.DONE)
        x0_y = torch.cat([self.x0, torch.zeros_like(self.x0[:, :1])], dim=1)
        st.anchor = _where(leave, x0_y, st.anchor)
        st.anchor_prev = _where(leave, x0_y, st.anchor_prev)
        st.y = _where(leave, x0_y, st.y)
        start = self.hom.start_tangent()
        if start is None:    # the tangent at λ = 0 needs a solve: do it at the next iteration
            e_lam = torch.zeros_like(x0_y)
            e_lam[:, -1] = 1
            st.tangent = _where(leave, e_lam, st.tangent)
            st.tangent_prev = _where(leave, e_lam, st.tangent_prev)
            st.phase = torch.where(leave, int(Phase.TANGENT), st.phase)
            return leave
        self._set_tangent(st, leave, _unit(torch.cat([start[0], start[1][:, None]], dim=1)))
        return leave

    def _judge_corrector(self, st: _State, h_norm: Tensor, idle: Tensor) -> Tensor:
        """Accept, reject or continue each CORRECT sample; returns the samples now idle."""
        opt = self.opt
        in_corr = (st.phase == Phase.CORRECT) & ~idle
        z = st.y[:, : self.n]
        h_ok = torch.isfinite(h_norm)
        accept = in_corr & h_ok & ~st.solve_failed & (
            h_norm <= opt.corrector_tol * (1 + z.norm(dim=1)))
        diverging = torch.isfinite(st.dnorm_prev) & (st.dnorm > opt.contraction * st.dnorm_prev)
        reject = in_corr & ~accept & (~h_ok | st.solve_failed | diverging
                                      | (st.k_corr >= opt.corrector_iters))
        # Accepted: at λ ≈ 1 go to the endgame; otherwise grow h and take a tangent here.
        at_end = accept & (st.y[:, -1] >= 1 - 1e-3)
        onward = accept & ~at_end
        grow = torch.where(st.k_corr <= 1, 2.0, torch.where(st.k_corr == 2, 1.25, 0.8))
        h_max = opt.step_max * st.step_unit
        st.step = torch.where(onward, torch.minimum(st.step * grow, h_max), st.step)
        secant = _unit(st.y - st.anchor)
        st.anchor_prev = _where(onward, st.anchor, st.anchor_prev)
        st.tangent_prev = _where(onward, st.tangent, st.tangent_prev)
        st.anchor = _where(onward, st.y, st.anchor)
        st.phase = torch.where(at_end, int(Phase.ENDGAME), st.phase)
        if opt.predictor != "secant":
            st.phase = torch.where(onward, int(Phase.TANGENT), st.phase)
            return self._retry(st, reject)
        # Secant predictor: t = (y_k - y_{k-1}) / ||·||, no linear solve.
        self._set_tangent(st, onward, secant)
        return onward | self._retry(st, reject)

    def _retry(self, st: _State, reject: Tensor) -> Tensor:
        """Halve h and predict again from the anchor, unless h underflows; returns retries."""
        opt = self.opt
        st.step = torch.where(reject, 0.5 * st.step, st.step)
        underflow = reject & (st.step.abs() < opt.step_min * st.step_unit.abs())
        st.finish(underflow, Status.STEP_UNDERFLOW)
        retry = reject & ~underflow
        st.begin_step(retry, self._predict_linear(st))
        return retry

    def _set_tangent(self, st: _State, got: Tensor, t: Tensor,
                     budget: _Budget | None = None) -> None:
        """Take ``t`` as the anchor's tangent and predict the next point. The first tangent
        sets the step scale. A tangent turning sharply (t · t_prev < ``max_turn``) means the
        step may have jumped to another branch: go back to the previous anchor with a
        quarter of the step."""
        opt = self.opt
        first = got & (st.step_unit == 0)
        sharp = got & ~first & (batch_dot(t, st.tangent) < opt.max_turn)
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
        st.finish(underflow, Status.STEP_UNDERFLOW)
        got = got & ~underflow
        pred = (self._predict(st, got, budget) if budget is not None
                else self._predict_linear(st))
        st.begin_step(got, pred)

    # ---------------------------------------------------------------- main loop
    def run(self, max_evals: int, tol: float, stop_mode: str,
            indexing: list[int] | None = None, newton_start: Tensor | None = None,
            used: int = 0, best: BestIterate | None = None) -> TrackerResult:
        """Track every sample until it converges, fails, or the budget is spent.

        ``newton_start`` (default ``x0``) is where the Newton phase starts; the path itself
        always starts at (x0, 0). ``used`` evaluations were already spent by a warm-up,
        whose best iterate ``best`` is kept unless a later iterate beats it.
        """
        opt, x0, n = self.opt, self.x0, self.n
        budget = _Budget(max_evals)
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
        trajectory: list[Tensor] = []
        trace_nfe: list[int] = []
        lam_trace: list[Tensor] = []

        while budget.spend():
            z, lam = st.y[:, :n], st.y[:, n]
            fz = self.f(z)
            abs_res, rel_res = residuals(z, fz)
            f_finite = torch.isfinite(abs_res)
            abs_trace.append(abs_res)
            rel_trace.append(rel_res)
            trace_nfe.append(budget.used)
            lam_trace.append(lam.clone())
            best.update(z, abs_res, rel_res, stop_mode, budget.used)
            stop_res = abs_res if stop_mode == "abs" else rel_res
            converged = (st.phase != Phase.DONE) & (stop_res <= tol)
            st.finish(converged, Status.CONVERGED)
            st.y[:, n] = torch.where(converged, 1.0, lam)
            while len(trajectory) < len(indexing) and indexing[len(trajectory)] <= budget.used:
                trajectory.append(best.z.clone())
            if bool((st.phase == Phase.DONE).all()) or budget.left <= 0:
                break

            H = self.hom.residual(z, fz, lam)
            h_norm = H.norm(dim=1)
            idle = self._leave_newton(st, f_finite, abs_res, budget)
            idle = idle | self._judge_corrector(st, h_norm, idle)
            st.finish((st.phase == Phase.ENDGAME) & (~torch.isfinite(h_norm) | st.solve_failed),
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
            H_safe = torch.where(torch.isfinite(H), H, torch.zeros_like(H))
            rhs_lam = torch.where(newton, 1 - lam, torch.zeros_like(lam))
            rhs_lam = torch.where(correct, -batch_dot(st.tangent, st.y - st.pred), rhs_lam)
            rhs = torch.cat([_where(newton | correct, -H_safe, torch.zeros_like(H)),
                             rhs_lam[:, None]], dim=1)
            rhs = _where(tangent, e_lam, rhs)
            y_eval = _where(f_finite, st.y, torch.cat([best.z, st.y[:, n:]], dim=1))
            delta, finite = self._solve(y_eval, torch.where(torch.isfinite(fz), fz, 0.0), border,
                                        rhs, budget)
            st.solve_failed = ~finite & (newton | tangent | correct)

            # Newton and corrector updates: y <- y + δ.
            move = (newton | correct) & finite
            st.y = _where(move, st.y + delta, st.y)
            st.res_prev = torch.where(newton, abs_res, st.res_prev)
            st.n_newton = torch.where(st.phase == Phase.NEWTON, st.n_newton + 1, st.n_newton)
            st.dnorm_prev = torch.where(correct, st.dnorm, st.dnorm_prev)
            st.dnorm = torch.where(correct, delta.norm(dim=1), st.dnorm)
            st.k_corr = torch.where(correct, st.k_corr + 1, st.k_corr)

            # Tangent updates: t = w / ||w||, then predict (see _set_tangent).
            got = tangent & finite
            if bool(got.any()):
                self._set_tangent(st, got, _unit(delta), budget)
            # A failed tangent solve retries from the anchor with half the step.
            lost = tangent & ~finite
            st.step = torch.where(lost, 0.5 * st.step, st.step)
            st.solve_failed = st.solve_failed & ~lost
            st.begin_step(lost, self._predict_linear(st))

        st.status = torch.where(st.status == Status.RUNNING, int(Status.MAX_EVALS), st.status)
        while len(trajectory) < len(indexing):
            trajectory.append(best.z.clone())
        return TrackerResult(z_best=best.z, abs_best=best.abs_res, rel_best=best.rel_res,
                             step_best=best.step, abs_trace=abs_trace, rel_trace=rel_trace,
                             status=st.status, lam=st.y[:, n].clone(), evals=budget.used,
                             trajectory=trajectory, trace_nfe=trace_nfe, lam_trace=lam_trace)
