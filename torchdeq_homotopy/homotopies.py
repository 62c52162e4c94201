"""The homotopies H(z, λ) whose zero path joins a trivial start (λ = 0) to z = f(z) (λ = 1).

A homotopy here supplies, on flat batches ``(B, n)`` with per-sample ``λ`` of shape ``(B,)``:
``residual`` H(z, λ), ``d_lambda`` ∂H/∂λ, ``d_z`` the product (∂H/∂z) u given J_f u, and
``start_tangent``, the path's tangent at λ = 0 when it is known in closed form.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


class FixedPointHomotopy:
    """H(z, λ) = z - λ f(z) - (1 - λ) z0.

    H(z0, 0) = 0, and H(z, 1) = 0 ⇔ z = f(z). Along the zero path the Davidenko ODE is
    (I - λ J_f(z)) dz/dλ = f(z) - z0. At λ = 0, ∂H/∂z = I, so the tangent there is
    (f(z0) - z0, 1), normalised.

    Example:
        >>> z0 = torch.zeros(1, 2); h = FixedPointHomotopy(z0, torch.ones(1, 2))
        >>> h.residual(z0, torch.ones(1, 2), torch.zeros(1))
        tensor([[0., 0.]])
    """

    def __init__(self, z0: Tensor, fz0: Tensor) -> None:
        self.z0, self.fz0 = z0, fz0

    def residual(self, z: Tensor, fz: Tensor, lam: Tensor) -> Tensor:
        lam = lam[:, None]
        return z - lam * fz - (1 - lam) * self.z0

    def d_lambda(self, z: Tensor, fz: Tensor) -> Tensor:
        """∂H/∂λ = z0 - f(z)."""
        return self.z0 - fz

    def d_z(self, u: Tensor, ju: Tensor, lam: Tensor) -> Tensor:
        """(∂H/∂z) u = u - λ J_f u."""
        return u - lam[:, None] * ju

    def jac_scale(self, lam: Tensor) -> Tensor:
        """s in ∂H/∂z = I - s J_f: here s = λ."""
        return lam

    def start_tangent(self) -> tuple[Tensor, Tensor] | None:
        """Unnormalised tangent (dz, dλ) = (f(z0) - z0, 1) at λ = 0."""
        return self.fz0 - self.z0, torch.ones_like(self.z0[:, 0])

    def restart(self, mask: Tensor, z0: Tensor, fz0: Tensor) -> None:
        """New start points z0 (and their f(z0)) for the samples in ``mask``."""
        self.z0 = torch.where(mask[:, None], z0, self.z0)
        self.fz0 = torch.where(mask[:, None], fz0, self.fz0)


class NewtonHomotopy:
    """H(z, λ) = G(z) - (1 - λ) G(z0), with G(z) = z - f(z).

    The path satisfies J_G(z) dz/dλ = -G(z0): a damped Newton flow toward G = 0.

    Example:
        >>> z0 = torch.zeros(1, 2); h = NewtonHomotopy(z0, torch.ones(1, 2))
        >>> h.residual(z0, torch.ones(1, 2), torch.zeros(1))
        tensor([[0., 0.]])
    """

    def __init__(self, z0: Tensor, fz0: Tensor) -> None:
        self.g0 = z0 - fz0

    def residual(self, z: Tensor, fz: Tensor, lam: Tensor) -> Tensor:
        return z - fz - (1 - lam[:, None]) * self.g0

    def d_lambda(self, z: Tensor, fz: Tensor) -> Tensor:
        """∂H/∂λ = G(z0)."""
        return self.g0

    def d_z(self, u: Tensor, ju: Tensor, lam: Tensor) -> Tensor:
        """(∂H/∂z) u = u - J_f u."""
        return u - ju

    def jac_scale(self, lam: Tensor) -> Tensor:
        """s in ∂H/∂z = I - s J_f: here s = 1."""
        return torch.ones_like(lam)

    def start_tangent(self) -> None:
        return None

    def restart(self, mask: Tensor, z0: Tensor, fz0: Tensor) -> None:
        """New start points z0 (and their f(z0)) for the samples in ``mask``."""
        self.g0 = torch.where(mask[:, None], z0 - fz0, self.g0)


HOMOTOPIES = {"fixed_point": FixedPointHomotopy, "newton": NewtonHomotopy}
