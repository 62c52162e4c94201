"""Training throughput of the HomoODE core: two integration settings, step by step.

    python benchmarks/throughput.py [--epochs 3] [--steps 30]
    python benchmarks/throughput.py --train-init zeros --pair "zeros, bosh3, first step 0.005" \
        zeros --name throughput_bosh3

Trains the HomoODE classifier on Fashion-MNIST (with the learned initial point, or with
``--train-init zeros`` from the zero start), then times training steps at the same
weights, alternating the two settings of ``--pair`` (names in ``SETTINGS``; by default
the learned start against the zero start, which is what a plain torchdiffeq ``odeint`` of
the same layout does) step by step, so both see the same machine load. Writes
benchmarks/results/throughput.{json,md} (a rerun overwrites them).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchdeq import reset_deq

ROOT = Path(__file__).resolve().parents[1]

from homotopy_zoo import training as train_classifier  # noqa: E402
from homotopy_zoo.data import load_image_data  # noqa: E402

SETTINGS = {
    "learned": {"homo_init": "learned"},
    "zeros": {"homo_init": "zeros"},
    "zeros, bosh3, first step 0.005": {"homo_init": "zeros", "homo_method": "bosh3",
                                       "homo_options": {"first_step": 0.005}},
    "learned, bosh3": {"homo_init": "learned", "homo_method": "bosh3"},
}


def timed_step(model, optimizer, images, labels, setting: dict) -> tuple[float, float]:
    reset_deq(model)
    start = time.perf_counter()
    z = model.stem(images)
    z_out, info = model.deq(lambda s: model.cell(s, z), torch.zeros_like(z),
                            solver_kwargs=setting)
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
    parser.add_argument("--train-init", choices=("learned", "zeros"), default="learned")
    parser.add_argument("--pair", nargs=2, choices=tuple(SETTINGS), default=("learned", "zeros"))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(2)
    (result,) = train_classifier.main([
        "--dataset", "fashion-mnist", "--model", "homoode", "--epochs", str(args.epochs),
        "--train-size", str(args.train_size), "--test-size", "1000", "--width",
        str(args.width), "--homo_init", args.train_init, "--no-plots", "--out",
        "/tmp/throughput_run"])
    model = train_classifier.build_model("homoode", train_classifier.parse_args(
        ["--width", str(args.width)]), 1, 10)
    state = torch.load("/tmp/throughput_run/homoode/checkpoint.pt", weights_only=False)
    model.load_state_dict(state["model"], strict=args.train_init == "learned")
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)     # time the step, keep weights
    data = load_image_data("fashion-mnist")
    loader = DataLoader(Subset(data.train, range(64 * args.steps)), batch_size=64)
    first, second = args.pair
    times: dict[str, list[float]] = {first: [], second: []}
    nfe: dict[str, list[float]] = {first: [], second: []}
    for images, labels in loader:
        for name in args.pair:
            seconds, evaluations = timed_step(model, optimizer, images, labels, SETTINGS[name])
            times[name].append(seconds)
            nfe[name].append(evaluations)
    rate = {k: 64 * len(v) / sum(v) for k, v in times.items()}
    mean_nfe = {k: sum(v) / len(v) for k, v in nfe.items()}
    row = dict(trained_epochs=args.epochs, train_init=args.train_init, steps=args.steps,
               images_per_s=rate, nfe_forward=mean_nfe, speedup=rate[first] / rate[second],
               test_acc_after_training=result["test_acc"])
    out = Path(args.out)
    (out / "throughput.json").write_text(json.dumps(row, indent=1))
    md = (f"After {args.epochs} epochs on {args.train_size} Fashion-MNIST images (width "
          f"{args.width}, batch 64, trained with the {args.train_init} start), "
          f"{args.steps} training steps of each setting, interleaved:\n\n"
          "| setting | NFE forward | images/s |\n|---|---|---|\n"
          + "".join(f"| {name} | {mean_nfe[name]:.1f} | {rate[name]:.0f} |\n"
                    for name in args.pair)
          + f"\nSpeed-up, first over second: **{row['speedup']:.2f}×**.\n")
    (out / "throughput.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
