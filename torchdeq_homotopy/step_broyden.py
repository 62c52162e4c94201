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
Broyden phase whose rows start fresh (each from its own W_0, :meth:`StepBroyden.append`) and
never drop a pair: the warm-up's switch at training budgets
(:class:`~torchdeq_homotopy.warmup.AndersonIteration`).
"""
from __future__ import annotations

import torch

from .linalg import finite_rows
from .secant import _wide, compact_inverse

Tensor = torch.Tensor


class StepBroyden:
    """Broyden's good method for rows that join at any step, storing the steps only.

    Args:
        n: state size.
        columns: steps held before the buffers grow (one per :meth:`observe`, plus the
            first); size it to the calls left and nothing is ever copied.
        dtype, device: of the steps.
        capacity: rows to allocate for, so that :meth:`append` adds rows in place.
        seed_width: most secant pairs an :meth:`append` brings (the columns of W_0 − I).

    Rows where f is not finite are frozen at their last finite point (step 0) and keep no
    further factors; a vanishing denominator ‖s‖² − sᵀu skips the update for that step
    (W₊ = W, s₊ = W g₊), as :class:`~torchdeq_homotopy.secant.InverseBroyden` does.

    Example:
        >>> A = torch.tensor([[0.5, 2.0], [0.0, 3.0]]); b = torch.ones(1, 2)
        >>> f = lambda z: z @ A.T + b                    # expansive: iteration diverges
        >>> model = StepBroyden(2, columns=8, dtype=A.dtype, device=A.device)
        >>> model.append(b[:, None] * 0, f(b * 0)[:, None])
        >>> for _ in range(5):
        ...     z = model.next_point(); model.observe(z, f(z))
        >>> torch.allclose(z, f(z), atol=1e-5)
        True
    """

    def __init__(self, n: int, columns: int, dtype: torch.dtype, device: torch.device,
                 capacity: int = 0, seed_width: int = 0) -> None:
        device = torch.device(device)
        wide = _wide(dtype, device)
        cols = max(columns, 1)
        # Left unset: :meth:`append` zeroes a row's T, W_0 and earlier steps as it comes
        # into use, and :meth:`observe` writes each step column for every row in use, so
        # nothing unwritten is read, and rows that never switch cost no memory traffic.
        # W_0's factors beyond a row's own secant pairs are zero; ``pairs`` is the most
        # any row brought (a batch that switches after one step brings one).
        self._S = torch.empty(capacity, cols, n, dtype=dtype, device=device)
        self._T = torch.empty(capacity, cols, cols, dtype=wide, device=device)   # T diag(w)
        self._C0 = torch.empty(capacity, seed_width, n, dtype=dtype, device=device)  # W_0 =
        self._D0 = torch.empty(capacity, seed_width, n, dtype=dtype, device=device)  # I + C0ᵀD0
        self.rows = 0
        self.pairs = 0                  # columns of C0, D0 in use
        self.k = 0                      # factors so far; the last step is column k
        # the last point reached whose step was finite (frozen rows stay there)
        self._z = torch.empty(0, n, dtype=dtype, device=device)

    # ---------------------------------------------------------------- views
    def next_point(self) -> Tensor:
        """Broyden's next iterate z + s, s = W (f(z) − z), from the last recorded point."""
        return self._z + self._S[:self.rows, self.k]

    # ---------------------------------------------------------------- products
    def _apply_w0(self, r: Tensor, rows: slice | None = None) -> Tensor:
        """W_0 r = r + C0ᵀ (D0 r), over the rows in use or ``rows``: with one pair in use,
        r + c (dᵀ r) by elementwise products (batched products of these shapes, on a view
        of one column, took 4–12× the time on CPU: 22 against 89 µs at 32 × 256, 0.23
        against 2.9 ms at 64 × 12,544); else over all the columns, unused ones zero."""
        if self.pairs == 0:
            return r
        rows = slice(0, self.rows) if rows is None else rows
        if self.pairs == 1:
            c, d = self._C0[rows, 0], self._D0[rows, 0]
            return torch.addcmul(r, c, (d * r).sum(dim=1, keepdim=True))
        r_row = r[:, None]
        return torch.baddbmm(r_row, torch.bmm(r_row, self._D0[rows].mT), self._C0[rows]).squeeze(1)

    # ---------------------------------------------------------------- updates
    def append(self, X: Tensor, F: Tensor) -> None:
        """Rows that start Broyden's method now, at the last of their iterates ``X``
        ``(r, j + 1, n)`` with images ``F``: W_0 = the good updates of W = I with their j
        secant pairs, in the compact form of
        :func:`~torchdeq_homotopy.secant.compact_inverse` (W_0 = I for j = 0), and their
        first step s = W_0 (f(z) − z), placed at column k so that they take the next
        factor with the rows already here (their earlier columns hold zero steps:
        identity factors). Rows beyond the ``capacity`` grow the buffers.

        Example:
            >>> f = lambda z: 0.5 * z + 1
            >>> model = StepBroyden(3, columns=4, dtype=torch.float32, device='cpu')
            >>> model.append(torch.zeros(1, 1, 3), torch.ones(1, 1, 3))
            >>> model.next_point()                       # f(0) − 0 = 1: a fixed-point step
            tensor([[1., 1., 1.]])
        """
        rows, extra, k, pairs = self.rows, X.shape[0], self.k, X.shape[1] - 1
        if pairs > self._C0.shape[1]:
            raise ValueError(f"append brings {pairs} secant pairs; allocate seed_width={pairs}")
        if self._S.shape[0] < rows + extra:
            self._reserve(rows + extra)
        new = slice(rows, rows + extra)
        self.pairs = max(self.pairs, pairs)
        if pairs < self._C0.shape[1]:
            self._C0[new, pairs:] = 0
            self._D0[new, pairs:] = 0
        if pairs > 0:
            self._C0[new, :pairs], self._D0[new, :pairs] = compact_inverse(X, F)
        self._T[new] = 0
        if k > 0:
            self._S[new, :k] = 0
        self.rows = rows + extra
        z, g = X[:, -1], F[:, -1] - X[:, -1]
        self._z = torch.cat([self._z, z])
        self._S[new, k] = self._apply_w0(g, new)

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
        k, rows = self.k, self.rows
        if k + 1 >= self._S.shape[1]:
            self._grow()
        steps = self._S[:rows, :k + 1]
        wide = self._T.dtype
        v = self._apply_w0(fz - z)
        # [vᵀ; s_kᵀ] [s_0 … s_k], (rows, k + 1) each: one read of the stored steps
        sv, ss = torch.bmm(torch.stack([v, steps[:, k]], dim=1), steps.mT).to(wide).unbind(1)
        norm_sq = ss[:, k]
        if k > 0:
            T = self._T[:rows, :k, :k]
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
            self._T[:rows, k, :k] = r.squeeze(1) * w_k[:, None]
        self._T[:rows, k, k] = w_k
        self._S[:rows, k + 1] = step
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

    def _reserve(self, rows: int) -> None:
        """Buffers for at least ``rows`` rows (twice the rows in use, at least)."""
        more = max(rows, 2 * self._S.shape[0]) - self._S.shape[0]

        def grown(buf: Tensor) -> Tensor:
            return torch.cat([buf, buf.new_empty(more, *buf.shape[1:])])

        self._S, self._T = grown(self._S), grown(self._T)
        self._C0, self._D0 = grown(self._C0), grown(self._D0)
