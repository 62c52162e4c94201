"""Batched predictor–corrector path tracking with pseudo-arclength and per-sample steps.

Each sample of a batch follows the zero path of its own homotopy H(z, λ) (see
:mod:`torchdeq_homotopy.homotopies`) in the unknowns y = (z, λ). Each sample is in one
of these phases, and all of them advance together, one batched call of f and one
batched linear solve per iteration. The driving loop is

    loop = tracker.init(...)               # every sample at its start, f evaluated there
    while not tracker.terminate(loop):     # all done, or the budget spent
        loop = tracker.step(loop)          # transitions, one bordered solve, f at y
    result = tracker.result(loop)

(:func:`~torchdeq_homotopy.iteration.drive`, the warm-up's loop too) over an explicit,
immutable per-sample state (:class:`~torchdeq_homotopy.tracker_state._State`: phase and
status, path geometry, corrector, Newton phase, Jacobian flags); each transition returns a
new state. Beside it the loop carries what the solve learns about f
(:class:`~torchdeq_homotopy.tracker_state.JacobianModels`: the homotopy and the Jacobian
models, buffers updated in place); the tracker object itself holds only f, x0 and the
options. The phases:

``NEWTON``  z = f(z) at λ = 1, tried first (from the warm-up's iterate where that
            helped, else from z0): exact Newton (dense, or Newton–Krylov), or Broyden's
            method (``'secant'``, and ``'auto'`` when n > ``homo_krylov_dim``). Exact
            Newton stalls after three exact steps in a row that do not halve the lowest
            residual it has met (under GMRES solves: that end above it; Newton may climb
            before it converges) or past its Newton budget; Broyden's
            method after ``homo_secant_patience`` steps (a third of the budget) without a
            new lowest residual, by default only while the calls left can pay for a path
            that is not dense (32 n; else Broyden's method goes on). Stalled samples
            go on stepping (under GMRES, exact Newton's wait: every row's products
            cost) until no sample of the phase is still converging; then all of them
            go on together: under ``'auto'`` with dense solves from exact Newton to
            Broyden's method restarted at z0, otherwise to the path from (z0, 0), so
            that their path steps share linear solves.
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
            step also moves λ onto 1) down to the requested tolerance, kept monotone: a
            step that ends above the endgame's best residual goes back to the endgame's
            best point and retries with the exact Jacobian, or with half the step if it
            had it; after three failed exact steps the endgame has stalled (a fold near
            λ = 1 with no root near) and the sample restarts.
``DONE``    converged or failed; the sample is frozen (its linear system is zero).

Linear solves (``homo_linear_solver``): for states larger than ``homo_krylov_dim`` (the
``'secant'`` solver, and ``'auto'``), a low-rank secant model of J_f per sample
(:mod:`torchdeq_homotopy.secant`). There the NEWTON phase is Broyden's method in inverse
form (TorchDEQ's iterates, no products); path and endgame solves use the model's Woodbury
solve of the bordered system, and where an exact solve is needed (the same triggers as a
dense refresh below) GMRES right-preconditioned by the model, whose products are absorbed
into the model. Otherwise: matrix-free GMRES on Jacobian-vector products (``'gmres'``), or
LU on the dense bordered matrix (``'dense'``, and ``'auto'`` for n <= ``homo_krylov_dim``,
whose NEWTON phase is still Broyden's method). The dense
Jacobian costs n products in one vmapped call; between refreshes it follows Broyden's
secant update at no cost, and a sample asks for a refresh when a Newton step under the
secant Jacobian does not halve its residual, when a corrector under it is rejected (the
step is then retried once, from the same prediction, with the exact Jacobian), or when an
accepted step needed three or more corrector steps (the tangent at its endpoint then uses
the exact Jacobian).

Restarts: a sample whose step underflows, whose path jumps to a branch at λ < 0 (H(·, 0)
vanishes only at z0), or whose endgame stalls, starts a new path from a randomly perturbed
z0, up to ``homo_restarts`` times; from almost every start the path is regular.

All per-sample quantities (phase, step h, corrector counts, status) are ``(B,)`` tensors;
there is no Python loop over samples. The best iterate by the fixed-point residual
||z - f(z)|| is kept for every sample throughout.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .bordered import BorderedSolves
from .homotopies import NewtonHomotopy
from .iteration import drive
from .linalg import SecantJacobian, batch_dot, eisenstat_walker
from .outcome import Budget, Record, Status, TrackerResult, _where, residuals
from .predictor import Predictor
from .tracker_state import (
    _RETRY_FACTOR,
    JacobianModels,
    Phase,
    TrackerOptions,
    _e_lambda,
    _maybe_any,
    _State,
    _unit,
)
from .transitions import PhaseTransitions

__all__ = ["Budget", "Loop", "PathTracker", "Phase", "Record", "TrackerOptions",
           "TrackerResult", "residuals"]

Tensor = torch.Tensor


@dataclass
class Loop:
    """What the tracker's driving loop carries between iterations: the per-sample state,
    the models of f learnt so far (homotopy, Jacobian models), the solve's record (budget,
    best iterate, traces), the tolerance, and f at the current points."""

    state: _State
    models: JacobianModels
    record: Record
    tol: float
    fz: Tensor | None = None        # f at state.path.y; None once f could not be evaluated
    abs_res: Tensor | None = None   # ||z - f(z)|| there

    @property
    def budget(self) -> Budget:
        return self.record.budget


class PathTracker(BorderedSolves, Predictor, PhaseTransitions):
    """Solve z = f(z) for a flat batch by Newton first, then homotopy path tracking.

    Args:
        f: callable on ``(B, n)`` batches.
        x0: start points ``(B, n)``.
        options: :class:`TrackerOptions`.

    Example:
        >>> f, x0 = lambda z: torch.tanh(3 * z + 0.5), torch.zeros(4, 1)
        >>> tracker = PathTracker(f, x0, TrackerOptions())
        >>> res = tracker.run(Record.start(x0, Budget(200), 'abs'), 1e-6)
        >>> bool((res.abs_best < 1e-6).all())
        True

        The same solve, driven by hand (what ``run`` does with
        :func:`~torchdeq_homotopy.iteration.drive`):

        >>> tracker = PathTracker(f, x0, TrackerOptions(newton_iters=0))
        >>> loop = tracker.init(Record.start(x0, Budget(200), 'abs'), 1e-6)
        >>> while not tracker.terminate(loop):
        ...     loop = tracker.step(loop)
        >>> res = tracker.result(loop)
        >>> bool((res.abs_best < 1e-6).all()), res.evals <= 200
        (True, True)
    """

    def __init__(self, f: Callable[[Tensor], Tensor], x0: Tensor, options: TrackerOptions) -> None:
        self.f, self.x0, self.opt = f, x0, options
        self.n = x0.shape[1]

    def run(self, record: Record, tol: float, newton_start: Tensor | None = None,
            newton_start_fz: Tensor | None = None, x0_fz: Tensor | None = None
            ) -> TrackerResult:
        """Track every sample until it converges, fails, or the budget of ``record`` is
        spent: ``init``, then ``step`` until ``terminate``
        (:func:`~torchdeq_homotopy.iteration.drive`).

        Every evaluation is added to ``record``, which may hold a warm-up's already: its
        best iterate is kept unless a later iterate beats it. ``newton_start`` (default
        ``x0``) is where the Newton phase starts; the path itself always starts at
        (x0, 0). ``newton_start_fz``, f at ``newton_start`` if already known, saves its
        evaluation; ``x0_fz``, f at x0 if already known, saves the homotopy's.
        """
        return self.result(drive(self, self.init(record, tol, newton_start, newton_start_fz,
                                                 x0_fz)))

    def init(self, record: Record, tol: float, newton_start: Tensor | None = None,
             newton_start_fz: Tensor | None = None, x0_fz: Tensor | None = None) -> Loop:
        """Every sample at its start (see :meth:`run`), with f evaluated there."""
        opt, x0 = self.opt, self.x0
        newton_first = opt.newton_iters > 0 or not opt.track
        start = x0 if newton_start is None or not newton_first else newton_start
        state = _State.start(start, newton_first=newton_first)
        # Until a sample leaves λ = 1, H(z, 1) = z - f(z) needs no z0: a Newton homotopy
        # with G(z0) = 0 stands in (H = G(z), ∂H/∂λ = 0). The real one is built, with one
        # more call f(z0), when the first sample starts tracking.
        models = JacobianModels(linear_solver=self._linear_solver(),
                                broyden_newton=self._broyden_newton(record.budget.left),
                                broyden_next=self._broyden_next(record.budget.left),
                                homotopy=NewtonHomotopy(x0, x0),
                                dense=SecantJacobian(self.f, opt.jvp), jvp_mode=opt.jvp,
                                x0_fz=x0_fz)
        known_fz = newton_start_fz if newton_start is not None else None
        if not newton_first:
            # The path starts at x0: the homotopy's f(x0) is f at the start (one call).
            self._build_homotopy(models, record.budget)
            known_fz = models.fz0
        loop = Loop(state=state, models=models, record=record, tol=tol)
        # f at the start, when the warm-up or the homotopy already evaluated it, is free.
        self._evaluate(loop, known_fz)
        return loop

    def terminate(self, loop: Loop) -> bool:
        """Stop when f could not be evaluated, every sample is done, or the budget is spent
        (one host sync per iteration)."""
        return (loop.fz is None or loop.budget.left <= 0
                or bool((loop.state.phase == Phase.DONE).all()))

    def step(self, loop: Loop) -> Loop:
        """One iteration for the whole batch: the phase transitions decided on the last
        evaluation, one batched bordered solve (:meth:`_solve_and_update`), and f at the
        new points. While every open sample takes Broyden steps at λ = 1 (the NEWTON
        phase under ``'auto'`` and ``'secant'``), the iterations of that phase run here
        without the general bookkeeping (:meth:`_broyden_run`)."""
        models = loop.models
        state = self._mark_stale(loop.state, models, loop.abs_res)
        state, loop.fz, loop.abs_res = self._judge_endgame(state, loop.record, loop.fz,
                                                           loop.abs_res)
        y_evaluated = state.path.y                     # where f was evaluated
        z, lam = y_evaluated[:, :self.n], y_evaluated[:, self.n]
        f_finite = loop.abs_res < float("inf")
        state, idle = self._leave_newton(state, models, f_finite, loop.abs_res,
                                          loop.budget)
        if self._only_broyden(state, models, idle):
            return self._broyden_run(state, loop)
        H = models.homotopy.residual(z, loop.fz, lam)  # at the evaluated points (before
        h_norm = H.norm(dim=1)                         # the transitions moved any sample)
        state, judged = self._judge_corrector(state, models, h_norm, idle, loop.record,
                                              loop.fz, loop.abs_res)
        endgame_failed = (state.phase == Phase.ENDGAME) & (
            ~(h_norm < float("inf")) | state.jacobian.solve_failed)
        state = state.finish(endgame_failed, Status.NONFINITE)
        state = self._solve_and_update(state, loop, y_evaluated, H, h_norm, idle | judged,
                                       f_finite)
        loop.state = state
        self._evaluate(loop)
        return loop

    def _only_broyden(self, state: _State, models: JacobianModels, idle: Tensor) -> bool:
        """Whether every open sample is in the NEWTON phase of Broyden's method and none
        left it this iteration: one host read on every device. The general iteration
        covers this case too, but reads the device about five times per evaluation on
        accelerators (its phase transitions), where :meth:`_broyden_run` reads once
        (``benchmarks/host_syncs.py``: 4.99 against 1.01 per call of f on a 128-wide
        cell)."""
        if not models.broyden_newton:
            return False
        elsewhere = (state.phase != Phase.NEWTON) & (state.phase != Phase.DONE)
        return not bool((elsewhere | idle).any())

    def _broyden_run(self, state: _State, loop: Loop) -> Loop:
        """Broyden's method for every NEWTON sample (all open samples are there), iterated
        until the budget is spent, every sample is done, or every open sample has stalled:

            δ = W (f(z) − z)  (:meth:`_broyden_direction`),   z ← z + δ  where δ is finite,
            f(z), the record, convergence (:meth:`_evaluate`'s rule), and the stall record
            (:meth:`_broyden_progress`),

        the iterations that :meth:`step` would take one by one, with the same iterates and
        evaluations, on per-sample tensors alone: no linear solve, no product, no state
        record rebuilt per iteration, one host sync per evaluation. The state is assembled
        once, before the general iteration takes over (stalled samples leave for the path
        at its next :meth:`step`, whose :meth:`_leave_broyden` sees the last evaluation)."""
        models, record, budget, n = loop.models, loop.record, loop.budget, self.n
        z, lam = state.path.y[:, :n], state.path.y[:, n]
        newton = state.phase == Phase.NEWTON
        started = newton
        record_in = state.newton
        res_prev, worse_in_row, lowest = (record_in.res_prev, record_in.worse_in_row,
                                          record_in.lowest)
        fz, abs_res, failed = loop.fz, loop.abs_res, state.jacobian.solve_failed
        converged = torch.zeros_like(newton)
        while True:
            step, ok = self._broyden_direction(models, z, fz, budget.limit, newton)
            z = torch.where((newton & ok)[:, None], z + step, z)
            res_prev = torch.where(newton, abs_res, res_prev)
            failed = newton & ~ok
            if not budget.spend():
                fz = None
                break
            fz = self.f(z)
            abs_res, _ = record.add(z, fz, lam)
            done = newton & (record.best.residual(record.stop_mode) <= loop.tol)
            converged, newton = converged | done, newton & ~done
            before = (worse_in_row, lowest)      # what :meth:`_leave_broyden` starts from
            worse_in_row, lowest, stalled = self._broyden_progress(
                newton, abs_res, worse_in_row, lowest, failed, budget)
            if budget.left <= 0 or not bool((newton & ~stalled).any()):
                worse_in_row, lowest = before
                break
        y = torch.cat([z, lam.masked_fill(converged, 1.0)[:, None]], dim=1)
        state = replace(
            state.finish(converged, Status.CONVERGED), path=replace(state.path, y=y),
            newton=replace(state.newton, res_prev=res_prev, worse_in_row=worse_in_row,
                           lowest=lowest),
            jacobian=replace(state.jacobian, solve_failed=failed,
                             exact=state.jacobian.exact & ~started))
        loop.state, loop.fz, loop.abs_res = state, fz, abs_res
        return loop

    def _solve_and_update(self, state: _State, loop: Loop, y_evaluated: Tensor, H: Tensor,
                          h_norm: Tensor, idle: Tensor, f_finite: Tensor) -> _State:
        """The one batched bordered solve (:meth:`_bordered_system`; Broyden's steps for the
        NEWTON rows under ``'auto'`` and ``'secant'``), then the Newton, corrector and
        tangent updates and restarts.

        The Jacobian models see each row at ``y_evaluated``, where ``loop.fz`` was
        evaluated: a row that a transition moved this iteration is idle, and pairing its
        new point with f at the old one would corrupt its secant update (or, on a refresh
        by finite differences, its exact Jacobian). Only the rows solved this iteration
        count as refreshed."""
        budget, models, n = loop.budget, loop.models, self.n
        z, lam, fz = y_evaluated[:, :n], state.path.y[:, n], loop.fz
        newton, tangent, correct, border, rhs = self._bordered_system(state, H, lam, idle)
        y_eval = _where(f_finite, y_evaluated, torch.cat([loop.record.best.z,
                                                           y_evaluated[:, n:]], dim=1))
        active = newton | tangent | correct
        fz_safe = torch.nan_to_num(fz, nan=0.0, posinf=0.0, neginf=0.0)
        broyden = (newton & (state.phase == Phase.NEWTON) if models.broyden_newton
                   else torch.zeros_like(newton))
        state, rtol = self._forcing(state, newton, h_norm, fz_safe, loop.tol,
                                    loop.record.stop_mode)
        jacobian = state.jacobian
        delta, finite, exact = self._solve(
            models, y_eval, fz_safe, border, rhs, budget,
            need_exact=active & jacobian.stale & ~broyden, rows=active & ~broyden, rtol=rtol)
        if models.broyden_newton:
            delta, finite = self._broyden_step(models, z, fz, broyden, delta, finite,
                                               budget.limit)
        jacobian = replace(jacobian, solve_failed=~finite & active,
                           exact=torch.where(active, exact, jacobian.exact),
                           stale=jacobian.stale & ~(exact & active))
        state = replace(state, jacobian=jacobian)
        state = self._take_steps(state, delta, finite, exact, newton, correct, loop.abs_res)
        state = self._take_tangents(state, models, tangent, delta, finite, exact, budget)
        state, _ = self._restart(state, models, budget)
        return state

    def _evaluate(self, loop: Loop, known_fz: Tensor | None = None) -> None:
        """f at every sample's current point (``known_fz`` if given, free; else one
        evaluation, or none left: ``loop.fz`` is None), added to the record; the samples
        whose best iterate now meets the tolerance are done."""
        state, record, n = loop.state, loop.record, self.n
        if known_fz is None and not record.budget.spend():
            loop.fz = None
            return
        z, lam = state.path.y[:, :n], state.path.y[:, n]
        fz = self.f(z) if known_fz is None else known_fz
        record.add(z, fz, lam)
        loop.fz, loop.abs_res = fz, record.abs_trace[-1]
        # A sample is done once its best iterate (the warm-up's included) meets tol.
        converged = ((state.phase != Phase.DONE)
                     & (record.best.residual(record.stop_mode) <= loop.tol))
        y = torch.cat([z, lam.masked_fill(converged, 1.0)[:, None]], dim=1)
        loop.state = replace(state.finish(converged, Status.CONVERGED),
                             path=replace(state.path, y=y))

    def result(self, loop: Loop) -> TrackerResult:
        """The best iterate and per-sample statistics; samples still running ran out of
        evaluations (MAX_EVALS)."""
        state = loop.state
        running = state.status == Status.RUNNING
        return loop.record.result(status=state.status.masked_fill(running,
                                                                  int(Status.MAX_EVALS)),
                                  lam=state.path.y[:, self.n].clone(), restarts=state.restarts,
                                  krylov_solves=loop.models.krylov_solves,
                                  krylov_products=loop.models.krylov_products)

    def _forcing(self, state: _State, newton: Tensor, h_norm: Tensor, fz: Tensor, tol: float,
                 stop_mode: str) -> tuple[_State, Tensor | float]:
        """GMRES's tolerance per sample: under ``homo_forcing='eisenstat_walker'`` the
        forcing term η_k of :func:`~torchdeq_homotopy.linalg.eisenstat_walker` for Newton
        rows (a run of Newton steps starts afresh, η_0 = ``homo_krylov_rtol``), with the
        target ||H|| = tol (abs) or tol ||f(z)|| (rel); ``homo_krylov_rtol`` elsewhere.
        Returns the state with ||H_k|| and η_k recorded, and the tolerances."""
        if self.opt.forcing == "constant":
            return state, self.opt.krylov_rtol
        target = tol * (fz.norm(dim=1) if stop_mode == "rel" else torch.ones_like(h_norm))
        record = state.newton
        eta = eisenstat_walker(h_norm, record.h_prev, record.forcing, self.opt.krylov_rtol,
                               target)
        record = replace(record, h_prev=h_norm.masked_fill(~newton, float("inf")),
                         forcing=torch.where(newton, eta, record.forcing))
        return (replace(state, newton=record),
                torch.where(newton, eta, torch.full_like(eta, self.opt.krylov_rtol)))

    def _bordered_system(self, state: _State, H: Tensor, lam: Tensor, idle: Tensor
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Each active sample's border row and right-hand side of the one batched solve:

            NEWTON/ENDGAME  [H_z H_λ; e_λᵀ] δ = -[H; λ - 1]
            CORRECT         [H_z H_λ; tᵀ]   δ = -[H; tᵀ(y - y_p)]
            TANGENT         [H_z H_λ; tᵀ]   w = [0; 1]

        Returns the masks (newton, tangent, correct), the border rows and the rhs."""
        newton = ((state.phase == Phase.NEWTON) | (state.phase == Phase.ENDGAME)) & ~idle
        tangent = (state.phase == Phase.TANGENT) & ~idle
        correct = (state.phase == Phase.CORRECT) & ~idle
        path = state.path
        e_lam = _e_lambda(path.y)
        border = _where(tangent | correct, path.tangent, e_lam)
        H_safe = torch.nan_to_num(H, nan=0.0, posinf=0.0, neginf=0.0)
        rhs_lam = (1 - lam).masked_fill(~newton, 0.0)
        rhs_lam = torch.where(correct, -batch_dot(path.tangent, path.y - path.pred), rhs_lam)
        rhs = torch.cat([_where(newton | correct, -H_safe, torch.zeros_like(H)),
                         rhs_lam[:, None]], dim=1)
        return newton, tangent, correct, border, _where(tangent, e_lam, rhs)

    @staticmethod
    def _take_steps(state: _State, delta: Tensor, finite: Tensor, exact: Tensor, newton: Tensor,
                    correct: Tensor, abs_res: Tensor) -> _State:
        """Newton and corrector updates, y ← y + δ (the endgame's z-part α δ), and their
        per-sample counters (a Newton step counts against ``homo_newton_iters`` when its
        Jacobian was exact)."""
        move = (newton | correct) & finite
        record, corrector = state.newton, state.corrector
        endgame = newton & (state.phase == Phase.ENDGAME)
        # The endgame's z-step is damped by α (``_judge_endgame``); λ still goes onto 1.
        alpha = torch.where(endgame, record.damping, torch.ones_like(record.damping))
        delta = torch.cat([delta[:, :-1] * alpha[:, None], delta[:, -1:]], dim=1)
        record = replace(record, res_prev=torch.where(newton, abs_res, record.res_prev),
                         endgame_step=torch.where(newton, endgame & finite,
                                                  record.endgame_step),
                         steps=torch.where(newton & (state.phase == Phase.NEWTON) & exact,
                                           record.steps + 1, record.steps))
        corrector = replace(corrector,
                            dnorm_prev=torch.where(correct, corrector.dnorm, corrector.dnorm_prev),
                            dnorm=torch.where(correct, delta.norm(dim=1), corrector.dnorm),
                            steps=corrector.steps + correct.long())
        path = replace(state.path, y=_where(move, state.path.y + delta, state.path.y))
        return replace(state, path=path, newton=record, corrector=corrector)

    def _take_tangents(self, state: _State, models: JacobianModels, tangent: Tensor,
                       w: Tensor, finite: Tensor, exact: Tensor, budget: Budget) -> _State:
        """t = w / ||w|| and the next prediction (:meth:`_set_tangent`); a failed tangent
        solve retries from the anchor with half the step."""
        tangent_ok = tangent & finite
        if bool(tangent_ok.any()):
            state = self._set_tangent(state, models, tangent_ok, _unit(w), budget, exact)
        tangent_failed = tangent & ~finite
        if not _maybe_any(tangent_failed):
            return state
        path = state.path
        path = replace(path, step=torch.where(tangent_failed, _RETRY_FACTOR * path.step,
                                              path.step))
        jacobian = replace(state.jacobian,
                           solve_failed=state.jacobian.solve_failed & ~tangent_failed)
        state = replace(state, path=path, jacobian=jacobian)
        return state.begin_step(tangent_failed, self._predict_linear(state))
