"""The paper-layout DEQ trained with each forward solver at one budget (issue: DEQ training
with homotopy, the reference-DEQ target).

    python benchmarks/deq_training.py [--solvers anderson homotopy] [--seeds 0 1] [--steps 100]
    python benchmarks/deq_training.py --seeds 3 4 --keep      # add seeds to the results

The classifier of ``homotopy_zoo.models`` at the paper's layout (64-channel state at
14 × 14 on Fashion-MNIST, 256-wide readout) with a DEQ core: ``f_max_iter`` 30, TorchDEQ's
``f_tol`` 1e-3 (abs), IFT with TorchDEQ's default backward. Every solver trains from the same
seed on the same batches (Adam 1e-3, batch 64). Reported per run: test accuracy on the
first ``--test-size`` test images, training images/s (after 5 steps), forward NFE, and the
mean relative forward residual ||f(z) − z|| / ||f(z)|| over the training steps. Writes
benchmarks/results/deq_training.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import torchdeq_homotopy  # noqa: F401  (registers 'homotopy')
from homotopy_zoo.data import load_fashion_mnist
from homotopy_zoo.models import ImplicitClassifier
from homotopy_zoo.training import Counter


def run(solver: str, seed: int, steps: int, test_size: int, data) -> dict:
    torch.manual_seed(seed)
    model = ImplicitClassifier(in_channels=1, num_classes=10, width=64, dropout=0.1,
                               core="sliced", f_solver=solver, f_max_iter=30, ift=True)
    counter = Counter(model.cell)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))
    seconds, seen, nfe, residuals = 0.0, 0, [], []
    for step in range(steps):
        idx = order[step * 64:(step + 1) * 64]
        images = torch.stack([data.train[i][0] for i in idx])
        labels = torch.tensor([int(data.train[i][1]) for i in idx])
        model.train()
        start, calls = time.perf_counter(), counter.calls
        logits, info = model(images)
        forward_calls = counter.calls - calls
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= 5:
            seconds += time.perf_counter() - start
            seen += len(labels)
        nfe.append(forward_calls)
        residuals.append(float(info["rel_lowest"].mean()))
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, test_size, 250):
            images = torch.stack([data.test[j][0] for j in range(i, min(i + 250, test_size))])
            labels = torch.tensor([int(data.test[j][1])
                                   for j in range(i, min(i + 250, test_size))])
            correct += int((model(images)[0].argmax(1) == labels).sum())
    return dict(solver=solver, seed=seed, steps=steps, test_acc=correct / test_size,
                images_per_s=seen / seconds, nfe_forward=statistics.mean(nfe),
                mean_rel_residual=statistics.mean(residuals))


def paired(rows: list[dict], first: str = "homotopy", second: str = "anderson") -> str:
    """Test accuracy of ``first`` − ``second`` paired by seed: mean ± the 95 % t-interval's
    half-width (t quantile of n − 1 degrees of freedom), and images/s ``first``/``second``."""
    by = {(r["solver"], r["seed"]): r for r in rows}
    seeds = sorted(s for solver, s in by if solver == first and (second, s) in by)
    if len(seeds) < 2:
        return ""
    diff = [100 * (by[first, s]["test_acc"] - by[second, s]["test_acc"]) for s in seeds]
    speed = [by[first, s]["images_per_s"] / by[second, s]["images_per_s"] for s in seeds]
    t975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}
    half = t975.get(len(seeds) - 1, 2.0) * statistics.stdev(diff) / len(seeds) ** 0.5
    return (f"{first} − {second}, paired over {len(seeds)} seeds: test accuracy "
            f"{statistics.mean(diff):+.1f} ± {half:.1f} points (per seed "
            f"{', '.join(f'{d:+.1f}' for d in diff)}); images/s {statistics.mean(speed):.2f}×.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solvers", nargs="+", default=["anderson", "homotopy"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--keep", action="store_true",
                        help="keep the other runs of the existing deq_training.json")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = load_fashion_mnist(Path("data"))
    rows = []
    if args.keep and (args.out / "deq_training.json").exists():
        rows = [r for r in json.loads((args.out / "deq_training.json").read_text())
                if not (r["solver"] in args.solvers and r["seed"] in args.seeds)]
    for seed in args.seeds:
        for solver in args.solvers:
            rows.append(run(solver, seed, args.steps, args.test_size, data))
            print(rows[-1], flush=True)
    rows.sort(key=lambda r: (r["seed"], r["solver"]))
    lines = ["| solver | seed | test acc | images/s | NFE fwd | mean rel. residual |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['solver']} | {r['seed']} | {r['test_acc']:.4f} | {r['images_per_s']:.1f} | "
              f"{r['nfe_forward']:.1f} | {r['mean_rel_residual']:.2e} |" for r in rows]
    lines += ["", paired(rows)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "deq_training.json").write_text(json.dumps(rows, indent=1))
    text = (f"{args.steps} steps at batch 64, test on the first {args.test_size} Fashion-MNIST "
            "test images, 2 CPU cores.\n\n" + "\n".join(lines) + "\n")
    (args.out / "deq_training.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
