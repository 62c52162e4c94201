"""The HomoODE core (``core='homoode'``): a neural ODE over the homotopy parameter.

Ding et al. (NeurIPS 2023) replace the right-hand side (I - λJ_f)^{-1}(f(z) - z0) of the
Davidenko ODE of the fixed-point homotopy by a learned field and integrate it over
λ ∈ [0, 1]; the endpoint z(1) plays the DEQ's equilibrium. In TorchDEQ terms the
``func(z)`` a DEQ model hands its core *is* that field:

    'direct'       dz/dλ = func(z)           (the paper's)
    'residual'     dz/dλ = func(z) - z
    'fixed_point'  dz/dλ = func(z) - z0

starting from z(0) = z0: the shared learnable initial point (``homo_init='learned'``),
zeros, or the ``z_init`` given to the core.

The learned initial point is the published code's ``InitLayer``: GroupNorm of a 1×1
convolution applied to a field of ones. On a constant field that is one value per channel
(dim 1), shared by all inputs and constant over the other dims:

    z0_k = γ_k (w_k − μ_g) / sqrt(σ²_g + 1e-5) + β_k,

with w the convolution's weights (drawn, as PyTorch draws a 1×1 convolution with one input
channel, from U(−1, 1)), μ_g and σ²_g the mean and variance of w over the group g of
channel k (min(32, C) groups, as the paper's ``norm``), and the affine γ = 1, β = 0 at
first. With two or more channels per group z0 is of unit scale from the first step; with
one channel per group (C ≤ 32) it starts at β = 0. In training mode it follows the paper's
schedule: every ``homo_init_every``-th forward (the first included) takes one SGD step of
rate ``homo_init_lr`` on (w, γ, β) with the gradient of that forward's
SmoothL1(z0, z(1).detach()) (not accumulated over the forwards between). Cross-entropy
never reaches it (the ODE starts from z0 detached).

Who updates it: the core, as BatchNorm updates its running statistics. The paper trains it
with its own optimiser on its own loss, apart from the model's; a user's optimiser (Adam,
weight decay, a schedule) would train something else. Its state is in ``state_dict`` as
the buffers ``init_weight``, ``init_gamma``, ``init_beta`` and ``init_count``;
``init_point`` is the current z0, and ``info['init_loss']`` its loss.

Monitoring steps: a ``func`` with torchdiffeq's step callbacks (``callback_step``,
``callback_accept_step``, ``callback_reject_step``, each called as ``callback(λ, z, h)``)
has them called at every step the integrator tries.

Integration cost: torchdiffeq starts every adaptive integration with a heuristic first
step (one more evaluation, and on the paper's classifier h ≈ 0.11, so dopri5 takes three
steps, 20 evaluations). With ``homo_step_memory`` (default) each forward instead starts
with the step the controller proposed after the first step of the last training forward
(:mod:`~torchdeq_homotopy.step_memory`): on the paper's classifier dopri5 then covers
[0, 1] in one accepted step (7 evaluations) after the first few training steps, under the
same error control. The step is the buffer ``first_step`` (NaN until a training forward
has run; in ``state_dict``, so a loaded model integrates as the saved one did).

With a GroupNorm inside ``func`` the field's sensitivity ||J_f|| falls
as 1/||z||, and an adaptive step h keeps h·||J_f|| roughly constant, so most steps from
z0 = 0 are spent near λ = 0. On the reference classifier ``homo_method='bosh3'`` with
``homo_options={'first_step': 0.005}`` integrates the zero start as exactly as dopri5 with
fewer evaluations (``benchmarks/step_sizes.py``).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torchdeq.core import DEQBase
from torchdeq.solver.utils import batch_flatten, solver_stat_from_final_step
from torchdeq.utils.layer_utils import deq_decorator

from .adjoint import closure_inputs, integrate
from .config import CORE_KEYS, resolve, validate
from .outcome import Budget, Status
from .step_memory import StepWatch, adaptive, with_first_step

Tensor = torch.Tensor
STEP_CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step")
"""torchdiffeq's adaptive-step callbacks, called as ``callback(λ, z, h)``."""


def _check_method(name: str) -> None:
    """Fail at construction, not at the first forward, on an unknown integrator name."""
    import importlib

    methods = sorted(importlib.import_module("torchdiffeq._impl.odeint").SOLVERS)
    if name not in methods:
        from .config import ConfigError, _suggest

        raise ConfigError(f"homo_method={name!r} is not a torchdiffeq method."
                          f"{_suggest(name, methods)} Choose one of {methods}.")


def _torchdeq_defaults() -> dict[str, Any]:
    """TorchDEQ's own defaults of its keys, read from its ``add_deq_args``."""
    import argparse

    from torchdeq.utils import add_deq_args

    parser = argparse.ArgumentParser()
    add_deq_args(parser)
    return vars(parser.parse_args([]))


_INIT_BUFFERS = ("init_weight", "init_gamma", "init_beta")


def _init_layer(weight: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """The paper's InitLayer on a field of ones, per channel: GroupNorm(min(32, C)) of the
    1×1 convolution's weights w, z0 = γ (w − μ_g) / sqrt(σ²_g + 1e-5) + β.

    Example:
        >>> w = torch.tensor([0.5, -0.3] * 32)              # 64 channels: 32 groups of 2
        >>> _init_layer(w, torch.ones(64), torch.zeros(64))[:4].round(decimals=3).tolist()
        [1.0, -1.0, 1.0, -1.0]
        >>> _init_layer(w[:4], torch.ones(4), torch.zeros(4)).tolist()   # one per group
        [0.0, 0.0, 0.0, 0.0]
    """
    channels = weight.shape[0]
    groups = min(32, channels)
    while channels % groups:
        groups -= 1
    grouped = weight.view(groups, channels // groups)
    mean = grouped.mean(dim=1, keepdim=True)
    var = (grouped - mean).pow(2).mean(dim=1, keepdim=True)       # biased, as GroupNorm's
    return gamma * ((grouped - mean) / torch.sqrt(var + 1e-5)).view(channels) + beta


# TorchDEQ keys that configure solvers and gradients: the HomoODE core reads none of them.
_SOLVER_ONLY = ("f_solver", "b_solver", "f_max_iter", "b_max_iter", "f_tol", "b_tol",
                "f_stop_mode", "b_stop_mode", "eval_factor", "eval_f_max_iter", "ift",
                "hook_ift", "n_states", "indexing", "gamma", "grad", "tau", "sup_gap",
                "sup_loc", "jac_loss_weight", "jac_loss_freq", "jac_incremental")


def _reject_unread_keys(config: dict[str, Any]) -> None:
    """Refuse keys this core would silently ignore: TorchDEQ's solver and gradient keys,
    and the plugin's solver keys, when set to anything but their defaults (an argparse
    Namespace carries every default, and those are accepted)."""
    from .config import SOLVER_KEYS, ConfigError

    defaults = _torchdeq_defaults()
    same = {"grad": (1, [1]), "indexing": (None, []), "sup_loc": (None, [])}
    unread = [k for k in _SOLVER_ONLY if k in config and config[k] != defaults.get(k)
              and config[k] not in same.get(k, ())]
    unread += [k for k in SOLVER_KEYS if k in config and config[k] != SOLVER_KEYS[k].default]
    if unread:
        raise ConfigError(
            f"core='homoode' does not read {sorted(unread)}: it integrates the HomoODE with "
            "homo_method at homo_rtol/homo_atol (cap its steps with homo_options="
            "{'max_num_steps': N}) and backpropagates through the integrator or its adjoint "
            "(homo_adjoint). Drop these keys, or use core='sliced' with f_solver=... .")


class HomoODECore(DEQBase):
    """TorchDEQ core that integrates ``func`` as the HomoODE field over λ ∈ [0, 1].

    Built by ``get_deq(core='homoode', ...)``; takes ``func`` and ``z_init`` like TorchDEQ's
    cores and returns ``(z_out, info)`` with ``z_out = [z(1)]``. Keys (defaults in
    :data:`torchdeq_homotopy.config.CORE_KEYS`): ``homo_method``, ``homo_rtol``,
    ``homo_atol``, ``homo_options``, ``homo_field``, ``homo_init``, ``homo_init_lr``,
    ``homo_init_every``, ``homo_adjoint``, ``homo_residual``, ``homo_step_memory``.

    ``info`` holds ``nstep`` (evaluations of ``func`` in the solve), ``abs_lowest`` and
    ``rel_lowest`` (the endpoint's ||func(z) - z|| and its relative form: how far z(1) is
    from an equilibrium of the same cell; one more evaluation, not counted in ``nstep``,
    NaN where ``homo_residual`` skips it), ``status`` per sample, and ``init_loss``.

    ``status`` is the integrator's outcome, not a statement about equilibrium: CONVERGED
    means the adaptive integration reached λ = 1 within its tolerances (the endpoint z(1)
    is the layer's output whatever its residual, which training does not drive to zero);
    STEP_UNDERFLOW or MAX_EVALS mean torchdiffeq's step failed and the endpoint came from
    the fixed-step RK4 fallback (for the whole batch); NONFINITE marks samples whose
    endpoint is not finite. TorchDEQ keys that configure solvers (``f_solver``,
    ``f_max_iter``, ``ift``, ``n_states``, ...) are not read by this core.

    Example:
        >>> import torchdeq_homotopy
        >>> from torchdeq import get_deq
        >>> deq = get_deq(core='homoode')
        >>> x = torch.randn(2, 4, 3, 3)
        >>> z_out, info = deq(lambda z: torch.tanh(z + x), torch.zeros_like(x))
        >>> z_out[-1].shape, deq.init_point.shape
        (torch.Size([2, 4, 3, 3]), torch.Size([4]))
    """

    def __init__(self, args: Any = None, **kwargs: Any) -> None:
        super().__init__(args, **kwargs)
        self.options = resolve(self.args.config, CORE_KEYS)
        _check_method(self.options["homo_method"])
        _reject_unread_keys(self.args.config)
        for name in _INIT_BUFFERS:
            self.register_buffer(name, torch.zeros(0))
        self.register_buffer("init_count", torch.zeros((), dtype=torch.long))
        # homo_step_memory: the next forward's first integration step (NaN: none known). Its
        # shape never changes, so DistributedDataParallel can broadcast it from rank 0.
        self.register_buffer("first_step", torch.tensor(math.nan))

    # ---------------------------------------------------------------- initial point
    _version = 2      # 2: the ``first_step`` buffer (homo_step_memory)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if (local_metadata.get("version") or 1) < 2:    # saved before step memory existed
            state_dict.setdefault(prefix + "first_step", torch.tensor(math.nan))
        for name in _INIT_BUFFERS:           # sized at the first forward: adopt saved sizes
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.zeros_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    @property
    def init_point(self) -> Tensor:
        """The learned z0 per channel, ``(C,)`` (empty before the first forward)."""
        if self.init_weight.numel() == 0:
            return self.init_weight.clone()
        return _init_layer(self.init_weight, self.init_gamma, self.init_beta).detach()

    def _broadcast(self, point: Tensor, like: Tensor) -> Tensor:
        return point.view(1, -1, *([1] * (like.dim() - 2))).expand_as(like)

    def _start(self, z_init: Tensor, options: dict[str, Any]) -> Tensor:
        mode = options["homo_init"]
        if mode == "given":
            return z_init
        if mode == "zeros" or z_init.dim() < 2:
            return torch.zeros_like(z_init)
        channels = z_init.shape[1]
        if self.init_weight.numel() == 0:
            # Normal tensors even in a first forward under torch.inference_mode: buffers made
            # there could never be updated by a later training forward.
            with torch.inference_mode(False):
                # nn.Conv2d(1, C, 1)'s default init: kaiming_uniform(a=√5), bound 1/sqrt(1) = 1
                self.init_weight = torch.empty(channels, device=z_init.device).uniform_(-1, 1)
                self.init_gamma = torch.ones(channels, device=z_init.device)
                self.init_beta = torch.zeros(channels, device=z_init.device)
        if self.init_weight.shape != (channels,):
            raise ValueError(
                f"the learned initial point has {self.init_weight.numel()} channels but the "
                f"state has {channels} (shape {tuple(z_init.shape)}); use one core per state "
                "shape, or homo_init='zeros'.")
        point = self.init_point.to(dtype=z_init.dtype, device=z_init.device)
        return self._broadcast(point, z_init).clone()

    @torch.no_grad()
    def _train_init_point(self, z_end: Tensor) -> Tensor:
        """SmoothL1(z0, z(1).detach()); on every ``homo_init_every``-th call (the first
        included) one SGD step on (w, γ, β) with this call's gradient. A training-mode
        forward steps it under ``torch.no_grad`` and ``torch.inference_mode`` too, as
        BatchNorm updates its statistics there (the gradient is taken outside both; the
        target is copied out of an inference tensor)."""
        with torch.inference_mode(False), torch.enable_grad():
            leaves = [t.detach().to(z_end.dtype).requires_grad_()
                      for t in (self.init_weight, self.init_gamma, self.init_beta)]
            target = z_end.detach()
            if target.is_inference():
                target = target.clone()
            point = _init_layer(*leaves)
            loss = F.smooth_l1_loss(self._broadcast(point, target), target)
            grads = torch.autograd.grad(loss, leaves)
        if int(self.init_count) % self.options["homo_init_every"] == 0:
            for name, grad in zip(_INIT_BUFFERS, grads, strict=True):
                getattr(self, name).sub_(self.options["homo_init_lr"] * grad.to(
                    getattr(self, name).dtype))
        self.init_count += 1
        return loss.detach()

    # ---------------------------------------------------------------- solve
    def _field(self, func: Callable[[Tensor], Tensor], z_start: Tensor, evals: Budget,
               kind: str, callbacks_from: object) -> Callable[[Tensor, Tensor], Tensor]:
        """The field dz/dλ of ``homo_field``, counting its calls in ``evals``; torchdiffeq's
        step callbacks defined on ``callbacks_from`` (the user's ``func``) are passed on."""

        def field(_lam: Tensor, z: Tensor) -> Tensor:
            evals.spend()
            out = func(z)
            if kind == "residual":
                return out - z
            if kind == "fixed_point":
                return out - z_start
            return out

        for name in STEP_CALLBACKS:
            if hasattr(callbacks_from, name):
                setattr(field, name, getattr(callbacks_from, name))
        return field

    def _integrate(self, func: Callable[[Tensor], Tensor], z_start: Tensor, evals: Budget,
                   opt: dict[str, Any], callbacks_from: object) -> tuple[Tensor, Tensor]:
        """z(1), and a per-sample status (integrator failure is reported, not raised).

        With ``homo_step_memory`` an adaptive method starts from the step its controller
        proposed after the first step of the last training forward (:mod:`.step_memory`);
        training forwards update that step, a failed integration forgets it."""
        field = self._field(func, z_start, evals, opt["homo_field"], callbacks_from)
        adjoint = opt["homo_adjoint"] and torch.is_grad_enabled()
        params = closure_inputs(func, z_start) if adjoint else ()
        status = torch.full((z_start.shape[0],), int(Status.CONVERGED), device=z_start.device)
        options, memory, watch = opt["homo_options"], False, None
        if opt["homo_step_memory"] and adaptive(opt["homo_method"]):
            memory = True
            known = bool(torch.isfinite(self.first_step))      # one host sync per forward
            options = with_first_step(options, self.first_step.clone() if known else None)
            if self.training:
                watch = StepWatch(field)
        try:
            z_end = integrate(field, z_start, method=opt["homo_method"], rtol=opt["homo_rtol"],
                              atol=opt["homo_atol"], options=options,
                              adjoint=adjoint, adjoint_params=params)
            learnt = watch.next_first_step() if watch is not None else None
            if learnt is not None:
                self.first_step.copy_(learnt)
        except AssertionError as err:   # torchdiffeq: 'underflow in dt' / 'max_num_steps'
            if memory:
                self.first_step.fill_(math.nan)
            failure = Status.STEP_UNDERFLOW if "underflow" in str(err) else Status.MAX_EVALS
            status.fill_(int(failure))
            field = self._field(func, z_start, evals, opt["homo_field"], callbacks_from)
            z_end = integrate(field, z_start, method="rk4", rtol=0.0, atol=0.0,
                              options={"step_size": 0.25}, adjoint=adjoint,
                              adjoint_params=params)
        finite = torch.isfinite(z_end.flatten(1) if z_end.dim() > 1 else z_end[:, None]).all(1)
        status = torch.where(finite, status, int(Status.NONFINITE))
        return z_end, status

    @staticmethod
    @torch.no_grad()
    def _endpoint_stat(func: Callable[[Tensor], Tensor], z_end: Tensor, nfe: int,
                       measure: bool) -> dict[str, Tensor]:
        """TorchDEQ's solver statistics of the endpoint: ||func(z) - z|| and
        ||func(z) - z|| / ||func(z)|| at z = z(1) (one evaluation), or NaN without it."""
        z_flat = batch_flatten(z_end.detach())
        fz_flat = batch_flatten(func(z_end)) if measure else torch.full_like(z_flat, math.nan)
        return solver_stat_from_final_step(z_flat, fz_flat, nstep=nfe)

    def forward(self, func: Callable, z_init: Tensor | list[Tensor],
                solver_kwargs: dict | None = None, sradius_mode: bool = False,
                backward_writer: Callable | None = None,
                **kwargs: Any) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Integrate the HomoODE from z0 to λ = 1 and return ``([z(1)], info)``.

        ``solver_kwargs`` may override any ``homo_*`` core key for this call only.
        """
        options = {**self.options, **validate(solver_kwargs or {}, CORE_KEYS)}
        deq_func, z_init = deq_decorator(func, z_init, no_stat=False)
        if not torch.is_tensor(z_init):
            raise TypeError("core='homoode' needs a tensor state or a list of tensors; "
                            f"got {type(z_init).__name__}.")
        z_start = self._start(z_init, options)
        evals = Budget(limit=None)
        z_end, status = self._integrate(deq_func, z_start, evals, options, callbacks_from=func)
        nfe = evals.used
        init_loss = torch.zeros((), device=z_end.device)
        if self.training and options["homo_init"] == "learned" and z_end.dim() >= 2:
            init_loss = self._train_init_point(z_end)
        measure = options["homo_residual"]
        info = self._endpoint_stat(deq_func, z_end, nfe,
                                   not self.training if measure is None else measure)
        info.update(status=status, init_loss=init_loss,
                    sradius=torch.zeros(1, device=z_end.device))
        return [deq_func.vec2list(z_end)], info
