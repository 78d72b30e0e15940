"""Shared fixtures: the project root and a CIFAR-10 fixture in torchvision's layout."""

from __future__ import annotations

import os
import pickle
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def session_cache_dir() -> str:
    """The scripts' cache folder (compiled functions, the digits split: utils.user_cache_dir)
    for this test session, not the user's: one folder for all of pytest-xdist's workers (named
    by the run's id, which every worker shares), so that a function compiled by one worker is
    loaded by the others; subprocesses started by the tests share it too."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run:
        return tempfile.mkdtemp(prefix="ntk_test_cache_")
    folder = os.path.join(tempfile.gettempdir(), f"ntk_test_{run[:12]}")  # short: --help
    os.makedirs(folder, exist_ok=True)
    return folder


os.environ["NTK_CACHE_DIR"] = session_cache_dir()


def one_thread_per_worker() -> None:
    """With several pytest-xdist workers (one per core), each worker computes on one thread:
    XLA's and PyTorch's own thread pools in every worker would contend for the same cores (two
    test files side by side on 2 cores: 81 s so, 73 s on one thread each). Subprocesses
    started by the tests inherit it."""
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) < 2:
        return
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false"
    os.environ["XLA_FLAGS"] = flags.strip()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")


one_thread_per_worker()


def write_cifar10_fixture(root: str, n_train: int = 600, n_test: int = 200, seed: int = 0):
    """Write a small CIFAR-10 in torchvision's on-disk layout (python pickles of uint8 rows of
    3072 values, channel-major) under root/cifar-10-batches-py. Each class gets a distinct
    colour tint so that a model can learn something."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)

    def make(n):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        tint = (np.stack([labels * 25, 250 - labels * 25, (labels * 70) % 255], 1)).astype(float)
        images = rng.integers(0, 80, (n, 3, 32, 32)) + tint[:, :, None, None] * 0.6
        return np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072), labels.tolist()

    per_batch = n_train // 5
    for i in range(5):
        data, labels = make(per_batch)
        with open(os.path.join(folder, f"data_batch_{i + 1}"), "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    data, labels = make(n_test)
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump({"data": data, "labels": labels}, f)
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": names}, f)
    return folder


@pytest.fixture
def skip_cifar_md5(monkeypatch):
    """Bypass only torchvision's md5 check (the fixture's bytes differ from CIFAR's); its
    parsing code still runs."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
