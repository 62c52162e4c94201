"""What importing the plugin changes in TorchDEQ, all through its public registries.

* ``register_solver``: ``'homotopy'`` and ``'newton_krylov'``; a solver configured by
  ``homo_*`` keys is registered as a ``functools.partial`` under a derived name such as
  ``"homotopy[homo_strict=True]"``.
* ``register_deq``: ``'homoode'``, and TorchDEQ's own ``'sliced'`` and ``'indexing'`` cores
  replaced by subclasses that only read two more things from the config before handing it,
  unchanged otherwise, to TorchDEQ's class (:func:`prepare_config`):

  - ``solver=`` sets ``f_solver`` and ``b_solver`` together (TorchDEQ has no such key and
    would silently build fixed-point iteration);
  - ``homo_*`` keys are validated (a misspelling raises :class:`ConfigError` naming the
    closest key) and bound to the plugin's solvers of this core.

  A config without ``solver`` and ``homo_*`` keys reaches TorchDEQ's class as it was
  given, so such a model behaves bit-identically. :func:`restore_torchdeq_cores` puts
  TorchDEQ's classes back.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torchdeq.core
from torchdeq.core import register_deq
from torchdeq.solver import get_solver, register_solver
from torchdeq.utils.config import DEQConfig

from .config import (
    ALL_KEYS,
    CORE_KEYS,
    SOLVER_KEYS,
    ConfigError,
    check_plugin_key,
    registered_solvers,
)
from .solvers import homotopy_solver, newton_krylov_solver

PLUGIN_SOLVERS: dict[str, Callable[..., Any]] = {
    "homotopy": homotopy_solver, "newton_krylov": newton_krylov_solver}
_TORCHDEQ_DEFAULT_SOLVER = "fixed_point_iter"
_TORCHDEQ_CORES = {"sliced": torchdeq.core.DEQSliced, "indexing": torchdeq.core.DEQIndexing}


def configured_solver_name(name: str, options: dict[str, Any]) -> str:
    """Register ``name`` bound to ``options`` and return the registered name.

    Example:
        >>> configured_solver_name('homotopy', {'homo_strict': True})
        'homotopy[homo_strict=True]'
        >>> get_solver('homotopy[homo_strict=True]').keywords
        {'homo_strict': True}
    """
    if not options:
        return name
    derived = f"{name}[{','.join(f'{k}={v!r}' for k, v in sorted(options.items()))}]"
    register_solver(derived, functools.partial(PLUGIN_SOLVERS[name], **options))
    return derived


def check_solver_name(key: str, name: str) -> None:
    """Raise :class:`ConfigError` naming the registered solvers unless TorchDEQ's public
    ``get_solver`` knows ``name`` (TorchDEQ's registry is only read, never written here).

    Example:
        >>> check_solver_name('f_solver', 'homotopy')
        >>> check_solver_name('f_solver', 'homotpy')
        Traceback (most recent call last):
        ...
        torchdeq_homotopy.config.ConfigError: f_solver='homotpy' is not a registered solver; ...
    """
    try:
        get_solver(name)
    except AssertionError:
        raise ConfigError(f"{key}={name!r} is not a registered solver; choose one of "
                          f"{registered_solvers()}.") from None


def _changed(config: dict[str, Any], keys: dict) -> dict[str, Any]:
    """The keys of ``keys`` in ``config`` whose (validated) value differs from the default."""
    return {name: keys[name].validate(config[name]) for name in config
            if name in keys and config[name] != keys[name].default}


def prepare_config(args: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Read ``solver=`` and the ``homo_*`` keys of a DEQ config; return the config that
    TorchDEQ's classes see.

    Example:
        >>> config = prepare_config({'solver': 'homotopy', 'homo_strict': True, 'f_tol': 1e-4})
        >>> config['f_solver'], config['f_tol']
        ('homotopy[homo_strict=True]', 0.0001)
    """
    config = dict(DEQConfig(args).config)
    config.update(kwargs)
    plugin = [name for name in config if name.startswith("homo_")]
    if "solver" in config:
        plugin.append("solver")
    if not plugin:
        return config
    solver = config.pop("solver", None)
    if solver is not None:
        for key in ("f_solver", "b_solver"):
            given = config.get(key, _TORCHDEQ_DEFAULT_SOLVER)
            if given not in (solver, _TORCHDEQ_DEFAULT_SOLVER):
                raise ConfigError(f"solver={solver!r} sets f_solver and b_solver together, but "
                                  f"{key}={given!r} was given too; pass one of them.")
            config[key] = solver
    for name in plugin:
        if name != "solver":
            check_plugin_key(name)
    for key in ("f_solver", "b_solver"):
        check_solver_name(key, config.get(key, _TORCHDEQ_DEFAULT_SOLVER))
    solver_options = _changed(config, SOLVER_KEYS)
    core_options = _changed(config, CORE_KEYS)
    if core_options:
        raise ConfigError(f"{sorted(core_options)} configure core='homoode'; this core is "
                          f"{config.get('core', 'sliced')!r}.")
    uses_plugin = [key for key in ("f_solver", "b_solver")
                   if config.get(key, _TORCHDEQ_DEFAULT_SOLVER) in PLUGIN_SOLVERS]
    if solver_options and not uses_plugin:
        raise ConfigError(f"{sorted(solver_options)} configure the solvers "
                          f"{sorted(PLUGIN_SOLVERS)}; set f_solver or b_solver (or solver=) "
                          "to one of them.")
    for key in uses_plugin:
        config[key] = configured_solver_name(config[key], solver_options)
    for name in [n for n in config if n in ALL_KEYS]:
        del config[name]
    return config


class _ReadsPluginKeys:
    """Mixin: run :func:`prepare_config` before TorchDEQ's ``__init__``."""

    def __init__(self, args: Any = None, **kwargs: Any) -> None:
        super().__init__(prepare_config(args, **kwargs))


class DEQSliced(_ReadsPluginKeys, torchdeq.core.DEQSliced):
    """TorchDEQ's ``DEQSliced`` that also reads ``solver=`` and ``homo_*`` keys.

    Example:
        >>> import torchdeq
        >>> deq = torchdeq.get_deq(solver='homotopy', homo_strict=True)
        >>> deq.f_solver.keywords, deq.b_solver.keywords
        ({'homo_strict': True}, {'homo_strict': True})
    """


class DEQIndexing(_ReadsPluginKeys, torchdeq.core.DEQIndexing):
    """TorchDEQ's ``DEQIndexing`` that also reads ``solver=`` and ``homo_*`` keys.

    Example:
        >>> import torchdeq
        >>> torchdeq.get_deq(core='indexing', solver='newton_krylov').f_solver.__name__
        'newton_krylov_solver'
    """


def register_torchdeq_cores() -> None:
    """Register the key-reading subclasses under TorchDEQ's names ``'sliced'`` and
    ``'indexing'`` (done at import).

    Example:
        >>> register_torchdeq_cores()
    """
    register_deq("sliced", DEQSliced)
    register_deq("indexing", DEQIndexing)


def restore_torchdeq_cores() -> None:
    """Put TorchDEQ's own ``'sliced'`` and ``'indexing'`` classes back in its registry.

    Example:
        >>> import torchdeq
        >>> restore_torchdeq_cores()
        >>> type(torchdeq.get_deq()).__module__
        'torchdeq.core'
        >>> register_torchdeq_cores()
    """
    for name, cls in _TORCHDEQ_CORES.items():
        register_deq(name, cls)
