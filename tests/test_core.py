"""The HomoODE core: gradients, the learned initial point, TorchDEQ compatibility."""
import copy
import io

import pytest
import torch
from torchdeq import get_deq, reset_deq

import torchdeq_homotopy as th
from homotopy_zoo.models import Cell, ImplicitClassifier, ODEClassifier

F64 = torch.float64


def small_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(2, 2, 3, padding=1).double()
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=F64))
    gn = torch.nn.GroupNorm(1, 2).double()
    x = torch.randn(2, 2, 3, 3, generator=g, dtype=F64)
    return conv, gn, x


@pytest.mark.parametrize("adjoint", [False, True])
def test_gradcheck_wrt_input_features_and_parameters(adjoint):
    conv, gn, _ = small_problem()
    # Step memory off: each call of gradcheck's finite differences must integrate with the
    # same steps (with it, a training forward starts where the last one's controller left).
    deq = get_deq(core="homoode", homo_adjoint=adjoint, homo_rtol=1e-10, homo_atol=1e-10,
                  homo_init="zeros", homo_step_memory=False)
    x = torch.randn(1, 2, 3, 3, dtype=F64, requires_grad=True)
    weight = conv.weight.detach().clone().requires_grad_()

    def run(x_in, w):
        out, _ = deq(lambda z: gn(torch.tanh(torch.nn.functional.conv2d(z, w, conv.bias,
                                                                        padding=1)) + x_in),
                     torch.zeros_like(x_in))
        return out[-1]

    assert torch.autograd.gradcheck(run, (x, weight), atol=1e-6, rtol=1e-5)


def test_second_derivatives_by_finite_differences_and_a_clear_error_under_adjoint():
    """Double backward (gradient penalties) through the direct method, against finite
    differences of the first derivatives (``gradgradcheck``); the adjoint method's backward
    is not differentiable, and says so, naming the fix, instead of failing later."""
    conv, gn, _ = small_problem(2)
    x = torch.randn(1, 2, 3, 3, dtype=F64, requires_grad=True)

    def run(x_in, adjoint=False):
        deq = get_deq(core="homoode", homo_adjoint=adjoint, homo_method="rk4",
                      homo_options={"step_size": 0.25}, homo_init="zeros")
        return deq(lambda z: gn(torch.tanh(conv(z)) + x_in), torch.zeros_like(x_in))[0][-1]

    assert torch.autograd.gradgradcheck(run, (x,), atol=1e-6, rtol=1e-5)
    grad, = torch.autograd.grad(run(x, adjoint=True).square().sum(), x)      # first order
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().max()) > 0
    with pytest.raises(RuntimeError, match="homo_adjoint=False"):
        torch.autograd.grad(run(x, adjoint=True).square().sum(), x, create_graph=True)


def test_adjoint_gradients_equal_direct_backpropagation():
    conv, gn, x0 = small_problem(1)
    grads = {}
    for adjoint in (False, True):
        conv.zero_grad()
        x = x0.clone().requires_grad_()
        deq = get_deq(core="homoode", homo_adjoint=adjoint, homo_rtol=1e-10, homo_atol=1e-10)
        out, _ = deq(lambda z, x=x: gn(torch.tanh(conv(z)) + x), torch.zeros_like(x))
        (out[-1] ** 2).sum().backward()
        grads[adjoint] = (x.grad.clone(), conv.weight.grad.clone(), gn.weight.grad.clone())
        gn.zero_grad()
    for a, b in zip(grads[False], grads[True], strict=False):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_closure_inputs_finds_parameters_and_features():
    cell = Cell(4, dropout=0.0)
    x = torch.randn(1, 4, 3, 3, requires_grad=True) * 2      # non-leaf features
    found = th.adjoint.closure_inputs(lambda z: cell(z, x), torch.zeros(1, 4, 3, 3))
    ids = {id(t) for t in found}
    assert id(x) in ids
    assert all(id(p) in ids for p in cell.parameters())


def test_learned_initial_point_moves_toward_endpoints_and_persists():
    torch.manual_seed(0)
    deq = get_deq(core="homoode", homo_init_every=1, homo_init_lr=0.5, homo_field="residual")
    x = torch.randn(4, 3, 5, 5) + torch.tensor([2.0, -1.0, 0.5]).view(1, 3, 1, 1)
    func = lambda z: 0.5 * z + x                                # noqa: E731
    deq.train()
    losses = [float(deq(func, torch.zeros_like(x))[1]["init_loss"]) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]          # the floor is the spatial spread of z(1)
    point = deq.init_point.clone()
    assert point.shape == (3,)
    endpoint = deq(func, torch.zeros_like(x))[0][-1].detach()
    assert (point - endpoint.mean(dim=(0, 2, 3))).abs().max() < 0.5 * (
        endpoint.mean(dim=(0, 2, 3)).abs().max())
    fresh = get_deq(core="homoode")
    fresh.load_state_dict(deq.state_dict())
    torch.testing.assert_close(fresh.init_point, deq.init_point)
    deq.eval()
    before = deq.init_point.clone()
    deq(func, torch.zeros_like(x))
    torch.testing.assert_close(deq.init_point, before)          # frozen in eval mode


def test_learned_start_cuts_function_evaluations():
    torch.manual_seed(0)
    x = torch.randn(8, 2, 4, 4) * 3 + 5
    func = lambda z: -(z - x)                                   # noqa: E731  # decays to x
    learned = get_deq(core="homoode", homo_init_every=1, homo_init_lr=1.0,
                      homo_field="residual")
    zeros = get_deq(core="homoode", homo_init="zeros", homo_field="residual")
    learned.train()
    for _ in range(40):
        learned(func, torch.zeros_like(x))
    nfe_learned = learned(func, torch.zeros_like(x))[1]["nstep"][0]
    nfe_zeros = zeros(func, torch.zeros_like(x))[1]["nstep"][0]
    assert nfe_learned < nfe_zeros


def test_info_reports_endpoint_residual_against_recomputation():
    deq = get_deq(core="homoode").eval()            # the default measures outside training
    x = torch.randn(3, 2, 4, 4)
    func = lambda z: torch.tanh(z + x)                          # noqa: E731
    z_out, info = deq(func, torch.zeros_like(x))
    z = z_out[-1]
    torch.testing.assert_close(info["abs_lowest"], (func(z) - z).flatten(1).norm(dim=1))
    assert info["nstep"][0] >= 6 and (info["status"] == th.Status.CONVERGED).all()


@pytest.mark.parametrize("deq_kwargs", [
    {"core": "sliced", "f_solver": "anderson", "f_max_iter": 30},
    {"core": "indexing", "f_solver": "homotopy", "f_max_iter": 60, "n_states": 2},
    {"core": "sliced", "f_solver": "homotopy", "b_solver": "homotopy", "ift": True},
    {"core": "homoode"},
    {"core": "homoode", "homo_adjoint": True},
])
def test_same_model_runs_under_every_core(deq_kwargs):
    torch.manual_seed(0)
    model = ImplicitClassifier(1, 10, width=8, **deq_kwargs)
    images, labels = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    model.train()
    reset_deq(model)
    logits, _info = model(images)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    assert logits.shape == (4, 10) and logits.requires_grad
    assert model.stem[0].weight.grad is not None and model.cell.conv1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        assert model(images)[0].shape == (4, 10)


def test_dropout_mask_fixed_within_a_solve_and_reset_between():
    torch.manual_seed(0)
    model = ImplicitClassifier(1, 10, width=8, dropout=0.5)
    model.train()
    masks = []
    original = model.cell.drop.forward

    def spy(x):
        out = original(x)
        masks.append(((out == 0) & (x != 0)).clone())
        return out

    model.cell.drop.forward = spy
    reset_deq(model)
    model(torch.randn(2, 1, 8, 8))
    first_solve = masks[:]
    assert len(first_solve) > 3 and all(torch.equal(m, first_solve[0]) for m in first_solve)
    masks.clear()
    reset_deq(model)
    model(torch.randn(2, 1, 8, 8))
    assert not torch.equal(masks[0], first_solve[0])


def test_paper_layout_parameter_count():
    assert sum(p.numel() for p in ImplicitClassifier(3, 10, width=64).parameters()) == 132938


def test_whole_model_save_load_and_deepcopy():
    torch.manual_seed(0)
    model = ImplicitClassifier(1, 10, width=8)
    model.train()
    model(torch.randn(2, 1, 8, 8))
    model.eval()
    images = torch.randn(2, 1, 8, 8)
    expected = model(images)[0]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(images)[0], expected)
    torch.testing.assert_close(copy.deepcopy(model)(images)[0], expected)


def test_node_and_anode_share_stem_and_readout_layout():
    node, anode = ODEClassifier(1, 10, width=8), ODEClassifier(1, 10, width=8, augment=4)
    assert type(node.stem) is type(anode.stem) and len(node.readout) == len(anode.readout)
    logits, info = anode(torch.randn(2, 1, 8, 8))
    assert logits.shape == (2, 10) and info["nstep"][0] > 0


def test_bad_core_config_is_rejected():
    with pytest.raises(th.ConfigError, match="homo_field"):
        get_deq(core="homoode", homo_field="sideways")
    with pytest.raises(th.ConfigError, match="homo_adjoint"):
        get_deq(core="homoode", homo_adjiont=True)
    # a step of 0 or below: torchdiffeq raised "unsupported range: 0 -> inf", or a
    # first_step of 0 underflowed every forward into the RK4 fallback
    for options in ({"step_size": 0.0}, {"step_size": -0.1}, {"first_step": 0},
                    {"step_size": "a quarter"}):
        with pytest.raises(th.ConfigError, match="step_size and first_step"):
            get_deq(core="homoode", homo_method="rk4", homo_options=options)
    get_deq(core="homoode", homo_options={"first_step": 0.005, "max_num_steps": 100})


def test_solver_kwargs_override_core_keys_for_one_call_only():
    deq = get_deq(core="homoode", homo_method="rk4", homo_options={"step_size": 0.5},
                  homo_init="zeros")
    x = torch.randn(2, 3, 2)
    func = lambda z: torch.tanh(z + x)                          # noqa: E731
    assert deq(func, torch.zeros_like(x))[1]["nstep"][0] == 8   # rk4, 2 steps
    _, info = deq(func, torch.zeros_like(x), solver_kwargs={"homo_options": {"step_size": 0.25}})
    assert info["nstep"][0] == 16
    assert deq(func, torch.zeros_like(x))[1]["nstep"][0] == 8   # construction config kept
    with pytest.raises(th.ConfigError):
        deq(func, torch.zeros_like(x), solver_kwargs={"homo_metod": "rk4"})


def test_zero_start_is_the_published_plain_odeint():
    """homo_init='zeros' is what the published code does: torchdiffeq's odeint of the cell
    from zeros over [0, 1] (dopri5, rtol = atol = 1e-3). Same endpoint, same gradients."""
    from torchdiffeq import odeint

    torch.manual_seed(0)
    model = ImplicitClassifier(1, 10, width=8, core="homoode", homo_init="zeros").double()
    model.train()
    images = torch.randn(3, 1, 8, 8, dtype=F64)
    reset_deq(model)
    logits, _ = model(images)
    grads = torch.autograd.grad(logits.square().sum(), list(model.parameters()))

    x = model.stem(images)
    z_end = odeint(lambda _t, z: model.cell(z, x), torch.zeros_like(x),
                   torch.tensor([0.0, 1.0], dtype=F64), method="dopri5", rtol=1e-3,
                   atol=1e-3)[-1]
    logits_ref = model.readout(z_end)
    grads_ref = torch.autograd.grad(logits_ref.square().sum(), list(model.parameters()))
    torch.testing.assert_close(logits, logits_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref)


def test_learned_start_is_the_papers_init_layer_on_its_schedule():
    """z0 equals GroupNorm(32) of a 1×1 convolution on a field of ones (torch's own modules
    with the same weights), and training follows the paper's loop: SGD on that forward's
    SmoothL1 loss at the first forward and every ``homo_init_every``-th after it."""
    torch.manual_seed(0)
    every, lr, channels = 3, 0.1, 64
    deq = get_deq(core="homoode", homo_init_every=every, homo_init_lr=lr,
                  homo_method="rk4", homo_options={"step_size": 0.5})
    x = torch.randn(2, channels, 3, 3)
    func = lambda z: torch.tanh(z + x)                          # noqa: E731
    deq.eval()
    deq(func, torch.zeros_like(x))                              # materialise z0
    layer = torch.nn.Sequential(torch.nn.Conv2d(1, channels, 1, bias=False),
                                torch.nn.GroupNorm(min(32, channels), channels))
    with torch.no_grad():
        layer[0].weight.copy_(deq.init_weight.view(channels, 1, 1, 1))
    ones = torch.ones(1, 1, 3, 3)
    reference = layer(ones)[0, :, 0, 0]
    torch.testing.assert_close(deq.init_point, reference.detach(), rtol=1e-5, atol=1e-5)
    assert bool((deq.init_point.abs() > 0.5).all())            # unit scale from the start
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr)
    deq.train()
    for step in range(7):
        z_end = deq(func, torch.zeros_like(x))[0][-1].detach()
        optimizer.zero_grad()
        if step % every == 0:
            loss = torch.nn.functional.smooth_l1_loss(layer(ones).expand_as(z_end), z_end)
            loss.backward()
            optimizer.step()
        torch.testing.assert_close(deq.init_point, layer(ones)[0, :, 0, 0].detach(),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_training_forward_without_autograd_steps_the_initial_point_as_with_it(context):
    """A training-mode forward under ``no_grad`` or ``inference_mode`` (an evaluation
    without ``model.eval()``) steps z0 exactly as a plain one, as BatchNorm updates its
    statistics there; and a core whose first forward ran in inference mode still trains."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 3)
    func = lambda z: torch.tanh(z + x)                          # noqa: E731
    plain = get_deq(core="homoode", homo_init_every=1, homo_init_lr=0.5).eval()
    plain(func, torch.zeros_like(x))                            # creates z0, unchanged
    start = plain.init_point.clone()
    quiet = copy.deepcopy(plain)
    plain.train(), quiet.train()
    for _ in range(3):
        plain(func, torch.zeros_like(x))
        with context():
            quiet(func, torch.zeros_like(x))
    assert (plain.init_point - start).abs().max() > 1e-3
    torch.testing.assert_close(quiet.init_point, plain.init_point)
    first = get_deq(core="homoode", homo_init_every=1, homo_init_lr=0.5).eval()
    with torch.inference_mode():
        first(func, torch.zeros_like(x))                        # creates z0's buffers
    before = first.init_point.clone()
    first.train()
    xg = x.clone().requires_grad_()
    first(lambda z: torch.tanh(z + xg), torch.zeros_like(x))[0][-1].sum().backward()
    assert xg.grad is not None and bool(torch.isfinite(xg.grad).all())
    assert not torch.equal(first.init_point, before)


@pytest.mark.parametrize("training", [False, True])
def test_a_compiled_model_gives_the_eager_output_gradient_and_initial_point(training):
    """``torch.compile`` of a model holding the core: torchdiffeq's adaptive integrators
    cannot be traced (data-dependent shapes), so the integration runs eagerly inside the
    compiled model; output, input gradient and the learned z0 equal the eager model's."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    results = []
    for compiled in (False, True):
        torch.manual_seed(1)                      # the same random z0 for both
        deq = get_deq(core="homoode").train(training)

        def model(x, deq=deq):
            return deq(lambda z: torch.tanh(conv(z) + x), torch.zeros_like(x))[0][-1]

        run = torch.compile(model, backend="aot_eager") if compiled else model
        out = run(x)
        grad, = torch.autograd.grad(out.square().sum(), x)
        results.append((out.detach(), grad, deq.init_point))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager)


def test_step_callbacks_on_func_see_the_same_steps_as_plain_odeint():
    """A func carrying torchdiffeq's step callbacks has them called at every tried step,
    exactly as torchdiffeq calls them on a plain odeint of the same field."""
    from torchdiffeq import odeint

    x = torch.randn(3, 2, 4, 4, dtype=F64)

    def recorder(log, accepted):
        return lambda t, y, dt: log.append((float(t), float(dt), accepted))

    class Field(torch.nn.Module):
        def forward(self, _t, z):
            return torch.tanh(2.0 * z + x)

    reference, ours = [], []
    field = Field()
    field.callback_accept_step = recorder(reference, True)
    field.callback_reject_step = recorder(reference, False)
    odeint(field, torch.zeros_like(x), torch.tensor([0.0, 1.0], dtype=F64), method="dopri5",
           rtol=1e-3, atol=1e-3)

    def func(z):
        return torch.tanh(2.0 * z + x)

    func.callback_accept_step = recorder(ours, True)
    func.callback_reject_step = recorder(ours, False)
    _, info = get_deq(core="homoode", homo_init="zeros")(func, torch.zeros_like(x))
    assert len(reference) >= 2 and reference[0][0] == 0.0
    assert [a for _, _, a in ours] == [a for _, _, a in reference]
    assert [v for t, h, _ in ours for v in (t, h)] == pytest.approx(
        [v for t, h, _ in reference for v in (t, h)])
    # dopri5 is FSAL: 1 first-step probe + 1 initial evaluation + 6 per tried step
    assert info["nstep"][0] == 2 + 6 * len(ours)


@pytest.mark.parametrize("setting, training, measure",
                         [(True, True, True), (False, False, False), (None, True, False),
                          (None, False, True)])
def test_endpoint_residual_costs_exactly_one_evaluation_and_can_be_skipped(setting, training,
                                                                           measure):
    """homo_residual: True always measures, False never, None (default) outside training."""
    x = torch.randn(3, 2, 4, 4)
    calls = [0]

    def func(z):
        calls[0] += 1
        return torch.tanh(z + x)

    deq = get_deq(core="homoode", homo_init="zeros", homo_residual=setting)
    deq.train(training)
    z_out, info = deq(func, torch.zeros_like(x))
    assert calls[0] == int(info["nstep"][0]) + int(measure)
    if measure:
        z = z_out[-1]
        torch.testing.assert_close(info["abs_lowest"],
                                   (torch.tanh(z + x) - z).flatten(1).norm(dim=1))
    else:
        assert torch.isnan(info["abs_lowest"]).all() and torch.isnan(info["rel_lowest"]).all()


def _tried_steps(func_or_field, log):
    """Record (λ, h) of every step torchdiffeq tries, and which were accepted."""
    func_or_field.callback_step = lambda t, y, dt: log.append([float(t), float(dt), None])

    def accepted(t, y, dt):
        log[-1][2] = True

    func_or_field.callback_accept_step = accepted
    return func_or_field


def test_step_memory_starts_the_next_training_forward_where_the_controller_left_off():
    """With homo_step_memory (default) a training forward starts with the step torchdiffeq
    tried right after the first accepted step of the previous training forward (read off a
    plain odeint of the same field), skips the heuristic's extra evaluation, and its
    endpoint still agrees with a tight-tolerance solve to the integrator's tolerance."""
    from torchdiffeq import odeint

    x = torch.randn(3, 2, 4, 4, dtype=F64)
    grid = torch.tensor([0.0, 1.0], dtype=F64)
    reference = []
    odeint(_tried_steps(lambda _t, z: torch.tanh(2.0 * z + x), reference), torch.zeros_like(x),
           grid, method="dopri5", rtol=1e-3, atol=1e-3)
    first_accepted = next(i for i, (_, _, ok) in enumerate(reference) if ok)
    proposal = min(reference[first_accepted + 1][1], 1.0)

    deq = get_deq(core="homoode", homo_init="zeros")
    deq.train()
    deq(lambda z: torch.tanh(2.0 * z + x), torch.zeros_like(x))
    ours = []
    z_out, info = deq(_tried_steps(lambda z: torch.tanh(2.0 * z + x), ours),
                      torch.zeros_like(x))
    assert ours[0][:2] == [0.0, pytest.approx(proposal)]
    assert info["nstep"][0] == 1 + 6 * len(ours)        # no first-step probe
    exact = odeint(lambda _t, z: torch.tanh(2.0 * z + x), torch.zeros_like(x), grid,
                   method="dopri5", rtol=1e-10, atol=1e-10)[-1]
    assert float((z_out[-1] - exact).abs().max()) < 1e-2


def test_step_memory_learns_in_training_only_and_yields_to_a_given_first_step():
    """Evaluation forwards use the step but do not change it; homo_options' first_step
    wins; homo_step_memory=False and fixed-grid methods learn none."""
    x = torch.randn(2, 2, 3, 3)
    func = lambda z: torch.tanh(z + x)                           # noqa: E731
    deq = get_deq(core="homoode", homo_init="zeros")
    deq.eval()
    deq(func, torch.zeros_like(x))
    assert torch.isnan(deq.first_step)
    deq.train()
    deq(func, torch.zeros_like(x))
    learnt = deq.first_step.clone()
    assert 0 < float(learnt) <= 1
    deq.eval()
    deq(func, torch.zeros_like(x))
    assert torch.equal(deq.first_step, learnt)
    tried = []
    deq.train()
    deq(_tried_steps(lambda z: torch.tanh(z + x), tried), torch.zeros_like(x),
        solver_kwargs={"homo_options": {"first_step": 0.125}})
    assert tried[0][1] == 0.125
    for kwargs in ({"homo_step_memory": False}, {"homo_method": "rk4",
                                                  "homo_options": {"step_size": 0.5}}):
        deq = get_deq(core="homoode", homo_init="zeros", **kwargs)
        deq.train()
        deq(func, torch.zeros_like(x))
        assert torch.isnan(deq.first_step)


def test_step_memory_is_saved_and_loaded_and_old_checkpoints_still_load():
    """The learnt step is in state_dict, so a loaded model gives the saved model's output
    exactly; a state_dict saved before the buffer existed loads with no step known."""
    x = torch.randn(2, 4, 3, 3)
    func = lambda z: torch.tanh(2.0 * z + x)                     # noqa: E731
    deq = get_deq(core="homoode")
    deq.train()
    for _ in range(3):
        deq(func, torch.zeros_like(x))
    deq.eval()
    expected = deq(func, torch.zeros_like(x))[0][-1]
    fresh = get_deq(core="homoode").eval()
    fresh.load_state_dict(deq.state_dict())
    torch.testing.assert_close(fresh(func, torch.zeros_like(x))[0][-1], expected,
                               rtol=0, atol=0)
    old = deq.state_dict()           # an OrderedDict with the per-module versions
    del old["first_step"]
    old._metadata[""]["version"] = 1
    legacy = get_deq(core="homoode").eval()
    legacy.load_state_dict(old)
    assert torch.isnan(legacy.first_step)


def test_failed_integration_forgets_the_step():
    """An integration that fails (torchdiffeq's max_num_steps) falls back to RK4, reports
    MAX_EVALS, and the next forward starts from torchdiffeq's heuristic again."""
    x = torch.randn(2, 2, 3, 3)
    deq = get_deq(core="homoode", homo_init="zeros")
    deq.train()
    deq(lambda z: torch.tanh(z + x), torch.zeros_like(x))
    assert torch.isfinite(deq.first_step)
    _, info = deq(lambda z: torch.tanh(z + x), torch.zeros_like(x),
                  solver_kwargs={"homo_rtol": 1e-12, "homo_atol": 1e-12,
                                 "homo_options": {"max_num_steps": 2}})
    assert bool((info["status"] == th.Status.MAX_EVALS).all())
    assert torch.isnan(deq.first_step)


def test_step_watch_passes_on_no_more_than_the_accepted_step_after_a_rejected_start():
    """A start torchdiffeq rejects (too long for dy/dλ = −20 y at 1e-3) is not passed on:
    the next first step is at most the step accepted in its place; without a rejection it
    is the step tried after the first accepted one."""
    from torchdiffeq import odeint

    from torchdeq_homotopy.step_memory import StepWatch

    log = []
    field = _tried_steps(lambda _t, y: -20.0 * y, log)
    watch = StepWatch(field)
    odeint(field, torch.ones(1), torch.tensor([0.0, 1.0]), rtol=1e-3, atol=1e-3,
           options={"first_step": 1.0})
    assert log[0][1] == 1.0 and log[0][2] is None             # the start was rejected
    first_ok = next(i for i, (_, _, ok) in enumerate(log) if ok)
    assert log[first_ok + 1][1] > log[first_ok][1]            # the controller grew it
    assert float(watch.next_first_step()) == pytest.approx(log[first_ok][1])

    log.clear()
    watch = StepWatch(field)
    odeint(field, torch.ones(1), torch.tensor([0.0, 1.0]), rtol=1e-3, atol=1e-3,
           options={"first_step": 0.01})
    first_ok = next(i for i, (_, _, ok) in enumerate(log) if ok)
    assert first_ok == 0
    assert float(watch.next_first_step()) == pytest.approx(min(log[1][1], 1.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("adjoint", [False, True])
def test_cuda_core_matches_cpu_and_keeps_its_state_on_the_device(adjoint):
    """The reference classifier with the learned initial point, moved to CUDA after a CPU
    training step: its output in evaluation mode is the CPU model's within the
    integrator's tolerance, a training step gives finite gradients, and the core's
    buffers (initial point, step memory) and ``info`` stay on the device."""
    torch.manual_seed(0)
    model = ImplicitClassifier(1, 10, width=8, dropout=0.0, homo_adjoint=adjoint)
    images = torch.randn(4, 1, 8, 8)
    logits, _ = model(images)
    logits.sum().backward()
    model_cuda = copy.deepcopy(model).cuda()
    model.eval()
    model_cuda.eval()
    with torch.no_grad():
        expected, _ = model(images)
        got, info = model_cuda(images.cuda())
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-2, atol=1e-2)
    assert all(v.is_cuda for v in info.values() if torch.is_tensor(v))
    model_cuda.train()
    model_cuda.zero_grad()
    logits, _ = model_cuda(images.cuda())
    logits.sum().backward()
    grads = [p.grad for p in model_cuda.parameters() if p.grad is not None]
    assert grads and all(g.is_cuda and torch.isfinite(g).all() for g in grads)
    assert all(b.is_cuda for b in model_cuda.buffers())
