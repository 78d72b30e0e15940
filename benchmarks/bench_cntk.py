"""Cost of the closed-form convolutional NTK (kernel_regression.cntk) against the empirical
NTK (ntk.empirical_ntk) of the same architecture at finite widths, on the same N digits
images (8x8): the square support kernel K(X, X), timed after a first call that compiles.

The closed form costs N^2 (H W)^2 per layer and nothing in the width; the empirical kernel
costs N Jacobians of P parameters (P ~ 9 width^2 per hidden layer) and their N^2 products.

    python benchmarks/bench_cntk.py                  # N = 100, 200; widths 128, 512
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from ntk_evolution.data import load_dataset
from ntk_evolution.kernels.ntk import empirical_ntk
from ntk_evolution.kernels.regression import cntk_blocked, cntk_network


def timed(fn, repeats: int = 2) -> float:
    """Seconds of the fastest of `repeats` calls, after one call that compiles."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 200])
    p.add_argument("--widths", type=int, nargs="+", default=[128, 512])
    p.add_argument("--depth", type=int, default=2)
    args = p.parse_args()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"{machine}, JAX {jax.__version__} on {jax.default_backend()}; depth {args.depth}")
    x_all = load_dataset("digits").x_train
    closed = jax.jit(functools.partial(cntk_blocked, depth=args.depth))
    for n in args.sizes:
        x = jnp.asarray(x_all[:n])
        t_closed = timed(lambda x=x: np.asarray(closed(x, x)))
        print(f"N = {n}: CNTK closed form {t_closed:.2f} s", flush=True)
        for width in args.widths:
            model = cntk_network(width, args.depth)
            params, state = model.init(jax.random.PRNGKey(0), x[:1], True)
            t_emp = timed(
                lambda model=model, params=params, state=state, x=x: empirical_ntk(
                    model, params, state, np.asarray(x), class_index=0, progress=False
                )
            )
            print(
                f"  empirical NTK, width {width}: {t_emp:.2f} s "
                f"(closed form / empirical = {t_closed / t_emp:.2f})"
            )


if __name__ == "__main__":
    main()
