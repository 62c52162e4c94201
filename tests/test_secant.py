"""The secant linear solver: its low-rank model, Broyden phase and path, against independent
truth (dense Broyden, TorchDEQ's broyden, torch.linalg.solve, known equilibria)."""
import pytest
import torch
from torchdeq.solver import get_solver

import torchdeq_homotopy as th
from torchdeq_homotopy import Status
from torchdeq_homotopy.secant import InverseBroyden, LowRankJacobian
from torchdeq_homotopy.step_broyden import StepBroyden

F64 = torch.float64


def tanh_cell(bsz, n, gain, seed=0, bias=0.1, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=dtype)
    W = W / torch.linalg.matrix_norm(W, 2) * gain
    x = bias * torch.randn(bsz, n, generator=g, dtype=dtype)
    return lambda z: torch.tanh(z @ W.T + x)


def dense_broyden(f, z, steps):
    """Broyden's good method on z = f(z) with a dense model of J_f from B = 0."""
    return dense_broyden_after(f, z[:, None], steps)


def test_low_rank_model_reproduces_dense_broyden_iterates():
    f = tanh_cell(3, 9, 2.5, seed=1)
    z0 = torch.zeros(3, 9, dtype=F64)
    reference = dense_broyden(f, z0, 8)
    model = LowRankJacobian(3, 9, rank=16, dtype=F64, device="cpu")
    e_lam = torch.zeros(3, 10, dtype=F64)
    e_lam[:, -1] = 1
    z = z0
    for expected in reference:
        fz = f(z)
        model.observe(z, fz)
        rhs = torch.cat([fz - z, torch.zeros(3, 1, dtype=F64)], dim=1)
        step, ok = model.solve_bordered(torch.ones(3, dtype=F64), torch.zeros_like(z), e_lam, rhs)
        assert ok.all() and (step[:, -1] == 0).all()
        z = z + step[:, :-1]
        torch.testing.assert_close(z, expected, rtol=1e-10, atol=1e-10)


def test_inverse_broyden_reproduces_dense_broyden_and_torchdeq():
    f = tanh_cell(4, 12, 3.0, seed=2)
    z0 = torch.zeros(4, 12, dtype=F64)
    reference = dense_broyden(f, z0, 10)
    model = InverseBroyden(4, 12, memory=50, dtype=F64, device="cpu")
    z = z0
    for expected in reference:
        model.observe(z, f(z))
        z = z + model.step()
        torch.testing.assert_close(z, expected, rtol=1e-9, atol=1e-10)
    z_torchdeq, _, _ = get_solver("broyden")(f, z0, max_iter=10, tol=1e-30, return_final=True)
    torch.testing.assert_close(z, z_torchdeq, rtol=1e-9, atol=1e-10)


def test_inverse_broyden_with_limited_memory_matches_torchdeq_lbfgs_thres():
    """With fewer pairs kept than steps taken, the oldest pair is overwritten as TorchDEQ's
    ``broyden`` overwrites it (``LBFGS_thres``): the same iterates after the memory wraps
    twice, on a batch where the samples need different updates."""
    f = tanh_cell(3, 10, 4.0, seed=5)
    z0 = torch.zeros(3, 10, dtype=F64)
    model = InverseBroyden(3, 10, memory=4, dtype=F64, device="cpu")
    z = z0
    for _ in range(12):
        model.observe(z, f(z))
        z = z + model.step()
        assert model.C.shape[2] <= 4
    z_torchdeq, _, _ = get_solver("broyden")(f, z0, max_iter=12, tol=1e-30, return_final=True,
                                             LBFGS_thres=4)
    torch.testing.assert_close(z, z_torchdeq, rtol=1e-8, atol=1e-10)


def test_inverse_broyden_merges_its_pairs_exactly_past_2n():
    """Past 2n pairs the inverse model is merged into n columns (C Dᵀ, I): the iterates
    stay those of dense Broyden, and the buffers stay at 2n columns."""
    f = tanh_cell(3, 4, 6.0, seed=3)
    z0 = torch.zeros(3, 4, dtype=F64)
    steps = 14                               # merges after pairs 8 and 12
    reference = dense_broyden(f, z0, steps)
    model = InverseBroyden(3, 4, memory=100, dtype=F64, device="cpu", merge=True)
    z = z0
    for expected in reference:
        model.observe(z, f(z))
        z = z + model.step()
        torch.testing.assert_close(z, expected, rtol=1e-8, atol=1e-9)
        assert model.C.shape[2] <= 2 * 4


@pytest.mark.parametrize("memory, merge", [(100, True), (5, False)],
                         ids=["merged past 2n", "limited memory"])
def test_a_restarted_inverse_broyden_takes_a_new_models_steps(memory, merge):
    """``restart(True)`` (what accelerators do where CPU drops the model) makes the model
    take dense Broyden's steps from W = I again, from the next evaluation on, whatever it
    held (here 9 pairs of another start: merged past 2n, or wrapped in a memory of 5);
    ``restart(False)`` changes nothing, whether called from the first step on or only
    after 5 (columns written before a model's first restart carry no write stamp)."""
    f = tanh_cell(3, 4, 6.0, seed=3)
    z = torch.full((3, 4), 0.5, dtype=F64)
    models = [InverseBroyden(3, 4, memory=memory, dtype=F64, device="cpu", merge=merge)
              for _ in range(3)]
    restarted, untouched, late = models
    for k in range(9):
        for model in models:
            model.observe(z, f(z))
        step = untouched.step()
        untouched.restart(torch.tensor(False))
        if k >= 5:
            late.restart(torch.tensor(False))
        z = z + step
    for model in (restarted, late):
        torch.testing.assert_close(model.step(), untouched.step(), rtol=0, atol=0)
    z0 = torch.zeros(3, 4, dtype=F64)
    for model in (restarted, late):
        model.restart(torch.tensor(True))
        z = z0
        for expected in dense_broyden(f, z0, 12 if merge else 4):
            model.observe(z, f(z))
            z = z + model.step()
            torch.testing.assert_close(z, expected, rtol=1e-8, atol=1e-9)


def dense_broyden_after(f, X, steps):
    """Dense Broyden's good method that first updates B = 0 with the secant pairs of the
    iterates X ``(B, j + 1, n)`` in order, then takes ``steps`` full steps from X[:, -1]."""
    bsz, _, n = X.shape
    B = torch.zeros(bsz, n, n, dtype=X.dtype)
    eye = torch.eye(n, dtype=X.dtype)
    prev = None

    def record(z):
        nonlocal B, prev
        fz = f(z)
        if prev is not None:
            s, y = z - prev[0], fz - prev[1]
            miss = y - (B @ s.unsqueeze(-1)).squeeze(-1)
            B = B + miss.unsqueeze(-1) * s.unsqueeze(1) / (s * s).sum(1)[:, None, None]
        prev = (z, fz)
        return fz

    for i in range(X.shape[1]):
        fz = record(X[:, i])
    z, iterates = X[:, -1], []
    for _ in range(steps):
        z = z + torch.linalg.solve(eye - B, fz - z)
        iterates.append(z)
        fz = record(z)
    return iterates


@pytest.mark.parametrize("seed_pairs", [0, 5])
def test_step_broyden_takes_dense_broydens_iterates(seed_pairs):
    """Kelley's step form (only the steps stored) against dense Broyden's good method,
    from W = I and from W_0 seeded with arbitrary iterates' secant pairs, on an expansive
    cell; 30 steps with 8 columns allocated (the buffers grow twice), the step columns not
    yet written filled with NaN (unwritten memory is never read)."""
    f = tanh_cell(4, 12, 3.0, seed=6)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, seed_pairs + 1, 12, generator=g, dtype=F64).cumsum(dim=1) * 0.1
    F = torch.stack([f(X[:, i]) for i in range(X.shape[1])], dim=1)
    reference = dense_broyden_after(f, X, 30)
    model = StepBroyden(X, F, columns=8)
    model._S[:, 1:] = float("nan")
    for k in range(30):
        z = model.next_point()
        torch.testing.assert_close(z, reference[k], rtol=1e-7, atol=1e-9, msg=f"step {k}")
        model.observe(z, f(z))
    assert model.k == 30 and model._S.shape[1] == 32


def test_step_broyden_freezes_a_row_where_f_is_not_finite():
    """A row whose f is not finite stays at its last finite point from then on; the
    other rows take the same iterates as without it."""
    f = tanh_cell(3, 8, 3.0, seed=2)
    z0 = torch.zeros(3, 8, dtype=F64)
    clean, broken = (StepBroyden(z0[:, None], f(z0)[:, None], columns=40) for _ in range(2))
    last_finite = None
    for k in range(8):
        z_c, z_b = clean.next_point(), broken.next_point()
        torch.testing.assert_close(z_b[[0, 2]], z_c[[0, 2]], rtol=1e-12, atol=1e-12)
        f_b = f(z_b)
        if k == 3:
            f_b[1, 0] = float("nan")
        elif k > 3:
            assert torch.equal(z_b[1], last_finite)      # held, evaluated again
        if k == 2:
            last_finite = z_b[1].clone()
        clean.observe(z_c, f(z_c))
        broken.observe(z_b, f_b)


def test_bordered_woodbury_solve_matches_dense_solve():
    torch.manual_seed(0)
    bsz, n, m = 5, 11, 6
    model = LowRankJacobian(bsz, n, rank=m, dtype=F64, device="cpu")
    S, Y = torch.randn(bsz, n, m, dtype=F64), torch.randn(bsz, n, m, dtype=F64)
    model.absorb(S, Y)
    B = model.U @ model.V.transpose(1, 2)
    torch.testing.assert_close(B @ S, Y)                   # B agrees with J on span(S)
    torch.testing.assert_close(model.gram, model.V.transpose(1, 2) @ model.U)
    lam, h = torch.rand(bsz, dtype=F64), torch.randn(bsz, n, dtype=F64)
    border, rhs = torch.randn(bsz, n + 1, dtype=F64), torch.randn(bsz, n + 1, dtype=F64)
    M = torch.zeros(bsz, n + 1, n + 1, dtype=F64)
    M[:, :n, :n] = torch.eye(n, dtype=F64) - lam[:, None, None] * B
    M[:, :n, n] = h
    M[:, n] = border
    x, ok = model.solve_bordered(lam, h, border, rhs)
    assert ok.all()
    torch.testing.assert_close(x, torch.linalg.solve(M, rhs))


def test_model_memory_is_cyclic_per_sample():
    model = LowRankJacobian(2, 4, rank=3, dtype=F64, device="cpu")
    S = torch.randn(2, 4, 2, dtype=F64)
    S[1, :, 1] = 0                                          # sample 1: one valid product
    model.absorb(S, torch.randn(2, 4, 2, dtype=F64))
    assert model.next_slot.tolist() == [2, 1]
    model.absorb(torch.randn(2, 4, 2, dtype=F64), torch.randn(2, 4, 2, dtype=F64))
    assert model.next_slot.tolist() == [1, 0]               # sample 0 wrapped around
    torch.testing.assert_close(model.gram, model.V.transpose(1, 2) @ model.U)


def test_more_products_than_rank_keep_each_samples_newest_nonzero_ones():
    """A Krylov solve with more products than the model's rank, where one row stopped
    early (zeros after its third product): each row's model agrees with J on its newest
    ``rank`` nonzero products, checked against the true matrix."""
    n, rank, k = 8, 4, 7
    g = torch.Generator().manual_seed(2)
    A = torch.randn(2, n, n, generator=g, dtype=F64)
    S = torch.randn(2, n, k, generator=g, dtype=F64)
    S[1, :, 3:] = 0                                     # row 1 stopped after 3 products
    model = LowRankJacobian(2, n, rank=rank, dtype=F64, device="cpu")
    model.absorb(S, A @ S)
    kept = [S[0, :, k - rank:], S[1, :, :3]]             # row 0: newest 4; row 1: its 3
    for row, cols in enumerate(kept):
        B = model.U[row] @ model.V[row].T
        torch.testing.assert_close(B @ cols, A[row] @ cols)
    assert model.next_slot.tolist() == [0, 3]


def test_secant_solver_is_the_default_above_the_dense_size_and_solves_expansive_cells():
    f = tanh_cell(6, 96, 3.0, seed=4, dtype=torch.float32)
    x0 = torch.zeros(6, 96)
    z_fp, _, _ = get_solver("fixed_point_iter")(f, x0, max_iter=300, tol=1e-5,
                                                stop_mode="rel")
    assert ((f(z_fp) - z_fp).norm(dim=1) > 1e-3).any()
    z, _, info = th.homotopy_solver(f, x0, max_iter=1000, tol=1e-5, stop_mode="rel")
    rel = (f(z) - z).norm(dim=1) / f(z).norm(dim=1)
    assert (rel <= 1e-5).all() and (info["status"] == Status.CONVERGED).all()
    assert info["krylov_solves"] == 0                       # Broyden alone, no products


def test_auto_on_small_states_takes_newton_then_broyden_then_dense_path_solves(monkeypatch):
    """Under ``homo_linear_solver='auto'`` at n <= homo_krylov_dim, the phase at λ = 1 is
    exact Newton first: its first step is z0 + (I - J_f)⁻¹ (f(z0) - z0) (J_f by autograd).
    Samples on which it stalls (``homo_newton_iters`` 1 here) restart at z0 under Broyden's
    method: f is then called at dense Broyden's iterates from z0. Samples that stall there
    too (``homo_secant_patience`` 1) go on the path, whose solves use the dense Jacobian
    (no GMRES), and end on a true equilibrium."""
    f = tanh_cell(3, 12, 3.0, seed=2)
    z0 = torch.zeros(3, 12, dtype=F64)
    points = []

    def recording(z):
        if not torch._C._functorch.is_functorch_wrapped_tensor(z):   # not a product's call
            points.append(z.clone())
        return f(z)

    th.homotopy_solver(recording, z0, max_iter=60, tol=1e-30, homo_warmup=0,
                       homo_newton_iters=1, homo_secant_patience=20, homo_jvp="forward")
    full = torch.func.jacrev(f)(z0)                         # (3, 12, 3, 12)
    jac = torch.stack([full[b, :, b] for b in range(3)])
    newton = z0 + torch.linalg.solve(torch.eye(12, dtype=F64) - jac, f(z0) - z0)
    assert torch.allclose(points[1], newton, rtol=1e-9, atol=1e-10)
    again = [k for k in range(2, len(points)) if torch.equal(points[k], z0)]
    assert again, "the samples did not restart at z0 under Broyden's method"
    reference = dense_broyden(f, z0, 6)
    for got, expected in zip(points[again[0] + 1:again[0] + 7], reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    from torchdeq_homotopy.bordered import BorderedSolves
    dense_solves = []
    solve_dense = BorderedSolves._solve_dense

    def spy(self, *args, **kwargs):
        dense_solves.append(1)
        return solve_dense(self, *args, **kwargs)

    monkeypatch.setattr(BorderedSolves, "_solve_dense", spy)
    z, _, info = th.homotopy_solver(f, z0, max_iter=2000, tol=1e-9, homo_warmup=0,
                                    homo_newton_iters=1, homo_secant_patience=1)
    assert (info["lam"] == 1).all() and info["krylov_solves"] == 0 and dense_solves
    assert (info["lam_trace"] < 1).any()                    # some went on the path
    assert ((f(z) - z).norm(dim=1) <= 1e-9).all()


def fold_problem(n=512, seed=0):
    """f(z) = Q tanh(a ⊙ Qᵀz + b) with Q orthogonal, so that ∂f/∂z is dense. In the rotated
    coordinate w_0 the fixed-point homotopy from w_0 = 2 is the scalar path
    w = λ tanh(2w - 1) + (1 - λ) 2, which turns back at λ = 0.824 (w = 0.87) and again at
    λ = 0.710 (w = 0.20) before it reaches w = -0.995 at λ = 1. The other coordinates are
    contractive (a = 0.5)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    a = torch.full((n,), 0.5, dtype=F64)
    b = 0.3 * torch.randn(n, generator=g, dtype=F64)
    a[0], b[0] = 2.0, -1.0
    w0 = 0.5 * torch.randn(n, generator=g, dtype=F64)
    w0[0] = 2.0

    def f(z):
        return torch.tanh(z @ Q * a + b) @ Q.T

    return f, (w0 @ Q.T)[None], Q


def test_path_through_turning_points_at_n_512(record_tangent_lams):
    """Pure path tracking with the secant solver: tangents with dλ/ds < 0 (the path turned
    back at a fold, where I - λJ_f is singular) and a true equilibrium at the end."""
    from torchdeq_homotopy.path import Budget, PathTracker, Record, TrackerOptions

    f, z0, Q = fold_problem()
    tracker = PathTracker(f, z0, TrackerOptions(newton_iters=0, linear_solver="secant",
                                                jvp="forward"))
    tangents = record_tangent_lams(tracker)
    with torch.no_grad():
        result = tracker.run(Record.start(z0, Budget(3000), "abs"), 1e-8)
    assert result.status.tolist() == [Status.CONVERGED]
    z = result.z_best
    assert ((f(z) - z).norm(dim=1) <= 1e-8).all()
    assert (torch.stack(tangents) < 0).any()                # went back in λ
    torch.testing.assert_close((z @ Q)[0, 0], torch.tensor(-0.99505, dtype=F64), atol=1e-4,
                               rtol=0)


def test_secant_budget_counts_every_call_and_product():
    calls = 0
    inner = tanh_cell(4, 64, 6.0, seed=7, dtype=torch.float32)

    def f(z):
        nonlocal calls
        calls += 1
        return inner(z)

    _, _, info = th.homotopy_solver(f, torch.zeros(4, 64), max_iter=400, tol=1e-12,
                                    homo_linear_solver="secant", homo_secant_patience=20)
    assert calls <= 400 and info["nfe"][0] == calls
    assert info["krylov_products"] <= calls


def test_stalled_broyden_goes_on_where_the_budget_cannot_pay_for_a_path():
    """At n = 128 a path costs about 32 n = 4,096 evaluations: with 1,500 in all, samples
    whose Broyden steps stall keep Broyden's iterates (those of a run that never leaves),
    where the code before this rule spent the rest on paths that ended below λ = 1. An
    explicit ``homo_secant_patience`` still starts the path."""
    f = tanh_cell(4, 128, 8.0, seed=3, dtype=torch.float32)
    x0 = torch.zeros(4, 128)
    kwargs = dict(max_iter=1500, tol=1e-5, stop_mode="rel")
    z, _, info = th.homotopy_solver(f, x0, **kwargs)
    z_broyden, _, _ = th.homotopy_solver(f, x0, homo_secant_patience=10**6, **kwargs)
    assert (info["lam_trace"] == 1).all()
    assert torch.equal(z, z_broyden)
    _, _, info_patient = th.homotopy_solver(f, x0, homo_secant_patience=500, **kwargs)
    assert (info_patient["lam_trace"] < 1).any()


def test_secant_solver_keeps_best_iterate_and_reports_failures():
    f = tanh_cell(4, 64, 6.0, seed=8, dtype=torch.float32)
    z, _, info = th.homotopy_solver(f, torch.zeros(4, 64), max_iter=30, tol=1e-9,
                                    homo_linear_solver="secant")
    residual = (f(z) - z).norm(dim=1)
    torch.testing.assert_close(info["abs_lowest"], residual, rtol=1e-4, atol=1e-6)
    assert not info["converged"].any() and (info["status"] == Status.MAX_EVALS).all()


@pytest.mark.parametrize("linear_solver", ["dense", "secant", "gmres"])
def test_tracker_keeps_no_state_between_solves(linear_solver):
    """Everything a solve learns (homotopy, Jacobian models, counters) lives in the loop's
    carry: one tracker solves the same problem twice, on an expansive cell where the path
    runs, with bit-identical results, and every sample on a true equilibrium."""
    from torchdeq_homotopy.path import Budget, PathTracker, Record, TrackerOptions

    f = tanh_cell(6, 48, 4.0, seed=21)
    x0 = torch.zeros(6, 48, dtype=torch.float64)
    tracker = PathTracker(f, x0, TrackerOptions(newton_iters=0, linear_solver=linear_solver,
                                                restarts=0))
    with torch.no_grad():
        first, second = (tracker.run(Record.start(x0, Budget(3000), "abs"), 1e-8)
                         for _ in range(2))
    assert torch.equal(first.z_best, second.z_best)
    assert first.evals == second.evals and first.krylov_products == second.krylov_products
    solved = first.status == Status.CONVERGED
    assert solved.float().mean() >= 0.5
    assert ((f(first.z_best) - first.z_best).norm(dim=1)[solved] <= 1e-8).all()



def test_merge_sums_cancelling_float32_factors_in_double():
    """Broyden's inverse factors grow large with cancelling terms; the merge must give the
    exact C Dᵀ of the stored float32 factors (computed here in float64) rounded once,
    not a float32 sum whose rounding error (eps · |C| |D| · 2n) swamps the result."""
    g = torch.Generator().manual_seed(0)
    n = 16
    P = 1e3 * torch.randn(2, n, n, generator=g)
    Q = 1e3 * torch.randn(2, n, n, generator=g)
    R = 1e-2 * torch.randn(2, n, n, generator=g)
    C = torch.cat([P, P], dim=2)                                 # (2, n, 2n)
    Dt = torch.cat([Q, R - Q], dim=1)                            # (2, 2n, n), float32
    exact = torch.bmm(C.double(), Dt.double())                   # P Rᵀ-sized, |.| ~ 1e2
    model = InverseBroyden(2, n, memory=1000, dtype=torch.float32, device="cpu", merge=True)
    model.C = torch.cat([C, torch.zeros(2, n, 1)], dim=2)
    model.Dt = torch.cat([Dt, torch.zeros(2, 1, n)], dim=1)
    model._written = 2 * n
    model._merge()
    merged = model.C[..., :n].double()
    assert (merged - exact).abs().max() <= 1e-6 * exact.abs().max()
    assert torch.equal(model.Dt[:, :n], torch.eye(n).expand(2, n, n))


def test_endgame_rejects_steps_above_its_best_residual():
    """A judged endgame step that ends above the endgame's best residual returns to the
    endgame's best point (with f there, no evaluation); after an exact step its step
    length halves, after a secant one it stays (the exact Jacobian comes next); an accepted
    step doubles it and becomes the endgame's best point."""
    from dataclasses import replace

    from torchdeq_homotopy.outcome import Budget, Record
    from torchdeq_homotopy.path import PathTracker, Phase
    from torchdeq_homotopy.tracker_state import _State

    f = tanh_cell(3, 5, 0.5, seed=1)
    z_end, z_now = torch.randn(3, 5, dtype=F64) * 0.1, torch.randn(3, 5, dtype=F64)
    z_now[1] = f(z_end)[1]                    # one fixed-point step: a lower residual
    record = Record.start(z_end, Budget(10), "abs")
    record.add(z_end, f(z_end))
    every = torch.ones(3, dtype=torch.bool)
    state = _State.start(z_end, newton_first=True)
    abs_end = (f(z_end) - z_end).norm(dim=1)
    state = PathTracker._enter_endgame(state, record, every, f(z_end), abs_end)
    assert (state.phase == Phase.ENDGAME).all()
    record.add(z_now, f(z_now))
    half = torch.tensor([1.0, 0.5, 1.0], dtype=F64)
    y_now = torch.cat([z_now, torch.ones(3, 1, dtype=F64)], dim=1)
    state = replace(state, path=replace(state.path, y=y_now),
                    newton=replace(state.newton, endgame_step=every, damping=half),
                    jacobian=replace(state.jacobian, exact=torch.tensor([True, True, False])))
    abs_now = (f(z_now) - z_now).norm(dim=1)
    assert (abs_now > abs_end).tolist() == [True, False, True]
    new, fz, abs_res = PathTracker._judge_endgame(state, record, f(z_now), abs_now)

    rejected = torch.tensor([True, False, True])
    expect_z = torch.where(rejected[:, None], z_end, z_now)
    torch.testing.assert_close(new.path.y[:, :5], expect_z)
    torch.testing.assert_close(fz, f(expect_z))
    torch.testing.assert_close(abs_res, (f(expect_z) - expect_z).norm(dim=1))
    assert new.path.y[:, 5].tolist() == [1.0, 1.0, 1.0]
    assert new.newton.damping.tolist() == [0.5, 1.0, 1.0]
    torch.testing.assert_close(new.newton.end_z, expect_z)
    torch.testing.assert_close(new.newton.end_abs, torch.minimum(abs_end, abs_now))
    assert not new.newton.endgame_step.any()
    assert not new.needs_restart.any()


def test_endgame_goes_back_to_its_own_best_point_and_restarts_when_it_stalls():
    """The solve's best iterate (here a lower residual met before the endgame, as where
    Broyden's method stalled near a local minimum of ||z - f(z)||) does not pull the
    endgame back; a third exact step in a row that fails (α would fall below 1/4) marks
    the sample for a new path, with full steps again."""
    from dataclasses import replace

    from torchdeq_homotopy.outcome import Budget, Record
    from torchdeq_homotopy.path import PathTracker
    from torchdeq_homotopy.tracker_state import _State

    f = tanh_cell(2, 5, 0.5, seed=2)
    z_low = torch.randn(2, 5, dtype=F64) * 0.1
    z_low = f(f(f(z_low)))                    # the solve's best iterate, met first
    z_end = z_low + 0.5                       # the path's end: a higher residual
    z_now = z_end + 0.3 * torch.randn(2, 5, dtype=F64)
    record = Record.start(z_low, Budget(10), "abs")
    record.add(z_low, f(z_low))
    record.add(z_end, f(z_end))
    abs_end = (f(z_end) - z_end).norm(dim=1)
    every = torch.ones(2, dtype=torch.bool)
    state = PathTracker._enter_endgame(_State.start(z_end, newton_first=True), record, every,
                                       f(z_end), abs_end)
    record.add(z_now, f(z_now))
    abs_now = (f(z_now) - z_now).norm(dim=1)
    assert (record.best.abs_res < abs_end).all() and (abs_now > abs_end).all()
    y_now = torch.cat([z_now, torch.ones(2, 1, dtype=F64)], dim=1)
    state = replace(state, path=replace(state.path, y=y_now),
                    newton=replace(state.newton, endgame_step=every,
                                   damping=torch.tensor([1.0, 0.25], dtype=F64)))
    new, fz, _ = PathTracker._judge_endgame(state, record, f(z_now), abs_now)

    torch.testing.assert_close(new.path.y[:, :5], z_end)       # not record.best.z
    torch.testing.assert_close(fz, f(z_end))
    assert new.needs_restart.tolist() == [False, True]
    assert new.newton.damping.tolist() == [0.5, 1.0]


def test_endgame_converges_where_the_path_reaches_lambda_one():
    """On a 64-wide expansive cell, inexact Newton steps at the end of the path once
    climbed away from the equilibrium (4 of 4 samples reached λ = 1, none converged);
    with the monotone endgame every sample that reaches λ = 1 converges."""
    f = tanh_cell(4, 64, 6.0, seed=3, dtype=torch.float32)
    z, _, info = th.homotopy_solver(f, torch.zeros(4, 64), max_iter=6000, tol=1e-5,
                                    stop_mode="rel", homo_linear_solver="secant",
                                    homo_secant_patience=10, homo_warmup=0)
    fz = f(z)
    relative = (fz - z).norm(dim=1) / fz.norm(dim=1)
    reached = info["lam"] >= 1
    assert reached.sum() >= 2
    assert (relative[reached] <= 1e-5).all()
    assert info["converged"][reached].all()


def test_step_broyden_skips_the_update_where_the_secant_denominator_vanishes():
    """f(z) = z + c has no fixed point and Δg = 0 after every step, so Broyden's
    denominator sᵀ W Δg is 0: both forms skip the update (W stays I) and step by c, with
    every iterate finite, as TorchDEQ's Broyden would without a line search."""
    c = torch.tensor([[1.0, -2.0, 0.5]], dtype=F64)
    f = lambda z: z + c                                       # noqa: E731
    z0 = torch.zeros(1, 3, dtype=F64)
    step_form = StepBroyden(z0[:, None], f(z0)[:, None], columns=4)
    two_factor = InverseBroyden(1, 3, memory=10, dtype=F64, device="cpu")
    two_factor.observe(z0, f(z0))
    z_b = z0
    for k in range(1, 7):
        z_a, z_b = step_form.next_point(), z_b + two_factor.step()
        torch.testing.assert_close(z_a, k * c)
        torch.testing.assert_close(z_b, k * c)
        step_form.observe(z_a, f(z_a))
        two_factor.observe(z_b, f(z_b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_finite_rows_equals_the_elementwise_test(dtype):
    """One reduction against torch.isfinite, rows with NaN, ±inf, finite entries whose
    sum overflows the dtype (still finite), and cancelling infinities."""
    from torchdeq_homotopy.linalg import finite_rows
    big = torch.finfo(dtype).max
    x = torch.randn(7, 3, 5).to(dtype)
    x[1, 0, 2] = float("nan")
    x[2, 2, 4] = float("inf")
    x[3, 1, 1] = -float("inf")
    x[4] = big                                        # the row sum overflows the dtype
    x[5, 0, 0], x[5, 0, 1] = float("inf"), -float("inf")
    expected = torch.isfinite(x).flatten(1).all(dim=1)
    assert expected.tolist() == [True, False, False, False, True, False, True]
    assert torch.equal(finite_rows(x), expected)


def test_absorbing_more_products_than_the_state_has_entries_gives_the_exact_jacobian():
    """GMRES on the bordered system of n + 1 unknowns can make n + 1 products; absorbed,
    they span all of R^n, so the model becomes J itself (a QR of more columns than rows
    used to fail on mismatched shapes)."""
    g = torch.Generator().manual_seed(4)
    A = torch.randn(2, 3, 3, generator=g, dtype=F64)
    S = torch.randn(2, 3, 4, generator=g, dtype=F64)                  # k = 4 > n = 3
    model = LowRankJacobian(2, 3, rank=8, dtype=F64, device=A.device)
    model.absorb(S, A @ S)
    v = torch.randn(2, 3, generator=g, dtype=F64)
    torch.testing.assert_close(model.matvec(v), (A @ v[..., None])[..., 0])


def test_exact_newton_stalls_on_steps_that_do_not_halve_and_steps_on_while_others_converge():
    """The rule of the exact-Newton phase at λ = 1 (n <= homo_krylov_dim), on hand-set
    records: an exact step counts against a sample unless it halves the lowest residual
    met so far (r_k <= ``_NEWTON_PROGRESS`` · min_j r_j); three in a row stall it. A stalled
    sample goes on stepping while another still converges (the batch pays each refresh
    anyway) and a halving step revives it; only samples whose f is not finite wait idle.
    Once every sample has stalled, all restart together at (z0, 1) under Broyden's method."""
    from dataclasses import replace

    from torchdeq_homotopy.homotopies import NewtonHomotopy
    from torchdeq_homotopy.linalg import SecantJacobian
    from torchdeq_homotopy.outcome import Budget
    from torchdeq_homotopy.path import PathTracker, TrackerOptions
    from torchdeq_homotopy.tracker_state import JacobianModels, Phase, _State

    f = tanh_cell(3, 4, 3.0, seed=0)
    x0 = torch.zeros(3, 4, dtype=F64)
    tracker = PathTracker(f, x0, TrackerOptions(newton_iters=6))
    models = JacobianModels(linear_solver="dense", broyden_newton=False, broyden_next=True,
                            homotopy=NewtonHomotopy(x0, x0), dense=SecantJacobian(f, "forward"),
                            jvp_mode="forward")
    state = _State.start(x0, newton_first=True)
    moved = torch.ones(3, 5, dtype=F64)                     # where the last steps took them
    state = replace(state, path=replace(state.path, y=moved), newton=replace(
        state.newton, steps=torch.tensor([2, 2, 2]), lowest=torch.ones(3, dtype=F64),
        worse_in_row=torch.tensor([2, 2, 0])))

    def leave(state, res):
        res = torch.tensor(res, dtype=F64)
        return tracker._leave_newton(state, models, torch.isfinite(res), res, Budget(100))

    # 0.6: a new lowest that does not halve (the third in a row); 0.4: halves; inf: broken
    state, idle = leave(state, [0.6, 0.4, float("inf")])
    assert state.newton.worse_in_row.tolist() == [3, 0, 1]
    assert idle.tolist() == [False, False, True]            # sample 0 steps on, stalled
    assert state.newton.steps.tolist() == [2, 2, 6]         # the broken one stays stalled
    assert (state.phase == Phase.NEWTON).all() and torch.equal(state.path.y, moved)
    # 0.25 <= 0.6 / 2 revives sample 0; sample 1 does not halve 0.4 (the first time)
    state, idle = leave(state, [0.25, 0.3, float("inf")])
    assert state.newton.worse_in_row.tolist() == [0, 1, 2] and not idle[:2].any()
    state = replace(state, newton=replace(state.newton, worse_in_row=torch.tensor([2, 2, 2])))
    state, idle = leave(state, [0.2, 0.2, float("inf")])   # none halves: all stalled
    assert idle.all() and models.broyden_newton
    start = torch.cat([x0, torch.ones(3, 1, dtype=F64)], dim=1)
    assert torch.equal(state.path.y, start)                 # all restart at (z0, 1)


def test_inexact_newton_under_gmres_stalls_only_above_its_lowest_and_waits():
    """Under GMRES solves (inexact Newton, whose Eisenstat–Walker steps may converge by less
    than half a step) an exact step counts against a sample only when it ends at or above
    the lowest residual, and stalled samples wait idle (every row's products cost)."""
    from dataclasses import replace

    from torchdeq_homotopy.homotopies import NewtonHomotopy
    from torchdeq_homotopy.linalg import SecantJacobian
    from torchdeq_homotopy.outcome import Budget
    from torchdeq_homotopy.path import PathTracker, TrackerOptions
    from torchdeq_homotopy.tracker_state import JacobianModels, _State

    f = tanh_cell(2, 4, 3.0, seed=0)
    x0 = torch.zeros(2, 4, dtype=F64)
    tracker = PathTracker(f, x0, TrackerOptions(newton_iters=6, linear_solver="gmres"))
    models = JacobianModels(linear_solver="gmres", broyden_newton=False,
                            homotopy=NewtonHomotopy(x0, x0), dense=SecantJacobian(f, "forward"),
                            jvp_mode="forward")
    state = _State.start(x0, newton_first=True)
    state = replace(state, newton=replace(
        state.newton, steps=torch.tensor([2, 2]), lowest=torch.ones(2, dtype=F64),
        worse_in_row=torch.tensor([2, 2])))
    res = torch.tensor([0.6, 1.0], dtype=F64)     # a new lowest (not halved); not below it
    state, idle = tracker._leave_newton(state, models, torch.isfinite(res), res, Budget(100))
    assert state.newton.worse_in_row.tolist() == [0, 3]
    assert idle.tolist() == [False, True] and state.newton.steps.tolist() == [2, 6]
