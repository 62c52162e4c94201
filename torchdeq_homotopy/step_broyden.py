"""Broyden's good method stored as its steps alone (Kelley's form), for many rows at once.

Broyden's method for g(z) = f(z) − z = 0 takes full steps z_{j+1} = z_j + s_j,
s_j = W_j g_j, with W ≈ (I − J_f)⁻¹ and the good update after each step
(:class:`~torchdeq_homotopy.secant.InverseBroyden`)

    W₊ = W − (s + W Δg)(Wᵀ s)ᵀ / (sᵀ W Δg).

For full steps s = W g, so W Δg = W g₊ − s, and the update collapses to (Kelley 1995,
*Iterative Methods for Linear and Nonlinear Equations*, §7.3)

    u = W g₊,      s₊ = W₊ g₊ = u ‖s‖² / (‖s‖² − sᵀ u),      W₊ = (I + s₊ sᵀ / ‖s‖²) W.

After k steps W is a product of rank-one factors over the steps alone,

    W_k = (I + s_k s_{k−1}ᵀ/‖s_{k−1}‖²) ⋯ (I + s_1 s_0ᵀ/‖s_0‖²) W_0 = (I + A T Bᵀ) W_0,

A = [s_1 … s_k], B = [w_0 s_0 … w_{k−1} s_{k−1}] (w_j = 1/‖s_j‖²), with T lower
triangular and grown by one row per factor, as the compact WY form of Householder products:

    (I + a bᵀ)(I + A T Bᵀ) = I + [A a] [[T, 0], [bᵀ A T, 1]] [B b]ᵀ.

Stored is T' = T diag(w), so that A T Bᵀ = A T' [s_0 … s_{k−1}]ᵀ reads the steps alone,
grown as T'_{k,:k} = w_k (s_kᵀ A) T', T'_{kk} = w_k.

One (n,) column per step is stored and read twice per step (Bᵀ v and A c), where the
two-factor form W = I + C Dᵀ stores two columns per step and reads both twice (W g and
Wᵀ s): half the memory and half the memory traffic, which is what a step costs on large
states. The form needs every step to be Broyden's full step, so it serves a
Broyden phase whose rows start together (each from its own W_0) and never drop a pair:
the warm-up's switch at training budgets
(:class:`~torchdeq_homotopy.warmup.AndersonIteration`).
"""
from __future__ import annotations

import torch

from .linalg import finite_rows
from .secant import _wide, compact_inverse

Tensor = torch.Tensor


class StepBroyden:
    """Broyden's good method for a batch of rows, each from its own secant-seeded W_0,
    storing the steps only.

    Args:
        X: each row's last j + 1 iterates ``(B, j + 1, n)``, oldest first; Broyden's method
            starts at the last, with W_0 the good updates of W = I with their j secant
            pairs, in the compact form of :func:`~torchdeq_homotopy.secant.compact_inverse`
            (W_0 = I for j = 0).
        F: their images f(X).
        columns: steps held before the buffers grow (one per :meth:`observe`, plus the
            first); size it to the calls left and nothing is ever copied.

    Rows where f is not finite are frozen at their last finite point (step 0) and keep no
    further factors; a vanishing denominator ‖s‖² − sᵀu skips the update for that step
    (W₊ = W, s₊ = W g₊), as :class:`~torchdeq_homotopy.secant.InverseBroyden` does.

    Example:
        >>> A = torch.tensor([[0.5, 2.0], [0.0, 3.0]]); b = torch.ones(1, 2)
        >>> f = lambda z: z @ A.T + b                    # expansive: iteration diverges
        >>> model = StepBroyden(b[:, None] * 0, f(b * 0)[:, None], columns=8)
        >>> for _ in range(5):
        ...     z = model.next_point(); model.observe(z, f(z))
        >>> torch.allclose(z, f(z), atol=1e-5)
        True
        >>> StepBroyden(torch.zeros(1, 1, 3), torch.ones(1, 1, 3), columns=4).next_point()
        tensor([[1., 1., 1.]])
    """

    def __init__(self, X: Tensor, F: Tensor, columns: int) -> None:
        rows, cols, n = X.shape[0], max(columns, 1), X.shape[2]
        # Step columns are written by :meth:`observe` before they are read; T' is read
        # whole (its upper triangle zero).
        self._S = X.new_empty(rows, cols, n)
        self._T = torch.zeros(rows, cols, cols, dtype=_wide(X.dtype, X.device),
                              device=X.device)                              # T diag(w)
        self.pairs = X.shape[1] - 1     # columns of W_0 − I = C0ᵀ D0
        self._C0, self._D0 = compact_inverse(X, F) if self.pairs else (None, None)
        self.k = 0                      # factors so far; the last step is column k
        # the last point reached whose step was finite (frozen rows stay there)
        self._z = X[:, -1].clone()
        self._S[:, 0] = self._apply_w0(F[:, -1] - X[:, -1])

    # ---------------------------------------------------------------- views
    def next_point(self) -> Tensor:
        """Broyden's next iterate z + s, s = W (f(z) − z), from the last recorded point."""
        return self._z + self._S[:, self.k]

    # ---------------------------------------------------------------- products
    def _apply_w0(self, r: Tensor) -> Tensor:
        """W_0 r = r + C0ᵀ (D0 r): with one pair, r + c (dᵀ r) by elementwise products
        (batched products of these shapes, on a view of one column, took 4–12× the time on
        CPU: 22 against 89 µs at 32 × 256, 0.23 against 2.9 ms at 64 × 12,544)."""
        if self.pairs == 0:
            return r
        if self.pairs == 1:
            c, d = self._C0[:, 0], self._D0[:, 0]
            return torch.addcmul(r, c, (d * r).sum(dim=1, keepdim=True))
        r_row = r[:, None]
        return torch.baddbmm(r_row, torch.bmm(r_row, self._D0.mT), self._C0).squeeze(1)

    # ---------------------------------------------------------------- updates
    def observe(self, z: Tensor, fz: Tensor) -> None:
        """Record f at the point the last step reached and take the next step:

            u = W_k g₊ = v + A c,  v = W_0 g₊,  c = T' (Sᵀ v),     β = s_kᵀ u = s_kᵀ v + r (Sᵀ v),
            s_{k+1} = u ‖s_k‖² / (‖s_k‖² − β),          T'_k· = w_k r,   r = (s_kᵀ A) T',

        (S = [s_0 … s_{k−1}]) from one product of the stored steps with [v, s_k], and one each
        of T' with Sᵀ v and with Aᵀ s_k. Where the denominator vanishes
        (|‖s_k‖² − β| <= eps ‖s_k‖²) the update is skipped (w_k = 0, s_{k+1} = u); a row whose
        last step was zero (frozen: ‖s_k‖² = β = 0) steps 0; a row whose step is not finite
        (f(z) was not, or the step overflowed) stays at its last point with a zero step,
        frozen from then on.

        Each line below is one or two operations: at the small states of a training
        forward a step's time is the number of operations, not their size (16 × 4 × 4
        states at batch 64 on the CI machine: about 5 µs each).
        """
        k = self.k
        if k + 1 >= self._S.shape[1]:
            self._grow()
        steps = self._S[:, :k + 1]
        wide = self._T.dtype
        v = self._apply_w0(fz - z)
        # [vᵀ; s_kᵀ] [s_0 … s_k], (rows, k + 1) each: one read of the stored steps
        sv, ss = torch.bmm(torch.stack([v, steps[:, k]], dim=1), steps.mT).to(wide).unbind(1)
        norm_sq = ss[:, k]
        if k > 0:
            T = self._T[:, :k, :k]
            c = torch.bmm(sv[:, None, :k], T.mT)                  # (T' Sᵀ v)ᵀ, (rows, 1, k)
            r = torch.bmm(ss[:, None, 1:], T)                     # s_kᵀ A T', (rows, 1, k)
            u = torch.baddbmm(v[:, None], c.to(v.dtype), steps[:, 1:]).squeeze(1)   # v + A c
            beta = torch.baddbmm(sv[:, k, None, None], r, sv[:, :k, None]).view(-1)
        else:
            u, beta = v, sv[:, k]
        denom = norm_sq - beta
        # frozen rows: ‖s_k‖² = β = 0, never regular, and sign(0) = 0 freezes them again
        regular = denom.abs() > torch.finfo(z.dtype).eps * norm_sq
        scale = torch.where(regular, norm_sq / denom, norm_sq.sign())
        step = u * scale.to(u.dtype)[:, None]
        ok = finite_rows(step)
        step.masked_fill_(~ok[:, None], 0.0)
        # factor k: a = s_{k+1}, b = w_k s_k (w_k = 0 where the update is skipped)
        w_k = norm_sq.reciprocal().masked_fill_(~(regular & ok), 0.0)
        if k > 0:
            self._T[:, k, :k] = r.squeeze(1) * w_k[:, None]
        self._T[:, k, k] = w_k
        self._S[:, k + 1] = step
        self.k = k + 1
        self._z = torch.where(ok[:, None], z, self._z)

    # ---------------------------------------------------------------- buffers
    def _grow(self) -> None:
        """Twice the columns (only when more steps come than ``columns`` allowed for)."""
        cols = self._S.shape[1]
        S = self._S.new_empty(self._S.shape[0], 2 * cols, self._S.shape[2])
        S[:, :cols] = self._S
        T = self._T.new_zeros(self._T.shape[0], 2 * cols, 2 * cols)
        T[:, :cols, :cols] = self._T
        self._S, self._T = S, T
