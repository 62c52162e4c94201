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
            self.hom = HOMOTOPIES[self.opt.homotopy](self.x0, self.fz0)
        return True

    def _mark_stale(self, st: _State, abs_res: Tensor) -> None:
        """A Newton or endgame step under a secant Jacobian that did not halve the residual
        (or failed) asks for the exact Jacobian at the next solve."""
        newtonish = (st.phase == Phase.ENDGAME) | (
            (st.phase == Phase.NEWTON) & (self._mode() != "secant"))
        if not _maybe_any(newtonish):
            return
        slow = ~(abs_res <= _NEWTON_PROGRESS * st.res_prev) | st.solve_failed
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
        at_end = accept & (st.y[:, -1] >= 1 - _END_GAP)
        # H(z, 0) = 0 only at z0: a path at λ < 0 has jumped to another branch.
        behind = accept & (st.y[:, -1] < -opt.step_init)
        st.derailed = st.derailed | behind
        onward = accept & ~at_end & ~behind
        # A corrector that needed _SLOW_CORRECTOR or more steps had a poor secant
        # Jacobian: the tangent at the new anchor is taken with a fresh one.
        st.stale = st.stale | (onward & (st.k_corr >= _SLOW_CORRECTOR))
        grow = torch.where(st.k_corr <= 1, _GROW_FAST,
                           torch.where(st.k_corr == 2, _GROW_SLOW, _SHRINK_SLOW))
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
        st.step = torch.where(reject, _RETRY_FACTOR * st.step, st.step)
        underflow = reject & (st.step.abs() < opt.step_min * st.step_unit.abs())
        st.derailed = st.derailed | underflow
        retry = reject & ~underflow
        st.begin_step(retry, self._predict_linear(st))
        return retry
