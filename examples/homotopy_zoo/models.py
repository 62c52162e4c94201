"""Reference image classifiers that share one stem, one cell and one readout.

The layouts follow the HomoODE paper's CIFAR-10 configuration (width 64, state
64 × H/2 × W/2): stem conv3×3 → BN → ReLU → conv3×3 stride 2 → BN → ReLU; cell
F(z; x) = GN(drop(conv(ReLU(GN(conv z)) + x))); readout GN → ReLU → conv1×1 (4·width)
→ BN → ReLU → average pool → linear. At width 64, 3 input channels and 10 classes the
HomoODE classifier has 132,938 parameters.

* :class:`ImplicitClassifier` — the state solved by a TorchDEQ core: ``core='homoode'``
  (HomoODE) or a DEQ core with any solver (``core='sliced', f_solver='homotopy'``).
* :class:`ODEClassifier` — Neural ODE from z(0) = x with dz/dt = F(z; 0), and the
  Augmented Neural ODE (``augment`` extra zero channels appended to the state).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchdeq.dropout import VariationalDropout2d

from torchdeq_homotopy import get_deq
from torchdeq_homotopy.adjoint import closure_inputs, integrate

Tensor = torch.Tensor


def make_stem(in_channels: int, width: int) -> nn.Sequential:
    """conv3×3 → BN → ReLU → conv3×3 stride 2 → BN → ReLU.

    Example:
        >>> make_stem(3, 8)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 8, 16, 16])
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU())


def make_readout(width: int, num_classes: int) -> nn.Sequential:
    """GN → ReLU → conv1×1 (4·width) → BN → ReLU → average pool → linear.

    Example:
        >>> make_readout(8, 10)(torch.zeros(2, 8, 4, 4)).shape
        torch.Size([2, 10])
    """
    return nn.Sequential(
        nn.GroupNorm(_groups(width), width), nn.ReLU(),
        nn.Conv2d(width, 4 * width, 1), nn.BatchNorm2d(4 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))


def _groups(channels: int) -> int:
    """The published code's ``norm``: GroupNorm(min(32, C)) (the largest divisor of C up
    to 32 where 32 does not divide it)."""
    groups = min(32, channels)
    while channels % groups:
        groups -= 1
    return groups


class Cell(nn.Module):
    """F(z; x) = GN(drop(conv2(ReLU(GN(conv1 z)) + x))), the published ``Homofunc``: the
    input enters after the first block, before the second convolution; TorchDEQ's
    variational dropout (rate 0.1 in the paper) follows that convolution.

    Example:
        >>> cell = Cell(8)
        >>> cell(torch.zeros(2, 8, 4, 4), torch.ones(2, 8, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
    """

    def __init__(self, width: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.norm1 = nn.GroupNorm(_groups(width), width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.drop = VariationalDropout2d(dropout)
        self.norm2 = nn.GroupNorm(_groups(width), width)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.norm2(self.drop(self.conv2(torch.relu(self.norm1(self.conv1(z))) + x)))


class ImplicitClassifier(nn.Module):
    """stem → a TorchDEQ core solving the cell (HomoODE or DEQ) → readout.

    Args:
        in_channels, num_classes, width: data and state size.
        dropout: variational dropout rate in the cell.
        **deq_kwargs: the core's configuration, checked by
            :func:`torchdeq_homotopy.get_deq` (``core='homoode'`` by default).

    Forward returns ``(logits, info)``.

    Example:
        >>> model = ImplicitClassifier(3, 10, width=64)
        >>> sum(p.numel() for p in model.parameters())
        132938
        >>> logits, info = ImplicitClassifier(1, 10, width=8)(torch.zeros(2, 1, 8, 8))
        >>> logits.shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 64,
                 dropout: float = 0.1, **deq_kwargs: Any) -> None:
        super().__init__()
        deq_kwargs.setdefault("core", "homoode")
        self.stem = make_stem(in_channels, width)
        self.cell = Cell(width, dropout)
        self.deq = get_deq(**deq_kwargs)
        self.readout = make_readout(width, num_classes)

    def forward(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.stem(images)
        z_out, info = self.deq(lambda z: self.cell(z, x), torch.zeros_like(x))
        return self.readout(z_out[-1]), info


class ODEClassifier(nn.Module):
    """stem → Neural ODE dz/dt = F(z; 0), z(0) = [x, 0_augment], t ∈ [0, 1] → readout.

    ``augment=0`` is the Neural ODE, ``augment > 0`` the Augmented Neural ODE.
    Forward returns ``(logits, info)`` with ``info['nstep']`` the field evaluations.

    Example:
        >>> logits, info = ODEClassifier(1, 10, width=8, augment=4)(torch.zeros(2, 1, 8, 8))
        >>> logits.shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 64,
                 dropout: float = 0.1, augment: int = 0, method: str = "dopri5",
                 rtol: float = 1e-3, atol: float = 1e-3, adjoint: bool = False) -> None:
        super().__init__()
        self.augment = augment
        self.stem = make_stem(in_channels, width)
        self.cell = Cell(width + augment, dropout)
        self.readout = make_readout(width + augment, num_classes)
        self.ode = dict(method=method, rtol=rtol, atol=atol)
        self.adjoint = adjoint

    def forward(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.stem(images)
        if self.augment:
            x = torch.cat([x, x.new_zeros(x.shape[0], self.augment, *x.shape[2:])], dim=1)
        zeros = torch.zeros_like(x)
        calls = [0]

        def field(_t: Tensor, z: Tensor) -> Tensor:
            calls[0] += 1
            return self.cell(z, zeros)

        params = closure_inputs(lambda z: self.cell(z, zeros), x) if self.adjoint else ()
        z_end = integrate(field, x, options=None, adjoint=self.adjoint, adjoint_params=params,
                          **self.ode)
        info = {"nstep": torch.full((x.shape[0],), float(calls[0]), device=x.device)}
        return self.readout(z_end), info
