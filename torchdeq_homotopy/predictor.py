"""The tracker's predictor: from an accepted point y_a along its unit tangent t.

    t solves [H_z  H_λ; t_prevᵀ] w = [0; 1],   t = w / ||w||,
    y_p = y_a + h t                       (``homo_predictor='tangent'``),
    or dy/ds = t(y), s ∈ [0, h]           (``'ode'``: the Davidenko ODE by torchdiffeq).

:class:`Predictor` is a mixin of :class:`~torchdeq_homotopy.path.PathTracker`.
"""
from __future__ import annotations

import torch

from .linalg import batch_dot
from .outcome import Budget, _where
from .tracker_state import _TURN_FACTOR, _e_lambda, _State, _unit

Tensor = torch.Tensor


class Predictor:
    """Tangents and predicted points (uses ``f``, ``n``, ``opt`` and ``_solve``)."""

    def _predict_linear(self, state: _State) -> Tensor:
        """y_p = y_a + h t, with h shortened so that λ_p does not pass 1: h <= (1 - λ_a) / t_λ."""
        path = state.path
        lam_a, t_lam = path.anchor[:, -1], path.tangent[:, -1]
        to_end = (1 - lam_a) / t_lam
        h = torch.where((t_lam > 0) & (lam_a < 1) & (path.step > to_end), to_end, path.step)
        return path.anchor + h[:, None] * path.tangent

    def _predict(self, state: _State, mask: Tensor, budget: Budget) -> Tensor:
        linear = self._predict_linear(state)
        if self.opt.predictor == "tangent":
            return linear
        return self._predict_ode(state, linear, mask, budget)

    def _predict_ode(self, state: _State, linear: Tensor, mask: Tensor, budget: Budget) -> Tensor:
        """Integrate the arclength Davidenko ODE  dy/ds = t(y),  s ∈ [0, h],  with odeint.

        t(y) solves [H_z H_λ; t_aᵀ] w = [0; 1], t = w / ||w|| (oriented like the anchor's
        tangent t_a). Each sample uses its own h (that of the linear predictor) through
        s = h σ, σ ∈ [0, 1]; samples outside ``mask`` have zero velocity.
        """
        from torchdiffeq import odeint

        h = (linear - state.path.anchor).norm(dim=1)
        h = torch.where(mask, h, torch.zeros_like(h))
        e_lam = _e_lambda(state.path.y)

        def velocity(_sigma: Tensor, y: Tensor) -> Tensor:
            if not budget.spend():
                return torch.zeros_like(y)
            fz = torch.nan_to_num(self.f(y[:, : self.n]))
            w, finite, _ = self._solve(y, fz, state.path.tangent, e_lam, budget)
            return torch.where((finite & mask)[:, None], _unit(w) * h[:, None],
                               torch.zeros_like(w))

        grid = torch.tensor([0.0, 1.0], device=state.path.y.device, dtype=state.path.y.dtype)
        return odeint(velocity, state.path.anchor, grid, method=self.opt.ode_method)[-1]

    def _set_tangent(self, state: _State, tangent_ok: Tensor, t: Tensor,
                     budget: Budget | None = None, exact: Tensor | None = None) -> None:
        """Take ``t`` as the anchor's tangent and predict the next point. The first tangent
        sets the step scale. A tangent turning sharply (t · t_prev < ``max_turn``) means the
        step may have jumped to another branch: go back to the previous anchor with a
        quarter of the step. A sharp turn of a tangent solved with a secant Jacobian
        (``exact`` False) is first recomputed with the exact one."""
        opt = self.opt
        first = tangent_ok & (state.path.step_unit == 0)
        sharp = tangent_ok & ~first & (batch_dot(t, state.path.tangent) < opt.max_turn)
        if exact is not None:
            recheck = sharp & ~exact        # stays in TANGENT; the next solve is exact
            state.jacobian.stale = state.jacobian.stale | recheck
            sharp, tangent_ok = sharp & ~recheck, tangent_ok & ~recheck
        h0 = opt.step_init / t[:, -1].abs().clamp_min(1e-3)     # raises λ by step_init
        state.path.step = torch.where(first, h0, state.path.step)
        state.path.step_unit = torch.where(first, h0, state.path.step_unit)
        state.path.tangent_prev = _where(first, t, state.path.tangent_prev)
        smooth = tangent_ok & ~sharp
        state.path.tangent = _where(smooth, t, state.path.tangent)
        state.path.anchor = _where(sharp, state.path.anchor_prev, state.path.anchor)
        state.path.tangent = _where(sharp, state.path.tangent_prev, state.path.tangent)
        state.path.step = torch.where(sharp, _TURN_FACTOR * state.path.step, state.path.step)
        underflow = sharp & (state.path.step.abs() < opt.step_min * state.path.step_unit.abs())
        state.needs_restart = state.needs_restart | underflow
        tangent_ok = tangent_ok & ~underflow
        pred = (self._predict(state, tangent_ok, budget) if budget is not None
                else self._predict_linear(state))
        state.begin_step(tangent_ok, pred)
