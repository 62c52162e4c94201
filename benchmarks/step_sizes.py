"""Where a trained HomoODE spends its forward evaluations: the integrator's steps along λ.

    python benchmarks/step_sizes.py ZERO_START_CHECKPOINT LEARNED_START_CHECKPOINT \
        [--method bosh3 --first-step 0.005]

Loads two trained reference classifiers (width 16, Fashion-MNIST; the checkpoints
``examples/train_classifier.py`` writes), integrates one batch of 64 training images
from each model's own start (zeros; the learned initial point) at the default tolerance
1e-3, and prints every step the integrator tries: where it starts (λ), its size h, h·s,
whether it was accepted, and the cell's sensitivity there,

    s(λ) = ||J_f(z(λ)) v|| / ||v||,    v ~ N(0, I),  J_f = ∂f/∂z  (one torch.func.jvp)

together with ||z(λ)|| (norms over the batch). Steps are recorded by torchdiffeq's step
callbacks, which the HomoODE core passes on from the cell. Writes
benchmarks/results/step_sizes.md, one section per ``--method``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from forward_accuracy import trained_model
from torch.utils.data import DataLoader, Subset

from homotopy_zoo.data import load_image_data


def load(checkpoint: str, init: str, extra: list[str]) -> torch.nn.Module:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    return trained_model(state, ["--homo_init", init, *extra])


@torch.no_grad()
def trace(model: torch.nn.Module, images: torch.Tensor) -> list[str]:
    """One row per tried step: λ, h, h·s, accepted, ||z(λ)||, s(λ)."""
    x = model.stem(images)
    tried: list[tuple[float, float, bool, torch.Tensor]] = []

    def cell(z: torch.Tensor) -> torch.Tensor:
        return model.cell(z, x)

    def record(accepted: bool):
        def callback(lam: torch.Tensor, z: torch.Tensor, h: torch.Tensor) -> None:
            tried.append((float(lam), float(h), accepted, z.reshape(x.shape)))
        return callback

    cell.callback_accept_step = record(True)
    cell.callback_reject_step = record(False)
    _, info = model.deq(cell, torch.zeros_like(x))
    evaluations = int(info["nstep"].flatten()[0])
    rows = []
    gen = torch.Generator().manual_seed(0)
    for lam, h, accepted, z in tried:
        v = torch.randn(z.shape, generator=gen)
        _, jv = torch.func.jvp(lambda u: model.cell(u, x), (z,), (v,))
        sensitivity = float(jv.norm() / v.norm())
        rows.append(f"| {lam:.2e} | {h:.2e} | {h * sensitivity:.2f} | "
                    f"{'yes' if accepted else 'no'} | {float(z.norm()):.3g} | "
                    f"{sensitivity:.3g} |")
    accepted_count = sum(t[2] for t in tried)
    return [f"forward evaluations: {evaluations}, steps accepted: {accepted_count}, "
            f"rejected: {len(tried) - accepted_count}", "",
            "| λ | h | h·s | accepted | ‖z(λ)‖ | s(λ) = ‖J_f v‖ / ‖v‖ |",
            "|---|---|---|---|---|---|", *rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("zero_checkpoint")
    parser.add_argument("learned_checkpoint")
    parser.add_argument("--method", default="bosh3",
                        help="the integrator traced after dopri5 (default bosh3)")
    parser.add_argument("--first-step", type=float, default=0.005,
                        help="its first step from the zero start (default 0.005)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = load_image_data("fashion-mnist", "data")
    images, _ = next(iter(DataLoader(Subset(data.train, range(64)), batch_size=64)))
    lines = []
    for method, first_step in (("dopri5", None), (args.method, args.first_step)):
        integrator = ["--homo_method", method]
        first = ["--homo_options", f"first_step={first_step}"] if first_step else []
        zero_title = f"zero start, {method}" + (f", first step {first_step}" if first else "")
        for title, checkpoint, init, extra in (
                (zero_title, args.zero_checkpoint, "zeros", integrator + first),
                (f"learned start, {method}", args.learned_checkpoint, "learned", integrator)):
            lines += [f"### {title}", "", *trace(load(checkpoint, init, extra), images), ""]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "step_sizes.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
