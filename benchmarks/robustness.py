"""Random client sweep: the solvers and the HomoODE core under random keys, shapes and maps.

    python benchmarks/robustness.py [--seconds 100] [--seed 1]
        [--out benchmarks/results/robustness.md] [--accelerator-path]

Four families, each run for ``--seconds`` of wall time with problems drawn from ``--seed``:

* ``solver-options``: ``homotopy`` on tanh(W z + x) (1–150 wide, batch 1–8, ‖W‖₂ 0.5–8,
  float32/float64 under either default dtype, both stop modes, tolerances 1e-3, 1e-6 and
  0, budgets 1–300), each ``homo_*`` solver key set with probability 1/2 to a random
  allowed value (including ranks and Krylov dimensions past the state's size);
* ``solver-maps``: ``homotopy`` and ``newton_krylov`` on maps that break solvers: NaN rows,
  rows that turn infinite away from the start, square roots of negative numbers, a constant,
  the identity, outputs of 1e30; float16/bfloat16 states; ``indexing``;
* ``homoode``: ``get_deq(core='homoode')`` with a random integrator (dopri5, bosh3,
  adaptive_heun, rk4, euler), field, initial point, adjoint, residual and tolerance keys, on
  states of 2–5 dimensions, in training (with backward) and evaluation mode;
* ``deq-configs``: TorchDEQ's ``get_deq`` (indexing and sliced cores, ``n_states``,
  ``grad``, IFT or not, budgets from 1) with the plugin's solvers forward, backward or both,
  and random ``homo_*`` keys, on states of 2–4 dimensions, with backward.

In the last two, half the runs first make a forward under ``torch.no_grad`` or
``torch.inference_mode`` (in training or evaluation mode), as an evaluation pass before
training would.

A run fails when it raises, returns the wrong shape or dtype, claims CONVERGED where the
recomputed residual misses the tolerance, spends more than its budget (solvers), returns f at
the best iterate (``info['image']``) for a converged sample, under ``homo_return='best'`` or
non-finite, or returns non-finite states or gradients (HomoODE, whose maps are bounded;
gradients of the DEQ configs). Failures are printed with everything needed to rerun them.

``--accelerator-path`` runs the plugin's accelerator code path on CPU
(``host_syncs.accelerator_path``: no host read to skip masked work, GMRES's stopping test
read late), the code a CUDA device runs.
"""
from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from host_syncs import accelerator_path
from torchdeq import get_deq
from torchdeq.solver import get_solver

import torchdeq_homotopy  # noqa: F401  (registers the solvers and the core)

Tensor = torch.Tensor

SOLVER_VALUES = dict(
    homo_type=["fixed_point", "newton"], homo_predictor=["tangent", "secant", "ode"],
    homo_jvp=["finite_difference", "forward", "auto"], homo_warmup=[0, 5, 30],
    homo_newton_iters=[0, 1, 6], homo_linear_solver=["auto", "secant", "gmres", "dense"],
    homo_secant_rank=[1, 4, 32, 160], homo_broyden_memory=[None, 1, 3, 50],
    homo_secant_patience=[None, 1, 5], homo_krylov_dim=[1, 5, 40, 200],
    homo_forcing=["eisenstat_walker", "constant"], homo_restarts=[0, 2],
    homo_corrector_iters=[1, 4], homo_step_init=[0.01, 0.1, 1.0],
    homo_return=["image", "best"])


def _matrix(n: int, gain: float, seed: int, dtype: torch.dtype) -> Tensor:
    W = torch.randn(n, n, generator=torch.Generator().manual_seed(seed))
    return (W / torch.linalg.matrix_norm(W, 2) * gain).to(dtype)


def _solver_failures(solver: str, f: Callable[[Tensor], Tensor], x0: Tensor, budget: int,
                     tol: float, stop: str, options: dict, indexing: list[int] | None
                     ) -> list[str]:
    """Run one solve; what it got wrong (empty when nothing)."""
    try:
        z, traj, info = get_solver(solver)(f, x0, max_iter=budget, tol=tol, stop_mode=stop,
                                           indexing=indexing, **options)
    except Exception as error:                       # any raise is a failure
        return [f"raised {error!r:.200}"]
    wrong = []
    if z.shape != x0.shape or z.dtype != x0.dtype:
        wrong.append("shape or dtype")
    if len(traj) != len(indexing or []):
        wrong.append("trajectory length")
    fz, zd = f(z).double(), z.double()
    abs_res = (fz - zd).flatten(1).norm(dim=1)
    res = abs_res if stop == "abs" else abs_res / (fz.flatten(1).norm(dim=1) + 1e-9)
    slack = 1e-6 if x0.dtype in (torch.float32, torch.float64) else None
    converged = info["converged"]
    if slack is not None and (converged & ~(res <= tol * 1.05 + slack)).any():
        wrong.append(f"CONVERGED at residual {res[converged].max().item():.2e}")
    image = info.get("image", torch.zeros_like(converged))
    if (image & converged).any() or (image.any() and options.get("homo_return") == "best"):
        wrong.append("f at the best iterate returned where it must not be")
    if image.any() and not torch.isfinite(zd[image]).all():
        wrong.append("a non-finite image returned")
    if float(info["nfe"].max()) > budget:
        wrong.append(f"{float(info['nfe'].max())} evaluations over a budget of {budget}")
    return wrong


def solver_options(rng: random.Random, k: int) -> tuple[str, list[str]]:
    options = {key: rng.choice(v) for key, v in SOLVER_VALUES.items() if rng.random() < 0.5}
    n, bsz = rng.choice([1, 2, 7, 33, 41, 64, 150]), rng.choice([1, 3, 8])
    gain, dtype = rng.choice([0.5, 1.5, 4.0, 8.0]), rng.choice([torch.float32, torch.float64])
    stop, budget, tol = rng.choice(["abs", "rel"]), rng.choice([1, 2, 5, 20, 60, 300]), \
        rng.choice([1e-3, 1e-6, 0.0])
    W = _matrix(n, gain, k, dtype)
    x = rng.choice([0.1, 1.0]) * torch.randn(bsz, n, generator=torch.Generator()
                                             .manual_seed(k + 1)).to(dtype)
    f = lambda z: torch.tanh(z @ W.T + x)                             # noqa: E731
    default = rng.choice([torch.float32, torch.float64])     # torch.set_default_dtype
    desc = (f"seed {k}: n {n}, batch {bsz}, ‖W‖ {gain}, {dtype} (default {default}), {stop}, "
            f"budget {budget}, tol {tol}, {options}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        return desc, _solver_failures("homotopy", f, torch.zeros(bsz, n, dtype=dtype), budget,
                                      tol, stop, options, None)
    finally:
        torch.set_default_dtype(previous)


def solver_maps(rng: random.Random, k: int) -> tuple[str, list[str]]:
    solver = rng.choice(["homotopy", "homotopy", "newton_krylov"])
    options = {key: rng.choice(v) for key, v in SOLVER_VALUES.items() if rng.random() < 0.4}
    n, bsz = rng.choice([1, 3, 8, 33, 64]), rng.choice([1, 3, 8])
    dtype = rng.choice([torch.float32, torch.float64, torch.bfloat16, torch.float16])
    kind = rng.choice(["nan rows", "inf away from 0", "sqrt", "constant", "identity", "1e30",
                       "tanh"])
    budget, tol, stop = rng.choice([1, 3, 20, 100]), rng.choice([1e-3, 1e-6]), \
        rng.choice(["abs", "rel"])
    W = _matrix(n, rng.choice([0.5, 3.0]), k, dtype)
    x = torch.randn(bsz, n, generator=torch.Generator().manual_seed(k + 1)).to(dtype)

    def f(z: Tensor) -> Tensor:
        out = torch.tanh(z @ W.T + x)
        if kind == "nan rows":
            return torch.where(x[:, :1] > 0, out, out * float("nan"))
        if kind == "inf away from 0":
            return torch.where(z.abs().sum(1, keepdim=True) > 0.5, out * float("inf"), out)
        if kind == "sqrt":
            return torch.sqrt(z + x)
        if kind == "constant":
            return x.clone()
        if kind == "identity":
            return z.clone()
        return 1e30 * out if kind == "1e30" else out

    indexing = rng.choice([None, [1], [2, 50]])
    desc = (f"seed {k}: {solver}, map {kind}, n {n}, batch {bsz}, {dtype}, {stop}, budget "
            f"{budget}, tol {tol}, indexing {indexing}, {options}")
    return desc, _solver_failures(solver, f, torch.zeros(bsz, n, dtype=dtype), budget, tol,
                                  stop, options, indexing)


CONTEXTS = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def _quiet_forward(rng: random.Random) -> tuple[str, bool] | None:
    """With probability 1/2, a forward to run first without autograd (``no_grad`` or
    ``inference_mode``, in training or evaluation mode), as an evaluation pass before
    training: its name and mode."""
    if rng.random() < 0.5:
        return None
    return rng.choice(sorted(CONTEXTS)), rng.random() < 0.5


def _cell(shape: tuple[int, ...], dtype: torch.dtype, scale: float
          ) -> tuple[Callable[[Tensor], Tensor], Tensor, Tensor]:
    """tanh(W z + x) on states of ``shape``, W of scale ``scale`` / sqrt(n); (f, W, x), both
    requiring gradients."""
    n = math.prod(shape[1:])
    W = (scale * torch.randn(n, n, dtype=dtype) / n ** 0.5).requires_grad_()
    x = torch.randn(shape, dtype=dtype, requires_grad=True)

    def f(z: Tensor) -> Tensor:
        return torch.tanh((z.reshape(shape[0], -1) @ W.T).reshape(shape) + x)

    return f, W, x


def _forward_first(deq: torch.nn.Module, f: Callable[[Tensor], Tensor], z0: Tensor,
                   quiet: tuple[str, bool] | None, train: bool) -> None:
    """The forward drawn by :func:`_quiet_forward` (if any), then ``deq`` back in the
    mode ``train``."""
    if quiet is not None:
        with CONTEXTS[quiet[0]]():
            deq.train(quiet[1])(f, z0)
        deq.train(train)


def homoode(rng: random.Random, k: int) -> tuple[str, list[str]]:
    method = rng.choice(["dopri5", "bosh3", "adaptive_heun", "rk4", "euler"])
    options: dict = {"homo_method": method}
    if method in ("rk4", "euler"):
        options["homo_options"] = {"step_size": rng.choice([0.25, 0.5])}
    for key, values in dict(homo_field=["direct", "residual", "fixed_point"],
                            homo_init=["learned", "zeros", "given"], homo_adjoint=[False, True],
                            homo_residual=[None, True, False], homo_step_memory=[True, False],
                            homo_rtol=[1e-2, 1e-4], homo_init_every=[1, 20]).items():
        if rng.random() < 0.5:
            options[key] = rng.choice(values)
    shape = rng.choice([(3, 5), (2, 4, 6), (2, 3, 4, 4), (1, 2, 2, 3, 3), (4, 1)])
    dtype, train = rng.choice([torch.float32, torch.float64]), rng.random() < 0.6
    quiet = _quiet_forward(rng)
    desc = f"seed {k}: shape {shape}, {dtype}, training {train}, first {quiet}, {options}"
    torch.manual_seed(k)
    try:
        deq = get_deq(core="homoode", **options).to(dtype).train(train)
        f, W, x = _cell(shape, dtype, 1.0)
        _forward_first(deq, f, torch.zeros(shape, dtype=dtype), quiet, train)
        z = deq(f, torch.zeros(shape, dtype=dtype))[0][-1]
        wrong = [] if z.shape == shape and z.dtype == dtype else ["shape or dtype"]
        if not torch.isfinite(z).all():
            wrong.append("non-finite state")
        if train:
            z.square().sum().backward()
            if any(p.grad is None or not torch.isfinite(p.grad).all() for p in (W, x)):
                wrong.append("missing or non-finite gradient")
        return desc, wrong
    except Exception as error:                       # any raise is a failure
        return desc, [f"raised {error!r:.200}"]


def deq_configs(rng: random.Random, k: int) -> tuple[str, list[str]]:
    plugin = ("homotopy", "newton_krylov")
    config = dict(core=rng.choice(["indexing", "sliced"]),
                  f_solver=rng.choice([*plugin, "anderson"]),
                  b_solver=rng.choice([*plugin, "fixed_point_iter", "broyden"]),
                  ift=rng.choice([True, False]), f_max_iter=rng.choice([1, 5, 30]),
                  b_max_iter=rng.choice([1, 5, 30]), f_tol=rng.choice([1e-3, 1e-6]),
                  f_stop_mode=rng.choice(["abs", "rel"]), n_states=rng.choice([1, 2]),
                  grad=rng.choice([1, 2]))
    if config["f_solver"] in plugin or config["b_solver"] in plugin:
        config.update({key: rng.choice(SOLVER_VALUES[key]) for key in
                       ("homo_warmup", "homo_newton_iters", "homo_linear_solver",
                        "homo_secant_rank", "homo_jvp") if rng.random() < 0.4})
    shape = rng.choice([(3, 5), (2, 4, 6), (2, 3, 4, 4), (1, 7)])
    dtype = rng.choice([torch.float32, torch.float64])
    quiet = _quiet_forward(rng)
    desc = f"seed {k}: shape {shape}, {dtype}, first {quiet}, {config}"
    torch.manual_seed(k)
    try:
        deq = get_deq(**config)
        f, W, x = _cell(shape, dtype, rng.choice([0.5, 2.0]))
        _forward_first(deq, f, torch.zeros(shape, dtype=dtype), quiet, True)
        z_out, _ = deq(f, torch.zeros(shape, dtype=dtype))
        wrong = [] if all(z.shape == shape for z in z_out) else ["shape"]
        sum(z.square().sum() for z in z_out).backward()
        if any(p.grad is None or not torch.isfinite(p.grad).all() for p in (W, x)):
            wrong.append("missing or non-finite gradient")
        return desc, wrong
    except Exception as error:                       # any raise is a failure
        return desc, [f"raised {error!r:.200}"]


FAMILIES = {"solver-options": solver_options, "solver-maps": solver_maps, "homoode": homoode,
            "deq-configs": deq_configs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=100.0, help="wall time per family")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/robustness.md"))
    parser.add_argument("--accelerator-path", action="store_true",
                        help="the plugin's accelerator code path, run on CPU")
    args = parser.parse_args()
    torch.set_num_threads(2)
    path = ", the accelerator code path" if args.accelerator_path else ""
    lines = [f"Random client sweep, seed {args.seed}, {args.seconds:g} s per family{path}.",
             "", "| family | runs | failures |", "|---|---|---|"]
    with accelerator_path() if args.accelerator_path else nullcontext():
        for name, draw in FAMILIES.items():
            rng, runs, failures = random.Random(f"{name}-{args.seed}"), 0, 0
            start = time.perf_counter()
            while time.perf_counter() - start < args.seconds:
                desc, wrong = draw(rng, runs)
                runs += 1
                if wrong:
                    failures += 1
                    print(f"FAIL {name} {desc}: {wrong}", flush=True)
            lines.append(f"| {name} | {runs} | {failures} |")
            print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
