"""Shared fixtures: the project root and a CIFAR-10 fixture in torchvision's layout."""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile

import numpy as np
import pytest

from ntk_evolution.parallel import default_compile_cache, enable_compile_cache
from ntk_evolution.utils import cache_home

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# a kept test cache is emptied when it grows past this (a full run of the suite writes ~60 MB)
TEST_CACHE_LIMIT = 2 * 1024**3


def tests_cache_dir() -> str:
    """The scripts' cache folder in the tests (utils.user_cache_dir: compiled functions, the
    digits split), not the user's: $NTK_TEST_CACHE_DIR, else ntk_evolution_tests beside the
    user's cache folder. It is kept from one run of the suite to the next and shared by
    pytest-xdist's workers and the tests' subprocesses, so that a program compiled once is loaded,
    not compiled again (a third of the suite's time is compiling: docs/benchmarks.md). Safe to
    keep: JAX keys each entry by the program itself, its shapes, devices, flags and JAX's
    version, so an entry is only reused for the very same program. The tests of the cache itself
    (test_workflow.py) use folders of their own."""
    if os.environ.get("NTK_TEST_CACHE_DIR"):
        return os.environ["NTK_TEST_CACHE_DIR"]
    folder = os.path.join(cache_home(), "ntk_evolution_tests")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:  # no writable cache folder (a read-only home): a fresh one for this run
        folder = tempfile.mkdtemp(prefix="ntk_test_cache_")
    return folder


def bounded(folder: str, limit: int = TEST_CACHE_LIMIT) -> str:
    """`folder`, emptied first when it holds more than `limit` bytes (by the pytest process
    that starts the run, before any worker: never while one reads it)."""
    if os.environ.get("PYTEST_XDIST_WORKER") or not os.path.isdir(folder):
        return folder
    size = sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(folder)
        for name in names
    )
    if size > limit:
        shutil.rmtree(folder, ignore_errors=True)
    return folder


os.environ["NTK_CACHE_DIR"] = bounded(tests_cache_dir())


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
# every test's compiled functions, not only the scripts' (which turn it on themselves)
enable_compile_cache(default_compile_cache())


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


# The test files that take longest, longest first (seconds of one worker on the 2-core machine,
# compile cache kept, 2026-12-06). pytest-xdist hands out whole files (--dist loadfile) in
# collection order (make test turns off its reordering by test count, which put these last and
# left one worker running them alone): longest first keeps both workers busy to the end. The
# files not named follow, in their usual order.
LONGEST_FIRST = [
    "test_readme_workflow.py",  # 90
    "test_reproduce_cifar.py",  # 83
    "test_robust.py",  # 83
    "test_reproduce.py",  # 79
    "test_parallel.py",  # 69
    "test_colour.py",  # 68
    "test_autoattack.py",  # 58
    "test_reliability.py",  # 50
    "test_readme_examples.py",  # 46
    "test_torch_models.py",  # 39
    "test_automata.py",  # 35
    "test_cntk.py",  # 34
    "test_ntk.py",  # 32
    "test_training.py",  # 25
]


def pytest_collection_modifyitems(items):
    """The tests of LONGEST_FIRST's files first, in its order (each file's own order kept)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture
def skip_cifar_md5(monkeypatch):
    """Bypass only torchvision's md5 check (the fixture's bytes differ from CIFAR's); its
    parsing code still runs."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
