"""torchdeq-homotopy: homotopy continuation for TorchDEQ.

Importing this package registers, in TorchDEQ's own registries:

* the solvers ``'homotopy'`` and ``'newton_krylov'`` (``get_deq(f_solver='homotopy')``),
* the HomoODE core ``'homoode'`` (``get_deq(core='homoode')``),
* TorchDEQ's ``'sliced'`` and ``'indexing'`` cores as subclasses that also read
  ``solver=`` and ``homo_*`` keys (:mod:`torchdeq_homotopy.registry`; undo with
  :func:`~torchdeq_homotopy.registry.restore_torchdeq_cores`).

Example:
    >>> import torchdeq_homotopy
    >>> from torchdeq import get_deq
    >>> deq = get_deq(f_solver='homotopy', f_max_iter=200)
"""
from torchdeq.core import register_deq
from torchdeq.solver import register_solver

from .config import ConfigError, add_homotopy_args
from .core import HomoODECore
from .factory import get_deq
from .outcome import Status
from .registry import register_torchdeq_cores, restore_torchdeq_cores
from .solvers import HomotopyConvergenceError, homotopy_solver, newton_krylov_solver

register_solver("homotopy", homotopy_solver)
register_solver("newton_krylov", newton_krylov_solver)
register_deq("homoode", HomoODECore)
register_torchdeq_cores()

__all__ = [
    "ConfigError",
    "HomoODECore",
    "HomotopyConvergenceError",
    "Status",
    "add_homotopy_args",
    "get_deq",
    "homotopy_solver",
    "newton_krylov_solver",
    "restore_torchdeq_cores",
]
__version__ = "0.1.0"
