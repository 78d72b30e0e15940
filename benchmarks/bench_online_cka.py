"""Memory of online (minibatch) CKA against the number of images: cka.py --batch_size on a
CIFAR-shaped test set, each size in its own process, its peak resident memory measured.

The test set is a CIFAR-10 fixture in torchvision's layout with --max_images test images
(random tinted images: memory and time do not depend on what they show). Each run is a whole
`python cka.py` process on one checkpoint with itself (the online path of PyTorch checkpoints:
Gram matrices made in forward hooks), --batch_size B, --dataset_passes P. What a full-batch
CKA would hold is printed beside it: one N x N float64 Gram matrix per layer.

    python benchmarks/bench_online_cka.py                       # WRN-28-1, 1k..10k images
    python benchmarks/bench_online_cka.py --sizes 500 2000 --layers all
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_fixture_writer():
    """tests/conftest.py's CIFAR-format fixture writer, loaded from its file."""
    spec = importlib.util.spec_from_file_location(
        "conftest", os.path.join(ROOT, "tests", "conftest.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_cifar10_fixture


RUN = """
import os, resource, sys, time
import torchvision.datasets.cifar as cifar
cifar.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)  # a fixture, not CIFAR
import cka
start = time.time()
cka.main({argv!r})
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT", peak_kb / 1024, time.time() - start)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="wrn_28_1")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 10000])
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--dataset_passes", type=int, default=1)
    p.add_argument(
        "--layers",
        default="conv1,block1.layer.3.conv2,block2.layer.3.conv2,block3.layer.3.conv2,bn1,fc",
    )
    args = p.parse_args()

    import torch

    write_cifar10_fixture = load_fixture_writer()

    from ntk_evolution.similarity.torch_models import TORCH_MODELS

    machine = platform.processor() or platform.machine()
    print(f"{machine}, {os.cpu_count()} cores, torch {torch.__version__}")
    folder = tempfile.mkdtemp()
    write_cifar10_fixture(os.path.join(folder, "data"), n_train=50, n_test=max(args.sizes))
    torch.manual_seed(0)
    checkpoint = os.path.join(folder, f"{args.model}.pth.tar")
    torch.save({"state_dict": TORCH_MODELS[args.model](10).state_dict()}, checkpoint)
    n_layers = len(args.layers.split(","))
    print(f"{args.model}, {n_layers} layers, batch {args.batch_size}, {args.dataset_passes} passes")
    print(f"{'images':>8}{'peak RSS MB':>14}{'seconds':>10}{'full-batch Grams MB':>22}")
    for n in args.sizes:
        argv = [
            "--model",
            args.model,
            "--model_path",
            checkpoint,
            "--dataset",
            "cifar10",
            "--data_root",
            os.path.join(folder, "data"),
            "--num_images",
            str(n),
            "--batch_size",
            str(args.batch_size),
            "--dataset_passes",
            str(args.dataset_passes),
            "--model0_layers",
            args.layers,
            "--model1_layers",
            args.layers,
            "--savedir",
            os.path.join(folder, f"out_{n}"),
        ]
        done = subprocess.run(
            [sys.executable, "-c", RUN.format(argv=argv)],
            capture_output=True,
            text=True,
            cwd=folder,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
        if done.returncode or not lines:
            sys.exit(f"{n} images failed:\n{done.stderr[-2000:]}")
        peak, seconds = (float(v) for v in lines[0].split()[1:])
        full = n * n * 8 * n_layers / 2**20
        print(f"{n:>8}{peak:>14.0f}{seconds:>10.1f}{full:>22.0f}")


if __name__ == "__main__":
    main()
