"""Integration of a closure's ODE, by backpropagation or by the adjoint method.

TorchDEQ hands a core a closure ``func(z)`` that captures the input features ``x`` and the
cell's parameters. The adjoint method needs those tensors explicitly: the gradient of a
loss L(z(1)) with respect to every tensor θ the field reads is

    a(1) = ∂L/∂z(1),   da/dλ = -aᵀ ∂F/∂z,   dL/dθ = ∫_0^1 a(λ)ᵀ ∂F/∂θ dλ,

integrated backward from λ = 1 to 0 (torchdiffeq's ``odeint_adjoint``). The state a(λ)
evolves with the *running* solution of the backward integration, so the gradients are
those of the continuous problem (unlike an adjoint frozen at the saved forward states).

:func:`closure_inputs` finds the tensors by running ``func`` once under a
``TorchFunctionMode`` that records every tensor argument which requires grad and was not
produced inside the call.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

Tensor = torch.Tensor


class _InputRecorder(TorchFunctionMode):
    def __init__(self, exclude: Tensor) -> None:
        super().__init__()
        self.made: set[int] = {id(exclude)}
        self.found: dict[int, Tensor] = {}

    def __torch_function__(self, fn, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for arg in tree_flatten((args, kwargs))[0]:
            if (isinstance(arg, Tensor) and arg.requires_grad and id(arg) not in self.made
                    and id(arg) not in self.found):
                self.found[id(arg)] = arg
        out = fn(*args, **kwargs)
        for res in tree_flatten(out)[0]:
            if isinstance(res, Tensor):
                self.made.add(id(res))
        return out


def closure_inputs(func: Callable[[Tensor], Tensor], z: Tensor) -> tuple[Tensor, ...]:
    """The tensors requiring grad that ``func`` reads besides its argument (parameters,
    captured input features), in first-use order.

    Example:
        >>> w = torch.ones(3, requires_grad=True); x = torch.randn(3).requires_grad_()
        >>> found = closure_inputs(lambda z: torch.tanh(w * z + x), torch.zeros(3))
        >>> [t is w for t in found], [t is x for t in found]
        ([True, False], [False, True])
    """
    recorder = _InputRecorder(exclude=z)
    with torch.no_grad(), recorder:
        func(z)
    return tuple(recorder.found.values())


@torch.compiler.disable
def integrate(field: Callable[[Tensor, Tensor], Tensor], y0: Tensor, *, method: str,
              rtol: float, atol: float, options: dict[str, Any] | None,
              adjoint: bool, adjoint_params: tuple[Tensor, ...] = ()) -> Tensor:
    """y(1) for dy/dλ = field(λ, y), y(0) = y0, by torchdiffeq on λ ∈ [0, 1].

    With ``adjoint=True`` the backward pass solves the adjoint ODE (memory independent of
    the number of steps), with respect to ``y0`` and ``adjoint_params``.

    Under ``torch.compile`` it runs eagerly (a graph break): torchdiffeq's adaptive
    integrators have data-dependent step counts and shapes that the compiler cannot lower.

    Example:
        >>> y1 = integrate(lambda t, y: -y, torch.ones(1), method='dopri5', rtol=1e-8,
        ...                atol=1e-8, options=None, adjoint=False)
        >>> round(float(y1), 6) == round(float(torch.exp(torch.tensor(-1.))), 6)
        True
    """
    from torchdiffeq import odeint, odeint_adjoint

    grid = torch.tensor([0.0, 1.0], dtype=y0.dtype, device=y0.device)
    if not adjoint:
        return odeint(field, y0, grid, rtol=rtol, atol=atol, method=method, options=options)[-1]
    y1 = odeint_adjoint(field, y0, grid, rtol=rtol, atol=atol, method=method, options=options,
                        adjoint_params=adjoint_params)[-1]
    return _FirstOrderOnly.apply(y1)


class _FirstOrderOnly(torch.autograd.Function):
    """The identity, whose backward refuses ``create_graph=True``: torchdiffeq's adjoint
    backward is not differentiable, and without this a double backward failed later with
    "element 0 of tensors does not require grad"."""

    @staticmethod
    def forward(ctx: Any, y: Tensor) -> Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "homo_adjoint=True gives first-order gradients only (torchdiffeq's adjoint "
                "backward is not differentiable); for create_graph=True (double backward, "
                "gradient penalties) use homo_adjoint=False.")
        return grad
