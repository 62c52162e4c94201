"""Where a trained HomoODE spends its forward evaluations: the integrator's steps along λ.

    python benchmarks/step_sizes.py ZERO_START_CHECKPOINT LEARNED_START_CHECKPOINT
    python benchmarks/step_sizes.py ZERO_START_CHECKPOINT LEARNED_START_CHECKPOINT \
        --method bosh3 --first-step 0.005

Loads two trained reference classifiers (width 16, Fashion-MNIST; the checkpoints
``examples/train_classifier.py`` writes), integrates one batch of 64 training images
from each model's own start (zeros; the learned initial point) at the default tolerance
1e-3, and prints every step the integrator tries: where it starts (λ), its size h, h·s,
whether it was accepted, and the cell's sensitivity there,

    s(λ) = ||J_f(z(λ)) v|| / ||v||,    v ~ N(0, I),  J_f = ∂f/∂z  (one torch.func.jvp)

together with ||z(λ)|| (norms over the batch). Steps are recorded by wrapping
torchdiffeq's adaptive Runge–Kutta step. Writes benchmarks/results/step_sizes[_METHOD].md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from forward_accuracy import trained_model
from torch.utils.data import DataLoader, Subset
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver

from homotopy_zoo.data import load_image_data


def load(checkpoint: str, init: str, extra: list[str]) -> torch.nn.Module:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    return trained_model(state, ["--homo_init", init, *extra])


@torch.no_grad()
def trace(model: torch.nn.Module, images: torch.Tensor) -> list[str]:
    """One row per tried step: λ, h, h·s, accepted, ||z(λ)||, s(λ)."""
    x = model.stem(images)
    tried: list[tuple[float, float, bool, torch.Tensor]] = []
    counter = [0]
    step = RKAdaptiveStepsizeODESolver._adaptive_step

    def recording(solver, rk_state):
        new = step(solver, rk_state)
        tried.append((float(rk_state.t1), float(rk_state.dt), bool(new.t1 != rk_state.t1),
                      rk_state.y1))
        return new

    def cell(z: torch.Tensor) -> torch.Tensor:
        counter[0] += 1
        return model.cell(z, x)

    RKAdaptiveStepsizeODESolver._adaptive_step = recording
    try:
        model.deq(cell, torch.zeros_like(x))
    finally:
        RKAdaptiveStepsizeODESolver._adaptive_step = step
    evaluations = counter[0] - 1                        # less the endpoint's residual check
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
    parser.add_argument("--method", default="dopri5")
    parser.add_argument("--first-step", type=float, default=None,
                        help="the zero start's first step (default: torchdiffeq's choice)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    method = ["--homo_method", args.method]
    first = ["--homo_options", f"first_step={args.first_step}"] if args.first_step else []
    torch.set_num_threads(2)
    data = load_image_data("fashion-mnist", "data")
    images, _ = next(iter(DataLoader(Subset(data.train, range(64)), batch_size=64)))
    lines = []
    starts = ((f"zero start, {args.method}" + (f", first step {args.first_step}" if first
                                                else ""), args.zero_checkpoint, "zeros",
               method + first),
              (f"learned start, {args.method}", args.learned_checkpoint, "learned", method))
    for title, checkpoint, init, extra in starts:
        lines += [f"### {title}", "", *trace(load(checkpoint, init, extra), images), ""]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    suffix = "" if args.method == "dopri5" and not first else f"_{args.method}"
    (Path(args.out) / f"step_sizes{suffix}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
