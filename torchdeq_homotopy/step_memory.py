"""An adaptive integrator's first step, carried from one forward of the HomoODE to the next.

torchdiffeq starts every adaptive integration with Hairer's initial-step heuristic: one
more evaluation of the field, and a step from ||y0||, ||f(y0)|| and the tolerances that
ignores the method's own error constant. On the paper's classifier it proposes h ≈ 0.11 on
λ ∈ [0, 1], and dopri5 then needs three steps (20 evaluations) where its error estimate
accepts one or two.

Between two training steps the field changes little, so the step controller's own
proposal after the last forward's first accepted step h,

    h_next = h · min(ifactor, max(dfactor, safety · err^(−1/(order + 1)))),

is the better start for the next forward, as if training were one long integration. The
proposal is the step torchdiffeq tries right after that accepted step, read from its
``callback_step``; when the first accepted step already reached λ = 1 there is none, and
the next forward tries the whole interval. Starts are clipped to the interval. Each
forward's error control is unchanged: a start that is too long is rejected and shrunk by
the controller as any other step (costing that step's evaluations). As after a rejection
within one integration (Hairer, Nørsett & Wanner, *Solving ODEs I*, II.4: no step increase
right after a rejected step), a forward whose start was rejected passes on no more than
the step it then accepted, so a start that fails is not tried again at once.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

Tensor = torch.Tensor

_CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step")


def adaptive(method: str) -> bool:
    """Whether torchdiffeq's ``method`` controls its step size (and reads ``first_step``).

    Example:
        >>> adaptive('dopri5'), adaptive('rk4')
        (True, False)
    """
    impl = importlib.import_module("torchdiffeq._impl.odeint")
    from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver

    return issubclass(impl.SOLVERS[method], RKAdaptiveStepsizeODESolver)


def with_first_step(options: dict[str, Any] | None,
                    first_step: Tensor | None) -> dict[str, Any] | None:
    """torchdiffeq's ``options`` with ``first_step`` set, unless the caller set one or
    ``first_step`` is None (nothing learnt yet).

    Example:
        >>> with_first_step(None, torch.tensor(0.5))
        {'first_step': tensor(0.5000)}
        >>> with_first_step({'first_step': 0.1}, torch.tensor(0.5))
        {'first_step': 0.1}
    """
    if first_step is None or (options and "first_step" in options):
        return options
    return {**(options or {}), "first_step": first_step}


class StepWatch:
    """Observes one adaptive integration of ``field``: its first accepted step, and the
    step tried right after it (the controller's proposal). Callbacks ``field`` already
    has are chained, and called first.

    Example:
        >>> from torchdiffeq import odeint
        >>> first_step, nfe = None, []
        >>> for _ in range(2):
        ...     def field(t, y):
        ...         nfe.append(1)
        ...         return -y
        ...     watch = StepWatch(field)
        ...     _ = odeint(field, torch.ones(1), torch.tensor([0.0, 1.0]), rtol=1e-3,
        ...                atol=1e-3, options=with_first_step(None, first_step))
        ...     first_step = watch.next_first_step()
        ...     print(len(nfe), round(float(first_step), 3)); nfe.clear()
        14 1.0
        7 1.0
    """

    def __init__(self, field: Callable[..., Any]) -> None:
        self.accepted: Tensor | None = None      # the first accepted step
        self.rejected_first = False               # a step was rejected before it
        self.proposal: Tensor | None = None
        before = {name: getattr(field, name, None) for name in _CALLBACKS}

        def chained(name: str, observe: Callable[[Tensor], None]) -> Callable[..., None]:
            def callback(t: Tensor, y: Tensor, dt: Tensor) -> None:
                if before[name] is not None:
                    before[name](t, y, dt)
                observe(dt.detach())
            return callback

        def on_try(dt: Tensor) -> None:
            if self.accepted is not None and self.proposal is None:
                self.proposal = dt

        def on_accept(dt: Tensor) -> None:
            if self.accepted is None:
                self.accepted = dt

        def on_reject(dt: Tensor) -> None:
            self.rejected_first |= self.accepted is None

        field.callback_step = chained("callback_step", on_try)
        field.callback_accept_step = chained("callback_accept_step", on_accept)
        field.callback_reject_step = chained("callback_reject_step", on_reject)

    def next_first_step(self, span: float = 1.0) -> Tensor | None:
        """The first step for the next integration: the controller's proposal after the
        first accepted step h (the whole ``span`` where h reached its end), at most h if a
        step was rejected before it, clipped to ``span``; None if no step was accepted."""
        if self.accepted is None:
            return None
        step = torch.full_like(self.accepted, span) if self.proposal is None else self.proposal
        if self.rejected_first:
            step = torch.minimum(step, self.accepted)
        return step.clamp(max=span)
