"""The tracker's phase transitions: who leaves Newton or Broyden for the path, how the
corrector is judged, and restarts. Each method reads the state, decides per sample, and
moves samples between phases (:class:`~torchdeq_homotopy.tracker_state.Phase`).

:class:`PhaseTransitions` is a mixin of :class:`~torchdeq_homotopy.path.PathTracker`.
"""
from __future__ import annotations

import torch

from .homotopies import HOMOTOPIES
from .outcome import Budget, Status, _where
from .secant import InverseBroyden
from .tracker_state import (
    _END_GAP,
    _GROW_FAST,
    _GROW_SLOW,
    _NEWTON_PROGRESS,
    _PATIENCE,
    _RETRY_FACTOR,
    _SHRINK_SLOW,
    _SLOW_CORRECTOR,
    Phase,
    _e_lambda,
    _maybe_any,
    _State,
    _unit,
)

Tensor = torch.Tensor


class PhaseTransitions:
    """Decisions between phases (uses the tracker's ``f``, ``x0``, ``opt``, ``hom``,
    ``broyden``, ``_solve``, ``_set_tangent`` and ``_predict_linear``)."""

    def _build_homotopy(self, budget: Budget) -> bool:
        if self.fz0 is None:
            if not budget.spend():
                return False
            self.fz0 = self.f(self.x0)
            self.hom = HOMOTOPIES[self.opt.type](self.x0, self.fz0)
        return True

    def _mark_stale(self, state: _State, abs_res: Tensor) -> None:
        """A Newton or endgame step under a secant Jacobian that did not halve the residual
        (or failed) asks for the exact Jacobian at the next solve."""
        at_lambda_one = (state.phase == Phase.ENDGAME) | (
            (state.phase == Phase.NEWTON) & (self._mode() != "secant"))
        if not _maybe_any(at_lambda_one):
            return
        slow = ~(abs_res <= _NEWTON_PROGRESS * state.res_prev) | state.solve_failed
        state.stale = state.stale | (at_lambda_one & ~state.exact & slow)

    def _leave_newton(self, state: _State, f_finite: Tensor, abs_res: Tensor,
                      budget: Budget) -> Tensor:
        """NEWTON samples that stall restart on the path from (z0, 0); returns the samples
        that are idle this iteration (waiting or restarting)."""
        opt = self.opt
        in_newton = state.phase == Phase.NEWTON
        if not _maybe_any(in_newton):
            return in_newton
        if not opt.track:
            state.finish(in_newton & ~f_finite, Status.NONFINITE)
            return torch.zeros_like(in_newton)
        if self._mode() == "secant":
            return self._leave_broyden(state, in_newton, f_finite, abs_res, budget)
        # Only a step taken with the exact Jacobian can stall (a secant one refreshes it).
        exact_step = in_newton & (state.n_newton > 0) & state.exact
        worse = exact_step & ~(abs_res < state.newton_best)
        state.n_worse = torch.where(worse, state.n_worse + 1,
                                    state.n_worse.masked_fill(exact_step, 0))
        state.newton_best = torch.where(in_newton, torch.minimum(state.newton_best, abs_res),
                                     state.newton_best)
        stalled = (~f_finite | (state.solve_failed & state.exact) | (state.n_worse >= _PATIENCE)
                   | (state.n_newton >= opt.newton_iters))
        # Stalled samples wait until no sample is still converging under Newton, then all
        # start on the path together, so that their path steps share linear solves.
        leave = in_newton & stalled
        state.n_newton = torch.where(leave, opt.newton_iters, state.n_newton)   # stays stalled
        if bool((in_newton & ~stalled).any()):
            return leave
        if not bool(leave.any()) or not self._build_homotopy(budget):
            return torch.zeros_like(leave)
        state.finish(leave & ~torch.isfinite(self.fz0).all(dim=1), Status.NONFINITE)
        leave = leave & (state.phase != Phase.DONE)
        self._start_path(state, leave, self.x0)
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

    def _leave_broyden(self, state: _State, in_newton: Tensor, f_finite: Tensor,
                       abs_res: Tensor, budget: Budget) -> Tensor:
        """With the secant model the NEWTON phase is Broyden's method (see
        :meth:`_broyden_step`). A sample stalls when ``homo_secant_patience`` steps in a row
        find no residual below its lowest, or when f or the step is not finite; once every
        sample of the phase has stalled, the stalled ones start on the path together."""
        progress = in_newton & (abs_res < state.newton_best)
        state.n_worse = torch.where(progress, 0,
                                    torch.where(in_newton, state.n_worse + 1, state.n_worse))
        state.newton_best = torch.where(in_newton, torch.minimum(state.newton_best, abs_res),
                                     state.newton_best)
        patience = self.opt.secant_patience or max(1, budget.limit // 3)
        stalled = in_newton & (~f_finite | state.solve_failed | (state.n_worse >= patience))
        # Stalled samples go on with (free) Broyden steps until every sample in this phase
        # has stalled: a path step's products are batched calls of f, and would take
        # evaluations from the samples that Broyden is still solving.
        if not _maybe_any(stalled) or bool((in_newton & ~stalled).any()) \
                or not self._build_homotopy(budget):
            return torch.zeros_like(stalled)
        state.finish(stalled & ~torch.isfinite(self.fz0).all(dim=1), Status.NONFINITE)
        stalled = stalled & (state.phase != Phase.DONE)
        self._start_path(state, stalled, self.x0)
        return stalled

    def _start_path(self, state: _State, mask: Tensor, z0: Tensor) -> None:
        """Put the samples in ``mask`` at (z0, 0), the start of their path."""
        state.stale = state.stale | mask
        state.retried = state.retried & ~mask
        state.step_unit = state.step_unit.masked_fill(mask, 0.0)
        start_y = torch.cat([z0, torch.zeros_like(z0[:, :1])], dim=1)
        state.anchor = _where(mask, start_y, state.anchor)
        state.anchor_prev = _where(mask, start_y, state.anchor_prev)
        state.y = _where(mask, start_y, state.y)
        start = self.hom.start_tangent()
        if start is None:    # the tangent at λ = 0 needs a solve: do it at the next iteration
            e_lam = _e_lambda(start_y)
            state.tangent = _where(mask, e_lam, state.tangent)
            state.tangent_prev = _where(mask, e_lam, state.tangent_prev)
            state.phase = state.phase.masked_fill(mask, int(Phase.TANGENT))
            return
        self._set_tangent(state, mask, _unit(torch.cat([start[0], start[1][:, None]], dim=1)))

    def _restart(self, state: _State, budget: Budget) -> Tensor:
        """Samples whose path step underflowed, or whose path went below λ = 0 (a jump to
        another branch), start a new path from a perturbed start

            z0' = z0 + k σ ξ,   ξ ~ N(0, I),   σ = max(rms(f(z0) - z0), 0.01 (1 + rms(z0)))

        (k: the restart's number), up to ``homo_restarts`` times; then they fail with
        STEP_UNDERFLOW. By the probability-one theory a random start almost surely has a
        regular path. Costs one call of f; returns the restarted samples (idle this
        iteration)."""
        if not _maybe_any(state.needs_restart):
            return state.needs_restart
        pending = state.needs_restart & (state.phase != Phase.DONE)
        state.needs_restart = torch.zeros_like(state.needs_restart)
        give_up = pending & (state.restarts >= self.opt.restarts)
        state.finish(give_up, Status.STEP_UNDERFLOW)
        again = pending & ~give_up
        if not bool(again.any()):
            return again
        if not budget.spend():
            state.finish(again, Status.STEP_UNDERFLOW)
            return torch.zeros_like(again)
        state.restarts = state.restarts + again.long()
        rms = (self.n ** -0.5)
        sigma = torch.maximum((self.fz0 - self.x0).norm(dim=1) * rms,
                              0.01 * (1 + self.x0.norm(dim=1) * rms))
        noise = torch.randn(self.x0.shape, generator=self._generator(), dtype=self.x0.dtype,
                            device=self.x0.device)
        z0 = self.x0 + (state.restarts * sigma)[:, None] * noise
        z0 = _where(again, z0, self.x0)
        fz0 = self.f(z0)
        again = again & torch.isfinite(fz0).all(dim=1)
        self.hom.restart(again, z0, fz0)
        self._start_path(state, again, z0)
        return again

    def _generator(self) -> torch.Generator:
        """A fixed-seed generator: restarts are reproducible run to run."""
        if self._gen is None:
            self._gen = torch.Generator(device=self.x0.device).manual_seed(0)
        return self._gen

    def _judge_corrector(self, state: _State, h_norm: Tensor, idle: Tensor) -> Tensor:
        """Accept, reject or continue each CORRECT sample; returns the samples now idle."""
        opt = self.opt
        in_corr = (state.phase == Phase.CORRECT) & ~idle
        if not _maybe_any(in_corr):
            return in_corr
        z = state.y[:, : self.n]
        h_ok = h_norm < float("inf")         # False for NaN too
        accept = in_corr & h_ok & ~state.solve_failed & (
            h_norm <= opt.corrector_tol * (1 + z.norm(dim=1)))
        diverging = (state.dnorm_prev < float("inf")) & (
            state.dnorm > opt.contraction * state.dnorm_prev)
        reject = in_corr & ~accept & (~h_ok | state.solve_failed | diverging
                                      | (state.corrector_steps >= opt.corrector_iters))
        if not _maybe_any(accept | reject):     # every corrector goes on: nothing to decide
            return torch.zeros_like(in_corr)
        # A step rejected under a secant Jacobian is retried once from the same prediction
        # with the exact one; otherwise from the anchor with h/2.
        exact_retry = reject & ~state.exact & ~state.retried
        state.stale = state.stale | exact_retry
        state.begin_step(exact_retry, state.pred)
        state.retried = (state.retried | exact_retry) & ~accept & ~(reject & ~exact_retry)
        reject = reject & ~exact_retry
        # Accepted: at λ ≈ 1 go to the endgame; otherwise grow h and take a tangent here.
        at_end = accept & (state.y[:, -1] >= 1 - _END_GAP)
        # H(z, 0) = 0 only at z0: a path at λ < 0 has jumped to another branch.
        below_start = accept & (state.y[:, -1] < -opt.step_init)
        state.needs_restart = state.needs_restart | below_start
        continuing = accept & ~at_end & ~below_start
        # A corrector that needed _SLOW_CORRECTOR or more steps had a poor secant
        # Jacobian: the tangent at the new anchor is taken with a fresh one.
        state.stale = state.stale | (continuing & (state.corrector_steps >= _SLOW_CORRECTOR))
        grow = torch.where(state.corrector_steps <= 1, _GROW_FAST,
                           torch.where(state.corrector_steps == 2, _GROW_SLOW, _SHRINK_SLOW))
        h_max = opt.step_max * state.step_unit
        state.step = torch.where(continuing, torch.minimum(state.step * grow, h_max), state.step)
        secant = _unit(state.y - state.anchor) if opt.predictor == "secant" else None
        state.anchor_prev = _where(continuing, state.anchor, state.anchor_prev)
        state.tangent_prev = _where(continuing, state.tangent, state.tangent_prev)
        state.anchor = _where(continuing, state.y, state.anchor)
        state.phase = state.phase.masked_fill(at_end, int(Phase.ENDGAME))
        if opt.predictor != "secant":
            state.phase = state.phase.masked_fill(continuing, int(Phase.TANGENT))
            return exact_retry | self._retry(state, reject)
        # Secant predictor: t = (y_k - y_{k-1}) / ||·||, no linear solve.
        self._set_tangent(state, continuing, secant)
        return continuing | exact_retry | self._retry(state, reject)

    def _retry(self, state: _State, reject: Tensor) -> Tensor:
        """Halve h and predict again from the anchor, unless h underflows; returns retries."""
        opt = self.opt
        if not _maybe_any(reject):
            return reject
        state.step = torch.where(reject, _RETRY_FACTOR * state.step, state.step)
        underflow = reject & (state.step.abs() < opt.step_min * state.step_unit.abs())
        state.needs_restart = state.needs_restart | underflow
        retry = reject & ~underflow
        state.begin_step(retry, self._predict_linear(state))
        return retry
