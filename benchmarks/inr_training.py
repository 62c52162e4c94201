"""An INR-style DEQ trained with each forward solver, switched by ``f_solver`` only.

    python benchmarks/inr_training.py [--solvers fixed_point_iter anderson broyden homotopy]
        [--steps 300] [--seeds 0]

An implicit neural representation of one image: every pixel p of a 96 × 96 image (a
Fashion-MNIST test image, bilinearly upsampled) is a sample of a DEQ,

    z* = tanh(W z* + U φ(p) + b),    φ(p) = [sin(B p), cos(B p)],    intensity = v · z* + c,

256 wide, W spectrally normalized (``torch.nn.utils.parametrizations.spectral_norm``,
‖W‖₂ ≤ 1), B ~ 10 N(0, 1) fixed Fourier features. The whole 9,216-pixel image is one
batch; each step starts the solver from the previous step's equilibrium (``z_init``
detached), as INR training does. TorchDEQ's defaults otherwise: ``f_max_iter`` 40,
``f_tol`` 1e-3 (abs), the one-step phantom gradient. Adam 1e-3 on the MSE. Reported per
solver and seed: final PSNR, training wall time, mean forward evaluations per step.
Writes benchmarks/results/inr_training.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchdeq import get_deq

import torchdeq_homotopy  # noqa: F401  (registers 'homotopy')
from homotopy_zoo.data import load_fashion_mnist

SIDE, WIDTH, FREQS = 96, 256, 64


def target_image(index: int = 0) -> torch.Tensor:
    """One Fashion-MNIST test image upsampled to SIDE × SIDE, values in [0, 1]."""
    image = load_fashion_mnist(Path("data")).test[index][0]
    return F.interpolate(image[None], size=(SIDE, SIDE), mode="bilinear",
                         align_corners=False)[0, 0].clamp(0, 1)


class ImplicitImage(torch.nn.Module):
    """z* = tanh(W z* + U φ(p) + b) per pixel, intensity = v · z* + c."""

    def __init__(self, solver: str, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        axis = torch.linspace(-1, 1, SIDE)
        coords = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
        B = 10 * torch.randn(2, FREQS, generator=g)
        self.register_buffer("features", torch.cat([torch.sin(coords @ B),
                                                    torch.cos(coords @ B)], dim=1))
        self.inject = torch.nn.Linear(2 * FREQS, WIDTH)
        self.mix = torch.nn.utils.parametrizations.spectral_norm(
            torch.nn.Linear(WIDTH, WIDTH, bias=False))
        self.readout = torch.nn.Linear(WIDTH, 1)
        self.deq = get_deq(f_solver=solver)
        self.z = torch.zeros(SIDE * SIDE, WIDTH)

    def forward(self) -> tuple[torch.Tensor, dict]:
        x = self.inject(self.features)
        z_out, info = self.deq(lambda z: torch.tanh(self.mix(z) + x), self.z)
        self.z = z_out[-1].detach()                     # the next step's warm start
        return self.readout(z_out[-1]).reshape(SIDE, SIDE), info


def psnr(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """10 log10(1 / MSE) for intensities in [0, 1]."""
    return 10 * math.log10(1.0 / max(float(F.mse_loss(prediction, target)), 1e-12))


def run(solver: str, seed: int, steps: int, image: torch.Tensor) -> dict:
    torch.manual_seed(seed)
    model = ImplicitImage(solver, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    evaluations = []
    start = time.perf_counter()
    for _ in range(steps):
        prediction, info = model()
        loss = F.mse_loss(prediction, image)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        evaluations.append(float(info["nstep"].max()))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        prediction, info = model()
    return dict(solver=solver, seed=seed, steps=steps, psnr=psnr(prediction, image),
                train_s=seconds, nfe_forward=statistics.mean(evaluations),
                final_abs_residual=float(info["abs_lowest"].max()))


def table(rows: list[dict]) -> str:
    lines = ["| solver | seed | PSNR (dB) | training s | forward NFE | max final residual |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['solver']} | {r['seed']} | {r['psnr']:.2f} | {r['train_s']:.1f} | "
                     f"{r['nfe_forward']:.1f} | {r['final_abs_residual']:.1e} |")
    fastest = {}
    for r in rows:
        fastest[r["seed"]] = min(fastest.get(r["seed"], math.inf), r["train_s"])
    ours = [r for r in rows if r["solver"] == "homotopy"]
    if ours:
        ratios = ", ".join(f"{r['train_s'] / fastest[r['seed']]:.2f}×" for r in ours)
        lines += ["", f"homotopy's training time over the fastest solver's, per seed: {ratios}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solvers", nargs="+",
                        default=["fixed_point_iter", "anderson", "broyden", "homotopy"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(2)
    image = target_image()
    rows = []
    for seed in args.seeds:
        for solver in args.solvers:
            rows.append(run(solver, seed, args.steps, image))
            print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "inr_training.json").write_text(json.dumps(rows, indent=1))
    text = table(rows)
    (args.out / "inr_training.md").write_text(
        f"{args.steps} steps, full batch of {SIDE * SIDE} pixels, 2 CPU cores.\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
