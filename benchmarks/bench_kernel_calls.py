"""Start-up cost of calculate_kernel.py: one process over many checkpoints against one process
per checkpoint, and a repeated call against the first (JAX's persistent compilation cache).

Every timing is a whole `python calculate_kernel.py ...` process (imports, data, compilation,
kernel, pickle and PNG), wall clock; $NTK_CACHE_DIR sets its cache folder. Checkpoints:
--checkpoints (a quoted glob), else the checkpoints 0..n-1 of a cnn_small run on digits
trained here for n = --n_checkpoints epochs with --constant_save. Each configuration gets its
own empty cache folder:

  first call         one checkpoint, empty cache
  repeated call      the same command again (cache filled by the first)
  separate, no cache one process per checkpoint, each with an empty cache (as before the
                     cache: every process compiles)
  separate, cached   one process per checkpoint, the cache filled by the previous ones
  one call           one process for all checkpoints, empty cache

    python benchmarks/bench_kernel_calls.py                       # 12 checkpoints, N = 300
    # start-up of a compilation-bound call: ResNet-18, a small class kernel
    python benchmarks/bench_kernel_calls.py --resnet18 --repeat_only --class_index 0 \
        --dataset_size 20
    python benchmarks/bench_kernel_calls.py --checkpoints 'demo_runs/phase1_benign/*_[0-9]*.pkl'
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(argv: list[str], cache: str) -> float:
    """Wall seconds of one script process with the cache folder `cache` ($NTK_CACHE_DIR:
    compiled functions and the digits split)."""
    env = {**os.environ, "NTK_CACHE_DIR": cache}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *argv], env=env, cwd=ROOT, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"failed: {' '.join(argv)}\n{done.stderr[-2000:]}")
    return seconds


def train_run(folder: str, n_checkpoints: int, cache: str) -> list[str]:
    timed(
        [
            *("run_exp.py", "--dataset", "digits", "--model", "cnn_small", "--loaders", "CC"),
            *("--standard_epochs", str(n_checkpoints), "--linear_epochs", "0"),
            *("--constant_save", "--skip_first_test", "--skip_second_test"),
            *("--save_path", folder),
        ],
        cache,
    )
    return [os.path.join(folder, f"parameters_checkpoint_{e}.pkl") for e in range(n_checkpoints)]


def resnet18_checkpoints(folder: str, n_checkpoints: int) -> list[str]:
    """ResNet-18 checkpoints for CIFAR-10 (training it here would take hours): the
    initialisation scaled by 1 + 0.05 e for e = 0..n-1, named as epochs."""
    from ntk_evolution.io.checkpoints import checkpoint_name, save_checkpoint
    from ntk_evolution.models import get_model, init_model

    params, net_state = init_model(get_model("resnet18", 10), jax.random.PRNGKey(0), (32, 32, 3))
    paths = []
    for e in range(n_checkpoints):
        moved = jax.tree.map(lambda p, e=e: p * (1 + 0.05 * e), params)
        paths.append(os.path.join(folder, checkpoint_name(e)))
        save_checkpoint(paths[-1], moved, params, net_state)
    return paths


# calculate_kernel.py on the fixture: torchvision's md5 check (the fixture's bytes are not
# CIFAR's) passes for files that exist; its parsing runs as on real CIFAR
ON_FIXTURE = (
    "import os, sys, torchvision.datasets.cifar as c; "
    "c.check_integrity = lambda path, md5=None: os.path.isfile(path); "
    "import calculate_kernel, utils; sys.argv[0] = 'calculate_kernel.py'; "
    "utils.run_main(calculate_kernel.main)"
)


def cifar10_fixture(root: str) -> None:
    """A small random CIFAR-10 in torchvision's layout (the tests' fixture writer)."""
    spec = importlib.util.spec_from_file_location(
        "conftest", os.path.join(ROOT, "tests", "conftest.py")
    )
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    conftest.write_cifar10_fixture(root)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", default="", help="Quoted glob of checkpoints to use.")
    p.add_argument("--n_checkpoints", type=int, default=12)
    p.add_argument("--dataset_size", type=int, default=300)
    p.add_argument("--class_index", type=int, default=-1, help="-1: averaged over logits.")
    p.add_argument(
        "--repeat_only", action="store_true", help="Time the first and repeated call only."
    )
    p.add_argument(
        "--resnet18",
        action="store_true",
        help="ResNet-18 on a random CIFAR-10 fixture (compilation-bound) instead of cnn_small.",
    )
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="bench_kernel_calls_")
    caches = {name: os.path.join(work, f"cache_{name}") for name in ("a", "b", "c", "run")}
    common = ["calculate_kernel.py", "--dataset_size", str(args.dataset_size)]
    common += ["--class_index", str(args.class_index)]
    if args.checkpoints:
        paths = sorted(glob.glob(args.checkpoints))
    elif args.resnet18:
        paths = resnet18_checkpoints(os.path.join(work, "run"), args.n_checkpoints)
        cifar10_fixture(os.path.join(work, "data"))
        common = ["-c", ON_FIXTURE, *common[1:], "--data_root", os.path.join(work, "data")]
    else:
        paths = train_run(os.path.join(work, "run"), args.n_checkpoints, caches["run"])
    model = "resnet18, CIFAR-10 fixture" if args.resnet18 else "checkpoints given or cnn_small"

    def call(model_paths: list[str], save_name: str) -> list[str]:
        return [*common, "--model_path", *model_paths, "--save_name", save_name]

    print(
        f"\n{platform.machine()}, {os.cpu_count()} cores, JAX {jax.__version__} "
        f"({jax.default_backend()}); {model}: {len(paths)} checkpoints, N = {args.dataset_size}, "
        f"class_index {args.class_index}\n"
    )
    first = timed(call(paths[:1], "single"), caches["a"])
    print(f"first call {first:.1f}s", flush=True)
    repeat = timed(call(paths[:1], "single"), caches["a"])
    print(f"repeated call {repeat:.1f}s: {repeat / first:.2f} of the first", flush=True)
    if args.repeat_only:
        return
    separate_plain = sum(
        timed(call([path], f"plain_{i}"), os.path.join(work, f"cache_plain_{i}"))
        for i, path in enumerate(paths)
    )
    separate_cached = sum(
        timed(call([path], f"cached_{i}"), caches["b"]) for i, path in enumerate(paths)
    )
    one_call = timed(call(paths, "many"), caches["c"])

    print("| configuration | seconds | ratio |")
    print("|---|---|---|")
    print(f"| first call, empty cache | {first:.1f} | 1 |")
    print(f"| repeated call | {repeat:.1f} | {repeat / first:.2f} of the first call |")
    print(f"| {len(paths)} separate calls, no cache | {separate_plain:.1f} | 1 |")
    print(
        f"| {len(paths)} separate calls, cache on | {separate_cached:.1f} | "
        f"{separate_cached / separate_plain:.2f} of separate, no cache |"
    )
    print(
        f"| one call, {len(paths)} checkpoints, empty cache | {one_call:.1f} | "
        f"{one_call / separate_plain:.2f} of separate, no cache; "
        f"{one_call / separate_cached:.2f} of separate, cache on |"
    )


if __name__ == "__main__":
    main()
