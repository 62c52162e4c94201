"""The tracker's phase transitions: who leaves Newton or Broyden for the path, how the
corrector is judged, and restarts. Each is a function of the state: it decides per sample,
moves samples between phases (:class:`~torchdeq_homotopy.tracker_state.Phase`) and returns
the new state (and the samples it left idle for this iteration); the state it was given is
not changed.

:class:`PhaseTransitions` is a mixin of :class:`~torchdeq_homotopy.path.PathTracker`.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from . import host
from .homotopies import HOMOTOPIES
from .linalg import finite_rows
from .outcome import Budget, Record, Status, _where, by_stop_mode
from .secant import InverseBroyden
from .tracker_state import (
    _END_GAP,
    _GROW_FAST,
    _GROW_SLOW,
    _MIN_DAMPING,
    _NEWTON_PROGRESS,
    _PATH_EVALS_PER_ENTRY,
    _PATIENCE,
    _RETRY_FACTOR,
    _SHRINK_SLOW,
    _SLOW_CORRECTOR,
    JacobianModels,
    NewtonState,
    Phase,
    _e_lambda,
    _maybe_any,
    _State,
    _unit,
)

Tensor = torch.Tensor


def _end_point(newton: NewtonState, mask: Tensor, z: Tensor, fz: Tensor, residual: Tensor,
               abs_res: Tensor) -> NewtonState:
    """The endgame's best point becomes z (with f(z), its stop-mode ``residual`` and
    ||z − f(z)||) for the samples in ``mask``."""
    return replace(newton, end_res=torch.where(mask, residual, newton.end_res),
                   end_abs=torch.where(mask, abs_res, newton.end_abs),
                   end_z=_where(mask, z, newton.end_z), end_fz=_where(mask, fz, newton.end_fz))


class PhaseTransitions:
    """Decisions between phases (uses the tracker's ``f``, ``x0``, ``opt``,
    ``_set_tangent`` and ``_predict_linear``; the homotopy and the Broyden pairs come
    with each call, in ``models``)."""

    def _build_homotopy(self, models: JacobianModels, budget: Budget) -> bool:
        """The path's homotopy, with f(z0): free when an earlier phase evaluated it
        (``models.x0_fz``, the warm-up's first call), else one evaluation, once; False if the
        budget cannot pay for it."""
        if models.fz0 is None:
            fz0 = models.x0_fz
            if fz0 is None:
                if not budget.spend():
                    return False
                fz0 = self.f(self.x0)
            models.fz0 = fz0
            models.homotopy = HOMOTOPIES[self.opt.type](self.x0, fz0)
        return True

    def _mark_stale(self, state: _State, models: JacobianModels, abs_res: Tensor) -> _State:
        """A Newton or endgame step under a secant Jacobian that did not halve the residual,
        r_k > ``_NEWTON_PROGRESS`` · r_{k−1} (or failed), asks for the exact Jacobian at the
        next solve."""
        at_lambda_one = (state.phase == Phase.ENDGAME) | (
            (state.phase == Phase.NEWTON) & (not models.broyden_newton))
        if not _maybe_any(at_lambda_one):
            return state
        jacobian = state.jacobian
        slow = ~(abs_res <= _NEWTON_PROGRESS * state.newton.res_prev) | jacobian.solve_failed
        stale = jacobian.stale | (at_lambda_one & ~jacobian.exact & slow)
        return replace(state, jacobian=replace(jacobian, stale=stale))

    @staticmethod
    def _judge_endgame(state: _State, record: Record, fz: Tensor, abs_res: Tensor
                       ) -> tuple[_State, Tensor, Tensor]:
        """The endgame is monotone: Newton at λ = 1 from the end of a path starts close to
        a solution, where it converges without climbing. An endgame step that ends above
        the endgame's lowest residual (or where f is not finite) is rejected, and the sample
        goes back to the endgame's best point z_e (from the end of the path on), where f
        is known (no evaluation), to retry:

            under a secant Jacobian:  with the exact one (``_mark_stale`` asked for it);
            under the exact Jacobian: z ← z_e + α δ with α ← α / 2, δ from the secant
                                      model, which has absorbed the exact solve's
                                      products (no new solve).

        An accepted endgame step doubles α again (at most 1). Without this rule, inexact
        Newton steps at n = 128 took a sample from residual 6.7e-4 at the end of its path
        to 2.1 and never back (BENCHMARKS.md, "Endgame").

        The reference is the endgame's own best point, not the solve's best iterate: that
        may lie where Broyden's method stalled near a local minimum of ||z - f(z)|| that is
        no root, and sending a path's endgame back there kept it there. Where α would fall
        below ``_MIN_DAMPING`` (three exact steps failed) the endgame has stalled: the path
        passed close to λ = 1 at a fold, with no root near, and the sample starts a new
        path from a perturbed start (:meth:`_restart`, as after a step underflow).

        Returns the state and f and ||z - f(z)|| at the (possibly restored) points."""
        judged = (state.phase == Phase.ENDGAME) & state.newton.endgame_step
        if not _maybe_any(judged):
            return state, fz, abs_res
        newton, jacobian = state.newton, state.jacobian
        current = by_stop_mode(record.stop_mode, abs_res, record.rel_trace[-1])
        reject = judged & ~(current <= newton.end_res)
        accept = judged & ~reject
        damp = reject & jacobian.exact
        halved = newton.damping / 2
        stalled = damp & (halved < _MIN_DAMPING)
        damping = torch.where(damp, halved,
                              torch.where(accept, (2 * newton.damping).clamp_max(1.0),
                                          newton.damping)).masked_fill(stalled, 1.0)
        z = state.path.y[:, :-1]
        z_back = torch.cat([newton.end_z, torch.ones_like(z[:, :1])], dim=1)
        path = replace(state.path, y=_where(reject, z_back, state.path.y))
        fz_back = _where(reject, newton.end_fz, fz)
        abs_back = torch.where(reject, newton.end_abs, abs_res)
        newton = replace(_end_point(newton, accept, z, fz, current, abs_res), damping=damping,
                         endgame_step=newton.endgame_step & ~judged)
        state = replace(state, path=path, newton=newton,
                        jacobian=replace(jacobian, solve_failed=jacobian.solve_failed & ~reject),
                        needs_restart=state.needs_restart | stalled)
        return state, fz_back, abs_back

    @staticmethod
    def _enter_endgame(state: _State, record: Record, at_end: Tensor, fz: Tensor,
                       abs_res: Tensor) -> _State:
        """The samples in ``at_end`` (a path point accepted at λ >= 1 − ``_END_GAP``) go to
        the endgame, whose best point (:meth:`_judge_endgame`) starts as that point, with
        f and its residuals there, and full steps (α = 1)."""
        if not _maybe_any(at_end):
            return state
        current = by_stop_mode(record.stop_mode, abs_res, record.rel_trace[-1])
        newton = _end_point(state.newton, at_end, state.path.y[:, :-1], fz, current, abs_res)
        newton = replace(newton, damping=newton.damping.masked_fill(at_end, 1.0))
        return replace(state, newton=newton).with_phase(at_end, Phase.ENDGAME)

    def _leave_newton(self, state: _State, models: JacobianModels, f_finite: Tensor,
                      abs_res: Tensor, budget: Budget) -> tuple[_State, Tensor]:
        """NEWTON samples that stall restart on the path from (z0, 0), or first at (z0, 1)
        under Broyden's method when ``models.broyden_next`` (:meth:`_newton_to_broyden`);
        returns the new state and the samples that are idle this iteration (waiting or
        restarting).

        A sample stalls when f is not finite, its exact solve failed, ``_PATIENCE`` exact
        steps in a row made too little progress, or it took ``homo_newton_iters`` exact
        steps (Broyden's method: :meth:`_leave_broyden`). Too little progress:

            dense solves:  r_k > ``_NEWTON_PROGRESS`` · min_j r_j (the step did not halve the
                           lowest residual; where exact Newton converges, each step does;
                           where it wanders, a rare new lowest kept it going for all
                           ``homo_newton_iters`` steps);
            GMRES:         r_k >= min_j r_j (inexact Newton under Eisenstat–Walker forcing
                           may converge by less than half a step).

        Stalled samples wait until no sample is still converging under Newton, then all go
        on together (to Broyden's method, or the path, whose steps share linear solves).
        Under dense solves they go on stepping meanwhile: the batch pays n + 1 evaluations
        per refresh whichever rows ask, and a halving step revives one; only samples whose
        f or solve failed wait idle. Under GMRES every row's products cost, and they wait."""
        opt = self.opt
        in_newton = state.phase == Phase.NEWTON
        if not _maybe_any(in_newton):
            return state, in_newton
        if not opt.track:
            return state.finish(in_newton & ~f_finite, Status.NONFINITE), \
                torch.zeros_like(in_newton)
        if models.broyden_newton:
            return self._leave_broyden(state, models, in_newton, abs_res, budget)
        # Only a step taken with the exact Jacobian can stall (a secant one refreshes it).
        record, jacobian = state.newton, state.jacobian
        exact_step = in_newton & (record.steps > 0) & jacobian.exact
        dense = models.linear_solver == "dense"
        worse = exact_step & ~(abs_res < (_NEWTON_PROGRESS if dense else 1.0) * record.lowest)
        worse_in_row = torch.where(worse, record.worse_in_row + 1,
                                   record.worse_in_row.masked_fill(exact_step, 0))
        lowest = torch.where(in_newton, torch.minimum(record.lowest, abs_res), record.lowest)
        broken = in_newton & (~f_finite | (jacobian.solve_failed & jacobian.exact))
        stalled = (broken | (worse_in_row >= _PATIENCE) | (record.steps >= opt.newton_iters))
        leave = in_newton & stalled
        waiting = broken if dense else leave
        steps = torch.where(waiting, opt.newton_iters, record.steps)   # stays stalled
        state = replace(state, newton=replace(record, worse_in_row=worse_in_row,
                                              lowest=lowest, steps=steps))
        if bool((in_newton & ~stalled).any()):
            return state, waiting
        if models.broyden_next and bool(leave.any()):
            return self._newton_to_broyden(state, models, leave), leave
        return self._leave_together(state, models, leave, budget)

    def _newton_to_broyden(self, state: _State, models: JacobianModels, leave: Tensor
                           ) -> _State:
        """The samples in ``leave`` (every sample still in NEWTON: exact Newton stalled on
        all of them) restart at (z0, 1) under Broyden's method, as TorchDEQ's ``broyden``
        starts, with a fresh stall record (:meth:`_leave_broyden`); they are idle this
        iteration and f is evaluated at z0 next."""
        models.broyden_newton, models.broyden_next = True, False
        record = state.newton
        inf = torch.full_like(record.lowest, float("inf"))
        newton = replace(record,
                         lowest=torch.where(leave, inf, record.lowest),
                         worse_in_row=record.worse_in_row.masked_fill(leave, 0))
        y = state.path.y
        start = torch.cat([self.x0, torch.ones_like(y[:, -1:])], dim=1)
        return replace(state, newton=newton, path=replace(state.path, y=_where(leave, start, y)))

    def _leave_together(self, state: _State, models: JacobianModels, leave: Tensor,
                        budget: Budget) -> tuple[_State, Tensor]:
        """The samples in ``leave`` start on the path from (z0, 0) (those whose f(z0) is not
        finite fail); nothing happens if none leaves or f(z0) cannot be paid for."""
        if not bool(leave.any()) or not self._build_homotopy(models, budget):
            return state, torch.zeros_like(leave)
        state = state.finish(leave & ~finite_rows(models.fz0), Status.NONFINITE)
        leave = leave & (state.phase != Phase.DONE)
        return self._start_path(state, models, leave, self.x0), leave

    def _broyden_step(self, models: JacobianModels, z: Tensor, fz: Tensor, rows: Tensor,
                      delta: Tensor, finite: Tensor, max_evals: int) -> tuple[Tensor, Tensor]:
        """Broyden's step δ = W (f(z) - z) (:class:`~torchdeq_homotopy.secant.InverseBroyden`,
        memory ``homo_broyden_memory``, default the budget as in TorchDEQ) for ``rows``;
        the model observes every evaluation, so its updates follow each sample's steps."""
        if not _maybe_any(rows):     # no sample in this phase (CPU): free the pairs
            models.broyden = models.broyden_rows = None
            return delta, finite
        step, ok = self._broyden_direction(models, z, fz, max_evals, rows)
        step = torch.cat([step, torch.zeros_like(step[:, :1])], dim=1)
        return _where(rows, step, delta), torch.where(rows, ok, finite)

    def _broyden_direction(self, models: JacobianModels, z: Tensor, fz: Tensor,
                           max_evals: int, rows: Tensor) -> tuple[Tensor, Tensor]:
        """The model observes f(z) (built at the first call), and Broyden's step
        δ = W (f(z) − z) for every sample, ``(B, n)``, with where it is finite; ``rows``:
        the samples in the phase. On CPU the model is dropped while no sample is in the
        phase (:meth:`_broyden_step`) and a return builds a new one; on accelerators, where
        knowing that would take a host read, it lives on and restarts when the phase was
        empty at its last call (:meth:`InverseBroyden.restart`): the same steps."""
        if models.broyden is None:
            memory = self.opt.broyden_memory or max_evals
            models.broyden = InverseBroyden(z.shape[0], self.n, memory, z.dtype, z.device,
                                            merge=memory >= max_evals)
        elif models.broyden_rows is not None and not host.reads_cheap(rows):
            models.broyden.restart(~models.broyden_rows.any())
        models.broyden_rows = rows
        f_finite = models.broyden.observe(z, fz)
        step = models.broyden.step()
        return step, finite_rows(step) & f_finite

    def _leave_broyden(self, state: _State, models: JacobianModels, in_newton: Tensor,
                       abs_res: Tensor, budget: Budget
                       ) -> tuple[_State, Tensor]:
        """With the secant model the NEWTON phase is Broyden's method (see
        :meth:`_broyden_step`). A sample stalls when ``homo_secant_patience`` steps in a row
        find no residual below its lowest, or when f or the step is not finite; once every
        sample of the phase has stalled, the stalled ones start on the path together.

        Broyden's progress is not extrapolated: on 128-wide cells its residual falls
        slowly for hundreds of steps before it converges, and a rule that judged the rate
        handed such samples to the path too early (BENCHMARKS.md, "Small states")."""
        record = state.newton
        worse_in_row, lowest, stalled = self._broyden_progress(
            in_newton, abs_res, record.worse_in_row, record.lowest, state.jacobian.solve_failed,
            budget)
        state = replace(state, newton=replace(record, worse_in_row=worse_in_row, lowest=lowest))
        # Stalled samples go on with (free) Broyden steps until every sample in this phase
        # has stalled: a path step's products are batched calls of f, and would take
        # evaluations from the samples that Broyden is still solving.
        if not _maybe_any(stalled) or bool((in_newton & ~stalled).any()):
            return state, torch.zeros_like(stalled)
        return self._leave_together(state, models, stalled, budget)

    def _broyden_progress(self, in_newton: Tensor, abs_res: Tensor, worse_in_row: Tensor,
                          lowest: Tensor, solve_failed: Tensor, budget: Budget
                          ) -> tuple[Tensor, Tensor, Tensor]:
        """The stall record of Broyden's method after an evaluation with residual r:

            worse_in_row ← 0 if r < lowest, else worse_in_row + 1;   lowest ← min(lowest, r);
            stalled = r not finite, or the step failed,
                      or (worse_in_row >= patience and the path is affordable)

        (patience ``homo_secant_patience``, default a third of the budget; affordable:
        :meth:`_path_affordable`), for the samples in ``in_newton``. Returns
        (worse_in_row, lowest, stalled)."""
        progress = in_newton & (abs_res < lowest)
        worse_in_row = torch.where(progress, 0, worse_in_row + in_newton)   # + 1 in the phase
        lowest = torch.where(in_newton, torch.minimum(lowest, abs_res), lowest)
        stalled = ~(abs_res < float("inf")) | solve_failed
        if self._path_affordable(budget):
            patience = self.opt.secant_patience or max(1, budget.limit // 3)
            stalled = stalled | (worse_in_row >= patience)
        return worse_in_row, lowest, in_newton & stalled

    def _path_affordable(self, budget: Budget) -> bool:
        """Whether samples whose Broyden steps stopped making progress should start on the
        path. A path whose solves are not dense costs about ``_PATH_EVALS_PER_ENTRY`` · n
        evaluations (about 4,000 at n = 128), so with the default patience it starts only
        when that many are left; with less, Broyden's method goes on, which on 64-512-wide
        cells at budget 2,000 solved 5 samples that the path, started with the rest of the
        budget, did not, and lost none (BENCHMARKS.md, "Broyden's stall and the path's
        cost"). Dense paths (n <= ``homo_krylov_dim``) and an explicit
        ``homo_secant_patience`` always may."""
        if self.opt.secant_patience is not None or self._linear_solver() == "dense":
            return True
        return budget.left >= _PATH_EVALS_PER_ENTRY * self.n

    def _start_path(self, state: _State, models: JacobianModels, mask: Tensor,
                    z0: Tensor) -> _State:
        """Put the samples in ``mask`` at (z0, 0), the start of their path, with the tangent
        there if the homotopy knows it in closed form (else phase TANGENT solves for it)."""
        start_y = torch.cat([z0, torch.zeros_like(z0[:, :1])], dim=1)
        path = replace(state.path, step_unit=state.path.step_unit.masked_fill(mask, 0.0),
                       anchor=_where(mask, start_y, state.path.anchor),
                       anchor_prev=_where(mask, start_y, state.path.anchor_prev),
                       y=_where(mask, start_y, state.path.y))
        state = replace(state, path=path,
                        jacobian=replace(state.jacobian, stale=state.jacobian.stale | mask),
                        corrector=replace(state.corrector,
                                          retried=state.corrector.retried & ~mask))
        start = models.homotopy.start_tangent()
        if start is None:    # the tangent at λ = 0 needs a solve: do it at the next iteration
            e_lam = _e_lambda(start_y)
            path = replace(path, tangent=_where(mask, e_lam, path.tangent),
                           tangent_prev=_where(mask, e_lam, path.tangent_prev))
            return replace(state, path=path).with_phase(mask, Phase.TANGENT)
        return self._set_tangent(state, models, mask,
                                 _unit(torch.cat([start[0], start[1][:, None]], dim=1)))

    def _restart(self, state: _State, models: JacobianModels, budget: Budget
                 ) -> tuple[_State, Tensor]:
        """Samples whose path step underflowed, or whose path went below λ = 0 (a jump to
        another branch), start a new path from a perturbed start

            z0' = z0 + k σ ξ,   ξ ~ N(0, I),   σ = max(rms(f(z0) - z0), 0.01 (1 + rms(z0)))

        (k: the restart's number), up to ``homo_restarts`` times; then they fail with
        STEP_UNDERFLOW. By the probability-one theory a random start almost surely has a
        regular path. Costs one call of f; returns the new state and the restarted samples
        (idle this iteration)."""
        if not _maybe_any(state.needs_restart):
            return state, state.needs_restart
        pending = state.needs_restart & (state.phase != Phase.DONE)
        state = replace(state, needs_restart=torch.zeros_like(state.needs_restart))
        give_up = pending & (state.restarts >= self.opt.restarts)
        state = state.finish(give_up, Status.STEP_UNDERFLOW)
        again = pending & ~give_up
        if not bool(again.any()):
            return state, again
        if not budget.spend():
            return state.finish(again, Status.STEP_UNDERFLOW), torch.zeros_like(again)
        state = replace(state, restarts=state.restarts + again.long())
        rms = (self.n ** -0.5)
        sigma = torch.maximum((models.fz0 - self.x0).norm(dim=1) * rms,
                              0.01 * (1 + self.x0.norm(dim=1) * rms))
        if models.generator is None:    # a fixed seed: restarts are reproducible
            models.generator = torch.Generator(device=self.x0.device).manual_seed(0)
        noise = torch.randn(self.x0.shape, generator=models.generator, dtype=self.x0.dtype,
                            device=self.x0.device)
        z0 = self.x0 + (state.restarts * sigma)[:, None] * noise
        z0 = _where(again, z0, self.x0)
        fz0 = self.f(z0)
        again = again & finite_rows(fz0)
        models.homotopy.restart(again, z0, fz0)
        return self._start_path(state, models, again, z0), again

    def _corrector_verdict(self, state: _State, h_norm: Tensor, in_corr: Tensor
                           ) -> tuple[Tensor, Tensor]:
        """Per sample in the corrector (``in_corr``): accept when

            ||H(y)|| <= tol_c (1 + ||z||)   and the last solve was finite;

        reject when H or the solve is not finite, the corrector diverges
        (||δ_k|| > θ ||δ_{k−1}||, θ = ``homo_contraction``) or has taken ``homo_corrector_iters``
        steps. Returns (accepted, rejected)."""
        opt, corrector = self.opt, state.corrector
        z = state.path.y[:, : self.n]
        h_ok = h_norm < float("inf")         # False for NaN too
        failed = state.jacobian.solve_failed
        accept = in_corr & h_ok & ~failed & (h_norm <= opt.corrector_tol * (1 + z.norm(dim=1)))
        diverging = (corrector.dnorm_prev < float("inf")) & (
            corrector.dnorm > opt.contraction * corrector.dnorm_prev)
        reject = in_corr & ~accept & (~h_ok | failed | diverging
                                      | (corrector.steps >= opt.corrector_iters))
        return accept, reject

    def _judge_corrector(self, state: _State, models: JacobianModels, h_norm: Tensor,
                         idle: Tensor, record: Record, fz: Tensor, abs_res: Tensor
                         ) -> tuple[_State, Tensor]:
        """Accept, reject or continue each CORRECT sample (:meth:`_corrector_verdict`);
        returns the new state and the samples now idle.

        A step rejected under a secant Jacobian is retried once from the same prediction
        with the exact one; otherwise from the anchor with h/2 (:meth:`_retry`). An accepted
        step at λ >= 1 − ``_END_GAP`` goes to the endgame, one below λ = 0 (H(z, 0) = 0
        only at z0: a jump to another branch) restarts, and the others advance the anchor
        (:meth:`_advance_anchor`)."""
        in_corr = (state.phase == Phase.CORRECT) & ~idle
        if not _maybe_any(in_corr):
            return state, in_corr
        accept, reject = self._corrector_verdict(state, h_norm, in_corr)
        if not _maybe_any(accept | reject):     # every corrector goes on: nothing to decide
            return state, torch.zeros_like(in_corr)
        corrector, jacobian, lam = state.corrector, state.jacobian, state.path.y[:, -1]
        exact_retry = reject & ~jacobian.exact & ~corrector.retried
        state = replace(state, jacobian=replace(jacobian, stale=jacobian.stale | exact_retry))
        state = state.begin_step(exact_retry, state.path.pred)
        retried = (corrector.retried | exact_retry) & ~accept & ~(reject & ~exact_retry)
        reject = reject & ~exact_retry
        at_end = accept & (lam >= 1 - _END_GAP)
        below_start = accept & (lam < -self.opt.step_init)
        continuing = accept & ~at_end & ~below_start
        state = replace(state, corrector=replace(state.corrector, retried=retried),
                        needs_restart=state.needs_restart | below_start)
        state = self._enter_endgame(state, record, at_end, fz, abs_res)
        state = self._advance_anchor(state, continuing)
        if self.opt.predictor != "secant":
            state, retry = self._retry(state.with_phase(continuing, Phase.TANGENT), reject)
            return state, exact_retry | retry
        # Secant predictor: t = (y_k − y_{k−1}) / ||·||, no linear solve.
        secant = _unit(state.path.anchor - state.path.anchor_prev)
        state, retry = self._retry(self._set_tangent(state, models, continuing, secant),
                                   reject)
        return state, continuing | exact_retry | retry

    def _advance_anchor(self, state: _State, continuing: Tensor) -> _State:
        """The accepted point becomes the anchor, and the step grows by the corrector's
        count k: h ← min(h · g_k, h_max), g = ``_GROW_FAST`` (k <= 1), ``_GROW_SLOW``
        (k = 2), ``_SHRINK_SLOW`` (k >= 3); a slow corrector (k >= ``_SLOW_CORRECTOR``) had
        a poor secant Jacobian, so the tangent there is taken with a fresh one."""
        path, steps = state.path, state.corrector.steps
        stale = state.jacobian.stale | (continuing & (steps >= _SLOW_CORRECTOR))
        grow = torch.where(steps <= 1, _GROW_FAST,       # scalars: the default dtype
                           torch.where(steps == 2, _GROW_SLOW, _SHRINK_SLOW)).to(path.step)
        h_max = self.opt.step_max * path.step_unit
        path = replace(
            path, step=torch.where(continuing, torch.minimum(path.step * grow, h_max), path.step),
            anchor_prev=_where(continuing, path.anchor, path.anchor_prev),
            tangent_prev=_where(continuing, path.tangent, path.tangent_prev),
            anchor=_where(continuing, path.y, path.anchor))
        return replace(state, path=path, jacobian=replace(state.jacobian, stale=stale))

    def _retry(self, state: _State, reject: Tensor) -> tuple[_State, Tensor]:
        """Halve h and predict again from the anchor, unless h underflows (h < h_min: a
        restart); returns the new state and the retried samples."""
        if not _maybe_any(reject):
            return state, reject
        path = state.path
        step = torch.where(reject, _RETRY_FACTOR * path.step, path.step)
        underflow = reject & (step.abs() < self.opt.step_min * path.step_unit.abs())
        state = replace(state, path=replace(path, step=step),
                        needs_restart=state.needs_restart | underflow)
        retry = reject & ~underflow
        return state.begin_step(retry, self._predict_linear(state)), retry
