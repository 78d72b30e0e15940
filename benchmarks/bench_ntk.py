"""Empirical-NTK benchmark: our ntk.empirical_ntk against torch.func (vmap of jacrev, then the
same contraction), the same architecture and N random 32x32x3 images, in one process.

Prints, per row: seconds (median over --repeats after one warm-up), the FLOP lower bound
(per-example gradients: 3x the forward FLOPs per output, plus the Gram product N^2 K P, halved
for the symmetric kernel) divided by the float32 matmul rate measured here, and ratios.

    python benchmarks/bench_ntk.py                  # ResNet-18, N = 500, logit 0
    python benchmarks/bench_ntk.py --model mlp_wide --n 200
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from models import get_model, init_model
from ntk_evolution.ntk import default_memory_gb, empirical_ntk, plan_chunks, plan_kernel
from utils import tree_size


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matmul rate of this machine (JAX/XLA), GFLOP/s."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9


def forward_flops(model, params, net_state, image_shape) -> float:
    """FLOPs of one forward pass of one image, from XLA's cost analysis."""
    x = jnp.zeros((1, *image_shape))
    compiled = (
        jax.jit(lambda p, s, x: model.apply(p, s, x, False)[0])
        .lower(params, net_state, x)
        .compile()
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def torch_model(name: str, n_classes: int, image_shape=(32, 32, 3)) -> torch.nn.Module:
    """The torch twin of our model `name` (eval mode): torchvision's ResNet-18 with a 3x3 stem
    and no max-pool, the MLPs, and cnn_small (three 3x3 conv-BN-ReLU, strides 1, 2, 2, global
    mean, linear)."""
    if name == "cnn_small":
        layers, channels = [], image_shape[-1]
        for out, stride in ((32, 1), (64, 2), (64, 2)):
            layers += [
                torch.nn.Conv2d(channels, out, 3, stride, 1, bias=False),
                torch.nn.BatchNorm2d(out),
                torch.nn.ReLU(),
            ]
            channels = out
        layers += [
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(64, n_classes),
        ]
        net = torch.nn.Sequential(*layers)
    elif name == "resnet18":
        import torchvision

        net = torchvision.models.resnet18(num_classes=n_classes)
        net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = torch.nn.Identity()
    elif name in ("mlp_wide", "mlp_skinny"):
        width = 2048 if name == "mlp_wide" else 256
        net = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(int(np.prod(image_shape)), width), torch.nn.ReLU(),
            torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, n_classes),
        )  # fmt: skip
    else:
        raise SystemExit(f"no torch peer for {name}")
    return net.eval()


def torch_ntk(net: torch.nn.Module, x: torch.Tensor, class_index: int, plan) -> np.ndarray:
    """K = J J^T with J from torch.func.vmap(jacrev), following the same chunk plan as ours:
    each row chunk computed once, column chunks cached when the plan says they fit."""
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = {k: v.detach() for k, v in net.named_buffers()}

    def f(p, xi):
        out = functional_call(net, (p, buffers), (xi[None],))[0]
        return out[class_index : class_index + 1] if class_index >= 0 else out

    jac_fn = vmap(jacrev(f), in_dims=(None, 0))
    chunk, n = plan.chunk_size, len(x)
    k_out = 1 if class_index >= 0 else 10

    def jacobian(start):
        jac = jac_fn(params, x[start : start + chunk])
        return torch.cat([j.reshape(j.shape[0], -1) for j in jac.values()], dim=1)

    kernel = np.zeros((n, n))
    cache = {}
    with torch.no_grad():
        for i in range(0, n, chunk):
            row = cache.get(i)
            row = jacobian(i) if row is None else row
            for j in range(i, n, chunk):
                col = row if j == i else cache.get(j)
                if col is None:
                    col = jacobian(j)
                    if plan.cache_columns:
                        cache[j] = col
                block = (row @ col.T / k_out).double().numpy()
                kernel[i : i + chunk, j : j + chunk] = block
                kernel[j : j + chunk, i : i + chunk] = block.T
    return kernel


def timed(fn, warm_up, repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` calls of fn after one call of warm_up (compilation, on one
    chunk: the shapes the timed calls use)."""
    warm_up()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (ours runs first, so its row is ours)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--class_index", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--max_memory_gb", type=float, default=None, help="budget, for both")
    p.add_argument("--factor_convs", default="auto", choices=("auto", "all", "none"))
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    shape = (32, 32, 3)
    model = get_model(args.model, 10)
    params, net_state = init_model(model, jax.random.PRNGKey(0), shape)
    x = np.random.default_rng(0).uniform(0, 1, (args.n, *shape)).astype(np.float32)
    n_params = tree_size(params)
    k_out = 1 if args.class_index >= 0 else 10
    rate = matmul_gflops()
    fwd = forward_flops(model, params, net_state, shape)
    bound_flops = args.n * k_out * 3 * fwd + args.n**2 * k_out * n_params
    bound_s = bound_flops / (rate * 1e9)
    print(
        f"device {jax.devices()[0].device_kind}, {os.cpu_count()} cores; matmul {rate:.0f} GFLOP/s"
    )
    print(
        f"{args.model}: {n_params:,} params, forward {fwd / 1e9:.3f} GFLOP/image; "
        f"N = {args.n}, outputs {k_out}"
    )

    budget = args.max_memory_gb or default_memory_gb()
    plan = plan_kernel(
        model, params, net_state, x, x, args.class_index, max_memory_gb=budget,
        factor_convs=args.factor_convs,
    )  # fmt: skip
    factored = sum(layer.patch * layer.channels for layer in plan.factored)
    print(
        f"ours: {len(plan.factored)} convolutions ({factored / n_params:.0%} of the parameters) "
        f"factored, {plan.bytes_per_image / 2**20:.1f} MB per image, chunks of "
        f"{plan.chunk_size}, columns cached: {plan.cache_columns}"
    )

    def ours_kernel(images):
        return empirical_ntk(
            model, params, net_state, images, class_index=args.class_index,
            chunk_size=plan.chunk_size, max_memory_gb=budget, factor_convs=args.factor_convs,
            progress=False,
        )  # fmt: skip

    ours_s, ours = timed(
        lambda: ours_kernel(x), lambda: ours_kernel(x[: plan.chunk_size]), args.repeats
    )
    ours_gb = peak_rss_gb()
    torch_plan = plan_chunks(args.n, args.n, 4 * n_params * k_out, budget)
    print(
        f"torch.func: {4 * n_params * k_out / 2**20:.1f} MB per image, chunks of "
        f"{torch_plan.chunk_size}, columns cached: {torch_plan.cache_columns}"
    )
    net = torch_model(args.model, 10)
    x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    torch_s, theirs = timed(
        lambda: torch_ntk(net, x_torch, args.class_index, torch_plan),
        lambda: torch_ntk(net, x_torch[:8], args.class_index, torch_plan),
        args.repeats,
    )
    torch_gb = peak_rss_gb()
    print("\n| implementation | seconds | peak memory GB | FLOP bound s | x bound | ours/torch |")
    print("|---|---|---|---|---|---|")
    print(
        f"| ours (ntk.py)  | {ours_s:.1f} | {ours_gb:.1f} | {bound_s:.1f} | {ours_s / bound_s:.2f} "
        f"| {ours_s / torch_s:.2f} |"
    )
    print(
        f"| torch.func     | {torch_s:.1f} | {torch_gb:.1f} (process) | {bound_s:.1f} | "
        f"{torch_s / bound_s:.2f} | 1.00 |"
    )
    for name, kernel in (("ours", ours), ("torch.func", theirs)):
        if not np.all(np.isfinite(kernel)):
            print(f"warning: {name}'s kernel has {np.sum(~np.isfinite(kernel))} non-finite entries")


if __name__ == "__main__":
    main()
