"""An existing TorchDEQ model (the DEQ of TorchDEQ's README), run with every solver by
changing only ``f_solver``; prints residual, evaluations and time for each.

    python examples/switch_solver.py

Measured (2-core CPU, 64 samples, 32 entries, f_max_iter 200, f_tol 1e-5): fixed-point
iteration, Anderson and Newton–Krylov do not converge; Broyden converges in 80
evaluations and the homotopy solver in 72 (after its warm-up its first stage is Broyden's
method). On this cell the homotopy solver has no advantage over Broyden beyond that;
examples/hard_equilibria.py shows a cell where only one of its settings has.
"""
import time

import torch
from torchdeq import get_deq

import torchdeq_homotopy  # noqa: F401  (registers 'homotopy' and 'newton_krylov')


class DEQ(torch.nn.Module):
    """TorchDEQ README's model: z = tanh(W z + U x), solved by a TorchDEQ core."""

    def __init__(self, dim: int, solver: str) -> None:
        super().__init__()
        self.W = torch.nn.Linear(dim, dim, bias=False)
        self.U = torch.nn.Linear(dim, dim)
        self.deq = get_deq(f_solver=solver, f_max_iter=200, f_tol=1e-5)

    def forward(self, x: torch.Tensor):
        u = self.U(x)
        z_out, info = self.deq(lambda z: torch.tanh(self.W(z) + u), torch.zeros_like(x))
        return z_out[-1], info


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    print(f"{'solver':<18}{'max residual':>14}{'evaluations':>13}{'time ms':>10}")
    for solver in ["fixed_point_iter", "anderson", "broyden", "newton_krylov", "homotopy"]:
        torch.manual_seed(1)
        model = DEQ(32, solver).eval()
        with torch.no_grad():
            model.W.weight.mul_(3.0)                  # a mildly expansive cell
            start = time.perf_counter()
            _, info = model(x)
            ms = 1e3 * (time.perf_counter() - start)
        nfe = info["nfe"][0] if "nfe" in info else info["nstep"].max()
        print(f"{solver:<18}{info['abs_lowest'].max():>14.2e}{int(nfe):>13d}{ms:>10.1f}")


if __name__ == "__main__":
    main()
