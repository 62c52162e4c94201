"""Where the solver may read a tensor's value on the host.

On CPU a read (``bool(t)``, ``int(t)``, ``nonzero``) costs a few microseconds, less than the
masked work it lets a solve skip: an empty mask's update, the unchanged rows of a copy. On
an accelerator every read waits for the device's queue (a host sync), so there the solver
does the masked work without asking. Every such choice goes through :func:`reads_cheap`,
which the tests set to False on CPU to run the accelerator's code path.
"""
from __future__ import annotations

import torch


def reads_cheap(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values on the host costs no device sync (``t`` on CPU).

    Example:
        >>> reads_cheap(torch.zeros(2))
        True
    """
    return t.device.type == "cpu"
