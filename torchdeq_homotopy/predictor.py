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
from .tracker_state import _TURN_FACTOR, _State, _unit

Tensor = torch.Tensor


class Predictor:
    """Tangents and predicted points (uses ``f``, ``n``, ``opt`` and ``_solve``)."""

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
        st.step = torch.where(sharp, _TURN_FACTOR * st.step, st.step)
        underflow = sharp & (st.step.abs() < opt.step_min * st.step_unit.abs())
        st.derailed = st.derailed | underflow
        got = got & ~underflow
        pred = (self._predict(st, got, budget) if budget is not None
                else self._predict_linear(st))
        st.begin_step(got, pred)
