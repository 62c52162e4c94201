"""Image classification data: embedded digits, Fashion-MNIST from Debian, torchvision sets."""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("digits", "fashion-mnist", "mnist", "svhn", "cifar10", "cifar100")


@dataclass
class ImageData:
    """Train and test sets with their shape: what a classifier needs to be built."""

    train: Dataset
    test: Dataset
    in_channels: int
    num_classes: int


def _standardise(images: torch.Tensor) -> torch.Tensor:
    return (images - images.mean()) / images.std()


def load_digits_data(seed: int = 0) -> ImageData:
    """scikit-learn's 1,797 8×8 digits (shipped with scikit-learn): 1,500 train, 297 test.

    Example:
        >>> data = load_digits_data()
        >>> len(data.train), len(data.test), data.train[0][0].shape
        (1500, 297, torch.Size([1, 8, 8]))
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = _standardise(torch.tensor(digits.images, dtype=torch.float32)).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    train, test = order[:1500], order[1500:]
    return ImageData(TensorDataset(images[train], labels[train]),
                     TensorDataset(images[test], labels[test]), 1, 10)


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=offset)


def load_fashion_mnist(data_dir: Path) -> ImageData:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` if installed, else torchvision."""
    if (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        def split(prefix: str) -> TensorDataset:
            images = _read_idx(DEBIAN_FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz", 16)
            labels = _read_idx(DEBIAN_FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz", 8)
            x = torch.tensor(images.reshape(-1, 1, 28, 28), dtype=torch.float32) / 255.0
            return TensorDataset((x - 0.2860) / 0.3530, torch.tensor(labels, dtype=torch.long))

        return ImageData(split("train"), split("t10k"), 1, 10)
    return _torchvision("fashion-mnist", data_dir)


def _torchvision(name: str, data_dir: Path) -> ImageData:
    import torchvision
    from torchvision import transforms as T

    spec = {
        "fashion-mnist": (torchvision.datasets.FashionMNIST, 1, 10, (0.2860,), (0.3530,)),
        "mnist": (torchvision.datasets.MNIST, 1, 10, (0.1307,), (0.3081,)),
        "svhn": (torchvision.datasets.SVHN, 3, 10, (0.5,) * 3, (0.5,) * 3),
        "cifar10": (torchvision.datasets.CIFAR10, 3, 10, (0.4914, 0.4822, 0.4465),
                    (0.2470, 0.2435, 0.2616)),
        "cifar100": (torchvision.datasets.CIFAR100, 3, 100, (0.5071, 0.4865, 0.4409),
                     (0.2673, 0.2564, 0.2762)),
    }
    cls, channels, classes, mean, std = spec[name]
    transform = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    root = data_dir / name
    try:
        if name == "svhn":
            train = cls(root, split="train", download=True, transform=transform)
            test = cls(root, split="test", download=True, transform=transform)
        else:
            train = cls(root, train=True, download=True, transform=transform)
            test = cls(root, train=False, download=True, transform=transform)
    except Exception as err:
        raise RuntimeError(
            f"dataset {name!r} is not in {root} and could not be downloaded ({err}). "
            f"Without a network, place torchvision's {cls.__name__} files under {root} "
            "(or point --data-dir at a folder holding them), or use --dataset digits or "
            "fashion-mnist (apt-get install dataset-fashion-mnist).") from err
    return ImageData(train, test, channels, classes)


def load_image_data(name: str, data_dir: str | Path = "data") -> ImageData:
    """Load ``name`` (one of :data:`DATASETS`).

    Example:
        >>> load_image_data('digits').num_classes
        10
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}.")
    if name == "digits":
        return load_digits_data()
    if name == "fashion-mnist":
        return load_fashion_mnist(Path(data_dir))
    return _torchvision(name, Path(data_dir))
