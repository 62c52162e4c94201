"""The tracker's predictor: from an accepted point y_a along its unit tangent t.

    t solves [H_z  H_λ; t_prevᵀ] w = [0; 1],   t = w / ||w||,
    y_p = y_a + h t                       (``homo_predictor='tangent'``),
    or dy/ds = t(y), s ∈ [0, h]           (``'ode'``: the Davidenko ODE by torchdiffeq).

:class:`Predictor` is a mixin of :class:`~torchdeq_homotopy.path.PathTracker`.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .linalg import batch_dot
from .outcome import Budget, _where
from .tracker_state import _TURN_FACTOR, JacobianModels, _e_lambda, _State, _unit

Tensor = torch.Tensor


class Predictor:
    """Tangents and predicted points (uses the tracker's ``f``, ``n``, ``opt`` and
    ``_solve``)."""

    def _predict_linear(self, state: _State) -> Tensor:
        """y_p = y_a + h t, with h shortened so that λ_p does not pass 1: h <= (1 - λ_a) / t_λ."""
        path = state.path
        lam_a, t_lam = path.anchor[:, -1], path.tangent[:, -1]
        to_end = (1 - lam_a) / t_lam
        h = torch.where((t_lam > 0) & (lam_a < 1) & (path.step > to_end), to_end, path.step)
        return path.anchor + h[:, None] * path.tangent

    def _predict(self, state: _State, models: JacobianModels, mask: Tensor,
                 budget: Budget) -> Tensor:
        linear = self._predict_linear(state)
        if self.opt.predictor == "tangent":
            return linear
        return self._predict_ode(state, models, linear, mask, budget)

    def _predict_ode(self, state: _State, models: JacobianModels, linear: Tensor,
                     mask: Tensor, budget: Budget) -> Tensor:
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
            w, finite, _ = self._solve(models, y, fz, state.path.tangent, e_lam, budget)
            return torch.where((finite & mask)[:, None], _unit(w) * h[:, None],
                               torch.zeros_like(w))

        grid = torch.tensor([0.0, 1.0], device=state.path.y.device, dtype=state.path.y.dtype)
        return odeint(velocity, state.path.anchor, grid, method=self.opt.ode_method)[-1]

    def _set_tangent(self, state: _State, models: JacobianModels, tangent_ok: Tensor,
                     t: Tensor, budget: Budget | None = None,
                     exact: Tensor | None = None) -> _State:
        """Take ``t`` as the anchor's tangent and predict the next point. The first tangent
        sets the step scale, h_0 = ``homo_step_init`` / |t_λ| (λ rises by step_init). A
        tangent turning sharply (t · t_prev < ``max_turn``) means the step may have jumped
        to another branch: go back to the previous anchor with h · ``_TURN_FACTOR``. A sharp
        turn of a tangent solved with a secant Jacobian (``exact`` False) is first
        recomputed with the exact one."""
        opt, path = self.opt, state.path
        first = tangent_ok & (path.step_unit == 0)
        sharp = tangent_ok & ~first & (batch_dot(t, path.tangent) < opt.max_turn)
        jacobian = state.jacobian
        if exact is not None:
            recheck = sharp & ~exact        # stays in TANGENT; the next solve is exact
            jacobian = replace(jacobian, stale=jacobian.stale | recheck)
            sharp, tangent_ok = sharp & ~recheck, tangent_ok & ~recheck
        h0 = opt.step_init / t[:, -1].abs().clamp_min(1e-3)     # raises λ by step_init
        step = torch.where(first, h0, path.step)
        smooth = tangent_ok & ~sharp
        step = torch.where(sharp, _TURN_FACTOR * step, step)
        step_unit = torch.where(first, h0, path.step_unit)
        tangent_prev = _where(first, t, path.tangent_prev)
        path = replace(path, step=step, step_unit=step_unit, tangent_prev=tangent_prev,
                       tangent=_where(sharp, tangent_prev, _where(smooth, t, path.tangent)),
                       anchor=_where(sharp, path.anchor_prev, path.anchor))
        underflow = sharp & (path.step.abs() < opt.step_min * path.step_unit.abs())
        state = replace(state, path=path, jacobian=jacobian,
                        needs_restart=state.needs_restart | underflow)
        tangent_ok = tangent_ok & ~underflow
        pred = (self._predict(state, models, tangent_ok, budget) if budget is not None
                else self._predict_linear(state))
        return state.begin_step(tangent_ok, pred)
