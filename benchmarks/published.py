"""HomoODE side by side with the published code (github.com/wadx2019/homoode).

    git clone https://github.com/wadx2019/homoode /path/to/homoode     # outside this project
    python benchmarks/published.py --published /path/to/homoode [--seeds 0 1 2] [--steps 100]
    python benchmarks/published.py --published /path/to/homoode --sides ours-adjoint \
        --seeds 0 --keep

The published modules are imported unchanged from that checkout (its
``scripts/homoinit_cifar10.py``: ``HomoNet`` and ``InitLayer``, with its own torchdiffeq
fork), each side in a fresh process; nothing of it is copied into this project. Both sides
train the paper's layout (64-channel state at 14 × 14, 256-wide readout, dopri5 at 1e-3) on
Fashion-MNIST (Debian's files; the gray image repeated to the 3 channels the published
stem expects) for ``--steps`` steps at batch 64 with Adam 1e-3 from the same seed and the
same batches. The published side follows its training loop: cross-entropy for the model, and
SmoothL1(InitLayer, solution) stepped by SGD 0.02 every 20 steps. Ours is
``ImplicitClassifier(core='homoode')`` at its defaults, and with ``--sides`` also with
``homo_adjoint=True`` (``OURS``). Reported per run: test accuracy on
the first ``--test-size`` test images, forward and backward NFE (mean over the steps),
training images/s (after 5 steps), and the activation memory of a training step (bytes of
the tensors saved for backward). Writes benchmarks/results/published.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent


def batches(seed: int, steps: int, bsz: int = 64):
    from homotopy_zoo.data import load_fashion_mnist

    data = load_fashion_mnist(Path("data"))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.train), generator=g)
    for step in range(steps):
        idx = order[step * bsz:(step + 1) * bsz]
        images = torch.stack([data.train[i][0] for i in idx])
        labels = torch.tensor([int(data.train[i][1]) for i in idx])
        yield images.expand(-1, 3, -1, -1).contiguous(), labels


def test_set(size: int):
    from homotopy_zoo.data import load_fashion_mnist

    data = load_fashion_mnist(Path("data"))
    images = torch.stack([data.test[i][0] for i in range(size)])
    labels = torch.tensor([int(data.test[i][1]) for i in range(size)])
    return images.expand(-1, 3, -1, -1).contiguous(), labels


class Side:
    """One implementation: builds the model and runs a training step and an evaluation."""

    def step(self, images, labels) -> tuple[int, int]:
        raise NotImplementedError

    def logits(self, images):
        raise NotImplementedError


class Published(Side):
    def __init__(self, checkout: Path) -> None:
        sys.path.insert(0, str(checkout / "scripts"))
        sys.path.insert(0, str(checkout))                # its torchdiffeq fork
        argv, sys.argv = sys.argv, [sys.argv[0]]         # it parses arguments on import
        import homoinit_cifar10 as pub
        sys.argv = argv
        self.pub = pub
        self.model = pub.HomoNet(hidden_dim=64, final_dim=256)
        self.init = pub.InitLayer(dim=64, kernel=1)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.init_optimizer = torch.optim.SGD(self.init.parameters(), lr=0.02)
        self.itr = 0

    def step(self, images, labels):
        self.model.train()
        self.optimizer.zero_grad()
        self.init_optimizer.zero_grad()
        logits, fea, sol = self.model(images, "s", self.init)
        loss = F.cross_entropy(logits, labels)
        extra = F.smooth_l1_loss(self.init(fea), sol)
        forward = self.model.feature_layers.nfe
        self.model.feature_layers.nfe = 0
        loss.backward()
        self.optimizer.step()
        if self.itr % 20 == 0:
            extra.backward()
            self.init_optimizer.step()
        backward = self.model.feature_layers.nfe
        self.model.feature_layers.nfe = 0
        self.itr += 1
        return forward, backward

    @torch.no_grad()
    def logits(self, images):
        self.model.eval()
        return self.model(images, "s", self.init)[0]


OURS = {
    "ours": {},
    "ours-adjoint": {"homo_adjoint": True},
    "ours-heuristic": {"homo_step_memory": False},
}
"""Our side's settings: the defaults, the adjoint backward pass, and torchdiffeq's
initial-step heuristic on every forward (the published code's integration)."""


class Ours(Side):
    def __init__(self, settings: dict) -> None:
        from homotopy_zoo.models import ImplicitClassifier
        from homotopy_zoo.training import Counter

        self.model = ImplicitClassifier(in_channels=3, num_classes=10, width=64, dropout=0.1,
                                        core="homoode", **settings)
        self.counter = Counter(self.model.cell)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)

    def step(self, images, labels):
        self.model.train()
        before = self.counter.calls
        logits, _ = self.model(images)
        loss = F.cross_entropy(logits, labels)
        middle = self.counter.calls
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return middle - before, self.counter.calls - middle

    @torch.no_grad()
    def logits(self, images):
        self.model.eval()
        return self.model(images)[0]


def run_side(side: str, seed: int, steps: int, test_size: int, checkout: Path | None) -> dict:
    """Train one side in this process and return its measurements."""
    from homotopy_zoo.training import SavedTensors

    torch.set_num_threads(2)
    torch.manual_seed(seed)
    model = Published(checkout) if side == "published" else Ours(OURS[side])
    saved = SavedTensors()
    nfe_f, nfe_b, seconds, images_seen = [], [], 0.0, 0
    for step, (images, labels) in enumerate(batches(seed, steps)):
        start = time.perf_counter()
        with saved:
            forward, backward = model.step(images, labels)
        if step >= 5:
            seconds += time.perf_counter() - start
            images_seen += len(labels)
        nfe_f.append(forward)
        nfe_b.append(backward)
    images, labels = test_set(test_size)
    correct = sum(int((model.logits(images[i:i + 250]).argmax(1) == labels[i:i + 250]).sum())
                  for i in range(0, test_size, 250))
    return dict(side=side, seed=seed, steps=steps, test_acc=correct / test_size,
                nfe_forward=statistics.mean(nfe_f), nfe_backward=statistics.mean(nfe_b),
                images_per_s=images_seen / seconds, activation_mb=saved.peak / 2**20)


def table(rows: list[dict]) -> str:
    lines = ["| side | seed | test acc | NFE fwd | NFE bwd | images/s | act. MB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['side']} | {r['seed']} | {r['test_acc']:.4f} | "
                     f"{r['nfe_forward']:.1f} | {r['nfe_backward']:.1f} | "
                     f"{r['images_per_s']:.1f} | {r['activation_mb']:.0f} |")
    published = {r["seed"]: r for r in rows if r["side"] == "published"}
    for side in OURS:
        pairs = [(r, published[r["seed"]]) for r in rows
                 if r["side"] == side and r["seed"] in published]
        if not pairs:
            continue
        diff = [o["test_acc"] - p["test_acc"] for o, p in pairs]
        ratio = {key: statistics.mean(o[key] / p[key] for o, p in pairs)
                 for key in ("images_per_s", "nfe_forward", "activation_mb")}
        lines += ["", f"{side} against published, paired over {len(pairs)} seeds: accuracy "
                  f"{statistics.mean(diff):+.4f} (per seed "
                  f"{', '.join(f'{d:+.4f}' for d in diff)}); images/s "
                  f"{ratio['images_per_s']:.2f}×, forward NFE {ratio['nfe_forward']:.2f}×, "
                  f"activation memory {ratio['activation_mb']:.2f}×."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--published", type=Path, required=True,
                        help="a checkout of github.com/wadx2019/homoode")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--sides", nargs="+", choices=("published", *OURS),
                        default=["published", "ours"], help="which sides to run")
    parser.add_argument("--keep", action="store_true",
                        help="keep the other runs of the existing published.json")
    parser.add_argument("--side", choices=("published", *OURS), help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.side:                                      # a child process: one side, one seed
        print(json.dumps(run_side(args.side, args.seed, args.steps, args.test_size,
                                  args.published)))
        return
    if not (args.published / "scripts" / "homoinit_cifar10.py").exists():
        sys.exit(f"{args.published} is not a checkout of wadx2019/homoode "
                 "(scripts/homoinit_cifar10.py missing): clone it and pass its path.")
    rows = []
    if args.keep and (args.out / "published.json").exists():
        rows = [r for r in json.loads((args.out / "published.json").read_text())
                if not (r["side"] in args.sides and r["seed"] in args.seeds)]
    for seed in args.seeds:
        for side in args.sides:
            cmd = [sys.executable, __file__, "--published", str(args.published), "--side", side,
                   "--seed", str(seed), "--steps", str(args.steps),
                   "--test-size", str(args.test_size)]
            done = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "2"})
            if done.returncode:
                sys.exit(f"{side} seed {seed} failed:\n{done.stderr[-4000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows.sort(key=lambda r: (r["seed"], ["published", *OURS].index(r["side"])))
    (args.out / "published.json").write_text(json.dumps(rows, indent=1))
    text = table(rows)
    (args.out / "published.md").write_text(
        f"{args.steps} training steps at batch 64, test on the first {args.test_size} "
        "Fashion-MNIST test images, 2 CPU cores.\n\n" + text + "\n")
    print(text)


if __name__ == "__main__":
    main()
