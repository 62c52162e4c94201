"""Bad input, numerical failure, determinism, persistence and gradients, tested like a
solver library: each test fails on the defect it guards against."""
import copy
import io
import math
import pickle
from itertools import pairwise

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchdeq import core as torchdeq_core
from torchdeq import get_deq as torchdeq_get_deq
from torchdeq import reset_deq
from torchdeq.solver import get_solver

import torchdeq_homotopy as th
from homotopy_zoo.models import ImplicitClassifier
from torchdeq_homotopy import Status
from torchdeq_homotopy.linalg import gmres

# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("key, value, message", [
    ("homo_bogus", 1, "unknown key 'homo_bogus'"),
    ("homo_krylov_dimm", 10, "Did you mean 'homo_krylov_dim'"),
    ("homo_corrector_tol", -1.0, "homo_corrector_tol=-1.0"),
    ("homo_type", "arclength", "choose one of \\['fixed_point', 'newton'\\]"),
    ("homo_field", "sideways", "choose one of \\['direct', 'residual', 'fixed_point'\\]"),
    ("homo_krylov_dim", 2.5, "must be of type int"),
    ("homo_strict", "yes", "must be of type bool"),
])
def test_every_plugin_key_is_validated(key, value, message):
    with pytest.raises(th.ConfigError, match=message):
        th.get_deq(**{key: value})


def test_checked_get_deq_rejects_unknown_keys_and_takes_solver_shorthand():
    with pytest.raises(th.ConfigError, match="Did you mean 'f_stop_mode'"):
        th.get_deq(stop_mode="rel")
    with pytest.raises(th.ConfigError, match="not a registered solver"):
        th.get_deq(f_solver="homotopyy")
    with pytest.raises(th.ConfigError, match="not a registered core"):
        th.get_deq(core="slised")
    with pytest.raises(th.ConfigError, match="do not also pass"):
        th.get_deq(solver="homotopy", f_solver="anderson")
    deq = th.get_deq(solver="homotopy")
    assert deq.f_solver is th.homotopy_solver and deq.b_solver is th.homotopy_solver
    # After the import TorchDEQ's own factory reads 'solver' as well (tests/test_registry.py).
    assert torchdeq_get_deq(solver="homotopy").f_solver is th.homotopy_solver


def test_checked_get_deq_otherwise_behaves_like_torchdeqs():
    ours = th.get_deq(f_solver="anderson", f_max_iter=17, f_tol=1e-5, core="indexing")
    theirs = torchdeq_get_deq(f_solver="anderson", f_max_iter=17, f_tol=1e-5, core="indexing")
    assert type(ours) is type(theirs)
    assert issubclass(type(ours), torchdeq_core.DEQIndexing)
    assert (ours.f_max_iter, ours.f_tol, ours.f_solver) == (
        theirs.f_max_iter, theirs.f_tol, theirs.f_solver)


# ----------------------------------------------------------------------------- inputs


def test_function_output_mismatches_name_the_fix():
    x0 = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="state's shape"):
        th.homotopy_solver(lambda z: z.sum(dim=1), x0)
    with pytest.raises(TypeError, match="cast"):
        th.homotopy_solver(lambda z: z.double(), x0)
    with pytest.raises(TypeError, match="must return a tensor"):
        th.homotopy_solver(lambda z: z.tolist(), x0)
    with pytest.raises(TypeError, match="floating-point"):
        th.newton_krylov_solver(torch.cos, torch.zeros(3, dtype=torch.int32))


def test_core_rejects_mismatched_learned_point_shape():
    deq = torchdeq_get_deq(core="homoode")
    deq(lambda z: torch.tanh(z), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="channels"):
        deq(lambda z: torch.tanh(z), torch.zeros(2, 5, 4))


# ----------------------------------------------------------------------------- failure


def test_krylov_breakdown_and_singular_systems_stay_finite():
    b = torch.randn(3, 5, dtype=torch.float64)
    x, ok = gmres(lambda v: v, b, rtol=1e-12, max_iter=5)          # breakdown: exact
    torch.testing.assert_close(x, b)
    assert ok.all()
    x, ok = gmres(lambda v: torch.zeros_like(v), b, rtol=1e-6, max_iter=5)   # A = 0
    assert torch.isfinite(x).all() and not ok.any()


@pytest.mark.parametrize("required", [None, torch.tensor([True, False, True, False])])
def test_gmres_with_a_lagged_stopping_test_solves_the_same_systems(required):
    """The sync-free stopping test (read one iteration late, as on CUDA) costs at most one
    more product and gives the solution of torch.linalg.solve."""
    g = torch.Generator().manual_seed(3)
    A = torch.eye(12, dtype=torch.float64) + 0.3 * torch.randn(4, 12, 12, generator=g,
                                                                dtype=torch.float64)
    b = torch.randn(4, 12, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(A, b)

    def solve(lagged):
        products = 0

        def matvec(v):
            nonlocal products
            products += 1
            return (A @ v.unsqueeze(-1)).squeeze(-1)

        x, ok = gmres(matvec, b, rtol=1e-10, max_iter=40, required=required,
                      lagged_stop=lagged)
        return x, ok, products

    x_now, ok_now, n_now = solve(False)
    x_late, ok_late, n_late = solve(True)
    rows = slice(None) if required is None else required
    assert ok_now[rows].all() and ok_late[rows].all()
    torch.testing.assert_close(x_late[rows], exact[rows], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(x_now[rows], exact[rows], rtol=1e-8, atol=1e-8)
    assert n_now <= n_late <= n_now + 1


def test_gmres_with_a_lagged_stopping_test_makes_no_product_when_no_row_is_required():
    """The first stopping test is read at once even where later ones are read late (as on
    CUDA): a solve for which no row is required makes no product, where a late first
    test let one through, an evaluation charged to the solver's budget at every tracker
    iteration that had no exact solve to make."""
    A = torch.eye(6, dtype=torch.float64).expand(3, 6, 6)
    products = 0

    def matvec(v):
        nonlocal products
        products += 1
        return (A @ v.unsqueeze(-1)).squeeze(-1)

    x, ok = gmres(matvec, torch.ones(3, 6, dtype=torch.float64), rtol=1e-10, max_iter=10,
                  required=torch.zeros(3, dtype=torch.bool), lagged_stop=True)
    assert products == 0 and not ok.any() and (x == 0).all()


def test_solver_with_lagged_krylov_stops_still_converges(monkeypatch):
    """Newton–Krylov with every GMRES stopping test read late (what CUDA runs): every
    sample still ends on a true equilibrium, within the budget."""
    import torchdeq_homotopy.linalg as linalg

    class AlwaysLagged(linalg.LaggedAll):
        def __init__(self, device, lagged=None):
            super().__init__(device, lagged=True)

    monkeypatch.setattr(linalg, "LaggedAll", AlwaysLagged)
    g = torch.Generator().manual_seed(5)
    W = torch.randn(64, 64, generator=g)
    W = W / torch.linalg.matrix_norm(W, 2) * 1.5
    x = 0.1 * torch.randn(4, 64, generator=g)
    f = lambda z: torch.tanh(z @ W.T + x)                                # noqa: E731
    z, _, info = th.newton_krylov_solver(f, torch.zeros(4, 64), max_iter=500, tol=1e-6)
    assert info["krylov_products"] > 0 and info["nfe"][0] <= 500
    assert ((f(z) - z).norm(dim=1) <= 1e-6).all() and info["converged"].all()


def test_turning_points_are_traversed(record_tangent_lams):
    """On expansive cells the path turns back in λ (tangents with dλ/ds < 0, where
    I - λJ is singular); the bordered solves stay regular and every sample still ends on a
    true equilibrium."""
    from torchdeq_homotopy.path import Budget, PathTracker, Record, TrackerOptions

    g = torch.Generator().manual_seed(3)
    W = torch.randn(10, 10, generator=g, dtype=torch.float64)
    W = W / torch.linalg.matrix_norm(W, 2) * 4.0
    x = 0.1 * torch.randn(16, 10, generator=g, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ W.T + x)                             # noqa: E731
    x0 = torch.zeros(16, 10, dtype=torch.float64)
    tracker = PathTracker(f, x0, TrackerOptions(newton_iters=0))
    tangent_lams = record_tangent_lams(tracker)
    with torch.no_grad():
        result = tracker.run(Record.start(x0, Budget(4000), "abs"), 1e-9)
    assert (result.status == Status.CONVERGED).all()
    assert ((f(result.z_best) - result.z_best).norm(dim=1) <= 1e-9).all()
    backward = (torch.stack(tangent_lams) < 0).any(dim=0)
    assert backward.any()


def test_homoode_integrator_failure_is_reported_not_raised():
    deq = torchdeq_get_deq(core="homoode", homo_init="zeros", homo_options={"max_num_steps": 2},
                           homo_rtol=1e-9, homo_atol=1e-9)
    x = torch.randn(3, 2, 4)
    z_out, info = deq(lambda z: torch.tanh(3 * z + x), torch.zeros_like(x))
    assert (info["status"] == Status.MAX_EVALS).all()
    assert torch.isfinite(z_out[-1]).all()


def test_homoode_nonfinite_endpoint_flagged_per_sample():
    deq = torchdeq_get_deq(core="homoode", homo_init="zeros", homo_method="rk4",
                           homo_options={"step_size": 0.5})
    x = torch.ones(3, 2, 2)
    x[1] = float("nan")
    _, info = deq(lambda z: torch.tanh(z + x), torch.zeros_like(x))
    assert info["status"].tolist() == [Status.CONVERGED, Status.NONFINITE, Status.CONVERGED]


# ----------------------------------------------------------------------------- determinism


def test_solver_is_bitwise_deterministic_on_cpu():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 12, generator=g) / 12 ** 0.5 * 4
    x = 0.1 * torch.randn(8, 12, generator=g)
    f = lambda z: torch.tanh(z @ W.T + x)                             # noqa: E731
    runs = [th.homotopy_solver(f, torch.zeros(8, 12), max_iter=1500, tol=1e-5)
            for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][2]["abs_trace"], runs[1][2]["abs_trace"])


@pytest.mark.parametrize("deq_kwargs", [{"core": "homoode"},
                                        {"core": "sliced", "f_solver": "homotopy"}])
def test_training_step_is_bitwise_deterministic_on_cpu(deq_kwargs):
    def one_run():
        torch.manual_seed(0)
        model = ImplicitClassifier(1, 10, width=8, **deq_kwargs)
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        images, labels = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
        for _ in range(2):
            reset_deq(model)
            loss = torch.nn.functional.cross_entropy(model(images)[0], labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(one_run(), one_run())


# ----------------------------------------------------------------------------- persistence


def _trained_model(**deq_kwargs):
    torch.manual_seed(0)
    model = ImplicitClassifier(1, 10, width=8, **deq_kwargs)
    model.train()
    reset_deq(model)
    model(torch.randn(2, 1, 8, 8))
    return model.eval()


def test_homoode_models_survive_deepcopy_pickle_save_and_state_dict():
    model = _trained_model(core="homoode")
    images = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        expected = model(images)[0]
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            torch.testing.assert_close(clone(images)[0], expected)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        torch.testing.assert_close(torch.load(buffer, weights_only=False)(images)[0], expected)
        fresh = ImplicitClassifier(1, 10, width=8, core="homoode").eval()
        fresh.load_state_dict(model.state_dict())          # learned z0 included
        torch.testing.assert_close(fresh(images)[0], expected)


def test_torchdeq_cores_with_configured_homotopy_solver_persist_by_state_dict():
    """TorchDEQ's gradient closures (backward_factory's local functions) cannot be pickled,
    so whole-model pickling of its cores fails; deepcopy and state_dict are the supported
    paths, and the configured solver (a functools.partial) survives both."""
    kwargs = dict(core="sliced", solver="homotopy", homo_type="newton", ift=True)
    model = _trained_model(**kwargs)
    images = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        expected = model(images)[0]
        clone = copy.deepcopy(model)
        assert clone.deq.f_solver.keywords == {"homo_type": "newton"}
        torch.testing.assert_close(clone(images)[0], expected)
        fresh = ImplicitClassifier(1, 10, width=8, **kwargs).eval()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(fresh(images)[0], expected)
    with pytest.raises((AttributeError, pickle.PicklingError)):
        pickle.dumps(model)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("deq_kwargs", [
    {"core": "homoode"}, {"core": "homoode", "homo_adjoint": True},
    {"core": "sliced", "f_solver": "homotopy"},
    {"core": "sliced", "f_solver": "homotopy", "b_solver": "homotopy", "ift": True},
    {"core": "indexing", "f_solver": "newton_krylov", "n_states": 2},
])
def test_returned_states_require_grad_exactly_when_they_should(deq_kwargs):
    torch.manual_seed(0)
    model = ImplicitClassifier(1, 10, width=8, **deq_kwargs)
    images = torch.randn(2, 1, 8, 8)
    model.train()
    reset_deq(model)
    x = model.stem(images)
    z_out, _ = model.deq(lambda z: model.cell(z, x), torch.zeros_like(x))
    assert all(z.requires_grad for z in z_out)
    model.eval()
    with torch.no_grad():
        z_out, _ = model.deq(lambda z: model.cell(z, x), torch.zeros_like(x))
    assert not any(z.requires_grad for z in z_out)


def test_gradcheck_ift_with_homotopy_backward():
    g = torch.Generator().manual_seed(1)
    W = 0.8 * torch.randn(4, 4, generator=g, dtype=torch.float64) / 2
    deq = th.get_deq(solver="homotopy", ift=True, f_tol=1e-12, b_tol=1e-12, f_max_iter=300,
                     b_max_iter=300)

    def run(u):
        z_out, _ = deq(lambda z: torch.tanh(z @ W.T + u), torch.zeros_like(u))
        return z_out[-1]

    u = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (u,), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- properties

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=2)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bsz=st.integers(1, 5), feature_shape=shapes, dtype=st.sampled_from(["f32", "f64"]),
       gain=st.floats(0.1, 5.0), seed=st.integers(0, 2**16),
       solver=st.sampled_from(["homotopy", "newton_krylov"]),
       stop_mode=st.sampled_from(["abs", "rel"]))
def test_contract_holds_for_random_problems(bsz, feature_shape, dtype, gain, seed, solver,
                                            stop_mode):
    dtype = torch.float32 if dtype == "f32" else torch.float64
    g = torch.Generator().manual_seed(seed)
    shape = (bsz, *feature_shape)
    n = max(1, int(torch.tensor(feature_shape).prod()) if feature_shape else 1)
    W = torch.randn(n, n, generator=g, dtype=dtype)
    W = W / torch.linalg.matrix_norm(W, 2).clamp_min(1e-6) * gain
    x = torch.randn(bsz, n, generator=g, dtype=dtype)

    def f(z):
        flat = z.reshape(bsz, n) if feature_shape else z.reshape(bsz, 1)
        return torch.tanh(flat @ W.T + x).reshape(z.shape)

    x0 = torch.zeros(shape, dtype=dtype) if feature_shape else torch.zeros(bsz, dtype=dtype)
    tol = 1e-4
    z, traj, info = get_solver(solver)(f, x0, max_iter=400, tol=tol, stop_mode=stop_mode,
                                       indexing=[3, 50])
    assert z.shape == x0.shape and z.dtype == dtype and len(traj) == 2
    assert torch.isfinite(z).all()
    fz = f(z)
    abs_res = (fz - z).reshape(bsz, -1).norm(dim=1)
    rel_res = abs_res / (fz.reshape(bsz, -1).norm(dim=1) + 1e-9)
    scale = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(info["abs_lowest"], abs_res, rtol=1e-3, atol=scale)
    torch.testing.assert_close(info["rel_lowest"], rel_res, rtol=1e-3, atol=scale)
    stop = abs_res if stop_mode == "abs" else rel_res
    lowest, trace = ((info["abs_lowest"], info["abs_trace"]) if stop_mode == "abs"
                     else (info["rel_lowest"], info["rel_trace"]))
    assert (lowest <= trace.min(dim=1).values * (1 + 1e-6)).all()   # best iterate kept
    converged = info["status"] == Status.CONVERGED
    assert torch.equal(converged, info["converged"])
    assert (stop[converged] <= tol * (1 + 1e-3)).all()              # never a false claim
    best = info["abs_lowest"] if stop_mode == "abs" else info["rel_lowest"]
    assert torch.equal(converged, best <= tol)                       # and never a missed one
    if solver == "homotopy" and gain <= 0.9:                         # a contraction: solvable
        assert converged.all()
    assert set(info["status"].tolist()) <= {int(s) for s in Status if s != Status.RUNNING}
    assert info["abs_trace"].shape[0] == bsz and info["nfe"].le(400).all()



option_values = {
    "homo_type": st.sampled_from(["fixed_point", "newton"]),
    "homo_predictor": st.sampled_from(["tangent", "secant", "ode"]),
    "homo_jvp": st.sampled_from(["finite_difference", "forward", "auto"]),
    "homo_warmup": st.sampled_from([0, 5, 30]),
    "homo_newton_iters": st.sampled_from([0, 1, 6]),
    "homo_linear_solver": st.sampled_from(["auto", "secant", "gmres", "dense"]),
    "homo_secant_rank": st.sampled_from([1, 4, 32]),
    "homo_broyden_memory": st.sampled_from([None, 1, 3]),
    "homo_secant_patience": st.sampled_from([None, 1, 5]),
    "homo_krylov_dim": st.sampled_from([1, 5, 40]),
    "homo_forcing": st.sampled_from(["eisenstat_walker", "constant"]),
    "homo_restarts": st.sampled_from([0, 2]),
    "homo_corrector_iters": st.sampled_from([1, 4]),
    "homo_step_init": st.sampled_from([0.01, 0.1, 1.0]),
    "homo_return": st.sampled_from(["image", "best"]),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(options=st.fixed_dictionaries({}, optional=option_values), n=st.integers(1, 9),
       bsz=st.integers(1, 4), gain=st.sampled_from([0.5, 1.5, 4.0, 8.0]),
       budget=st.sampled_from([0, 1, 2, 5, 60, 300]), stop_mode=st.sampled_from(["abs", "rel"]),
       seed=st.integers(0, 2**16))
def test_contract_holds_under_any_combination_of_options(options, n, bsz, gain, budget,
                                                         stop_mode, seed):
    """Any combination of the solver's keys, any budget from zero evaluations: the budget is
    kept, the returned iterate is the best one and its residual is the reported one (or,
    where ``info['image']``, f there: never for a converged sample, and finite), and
    CONVERGED is claimed exactly where it holds (recomputed here). A random sweep of this
    kind (23,000 solves) found two crashes: a budget of one on a path-only solve, and a
    secant model absorbing more products than the state has entries."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=torch.float64)
    W = W / torch.linalg.matrix_norm(W, 2).clamp_min(1e-6) * gain
    x = torch.randn(bsz, n, generator=g, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ W.T + x)                              # noqa: E731
    tol = 1e-6
    z, _, info = get_solver("homotopy")(f, torch.zeros(bsz, n, dtype=torch.float64),
                                        max_iter=budget, tol=tol, stop_mode=stop_mode,
                                        **options)
    fz = f(z)
    abs_res = (fz - z).norm(dim=1)
    stop = abs_res if stop_mode == "abs" else abs_res / (fz.norm(dim=1) + 1e-9)
    lowest = info["abs_lowest"] if stop_mode == "abs" else info["rel_lowest"]
    if budget == 0:                                    # f never called: residual unknown
        assert torch.isinf(lowest).all() and not info["converged"].any()
        return
    image = info["image"]
    assert not (image & info["converged"]).any() and torch.isfinite(z[image]).all()
    if options.get("homo_return") == "best" or options.get("homo_warmup") == 0:
        assert not image.any()
    torch.testing.assert_close(lowest[~image], stop[~image], rtol=1e-6, atol=1e-12)
    assert torch.equal(info["converged"][~image], stop[~image] <= tol * (1 + 1e-9))
    assert info["nfe"].le(budget).all() and info["abs_trace"].shape[1] >= 1


def test_residuals_match_torchdeqs_formula_and_mark_non_finite_rows_inf():
    """abs = ||f(z) - z||, rel = abs / (||f(z)|| + 1e-9) on finite rows (recomputed here);
    a NaN or inf anywhere in a row of z or f(z) gives inf for both, never NaN."""
    from torchdeq_homotopy.path import residuals

    z = torch.randn(5, 3, dtype=torch.float64)
    fz = torch.randn(5, 3, dtype=torch.float64)
    fz[1, 0] = float("nan")
    fz[2, 2] = float("inf")
    z[3, 1] = float("-inf")
    abs_res, rel_res = residuals(z, fz)
    for row in (0, 4):
        truth = torch.linalg.vector_norm(fz[row] - z[row])
        torch.testing.assert_close(abs_res[row], truth)
        torch.testing.assert_close(rel_res[row], truth / (torch.linalg.vector_norm(fz[row])
                                                          + 1e-9))
    assert torch.isinf(abs_res[1:4]).all() and torch.isinf(rel_res[1:4]).all()


def _plain_newton_residuals(f, z, steps):
    """||f(z_k) - z_k|| of plain Newton, z ← z + (I - J)^{-1} (f(z) - z), J by autograd."""
    eye = torch.eye(z.shape[1], dtype=z.dtype)
    history = []
    for _ in range(steps):
        fz = f(z)
        history.append((fz - z).norm(dim=1))
        jac = torch.autograd.functional.jacobian(lambda v: f(v).sum(0), z, vectorize=True)
        z = z + torch.linalg.solve(eye - jac.permute(1, 0, 2), fz - z)
    return torch.stack(history, dim=1)


def test_newton_that_climbs_before_converging_is_not_sent_onto_the_path():
    """On this expansive cell plain Newton from z0 = 0 converges for every sample, some
    after their residual climbed above its best; the solver must let them converge at
    λ = 1 instead of restarting them on the (longer) homotopy path."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 32, generator=g).double()      # the benchmark's ‖W‖ = 3 cell
    W = W / torch.linalg.matrix_norm(W, 2) * 3.0
    x = 0.1 * torch.randn(64, 32, generator=g).double()
    f = lambda z: torch.tanh(z @ W.T + x)                             # noqa: E731
    z0 = torch.zeros(64, 32, dtype=torch.float64)
    res = _plain_newton_residuals(f, z0, 10)
    converged_at = (res < 1e-10).float().argmax(dim=1)
    assert (res[:, -1] < 1e-10).all()                     # independent truth: Newton works
    before = torch.arange(res.shape[1] - 1) < converged_at[:, None]
    climbed = ((res[:, 1:] > torch.cummin(res, dim=1).values[:, :-1]) & before).any(dim=1)
    assert climbed.sum() >= 3                                  # and the rule is exercised
    with torch.no_grad():
        z, _, info = get_solver("homotopy")(f, z0, max_iter=2000, tol=1e-8)
    assert (info["status"] == Status.CONVERGED).all()
    assert ((f(z) - z).norm(dim=1) <= 1e-8).all()
    assert (info["lam_trace"] == 1).all()                 # no sample left λ = 1


def test_driving_loop_steps_the_newton_homotopy_to_a_dense_solve_within_its_budget():
    """init / step / terminate, driven by hand, path only (no Newton phase): each step
    spends at least one evaluation, λ stays in [0, 1], and the loop ends at the solution of
    z = A z + b from torch.linalg.solve, for a divergent A (spectral radius 2). The Newton
    homotopy's path is regular here; the fixed-point homotopy's escapes to infinity at
    λ = 1/2, where I − λA is singular (README, Limitations)."""
    from torchdeq_homotopy.path import Budget, PathTracker, Record, TrackerOptions

    g = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    eig = torch.tensor([2.0, -1.5, 0.5, 0.3, -0.2, 0.1], dtype=torch.float64)
    A = Q @ torch.diag(eig) @ Q.T
    b = torch.randn(4, 6, generator=g, dtype=torch.float64)
    f = lambda z: z @ A.T + b                                          # noqa: E731
    exact = torch.linalg.solve(torch.eye(6, dtype=torch.float64) - A, b.T).T
    x0 = torch.zeros(4, 6, dtype=torch.float64)
    tracker = PathTracker(f, x0, TrackerOptions(newton_iters=0, type="newton"))
    with torch.no_grad():
        loop = tracker.init(Record.start(x0, Budget(500), "abs"), 1e-10)
        used, lams = [loop.budget.used], []
        while not tracker.terminate(loop):
            loop = tracker.step(loop)
            used.append(loop.budget.used)
            lams.append(loop.state.path.y[:, -1].clone())
        result = tracker.result(loop)
    assert all(later > earlier for earlier, later in pairwise(used))
    assert used[-1] <= 500
    lam = torch.stack(lams)
    assert ((lam >= 0) & (lam <= 1)).all()
    assert (result.status == Status.CONVERGED).all()
    torch.testing.assert_close(result.z_best, exact, rtol=0, atol=1e-8)


def test_dense_solves_past_the_batched_factorization_limit_match_torch_solve():
    """n = 160 > ``BATCHED_LU_MAX``, batch 3, under torch's default threads: the dense path
    (``homo_linear_solver='dense'``) solves z = A z + b, A divergent (spectral radius 2),
    to torch.linalg.solve's solution, matrix by matrix. torch 2.14.1's batched CPU LU with
    two threads raised an error there ("Pivots given to lu_solve ...") or never returned."""
    from torchdeq_homotopy.linalg import BATCHED_LU_MAX, lu_factor

    n = 160
    assert n > BATCHED_LU_MAX
    g = torch.Generator().manual_seed(11)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.linspace(-2.0, 2.0, n, dtype=torch.float64) + 0.013   # none at 1
    A = Q @ torch.diag(eig) @ Q.T
    b = torch.randn(3, n, generator=g, dtype=torch.float64)
    exact = torch.stack([torch.linalg.solve(torch.eye(n, dtype=torch.float64) - A, row)
                         for row in b])
    f = lambda z: z @ A.T + b                                          # noqa: E731
    z, _, info = get_solver("homotopy")(f, torch.zeros(3, n, dtype=torch.float64),
                                        max_iter=2000, tol=1e-9, homo_linear_solver="dense")
    assert (info["status"] == Status.CONVERGED).all()
    torch.testing.assert_close(z, exact, rtol=1e-6, atol=1e-6)
    M = torch.randn(4, n, n, generator=g, dtype=torch.float64)
    lu, pivots, info = lu_factor(M)
    rhs = torch.randn(4, n, 1, generator=g, dtype=torch.float64)
    reference = torch.stack([torch.linalg.solve(M[i], rhs[i]) for i in range(4)])
    torch.testing.assert_close(torch.linalg.lu_solve(lu, pivots, rhs), reference)
    assert (info == 0).all()


def test_path_only_solve_spends_its_single_evaluation_on_the_start():
    """Path tracking from λ = 0 (no warm-up, no Newton phase) at a budget of one evaluation:
    f(x0), which the homotopy needs, is the solve's one evaluation and its best iterate
    (before, the start was evaluated twice, and a budget of one ended with no trace at all)."""
    calls = []
    W = 3.0 * torch.eye(4).roll(1, dims=0)

    def f(z):
        calls.append(1)
        return torch.tanh(z @ W.T + 0.5)

    x0 = torch.zeros(2, 4)
    z, _, info = get_solver("homotopy")(f, x0, max_iter=1, tol=1e-8, homo_warmup=0,
                                        homo_newton_iters=0)
    assert len(calls) == 1 and info["nfe"].tolist() == [1.0, 1.0]
    torch.testing.assert_close(z, x0)
    torch.testing.assert_close(info["abs_lowest"], (torch.tanh(torch.full((2, 4), 0.5)))
                               .norm(dim=1))
    assert (info["status"] == Status.MAX_EVALS).all()


@pytest.mark.parametrize("solver", ["homotopy", "newton_krylov"])
def test_a_budget_of_zero_returns_the_start_unevaluated_as_torchdeqs_solvers_do(solver):
    """TorchDEQ's sliced core gives each of ``n_states`` slices ``f_max_iter // n_states``
    calls: 0 when ``f_max_iter`` < ``n_states``. TorchDEQ's solvers then return x0 without
    calling f; the plugin's raised. A negative budget still raises."""
    calls = []

    def f(z):
        calls.append(1)
        return torch.tanh(z + 1)

    x0 = torch.randn(3, 4)
    z, traj, info = get_solver(solver)(f, x0, max_iter=0, tol=1e-3, indexing=[0])
    assert not calls and torch.equal(z, x0) and len(traj) == 1
    assert (info["status"] == Status.MAX_EVALS).all() and not info["converged"].any()
    assert torch.isinf(info["abs_lowest"]).all() and info["nfe"].eq(0).all()
    with pytest.raises(ValueError, match=">= 0"):
        get_solver(solver)(f, x0, max_iter=-1)
    # Through TorchDEQ's own sliced core, with backward: the same config as with Anderson.
    W = torch.randn(4, 4, requires_grad=True)
    outputs = {}
    for f_solver in (solver, "anderson"):
        deq = torchdeq_get_deq(core="sliced", f_solver=f_solver, n_states=2, f_max_iter=1,
                               ift=True)
        z_out, _ = deq(lambda z: torch.tanh(z @ W.T + 1), torch.zeros(3, 4))
        z_out[-1].sum().backward()
        outputs[f_solver] = z_out[-1].detach()
    torch.testing.assert_close(outputs[solver], outputs["anderson"])


@pytest.mark.parametrize("solver", ["homotopy", "newton_krylov"])
def test_a_tolerance_of_zero_spends_the_whole_budget_as_torchdeqs_solvers_do(solver):
    """TorchDEQ's solvers take ``tol=0`` (run every iteration, keep the best iterate); the
    plugin's raised. Now they spend the whole budget on every sample, report CONVERGED
    exactly where the returned iterate's float32 residual is 0, and end at least as close
    to the solution of the linear system as a run with a tolerance of 1e-4. A negative
    tolerance still raises."""
    torch.manual_seed(3)
    A = torch.randn(6, 6)
    A = 0.9 * A / torch.linalg.matrix_norm(A, 2)
    b = torch.randn(4, 6)
    exact = torch.linalg.solve(torch.eye(6) - A, b.T).T
    f = lambda z: z @ A.T + b                                   # noqa: E731
    calls = []

    def counted(z):
        calls.append(1)
        return f(z)

    z, _, info = get_solver(solver)(counted, torch.zeros(4, 6), max_iter=25, tol=0.0)
    assert len(calls) == 25 and info["nfe"].eq(25).all()
    assert torch.equal(info["converged"], (f(z) - z).norm(dim=1) == 0)
    loose, _, _ = get_solver(solver)(f, torch.zeros(4, 6), max_iter=25, tol=1e-4)
    assert ((z - exact).norm(dim=1) <= (loose - exact).norm(dim=1) + 1e-6).all()
    torch.testing.assert_close(info["abs_lowest"], (f(z) - z).norm(dim=1))
    with pytest.raises(ValueError, match=">= 0"):
        get_solver(solver)(f, torch.zeros(4, 6), tol=-1e-3)


@pytest.mark.parametrize("predictor", ["tangent", "ode"])
def test_the_default_dtype_does_not_change_a_float32_solve(predictor):
    """Under ``torch.set_default_dtype(torch.float64)`` a float32 solve takes the same
    iterates as under float32: a step-size factor made from Python scalars took the default
    dtype, mixed float64 into the path's state, and raised "expected scalar type"."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(48, 48, generator=g)
    W = W / torch.linalg.matrix_norm(W, 2) * 6.0
    x = 0.1 * torch.randn(4, 48, generator=g)
    f = lambda z: torch.tanh(z @ W.T + x)                       # noqa: E731
    runs = []
    previous = torch.get_default_dtype()
    for default in (torch.float32, torch.float64):
        torch.set_default_dtype(default)
        try:
            z, _, info = get_solver("homotopy")(f, torch.zeros(4, 48, dtype=torch.float32),
                                                max_iter=400, tol=1e-5,
                                                stop_mode="rel", homo_secant_patience=5,
                                                homo_predictor=predictor)
        finally:
            torch.set_default_dtype(previous)
        runs.append((z, info))
    (z32, info32), (z64, info64) = runs
    assert (info32["lam_trace"] < 1).any()               # some sample tracked the path
    assert z64.dtype == torch.float32 and info64["abs_lowest"].dtype == torch.float32
    assert torch.equal(z64, z32) and torch.equal(info64["nfe"], info32["nfe"])


def test_a_sample_whose_start_is_not_finite_costs_the_batch_nothing():
    """A NaN start (f(x0) not finite) can be solved by no phase. It counted as contracting
    fast (inf <= 0.7 · inf), so fixed-point iteration ran the whole budget on a batch whose
    other samples converged in 10 calls. Now it is NONFINITE at no cost: the others take
    the clean batch's iterates and evaluations."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 8, generator=g)
    W = 0.5 * W / torch.linalg.matrix_norm(W, 2)
    x = 0.5 * torch.randn(4, 8, generator=g)
    f = lambda z: torch.tanh(z @ W.T + x)                       # noqa: E731
    clean_z, _, clean = get_solver("homotopy")(f, torch.zeros(4, 8), max_iter=300, tol=1e-5)
    x0 = torch.zeros(4, 8)
    x0[1] = float("nan")
    z, _, info = get_solver("homotopy")(f, x0, max_iter=300, tol=1e-5)
    assert info["status"].tolist() == [Status.CONVERGED, Status.NONFINITE,
                                       Status.CONVERGED, Status.CONVERGED]
    assert torch.equal(info["nfe"], clean["nfe"]) and int(clean["nfe"][0]) < 30
    keep = torch.tensor([0, 2, 3])
    assert torch.equal(z[keep], clean_z[keep])


@pytest.mark.parametrize("seed", [3, 4])
def test_fast_fixed_point_iteration_that_would_miss_the_tolerance_hands_over(seed):
    """At 20 evaluations and relative tolerance 1e-6, fixed-point iteration on this cell
    contracts at about 0.5 per call, too slowly for the tolerance. It was held as long as
    it contracted faster than 0.7, and ended where TorchDEQ's fixed-point iteration ends;
    now it hands over to the accelerators and every sample meets the tolerance, as with
    Broyden's method at the same number of evaluations (recomputed residuals)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(64, 64, generator=g)
    W = 0.97 * W / torch.linalg.matrix_norm(W, 2)
    x = 0.1 * torch.randn(8, 64, generator=g)
    f = lambda z: torch.tanh(z @ W.T + x)                       # noqa: E731

    def solved(solver, max_iter):
        z, _, _ = get_solver(solver)(f, torch.zeros(8, 64), max_iter=max_iter, tol=1e-6,
                                     stop_mode="rel")
        fz = f(z)
        return ((fz - z).norm(dim=1) / fz.norm(dim=1) <= 1e-6).float().mean().item()

    assert solved("fixed_point_iter", 20) <= 0.5
    assert solved("broyden", 19) == 1.0                 # 19 steps: 20 evaluations
    assert solved("homotopy", 20) == 1.0


def test_fixed_point_iteration_on_a_tiny_state_hands_over_after_2n_calls():
    """On a 2-entry state contracting at 0.6 per call, fixed-point iteration needs 26 calls
    for 1e-5, within the 30 it was allowed; Broyden's method solves a linear system of n
    unknowns in at most 2n steps (TorchDEQ's takes 5 calls here). Fixed-point iteration
    projected to need more than 2n calls now hands over: 10 calls, not 26, to the same
    solution (torch.linalg.solve)."""
    A = 0.6 * torch.tensor([[math.cos(1.0), -math.sin(1.0)], [math.sin(1.0), math.cos(1.0)]],
                           dtype=torch.float64)
    b = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(2, dtype=torch.float64) - A, b.T).T
    calls = {}
    for solver in ("fixed_point_iter", "homotopy"):
        count = []

        def f(z, count=count):
            count.append(1)
            return z @ A.T + b

        z, _, _ = get_solver(solver)(f, torch.zeros(2, 2, dtype=torch.float64), max_iter=500,
                                     tol=1e-5)
        calls[solver] = len(count)
        assert ((z @ A.T + b - z).norm(dim=1) <= 1e-5).all()
        torch.testing.assert_close(z, exact, atol=1e-4, rtol=0)
    assert calls["fixed_point_iter"] > 20 and calls["homotopy"] <= 12


def test_the_path_reuses_the_warm_ups_evaluation_at_the_start():
    """f(x0), which the path's homotopy needs, is the warm-up's first call: after the
    warm-up, no call of f evaluates the whole batch at x0 again (the path's own first
    evaluation covers only the rows that start on it, with the others elsewhere)."""
    g = torch.Generator().manual_seed(10)
    W = torch.randn(64, 64, generator=g)
    W = W / torch.linalg.matrix_norm(W, 2) * 6.0
    x = 0.1 * torch.randn(8, 64, generator=g)
    whole_batch_at_x0 = []

    def f(z):
        whole_batch_at_x0.append(bool((z == 0).all()))
        return torch.tanh(z @ W.T + x)

    _, _, info = get_solver("homotopy")(f, torch.zeros(8, 64), max_iter=600, tol=1e-5,
                                        stop_mode="rel", homo_secant_patience=5)
    assert (info["lam_trace"] < 1).any()                 # some sample tracked the path
    assert whole_batch_at_x0[0] and not any(whole_batch_at_x0[1:])


@pytest.mark.parametrize("solver, budget", [("homotopy", 30), ("newton_krylov", 60)])
def test_func_gets_contiguous_states_and_the_reported_residual_is_the_users(solver, budget):
    """The iterates are often rows of a history buffer (Anderson's, batch stride m·n). A
    user's f that flattens the whole batch, ``z.view(-1)``, raised on them ("view size is
    not compatible"), and matmul kernels on them rounded differently from the returned,
    contiguous state, so ``abs_lowest`` could differ from the residual the user recomputes
    (2.98e-8 reported where the user's f gives exactly 0). f now always gets a contiguous
    state, and the reported lowest residual is bitwise the recomputed one."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(24, 24, generator=g)
    W = 1.5 * W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(8, 24, generator=g)
    seen_contiguous = []

    def f(z):
        seen_contiguous.append(z.is_contiguous())
        flat = z.view(-1)                         # needs a contiguous batch
        return torch.tanh((flat.view(z.shape)) @ W.T + x)

    z, _, info = get_solver(solver)(f, torch.zeros(8, 24), max_iter=budget, tol=1e-6)
    assert all(seen_contiguous)
    recomputed = (f(z) - z).norm(dim=1)
    assert torch.equal(info["abs_lowest"], recomputed)


@pytest.mark.parametrize("seed", [1, 3])
def test_a_training_budget_judges_rates_from_the_first_step(seed):
    """At a training budget (30 calls) on an expansive 64-wide cell the relative residual
    falls by less than 0.2 per call at first: too slow for the calls left. The warm-up
    now sees that after the first step and hands every sample to Broyden's method at
    once, whose iterates are then Broyden's from z0 (``homo_warmup=0``; float64, the
    same to rounding). It waited for five fixed-point steps (or an Anderson step) before,
    and ended elsewhere (0.70 and 0.23 away)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(64, 64, generator=g, dtype=torch.float64)
    W = 3.0 * W / torch.linalg.matrix_norm(W, 2)
    x = 0.5 * torch.randn(8, 64, generator=g, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ W.T + x)                       # noqa: E731
    x0 = torch.zeros(8, 64, dtype=torch.float64)
    kwargs = dict(max_iter=30, tol=1e-4, stop_mode="rel")
    z, _, _ = th.homotopy_solver(f, x0, **kwargs)
    z_broyden, _, _ = th.homotopy_solver(f, x0, homo_warmup=0, **kwargs)
    torch.testing.assert_close(z, z_broyden, rtol=1e-9, atol=1e-10)


def _host_syncs():
    """``benchmarks/host_syncs.py`` as a module (its counter of host reads)."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location("host_syncs", bench / "host_syncs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("cell", ["benign (512 wide, ‖W‖₂ 1.5)",
                                  "training budget (64 wide, ‖W‖₂ 4, 30 calls)"])
def test_the_warm_up_reads_the_device_about_once_per_call_as_fixed_point_iteration(
        cell, monkeypatch):
    """Each host read of a device value is a stall on CUDA. Counted on CPU, over the same
    Python code: TorchDEQ's fixed-point iteration reads once per call of f (the counter's
    independent check), and the homotopy solver's warm-up (fixed-point iteration, then
    Anderson, switched as a batch to Broyden's method at a training budget) at most once
    per call and three times more in all (the hand-overs, Anderson's first verdict); the
    switch itself reads nothing more. TorchDEQ's Anderson reads about twice per call."""
    from torchdeq_homotopy import warmup

    host_syncs = _host_syncs()
    spec = host_syncs.CELLS[cell]
    calls, counter = host_syncs.count("fixed_point_iter", spec, prefix="torchdeq")
    assert counter.total == calls
    switches = 0
    join = warmup.AndersonIteration._join

    def counted_join(self, loop):
        nonlocal switches
        switches += 1
        return join(self, loop)

    monkeypatch.setattr(warmup.AndersonIteration, "_join", counted_join)
    calls, counter = host_syncs.count("homotopy", spec)
    stalls = host_syncs.stalls(counter)
    assert 0 < stalls.total() <= calls + 3, (stalls, switches)
    assert switches == (1 if "training" in cell else 0)
    calls, counter = host_syncs.count("anderson", spec, prefix="torchdeq")
    assert counter.total >= 1.8 * calls


def test_broyden_and_the_path_read_the_device_per_iteration_not_per_product():
    """On the accelerator code path (no read to skip masked work; GMRES's stopping test
    read late, from its first test on): Broyden's phase reads once per call of f, as its
    loop's test, and no GMRES runs a product for rows that need none (the budget is spent
    as on CPU's path); a path-only solve reads a few times per tracker iteration, less
    than once per call of f (most of its calls are Jacobian-vector products)."""
    host_syncs = _host_syncs()
    broyden = host_syncs.CELLS["Broyden's phase (128 wide, ‖W‖₂ 6)"]
    calls_cpu, _ = host_syncs.count("homotopy", broyden, accelerator=False)
    calls, counter = host_syncs.count("homotopy", broyden)
    assert calls == calls_cpu and host_syncs.stalls(counter).total() <= calls + 8
    calls, counter = host_syncs.count("homotopy", host_syncs.CELLS["path only (128 wide, ‖W‖₂ 6)"])
    stalls = host_syncs.stalls(counter)
    assert calls > 100 and stalls.total() <= 0.75 * calls, (calls, stalls)


@pytest.mark.parametrize("cell", ["benign (512 wide, ‖W‖₂ 1.5)",
                                  "training budget (64 wide, ‖W‖₂ 4, 30 calls)",
                                  "Broyden's phase (128 wide, ‖W‖₂ 6)",
                                  "path only (128 wide, ‖W‖₂ 6)",
                                  "dense (32 wide, ‖W‖₂ 6)"])
def test_the_accelerator_code_path_gives_the_cpu_paths_solves(cell, monkeypatch):
    """On accelerators the solver reads no device value to skip masked work
    (``host.reads_cheap`` is False there): it applies updates under empty masks, copies
    the best iterate by masked select, updates every row's secant Jacobian, and keeps the
    Broyden phase's model through iterations with no sample in the phase (restarting it
    on a return, where CPU builds a new one). Run on CPU with that switch off, in float64
    (where rounding cannot tip a chaotic iteration), each solve (warm-up, per-sample
    switch, Broyden's phase, secant path with GMRES, dense path with Broyden's restart)
    makes the CPU code path's evaluations and statuses, and lands on its states."""
    from torchdeq_homotopy import host

    spec = _host_syncs().CELLS[cell]
    import sweep  # on the path once _host_syncs has run

    f, x0 = sweep.tanh_cell(spec["n"], spec["gain"], spec["bias"], spec.get("seed", 200),
                            bsz=spec["bsz"], dtype=torch.float64)

    def solve():
        with torch.no_grad():
            return get_solver("homotopy")(f, x0, max_iter=spec["budget"], tol=spec["tol"],
                                          stop_mode="rel", **spec.get("homotopy", {}))

    z_cpu, _, info_cpu = solve()
    monkeypatch.setattr(host, "reads_cheap", lambda t: False)
    z_acc, _, info_acc = solve()
    assert torch.equal(info_acc["status"], info_cpu["status"])
    assert torch.equal(info_acc["nstep"], info_cpu["nstep"])
    assert info_acc["krylov_products"] == info_cpu["krylov_products"]
    torch.testing.assert_close(z_acc, z_cpu, rtol=0, atol=1e-10)
