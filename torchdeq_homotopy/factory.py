"""A checked ``get_deq``: TorchDEQ's factory plus key validation and ``homo_*`` solver keys."""
from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torchdeq
from torchdeq.core import DEQBase
from torchdeq.solver import _solvers
from torchdeq.utils.config import DEQConfig

from .config import SOLVER_KEYS, ConfigError, check_known_keys, check_plugin_key, split_options
from .solvers import homotopy_solver, newton_krylov_solver

_PLUGIN_SOLVERS = {"homotopy": homotopy_solver, "newton_krylov": newton_krylov_solver}


@contextlib.contextmanager
def configured_solvers(options: dict[str, Any]) -> Iterator[None]:
    """Within the block, TorchDEQ's registry maps the plugin's solvers to versions bound to
    ``options`` (``homo_*`` solver keys), so cores built here keep those options.

    Example:
        >>> import torchdeq
        >>> with configured_solvers({'homo_type': 'newton'}):
        ...     deq = torchdeq.get_deq(f_solver='homotopy')
        >>> deq.f_solver.keywords
        {'homo_type': 'newton'}
    """
    if not options:
        yield
        return
    saved = {name: _solvers[name] for name in _PLUGIN_SOLVERS}
    try:
        for name, solver in _PLUGIN_SOLVERS.items():
            _solvers[name] = functools.partial(solver, **options)
        yield
    finally:
        _solvers.update(saved)


def get_deq(args: Any = None, *, solver: str | None = None, **kwargs: Any) -> DEQBase:
    """Build a DEQ core like ``torchdeq.get_deq``, but check the configuration first.

    * ``solver='homotopy'`` is shorthand for ``f_solver`` and ``b_solver`` together
      (TorchDEQ has no ``solver`` key and would silently use fixed-point iteration).
    * Keys that neither TorchDEQ nor this plugin reads raise :class:`ConfigError` with
      the closest known key (``stop_mode`` → ``f_stop_mode``). For an
      ``argparse.Namespace``, which carries a program's other options too, only keys
      that look like this plugin's are checked.
    * ``homo_*`` solver keys configure the ``'homotopy'`` and ``'newton_krylov'``
      solvers of this core (forward and backward).
    * Solver and core names must be registered.

    Otherwise it behaves exactly like ``torchdeq.get_deq``.

    Example:
        >>> import torchdeq_homotopy as th
        >>> deq = th.get_deq(solver='homotopy', homo_type='newton', f_max_iter=100)
        >>> deq.f_solver.keywords['homo_type'], deq.f_max_iter
        ('newton', 100)
    """
    config = dict(DEQConfig(args).config)
    config.update(kwargs)
    if solver is not None:
        clash = {"f_solver", "b_solver"} & set(kwargs)
        if clash:
            raise ConfigError(f"solver={solver!r} sets both f_solver and b_solver; do not also "
                              f"pass {sorted(clash)}.")
        config["f_solver"] = config["b_solver"] = solver
    if isinstance(args, argparse.Namespace):
        for name in config:
            check_plugin_key(name)
        check_known_keys(kwargs)
    else:
        check_known_keys(config)
    ours, _ = split_options(config)
    for key in ("f_solver", "b_solver"):
        if key in config and config[key] not in _solvers:
            raise ConfigError(f"{key}={config[key]!r} is not a registered solver; choose one of "
                              f"{sorted(map(str, _solvers))}.")
    from torchdeq.core import _core

    core = config.get("core", "sliced")
    if core not in _core:
        raise ConfigError(f"core={core!r} is not a registered core; choose one of "
                          f"{sorted(_core)}.")
    solver_options = {k: v for k, v in ours.items() if k in SOLVER_KEYS}
    with configured_solvers(solver_options):
        return torchdeq.get_deq(config)
