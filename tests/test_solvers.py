"""The TorchDEQ solver contract and the solvers' answers, checked against independent truth."""
import argparse
import itertools

import pytest
import torch
from torchdeq import get_deq
from torchdeq.solver import get_solver
from torchdeq.utils import add_deq_args
from torchdeq.utils.layer_utils import DEQWrapper

import torchdeq_homotopy as th
from torchdeq_homotopy import Status

ALL_SOLVERS = ["anderson", "broyden", "fixed_point_iter", "simple_fixed_point_iter",
               "homotopy", "newton_krylov"]
OURS = ["homotopy", "newton_krylov"]


def linear_problem(bsz, n, radius, dtype=torch.float64, seed=0):
    """f(z) = A z + b per sample with spectral norm ``radius``; z* = (I - A)^{-1} b."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(bsz, n, n, generator=g, dtype=dtype)
    A = A / torch.linalg.matrix_norm(A, 2)[:, None, None] * radius
    b = torch.randn(bsz, n, generator=g, dtype=dtype)
    z_true = torch.linalg.solve(torch.eye(n, dtype=dtype) - A, b)
    return (lambda z: (A @ z.unsqueeze(-1)).squeeze(-1) + b), z_true


def tanh_cell(bsz, n, gain, seed=0, dtype=torch.float32):
    """f(z) = tanh(W z + x), ||W||_2 = gain, small bias: expansive for gain > 1."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=dtype)
    W = W / torch.linalg.matrix_norm(W, 2) * gain
    x = 0.1 * torch.randn(bsz, n, generator=g, dtype=dtype)
    return lambda z: torch.tanh(z @ W.T + x)


def spied(f, points):
    """f, appending a copy of every point it is called at to ``points``."""
    def g(z):
        points.append(z.clone())
        return f(z)
    return g


@pytest.mark.parametrize("name", ALL_SOLVERS)
def test_every_registered_solver_keeps_torchdeq_contract(name):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(0.3 / conv.weight.abs().sum(dim=(1, 2, 3)).max())
    x = torch.randn(4, 3, 5, 5)
    func = DEQWrapper(lambda z: torch.tanh(conv(z) + x), x)
    x0 = torch.zeros(4, 3, 5, 5)
    with torch.no_grad():
        z, traj, info = get_solver(name)(func, x0, max_iter=60, tol=1e-5, stop_mode="abs",
                                         indexing=[2, 5])
    assert z.shape == x0.shape
    assert isinstance(traj, list) and len(traj) >= 1
    assert all(t.shape == x0.shape for t in traj)
    info["extra"] = 1                                      # mutable dict
    residual = (func(z) - z).flatten(1).norm(dim=1)
    assert residual.max() < 1e-3
    if name != "simple_fixed_point_iter":                   # TorchDEQ returns dummy stats there
        for key in ("abs_lowest", "rel_lowest", "nstep"):
            assert info[key].shape == (4,)
        assert info["abs_trace"].shape[0] == 4 and info["rel_trace"].shape[0] == 4
    if name in OURS:
        assert len(traj) == 2
        torch.testing.assert_close(info["abs_lowest"], residual, rtol=1e-4, atol=1e-7)
        assert info["converged"].all() and (info["status"] == Status.CONVERGED).all()


@pytest.mark.parametrize("linear_solver", ["gmres", "dense"])
@pytest.mark.parametrize("name", OURS)
@pytest.mark.parametrize("radius", [0.5, 3.0])
def test_linear_maps_match_dense_solve(name, radius, linear_solver):
    """radius 3: fixed-point iteration diverges; the answer is (I - A)^{-1} b all the same."""
    f, z_true = linear_problem(6, 8, radius)
    z, _, info = get_solver(name)(f, torch.zeros(6, 8, dtype=torch.float64), max_iter=400,
                                  tol=1e-10, homo_krylov_dim=10,
                                  homo_linear_solver=linear_solver)
    torch.testing.assert_close(z, z_true, rtol=1e-8, atol=1e-8)
    assert info["converged"].all()


@pytest.mark.parametrize("linear_solver", ["dense", "gmres"])
@pytest.mark.parametrize("gain", [3.0, 4.5, 6.0])
def test_expansive_tanh_cells_solved_where_fixed_point_iteration_fails(gain, linear_solver):
    f = tanh_cell(16, 12, gain, seed=int(gain))
    x0 = torch.zeros(16, 12)
    z_fp, _, _ = get_solver("fixed_point_iter")(f, x0, max_iter=500, tol=1e-4)
    assert ((f(z_fp) - z_fp).norm(dim=1) > 1e-4).any()
    z, _, info = th.homotopy_solver(f, x0, max_iter=2000, tol=1e-4,
                                    homo_linear_solver=linear_solver)
    residual = (f(z) - z).norm(dim=1)                      # recomputed, not the solver's word
    assert (residual <= 1e-4).all()
    assert (info["status"] == Status.CONVERGED).all()


@pytest.mark.parametrize("options", [
    {"homo_predictor": "ode"},
    {"homo_predictor": "secant"},
    {"homo_type": "newton"},
    {"homo_newton_iters": 0},
    {"homo_jvp": "forward"},
])
def test_solver_modes_reach_equilibrium(options):
    f = tanh_cell(8, 10, 4.0, seed=3)
    z, _, info = th.homotopy_solver(f, torch.zeros(8, 10), max_iter=3000, tol=1e-4, **options)
    assert ((f(z) - z).norm(dim=1) <= 1e-4).all(), info["status"]


def test_pure_path_tracking_reaches_lambda_one():
    """Without the Newton phase every sample must follow the path to λ = 1."""
    f = tanh_cell(8, 10, 3.0, seed=5, dtype=torch.float64)
    z, _, info = th.homotopy_solver(f, torch.zeros(8, 10, dtype=torch.float64), max_iter=3000,
                                    tol=1e-9, homo_newton_iters=0)
    assert ((f(z) - z).norm(dim=1) <= 1e-9).all()
    torch.testing.assert_close(info["lam"], torch.ones(8, dtype=torch.float64))


@pytest.mark.parametrize("linear_solver", ["gmres", "dense"])
def test_max_iter_counts_every_evaluation(linear_solver):
    """Each call of f and each Jacobian-vector product counts one. A dense Jacobian is n
    products in one vmapped call: such a call (its argument is a vmap-batched tensor)
    counts n here."""
    calls = 0
    n = 6
    inner = tanh_cell(4, n, 4.0, seed=1)

    def f(z):
        nonlocal calls
        calls += n if torch._C._functorch.is_batchedtensor(z) else 1
        return inner(z)

    _, _, info = th.homotopy_solver(f, torch.zeros(4, n), max_iter=57, tol=1e-12,
                                    homo_linear_solver=linear_solver)
    assert calls <= 57
    assert info["nfe"][0] == calls


def test_non_convergence_is_reported_not_hidden():
    f = tanh_cell(4, 12, 5.0, seed=2)
    _z, _, info = th.homotopy_solver(f, torch.zeros(4, 12), max_iter=5, tol=1e-8)
    assert not info["converged"].any()
    assert (info["status"] == Status.MAX_EVALS).all()
    assert (info["abs_lowest"] > 1e-8).all()
    with pytest.raises(th.HomotopyConvergenceError, match="did not converge"):
        th.homotopy_solver(f, torch.zeros(4, 12), max_iter=5, tol=1e-8, homo_strict=True)


@pytest.mark.parametrize("gain, max_iter", [(3.0, 800), (0.5, 40)])
def test_nonfinite_samples_flagged_others_unaffected(gain, max_iter):
    """Samples where f is never finite end NONFINITE, whichever phase ends the solve: the
    tracker (a hard cell, a large budget) or the warm-up (a benign cell at a training
    budget, where it solves every other sample)."""
    f0 = tanh_cell(6, 5, gain, seed=4)
    bad = torch.tensor([False, True, False, False, True, False])

    def f(z):
        out = f0(z)
        return torch.where(bad[:, None], torch.full_like(out, float("nan")), out)

    z, _, info = th.homotopy_solver(f, torch.zeros(6, 5), max_iter=max_iter, tol=1e-5)
    assert (info["status"][bad] == Status.NONFINITE).all()
    assert (info["status"][~bad] == Status.CONVERGED).all()
    assert torch.isfinite(z).all()                          # best finite iterate (x0) kept
    z_ref, _, _ = th.homotopy_solver(lambda z: f0(z), torch.zeros(6, 5), max_iter=max_iter,
                                     tol=1e-5)
    assert ((f0(z) - z).norm(dim=1)[~bad] <= 1e-5).all()
    torch.testing.assert_close(z[~bad], z_ref[~bad], atol=1e-4, rtol=0)


def test_nan_mid_path_keeps_best_finite_iterate():
    f0 = tanh_cell(4, 5, 4.0, seed=6)

    def f(z):   # blows up away from the start for sample 0 only
        out = f0(z)
        blow = (z.norm(dim=1) > 0.05) & (torch.arange(4) == 0)
        return torch.where(blow[:, None], torch.full_like(out, float("inf")), out)

    z, _, info = th.homotopy_solver(f, torch.zeros(4, 5), max_iter=1500, tol=1e-5)
    assert torch.isfinite(z).all()
    assert info["status"][0] != Status.CONVERGED
    assert (info["status"][1:] == Status.CONVERGED).all()


def test_bad_inputs_get_errors_that_name_the_fix():
    f = tanh_cell(2, 3, 0.5)
    with pytest.raises(ValueError, match="state's shape"):
        th.homotopy_solver(lambda z: z[:, :2], torch.zeros(2, 3))
    with pytest.raises(TypeError, match="cast"):
        th.homotopy_solver(lambda z: f(z).double(), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="floating-point"):
        th.homotopy_solver(f, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(th.ConfigError, match="homo_type"):
        th.homotopy_solver(f, torch.zeros(2, 3), homo_tpye="newton")
    with pytest.raises(th.ConfigError, match="choose one of"):
        th.homotopy_solver(f, torch.zeros(2, 3), homo_type="bogus")
    with pytest.raises(th.ConfigError, match="> 0"):
        th.homotopy_solver(f, torch.zeros(2, 3), homo_step_init=-1.0)
    with pytest.raises(ValueError, match="stop_mode"):
        th.homotopy_solver(f, torch.zeros(2, 3), stop_mode="max")


def test_empty_batch_and_one_dimensional_states():
    z, traj, info = th.homotopy_solver(torch.cos, torch.zeros(0, 3), indexing=[3])
    assert z.shape == (0, 3) and len(traj) == 1 and info["abs_lowest"].shape == (0,)
    # three samples with no entries: each is a fixed point, reported per sample
    z, _, info = th.homotopy_solver(torch.cos, torch.zeros(3, 0))
    assert z.shape == (3, 0) and info["converged"].tolist() == [True] * 3
    assert info["abs_lowest"].tolist() == [0.0] * 3
    z, _, info = th.homotopy_solver(torch.cos, torch.zeros(5), tol=1e-8)   # 5 scalar samples
    torch.testing.assert_close(z, torch.full((5,), 0.7390851), atol=1e-6, rtol=0)
    assert info["abs_lowest"].shape == (5,)


class TinyDEQ(torch.nn.Module):
    def __init__(self, n=6, **deq_kw):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(0.9 * torch.randn(n, n, generator=g, dtype=torch.float64)
                                    / n ** 0.5)
        self.U = torch.nn.Parameter(torch.randn(n, n, generator=g, dtype=torch.float64))
        self.deq = th.get_deq(**deq_kw)

    def forward(self, x):
        u = x @ self.U.T
        z_out, info = self.deq(lambda z: torch.tanh(z @ self.W.T + u), torch.zeros_like(x))
        return z_out[-1], info


def test_ift_gradient_with_homotopy_backward_matches_finite_differences():
    model = TinyDEQ(f_solver="homotopy", b_solver="homotopy", ift=True, f_tol=1e-12,
                    b_tol=1e-12, f_max_iter=300, b_max_iter=300)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, 6, dtype=torch.float64)
    z, _ = model(x)
    (z * c).sum().backward()

    def loss(xv):
        with torch.no_grad():
            return (model(xv)[0] * c).sum()

    eps, fd = 1e-6, torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[i] = eps
        fd.view(-1)[i] = (loss(x + e.view_as(x)) - loss(x - e.view_as(x))) / (2 * eps)
    torch.testing.assert_close(x.grad, fd, rtol=1e-5, atol=1e-7)


def test_one_flag_switch_and_command_line():
    parser = argparse.ArgumentParser()
    add_deq_args(parser)
    th.add_homotopy_args(parser)
    args = parser.parse_args(["--f_solver", "homotopy", "--b_solver", "homotopy", "--ift",
                              "--homo_type", "newton", "--f_max_iter", "200"])
    deq = get_deq(args)                                # TorchDEQ's own factory
    assert deq.f_solver.func is th.homotopy_solver
    assert deq.f_solver.keywords == {"homo_type": "newton"}
    deq = th.get_deq(args)                             # ours: homo_* keys reach the solver
    assert deq.f_solver.keywords["homo_type"] == "newton"
    with pytest.raises(SystemExit):
        parser.parse_args(["--b_solver", "nonexistent"])


def test_solver_options_through_solver_kwargs():
    deq = get_deq(f_solver="homotopy", f_max_iter=500, f_tol=1e-6)
    deq.eval()
    f = tanh_cell(4, 8, 4.0, seed=7)
    z_out, _info = deq(f, torch.zeros(4, 8), solver_kwargs={"homo_type": "newton"})
    assert ((f(z_out[-1]) - z_out[-1]).norm(dim=1) <= 1e-6).all()
    with pytest.raises(th.ConfigError):
        deq(f, torch.zeros(4, 8), solver_kwargs={"homo_typo": "newton"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_solve_matches_cpu():
    f_cpu = tanh_cell(8, 10, 4.0, seed=8)
    g = torch.Generator().manual_seed(8)
    W = torch.randn(10, 10, generator=g)
    W = (W / torch.linalg.matrix_norm(W, 2) * 4.0).cuda()
    x = (0.1 * torch.randn(8, 10, generator=g)).cuda()
    z, _, info = th.homotopy_solver(lambda z: torch.tanh(z @ W.T + x),
                                    torch.zeros(8, 10, device="cuda"), max_iter=2000, tol=1e-4)
    assert z.is_cuda and info["status"].is_cuda
    assert ((f_cpu(z.cpu()) - z.cpu()).norm(dim=1) <= 2e-4).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n, budget", [(10, 40), (128, 30), (128, 2000)])
def test_cuda_info_lives_on_the_device_and_residuals_are_true(n, budget):
    """Every stage on CUDA: dense (n = 10) and secant (n = 128) solves, the warm-up's
    per-row switch at a training budget (30) and Broyden's phase and path (2,000). Every
    tensor of ``info`` is on the device, and a CONVERGED sample's residual, recomputed on
    the CPU, meets the tolerance."""
    g = torch.Generator().manual_seed(9)
    W = torch.randn(n, n, generator=g)
    W = W / torch.linalg.matrix_norm(W, 2) * 3.0
    x = 0.1 * torch.randn(8, n, generator=g)
    W_cuda, x_cuda = W.cuda(), x.cuda()
    z, _, info = th.homotopy_solver(lambda z: torch.tanh(z @ W_cuda.T + x_cuda),
                                    torch.zeros(8, n, device="cuda"), max_iter=budget,
                                    tol=1e-4)
    assert z.is_cuda
    assert all(v.is_cuda for v in info.values() if torch.is_tensor(v))
    residual = (torch.tanh(z.cpu() @ W.T + x) - z.cpu()).norm(dim=1)
    converged = info["converged"].cpu()
    assert (residual[converged] <= 1e-4 * (1 + 1e-3)).all()


def test_readme_configuration_table_matches_defaults():
    """The README's key table is what users read: every key and default must be current."""
    from pathlib import Path

    from torchdeq_homotopy.config import ALL_KEYS

    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`homo_"):
            for name, default in zip(cells[0].split(", "), cells[1].split(", "), strict=False):
                rows[name.strip("`")] = default.strip("`")
    assert set(rows) == set(ALL_KEYS)
    for name, key in ALL_KEYS.items():
        shown = rows[name]
        expected = "none" if key.default is None else str(key.default)
        assert shown == expected or (isinstance(key.default, float)
                                     and float(shown) == key.default), name


def test_warm_up_iterates_while_contracting_then_hands_to_anderson(monkeypatch):
    from torchdeq_homotopy import warmup
    from torchdeq_homotopy.outcome import Budget, Record

    calls, anderson_runs = [], []
    anderson_init = warmup.AndersonIteration.init

    def spy(self, loop):
        anderson_runs.append(1)
        return anderson_init(self, loop)

    monkeypatch.setattr(warmup.AndersonIteration, "init", spy)

    def counted(f):
        def g(z):
            calls.append(1)
            return f(z)
        return g

    def warm_up(f, budget):
        x0 = torch.zeros(4, 6, dtype=torch.float64)
        return warmup.warm_up(counted(f), x0, Record.start(x0, Budget(budget), "abs"), 1e-8)

    f, z_true = linear_problem(4, 6, 0.3)                  # contracts by 0.3 per step
    warm = warm_up(f, 30)
    record = warm.record
    assert len(calls) == record.budget.used <= 20           # fixed-point iteration alone
    assert anderson_runs == []
    torch.testing.assert_close(record.best.z, z_true, rtol=0, atol=1e-7)
    assert torch.equal(warm.newton_start, record.best.z)   # it helped: Newton starts there
    calls.clear()
    f, _ = linear_problem(4, 6, 0.95)                       # contracts, but too slowly
    warm = warm_up(f, 30)
    record = warm.record
    assert record.budget.used == len(calls) <= 30
    assert anderson_runs == [1]                             # after a few steps, Anderson
    assert len(record.abs_trace) == record.budget.used      # one trace column per call
    residual = (f(record.best.z) - record.best.z).norm(dim=1)
    torch.testing.assert_close(record.best.abs_res, residual)  # kept iterate's residual
    calls.clear()
    f = tanh_cell(4, 6, 5.0, seed=3, dtype=torch.float64)   # expansive: the residual grows
    z1 = f(torch.zeros(4, 6, dtype=torch.float64))
    assert ((f(z1) - z1).norm(dim=1) > z1.norm(dim=1)).float().mean() >= 0.5
    warm = warm_up(f, 30)
    assert warm.record.budget.used == len(calls) == 2       # no Anderson on an expanding map
    assert anderson_runs == [1]


def _mixes_and_calls(monkeypatch, f, x0, tol):
    """Anderson's mixes and the calls of f of one homotopy solve (budget 2,000, abs. tol)."""
    from torchdeq_homotopy import warmup

    mixes, calls, changes = [], [], []
    mix, apply = warmup.AndersonIteration._mix, warmup.AndersonIteration._apply

    def spy_mix(self, loop):
        mixes.append(1)
        return mix(self, loop)

    def spy_apply(loop, leave):
        if leave:
            changes.append("fixed-point" if not loop.plain else "anderson")
        return apply(loop, leave)

    monkeypatch.setattr(warmup.AndersonIteration, "_mix", spy_mix)
    monkeypatch.setattr(warmup.AndersonIteration, "_apply", staticmethod(spy_apply))
    z, _, info = get_solver("homotopy")(spied(f, calls), x0, max_iter=2000, tol=tol,
                                        stop_mode="abs")
    return z, info, len(mixes), len(calls), changes


def fixed_point_calls(f, x0, tol):
    """Calls TorchDEQ's fixed-point iteration makes to reach ``tol`` (abs.)."""
    calls = []
    _, _, info = get_solver("fixed_point_iter")(spied(f, calls), x0, max_iter=2000, tol=tol,
                                                stop_mode="abs")
    assert (info["abs_lowest"] <= tol).all()
    return len(calls)


def test_warm_up_takes_fixed_point_steps_where_anderson_gains_nothing(monkeypatch):
    """f(z) = 0.8 P z + b with P a cyclic shift: J's eigenvalues fill a circle around 0, on
    which no polynomial of Anderson's window beats fixed-point iteration's ρ^k. After the
    fixed-point phase hands over (80 calls projected) and Anderson's trial window measures
    no gain, the warm-up goes back to fixed-point steps: it solves in about as many calls
    as TorchDEQ's fixed-point iteration, with few Anderson mixes."""
    n, rho = 64, 0.8
    P = torch.roll(torch.eye(n, dtype=torch.float64), 1, dims=0)
    b = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    f = lambda z: rho * z @ P.T + b                                      # noqa: E731
    z_true = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - rho * P, b.T).T
    x0 = torch.zeros(4, n, dtype=torch.float64)
    z, info, mixes, calls, changes = _mixes_and_calls(monkeypatch, f, x0, 1e-10)
    torch.testing.assert_close(z, z_true, rtol=0, atol=1e-9)
    assert (info["status"] == Status.CONVERGED).all()
    fp = fixed_point_calls(f, x0, 1e-10)
    assert fp > 100
    assert calls <= 1.1 * fp
    assert changes[0] == "fixed-point"
    assert mixes <= 20 < calls - 20              # a trial of Anderson, then fixed-point


def test_warm_up_keeps_anderson_where_it_accelerates(monkeypatch):
    """f(z) = D z + b with D diagonal, eigenvalues spread over [0, 0.97]: fixed-point
    iteration needs hundreds of calls, Anderson far fewer, and it never gives way to
    fixed-point iteration (though fixed-point iteration's first steps, which the fast
    modes dominate, contract faster than its later ones)."""
    n = 64
    d = torch.linspace(0.0, 0.97, n, dtype=torch.float64)
    b = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    f = lambda z: d * z + b                                              # noqa: E731
    x0 = torch.zeros(4, n, dtype=torch.float64)
    z, info, mixes, calls, changes = _mixes_and_calls(monkeypatch, f, x0, 1e-10)
    torch.testing.assert_close(z, b / (1 - d), rtol=0, atol=1e-9)
    assert (info["status"] == Status.CONVERGED).all()
    fp = fixed_point_calls(f, x0, 1e-10)
    assert calls < 0.2 * fp
    assert mixes >= 10 and changes == []


def test_warm_up_anderson_takes_torchdeqs_iterates():
    """The warm-up's Anderson phase with TorchDEQ's absolute regularization, run by the
    shared driving loop, evaluates f at the iterates of TorchDEQ's own ``anderson_solver``
    from the same start."""
    from torchdeq.solver.anderson import anderson_solver

    from torchdeq_homotopy.iteration import drive
    from torchdeq_homotopy.outcome import Budget, Record
    from torchdeq_homotopy.warmup import AndersonIteration, FixedPointIteration, ProgressRule

    f = tanh_cell(3, 20, 1.2, seed=11, dtype=torch.float64)
    x0 = torch.zeros(3, 20, dtype=torch.float64)

    theirs, ours = [], []
    anderson_solver(spied(f, theirs), x0, max_iter=25, tol=1e-300)
    record = Record.start(x0, Budget(25), "abs")
    warm = FixedPointIteration(spied(f, ours), reserve=0).init(record, x0, 1e-300)
    anderson = AndersonIteration(spied(f, ours), ProgressRule(25, 25, 1e-300), relative=False)
    drive(anderson, anderson.init(warm))
    assert len(ours) == len(theirs) == 25
    for mine, reference in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("relative", [True, False])
def test_warm_up_anderson_is_scale_free_with_relative_regularization(relative):
    """With λ relative to the residuals' size the iterates of the scaled map
    f_c(z) = c f(z / c) are c times those of f; TorchDEQ's absolute λ breaks this."""
    from torchdeq_homotopy.iteration import drive
    from torchdeq_homotopy.outcome import Budget, Record
    from torchdeq_homotopy.warmup import AndersonIteration, FixedPointIteration, ProgressRule

    f = tanh_cell(3, 20, 1.2, seed=11, dtype=torch.float64)
    x0 = torch.zeros(3, 20, dtype=torch.float64)

    def iterates(c):
        points = []

        def g(z):
            points.append(z / c)
            return c * f(z / c)
        record = Record.start(x0, Budget(20), "abs")
        warm = FixedPointIteration(g, reserve=0).init(record, x0, 1e-300)
        anderson = AndersonIteration(g, ProgressRule(20, 20, 1e-300), relative=relative)
        drive(anderson, anderson.init(warm))
        return torch.stack(points)

    unit, scaled = iterates(1.0), iterates(1e-3)
    gap = (unit - scaled).abs().max().item()
    assert (gap < 1e-9) if relative else (gap > 1e-3)


@pytest.mark.parametrize("n, model", [(16, "SecantJacobian"), (48, "LowRankJacobian")])
def test_jacobian_models_pair_each_point_with_f_there(monkeypatch, n, model):
    """Samples that leave Broyden's method for the path move to (z0, 0) in an iteration
    where they are idle, while f is known only at their old points. The path's Jacobian
    model (dense at n <= 40: secant updates and refreshes by finite differences; the
    low-rank secant model above) must only ever see a point with f at that point: every
    pair it observes is checked against f itself."""
    from torchdeq_homotopy import linalg, secant
    cls = getattr(linalg, model, None) or getattr(secant, model)
    f = tanh_cell(4, n, 5.0, seed=1, dtype=torch.float64)
    gaps = []
    observe = cls.observe

    def checked(self, z, fz):
        gaps.append(float((fz - f(z)).abs().max()))
        observe(self, z, fz)

    monkeypatch.setattr(cls, "observe", checked)
    _, _, info = get_solver("homotopy")(f, torch.zeros(4, n, dtype=torch.float64),
                                        max_iter=300, tol=1e-8, homo_warmup=0,
                                        homo_secant_patience=3)
    assert len(gaps) > 10                 # Broyden's method stalled: the path's solves ran
    assert max(gaps) <= 1e-12             # (pairing the moved points gave gaps near 1)
    if n == 16:                           # (at n = 48 the path needs a larger budget)
        assert (info["status"] == Status.CONVERGED).all()


@pytest.mark.parametrize("mode", ["forward", "finite_difference", "auto"])
def test_dense_jacobian_matches_autograd(mode):
    f = tanh_cell(5, 7, 2.0, seed=3, dtype=torch.float64)
    z = torch.randn(5, 7, dtype=torch.float64)
    jac, _ = th.linalg.dense_jacobian(f, z, f(z), mode)
    truth = torch.stack([torch.autograd.functional.jacobian(lambda v, i=i: f(
        z.index_put((torch.tensor([i]),), v[None]))[i], z[i]) for i in range(5)])
    torch.testing.assert_close(jac, truth, rtol=1e-6, atol=1e-6)


def test_dense_jacobian_of_a_callable_vmap_cannot_trace():
    """TorchDEQ's backward lambda calls torch.autograd.grad; the columns then come one
    product at a time, and still match autograd's Jacobian."""
    A = torch.randn(3, 4, 4, dtype=torch.float64)
    z0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    out = (A @ torch.tanh(z0).unsqueeze(-1)).squeeze(-1)

    def vjp(y):      # y -> J_gᵀ y, linear in y, as in TorchDEQ's backward pass
        return torch.autograd.grad(out, z0, y, retain_graph=True)[0]

    y = torch.randn(3, 4, dtype=torch.float64)
    jac, _ = th.linalg.dense_jacobian(vjp, y, vjp(y), "finite_difference")
    truth = (A * (1 - torch.tanh(z0.detach()) ** 2)[:, None, :]).transpose(1, 2)
    torch.testing.assert_close(jac, truth, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gather_rows", [True, False], ids=["moved-rows", "full-batch"])
def test_secant_update_meets_the_secant_condition(gather_rows):
    """After observing a step, J Δz = Δf exactly (Broyden's update), for rows that moved;
    the others keep their exact Jacobian. Both update strategies (CPU: gather the moved
    rows; accelerators: masked full-batch update) are checked."""
    f = tanh_cell(4, 5, 3.0, seed=4, dtype=torch.float64)
    cache = th.linalg.SecantJacobian(f, "forward", gather_rows=gather_rows)
    z = torch.randn(4, 5, dtype=torch.float64)
    cache.observe(z, f(z))
    cache.refresh()
    z_new = z.clone()
    z_new[:3] += 0.1 * torch.randn(3, 5, dtype=torch.float64)    # row 3 does not move
    cache.observe(z_new, f(z_new))
    step = (cache.jac @ (z_new - z).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(step[:3], (f(z_new) - f(z))[:3])
    assert cache.exact.tolist() == [False, False, False, True]
    exact_row3 = torch.autograd.functional.jacobian(lambda v: f(torch.cat(
        [z[:3], v[None]]))[3], z[3])
    torch.testing.assert_close(cache.jac[3], exact_row3)


@pytest.mark.parametrize("linear_solver", ["secant", "dense"])
def test_paths_restart_from_a_perturbed_start_after_underflow(linear_solver):
    """homo_step_min so large that the first rejected step underflows: without restarts
    those samples fail with STEP_UNDERFLOW; with them, the samples that restarted and
    converged have a recomputed residual within tol. Every sample starts on the path
    (``homo_newton_iters=0``)."""
    f = tanh_cell(32, 12, 5.0, seed=5)
    x0 = torch.zeros(32, 12)
    opts = dict(max_iter=3000, tol=1e-4, homo_step_min=0.9, homo_newton_iters=0,
                homo_linear_solver=linear_solver)
    _, _, info0 = th.homotopy_solver(f, x0, homo_restarts=0, **opts)
    failed0 = info0["status"] == Status.STEP_UNDERFLOW
    assert failed0.any() and (info0["restarts"] == 0).all()
    z, _, info = th.homotopy_solver(f, x0, homo_restarts=3, **opts)
    restarted = info["restarts"] > 0
    assert restarted.any()
    residual = (f(z) - z).norm(dim=1)
    ok = info["status"] == Status.CONVERGED
    assert (ok & restarted).any()
    assert (residual[ok] <= 1e-4).all()
    assert (info["status"][~ok] != Status.CONVERGED).all()
    assert int((info["status"] == Status.STEP_UNDERFLOW).sum()) < int(failed0.sum())


def test_anderson_hands_over_when_stalled_or_too_slow_for_a_large_budget():
    from torchdeq_homotopy.warmup import ProgressRule
    geometric = [torch.tensor([0.5 ** k]) for k in range(12)]     # halves every call
    rule = ProgressRule(guaranteed=4, budget=100, tol=1e-6, reserve=10, window=5)
    assert not rule.hand_over(3, geometric[:3])                       # guaranteed calls
    assert not rule.hand_over(12, geometric)       # needs 20 - 11 = 9 more <= 10 (the reserve)
    stalled = geometric[:8] + [geometric[7]] * 5
    assert rule.hand_over(13, stalled)                                 # no new best in 5 calls
    slow = [torch.tensor([0.99 ** k]) for k in range(12)]          # needs ~1,370 calls
    assert rule.hand_over(12, slow)                                    # 88 left: Broyden's
    tight = ProgressRule(guaranteed=4, budget=20, tol=1e-6, reserve=10, window=5)
    assert not tight.hand_over(12, slow)          # 8 left < 2 x reserve: keep what progresses
    assert tight.hand_over(13, [torch.tensor([0.99 ** k]) for k in range(8)] + [torch.tensor(
        [0.99 ** 7])] * 5)                                         # unless it stalls
    done = [*geometric[:11], torch.tensor([1e-7])]
    assert rule.hand_over(12, done)                                    # all converged


def test_rates_are_projected_once_per_window_only_with_many_calls_left():
    """With 1,000 calls left a stall is acted on at the next multiple of the window (at most
    window - 1 calls late, under 1 % of the calls left); with 100 left, at once; and
    convergence ends Anderson's phase at any call."""
    from torchdeq_homotopy.warmup import ProgressRule
    stalled = [torch.tensor([0.5 ** k]) for k in range(8)] + [torch.tensor([0.5 ** 7])] * 6
    large = ProgressRule(guaranteed=4, budget=1014, tol=1e-6, reserve=10, window=5)
    assert [large.hand_over(c, stalled) for c in (11, 12, 13, 14, 15)] == [
        False, False, False, False, True]
    small = ProgressRule(guaranteed=4, budget=114, tol=1e-6, reserve=10, window=5)
    assert small.hand_over(11, stalled)
    done = [*stalled, torch.tensor([1e-7])]
    assert large.hand_over(12, done)


def test_small_budget_keeps_anderson_on_a_slowly_contracting_map():
    """At TorchDEQ's training budgets, a benign map solved by Anderson within the budget is
    solved by the homotopy solver with no more evaluations (no handover mid-way)."""
    f, _ = linear_problem(4, 64, 0.9)
    x0 = torch.zeros(4, 64, dtype=torch.float64)
    _, _, info_a = get_solver("anderson")(f, x0, max_iter=60, tol=1e-4)
    assert 20 < int(info_a["nstep"].max()) <= 40     # Anderson needs more than half of 40
    z, _, info = th.homotopy_solver(f, x0, max_iter=40, tol=1e-4, homo_linear_solver="gmres")
    assert bool(info["converged"].all())
    assert float(info["nfe"][0]) <= int(info_a["nstep"].max()) + 2
    assert (f(z) - z).norm(dim=1).max() <= 1e-4


def test_training_budget_takes_broydens_iterates_where_the_map_expands(monkeypatch):
    """At a training budget, rows whose residual grows leave Anderson for Broyden's method
    in the same loop: on a map that expands everywhere, the solver evaluates f at exactly
    the points TorchDEQ's ``broyden`` does. The whole batch switches at once, so its steps
    take the Broyden-only path (no Anderson buffers, no switching verdicts)."""
    from torchdeq_homotopy import warmup

    broyden_only = []
    step = warmup.AndersonIteration._broyden_step

    def counted(self, loop):
        broyden_only.append(loop.warm.calls)
        return step(self, loop)

    monkeypatch.setattr(warmup.AndersonIteration, "_broyden_step", counted)
    f = tanh_cell(3, 10, 5.0, seed=4, dtype=torch.float64)
    x0 = torch.zeros(3, 10, dtype=torch.float64)
    z1 = f(x0)
    assert ((f(z1) - z1).norm(dim=1) > z1.norm(dim=1)).all()        # the first step grows

    ours, theirs = [], []
    th.homotopy_solver(spied(f, ours), x0, max_iter=30, tol=1e-12)
    get_solver("broyden")(spied(f, theirs), x0, max_iter=30, tol=1e-12)
    assert len(ours) == 30
    assert len(broyden_only) == 28                   # every call after the switch at call 2
    for k, (a, b) in enumerate(zip(ours[:20], theirs[:20], strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=f"call {k}")


def test_no_switch_to_broyden_in_the_last_m_calls(monkeypatch):
    """The batch leaves Anderson for Broyden's method only while more than m (Anderson's
    memory, 6) calls are left: on the expansive map above, whose rows all want to switch at
    the first judgement (after 2 calls), a budget of 8 keeps the batch in Anderson, and one
    of 9 switches it."""
    from torchdeq_homotopy import warmup

    joined = []
    join = warmup.AndersonIteration._join

    def counted_join(self, loop):
        joined.append(loop.X.shape[0])
        return join(self, loop)

    monkeypatch.setattr(warmup.AndersonIteration, "_join", counted_join)
    f = tanh_cell(3, 10, 5.0, seed=4, dtype=torch.float64)
    x0 = torch.zeros(3, 10, dtype=torch.float64)
    _, _, info = th.homotopy_solver(f, x0, max_iter=8, tol=1e-12)
    assert joined == [] and float(info["nfe"][0]) == 8
    th.homotopy_solver(f, x0, max_iter=9, tol=1e-12)
    assert joined == [3]


def test_a_few_calls_return_f_at_the_best_iterate_where_f_contracts():
    """At a budget of a few calls on a contracting cell (‖W‖₂ 0.5), the samples that did not
    converge return f at their best iterate (f applied here to ``homo_return='best'``'s
    state, the same iterates), with a residual below the best iterate's (recomputed); the
    converged ones return their best iterate. On an expansive cell at a training budget,
    where the rows take Broyden's steps, every sample returns its best iterate."""
    f = tanh_cell(32, 64, 0.5, seed=600)
    x0 = torch.zeros(32, 64)
    z_best, _, best = th.homotopy_solver(f, x0, max_iter=6, tol=1e-4, homo_return="best")
    z, _, info = th.homotopy_solver(f, x0, max_iter=6, tol=1e-4)
    image = info["image"]
    assert image.sum() >= 8 and not best["image"].any()
    assert not (image & info["converged"]).any()
    torch.testing.assert_close(z[image], f(z_best)[image], rtol=0, atol=1e-6)
    assert torch.equal(z[~image], z_best[~image])
    residual = (f(z) - z).norm(dim=1)
    assert (residual[image] < 0.5 * info["abs_lowest"][image]).all()
    torch.testing.assert_close(info["abs_lowest"], best["abs_lowest"])

    hard = tanh_cell(8, 16, 5.0, seed=4)
    _, _, info = th.homotopy_solver(hard, torch.zeros(8, 16), max_iter=30, tol=1e-6)
    assert not info["converged"].all() and not info["image"].any()


def test_training_budget_gives_each_row_the_method_that_converges():
    """One batch, rows of two kinds: a slowly contracting linear map (Anderson's) and an
    expansive tanh cell on which Anderson fails. At ``max_iter`` 30 every row meets the
    tolerance, where TorchDEQ's Anderson leaves the expansive rows unsolved."""
    n = 8
    contracting, _ = linear_problem(2, n, 0.97, seed=1)
    expansive = tanh_cell(2, n, 2.0, seed=0, dtype=torch.float64)

    def f(z):
        return torch.cat([contracting(z[:2]), expansive(z[2:])])

    x0 = torch.zeros(4, n, dtype=torch.float64)
    z_anderson, _, _ = get_solver("anderson")(f, x0, max_iter=30, tol=1e-8)
    assert ((f(z_anderson) - z_anderson).norm(dim=1)[2:] > 1e-8).any()
    z, _, info = th.homotopy_solver(f, x0, max_iter=30, tol=1e-8)
    assert ((f(z) - z).norm(dim=1) <= 1e-8).all()
    assert bool(info["converged"].all())


def test_a_budget_cut_krylov_solve_still_takes_and_evaluates_its_step():
    """With fewer evaluations than the Krylov dimension, Newton–Krylov's one GMRES solve
    is cut short; its partial solution must still be taken and evaluated (the budget keeps
    one evaluation for it), not lost with the best iterate left at the start."""
    f, z_true = linear_problem(4, 64, 0.9)
    x0 = torch.zeros(4, 64, dtype=torch.float64)
    start = (f(x0) - x0).norm(dim=1)
    z, _, info = th.newton_krylov_solver(f, x0, max_iter=20, tol=1e-12,
                                         homo_krylov_rtol=1e-12)   # GMRES wants them all
    assert float(info["nfe"][0]) <= 20
    assert bool(((f(z) - z).norm(dim=1) < 0.5 * start).all())
    assert (z - z_true).norm() < (x0 - z_true).norm()


def test_eisenstat_walker_term_follows_its_formula_and_safeguards():
    """η_k = 0.9 (h_k / h_{k-1})², raised to 0.9 η_{k-1}² where that exceeds 0.1, at least
    0.5 target / h_k, at most 0.9; η_first when there is no previous step."""
    from torchdeq_homotopy.linalg import eisenstat_walker

    h = torch.tensor([0.1, 0.5, 0.1, 1e-6, 2.0, 0.3, 0.3], dtype=torch.float64)
    prev = torch.tensor([1.0, 1.0, 1.0, 1e-5, 1.0, float("inf"), float("inf")],
                        dtype=torch.float64)
    eta_prev = torch.tensor([0.01, 0.01, 0.5, 0.01, 0.01, 0.3, 0.9], dtype=torch.float64)
    target = torch.tensor([0.0, 0.0, 0.0, 1e-6, 0.0, 0.0, 0.0], dtype=torch.float64)
    expected = [0.9 * 0.1 ** 2,                 # fast progress: tight
                0.9 * 0.5 ** 2,                 # slow progress: loose
                max(0.9 * 0.1 ** 2, 0.9 * 0.5 ** 2),   # 0.9 · 0.5² = 0.225 > 0.1 guards
                0.5,                            # near the target: no oversolving
                0.9,                            # residual grew: capped at η_max
                0.02,                           # first step of a Newton run
                0.02]                           # ... whatever an earlier run's last η was
    eta = eisenstat_walker(h, prev, eta_prev, 0.02, target)
    torch.testing.assert_close(eta, torch.tensor(expected, dtype=torch.float64))


def test_newton_krylov_gmres_tolerance_is_the_forcing_term_of_each_step(monkeypatch):
    """Under homo_forcing='eisenstat_walker' every GMRES solve of a Newton run gets
    η_k from the residuals of its own right-hand sides (||rhs|| = ||z - f(z)|| at λ = 1);
    under 'constant' every solve gets homo_krylov_rtol. Both reach the fixed point."""
    import torchdeq_homotopy.bordered as bordered

    calls = []
    real_gmres = bordered.gmres

    def spy(matvec, b, *, rtol, **kwargs):
        calls.append((float(b.norm()), float(torch.as_tensor(rtol).flatten()[0])))
        return real_gmres(matvec, b, rtol=rtol, **kwargs)

    monkeypatch.setattr(bordered, "gmres", spy)
    f = tanh_cell(1, 64, 0.9, seed=3, dtype=torch.float64)
    x0 = torch.zeros(1, 64, dtype=torch.float64)
    for forcing in ("eisenstat_walker", "constant"):
        calls.clear()
        z, _, info = th.newton_krylov_solver(f, x0, max_iter=200, tol=1e-10, stop_mode="abs",
                                             homo_forcing=forcing, homo_krylov_rtol=0.05)
        assert bool(info["converged"].all()) and float((f(z) - z).norm()) <= 1e-10
        assert len(calls) >= 3
        if forcing == "constant":
            assert [rtol for _, rtol in calls] == pytest.approx([0.05] * len(calls))
            continue
        assert calls[0][1] == pytest.approx(0.05)
        eta_prev = 0.05
        for (h_prev, _), (h, rtol) in itertools.pairwise(calls):
            eta = 0.9 * (h / h_prev) ** 2
            if 0.9 * eta_prev ** 2 > 0.1:
                eta = max(eta, 0.9 * eta_prev ** 2)
            eta = min(0.9, max(eta, 0.5 * 1e-10 / h))
            assert rtol == pytest.approx(eta, rel=1e-9)
            eta_prev = eta


def test_anderson_guarantee_yields_when_the_budget_cannot_be_met():
    """Within Anderson's guaranteed calls, with budget to spare (at least twice the
    reserve left), a sample whose rate would miss the whole budget hands over; a rate that
    makes it keeps Anderson, and at training budgets the guarantee holds regardless."""
    from torchdeq_homotopy.warmup import ProgressRule

    def history(rate, start=0.1, calls=6):
        return [torch.tensor([start * rate ** k]) for k in range(calls)]

    # now 0.1 · 0.95⁵ = 0.077: 1e-4 needs log(1.3e-3) / log(0.95) ≈ 130 more calls
    slow, fast = history(0.95), history(0.5)            # fast: about 5 more calls
    plenty = ProgressRule(guaranteed=30, budget=100, tol=1e-4, reserve=30)
    assert plenty.hand_over(6, slow)                    # 94 left < 130 needed
    assert not plenty.hand_over(6, fast)
    generous = ProgressRule(guaranteed=30, budget=400, tol=1e-4, reserve=30)
    assert not generous.hand_over(6, slow)              # 394 left: it makes it
    training = ProgressRule(guaranteed=30, budget=40, tol=1e-4, reserve=30)
    assert not training.hand_over(6, slow)              # 34 left < 2 · 30: guaranteed


def test_a_training_budget_switches_when_a_row_is_projected_to_need_over_half_the_calls_left():
    """At a training budget the batch stays on Anderson only while every open row's rate
    over the last two calls is projected to reach the tolerance within ``SWITCH_SHARE``
    (half) of the calls left: with 30 left and residual 1e-3 toward 1e-6, a rate of 0.5
    per call (10 calls) stays, 0.7 (19.4 calls: within all 30, not within 15) switches the
    batch to Broyden's method, as does a residual that grew. At the first judgement, on a
    one-call rate, all 30 count: 0.7 stays there. A batch holding one late row switches
    as a whole, every row with its own Broyden model."""
    from torchdeq_homotopy import warmup
    from torchdeq_homotopy.outcome import Budget, Record

    n, m, tol = 4, 6, 1e-6

    def judged(rates, recent_powers):
        """Whether a batch of rows at these rates switches, after the given history."""
        bsz = len(rates)
        x0 = torch.zeros(bsz, n, dtype=torch.float64)
        record = Record.start(x0, Budget(40), "abs")
        assert record.budget.spend(10) and record.budget.left == 30
        rates = torch.tensor(rates, dtype=torch.float64)
        now = torch.full((bsz,), 1e-3, dtype=torch.float64)
        warm = warmup.WarmupLoop(record=record, tol=tol, fz=x0, z=x0, prev_z=None,
                                 first_z=x0, first_fz=x0, first_res=now,
                                 hopeless=torch.zeros(bsz, dtype=bool))
        warm.best_recent.append(now)
        X = torch.randn(bsz, m, n, dtype=torch.float64)
        anderson = warmup.AndersonIteration(lambda z: z, rule=None, m=m, switch=True)
        loop = warmup.AndersonLoop(warm=warm, X=X, F=X + 0.1, gram=None, rhs=None, k=m,
                                   columns=31)
        loop.recent.extend(now / rates ** p for p in recent_powers)
        anderson._judge(loop, now)
        return loop.model

    for powers, switches in (((2, 1), [False, True, True]), ((1,), [False, False, True])):
        for rate, switch in zip((0.5, 0.7, 1.1), switches, strict=True):
            assert (judged([rate], powers) is not None) == switch, (powers, rate)
    model = judged([0.5, 0.5, 1.1], (2, 1))
    assert model is not None and model.next_point().shape[0] == 3      # the whole batch switched
