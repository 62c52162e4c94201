"""A checked ``get_deq``: TorchDEQ's factory plus a check of every key's name."""
from __future__ import annotations

import argparse
from typing import Any

import torchdeq
from torchdeq.core import DEQBase
from torchdeq.utils.config import DEQConfig

from .config import ConfigError, check_known_keys, check_plugin_key
from .registry import check_solver_name


def get_deq(args: Any = None, *, solver: str | None = None, **kwargs: Any) -> DEQBase:
    """Build a DEQ core like ``torchdeq.get_deq``, but check every key's name first.

    After ``import torchdeq_homotopy`` TorchDEQ's own factory already reads ``solver=``
    and the ``homo_*`` keys (:mod:`torchdeq_homotopy.registry`). This version also
    rejects keys that neither TorchDEQ nor this plugin reads, naming the closest known key
    (``stop_mode`` → ``f_stop_mode``). For an ``argparse.Namespace``, which carries a
    program's other options too, only keys that look like this plugin's are checked.
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
        check_known_keys(kwargs, extra=("solver",))
    else:
        check_known_keys(config, extra=("solver",))
    from torchdeq.core import _core

    core = config.get("core", "sliced")
    if core not in _core:
        raise ConfigError(f"core={core!r} is not a registered core; choose one of "
                          f"{sorted(_core)}.")
    for key in ("f_solver", "b_solver"):
        if key in config:
            check_solver_name(key, config[key])
    return torchdeq.get_deq(config)
