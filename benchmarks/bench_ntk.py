"""Empirical-NTK benchmark: our ntk.empirical_ntk against torch.func (vmap of jacrev, then the
same contraction), the same architecture and N random 32x32x3 images, in one process.

Kernels (--kernels): a class kernel (one logit), the kernel averaged over the C logits, the full
kernel (every pair of logits). Prints, per kernel: seconds (median over --repeats after one
warm-up), the FLOP lower bound divided by the float32 matmul rate measured here (per image one
forward and K backward passes, K the logits traced: (1 + 2K) forward FLOPs; per pair of images
2 P FLOPs for each pair of logits, over half the pairs by symmetry: N^2 P, N^2 C P or
N^2 C^2 P), and ratios, to the peer and to our class kernel.

    python benchmarks/bench_ntk.py                  # ResNet-18, N = 500, class kernel (logit 0)
    python benchmarks/bench_ntk.py --n 100 --kernels class averaged full
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

from ntk_evolution.kernels.ntk import default_memory_gb, empirical_ntk, plan_chunks, plan_kernel
from ntk_evolution.models import get_model, init_model
from ntk_evolution.utils import tree_size


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


def torch_plan(n: int, n_params: int, kernel: str, n_classes: int, budget: float):
    """The peer's (logits per pass, ChunkPlan), by our rule (ntk.plan_kernel) with its own
    memory per image: the averaged kernel in passes over the largest group of logits whose
    Jacobians of all n images fit, else one logit per pass; class and full kernels in one."""
    groups = {"class": [1], "full": [n_classes]}.get(
        kernel, [g for g in range(n_classes, 0, -1) if n_classes % g == 0]
    )
    for group in groups:
        plan = plan_chunks(n, n, 4 * n_params * group, budget)
        if plan.cache_columns:
            break
    return group, plan


def torch_ntk(
    net: torch.nn.Module, x: torch.Tensor, kernel: str, class_index: int, group: int, plan
) -> np.ndarray:
    """The same kernel with J from torch.func.vmap(jacrev): each row chunk computed once,
    column chunks cached when the plan says they fit; the averaged kernel as the mean of passes
    over groups of `group` logits, the full kernel (every pair of logits) logit-major."""
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = {k: v.detach() for k, v in net.named_buffers()}
    n, chunk = len(x), plan.chunk_size
    with torch.no_grad():
        n_classes = net(x[:1]).shape[-1]
    if kernel == "class":
        selections = [(class_index, class_index + 1)]
    else:
        selections = [(c, c + group) for c in range(0, n_classes, group)]
    k = selections[0][1] - selections[0][0]  # logits per pass
    full = kernel == "full"
    result = np.zeros((n, k, n, k) if full else (n, n))
    for start, stop in selections:

        def f(p, xi, start=start, stop=stop):
            return functional_call(net, (p, buffers), (xi[None],))[0][start:stop]

        jac_fn = vmap(jacrev(f), in_dims=(None, 0))

        def jacobian(i, jac_fn=jac_fn):  # (images * k, P): each (image, logit) a row
            jac = jac_fn(params, x[i : i + chunk])
            return torch.cat([j.reshape(j.shape[0] * k, -1) for j in jac.values()], dim=1)

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
                    block = (row @ col.T).double().numpy()
                    n1, n2 = len(block) // k, block.shape[1] // k
                    block = block.reshape(n1, k, n2, k)
                    if not full:  # the sum over this pass's logits, weighted for the mean
                        # this pass's share of the mean over the kernel's logits
                        block = np.einsum("akbk->ab", block) / (
                            k if kernel == "class" else n_classes
                        )
                        result[i : i + n1, j : j + n2] += block
                        if j != i:
                            result[j : j + n2, i : i + n1] += block.T
                    else:
                        result[i : i + n1, :, j : j + n2] = block
                        result[j : j + n2, :, i : i + n1] = block.transpose(2, 3, 0, 1)
    if full:
        return result.transpose(1, 0, 3, 2).reshape(n_classes * n, n_classes * n)
    return result


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


KERNELS = ("class", "averaged", "full")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--n", type=int, default=500)
    p.add_argument(
        "--kernels", nargs="+", default=["class"], choices=KERNELS,
        help="class (logit --class_index), averaged over the logits, full (every pair)",
    )  # fmt: skip
    p.add_argument("--class_index", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--max_memory_gb", type=float, default=None, help="budget, for both")
    p.add_argument("--factor_convs", default="auto", choices=("auto", "all", "none"))
    p.add_argument("--no_torch", action="store_true", help="ours only")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    shape, n_classes = (32, 32, 3), 10
    model = get_model(args.model, n_classes)
    params, net_state = init_model(model, jax.random.PRNGKey(0), shape)
    x = np.random.default_rng(0).uniform(0, 1, (args.n, *shape)).astype(np.float32)
    x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    n_params = tree_size(params)
    rate = matmul_gflops()
    fwd = forward_flops(model, params, net_state, shape)
    budget = args.max_memory_gb or default_memory_gb()
    print(
        f"device {jax.devices()[0].device_kind}, {os.cpu_count()} cores; matmul {rate:.0f} GFLOP/s"
    )
    print(
        f"{args.model}: {n_params:,} params, forward {fwd / 1e9:.3f} GFLOP/image; N = {args.n}, "
        f"{n_classes} logits, budget {budget:.1f} GB"
    )
    rows = []
    for kernel in args.kernels:
        k = 1 if kernel == "class" else n_classes  # logits traced per image
        pairs = {"class": 1, "averaged": n_classes, "full": n_classes**2}[kernel]
        # per image: one forward and k backward passes (data and weight gradients); per pair of
        # images (half of them, by symmetry): 2 P FLOPs per pair of logits
        bound_s = (args.n * (1 + 2 * k) * fwd + args.n**2 * pairs * n_params) / (rate * 1e9)
        class_index = args.class_index if kernel == "class" else -1
        full = kernel == "full"
        plan = plan_kernel(
            model, params, net_state, x, x, class_index, max_memory_gb=budget,
            factor_convs=args.factor_convs, full=full,
        )  # fmt: skip
        factored = sum(layer.patch * layer.channels for layer in plan.factored)
        print(
            f"{kernel} kernel, ours: {plan.logit_group} logits per pass, {len(plan.factored)} "
            f"convolutions ({factored / n_params:.0%} of the parameters) factored, "
            f"{plan.bytes_per_image / 2**20:.1f} MB per image, chunks of {plan.chunk_size}, "
            f"columns cached: {plan.cache_columns}",
            flush=True,
        )

        def ours_kernel(images, class_index=class_index, full=full, plan=plan):
            return empirical_ntk(
                model, params, net_state, images, class_index=class_index, full=full,
                chunk_size=plan.chunk_size, max_memory_gb=budget, factor_convs=args.factor_convs,
                progress=False,
            )  # fmt: skip

        warm = x[: plan.chunk_size]  # warm-up on one chunk: the shapes the timed call uses
        ours_s, ours = timed(
            lambda f=ours_kernel: f(x), lambda f=ours_kernel, w=warm: f(w), args.repeats
        )
        row = {"kernel": kernel, "ours_s": ours_s, "ours_gb": peak_rss_gb(), "bound_s": bound_s}
        check_finite(f"ours ({kernel})", ours)
        if not args.no_torch:
            group, peer_plan = torch_plan(args.n, n_params, kernel, n_classes, budget)
            print(
                f"{kernel} kernel, torch.func: {group} logits per pass, "
                f"{4 * n_params * group / 2**20:.1f} MB per image, chunks of "
                f"{peer_plan.chunk_size}, columns cached: {peer_plan.cache_columns}",
                flush=True,
            )
            net = torch_model(args.model, n_classes)

            def peer(images, kernel=kernel, group=group, peer_plan=peer_plan, net=net):
                return torch_ntk(net, images, kernel, args.class_index, group, peer_plan)

            torch_s, theirs = timed(
                lambda f=peer: f(x_torch), lambda f=peer: f(x_torch[:8]), args.repeats
            )
            row |= {"torch_s": torch_s, "torch_gb": peak_rss_gb()}
            check_finite(f"torch.func ({kernel})", theirs)
        rows.append(row)
        print(f"{kernel} kernel: {row}", flush=True)
    class_s = next((r["ours_s"] for r in rows if r["kernel"] == "class"), None)
    print(
        "\n| kernel | ours s | torch.func s | ours/torch | FLOP bound s | ours x bound | "
        "ours / ours class | peak memory GB (process so far) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        torch_s = r.get("torch_s")
        cells = [
            r["kernel"],
            f"{r['ours_s']:.1f}",
            f"{torch_s:.1f}" if torch_s else "-",
            f"{r['ours_s'] / torch_s:.2f}" if torch_s else "-",
            f"{r['bound_s']:.1f}",
            f"{r['ours_s'] / r['bound_s']:.2f}",
            f"{r['ours_s'] / class_s:.2f}" if class_s else "-",
            f"{r['ours_gb']:.1f}" + (f" / {r['torch_gb']:.1f}" if torch_s else ""),
        ]
        print("| " + " | ".join(cells) + " |")


def check_finite(name: str, kernel: np.ndarray) -> None:
    if not np.all(np.isfinite(kernel)):
        print(f"warning: {name}'s kernel has {np.sum(~np.isfinite(kernel))} non-finite entries")


if __name__ == "__main__":
    main()
