"""Training memory of one step at the paper's layout, each configuration in its own process.

    python benchmarks/memory.py [--batch 32] [--image 32]

For each model it reports the bytes autograd saves for the backward pass (summed over
unique storages during the forward pass: the activation memory that grows with the number
of solver steps), how far the training step raised the process's peak resident memory
(``ru_maxrss`` after the step minus before it), the peak itself (which includes PyTorch),
the function evaluations and the step time. Writes
benchmarks/results/memory.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "HomoODE, direct backprop": dict(kind="implicit", core="homoode"),
    "HomoODE, adjoint": dict(kind="implicit", core="homoode", homo_adjoint=True),
    "DEQ anderson, IFT": dict(kind="implicit", core="sliced", f_solver="anderson", ift=True),
    "DEQ homotopy, IFT": dict(kind="implicit", core="sliced", f_solver="homotopy",
                              b_solver="homotopy", ift=True, f_max_iter=60),
    "Neural ODE, direct": dict(kind="node"),
    "Neural ODE, adjoint": dict(kind="node", adjoint=True),
}


def measure(name: str, batch: int, image: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torchdeq import reset_deq

    from homotopy_zoo.models import ImplicitClassifier, ODEClassifier

    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = dict(CONFIGS[name])
    kind = config.pop("kind")
    if kind == "implicit":
        model = ImplicitClassifier(3, 10, width=64, **config)
    else:
        model = ODEClassifier(3, 10, width=64, adjoint=config.get("adjoint", False))
    images, labels = torch.randn(batch, 3, image, image), torch.randint(0, 10, (batch,))
    model.train()
    seen: set[int] = set()
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            saved[0] += t.untyped_storage().nbytes()
        return t

    reset_deq(model)
    with torch.no_grad():
        model(images[:2])                          # materialise lazy state (learned z0)
    reset_deq(model)
    before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, info = model(images)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    step_s = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(model=name, saved_mb=saved[0] / 2**20, process_peak_mb=peak_mb,
                step_peak_mb=peak_mb - before_mb,
                nfe_forward=float(info["nstep"].float().mean()), step_s=step_s,
                params=sum(p.numel() for p in model.parameters()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.batch, args.image)))
        return
    rows = []
    for name in CONFIGS:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--batch",
                              str(args.batch), "--image", str(args.image)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = [f"Batch {args.batch}, images 3×{args.image}×{args.image}, width 64 "
             "(the paper's CIFAR-10 layout), one training step.", "",
             "| model | params | saved for backward (MB) | step's peak rise (MB) | "
             "process peak (MB) | NFE fwd | step s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params']} | {r['saved_mb']:.1f} | "
                     f"{r['step_peak_mb']:.0f} | {r['process_peak_mb']:.0f} | "
                     f"{r['nfe_forward']:.0f} | {r['step_s']:.2f} |")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "memory.json").write_text(json.dumps(rows, indent=1))
    (out_dir / "memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
