"""A limited-memory secant model of J_f per sample, and bordered solves through it.

The model is a low-rank matrix per sample (Allgower & Georg, *Introduction to Numerical
Continuation Methods*, ch. 7; the factors TorchDEQ's Broyden keeps, in direct form)::

    J_f ≈ B = U Vᵀ,        U, V: (batch, n, m),   B₀ = 0,

so that ∂H/∂z = I − s B (s = λ for the fixed-point homotopy, 1 for the Newton one)
is the identity plus a rank-m term. Two kinds of secant pairs (s, y ≈ J_f s) refine it:

* a step of the iterate, s = z₊ − z, y = f(z₊) − f(z): Broyden's "good" update
  B ← B + (y − B s) sᵀ / (sᵀ s)        (:meth:`LowRankJacobian.observe`);
* exact Jacobian-vector products (s_j, J s_j), j = 1..k, from a Krylov solve: after
  orthonormalising S = Q R and Y' = Y R⁻¹ (so Y' = J Q), the block update
  B ← B + (Y' − B Q) Qᵀ makes B Q = J Q on the whole span   (:meth:`LowRankJacobian.absorb`).

Each update writes columns into per-sample cyclic slots: when all m slots are in use the
oldest column is dropped, as in TorchDEQ's Broyden (its ``LBFGS_thres``). The Gram matrix
G = Vᵀ U is kept current column by column, so a solve costs O(n m + m³) per sample and
never O(n m²).

Bordered solves. With border row (t_z, t_λ), ∂H/∂λ = h and s the Jacobian scale, the
bordered matrix of the path tracker is the identity plus a rank-(m + 2) term::

    M = [I − s U Vᵀ   h ]  =  I + P Qᵀ,   P = [−s U  h  0]    Q = [V  0  t_z      ]
        [t_zᵀ        t_λ]                     [ 0    0  1],       [0  1  t_λ − 1  ],

so by Woodbury M⁻¹ r = r − P (I + QᵀP)⁻¹ Qᵀ r, where the capacitance matrix is

    K = I + QᵀP = [I − s G   Vᵀ h    0 ]
                  [0         1       1 ]
                  [−s t_zᵀU  t_zᵀ h  t_λ].

K is singular exactly when M is, so the solve stays regular at turning points of the
path, where I − s B is singular. At λ = 1 with border e_λ this is Broyden's step.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .linalg import bmv, finite_rows, lu_factor

Tensor = torch.Tensor


class LowRankJacobian:
    """Per-sample low-rank secant model J_f ≈ U Vᵀ with cyclic memory of ``rank`` columns.

    Args:
        bsz, n: batch size and state size.
        rank: columns kept per sample (m); the oldest is dropped when all are in use.
        dtype, device: of the factors.

    Example:
        >>> A = torch.tensor([[0.5, 2.0], [0.0, 3.0]])
        >>> model = LowRankJacobian(1, 2, rank=4, dtype=A.dtype, device=A.device)
        >>> S = torch.eye(2)[None]                    # two exact products J e_1, J e_2
        >>> model.absorb(S, (A @ S[0])[None])
        >>> torch.allclose(model.matvec(torch.tensor([[1.0, 1.0]])), torch.tensor([[2.5, 3.0]]))
        True
    """

    def __init__(self, bsz: int, n: int, rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.rank = rank
        self.U = torch.zeros(bsz, n, rank, dtype=dtype, device=device)
        self.V = torch.zeros(bsz, n, rank, dtype=dtype, device=device)
        self.gram = torch.zeros(bsz, rank, rank, dtype=dtype, device=device)   # G = Vᵀ U
        self.next_slot = torch.zeros(bsz, dtype=torch.long, device=device)
        self._z: Tensor | None = None
        self._fz: Tensor | None = None

    # ---------------------------------------------------------------- products
    def matvec(self, v: Tensor) -> Tensor:
        """B v = U (Vᵀ v), rows independent, ``(B, n) -> (B, n)``."""
        return bmv(self.U, bmv(self.V.mT, v))

    # ---------------------------------------------------------------- updates
    def _write(self, cols_u: Tensor, cols_v: Tensor, valid: Tensor) -> None:
        """Write column j of ``cols_u``/``cols_v`` ``(B, n, k)`` into the next cyclic slot of
        every sample with ``valid[:, j]`` (a prefix per sample), and update G = Vᵀ U."""
        k = cols_u.shape[2]
        if k > self.rank:        # keep the newest columns only
            cols_u, cols_v, valid = cols_u[..., -self.rank:], cols_v[..., -self.rank:], \
                valid[:, -self.rank:]
            k = self.rank
        count = valid.long().sum(dim=1)                                  # (B,)
        offsets = torch.arange(k, device=valid.device)
        slots = (self.next_slot[:, None] + offsets) % self.rank           # (B, k)
        # Invalid columns write nothing: their slot index points at a scratch column.
        slots = torch.where(valid, slots, torch.full_like(slots, self.rank))
        pad = torch.zeros_like(self.U[..., :1])
        U = torch.cat([self.U, pad], dim=2)
        V = torch.cat([self.V, pad], dim=2)
        index = slots[:, None, :].expand(-1, U.shape[1], -1)
        U.scatter_(2, index, cols_u)
        V.scatter_(2, index, cols_v)
        self.U, self.V = U[..., : self.rank].contiguous(), V[..., : self.rank].contiguous()
        self.next_slot = (self.next_slot + count) % self.rank
        # G = Vᵀ U: recompute the rows and columns of the written slots (O(n m k)).
        rows = torch.bmm(cols_v.transpose(1, 2), self.U)                  # (B, k, m)
        cols = torch.bmm(cols_u.mT, self.V).mT             # Vᵀ cols_u, (B, m, k), row form
        gram = torch.cat([self.gram, torch.zeros_like(self.gram[:, :1])], dim=1)
        gram.scatter_(1, slots[:, :, None].expand(-1, -1, self.rank), rows)
        gram = torch.cat([gram[:, : self.rank], torch.zeros_like(gram[:, : self.rank, :1])],
                         dim=2)
        gram.scatter_(2, slots[:, None, :].expand(-1, self.rank, -1), cols)
        self.gram = gram[..., : self.rank].contiguous()

    def observe(self, z: Tensor, fz: Tensor) -> None:
        """Record an evaluation; for every sample that moved since the last one, Broyden's
        good update with s = z − z_prev, y = f(z) − f(z_prev):

            B ← B + (y − B s) sᵀ / (sᵀ s).

        Samples whose step is zero (frozen) or not finite keep their model; the recorded
        point advances wherever f(z) is finite.
        """
        if self._z is None:
            self._z, self._fz = z.clone(), fz.clone()
            return
        s, y = z - self._z, fz - self._fz
        s_sq = (s * s).sum(dim=1)
        finite = finite_rows(fz)
        ok = (s_sq > torch.finfo(z.dtype).tiny) & torch.isfinite(s_sq) & finite
        s = torch.where(ok[:, None], s, torch.zeros_like(s))
        y = torch.where(ok[:, None], y, torch.zeros_like(y))
        u = (y - self.matvec(s)) / torch.where(ok, s_sq, torch.ones_like(s_sq))[:, None]
        self._write(u[..., None], s[..., None], ok[:, None])
        self._z = torch.where(finite[:, None], z, self._z)
        self._fz = torch.where(finite[:, None], fz, self._fz)

    def absorb(self, S: Tensor, Y: Tensor, tol: float = 1e-6) -> None:
        """Make B agree with exact products Y = J S on span(S), per sample.

        ``S``, ``Y``: ``(B, n, k)``. With S = Q R (reduced QR) and Y' = Y R⁻¹,

            B ← B + (Y' − B Q) Qᵀ,

        so that afterwards B Q = Y' = J Q. Columns after the first with
        |R_jj| <= ``tol`` · ||s_j|| (zero or dependent products) are ignored; of more than
        ``rank`` columns, each sample keeps its newest ``rank`` nonzero ones.
        """
        S, Y = self._newest_products(S, Y)
        Q, R = torch.linalg.qr(S)
        diag = R.diagonal(dim1=1, dim2=2).abs()                           # (B, k)
        valid = torch.cumprod((diag > tol * S.norm(dim=1)).to(torch.int8), dim=1).bool()
        eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
        R_safe = torch.where(valid[:, None, :] & valid[:, :, None], R, eye)
        # Y' R = Y on the valid block: Y'ᵀ = solve(Rᵀ, Yᵀ) (upper-triangular R).
        Y_masked = torch.where(valid[:, None, :], Y, torch.zeros_like(Y))
        Yq = torch.linalg.solve_triangular(R_safe, Y_masked, upper=True, left=False)
        Q = torch.where(valid[:, None, :], Q, torch.zeros_like(Q))
        BQ = torch.bmm(self.U, torch.bmm(Q.mT, self.V).mT)               # U (Vᵀ Q)
        self._write(Yq - BQ, Q, valid)

    def _newest_products(self, S: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
        """At most ``rank`` columns per sample (and at most n, the most that can be
        independent: GMRES on the bordered system of n + 1 unknowns may make n + 1 products),
        its newest nonzero products. A sample's nonzero products come first (a row whose
        Krylov solve stopped early multiplies zeros from then on), so its newest m of them
        (m = min(``rank``, n)) are the columns [c − m, c) of its count c; they are gathered
        to the front. Keeping the batch's last m columns instead would keep mostly zeros
        for a row that stopped early, and drop its products from the model."""
        k, limit = S.shape[2], min(self.rank, S.shape[1])   # at most n independent columns
        if k <= limit:
            return S, Y
        count = (S.norm(dim=1) > 0).long().sum(dim=1)                    # (B,)
        first = (count - limit).clamp_min(0)
        index = first[:, None] + torch.arange(limit, device=S.device)    # (B, limit) < k
        index = index[:, None, :].expand(-1, S.shape[1], -1)
        return S.gather(2, index), Y.gather(2, index)

    # ---------------------------------------------------------------- solves
    def solve_bordered(self, scale: Tensor, h_lam: Tensor, border: Tensor,
                       rhs: Tensor) -> tuple[Tensor, Tensor]:
        """Solve [I − s B, h; borderᵀ] x = rhs for every row by Woodbury (module docstring).

        Args:
            scale: s per sample ``(B,)`` (λ for the fixed-point homotopy).
            h_lam: ∂H/∂λ, ``(B, n)``.
            border: the border row (t_z, t_λ), ``(B, n + 1)``.
            rhs: ``(B, n + 1)``.

        Returns:
            ``(x, ok)``: the solutions and a mask of rows with a regular capacitance
            matrix and finite values (other rows are zero).
        """
        return self.factor_bordered(scale, h_lam, border)(rhs)

    def factor_bordered(self, scale: Tensor, h_lam: Tensor,
                        border: Tensor) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        """LU-factor the capacitance matrix K once; returns ``rhs -> (x, ok)`` as
        :meth:`solve_bordered`, O(n m + m²) per right-hand side."""
        m = self.rank
        t_z, t_lam = border[:, :-1], border[:, -1]
        s = scale[:, None]
        Vt = self.V.transpose(1, 2)
        bsz = border.shape[0]
        K = border.new_zeros(bsz, m + 2, m + 2)
        K[:, :m, :m] = torch.eye(m, dtype=K.dtype, device=K.device) - s[:, :, None] * self.gram
        K[:, :m, m] = bmv(Vt, h_lam)
        K[:, m, m] = 1.0
        K[:, m, m + 1] = 1.0
        K[:, m + 1, :m] = -s * torch.bmm(t_z.unsqueeze(1), self.U).squeeze(1)
        K[:, m + 1, m] = (t_z * h_lam).sum(dim=1)
        K[:, m + 1, m + 1] = t_lam
        K = torch.nan_to_num(K, nan=0.0, posinf=0.0, neginf=0.0)
        lu, pivots, info = lu_factor(K)
        regular = info == 0
        U = self.U

        def solve(rhs: Tensor) -> tuple[Tensor, Tensor]:
            r_z, r_lam = rhs[:, :-1], rhs[:, -1]
            q_r = torch.cat([bmv(Vt, r_z), r_lam[:, None],
                             ((t_z * r_z).sum(dim=1) + (t_lam - 1) * r_lam)[:, None]], dim=1)
            c = torch.linalg.lu_solve(lu, pivots, q_r.unsqueeze(-1)).squeeze(-1)
            # x = r − P c:  x_z = r_z + s U c_U − h c_h,  x_λ = r_λ − c_e
            x_z = r_z + s * bmv(U, c[:, :m]) - h_lam * c[:, m:m + 1]
            x = torch.cat([x_z, (r_lam - c[:, m + 1])[:, None]], dim=1)
            ok = regular & finite_rows(x)
            return torch.where(ok[:, None], x, torch.zeros_like(x)), ok

        return solve


def _wide(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """float64 for sums that cancel, where the device has it (not MPS); else ``dtype``.

    Example:
        >>> _wide(torch.float32, torch.device('cpu'))
        torch.float64
    """
    return dtype if device.type == "mps" else torch.promote_types(dtype, torch.float64)


def compact_inverse(X: Tensor, F: Tensor) -> tuple[Tensor, Tensor]:
    """W = A_k⁻¹ after k good Broyden updates of A = I − J_f from A_0 = I with the
    secant pairs of the iterates x_0..x_k ``X`` ``(B, k + 1, n)`` and their images ``F``,
    at once. With S = [x_1 − x_0, …] and ΔF = [f(x_1) − f(x_0), …], the pairs of A are
    (S, S − ΔF), and k good updates have the compact form (Byrd, Nocedal & Schnabel
    1994, "Representations of quasi-Newton matrices", sec. 6)

        A_k = I + ((S − ΔF) − S) N⁻¹ Sᵀ = I − ΔF N⁻¹ Sᵀ,     N = triu(Sᵀ S),

    so by Woodbury W = I + ΔF M⁻¹ Sᵀ with M = N − Sᵀ ΔF, where sequential updates take
    k passes (used by :class:`~torchdeq_homotopy.step_broyden.StepBroyden`).

    Returns ``(Ct, St)``, both ``(B, k, n)``: Cᵀ = M⁻ᵀ ΔFᵀ and Sᵀ, so W r = r + C (Sᵀ r).
    The k × k products and M⁻¹ are formed in float64 (:func:`_wide`); rows where M is
    singular or anything is not finite get zeros (W = I).

    Example:
        >>> X = torch.tensor([[[0.0], [1.0]]]); F = 0.5 * X + 1     # f(z) = z / 2 + 1
        >>> Ct, St = compact_inverse(X, F)
        >>> 1 + (Ct * St).sum().item()                 # W = (1 − 1/2)⁻¹ = 2
        2.0
    """
    wide = _wide(X.dtype, X.device)
    St, dFt = X[:, 1:] - X[:, :-1], F[:, 1:] - F[:, :-1]                # (B, k, n)
    St_w, dFt_w = St.to(wide), dFt.to(wide)
    M = torch.triu(St_w @ St_w.transpose(1, 2)) - St_w @ dFt_w.transpose(1, 2)
    lu, pivots, info = lu_factor(torch.nan_to_num(M))
    eye = torch.eye(M.shape[-1], dtype=wide, device=M.device).expand_as(M)
    M_inv_t = torch.linalg.lu_solve(lu, pivots, eye, adjoint=True)      # M⁻ᵀ
    Ct = torch.bmm(M_inv_t.to(X.dtype), dFt)                            # Cᵀ = M⁻ᵀ ΔFᵀ
    ok = (info == 0) & finite_rows(M_inv_t) & finite_rows(Ct) & finite_rows(St)
    return (torch.where(ok[:, None, None], Ct, torch.zeros_like(Ct)),
            torch.where(ok[:, None, None], St, torch.zeros_like(St)))


class InverseBroyden:
    """Broyden's good method at λ = 1 in inverse form, as TorchDEQ's ``broyden`` keeps it.

    The model is W ≈ (I − J_f)⁻¹ = I + C Dᵀ (C, D: ``(B, n, k)``), so a step costs O(n k)
    with no factorisation:

        δ = W (f(z) − z),        z ← z + δ.

    After a step s = Δz with y = Δf and Δg = y − s, Broyden's good update of J_f
    (B ← B + (y − B s) sᵀ / sᵀs), carried to the inverse by Sherman–Morrison, is

        W ← W − (s + W Δg) (Wᵀ s)ᵀ / (sᵀ W Δg),

    one column pair (c, d) = (−(s + W Δg) / (sᵀ W Δg), Wᵀ s) per step. From W = I the
    iterates are those of TorchDEQ's ``broyden_solver`` (without line search). Up to
    ``memory`` pairs are kept per sample, the oldest overwritten after that (TorchDEQ's
    ``LBFGS_thres``); the buffers grow as pairs arrive.

    With ``merge=True`` (for a memory that drops nothing) the pairs are merged once 2n are
    held: C Dᵀ is an n × n matrix however many pairs make it, so

        C ← C Dᵀ,   D ← I,

    is exact and leaves n columns. A product with W then never costs more than O(n²) per
    sample, where k pairs cost O(n k) and k grows with the budget.

    Example:
        >>> A = torch.tensor([[0.5, 2.0], [0.0, 3.0]]); b = torch.ones(1, 2)
        >>> f = lambda z: z @ A.T + b                    # expansive: iteration diverges
        >>> model, z = InverseBroyden(1, 2, memory=10, dtype=A.dtype, device=A.device), b * 0
        >>> for _ in range(6):
        ...     _ = model.observe(z, f(z)); z = z + model.step()
        >>> torch.allclose(z, f(z), atol=1e-5)
        True
    """

    def __init__(self, bsz: int, n: int, memory: int, dtype: torch.dtype,
                 device: torch.device, merge: bool = False) -> None:
        self.memory = memory
        # at most 2n columns before a merge (a merge needs memory above n to leave room)
        self.columns = min(memory, 2 * n) if merge and memory > n else memory
        self.C = torch.zeros(bsz, n, 0, dtype=dtype, device=device)
        self.Dt = torch.zeros(bsz, 0, n, dtype=dtype, device=device)      # Dᵀ, rows contiguous
        self._written = 0              # pairs written (zero pairs where an update was skipped)
        self._z: Tensor | None = None
        self._step: Tensor | None = None   # W (f(z) − z) at the recorded point
        # :meth:`restart` (accelerators): each column's write number, the first write
        # number that counts, and whether the next evaluation starts afresh
        self._restartable = False
        self._writes = 0
        self._stamps = torch.zeros(0, dtype=torch.long, device=device)
        self._counts_from = torch.zeros((), dtype=torch.long, device=device)
        self._fresh = torch.zeros((), dtype=torch.bool, device=device)
        self._in_use: tuple = ()

    def _used(self) -> tuple[Tensor, Tensor]:
        """C and Dᵀ over the columns written so far; the views are kept until a write or
        new buffers change them (two slices fewer per product, each a few µs: the cost of
        a small state's whole product)."""
        k = min(self._written, self.C.shape[2])
        cached = self._in_use
        if not cached or cached[0] is not self.C or cached[1] is not self.Dt or cached[2] != k:
            self._in_use = cached = (self.C, self.Dt, k, self.C[..., :k], self.Dt[:, :k])
        return cached[3], cached[4]

    def _counting(self, k: int) -> Tensor | None:
        """Which of the first k columns count (written since the last :meth:`restart`),
        as a ``(k,)`` 0/1 mask; None while the model was never restarted (all count)."""
        if not self._restartable:
            return None
        return (self._stamps[:k] >= self._counts_from).to(self.C.dtype)

    def apply(self, r: Tensor) -> Tensor:
        """W r = r + C (Dᵀ r)."""
        C, Dt = self._used()
        coeffs = bmv(Dt, r)
        counting = self._counting(C.shape[2])
        if counting is not None:
            coeffs = coeffs * counting
        return r + bmv(C, coeffs)

    def apply_t(self, r: Tensor) -> Tensor:
        """Wᵀ r = r + D (Cᵀ r)."""
        C, Dt = self._used()
        coeffs = torch.bmm(r.unsqueeze(1), C)
        counting = self._counting(C.shape[2])
        if counting is not None:
            coeffs = coeffs * counting
        return r + coeffs.matmul(Dt).squeeze(1)

    def restart(self, when: Tensor) -> None:
        """Start afresh if ``when`` (a 0-dim bool on the model's device) holds, as a new
        model would: W = I (the pairs written so far stop counting), and the next
        evaluation is recorded as the start, with no pair across the gap to it. It reads
        nothing on the host: on accelerators the model lives on through iterations in
        which no sample is in its phase (no read tells), and a return to the phase then
        starts from W = I, as on CPU, where the model is dropped meanwhile.

        Example:
            >>> model = InverseBroyden(1, 2, memory=8, dtype=torch.float32, device='cpu')
            >>> for z in ([0.0, 0.0], [1.0, 0.5]):
            ...     _ = model.observe(torch.tensor([z]), torch.tensor([[2.0, 1.0]]))
            >>> model.restart(torch.tensor(True))
            >>> _ = model.observe(torch.zeros(1, 2), torch.tensor([[3.0, 4.0]]))
            >>> model.step()                     # W = I again: the fixed-point step
            tensor([[3., 4.]])
        """
        # columns are stamped from the first restart on; those written before hold 0,
        # below any write number a restart sets (and all count while none did)
        self._restartable = True
        # a fill, not a copy from the host (which would wait for the device's queue)
        writes = torch.full((), self._writes, dtype=torch.long, device=self._fresh.device)
        self._counts_from = torch.where(when, writes, self._counts_from)
        self._fresh = self._fresh | when

    def step(self) -> Tensor:
        """Broyden's step δ = W (f(z) − z) at the last recorded point (computed by
        :meth:`observe`, so a step costs no further product with the factors)."""
        return self._step

    def observe(self, z: Tensor, fz: Tensor) -> Tensor:
        """Record an evaluation and apply the good update to samples that moved since the
        last one (a zero or non-finite step, or a vanishing denominator, skips it).
        Returns the rows where f(z) is finite.

        One product with W and one with Wᵀ per call: with g = f(z) − z and the stored
        W g_prev, W Δg = W g − W g_prev, and after the update W₊ g = W g + c (dᵀ g).
        Once ``memory`` pairs are held, the new pair replaces the oldest, (c_o, d_o):
        W₊ = W − c_o d_oᵀ + c dᵀ, so W₊ g = W g − c_o (d_oᵀ g) + c (dᵀ g).
        """
        g = fz - z
        w_g = self.apply(g)
        finite = finite_rows(fz)
        if self._z is None:
            self._z, self._step = z.clone(), w_g
            return finite
        s = z - self._z
        w_dg = w_g - self._step
        denom = (s * w_dg).sum(dim=1)
        # s = 0 gives denom = 0, which the first test rejects
        ok = (denom.abs() > torch.finfo(z.dtype).tiny) & torch.isfinite(denom) & finite
        if self._restartable:            # a fresh start records z, as a new model's first call
            fresh = self._fresh
            ok = ok & ~fresh
            self._z = torch.where(fresh, z, self._z)
            self._step = torch.where(fresh, w_g, self._step)
            self._fresh = torch.zeros_like(fresh)
        safe = torch.where(ok, denom, 1.0)[:, None]
        ok = ok[:, None]
        c = torch.where(ok, -(s + w_dg) / safe, 0.0)
        d = torch.where(ok, self.apply_t(s), 0.0)
        if self._written >= self.memory:                 # the oldest pair goes
            w_g = w_g - self._oldest_term(g)
        w_g = w_g + c * (d * g).sum(dim=1, keepdim=True)
        self._write(c, d)
        self._z = torch.where(finite[:, None], z, self._z)
        self._step = torch.where(finite[:, None], w_g, self._step)
        return finite

    def _oldest_term(self, g: Tensor) -> Tensor:
        """c_o (d_oᵀ g) for the pair that the next write replaces (memory full)."""
        slot = self._written % self.memory
        term = self.C[..., slot] * (self.Dt[:, slot] * g).sum(dim=1, keepdim=True)
        counting = self._counting(slot + 1)
        return term if counting is None else term * counting[slot]

    def _write(self, c: Tensor, d: Tensor) -> None:
        """Store the pair (c, d) of every sample in column ``written mod memory``, in place,
        as TorchDEQ's ``broyden`` stores its pairs (``(nstep − 1) % LBFGS_thres``): one
        column for the whole batch, zero for samples whose update was skipped (W
        unchanged), so the write is two plain copies and every product runs over the same
        columns. Past ``columns`` pairs the buffers are merged (``merge=True``)."""
        capacity = self.C.shape[2]
        if self._written >= capacity:
            if capacity < self.columns:
                self._grow(min(max(4, capacity), self.columns - capacity))
            elif self.columns < self.memory:
                self._merge()
        slot = self._written % self.memory
        self.C[..., slot] = c
        self.Dt[:, slot] = d
        if self._restartable:
            self._stamps[slot] = self._writes
        self._written += 1
        self._writes += 1

    def _grow(self, extra: int) -> None:
        """``extra`` more columns (doubling from 4: amortised O(1) copies per pair, and a
        short Broyden phase on a large batch allocates only what it uses)."""
        self.C = torch.cat([self.C, self.C.new_zeros(*self.C.shape[:2], extra)], dim=2)
        self.Dt = torch.cat([self.Dt, self.Dt.new_zeros(self.Dt.shape[0], extra,
                                                        self.Dt.shape[2])], dim=1)
        self._stamps = torch.cat([self._stamps, self._stamps.new_zeros(extra)])

    def _merge(self) -> None:
        """C ← C Dᵀ (n × n per sample), D ← I: the same W in n columns, the other n
        columns free again (samples that skipped updates hold zero columns, which the
        product leaves out).

        The product is summed in float64 (:func:`_wide`) and rounded once: on
        near-singular Jacobians the factors grow large with cancelling terms (on a
        128-wide tanh cell at ‖W‖₂ = 6, entries of C and D up to 1e4 and 1e7 where those
        of C Dᵀ stay near 10), and a float32 sum of 2n rank-one terms loses the model:
        Broyden's steps then stalled on samples that TorchDEQ's ``broyden`` solves."""
        C, Dt = self._used()
        n = C.shape[1]
        wide = _wide(C.dtype, C.device)
        counting = self._counting(C.shape[2])
        if counting is not None:            # only the pairs since the last restart
            C = C * counting
        merged = torch.bmm(C.to(wide), Dt.to(wide)).to(C.dtype)
        self.C.zero_()
        self.Dt.zero_()
        self.C[..., :n] = merged
        self.Dt[:, :n] = torch.eye(n, dtype=C.dtype, device=C.device)
        if self._restartable:
            self._stamps[:n] = self._writes  # the merged columns count from here on
        self._written = n
