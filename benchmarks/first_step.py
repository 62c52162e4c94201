"""Where the learned start's evaluation savings come from: dopri5's first step at z0 = 0.

    python benchmarks/first_step.py [--train-steps 160]

Part 1 (seconds): forward evaluations of one batch of 64 Fashion-MNIST images through the
reference classifier at initialisation (width 16), from three starts: zeros (the plain
odeint baseline), a constant 0.005 (about what the learned initial point is after its
first updates), and zeros with ``homo_options={'first_step': 0.05}``. torchdiffeq picks
the first step by Hairer's heuristic, which falls back to h0 = 1e-6 when ||y0|| is
(near) zero; the step then grows at most tenfold per accepted step.

Part 2 (``--train-steps N``, about a minute per 80 steps): trains the learned-start model
for N steps (batch 64, Adam 1e-3) and prints, every 20 steps, the norm of the learned
initial point, the forward evaluations and the initial point's SmoothL1 loss.

Part 3 (``--compare-starts N``, about a minute per configuration at N = 200): trains four
starts from the same weights and batches for N steps and prints forward evaluations /
initial-point loss every 40 steps: the learned start at the paper's lr 0.02 and at lr 1.0
(with and without a first step), and the zero start with a first step.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torchdeq import reset_deq

from homotopy_zoo.data import load_fashion_mnist
from homotopy_zoo.models import ImplicitClassifier

STARTS = {
    "zeros (plain odeint)": dict(homo_init="zeros"),
    "constant 0.005": dict(homo_init="given"),
    "zeros, first_step 0.05": dict(homo_init="zeros", homo_options={"first_step": 0.05}),
}


def nfe_at_init(images: torch.Tensor) -> None:
    for name, config in STARTS.items():
        torch.manual_seed(1)
        model = ImplicitClassifier(1, 10, width=16, core="homoode", **config).eval()
        with torch.no_grad():
            x = model.stem(images)
            start = torch.full_like(x, 0.005) if config["homo_init"] == "given" else x * 0
            _, info = model.deq(lambda z, m=model, x=x: m.cell(z, x), start)
        print(f"{name:<26} forward evaluations {int(info['nstep'].max())}")


def training(config: dict, images: torch.Tensor, labels: torch.Tensor, steps: int):
    """Train the reference classifier (width 16, batch 64, Adam 1e-3) from seed 0 with the
    same batches for every ``config``; yields ``(step, model, info)`` after each step."""
    torch.manual_seed(0)
    model = ImplicitClassifier(1, 10, width=16, core="homoode", **config)
    model.eval()
    model(images[:1])                                   # materialise the initial point
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    batches = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(len(labels), (64,), generator=batches)
        reset_deq(model)
        logits, info = model(images[idx])
        loss = F.cross_entropy(logits, labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        yield step, model, info


def z0_drift(images: torch.Tensor, labels: torch.Tensor, steps: int) -> None:
    for step, model, info in training({}, images, labels, steps):
        if step % 20 == 0 or step == steps - 1:
            print(f"step {step:4d}  ||z0|| {float(model.deq.init_point.norm()):.3f}  "
                  f"evaluations {int(info['nstep'].max())}  "
                  f"z0 loss {float(info['init_loss']):.3f}")


COMPARED = {
    "learned, lr 0.02": dict(),
    "learned, lr 1.0": dict(homo_init_lr=1.0),
    "learned, lr 1.0, first step": dict(homo_init_lr=1.0, homo_options={"first_step": 0.05}),
    "zeros, first step": dict(homo_init="zeros", homo_options={"first_step": 0.05}),
}


def compare_starts(images: torch.Tensor, labels: torch.Tensor, steps: int) -> None:
    for name, config in COMPARED.items():
        marks = [f"{int(info['nstep'].max())}/{float(info['init_loss']):.3f}"
                 for step, _, info in training(config, images, labels, steps)
                 if step % 40 == 39]
        print(f"{name:<30}", " ".join(marks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--compare-starts", type=int, default=0)
    args = parser.parse_args()
    data = load_fashion_mnist(None)
    n = 5000 if args.train_steps or args.compare_starts else 64
    images = torch.stack([data.train[i][0] for i in range(n)])
    labels = torch.tensor([int(data.train[i][1]) for i in range(n)])
    nfe_at_init(images[:64])
    if args.train_steps:
        z0_drift(images, labels, args.train_steps)
    if args.compare_starts:
        compare_starts(images, labels, args.compare_starts)


if __name__ == "__main__":
    main()
