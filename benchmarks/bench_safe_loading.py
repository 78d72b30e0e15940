"""What the safe loader (utils.load_pickle + the file kind's schema) costs against a plain
pickle.load of the same file, on files of the sizes the pipeline passes along.

The safe loader reads the whole file first and parses it with Python's own unpickler (its memo
is a dict, not an array sized by the file), with constructors that allocate no more than the
file's bytes, then checks the schema (types, shapes, finiteness, symmetry of kernels).

    python benchmarks/bench_safe_loading.py
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import tempfile
import time

import numpy as np

from ntk_evolution.io.schemas import check_checkpoint, check_kernel
from ntk_evolution.utils import load_pickle


def files(rng: np.random.Generator) -> dict:
    """A ResNet-18-sized checkpoint (11.2M float32 parameters, ResNet-18's conv and
    linear weights, as params and lin_params) and kernels of N = 500 and 5000 (float64)."""
    shapes = [(3, 3, 3, 64)] + [(3, 3, 64, 64)] * 4
    for c_in, c_out in ((64, 128), (128, 256), (256, 512)):  # ResNet-18's stages 2-4
        shapes += [(3, 3, c_in, c_out), (1, 1, c_in, c_out)] + [(3, 3, c_out, c_out)] * 3
    shapes += [(512, 10)]
    params = {
        f"layer{i}": {"w": rng.standard_normal(s).astype(np.float32)} for i, s in enumerate(shapes)
    }
    out = {
        "checkpoint": ({"params": params, "lin_params": params, "net_state": {}}, check_checkpoint)
    }
    for n in (500, 5000):
        a = rng.standard_normal((n, 64))
        record = {"kernel": a @ a.T, "labels": np.arange(n) % 10, "dataset": "cifar10"}
        out[f"kernel N={n}"] = (record, check_kernel)
    return out


def best_of(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    machine = platform.processor() or platform.machine()
    print(f"{machine}, {os.cpu_count()} cores, numpy {np.__version__}")
    folder = tempfile.mkdtemp()
    print(f"{'file':<16}{'MB':>6}{'pickle.load':>14}{'safe load':>12}{'+ schema':>12}{'ratio':>8}")
    for name, (record, check) in files(np.random.default_rng(0)).items():
        path = os.path.join(folder, name.replace(" ", "_") + ".pkl")
        with open(path, "wb") as f:
            pickle.dump(record, f, protocol=pickle.HIGHEST_PROTOCOL)

        def plain(path=path):
            with open(path, "rb") as f:
                return pickle.load(f)

        plain_s = best_of(plain, args.repeat)
        safe_s = best_of(lambda path=path: load_pickle(path), args.repeat)
        checked_s = best_of(
            lambda path=path, check=check: check(load_pickle(path), path), args.repeat
        )
        size = os.path.getsize(path) / 1e6
        print(
            f"{name:<16}{size:>6.0f}{plain_s * 1e3:>11.0f} ms{safe_s * 1e3:>9.0f} ms"
            f"{checked_s * 1e3:>9.0f} ms{checked_s / plain_s:>7.1f}x"
        )


if __name__ == "__main__":
    main()
