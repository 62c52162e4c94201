"""The model comparison on Fashion-MNIST: same stem, cell, readout and protocol for every row.

    python benchmarks/training.py [--epochs 2] [--train-size 6000] [--test-size 2000]

Runs examples/train_classifier.py once per row (one seed, 0) and writes
benchmarks/results/training.json and training.md (the table in BENCHMARKS.md), plus the
plots in benchmarks/results/training/.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import train_classifier  # noqa: E402

ROWS = {
    "HomoODE, learned z0, direct": ["--model", "homoode"],
    "HomoODE, learned z0, adjoint": ["--model", "homoode", "--homo_adjoint", "true"],
    "HomoODE, zero z0 (plain odeint)": ["--model", "homoode", "--homo_init", "zeros"],
    "DEQ, anderson": ["--model", "deq", "--f_solver", "anderson"],
    "DEQ, broyden": ["--model", "deq", "--f_solver", "broyden"],
    "DEQ, homotopy": ["--model", "deq", "--f_solver", "homotopy", "--f_max_iter", "60"],
    "Neural ODE": ["--model", "node"],
    "Augmented Neural ODE": ["--model", "anode"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=6000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    out = Path(args.out)
    common = ["--dataset", "fashion-mnist", "--epochs", str(args.epochs), "--train-size",
              str(args.train_size), "--test-size", str(args.test_size), "--width",
              str(args.width), "--no-plots", "--out", str(out / "training")]
    results = []
    for label, extra in ROWS.items():
        (result,) = train_classifier.main(common + extra)
        result["label"] = label
        results.append(result)
        (out / "training.json").write_text(json.dumps(results, indent=1))
    lines = ["| model | test acc | params | peak MB (process) | NFE fwd | NFE bwd | images/s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['label']} | {r['test_acc']:.4f} | {r['params']} | "
                     f"{r['peak_memory_mb']:.0f} | {r['nfe_forward']:.1f} | "
                     f"{r['nfe_backward']:.1f} | {r['images_per_s']:.0f} |")
    (out / "training.md").write_text("\n".join(lines) + "\n")
    train_classifier.plot(results, out / "training")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
