"""Arrays in every memory layout NumPy can pickle, for the loader's tests (test_file_formats.py).

Plain NumPy only, so that it also runs under NumPy 1: `python tests/array_layouts.py DIR`
writes each layout under pickle protocols 2 to 5 into DIR as `<layout>_p<protocol>.pkl`, with
the NumPy version that wrote them in `VERSION`. tests/numpy1_pickles/ was written that way by
NumPy 1.26.4 (`pip install numpy==1.26.4` in a fresh venv): genuine NumPy 1 files, which name
`numpy.core` where NumPy 2 names `numpy._core`.
"""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np

PROTOCOLS = (2, 3, 4, 5)


def layouts() -> dict[str, object]:
    """{name: an array (or NumPy scalar) in that layout}; the same values under any NumPy."""
    cube = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    nhwc = (np.arange(2 * 4 * 4 * 3, dtype=np.float32) / 96).reshape(2, 4, 4, 3)
    return {
        "c_order": cube,
        "fortran_order": np.asfortranarray(cube),
        "transposed": cube.transpose(2, 0, 1),
        "nchw_from_nhwc": nhwc.transpose(0, 3, 1, 2),  # how adv_examples images are made
        "sliced": np.arange(60, dtype=np.float64).reshape(6, 10)[::2, 1:7],
        "reversed": np.arange(10, dtype=np.int64)[::-1],
        "broadcast": np.broadcast_to(np.arange(3, dtype=np.float32), (4, 3)),
        "zero_size": np.zeros((0, 3, 4, 4), np.float32),
        "zero_size_transposed": np.zeros((0, 4, 4, 3), np.float32).transpose(0, 3, 1, 2),
        "zero_dim": np.array(3.5),
        "big_endian": np.arange(6, dtype=">f4").reshape(2, 3),
        "bool": np.array([[True, False], [False, True]]),
        "uint8": np.arange(12, dtype=np.uint8).reshape(3, 4).T,
        "int32": np.arange(-3, 3, dtype=np.int32),
        "float16": np.linspace(0, 1, 5, dtype=np.float16),
        "complex64": np.array([1 + 2j, 3 - 4j], np.complex64),
        "scalar_float32": np.float32(1.5),
        "scalar_int64": np.int64(-7),
        "scalar_bool": np.bool_(True),
    }


def write(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for name, value in layouts().items():
        for protocol in PROTOCOLS:
            with open(os.path.join(folder, f"{name}_p{protocol}.pkl"), "wb") as f:
                pickle.dump({"value": value}, f, protocol=protocol)
    with open(os.path.join(folder, "VERSION"), "w") as f:
        f.write(np.__version__ + "\n")


if __name__ == "__main__":
    write(sys.argv[1])
