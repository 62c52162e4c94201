"""How far a trained HomoODE's integrated solution is from the exact one, by start and method.

    python benchmarks/forward_accuracy.py benchmarks/results/training/homoode/checkpoint.pt
    python benchmarks/forward_accuracy.py CHECKPOINT --start learned

Loads a trained reference classifier (HomoODE core, width 16, Fashion-MNIST; the checkpoint
``benchmarks/training.py`` leaves), evaluates the first 2,000 test images with the
integrator settings below, and compares each with a reference solve at rtol = atol = 1e-7
from the same start: test accuracy, forward evaluations per batch, the share of
predictions that agree with the reference, and the endpoints' relative error
||z(1) - z_ref(1)|| / ||z_ref(1)|| over all test images. ``--start zeros`` (the default)
integrates from z0 = 0; ``--start learned`` from the model's learned initial point (for a model
trained with it). Writes benchmarks/results/forward_accuracy.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from homotopy_zoo import training as train_classifier
from homotopy_zoo.data import load_image_data

SETTINGS = {
    "zero start, rtol = atol = 1e-3 (plain odeint)": ["--homo_init", "zeros"],
    "zero start, first step 0.005": ["--homo_init", "zeros", "--homo_options", "first_step=0.005"],
    "zero start, first step 0.01": ["--homo_init", "zeros", "--homo_options", "first_step=0.01"],
    "zero start, first step 0.02": ["--homo_init", "zeros", "--homo_options", "first_step=0.02"],
    "zero start, first step 0.05": ["--homo_init", "zeros", "--homo_options", "first_step=0.05"],
    "zero start, rtol = atol = 5e-4": ["--homo_init", "zeros", "--homo_rtol", "5e-4",
                                       "--homo_atol", "5e-4"],
    "zero start, dopri5 with ifactor 100": ["--homo_options", "ifactor=100"],
    "zero start, bosh3": ["--homo_method", "bosh3"],
    "zero start, bosh3, first step 0.005": ["--homo_method", "bosh3", "--homo_options",
                                            "first_step=0.005"],
    "zero start, bosh3, first step 0.01": ["--homo_method", "bosh3", "--homo_options",
                                           "first_step=0.01"],
    "zero start, adaptive_heun": ["--homo_method", "adaptive_heun"],
    "zero start, fehlberg2": ["--homo_method", "fehlberg2"],
}
LEARNED_SETTINGS = {
    "learned start, rtol = atol = 1e-3 (the default)": [],
    "learned start, first step 0.01": ["--homo_options", "first_step=0.01"],
    "learned start, rtol = atol = 5e-4": ["--homo_rtol", "5e-4", "--homo_atol", "5e-4"],
    "learned start, bosh3": ["--homo_method", "bosh3"],
}
REFERENCE = ["--homo_rtol", "1e-7", "--homo_atol", "1e-7"]


def trained_model(state: dict, extra: list[str]) -> torch.nn.Module:
    """The reference HomoODE classifier (width 16, Fashion-MNIST) with the weights in
    ``state``, configured by the command-line flags ``extra``, in eval mode."""
    args = train_classifier.parse_args(["--dataset", "fashion-mnist", "--width", "16",
                                        "--model", "homoode", *extra])
    model = train_classifier.build_model("homoode", args, 1, 10)
    model.load_state_dict(state, strict=False)     # a zero start has no learned point
    return model.eval()


@torch.no_grad()
def predictions(state: dict, extra: list[str],
                test_size: int) -> tuple[torch.Tensor, float, float, torch.Tensor]:
    """Predicted classes, test accuracy, forward evaluations per batch of 256, endpoints."""
    test = Subset(load_image_data("fashion-mnist").test, range(test_size))
    model = trained_model(state, extra)
    counter = train_classifier.Counter(model.cell)
    ends: list[torch.Tensor] = []
    model.readout.register_forward_pre_hook(lambda _m, inputs: ends.append(inputs[0]))
    preds, labels, batches = [], [], 0
    for x, y in DataLoader(test, batch_size=256):
        out = model(x)
        preds.append((out[0] if isinstance(out, tuple) else out).argmax(1))
        labels.append(y)
        batches += 1
    pred = torch.cat(preds)
    accuracy = float((pred == torch.cat(labels)).float().mean())
    return pred, accuracy, counter.calls / batches, torch.cat(ends)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--start", choices=("zeros", "learned"), default="zeros")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    start = ["--homo_init", args.start]
    settings = SETTINGS if args.start == "zeros" else LEARNED_SETTINGS
    torch.set_num_threads(2)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)["model"]
    ref, ref_acc, ref_nfe, ref_end = predictions(state, start + REFERENCE, args.test_size)
    lines = ["| integration | test acc | forward evaluations | agreement with reference "
             "| endpoint error |", "|---|---|---|---|---|",
             f"| reference, rtol = atol = 1e-7 | {ref_acc:.4f} | {ref_nfe:.0f} | 1 | 0 |"]
    for name, extra in settings.items():
        pred, acc, nfe, end = predictions(state, start + extra, args.test_size)
        agree = float((pred == ref).float().mean())
        error = float((end - ref_end).norm() / ref_end.norm())   # ||z - z_ref|| / ||z_ref||
        lines.append(f"| {name} | {acc:.4f} | {nfe:.0f} | {agree:.4f} | {error:.4f} |")
        print(lines[-1], flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "forward_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
