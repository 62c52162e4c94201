"""TorchDEQ's solver contract where the plugin's solvers could depart from it: trajectory
states, status against the returned iterate, the budget, and one algorithm per solver."""
import argparse
import itertools

import pytest
import torch
import torchdeq
from torchdeq.solver import get_solver
from torchdeq.utils import add_deq_args

import torchdeq_homotopy as th
from torchdeq_homotopy import Status


def contraction(rate=0.9, n=6, bsz=2):
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = rate * Q                                              # ||A|| = rate, rotating
    b = torch.randn(bsz, n, generator=g, dtype=torch.float64)
    return lambda z: z @ A.T + b


def test_trajectory_holds_the_best_iterate_at_each_requested_count():
    f = contraction()
    x0 = torch.zeros(2, 6, dtype=torch.float64)
    indexing = [1, 2, 5, 10, 20]
    _, traj, _ = th.homotopy_solver(f, x0, max_iter=60, tol=1e-12, indexing=indexing)
    assert len(traj) == len(indexing)
    res = [float((f(z) - z).norm(dim=1).max()) for z in traj]
    assert all(b < a for a, b in itertools.pairwise(res)), res   # distinct, improving
    assert res[-1] < 1e-2 * res[0]


@pytest.mark.parametrize("shape, max_iter", [((3, 2), 6), ((1, 4), 8)])
def test_status_describes_the_returned_iterate(shape, max_iter):
    f = lambda z: 0.5 * z + 1                                  # noqa: E731
    x0 = torch.zeros(shape, dtype=torch.float64)
    tol = 0.3 * float((f(x0) - x0).norm(dim=1).max())
    z, _, info = th.homotopy_solver(f, x0, max_iter=max_iter, tol=tol)
    residual = (f(z) - z).norm(dim=1)
    converged = info["status"] == Status.CONVERGED
    assert torch.equal(converged, residual <= tol * (1 + 1e-9))  # and the converse
    assert converged.all()


@pytest.mark.parametrize("max_iter", [1, 2, 3, 4, 5, 7, 12])
@pytest.mark.parametrize("rate", [0.95, 3.0])
def test_budget_is_never_exceeded_by_the_warm_up(max_iter, rate):
    calls = 0
    inner = contraction(rate)

    def f(z):        # a vmapped call (a dense Jacobian) is 6 products in one call
        nonlocal calls
        calls += 6 if torch._C._functorch.is_batchedtensor(z) else 1
        return inner(z)

    _, _, info = th.homotopy_solver(f, torch.zeros(2, 6, dtype=torch.float64),
                                    max_iter=max_iter, tol=1e-14)
    assert calls <= max_iter and info["nfe"][0] == calls


def test_newton_krylov_is_one_algorithm_whatever_the_entry_point():
    parser = argparse.ArgumentParser()
    add_deq_args(parser)
    th.add_homotopy_args(parser)
    args = parser.parse_args(["--f_solver", "newton_krylov", "--f_max_iter", "60",
                              "--f_tol", "1e-9"])
    f = contraction(2.0)
    x0 = torch.zeros(2, 6, dtype=torch.float64)
    deq = torchdeq.get_deq(args)
    z_cli, _, info_cli = deq.f_solver(f, x0, max_iter=60, tol=1e-9)
    z_direct, _, info_direct = get_solver("newton_krylov")(f, x0, max_iter=60, tol=1e-9)
    assert torch.equal(z_cli, z_direct)
    assert info_cli["krylov_solves"] == info_direct["krylov_solves"] > 0


@pytest.mark.parametrize("linear_solver", ["dense", "secant", "gmres"])
def test_autocast_and_half_precision_states_are_solved_in_float32(linear_solver):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(24, 24, generator=g)
    W = W / torch.linalg.matrix_norm(W, 2) * 3.0
    x = 0.3 * torch.randn(4, 24, generator=g)
    f = lambda z: torch.tanh(z @ W.T.to(z.dtype) + x.to(z.dtype))     # noqa: E731

    def relative(z):
        fz = f(z.float())
        return (fz - z.float()).norm(dim=1) / fz.norm(dim=1)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, _, info = th.homotopy_solver(f, torch.zeros(4, 24), max_iter=600, tol=0.1,
                                        stop_mode="rel", homo_linear_solver=linear_solver)
    assert z.dtype == torch.float32
    z16, _, info16 = th.homotopy_solver(f, torch.zeros(4, 24, dtype=torch.bfloat16),
                                        max_iter=600, tol=0.1, stop_mode="rel",
                                        homo_linear_solver=linear_solver)
    assert z16.dtype == torch.bfloat16
    for state, stat in ((z, info), (z16, info16)):
        converged = stat["status"] == Status.CONVERGED
        assert torch.equal(converged, stat["rel_lowest"] <= 0.1)
        assert (relative(state)[converged] < 0.12).all()      # rounding of the answer
    if linear_solver != "gmres":       # under autocast; GMRES (and bf16 states) may stall
        assert (info["status"] == Status.CONVERGED).all()


def test_unknown_integrator_fails_at_construction():
    with pytest.raises(th.ConfigError, match="Did you mean 'bosh3'"):
        torchdeq.get_deq(core="homoode", homo_method="bosh33")


@pytest.mark.parametrize("linear_solver", ["secant", "dense"])
def test_nan_mid_path_is_reported_and_the_best_finite_iterate_kept(linear_solver):
    """f turns NaN once the path has moved far from z0: the sample ends NONFINITE or
    unconverged, never CONVERGED, and the returned state is its best finite iterate. The
    other samples converge: a row riding along a GMRES solve that the poisoned row cut
    short keeps its model solve instead of failing."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(8, 8, generator=g, dtype=torch.float64)
    W = W / torch.linalg.matrix_norm(W, 2) * 4.0
    x = 0.1 * torch.randn(3, 8, generator=g, dtype=torch.float64)

    def f(z):
        out = torch.tanh(z @ W.T + x)
        poisoned = (z.norm(dim=-1, keepdim=True) > 0.3) & (torch.arange(3)[:, None] == 0)
        return torch.where(poisoned, torch.nan, out)

    z, _, info = th.homotopy_solver(f, torch.zeros(3, 8, dtype=torch.float64), max_iter=800,
                                    tol=1e-8, homo_warmup=0, homo_newton_iters=0,
                                    homo_linear_solver=linear_solver)
    assert info["status"][0] != Status.CONVERGED
    assert torch.isfinite(z).all()
    residual = (f(z) - z).norm(dim=1)
    assert torch.isfinite(residual[0])
    torch.testing.assert_close(info["abs_lowest"], residual)
    assert (info["status"][1:] == Status.CONVERGED).all()


@pytest.mark.parametrize("b_solver", ["homotopy", "newton_krylov"])
def test_ift_backward_with_plugin_solvers_in_float32_at_torchdeq_defaults(b_solver):
    """The IFT system (I - J_fᵀ) g = v on an expansive cell, where fixed-point iteration
    diverges: the gradient must match the dense solve of that system."""
    g = torch.Generator().manual_seed(5)
    n = 10
    W = torch.randn(n, n, generator=g)
    W = (W / torch.linalg.matrix_norm(W, 2) * 2.5).requires_grad_()
    x = 0.2 * torch.randn(2, n, generator=g)
    deq = torchdeq.get_deq(f_solver="homotopy", b_solver=b_solver, ift=True, f_max_iter=2000,
                           f_tol=1e-6)
    z_out, _ = deq(lambda z: torch.tanh(z @ W.T + x), torch.zeros(2, n))
    z = z_out[-1]
    z.sum().backward()
    # Independent truth: dL/dW = Σ_b u_b (sech² ⊙ ...) from the dense adjoint solve.
    with torch.no_grad():
        zs = z.detach()
        d = 1 - torch.tanh(zs @ W.T + x) ** 2                # (B, n)
        J = d[:, :, None] * W[None]                           # J_f per sample
        u = torch.linalg.solve(torch.eye(n) - J.transpose(1, 2), torch.ones(2, n))
        expected = ((u * d)[:, :, None] * zs[:, None, :]).sum(0)
    torch.testing.assert_close(W.grad, expected, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("key, value", [("f_max_iter", 10), ("f_solver", "anderson"),
                                        ("ift", True), ("n_states", 2),
                                        ("jac_loss_weight", 0.5), ("homo_strict", True)])
def test_homoode_refuses_keys_it_would_ignore(key, value):
    with pytest.raises(th.ConfigError, match=f"does not read \\['{key}'\\]"):
        torchdeq.get_deq(core="homoode", **{key: value})


def test_homoode_accepts_a_namespace_with_every_default_bound():
    parser = argparse.ArgumentParser()
    add_deq_args(parser)
    th.add_homotopy_args(parser)
    args = parser.parse_args(["--core", "homoode", "--homo_method", "bosh3"])
    deq = torchdeq.get_deq(args)
    assert deq.options["homo_method"] == "bosh3"


def test_contract_on_a_cell_where_the_path_runs():
    """Pure path tracking (no warm-up, no Newton phase) on an expansive cell: shapes, the
    trajectory, the best iterate and the status all as on benign cells."""
    g = torch.Generator().manual_seed(6)
    W = torch.randn(12, 12, generator=g, dtype=torch.float64)
    W = W / torch.linalg.matrix_norm(W, 2) * 4.0
    x = 0.1 * torch.randn(5, 12, generator=g, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ W.T + x)                     # noqa: E731
    x0 = torch.zeros(5, 12, dtype=torch.float64)
    z, traj, info = th.homotopy_solver(f, x0, max_iter=3000, tol=1e-8, indexing=[5, 200],
                                       homo_warmup=0, homo_newton_iters=0)
    assert len(traj) == 2 and all(t.shape == x0.shape for t in traj)
    assert (info["lam_trace"] < 1).any()                       # the path did run
    residual = (f(z) - z).norm(dim=1)
    torch.testing.assert_close(info["abs_lowest"], residual)
    assert (info["status"] == Status.CONVERGED).all() and (residual <= 1e-8).all()
    assert info["abs_trace"].shape == info["rel_trace"].shape == info["lam_trace"].shape
    assert info["abs_trace"].shape[1] == len(info["trace_nfe"])


def test_importing_the_library_loads_no_example_dependency():
    """The library is the library: example-only packages stay out of ``sys.modules``."""
    import subprocess
    import sys

    check = ("import sys, torchdeq_homotopy; "
             "print(sorted(m for m in ('homotopy_zoo', 'sklearn', 'torchvision', "
             "'matplotlib', 'hypothesis') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_tracker_options_come_from_the_solver_keys():
    """One options schema: every ``homo_*`` solver key the tracker reads is a field of
    TrackerOptions with the key's default, and a misspelt field cannot be passed."""
    import dataclasses

    from torchdeq_homotopy.config import SOLVER_KEYS, resolve
    from torchdeq_homotopy.path import TrackerOptions

    from_keys = TrackerOptions.from_keys(resolve({}, SOLVER_KEYS), track=True, max_iter=100)
    assert from_keys == TrackerOptions()
    fields = {f.name for f in dataclasses.fields(TrackerOptions)}
    read = {k[len("homo_"):] for k in SOLVER_KEYS} - {"strict", "warmup", "return"}
    assert read | {"track"} == fields
    newton_krylov = TrackerOptions.from_keys(resolve({}, SOLVER_KEYS), track=False, max_iter=77)
    assert newton_krylov.newton_iters == 77 and newton_krylov.linear_solver == "gmres"


def test_record_measures_the_contraction_of_the_step_into_the_best_iterate():
    """Fixed-point steps of f(z) = A z, A = diag(1/4, 1/2): the secant ratio of
    each step is the row's factor (1/4 along e_1, 1/2 along e_2), kept with the best iterate
    for the rows that took a measured step in the budget's last ``SECANT_WINDOW`` calls,
    inf for the others (earlier calls, or rows not marked as ``mixing``)."""
    from torchdeq_homotopy.outcome import SECANT_WINDOW, Budget, Record

    scale = torch.tensor([[0.25, 0.0], [0.0, 0.5]], dtype=torch.float64)
    x0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)   # rows on e_1, e_2
    f = lambda z: z @ scale.T                                            # noqa: E731
    budget = SECANT_WINDOW + 3
    record = Record.start(x0, Budget(budget), "abs")
    z = x0
    for call in range(1, budget + 1):
        record.budget.spend()
        fz = f(z)
        record.add(z, fz, mixing=torch.tensor([True, call < budget]))
        q = record.best.contraction
        if call <= budget - SECANT_WINDOW:          # before the window: not measured
            assert q is None or torch.isinf(q).all()
        z = fz
    # the last call: row 0 measured (1/4), row 1 not marked as mixing (inf)
    torch.testing.assert_close(record.best.contraction[0],
                               torch.tensor(0.25, dtype=torch.float64))
    assert torch.isinf(record.best.contraction[1])
    result = record.result(status=torch.full((2,), int(Status.MAX_EVALS)), lam=torch.ones(2))
    torch.testing.assert_close(result.fz_best, f(result.z_best))


@pytest.mark.parametrize("improves", ["none", "some", "all"])
def test_best_iterate_keeps_each_rows_best_and_owns_its_copy(improves):
    """The best iterate takes exactly the rows whose residual fell (checked row by row),
    with f there, and holds copies: writing into the evaluated buffers afterwards (as
    Anderson's ring buffers do) does not change it."""
    from torchdeq_homotopy.outcome import BestIterate

    inf = torch.full((4,), float("inf"))
    best = BestIterate(torch.zeros(4, 3), inf.clone(), inf.clone(), torch.zeros(4),
                       fz=torch.zeros(4, 3))
    first = torch.tensor([1.0, 2.0, 3.0, 4.0])
    best.update(torch.ones(4, 3), first, first, "abs", used=1, fz=2 * torch.ones(4, 3))
    new_res = {"none": first + 1, "some": torch.tensor([0.5, 3.0, 1.0, 9.0]),
               "all": first / 10}[improves]
    z, fz = torch.full((4, 3), 5.0), torch.full((4, 3), 6.0)
    best.update(z, new_res, new_res, "abs", used=2, fz=fz)
    z.fill_(-1.0)
    fz.fill_(-1.0)
    for row in range(4):
        took = bool(new_res[row] < first[row])
        assert best.z[row].tolist() == ([5.0] * 3 if took else [1.0] * 3)
        assert best.fz[row].tolist() == ([6.0] * 3 if took else [2.0] * 3)
        assert best.abs_res[row] == min(new_res[row], first[row])
        assert best.step[row] == (2.0 if took else 1.0)


def test_best_iterate_starts_from_an_owned_copy_when_the_first_point_is_not_finite():
    """A first evaluation with no finite residual keeps the start as the best z, and the
    f it records is a copy: rewriting the caller's buffer leaves it unchanged."""
    from torchdeq_homotopy.outcome import BestIterate

    inf = torch.full((2,), float("inf"))
    best = BestIterate(torch.zeros(2, 3), inf.clone(), inf.clone(), torch.zeros(2))
    fz = torch.full((2, 3), float("nan"))
    best.update(torch.ones(2, 3), inf, inf, "abs", used=1, fz=fz)
    fz.fill_(7.0)
    assert best.z.tolist() == [[0.0] * 3] * 2
    assert torch.isnan(best.fz).all()
