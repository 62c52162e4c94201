"""Training throughput of the HomoODE core: learned initial point against the zero start.

    python benchmarks/throughput.py [--epochs 3] [--steps 30]

Trains the HomoODE classifier (learned initial point) on Fashion-MNIST, then times
training steps at the same weights, alternating the learned start with the zero start
(what a plain torchdiffeq ``odeint`` of the same layout does) step by step, so both see
the same machine load. Writes benchmarks/results/throughput.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchdeq import reset_deq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import train_classifier  # noqa: E402

from torchdeq_homotopy.data import load_image_data  # noqa: E402


def timed_step(model, optimizer, images, labels, init: str) -> tuple[float, float]:
    reset_deq(model)
    start = time.perf_counter()
    z = model.stem(images)
    z_out, info = model.deq(lambda s: model.cell(s, z), torch.zeros_like(z),
                            solver_kwargs={"homo_init": init})
    loss = F.cross_entropy(model.readout(z_out[-1]), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start, float(info["nstep"][0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(2)
    (result,) = train_classifier.main([
        "--dataset", "fashion-mnist", "--model", "homoode", "--epochs", str(args.epochs),
        "--train-size", str(args.train_size), "--test-size", "1000", "--width",
        str(args.width), "--no-plots", "--out", "/tmp/throughput_run"])
    model = train_classifier.build_model("homoode", train_classifier.parse_args(
        ["--width", str(args.width)]), 1, 10)
    state = torch.load("/tmp/throughput_run/homoode/checkpoint.pt", weights_only=False)
    model.load_state_dict(state["model"])
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)     # time the step, keep weights
    data = load_image_data("fashion-mnist")
    loader = DataLoader(Subset(data.train, range(64 * args.steps)), batch_size=64)
    times = {"learned": [], "zeros": []}
    nfe = {"learned": [], "zeros": []}
    for images, labels in loader:
        for init in ("learned", "zeros"):
            seconds, evaluations = timed_step(model, optimizer, images, labels, init)
            times[init].append(seconds)
            nfe[init].append(evaluations)
    rate = {k: 64 * len(v) / sum(v) for k, v in times.items()}
    mean_nfe = {k: sum(v) / len(v) for k, v in nfe.items()}
    row = dict(trained_epochs=args.epochs, steps=args.steps, images_per_s=rate,
               nfe_forward=mean_nfe, speedup=rate["learned"] / rate["zeros"],
               test_acc_after_training=result["test_acc"])
    out = Path(args.out)
    (out / "throughput.json").write_text(json.dumps(row, indent=1))
    md = (f"After {args.epochs} epochs on {args.train_size} Fashion-MNIST images (width "
          f"{args.width}, batch 64), {args.steps} training steps of each start, interleaved:\n\n"
          "| start | NFE forward | images/s |\n|---|---|---|\n"
          f"| learned initial point | {mean_nfe['learned']:.1f} | {rate['learned']:.0f} |\n"
          f"| zero start (plain odeint) | {mean_nfe['zeros']:.1f} | {rate['zeros']:.0f} |\n\n"
          f"Speed-up: **{row['speedup']:.2f}×**.\n")
    (out / "throughput.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
