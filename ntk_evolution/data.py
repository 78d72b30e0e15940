"""Datasets as in-memory NumPy arrays: NHWC float32 images in [0, 1], int32 labels.

CIFAR-10/100 come through torchvision (downloaded into `data_root` when online); `digits` is
scikit-learn's embedded 8x8 handwritten digits, for offline runs, demos and tests.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ntk_evolution.utils import UserError, atomic_file, user_cache_dir

DATASETS = ("cifar10", "cifar100", "digits")
# (image shape (H, W, C), number of classes) of each dataset, known without loading it
SHAPES = {"cifar10": ((32, 32, 3), 10), "cifar100": ((32, 32, 3), 100), "digits": ((8, 8, 1), 10)}
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@dataclass(frozen=True)
class Dataset:
    """Train and test splits; images (N, H, W, C) float32 in [0, 1], labels (N,) int32."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


def load_dataset(name: str, data_root: str = "./data") -> Dataset:
    """Load `name` (cifar10 | cifar100 | digits) into memory."""
    if name == "digits":
        return _load_digits()
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, data_root)
    raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def _load_digits() -> Dataset:
    """scikit-learn digits at native 8x8x1, values 0..16 scaled to [0, 1], fixed stratified
    80/20 split (1437 train, 360 test). The split is kept in the user cache folder
    (digits_cache_path) after the first load: importing scikit-learn costs seconds."""
    path = digits_cache_path()
    try:
        with np.load(path) as cached:
            arrays = [cached[k] for k in ("x_train", "y_train", "x_test", "y_test")]
        return Dataset("digits", *arrays, 10)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # not there yet (or unreadable): split afresh, then keep it
    ds = _split_digits()
    arrays = {k: getattr(ds, k) for k in ("x_train", "y_train", "x_test", "y_test")}
    with contextlib.suppress(OSError, UserError):  # no cache folder: only slower next time
        with atomic_file(path) as f:
            np.savez(f, **arrays)
    return ds


def digits_cache_path() -> str:
    """Where the digits split is kept: named by scikit-learn's version, whose data and split
    it is."""
    from importlib.metadata import version

    return os.path.join(user_cache_dir(), f"digits_sklearn_{version('scikit-learn')}.npz")


def _split_digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        labels,
        test_size=DIGITS_TEST_FRACTION,
        stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    return Dataset("digits", x_train, y_train, x_test, y_test, 10)


def _cifar_files(name: str) -> tuple[str, list[str]]:
    if name == "cifar10":
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
        return "cifar-10-batches-py", names
    return "cifar-100-python", ["train", "test", "meta"]


def _load_cifar(name: str, data_root: str) -> Dataset:
    """CIFAR through torchvision's own parser; downloads when the files are absent."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder, files = _cifar_files(name)
    present = all(os.path.isfile(os.path.join(data_root, folder, f)) for f in files)
    if not present:
        try:
            cls(root=data_root, train=True, download=True)
        except Exception as err:  # offline, unwritable root, interrupted download
            raise UserError(
                f"{name} not found in {os.path.join(data_root, folder)} (expected files: "
                f"{', '.join(files)}) and it could not be downloaded ({type(err).__name__}); "
                f"download it on a machine with internet and copy it there, or set --data_root"
            ) from None
    try:
        train = cls(root=data_root, train=True, download=False)
        test = cls(root=data_root, train=False, download=False)
    except RuntimeError as err:
        raise UserError(f"{name} in {os.path.join(data_root, folder)} is unusable: {err}") from None
    n_classes = 10 if name == "cifar10" else 100
    return Dataset(
        name,
        (train.data.astype(np.float32) / 255.0),
        np.asarray(train.targets, np.int32),
        (test.data.astype(np.float32) / 255.0),
        np.asarray(test.targets, np.int32),
        n_classes,
    )


def iterate_batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    rng: np.random.Generator | None = None,
    drop_last: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of (x, y), shuffled by `rng` when given. Training drops the last partial batch so
    that every step has the same shape (one compilation)."""
    order = rng.permutation(len(x)) if rng is not None else np.arange(len(x))
    stop = len(x) - len(x) % batch_size if drop_last else len(x)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


def num_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def class_balanced_subset(
    labels: np.ndarray, dataset_size: int, n_classes: int, seed: int
) -> np.ndarray:
    """Indices of `dataset_size / n_classes` images per class drawn without replacement with
    `seed`, ordered by class then draw (so kernels come out block-ordered by class)."""
    if dataset_size <= 0 or dataset_size % n_classes:
        raise UserError(
            f"--dataset_size {dataset_size} must be a positive multiple of the number of "
            f"classes ({n_classes})"
        )
    per_class = dataset_size // n_classes
    # the original's draw (np.random.seed(seed), then np.random.choice per class): the same
    # images for the same seed
    rng = np.random.RandomState(seed)
    chosen = []
    for c in range(n_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise UserError(
                f"--dataset_size {dataset_size} needs {per_class} images of class {c}, but the "
                f"training set has only {len(members)}; the largest possible is "
                f"{n_classes * min(np.bincount(labels, minlength=n_classes))}"
            )
        chosen.append(members[rng.choice(len(members), per_class, replace=False)])
    return np.concatenate(chosen)


def padded_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Batches in order, the last one padded by repeating its first row so that every batch has
    the same shape; yields (x, y, number of real rows)."""
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        n_real = len(xb)
        if n_real < batch_size:
            pad = batch_size - n_real
            xb = np.concatenate([xb, np.repeat(xb[:1], pad, axis=0)])
            yb = np.concatenate([yb, np.repeat(yb[:1], pad, axis=0)])
        yield xb, yb, n_real


def to_8_bits(images: np.ndarray) -> np.ndarray:
    """floor(255 x) / 255 in float32, as the original's ToPILImage/ToTensor round trip of
    --test_path images does (torch's float-to-byte conversion truncates)."""
    scaled = images.astype(np.float32) * np.float32(255)
    return scaled.astype(np.uint8).astype(np.float32) / np.float32(255)
