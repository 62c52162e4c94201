"""TorchDEQ's own factory and argparse helper, after ``import torchdeq_homotopy``: ``solver=``
and ``homo_*`` keys work, and nothing else of TorchDEQ's behaviour changes."""
import argparse

import pytest
import torch
import torchdeq
from torchdeq.utils import add_deq_args

import torchdeq_homotopy as th
from torchdeq_homotopy import Status
from torchdeq_homotopy.registry import restore_torchdeq_cores


def expansive(x):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 16, generator=g)
    W = W / torch.linalg.matrix_norm(W, 2) * 5.0
    return lambda z: torch.tanh(z @ W.T + x)


@pytest.mark.parametrize("make", [
    lambda: torchdeq.get_deq(solver="homotopy"),
    lambda: torchdeq.get_deq({"solver": "homotopy"}),
    lambda: torchdeq.get_deq(torchdeq.utils.config.DEQConfig({"solver": "homotopy"})),
    lambda: torchdeq.get_deq(argparse.Namespace(solver="homotopy", lr=0.1, epochs=3)),
])
def test_solver_key_sets_both_solvers_through_torchdeqs_factory(make):
    deq = make()
    assert deq.f_solver is th.homotopy_solver and deq.b_solver is th.homotopy_solver


def test_solver_flag_on_torchdeqs_command_line():
    parser = argparse.ArgumentParser()
    add_deq_args(parser)
    th.add_homotopy_args(parser)
    parser.add_argument("--lr", type=float, default=0.1)           # a program's own flag
    args = parser.parse_args(["--solver", "newton_krylov", "--homo_krylov_dim", "12"])
    deq = torchdeq.get_deq(args)
    assert deq.f_solver.func is th.newton_krylov_solver
    assert deq.b_solver.keywords == {"homo_krylov_dim": 12}
    assert "homotopy" in parser.format_help()                      # --help lists it
    with pytest.raises(SystemExit):
        parser.parse_args(["--solver", "homotopyy"])


def test_homo_keys_reach_the_solver_through_torchdeqs_factory():
    deq = torchdeq.get_deq(f_solver="homotopy", homo_strict=True, f_max_iter=3, f_tol=1e-9)
    x = 0.3 * torch.randn(4, 16)
    with pytest.raises(th.HomotopyConvergenceError):
        deq(expansive(x), torch.zeros(4, 16))


@pytest.mark.parametrize("config, message", [
    ({"f_solver": "homotopy", "homo_restart": 3}, "Did you mean 'homo_restarts'"),
    ({"f_solver": "anderson", "homo_strict": True}, "set f_solver or b_solver"),
    ({"f_solver": "homotopy", "homo_method": "bosh3"}, "configure core='homoode'"),
    ({"solver": "homotopy", "f_solver": "anderson"}, "sets f_solver and b_solver together"),
    ({"solver": "homotopyy"}, "not a registered solver"),
])
def test_mistakes_raise_through_torchdeqs_factory(config, message):
    with pytest.raises(th.ConfigError, match=message):
        torchdeq.get_deq(config)


def test_without_plugin_keys_torchdeqs_behaviour_is_bit_identical():
    torch.manual_seed(0)
    x = 0.5 * torch.randn(3, 16)
    W = torch.randn(16, 16) * 0.1

    def run():
        torch.manual_seed(1)
        deq = torchdeq.get_deq(f_solver="anderson", f_max_iter=12, ift=True, core="indexing")
        z = torch.zeros(3, 16, requires_grad=True)
        Wp = W.clone().requires_grad_()
        z_out, info = deq(lambda z: torch.tanh(z @ Wp.T + x), z)
        z_out[-1].sum().backward()
        return z_out[-1].detach(), Wp.grad, info["abs_lowest"], type(deq)

    ours = run()
    restore_torchdeq_cores()
    try:
        theirs = run()
    finally:
        th.registry.register_torchdeq_cores()
    assert theirs[3].__module__ == "torchdeq.core" and ours[3].__module__.startswith(
        "torchdeq_homotopy")
    for a, b in zip(ours[:3], theirs[:3], strict=True):
        assert torch.equal(a, b)


def test_namespace_with_unrelated_flags_and_bound_defaults_is_accepted():
    parser = argparse.ArgumentParser()
    add_deq_args(parser)
    th.add_homotopy_args(parser)
    parser.add_argument("--homeworld", default="x")                 # not a plugin key
    args = parser.parse_args([])
    deq = torchdeq.get_deq(args)
    assert deq.f_solver is torchdeq.solver.get_solver("fixed_point_iter")


def test_configured_core_solves_and_reports_status():
    """In eval mode the core returns the solver's z* itself (in training, f(z*) for the
    gradient): its recomputed residual meets f_tol (abs), as the status says."""
    deq = torchdeq.get_deq(solver="homotopy", f_max_iter=400, f_tol=1e-5,
                           homo_linear_solver="dense").eval()
    x = 0.3 * torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    f = expansive(x)
    with torch.no_grad():
        z_out, info = deq(f, torch.zeros(4, 16))
    z = z_out[-1]
    assert ((f(z) - z).norm(dim=1) <= 1e-5).all()
    assert (info["status"] == Status.CONVERGED).all()
