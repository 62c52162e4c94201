"""The one driving loop of every iterative phase of a solve.

An iteration is a pair of methods over a carry, as in optimistix:

    step(carry) -> carry        one iteration: at most one batched call of f
    terminate(carry) -> bool    whether to stop (at most one host sync)

The warm-up's fixed-point and Anderson phases (:mod:`torchdeq_homotopy.warmup`) and the
path tracker's Newton, path and endgame phases (:mod:`torchdeq_homotopy.path`) are all
run by :func:`drive`; each builds its first carry with its own ``init``.
"""
from __future__ import annotations

from typing import Protocol, TypeVar

Carry = TypeVar("Carry")


class Iteration(Protocol[Carry]):
    """What :func:`drive` runs."""

    def step(self, carry: Carry) -> Carry: ...

    def terminate(self, carry: Carry) -> bool: ...


def drive(iteration: Iteration[Carry], carry: Carry) -> Carry:
    """Step ``carry`` until the iteration terminates; returns the last carry.

    Example:
        >>> class Halve:
        ...     def step(self, x): return x / 2
        ...     def terminate(self, x): return x < 1
        >>> drive(Halve(), 10.0)
        0.625
    """
    while not iteration.terminate(carry):
        carry = iteration.step(carry)
    return carry
