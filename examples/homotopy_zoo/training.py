"""The main job's training loop: train HomoODE, DEQ, Neural ODE and Augmented Neural ODE
classifiers that share one stem, cell and readout, and compare them.

Its command line is ``examples/train_classifier.py`` (usage there); benchmarks call
:func:`main`, :func:`build_model` and :class:`SavedTensors` directly.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchdeq import reset_deq
from torchdeq.utils import add_deq_args
from tqdm import tqdm

import torchdeq_homotopy as th

from .data import DATASETS, load_image_data
from .models import ImplicitClassifier, ODEClassifier

MODELS = ("homoode", "deq", "deq-homotopy", "node", "anode")
"""``deq`` solves with ``--f_solver`` (default Anderson); ``deq-homotopy`` is the same DEQ
switched to ``f_solver='homotopy'``, the plugin's one-flag change."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--dataset", default="digits", choices=DATASETS)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=16, help="state channels (paper: 64)")
    parser.add_argument("--augment", type=int, default=8, help="extra ANODE channels")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--train-size", type=int, default=0, help="use only this many "
                        "training images (0: all)")
    parser.add_argument("--test-size", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this "
                        "many steps (0: no limit)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/classifier")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-plots", action="store_true")
    add_deq_args(parser)
    th.add_homotopy_args(parser)
    parser.set_defaults(f_solver="anderson", f_max_iter=30, b_max_iter=30, f_tol=1e-3)
    return parser.parse_args(argv)


def deq_config(args: argparse.Namespace, model: str) -> dict:
    """The DEQ keys of ``args`` for this model: TorchDEQ's and the plugin's."""
    solver_keys = {"f_solver", "b_solver", "f_max_iter", "b_max_iter", "f_tol", "b_tol",
                   "f_stop_mode", "b_stop_mode", "ift", "n_states", "grad", "eval_f_max_iter",
                   "eval_factor"} | set(th.config.SOLVER_KEYS)
    keys = set(th.config.CORE_KEYS) if model == "homoode" else solver_keys
    config = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    config["core"] = "homoode" if model == "homoode" else args.core
    if model == "deq-homotopy":
        config["f_solver"] = "homotopy"
    return config


def label(name: str, args: argparse.Namespace) -> str:
    """The model's name in tables and plots, with its forward solver for DEQs."""
    if name.startswith("deq"):
        return f"deq ({deq_config(args, name)['f_solver']})"
    return name


def build_model(name: str, args: argparse.Namespace, in_channels: int,
                num_classes: int) -> torch.nn.Module:
    common = dict(in_channels=in_channels, num_classes=num_classes, width=args.width,
                  dropout=args.dropout)
    if name in ("homoode", "deq", "deq-homotopy"):
        return ImplicitClassifier(**common, **deq_config(args, name))
    return ODEClassifier(**common, augment=args.augment if name == "anode" else 0,
                         adjoint=args.homo_adjoint)


class Counter:
    """Counts calls of the cell, to report forward and backward NFE of every model."""

    def __init__(self, cell: torch.nn.Module) -> None:
        self.calls = 0
        cell.register_forward_pre_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1


class _Saved:
    """A tensor saved for backward; tells its counter when autograd lets go of it."""

    __slots__ = ("counter", "key", "tensor")

    def __init__(self, tensor: torch.Tensor, counter: SavedTensors, key: int) -> None:
        self.tensor, self.counter, self.key = tensor, counter, key

    def __del__(self) -> None:
        self.counter._release(self.key)


class SavedTensors:
    """The peak, during a training step, of the bytes autograd holds for the backward pass
    (each storage counted once while any saved tensor uses it): the activation memory by
    which DEQs, HomoODE's adjoint and Neural ODEs differ. A saved tensor counts from when
    autograd saves it until autograd frees it (after its node's backward, or when its graph
    is dropped), so transient graphs (rejected ODE steps, the adjoint's vector-Jacobian
    products) count only while they live. Measured per model and per step, unlike the
    process's peak RSS, and on every device.

    Example:
        >>> a = torch.randn(100, requires_grad=True)
        >>> saved = SavedTensors()
        >>> with saved:
        ...     _ = (a * a.exp()).sum()     # exp saves its output, mul both factors
        >>> saved.peak                      # a and exp(a): 2 × 400 bytes
        800
    """

    def __init__(self) -> None:
        self.peak = 0
        self._live: dict[int, list[int]] = {}     # storage address -> [uses, bytes]
        self._bytes = self._step_peak = 0

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        entry = self._live.setdefault(key, [0, storage.nbytes()])
        if entry[0] == 0:
            self._bytes += entry[1]
            self._step_peak = max(self._step_peak, self._bytes)
        entry[0] += 1
        # Detached: the packed object must not hold the tensor's grad_fn, or every saved
        # output forms a reference cycle with its node and the graph outlives the step.
        return _Saved(tensor.detach(), self, key)

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self._bytes -= entry[1]
            del self._live[key]

    def __enter__(self) -> SavedTensors:
        self._step_peak = self._bytes
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack,
                                                               lambda saved: saved.tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        self.peak = max(self.peak, self._step_peak)


def peak_memory_mb(device: torch.device, saved: SavedTensors) -> float:
    """The peak of allocated memory on CUDA (reset per model); elsewhere the largest
    activation memory of a training step (:class:`SavedTensors`)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return saved.peak / 2**20


def reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def run_epoch(model, loader, device, counter, optimizer=None, desc="", saved=None):
    """One pass; returns summed loss, correct, count, forward and backward NFE, steps.
    With ``saved`` (a :class:`SavedTensors`), training forwards record activation memory."""
    training = optimizer is not None
    model.train(training)
    totals = dict(loss=0.0, correct=0.0, count=0.0, nfe_f=0.0, nfe_b=0.0, steps=0.0)
    # disable=None: bars on a terminal, none in logs; other ranks never draw.
    bar = tqdm(loader, desc=desc, leave=False, disable=None if is_main() else True,
               file=sys.stdout)
    for step, (images, labels) in enumerate(bar):
        if training and ARGS.max_steps and step >= ARGS.max_steps:
            break
        images, labels = images.to(device), labels.to(device)
        inner = model.module if hasattr(model, "module") else model
        reset_deq(inner)
        before = counter.calls
        with torch.set_grad_enabled(training), (saved if training and saved is not None
                                                else contextlib.nullcontext()):
            logits, _ = model(images)
            loss = F.cross_entropy(logits, labels)
        after_forward = counter.calls
        if training:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        totals["loss"] += float(loss.detach()) * len(labels)
        totals["correct"] += float((logits.argmax(1) == labels).sum())
        totals["count"] += len(labels)
        totals["nfe_f"] += after_forward - before
        totals["nfe_b"] += counter.calls - after_forward
        totals["steps"] += 1
        bar.set_postfix(loss=f"{totals['loss'] / totals['count']:.3f}",
                        acc=f"{totals['correct'] / totals['count']:.3f}",
                        nfe=f"{totals['nfe_f'] / totals['steps']:.0f}")
    keys = list(totals)
    return dict(zip(keys, reduce_sum([totals[k] for k in keys], device), strict=True))


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def train_one(name: str, args: argparse.Namespace, data, device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    model = build_model(name, args, data.in_channels, data.num_classes).to(device)
    counter = Counter(model.cell)
    with torch.no_grad():                      # materialise lazy state (learned z0) first
        model.eval()
        model(data.train[0][0].unsqueeze(0).to(device))
    params = sum(p.numel() for p in model.parameters())
    out_dir = Path(args.out) / name
    ckpt_path = out_dir / "checkpoint.pt"
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, 1e-6)
    history, start_epoch = [], 0
    if args.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, start_epoch = state["history"], state["epoch"]
    if dist.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(model)
    sampler = DistributedSampler(data.train, seed=args.seed) if dist.is_initialized() else None
    train_loader = DataLoader(data.train, batch_size=args.batch_size, sampler=sampler,
                              shuffle=sampler is None,
                              generator=torch.Generator().manual_seed(args.seed))
    test_sampler = (DistributedSampler(data.test, shuffle=False) if dist.is_initialized()
                    else None)
    test_loader = DataLoader(data.test, batch_size=256, sampler=test_sampler)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_time = 0.0
    saved = SavedTensors()
    for epoch in range(start_epoch, args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        tr = run_epoch(model, train_loader, device, counter, optimizer,
                       desc=f"{name} epoch {epoch + 1}/{args.epochs}", saved=saved)
        train_time += time.perf_counter() - t0
        scheduler.step()
        te = run_epoch(model, test_loader, device, counter, desc=f"{name} test")
        history.append(dict(epoch=epoch + 1, train_loss=tr["loss"] / tr["count"],
                            train_acc=tr["correct"] / tr["count"],
                            test_acc=te["correct"] / te["count"],
                            nfe_forward=tr["nfe_f"] / max(tr["steps"], 1),
                            nfe_backward=tr["nfe_b"] / max(tr["steps"], 1),
                            images_per_s=tr["count"] / max(time.perf_counter() - t0, 1e-9)))
        if is_main():
            h = history[-1]
            print(f"{label(name, args)} epoch {h['epoch']}/{args.epochs}: train loss "
                  f"{h['train_loss']:.3f}, test acc {h['test_acc']:.4f}, NFE fwd "
                  f"{h['nfe_forward']:.1f}, {h['images_per_s']:.0f} images/s", flush=True)
            out_dir.mkdir(parents=True, exist_ok=True)
            inner = model.module if hasattr(model, "module") else model
            torch.save(dict(model=inner.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), history=history,
                            epoch=epoch + 1), ckpt_path)
    inner = model.module if hasattr(model, "module") else model
    checksum = torch.tensor([sum(float(p.detach().double().sum()) for p in inner.parameters())],
                            dtype=torch.float64, device=device)
    checksums = [checksum.clone() for _ in range(dist.get_world_size())] if (
        dist.is_initialized()) else [checksum]
    if dist.is_initialized():
        dist.all_gather(checksums, checksum)
    last = history[-1] if history else {}
    result = dict(model=name, label=label(name, args), dataset=args.dataset,
                  test_acc=last.get("test_acc", math.nan), params=params,
                  peak_memory_mb=peak_memory_mb(device, saved),
                  memory_measure=("cuda max_memory_allocated" if device.type == "cuda"
                                  else "tensors saved for backward, largest training step"),
                  nfe_forward=last.get("nfe_forward", math.nan),
                  nfe_backward=last.get("nfe_backward", math.nan),
                  images_per_s=last.get("images_per_s", math.nan), wall_time_s=train_time,
                  epochs=args.epochs, history=history,
                  rank_param_checksums=[float(c) for c in checksums],
                  world_size=dist.get_world_size() if dist.is_initialized() else 1,
                  config={k: v for k, v in vars(args).items() if _jsonable(v)})
    if is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    return result


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def print_table(results: list[dict]) -> None:
    memory = "peak MB" if results and results[0]["memory_measure"].startswith("cuda") \
        else "act. MB"
    header = (f"{'model':<17}{'test acc':>10}{'params':>10}{memory:>10}{'NFE fwd':>9}"
              f"{'NFE bwd':>9}{'img/s':>9}{'time s':>9}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['label']:<17}{r['test_acc']:>10.4f}{r['params']:>10d}"
              f"{r['peak_memory_mb']:>10.0f}{r['nfe_forward']:>9.1f}{r['nfe_backward']:>9.1f}"
              f"{r['images_per_s']:>9.0f}{r['wall_time_s']:>9.1f}")


def plot(results: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        epochs = [h["epoch"] for h in r["history"]]
        axes[0].plot(epochs, [h["train_loss"] for h in r["history"]], marker="o",
                     label=r["label"])
        axes[1].plot(epochs, [h["test_acc"] for h in r["history"]], marker="o", label=r["label"])
    axes[0].set(xlabel="epoch", ylabel="train loss")
    axes[1].set(xlabel="epoch", ylabel="test accuracy")
    axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in results:
        ax.scatter(r["peak_memory_mb"], r["test_acc"])
        ax.annotate(r["label"], (r["peak_memory_mb"], r["test_acc"]))
    memory = ("peak allocated memory (MB)" if results[0]["memory_measure"].startswith("cuda")
              else "activation memory of a training step (MB)")
    ax.set(xlabel=memory, ylabel="test accuracy", title=title)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_memory.png", dpi=120)
    plt.close("all")


def main(argv: list[str] | None = None) -> list[dict]:
    global ARGS
    ARGS = args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if args.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    data = load_image_data(args.dataset, args.data_dir)
    if args.train_size:
        data.train = Subset(data.train, range(min(args.train_size, len(data.train))))
    if args.test_size:
        data.test = Subset(data.test, range(min(args.test_size, len(data.test))))
    results = [train_one(name, args, data, device) for name in args.model]
    if is_main():
        print_table(results)
        out = Path(args.out)
        if not args.no_plots:
            images = len(data.train)
            plot(results, out, f"{args.dataset}, {images} training images, {args.epochs} "
                               f"epochs, width {args.width}")
        print(f"results: {out.resolve()}/<model>/results.json"
              + ("" if args.no_plots else f"; plots: {out.resolve()}/training_curves.png, "
                 "accuracy_vs_memory.png"))
    if dist.is_initialized():
        # Free the DistributedDataParallel wrappers (kept alive by reference cycles) while
        # the group still exists, so that the gloo group is not torn down at interpreter
        # exit. Without this a worker sometimes aborted after training ("terminate called
        # without an active exception"; 2 of 5 loaded runs here, 0 of 8 with it).
        gc.collect()
        dist.barrier()              # let rank 0 finish writing before the group goes away
        dist.destroy_process_group()
    return results


ARGS: argparse.Namespace
