"""The model comparison on Fashion-MNIST: same stem, cell, readout and protocol for every row.

    python benchmarks/training.py [--epochs 2] [--train-size 6000] [--test-size 2000]

Runs examples/train_classifier.py once per row and seed (default: seed 0) and writes
benchmarks/results/training.json and training.md (a rerun overwrites them), plus the plots
in benchmarks/results/training/. ``--rows`` picks rows by label (and merges them into the
results already in ``--out``), ``--seeds`` repeats them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from homotopy_zoo import training as train_classifier  # noqa: E402

ROWS = {
    "HomoODE, learned z0, direct": ["--model", "homoode"],
    "HomoODE, learned z0, adjoint": ["--model", "homoode", "--homo_adjoint", "true"],
    "HomoODE, zero z0 (plain odeint)": ["--model", "homoode", "--homo_init", "zeros"],
    "HomoODE, zero z0, first step 0.05": ["--model", "homoode", "--homo_init", "zeros",
                                          "--homo_options", "first_step=0.05"],
    "HomoODE, learned z0, first step 0.01": ["--model", "homoode", "--homo_options",
                                             "first_step=0.01"],
    "HomoODE, zero z0, bosh3, first step 0.005": [
        "--model", "homoode", "--homo_init", "zeros", "--homo_method", "bosh3",
        "--homo_options", "first_step=0.005"],
    "HomoODE, learned z0, bosh3": ["--model", "homoode", "--homo_method", "bosh3"],
    "HomoODE, learned z0 at lr 1.0, first step 0.05": [
        "--model", "homoode", "--homo_init_lr", "1.0", "--homo_options", "first_step=0.05"],
    "DEQ, anderson": ["--model", "deq", "--f_solver", "anderson"],
    "DEQ, broyden": ["--model", "deq", "--f_solver", "broyden"],
    "DEQ, homotopy": ["--model", "deq", "--f_solver", "homotopy"],
    "Neural ODE": ["--model", "node"],
    "Augmented Neural ODE": ["--model", "anode"],
}


def plot_cost(results: list[dict], path: Path, title: str) -> None:
    """Test accuracy against activation memory and against forward NFE, one point per
    model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for r in results:
        for ax, key in zip(axes, ("peak_memory_mb", "nfe_forward"), strict=True):
            ax.scatter(r[key], r["test_acc"])
            ax.annotate(r["label"], (r[key], r["test_acc"]), fontsize=7)
    axes[0].set(xlabel="activation memory of a training step (MB)", ylabel="test accuracy")
    axes[1].set(xlabel="forward evaluations (NFE)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=6000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--rows", nargs="+", default=None,
                        help="only the rows whose label contains one of these strings")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    out = Path(args.out)
    common = ["--dataset", "fashion-mnist", "--epochs", str(args.epochs), "--train-size",
              str(args.train_size), "--test-size", str(args.test_size), "--width",
              str(args.width), "--no-plots", "--out", str(out / "training")]
    rows = {k: v for k, v in ROWS.items() if not args.rows or any(r in k for r in args.rows)}
    # With --rows, the other rows already in --out stay (one model per session fits a CPU).
    results = []
    if args.rows and (out / "training.json").exists():
        results = [r for r in json.loads((out / "training.json").read_text())
                   if not any(r["label"].split(", seed")[0] == label for label in rows)]
    for label, extra in rows.items():
        for seed in args.seeds:
            (result,) = train_classifier.main(common + extra + ["--seed", str(seed)])
            result["label"] = label if len(args.seeds) == 1 else f"{label}, seed {seed}"
            results.append(result)
            (out / "training.json").write_text(json.dumps(results, indent=1))
    lines = [f"Fashion-MNIST, {args.train_size} training and {args.test_size} test images, "
             f"{args.epochs} epochs, width {args.width}, batch 64. act. MB: the activation "
             "memory of the largest training step (live peak of tensors saved for backward).",
             "", "| model | test acc | params | act. MB | NFE fwd | NFE bwd | images/s | "
             "train s |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['label']} | {r['test_acc']:.4f} | {r['params']} | "
                     f"{r['peak_memory_mb']:.0f} | {r['nfe_forward']:.1f} | "
                     f"{r['nfe_backward']:.1f} | {r['images_per_s']:.0f} | "
                     f"{r['wall_time_s']:.0f} |")
    if len(args.seeds) > 1:
        lines += ["", "| model | mean test acc | std | mean images/s |", "|---|---|---|---|"]
        for label in rows:
            group = [r for r in results if r["label"].startswith(label + ", seed")]
            acc = torch.tensor([r["test_acc"] for r in group])
            speed = sum(r["images_per_s"] for r in group) / len(group)
            lines.append(f"| {label} | {acc.mean():.4f} | {acc.std():.4f} | {speed:.0f} |")
    (out / "training.md").write_text("\n".join(lines) + "\n")
    if len(args.seeds) == 1:
        title = (f"Fashion-MNIST, {args.train_size} images, {args.epochs} epochs, "
                 f"width {args.width}")
        train_classifier.plot(results, out / "training", title)
        plot_cost(results, out / "training" / "accuracy_vs_cost.png", title)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
